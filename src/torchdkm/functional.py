"""DKM maths as pure tensor functions (no nn.Module).

Shapes: ``w`` is N × d (N vectors of dimension d), ``c`` is k × d (k centroids).

The DKM loop, for t = 1..iters::

    A_t = softmax(-||w_i - c_j||^2 / tau)      N × k, from C_{t-1}
    C_t = (A_t^T W) / (A_t^T 1)                k × d (empty clusters keep C_{t-1})
    stop after t if max|C_t - C_{t-1}| <= eps
    W~  = A_T @ C_T

:func:`dkm_cluster` runs it with a memory-lean backward that keeps only the C_t (k × d) and the cluster
masses (k) of each iteration and recomputes attention in row chunks, so its extra memory is O(N·d)
whatever k and iters. :func:`dkm_cluster_reference` is the direct autograd version, kept as the
test reference.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ._attention import _Attention, attention
from .errors import ConfigError

__all__ = ["attention", "auto_chunk_rows", "auto_tau", "compute_dtype", "dkm_cluster", "dkm_cluster_reference",
           "from_vectors", "hard_cluster", "nearest_centroid", "to_vectors"]

# A cluster whose total attention mass is below this (in units of "weights") counts as empty: it keeps
# its previous centroid, since dividing by a vanishing mass would blow gradients up.
EMPTY_MASS = 1e-6

Tau = Union[float, Tensor]


# ----------------------------------------------------------------------------------------------------
# shared pieces


def _update(mass: Tensor, moment: Tensor, c_prev: Tensor) -> Tensor:
    """C_t = moment / mass, keeping c_prev for empty clusters. mass: k, moment: k × d."""
    full = mass > EMPTY_MASS
    return torch.where(full[:, None], moment / torch.where(full, mass, 1.0)[:, None], c_prev)


def _row_chunks(n: int, rows: int):
    for start in range(0, n, rows):
        yield slice(start, min(n, start + rows))


def auto_chunk_rows(n: int, k: int, d: int) -> int:
    """Rows per chunk. A backward chunk holds ~3 N_c × k temporaries, so N_c × k ≤ N·d/4 keeps them within
    ~0.75× the weight tensor; the 2^18-element floor keeps per-op overhead small (chunks of 2^16 elements
    measured ~3x slower), and only matters for tensors under 1 M weights, where the chunk is ≤ 3 MiB."""
    budget = max(n * d // 4, 1 << 18)
    return max(64, min(n, budget // k))


# ----------------------------------------------------------------------------------------------------
# the memory-lean autograd function


class _DKMLean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, c0: Tensor, tau: float, iters: int, eps: float, rows: int, window_tol: float):
        n, k = w.shape[0], c0.shape[0]
        single = rows >= n  # one chunk: keep the last attention instead of recomputing it
        cs, masses = [c0], []
        blk = None
        for _ in range(iters):
            c_prev = cs[-1]
            att = _Attention(c_prev, tau, window_tol)
            mass = torch.zeros(k, dtype=w.dtype, device=w.device)
            moment = torch.zeros_like(c0)
            for s in _row_chunks(n, rows):
                blk = att(w[s])
                mass += blk.colsum()
                moment += blk.colsum(w[s])
            c = _update(mass, moment, c_prev)
            cs.append(c)
            masses.append(mass)
            if eps > 0 and (c - c_prev).abs().max() <= eps:
                break
        if single:
            w_tilde = blk.mix(cs[-1])
        else:
            att = _Attention(cs[-2], tau, window_tol)
            w_tilde = torch.empty_like(w)
            for s in _row_chunks(n, rows):
                w_tilde[s] = att(w[s]).mix(cs[-1])
        ctx.save_for_backward(w, *cs, *masses)
        ctx.tau, ctx.rows, ctx.iters_run, ctx.window_tol = tau, rows, len(masses), window_tol
        return w_tilde, cs[-1].clone()

    @staticmethod
    def backward(ctx, g_wt: Optional[Tensor], g_c: Optional[Tensor]):
        saved = ctx.saved_tensors
        t_run, tau, rows = ctx.iters_run, ctx.tau, ctx.rows
        w, cs, masses = saved[0], saved[1 : t_run + 2], saved[t_run + 2 :]
        n = w.shape[0]
        g_w = torch.zeros_like(w)
        g_c = torch.zeros_like(cs[-1]) if g_c is None else g_c.clone()

        # Output pass: W~ = A_T C_T (A_T from C_{T-1}). Its part of dL/dC_T is a reduction over all
        # rows, needed before the last iteration's pass, hence a pass of its own.
        g_prev = None
        if g_wt is not None:
            c_prev, c_last = cs[-2], cs[-1]
            att = _Attention(c_prev, tau, ctx.window_tol)
            g_prev = torch.zeros_like(c_prev)
            for s in _row_chunks(n, rows):
                blk = att(w[s])
                g_c += blk.colsum(g_wt[s])
                g_l = blk.softmax_backward_(blk.rowdot(g_wt[s], c_last))
                g_w[s] += blk.logit_grad_w(g_l, c_prev)
                g_prev += blk.logit_grad_c(g_l, w[s], c_prev)

        # Iterations in reverse: C_t = M_t / S_t with M_t = A_t^T W, S_t = A_t^T 1.
        for t in range(t_run, 0, -1):
            c_prev, c_t, mass = cs[t - 1], cs[t], masses[t - 1]
            full = mass > EMPTY_MASS
            inv = torch.where(full, 1.0 / torch.where(full, mass, 1.0), 0.0)
            g_m = g_c * inv[:, None]  # dL/dM_t
            g_s = -(g_c * c_t).sum(1) * inv  # dL/dS_t
            g_c_prev = torch.where(full[:, None], 0.0, g_c)  # empty clusters pass C_{t-1} through
            if t == t_run and g_prev is not None:
                g_c_prev += g_prev
            att = _Attention(c_prev, tau, ctx.window_tol)
            for s in _row_chunks(n, rows):
                blk = att(w[s])
                g_l = blk.softmax_backward_(blk.rowdot(w[s], g_m).add_(blk.cols(g_s)))
                g_w[s] += blk.mix(g_m).add_(blk.logit_grad_w(g_l, c_prev))
                g_c_prev += blk.logit_grad_c(g_l, w[s], c_prev)
            g_c = g_c_prev
        return g_w, None, None, None, None, None, None


def _check_inputs(w: Tensor, c0: Tensor, tau, iters: int, eps: float):
    if w.dim() != 2 or c0.dim() != 2 or w.shape[1] != c0.shape[1]:
        raise ConfigError(f"dkm_cluster wants w: N × d and c0: k × d, got w {tuple(w.shape)} and c0 {tuple(c0.shape)}")
    if w.shape[0] == 0:
        raise ConfigError(f"dkm_cluster got w with 0 rows {tuple(w.shape)}: need at least one vector")
    t = float(tau)
    if not (t > 0 and math.isfinite(t)):
        raise ConfigError(f"dkm_cluster got tau={t}: allowed is a finite float > 0")
    if not isinstance(iters, int) or iters < 1:
        raise ConfigError(f"dkm_cluster got iters={iters!r}: allowed is an integer >= 1")
    if not (eps >= 0):
        raise ConfigError(f"dkm_cluster got eps={eps!r}: allowed is a float >= 0")
    return t


def compute_dtype(w: Tensor) -> torch.dtype:
    """The dtype DKM computes in for a tensor ``w``: float32 and float64 as they are, anything else float32."""
    return w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32


def dkm_cluster(
    w: Tensor,
    c0: Tensor,
    tau: Tau,
    iters: int,
    eps: float = 0.0,
    *,
    chunk_rows: Optional[int] = None,
    window_tol: float = 1e-7,
) -> Tuple[Tensor, Tensor]:
    """Differentiable k-means: (W~, C) from w (N × d) and warm-start centroids c0 (k × d, no gradient).

    Example: w (1000 × 1), c0 (16 × 1) -> W~ (1000 × 1) clustered weights, C (16 × 1).
    Gradients reach ``w`` through every iteration; half-precision inputs are computed in float32.
    ``window_tol``: for d = 1, attention is restricted to each weight's nearest few centroids where the
    left-out mass is provably below this fraction (see torchdkm._attention); 0 forces the dense path.
    """
    t = _check_inputs(w, c0, tau, iters, eps)
    dt = compute_dtype(w)
    wc = w.to(dt)
    c = c0.detach().to(dt, copy=True)  # saved for backward: must not alias the caller's (mutable) buffer
    rows = chunk_rows or auto_chunk_rows(*wc.shape[:1], c.shape[0], wc.shape[1])
    w_tilde, c = _DKMLean.apply(wc, c, t, iters, float(eps), int(rows), float(window_tol))
    return w_tilde.to(w.dtype), c


def dkm_cluster_reference(w: Tensor, c0: Tensor, tau: Tau, iters: int, eps: float = 0.0) -> Tuple[Tensor, Tensor]:
    """Direct autograd DKM (stores N × k distances and attention of every iteration). Test reference."""
    t = _check_inputs(w, c0, tau, iters, eps)
    c = c0.detach().to(w.dtype)
    a = None
    for _ in range(iters):
        d2 = ((w[:, None, :] - c[None, :, :]) ** 2).sum(-1)
        a = torch.softmax(-d2 / t, dim=1)
        c_new = _update(a.sum(0), a.t() @ w, c)
        done = eps > 0 and bool((c_new - c).abs().max() <= eps)
        c = c_new
        if done:
            break
    return a @ c, c


# ----------------------------------------------------------------------------------------------------
# hard assignment, temperature, vector layout


def nearest_centroid(w: Tensor, c: Tensor, chunk_rows: int = 1 << 16) -> Tensor:
    """Index of each vector's nearest centroid (squared Euclidean), int64 of length N."""
    w, c = w.detach(), c.detach().to(w.dtype)
    cc = (c * c).sum(1)
    out = torch.empty(w.shape[0], dtype=torch.long, device=w.device)
    for s in _row_chunks(w.shape[0], chunk_rows):
        out[s] = torch.addmm(cc, w[s], c.t(), alpha=-2.0).argmin(1)
    return out


