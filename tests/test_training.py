"""The training-loop helpers: temperature schedule, hard forward, soft-weight evaluation, BatchNorm re-estimation,
soft-to-hard diagnostics."""
import math

import pytest
import torch
from torch import nn

import torchdkm
from torchdkm import ConfigError, DKMConfig
from torchdkm.functional import auto_tau, dkm_cluster, hard_cluster, to_vectors
from torchdkm.parametrization import dkm_parametrization
from torchdkm.stats import dkm_layer_stats


def _mlp(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)] if bn else \
        [nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)]
    return nn.Sequential(*layers)


def test_schedule_is_a_half_cosine_from_start_to_end_then_flat():
    cfg = DKMConfig(tau_scale=0.5, tau_scale_end=0.02, anneal_steps=100)
    assert cfg.tau_scale_at(0) == pytest.approx(0.5)
    assert cfg.tau_scale_at(50) == pytest.approx(0.26)
    assert cfg.tau_scale_at(25) == pytest.approx(0.02 + 0.48 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert cfg.tau_scale_at(100) == pytest.approx(0.02) and cfg.tau_scale_at(10_000) == pytest.approx(0.02)
    assert DKMConfig(tau_scale=0.3).tau_scale_at(77) == 0.3


@pytest.mark.parametrize("kw, match", [(dict(anneal_steps=10), "tau_scale_end"), (dict(tau_scale_end=0.0), "tau_scale_end"),
                                       (dict(anneal_steps=-1, tau_scale_end=0.1), "anneal_steps"),
                                       (dict(hard_forward=1), "hard_forward"),
                                       (dict(direct_grad=-0.1), "direct_grad"),
                                       (dict(direct_grad=float("nan")), "direct_grad")])
def test_schedule_config_errors_say_what_is_allowed(kw, match):
    with pytest.raises(ConfigError, match=match):
        DKMConfig(**kw)


def test_step_drives_the_layer_temperature_and_resumes_from_state_dict():
    cfg = DKMConfig(bits=2, min_numel=0, tau_scale=0.5, tau_scale_end=0.05, anneal_steps=4)
    net = torchdkm.initialize(torchdkm.prepare(_mlp(), cfg))
    p = dkm_parametrization(net[0])
    taus = []
    for _ in range(6):
        taus.append(float(p.tau()))  # floats: pytest >= 9.2's approx refuses lists of tensors
        torchdkm.step(net)
    assert int(p.step) == 6
    scale = [cfg.tau_scale_at(s) for s in range(6)]
    want = [float(auto_tau(p.centroids, s)) for s in scale]
    assert taus == pytest.approx(want) and taus[0] > taus[2] > taus[4] == pytest.approx(taus[5])
    other = torchdkm.prepare(_mlp(1), cfg)
    other.load_state_dict(net.state_dict())
    assert int(dkm_parametrization(other[0]).step) == 6
    old = {k: v for k, v in net.state_dict().items() if not k.endswith(".step")}  # before the counter existed
    fresh = torchdkm.prepare(_mlp(1), cfg)
    fresh.load_state_dict(old)
    assert int(dkm_parametrization(fresh[0]).step) == 0


def test_hard_forward_trains_with_the_shipped_weights_and_the_soft_gradient():
    x = torch.randn(16, 8)
    grads, outs = {}, {}
    for hard in (False, True):
        net = torchdkm.initialize(torchdkm.prepare(_mlp(), DKMConfig(bits=2, min_numel=0, tau_scale=0.5,
                                                                      hard_forward=hard)))
        net.train()
        y = net(x)
        y.square().sum().backward()
        grads[hard] = net[0].parametrizations.weight.original.grad.clone()
        outs[hard] = y.detach()
        w_train = net[0].weight.detach().clone()  # train-mode value, after this step's centroid update
        net.eval()
        w_eval = net[0].weight.detach()
        if hard:
            # trained and evaluated weights are the same (up to the rounding of a + (b - a))
            assert torch.allclose(w_train, w_eval, rtol=0, atol=1e-6)
        else:
            assert not torch.allclose(w_train, w_eval, atol=1e-4)  # soft at this temperature
    assert not torch.allclose(outs[False], outs[True])
    # the gradient reaching the weight is the soft DKM one: nonzero for weights inside clusters too
    assert (grads[True] != 0).float().mean() > 0.9


@pytest.mark.parametrize("scale", [False, "max"])
def test_direct_grad_adds_beta_times_the_upstream_gradient_and_keeps_the_value(scale):
    """float64: the weight's gradient is DKM's own plus β × dL/dW~ exactly, the forward value is unchanged, and the
    centroids update as without it."""
    torch.manual_seed(0)
    w0 = torch.randn(24, 6, dtype=torch.float64)
    upstream = torch.randn(24, 6, dtype=torch.float64)
    got = {}
    for beta in (0.0, 0.7):
        lin = nn.Linear(6, 24).double()
        lin.weight.data.copy_(w0)
        torchdkm.prepare(lin, DKMConfig(bits=2, min_numel=0, tau_scale=0.3, channel_scale=scale, direct_grad=beta))
        torchdkm.initialize(lin)
        w = lin.weight
        (w * upstream).sum().backward()
        got[beta] = (w.detach(), lin.parametrizations.weight.original.grad, dkm_parametrization(lin).centroids)
    (v0, g0, c0), (v1, g1, c1) = got[0.0], got[0.7]
    assert torch.equal(v0, v1) and torch.equal(c0, c1)
    assert torch.allclose(g1 - g0, 0.7 * upstream, rtol=0, atol=1e-12)


def test_soft_weights_evaluates_the_soft_network_without_updating_centroids():
    net = torchdkm.initialize(torchdkm.prepare(_mlp(), DKMConfig(bits=2, min_numel=0, tau_scale=0.5)))
    net.eval()
    p = dkm_parametrization(net[0])
    c0 = p.centroids.clone()
    w = net[0].parametrizations.weight.original.detach()
    hard = net[0].weight.detach().clone()
    with torchdkm.soft_weights(net):
        soft = net[0].weight.detach().clone()
    vecs, _ = to_vectors(w, 1)
    want, _ = dkm_cluster(vecs, c0[0], p.tau(), p.config.iters, p.config.eps)  # one table: c0 is 1 × k × d
    assert torch.allclose(soft, want.view_as(w)) and torch.equal(p.centroids, c0)
    assert torch.equal(net[0].weight, hard) and not torch.allclose(soft, hard)  # context left: hard again
    assert torch.equal(hard.reshape(-1, 1), hard_cluster(vecs, c0[0]))


def test_gap_statistic_tracks_the_temperature():
    gaps = {}
    for scale in (0.005, 0.5):
        net = torchdkm.initialize(torchdkm.prepare(_mlp(), DKMConfig(bits=2, min_numel=0, tau_scale=scale)))
        gaps[scale] = dkm_layer_stats(net)["0"]["gap"]
    assert gaps[0.005] < 1e-3 < 0.05 < gaps[0.5]


def test_recalibrate_batchnorm_gives_the_statistics_of_the_hard_network():
    torch.manual_seed(0)
    net = torchdkm.initialize(torchdkm.prepare(_mlp(bn=True), DKMConfig(bits=1, min_numel=0, tau_scale=0.5)))
    net.train()
    batches = [torch.randn(64, 8) for _ in range(3)]
    for b in batches:  # training forwards leave statistics of the soft weights (momentum 0.1)
        net(b)
    bn = net[1]
    n = torchdkm.recalibrate_batchnorm(net, batches)
    assert n == 3 and net.training and bn.momentum == 0.1
    net.eval()
    h = torch.cat([net[0](b) for b in batches])  # hard weights in eval mode
    assert torch.allclose(bn.running_mean, h.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, torch.stack([net[0](b).var(0) for b in batches]).mean(0), rtol=1e-4)
    with pytest.raises(ConfigError, match="no input batch"):
        torchdkm.recalibrate_batchnorm(net, [])
    assert torch.allclose(bn.running_mean, h.mean(0), atol=1e-5)  # a failed call leaves the statistics alone


def _blobs(n, seed):
    """Four Gaussian classes in 8-d, overlapping enough that 2-bit weights lose accuracy: (x n × 8, y n)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(4, 8, generator=torch.Generator().manual_seed(99)) * 1.2
    y = torch.randint(0, 4, (n,), generator=g)
    return means[y] + torch.randn(n, 8, generator=g), y


def test_schedule_hard_forward_and_distillation_train_and_finalize_ships_the_last_hard_eval():
    x, y = _blobs(2048, 0)
    xv, yv = _blobs(1024, 1)
    teacher = _mlp(bn=True)
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for i in range(200):
        idx = torch.arange(i * 64, i * 64 + 64) % len(y)
        opt.zero_grad()
        nn.functional.cross_entropy(teacher(x[idx]), y[idx]).backward()
        opt.step()
    teacher.eval()

    def acc(m):
        m.eval()
        with torch.no_grad():
            return (m(xv).argmax(1) == yv).float().mean().item()

    import copy
    steps = 120
    cfg = DKMConfig(bits=1, min_numel=0, tau_scale=0.3, tau_scale_end=0.02, anneal_steps=steps, hard_forward=True)
    student = torchdkm.initialize(torchdkm.prepare(copy.deepcopy(teacher), cfg))
    kmeans_only = acc(torchdkm.finalize(copy.deepcopy(student)))
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    taus = []
    for i in range(steps):
        student.train()
        idx = torch.arange(i * 64, i * 64 + 64) % len(y)
        out = student(x[idx])
        with torch.no_grad():
            t = teacher(x[idx])
        loss = 0.5 * nn.functional.cross_entropy(out, y[idx]) + 0.5 * torchdkm.distillation_loss(out, t, 2.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        torchdkm.step(student)
        taus.append(dkm_parametrization(student[0]).config.tau_scale_at(int(dkm_parametrization(student[0]).step)))
    assert taus[0] > taus[steps // 2] > taus[-1] == pytest.approx(0.02)
    torchdkm.recalibrate_batchnorm(student, x.split(256))
    last = acc(student)  # the last evaluation during training: hard weights, BN statistics of the hard network
    with torch.no_grad():
        last_logits = student(xv)
    torchdkm.finalize(student)
    with torch.no_grad():
        assert torch.equal(student(xv), last_logits)  # finalize ships exactly what was last evaluated
    assert acc(student) == last
    # the fine-tuning does real work: it recovers most of what 1-bit k-means alone lost
    assert acc(teacher) - last < 0.5 * (acc(teacher) - kmeans_only), (acc(teacher), kmeans_only, last)


def _tied_lm(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Embedding(48, 16), nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16), nn.Linear(16, 48))
    m[4].weight = m[0].weight
    return m.double()


def test_accumulate_gives_the_one_batch_gradient_with_one_dkm_run_per_layer():
    """Three micro-batches inside accumulate = one batch of all three (DKM runs once either way): same gradients
    and centroids in float64, and DKM ran once per prepared layer (the tied embedding/head once)."""
    cfg = DKMConfig(bits=2, group_size=8, channel_scale=True, min_numel=0)
    models = [torchdkm.initialize(torchdkm.prepare(_tied_lm(), cfg)) for _ in range(2)]
    ids = torch.randint(0, 48, (3, 5), generator=torch.Generator().manual_seed(1))
    with torchdkm.functional.record_iterations() as runs:
        with torchdkm.accumulate(models[0]):
            for row in ids:
                models[0](row).square().sum().backward()
    assert len(runs) == 3  # embedding/head, two Linears
    models[1](ids.reshape(-1)).square().sum().backward()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12, msg=name)
    for a, b in zip(models[0].buffers(), models[1].buffers()):
        assert torch.equal(a, b)
    with torchdkm.accumulate(models[0]):  # eval forwards inside the block compute as usual (hard weights)
        models[0].eval()
        inside = models[0](ids[0])
    assert torch.equal(inside, models[0](ids[0]))


def test_accumulate_refuses_a_weight_changed_inside_the_block():
    model = torchdkm.prepare(_tied_lm(), DKMConfig(bits=2, min_numel=0))
    with pytest.raises(ConfigError, match=r"weight of '0' changed inside the block"):
        with torchdkm.accumulate(model):
            model(torch.arange(4)).sum().backward()
            with torch.no_grad():
                model[0].parametrizations.weight.original.mul_(0.5)
    assert all(p._held is None for p in torchdkm.parametrization.dkm_layers(model))
