"""GPTQ's error feedback on LUTs (torchdkm.compensate, palettize(compensate=True))."""
import copy

import pytest
import torch
from torch import nn

import torchdkm
from torchdkm import DKMConfig
from torchdkm.compensate import compensated_indices, input_hessians
from torchdkm.errors import ConfigError


def _problem(out=24, inn=40, k=8, seed=0):
    """w (out × in), per-row tables (out × k, sorted differently per row), and X with correlated columns."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(500, inn, generator=g, dtype=torch.float64) @ torch.randn(inn, inn, generator=g,
                                                                                dtype=torch.float64)
    w = torch.randn(out, inn, generator=g, dtype=torch.float64)
    table = torch.randn(out, k, generator=g, dtype=torch.float64) * 1.5
    return w, table, x


def _obs_reference(w, table, h):
    """GPTQ written out step by step: snap column i to the row's nearest entry, then move the columns after it by
    the optimal brain surgeon update with the inverse of H restricted to the columns not yet snapped."""
    w, idx = w.clone(), torch.empty(w.shape, dtype=torch.long)
    for i in range(w.shape[1]):
        hinv = torch.linalg.inv(h[i:, i:])
        j = (w[:, i:i + 1] - table).abs().argmin(1)
        idx[:, i] = j
        d = (w[:, i] - table.gather(1, j[:, None])[:, 0]) / hinv[0, 0]
        w[:, i:] -= d[:, None] * hinv[0][None, :]
    return idx


@pytest.mark.parametrize("block", [1, 7, 128])
def test_indices_match_the_step_by_step_reference(block):
    w, table, x = _problem()
    h = x.T @ x
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    assert torch.equal(compensated_indices(w, table, h, damp=0.01, block=block), _obs_reference(w, table, damped))


def test_uncorrelated_inputs_give_the_nearest_entry():
    w, table, _ = _problem(seed=1)
    h = torch.diag(torch.rand(w.shape[1], dtype=torch.float64) + 0.1)
    h[3, 3] = 0  # an input that never fires
    nearest = (w[:, :, None] - table[:, None, :]).abs().argmin(-1)
    assert torch.equal(compensated_indices(w, table, h), nearest)


def test_output_error_is_lower_than_nearest():
    w, table, x = _problem(seed=2)
    nearest = (w[:, :, None] - table[:, None, :]).abs().argmin(-1)
    err = lambda idx: float((x @ (w - table.gather(1, idx)).T).square().sum())  # noqa: E731
    assert err(compensated_indices(w, table, x.T @ x)) < 0.8 * err(nearest)


def test_input_hessians_sum_every_input_row():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    batches = [torch.randn(4, 2, 6), torch.randn(3, 2, 6)]
    hs = input_hessians(net, {"0": net[0], "2": net[2]}, (net(b) for b in batches))
    x0 = torch.cat([b.reshape(-1, 6) for b in batches]).double()
    x2 = torch.relu(net[0](torch.cat([b.reshape(-1, 6) for b in batches]))).double()
    torch.testing.assert_close(hs["0"], x0.T @ x0)
    torch.testing.assert_close(hs["2"], x2.T @ x2)
    assert not net[0]._forward_pre_hooks  # the hooks are gone


def _digits_mlp():
    pytest.importorskip("sklearn")
    from test_quality import _digits, _train

    torch.manual_seed(0)
    xtr, ytr, xte, _ = _digits()
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    _train(net, xtr, ytr, epochs=30, lr=1e-3)
    return net, xtr, xte


@pytest.mark.parametrize("bits", [2, 3])
def test_compensated_palettize_keeps_the_luts_and_moves_held_out_logits_less_on_digits(tmp_path, bits):
    """Same Fisher-weighted LUTs, indices chosen on the training images: the held-out logits move less (measured
    0.42× the nearest centroid's squared error at 2 bits, 0.13× at 3)."""
    net, xtr, xte = _digits_mlp()
    cfg = DKMConfig(bits=bits, min_numel=0, group_size=16, channel_scale=True)
    rules = {"4": cfg.replace(group_size=None)}  # 10 outputs: no group of 16
    calib = list(xtr.split(256))
    near = torchdkm.palettize(copy.deepcopy(net), cfg, rules, calibration=calib)
    comp = torchdkm.palettize(copy.deepcopy(net), cfg, rules, calibration=calib, compensate=True)
    for i in (0, 2, 4):
        torch.testing.assert_close(comp[i]._torchdkm.lut, near[i]._torchdkm.lut, rtol=0, atol=0)
        assert not torch.equal(comp[i].weight, near[i].weight)
    with torch.no_grad():
        ref = net(xte)
        assert (comp(xte) - ref).square().mean() < 0.6 * (near(xte) - ref).square().mean()
    path = tmp_path / "c.safetensors"
    torchdkm.save(comp, path)
    back = torchdkm.load(path, copy.deepcopy(net))
    torch.testing.assert_close(back(xte), comp(xte), rtol=0, atol=0)


def test_tied_and_non_linear_layers_take_the_nearest_centroid_and_calibration_is_required():
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mid, self.head = nn.Embedding(32, 16), nn.Linear(16, 16), nn.Linear(16, 32, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.mid(self.emb(ids))))

    net, ids = Tied(), torch.randint(0, 32, (8, 12))
    cfg = DKMConfig(bits=2, min_numel=0)
    near = torchdkm.palettize(copy.deepcopy(net), cfg, calibration=[ids])
    comp = torchdkm.palettize(copy.deepcopy(net), cfg, calibration=[ids], compensate=True)
    torch.testing.assert_close(comp.emb.weight, near.emb.weight, rtol=0, atol=0)
    assert comp.head.weight is comp.emb.weight
    assert not torch.equal(comp.mid.weight, near.mid.weight)
    with pytest.raises(ConfigError, match="compensate=True. needs calibration"):
        torchdkm.palettize(copy.deepcopy(net), cfg, compensate=True)
