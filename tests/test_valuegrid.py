"""The value-grid path of dkm_cluster (d = 1): its error bound, and values and gradients against the float64
reference. Tolerances come from the bound (see torchdkm._valuegrid): every attention entry is interpolated within
TOL, its derivative within DER of the steepest attention slope."""
import math

import pytest
import torch

import torchdkm._valuegrid as vg
from torchdkm import dkm_cluster, dkm_cluster_reference, hard_cluster, kmeans_init
from torchdkm.functional import auto_tau, record_iterations, stop_threshold


def der(tol):
    """Derivative bound of one attention entry relative to the steepest slope of a neighbour pair, 1/(4 s): the
    cubic Hermite bound √3/216 · h³ · M4 with h⁴ = 384 tol / M4 and M4 >= SAFETY · C4 / s⁴ near the pair's
    midpoint (6e-5 at tol = 1e-6)."""
    return math.sqrt(3) / 216 * (384 * tol) ** 0.75 * (vg._SAFETY * vg._C4) ** 0.25 * 4


def _weights(n, groups=None, seed=0, dtype=torch.float64):
    """Gaussian weights, one in 20 doubled (a wider range, like real layers); groups of different scales."""
    g = torch.Generator().manual_seed(seed)
    w = 0.02 * torch.randn(n if groups is None else groups * n, 1, generator=g, dtype=dtype)
    w[:: 20] *= 2
    return w if groups is None else w.view(groups, n, 1) * torch.arange(1, groups + 1, dtype=dtype)[:, None, None]


def _problem(n, k, ts, groups=None, seed=0):
    w = _weights(n, groups, seed)
    if groups is None:
        c0 = kmeans_init(w.float(), k).double()
    else:
        c0 = torch.stack([kmeans_init(w[i].float(), k).double() for i in range(groups)])
    return w.requires_grad_(), c0, auto_tau(c0, ts)


@pytest.fixture
def grid_always(monkeypatch):
    """Let the grid serve every size (the reference's N × k tensors stay small)."""
    monkeypatch.setattr(vg, "MAX_FRACTION", 4.0)
    monkeypatch.setattr(vg, "MAX_CELLS", 1 << 24)
    monkeypatch.setattr(vg, "_CELL_BYTES", 1)


def _spy(monkeypatch):
    """Records whether each dkm_cluster call took the grid (True) or declined it (False)."""
    calls, orig = [], vg.cluster

    def spy(*a, **kw):
        out = orig(*a, **kw)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(vg, "cluster", spy)
    return calls


def _sorted_gaps(c):
    return c[..., 0].sort(-1).values.diff(dim=-1)


def _check_against_reference(w, c0, tau, iters, hard=False, tol_scale=1.0, **kw):
    out, c = dkm_cluster(w, c0, tau, iters, hard_output=hard, **kw)
    ref, ref_c = dkm_cluster_reference(w, c0, tau, iters, **kw)
    up = torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=w.dtype)
    up_c = torch.randn(c.shape, generator=torch.Generator().manual_seed(2), dtype=w.dtype)
    g = torch.autograd.grad((out * up).sum() + (c * up_c).sum(), w)[0]
    g_ref = torch.autograd.grad((ref * up).sum() + (ref_c * up_c).sum(), w)[0]
    tol = vg.TOL * tol_scale
    # C_t = Σ_i (w_i - c_j) A_ij / Σ_i A_ij + c_j: each term within tol · span(w), so C_t within
    # N · tol · span / mass_j per iteration (masses taken from the reference's first and last attention)
    x = w.detach() if w.dim() == 3 else w.detach()[None]
    t = torch.as_tensor(tau, dtype=x.dtype).reshape(-1, 1, 1)
    mass = min(float(torch.softmax(-(x - cc.reshape(x.shape[0], 1, -1)) ** 2 / t, 2).sum(1).min())
               for cc in (c0, ref_c.detach()))
    span = float(x.max() - x.min())
    c_atol = iters * tol * span * x.shape[1] / mass
    torch.testing.assert_close(c, ref_c, rtol=0, atol=c_atol)
    if hard:
        assert torch.equal(out.detach(), hard_cluster(w.detach(), c.detach()))
    else:
        # W~ = Σ_j A_j C_T,j: within tol · |C_T,j+1 - C_T,j| at each of a weight's (at most 2 active) transitions
        o_atol = 2 * tol * float(_sorted_gaps(ref_c.detach()).max()) + c_atol
        torch.testing.assert_close(out, ref, rtol=0, atol=o_atol)
    # a weight's gradient: the output's and the k-means terms, each within der(tol) of its scale (4x margin)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=4 * der(tol) * float(g_ref.abs().max()))
    return out, c, g


