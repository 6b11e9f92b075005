"""Core ML: the per-layer LUT metadata coremltools (>= 8) reads during ``ct.convert``.

coremltools' own palettizer leaves, on each palettized module, buffers named ``_COREML_/weight/<key>``
(coremltools.optimize.torch._utils.metadata_utils.CompressionMetadata) and on the root module
``_COREML_/metadata_version``. The torch frontend (coremltools.converters.mil.frontend.torch.converter,
``_construct_compression_info`` / ``_construct_palettization_op``) reads them for iOS16+ targets and emits
``constexpr_lut_to_dense(indices, lut)`` instead of a dense const. We register the same buffers:

    compression_type    = [2]                      (palettization)
    lut                 = [G] + [1]*(rank-1) + [k, d]  G tables, table i for output channels i·C/G .. (i+1)·C/G - 1
                                                   (G = 1: one LUT for the whole tensor); unscaled centroids
    palettization_scale = C × 1 × ...              (layers with per-channel scales only)
    vector_axis         = a                        (d > 1 only: the layer's DKMConfig.vector_axis, or for row-major
                                                   vectors the last axis of size > 1, which they then run along,
                                                   e.g. 1 = input channels of a 1x1 conv)

The converter recomputes the indices itself: it divides the traced weight by the scale and takes the nearest LUT
row, which recovers ours exactly since the weight is scale × lut[idx]. Grouped LUTs and scales need
``minimum_deployment_target=ct.target.iOS18`` or later. With a scale, iOS18 programs store the LUT once per output
channel (a coremltools pass moves the scale into it; for d > 1 that pass fails in coremltools 9.0), iOS26 programs
keep the grouped LUT and a ``constexpr_blockwise_shift_scale``; ``fold_scale=True`` folds the scales into C
per-channel LUTs up front, the form that converts for row-major and input-axis vectors on iOS18. Vectors along the
output channels with scales convert for iOS26 (a per-channel LUT cannot hold a vector that spans channels).

Core ML has no 5- or 7-bit indices (uint1/2/3/4/6/8 only), so such layers get their LUT padded with copies
of row 0 to 64 / 256 rows (6 / 8-bit indices; same weights). A d-vector must lie along one axis, so d must
divide the size of that axis: row-major vectors of a 3×3 conv (along its kernel width, 3) ship only for d = 3, while
``DKMConfig(vector_axis="output")`` (or "auto") lays them along the output channels. :func:`check_layers` says so
right after ``prepare``, before training. No coremltools import is needed to attach the metadata.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from ..config import coreml_layout_problem, flat_axis
from ..errors import ConfigError
from ..lut import finalized_layers
from ..parametrization import layer_spec, original_weight

PREFIX = "_COREML_/weight/"
PALETTIZATION = 2
COREML_BITS = (1, 2, 3, 4, 6, 8)


def vector_axis(shape, axis: Optional[int] = None) -> int:
    """The axis a layer's d-vectors run along: ``axis`` (DKMConfig.vector_axis resolved), or for row-major vectors
    (None) the last axis of size > 1."""
    return flat_axis(shape) if axis is None else axis


def layout_problems(model: nn.Module, *, fold_scale: bool = False) -> List[str]:
    """One line per prepared or finalized layer of ``model`` whose vectors Core ML cannot read: the layer, its
    layout, why, and the setting that would fix it. Empty when every layer ships."""
    bad: List[str] = []
    for name, module in model.named_modules():
        spec = layer_spec(module)
        if spec is None or spec.dim == 1:
            continue
        shape = tuple(original_weight(module).shape)
        why = coreml_layout_problem(shape, spec.dim, spec.groups, spec.axis)
        if why is None and fold_scale and spec.scaled and spec.axis == 0:
            why = "fold_scale makes one LUT per output channel, which vectors along the output channels span"
        if why is None:
            continue
        fixes = [f"vector_axis={key!r}" for key, axis in (("output", 0), ("input", 1))
                 if axis < len(shape) and axis != spec.axis and not (fold_scale and spec.scaled and axis == 0)
                 and coreml_layout_problem(shape, spec.dim, spec.groups, axis) is None]
        fix = " or ".join(fixes) if fixes else "a dim that divides one of its axes"
        bad.append(f"{name!r} (weight {shape}, dim={spec.dim}, {spec.groups} LUT(s)): {why}; use {fix}")
    return bad


def check_layers(model: nn.Module, *, fold_scale: bool = False) -> None:
    """Raise ConfigError listing every prepared or finalized layer whose d-vectors Core ML cannot read, with the
    reason and the setting that fixes it. Call it on the prepared model to learn this before training."""
    bad = layout_problems(model, fold_scale=fold_scale)
    if bad:
        raise ConfigError(f"Core ML vector palettization reads d-vectors along one weight axis, so dim must divide "
                          f"that axis; {len(bad)} layer(s) cannot ship: " + "; ".join(bad))


@torch.no_grad()
def attach_metadata(model: nn.Module, *, fold_scale: bool = False) -> nn.Module:
    """Register the ``_COREML_`` buffers on every finalized layer of ``model`` (in place); returns ``model``.

    The export step before ``coremltools.convert``: ``torchdkm.finalize(model)``, then this, then trace and
    convert (iOS16+ target; iOS18+ for grouped LUTs or per-channel scales). ``fold_scale``: ship per-channel
    scales folded into one LUT per output channel (see the module docstring). ``torchdkm.save`` leaves these
    buffers out of the artifact."""
    check_layers(model, fold_scale=fold_scale)
    for _, module, fin in finalized_layers(model):
        rank = module.weight.dim()
        lut = fin.lut.detach().float()  # G × k × d
        scale = None if fin.scale is None else fin.scale.detach().float()
        if scale is not None and fold_scale:
            lut = lut.repeat_interleave(module.weight.shape[0] // lut.shape[0], 0) * scale[:, None, None]
            scale = None
        bits = next(b for b in COREML_BITS if b >= fin.bits)
        if bits != fin.bits:  # padding rows are never indexed
            lut = torch.cat([lut, lut[:, :1].expand(-1, 2**bits - lut.shape[1], -1)], 1)
        module.register_buffer(PREFIX + "compression_type", torch.tensor([PALETTIZATION]))
        module.register_buffer(PREFIX + "lut", lut.reshape([lut.shape[0]] + [1] * (rank - 1) + list(lut.shape[1:])))
        if scale is not None:
            module.register_buffer(PREFIX + "palettization_scale", scale.reshape([-1] + [1] * (rank - 1)).clone())
        if fin.dim > 1:
            module.register_buffer(PREFIX + "vector_axis", torch.tensor(vector_axis(module.weight.shape, fin.axis)))
    model.register_buffer("_COREML_/metadata_version", torch.tensor(1))
    return model
