"""Training-step time and peak memory: plain vs torchdkm vs coremltools DKMPalettizer, each in its own process.

Workloads (every one trains the same model, batch and optimizer with each method):

* ``minilm_*``: all-MiniLM-L6-v2 + a 5-class head on BBC News text, batch 32 × 64 tokens, AdamW (lr 2e-5);
  every Linear layer of the encoder is clustered (4, 2 or 6 bits with 1-D clusters, or 16 centroids of
  4-D vectors = 1 bit per weight).
* ``minilm_4b_g16s``, ``minilm_3b_g16s``: grouped LUTs, one per 16 output channels, with per-channel scales
  (``DKMConfig(group_size=16, channel_scale=True)``): 24-96 tables per layer, all clustered in one batched pass.
* ``minilm_4b_save``: 4 bits with ``DKMConfig(save_attention=True)`` (the forward's attention is held for backward:
  one recomputation less, memory N × k per layer).
* ``resnet_small_*``, ``mobilenet_small_*``: the vision benchmark's small CNNs on a batch of 128 synthetic
  1×28×28 images, SGD with momentum; every Conv2d and Linear layer is clustered whatever its size
  (2 bits = 4 centroids, 1-D; 1 bit = 16 centroids of 4-D vectors).

coremltools clusters exactly the same layers (``module_name_configs``), not its defaults.

Each row times its own plain run right before torchdkm's, so that both see the same machine load.

Warm-up rule: the first ``--warmup`` steps (default 5) of every process are dropped: they include
torchdkm's k-means initialisation and PyTorch's allocator/kernel warm-up (plain training's first steps are
3-10x slower than the rest). The table gives the median of the remaining steps with their interquartile
range, and a steady-state check: the median of the second half of the kept steps over the first half
("drift"; near 0 % when the warm-up rule held). Ratios are medians of this one run.

    python benchmarks/engine/dkm_step.py --out benchmarks/engine/results/dkm_step.md
    python benchmarks/engine/dkm_step.py --workloads minilm_4b --coreml-steps 0        # one row, no coremltools
    python benchmarks/engine/dkm_step.py --quick --steps 3 --warmup 1 --coreml-steps 0  # seconds (CI)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "text"))  # minilm.py

WORKLOADS = {  # name: (model, bits, dim)
    "minilm_4b": ("minilm", 4, 1),
    "minilm_2b": ("minilm", 2, 1),
    "minilm_6b": ("minilm", 6, 1),
    "minilm_4b_d4": ("minilm", 4, 4),
    "minilm_4b_save": ("minilm", 4, 1),  # DKMConfig(save_attention=True): memory for one attention pass less
    "minilm_4b_g16s": ("minilm", 4, 1),  # + GROUPED below
    "minilm_3b_g16s": ("minilm", 3, 1),
    "resnet_small_2b": ("resnet_small", 2, 1),
    "resnet_small_1b": ("resnet_small", 4, 4),
    "mobilenet_small_2b": ("mobilenet_small", 2, 1),
    "mobilenet_small_1b": ("mobilenet_small", 4, 4),
}
GROUPED = {"minilm_4b_g16s": {"group_size": 16, "channel_scale": True},
           "minilm_3b_g16s": {"group_size": 16, "channel_scale": True}}  # extra DKMConfig fields per workload
METHODS = ("plain", "torchdkm", "coremltools")
MINILM_BATCH, SEQ, CLASSES = 32, 64, 5
CONV_BATCH = 128


# ------------------------------------------------------------------------------------------------ workloads


def _minilm(quick: bool, device):
    """(model, batch tuple, loss fn, optimizer factory, names of the layers to cluster)."""
    import torch
    from torch import nn
    from transformers import AutoModel, AutoTokenizer

    from minilm import minilm_path
    from torchdkm.app.zoo.data import load_bbc_news

    batch, seq = (4, 16) if quick else (MINILM_BATCH, SEQ)
    texts, labels, *_ = load_bbc_news()
    tok = AutoTokenizer.from_pretrained(minilm_path())
    enc = tok(list(texts[:batch]), padding="max_length", truncation=True, max_length=seq, return_tensors="pt")

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = AutoModel.from_pretrained(minilm_path())
            self.head = nn.Linear(self.encoder.config.hidden_size, CLASSES)

        def forward(self, ids, mask):
            h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask[..., None].to(h.dtype)
            return self.head((h * m).sum(1) / m.sum(1))

    torch.manual_seed(0)
    model = Classifier().to(device)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")]
    inputs = (enc["input_ids"].to(device), enc["attention_mask"].to(device))
    y = torch.tensor(list(labels[:batch]), device=device)
    return model, inputs, y, lambda params: torch.optim.AdamW(params, lr=2e-5), names, f"batch {batch}×{seq} tokens"


def _conv(name: str, quick: bool, device):
    import torch
    from torch import nn

    from torchdkm.app.zoo.models import build_model

    batch = 8 if quick else CONV_BATCH
    torch.manual_seed(0)
    model = build_model(name).to(device)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    opt = lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9)  # noqa: E731
    return model, (x,), y, opt, names, f"batch {batch}×1×28×28"


def _coreml(model, names, bits, dim, grouped):
    import contextlib
    import io
    import logging

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from coremltools.optimize.torch.palettization import (DKMPalettizer, DKMPalettizerConfig,
                                                              ModuleDKMPalettizerConfig)
    gran = {} if not grouped else {"granularity": "per_grouped_channel", "group_size": grouped["group_size"],
                                   "enable_per_channel_scale": grouped["channel_scale"]}
    cfg = ModuleDKMPalettizerConfig(n_bits=bits, cluster_dim=None if dim == 1 else dim, weight_threshold=0, **gran)
    pal = DKMPalettizer(model, DKMPalettizerConfig(module_name_configs={n: cfg for n in names}))
    model = pal.prepare(inplace=True)
    done = sum(hasattr(m, "weight_fake_quant") for m in model.modules())
    return model, pal.step, done


def run_one(method: str, workload: str, steps: int, quick: bool, device: str) -> dict:
    """Runs in a child process: time ``steps`` training steps of one method on one workload."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    kind, bits, dim = WORKLOADS[workload]
    model, inputs, y, make_opt, names, desc = (_minilm(quick, device) if kind == "minilm"
                                               else _conv(kind, quick, device))
    hook, clustered, iters_log = None, 0, None
    stack = contextlib.ExitStack()
    if method == "torchdkm":
        import torchdkm
        from torchdkm.functional import record_iterations

        cfg = torchdkm.DKMConfig(bits=bits, dim=dim, min_numel=0, save_attention=workload.endswith("_save"),
                                 **GROUPED.get(workload, {}))
        # exactly the named layers: the global config's size floor leaves every other layer alone
        torchdkm.prepare(model, cfg.replace(min_numel=1 << 62), rules={n: cfg for n in names})
        clustered = sum(1 for m in model.modules() if torchdkm.parametrization.dkm_parametrization(m) is not None)
        iters_log = stack.enter_context(record_iterations())
    elif method == "coremltools":
        model, hook, clustered = _coreml(model, names, bits, dim, GROUPED.get(workload))
    model.train()
    opt = make_opt(model.parameters())
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times, iters = [], []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        if iters_log is not None:
            iters_log.clear()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(*inputs), y)
        loss.backward()
        opt.step()
        if hook is not None:
            hook()
        sync()
        times.append(time.perf_counter() - t)
        if iters_log is not None:
            iters.append(list(iters_log))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB
    out = {"method": method, "workload": workload, "times": times, "peak_rss_gib": rss, "layers": len(names),
           "clustered": clustered, "threads": torch.get_num_threads(), "torch": torch.__version__, "desc": desc,
           "loss": float(loss)}
    if device.startswith("cuda"):
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if iters:
        out["iterations"] = iters  # per step: k-means iterations run by each clustered layer
    return out


