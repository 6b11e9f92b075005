"""Run by tests/test_sharded.py under torchrun: sharded DKM against one process's result, written as JSON."""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import torchdkm
from torchdkm import DKMConfig
from torchdkm import functional
from torchdkm.functional import auto_tau, dkm_cluster
from torchdkm.kmeans import kmeans_init


def _case(rank, size, w, k, iters, *, c_up=False, out_up=True, **kw):
    """Sharded dkm_cluster's output, C and gradient against one process's (the gradient: the mean over ranks of
    each rank's own single-process gradient, what data-parallel training averages to)."""
    c0 = kmeans_init(w, k)
    tau = auto_tau(c0, 0.1)

    def upstream(r, shape):  # each rank's own upstream gradient (its own batch)
        return torch.randn(shape, generator=torch.Generator().manual_seed(10 + r), dtype=w.dtype)

    def loss(out, c, r):
        return (out * upstream(r, out.shape)).sum() * out_up + (c * upstream(100 + r, c.shape)).sum() * c_up

    x = w.clone().requires_grad_()
    out, c = dkm_cluster(x, c0, tau, iters, process_group=dist.group.WORLD, **kw)
    loss(out, c, rank).backward()
    ref_grads = []
    for r in range(size):
        y = w.clone().requires_grad_()
        ref_out, ref_c = dkm_cluster(y, c0, tau, iters, value_grid=False, **kw)
        loss(ref_out, ref_c, r).backward()
        ref_grads.append(y.grad)
    ref_grad = torch.stack(ref_grads).mean(0)
    return {"out": float((out.detach() - ref_out.detach()).abs().max()),
            "c": float((c.detach() - ref_c.detach()).abs().max()),
            "grad": float((x.grad - ref_grad).abs().max()), "grad_scale": float(ref_grad.abs().max())}


def functional_cases(rank, size):
    """float64; rows split unevenly, in chunks, and moved in pieces of 64 values (so every collective loops):
    grouped d = 2 (each rank's rows strided in memory), one LUT d = 1 (rows contiguous: sent in place), attention
    kept from forward to backward, the centroids' gradient alone, and hard output."""
    functional.PIECE = 64
    g = torch.Generator().manual_seed(0)
    grouped = torch.randn(3, 501, 2, generator=g, dtype=torch.float64)
    flat = torch.randn(1001, 1, generator=g, dtype=torch.float64)
    return {"grouped": _case(rank, size, grouped, 8, 3, chunk_rows=120),
            "flat": _case(rank, size, flat, 16, 3, chunk_rows=100, c_up=True),
            "kept": _case(rank, size, flat, 16, 2, chunk_rows=100, save_attention=True, reuse_bytes=1 << 30),
            "c_only": _case(rank, size, grouped, 8, 2, chunk_rows=120, out_up=False, c_up=True),
            "hard": _case(rank, size, flat, 16, 2, chunk_rows=100, hard_output=True)}


def train_two_steps(model, rank):
    """Two SGD steps on this rank's own batches."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(2):
        x = torch.randn(16, 32, generator=torch.Generator().manual_seed(100 * step + rank))
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def ddp_case(rank, size):
    """A prepared model under DDP with DKMConfig(shard=True): after two steps the ranks agree and match an
    unsharded DDP run."""
    results = {}
    for shard in (False, True):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
        torchdkm.prepare(net, DKMConfig(bits=3, group_size=8, channel_scale=True, min_numel=0, shard=shard))
        ddp = nn.parallel.DistributedDataParallel(net)
        train_two_steps(ddp, rank)
        results[shard] = torch.cat([p.detach().reshape(-1) for p in net.state_dict().values()
                                    if p.dtype.is_floating_point])
    same = results[True].clone()
    gathered = [torch.zeros_like(same) for _ in range(size)]
    dist.all_gather(gathered, same)
    return {"ranks": max(float((t - gathered[0]).abs().max()) for t in gathered),
            "vs_unsharded": float((results[True] - results[False]).abs().max())}


def fsdp_case(rank):
    """prepare -> fully_shard (FSDP2, CPU gloo) -> train -> the sharded model's eval output equals the finalized
    model built from its full state dict; finalize on the sharded model refuses with a pointer to that."""
    import copy

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    cfg = DKMConfig(bits=3, group_size=8, channel_scale=True, min_numel=0)
    net = torchdkm.prepare(copy.deepcopy(plain), cfg)
    for m in net:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(net)
    train_two_steps(net, rank)
    try:
        torchdkm.finalize(net)
        refused = False
    except torchdkm.ConfigError as e:
        refused = "full state dict" in str(e)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = net.eval()(x)
    state = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True))
    full = torchdkm.prepare(copy.deepcopy(plain), cfg)
    full.load_state_dict(state)
    torchdkm.finalize(full.eval())
    with torch.no_grad():
        diff = float((full(x) - y).abs().max())
    return {"finalize_refused": refused, "finalized_vs_sharded": diff}


def main():
    dist.init_process_group("gloo")
    try:
        rank, size = dist.get_rank(), dist.get_world_size()
        torch.set_num_threads(1)
        res = {"functional": functional_cases(rank, size), "ddp": ddp_case(rank, size), "fsdp": fsdp_case(rank)}
        with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
        dist.barrier()  # no rank tears its group down while a peer is still in a collective
    finally:
        # Always, also after an error: a process that exits with its gloo group alive can abort at interpreter exit
        # ("terminate called without an active exception", its worker threads still holding work).
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
