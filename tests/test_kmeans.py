import itertools

import torch

from torchdkm import kmeans_init, nearest_centroid
from torchdkm.kmeans import kmeans_1d


def _sse(x, c):
    idx = nearest_centroid(x, c)
    return float(((x - c[idx]) ** 2).sum())


def _brute_force_1d(v, k):
    """Optimal 1-D k-means by trying every split of the sorted values (tiny inputs only)."""
    v = sorted(v)
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(v)), k - 1):
        parts = [v[a:b] for a, b in zip((0,) + cuts, cuts + (len(v),))]
        best = min(best, sum(sum((x - sum(p) / len(p)) ** 2 for x in p) for p in parts))
    return best


def test_1d_is_optimal_on_small_inputs():
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        x = torch.randn(11, generator=g, dtype=torch.float64) * (1 + trial)
        c = kmeans_1d(x, 3)
        assert _sse(x[:, None], c[:, None]) <= _brute_force_1d(x.tolist(), 3) * (1 + 1e-9) + 1e-12


def test_1d_beats_or_matches_quantile_start_on_heavy_tails():
    g = torch.Generator().manual_seed(1)
    x = torch.distributions.StudentT(3.0).sample((50000,)) * 0.02
    c = kmeans_init(x[:, None], 16)
    assert c.shape == (16, 1) and torch.all(c[1:] >= c[:-1])
    q = torch.quantile(x, torch.linspace(0.03, 0.97, 16))[:, None]
    assert _sse(x[:, None], c) < _sse(x[:, None], q)


def test_fewer_distinct_values_than_k():
    x = torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0])[:, None]
    c = kmeans_init(x, 8)
    assert set(c[:, 0].tolist()) == {1.0, 2.0, 3.0}
    c2 = kmeans_init(torch.tensor([[1.0, 2.0], [1.0, 2.0]]), 4)
    assert torch.isfinite(c2).all() and c2.shape == (4, 2)


def test_nd_deterministic_under_seed_and_better_than_random_pick():
    g = torch.Generator().manual_seed(2)
    centers = torch.randn(8, 3, generator=g) * 5
    x = centers[torch.randint(8, (4000,), generator=g)] + 0.1 * torch.randn(4000, 3, generator=g)
    a, b = kmeans_init(x, 8, seed=3), kmeans_init(x, 8, seed=3)
    assert torch.equal(a, b)
    assert _sse(x, a) < 4000 * 3 * 0.01 * 1.5  # recovered the 8 blobs (noise variance 0.01 per coordinate)
