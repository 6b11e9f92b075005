"""A finalized weight as LUT + indices, both ways, and the list of finalized layers of a model.

Layout: the weight as N vectors of d entries, row-major (N = ceil(numel/d), the last one zero-padded with ``pad``
entries) or along one axis (torchdkm.functional.to_group_vectors); vector i equals ``lut[g(i)][idx[i]]`` on its
non-padded entries, g(i) its group (G equal runs of vectors: groups of consecutive axis-0 slices), times the scale
of each entry's axis-0 slice when the layer has per-slice scales.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .functional import from_vectors, nearest_centroid, to_group_vectors
from .layers import FinalizedLayer, finalized_record


def weight_to_indices(weight: Tensor, lut: Tensor, pad: int, scale: Optional[Tensor] = None,
                      axis: Optional[int] = None) -> Tensor:
    """Exact LUT row of every vector of a finalized ``weight``: int64[N], in the vector order of
    torchdkm.functional.to_group_vectors(weight, d, G, axis), each index into its group's table, with
    indices_to_weight(idx, lut, shape, dtype, scale, axis) == weight.

    weight: any shape, numel + pad = N*d; lut: G × k × d (or k × d); scale: C0 or None. Raises ConfigError when
    some vector is not a LUT row (the weight was changed after finalize), since storing the nearest row would
    silently change it.
    """
    lut = lut if lut.dim() == 3 else lut[None]
    groups, k, d = lut.shape
    w = weight.detach()
    vecs, _ = to_group_vectors(w, d, groups, axis)  # G × n × d, the tail pad zero
    svecs = None
    if scale is not None:
        s = scale.detach().to(w.dtype).reshape(-1, *[1] * (w.dim() - 1)).expand(w.shape)
        svecs = to_group_vectors(s, d, groups, axis)[0]
    idx = nearest_centroid(vecs.double() if svecs is None else vecs.double() / svecs.double(), lut.double())  # G × n
    # nearest_centroid drops ||w||^2 and the scale divides inexactly, so a vector may pick a neighbour of its row:
    # each rebuilt vector is compared entry by entry, and one that differs is matched exactly among its table's rows.
    valid = torch.ones_like(vecs, dtype=torch.bool)
    if pad:
        valid.view(-1)[valid.numel() - pad:] = False

    lut_w = lut.to(w.dtype)  # the rows as indices_to_weight computes them
    rebuilt = lut_w[torch.arange(groups, device=idx.device)[:, None], idx]
    rebuilt = rebuilt if svecs is None else rebuilt * svecs
    wrong = ((rebuilt != vecs) & valid).any(-1)
    for g, i in wrong.nonzero().tolist():
        rows = lut_w[g] if svecs is None else lut_w[g] * svecs[g, i]
        hits = ((rows == vecs[g, i]) | ~valid[g, i]).all(1).nonzero().reshape(-1)
        if hits.numel() == 0:
            raise ConfigError(
                f"vector {i} of group {g} of the weight (shape {tuple(weight.shape)}) is not a row of its LUT "
                f"({tuple(lut.shape)}{'' if scale is None else ' times its scale'}): the weight was changed after "
                f"finalize"
            )
        idx[g, i] = hits[0]
    return idx.reshape(-1)


def indices_to_weight(idx: Tensor, lut: Tensor, shape: Sequence[int], dtype: torch.dtype,
                      scale: Optional[Tensor] = None, axis: Optional[int] = None) -> Tensor:
    """Dense weight of ``shape`` from idx (int[M], M*d >= numel, in the vector order of ``axis``, see
    torchdkm.functional.to_group_vectors), lut (G × k × d, or k × d) and an optional per-axis-0 scale (C0):
    lut[group of the vector][idx] laid back out, entries past numel (the tail pad, unused trailing indices) dropped,
    in ``dtype``, times the scale of each slice."""
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
    w = flat.reshape(shape) if axis is None else from_vectors(flat.view(-1, lut.shape[-1]), shape, 0, axis)
    w = w if w.dtype == dtype else w.to(dtype)
    return w if scale is None else w * scale.to(dtype).reshape(-1, *[1] * (len(shape) - 1))


def packed_to_weight(packed: Tensor, lut: Tensor, bits: int, shape: Sequence[int], dtype: torch.dtype,
                     scale: Optional[Tensor] = None, axis: Optional[int] = None) -> Tensor:
    """indices_to_weight(unpack_groups(packed, bits), lut, shape, dtype, scale, axis), bit for bit.

    packed: uint8, padded to whole packing groups (torchdkm.packing.pad_to_groups). Where ``bits`` divides 8, the
    LUT is scalar (d = 1) and each group's indices fill whole bytes, every byte looks up its 8/bits weights at once
    in a G × 256 × (8/bits) table built from the LUT: no int64 index per weight (about 5× faster on CPU for a 4-bit
    embedding). Elsewhere, and while tracing for ONNX (whose graph wants the plain integer ops), the general path.
    """
    lut3 = lut if lut.dim() == 3 else lut[None]
    groups, k, d = lut3.shape
    numel = math.prod(shape)
    per = 8 // bits
    fits = (8 % bits == 0 and d == 1 and axis is None and (groups == 1 or (numel // groups) % per == 0)
            and not torch.jit.is_tracing())
    if not fits:
        from .packing import unpack_groups

        return indices_to_weight(unpack_groups(packed, bits), lut, shape, dtype, scale, axis)
    codes = torch.arange(256, device=packed.device)
    fields = (codes[:, None] >> (torch.arange(per, device=packed.device) * bits)) & (k - 1)  # 256 × per
    table = lut3.reshape(groups, k)[:, fields].reshape(groups * 256, per)  # byte value -> its weights, per group
    data = packed[: groups * -(-numel // (groups * per))].view(groups, -1).to(torch.int32)
    data = data + torch.arange(groups, dtype=torch.int32, device=packed.device)[:, None] * 256
    flat = table.index_select(0, data.reshape(-1)).reshape(-1)
    if flat.numel() != numel:
        flat = flat[:numel]
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
