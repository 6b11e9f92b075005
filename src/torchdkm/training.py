"""Helpers for the user's training loop: the schedule step, soft-weight evaluation, BatchNorm re-estimation.

    torchdkm.prepare(model, DKMConfig(bits=2, tau_scale=0.5, tau_scale_end=0.02, anneal_steps=len(loader)))
    for x, y in loader:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        torchdkm.step(model)                       # the one extra line: advances the temperature schedule
    torchdkm.recalibrate_batchnorm(model, (x for x, _ in calib_loader))   # BN statistics of the hard weights
    torchdkm.finalize(model)
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from .errors import ConfigError
from .parametrization import dkm_layers, dkm_parametrization, is_dtensor, original_weight


@torch.no_grad()
def step(model: nn.Module) -> None:
    """Count one training step on every prepared layer (call it after ``optimizer.step()``). The count lives
    in each layer's ``step`` buffer, so it is saved and resumed with the model's ``state_dict``."""
    for p in dkm_layers(model):
        p.step.add_(1)


@contextlib.contextmanager
def accumulate(model: nn.Module):
    """One optimizer step's micro-batches (gradient accumulation) with DKM run once, not once per micro-batch.

    The weights do not change between micro-batches, so neither does DKM's output W~: the block computes W~ once per
    prepared layer (moving its centroids once), every forward inside reads it, backward passes sum their gradients
    in W~, and leaving the block sends that sum through DKM's backward once, into the weights' ``.grad``. The
    gradients are those of running the micro-batches as one batch (up to float rounding). DKM's cost per
    optimizer step no longer grows with the number of micro-batches; memory holds one W~ and its gradient per layer
    for the block. One process only (under DDP/FSDP each micro-batch's backward synchronizes gradients itself).

        for batch in loader:                      # each batch: several micro-batches
            with torchdkm.accumulate(model):
                for mb in batch:
                    loss_fn(model(mb.x), mb.y).div(len(batch)).backward()
            clip_grad_norm_(...); opt.step(); opt.zero_grad(); torchdkm.step(model)

    Changing a weight inside the block (an optimizer step) raises: its held gradient would belong to the old
    weight. Eval-mode and no-grad forwards inside the block compute as usual."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise ConfigError("torchdkm.accumulate runs in one process: under DDP/FSDP each micro-batch's backward "
                          "synchronizes gradients, so DKM runs per micro-batch there (use model.no_sync() as usual)")
    held, seen = [], set()  # (parametrization, weight, its version, W~ with DKM's graph, the leaf forwards read)
    for mod in model.modules():
        p = dkm_parametrization(mod)
        if p is None or not p.training or id(p) in seen:  # a tied partner: its tensor is held already
            continue
        seen.add(id(p))
        w = original_weight(mod)
        if is_dtensor(w):
            raise ConfigError("torchdkm.accumulate got a sharded (DTensor) weight: it runs in one process")
        with torch.enable_grad():
            out = p._forward(w)
        leaf = out.detach().requires_grad_(out.requires_grad)
        p._held = {p.read_key(w, True): leaf}
        held.append((p, w, w._version, out, leaf))
    try:
        yield model
    finally:
        for p, *_ in held:
            p._held = None
    changed = [p.name for p, w, version, _, _ in held if w._version != version]
    if changed:
        raise ConfigError(f"torchdkm.accumulate: the weight of {changed[0]!r} changed inside the block (an "
                          f"optimizer step?): step the optimizer after leaving it; the held gradients are dropped")
    pending = [(out, leaf.grad) for _, _, _, out, leaf in held if leaf.grad is not None and out.requires_grad]
    if pending:
        torch.autograd.backward([o for o, _ in pending], [g for _, g in pending])


@contextlib.contextmanager
def soft_weights(model: nn.Module):
    """Within the block, eval-mode forwards of prepared layers compute with the soft DKM weights A·C (the
    current centroids, no update) instead of the hard ones: compare accuracies to see the soft-to-hard gap."""
    layers = list(dkm_layers(model))
    for p in layers:
        p.soft_eval = True
    try:
        yield model
    finally:
        for p in layers:
            p.soft_eval = False


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, inputs: Iterable, forward: Optional[Callable] = None,
                          max_batches: Optional[int] = None) -> int:
    """Re-estimate every BatchNorm's running statistics from ``inputs`` with the weights the model is evaluated
    with (hard assignment for prepared layers), as a cumulative average over the batches. Training with soft
    weights leaves statistics of the soft network; the shipped one is hard. Returns the number of batches.

    ``forward(model, batch)`` runs one batch (default ``model(batch)``). The model's train/eval modes are
    restored; its weights and centroids are not touched.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    modes = {m: m.training for m in model.modules()}
    saved = [(bn.momentum, bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    forward = forward or (lambda m, b: m(b))
    n = 0
    try:
        model.eval()  # prepared layers compute their hard weights, as shipped
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average over the batches
            bn.train()
        for batch in inputs:
            if max_batches is not None and n >= max_batches:
                break
            forward(model, batch)
            n += 1
        if n == 0:
            raise ConfigError("recalibrate_batchnorm got no input batch: give an iterable of at least one batch")
    except BaseException:
        for bn, (mom, mean, var) in zip(bns, saved):
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.momentum = mom
        raise
    finally:
        for m, was in modes.items():
            m.train(was)
    for bn, (mom, _, _) in zip(bns, saved):
        bn.momentum = mom
    return n
