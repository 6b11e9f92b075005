"""GPTQ's error feedback on a LUT (Frantar et al., ICLR 2023): post-training indices that keep a Linear's outputs.

Nearest-centroid snapping minimises each weight's own error. A Linear's output error X (W - Ŵ)^T depends on the
inputs X too: ``compensated_indices`` takes the input columns one at a time, snaps the column to each row's own
table (its group's LUT times its row scale), and spreads the rounding error over the columns not yet snapped
through the inverse of H = X^T X, so that the later columns absorb it. The table is fixed (from k-means); only the
choice of entry changes.
"""
from __future__ import annotations

from typing import Dict, Iterable

import torch
from torch import Tensor, nn


@torch.no_grad()
def input_hessians(model: nn.Module, linears: Dict[str, nn.Linear], run: Iterable) -> Dict[str, Tensor]:
    """{name: X^T X} (in × in, float64, summed over every input row) of each Linear in ``linears``, over the
    forward passes that iterating ``run`` makes (each item: one call of the model, done by the caller)."""
    acc = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=m.weight.device)
           for name, m in linears.items()}

    def hook(name):
        def add(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            acc[name].addmm_(x.T, x)
        return add

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        for _ in run:
            pass
    finally:
        for h in handles:
            h.remove()
    return acc


@torch.no_grad()
def compensated_indices(w: Tensor, table: Tensor, hessian: Tensor, damp: float = 0.01, block: int = 128) -> Tensor:
    """GPTQ onto per-row tables: w (out × in), table (out × k: row r's LUT entries, scaled), hessian (in × in)
    -> int64 out × in, the entry of its row's table chosen for every weight.

    Columns go in order, ``block`` at a time (lazy updates); ``damp`` × the mean diagonal is added to H. Inputs
    that never fire (zero diagonal) get the nearest entry and pass no error on: their weights do not reach the
    output."""
    W = w.detach().double().clone()
    H = hessian.detach().double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    H.diagonal().add_(damp * H.diagonal().mean())
    # the upper Cholesky factor of H^-1: row i holds how column i's error moves the later columns
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    sorted_t, order = table.detach().double().sort(dim=1)
    mids = (sorted_t[:, 1:] + sorted_t[:, :-1]) / 2  # out × (k-1): boundaries between neighbouring entries
    idx = torch.empty(w.shape, dtype=torch.long, device=w.device)
    for i1 in range(0, W.shape[1], block):
        i2 = min(i1 + block, W.shape[1])
        W1, err = W[:, i1:i2], torch.empty(W.shape[0], i2 - i1, dtype=W.dtype, device=W.device)
        for i in range(i2 - i1):
            pos = torch.searchsorted(mids, W1[:, i:i + 1].contiguous())
            q = sorted_t.gather(1, pos)[:, 0]
            idx[:, i1 + i] = order.gather(1, pos)[:, 0]
            e = (W1[:, i] - q) / hinv[i1 + i, i1 + i]
            W1[:, i:] -= e[:, None] * hinv[i1 + i, i1 + i:i2][None, :]
            err[:, i] = e
        W[:, i2:] -= err @ hinv[i1:i2, i2:]
    return idx
