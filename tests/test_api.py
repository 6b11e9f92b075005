import copy
import re

import pytest
import torch
from torch import nn

import torchdkm
from torchdkm import ConfigError, DKMConfig, TorchDKMError, finalize, prepare, report
from torchdkm.parametrization import dkm_parametrization


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.dw = nn.Conv2d(16, 16, 3, groups=16)
        self.conv1d = nn.Conv1d(4, 8, 3)
        self.conv3d = nn.Conv3d(2, 4, 2)
        self.emb = nn.Embedding(100, 12)
        self.norm = nn.LayerNorm(12)
        self.fc = nn.Linear(12, 7)

    def forward(self, x):
        return self.fc(self.norm(self.emb(x))).sum() + self.dw(self.conv(torch.ones(1, 3, 8, 8))).sum()


def _net(seed=0):
    torch.manual_seed(seed)
    return Net()


def _distinct_vectors(w, dim, axis=None):
    """Distinct d-vectors of w in the layer's layout (row-major, or along ``axis``)."""
    v, _ = torchdkm.functional.to_group_vectors(w.detach(), dim, 1, axis)
    return torch.unique(v[0], dim=0).shape[0]


def test_prepare_parametrizes_and_keeps_optimizer_parameters():
    net = _net()
    params_before = {id(p) for p in net.parameters()}
    prepare(net, DKMConfig(bits=2, min_numel=0))
    assert {id(p) for p in net.parameters()} == params_before  # the optimizer keeps training the same tensors
    for name in ("conv", "dw", "conv1d", "conv3d", "emb", "fc"):
        m = getattr(net, name)
        assert torch.nn.utils.parametrize.is_parametrized(m, "weight"), name
    assert not hasattr(net.norm, "parametrizations")
    net.train()
    w = net.fc.weight
    assert w.shape == (7, 12) and w.requires_grad


def test_training_step_reaches_original_weights_and_warm_starts():
    net = _net()
    prepare(net, DKMConfig(bits=2, min_numel=0))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randint(0, 100, (5,))
    net(x).backward()
    orig = net.fc.parametrizations.weight.original
    assert orig.grad is not None and orig.grad.abs().sum() > 0
    c1 = net.fc.parametrizations.weight[0].centroids.clone()
    opt.step()
    net(x)
    assert not torch.equal(c1, net.fc.parametrizations.weight[0].centroids)


def test_default_size_threshold_and_rule_precedence():
    net = _net()
    rules = {"fc": DKMConfig(bits=3), "conv1d": None, "re:conv.*": DKMConfig(bits=1), "emb": None}
    prepare(net, DKMConfig(bits=2, min_numel=100), rules)
    rows = {r.name: r for r in report(net, print_table=False).layers}
    assert rows["fc"].bits == 3  # exact name wins; compressed although below min_numel (84 < 100)
    assert rows["conv"].bits == 1 and rows["conv3d"].bits == 1  # first matching regex
    assert "conv1d" not in rows  # exact name beats the regex
    assert "emb" not in rows and rows["dw"].bits == 2  # default config, 144 >= 100


def test_rule_precedence_regex_order():
    net = _net()
    prepare(net, DKMConfig(bits=2, min_numel=0), {"re:conv1d": None, "re:conv.*": DKMConfig(bits=1)})
    names = {r.name for r in report(net, print_table=False).layers}
    assert "conv1d" not in names and "conv" in names


def test_finalize_leaves_at_most_k_distinct_vectors_and_is_idempotent():
    net = _net()
    prepare(net, DKMConfig(bits=2, dim=2, min_numel=0), {"emb": DKMConfig(bits=3, dim=3)})
    net(torch.randint(0, 100, (5,)))
    finalize(net)
    assert not any(hasattr(m, "parametrizations") and hasattr(m.parametrizations, "weight") for m in net.modules())
    for name, k, dim in (("fc", 4, 2), ("conv", 4, 2), ("emb", 8, 3)):
        w = getattr(net, name).weight
        assert type(w) is nn.Parameter
        assert _distinct_vectors(w, dim, getattr(net, name)._torchdkm.axis) <= k
    state = {k: v.clone() for k, v in net.state_dict().items()}
    finalize(net)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert report(net, print_table=False).factor > 1


def test_eval_mode_is_hard_assignment():
    net = _net()
    prepare(net, DKMConfig(bits=2, min_numel=0)).eval()
    assert _distinct_vectors(net.fc.weight, 1) <= 4


