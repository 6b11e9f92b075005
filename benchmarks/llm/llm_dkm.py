"""Fine-tuning a clustered causal LM by distillation from its uncompressed self (label-free), for benchmarks/llm/.

Two methods share one loop (same windows, optimizer, schedule and seed), so they differ only in the clustering:

* :func:`distill_dkm`: the model prepared with torchdkm (DKM in the forward pass; a step's micro-batches inside
  ``torchdkm.accumulate``, so DKM runs once per optimizer step), the DKM temperature schedule advanced every step,
  then finalize.
* :func:`distill_ste`: hard k-means + straight-through (benchmarks/common.py's ``st_kmeans``: each weight's nearest
  centroid in the forward, its own gradient in the backward, trainable centroids), the same layout and k-means
  start; shipped as torchdkm.finalize of the same layout holding the trained weights and centroids (the same
  nearest-centroid weights STE computed with).

Loss: KL(teacher || student) per token (torchdkm.distillation_loss, T = 1) on random windows of the training text;
AdamW, cosine learning rate to 0, gradient norm clipped at 1.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from torch import nn

import torchdkm
from torchdkm.functional import with_slice_max
from torchdkm.parametrization import dkm_parametrization, original_weight

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py (the STE baseline)
import common  # noqa: E402


def distill(model: nn.Module, teacher: nn.Module, train_ids: torch.Tensor, *, steps: int, batch: int, seq: int,
            lr: float, micro: int = 1, seed: int = 0, after_step: Optional[Callable[[], None]] = None,
            step_context: Callable = contextlib.nullcontext, log: Optional[Callable[[str], None]] = None
            ) -> Dict[str, list]:
    """``steps`` AdamW steps, each of ``micro`` micro-batches (gradient accumulation) of random windows (batch × seq,
    from ``seed``) of ``train_ids`` (1-D token ids) against ``teacher``'s token distributions, every micro-batch's
    forward and backward inside ``step_context(model)``; every trainable parameter of ``model`` is optimized.
    Returns {"loss": per step (mean over its micro-batches), "seconds": per step}."""
    teacher.eval()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    out = {"loss": [], "seconds": []}
    for step in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        with step_context(model):
            for _ in range(micro):
                starts = torch.randint(0, train_ids.numel() - seq, (batch,), generator=gen)
                ids = torch.stack([train_ids[s:s + seq] for s in starts.tolist()])
                with torch.no_grad():
                    target = teacher(ids).logits
                part = torchdkm.distillation_loss(model(ids).logits, target) / micro
                part.backward()
                loss += float(part.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step()
        out["loss"].append(loss)
        out["seconds"].append(time.perf_counter() - t0)
        if log is not None:
            log(f"  step {step + 1}/{steps}: KL {out['loss'][-1]:.4f} ({out['seconds'][-1]:.1f} s)")
    model.eval()
    return out


@torch.no_grad()
def ste_start_from(model: nn.Module, start: nn.Module) -> None:
    """torchdkm.start_from for the straight-through parametrization (common.st_kmeans_prepare, max-|w| scales):
    each layer's centroids become ``start``'s LUTs, its weight ``start``'s with each row's largest original weight
    kept (the scale STE recomputes stays the LUTs')."""
    others, done = dict(start.named_modules()), set()
    for name, mod in model.named_modules():
        plist = getattr(getattr(mod, "parametrizations", None), "weight", None)
        if plist is None or id(plist[0]) in done:
            continue
        done.add(id(plist[0]))  # tied: the first reader holds start's record
        rec = others[name]._torchdkm
        p = plist[0]
        if tuple(rec.lut.reshape(p.centroids.shape).shape) != tuple(p.centroids.shape) or rec.scale is None:
            raise ValueError(f"ste_start_from: layer {name!r} was finalized with another layout")
        plist.original.copy_(with_slice_max(others[name].weight, plist.original))
        p.centroids.copy_(rec.lut.reshape(p.centroids.shape))


def _stored_bits(model: nn.Module) -> Dict[str, float]:
    return {r.name: r.stored_bits for r in torchdkm.report(model, lut_dtype_bits=16, print_table=False).layers}


def distill_dkm(model: nn.Module, teacher: nn.Module, train_ids: torch.Tensor, config: torchdkm.DKMConfig,
                rules: dict, *, seed: int = 0, start: Optional[nn.Module] = None, **train) -> Dict[str, float]:
    """Prepare ``model`` in place (``config`` and ``rules``, k-means seeded by ``seed``), fine-tune it (see
    :func:`distill`), finalize it; returns {layer name: stored bits (LUTs, scales at 16 bits)} and leaves the
    per-step log in ``model._distill_log``. ``start``: a finalized copy of ``model`` of the same layout (e.g.
    palettize(compensate=True)) to start from instead of k-means (torchdkm.start_from)."""
    torchdkm.prepare(model, config.replace(seed=seed),
                     rules={n: c if c is None else c.replace(seed=seed) for n, c in (rules or {}).items()})
    if start is None:
        torchdkm.initialize(model)
    else:
        torchdkm.start_from(model, start)
    model._distill_log = distill(model, teacher, train_ids, seed=seed, after_step=lambda: torchdkm.step(model),
                                 step_context=torchdkm.accumulate, **train)
    torchdkm.finalize(model)
    return _stored_bits(model)


def distill_ste(model: nn.Module, teacher: nn.Module, train_ids: torch.Tensor, config: torchdkm.DKMConfig,
                rules: dict, *, seed: int = 0, start: Optional[nn.Module] = None, **train) -> Dict[str, float]:
    """Hard k-means + straight-through fine-tuning of the layout ``config`` + ``rules`` (tied layers share one
    table), the same loop as :func:`distill_dkm`; then the trained weights and centroids go into torchdkm's
    finalized form of that layout, in place. Same return, log and ``start`` as :func:`distill_dkm`."""
    config = config.replace(seed=seed)
    rules = {n: c if c is None else c.replace(seed=seed) for n, c in (rules or {}).items()}
    ste = common.st_kmeans_prepare(model, config, rules)
    if start is not None:
        ste_start_from(model, start)
    log = distill(model, teacher, train_ids, seed=seed, **train)
    trained = {}  # original weight tensor id -> (trained weight, centroids)
    for mod in model.modules():
        plist = getattr(getattr(mod, "parametrizations", None), "weight", None)
        if plist is not None:
            trained[id(plist.original)] = (plist.original.detach().clone(), plist[0].centroids.detach().clone())
    names = {id(mod): n for n, mod in model.named_modules()}
    originals = {names[id(mod)]: id(mod.parametrizations.weight.original) for mod in model.modules()
                 if getattr(getattr(mod, "parametrizations", None), "weight", None) is not None}
    common.strip_parametrizations(model)
    first = {}
    for name, mod in model.named_modules():  # stripping gave tied layers a weight each: tie them again
        if name in originals:
            first.setdefault(originals[name], mod)
            if first[originals[name]] is not mod:
                mod.weight = first[originals[name]].weight
    torchdkm.prepare(model, config, rules=rules)
    with torch.no_grad():
        for name, mod in model.named_modules():
            p = dkm_parametrization(mod)
            if p is not None and name in originals:
                w, c = trained[originals[name]]
                original_weight(mod).copy_(w)
                p.centroids.copy_(c)
                p.initialized.fill_(True)
    torchdkm.finalize(model)
    model._distill_log = log
    assert len(ste) == len(trained)
    return _stored_bits(model)