@pytest.mark.parametrize("k", [4, 16, 64])
@pytest.mark.parametrize("ts", [0.01, 0.05, 0.5])
@pytest.mark.parametrize("iters", [1, 3])
def test_per_tensor_matches_reference(k, ts, iters, grid_always, monkeypatch):
    calls = _spy(monkeypatch)
    _check_against_reference(*_problem(20000, k, ts), iters)
    assert calls == [True]


@pytest.mark.parametrize("k,ts", [(4, 0.01), (16, 0.01), (16, 0.05), (64, 0.05), (4, 0.5), (64, 0.5)])
def test_grouped_with_per_group_tau_matches_reference(k, ts, grid_always, monkeypatch):
    calls = _spy(monkeypatch)
    w, c0, tau = _problem(12000, k, ts, groups=3)
    assert tau.shape == (3,) and float(tau.max() / tau.min()) > 4  # really one temperature per group
    _check_against_reference(w, c0, tau, 3)
    assert calls == [True]


@pytest.mark.parametrize("groups", [None, 3])
def test_hard_output_value_is_nearest_centroid_gradient_is_soft(groups, grid_always, monkeypatch):
    calls = _spy(monkeypatch)
    w, c0, tau = _problem(4000, 16, 0.05, groups=groups)
    _, c_h, g_h = _check_against_reference(w, c0, tau, 2, hard=True)
    _, c_s, g_s = _check_against_reference(w, c0, tau, 2)
    assert torch.equal(c_h, c_s) and torch.equal(g_h, g_s)
    assert calls == [True, True]


def test_early_stop_runs_the_reference_iterations(grid_always):
    w, c0, tau = _problem(6000, 8, 0.05, seed=3)
    c0 = c0 * 1.3  # unconverged: several iterations before the relative stop
    with record_iterations() as log:
        _check_against_reference(w, c0, tau, 50, eps_rel=1e-3)
    ref_iters = 0
    c = c0
    while ref_iters < 50:  # the reference's stopping iteration, by chaining one-iteration calls
        ref_iters += 1
        c_new = dkm_cluster_reference(w.detach(), c, tau, 1)[1]
        if float((c_new - c).abs().max()) <= float(stop_threshold(c0, 0.0, 1e-3)):
            break
        c = c_new
    assert 2 < log[0] < 50 and log[0] == ref_iters


def test_float32_realistic_layer_and_half_precision(monkeypatch):
    """The default dispatch (N/8 rule) on a float32 layer of MiniLM's size class: within the bound plus float32
    rounding, no more of it than the exact path (the grid values are float64, t is exact: see Grid); bf16 weights
    compute in float32."""
    calls = _spy(monkeypatch)
    w = _weights(150_000, dtype=torch.float32).requires_grad_()
    c0 = kmeans_init(w.detach(), 16)
    tau = auto_tau(c0, 0.05)
    out, c = dkm_cluster(w, c0, tau, 1)
    exact, exact_c = dkm_cluster(w, c0, tau, 1, value_grid=False)
    assert calls == [True]
    ref, ref_c = dkm_cluster_reference(w.detach().double(), c0.double(), tau, 1)
    gap = float(_sorted_gaps(ref_c).max())
    err = lambda a, b: float((a.detach().double() - b).abs().max())  # noqa: E731
    assert err(out, ref) <= 2 * vg.TOL * gap + 3 * err(exact, ref)
    assert err(c, ref_c) <= 1e-6 * gap + 10 * err(exact_c, ref_c)
    wb = w.detach().to(torch.bfloat16).requires_grad_()
    ob, cb = dkm_cluster(wb, c0, tau, 1)
    assert calls == [True, True] and ob.dtype == torch.bfloat16 and cb.dtype == torch.float32
    ob.float().sum().backward()
    assert wb.grad.dtype == torch.bfloat16 and torch.isfinite(wb.grad.float()).all()


def test_dispatch_takes_the_exact_path_where_the_grid_does_not_pay(monkeypatch):
    calls = _spy(monkeypatch)
    # small N: the grid would not have U <= N/8 values, so the result is the exact path's, bit for bit
    w, c0, tau = _problem(3000, 16, 0.05)
    a = dkm_cluster(w, c0, tau, 2)
    b = dkm_cluster(w, c0, tau, 2, value_grid=False)
    assert calls == [False] and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # d > 1 never asks the grid
    w2 = _weights(8000).view(-1, 2).requires_grad_()
    c2 = kmeans_init(w2.detach(), 8)
    dkm_cluster(w2, c2, 0.01, 1)
    assert calls == [False]
    # large N: taken; value_grid=False: not asked
    w, c0, tau = _problem(100_000, 16, 0.05)
    dkm_cluster(w, c0, tau, 1)
    dkm_cluster(w, c0, tau, 1, value_grid=False)
    assert calls == [False, True]


