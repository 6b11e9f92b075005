"""A finalized weight as LUT + indices, both ways, and the list of finalized layers of a model.

Layout: the weight flattened row-major into N = ceil(numel/d) vectors of d entries (the last
one zero-padded with ``pad`` entries); vector i equals ``lut[g(i)][idx[i]]`` on its non-padded entries, g(i) its
group (G equal runs of vectors: groups of consecutive axis-0 slices), times the scale of its axis-0 slice when the
layer has per-slice scales.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .functional import nearest_centroid, to_group_vectors
from .layers import FinalizedLayer, finalized_record


def weight_to_indices(weight: Tensor, lut: Tensor, pad: int, scale: Optional[Tensor] = None) -> Tensor:
    """Exact LUT row of every vector of a finalized ``weight``: int64[N], row-major, each index into its group's
    table, with indices_to_weight(idx, lut, shape, dtype, scale) == weight.

    weight: any shape, numel + pad = N*d; lut: G × k × d (or k × d); scale: C0 or None. Raises ConfigError when
    some vector is not a LUT row (the weight was changed after finalize), since storing the nearest row would
    silently change it.
    """
    lut = lut if lut.dim() == 3 else lut[None]
    groups, k, d = lut.shape
    w = weight.detach()
    s = None if scale is None else scale.detach().to(torch.float64).reshape(-1, *[1] * (w.dim() - 1))
    vecs, _ = to_group_vectors(w.double() if s is None else w.double() / s, d, groups)
    idx = nearest_centroid(vecs, lut.double()).reshape(-1)
    # nearest_centroid drops ||w||^2 and the scale divides inexactly, so a vector may pick a neighbour of its row:
    # the rebuild is compared entry by entry, and a vector that differs is matched exactly among its table's rows.
    flat = w.reshape(-1)
    wrong = indices_to_weight(idx, lut, w.shape, w.dtype, scale).reshape(-1) != flat
    if pad:
        wrong = torch.cat([wrong, wrong.new_zeros(pad)])
    per_group = idx.numel() // groups
    for i in wrong.view(-1, d).any(1).nonzero().reshape(-1).tolist():
        pos = torch.arange(i * d, (i + 1) * d, device=w.device)
        valid = pos < flat.numel()
        pos = pos.clamp(max=flat.numel() - 1)
        rows = lut[i // per_group].to(w.dtype)  # k × d, as indices_to_weight computes them
        if scale is not None:
            rows = rows * scale.to(w.dtype)[pos // (flat.numel() // w.shape[0])]
        hits = ((rows == flat[pos]) | ~valid).all(1).nonzero().reshape(-1)
        if hits.numel() == 0:
            raise ConfigError(
                f"vector {i} of the weight (shape {tuple(weight.shape)}) is not a row of its LUT ({tuple(lut.shape)}"
                f"{'' if scale is None else ' times its scale'}): the weight was changed after finalize"
            )
        idx[i] = hits[0]
    return idx


def indices_to_weight(idx: Tensor, lut: Tensor, shape: Sequence[int], dtype: torch.dtype,
                      scale: Optional[Tensor] = None) -> Tensor:
    """Dense weight of ``shape`` from idx (int[M], M*d >= numel, row-major), lut (G × k × d, or k × d) and an
    optional per-axis-0 scale (C0): lut[group of the vector][idx] flattened, entries past numel (the tail pad,
    unused trailing indices) dropped, in ``dtype``, times the scale of each slice."""
    numel = math.prod(shape)
    if lut.dim() == 2 or lut.shape[0] == 1:
        flat = lut.reshape(-1, lut.shape[-1])[idx].reshape(-1)
    else:
        groups, k, d = lut.shape
        n = numel // d  # grouped layers have no pad
        if idx.numel() != n:
            idx = idx.split([n, idx.numel() - n])[0]
        offset = torch.arange(groups, device=idx.device)[:, None] * k  # group g's rows start at g*k
        flat = lut.reshape(groups * k, d)[idx.view(groups, -1) + offset].reshape(-1)
    if flat.numel() != numel:  # split, not a slice: one ONNX op instead of nine
        flat = flat.split([numel, flat.numel() - numel])[0]
    w = flat.reshape(shape)
    w = w if w.dtype == dtype else w.to(dtype)
    return w if scale is None else w * scale.to(dtype).reshape(-1, *[1] * (len(shape) - 1))


def finalized_layers(model: nn.Module) -> List[Tuple[str, nn.Module, FinalizedLayer]]:
    """(module name, module, record) of every layer that ``finalize`` compressed, in module order."""
    out = []
    for name, module in model.named_modules():
        fin = finalized_record(module)
        if fin is not None:
            out.append((name, module, fin))
    return out


def weight_key(module_name: str) -> str:
    """state_dict key of a module's weight."""
    return f"{module_name}.weight" if module_name else "weight"
