"""Multi-process training under ``torchrun``: process group set-up from the launcher's environment variables.

Without ``WORLD_SIZE`` > 1 in the environment everything runs in one process and these helpers are no-ops.
"""
from __future__ import annotations

import hashlib
import inspect
import os
from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> Context:
    """Join the process group that torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR (gloo on
    CPU, nccl on CUDA); pick this process's device. ``device``: auto | cpu | cuda."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device='cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Context(dist.get_rank(), dist.get_world_size(), dev)


def teardown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """DistributedDataParallel around ``model`` when running multi-process, else ``model`` itself.

    DKM centroids are buffers, but they need no broadcast: every rank recomputes them in each training
    forward from its own weights, which DDP keeps identical (same initial state, same all-reduced gradients).
    DDP's buffer broadcast is kept on only when the model has other buffers (BatchNorm running statistics),
    which do depend on each rank's data: those then follow rank 0, as in plain DDP.
    """
    if not ctx.distributed:
        return model
    other_buffers = any(".parametrizations." not in f".{n}" for n, _ in model.named_buffers())
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    # torch >= 2.13 renames broadcast_buffers to forward_sync_buffers (buffers are still synced once at init,
    # which is what we want); older versions only know broadcast_buffers.
    key = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters \
        else "broadcast_buffers"
    return ddp(model, device_ids=ids, **{key: other_buffers})


def mean_over_ranks(value: float, ctx: Context) -> float:
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return float(t) / ctx.world_size


def broadcast_object(obj, ctx: Context):
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def state_digests(model: nn.Module) -> Dict[str, str]:
    """A short hash of every parameter and buffer, to compare ranks bit for bit without moving tensors."""
    out = {}
    for name, t in model.state_dict().items():
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out[name] = hashlib.sha1(raw).hexdigest()[:16]
    return out


def rank_disagreement(model: nn.Module, ctx: Context) -> List[str]:
    """Names of the state entries (weights, DKM centroids, ...) that differ between ranks; [] when all agree."""
    if not ctx.distributed:
        return []
    mine = state_digests(model)
    every: List[Dict[str, str]] = [None] * ctx.world_size  # type: ignore[list-item]
    dist.all_gather_object(every, mine)
    return sorted(n for n in mine if len({d.get(n) for d in every}) > 1)
