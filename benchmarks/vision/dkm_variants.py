"""DKM training variants against k-means + STE, scored on the validation split only (the test set is never loaded).

The vision benchmark's data, cached fp32 models, loop (AdamW, cosine to 0, batch 128) and run code
(``vision.run_one``); each variant is a method plus its settings and training options. This is where DKM's
defaults are chosen: the test set stays untouched for benchmarks/vision/vision.py.

    python benchmarks/vision/dkm_variants.py --models resnet_small --budgets 1bit --seeds 0 1
    python benchmarks/vision/dkm_variants.py --variants ste dkm dkm_anneal --seeds 0 1 2 --tag dkm_variants_mobilenet
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness (common.py)
import common  # noqa: E402
import vision  # noqa: E402

# name -> (method, settings, training options); options not named keep vision.TRAINING_OPTIONS' defaults
VARIANTS = {
    "ste": ("st_kmeans", {"lr": 1e-3, "centroid_lr_mult": 1.0}, {}),
    "ste_lr3e-3": ("st_kmeans", {"lr": 3e-3, "centroid_lr_mult": 1.0}, {}),
    "dkm": ("dkm", {"lr": 1e-3, "tau_scale": 0.05}, {}),
    "dkm_lr3e-3": ("dkm", {"lr": 3e-3, "tau_scale": 0.05}, {}),
    "dkm_anneal": ("dkm", {"lr": 1e-3, "tau_scale": 0.5}, {"tau_scale_end": 0.01}),
    "dkm_anneal_hard": ("dkm", {"lr": 1e-3, "tau_scale": 0.5}, {"tau_scale_end": 0.01, "hard_forward": True}),
    "dkm_anneal0.2": ("dkm", {"lr": 1e-3, "tau_scale": 0.2}, {"tau_scale_end": 0.01}),
    "dkm_anneal1": ("dkm", {"lr": 1e-3, "tau_scale": 1.0}, {"tau_scale_end": 0.01}),
    "dkm_anneal_lr3e-3": ("dkm", {"lr": 3e-3, "tau_scale": 0.5}, {"tau_scale_end": 0.01}),
    "dkm_anneal0.2_lr3e-3": ("dkm", {"lr": 3e-3, "tau_scale": 0.2}, {"tau_scale_end": 0.01}),
    "dkm_tau0.1_lr3e-3": ("dkm", {"lr": 3e-3, "tau_scale": 0.1}, {}),
    "dkm_tau0.02_lr3e-3": ("dkm", {"lr": 3e-3, "tau_scale": 0.02}, {}),
    "ste_kd": ("st_kmeans", {"lr": 1e-3, "centroid_lr_mult": 1.0}, {"kd": 0.5}),
    "dkm_lr3e-3_kd": ("dkm", {"lr": 3e-3, "tau_scale": 0.05}, {"kd": 0.5}),
    # the tuned 1-bit settings (tuning.md) with distillation, and DKM with a direct per-weight gradient on top
    "ste_tuned": ("st_kmeans", {"lr": 3e-3, "centroid_lr_mult": 0.3}, {"kd": 0.5}),
    "dkm_tuned": ("dkm", {"lr": 3e-3, "tau_scale": 0.1}, {"kd": 0.5}),
    "dkm_dg0.3": ("dkm", {"lr": 3e-3, "tau_scale": 0.1, "direct_grad": 0.3}, {"kd": 0.5}),
    "dkm_dg1": ("dkm", {"lr": 3e-3, "tau_scale": 0.1, "direct_grad": 1.0}, {"kd": 0.5}),
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet_small"])
    p.add_argument("--budgets", nargs="+", default=["1bit"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"subset of {list(VARIANTS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--bn-recal", type=int, default=20, help="BatchNorm re-estimation batches after every variant")
    p.add_argument("--out", type=Path, default=common.results_dir(__file__))
    p.add_argument("--tag", default="dkm_variants")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--merge", nargs="+", default=None, metavar="TAG",
                   help="run nothing: write <--tag>.json/.md from the runs under these tags (parallel processes)")
    common.harness_args(p)
    a = p.parse_args(argv)
    bad = sorted(set(a.variants) - set(VARIANTS))
    if bad:
        p.error(f"unknown variant(s) {bad}: allowed are {list(VARIANTS)}")
    return a


def main(argv=None):
    a = parse(argv)
    common.start(__file__, a, argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.merge:
        res = {"runs": [r for tag in a.merge for r in json.loads((a.out / f"{tag}.json").read_text())["runs"]]}
        common.write_json(a.out / f"{a.tag}.json", res)
        return write_md(res, a, a.out / f"{a.tag}.md")
    common.setup_threads(a.threads)
    base = vision.parse(["--steps", str(a.steps), "--bn-recal", str(a.bn_recal), "--no-progress"])
    data = vision.load_data(base)
    del data["test"]  # choosing settings never sees the test set
    path = a.out / f"{a.tag}.json"
    res = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    code = common.code_version(Path(__file__), vision.SCRIPT)["sources"]
    for name in a.models:
        fp32, info = vision.fp32_for(name, base, data, print)
        for budget in a.budgets:
            for variant in a.variants:
                method, hp, options = VARIANTS[variant]
                for seed in a.seeds:
                    key = dict(model=name, budget=budget, variant=variant, seed=seed, steps=a.steps,
                               bn_recal=a.bn_recal, code=code, fp32_sha1=info["sha1"])
                    if any(r["key"] == key for r in res["runs"]):
                        continue
                    o = argparse.Namespace(**vars(base))
                    for k, v in options.items():
                        setattr(o, k, v)
                    r = vision.run_one(method, fp32, budget, seed, data, o, print, dict(hp), evals=("val",))
                    res["runs"].append(dict(key=key, val_top1=r["val_top1"], wall_s=r["wall_s"], hp=r["hp"]))
                    common.write_json(path, res)
                    print(f"[{name}] {budget} {variant:<18} seed {seed}: val {100 * r['val_top1']:.2f}% "
                          f"({r['wall_s']:.0f} s)", flush=True)
    write_md(res, a, path.with_suffix(".md"))


def write_md(res, a, path):
    groups = {}
    for r in res["runs"]:
        k = r["key"]
        groups.setdefault((k["model"], k["budget"], k["steps"], k["variant"]), []).append(r)
    rows = []
    for (model, budget, steps, variant), rs in sorted(groups.items()):
        v = [100 * r["val_top1"] for r in rs]
        spread = f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else ""
        rows.append([model, budget, steps, variant, VARIANTS[variant][0], json.dumps(rs[0]["hp"]),
                     f"{statistics.mean(v):.2f}{spread}", len(v), " ".join(f"{x:.2f}" for x in v),
                     f"{statistics.median(r['wall_s'] for r in rs):.0f}"])
    md = ["# DKM variants vs k-means + STE (validation split)", "",
          "Command: `python benchmarks/vision/dkm_variants.py --variants ... --seeds ...` (parallel processes under their "
          f"own --tag, then `--merge TAG ... --tag {path.stem}`). Validation = 5000 images carved from the Fashion-MNIST training data (seed 0), "
          "the test set is not loaded. Each run: the cached fp32 model, the vision benchmark's loop, BatchNorm "
          "re-estimated after training.", "",
          common.markdown_table(["model", "budget", "steps", "variant", "method", "settings", "val top-1 % (mean ± "
                                 "std)", "seeds", "per seed", "wall s (median)"], rows), ""]
    common.write_text_atomic(path, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"wall {time.perf_counter() - t0:.0f} s")