def test_attention_interpolation_meets_the_bound_and_the_bound_is_tight():
    """The planned grid interpolates every attention entry within TOL (float64, dense samples), for spread,
    skewed and clustered centroids and tau_scale 0.001..2; and not far within it (the bound is not vacuous).
    Configurations whose transitions are too sharp for 2^18 grid values are left to the exact path."""
    gen = torch.Generator().manual_seed(4)
    worst, planned, total = 0.0, 0, 0
    for k in (2, 4, 16, 64):
        for kind in ("spread", "skewed", "clustered"):
            c = torch.randn(k, generator=gen, dtype=torch.float64)
            if kind == "skewed":
                c = c.exp()
            elif kind == "clustered":
                c[: k // 2] *= 0.01
            c = c[None, :, None]
            for ts in (0.001, 0.01, 0.05, 0.5, 2.0):
                tau = float(auto_tau(c, ts)[0])
                x = torch.linspace(float(c.min()) - 1, float(c.max()) + 1, 50_001, dtype=torch.float64)[None]
                grid = vg.plan(x, [c], tau, max_nodes=1 << 18, max_fraction=1e9)
                total += 1
                if grid is None:
                    continue
                planned += 1
                b, t = vg.locate(x, grid)
                exact = torch.softmax(-(x[0, :, None] - c[0, :, 0]) ** 2 / tau, 1)
                # the Hermite cubic of output_coef, for all k attention columns at once
                a, da = vg._attention(grid.nodes, c, tau)
                h = grid.h[0, :, None]
                f0, f1, d0, d1 = a[0, :-1], a[0, 1:], h * da[0, :-1], h * da[0, 1:]
                coef = torch.stack([f0, d0, 3 * (f1 - f0) - 2 * d0 - d1, 2 * (f0 - f1) + d0 + d1])
                for j in range(k):
                    approx = vg.polyval(b, t, coef[..., j].contiguous())[0]
                    worst = max(worst, float((approx - exact[:, j]).abs().max()) / vg.TOL)
    assert 0.02 < worst <= 1.0 and planned >= 0.8 * total, (worst, planned, total)


def test_a_too_coarse_grid_breaks_the_tolerances(grid_always, monkeypatch):
    """The same checks with the grid planned for a 1000x looser bound fail: the tolerances above are real."""
    w, c0, tau = _problem(6000, 16, 0.05)
    monkeypatch.setattr(vg, "TOL", 1e-3)
    with pytest.raises(AssertionError):
        _check_against_reference(w, c0, tau, 1, tol_scale=1e-3)  # tolerances of TOL = 1e-6, grid for 1e-3
    _check_against_reference(w, c0, tau, 1)  # and the tolerances of 1e-3 hold for that grid


@pytest.mark.parametrize("iters", [2, 5])
def test_centroids_moving_past_the_grid_replan(grid_always, monkeypatch, iters):
    """Centroids that move far in one iteration need a finer grid for the next: the grid is refined and the
    iterations go on on it, however many times that happens (a pass that restarted from C_0 on each refinement gave
    up after 3 passes, leaving the layer to the exact path)."""
    replans, orig = [], vg.replan

    def spy(*a, **kw):
        replans.append(1)
        return orig(*a, **kw)

    monkeypatch.setattr(vg, "replan", spy)
    calls = _spy(monkeypatch)
    w, c0, _ = _problem(6000, 8, 0.05, seed=5)
    c0 = 0.2 * c0  # squeezed: the first iteration spreads the centroids 5x, their transitions get 5x sharper
    _check_against_reference(w, c0, auto_tau(c0, 0.05), iters)
    assert len(replans) >= iters - 1 and calls == [True]


def test_saved_positions_and_options_without_effect_give_the_same_results(grid_always, monkeypatch):
    """save_attention holds each weight's interval and position for backward (no re-binning): same numbers;
    chunk_rows and window_tol do not touch the grid path; a second backward (retain_graph) re-bins."""
    calls = _spy(monkeypatch)
    w, c0, tau = _problem(6000, 16, 0.05)
    up = torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=w.dtype)
    base = dkm_cluster(w, c0, tau, 2)
    g = torch.autograd.grad((base[0] * up).sum() + base[1].sum(), w)[0]
    for kw in (dict(save_attention=True), dict(chunk_rows=100, window_tol=0.0)):
        out = dkm_cluster(w, c0, tau, 2, **kw)
        loss = (out[0] * up).sum() + out[1].sum()
        assert torch.equal(out[0], base[0]) and torch.equal(out[1], base[1])
        assert torch.equal(torch.autograd.grad(loss, w, retain_graph=True)[0], g)
        assert torch.equal(torch.autograd.grad(loss, w)[0], g)
    assert calls == [True] * 3


