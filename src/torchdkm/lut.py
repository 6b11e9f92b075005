"""A finalized weight as LUT + indices, both ways, and the list of finalized layers of a model.

Layout: the weight flattened row-major into N = ceil(numel/d) vectors of d entries (the last
one zero-padded with ``pad`` entries); vector i equals ``lut[idx[i]]`` on its non-padded entries.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .functional import nearest_centroid, to_vectors
from .layers import FinalizedLayer, finalized_record


def weight_to_indices(weight: Tensor, lut: Tensor, pad: int) -> Tensor:
    """Exact LUT row of every vector of a finalized ``weight``: int64[N] with lut[idx] == vectors.

    weight: any shape, numel + pad = N*d; lut: k × d. Raises ConfigError when some vector is not a LUT row
    (the weight was changed after finalize), since storing the nearest row would silently change it.
    """
    d = lut.shape[1]
    vecs, _ = to_vectors(weight.detach(), d)
    lut = lut.detach().to(vecs.dtype)
    idx = nearest_centroid(vecs, lut)
    # nearest_centroid drops ||w||^2, so rounding can pick a neighbour of an exactly equal row; the padded
    # tail is compared on its real entries only (its pad entries are whatever the chosen row holds).
    valid = torch.ones_like(vecs, dtype=torch.bool)
    if pad:
        valid[-1, d - pad :] = False
    bad = ((lut[idx] != vecs) & valid).any(1).nonzero().reshape(-1)
    for i in bad.tolist():
        hits = ((lut == vecs[i]) | ~valid[i]).all(1).nonzero().reshape(-1)
        if hits.numel() == 0:
            raise ConfigError(
                f"vector {i} of the weight (shape {tuple(weight.shape)}) is not a row of its LUT ({tuple(lut.shape)}): "
                f"the weight was changed after finalize"
            )
        idx[i] = hits[0]
    return idx


def indices_to_weight(idx: Tensor, lut: Tensor, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """Dense weight of ``shape`` from idx (int[M], M*d >= numel) and lut (k × d): lut[idx] flattened, entries
    past numel (the tail pad, unused trailing indices) dropped."""
    flat = lut[idx].reshape(-1)
    numel = math.prod(shape)
    if flat.numel() != numel:  # split, not a slice: one ONNX op instead of nine
        flat = flat.split([numel, flat.numel() - numel])[0]
    w = flat.reshape(shape)
    return w if w.dtype == dtype else w.to(dtype)


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
