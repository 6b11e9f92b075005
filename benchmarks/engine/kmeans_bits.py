"""Post-training error of every layout at bits 1..8: ||W - Ŵ|| / ||W|| of one Linear(512, 64) with N(0, 1) weights
(prepare -> initialize -> finalize). Grouped 1-D LUTs at 7-8 bits must be no worse than at 6 (they were 8x worse).

    python benchmarks/engine/kmeans_bits.py      # ~1 min on one core; writes benchmarks/engine/results/kmeans_bits.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

import torchdkm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
import common  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "kmeans_bits.md"
LAYOUTS = {"d=1, per-tensor": {}, "d=1, g4": dict(group_size=4), "d=1, g16": dict(group_size=16),
           "d=1, g16 + scale": dict(group_size=16, channel_scale=True), "d=2, g16": dict(dim=2, group_size=16),
           "d=4, g4 + scale": dict(dim=4, group_size=4, channel_scale=True)}


def error(w: torch.Tensor, bits: int, layout: dict) -> float:
    model = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False))
    model[0].weight.data.copy_(w)
    torchdkm.finalize(torchdkm.initialize(torchdkm.prepare(model, torchdkm.DKMConfig(bits=bits, min_numel=1,
                                                                                       **layout))))
    return float((model[0].weight.detach() - w).norm() / w.norm())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.harness_args(ap)
    args = ap.parse_args(argv)
    args.out = OUT
    run = common.start(__file__, args, argv)
    common.setup_threads()
    torch.manual_seed(0)
    w = torch.randn(64, 512)
    rows, t0 = {}, time.perf_counter()
    for name, layout in LAYOUTS.items():
        rows[name] = [error(w, bits, layout) for bits in range(1, 9)]
        print(name, " ".join(f"{e:.3f}" for e in rows[name]), flush=True)
    body = [[name] + [f"{e:.3f}" for e in errs] for name, errs in rows.items()]
    text = "\n".join(["# Post-training error by bits and layout", "",
                      "||W - Ŵ|| / ||W|| of a Linear(512, 64) with N(0, 1) weights after prepare -> initialize -> "
                      f"finalize ({time.perf_counter() - t0:.0f} s).", "",
                      common.markdown_table(["layout"] + [f"{b} bit" for b in range(1, 9)], body), "",
                      common.provenance_md(run), ""])
    common.write_report(args.out, text, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