# ------------------------------------------------------------------------------------------------ parent


def steady(times, warmup: int) -> dict:
    """Median and quartiles of the steps after the first ``warmup``, and the drift between their halves."""
    kept = times[warmup:]
    if not kept:
        raise SystemExit(f"{len(times)} steps with --warmup {warmup}: no step left to measure")
    q = statistics.quantiles(kept, n=4, method="inclusive") if len(kept) > 1 else [kept[0]] * 3
    h = len(kept) // 2
    drift = statistics.median(kept[h:]) / statistics.median(kept[:h]) - 1 if h else 0.0
    return {"median": q[1], "q1": q[0], "q3": q[2], "n": len(kept), "drift": drift, "first": times[0]}


def _child(method, workload, steps, a):
    cmd = [sys.executable, __file__, "--child", f"{method},{workload}", "--steps", str(steps), "--device", a.device]
    if a.quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{method} on {workload} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cell(s):
    return f"{s['median']:.3f} [{s['q1']:.3f}–{s['q3']:.3f}]" if s else "-"


def table(res: dict, a) -> str:
    any_r = next(iter(next(iter(res.values())).values()))
    lines = [f"{platform.machine()}, {os.cpu_count()} CPUs, torch {any_r['torch']}, {any_r['threads']} threads, "
             f"device {a.device}. Step time in seconds: median [interquartile range] of the steps after the "
             f"first {a.warmup} (warm-up rule); drift = median of the second half of those steps over the first.",
             "",
             "| workload | plain s | torchdkm s | coremltools s | torchdkm / plain | coremltools / plain | "
             "peak RSS GiB plain / torchdkm / coremltools | k-means iterations per layer-step | drift plain / torchdkm |",
             "|---|---|---|---|---|---|---|---|---|"]
    for wl, r in res.items():
        s = {m: steady(r[m]["times"], a.warmup) if m in r else None for m in METHODS}
        ratio = lambda m: f"{s[m]['median'] / s['plain']['median']:.2f}×" if s[m] and s["plain"] else "-"  # noqa
        rss = " / ".join(f"{r[m]['peak_rss_gib']:.2f}" if m in r else "-" for m in METHODS)
        its = "-"
        if "torchdkm" in r:
            flat = [i for step in r["torchdkm"]["iterations"][a.warmup:] for i in step]
            its = f"{statistics.mean(flat):.2f} (max {max(flat)})" if flat else "-"
        drift = " / ".join(f"{s[m]['drift']:+.0%}" if s[m] else "-" for m in ("plain", "torchdkm"))
        model, bits, dim = WORKLOADS[wl]
        label = f"{wl} ({r['plain']['desc']}, {r['plain']['layers']} layers, k={2 ** bits}, d={dim})"
        if "coremltools" in r and r["coremltools"]["clustered"] < r["coremltools"]["layers"]:
            label += f"; coremltools clustered {r['coremltools']['clustered']} of them"
        lines.append(f"| {label} | {_cell(s['plain'])} | {_cell(s['torchdkm'])} | {_cell(s['coremltools'])} | "
                     f"{ratio('torchdkm')} | {ratio('coremltools')} | {rss} | {its} | {drift} |")
    return "\n".join(lines)


