"""prepare / initialize / finalize: the model-level lifecycle (prepare -> train with your own loop -> finalize)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .config import DKMConfig, Rules
from .errors import ConfigError
from .layers import FinalizedLayer, select_layers, tied_partners
from .functional import channel_scale, nearest_centroid, with_slice_max
from .lut import indices_to_weight
from .parametrization import (DKMWeight, dkm_parametrization, full_tensor, hook_passes, is_dtensor,
                              original_weight, remove_weight_parametrizations, require_plain)


def prepare(model: nn.Module, config: Optional[DKMConfig] = None, rules: Optional[Rules] = None) -> nn.Module:
    """Register DKM on every chosen layer's weight, in place; returns ``model``.

    Every supported layer with at least ``config.min_numel`` weights uses ``config``; ``rules`` maps a
    module name or ``"re:<regex>"`` to a DKMConfig or ``None`` (skip) - see torchdkm.config for precedence.
    Tied weights (an LM head sharing its embedding's tensor) are clustered once, with the first layer's config;
    the other layers read the same clustered weight. DKM runs once per forward pass of ``model`` for such a tensor
    (hooks on ``model`` mark the pass; a submodule called on its own runs DKM once per read). Skip the shared tensor
    with ``rules={"lm_head": None, "model.embed_tokens": None}``.
    Centroids are initialised by k-means on the first forward (or ``initialize(model)``).

    Example::

        model = prepare(model, DKMConfig(bits=4), rules={"classifier": DKMConfig(bits=8), "re:.*embed.*": None})
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"prepare wants an nn.Module, got {type(model).__name__}")
    config = DKMConfig() if config is None else config
    if not isinstance(config, DKMConfig):
        raise ConfigError(f"prepare's config must be a DKMConfig, got {type(config).__name__}")
    require_plain(model, "torchdkm.prepare")
    sharded = [n for n, t in model.named_parameters() if is_dtensor(t)]
    if sharded:
        raise ConfigError(f"prepare got a model whose parameters are already sharded (e.g. {sharded[0]!r} is a "
                          f"DTensor): call torchdkm.prepare first, then fully_shard / FSDP")
    chosen = select_layers(model, config, rules)
    partners = tied_partners(chosen)
    bad = [f"{name!r} (weight {tuple(m.weight.shape)}): {cfg.layout_problem(tuple(m.weight.shape))}"
           for name, m, cfg in chosen if cfg.layout_problem(tuple(m.weight.shape))]
    if bad:  # checked for every layer before any is changed
        raise ConfigError(f"{len(bad)} layer(s) cannot take their config: {'; '.join(bad)}. Give them a config that "
                          f"fits with rules={{name: DKMConfig(...)}}, or skip them with rules={{name: None}}")
    for name, module, cfg in chosen:
        # unsafe=True: the safe path evaluates the parametrization once, which would run k-means + a DKM
        # step at prepare time (shape and dtype are preserved by construction).
        dkm = DKMWeight(cfg, module.weight, name)
        parametrize.register_parametrization(module, "weight", dkm, unsafe=True)
        for _, partner in partners.get(name, ()):  # tied: the same parametrization reads the same tensor
            parametrize.register_parametrization(partner, "weight", dkm, unsafe=True)
    if partners:
        hook_passes(model)
    return model


@torch.no_grad()
def finalize_layer(module: nn.Module, p: DKMWeight, idx: Optional[Tensor] = None) -> None:
    """Finalize one prepared layer in place: its weight becomes lut[idx] (× scale), ``idx`` (int64, one per vector
    in ``p.split``'s order) by default each vector's nearest centroid. Tied partners keep their parametrization:
    the caller removes it (see finalize)."""
    w = original_weight(module)
    if not bool(p.initialized):
        p.initialize(w)
    vecs, pad, scale = p.split(w)
    if idx is None:
        idx = nearest_centroid(vecs, p.centroids)
    idx = idx.reshape(-1)
    lut = p.centroids.to(w.dtype).clone()
    scale = None if scale is None else scale.reshape(-1).to(w.dtype).clone()
    # the weight as every later reader rebuilds it (compact mode, ONNX, artifact), so all of them agree
    hard = indices_to_weight(idx, lut, w.shape, w.dtype, scale, p.axis)
    remove_weight_parametrizations(module)
    module.weight.copy_(hard)
    module._torchdkm = FinalizedLayer(bits=p.config.bits, dim=p.config.dim, pad=pad, lut=lut, scale=scale,
                                      axis=p.axis)


@torch.no_grad()
def initialize(model: nn.Module) -> nn.Module:
    """Run the k-means initialisation of every prepared layer now (otherwise the first forward does)."""
    for module in model.modules():
        p = dkm_parametrization(module)
        if p is not None and not bool(p.initialized):
            p.initialize(full_tensor(original_weight(module)))
    return model


