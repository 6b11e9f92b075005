"""DKMConfig.vector_axis: d-vectors along the output or input channels (Core ML's vector_axis) through prepare,
training, finalize, the artifact, compact mode, ONNX and Core ML; the Core ML layout check before training."""
import copy
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import torchdkm
from torchdkm import ConfigError, DKMConfig
from torchdkm.config import coreml_layout_problem
from torchdkm.export.coreml import PREFIX, attach_metadata, check_layers, layout_problems
from torchdkm.functional import from_vectors, to_group_vectors
from torchdkm.lut import finalized_layers, indices_to_weight, weight_to_indices
from torchdkm.serialization import read_artifact

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {  # name -> (module builder, example input)
    "conv3x3": (lambda: nn.Conv2d(12, 24, 3, padding=1), lambda: torch.randn(2, 12, 6, 6)),
    "conv1x1": (lambda: nn.Conv2d(12, 24, 1), lambda: torch.randn(2, 12, 6, 6)),
    "depthwise": (lambda: nn.Conv2d(24, 24, 3, padding=1, groups=24), lambda: torch.randn(2, 24, 6, 6)),
    "linear": (lambda: nn.Linear(36, 24), lambda: torch.randn(2, 36)),
    "embedding": (lambda: nn.Embedding(40, 24), lambda: torch.randint(0, 40, (2, 5))),
}
AXES = ("flat", "output", "input", "auto")


def test_vectors_along_an_axis_hold_consecutive_entries_and_round_trip():
    w = torch.randn(8, 6, 3, 3)
    vecs, pad = to_group_vectors(w, 4, 2, axis=0)
    assert pad == 0 and vecs.shape == (2, 6 * 9, 4)
    # group 0 holds output channels 0..3, vector (c, y, x) = w[0:4, c, y, x], ordered row-major over (c, y, x)
    torch.testing.assert_close(vecs[0, 1 * 9 + 2 * 3 + 1], w[0:4, 1, 2, 1])
    torch.testing.assert_close(vecs[1, 0], w[4:8, 0, 0, 0])
    vecs1, _ = to_group_vectors(w, 3, 4, axis=1)
    torch.testing.assert_close(vecs1[3, 9 + 4], w[6, 3:6, 1, 1])  # group 3 = channels 6, 7
    for axis, d, g in [(0, 4, 2), (1, 3, 4), (1, 2, 1), (None, 4, 1)]:
        v, p = to_group_vectors(w, d, g, axis)
        assert torch.equal(from_vectors(v, w.shape, p, axis), w)


def _layouts():
    for kind in LAYERS:
        for dim in (1, 2, 4, 6):
            for axis in AXES:
                for group_size in (None, 8):
                    for scale in (False, True):
                        yield kind, DKMConfig(bits=2, dim=dim, vector_axis=axis, group_size=group_size,
                                              channel_scale=scale, min_numel=1)


@pytest.mark.parametrize("kind, cfg", list(_layouts()),
                         ids=lambda v: v if isinstance(v, str) else
                         f"d{v.dim}-{v.vector_axis}-g{v.group_size}-cs{int(bool(v.channel_scale))}")
