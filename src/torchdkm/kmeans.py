"""k-means initialisation of the centroids (the warm start of the first DKM step).

d = 1: optimal 1-D k-means by dynamic programming over a weighted grouping of the sorted values
(≤ 2048 contiguous groups: quantile groups plus equal-width groups, so tails keep their resolution),
then exact 1-D Lloyd on all values, which on sorted data costs O(k log N) per iteration (prefix sums).
d > 1: k-means++ seeding on a seeded subsample, then Lloyd on all vectors.
Grouped (G tables at once, G × N × d): the same methods batched over groups, with a coarser DP grid for d = 1
(128 groups of values per table) since it runs for every group; Lloyd then refines on all values.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .functional import compute_dtype, nearest_centroid

_MAX_GROUPS = 2048
_PP_SAMPLE = 20000


def kmeans_init(w: Tensor, k: int, *, seed: int = 0, iters: int = 50) -> Tensor:
    """Centroids (k × d, float32 or float64 like w's compute dtype) for vectors w (N × d); grouped, G × k × d
    for w: G × N × d (each group's own k-means).

    Example: w (589824 × 1), k=16 -> 16 × 1 centroids, sorted for d = 1. Deterministic under ``seed``.
    """
    w = w.detach()
    w = w.to(compute_dtype(w))
    if w.dim() == 3:
        if w.shape[0] == 1:
            return kmeans_init(w[0], k, seed=seed, iters=iters)[None]
        if w.shape[2] == 1:
            return torch.cat([kmeans_1d_grouped(part[..., 0], k, iters=iters)[..., None]
                              for part in w.split(_DP_CHUNK)])
        return kmeans_nd_grouped(w, k, seed=seed, iters=iters)
    if w.shape[1] == 1:
        return kmeans_1d(w[:, 0], k, iters=iters)[:, None]
    return kmeans_nd(w, k, seed=seed, iters=iters)


def kmeans_1d(x: Tensor, k: int, iters: int = 50) -> Tensor:
    """Optimal-by-DP then Lloyd-refined 1-D k-means; sorted centroids, length k."""
    v = x.sort().values.double()
    n = v.numel()
    starts = _group_starts(v, min(_MAX_GROUPS, max(1024, 4 * k)))
    c = _dp_centroids(v, starts, k)
    # Lloyd on sorted data: each cluster is a contiguous run between midpoints of adjacent centroids.
    cs = torch.cat([v.new_zeros(1), v.cumsum(0)])
    for _ in range(iters):
        edges = torch.searchsorted(v, (c[1:] + c[:-1]) / 2)
        lo = torch.cat([edges.new_zeros(1), edges])
        hi = torch.cat([edges, edges.new_full((1,), n)])
        cnt = (hi - lo).to(v.dtype)
        new = torch.where(cnt > 0, (cs[hi] - cs[lo]) / cnt.clamp_min(1), c)
        if torch.equal(new, c):
            break
        c = new.sort().values
    return c.to(x.dtype)


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


def _dp_centroids(v: Tensor, starts: Tensor, k: int) -> Tensor:
    """Exact DP for k contiguous segments over the groups; returns the k segment means (padded by
    repetition when there are fewer groups than k)."""
    n = v.numel()
    bounds = torch.cat([starts, starts.new_full((1,), n)])
    cs = torch.cat([v.new_zeros(1), v.cumsum(0)])
    cq = torch.cat([v.new_zeros(1), (v * v).cumsum(0)])
    p_n = bounds.to(v.dtype)
    p_s, p_q = cs[bounds], cq[bounds]
    g = starts.numel()
    m = min(k, g)
    # cost[a, b] = SSE of groups a..b-1 as one segment (a < b); prefix sums over group boundaries.
    cnt = p_n[None, :] - p_n[:, None]
    ssum = p_s[None, :] - p_s[:, None]
    cost = (p_q[None, :] - p_q[:, None]) - ssum * ssum / cnt.clamp_min(1)
    cost = torch.where(cnt > 0, cost.clamp_min(0), torch.full_like(cost, float("inf")))
    f = cost[0]  # f[b]: best cost of groups 0..b-1 in j segments
    back = []
    for _ in range(1, m):
        total = f[:, None] + cost
        f, arg = total.min(0)
        back.append(arg)
    # Backtrack from the end (b = g) to recover the segment boundaries.
    cuts = [g]
    for arg in reversed(back):
        cuts.append(int(arg[cuts[-1]]))
    cuts.append(0)
    cuts = cuts[::-1]
    means = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        lo, hi = int(bounds[a]), int(bounds[b])
        means.append(float((cs[hi] - cs[lo]) / (hi - lo)))
    c = torch.tensor(means, dtype=v.dtype)
    if m < k:  # fewer distinct groups than centroids: repeat, the duplicates just share attention
        c = c[torch.arange(k) % m]
    return c.sort().values


def kmeans_nd(w: Tensor, k: int, *, seed: int = 0, iters: int = 50) -> Tensor:
    """k-means++ on a seeded subsample of ≤ 20000 vectors, then Lloyd on all of w. k × d."""
    n = w.shape[0]
    gen = torch.Generator().manual_seed(seed)
    sample = w if n <= _PP_SAMPLE else w[torch.randperm(n, generator=gen)[:_PP_SAMPLE].to(w.device)]
    c = _kmeanspp(sample, k, gen)
    for _ in range(iters):
        idx = nearest_centroid(w, c)
        mass = torch.bincount(idx, minlength=k).to(w.dtype)
        moment = torch.zeros_like(c).index_add_(0, idx, w)
        new = torch.where(mass[:, None] > 0, moment / mass.clamp_min(1)[:, None], c)
        if torch.equal(new, c):
            break
        c = new
    return c


def _kmeanspp(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct vectors than k: repeat an existing centre
            centers.append(centers[-1])
            continue
        probs = (d2 / total).double().cpu()
        i = int(torch.multinomial(probs, 1, generator=gen))
        centers.append(x[i])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    return torch.stack(centers)


# ----------------------------------------------------------------------------------------------------
# grouped (batched over G tables)

_GROUP_BINS = 128
_DP_CHUNK = 256  # groups per DP batch: 256 × 129² float64 = 34 MB


def kmeans_1d_grouped(x: Tensor, k: int, iters: int = 50) -> Tensor:
    """1-D k-means of every row of x (G × N) at once: DP over 128 value bins per row (64 quantile, 64 equal-width,
    so tails keep their resolution), then Lloyd on all values. G × k, sorted per row."""
    v = x.sort(1).values.double()
    g, n = v.shape
    half = _GROUP_BINS // 2
    q = torch.linspace(0, n, half + 1, dtype=torch.float64, device=v.device)[:-1].long().expand(g, -1)
    frac = torch.linspace(0, 1, half + 1, dtype=torch.float64, device=v.device)[1:-1]
    edges = v[:, :1] + (v[:, -1:] - v[:, :1]) * frac
    starts = torch.cat([q, torch.searchsorted(v, edges)], 1).clamp(0, n - 1).sort(1).values
    cs = torch.cat([v.new_zeros(g, 1), v.cumsum(1)], 1)
    c = _dp_grouped(v, cs, starts, k)
    for _ in range(iters):  # Lloyd on sorted rows: a cluster is the run between midpoints of adjacent centroids
        bounds = torch.searchsorted(v, (c[:, 1:] + c[:, :-1]) / 2)
        lo = torch.cat([bounds.new_zeros(g, 1), bounds], 1)
        hi = torch.cat([bounds, bounds.new_full((g, 1), n)], 1)
        cnt = (hi - lo).to(v.dtype)
        new = torch.where(cnt > 0, (cs.gather(1, hi) - cs.gather(1, lo)) / cnt.clamp_min(1), c).sort(1).values
        if torch.equal(new, c):
            break
        c = new
    return c.to(x.dtype)


def _dp_grouped(v: Tensor, cs: Tensor, starts: Tensor, k: int) -> Tensor:
    """Batched exact DP: k contiguous segments over each row's bins (bin b = values starts[b]..starts[b+1]-1) with
    the least SSE; returns each segment's mean (a segment with no values: the value at its start). G × k."""
    g, n = v.shape
    bounds = torch.cat([starts, starts.new_full((g, 1), n)], 1)  # G × (B+1)
    cq = torch.cat([v.new_zeros(g, 1), (v * v).cumsum(1)], 1)
    p_n, p_s, p_q = bounds.to(v.dtype), cs.gather(1, bounds), cq.gather(1, bounds)
    cnt = p_n[:, None, :] - p_n[:, :, None]  # [a, b]: values in bins a..b-1
    ssum = p_s[:, None, :] - p_s[:, :, None]
    cost = ((p_q[:, None, :] - p_q[:, :, None]) - ssum * ssum / cnt.clamp_min(1)).clamp_min(0)
    upper = torch.ones_like(cost[0], dtype=torch.bool).triu(1)  # a < b; an empty segment costs 0 (a duplicate)
    cost = torch.where(upper, cost, float("inf"))
    f, back = cost[:, 0], []
    for _ in range(1, k):
        f, arg = (f[:, :, None] + cost).min(1)
        back.append(arg)
    nb = bounds.shape[1] - 1
    cuts = [torch.full((g,), nb, dtype=torch.long, device=v.device)]
    for arg in reversed(back):
        cuts.append(arg.gather(1, cuts[-1][:, None])[:, 0])
    cuts.append(torch.zeros_like(cuts[0]))
    cuts = torch.stack(cuts[::-1], 1)  # G × (k+1) bin indices
    lo, hi = bounds.gather(1, cuts[:, :-1]), bounds.gather(1, cuts[:, 1:])
    cnt = (hi - lo).to(v.dtype)
    means = torch.where(cnt > 0, (cs.gather(1, hi) - cs.gather(1, lo)) / cnt.clamp_min(1),
                        v.gather(1, lo.clamp(max=n - 1)))
    return means.sort(1).values


def kmeans_nd_grouped(w: Tensor, k: int, *, seed: int = 0, iters: int = 50) -> Tensor:
    """k-means++ seeding per group (batched sampling), then Lloyd on all vectors. w: G × N × d -> G × k × d."""
    g, n, d = w.shape
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(g, device=w.device)
    first = torch.randint(n, (g,), generator=gen).to(w.device)
    centers = [w[rows, first]]
    d2 = ((w - centers[0][:, None]) ** 2).sum(2)
    for _ in range(1, k):
        # a group whose vectors all sit on a centre samples uniformly (the repeat just shares attention)
        probs = torch.where(d2.sum(1, keepdim=True) > 0, d2, torch.ones_like(d2)).double().cpu()
        i = torch.multinomial(probs, 1, generator=gen)[:, 0].to(w.device)
        centers.append(w[rows, i])
        d2 = torch.minimum(d2, ((w - centers[-1][:, None]) ** 2).sum(2))
    c = torch.stack(centers, 1)
    for _ in range(iters):
        idx = nearest_centroid(w, c)
        mass = torch.zeros(g, k, dtype=w.dtype, device=w.device).scatter_add_(1, idx, torch.ones_like(w[..., 0]))
        moment = torch.zeros_like(c).scatter_add_(1, idx[..., None].expand(-1, -1, d), w)
        new = torch.where(mass[..., None] > 0, moment / mass.clamp_min(1)[..., None], c)
        if torch.equal(new, c):
            break
        c = new
    return c
