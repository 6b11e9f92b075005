"""torchdkm.start_from: training continues from a finalized (e.g. GPTQ-compensated) copy of the model."""
import copy

import pytest
import torch
from torch import nn

import torchdkm
from torchdkm import DKMConfig
from torchdkm.errors import ConfigError
from torchdkm.functional import channel_scale, with_slice_max

CFG = DKMConfig(bits=3, min_numel=0, group_size=8, channel_scale=True)


def _net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 16))
    x = torch.randn(256, 24) @ torch.randn(24, 24)  # correlated inputs: GPTQ moves indices
    return net, x


def test_with_slice_max_restores_each_slice_scale():
    w = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(0))
    hard = ((w * 0.7).round() / 2).clamp(-0.5, 0.5)  # within ±0.5 < the slices' max |w|
    out = with_slice_max(hard, w)
    torch.testing.assert_close(channel_scale(out), channel_scale(w), rtol=0, atol=0)
    assert ((out != hard).reshape(6, -1).sum(1) == 1).all()


@pytest.mark.parametrize("compensate", [False, True])
def test_prepared_model_reads_the_finalized_weights(compensate):
    net, x = _net()
    start = torchdkm.palettize(copy.deepcopy(net), CFG, calibration=[x], compensate=compensate)
    model = torchdkm.start_from(torchdkm.prepare(copy.deepcopy(net), CFG), start)
    model.eval()
    for i in (0, 2, 4):
        read = model[i].weight.detach()
        differ = (read != start[i].weight).sum(1)
        if compensate:  # each row's largest original weight reads its nearest centroid, the rest GPTQ's choice
            assert (differ <= 1).all() and differ.sum() < 0.2 * read.shape[0]
        else:
            assert differ.sum() == 0
        torch.testing.assert_close(model[i].parametrizations.weight[0].centroids, start[i]._torchdkm.lut,
                                   rtol=0, atol=0)
    if not compensate:
        with torch.no_grad():
            torch.testing.assert_close(model(x), start(x), rtol=0, atol=0)
        done = torchdkm.finalize(model)
        for i in (0, 2, 4):
            torch.testing.assert_close(done[i].weight, start[i].weight, rtol=0, atol=0)


def test_training_from_the_start_keeps_its_head_start():
    """A few DKM steps from the compensated start stay closer to the float model than the nearest-centroid start."""
    net, x = _net(1)
    with torch.no_grad():
        ref = net(x)
    start = torchdkm.palettize(copy.deepcopy(net), CFG, calibration=[x], compensate=True)
    model = torchdkm.start_from(torchdkm.prepare(copy.deepcopy(net), CFG.replace(hard_forward=True)), start)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for _ in range(3):
        opt.zero_grad()
        loss = (model(x) - ref).square().mean()
        loss.backward()
        opt.step()
        torchdkm.step(model)
    done = torchdkm.finalize(model)
    with torch.no_grad():
        err = (done(x) - ref).square().mean()
        near = (torchdkm.palettize(copy.deepcopy(net), CFG, calibration=[x])(x) - ref).square().mean()
    assert err < near


def test_tied_weights_start_once():
    torch.manual_seed(0)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mid = nn.Embedding(64, 16), nn.Linear(16, 16)
            self.head = nn.Linear(16, 64, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.mid(self.emb(ids))))

    net, ids = LM(), torch.randint(0, 64, (8, 12))
    start = torchdkm.palettize(copy.deepcopy(net), CFG, calibration=[ids], compensate=True)
    model = torchdkm.start_from(torchdkm.prepare(copy.deepcopy(net), CFG), start).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.emb.weight, start.emb.weight, rtol=0, atol=0)
        assert model.head.weight is not None and torch.equal(model.head.weight, start.emb.weight)


def test_bad_starts_are_refused_with_what_differs():
    net, x = _net()
    start = torchdkm.palettize(copy.deepcopy(net), CFG, calibration=[x])
    with pytest.raises(ConfigError, match=r"prepared as \(groups, k, dim, scaled, axis\) = \(6, 16"):
        torchdkm.start_from(torchdkm.prepare(copy.deepcopy(net), CFG.replace(bits=4)), start)
    with pytest.raises(ConfigError, match="not a finalized torchdkm layer"):
        torchdkm.start_from(torchdkm.prepare(copy.deepcopy(net), CFG), copy.deepcopy(net))
    other, _ = _net(seed=5)
    with pytest.raises(ConfigError, match="finalized scales are not this model's weights"):
        torchdkm.start_from(torchdkm.prepare(other, CFG), start)
    rms = DKMConfig(bits=3, min_numel=0, group_size=8, channel_scale="rms")
    start_rms = torchdkm.palettize(copy.deepcopy(net), rms)
    with pytest.raises(ConfigError, match="only the max"):
        torchdkm.start_from(torchdkm.prepare(copy.deepcopy(net), rms), start_rms)
