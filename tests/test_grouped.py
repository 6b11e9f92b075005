"""Grouped LUTs (one table per group of output channels) and per-channel scales, through the whole lifecycle."""
import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import torchdkm
from torchdkm import ConfigError, DKMConfig
from torchdkm.export.coreml import attach_metadata
from torchdkm.functional import auto_tau, dkm_cluster, dkm_cluster_reference, hard_cluster
from torchdkm.kmeans import kmeans_init
from torchdkm.parametrization import dkm_parametrization

from artifact_models import SmallCNN, finalized_cnn

DATA = Path(__file__).parent / "data"


def _grouped(groups=3, n=200, d=1, k=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    # groups of very different scale: one shared table could not serve them
    spread = torch.tensor([0.01, 1.0, 30.0][:groups])[:, None, None]
    w = torch.randn(groups, n, d, generator=g, dtype=torch.float64) * spread
    c0 = kmeans_init(w, k)
    return w, c0


@pytest.mark.parametrize("d", [1, 2])
def test_grouped_dkm_equals_each_group_alone(d):
    w, c0 = _grouped(d=d)
    tau = auto_tau(c0, 0.05)  # one temperature per group
    up = torch.randn_like(w)
    wg = w.clone().requires_grad_()
    out, c = dkm_cluster(wg, c0, tau, 3, chunk_rows=90)  # chunks cut through the groups
    (grad,) = torch.autograd.grad((out * up).sum() + c.square().sum(), wg)
    for i in range(w.shape[0]):
        wi = w[i].clone().requires_grad_()
        oi, ci = dkm_cluster(wi, c0[i], float(tau[i]), 3)
        (gi,) = torch.autograd.grad((oi * up[i]).sum() + ci.square().sum(), wi)
        torch.testing.assert_close(out[i], oi)
        torch.testing.assert_close(c[i], ci)
        torch.testing.assert_close(grad[i], gi)


def test_grouped_dkm_matches_reference_and_gradcheck():
    w, c0 = _grouped(n=30, d=2, k=4)
    tau = auto_tau(c0, 0.2)
    out, c = dkm_cluster(w, c0, tau, 2, eps_rel=1e-3)
    ref_out, ref_c = dkm_cluster_reference(w, c0, tau, 2, eps_rel=1e-3)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(c, ref_c)
    x = w[:, :12].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: dkm_cluster(v, c0, tau, 2, chunk_rows=10)[0], (x,))


def test_grouped_kmeans_is_close_to_each_group_alone():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4000, 1, generator=g) * torch.rand(6, 1, 1, generator=g) + torch.randn(6, 1, 1, generator=g)
    w[0, :8] *= 25  # outliers keep a centroid of their own, as in the exact per-tensor DP
    grouped = kmeans_init(w, 16)
    alone = torch.stack([kmeans_init(w[i], 16) for i in range(6)])
    sse = lambda c: float((hard_cluster(w, c) - w).square().sum())  # noqa: E731
    assert sse(grouped) <= 1.01 * sse(alone)
    assert torch.equal(grouped, grouped.sort(1).values)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.fc = nn.Linear(64, 32)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)).repeat(1, 4))


def _net(cfg):
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # output channels of very different magnitude, as in pretrained models
        net.fc.weight.mul_(torch.logspace(-2, 1, 32)[:, None])
    return torchdkm.prepare(net, cfg, rules={"conv": cfg.replace(dim=1)})  # 27 weights per conv channel


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("cfg", [DKMConfig(bits=2, group_size=4, min_numel=0),
                                 DKMConfig(bits=3, channel_scale=True, min_numel=0),
                                 DKMConfig(bits=3, group_size=16, channel_scale="rms", min_numel=0),
                                 DKMConfig(bits=2, dim=2, group_size=8, channel_scale=True, min_numel=0)])
