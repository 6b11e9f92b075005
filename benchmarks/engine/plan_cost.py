"""What sensitivity + planning cost on the CNNs: the Fisher diagonal and torchdkm.plan, median of repeats.

ResNet-small and MobileNet-small (the cached fp32 models of benchmarks/vision/vision.py, trained on Fashion-MNIST)
with 256 calibration images (the true Fisher: one backward per image) and a plan at the size of uniform 1 bit (16
centroids of 4-d vectors) with the default candidates (bits 1..8, dims 1/2/4, one LUT or g16, with or without
channel scales, or "as is"). Wall and CPU seconds of one process on one torch thread are both reported: on a shared
machine the wall time also counts waiting for a core, CPU time only the work.

    python benchmarks/engine/plan_cost.py --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parents[1] / "vision"))
import common  # noqa: E402

import torchdkm  # noqa: E402
from torchdkm.planner import plan  # noqa: E402
from torchdkm.sensitivity import fisher_diagonal  # noqa: E402


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def measure(name, repeats, log):
    import vision as V

    a = V.parse(["--no-progress"])
    data = V.load_data(a, log=lambda *_: None)
    fp32, _ = V.fp32_for(name, a, data, log)
    fp32.eval()
    x = data["train"][0][torch.randperm(len(data["train"][1]), generator=torch.Generator().manual_seed(1))[:256]]
    uniform = common.clustered_size(fp32, torchdkm.DKMConfig(bits=4, dim=4, min_numel=0))
    budget = uniform["model_kib"] * 1024 - sum(b.numel() * b.element_size() for b in fp32.buffers())
    rows = []
    for i in range(repeats):
        sens, fw, fc = timed(lambda: fisher_diagonal(fp32, [x]))
        p, pw, pc = timed(lambda: plan(fp32, sensitivity=sens, budget_bytes=budget))
        rows.append({"fisher_wall": fw, "fisher_cpu": fc, "plan_wall": pw, "plan_cpu": pc})
        log(f"[{name}] repeat {i}: Fisher {fw:.1f} s wall / {fc:.1f} s CPU, plan {pw:.1f} s wall / {pc:.1f} s CPU")
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"model": name, "params": sum(q.numel() for q in fp32.parameters()), "layers": len(p.rows),
            "budget_bytes": budget, "repeats": rows, "median": med}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet_small", "mobilenet_small"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=common.results_dir(__file__))
    common.harness_args(p)
    a = p.parse_args(argv)
    common.start(__file__, a, argv)
    torch.set_num_threads(1)
    out = common.output_path(a.out, a.allow_dirty)
    res = [measure(m, a.repeats, print) for m in a.models]
    head = ["model", "params", "planned layers", "Fisher s (wall / CPU)", "plan s (wall / CPU)",
            "total s (wall / CPU)"]
    rows = []
    for r in res:
        m = r["median"]
        rows.append([r["model"], f"{r['params'] / 1e3:.0f} k", r["layers"],
                     f"{m['fisher_wall']:.1f} / {m['fisher_cpu']:.1f}", f"{m['plan_wall']:.1f} / {m['plan_cpu']:.1f}",
                     f"{m['fisher_wall'] + m['plan_wall']:.1f} / {m['fisher_cpu'] + m['plan_cpu']:.1f}"])
    argv = sys.argv[1:] if argv is None else argv
    md = ["# Sensitivity + planning cost on the CNNs", "", __doc__.split("\n\n")[1].strip(), "",
          f"Command: `python benchmarks/engine/plan_cost.py {' '.join(argv)}`; medians of {a.repeats} repeats; "
          f"torch {torch.__version__}, 1 thread, 2 CPU cores shared with other jobs.", "",
          common.markdown_table(head, rows), ""]
    common.write_report(out / "plan_cost.md", "\n".join(md), res)


if __name__ == "__main__":
    main()
