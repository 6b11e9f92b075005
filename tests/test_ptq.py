"""Weighted k-means and post-training palettization."""
import copy
import itertools

import pytest
import torch
from torch import nn

import torchdkm
from torchdkm import DKMConfig
from torchdkm.errors import ConfigError
from torchdkm.kmeans import kmeans_init
from torchdkm.ptq import palettize, weighted_error
from torchdkm.sensitivity import fisher_diagonal


@pytest.mark.parametrize("shape", [(3000, 1), (4, 500, 1), (4, 3000, 1), (2000, 2), (3, 700, 4), (30000, 2)])
def test_equal_weights_equal_plain_kmeans(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kmeans_init(w, 8, seed=1), kmeans_init(w, 8, seed=1, weight=torch.full(shape[:-1], 3.0)))


@pytest.mark.parametrize("shape", [(2000, 1), (3, 2000, 1), (3, 5000, 1), (600, 2), (2, 600, 2)])
def test_one_dominant_weight_gets_a_centroid(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    wt = torch.ones(shape[:-1])
    wt[..., 5] = 1e7
    c = kmeans_init(w, 4, weight=wt)
    c = c if c.dim() == 3 else c[None]
    target = w[..., 5, :] if w.dim() == 3 else w[5][None]
    gap = (c - target[:, None, :]).norm(dim=-1).amin(1)
    assert float(gap.max()) < 1e-4


def _segment_cost(v, wt, cuts):
    total = 0.0
    for a, b in zip(cuts[:-1], cuts[1:]):
        m = (wt[a:b] * v[a:b]).sum() / wt[a:b].sum()
        total += float((wt[a:b] * (v[a:b] - m) ** 2).sum())
    return total


def test_weighted_1d_is_the_exact_optimum():
    gen = torch.Generator().manual_seed(3)
    for trial in range(5):
        v = torch.randn(10, generator=gen, dtype=torch.float64).sort().values
        wt = torch.rand(10, generator=gen, dtype=torch.float64) * 5 + 0.01
        k = 3
        best = min(_segment_cost(v, wt, (0, a, b, 10)) for a, b in itertools.combinations(range(1, 10), 2))
        c = kmeans_init(v[:, None], k, weight=wt)[:, 0]
        got = float((wt * (v[:, None] - c[None]).pow(2).min(1).values).sum())
        assert got <= best * (1 + 1e-9) + 1e-12
        cg = kmeans_init(torch.stack([v, v.flip(0)])[..., None], k, weight=torch.stack([wt, wt.flip(0)]))
        assert torch.allclose(cg[0], cg[1])


def test_weight_shape_is_checked():
    with pytest.raises(ValueError, match="one weight per vector"):
        kmeans_init(torch.randn(100, 2), 4, weight=torch.ones(200))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


@pytest.mark.parametrize("cfg", [DKMConfig(bits=2, min_numel=0),
                                 DKMConfig(bits=3, min_numel=0, group_size=16, channel_scale=True),
                                 DKMConfig(bits=4, dim=2, min_numel=0, vector_axis="output")])
def test_weighted_palettization_has_lower_fisher_error_and_round_trips(tmp_path, cfg):
    net, x = _net(), torch.randn(12, 3, 8, 8)
    sens = fisher_diagonal(net, [x])
    rules = {"6": cfg.replace(group_size=None)} if cfg.group_size else None  # 10 outputs: no group of 16
    plain, weighted = (palettize(copy.deepcopy(net), cfg, rules),
                       palettize(copy.deepcopy(net), cfg, rules, sensitivity=sens))
    ref = dict(net.named_modules())
    e_plain = sum(weighted_error(ref[n].weight, dict(plain.named_modules())[n].weight, f) for n, f in sens.fisher.items())
    e_weighted = sum(weighted_error(ref[n].weight, dict(weighted.named_modules())[n].weight, f)
                     for n, f in sens.fisher.items())
    if cfg.dim == 1:  # the weighted 1-D k-means is exact on layers this small, so it cannot lose
        assert e_weighted <= e_plain * (1 + 1e-6)
    else:
        assert e_weighted < e_plain * 1.05
    assert all(getattr(m, "_torchdkm", None) is not None for m in (weighted[0], weighted[2], weighted[6]))
    path = tmp_path / "w.safetensors"
    torchdkm.save(weighted, path)
    back = torchdkm.load(path, _net())
    torch.testing.assert_close(back(x), weighted(x), rtol=0, atol=0)


def test_calibration_runs_the_fisher_and_errors():
    net, x = _net(), torch.randn(4, 3, 8, 8)
    out = palettize(net, DKMConfig(bits=2, min_numel=0), {"6": None}, calibration=[x])
    assert out[0]._torchdkm.bits == 2 and getattr(out[6], "_torchdkm", None) is None
    with pytest.raises(ConfigError, match="needs calibration"):
        palettize(_net(), DKMConfig(bits=2), weighted=True)
