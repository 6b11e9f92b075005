"""DKM for d = 1 on a grid of values instead of the weights: O(N + U·k) per iteration instead of O(N·k).

For scalar weights every DKM quantity is a function of a weight's value: its attention A(w) (k), its share of the
cluster statistics (A(w), w·A(w)) and its output f(w) = A(w; C_{T-1}) · C_T. So each is computed once on U grid
values v_0 < ... < v_{U-1} spanning [min w, max w] and interpolated at the weights. The interpolant is the cubic
Hermite one on each interval [v_b, v_{b+1}] (length h_b): it matches φ and φ' at both ends, and φ' is known in
closed form (A'_j = (2/tau) A_j (c_j - Σ_l A_l c_l)). With t = (w - v_b)/h_b it is

    p(t) = f0 + d0 t + (3(f1 - f0) - 2 d0 - d1) t² + (2(f0 - f1) + d0 + d1) t³,   d = h_b φ'

so a sum over weights Σ_i p(t_i) only needs each interval's moments T_p = Σ_{i in b} t_i^p, p = 0..3 (one
scatter-add pass over the weights), and the output one gather pass. Costs: O(N) to bin and interpolate, O(U·k) per
k-means iteration. The grid ends are detached; t is differentiable in w (dt/dw = 1/h_b), so gradients reach w
through every iteration (via T) and through the output, as in the exact path.

The bound. Cubic Hermite interpolation on an interval of length h errs by at most h⁴/384 · M4 in value and
√3/216 · h³ · M4 in derivative, M4 = max |φ''''| on the interval. In 1-D the attention between two neighbouring
centroids (sorted, gap Δ, midpoint m) is a logistic of (v - m)/s, s = tau/(2Δ): A_{j+1}/A_j = exp((v - m)/s)
exactly. For the logistic σ, |σ''''| <= C4 = 0.1277 and |σ''''(x)| <= 2 e^{-|x|}, so the planner uses

    M4(v) = SAFETY · Σ_t min(C4, 2 exp(-|v - m_t| / s_t)) · (1/s_t⁴ + G/tau²)

over the k - 1 neighbour pairs t. The 1/s_t⁴ term is exact for k = 2; the G/tau² term (G = 16) covers several
centroids sharing attention at a large tau (the curvature of one Gaussian bump exp(-v²/tau) is 12/tau²).
Measured against the exact |A''''| (float64, k = 2..64, centroids spread, skewed and clustered, tau_scale
0.001..100): the worst ratio is 1.10 for tau_scale <= 0.05, 1.34 at 0.5 and 1.72 at 100, hence SAFETY = 2.
Every interval then gets h_b <= (384 tol / M4)^{1/4}, so each attention entry A_ij is interpolated within ``tol``
(default 1e-6), its derivative in w within √3/216 · (384 tol)^{3/4} · M4^{1/4} (about 6e-5 of the steepest
attention slope at tol = 1e-6). W~ = Σ_j A_j C_T,j then errs by about tol times the largest centroid gap (a weight
sees at most two transitions), the sums over weights by at most N·tol, and gradients by about 6e-5 of their scale.
The grid is uniform within each of S super-bins (so a weight's interval is found by two floor divisions, no
search): a super-bin gets the spacing its worst point needs. The grid is planned for C_0 and checked for each
later C_t that the iterations use; if one needs a finer grid, the union of the needs is planned and the iterations
go on from C_t on it (backward recomputes every iteration on that last grid, which meets the bound for all).

Used only when it pays: U <= N/8 per group and U <= MAX_NODES; otherwise :func:`cluster` returns None and the
caller runs the exact path. The G × U × k attention goes in blocks of grid values of at most MAX_CELLS entries and
the memory budget over ~64 bytes (64 MiB by default, like the exact path's kept attention, or the weight tensor's
size): memory stays bounded whatever U, at up to three attention computations per block and iteration instead of
one when there are several blocks. Shapes: ``w`` G × N (the d = 1 axis dropped), centroids G × k × 1, ``tau`` a
float or G × 1 × 1.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

TOL = 1e-6  # interpolation error bound of one attention entry
MAX_NODES = 1 << 16  # grid values per group
MAX_FRACTION = 1 / 8  # use the grid only when U <= N/8
MAX_CELLS = 1 << 20  # attention entries (G × u × k) per block of grid values
_CELL_BYTES = 64  # bytes of grid temporaries per cell of G × U × k (in backward: float64 logits, A, A', gradients)
SUPER_BINS = (256, 1024, 4096, 16384)  # candidate super-bin counts; the planner takes the one giving the fewest nodes
_C4 = 0.12768392  # max |σ''''| of the logistic σ(x) = 1/(1 + e^-x)
_K4 = 2.0  # sup |σ''''(x)| e^|x|
_G = 16.0
_SAFETY = 2.0


class Grid(NamedTuple):
    """A per-group grid: S super-bins of width H (a power of two) from lo (a multiple of H), super-bin s split into
    n[s] equal intervals. Intervals are numbered per group 0..U-2 and flattened over groups (group g from g·(U-1));
    a group with fewer intervals is padded with empty ones (length 0) at its top value. Powers of two make every
    super-bin edge lo + s·H exact in the weights' dtype, so a weight's offset from its edge, hence t, carries no
    rounding of the range (float32 weights keep the exact path's precision); the grid values are float64."""

    lo: Tensor  # G × 1, weights' dtype
    width: Tensor  # G × 1, H, weights' dtype
    inv_width: Tensor  # G × 1, 1/H
    n: Tensor  # G × (S+1), intervals per super-bin (int64); super-bin S, one interval above the top, is a guard
    scale: Tensor  # G·(S+1), n / H in the weights' dtype (gathered per weight)
    first: Tensor  # G·(S+1), flat index of the super-bin's first interval (int64)
    nodes: Tensor  # G × U float64, the grid values (padding repeats the top value)
    centred: Tensor  # G × U, nodes - mu
    mu: Tensor  # G × 1, middle of the range (first moments are taken about it)
    h: Tensor  # G × (U-1), interval lengths (0 for padding)
    need: Tensor  # G × S float64, the (fractional) counts the bound asks for, the max over the centroids planned for


# ----------------------------------------------------------------------------------------------------
# planning


def _counts(c: Tensor, tau, lo: Tensor, width: Tensor, s: int, tol: float) -> Tensor:
    """Intervals each super-bin needs for the bound, width / h_max: G × S float64, fractional (a super-bin of n
    intervals meets the bound when n >= this). c: G × k × 1, lo/width: G (float64)."""
    cs = c[..., 0].double().sort(1).values
    gap = cs[:, 1:] - cs[:, :-1]  # G × (k-1)
    mid = (cs[:, 1:] + cs[:, :-1]) / 2
    t = torch.as_tensor(tau, dtype=torch.float64, device=c.device).reshape(-1, 1)  # G × 1 or 1 × 1
    inv_s = 2 * gap / t  # 1/s_t, the slope of the neighbour pair's logistic
    centre = lo[:, None] + (torch.arange(s, device=c.device, dtype=torch.float64) + 0.5) * width[:, None]  # G × S
    dist = ((mid[:, None, :] - centre[:, :, None]).abs() - width[:, None, None] / 2).clamp_min_(0)  # G × S × (k-1)
    env = torch.exp(-dist * inv_s[:, None, :]).mul_(_K4).clamp_max_(_C4)
    m4 = _SAFETY * (env * (inv_s.pow(4) + _G / t.pow(2))[:, None, :]).sum(2)  # G × S
    # (0 · inf from an extreme tau is nan: then no grid)
    return (width[:, None] * (m4 / (384 * tol)).pow(0.25)).nan_to_num_(nan=1e15).clamp_(max=1e15)


def _intervals(need: Tensor) -> Tensor:
    return need.ceil().clamp_(min=1)


def _build(lo: Tensor, width: Tensor, need: Tensor, dtype: torch.dtype) -> Grid:
    """The grid meeting ``need`` (G × S float64) over super-bins of ``width`` from ``lo`` (G, float64), plus the
    guard super-bin: a weight at the very top, or at a super-bin's top edge by rounding, lands at t = 0 of the
    next interval instead of needing a clamp (one pass less per weight)."""
    g, s = need.shape
    dev = need.device
    lo = lo.to(dtype).double()  # the grid values follow the edges locate() sees
    n = torch.cat([_intervals(need).long(), need.new_ones(g, 1, dtype=torch.long)], 1)
    s += 1
    u = int(n.sum(1).max()) + 1
    first = ((n.cumsum(1) - n) + torch.arange(g, device=dev)[:, None] * (u - 1)).reshape(-1)
    # left end of every interval: lo + (s + j / n_s) · H, j = 0..n_s-1
    flat_n = n.reshape(-1)
    sb = torch.repeat_interleave(torch.arange(g * s, device=dev), flat_n)
    j = torch.arange(sb.numel(), device=dev) - (flat_n.cumsum(0) - flat_n)[sb]
    n_of = flat_n[sb].double()
    grp = sb // s
    hi = lo + s * width
    dest = first[sb] + j
    lefts = hi[:, None].repeat(1, u - 1).reshape(-1)  # padding intervals start (and end) at the top value
    lefts[dest] = lo[grp] + ((sb % s).double() + j.double() / n_of) * width[grp]
    h = torch.zeros(g * (u - 1), dtype=torch.float64, device=dev)
    h[dest] = width[grp] / n_of
    nodes = torch.cat([lefts.view(g, u - 1), hi[:, None]], 1)
    mu = (lo + hi)[:, None] / 2
    col = lambda v: v[:, None].to(dtype)  # noqa: E731
    scale = (n / width[:, None]).reshape(-1).to(dtype)
    return Grid(col(lo), col(width), col(1 / width), n, scale, first, nodes, (nodes - mu).to(dtype), mu.to(dtype),
                h.view(g, u - 1).to(dtype), need)


def _super_bins(lo: Tensor, hi: Tensor, target: int) -> Tuple[Tensor, Tensor, int]:
    """(lo', H, S): H the power of two with S ~ target super-bins over [lo, hi] (target/2 < S <= target + 1) and
    lo' <= lo a multiple of H (float64, G each)."""
    width = torch.exp2(torch.ceil(torch.log2((hi - lo) / target)))
    start = torch.floor(lo / width) * width
    return start, width, max(1, int(torch.ceil((hi - start) / width).max()))


def _limit(x: Tensor, max_nodes: int, max_fraction: float) -> float:
    """The most grid values per group that pay: x G × N."""
    return min(max_nodes, x.shape[1] * max_fraction)


def plan(x: Tensor, cs: Sequence[Tensor], tau, tol: float = TOL, max_nodes: int = MAX_NODES,
         max_fraction: float = MAX_FRACTION) -> Optional[Grid]:
    """A grid for weights x (G × N) meeting the bound for every centroid table in ``cs`` (each G × k × 1), or None
    when none pays (more than max_fraction·N or max_nodes values per group, or a non-finite or empty range). Of the
    candidate super-bin counts, the one giving fewest values."""
    x = x.detach()
    # aminmax over all elements is measured ~20x faster on CPU than along a dimension
    lo, hi = torch.aminmax(x) if x.shape[0] == 1 else (x.amin(1), x.amax(1))
    lo, hi = lo.reshape(-1).double(), hi.reshape(-1).double()
    if not bool((torch.isfinite(hi - lo) & (hi > lo)).all()):
        return None
    n_rows = x.shape[1]
    limit = _limit(x, max_nodes, max_fraction)
    best = None
    for cand in [c for c in SUPER_BINS if c <= max(n_rows // 16, SUPER_BINS[0])]:
        start, width, count = _super_bins(lo, hi, cand)
        if best is not None and best[0] <= count + 1:
            break  # U >= S + 1: more super-bins cannot give fewer values
        need = torch.stack([_counts(c, tau, start, width, count, tol) for c in cs]).amax(0)
        u = float(_intervals(need).sum(1).max()) + 1
        if best is None or u < best[0]:
            best = (u, start, width, need)
    if best is None or best[0] > limit:
        return None
    return _build(best[1], best[2], best[3], x.dtype)


def fits(grid: Grid, c: Tensor, tau, tol: float = TOL) -> bool:
    """Whether ``grid`` meets the bound for centroids c (G × k × 1) too (one host sync)."""
    need = _counts(c, tau, grid.lo[:, 0].double(), grid.width[:, 0].double(), grid.need.shape[1], tol)
    return bool((need <= grid.n[:, :-1]).all())


def replan(x: Tensor, grid: Grid, c: Tensor, tau, tol: float = TOL, max_nodes: int = MAX_NODES,
           max_fraction: float = MAX_FRACTION) -> Optional[Grid]:
    """A grid meeting the bound for ``grid``'s centroids and for c (the max of their needs), same super-bins."""
    lo, width = grid.lo[:, 0].double(), grid.width[:, 0].double()
    need = torch.maximum(grid.need, _counts(c, tau, lo, width, grid.need.shape[1], tol))
    if float(_intervals(need).sum(1).max()) + 1 > _limit(x, max_nodes, max_fraction):
        return None
    return _build(lo, width, need, x.dtype)


# ----------------------------------------------------------------------------------------------------
# O(N): binning and interpolation


def locate(x: Tensor, grid: Grid) -> Tuple[Tensor, Tensor]:
    """(b, t): each weight's flat interval index (int64, G × N) and its position in it, t in [0, 1] (G × N).

    A weight just below its super-bin's edge (rounding in the coarse division) lands at t = -tiny of the first
    interval, one at a top edge at t = 0 of the next interval: the same point either way. 11 passes over the
    weights (each an op: the cost of this path is mostly such passes)."""
    y = (x - grid.lo).mul_(grid.inv_width)  # >= 0: truncation is floor
    sb = y.int()  # int32 index arithmetic: int64 conversions measured several times slower on CPU
    r = torch.addcmul(grid.lo, sb, grid.width)  # the super-bin's edge, exact (powers of two)
    r = torch.sub(x, r, out=r)  # offset from the edge: no rounding of the range
    if x.shape[0] > 1:
        sb += torch.arange(0, grid.n.numel(), grid.n.shape[1], device=x.device, dtype=sb.dtype)[:, None]
    flat = sb.reshape(-1)
    y = r.mul_(grid.scale.index_select(0, flat).view_as(x))  # in interval lengths
    j = y.long()
    return grid.first.index_select(0, flat).view_as(j).add_(j), y.sub_(j)


def moments(b: Tensor, t: Tensor, out: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """Adds Σ weight_i t_i^p per interval, p = 0..3, into out (4 × intervals; weight 1 when None)."""
    b, t = b.reshape(-1), t.reshape(-1)
    if weight is None:
        out[0].scatter_add_(0, b, t.new_ones(()).expand_as(t))  # (bincount syncs with the host on CUDA)
        v = t
    else:
        v = weight.reshape(-1)
        out[0].scatter_add_(0, b, v)
        v = v * t
    out[1].scatter_add_(0, b, v)
    v = v * t
    out[2].scatter_add_(0, b, v)
    out[3].scatter_add_(0, b, v.mul_(t))
    return out


def polyval(b: Tensor, t: Tensor, coef: Tensor) -> Tensor:
    """Σ_p coef[p, b_i] t_i^p (Horner) for coef: P × size."""
    b = b.reshape(-1)
    out = coef[-1].index_select(0, b).view_as(t)
    for p in range(coef.shape[0] - 2, -1, -1):
        out = torch.addcmul(coef[p].index_select(0, b).view_as(t), out, t)
    return out


# ----------------------------------------------------------------------------------------------------
# O(U·k): k-means on the grid


def _attention(nodes: Tensor, c: Tensor, tau) -> Tuple[Tensor, Tensor]:
    """Attention of grid values ``nodes`` (G × u float64) and its derivative in the value: A, A' (G × u × k, c's
    dtype). The logits are taken from the float64 grid values (a float32 grid value would be off by up to half an
    ulp, which at a steep transition moves W~ by ~10x the exact path's rounding); the rest is in c's dtype."""
    row = c.transpose(1, 2)  # G × 1 × k
    logits = (nodes[..., None] - row.double()).square_().div_(-tau).to(c.dtype)
    a = torch.softmax(logits, dim=2)
    mean = (a * row).sum(2, keepdim=True)  # Σ_l A_l c_l
    return a, a * (row - mean) * _two_over(tau, c.dtype)


def _two_over(tau, dtype: torch.dtype):
    return 2.0 / tau if isinstance(tau, float) else (2.0 / tau).to(dtype)


def parts(grid: Grid, k: int, cells: int) -> List[slice]:
    """Slices of the grid values whose G × u × k attention blocks hold at most ``cells`` entries (at least one
    value each): the O(U·k) work goes block by block, so its memory is bounded whatever U."""
    g, u = grid.nodes.shape
    size = max(1, cells // (g * k))
    return [slice(s, min(u, s + size)) for s in range(0, u, size)]


def _hermite(f: Tensor, df: Tensor, h: Tensor) -> Tensor:
    """Cubic coefficients on every interval of the Hermite interpolant of values f and derivatives df at the grid
    values (G × U each), intervals of length h (G × (U-1)): 4 × G·(U-1)."""
    f0, f1 = f[:, :-1], f[:, 1:]
    d0, d1 = h * df[:, :-1], h * df[:, 1:]
    return torch.stack([f0, d0, 3 * (f1 - f0) - 2 * d0 - d1, 2 * (f0 - f1) + d0 + d1]).flatten(1)


def node_weights(tm: Tensor, h: Tensor) -> Tuple[Tensor, Tensor]:
    """Σ_i p(t_i) = Σ_u P_u φ(v_u) + Q_u φ'(v_u) for the Hermite interpolant p of any φ: P, Q (G × U) from the
    interval moments tm (4 × G·(U-1)) and lengths h (G × (U-1)). The transpose of :func:`_hermite`."""
    t0, t1, t2, t3 = tm.view(4, *h.shape).unbind(0)
    pad = torch.nn.functional.pad
    p = pad(t0 - 3 * t2 + 2 * t3, (0, 1)) + pad(3 * t2 - 2 * t3, (1, 0))
    q = pad(h * (t1 - 2 * t2 + t3), (0, 1)) + pad(h * (t3 - t2), (1, 0))
    return p, q


def _sums(x: Tensor, p: Tensor, q: Tensor) -> Tuple[Tensor, Tensor]:
    """The weights of A and A' in the cluster sums, G × 2 × u each, for grid values centred on mu x (G × u):
    masses interpolate A_j (P, Q), first moments (v - mu) A_j, whose derivative is A_j + (v - mu) A'_j
    (x P + Q, x Q)."""
    return torch.stack([p, x * p + q], 1), torch.stack([q, x * q], 1)


def _stats(grid: Grid, c: Tensor, tau, p: Tensor, q: Tensor, part: slice) -> Tuple[Tensor, Tensor, Tensor]:
    """(r, A, A') of the grid values in ``part``: r (G × 2 × k) their share of the masses and first moments about
    mu, A and A' their attention at centroids c."""
    a, da = _attention(grid.nodes[:, part], c, tau)
    pa, pda = _sums(grid.centred[:, part], p[:, part], q[:, part])
    return torch.bmm(pa, a) + torch.bmm(pda, da), a, da


def _centroids(grid: Grid, r: Tensor, c: Tensor, update: Callable) -> Tensor:
    return update(r[:, 0], (r[:, 1] + grid.mu * r[:, 0])[..., None], c)


def step(grid: Grid, c: Tensor, tau, p: Tensor, q: Tensor, update: Callable,
         blocks: Sequence[slice]) -> Tuple[Tensor, Optional[Tuple[Tensor, Tensor]]]:
    """One k-means iteration on the grid: (C_t, (A, A')) from C_{t-1} (G × k × 1), A and A' its attention (for the
    output when it is the last; None when the grid values went in several ``blocks``)."""
    r, held = 0, None
    for part in blocks:
        got, a, da = _stats(grid, c, tau, p, q, part)
        r, held = r + got, (a, da) if len(blocks) == 1 else None
    return _centroids(grid, r, c, update), held


def output_coef(grid: Grid, c: Tensor, c_last: Tensor, tau, blocks: Sequence[slice],
                held: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """Cubic coefficients of W~ = A(v; C_{T-1}) · C_T on every interval: 4 × G·(U-1), from the attention at
    c = C_{T-1} (``held`` when the caller has it for all grid values, else recomputed block by block)."""
    f, df = [], []
    for part in blocks:
        a, da = held if held is not None else _attention(grid.nodes[:, part], c, tau)
        f.append(torch.bmm(a, c_last)[..., 0])
        df.append(torch.bmm(da, c_last)[..., 0])
    return _hermite(torch.cat(f, 1), torch.cat(df, 1), grid.h)


def step_backward(grid: Grid, c: Tensor, tau, p: Tensor, q: Tensor, update: Callable, g: Tensor,
                  blocks: Sequence[slice], g_coef: Optional[Tensor] = None
                  ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Backward of :func:`step` from C_{t-1} = c, given dL/dC_t = g, and with ``g_coef`` (dL/d coefficients) of
    :func:`output_coef` on its result too (the last iteration): (dL/dC_{t-1}, dL/dP, dL/dQ, the coefficients or
    None). By hand: recomputed attention and no graph (measured ~0.5 ms less per call than autograd at U ~ 2000,
    k = 16); only the k-sized update rule goes through autograd. With several ``blocks`` the attention is computed
    up to three times per block (statistics, output, gradients) instead of once, to keep its memory bounded."""
    row = c.transpose(1, 2)  # G × 1 × k
    held = [_stats(grid, c, tau, p, q, part) for part in blocks] if len(blocks) == 1 else None
    r = held[0][0] if held else sum(_stats(grid, c, tau, p, q, part)[0] for part in blocks)
    att = (lambda i, part: held[i][1:]) if held else (lambda i, part: _attention(grid.nodes[:, part], c, tau))
    with torch.enable_grad():
        mass, mom, c_in = r[:, 0].requires_grad_(), r[:, 1].clone().requires_grad_(), c.detach().requires_grad_()
        c_out = _centroids(grid, torch.stack([mass, mom], 1), c_in, update)
    coef, g_f, g_df = None, None, None
    if g_coef is not None:  # W~ = A C_T on the grid: f = A c, f' = A' c
        coef = output_coef(grid, c, c_out.detach(), tau, blocks, held[0][1:] if held else None)
        g_f, g_df = node_weights(g_coef, grid.h)  # the transpose of _hermite
        for i, part in enumerate(blocks):
            a, da = att(i, part)
            g = g + torch.bmm(a.transpose(1, 2), g_f[:, part, None]) + torch.bmm(da.transpose(1, 2),
                                                                             g_df[:, part, None])
    g_mass, g_mom, g_c = torch.autograd.grad(c_out, (mass, mom, c_in), g)
    g_r = torch.stack([g_mass, g_mom], 1)  # G × 2 × k
    s = _two_over(tau, c.dtype)  # A' = s A (c - m), m = Σ_l A_l c_l, s = 2/tau
    g_p, g_q, g_row = [], [], g_c.transpose(1, 2)
    last = c_out.detach().transpose(1, 2)
    for i, part in enumerate(blocks):
        a, da = att(i, part)
        x = grid.centred[:, part]
        pa, pda = _sums(x, p[:, part], q[:, part])
        g_a = torch.bmm(pa.transpose(1, 2), g_r)  # G × u × k
        g_da = torch.bmm(pda.transpose(1, 2), g_r)
        if g_f is not None:
            g_a.add_(g_f[:, part, None] * last)
            g_da.add_(g_df[:, part, None] * last)
        g_pa, g_pda = torch.bmm(g_r, a.transpose(1, 2)), torch.bmm(g_r, da.transpose(1, 2))  # G × 2 × u
        g_p.append(g_pa[:, 0] + x * g_pa[:, 1])
        g_q.append(g_pa[:, 1] + g_pda[:, 0] + x * g_pda[:, 1])
        m = (a * row).sum(2, keepdim=True)
        g_da_a = g_da * a
        g_m = g_da_a.sum(2, keepdim=True).mul_(-s)  # G × u × 1
        g_row = g_row + g_da_a.sum(1, keepdim=True).mul_(s)  # G × 1 × k
        g_a = g_a.add_(g_da * (row - m) * s).add_(g_m * row)
        g_row = g_row + (g_m * a).sum(1, keepdim=True)
        g_l = a * (g_a - (a * g_a).sum(2, keepdim=True))  # softmax
        # logits -(v - c)²/tau: d/dc = s (v - c) = s ((v - mu) - (c - mu))
        g_row = g_row + s * (torch.bmm(x[:, None, :], g_l) - (row - grid.mu[..., None]) * g_l.sum(1, keepdim=True))
    return g_row.transpose(1, 2), torch.cat(g_p, 1), torch.cat(g_q, 1), coef


# ----------------------------------------------------------------------------------------------------
# autograd


class _Run(NamedTuple):
    grid: Grid
    tau: object
    cs: List[Tensor]  # C_0 .. C_T
    tm: Tensor  # interval moments of the weights, 4 × G·(U-1)
    update: Callable
    hard: Optional[Callable]  # (w, C_T) -> hard output value, or None for the soft output
    rows: int  # weights per group in one pass over the weights (>= N: one pass, locate(x) computed once per call)
    keep: bool  # hold locate(x) from forward until backward (12 bytes per weight) instead of recomputing it
    cells: int  # attention entries per block of grid values (see parts)
    located: Optional[List[Tuple[Tensor, Tensor]]] = None  # locate(x) of the one pass, when held
    coef: Optional[Tensor] = None  # forward only: the output's coefficients, computed by the iterations


# bytes of temporaries per weight in one pass (measured ~40 for float32: b and t, their gathers and products)
_PASS_BYTES = 40


def _rows(x: Tensor, budget: int) -> int:
    """Weights per group in one pass: all when their temporaries fit ``budget`` bytes, else chunks of at least
    2^16 weights (then locate(x) is recomputed in each pass: extra memory O(chunk), not O(N))."""
    g, n = x.shape
    return n if g * n * _PASS_BYTES <= budget else min(n, max(budget // (g * _PASS_BYTES), (1 << 16) // g, 1))


def _passes(x: Tensor, grid: Grid, rows: int, located: Optional[list]):
    """(columns, b, t) of each pass over the weights, from ``located`` when given, else computed (and appended to
    an empty ``located`` list, to be reused by the next pass)."""
    n = x.shape[1]
    for i, start in enumerate(range(0, n, rows)):
        cols = slice(start, min(n, start + rows))
        if located is not None and i < len(located):
            yield (cols, *located[i])
            continue
        b, t = locate(x[:, cols], grid)
        if located is not None:
            located.append((b, t))
        yield cols, b, t


class _ValueGridDKM(torch.autograd.Function):
    """(W~, C_T) from x (G × N) with the iterations already run (their centroids in ``run.cs``). Saves only x;
    backward re-bins it and recomputes each iteration on the grid (O(U·k) memory, flat in iterations)."""

    @staticmethod
    def forward(ctx, x: Tensor, run: _Run):
        c = run.cs[-1].clone()
        if run.hard is not None:
            out = run.hard(x, c)
        else:
            out = torch.empty_like(x)
            for cols, b, t in _passes(x, run.grid, run.rows, run.located):
                out[:, cols] = polyval(b, t, run.coef)
        ctx.save_for_backward(x)
        # by default backward re-bins x: O(N) memory only while computing
        ctx.run = run._replace(located=run.located if run.keep else None, coef=None)
        return out, c

    @staticmethod
    def backward(ctx, g_out: Optional[Tensor], g_c: Optional[Tensor]):
        (x,), run = ctx.saved_tensors, ctx.run
        grid, cs, tau = run.grid, run.cs, run.tau
        ctx.run = run._replace(located=None)  # (a second backward, with retain_graph, re-bins)
        one = run.rows >= x.shape[1]
        located = run.located if run.located is not None else ([] if one else None)
        inv_h = torch.where(grid.h > 0, 1 / grid.h, 0.0).reshape(-1)
        g_coef = torch.zeros_like(run.tm)  # dL/d(output coefficients)
        if g_out is not None:
            for cols, b, t in _passes(x, grid, run.rows, located):
                moments(b, t, g_coef, g_out[:, cols])
        g = torch.zeros_like(cs[-1]) if g_c is None else g_c
        p, q = node_weights(run.tm, grid.h)
        g_p, g_q, coef = torch.zeros_like(p), torch.zeros_like(q), None
        blocks = parts(grid, cs[0].shape[1], run.cells)
        for it in range(len(cs) - 1, 0, -1):  # C_it from C_{it-1}; the output A(C_{T-1}) · C_T joins the last
            last = it == len(cs) - 1
            g, gp, gq, got = step_backward(grid, cs[it - 1], tau, p, q, run.update, g, blocks,
                                           g_coef if last else None)
            coef = got if last else coef
            g_p, g_q = g_p.add_(gp), g_q.add_(gq)
        g_tm = _hermite(g_p, g_q, grid.h)  # node_weights is linear: its transpose
        # d/dw Σ_p T_p[b] and of the output polynomial: Σ_p p coef_p[b] t^{p-1} / h_b
        k = torch.arange(1, 4, device=x.device, dtype=x.dtype)[:, None]
        d_tm, d_out = g_tm[1:] * k * inv_h, coef[1:] * k * inv_h
        g_x = torch.empty_like(x)
        for cols, b, t in _passes(x, grid, run.rows, located):
            g_x[:, cols] = polyval(b, t, d_tm)
            if g_out is not None:
                g_x[:, cols].addcmul_(g_out[:, cols], polyval(b, t, d_out))
        return g_x, None


def _binned(x: Tensor, grid: Grid, rows: int) -> Tuple[Tensor, Optional[list]]:
    """(interval moments of the weights 4 × G·(U-1), each weight's (b, t) when one pass takes them all, else None)."""
    located = [] if rows >= x.shape[1] else None
    tm = x.new_zeros(4, grid.h.numel())
    for _cols, b, t in _passes(x, grid, rows, located):
        moments(b, t, tm)
    return tm, located


def cluster(w: Tensor, c0: Tensor, tau, iters: int, *, update: Callable,
            converged: Optional[Callable[[Tensor, Tensor], bool]] = None, hard: Optional[Callable] = None,
            budget: int = 64 << 20, keep: bool = False, tol: Optional[float] = None, max_nodes: Optional[int] = None,
            max_fraction: Optional[float] = None) -> Optional[Tuple[Tensor, Tensor, int]]:
    """DKM on a value grid: (W~ G × N × 1, C_T G × k × 1, iterations run) from w (G × N × 1) and c0 (G × k × 1),
    or None when the grid does not pay or cannot meet the bound (the caller then runs the exact path).

    ``update(mass, moment, c_prev)`` is the centroid update (empty clusters keep c_prev), ``converged(c, c_prev)``
    the early-stop test (None: run all iterations), ``hard(x, c)`` the hard output's value (None: the soft one).
    ``budget``: bytes of temporaries: of the grid (about 64 per attention entry of G × U × k: above it, and above
    MAX_CELLS entries, the grid values go in blocks, each block's attention computed up to three times per
    iteration instead of once; at least the weight tensor's size is allowed) and of one pass over the weights
    (about 40 per weight; above it the passes go in chunks and recompute each weight's interval). ``keep``: hold
    each weight's interval and position (12 bytes per float32 weight) from forward until backward (only when one
    pass takes all weights).
    ``tol``, ``max_nodes``, ``max_fraction``: None reads the module's TOL, MAX_NODES, MAX_FRACTION at call time."""
    tol = TOL if tol is None else tol
    max_nodes = MAX_NODES if max_nodes is None else max_nodes
    max_fraction = MAX_FRACTION if max_fraction is None else max_fraction
    x = w[..., 0]
    cells = min(MAX_CELLS, max(budget, x.numel() * x.element_size()) // _CELL_BYTES)
    grid = plan(x, [c0], tau, tol, max_nodes, max_fraction)
    if grid is None:
        return None
    tau = tau if isinstance(tau, float) else tau.double()  # (for the float64 logits)
    rows = _rows(x, budget)
    with torch.no_grad():
        tm, located = _binned(x, grid, rows)
        p, q = node_weights(tm, grid.h)
        cs, blocks = [c0], parts(grid, c0.shape[1], cells)
        for it in range(iters):
            c, held = step(grid, cs[-1], tau, p, q, update, blocks)
            cs.append(c)
            if it == iters - 1 or (converged is not None and converged(c, cs[-2])):
                break
            if not fits(grid, c, tau, tol):
                # The next iteration's attention needs a finer grid: refine it (the union of the needs, so it meets
                # the bound for every centroid table so far, as backward's recomputation needs) and go on; the
                # iterations so far met the bound on the grid they ran on.
                grid = replan(x, grid, c, tau, tol, max_nodes, max_fraction)
                if grid is None:
                    return None
                tm, located = _binned(x, grid, rows)
                p, q = node_weights(tm, grid.h)
                blocks = parts(grid, c0.shape[1], cells)
        coef = None if hard is not None else output_coef(grid, cs[-2], cs[-1], tau, blocks, held)
    keep = keep and located is not None
    out, c = _ValueGridDKM.apply(x, _Run(grid, tau, cs, tm, update, hard, rows, keep, cells, located, coef))
    return out[..., None], c, len(cs) - 1
