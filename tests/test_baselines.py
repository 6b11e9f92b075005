"""The benchmarks' baselines and size accounting (benchmarks/common.py), checked on small models in seconds."""
import copy

import pytest
import torch
from torch import nn

import common
import torchdkm
from artifact_models import SmallCNN, finalize_layers, randomize_bn
from torchdkm import DKMConfig
from torchdkm.serialization import read_artifact


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_ste_kmeans_forward_is_hard_and_gradient_straight_through():
    model = _mlp()
    mult = common.st_kmeans_prepare(model, DKMConfig(bits=2, min_numel=0), centroid_lr_mult=3.0)
    assert sorted(mult.values()) == [3.0, 3.0, 3.0]
    layer = model[2]
    w = layer.parametrizations.weight.original
    st = layer.parametrizations.weight[0]
    hard = layer.weight
    assert torch.unique(hard).numel() <= 4  # every weight is one of the 4 centroids...
    idx = (w.detach().reshape(-1, 1) - st.centroids.detach().reshape(1, -1)).abs().argmin(1)
    assert torch.equal(hard.detach().reshape(-1), st.centroids.detach().reshape(-1)[idx])  # ...its nearest
    g = torch.randn_like(hard)
    (hard * g).sum().backward()
    assert torch.equal(w.grad, g)  # straight through: dL/dW = dL/dW_hat
    per_centroid = torch.zeros(4).index_add_(0, idx, g.reshape(-1))
    torch.testing.assert_close(st.centroids.grad.reshape(-1), per_centroid)  # the sum over assigned weights


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_lsq_has_at_most_2_to_the_n_levels_per_channel(bits):
    model = _mlp()
    layers = common.dkm_layers(model, DKMConfig(bits=bits, min_numel=0))
    mult = common.qat_prepare(model, layers, bits, scale_lr_mult=0.1)
    assert len(mult) == 2 * len(layers) and set(mult.values()) == {0.1}
    x, y = _data()
    common.train(model, x, y, steps=5, lr=1e-2, batch=64, lr_mult=mult, progress=False)
    for m in layers.values():
        levels = [torch.unique(row).numel() for row in m.weight.detach()]
        assert max(levels) <= 2 ** bits
    common.qat_finalize(model)
    for m in layers.values():
        assert not hasattr(m, "parametrizations")
        assert max(torch.unique(row).numel() for row in m.weight) <= 2 ** bits


def test_lsq_finalize_uses_fp16_scales_and_offsets():
    model = nn.Sequential(nn.Linear(64, 8))
    q = common.qat_prepare(model, {"0": model[0]}, 2)
    lsq = model[0].parametrizations.weight[0]
    with torch.no_grad():
        lsq.step.add_(1e-5)  # not an fp16 value
    s16, b16 = lsq.step.detach().half().float(), lsq.offset.detach().half().float()
    w = model[0].parametrizations.weight.original.detach().clone()
    common.qat_finalize(model)
    expected = ((w - b16) / s16).round().clamp(0, 3) * s16 + b16
    torch.testing.assert_close(model[0].weight.detach(), expected, rtol=0, atol=1e-7)
    assert q  # the scale/offset parameters were handed out for their own lr


def test_mse_range_init_beats_min_max():
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(8, 512, generator=g)  # Gaussian channels: min/max puts the levels far out in the tails
    for qmax, gain in ((1, 0.1), (3, 0.5), (15, 0.9)):  # measured ratios 0.06, 0.32, 0.76
        lo, hi = common.mse_range(flat, qmax)
        mn, mx = flat.min(1).values, flat.max(1).values

        def mse(lo, hi):
            s = ((hi - lo) / qmax)[:, None]
            return (((flat - lo[:, None]) / s).round().clamp(0, qmax) * s + lo[:, None] - flat).pow(2).mean()

        assert mse(lo, hi) < gain * mse(mn, mx), qmax


def test_train_gives_each_group_its_own_learning_rate():
    model = _mlp()
    frozen = model[4].bias
    before = frozen.detach().clone()
    x, y = _data()
    common.train(model, x, y, steps=3, lr=1e-2, batch=64, lr_mult={frozen: 0.0}, progress=False)
    assert torch.equal(frozen, before)  # lr × 0: untouched
    assert not torch.equal(model[4].weight, _mlp()[4].weight)  # the rest trained


coreml = pytest.mark.skipif(not common.coreml_available(), reason="coremltools (the [coreml] / [all] extra)")