def test_passes_in_chunks_below_the_memory_budget(grid_always, monkeypatch):
    """reuse_bytes bounds one pass's per-weight temporaries: with 0 the passes go in chunks of 2^16 weights (and
    re-bin each time); the numbers are the one-pass ones up to float64 rounding."""
    calls = _spy(monkeypatch)
    w, c0, tau = _problem(150_000, 16, 0.05)
    up = torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=w.dtype)
    outs = []
    for kw in (dict(), dict(reuse_bytes=0), dict(reuse_bytes=0, save_attention=True)):
        out = dkm_cluster(w, c0, tau, 2, **kw)
        outs.append((*out, torch.autograd.grad((out[0] * up).sum() + out[1].sum(), w)[0]))
    assert vg._rows(w.detach().t(), 0) == 1 << 16 and calls == [True] * 3
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("groups,cells", [(1, 1 << 30), (3, 1 << 30), (1, 1000), (3, 1000)])
def test_grid_backward_by_hand_matches_autograd(groups, cells):
    """step_backward (the grid level of backward, by hand) against autograd through step and output_coef, with an
    empty cluster (kept centroid) and per-group tau; in one block of grid values and in blocks of at most
    ``cells`` attention entries (each block's attention recomputed)."""
    from torchdkm.functional import _update

    w, c0, tau = _problem(3000, 8, 0.05, groups=None if groups == 1 else groups)
    x = w.detach()[..., 0] if groups > 1 else w.detach().t()
    c0 = (c0 if groups > 1 else c0[None]).clone()
    c0[:, 0] = 10.0  # far away: empty
    tau = float(tau) if groups == 1 else tau.view(-1, 1, 1)
    grid = vg.plan(x, [c0], tau, max_fraction=10.0)
    blocks, one = vg.parts(grid, 8, cells), vg.parts(grid, 8, 1 << 30)
    assert len(one) == 1 and (len(blocks) > 3 if cells < 1 << 30 else len(blocks) == 1)
    gen = torch.Generator().manual_seed(3)
    tm = vg.moments(*vg.locate(x, grid), x.new_zeros(4, grid.h.numel()))
    p, q = vg.node_weights(tm, grid.h)
    g = torch.randn(c0.shape, generator=gen, dtype=torch.float64)
    g_coef = torch.randn(tm.shape, generator=gen, dtype=torch.float64)
    for gc in (g_coef, None):
        c_in, pl, ql = (v.clone().requires_grad_() for v in (c0, p, q))
        c_out, held = vg.step(grid, c_in, tau, pl, ql, _update, one)
        c_blocks, none = vg.step(grid, c0, tau, p, q, _update, blocks)
        torch.testing.assert_close(c_blocks, c_out.detach(), rtol=1e-13, atol=0)
        assert (none is None) == (len(blocks) > 1)
        loss = (c_out * g).sum()
        if gc is not None:
            coef = vg.output_coef(grid, c_in, c_out, tau, one, held)
            torch.testing.assert_close(vg.output_coef(grid, c0, c_out.detach(), tau, blocks), coef.detach(),
                                       rtol=1e-13, atol=1e-16)
            loss = loss + (coef * gc).sum()
        want = torch.autograd.grad(loss, (c_in, pl, ql))
        got = vg.step_backward(grid, c0, tau, p, q, _update, g, blocks, gc)
        assert bool((c_out[:, 0] == c0[:, 0]).all())  # the empty cluster kept its centroid
        for a_, b_ in zip(got[:3], want):
            torch.testing.assert_close(a_, b_, rtol=1e-10, atol=1e-12 * float(b_.abs().max()))
        if gc is not None:
            torch.testing.assert_close(got[3], coef.detach(), rtol=1e-13, atol=1e-16)


def test_a_grid_larger_than_one_block_is_used_and_matches_one_block(monkeypatch):
    """A grid whose G × U × k attention exceeds MAX_CELLS runs in blocks of grid values (it used to be refused,
    leaving such layers to the O(N·k) exact path): same values and gradients as in one block, within the
    reference's tolerances too."""
    calls = _spy(monkeypatch)
    w, c0, tau = _problem(40_000, 32, 0.05)
    up = torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=w.dtype)
    outs = []
    for cells in (1 << 30, 2000):
        monkeypatch.setattr(vg, "MAX_CELLS", cells)
        out = dkm_cluster(w, c0, tau, 2)
        outs.append((*out, torch.autograd.grad((out[0] * up).sum() + out[1].sum(), w)[0]))
    grid = vg.plan(w.detach().t(), [c0[None]], float(tau))
    assert calls == [True, True] and grid.nodes.shape[1] * 32 > 4 * 2000
    for a, b in zip(*outs):  # (the sums over grid values add in another order)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10 * float(a.detach().abs().max()))
    _check_against_reference(w, c0, tau, 2)
