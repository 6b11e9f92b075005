"""Attention of weights over centroids for one chunk of vectors, dense or windowed, for G groups at once.

Vectors come grouped and transposed, ``x``: G × d × n (a column slice of each group's d × N_g weight matrix),
centroids ``c``: G × k × d (one table per group; G = 1 for one LUT per tensor). The products with centroid
tables are then batched matmuls (k×n by n×d, d×k by k×n), measured 3.6-8x faster on CPU for d = 4 than the
N × d layout's thin-matrix products; for d = 1 both layouts are the same memory. ``tau`` is a float or a
G × 1 × 1 tensor (one temperature per group).

Dense: every vector attends to all k centroids of its group (G × k × n).
Windowed (G = 1 and d = 1 only): with a small tau nearly all of a weight's attention sits on its nearest few
centroids. Centroids are sorted; each weight attends to the m centroids around its position (a sorted
search), and the mass left out is bounded: every centroid outside the window is at least as far as the
nearest one just outside it, so

    left-out mass / total  <=  (k - m) · exp(-(d_out - d_best) / tau)

with d_best the squared distance to the nearest centroid and d_out to the nearest one outside. A chunk
uses the smallest m in (4, 8) whose bound holds for all its rows below ``tol``, else the dense path, so
results match the dense path to ``tol`` relative. Cost per weight is then O(m), not O(k). Used for
k >= 32, where it is cheaper than the dense path.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}
_WINDOWS = (4, 8)
# Below this k the dense path is cheaper on CPU (measured: k=16 dense 0.18 s vs windowed 0.25 s CPU for
# one 590k-weight forward+backward; k=64 dense 0.41 s vs windowed 0.33 s).
_WINDOW_MIN_K = 32


def _logits_t(x: Tensor, c: Tensor, tau) -> Tensor:
    """Logits -||x_i - c_j||^2 / tau for x: G × d × n, laid out G × k × n (centroids × vectors): reductions
    over centroids then run along contiguous memory, measured ~1.8x faster on CPU than n × k for k = 16."""
    if x.shape[1] == 1:  # direct form: no cancellation, and as cheap as a matmul for d = 1
        return (c - x).square_().div_(-tau)
    # (2 c·x - ||c||^2) / tau: equal up to a per-vector constant (||x||^2), which softmax ignores.
    cc = (c * c).sum(2, keepdim=True)
    return torch.baddbmm(cc.div(-tau), c.mul(2.0 / tau), x)


def _softmax_(x: Tensor, dim: int) -> Tensor:
    """Softmax over ``dim`` in place (max-subtracted, so finite for any tau > 0). Logits more than 80
    (float32) below the max are clamped: their exp would be subnormal, which is exact to < 1e-34 relative
    but makes CPU arithmetic ~7x slower (measured)."""
    x.sub_(x.amax(dim, keepdim=True)).clamp_(min=_FLOOR.get(x.dtype, -80.0)).exp_()
    return x.div_(x.sum(dim, keepdim=True))


def attention(w: Tensor, c: Tensor, tau) -> Tensor:
    """Soft assignment A = softmax(-||w_i - c_j||^2 / tau): w N × d and c k × d give N × k (a transposed view);
    grouped, w G × N × d, c G × k × d and tau a float or G-vector give G × N × k."""
    if w.dim() == 2:
        return attention(w[None], c[None], tau)[0]
    tau = torch.as_tensor(tau, dtype=w.dtype, device=w.device).reshape(-1, 1, 1)
    return _softmax_(_logits_t(w.transpose(1, 2), c, tau), 1).transpose(1, 2)


class _Attention:
    """Builds the attention block of a chunk x (G × d × n) for fixed centroids c (G × k × d) and tau (a float or
    G × 1 × 1)."""

    def __init__(self, c: Tensor, tau, tol: float):
        self.c, self.tau, self.k = c, tau, c.shape[1]
        use = c.shape[0] == 1 and c.shape[2] == 1 and tol > 0 and self.k >= _WINDOW_MIN_K
        self.windows = [m for m in _WINDOWS if 2 * m <= self.k] if use else []
        if self.windows:
            self.tau_f = float(tau)
            self.sorted_c, self.order = c[0, :, 0].sort()
            self.log_tol = math.log(tol)
            inf = self.sorted_c.new_full((1,), float("inf"))
            padded = torch.cat([-inf, self.sorted_c, inf])
            # Per window start lo: the window's centroids (k-m+1) × m and its two outside neighbours.
            self.tables = {m: self.sorted_c.unfold(0, m, 1).contiguous() for m in self.windows}
            self.outside = {m: torch.stack([padded[: self.k - m + 1], padded[m + 1 :]], 1) for m in self.windows}

    def __call__(self, x: Tensor) -> "_Block":
        if self.windows:
            blk = self._windowed(x)
            if blk is not None:
                return blk
        return _Block(_softmax_(_logits_t(x, self.c, self.tau), 1), None, self)

    def _windowed(self, x: Tensor) -> Optional["_Block"]:
        k, w = self.k, x.reshape(-1, 1)  # n × 1
        pos = torch.searchsorted(self.sorted_c, w[:, 0].contiguous())
        for m in self.windows:
            lo = (pos - m // 2).clamp_(0, k - m)
            d2 = (w - self.tables[m].index_select(0, lo)).square_()  # n × m
            out = (w - self.outside[m].index_select(0, lo)).square_().amin(1)
            margin = float((out - d2.amin(1)).amin())
            if math.log(k - m) - margin / self.tau_f <= self.log_tol:
                return _Block(_softmax_(d2.div_(-self.tau_f), 1), lo, self)
        return None

    def sorted_table(self, v: Tensor, m: int) -> Tensor:
        """(k-m+1) × m table of v (a k-vector in centroid order) over each window start."""
        return v[self.order].unfold(0, m, 1)

    def unsort_fold(self, t: Tensor) -> Tensor:
        """Sum a (k-m+1) × m table of per-window-slot values back into a k-vector in centroid order."""
        m = t.shape[1]
        out_sorted = t.new_zeros(self.k)
        for j in range(m):
            out_sorted[j : j + t.shape[0]] += t[:, j]
        return out_sorted.new_empty(self.k).index_copy_(0, self.order, out_sorted)


class _Block:
    """Attention of a chunk of n vectors per group (given as x: G × d × n). Dense (lo None): ``a`` is A^T,
    G × k × n. Windowed (G = d = 1): ``a`` is n × m over the sorted centroids lo..lo+m-1 of each vector; its
    results carry the leading G = 1 axis like the dense ones."""

    def __init__(self, a: Tensor, lo: Optional[Tensor], att: _Attention):
        self.a, self.lo, self.att = a, lo, att
        self._flat = None

    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + (0 if self.lo is None else self.lo.numel() * 8)

    def _per_row(self, v: Tensor) -> Tensor:
        """A k-vector laid out like the windowed block: n × m values v[window of each vector]."""
        return self.att.sorted_table(v, self.a.shape[1]).index_select(0, self.lo)

    def _fold(self, vals: Tensor) -> Tensor:
        """Column sums of an n × m windowed block: k-vector."""
        m = vals.shape[1]
        if self._flat is None:  # flat (window start, slot) index, shared by the block's reductions
            self._flat = ((self.lo * m)[:, None] + torch.arange(m, device=vals.device)).reshape(-1)
        # scatter_add_ on a flat index: measured ~15x faster than index_add_ over rows on CPU.
        t = vals.new_zeros((self.att.k - m + 1) * m).scatter_add_(0, self._flat, vals.reshape(-1))
        return self.att.unsort_fold(t.view(-1, m))

    def colsum(self, x: Optional[Tensor] = None) -> Tensor:
        """A^T 1 (G × k) or A^T x (G × k × d) for x: G × d × n."""
        a = self.a
        if self.lo is None and x is not None and x.shape[1] == 1 and a.shape[0] > 1:
            return (a * x).sum(2, keepdim=True)  # batched k×n by n×1: with bmm a grouped step took ~1.2× longer
        if self.lo is None:
            return a.sum(2) if x is None else torch.bmm(a, x.transpose(1, 2))
        return self._fold(a)[None] if x is None else self._fold(a * x.reshape(-1, 1))[None, :, None]

    def mix(self, v: Tensor) -> Tensor:
        """(A @ v)^T, G × d × n, for v: G × k × d."""
        if self.lo is None and v.shape[2] == 1 and v.shape[0] > 1:
            return (self.a * v).sum(1, keepdim=True)  # as in colsum: no thin batched matmul
        if self.lo is None:
            return torch.bmm(v.transpose(1, 2), self.a)
        return (self.a * self._per_row(v[0, :, 0])).sum(1)[None, None, :]

    def rowdot(self, x: Tensor, g: Tensor, plus: Optional[Tensor] = None) -> Tensor:
        """x_i · g_j (+ plus_j) for the block's entries (x: G × d × n, g: G × k × d, plus: G × k), laid out like
        ``a``."""
        if self.lo is not None:
            out = x.reshape(-1, 1) * self._per_row(g[0, :, 0])
            return out if plus is None else out.add_(self._per_row(plus[0]))
        if x.shape[1] == 1:  # an outer product: broadcasting is ~4x faster than a K=1 matmul on CPU (measured)
            return g * x if plus is None else torch.addcmul(plus[..., None], g, x)
        return torch.bmm(g, x) if plus is None else torch.baddbmm(plus[..., None], g, x)

    def rowdot_add_(self, out: Tensor, x: Tensor, g: Tensor) -> Tensor:
        """out += rowdot(x, g), in place."""
        if self.lo is None and x.shape[1] == 1:
            return out.addcmul_(g, x)
        if self.lo is None:
            return out.baddbmm_(g, x)
        return out.add_(self.rowdot(x, g))

    def softmax_backward_(self, g_a: Tensor) -> Tensor:
        """dL/dlogits = A ⊙ (gA - sum_j(A ⊙ gA)), computed into g_a."""
        # in place, A ⊙ gA - A ⊙ dot: no temporary of the block's size (allocations measured ~3x a mul_)
        p = g_a.mul_(self.a)
        return p.addcmul_(self.a, p.sum(1, keepdim=True), value=-1.0)  # centroids: dim 1 in both layouts

    def _two_over_tau(self):
        return 2.0 / (self.att.tau_f if self.lo is not None else self.att.tau)

    def logit_grad_w(self, g_l: Tensor, c: Tensor) -> Tensor:
        """dL/dx of logits -||x - c||^2/tau: (2/tau) (g_l @ c)^T, G × d × n (the x term vanishes: g_l sums to 0
        over centroids since softmax is shift-invariant)."""
        return self._like(g_l).mix(c).mul_(self._two_over_tau())

    def logit_grad_c(self, g_l: Tensor, x: Tensor, c: Tensor) -> Tensor:
        """dL/dc of the same logits: (2/tau)(g_l^T x - colsum(g_l) c); G × k × d."""
        gb = self._like(g_l)
        return (gb.colsum(x) - gb.colsum()[..., None] * c).mul_(self._two_over_tau())

    def _like(self, a: Tensor) -> "_Block":
        blk = _Block(a, self.lo, self.att)
        blk._flat = self._flat
        return blk