@coreml
def test_coreml_prepare_compresses_exactly_the_requested_layers():
    model = _mlp()
    model, pal = common.coreml_prepare(model, ["0", "4"], bits=2, dim=1)
    x, y = _data()
    common.train(model, x, y, steps=2, lr=1e-3, batch=64, after_step=pal.step, progress=False)
    model = pal.finalize(inplace=True)
    assert common.coreml_palettized(model, ["0", "2", "4"], 2, 1) == ["0", "4"]
    assert torch.unique(model[2].weight).numel() > 4  # the layer not asked for stays dense


@coreml
def test_coreml_layers_it_leaves_uncompressed_are_found():
    model = _mlp()  # the 10 output channels of layer 4 are not a multiple of cluster_dim 4
    model, pal = common.coreml_prepare(model, ["0", "2", "4"], bits=4, dim=4)
    x, y = _data()
    common.train(model, x, y, steps=2, lr=1e-3, batch=64, after_step=pal.step, progress=False)
    model = pal.finalize(inplace=True)
    assert common.coreml_palettized(model, ["0", "2", "4"], 4, 4) == ["0", "2"]
    assert common.distinct_vectors(model[0].weight, 4) <= 16


def test_clustered_size_matches_report_and_the_saved_artifact(tmp_path):
    torch.manual_seed(0)
    specs = {"conv": (5, 1), "dw": (2, 1), "pw": (3, 2), "fc": (2, 3)}  # fc: 320 weights, a padded tail
    fp32 = randomize_bn(SmallCNN())
    rules = {n: DKMConfig(bits=b, dim=d, min_numel=0) for n, (b, d) in specs.items()}
    glob = DKMConfig(min_numel=1 << 62)
    size = common.clustered_size(fp32, glob, rules)
    model = finalize_layers(randomize_bn(SmallCNN()), specs)
    rep = torchdkm.report(model, print_table=False)
    assert size["model_kib"] * 1024 == rep.compressed_bytes + rep.buffer_bytes  # every parameter and buffer
    assert size["fp32_kib"] * 1024 == rep.fp32_bytes + rep.buffer_bytes
    assert size["bits_per_weight"] == sum(r.stored_bits for r in rep.layers) / sum(r.numel for r in rep.layers)
    assert size["layers"] == 4 and size["fp32_layers"] == []
    torchdkm.save(model, tmp_path / "m.safetensors")
    art = read_artifact(tmp_path / "m.safetensors")
    payload = art.file_bytes - art.header_bytes
    # the file's tensors are these bytes, each layer's packed indices rounded up to whole bytes
    assert 0 <= payload - size["model_kib"] * 1024 < len(specs)

    left = common.clustered_size(fp32, glob, rules, fp32_layers=["fc"])
    fc = rep.layers[-1]
    assert (left["model_kib"] - size["model_kib"]) * 1024 * 8 == 32 * fc.numel - fc.stored_bits
    assert left["layers"] == 3 and left["fp32_layers"] == ["fc"]
    assert left["bits_per_weight"] > size["bits_per_weight"]  # still over the same four layers
    with pytest.raises(ValueError, match="fp32_layers"):
        common.clustered_size(fp32, glob, rules, fp32_layers=["bn1"])


def test_uniform_size_by_hand():
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Linear(32, 10))
    s = common.uniform_size(model, {"0": model[0], "2": model[2]}, bits=2)
    q_bits = (64 * 32 + 32 * 10) * 2 + (32 + 10) * 2 * 16  # indices + fp16 scale and offset per channel
    other = (32 + 10 + 32 + 32) * 4 + (32 + 32) * 4 + 8  # biases, BN gamma/beta; BN running stats + counter
    assert s["model_kib"] * 1024 == q_bits / 8 + other
    assert s["bits_per_weight"] == q_bits / (64 * 32 + 32 * 10)
    assert s["fp32_kib"] * 1024 == (64 * 32 + 32 + 32 * 10 + 10 + 64) * 4 + (64 * 4 + 8)


