"""Sharded DKM under torchrun: per-rank DKM memory and time for 1, 2 and 4 processes on one layer of 10.5 M weights.

One 4096 × 2560 weight (10.5 M float32 weights, N(0, 0.02²)) is clustered as a data-parallel training step does it,
on every rank: one ``dkm_cluster`` forward + backward (4 bits: k = 16, d = 1, one LUT, 3 iterations, eps 0 so that
every mode runs the same maths; centroids from the weight's quantiles, tau from ``auto_tau(c, 0.05)``). Unsharded,
every rank does all of it on the exact path (``value_grid=False``: the maths sharding splits); sharded
(``process_group``, what ``DKMConfig(shard=True)`` passes), each rank does its N/R rows. The 1-process run also
times the single-process default for d = 1, the value grid (torchdkm._valuegrid), which sharding does not use.

Memory, per rank and step: the peak resident memory (VmHWM, reset before the step through /proc/self/clear_refs)
over the resident memory at the step's start (which holds the weight, the incoming gradient and the centroids).
glibc's mmap threshold is fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``) for the ranks, so every tensor above that
is mapped when allocated and unmapped when freed, and the resident memory follows the live tensors, gloo's buffers
included (torch's profiler does not see what gloo allocates on its own threads; tracemalloc sees no tensor memory).
"DKM memory" is that peak less the two weight-sized tensors the step returns, the clustered weight W~ and the weight
gradient, which every data-parallel rank holds whole whatever the sharding (forward: peak - W~; backward: peak - W~
- gradient, W~ being held through the backward as a layer's matmul holds it): what is left is the attention state
kept from forward to backward, the chunk temporaries and the communication buffers. The raw peak is shown beside it.
Time: the median step over the steps after the warm-up. Each rank runs one thread.

    python benchmarks/engine/dkm_sharded.py --procs 1,2,4 --out benchmarks/engine/results/dkm_sharded.md
    python benchmarks/engine/dkm_sharded.py --procs 1,2 --minilm     # MiniLM's 37 Linear weights, one after another
    python benchmarks/engine/dkm_sharded.py --procs 1,2 --steps 1 --warmup 1 --quick     # seconds (CI)

The parent launches ``torch.distributed.run`` once per process count and sharding mode.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "text"))  # minilm.py

SHAPE = (4096, 2560)
K, ITERS = 16, 3


def _weights(a):
    import torch

    g = torch.Generator().manual_seed(0)
    if a.quick:
        return [0.02 * torch.randn(384 * 96, 1, generator=g) for _ in range(2)]
    if not a.minilm:
        return [0.02 * torch.randn(SHAPE[0] * SHAPE[1], 1, generator=g)]
    from safetensors.torch import load_file

    from minilm import minilm_path

    state = load_file(str(minilm_path() / "model.safetensors"))
    return [t.reshape(-1, 1).float() for k, t in sorted(state.items()) if k.endswith(".weight") and t.dim() == 2
            and "embeddings" not in k]


def _quantiles(w, k: int):
    """k centroids at the weight's (j + 1/2)/k quantiles (k-means would take longer than the steps measured)."""
    import torch

    v = w.detach().reshape(-1).sort().values
    return v[((torch.arange(k) + 0.5) * v.numel() / k).long()].reshape(k, 1).clone()


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident memory (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _step(w, c0, up, group, grid: bool):
    """One forward + backward of one tensor: (seconds, DKM MiB, raw peak MiB) with the memory as the docstring says."""
    from torchdkm.functional import auto_tau, dkm_cluster

    w.grad = None
    base = _kib("VmRSS")
    _reset_peak()
    t = time.perf_counter()
    out, c = dkm_cluster(w, c0, auto_tau(c0, 0.05), ITERS, process_group=group, value_grid=grid)
    fwd = _kib("VmHWM") - base
    out.backward(up)
    t = time.perf_counter() - t
    bwd = _kib("VmHWM") - base
    c0.copy_(c.detach())
    big = out.numel() * out.element_size() / 1024  # KiB of W~, and of the gradient
    dkm = max(fwd - big, bwd - 2 * big)
    return t, dkm / 1024, max(fwd, bwd) / 1024


def _steps(weights, cents, ups, group, grid: bool, a) -> dict:
    import torch.distributed as dist

    times, mem, raw = [], [], []
    for i in range(a.warmup + a.steps):
        dist.barrier()
        got = [_step(w, c0, up, group, grid) for w, c0, up in zip(weights, cents, ups)]
        if i >= a.warmup:
            times.append(sum(g[0] for g in got))
            mem.append(max(g[1] for g in got))
            raw.append(max(g[2] for g in got))
    return {"times": times, "dkm_mib": max(mem), "peak_mib": max(raw)}


def worker(a) -> None:
    """One rank: DKM forward + backward over every weight, sharded or not, with time and memory."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        rank, size = dist.get_rank(), dist.get_world_size()
        weights = [w.requires_grad_() for w in _weights(a)]
        cents = [_quantiles(w, K) for w in weights]
        ups = [torch.randn(w.shape, generator=torch.Generator().manual_seed(rank)) for w in weights]
        group = dist.group.WORLD if a.shard else None
        res = {"rank": rank, "procs": size, "shard": a.shard, "weights": sum(w.numel() for w in weights),
               "tensors": len(weights), "torch": torch.__version__, "peak_reset": _reset_peak(),
               **_steps(weights, cents, ups, group, False, a)}
        if size == 1:  # the single-process default for d = 1, for reference
            res["grid"] = _steps(weights, [_quantiles(w, K) for w in weights], ups, None, True, a)
        with open(os.path.join(a.child, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()  # also after an error: a live gloo group can abort the exit


def run(procs: int, shard: bool, a) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               __file__, "--child", tmp, "--steps", str(a.steps), "--warmup", str(a.warmup)]
        cmd += (["--shard"] if shard else []) + (["--quick"] if a.quick else []) + (["--minilm"] if a.minilm else [])
        env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072",
                   PYTHONPATH=os.pathsep.join(p for p in (os.path.dirname(os.path.abspath(__file__)),
                                                           os.environ.get("PYTHONPATH")) if p))
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        return [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(procs)]


def table(rows, a) -> str:
    first = rows[0][0]
    what = (f"one {SHAPE[0]} × {SHAPE[1]} weight ({first['weights'] / 1e6:.1f} M weights)" if first["tensors"] == 1
            else f"{first['tensors']} weight tensors one after another ({first['weights'] / 1e6:.1f} M weights; "
                 f"memory: the largest tensor's step)")
    lines = [f"DKM forward + backward over {what}, float32, 4 bits (k = {K}, d = 1), one LUT, {ITERS} iterations; "
             f"{a.steps} timed steps after {a.warmup} warm-up; 1 thread per rank, gloo; {os.cpu_count()} CPU cores, "
             f"torch {first['torch']}, {platform.machine()}. DKM memory: peak RSS over the step less W~ and the "
             f"weight gradient (the weight-sized tensors every rank holds whole); max over ranks and timed steps.", "",
             "| processes | sharded | per-rank DKM memory MiB | vs 1 process | per-rank peak RSS over the step MiB | "
             "per-rank s (median, min-max over ranks) | vs 1 process |", "|---|---|---|---|---|---|---|"]
    one = rows[0][0]
    t1, m1 = statistics.median(one["times"]), one["dkm_mib"]

    def line(procs, sharded, ranks):
        meds = [statistics.median(r["times"]) for r in ranks]
        med, mem = statistics.median(meds), max(r["dkm_mib"] for r in ranks)
        return (f"| {procs} | {sharded} | {mem:.0f} | {mem / m1:.2f}x | {max(r['peak_mib'] for r in ranks):.0f} | "
                f"{med:.3f} ({min(meds):.3f}-{max(meds):.3f}) | {med / t1:.2f}x |")

    for ranks in rows:
        lines.append(line(ranks[0]["procs"], "yes" if ranks[0]["shard"] else "no", ranks))
        if "grid" in ranks[0]:
            lines.append(line(1, "no (value grid, the d = 1 default)", [ranks[0]["grid"]]))
    if not first["peak_reset"]:
        lines += ["", "This kernel refused to reset the peak (/proc/self/clear_refs): peaks count from process start."]
    if os.cpu_count() and max(r[0]["procs"] for r in rows) > os.cpu_count():
        lines += ["", f"More processes than the {os.cpu_count()} cores: those ranks share cores, so their times "
                      f"include waiting for a core."]
    return "\n".join(lines)


def main(argv=None):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import common  # the shared harness (benchmarks/common.py)

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", default="1,2,4")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--minilm", action="store_true", help="MiniLM's 37 Linear weights instead of one 10.5 M layer")
    p.add_argument("--quick", action="store_true", help="2 small random tensors (CI)")
    p.add_argument("--out")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--shard", action="store_true", help=argparse.SUPPRESS)
    common.harness_args(p)
    a = p.parse_args(argv)
    if a.child:
        return worker(a)
    prov = common.start(__file__, a, argv)
    rows = []
    for n in map(int, a.procs.split(",")):
        for shard in ([False] if n == 1 else [False, True]):
            rows.append(run(n, shard, a))
            print(f"{n} procs, shard={shard}: {statistics.median(rows[-1][0]['times']):.3f} s, "
                  f"{max(r['dkm_mib'] for r in rows[-1]):.0f} MiB", file=sys.stderr)
    text = f"{table(rows, a)}\n\n{common.provenance_md(prov)}\n"
    if a.out:
        common.write_report(Path(a.out), text, rows)
    else:
        print(text)
    return rows


if __name__ == "__main__":
    main()