def main(argv=None):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import common  # the shared harness (benchmarks/common.py)

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--steps", type=int, default=20, help="steps per process for plain and torchdkm, warm-up included")
    p.add_argument("--warmup", type=int, default=5, help="first steps dropped from every process")
    p.add_argument("--coreml-steps", type=int, default=8, help="steps for coremltools, warm-up included (0 skips it)")
    p.add_argument("--coreml-workloads", nargs="+", default=None, help="workloads with a coremltools run (default all)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quick", action="store_true", help="tiny batches (seconds): for CI, not for figures")
    p.add_argument("--out", help="also write the table (markdown) and the raw runs (.json next to it)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    common.harness_args(p)
    a = p.parse_args(argv)
    if a.child:
        method, workload = a.child.split(",")
        print(json.dumps(run_one(method, workload, a.steps, a.quick, a.device)))
        return None
    run = common.start(__file__, a, argv)
    if a.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda given but torch.cuda.is_available() is False")
    cm_ok = a.coreml_steps > a.warmup
    if cm_ok:
        try:
            import coremltools  # noqa: F401
        except ImportError:
            print("coremltools not installed: skipping its column", file=sys.stderr)
            cm_ok = False
    res = {}
    for wl in a.workloads:
        res[wl] = {}
        for m in METHODS:
            if m == "coremltools" and not (cm_ok and (a.coreml_workloads is None or wl in a.coreml_workloads)):
                continue
            t0 = time.perf_counter()
            res[wl][m] = _child(m, wl, a.coreml_steps if m == "coremltools" else a.steps, a)
            print(f"{wl} {m}: {time.perf_counter() - t0:.0f} s, steps {[round(x, 3) for x in res[wl][m]['times']]}",
                  file=sys.stderr)
    text = table(res, a)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text + "\n")
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump({"args": {k: v for k, v in vars(a).items() if k != "child"}, "runs": res, "provenance": run},
                      f, indent=1, default=str)
    return res


if __name__ == "__main__":
    main()
