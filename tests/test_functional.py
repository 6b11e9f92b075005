import math

import pytest
import torch

from torchdkm import dkm_cluster, dkm_cluster_reference, hard_cluster, kmeans_init, nearest_centroid
from torchdkm.functional import auto_tau, from_vectors, to_vectors


def _problem(n, d, k, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g, dtype=dtype)
    c0 = w[torch.randperm(n, generator=g)[:k]] + 0.05 * torch.randn(k, d, generator=g, dtype=dtype)
    return w.requires_grad_(), c0


CASES = [(1, 2, 1, None), (1, 8, 3, 7), (2, 4, 2, None), (3, 16, 4, 5), (4, 4, 1, 11)]


@pytest.mark.parametrize("d,k,iters,rows", CASES)
def test_forward_and_gradients_match_direct_reference(d, k, iters, rows):
    w, c0 = _problem(60, d, k)
    tau = 0.5
    a, ca = dkm_cluster(w, c0, tau, iters, chunk_rows=rows)
    b, cb = dkm_cluster_reference(w, c0, tau, iters)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ca, cb, rtol=1e-12, atol=1e-12)
    g, gc = torch.randn_like(a), torch.randn_like(ca)
    ga = torch.autograd.grad((a * g).sum() + (ca * gc).sum(), w)[0]
    gb = torch.autograd.grad((b * g).sum() + (cb * gc).sum(), w)[0]
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("d,k,iters,rows", CASES)
def test_gradcheck_float64(d, k, iters, rows):
    w, c0 = _problem(24, d, k, seed=1)
    assert torch.autograd.gradcheck(lambda x: dkm_cluster(x, c0, 0.7, iters, chunk_rows=rows), (w,))


@pytest.mark.parametrize("value_grid", [False, True])
def test_gradients_match_reference_on_realistic_size_float32(value_grid):
    g = torch.Generator().manual_seed(3)
    w = (0.02 * torch.randn(20000, 1, generator=g)).requires_grad_()
    c0 = kmeans_init(w, 16)
    tau = auto_tau(c0, 0.05)
    a, ca = dkm_cluster(w, c0, tau, 3, chunk_rows=3000, value_grid=value_grid)
    b, cb = dkm_cluster_reference(w, c0, tau, 3)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    up = torch.randn_like(a, generator=None)
    ga = torch.autograd.grad((a * up).sum(), w)[0]
    gb = torch.autograd.grad((b * up).sum(), w)[0]
    torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-3 * gb.abs().max().item())


@pytest.mark.parametrize("impl", [dkm_cluster, dkm_cluster_reference])
def test_early_stop_on_convergence_and_eps_zero_runs_all_iterations(impl):
    """From centroids far from converged: with eps > 0 the loop stops at the first iteration t whose update is
    <= eps (fewer than the maximum), with eps = 0 it runs exactly the maximum. The iterations a call ran are read
    off its centroids, against the sequence C_1, C_2, ... of one-iteration calls chained by hand."""
    w, c0 = _problem(200, 1, 4)
    c0 = c0 * 0.2  # collapsed near 0: many iterations before the centroids settle
    tau, eps, most = 0.05, 1e-4, 60
    seq = [c0]
    for _ in range(most):
        seq.append(impl(w, seq[-1], tau, 1)[1])
    moves = [(b - a).abs().max().item() for a, b in zip(seq, seq[1:])]
    stop = next(t for t, m in enumerate(moves, 1) if m <= eps)  # first t with max|C_t - C_{t-1}| <= eps
    assert 3 <= stop <= most - 10, moves  # a real test: neither the first iteration nor the last
    early = impl(w, c0, tau, most, eps=eps)[1]
    torch.testing.assert_close(early, seq[stop], rtol=0, atol=1e-10)
    assert (early - seq[most]).abs().max() > eps / 10  # ...and not what running on would give
    full = impl(w, c0, tau, most)[1]  # eps = 0: exactly `most` iterations
    torch.testing.assert_close(full, seq[most], rtol=0, atol=1e-10)
    assert (full - seq[stop]).abs().max() > eps / 10


