import os

import numpy as np
import pytest
import torch

import torchdkm
from torchdkm import ConfigError
from torchdkm.export.coreml import attach_metadata, check_layers
from torchdkm.parametrization import dkm_parametrization
from torchdkm.serialization import read_artifact

from artifact_models import SmallCNN, finalize_layers, finalized_cnn, finalized_lm, prepared_cnn


@pytest.fixture
def onnx():
    """The ONNX tests need onnx and onnxruntime; the Core ML metadata tests below need neither."""
    pytest.importorskip("onnxruntime")
    return pytest.importorskip("onnx")

X_IMG = torch.randn(3, 1, 12, 12, generator=torch.Generator().manual_seed(5))
X_IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))


def _run_onnx(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("make, x", [(finalized_cnn, X_IMG), (finalized_lm, X_IDS)])
def test_onnx_matches_pytorch_and_stays_compressed(tmp_path, make, x, onnx):
    model = make()
    ref = model(x).detach().numpy()
    onnx_path, st_path = tmp_path / "m.onnx", tmp_path / "m.safetensors"
    assert torchdkm.export_onnx(model, x, onnx_path) == str(onnx_path)
    assert torch.equal(torch.from_numpy(ref), model(x))  # the model itself is untouched
    np.testing.assert_allclose(_run_onnx(onnx_path, x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())

    graph = onnx.load(str(onnx_path)).graph
    ops = {n.op_type for n in graph.node}
    assert {"Gather", "BitwiseAnd", "Div"} <= ops  # weights are rebuilt inside the graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    rep = torchdkm.report(model, print_table=False)
    for row in rep.layers:  # each compressed layer: packed uint8 indices + a k × d LUT, no dense weight
        packed = inits[f"{row.name}.parametrizations.weight.original"]
        assert packed.dtype == np.uint8 and packed.size < row.index_bits / 8 + 7
        assert inits[f"{row.name}.parametrizations.weight.0.lut"].shape == (row.groups, 2**row.bits, row.dim)
    dense_sizes = {r.numel for r in rep.layers}
    assert not [n for n, a in inits.items() if a.dtype == np.float32 and a.size in dense_sizes and "lut" not in n]

    torchdkm.save(model, st_path)
    art = read_artifact(st_path)
    payload = art.file_bytes - art.header_bytes
    init_bytes = sum(a.nbytes for a in inits.values())
    assert init_bytes <= payload + 7 * len(rep.layers)
    # The whole file: within 10% of the torchdkm artifact, plus the graph itself (a few KB for the CNN;
    # the transformer block's attention graph is larger whatever the weights).
    assert os.path.getsize(onnx_path) <= 1.10 * os.path.getsize(st_path) + 12 * 1024


def test_onnx_unpacks_every_bit_width_exactly(tmp_path, onnx):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(24, 24) for _ in range(8)])
    finalize_layers(model, {str(b - 1): (b, 1) for b in range(1, 9)})
    x = torch.randn(4, 24)
    torchdkm.export_onnx(model, x, tmp_path / "m.onnx")
    ref = model(x).detach().numpy()
    np.testing.assert_allclose(_run_onnx(tmp_path / "m.onnx", x), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_onnx_dynamic_batch_and_real_finalize(tmp_path, onnx):
    model = prepared_cnn()
    path = tmp_path / "m.onnx"
    torchdkm.export_onnx(model, X_IMG, path, input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}})
    x = torch.randn(7, 1, 12, 12)
    ref = model(x).detach().numpy()
    np.testing.assert_allclose(_run_onnx(path, x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_onnx_export_refuses_prepared_models(tmp_path, onnx):
    model = torchdkm.prepare(SmallCNN(), torchdkm.DKMConfig(bits=2, min_numel=0))
    with pytest.raises(ConfigError, match="finalize"):
        torchdkm.export_onnx(model, X_IMG, tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="opset_version"):
        torchdkm.export_onnx(finalized_cnn(), X_IMG, tmp_path / "m.onnx", opset_version=13)


# ----------------------------------------------------------------------------------------------- Core ML


def test_coreml_attach_metadata_registers_palettization_buffers():
    model = prepared_cnn(coreml=True)
    assert int(getattr(model, "_COREML_/metadata_version")) == 1
    pw = model.pw
    assert getattr(pw, "_COREML_/weight/compression_type").tolist() == [2]
    assert getattr(pw, "_COREML_/weight/lut").shape == (1, 1, 1, 1, 8, 2)
    assert int(getattr(pw, "_COREML_/weight/vector_axis")) == 1  # 1x1 conv: vectors run along input channels
    assert not hasattr(model.conv, "_COREML_/weight/vector_axis")


def test_coreml_check_layers_refuses_a_vector_layout_before_training():
    model = torchdkm.prepare(SmallCNN(), torchdkm.DKMConfig(bits=2), rules={"fc": torchdkm.DKMConfig(bits=2, dim=3)})
    with pytest.raises(ConfigError, match=r"'fc' \(weight \(10, 32\), dim=3, 1 LUT\(s\)\)"):
        check_layers(model)  # on the prepared model: nothing is trained for a layout Core ML cannot take
    torchdkm.finalize(model)
    with pytest.raises(ConfigError, match=r"'fc' \(weight \(10, 32\), dim=3, 1 LUT\(s\)\)"):
        attach_metadata(model)
    assert not hasattr(model, "_COREML_/metadata_version")


def test_finalize_coreml_flag_says_where_it_moved():
    model = torchdkm.prepare(SmallCNN(), torchdkm.DKMConfig(bits=2, min_numel=0))
    with pytest.raises(ConfigError, match=r"torchdkm\.export\.coreml\.attach_metadata"):
        torchdkm.finalize(model, coreml=True)
    assert dkm_parametrization(model.fc) is not None  # nothing changed


def test_coreml_convert_uses_constexpr_lut_to_dense():
    ct = pytest.importorskip("coremltools")
    import logging

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    torch.manual_seed(0)
    model = finalize_layers(SmallCNN(), {"conv": (5, 1), "dw": (2, 1), "pw": (3, 2), "fc": (4, 2)})
    attach_metadata(model)
    traced = torch.jit.trace(model, X_IMG)
    mlmodel = ct.convert(traced, inputs=[ct.TensorType(shape=X_IMG.shape)], convert_to="mlprogram",
                         minimum_deployment_target=ct.target.iOS18, skip_model_load=True)
    ops = list(mlmodel._mil_program.functions["main"].operations)
    luts = [op for op in ops if op.op_type == "constexpr_lut_to_dense"]
    shapes = sorted((tuple(op.indices.shape), tuple(op.lut.shape)) for op in luts)
    assert shapes == sorted([
        ((16, 1, 3, 3), (1, 1, 1, 1, 64, 1)),  # 5 bits: Core ML has no uint5, LUT padded to 6 bits
        ((16, 1, 3, 3), (1, 1, 1, 1, 4, 1)),
        ((32, 8, 1, 1), (1, 1, 1, 1, 8, 2)),   # dim 2 along input channels
        ((10, 16), (1, 1, 16, 2)),
    ])
    # the indices Core ML found are ours: same weights back
    fc = next(op for op in luts if tuple(op.lut.shape) == (1, 1, 16, 2))
    lut = fc.lut.val.reshape(16, 2).astype(np.float32)
    rebuilt = lut[fc.indices.val.astype(np.int64)].reshape(10, 32)
    np.testing.assert_allclose(rebuilt, model.fc.weight.detach().numpy(), rtol=1e-3, atol=1e-3)
    dense = [op.name for op in ops if op.op_type == "const" and np.asarray(op.outputs[0].val).dtype.kind == "f"
             and op.outputs[0].shape in {(16, 1, 3, 3), (32, 16, 1, 1), (10, 32)}]
    assert not dense, dense  # no dense float weights left in the program
