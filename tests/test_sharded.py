"""Sharded DKM under torchrun (2 CPU processes, gloo): the same results as one process, ranks identical; a prepared
model under FSDP2 (fully_shard) trains, and its full state dict finalizes to the model it evaluates as."""
import json
import os
import subprocess
import sys
from pathlib import Path


def test_sharded_dkm_matches_one_process(tmp_path):
    worker = Path(__file__).parent / "dist_dkm_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    for rank in (0, 1):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for case, f in res["functional"].items():  # float64: the same sums in another order
            assert f["out"] < 1e-12 and f["c"] < 1e-12, (case, f)
            assert f["grad"] < 1e-10 * max(1.0, f["grad_scale"]), (case, f)
        assert res["ddp"]["ranks"] == 0.0, res  # bit-identical ranks
        assert res["ddp"]["vs_unsharded"] < 1e-5, res  # float32 rounding of reordered sums
        assert res["fsdp"] == {"finalize_refused": True, "finalized_vs_sharded": 0.0}, res