def test_train_val_split_is_the_documented_one():
    tr, va = common.train_val_split(60000)
    assert len(tr) == 55000 and len(va) == 5000
    assert torch.equal(torch.cat([tr, va]).sort().values, torch.arange(60000))
    perm = torch.randperm(60000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(va, perm[:5000].sort().values) and torch.equal(tr, perm[5000:].sort().values)


def test_fp32_cache_key_is_unchanged(tmp_path):
    """The benchmark's cached fp32 models are found by this key; changing it would retrain them silently."""
    from torchdkm.app.zoo.models import build_model

    torch.manual_seed(0)
    blob = {"state_dict": build_model("resnet_small").state_dict(), "info": {"top1": 0.5, "train_s": 1.0}}
    (tmp_path / "fp32").mkdir()
    torch.save(blob, tmp_path / "fp32" / "resnet_small-3b94a93df5.pt")
    y = torch.zeros(55000, dtype=torch.long)
    model, info = common.fp32_model("resnet_small", lambda: build_model("resnet_small"), None, y, None, None,
                                    epochs=4, lr=3e-3, cache=tmp_path, log=lambda *_: None)
    assert info["top1"] == 0.5 and info["sha1"] == common.state_hash(model)


def _grouped_ste(scaled=True):
    """Layers 0 and 2 (32 output rows each; model[2] 32 × 32) under the STE with groups of 8 rows (4 LUTs of 4
    entries per layer); the 10-row head is too small for min_numel and stays dense."""
    model = _mlp()
    cfg = DKMConfig(bits=2, min_numel=500, group_size=8, channel_scale=scaled)
    common.st_kmeans_prepare(model, cfg)
    return model, cfg


@pytest.mark.parametrize("kind", [True, "rms"])
def test_ste_grouped_init_is_torchdkms_kmeans(kind):
    model, cfg = _grouped_ste(kind)
    ref = torchdkm.initialize(torchdkm.prepare(_mlp(), cfg))
    assert not hasattr(model[4], "parametrizations")
    for i in (0, 2):
        ours = model[i].parametrizations.weight[0].centroids
        theirs = ref[i].parametrizations.weight[0].centroids
        assert ours.shape == theirs.shape == (model[i].weight.shape[0] // 8, 4, 1)
        assert torch.equal(ours.detach(), theirs)


@pytest.mark.parametrize("scaled", [True, False])
def test_ste_grouped_forward_is_nearest_centroid_times_scale_and_gradient_per_group(scaled):
    model, _ = _grouped_ste(scaled)
    layer = model[2]
    w = layer.parametrizations.weight.original
    st = layer.parametrizations.weight[0]
    c = st.centroids.detach()  # 4 groups × 4 centroids × 1
    hard = layer.weight
    s = w.detach().abs().amax(1, keepdim=True) if scaled else torch.ones(32, 1)
    v = (w.detach() / s).reshape(4, 8 * 32)  # group g = rows 8g .. 8g + 7
    idx = (v[..., None] - c[:, None, :, 0]).abs().argmin(2)  # 4 × 256: nearest centroid of its own group
    expected = c[:, :, 0].gather(1, idx).reshape(32, 32) * s  # each row: its group's centroid × its scale
    torch.testing.assert_close(hard.detach(), expected, rtol=0, atol=0)
    grad = torch.randn_like(hard)
    (hard * grad).sum().backward()
    gs = (grad * s).reshape(4, 8 * 32)  # d W_hat / d C_g[i] = s of each weight assigned to it
    per_centroid = torch.zeros(4, 4).scatter_add_(1, idx, gs)
    torch.testing.assert_close(st.centroids.grad[..., 0], per_centroid)
    # straight through to W; with scales, each row's max |W| also carries the scale's gradient
    off_max = torch.ones_like(w, dtype=torch.bool)
    if scaled:
        off_max.scatter_(1, w.detach().abs().argmax(1, keepdim=True), False)
    torch.testing.assert_close(w.grad[off_max], grad[off_max])


def test_fitted_granularity_takes_the_largest_divisor_and_drops_scales_that_do_not_fit():
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.Flatten(), nn.Linear(16 * 36, 12), nn.Linear(12, 10))
    cfg = DKMConfig(bits=4, dim=4, min_numel=0, group_size=8, channel_scale=True, vector_axis="flat")  # as STE's
    changes, notes = common.fitted_granularity(model, cfg)
    # conv: 9 weights per slice, dim 4 does not divide them; Linear(12, 10): 10 rows -> groups of 5 ...
    # ... but 5 × 12 = 60 weights hold whole 4-vectors, fine; Linear(576, 12): 12 rows -> groups of 6
    assert changes == {"0": {"channel_scale": False}, "2": {"group_size": 6}, "3": {"group_size": 5}}
    assert len(notes) == 3 and "largest divisor of 12 up to 8" in notes[1]
    rules = common.granularity_rules(cfg, changes)
    torchdkm.prepare(copy.deepcopy(model), cfg, rules)  # torchdkm accepts them
    common.st_kmeans_prepare(model, cfg, rules)
    assert model[2].parametrizations.weight[0].centroids.shape == (2, 16, 4)
    with pytest.raises(torchdkm.ConfigError, match="group_size=8 does not divide"):
        common.st_kmeans_prepare(nn.Sequential(nn.Linear(4, 12)), cfg)


def test_uniform_size_with_bits_per_layer():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 10))
    s = common.uniform_size(model, {"0": model[0], "1": model[1]}, bits={"0": 4, "1": 1})
    assert s["bits_per_weight"] == (64 * 32 * 4 + 32 * 10 * 1 + (32 + 10) * 2 * 16) / (64 * 32 + 32 * 10)