def hard_cluster(w: Tensor, c: Tensor) -> Tensor:
    """Each vector replaced by its nearest centroid, N × d."""
    return c.to(w.dtype)[nearest_centroid(w, c)]


def auto_tau(c: Tensor, scale: float) -> float:
    """Scale-free temperature: scale × median over centroids of the squared distance to the nearest other
    centroid. A weight at a centroid then has logit gap ≥ 1/scale to that neighbour, whatever the layer's
    weight scale."""
    c = c.detach().double()
    if c.shape[0] < 2:
        return scale
    d2 = torch.cdist(c, c).pow(2)
    d2.fill_diagonal_(float("inf"))
    nn = d2.min(1).values
    nn = nn[nn > 0]
    if nn.numel() == 0:  # all centroids equal: any positive tau gives the same uniform attention
        return scale * max(float(c.abs().max()) ** 2, 1e-12)
    return scale * float(nn.median())


def to_vectors(weight: Tensor, dim: int) -> Tuple[Tensor, int]:
    """Flatten ``weight`` in row-major (C) order into N × dim vectors; returns (vectors, pad).

    The tail is zero-padded when dim does not divide numel; ``pad`` is the number of padded entries.
    """
    flat = weight.reshape(-1)
    pad = (-flat.numel()) % dim
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, dim), pad


def from_vectors(vectors: Tensor, shape, pad: int) -> Tensor:
    """Inverse of :func:`to_vectors`."""
    flat = vectors.reshape(-1)
    if pad:
        flat = flat[: flat.numel() - pad]
    return flat.view(shape)