def test_every_layout_trains_round_trips_and_the_check_agrees_with_the_metadata(kind, cfg, tmp_path):
    build, make_x = LAYERS[kind]
    torch.manual_seed(0)
    model = nn.Sequential(build())
    wshape = tuple(model[0].weight.shape)
    problem = cfg.layout_problem(wshape)
    if problem:
        with pytest.raises(ConfigError, match="cannot take their config"):
            torchdkm.prepare(model, cfg)
        return
    fresh = copy.deepcopy(model)
    torchdkm.prepare(model, cfg)
    x = make_x()
    model(x).square().mean().backward()  # one training forward/backward
    axis = cfg.axis(wshape)
    ships = coreml_layout_problem(wshape, cfg.dim, cfg.groups(wshape), axis) is None
    assert (layout_problems(model) == []) == ships  # before training, on the prepared model
    if cfg.vector_axis == "auto" and any(coreml_layout_problem(wshape, cfg.dim, cfg.groups(wshape), a) is None
                                         for a in (None, 0, 1)):
        assert ships  # auto picks a layout Core ML can read whenever one exists
    torchdkm.finalize(model.eval())
    (_, _, fin), = finalized_layers(model)
    assert fin.axis == axis
    y = model(x)
    # every d-vector, in the layer's own layout, is exactly a row of its LUT (times its scale)
    w = model[0].weight.detach()
    idx = weight_to_indices(w, fin.lut, fin.pad, fin.scale, axis)
    assert torch.equal(indices_to_weight(idx, fin.lut, w.shape, w.dtype, fin.scale, axis), w)
    base = w if fin.scale is None else w / fin.scale.reshape(-1, *[1] * (w.dim() - 1))
    # save -> load and compact: the same outputs
    torchdkm.save(model, tmp_path / "m.safetensors")
    info = read_artifact(tmp_path / "m.safetensors").meta
    assert info["format_version"] == (3 if axis is not None else 2)
    loaded = torchdkm.load(tmp_path / "m.safetensors", fresh.eval())
    assert torch.equal(loaded(x), y)
    compact = torchdkm.compact(copy.deepcopy(model))
    assert torch.equal(compact(x), y)
    if not ships:
        with pytest.raises(ConfigError, match="cannot ship"):
            attach_metadata(model)
        return
    attach_metadata(model)
    lut = getattr(model[0], PREFIX + "lut")
    assert lut.shape == (fin.groups,) + (1,) * (w.dim() - 1) + (4, cfg.dim)
    if cfg.dim > 1:
        # Core ML reads vectors along vector_axis: each one (unscaled) must be a row of its group's LUT
        a = int(getattr(model[0], PREFIX + "vector_axis"))
        along, _ = to_group_vectors(base.double(), cfg.dim, fin.groups, a)
        table = lut.reshape(fin.groups, 4, cfg.dim).double()
        err = (along[:, :, None, :] - table[:, None]).abs().amax(-1).amin(-1)
        assert float(err.max()) <= 1e-5 * float(table.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("axis", AXES)
def test_half_weights_round_trip_in_every_axis(dtype, axis, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 9, 8)).to(dtype)
    fresh = copy.deepcopy(model)
    torchdkm.prepare(model, DKMConfig(bits=3, dim=4, vector_axis=axis, group_size=8, channel_scale=True,
                                      min_numel=1))
    x = torch.randn(2, 8, 5, 5, dtype=dtype)
    model(x).float().square().mean().backward()
    torchdkm.finalize(model.eval())
    y = model(x)
    torchdkm.save(model, tmp_path / "m.safetensors")
    assert torch.equal(torchdkm.load(tmp_path / "m.safetensors", fresh.eval())(x), y)
    assert torch.equal(torchdkm.compact(copy.deepcopy(model))(x), y)


def test_auto_is_the_default_and_says_which_axis_it_picked():
    assert DKMConfig().vector_axis == "auto"
    model = nn.Sequential(nn.Conv2d(12, 24, 3), nn.Conv2d(24, 24, 1), nn.Conv2d(24, 24, 3, groups=24))
    torchdkm.prepare(model, DKMConfig(bits=2, dim=4, vector_axis="auto", min_numel=1))
    rows = torchdkm.report(model, print_table=False)
    assert [r.vector_axis for r in rows.layers] == [0, None, 0]  # 3x3: output channels; 1x1: row-major (inputs)
    assert "vector_axis=0" in repr(model[0].parametrizations.weight[0])
    assert " flat " in rows.table() and "    0 " in rows.table()


def test_check_lists_every_layer_with_the_reason_and_the_fix():
    model = nn.Sequential(nn.Conv2d(12, 24, 3), nn.Conv2d(24, 36, 3), nn.Linear(36, 24))
    torchdkm.prepare(model, DKMConfig(bits=2, dim=4, vector_axis="flat", min_numel=1))  # 3x3 kernels: no 4-vectors
    problems = layout_problems(model)
    assert len(problems) == 2 and problems[0].startswith("'0' (weight (24, 12, 3, 3), dim=4")
    assert "does not divide its size 3" in problems[0] and "vector_axis='output' or vector_axis='input'" in problems[0]
    with pytest.raises(ConfigError, match=r"2 layer\(s\) cannot ship.*'1' \(weight \(36, 24, 3, 3\)"):
        check_layers(model)
    with pytest.raises(ConfigError, match="vector_axis='input': dim=4 does not divide its 1 entries along axis 1"):
        torchdkm.prepare(nn.Sequential(nn.Conv2d(8, 8, 3, groups=8)), DKMConfig(dim=4, vector_axis="input",
                                                                                min_numel=1))
    with pytest.raises(ConfigError, match="vector_axis='rows' is not allowed: give one of 'flat', 'output'"):
        DKMConfig(vector_axis="rows")


def test_fold_scale_refuses_vectors_across_output_channels():
    model = nn.Sequential(nn.Conv2d(8, 8, 3))
    torchdkm.prepare(model, DKMConfig(bits=2, dim=4, vector_axis="output", channel_scale=True, min_numel=1))
    assert layout_problems(model) == []
    assert "fold_scale" in layout_problems(model, fold_scale=True)[0]


