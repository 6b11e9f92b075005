"""Sharded DKM under torchrun: per-rank DKM time and memory for 1, 2 and 4 processes on MiniLM's weights.

Every 2-D weight of all-MiniLM-L6-v2 but the embeddings (the encoder's 36 Linears and the pooler's, 10.8 M
weights) is clustered by one
``dkm_cluster`` forward + backward per step (4 bits, one LUT per tensor, float32, 3 iterations at most), as in a
training step of a data-parallel run where every rank holds the same weights. Unsharded, each rank does all of it;
sharded (``DKMConfig(shard=True)``), each rank takes N/R rows of every tensor and the per-iteration statistics,
the clustered weight and its gradient are all-reduced (gloo). Per rank: median step time over the steps after the
warm-up, and the peak resident memory the DKM steps add over the loaded weights.

    python benchmarks/engine/dkm_sharded.py --procs 1,2,4 --out benchmarks/engine/results/dkm_sharded.md
    python benchmarks/engine/dkm_sharded.py --procs 1,2 --steps 2 --warmup 1 --quick      # seconds (CI)

The parent launches ``torch.distributed.run`` once per process count and sharding mode; each rank uses one thread.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "text"))  # minilm.py


def _weights(quick: bool):
    import torch

    if quick:
        g = torch.Generator().manual_seed(0)
        return [0.05 * torch.randn(384 * 96, 1, generator=g) for _ in range(4)]
    from safetensors.torch import load_file

    from minilm import minilm_path

    state = load_file(str(minilm_path() / "model.safetensors"))
    return [t.reshape(-1, 1).float() for k, t in sorted(state.items()) if k.endswith(".weight") and t.dim() == 2
            and "embeddings" not in k]


def _rss_kib(field: str = "VmHWM") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker(a) -> None:
    """One rank: time DKM forward + backward over every weight, sharded or not."""
    import torch
    import torch.distributed as dist

    from torchdkm.functional import auto_tau, dkm_cluster
    from torchdkm.kmeans import kmeans_init

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    weights = [w.requires_grad_() for w in _weights(a.quick)]
    cents = [kmeans_init(w.detach(), 16) for w in weights]
    ups = [torch.randn_like(w) for w in weights]
    group = dist.group.WORLD if a.shard else None
    base = _rss_kib("VmRSS")
    times = []
    for _ in range(a.warmup + a.steps):
        dist.barrier()
        t = time.perf_counter()
        for w, c0, up in zip(weights, cents, ups):
            out, c = dkm_cluster(w, c0, auto_tau(c0, 0.05), 3, eps_rel=1e-2, process_group=group)
            out.backward(up)
            c0.copy_(c.detach())
        times.append(time.perf_counter() - t)
    res = {"rank": rank, "procs": size, "shard": a.shard, "times": times[a.warmup:],
           "extra_mib": (_rss_kib() - base) / 1024, "weights": sum(w.numel() for w in weights),
           "tensors": len(weights), "torch": torch.__version__}
    with open(os.path.join(a.child, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def run(procs: int, shard: bool, a) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               __file__, "--child", tmp, "--steps", str(a.steps), "--warmup", str(a.warmup)]
        cmd += (["--shard"] if shard else []) + (["--quick"] if a.quick else [])
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        return [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(procs)]


def table(rows, a) -> str:
    first = rows[0][0]
    lines = [f"DKM forward + backward over {first['tensors']} weight tensors ({first['weights'] / 1e6:.1f} M weights), "
             f"4 bits, one LUT per tensor; {a.steps} timed steps after {a.warmup} warm-up; 1 thread per rank, gloo; "
             f"{os.cpu_count()} CPU cores, torch {first['torch']}, {platform.machine()}.", "",
             "| processes | sharded | per-rank DKM s (median, min-max over ranks) | vs 1 process | "
             "per-rank extra memory MiB (max over ranks) |", "|---|---|---|---|---|"]
    one = statistics.median(rows[0][0]["times"])
    for ranks in rows:
        meds = [statistics.median(r["times"]) for r in ranks]
        med = statistics.median(meds)
        lines.append(f"| {ranks[0]['procs']} | {'yes' if ranks[0]['shard'] else 'no'} | {med:.3f} "
                     f"({min(meds):.3f}-{max(meds):.3f}) | {med / one:.2f}x | {max(r['extra_mib'] for r in ranks):.0f} |")
    if os.cpu_count() and max(r[0]["procs"] for r in rows) > os.cpu_count():
        lines += ["", f"More processes than the {os.cpu_count()} cores: those ranks share cores, so their times "
                      f"include waiting for a core."]
    return "\n".join(lines)


def main(argv=None):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import common  # the shared harness (benchmarks/common.py)

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", default="1,2,4")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="4 random tensors instead of MiniLM (CI)")
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
            print(f"{n} procs, shard={shard}: {statistics.median(rows[-1][0]['times']):.3f} s", file=sys.stderr)
    text = table(rows, a)
    cmd = "python benchmarks/engine/dkm_sharded.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = f"`{cmd}`\n\n{text}\n\n{common.provenance_md(prov)}\n"
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
        common.write_json(Path(os.path.splitext(a.out)[0] + ".json"), {"rows": rows})
    return rows


if __name__ == "__main__":
    main()
