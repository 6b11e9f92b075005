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
    vector_axis         = a                        (d > 1 only: the last axis of size > 1, along which our
                                                   row-major d-vectors run, e.g. 1 = input channels of a 1x1 conv)

The converter recomputes the indices itself: it divides the traced weight by the scale and takes the nearest LUT
row, which recovers ours exactly since the weight is scale × lut[idx]. Grouped LUTs and scales need
``minimum_deployment_target=ct.target.iOS18`` or later. With a scale, iOS18 programs store the LUT once per output
channel (a coremltools pass moves the scale into it; for d > 1 that pass fails in coremltools 9.0), iOS26 programs
keep the grouped LUT and a ``constexpr_blockwise_shift_scale``; ``fold_scale=True`` folds the scales into C
per-channel LUTs up front, the form that converts for every d on iOS18.

Core ML has no 5- or 7-bit indices (uint1/2/3/4/6/8 only), so such layers get their LUT padded with copies
of row 0 to 64 / 256 rows (6 / 8-bit indices; same weights). A d-vector must lie along one axis, so d must
divide the size of that axis. No coremltools import is needed to attach the metadata.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from ..errors import ConfigError
from ..lut import finalized_layers
from ..parametrization import layer_spec, original_weight

PREFIX = "_COREML_/weight/"
PALETTIZATION = 2
COREML_BITS = (1, 2, 3, 4, 6, 8)


def vector_axis(shape) -> int:
    """The axis our row-major d-vectors run along: the last one of size > 1 (trailing size-1 axes add
    nothing to the layout)."""
    return max([i for i, s in enumerate(shape) if s > 1], default=len(shape) - 1)


def check_layers(model: nn.Module) -> None:
    """Raise ConfigError naming every prepared or finalized layer whose dim does not divide its vector axis
    (Core ML cannot lay such vectors out). Call it on the prepared model to learn this before training."""
    bad: List[str] = []
    for name, module in model.named_modules():
        spec = layer_spec(module)
        if spec is None:
            continue
        dim, shape = spec.dim, tuple(original_weight(module).shape)
        axis = vector_axis(shape)
        if dim > 1 and (shape[axis] % dim or (axis == 0 and (shape[0] // spec.groups) % dim)):
            bad.append(f"{name!r} (weight {shape}, dim={dim}, {spec.groups} LUT(s))")
    if bad:
        raise ConfigError(f"Core ML vector palettization needs dim to divide the weight's last axis of size > 1 (and, "
                          f"when that is axis 0, the output channels of each LUT); not so for {', '.join(bad)}: use a "
                          f"dim that divides it, or skip the Core ML metadata")


@torch.no_grad()
def attach_metadata(model: nn.Module, *, fold_scale: bool = False) -> nn.Module:
    """Register the ``_COREML_`` buffers on every finalized layer of ``model`` (in place); returns ``model``.

    The export step before ``coremltools.convert``: ``torchdkm.finalize(model)``, then this, then trace and
    convert (iOS16+ target; iOS18+ for grouped LUTs or per-channel scales). ``fold_scale``: ship per-channel
    scales folded into one LUT per output channel (see the module docstring). ``torchdkm.save`` leaves these
    buffers out of the artifact."""
    check_layers(model)
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
            module.register_buffer(PREFIX + "vector_axis", torch.tensor(vector_axis(module.weight.shape)))
    model.register_buffer("_COREML_/metadata_version", torch.tensor(1))
    return model