def test_lifecycle(tmp_path, cfg):
    net = _net(cfg)
    p = dkm_parametrization(net.fc)
    assert p.centroids.shape == (cfg.groups((32, 64)), cfg.k, cfg.dim)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        net(X).square().mean().backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        hard = net(X)
        trained_rms = net.fc.parametrizations.weight.original.square().mean(1).sqrt()
    torchdkm.finalize(net)
    with torch.no_grad():
        assert torch.equal(net(X), hard)  # eval of the prepared model is what finalize ships
    fin = net.fc._torchdkm
    w = net.fc.weight.detach()
    scale = fin.scale[:, None] if fin.scale is not None else torch.ones(32, 1)
    rows_per_group = 32 // fin.groups
    for gi in range(fin.groups):  # each group holds only its own table's vectors (times its rows' scales)
        block = (w / scale)[gi * rows_per_group:(gi + 1) * rows_per_group].reshape(-1, cfg.dim)
        dist = torch.cdist(block.double(), fin.lut[gi].double())
        assert float(dist.min(1).values.max()) < 1e-5
    rep = torchdkm.report(net, print_table=False)
    row = next(r for r in rep.layers if r.name == "fc")
    assert row.lut_bits == (fin.groups * cfg.k * cfg.dim + (32 if cfg.channel_scale else 0)) * 32
    if cfg.channel_scale == "rms":  # the stored scale is each row's root mean square at finalize
        torch.testing.assert_close(fin.scale, trained_rms, rtol=1e-6, atol=0)
    path = tmp_path / "m.safetensors"
    torchdkm.save(net, path)
    again = torchdkm.load(path, Net().eval())
    with torch.no_grad():
        assert torch.equal(again(X), hard)
        assert torch.equal(torchdkm.compact(copy.deepcopy(net))(X), hard)
    info = torchdkm.inspect_file(path)
    assert info["totals"]["compressed_bytes"] == pytest.approx(rep.compressed_bytes)
    from torchdkm.serialization import format_inspect

    fc_line = next(line for line in format_inspect(info).splitlines() if line.startswith("fc.weight"))
    lut = f"{fin.groups}x{cfg.k}x{cfg.dim}"  # `torchdkm inspect` shows the granularity
    assert lut in fc_line and ("yes" in fc_line) == bool(cfg.channel_scale), fc_line


