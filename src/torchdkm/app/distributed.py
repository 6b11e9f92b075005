"""Multi-process training under ``torchrun``: process group set-up from the launcher's environment variables,
and the two ways of wrapping the model (recipe ``distributed.strategy``): DistributedDataParallel (``ddp``) or
PyTorch's FSDP2 ``fully_shard`` (``fsdp``), with the full state dicts an FSDP run checkpoints and finalizes from.

Without ``WORLD_SIZE`` > 1 in the environment everything runs in one process and these helpers are no-ops.

A failure on one rank must stop every rank, never leave the others waiting in a collective it will not join:
:func:`agree` turns a local error into the same error on every rank, and ``distributed.timeout_s`` bounds every
collective, so a rank that hangs (or dies without closing its connections) stops the others after that long.
"""
from __future__ import annotations

import gc
import hashlib
import inspect
import os
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError, TorchDKMError
from ..layers import is_supported
from ..parametrization import dkm_parametrization, original_weight


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    strategy: str = "ddp"  # ddp | fsdp (recipe distributed.strategy)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """Whether the model is trained sharded by fully_shard (fsdp with more than one process)."""
        return self.distributed and self.strategy == "fsdp"


def setup(device: str = "auto", strategy: str = "ddp", timeout_s: Optional[float] = None) -> Context:
    """Join the process group that torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR (gloo on
    CPU, nccl on CUDA); pick this process's device. ``device``: auto | cpu | cuda; ``strategy``: ddp | fsdp;
    ``timeout_s``: how long any collective may wait for the other ranks before it fails (None: torch's default,
    30 min for gloo, 10 for nccl)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device='cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context(0, 1, torch.device("cuda" if use_cuda else "cpu"), strategy)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        kw = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", **kw, **_restart_store(world, timeout_s))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Context(dist.get_rank(), dist.get_world_size(), dev, strategy)


def _restart_store(world: int, timeout_s: Optional[float]) -> dict:
    """init_process_group's store under torchrun's agent store: the agent's, under a prefix of this attempt.

    torchrun (--standalone, torch 2.13) keeps one store across ``--max-restarts`` attempts, where torch assumes a
    new one per attempt, so a restarted worker read the gloo addresses of the previous attempt's dead workers
    ("Gloo connectFullMesh failed ... Connection refused"). The prefix is torchrun's restart count, the same on every
    node of a job unless a node joins it later (then give each attempt a fresh rendezvous). Outside torchrun's
    agent: {} (torch's own env://)."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    base = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False,
                         timeout=timedelta(seconds=timeout_s or 1800))
    return {"store": dist.PrefixStore(f"torchdkm/attempt_{attempt}", base), "rank": int(env["RANK"]),
            "world_size": world}


def teardown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        # the run's tensors left in reference cycles (fsdp modules, the DTensor optimizer state a resume loads) are
        # freed now, while the process group lives: freed at interpreter exit, after it, gloo aborted the process
        # ("terminate called without an active exception") in about one resumed fsdp run in seven
        gc.collect()
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """DistributedDataParallel around ``model`` when running multi-process (fsdp: ``model`` sharded in place,
    see :func:`fully_shard_model`), else ``model`` itself.

    DKM centroids are buffers, but they need no broadcast: every rank recomputes them in each training
    forward from its own weights, which DDP keeps identical (same initial state, same all-reduced gradients).
    DDP's buffer broadcast is kept on only when the model has other buffers (BatchNorm running statistics),
    which do depend on each rank's data: those then follow rank 0, as in plain DDP.
    """
    if not ctx.distributed:
        return model
    if ctx.sharded:
        return fully_shard_model(model)
    other_buffers = any(".parametrizations." not in f".{n}" for n, _ in model.named_buffers())
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    # torch >= 2.13 renames broadcast_buffers to forward_sync_buffers (buffers are still synced once at init,
    # which is what we want); older versions only know broadcast_buffers.
    key = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters \
        else "broadcast_buffers"
    return ddp(model, device_ids=ids, **{key: other_buffers})


def fully_shard_model(model: nn.Module) -> nn.Module:
    """Shard ``model`` in place with FSDP2: every layer torchdkm can compress (prepared or not) is its own unit,
    so weights are gathered layer by layer, not all at once; the root takes the rest (biases, norms, ...).

    A DKM layer's weight is gathered whole by FSDP for its forward, so DKM sees the whole tensor and every rank
    computes the same centroids (buffers, which FSDP leaves unsharded). A weight shared by several layers (a
    tied LM head) stays with the root: FSDP cannot put one parameter into two units."""
    from torch.distributed.fsdp import fully_shard

    layers = [m for m in model.modules() if m is not model and is_supported(m)]
    users = Counter(id(_weight(m)) for m in layers)
    for m in layers:
        if users[id(_weight(m))] == 1:
            fully_shard(m)
    fully_shard(model)
    return model


def _weight(module: nn.Module):
    return original_weight(module) if dkm_parametrization(module) is not None else module.weight


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: nn.Module, everywhere: bool) -> Dict[str, torch.Tensor]:
    """The whole state dict of a model sharded by :func:`fully_shard_model`, with the plain model's keys (DKM
    centroids included). A collective: every rank must call it. ``everywhere``: every rank gets it (on its
    device); else only rank 0 does (on the CPU), the others get {}."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=not everywhere))


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state keyed by parameter name, on rank 0 ({} elsewhere): a collective. Written by
    every fsdp run, one process included, so a checkpoint resumes with any number of processes."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=_options(cpu_offload=True))


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Load :func:`full_optimizer_state`'s dict (given on every rank) into a fresh optimizer of ``model``, sharded
    or not (call it before any backward: torch initialises the state to load into with a zero-gradient step)."""
    if not state["state"]:  # a stateless optimizer (SGD without momentum): torch's loader needs a state tensor
        for group, saved in zip(opt.param_groups, state["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, state, options=_options())


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


def agree(error: Optional[BaseException], ctx: Context) -> None:
    """Raise on every rank when any rank has an ``error`` (None: not this one), so that no rank goes on into a
    collective that a failing rank will never join (gloo notices a dead peer; nccl would wait for the timeout).

    Every rank must call it at the same point. When all are fine it costs one one-element all-reduce. Otherwise
    every rank raises the same error: the lowest failing rank's message after ``rank R of N: ``, of its type
    when that is a TorchDKMError (else TorchDKMError), chained to the local error on the rank that had it."""
    if not ctx.distributed:
        if error is not None:
            raise error
        return
    flag = torch.tensor([0.0 if error is None else 1.0], device=ctx.device)
    dist.all_reduce(flag)
    if float(flag) == 0:
        return
    ours = isinstance(error, TorchDKMError)
    mine = None if error is None else (type(error) if ours else TorchDKMError,
                                       str(error) if ours else f"{type(error).__name__}: {error}")
    every: List[Optional[tuple]] = [None] * ctx.world_size
    dist.all_gather_object(every, mine)
    failed = [r for r, e in enumerate(every) if e is not None]
    kind, text = every[failed[0]]
    also = f" (rank(s) {', '.join(map(str, failed[1:]))} failed too)" if len(failed) > 1 else ""
    raise kind(f"rank {failed[0]} of {ctx.world_size}: {text}{also}") from error


def check_on_every_rank(fn, ctx: Context):
    """``fn()`` on this rank, then :func:`agree` on whether every rank's call succeeded (an error raised by any
    rank is raised on all). Returns this rank's result."""
    try:
        result, error = fn(), None
    except Exception as e:  # noqa: BLE001 - whatever it is, every rank must stop with it
        result, error = None, e
    agree(error, ctx)
    return result


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
