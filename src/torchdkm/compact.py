"""Compact inference mode: finalized layers keep only packed indices + LUT and rebuild the weight per forward.

``compact(model)`` replaces each finalized layer's dense ``weight`` Parameter by a uint8 buffer of packed indices
(ceil(N*bits/8) bytes) under a ``torch.nn.utils.parametrize`` parametrization holding the LUT (G × k × d, and per-
slice scales if any): reading ``module.weight`` unpacks and gathers, so every layer type that reads ``self.weight``
(Linear, Conv1d/2d/3d, Embedding, transformers Conv1D) works unchanged and resident memory reflects the
compression. Outputs equal the dense model's exactly (the same values, rebuilt). Costs one rebuild of the weight
per forward; meant for inference (no weight gradients).

Call ``torchdkm.report`` / ``torchdkm.save`` on the dense model, before ``compact``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .errors import ConfigError
from .layers import finalized_record
from .lut import finalized_layers, weight_to_indices
from .packing import pack_bits, pad_to_groups
from .parametrization import LUTWeight, hook_passes, is_compact, require_plain

__all__ = ["LUTWeight", "compact", "compact_layer", "is_compact"]


def compact_layer(module: nn.Module, packed: Tensor, lut: Tensor, bits: int, shape, scale=None, axis=None) -> None:
    """Make ``module.weight`` the packed indices (uint8, as pack_bits gives) + LUTs (G × k × d) and optional
    per-slice scales (C0), in the weight's dtype, rebuilt on read (vectors along ``axis``, None: row-major)."""
    if "weight" in module._parameters:
        del module._parameters["weight"]
    module.register_buffer("weight", pad_to_groups(packed, bits))
    # unsafe: the parametrization changes dtype and shape (uint8 bytes -> float weight) on purpose.
    parametrize.register_parametrization(module, "weight", LUTWeight(lut, bits, shape, scale, axis), unsafe=True)


@torch.no_grad()
def compact(model: nn.Module) -> nn.Module:
    """Switch every finalized layer of ``model`` to compact mode, in place; returns ``model``.

    Example: a finalized Linear(512, 256) at bits=4 keeps 65,536 bytes of packed indices + a 16 × 1 LUT
    instead of a 524,288-byte float32 weight. Layers already compact are left alone.
    """
    require_plain(model, "torchdkm.compact")
    layers = finalized_layers(model)
    owners = {id(module.weight): module for _, module, _ in layers}
    # Modules tied to a compressed weight (e.g. an LM head sharing the embedding) must switch too, or
    # they would keep the dense Parameter alive.
    tied = [(m, owners[id(m._parameters["weight"])]) for _, m in model.named_modules()
            if isinstance(m._parameters.get("weight"), nn.Parameter) and id(m._parameters["weight"]) in owners
            and finalized_record(m) is None]
    for name, module, fin in layers:
        w = module.weight
        try:
            idx = weight_to_indices(w, fin.lut, fin.pad, fin.scale, fin.axis)
        except ConfigError as e:
            raise ConfigError(f"layer {name!r}: {e}") from None
        scale = None if fin.scale is None else fin.scale.to(w.dtype).clone()
        compact_layer(module, pack_bits(idx, fin.bits), fin.lut.to(w.dtype).clone(), fin.bits, w.shape, scale,
                      fin.axis)
        del module._torchdkm  # its record now lives in the parametrization; report() counts dense layers only
    for module, owner in tied:
        rebuild = owner.parametrizations.weight
        del module._parameters["weight"]
        module.register_buffer("weight", rebuild.original)  # the same tensors, shared
        parametrize.register_parametrization(module, "weight", rebuild[0], unsafe=True)
    if tied:  # the shared weight is rebuilt once per forward pass, not once per reader
        hook_passes(model)
    return model
