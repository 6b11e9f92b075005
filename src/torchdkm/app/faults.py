"""What ``torchdkm compress`` says when a step goes wrong: the first layer whose output is NaN/inf, and a clear
error for a rank that stopped answering (a timeout) or died, in place of the backend's own message."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.utils.parametrize import is_parametrized

from ..errors import DistributedError, NonFiniteError


def first_non_finite_output(model: nn.Module, forward: Callable, x) -> str:
    """' (first non-finite output: layer NAME (Type)...)' of ``forward(model, x)`` without gradients, or ''.

    Only where ``model``'s forward needs no other rank (one process, or DDP's inner module): under fsdp a
    forward is a collective that the ranks that did not fail would not join."""
    found = []

    def hook(name):
        def check(module, args, out):
            t = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
            if found or not (isinstance(t, torch.Tensor) and t.is_floating_point()) or bool(torch.isfinite(t).all()):
                return
            bad_in = any(isinstance(a, torch.Tensor) and a.is_floating_point() and not bool(torch.isfinite(a).all())
                         for a in args)
            kind = type(module).__bases__[0] if is_parametrized(module) else type(module)  # not Parametrized...
            found.append(f"layer {name!r} ({kind.__name__})"
                         + (", whose input already was: the batch itself holds NaN/inf" if bad_in else ""))
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if n and "parametrizations" not in n.split(".")]
    try:
        with torch.no_grad():
            forward(model, x)
    except NonFiniteError:
        pass  # a DKM layer refused its weight: the message already names it
    finally:
        for h in handles:
            h.remove()
    return f" (first non-finite output: {found[0]})" if found else ""


def lost_peers(error: BaseException, rank: int, timeout_s: Optional[float], where: str, resume: str) \
        -> Optional[DistributedError]:
    """The error to raise for a failed collective (gloo and nccl raise a RuntimeError), or None when ``error`` is
    something else. ``where``: the step or phase; ``resume``: what the last checkpoint allows."""
    text = str(error)
    low = text.lower()
    first = text.strip().splitlines()[0][:300] if text.strip() else type(error).__name__
    if "timed out" in low or "timeout" in low:
        limit = f"distributed.timeout_s={timeout_s:g} s" if timeout_s else "torch's default timeout (distributed.timeout_s)"
        return DistributedError(
            f"rank {rank}: no answer from another rank within {limit} at {where}: a rank is hung, stopped or dead "
            f"(a rank busy on its own for longer, e.g. rank 0 evaluating, needs a larger timeout_s); {resume} "
            f"[{first}]")
    if any(s in low for s in ("connection closed", "connection reset", "broken pipe", "connection refused",
                              "nccl error", "distbackenderror", "remote worker")):
        return DistributedError(f"rank {rank}: lost another rank at {where}: it died or exited (see its own error "
                                f"above); {resume} [{first}]")
    return None