def test_state_dict_round_trip_mid_training_resumes_exactly():
    torch.manual_seed(0)
    x = torch.randint(0, 100, (5,))

    def run(net, steps, opt):
        for _ in range(steps):
            opt.zero_grad()
            net(x).backward()
            opt.step()

    a = prepare(_net(), DKMConfig(bits=2, min_numel=0))
    opt_a = torch.optim.Adam(a.parameters(), 1e-2)
    run(a, 2, opt_a)
    b = prepare(_net(seed=5), DKMConfig(bits=2, min_numel=0))
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    opt_b = torch.optim.Adam(b.parameters(), 1e-2)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as after torch.save/load: no shared state
    run(a, 1, opt_a)
    run(b, 1, opt_b)
    assert torch.equal(a(x), b(x))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_report_matches_hand_computation():
    net = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10), nn.BatchNorm1d(10))
    prepare(net, DKMConfig(bits=2, dim=1, min_numel=0), {"2": DKMConfig(bits=4, dim=3)})
    r = report(net, print_table=False)
    l0, l2 = r.layers
    assert (l0.index_bits, l0.lut_bits) == (256 * 128 * 2, 4 * 1 * 32)
    assert (l2.index_bits, l2.lut_bits) == (427 * 4, 16 * 3 * 32)  # ceil(1280 / 3) = 427 vectors
    n_params = 256 * 128 + 128 + 1280 + 10 + 20
    assert r.fp32_bytes == n_params * 4
    other = (128 + 10 + 20) * 4
    assert r.compressed_bytes == (l0.stored_bits + l2.stored_bits) / 8 + other
    assert r.buffer_bytes == (10 + 10) * 4 + 8  # BatchNorm running stats + num_batches_tracked
    assert r.factor == pytest.approx(r.fp32_bytes / r.compressed_bytes)
    finalize(net)
    r2 = report(net, print_table=False)
    assert r2.compressed_bytes == r.compressed_bytes and r2.fp32_bytes == r.fp32_bytes


def test_report_prints_table(capsys):
    net = prepare(nn.Sequential(nn.Linear(64, 64)), DKMConfig(bits=3, min_numel=0))
    report(net)
    out = capsys.readouterr().out
    # the layer's row: name, kind, shape, bits, dim, LUTs, scale, vector axis, weights, bits/weight
    # (4096·3 + 8·32) / 4096, KiB 12544/8/1024
    assert re.search(r"^0 +Linear +\[64, 64\] +3 +1 +1 +- +- +4096 +3\.06[23] +1\.53$", out, re.M), out
    # totals: (4096 + 64)·4 bytes fp32 -> 12544/8 + 64·4 = 1824 bytes = 9.1x
    assert re.search(r"^1 compressed layers; .*fp32 0\.016 MiB -> compressed 0\.002 MiB = 9\.1x smaller$", out, re.M), out


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 0}, r"bits=0.*1\.\.8"),
        ({"bits": 9}, r"bits=9.*1\.\.8"),
        ({"dim": 0}, r"dim=0.*>= 1"),
        ({"tau": 0.0}, r"tau=0.0.*> 0"),
        ({"tau": -1.0}, r"tau=-1.0"),
        ({"tau": "soft"}, r"tau='soft'.*'auto'"),
        ({"iters": 0}, r"iters=0.*>= 1"),
        ({"bits": 2.5}, r"bits=2.5"),
    ],
)
def test_bad_config_raises_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match) as e:
        DKMConfig(**kwargs)
    assert isinstance(e.value, ValueError) and isinstance(e.value, TorchDKMError)


def test_shadowed_rule_is_an_error():
    with pytest.raises(ConfigError, match=r"\['re:conv1d'\] never apply"):
        prepare(_net(), DKMConfig(), {"re:conv.*": DKMConfig(bits=1), "re:conv1d": None})


def test_rule_naming_no_module():
    with pytest.raises(ConfigError, match=r"'fcc'.*match no supported layer.*'fc'"):
        prepare(_net(), DKMConfig(), {"fcc": DKMConfig()})
    with pytest.raises(ConfigError, match=r"re:nothing.*"):
        prepare(_net(), DKMConfig(), {"re:nothing.*": None})


def test_rule_on_unsupported_module():
    with pytest.raises(ConfigError, match=r"'norm'.*LayerNorm.*supported types"):
        prepare(_net(), DKMConfig(), {"norm": DKMConfig()})


def test_non_finite_weights_rejected_with_layer_name():
    net = _net()
    with torch.no_grad():
        net.fc.weight[0, 0] = float("nan")
    with pytest.raises(ConfigError, match=r"layer 'fc' has 1 non-finite"):
        prepare(net, DKMConfig(min_numel=0))


