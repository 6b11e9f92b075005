"""Do DKM's centroids collapse? Per layer: how many of the k centroids the finalized weights use, at the k-means start
and after DKM fine-tuning, and the smallest cluster (in vectors).

coremltools' DKMPalettizer splits duplicate centroids during training; this measures whether torchdkm would need it.
The vision benchmark's loop and settings (cached fp32 model, 150 steps of batch 128, AdamW cosine, lr 3e-3,
tau_scale 0.1, distillation 0.5 @ T 2), one fine-tuning seed:

    python benchmarks/vision/centroid_use.py --models resnet_small mobilenet_small --budgets 1bit 0.5bit
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness (common.py)
import common  # noqa: E402
import vision  # noqa: E402

import torchdkm  # noqa: E402


def usage(model, names, dim):
    """{layer: (vectors, distinct vectors, smallest cluster)} of the finalized ``model``."""
    sizes = {n: common.cluster_sizes(model.get_submodule(n).weight, dim) for n in names}
    return {n: (int(c.sum()), c.numel(), int(c.min())) for n, c in sizes.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet_small", "mobilenet_small"])
    p.add_argument("--budgets", nargs="+", default=["1bit", "0.5bit"], help=f"of {list(vision.BUDGETS)}")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", choices=["fashion", "digits"], default="fashion", help="as vision.py (digits: tests)")
    p.add_argument("--fp32-epochs", type=int, default=None, help="as vision.py (default: its own)")
    p.add_argument("--out", type=Path, default=common.results_dir(__file__) / "centroid_use.md")
    common.harness_args(p)
    a = p.parse_args(argv)
    run = common.start(__file__, a, argv)
    common.setup_threads(1)
    va = vision.parse(["--no-progress", "--data", a.data]
                      + (["--fp32-epochs", str(a.fp32_epochs)] if a.fp32_epochs else []))
    data = vision.load_data(va)
    x, y = data["train"]
    rows, worst = [], []
    for name in a.models:
        fp32, _ = vision.fp32_for(name, va, data, print)
        for budget in a.budgets:
            bits, dim = vision.BUDGETS[budget]
            cfg = torchdkm.DKMConfig(bits=bits, dim=dim, min_numel=0, seed=a.seed, tau_scale=0.1)
            names = list(common.dkm_layers(fp32, cfg))
            start = usage(torchdkm.finalize(torchdkm.prepare(copy.deepcopy(fp32), cfg)), names, dim)
            m = torchdkm.prepare(copy.deepcopy(fp32), cfg)
            common.train(m, x, y, steps=a.steps, lr=3e-3, seed=a.seed, after_step=lambda: torchdkm.step(m),
                         progress=False, loss_fn=common.kd_loss(fp32, 0.5, 2.0))
            end = usage(torchdkm.finalize(m), names, dim)
            for n in names:
                rows.append([name, budget, n, start[n][0], cfg.k, start[n][1], end[n][1], start[n][2], end[n][2]])
            worst.append(f"{name} {budget}: fewest used {min(u for _, u, _ in end.values())} of {cfg.k}")
            print(worst[-1], flush=True)
    table = common.markdown_table(["model", "budget", "layer", "vectors", "k", "used at k-means start",
                                   "used after DKM", "smallest cluster at start", "smallest cluster after"], rows)
    md = ["# Centroid use after DKM fine-tuning", "",
          f"Command: `python benchmarks/vision/centroid_use.py {' '.join(sys.argv[1:] if argv is None else argv)}`. "
          f"{a.steps} steps, seed {a.seed}, torch {torch.__version__}, 1 thread. `used`: distinct d-vectors of the "
          "finalized layer (a centroid no weight is nearest to is not used); `smallest cluster`: vectors in the "
          "smallest used cluster.", "", *[f"- {w}" for w in worst], "", table, "",
          common.provenance_md(run), ""]
    common.write_text_atomic(a.out, "\n".join(md))
    common.write_json(a.out.with_suffix(".json"), {"rows": rows})
    return rows


if __name__ == "__main__":
    main()
