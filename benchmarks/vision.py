"""Vision benchmark: DKM vs the baselines users would pick instead, on Fashion-MNIST (full 60k/10k split).

Two model families as in the DKM paper, scaled to 28×28: ``resnet_small`` (BatchNorm + residual blocks) and
``mobilenet_small`` (depthwise-separable, the family the paper calls hard to compress). Each is trained in fp32
once (seeded, cached under ~/.cache/torchdkm/fp32, env TORCHDKM_CACHE), then compressed at several budgets
(index bits / cluster dim; every Conv2d and Linear layer, min_numel=0):

    4 bit = 2^4 centroids, 1-d    2 bit = 2^2, 1-d    1 bit = 2^4 centroids of 4-d vectors    0.5 bit = 2^4 of 8-d

Methods (see benchmarks/common.py for exact definitions): fp32; ``dkm`` (torchdkm DKM fine-tuning);
``ptq_kmeans`` (post-training k-means, no fine-tuning); ``st_kmeans`` (k-means fine-tuning through hard
assignments, straight-through, TF-MOT style); ``qat_lsq`` (uniform n-bit per-channel LSQ+ QAT, only for whole
bits >= 1); ``coreml_dkm`` (coremltools DKMPalettizer, when installed, at --coreml-budgets).
Every fine-tuned method uses the same loop: AdamW, lr --lr with cosine decay to 0, --steps steps of batch 128,
the same data order for a given seed; BatchNorm in train mode while fine-tuning, eval mode for testing.

Seeds: every method runs seed 0 at every budget; at the key budgets (--key-budgets) DKM and the strongest
baseline there (best seed-0 top-1 among the non-DKM methods) run --seeds seeds in all (mean ± std).

Compute budget: our 2 cores are shared by four engineers (load average ~7.5 while this ran): a ResNetSmall step of
batch 128 costs ~0.37 s of CPU (fp32) / ~0.45 s (DKM) on one thread, but took ~2.2 s of wall time. So: fp32
4 epochs (one-cycle AdamW, lr 3e-3), trained once and cached; fine-tuning 150 steps of batch 128 (19,200 images,
0.32 epoch) for every method, lr 1e-3 (a 60-step pilot on a weaker model at 1 bit: lr 3e-4 / 1e-3 / 3e-3 gave
DKM 77.7 / 81.5 / 81.8 %, ST k-means - / 82.4 / 81.2 %); 3 seeds at the 1-bit budget; coremltools at the 2-bit and
1-bit budgets. The table reports each run's wall time and CPU time.
Run the two models in parallel processes (``--models resnet_small`` and ``--models mobilenet_small``): each writes
results/vision_<model>.json and the last one to finish rewrites the combined results/vision.md and vision.png.

    python benchmarks/vision.py            # full (both models, sequentially)
    python benchmarks/vision.py --quick    # a few minutes: resnet_small, data subsets, short schedules
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import torchdkm  # noqa: E402
from torchdkm.app.zoo.models import build_model  # noqa: E402

BUDGETS = {"4bit": (4, 1), "2bit": (2, 1), "1bit": (4, 4), "0.5bit": (4, 8)}
METHODS = ["ptq_kmeans", "st_kmeans", "qat_lsq", "coreml_dkm", "dkm"]
LABEL = {"fp32": "fp32", "dkm": "DKM (torchdkm)", "ptq_kmeans": "k-means, no fine-tuning",
         "st_kmeans": "k-means + STE fine-tuning", "qat_lsq": "uniform QAT (LSQ+)", "coreml_dkm": "coremltools DKM"}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few minutes: resnet_small, subsets, short schedules")
    p.add_argument("--models", nargs="+", default=None, help="resnet_small mobilenet_small")
    p.add_argument("--budgets", nargs="+", default=None, help=f"subset of {list(BUDGETS)}")
    p.add_argument("--methods", nargs="+", default=None, help=f"subset of {METHODS}")
    p.add_argument("--key-budgets", nargs="+", default=None)
    p.add_argument("--coreml-budgets", nargs="+", default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (batch 128)")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning AdamW lr (cosine to 0)")
    p.add_argument("--tau-scale", type=float, default=0.05)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--fp32-epochs", type=int, default=None)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument("--tag", default="vision", help="output file stem")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    full = dict(models=["resnet_small", "mobilenet_small"], budgets=list(BUDGETS), methods=METHODS,
                key_budgets=["1bit"], coreml_budgets=["2bit", "1bit"], seeds=3, steps=150, fp32_epochs=4,
                train_subset=None, test_subset=None)
    quick = dict(models=["resnet_small"], budgets=["2bit", "1bit"], methods=METHODS, key_budgets=[],
                 coreml_budgets=["1bit"], seeds=1, steps=40, fp32_epochs=1, train_subset=12800, test_subset=2000)
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def run_one(method, fp32, budget, seed, data, a, log):
    """Compress a copy of fp32 with one method; returns a result dict (top1, size, wall)."""
    x, y, xt, yt = data
    bits, dim = BUDGETS[budget]
    cfg = torchdkm.DKMConfig(bits=bits, dim=dim, min_numel=0, seed=seed, tau_scale=a.tau_scale, iters=a.iters)
    model = copy.deepcopy(fp32)
    layers = common.dkm_layers(model, cfg)
    size = common.kmeans_size(fp32, cfg)
    kw = dict(steps=a.steps, lr=a.lr, seed=seed, progress=not a.no_progress, desc=f"{method} {budget} s{seed}")
    t0, c0 = time.perf_counter(), time.process_time()
    if method == "ptq_kmeans":
        common.ptq_kmeans_apply(model, cfg)
    elif method == "dkm":
        torchdkm.prepare(model, cfg)
        common.train(model, x, y, **kw)
        torchdkm.finalize(model)
    elif method == "st_kmeans":
        cents = common.st_kmeans_prepare(model, cfg)
        common.train(model, x, y, **kw)
        common.strip_parametrizations(model)
    elif method == "qat_lsq":
        if bits % dim:
            return None
        qb = bits // dim
        size = common.uniform_size(fp32, common.dkm_layers(fp32, cfg), qb)
        common.qat_prepare(model, layers, qb)
        common.train(model, x, y, **kw)
        common.strip_parametrizations(model)
    elif method == "coreml_dkm":
        model, pal, done = common.coreml_prepare(model, layers, bits, dim)
        if len(done) < len(layers):  # e.g. cluster_dim must divide the output channels: those stay fp32
            skip = sorted(set(layers) - set(done))
            log(f"  coremltools left {skip} uncompressed (cluster_dim {dim}); its size counts them as fp32")
            size = common.kmeans_size(fp32, cfg.replace(min_numel=1 << 62), {n: cfg for n in done})
            size["fp32_layers"] = skip
        common.train(model, x, y, after_step=pal.step, **kw)
        model = pal.finalize(inplace=True)
    else:
        raise ValueError(method)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    acc = common.accuracy(model, xt, yt)
    return dict(method=method, budget=budget, bits=bits, dim=dim, seed=seed, top1=acc, wall_s=wall, cpu_s=cpu, **size)


def run_model(name, a, data, log):
    x, y, xt, yt = data
    path = a.out / f"{a.tag}_{name}.json"
    settings = {k: getattr(a, k) for k in ("steps", "lr", "tau_scale", "iters", "fp32_epochs", "train_subset",
                                           "test_subset")}
    old = json.loads(path.read_text()) if path.is_file() else {}
    runs = old.get("runs", []) if old.get("settings") == settings else []
    resumed = bool(runs)  # same settings: finished runs are kept, the rest are done now
    fp32_build = lambda: build_model(name)  # noqa: E731
    t0 = time.perf_counter()
    fp32, info = common.fp32_model(name + ("" if a.train_subset is None else f"-sub{a.train_subset}"), fp32_build,
                                   x, y, xt, yt, epochs=a.fp32_epochs, lr=3e-3, progress=not a.no_progress, log=log)
    fp32_acc = common.accuracy(fp32, xt, yt)
    fp32_kib = sum(p.numel() for p in fp32.parameters()) * 4 / 1024
    result = dict(model=name, settings=settings, fp32=dict(info, top1=fp32_acc, kib=fp32_kib,
                                                             params=sum(p.numel() for p in fp32.parameters())),
                  runs=runs, threads=torch.get_num_threads(), torch=torch.__version__, machine=platform.machine())
    log(f"[{name}] fp32 top-1 {100 * fp32_acc:.2f}% ({fp32_kib:.1f} KiB)")
    have_coreml = common.coreml_available()

    def do(method, budget, seed):
        if any(r["method"] == method and r["budget"] == budget and r["seed"] == seed for r in runs):
            return
        r = run_one(method, fp32, budget, seed, data, a, log)
        if r is None:
            return
        runs.append(r)
        common.write_json(path, result)
        log(f"[{name}] {method:<11} {budget:<6} seed {seed}: top-1 {100 * r['top1']:.2f}%  {r['kib']:.1f} KiB "
            f"({r['factor']:.1f}x)  {r['wall_s']:.0f} s")

    for budget in a.budgets:
        for method in a.methods:
            if method == "coreml_dkm" and (not have_coreml or budget not in a.coreml_budgets):
                continue
            do(method, budget, 0)
    for budget in a.key_budgets:
        if budget not in a.budgets:
            continue
        base = [r for r in runs if r["budget"] == budget and r["seed"] == 0 and r["method"] not in ("dkm",)]
        strongest = max(base, key=lambda r: r["top1"])["method"] if base else None
        result.setdefault("strongest_baseline", {})[budget] = strongest
        for seed in range(1, a.seeds):
            for method in ("dkm", strongest):
                if method is not None:
                    do(method, budget, seed)
    result["wall_s"] = time.perf_counter() - t0 + (old.get("wall_s", 0) if resumed else 0)
    common.write_json(path, result)
    return result


def summarize(results, a):
    """Markdown table (one row per model × budget × method) and the plot, from the measured results."""
    header = ["model", "method", "budget", "bits/weight", "KiB", "factor", "top-1 %", "Δ vs fp32", "seeds",
              "fine-tune s wall (CPU)"]
    rows, points = [], {}
    for res in results:
        fp = res["fp32"]
        rows.append([res["model"], "fp32", "-", "32", f"{fp['kib']:.1f}", "1.0x", f"{100 * fp['top1']:.2f}", "-",
                     1, f"{fp['train_s']:.0f} (train)"])
        order = {b: i for i, b in enumerate(BUDGETS)}
        groups = {}
        for r in res["runs"]:
            groups.setdefault((r["budget"], r["method"]), []).append(r)
        for (budget, method), rs in sorted(groups.items(), key=lambda kv: (order[kv[0][0]],
                                                                           METHODS.index(kv[0][1]))):
            accs = [r["top1"] for r in rs]
            mean = sum(accs) / len(accs)
            r0 = rs[0]
            rows.append([res["model"], LABEL[method], f"{budget} ({2 ** r0['bits']}×{r0['dim']}-d)",
                         f"{r0['bits_per_weight']:.3f}", f"{r0['kib']:.1f}", f"{r0['factor']:.1f}x",
                         common.fmt_acc(accs), f"{100 * (mean - fp['top1']):+.2f}", len(rs),
                         f"{sum(r['wall_s'] for r in rs) / len(rs):.0f} "
                         f"({sum(r.get('cpu_s', 0) for r in rs) / len(rs):.0f})"])
            points.setdefault(res["model"], {}).setdefault(method, []).append((r0["kib"], 100 * mean))
    table = common.markdown_table(header, rows)
    return table, points


def plot(results, points, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.6), squeeze=False)
    for ax, res in zip(axes[0], results):
        for method, pts in points.get(res["model"], {}).items():
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=LABEL[method])
        ax.axhline(100 * res["fp32"]["top1"], color="k", ls="--", lw=1,
                   label=f"fp32 ({res['fp32']['kib']:.0f} KiB)")
        ax.set_xscale("log")
        ax.set_xlabel("compressed size (KiB, log scale)")
        ax.set_ylabel("Fashion-MNIST test top-1 (%)")
        ax.set_title(res["model"])
        lo = min([p[1] for pts in points.get(res["model"], {}).values() for p in pts] + [100])
        ax.set_ylim(max(lo - 2, 100 * res["fp32"]["top1"] - 25), 100 * res["fp32"]["top1"] + 2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(a, log=print):
    results = []
    for name in ("resnet_small", "mobilenet_small"):
        p = a.out / f"{a.tag}_{name}.json"
        if p.is_file():
            results.append(json.loads(p.read_text()))
    if not results:
        return None
    table, points = summarize(results, a)
    plot(results, points, a.out / f"{a.tag}.png")
    s = results[0]["settings"]
    strongest = {r["model"]: r.get("strongest_baseline", {}) for r in results}
    walls = ", ".join(f"{r['model']} {r.get('wall_s', 0) / 60:.1f} min" for r in results)
    md = [f"# Vision benchmark: Fashion-MNIST ({'quick' if a.quick else 'full'} run)", "",
          f"Command: `python benchmarks/vision.py{' --quick' if a.quick else ''}` (per model: "
          f"`--models resnet_small` / `--models mobilenet_small` in parallel processes). "
          f"torch {results[0]['torch']}, {results[0]['threads']} thread(s) per process, shared 2-core CPU.", "",
          f"Settings: fp32 {s['fp32_epochs']} epoch(s) one-cycle AdamW (cached); fine-tuning {s['steps']} steps × "
          f"batch 128, AdamW lr {s['lr']} cosine to 0, for every fine-tuned method; DKM tau='auto', "
          f"tau_scale {s['tau_scale']}, iters {s['iters']}; train subset {s['train_subset'] or 'all 60000'}, "
          f"test subset {s['test_subset'] or 'all 10000'}. Budgets: index bits / cluster dim, every Conv2d and "
          f"Linear layer. Sizes as `torchdkm.report` counts (indices + fp32 LUT + every uncompressed parameter, "
          f"BatchNorm included); uniform QAT: n bits/weight + fp32 scale and offset per output channel.", "",
          f"Multi-seed rows: DKM and the strongest baseline at the key budget(s) (strongest by seed-0 top-1: "
          f"{strongest}). Wall time (this run, including fp32 training when not cached): {walls}.", "",
          table, "", f"![top-1 vs size]({a.tag}.png)", ""]
    (a.out / f"{a.tag}.md").write_text("\n".join(md))
    log("\n" + table)
    return table


def load_data(a, log=print):
    x, y, xt, yt = common.fashion_tensors()
    if a.train_subset:
        g = torch.Generator().manual_seed(1234)
        i = torch.randperm(len(y), generator=g)[: a.train_subset]
        x, y = x[i], y[i]
    if a.test_subset:
        xt, yt = xt[: a.test_subset], yt[: a.test_subset]
    log(f"Fashion-MNIST: train {len(y)}, test {len(yt)}")
    return x, y, xt, yt


def main(argv=None):
    a = parse(argv)
    common.setup_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    data = load_data(a)
    t0 = time.perf_counter()
    for name in a.models:
        run_model(name, a, data, print)
    write_summary(a)
    print(f"total wall {time.perf_counter() - t0:.0f} s; results in {a.out}/{a.tag}.md, {a.tag}.png, "
          f"{a.tag}_<model>.json")


if __name__ == "__main__":
    main()
