"""Peak extra memory of one dkm_cluster forward + backward: direct autograd vs torchdkm's lean backward, at its
default (an iteration's attention is kept for reuse within the call when it takes at most 64 MiB) and with
``reuse_bytes=0`` (always recompute: extra memory O(N·d) whatever k).

Each configuration runs in a fresh process. On CPU, "extra" is the rise of the peak RSS (VmHWM, reset
through /proc/self/clear_refs just before the call) over the RSS at that moment, measured on a second
call after a same-size warm-up, with glibc told to return freed memory at once, with the weights, centroids and upstream gradient already allocated; on CUDA
it is torch.cuda.max_memory_allocated over the same baseline. The output W~ and the gradient dL/dW
(each the size of the weight tensor) exist in any training step; the table shows the extra memory as a
multiple of the weight tensor, and the same beyond those two.

    python benchmarks/engine/dkm_memory.py --out benchmarks/engine/results/dkm_memory.md
    python benchmarks/engine/dkm_memory.py --device cuda --out benchmarks/engine/results/dkm_memory_cuda.md
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

NUMEL = 1 << 20  # weights per tensor (4 MiB in float32), the same for every d
KS = (4, 16, 64, 256)
DIRECT_LIMIT_GIB = 6.0  # skip direct runs estimated above this (the machine is shared)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; returns the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def run_one(impl: str, d: int, k: int, iters: int, device: str, numel: int = NUMEL, groups: int = 1) -> dict:
    import torch

    from torchdkm import dkm_cluster, dkm_cluster_reference, kmeans_init
    from torchdkm.functional import auto_tau

    torch.manual_seed(0)
    # groups > 1: one table per group (grouped LUTs), all groups in one batched call
    shape = (numel // d, d) if groups == 1 else (groups, numel // (d * groups), d)
    w = (0.05 * torch.randn(shape, device=device)).requires_grad_()
    c0 = kmeans_init(w, k)
    tau = auto_tau(c0, 0.05)
    up = torch.randn_like(w)
    fns = {"direct": dkm_cluster_reference, "lean": dkm_cluster,
           "lean_noreuse": lambda *args: dkm_cluster(*args, reuse_bytes=0)}
    fn = fns[impl]
    # Warm-up with the same sizes: the first backward of a process allocates ~40 MiB of one-time state
    # (autograd engine, thread pools) that later steps reuse; training measures the steady state.
    wt, c = fn(w, c0, tau, iters)
    wt.backward(up)
    del wt, c
    w.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak_rss()
    wt, c = fn(w, c0, tau, iters)  # eps = 0: exactly `iters` iterations
    wt.backward(up)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024
    weight = w.numel() * w.element_size()
    return {"impl": impl, "d": d, "k": k, "iters": iters, "groups": groups, "extra_bytes": peak - base,
            "weight_bytes": weight}


def main(argv=None):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import common  # the shared harness (benchmarks/common.py)

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dims", default="1,4")
    p.add_argument("--iters", default="1,3,5")
    p.add_argument("--ks", default=",".join(map(str, KS)), help="centroid counts")
    p.add_argument("--numel", type=int, default=NUMEL, help="weights per tensor (a small grid: e.g. 65536)")
    p.add_argument("--impls", default="direct,lean", help="of direct, lean, lean_noreuse (reuse_bytes=0)")
    p.add_argument("--groups", default="1", help="LUTs per tensor (grouped LUTs: e.g. 1,64)")
    p.add_argument("--out")
    p.add_argument("--child", help=argparse.SUPPRESS)
    common.harness_args(p)
    a = p.parse_args(argv)
    ks = tuple(map(int, a.ks.split(",")))
    if a.child:
        impl, d, k, it, g = a.child.split(",")
        print(json.dumps(run_one(impl, int(d), int(k), int(it), a.device, a.numel, int(g))))
        return
    run = common.start(__file__, a, argv)
    rows = []
    groups = list(map(int, a.groups.split(",")))
    grid = [(g, d) for g in groups for d in map(int, a.dims.split(","))]
    for g, d in grid:
        for it in map(int, a.iters.split(",")):
            for k in ks:
                for impl in a.impls.split(","):
                    est = 4 * a.numel * k * it * 4 / 2**30  # ~4 float32 N·k·d tensors kept per iteration
                    if impl == "direct" and est > DIRECT_LIMIT_GIB:
                        rows.append({"impl": impl, "d": d, "k": k, "iters": it, "groups": g, "skipped": est})
                        continue
                    cmd = [sys.executable, __file__, "--device", a.device, "--numel", str(a.numel),
                           "--child", f"{impl},{d},{k},{it},{g}"]
                    # Fixed mmap threshold and immediate trimming: RSS then follows live allocations.
                    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
                    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    if out.returncode != 0:
                        raise SystemExit(out.stderr[-2000:])
                    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                    print(rows[-1], file=sys.stderr)
    impls = a.impls.split(",")
    lines = [f"One dkm_cluster forward+backward, {a.numel} weights (float32, {a.numel * 4 / 2**20:g} MiB), "
             f"device {a.device}. Extra memory in MiB and, in brackets, as a multiple of the weight tensor; "
             f"output W~ and gradient dL/dW are 2× of it in any training step.", "",
             "| LUTs | d | iters | k | " + " | ".join(f"{i} MiB [× weight]" for i in impls) + " |",
             "|---|---|---|---|" + "---|" * len(impls)]
    worst = {i: 0.0 for i in impls if i != "direct"}
    for g, d in grid:
        for it in map(int, a.iters.split(",")):
            for k in ks:
                cells = []
                for impl in impls:
                    r = next(r for r in rows if (r["impl"], r["d"], r["k"], r["iters"], r["groups"]) == (impl, d, k, it, g))
                    if "skipped" in r:
                        cells.append(f"skipped (~{r['skipped']:.0f} GiB est.)")
                        continue
                    x = r["extra_bytes"] / r["weight_bytes"]
                    if impl in worst:
                        worst[impl] = max(worst[impl], x - 2)
                    cells.append(f"{r['extra_bytes'] / 2**20:.1f} [{x:.2f}]")
                lines.append(f"| {g} | {d} | {it} | {k} | " + " | ".join(cells) + " |")
    lines += [""] + [f"{i}, worst case over the grid: {v:.2f}× the weight tensor beyond output and gradient"
                     for i, v in worst.items()]
    text = "\n".join(lines)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text + "\n\n" + common.provenance_md(run) + "\n")
        common.write_json(Path(os.path.splitext(a.out)[0] + ".json"), {"rows": rows})
    return rows


if __name__ == "__main__":
    main()
