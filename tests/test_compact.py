import copy

import pytest
import torch
from torch import nn

import torchdkm
from torchdkm import ConfigError
from torchdkm.compact import LUTWeight, is_compact

from artifact_models import SmallCNN, finalized_cnn, finalized_lm

X_IMG = torch.randn(3, 1, 12, 12, generator=torch.Generator().manual_seed(5))
X_IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))


def _resident_bytes(model):
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("make, x", [(finalized_cnn, X_IMG), (finalized_lm, X_IDS)])
def test_compact_outputs_equal_dense_and_memory_shrinks(make, x):
    model = make()
    rep = torchdkm.report(model, print_table=False)
    dense_out, dense_bytes = model(x), _resident_bytes(model)
    compact = torchdkm.compact(copy.deepcopy(model))
    assert torch.equal(compact(x), dense_out)
    for row in rep.layers:
        module = compact.get_submodule(row.name)
        assert is_compact(module) and "weight" not in module._parameters
        packed = module.parametrizations.weight.original
        assert packed.dtype == torch.uint8 and packed.numel() - row.index_bits / 8 < 7  # + whole-group padding
        assert torch.equal(module.weight, model.get_submodule(row.name).weight)
    saved = sum(r.numel * 4 - r.stored_bits / 8 for r in rep.layers)
    assert _resident_bytes(compact) == pytest.approx(dense_bytes - saved, abs=7 * len(rep.layers))


def test_compact_transformers_conv1d():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    model = nn.Sequential(pytorch_utils.Conv1D(24, 16), nn.ReLU(), pytorch_utils.Conv1D(8, 24))
    torchdkm.prepare(model, torchdkm.DKMConfig(bits=2, min_numel=0))
    torchdkm.finalize(model.eval())
    x = torch.randn(5, 16)
    ref = model(x)
    assert torch.equal(torchdkm.compact(model)(x), ref)
    assert isinstance(model[0].parametrizations.weight[0], LUTWeight)


def test_compact_is_idempotent_and_needs_finalize():
    model = torchdkm.compact(finalized_cnn())
    out = model(X_IMG)
    assert torch.equal(torchdkm.compact(model)(X_IMG), out)
    prepared = torchdkm.prepare(SmallCNN(), torchdkm.DKMConfig(bits=2, min_numel=0))
    with pytest.raises(ConfigError, match="finalize"):
        torchdkm.compact(prepared)


def test_compact_model_is_not_saved(tmp_path):
    model = torchdkm.compact(finalized_cnn())
    with pytest.raises(ConfigError, match="before torchdkm.compact"):
        torchdkm.save(model, tmp_path / "m.safetensors")


def test_loaded_model_can_go_compact(tmp_path):
    model = finalized_lm()
    torchdkm.save(model, tmp_path / "m.safetensors")
    skeleton = torchdkm.load(tmp_path / "m.safetensors", type(model)().eval())
    assert torch.equal(torchdkm.compact(skeleton)(X_IDS), model(X_IDS))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("groups, shape", [(1, (7, 5)), (1, (16, 9)), (4, (16, 6)), (8, (16, 12))])
@pytest.mark.parametrize("scaled, dtype", [(False, torch.float32), (True, torch.float32), (True, torch.float16)])
def test_packed_to_weight_equals_unpack_then_gather(bits, groups, shape, scaled, dtype):
    """The byte-table rebuild (bits dividing 8) gives the general path's weight bit for bit, tail pad included."""
    from torchdkm.lut import indices_to_weight, packed_to_weight
    from torchdkm.packing import pack_bits, pad_to_groups, unpack_groups

    gen = torch.Generator().manual_seed(bits * 100 + groups)
    n = shape[0] * shape[1]
    idx = torch.randint(0, 2**bits, (n,), generator=gen)
    lut = torch.randn(groups, 2**bits, 1, generator=gen).to(dtype)
    scale = torch.rand(shape[0], generator=gen).to(dtype) + 0.5 if scaled else None
    packed = pad_to_groups(pack_bits(idx, bits), bits)
    fast = packed_to_weight(packed, lut, bits, shape, dtype, scale)
    ref = indices_to_weight(unpack_groups(packed, bits), lut, shape, dtype, scale)
    assert fast.dtype == dtype and fast.stride() == ref.stride() and torch.equal(fast, ref)


@pytest.mark.parametrize("source", ["finalized", "loaded"])
def test_tied_compact_weight_is_rebuilt_once_per_pass(source, tmp_path, monkeypatch):
    """The embedding and its tied head share one rebuild per forward pass (was: one per reader)."""
    import torchdkm.parametrization as par

    model = finalized_lm()
    dense_out = model(X_IDS)
    if source == "loaded":  # a fresh module: no hooks left over from prepare
        torchdkm.save(model, tmp_path / "m.safetensors")
        model = torchdkm.load(tmp_path / "m.safetensors", type(model)().eval())
    compact = torchdkm.compact(model)
    calls = []
    real = par.packed_to_weight
    monkeypatch.setattr(par, "packed_to_weight", lambda packed, *a: calls.append(id(packed)) or real(packed, *a))
    shared = id(compact.embed.parametrizations.weight.original)
    assert compact.head.parametrizations.weight.original is compact.embed.parametrizations.weight.original
    for _ in range(2):
        calls.clear()
        assert torch.equal(compact(X_IDS), dense_out)
        assert calls.count(shared) == 1  # the embedding's read; the head reuses it
    assert all(p._memo is None for p in par._tied(compact))  # outside a pass nothing is held
