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