def test_grouped_onnx_matches(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    net = _net(DKMConfig(bits=3, group_size=8, channel_scale=True, min_numel=0)).eval()
    torchdkm.finalize(net)
    torchdkm.export_onnx(net, X, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: X.numpy()})[0]
    np.testing.assert_allclose(got, net(X).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert (tmp_path / "m.onnx").stat().st_size < 4 * sum(p.numel() for p in net.parameters())


def test_layout_errors_name_every_layer_and_change_nothing():
    net = Net()
    with pytest.raises(ConfigError, match=r"'conv' .*group_size=5 does not divide its 16 .*largest divisor up to 5 is 4"
                                          r".*'fc' .*32 axis-0"):
        torchdkm.prepare(net, DKMConfig(group_size=5, min_numel=0))
    assert dkm_parametrization(net.conv) is None and dkm_parametrization(net.fc) is None
    with pytest.raises(ConfigError, match="'conv' .*dim=2 does not divide the 27 weights.*'fc' .*dim=3 does not divide "
                                          "the 64 weights"):
        torchdkm.prepare(net, DKMConfig(dim=3, group_size=1, min_numel=0),
                         rules={"conv": DKMConfig(dim=2, group_size=1)})
    with pytest.raises(ConfigError, match="group_size=0 is not allowed"):
        DKMConfig(group_size=0)
    with pytest.raises(ConfigError, match="channel_scale='abs' is not allowed: give False, 'max' \\(or True\\) or 'rms'"):
        DKMConfig(channel_scale="abs")


def test_old_centroids_checkpoint_resumes():
    net = _net(DKMConfig(bits=2, min_numel=0))
    net(X)
    state = net.state_dict()
    old = {k: (v[0] if k.endswith("centroids") else v) for k, v in state.items()}  # k × d, as 0.1 wrote them
    fresh = _net(DKMConfig(bits=2, min_numel=0))
    fresh.load_state_dict(old)
    assert torch.equal(dkm_parametrization(fresh.fc).centroids, dkm_parametrization(net.fc).centroids)


def test_format_1_file_written_by_0_1_still_loads():
    io = torch.load(DATA / "format1_cnn_io.pt")
    model = torchdkm.load(DATA / "format1_cnn.safetensors", SmallCNN().eval())
    with torch.no_grad():  # outputs saved on another CPU: conv kernels may round the last bit differently
        torch.testing.assert_close(model(io["x"]), io["y"], rtol=1e-5, atol=1e-6)
    info = torchdkm.inspect_file(DATA / "format1_cnn.safetensors")
    assert info["format_version"] == 1 and all(r["groups"] == 1 for r in info["layers"])
    assert model.fc._torchdkm.lut.dim() == 3
    assert finalized_cnn  # the model the file was written from (tests/artifact_models.py, torchdkm 0.1.0)


def test_coreml_grouped_and_scaled_conversion():
    ct = pytest.importorskip("coremltools")
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    net = _net(DKMConfig(bits=3, group_size=8, channel_scale=True, min_numel=0)).eval()
    torchdkm.finalize(net)
    attach_metadata(net)
    traced = torch.jit.trace(net, X)
    ml = ct.convert(traced, inputs=[ct.TensorType(shape=X.shape)], convert_to="mlprogram",
                    minimum_deployment_target=ct.target.iOS26, skip_model_load=True)
    ops = list(ml._mil_program.functions["main"].operations)
    luts = {tuple(op.indices.shape): op for op in ops if op.op_type == "constexpr_lut_to_dense"}
    fc = luts[(32, 64)]
    assert tuple(fc.lut.shape) == (4, 1, 8, 1)  # 4 groups of 8 output channels, 8 rows each
    scale_ops = [u for u in fc.outputs[0].child_ops if u.op_type == "constexpr_blockwise_shift_scale"]
    assert len(scale_ops) == 1
    lut = fc.lut.val.astype(np.float32)[:, 0, :, 0]
    idx = fc.indices.val.astype(np.int64)
    dense = lut[np.arange(32)[:, None] // 8, idx] * scale_ops[0].scale.val.astype(np.float32).reshape(32, 1)
    np.testing.assert_allclose(dense, net.fc.weight.detach().numpy(), rtol=2e-3, atol=1e-4)
    assert tuple(luts[(16, 3, 3, 3)].lut.shape) == (2, 1, 1, 1, 8, 1)


def test_grouped_early_stop_is_decided_by_the_median_table():
    # 96 tables: a few always move by 1-3x their threshold; requiring all of them ran every iteration every step
    from torchdkm.functional import record_iterations

    w = torch.randn(96, 2000, 1, generator=torch.Generator().manual_seed(0))
    c = kmeans_init(w, 16)
    with record_iterations() as log:
        for _ in range(3):
            _, c = dkm_cluster(w, c, auto_tau(c, 0.05), 3, eps_rel=1e-2)
    assert log[-1] == 1, log


@pytest.mark.parametrize("kind", ["max", "rms"])
def test_scaled_slices_gradients_match_autograd_of_the_expression(kind):
    """scaled_slices = (w / channel_scale(w), channel_scale(w)) with autograd's gradients (ties of max |w| share the
    scale's gradient evenly, as amax does; an all-zero slice has scale 1), checked in float64 and by gradcheck."""
    from torchdkm.functional import channel_scale, scaled_slices

    torch.manual_seed(0)
    w = torch.randn(6, 10, dtype=torch.float64)
    w[1, 3], w[1, 7] = 2.5, -2.5  # a tie of the largest |w|
    w[4] = 0.0  # an all-zero slice
    g_v, g_s = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
    v, s = scaled_slices(a, kind)
    (v * g_v).sum().add_((s * g_s).sum()).backward()
    s_ref = channel_scale(b, kind)
    (b / s_ref * g_v).sum().add_((s_ref * g_s).sum()).backward()
    torch.testing.assert_close(v, (w / s_ref).detach(), rtol=0, atol=0)
    keep = torch.arange(6) != 4
    torch.testing.assert_close(a.grad[keep], b.grad[keep], rtol=1e-12, atol=1e-12)
    # the zero slice: scale 1, constant there; autograd's sqrt at 0 gives NaN for "rms", scaled_slices does not
    torch.testing.assert_close(a.grad[4], g_v[4], rtol=0, atol=0)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: scaled_slices(t, kind), (x,))


def test_scaled_slices_hold_no_float32_copy_of_a_bf16_weight():
    from torchdkm.functional import scaled_slices

    w = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    held = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: held.append(t) or t, lambda t: t):
        v, s = scaled_slices(w, "max")
    assert v.dtype == torch.float32 and sum(t.numel() * t.element_size() for t in held) == w.numel() * 2 + 64 * 4