def test_prepare_twice_and_tied_weights():
    net = prepare(_net(), DKMConfig(min_numel=0))
    with pytest.raises(ConfigError, match="still prepared"):
        prepare(net, DKMConfig(min_numel=0))
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    with pytest.raises(ConfigError, match="share one weight tensor .* different configs"):
        prepare(tied, DKMConfig(min_numel=0), rules={"1": DKMConfig(bits=2, min_numel=0)})
    assert dkm_parametrization(tied[0]) is None  # nothing changed


def test_tied_weights_are_clustered_once_and_read_by_both():
    torch.manual_seed(0)
    tied = nn.Sequential(nn.Embedding(64, 16), nn.Linear(16, 64, bias=False))
    tied[1].weight = tied[0].weight
    prepare(tied, DKMConfig(bits=2, min_numel=0))
    p = dkm_parametrization(tied[0])
    assert dkm_parametrization(tied[1]) is p and len(list(torchdkm.parametrization.dkm_layers(tied))) == 1
    ids = torch.arange(8)
    out = tied(ids)
    with torch.no_grad():
        tied.eval()
        assert torch.equal(tied[1].weight, tied[0].weight)  # the head computes with the clustered weight too
        assert tied[1].weight.unique().numel() <= 4
        tied.train()
    out.square().mean().backward()
    assert tied[1].parametrizations.weight.original.grad is not None
    rep = torchdkm.report(tied, print_table=False)
    assert len(rep.layers) == 1 and rep.layers[0].name == "0"
    torchdkm.step(tied)
    assert int(p.step) == 1  # one schedule step, not one per tied layer
    torchdkm.finalize(tied.eval())
    assert tied[1].weight is tied[0].weight and dkm_parametrization(tied[1]) is None
    assert tied[0].weight.unique().numel() <= 4 and torchdkm.layers.finalized_record(tied[1]) is None
    assert len(torchdkm.report(tied, print_table=False).layers) == 1


def test_tied_weights_run_dkm_once_per_forward_pass():
    """The embedding and its tied head share one DKM output per pass: one clustering run (not one per read), and the
    gradient and centroids of computing W~ once by hand and reading it twice."""
    torch.manual_seed(0)
    tied = nn.Sequential(nn.Embedding(64, 16), nn.Linear(16, 64, bias=False)).double()
    tied[1].weight = tied[0].weight
    prepare(tied, DKMConfig(bits=2, min_numel=0))
    torchdkm.initialize(tied)
    ref = copy.deepcopy(tied)
    ids = torch.arange(8)
    with torchdkm.functional.record_iterations() as runs:
        tied(ids).square().mean().backward()
    assert len(runs) == 1
    p, w = dkm_parametrization(ref[0]), ref[0].parametrizations.weight.original
    wt = p(w)  # the by-hand reference: DKM once, its output read by both layers
    nn.functional.linear(nn.functional.embedding(ids, wt), wt).square().mean().backward()
    assert torch.equal(tied[0].parametrizations.weight.original.grad, w.grad)
    assert torch.equal(dkm_parametrization(tied[0]).centroids, p.centroids)
    with torchdkm.functional.record_iterations() as runs:  # a submodule on its own: no pass, DKM per read
        tied[1](torch.randn(3, 16, dtype=torch.float64))
        tied(ids)
    assert len(runs) == 2 and dkm_parametrization(tied[0])._memo is None


def test_prepare_rejects_wrong_types():
    with pytest.raises(ConfigError, match="nn.Module"):
        prepare("model")
    with pytest.raises(ConfigError, match="DKMConfig"):
        prepare(_net(), {"bits": 4})
    with pytest.raises(ConfigError, match="maps to dict"):
        prepare(_net(), DKMConfig(), {"fc": {"bits": 2}})


def test_hf_conv1d_supported():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    net = nn.Sequential(Conv1D(24, 16))
    prepare(net, DKMConfig(bits=2, min_numel=0))
    net(torch.randn(3, 16)).sum().backward()
    finalize(net)
    assert _distinct_vectors(net[0].weight, 1) <= 4


def test_finalizing_a_deep_copy_leaves_the_prepared_original_working():
    # torch's deepcopy of a parametrized module shares its generated class; removing the weight property from
    # that class (finalize) used to make the original's ``weight`` vanish (AttributeError on the next forward)
    torch.manual_seed(0)
    net = torchdkm.initialize(torchdkm.prepare(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)),
                                               DKMConfig(bits=2, min_numel=0)))
    x = torch.randn(5, 8)
    net.eval()
    before = net(x)
    shipped = torchdkm.finalize(copy.deepcopy(net))
    assert torch.equal(shipped(x), before)
    assert torch.equal(net(x), before)  # the original still computes (and is still prepared)
    assert torch.equal(torchdkm.finalize(net)(x), before)  # and finalizes to the same model
    assert torch.equal(shipped(x), before)  # which leaves the copy working too