@torch.no_grad()
def start_from(model: nn.Module, finalized: nn.Module) -> nn.Module:
    """Start the prepared ``model``'s training from ``finalized``: a copy of the same model finalized (e.g. by
    ``palettize(..., compensate=True)``) with the same layouts. Each prepared layer takes its counterpart's LUTs as
    centroids and its clustered weight as the trained weight, so training continues from that model instead of
    re-clustering the original weights. Returns ``model``.

    With per-slice scales ("max" only) each slice keeps its largest original weight, so the scale DKM recomputes
    is the one the LUTs were made for; that one weight per slice reads its nearest centroid, every other one reads
    the entry ``finalized`` chose (or a centroid within float rounding of it: k-means with k above a group's count
    of distinct values leaves near-equal centroids). Call it before the first training step (after ``prepare``).

    Example::

        start = torchdkm.palettize(copy.deepcopy(model), cfg, calibration=batches, compensate=True)
        torchdkm.start_from(torchdkm.prepare(model, cfg), start)
    """
    others = dict(finalized.named_modules())
    done = set()
    for name, module in model.named_modules():
        p = dkm_parametrization(module)
        if p is None or id(p) in done:
            continue
        done.add(id(p))  # tied partners: the first reader holds the record, as finalize leaves it
        rec = getattr(others.get(name), "_torchdkm", None)
        w = original_weight(module)
        if rec is None:
            raise ConfigError(f"start_from: layer {name!r} is prepared but {name!r} in the finalized model is not a "
                              f"finalized torchdkm layer; finalize a copy of this model with the same config/rules")
        want = (p.groups, p.config.k, p.config.dim, p.config.scale_kind is not None, p.axis)
        got = (rec.lut.shape[0], rec.lut.shape[1], rec.dim, rec.scale is not None, rec.axis)
        if want != got:
            raise ConfigError(f"start_from: layer {name!r} is prepared as (groups, k, dim, scaled, axis) = {want} but "
                              f"finalized as {got}; prepare it with the config it was finalized with")
        if p.config.scale_kind not in (None, "max"):
            raise ConfigError(f"start_from: layer {name!r} uses channel_scale={p.config.channel_scale!r}; only the "
                              f"max-|w| scale (channel_scale=True) can be carried into training")
        hard = others[name].weight.detach().to(w.dtype)
        if rec.scale is not None:
            hard = with_slice_max(hard, w)
            s = channel_scale(hard.double(), "max").reshape(-1)
            if not torch.allclose(s, rec.scale.double(), rtol=1e-3, atol=0):
                raise ConfigError(f"start_from: layer {name!r}'s finalized scales are not this model's weights' "
                                  f"(largest relative gap {float(((s - rec.scale.double()) / s).abs().max()):.3g}): "
                                  f"finalize a copy of this model, not another one (or its LUTs reach beyond ±1: "
                                  f"centroids trained past the scale, which a recomputed max-|w| scale cannot hold)")
        w.copy_(hard)
        p.centroids.copy_(rec.lut.to(p.centroids.dtype))
        p.initialized.fill_(True)
    return model


@torch.no_grad()
def finalize(model: nn.Module, *, coreml: bool = False) -> nn.Module:
    """Snap every prepared layer's weight to its nearest centroid and remove the DKM machinery, in place.

    Afterwards each such layer is a plain module whose weight holds at most 2**bits distinct d-vectors;
    ``module._torchdkm`` records bits, dim, padding, the LUTs (G × k × d) and the per-slice scales (or None).
    Calling it twice changes nothing.
    Core ML metadata is an export step: ``torchdkm.export.coreml.attach_metadata(model)`` after finalize
    (``coreml=True`` is no longer accepted and says so).
    """
    if coreml:
        raise ConfigError("finalize(model, coreml=True) moved to an export step: call torchdkm.finalize(model), "
                          "then torchdkm.export.coreml.attach_metadata(model)")
    sharded = [n for n, m in model.named_modules() if dkm_parametrization(m) is not None
               and is_dtensor(original_weight(m))]
    if sharded:  # torch's parametrize cannot remove itself from an FSDP module
        raise ConfigError(f"finalize got a model sharded by fully_shard (layer {sharded[0]!r}): finalize its full "
                          f"state dict instead: torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
                          f"options=StateDictOptions(full_state_dict=True)), load it into the unsharded model "
                          f"prepared the same way, then finalize that (README: Several processes)")
    done = set()
    for module in model.modules():
        p = dkm_parametrization(module)
        if p is None:
            continue
        if id(p) in done:  # a tied partner: its weight is the tensor just finalized; it keeps no record of its own
            remove_weight_parametrizations(module)
            continue
        done.add(id(p))
        finalize_layer(module, p)
    return model
