"""A DKM layer refuses to overwrite its centroids with NaN/inf and names itself (library side of issue 13)."""
import pytest
import torch
from torch import nn

import torchdkm
from torchdkm import DKMConfig, TorchDKMError, prepare
from torchdkm import parametrization as P
from torchdkm.errors import NonFiniteError
from torchdkm.parametrization import dkm_parametrization, original_weight


def _trained_net():
    torch.manual_seed(0)
    net = prepare(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)), DKMConfig(bits=2, min_numel=0))
    net(torch.randn(5, 8)).sum().backward()  # one step: centroids initialised and updated once
    return net


def test_nan_weight_stops_the_update_names_the_layer_and_keeps_centroids():
    net = _trained_net()
    p = dkm_parametrization(net[2])
    before = p.centroids.clone()
    with torch.no_grad():
        original_weight(net[2])[1, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"layer '2': its weight has 1 non-finite value\(s\) of 128"):
        net(torch.randn(5, 8))
    assert torch.equal(p.centroids, before) and torch.isfinite(p.centroids).all()
    assert isinstance(NonFiniteError("x"), TorchDKMError)


def test_non_finite_centroid_update_is_refused(monkeypatch):
    net = _trained_net()
    p = dkm_parametrization(net[0])
    before = p.centroids.clone()
    real = P.dkm_cluster

    def poisoned(*args, **kwargs):  # a finite weight whose update overflows (e.g. |w| near the float max)
        w, c = real(*args, **kwargs)
        return w, torch.full_like(c, float("inf"))

    monkeypatch.setattr(P, "dkm_cluster", poisoned)
    with pytest.raises(NonFiniteError, match=r"layer '0': the DKM centroid update gave 4 non-finite value\(s\)"):
        net(torch.randn(5, 8))
    assert torch.equal(p.centroids, before)


def test_initialisation_of_a_non_finite_weight_is_refused():
    torch.manual_seed(0)
    net = prepare(nn.Sequential(nn.Linear(8, 32)), DKMConfig(bits=2, min_numel=0))
    with torch.no_grad():
        original_weight(net[0])[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"layer '0'.*k-means initialisation is refused"):
        torchdkm.initialize(net)
    assert not bool(dkm_parametrization(net[0]).initialized)