def test_tiny_tau_equals_hard_kmeans_lloyd():
    w, c0 = _problem(300, 2, 6, seed=4)
    w = w.detach()
    c = c0.clone()
    for _ in range(30):  # Lloyd from the same start
        idx = nearest_centroid(w, c)
        c = torch.stack([w[idx == j].mean(0) if (idx == j).any() else c[j] for j in range(6)])
    wt, cd = dkm_cluster(w, c0, 1e-6, 30)
    torch.testing.assert_close(cd, c, rtol=0, atol=1e-9)
    torch.testing.assert_close(wt, hard_cluster(w, c), rtol=0, atol=1e-9)


@pytest.mark.parametrize("tau", [1e-30, 1e-8, 1.0, 1e8, 1e30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_for_any_tau_and_empty_clusters(tau, dtype):
    w = torch.randn(100, 1, dtype=dtype).requires_grad_()
    c0 = torch.tensor([[0.0], [0.1], [50.0], [-80.0]], dtype=dtype)  # two far-away (empty) clusters
    wt, c = dkm_cluster(w, c0, tau, 3)
    wt.sum().backward()
    assert torch.isfinite(wt).all() and torch.isfinite(c).all() and torch.isfinite(w.grad).all()
    if tau <= 1e-8:
        assert c[2, 0] == 50.0 and c[3, 0] == -80.0  # empty clusters keep their centroid


def test_half_precision_weights_supported():
    w = torch.randn(500, 1).to(torch.bfloat16).requires_grad_()
    c0 = kmeans_init(w, 4)
    wt, c = dkm_cluster(w, c0, 0.1, 2)
    assert wt.dtype == torch.bfloat16 and c.dtype == torch.float32
    wt.float().sum().backward()
    assert w.grad.dtype == torch.bfloat16 and torch.isfinite(w.grad.float()).all()


def test_bad_arguments_raise_with_shapes():
    w, c0 = _problem(10, 2, 4)
    with pytest.raises(ValueError, match=r"\(10, 2\).*\(4, 3\)"):
        dkm_cluster(w, torch.zeros(4, 3, dtype=w.dtype), 1.0, 1)
    for tau in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="tau"):
            dkm_cluster(w, c0, tau, 1)
    with pytest.raises(ValueError, match="iters"):
        dkm_cluster(w, c0, 1.0, 0)


def test_vectors_round_trip_with_padding():
    x = torch.arange(10.0).view(2, 5)
    v, pad = to_vectors(x, 4)
    assert v.shape == (3, 4) and pad == 2 and v[-1, -2:].eq(0).all()
    assert torch.equal(from_vectors(v, x.shape, pad), x)


def test_auto_tau_is_scale_free():
    c = torch.tensor([[-1.0], [0.0], [0.5], [2.0]])
    assert auto_tau(1000 * c, 0.05) == pytest.approx(1e6 * auto_tau(c, 0.05))


def _realistic(n=30000, k=64, seed=5):
    g = torch.Generator().manual_seed(seed)
    w = (0.03 * torch.randn(n, 1, generator=g)).requires_grad_()
    c0 = kmeans_init(w, k)
    return w, c0, auto_tau(c0, 0.05)


@pytest.mark.parametrize("k", [32, 64, 256])
def test_windowed_path_matches_dense_path(k):
    from torchdkm._attention import _Attention

    w, c0, tau = _realistic(k=k)
    assert _Attention(c0[None], tau, 1e-7)(w.detach()[:4096].t()[None]).lo is not None  # the window path is really taken
    # float64, so that the differences measure the window's approximation, not float32 rounding
    w, c0 = w.detach().double().requires_grad_(), c0.double()
    up = torch.randn(w.shape[0], 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outs = []
    for tol in (0.0, 1e-7):
        wt, c = dkm_cluster(w, c0, tau, 2, chunk_rows=7000, window_tol=tol, value_grid=False)
        g = torch.autograd.grad((wt * up).sum() + c.sum(), w)[0]
        outs.append((wt, c, g))
    (a, ca, ga), (b, cb, gb) = outs
    # window_tol=1e-7 bounds the left-out attention mass per weight at 1e-7
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(cb, ca, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6 * ga.abs().max().item())


def test_windowed_path_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 1, generator=g, dtype=torch.float64).requires_grad_()
    c0 = torch.linspace(-3, 3, 32, dtype=torch.float64)[:, None]
    assert torch.autograd.gradcheck(lambda x: dkm_cluster(x, c0, 0.002, 2, chunk_rows=16, window_tol=1e-12), (w,))


def test_window_falls_back_to_dense_when_bound_fails():
    from torchdkm._attention import _Attention

    w, c0, _ = _realistic(k=64)
    big_tau = 10 * float(c0.var())  # soft attention: the neglected mass is not small
    assert _Attention(c0[None], big_tau, 1e-7)(w.detach().t()[None]).lo is None
    a = dkm_cluster(w, c0, big_tau, 1, window_tol=1e-7, value_grid=False)[0]
    b = dkm_cluster(w, c0, big_tau, 1, window_tol=0.0, value_grid=False)[0]
    assert torch.equal(a, b)


def _grad(out, up, w):
    return torch.autograd.grad((out[0] * up).sum() + out[1].sum(), w)[0]


@pytest.mark.parametrize("d,k", [(1, 16), (3, 8)])
def test_attention_reuse_and_saving_match_the_reference(d, k):
    # several chunks, so that kept blocks must line up with their rows; float64 so that any difference is a bug
    w, c0 = _problem(90, d, k, seed=6)
    up = torch.randn(90, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref = dkm_cluster_reference(w, c0, 0.4, 3)
    g_ref = _grad(ref, up, w)
    for kw in (dict(reuse_bytes=0), dict(), dict(save_attention=True), dict(save_attention=True, reuse_bytes=0)):
        out = dkm_cluster(w, c0, 0.4, 3, chunk_rows=25, **kw)
        torch.testing.assert_close(out[0], ref[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(_grad(out, up, w), g_ref, rtol=1e-10, atol=1e-12)


def test_gradcheck_with_saved_attention():
    w, c0 = _problem(24, 2, 4, seed=8)
    assert torch.autograd.gradcheck(
        lambda x: dkm_cluster(x, c0, 0.7, 2, chunk_rows=7, save_attention=True), (w,))


@pytest.mark.parametrize("d", [1, 2])
def test_hard_output_is_the_nearest_centroid_with_the_soft_gradient(d):
    w, c0 = _problem(80, d, 8, seed=9)
    up = torch.randn(80, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    soft = dkm_cluster(w, c0, 0.3, 2, chunk_rows=30)
    hard = dkm_cluster(w, c0, 0.3, 2, chunk_rows=30, hard_output=True)
    torch.testing.assert_close(hard[1], soft[1], rtol=0, atol=0)
    assert torch.equal(hard[0], hard_cluster(w.detach(), hard[1]))
    assert not torch.allclose(hard[0], soft[0])  # a soft temperature: the two values really differ
    torch.testing.assert_close(_grad(hard, up, w), _grad(soft, up, w), rtol=0, atol=0)


def test_relative_early_stop_from_unconverged_centroids_matches_the_reference():
    from torchdkm.functional import record_iterations, stop_threshold

    w, c0 = _problem(400, 1, 8, seed=10)
    c0 = c0 + 0.3  # far from converged: the first iterations move the centroids a lot
    thr = float(stop_threshold(c0, 0.0, 1e-3))
    spacing = c0[:, 0].sort().values.diff()
    assert thr == pytest.approx(1e-3 * float(torch.minimum(torch.cat([spacing, spacing[-1:]]),
                                                           torch.cat([spacing[:1], spacing])).median()))
    with record_iterations() as log:
        out = dkm_cluster(w, c0, 0.05, 200, eps_rel=1e-3, chunk_rows=128)
    assert 10 < log[0] < 200  # stopped early, but not before the centroids settled
    ref = dkm_cluster_reference(w, c0, 0.05, 200, eps_rel=1e-3)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-12, atol=1e-12)
    full = dkm_cluster(w, c0, 0.05, log[0] + 1)[1]  # one more iteration moves a centroid by at most the threshold
    assert float((full - out[1]).abs().max()) <= thr
    assert float((dkm_cluster(w, c0, 0.05, log[0] - 1)[1] - dkm_cluster(w, c0, 0.05, log[0] - 2)[1]).abs().max()) > thr
    with pytest.raises(ValueError, match="eps_rel"):
        dkm_cluster(w, c0, 0.05, 3, eps_rel=-1.0)
