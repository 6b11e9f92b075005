"""Run by tests/test_sharded.py under torchrun: sharded DKM against one process's result, written as JSON."""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import torchdkm
from torchdkm import DKMConfig
from torchdkm.functional import auto_tau, dkm_cluster
from torchdkm.kmeans import kmeans_init


def functional_case(rank, size):
    """Grouped, d = 2, chunked: the sharded output, C and gradient against the single-process ones."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 501, 2, generator=g, dtype=torch.float64)
    c0 = kmeans_init(w, 8)
    tau = auto_tau(c0, 0.1)
    ups = [torch.randn(w.shape, generator=torch.Generator().manual_seed(10 + r), dtype=torch.float64)
           for r in range(size)]  # each rank's own upstream gradient (its own batch)
    x = w.clone().requires_grad_()
    out, c = dkm_cluster(x, c0, tau, 3, chunk_rows=120, process_group=dist.group.WORLD)
    (out * ups[rank]).sum().backward()
    grad = x.grad
    ref_grads = []
    for r in range(size):
        y = w.clone().requires_grad_()
        ref_out, ref_c = dkm_cluster(y, c0, tau, 3, chunk_rows=120)
        (ref_out * ups[r]).sum().backward()
        ref_grads.append(y.grad)
    ref_grad = torch.stack(ref_grads).mean(0)  # what data-parallel training averages to
    out, c = out.detach(), c.detach()
    return {"out": float((out - ref_out).abs().max()), "c": float((c - ref_c).abs().max()),
            "grad": float((grad - ref_grad).abs().max()), "grad_scale": float(ref_grad.abs().max())}


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
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    res = {"functional": functional_case(rank, size), "ddp": ddp_case(rank, size), "fsdp": fsdp_case(rank)}
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