def test_a_format_3_layer_with_a_wrong_axis_is_refused(tmp_path):
    model = nn.Sequential(nn.Conv2d(8, 8, 3))
    torchdkm.prepare(model, DKMConfig(bits=2, dim=4, vector_axis="output", min_numel=1))
    torchdkm.finalize(model)
    torchdkm.save(model, tmp_path / "m.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file
    import json
    import zlib

    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    doc = json.loads(meta["torchdkm"])
    doc["layers"]["0.weight"]["vector_axis"] = 2  # a 3-long axis: 4-vectors cannot lie along it
    text = json.dumps(doc)
    save_file(tensors, str(tmp_path / "bad.safetensors"),
              metadata={"torchdkm": text, "torchdkm_crc32": str(zlib.crc32(text.encode()))})
    with pytest.raises(torchdkm.FormatError, match="vector_axis=2: dim=4 does not divide 3"):
        torchdkm.load(tmp_path / "bad.safetensors")


def test_onnx_matches_onnxruntime_with_vectors_along_channels(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(12, 24, 3), nn.ReLU(), nn.Conv2d(24, 24, 3, groups=24), nn.Flatten(),
                          nn.Linear(24 * 16, 8))
    torchdkm.prepare(model, DKMConfig(bits=3, dim=4, vector_axis="auto", group_size=8, channel_scale=True,
                                      min_numel=1), rules={"4": DKMConfig(bits=3, dim=4, vector_axis="input",
                                                                         min_numel=1)})
    x = torch.randn(2, 12, 8, 8)
    torchdkm.finalize(model.eval())
    ref = model(x).detach().numpy()
    torchdkm.export_onnx(model, x, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_coreml_converts_3x3_convs_with_vectors_along_output_channels():
    ct = pytest.importorskip("coremltools")
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3, groups=32), nn.ReLU(),
                          nn.Conv2d(32, 24, 1), nn.Flatten(), nn.Linear(24 * 4, 12))
    torchdkm.prepare(model, DKMConfig(bits=4, dim=4, vector_axis="auto", min_numel=1),
                     rules={"0": DKMConfig(bits=4, dim=4, vector_axis="output", group_size=16, min_numel=1)})
    check_layers(model)
    torchdkm.finalize(model.eval())
    attach_metadata(model)
    x = torch.randn(1, 16, 6, 6)
    mlmodel = ct.convert(torch.jit.trace(model, x), inputs=[ct.TensorType(shape=x.shape)], convert_to="mlprogram",
                         minimum_deployment_target=ct.target.iOS18, skip_model_load=True)
    ops = list(mlmodel._mil_program.functions["main"].operations)
    luts = [op for op in ops if op.op_type == "constexpr_lut_to_dense"]
    assert len(luts) == 4
    axes = sorted(int(op.vector_axis.val) for op in luts)
    assert axes == [0, 0, 1, 1]  # 3x3 and depthwise along output channels; 1x1 and Linear along inputs
    dense = [op.name for op in ops if op.op_type == "const" and np.asarray(op.outputs[0].val).dtype.kind == "f"
             and np.asarray(op.outputs[0].val).size >= 96 * 12]
    assert not dense, dense


def test_coreml_converts_output_channel_vectors_with_scales_for_ios26():
    ct = pytest.importorskip("coremltools")
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    if not hasattr(ct.target, "iOS26"):
        pytest.skip("coremltools without the iOS26 target")
    model = nn.Sequential(nn.Conv2d(16, 32, 3))
    torchdkm.prepare(model, DKMConfig(bits=4, dim=4, vector_axis="output", group_size=16, channel_scale=True,
                                      min_numel=1))
    torchdkm.finalize(model.eval())
    attach_metadata(model)
    x = torch.randn(1, 16, 6, 6)
    mlmodel = ct.convert(torch.jit.trace(model, x), inputs=[ct.TensorType(shape=x.shape)], convert_to="mlprogram",
                         minimum_deployment_target=ct.target.iOS26, skip_model_load=True)
    ops = [op.op_type for op in mlmodel._mil_program.functions["main"].operations]
    assert ops.count("constexpr_lut_to_dense") == 1 and "constexpr_blockwise_shift_scale" in ops


def test_recipe_for_coreml_refuses_a_layout_before_training(tmp_path):
    recipe = yaml.safe_load((ROOT / "recipes" / "digits_mlp.yaml").read_text())
    recipe["compression"].update(dim=3, coreml=True, rules={})  # 64 inputs, 128 outputs: 3 divides neither
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "PATH": ""}
    r = subprocess.run([sys.executable, "-m", "torchdkm", "compress", str(path), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert r.returncode != 0
    assert "cannot ship" in r.stderr and "'net.0'" in r.stderr
    assert not (tmp_path / "out" / "checkpoint.pt").exists() or "dkm" not in r.stdout.lower()
