"""k-means initialisation of the centroids (the warm start of the first DKM step).

d = 1: optimal 1-D k-means by dynamic programming over contiguous bins of the sorted values, then exact 1-D Lloyd
on all values, which on sorted data costs O(k log N) per iteration (prefix sums). One table (per-tensor): ≤ 2048
bins, quantile plus equal-width, so tails keep their resolution. Grouped (G tables at once): every value its own bin
(the exact optimum) for groups of ≤ max(1024, 16k) values, else that many bins, half by rank of the distinct values,
half at equal widths (measured within 0.4 % of the optimum at k = 4..256).
d > 1: k-means++ seeding on a seeded subsample, then Lloyd on all vectors (batched over groups).
Optional per-vector weights (``weight=``, e.g. a Fisher diagonal): every step minimises Σ w_i ||x_i - c(i)||²
instead (weighted prefix sums in the DP and Lloyd, weighted seeding and means); None keeps the plain path.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .functional import compute_dtype, nearest_centroid

_MAX_GROUPS = 2048
_PP_SAMPLE = 20000
_W_FLOOR = 1e-6  # weights are scaled to mean 1 and floored here, so every value keeps a (tiny) say


def kmeans_init(w: Tensor, k: int, *, seed: int = 0, iters: int = 50, weight: Optional[Tensor] = None) -> Tensor:
    """Centroids (k × d, float32 or float64 like w's compute dtype) for vectors w (N × d); grouped, G × k × d
    for w: G × N × d (each group's own k-means).

    ``weight`` (N, or G × N; ≥ 0): minimise the weighted error Σ weight_i ||w_i - c(i)||² instead (weights are
    rescaled to mean 1 per group and floored at 1e-6). None: the plain k-means.

    Example: w (589824 × 1), k=16 -> 16 × 1 centroids, sorted for d = 1. Deterministic under ``seed``.
    """
    w = w.detach()
    w = w.to(compute_dtype(w))
    if weight is not None:
        return _kmeans_weighted(w, k, seed, iters, weight)
    if w.dim() == 3:
        if w.shape[0] == 1:
            return kmeans_init(w[0], k, seed=seed, iters=iters)[None]
        if w.shape[2] == 1:
            return kmeans_1d_grouped(w[..., 0], k, iters=iters)[..., None]
        return kmeans_nd_grouped(w, k, seed=seed, iters=iters)
    if w.shape[1] == 1:
        return kmeans_1d(w[:, 0], k, iters=iters)[:, None]
    return kmeans_nd(w, k, seed=seed, iters=iters)


def _kmeans_weighted(w: Tensor, k: int, seed: int, iters: int, weight: Tensor) -> Tensor:
    """kmeans_init with per-vector weights (see there)."""
    if tuple(weight.shape) != tuple(w.shape[:-1]):
        raise ValueError(f"kmeans_init: weight of shape {tuple(weight.shape)} does not match vectors of shape "
                         f"{tuple(w.shape)}: give one weight per vector, shape {tuple(w.shape[:-1])}")
    wt = weight.detach().to(device=w.device, dtype=torch.float64)
    if not bool(torch.isfinite(wt).all()) or bool((wt < 0).any()):
        raise ValueError("kmeans_init: weight must be finite and >= 0")
    wt = wt / wt.mean(-1, keepdim=True).clamp_min(1e-300)
    wt = torch.where(wt.sum(-1, keepdim=True) > 0, wt, torch.ones_like(wt)).clamp_min(_W_FLOOR)
    if w.dim() == 2:
        return (kmeans_1d(w[:, 0], k, iters=iters, weight=wt)[:, None] if w.shape[1] == 1
                else kmeans_nd(w, k, seed=seed, iters=iters, weight=wt))
    if w.shape[2] == 1:
        return kmeans_1d_grouped(w[..., 0], k, iters=iters, weight=wt)[..., None]
    return kmeans_nd_grouped(w, k, seed=seed, iters=iters, weight=wt)


def kmeans_1d(x: Tensor, k: int, iters: int = 50, weight: Optional[Tensor] = None) -> Tensor:
    """Optimal-by-DP then Lloyd-refined 1-D k-means; sorted centroids, length k (``weight``: N, weighted)."""
    wt = None
    if weight is None:
        v = x.sort().values.double()
    else:
        v, order = x.double().sort()
        wt = weight.double()[order][None]
    n = v.numel()
    starts = _group_starts(v, min(_MAX_GROUPS, max(1024, 4 * k)))
    c = _dp_grouped(v[None], torch.cat([starts, starts.new_full((1,), n)])[None], k, wt)
    return _lloyd_sorted(v[None], c, iters, wt)[0].to(x.dtype)


def _group_starts(v: Tensor, groups: int) -> Tensor:
    """Start indices of ≤ ``groups`` contiguous groups of the sorted values; equal values never split."""
    n = v.numel()
    q = torch.linspace(0, n, groups // 2 + 1, dtype=torch.float64)[:-1].long()
    edges = torch.linspace(float(v[0]), float(v[-1]), groups // 2 + 1, dtype=torch.float64)[1:-1]
    u = torch.searchsorted(v, edges.to(v.dtype))
    starts = torch.unique(torch.cat([q, u]).clamp(0, n - 1))
    # Move each start to the first occurrence of its value so equal values stay in one group.
    starts = torch.unique(torch.searchsorted(v, v[starts]))
    return starts


def kmeans_nd(w: Tensor, k: int, *, seed: int = 0, iters: int = 50, weight: Optional[Tensor] = None) -> Tensor:
    """k-means++ on a seeded subsample of ≤ 20000 vectors, then Lloyd on all of w. k × d.
    ``weight`` (N, > 0): seeding ∝ weight × distance², weighted means."""
    n = w.shape[0]
    gen = torch.Generator().manual_seed(seed)
    pick = None if n <= _PP_SAMPLE else torch.randperm(n, generator=gen)[:_PP_SAMPLE].to(w.device)
    sample = w if pick is None else w[pick]
    if weight is not None:
        weight = weight.to(w.dtype)
    c = _kmeanspp(sample, k, gen, None if weight is None else (weight if pick is None else weight[pick]))
    for _ in range(iters):
        idx = nearest_centroid(w, c)
        if weight is None:
            mass = torch.bincount(idx, minlength=k).to(w.dtype)
            moment = torch.zeros_like(c).index_add_(0, idx, w)
        else:
            mass = torch.zeros(k, dtype=w.dtype, device=w.device).index_add_(0, idx, weight)
            moment = torch.zeros_like(c).index_add_(0, idx, w * weight[:, None])
        new = torch.where(mass[:, None] > 0, moment / mass.clamp_min(1 if weight is None else _W_FLOOR)[:, None], c)
        if torch.equal(new, c):
            break
        c = new
    return c


def _kmeanspp(x: Tensor, k: int, gen: torch.Generator, weight: Optional[Tensor] = None) -> Tensor:
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        wd2 = d2 if weight is None else weight * d2
        total = float(wd2.sum())
        if total <= 0:  # fewer distinct vectors than k: repeat an existing centre
            centers.append(centers[-1])
            continue
        probs = (wd2 / total).double().cpu()
        i = int(torch.multinomial(probs, 1, generator=gen))
        centers.append(x[i])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    return torch.stack(centers)


# ----------------------------------------------------------------------------------------------------
# grouped (batched over G tables)

_BINS_PER_CENTROID = 4  # DP bins per centroid for long rows (at least _MIN_BINS); shorter rows: every value a bin
_MIN_BINS = 1024
_OPT_CELLS = 1 << 25  # backtracking table per DP batch: k × groups × (bins + 1) int32 cells (128 MiB)


def kmeans_1d_grouped(x: Tensor, k: int, iters: int = 50, weight: Optional[Tensor] = None) -> Tensor:
    """1-D k-means of every row of x (G × N) at once. G × k, sorted per row.

    Rows of at most B = max(1024, 4k) values get the exact optimum: the DP over contiguous runs of the sorted values,
    each layer solved by divide and conquer on the monotone split point (O(k N log N) per row). Longer rows run the
    same DP over B value bins (half spread over the distinct values by rank, half at equal widths), then Lloyd, then
    the exact DP with every boundary within two bins of Lloyd's, then Lloyd again.
    Fewer distinct values than k: each distinct value is a centroid (repeats fill the table), the error is zero.
    ``weight`` (G × N, > 0): the same with weighted prefix sums (weighted SSE, weighted means)."""
    wt = None
    if weight is None:
        v = x.sort(1).values.double()
    else:
        v, order = x.double().sort(1)
        wt = weight.double().gather(1, order)
    g, n = v.shape
    bins = min(n, max(_MIN_BINS, _BINS_PER_CENTROID * k))
    chunk = max(1, _OPT_CELLS // (k * (bins + 1)))
    if g > chunk:
        parts = weight.split(chunk) if weight is not None else [None] * len(x.split(chunk))
        return torch.cat([kmeans_1d_grouped(part, k, iters=iters, weight=wp) for part, wp in zip(x.split(chunk), parts)])
    c = _dp_grouped(v, _bin_bounds(v, bins), k, wt)
    if bins < n:  # bins of ~n/B values: Lloyd, then the exact DP within a few bins of each boundary, then Lloyd
        c = _lloyd_sorted(v, _polish(v, _lloyd_sorted(v, c, iters, wt), 2 * -(-n // bins) + 1, wt), iters, wt)
    return c.to(x.dtype)


def kmeans_1d_costs(x: Tensor, k: int, weight: Optional[Tensor] = None, bins: Optional[int] = None) -> Tensor:
    """The (weighted) SSE of every row of x (G × N) clustered into 1, 2, ..., k values, G × k, from one DP run (the
    bins of kmeans_1d_grouped: exact for rows of at most max(1024, 4k) values, else the best clustering whose
    boundaries lie on bin edges, an upper bound; ``bins``: another bin count). For estimates at many bit widths
    (torchdkm.planner)."""
    v, order = x.double().sort(1)
    g, n = v.shape
    if weight is None:
        wt, mean = None, v.new_ones(g)
    else:
        wt = weight.double().gather(1, order)
        mean = wt.mean(1).clamp_min(1e-300)
        wt = (wt / mean[:, None]).clamp_min(_W_FLOOR)
    nbins = bins
    bins = min(n, max(_MIN_BINS, _BINS_PER_CENTROID * k) if nbins is None else max(nbins, k))
    chunk = max(1, _OPT_CELLS // (k * (bins + 1)))
    if g > chunk:
        parts = weight.split(chunk) if weight is not None else [None] * len(x.split(chunk))
        return torch.cat([kmeans_1d_costs(a, k, b, nbins) for a, b in zip(x.split(chunk), parts)])
    prof: list = []
    _dp_grouped(v, _bin_bounds(v, bins), k, wt, prof)
    out = torch.stack(prof, 1)
    if out.shape[1] < k:  # fewer bins than k: more centroids cost nothing more
        out = torch.cat([out, out[:, -1:].expand(g, k - out.shape[1])], 1)
    return out * mean[:, None]


def _lloyd_sorted(v: Tensor, c: Tensor, iters: int, wt: Optional[Tensor] = None) -> Tensor:
    """Lloyd on sorted rows v (G × N) from sorted centroids c (G × k): a cluster is the run between the midpoints of
    adjacent centroids, its mean a difference of prefix sums (``wt``: G × N weights, weighted means)."""
    g, n = v.shape
    cs = _cumsum0(v if wt is None else wt * v)
    cw = None if wt is None else _cumsum0(wt)
    for _ in range(iters):
        bounds = torch.searchsorted(v, (c[:, 1:] + c[:, :-1]) / 2)
        lo = torch.cat([bounds.new_zeros(g, 1), bounds], 1)
        hi = torch.cat([bounds, bounds.new_full((g, 1), n)], 1)
        if cw is None:
            cnt = (hi - lo).to(v.dtype)
            new = torch.where(cnt > 0, (cs.gather(1, hi) - cs.gather(1, lo)) / cnt.clamp_min(1), c).sort(1).values
        else:
            cnt = cw.gather(1, hi) - cw.gather(1, lo)
            new = torch.where(hi > lo, (cs.gather(1, hi) - cs.gather(1, lo)) / cnt.clamp_min(_W_FLOOR), c).sort(1).values
        if torch.equal(new, c):
            break
        c = new
    return c


def _polish(v: Tensor, c: Tensor, width: int, wt: Optional[Tensor] = None) -> Tensor:
    """Centroids (G × k) of the least-SSE k segments of the sorted rows v (G × N) whose boundaries each lie within
    ``width`` values of those of c (sorted G × k: a cluster is the run between midpoints of adjacent centroids).
    Exact DP over the band, O(k · (2·width + 1)²) per row; never worse than c's own clustering (in the band).
    ``wt`` (G × N): weighted SSE and means."""
    g, n = v.shape
    k = c.shape[1]
    if k == 1:
        return c
    offsets = torch.arange(-width, width + 1, device=v.device)
    cand = (torch.searchsorted(v, (c[:, 1:] + c[:, :-1]) / 2)[:, :, None] + offsets).clamp(0, n)  # G × (k-1) × W
    cw, cs, cq = _cost_sums(v, wt)

    def sse(a: Tensor, b: Tensor) -> Tensor:  # a, b: G × ... boundary positions, a <= b; SSE of v[a:b]
        shape = torch.broadcast_shapes(a.shape, b.shape)
        a, b = a.expand(shape).reshape(g, -1), b.expand(shape).reshape(g, -1)
        s = cs.gather(1, b) - cs.gather(1, a)
        cnt = (b - a).clamp_min(1) if cw is None else (cw.gather(1, b) - cw.gather(1, a)).clamp_min(_W_FLOOR)
        out = (cq.gather(1, b) - cq.gather(1, a)) - s * s / cnt
        return out.clamp_min(0).view(shape)

    f = sse(torch.zeros_like(cand[:, 0]), cand[:, 0])  # G × W: first segment ends at each candidate
    back = []
    for j in range(1, k - 1):
        q, p = cand[:, j - 1, :, None], cand[:, j, None, :]  # G × W × 1, G × 1 × W
        total = torch.where(q <= p, f[:, :, None] + sse(q, p), float("inf"))
        f, arg = total.min(1)
        back.append(arg)
    last = cand[:, -1]
    f = f + sse(last, torch.full_like(last, n))
    pick = f.argmin(1)
    cuts = [torch.full((g,), n, dtype=torch.long, device=v.device), last.gather(1, pick[:, None])[:, 0]]
    for j in range(k - 2, 0, -1):
        pick = back[j - 1].gather(1, pick[:, None])[:, 0]
        cuts.append(cand[:, j - 1].gather(1, pick[:, None])[:, 0])
    cuts.append(torch.zeros_like(cuts[0]))
    cuts = torch.stack(cuts[::-1], 1)  # G × (k + 1) positions
    a, b = cuts[:, :-1], cuts[:, 1:]
    raw = _cumsum0(v if wt is None else wt * v)
    cnt = (b - a).clamp_min(1) if cw is None else (cw.gather(1, b) - cw.gather(1, a)).clamp_min(_W_FLOOR)
    means = (raw.gather(1, b) - raw.gather(1, a)) / cnt
    return torch.where(b > a, means, c).sort(1).values


def _bin_bounds(v: Tensor, bins: int) -> Tensor:
    """Boundaries (G × (B + 1), from 0 to N) of the DP's bins of the sorted rows v (G × N): every value its own bin
    when bins >= N, else :func:`_bin_starts` with 2·(bins // 2) bins."""
    g, n = v.shape
    if bins >= n:
        return torch.arange(n + 1, device=v.device).expand(g, -1)
    return torch.cat([_bin_starts(v, bins // 2), v.new_full((g, 1), n, dtype=torch.long)], 1)


def _cumsum0(t: Tensor) -> Tensor:
    """Prefix sums of each row of t (G × N) with a leading 0: G × (N + 1)."""
    return torch.cat([t.new_zeros(t.shape[0], 1), t.cumsum(1)], 1)


def _cost_sums(v: Tensor, wt: Optional[Tensor]):
    """(Σw or None for counts, Σw·x, Σw·x²) prefix sums (G × (N + 1)) of the centred rows x = v − mean (centred: the
    sums of squares lose less to cancellation); the SSE of a run a..b-1 is Δq − Δs² / Δn."""
    vc = v - v.mean(1, keepdim=True)
    wvc = vc if wt is None else wt * vc
    return None if wt is None else _cumsum0(wt), _cumsum0(wvc), _cumsum0(wvc * vc)


def _bin_starts(v: Tensor, half: int) -> Tensor:
    """Sorted start indices (G × 2·half, repeats allowed) of value bins of the sorted rows v (G × N), each at the first
    occurrence of its value: ``half`` spread over the distinct values by rank, ``half`` at equal widths of the range."""
    g, n = v.shape
    first = torch.ones_like(v, dtype=torch.bool)
    first[:, 1:] = v[:, 1:] != v[:, :-1]
    rank = first.cumsum(1)  # distinct values up to each position
    target = torch.arange(half, device=v.device)[None] * rank[:, -1:] // half + 1
    by_rank = torch.searchsorted(rank, target.contiguous())
    frac = torch.linspace(0, 1, half + 1, dtype=torch.float64, device=v.device)[1:]
    by_width = torch.searchsorted(v, (v[:, :1] + (v[:, -1:] - v[:, :1]) * frac).contiguous())
    return torch.cat([by_rank, by_width], 1).clamp(0, n - 1).sort(1).values


@functools.lru_cache(maxsize=16)
def _dc_schedule(n: int, device=None):
    """Divide-and-conquer order over split positions 1..n: per level, (positions, index of the nearest decided
    position to the left or -1, to the right or -1). A position's optimal split lies between theirs."""
    levels, todo = [], [(1, n, -1, -1)]
    while todo:
        level, todo_next = [], []
        for lo, hi, left, right in todo:
            mid = (lo + hi) // 2
            level.append((mid, left, right))
            if lo < mid:
                todo_next.append((lo, mid - 1, left, mid))
            if mid < hi:
                todo_next.append((mid + 1, hi, mid, right))
        levels.append(tuple(torch.tensor(col, device=device) for col in zip(*level)))
        todo = todo_next
    return levels


def _dp_grouped(v: Tensor, bounds: Tensor, k: int, wt: Optional[Tensor] = None,
                profile: Optional[list] = None) -> Tensor:
    """Exact DP over contiguous bins of each sorted row (bin b = values bounds[b]..bounds[b+1]-1; B = bins): the k
    segments of least SSE, as G × k segment means (fewer bins than k: the B means, repeated). Each layer j is
    f_j(i) = min_m f_{j-1}(m) + SSE(bins m..i-1), whose leftmost best m is non-decreasing in i (1-D k-means costs are
    Monge), so divide and conquer evaluates O(B log B) candidates per layer, batched over rows and positions.
    ``wt`` (G × N weights > 0): counts, sums and sums of squares become Σw, Σw·v, Σw·v² (weighted SSE, still Monge).
    ``profile`` (a list): receives the least SSE of every row with 1, 2, ..., min(k, B) segments (G-vectors)."""
    g, nb = bounds.shape[0], bounds.shape[1] - 1
    m_seg = min(k, nb)
    cw, cs, cq = _cost_sums(v, wt)
    p_n = bounds.to(v.dtype) if cw is None else cw.gather(1, bounds)
    floor = 1 if wt is None else _W_FLOOR
    p_s, p_q = cs.gather(1, bounds), cq.gather(1, bounds)
    width = nb + 1  # flat index of (row r, bin boundary b): r · width + b
    flat_n, flat_s, flat_q = p_n.reshape(-1), p_s.reshape(-1), p_q.reshape(-1)

    def sse(ia, ib):  # SSE of the bins between flat boundaries ia < ib; an empty run of bins costs 0
        cnt = flat_n.take(ib) - flat_n.take(ia)
        s = flat_s.take(ib) - flat_s.take(ia)
        return ((flat_q.take(ib) - flat_q.take(ia)) - s * s / cnt.clamp_min(floor)).clamp_min(0)

    row_base = torch.arange(g, device=v.device)[:, None] * width
    f = sse(row_base.expand(g, width).reshape(-1), (row_base + torch.arange(width, device=v.device)).reshape(-1))
    f = f.view(g, width)
    f[:, 0] = float("inf")
    if profile is not None:
        profile.append(f[:, nb].clone())
    opts = []
    for _ in range(1, m_seg):
        new = torch.full_like(f, float("inf"))
        opt = torch.zeros(g, width, dtype=torch.long, device=v.device)
        for pos, left, right in _dc_schedule(nb, v.device):
            q = pos.numel()
            lo = torch.where(left >= 0, opt.index_select(1, left.clamp_min(0)), 0)
            hi = torch.where(right >= 0, opt.index_select(1, right.clamp_min(0)), pos - 1).minimum(pos - 1)
            lens = (hi - lo + 1).reshape(-1)
            seg = torch.repeat_interleave(torch.arange(g * q, device=v.device), lens)
            start = (row_base + lo).reshape(-1) - (lens.cumsum(0) - lens)  # flat m = start[seg] + position in seg
            im = start.index_select(0, seg) + torch.arange(seg.numel(), device=v.device)
            val = f.reshape(-1).take(im) + sse(im, (row_base + pos).reshape(-1).index_select(0, seg))
            best = val.new_full((g * q,), float("inf")).scatter_reduce(0, seg, val, "amin")
            at_best = torch.where(val <= best.index_select(0, seg), im, g * width)
            first = at_best.new_full((g * q,), g * width).scatter_reduce(0, seg, at_best, "amin")  # leftmost best
            new.index_copy_(1, pos, best.view(g, q))
            opt.index_copy_(1, pos, (first.view(g, q) - row_base))
        f = new
        opts.append(opt.to(torch.int32))
        if profile is not None:
            profile.append(f[:, nb].clone())
    cuts = [torch.full((g,), nb, dtype=torch.long, device=v.device)]
    for opt in reversed(opts):
        cuts.append(opt.gather(1, cuts[-1][:, None])[:, 0].long())
    cuts.append(torch.zeros_like(cuts[0]))
    cuts = torch.stack(cuts[::-1], 1)  # G × (m_seg + 1) bin indices
    a, b = cuts[:, :-1], cuts[:, 1:]
    cnt = p_n.gather(1, b) - p_n.gather(1, a)
    p_raw = _cumsum0(v if wt is None else wt * v).gather(1, bounds)
    means = (p_raw.gather(1, b) - p_raw.gather(1, a)) / cnt.clamp_min(floor)
    means = torch.where(cnt > 0, means, v.gather(1, bounds.gather(1, a).clamp(max=v.shape[1] - 1)))
    if m_seg < k:  # fewer bins than centroids: repeat, the duplicates just share attention
        means = means[:, torch.arange(k, device=v.device) % m_seg]
    return means.sort(1).values


def kmeans_nd_grouped(w: Tensor, k: int, *, seed: int = 0, iters: int = 50,
                      weight: Optional[Tensor] = None) -> Tensor:
    """k-means++ seeding per group (batched sampling), then Lloyd on all vectors. w: G × N × d -> G × k × d.
    ``weight`` (G × N, > 0): seeding ∝ weight × distance², weighted means."""
    g, n, d = w.shape
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(g, device=w.device)
    first = torch.randint(n, (g,), generator=gen).to(w.device)
    weight = None if weight is None else weight.to(w.dtype)
    centers = [w[rows, first]]
    d2 = ((w - centers[0][:, None]) ** 2).sum(2)
    for _ in range(1, k):
        # a group whose vectors all sit on a centre samples uniformly (the repeat just shares attention)
        wd2 = d2 if weight is None else weight * d2
        probs = torch.where(wd2.sum(1, keepdim=True) > 0, wd2, torch.ones_like(d2)).double().cpu()
        i = torch.multinomial(probs, 1, generator=gen)[:, 0].to(w.device)
        centers.append(w[rows, i])
        d2 = torch.minimum(d2, ((w - centers[-1][:, None]) ** 2).sum(2))
    c = torch.stack(centers, 1)
    for _ in range(iters):
        idx = nearest_centroid(w, c)
        ones = torch.ones_like(w[..., 0]) if weight is None else weight
        mass = torch.zeros(g, k, dtype=w.dtype, device=w.device).scatter_add_(1, idx, ones)
        moment = torch.zeros_like(c).scatter_add_(1, idx[..., None].expand(-1, -1, d),
                                                  w if weight is None else w * weight[..., None])
        new = torch.where(mass[..., None] > 0, moment / mass.clamp_min(1 if weight is None else _W_FLOOR)[..., None],
                          c)
        if torch.equal(new, c):
            break
        c = new
    return c
