"""DKM maths as pure tensor functions (no nn.Module).

Shapes: ``w`` is N × d (N vectors of dimension d), ``c`` is k × d (k centroids). Grouped (one LUT per group of
output channels): ``w`` is G × N × d and ``c`` G × k × d, every group clustered on its own, all in batched ops.

The DKM loop, for t = 1..iters::

    A_t = softmax(-||w_i - c_j||^2 / tau)      N × k, from C_{t-1}
    C_t = (A_t^T W) / (A_t^T 1)                k × d (empty clusters keep C_{t-1})
    stop after t if max|C_t - C_{t-1}| <= eps
    W~  = A_T @ C_T

:func:`dkm_cluster` runs it with a memory-lean backward that keeps only the C_t (k × d) and the cluster
masses (k) of each iteration and recomputes attention in row chunks, so its extra memory is O(N·d)
whatever k and iters; for d = 1 it computes attention on a grid of weight values where a proven bound allows
(torchdkm._valuegrid). :func:`dkm_cluster_reference` is the direct autograd version, kept as the test reference.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from . import _valuegrid
from ._attention import _Attention, attention
from .errors import ConfigError

__all__ = ["attention", "auto_chunk_rows", "auto_tau", "channel_scale", "compute_dtype", "dkm_cluster",
           "dkm_cluster_reference", "from_vectors", "hard_cluster", "lookup", "nearest_centroid", "nearest_gaps",
           "record_iterations", "stop_threshold", "to_group_vectors", "to_vectors"]

# A cluster whose total attention mass is below this (in units of "weights") counts as empty: it keeps
# its previous centroid, since dividing by a vanishing mass would blow gradients up.
EMPTY_MASS = 1e-6

Tau = Union[float, Tensor]

_ITERATION_LOGS: List[List[int]] = []  # lists receiving the iteration count of every dkm_cluster forward


@contextlib.contextmanager
def record_iterations() -> Iterator[List[int]]:
    """Collect the number of k-means iterations each :func:`dkm_cluster` call runs (profiling aid).

    Example: ``with record_iterations() as log: model(x)`` -> log == [2, 1, 3, ...], one entry per call."""
    log: List[int] = []
    _ITERATION_LOGS.append(log)
    try:
        yield log
    finally:
        _ITERATION_LOGS.remove(log)


# ----------------------------------------------------------------------------------------------------
# shared pieces


def _update(mass: Tensor, moment: Tensor, c_prev: Tensor) -> Tensor:
    """C_t = moment / mass, keeping c_prev for empty clusters. mass: (G ×) k, moment: (G ×) k × d."""
    full = mass > EMPTY_MASS
    return torch.where(full[..., None], moment / torch.where(full, mass, 1.0)[..., None], c_prev)


def _row_chunks(n: int, rows: int):
    for start in range(0, n, rows):
        yield slice(start, min(n, start + rows))


def auto_chunk_rows(n: int, k: int, d: int) -> int:
    """Rows per chunk. A backward chunk holds ~3 N_c × k temporaries, so N_c × k ≤ N·d/4 keeps them within
    ~0.75× the weight tensor; the 2^18-element floor keeps per-op overhead small (chunks of 2^16 elements
    measured ~3x slower), and only matters for tensors under 1 M weights, where the chunk is ≤ 3 MiB."""
    budget = max(n * d // 4, 1 << 18)
    return max(64, min(n, budget // k))


# ----------------------------------------------------------------------------------------------------
# the memory-lean autograd function


class _Opts(NamedTuple):
    tau: Union[float, Tensor]  # a float, or G × 1 × 1 (one per group)
    iters: int
    eps: float
    eps_rel: float
    rows: int
    window_tol: float
    reuse_bytes: int
    save_attention: bool
    hard_output: bool
    group: object = None  # a torch.distributed process group to shard the rows over, or None


def _shard(n: int, group, rank: Optional[int] = None) -> Tuple[int, int]:
    """Rank ``rank``'s (default: this rank's) contiguous share [lo, hi) of n rows (all of them without a group)."""
    if group is None:
        return 0, n
    import torch.distributed as dist

    r = dist.get_rank(group) if rank is None else rank
    size = dist.get_world_size(group)
    return n * r // size, n * (r + 1) // size


def _sum_ranks_(t: Tensor, group) -> Tensor:
    """Sum ``t`` over the ranks of ``group``, in place (nothing without a group). For k-sized statistics only."""
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(t, group=group)
    return t


# Rows moved per collective when a rank's rows are sent in pieces (elements): bounds the staging buffers to 4 MiB
# (float32) whatever the layer's size.
PIECE = 1 << 20


def _pieces(groups: int, d: int, lo: int, hi: int):
    """Row ranges (a, b) covering [lo, hi) with at most PIECE values over all groups each (at least one row)."""
    step = max(1, PIECE // (groups * d))
    return [(a, min(hi, a + step)) for a in range(lo, hi, step)]


def _gather_rows_(t: Tensor, group) -> Tensor:
    """Fill ``t`` (G × N × d) on every rank from each rank's own rows [lo, hi), in place: the owner of each share
    broadcasts it. N·d values sent per rank, no weight-sized buffer (an all-reduce sends about twice that, and gloo's
    all-gather stages a second copy of the whole output: both measured)."""
    import torch.distributed as dist

    me, size = dist.get_rank(group), dist.get_world_size(group)
    for r in range(size):
        src = dist.get_global_rank(group, r)
        for a, b in _pieces(t.shape[0], t.shape[2], *_shard(t.shape[1], group, r)):
            view = t[:, a:b]
            if view.is_contiguous():  # one group: the rows are one block of memory, sent in place
                dist.broadcast(view, src=src, group=group)
                continue
            buf = view.contiguous() if r == me else view.new_empty(view.shape)
            dist.broadcast(buf, src=src, group=group)
            if r != me:
                view.copy_(buf)
    return t


def _mean_rows_into_(dst: Tensor, g: Tensor, group) -> Tensor:
    """dst (G × n_r × d, this rank's rows) = the mean over ranks of their ``g`` (G × N × d) at this rank's rows:
    a reduce to each share's owner in turn, in pieces, so no rank holds more than its rows and one piece."""
    import torch.distributed as dist

    me, size = dist.get_rank(group), dist.get_world_size(group)
    lo = _shard(g.shape[1], group)[0]
    for r in range(size):
        dst_rank = dist.get_global_rank(group, r)
        for a, b in _pieces(g.shape[0], g.shape[2], *_shard(g.shape[1], group, r)):
            slot = dst[:, a - lo:b - lo] if r == me else None
            in_place = slot is not None and slot.is_contiguous()  # one group: reduced straight into dst
            buf = slot.copy_(g[:, a:b]) if in_place else g[:, a:b].clone(memory_format=torch.contiguous_format)
            dist.reduce(buf, dst=dst_rank, group=group)  # gloo may use a non-root's buffer as scratch: never g itself
            if slot is not None and not in_place:
                slot.copy_(buf)
    return dst.div_(size)


def _transposed(v: Tensor) -> Tensor:
    """G × N × d -> G × d × N (a free view for d = 1, one copy otherwise: see torchdkm._attention)."""
    return v.transpose(1, 2) if v.shape[2] == 1 else v.transpose(1, 2).contiguous()


def _untransposed(v: Tensor) -> Tensor:
    return v.transpose(1, 2) if v.shape[1] == 1 else v.transpose(1, 2).contiguous()


class _DKMLean(torch.autograd.Function):
    """Sharded (``o.group``): each rank computes attention for its own rows [lo, hi) only, and keeps only their
    state; per iteration the k·(d+1) statistics are all-reduced. The whole W~ and the whole gradient are built once,
    in the returned tensor, from each owner's rows (:func:`_gather_rows_`)."""

    @staticmethod
    def forward(ctx, w: Tensor, c0: Tensor, o: _Opts):
        groups, n, k = w.shape[0], w.shape[1], c0.shape[1]
        lo, hi = _shard(n, o.group)
        x = _transposed(w[:, lo:hi])  # this rank's rows (all of them without a group): G × d × n_r
        chunks = list(_row_chunks(hi - lo, o.rows))
        # Keep an iteration's attention blocks (to reuse them for the output, and in backward) when they fit the
        # budget; with one chunk the block is alive anyway. Sharded, the budget holds this rank's rows only.
        keep = len(chunks) <= 1 or groups * (hi - lo) * k * w.element_size() <= o.reuse_bytes
        thr = stop_threshold(c0, o.eps, o.eps_rel) if (o.eps > 0 or o.eps_rel > 0) else None
        cs, masses, blks = [c0], [], None
        for _ in range(o.iters):
            c_prev, blks = cs[-1], None  # drop the previous iteration's blocks before making new ones
            att = _Attention(c_prev, o.tau, o.window_tol)
            mass = torch.zeros(groups, k, dtype=w.dtype, device=w.device)
            moment = torch.zeros_like(c0)
            kept = []
            for s in chunks:
                blk = att(x[:, :, s])
                mass += blk.colsum()
                moment += blk.colsum(x[:, :, s])
                if keep:
                    kept.append(blk)
            blks = kept if keep else None
            if o.group is not None:  # one all-reduce of the k·(d+1) statistics per group and iteration
                stats = _sum_ranks_(torch.cat([mass[..., None], moment], 2), o.group)
                mass, moment = stats[..., 0].contiguous(), stats[..., 1:]
            c = _update(mass, moment, c_prev)
            cs.append(c)
            masses.append(mass)
            if thr is not None and _converged(c, c_prev, thr):  # one host sync per iteration
                break
        c_last = cs[-1]
        if o.hard_output:  # value: nearest centroid of C_T; gradient (backward): the soft output's
            out = lookup(c_last, nearest_centroid(w, c_last))
        else:
            # sharded: this rank's rows go straight into the whole output (G × N × d), the others' arrive there
            out = w.new_empty(w.shape) if o.group is not None else None
            out_t = torch.empty_like(x) if out is None else out[:, lo:hi].transpose(1, 2)
            att = None if blks is not None else _Attention(cs[-2], o.tau, o.window_tol)
            for i, s in enumerate(chunks):
                out_t[:, :, s] = (blks[i] if blks is not None else att(x[:, :, s])).mix(c_last)
            out = _untransposed(out_t) if out is None else _gather_rows_(out, o.group)
        ctx.save_for_backward(w, *cs, *masses)
        ctx.o, ctx.iters_run, ctx.keep = o, len(masses), keep
        ctx.blocks = blks if o.save_attention else None
        for log in _ITERATION_LOGS:
            log.append(len(masses))
        return out, c_last.clone()

    @staticmethod
    def backward(ctx, g_out: Optional[Tensor], g_c: Optional[Tensor]):
        saved, o = ctx.saved_tensors, ctx.o
        t_run = ctx.iters_run
        w, cs, masses = saved[0], saved[1 : t_run + 2], saved[t_run + 2 :]
        lo, hi = _shard(w.shape[1], o.group)
        x = _transposed(w[:, lo:hi])
        chunks = list(_row_chunks(hi - lo, o.rows))
        g_c = torch.zeros_like(cs[-1]) if g_c is None else g_c.clone()
        last, ctx.blocks = ctx.blocks, None  # A_T blocks (from C_{T-1}) saved by forward, or None
        if o.group is None:
            g_x, gt = torch.empty_like(x), None if g_out is None else _transposed(g_out)
        else:
            # Sharded: the backward is linear in the incoming gradients, so the mean over ranks of each rank's full
            # backward (what data-parallel training averages) is one backward of their mean, which the ranks split by
            # rows. Each rank needs that mean at its own rows only; it waits in this rank's rows of the returned
            # gradient (G × N × d), read there before the pass over iteration T overwrites it. Every rank ends
            # with the same whole gradient; averaging it again changes nothing.
            size = float(torch.distributed.get_world_size(o.group))
            g_w = w.new_empty(w.shape)
            g_x = g_w[:, lo:hi].transpose(1, 2)  # G × d × n_r view
            gt = None if g_out is None else _mean_rows_into_(g_w[:, lo:hi], g_out, o.group).transpose(1, 2)
            g_c = _sum_ranks_(g_c, o.group).div_(size)

        # W~ = A_T C_T. Its part of dL/dC_T, A_T^T g_out, is a reduction over all rows needed before the last
        # iteration's pass: a first pass computes only that. Its part of dL/dA_T (g_out · C_T) goes through the
        # same softmax as the last iteration's, so it joins that pass (one softmax backward for both).
        if gt is not None:
            att = _Attention(cs[-2], o.tau, o.window_tol)
            fresh = [] if last is None and ctx.keep else None
            part = torch.zeros_like(g_c)
            for i, s in enumerate(chunks):
                blk = last[i] if last is not None else att(x[:, :, s])
                if fresh is not None:
                    fresh.append(blk)
                part += blk.colsum(gt[:, :, s])
            g_c += _sum_ranks_(part, o.group)
            last = last if last is not None else fresh

        # Iterations in reverse: C_t = M_t / S_t with M_t = A_t^T W, S_t = A_t^T 1.
        for t in range(t_run, 0, -1):
            c_prev, c_t, mass = cs[t - 1], cs[t], masses[t - 1]
            full = mass > EMPTY_MASS
            inv = torch.where(full, 1.0 / torch.where(full, mass, 1.0), 0.0)
            g_m = g_c * inv[..., None]  # dL/dM_t
            g_s = -(g_c * c_t).sum(-1) * inv  # dL/dS_t
            g_c_prev = torch.zeros_like(g_c)
            att = _Attention(c_prev, o.tau, o.window_tol)
            reuse = last if t == t_run else None
            out_term = gt is not None and t == t_run
            for i, s in enumerate(chunks):
                xs = x[:, :, s]
                blk = reuse[i] if reuse is not None else att(xs)
                g_a = blk.rowdot(xs, g_m, g_s)  # dL/dA_t (G × k × n), then + the output's g_out · C_T
                g_l = blk.softmax_backward_(blk.rowdot_add_(g_a, gt[:, :, s], cs[-1]) if out_term else g_a)
                g_xs = blk.mix(g_m).add_(blk.logit_grad_w(g_l, c_prev))
                # the first pass sets g_x (sharded, over the mean incoming gradient it has just read), later ones add
                if t == t_run:
                    g_x[:, :, s] = g_xs
                else:
                    g_x[:, :, s] += g_xs
                g_c_prev += blk.logit_grad_c(g_l, xs, c_prev)
            last = reuse = None
            # + empty clusters passing C_{t-1} through (the same on every rank: added once, after the sum)
            g_c = _sum_ranks_(g_c_prev, o.group).add_(torch.where(full[..., None], 0.0, g_c))
        return (_untransposed(g_x) if o.group is None else _gather_rows_(g_w, o.group)), None, None


def _converged(c: Tensor, c_prev: Tensor, thr: Tensor) -> bool:
    """Early stop: the largest centroid move of each table within its threshold; with several tables (grouped
    LUTs), of the median table. Requiring every one of hundreds of tables measured to run every iteration on every
    step (a few tables always move by 1-3× their threshold), while each is warm-started from its last centroids and
    keeps converging on the next step."""
    ratio = (c - c_prev).abs().amax((1, 2)) / thr.clamp_min(torch.finfo(c.dtype).tiny)
    return bool((ratio if ratio.numel() == 1 else ratio.median()) <= 1)


def nearest_gaps(c: Tensor) -> Tensor:
    """Euclidean distance of every centroid to its nearest other centroid: c (G ×) k × d -> (G ×) k
    (inf when k = 1)."""
    if c.dim() == 2:
        return nearest_gaps(c[None])[0]
    if c.shape[2] == 1:  # sorted neighbours: O(k log k)
        v = c[..., 0].sort(1).values
        gap = v[:, 1:] - v[:, :-1]
        inf = gap.new_full((gap.shape[0], 1), float("inf"))
        return torch.minimum(torch.cat([gap, inf], 1), torch.cat([inf, gap], 1))
    d = torch.cdist(c, c)
    return d.masked_fill_(torch.eye(c.shape[1], dtype=torch.bool, device=c.device), float("inf")).amin(2)


def stop_threshold(c: Tensor, eps: float, eps_rel: float) -> Tensor:
    """The early-stop threshold max(eps, eps_rel × s), s = the median over centroids of the Euclidean distance to
    the nearest other centroid (0 when k = 1): a 0-d tensor for c: k × d, one per group (G) for c: G × k × d."""
    batched = c.dim() == 3
    g = c.shape[0] if batched else 1
    if c.shape[-2] < 2 or eps_rel == 0:
        out = c.new_full((g,), eps)
    else:
        out = (nearest_gaps(c.reshape(g, *c.shape[-2:])).median(1).values * eps_rel).clamp(min=eps)
    return out if batched else out.reshape(())


def _check_inputs(w: Tensor, c0: Tensor, tau, iters: int, eps: float) -> Tensor:
    """The temperature as a G-vector (float64) after checking every input."""
    ok = (w.dim() == c0.dim() == 2 and w.shape[1] == c0.shape[1]) or (
        w.dim() == c0.dim() == 3 and w.shape[0] == c0.shape[0] and w.shape[2] == c0.shape[2])
    if not ok:
        raise ConfigError(f"dkm_cluster wants w: N × d and c0: k × d, or grouped w: G × N × d and c0: G × k × d, "
                          f"got w {tuple(w.shape)} and c0 {tuple(c0.shape)}")
    if w.shape[-2] == 0:
        raise ConfigError(f"dkm_cluster got w with 0 rows {tuple(w.shape)}: need at least one vector")
    groups = w.shape[0] if w.dim() == 3 else 1
    t = torch.as_tensor(tau, dtype=torch.float64).detach().cpu().reshape(-1)
    if t.numel() not in (1, groups) or not bool(((t > 0) & torch.isfinite(t)).all()):
        raise ConfigError(f"dkm_cluster got tau={tau!r}: allowed is a finite float > 0, or one per group ({groups})")
    if not isinstance(iters, int) or iters < 1:
        raise ConfigError(f"dkm_cluster got iters={iters!r}: allowed is an integer >= 1")
    if not (eps >= 0):
        raise ConfigError(f"dkm_cluster got eps={eps!r}: allowed is a float >= 0")
    return t.expand(groups)


def compute_dtype(w: Tensor) -> torch.dtype:
    """The dtype DKM computes in for a tensor ``w``: float32 and float64 as they are, anything else float32."""
    return w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32


REUSE_BYTES = 64 << 20


def dkm_cluster(
    w: Tensor,
    c0: Tensor,
    tau: Tau,
    iters: int,
    eps: float = 0.0,
    *,
    eps_rel: float = 0.0,
    chunk_rows: Optional[int] = None,
    window_tol: float = 1e-7,
    reuse_bytes: int = REUSE_BYTES,
    save_attention: bool = False,
    hard_output: bool = False,
    process_group=None,
    value_grid: bool = True,
) -> Tuple[Tensor, Tensor]:
    """Differentiable k-means: (W~, C) from w (N × d) and warm-start centroids c0 (k × d, no gradient).

    Example: w (1000 × 1), c0 (16 × 1) -> W~ (1000 × 1) clustered weights, C (16 × 1).
    Grouped: w (G × N × d), c0 (G × k × d) -> W~ (G × N × d), C (G × k × d), each group on its own (batched);
    ``tau`` is then a float or a G-vector (one temperature per group).
    Gradients reach ``w`` through every iteration; half-precision inputs are computed in float32.

    * Early stop after iteration t when max|C_t - C_{t-1}| <= max(eps, eps_rel × s), s = the median distance of
      c0's centroids to their nearest other centroid (:func:`stop_threshold`): ``eps`` is absolute, ``eps_rel``
      scale-free; both 0 run exactly ``iters`` iterations. Grouped: per table, and the median table decides.
    * ``window_tol``: for d = 1, attention is restricted to each weight's nearest few centroids where the
      left-out mass is provably below this fraction (see torchdkm._attention); 0 forces the dense path.
    * ``reuse_bytes``: an iteration's attention (N × k) is kept, and reused for the output and in backward
      (the last iteration's attention serves both its pass and the output's), when it takes at most this many
      bytes; it lives only during this call's forward, and again during its backward. 0: always recompute,
      extra memory O(N·d) whatever k.
    * ``save_attention``: also hold the forward's last attention until backward (within ``reuse_bytes``), which
      then recomputes one attention fewer; the memory is held between forward and backward.
    * ``hard_output``: the returned W~ is each vector's nearest centroid of C_T (what finalize ships) while the
      gradient is the soft output's (straight-through from soft to hard); skips the forward's output pass.
    * ``process_group``: a torch.distributed group whose ranks hold the same w and c0 (data-parallel training):
      each rank computes attention for its own share of the rows and keeps only their state (the automatic
      ``chunk_rows`` and the ``reuse_bytes`` budget apply to that share), the k·(d+1) statistics are all-reduced per
      iteration, and W~ and the gradient reach every rank whole, each rank's rows broadcast by their owner (the
      incoming gradient is averaged onto each owner's rows). The gradient every rank gets is the mean over ranks of
      the single-process one, which is what data-parallel training then averages to.
    * ``value_grid``: for d = 1 without a process group, compute attention on a grid of U weight values and
      interpolate it at the weights (torchdkm._valuegrid): O(N + U·k) instead of O(N·k), each attention entry
      within 1e-6 (so W~ within about 1e-6 of the largest centroid gap) and its derivative within about 6e-5 of the
      steepest attention slope. Used where it meets that bound with U <= N/8 grid values, else (and for False) the
      exact path. On the grid path ``reuse_bytes`` bounds the temporaries (the grid's, and those of one pass over
      the weights, ~40 bytes a weight: above it the passes go in chunks), ``save_attention`` holds each weight's
      grid interval and position (12 bytes per float32 weight) until backward; ``chunk_rows`` and ``window_tol``
      have no effect.
    """
    t = _check_inputs(w, c0, tau, iters, eps)
    if not (eps_rel >= 0 and math.isfinite(eps_rel)):
        raise ConfigError(f"dkm_cluster got eps_rel={eps_rel!r}: allowed is a finite float >= 0")
    if w.dim() == 2:  # squeeze, not out[0]: indexing's backward would allocate and copy a weight-sized gradient
        out, c = dkm_cluster(w.unsqueeze(0), c0.unsqueeze(0), t, iters, eps, eps_rel=eps_rel, chunk_rows=chunk_rows,
                             window_tol=window_tol, reuse_bytes=reuse_bytes, save_attention=save_attention,
                             hard_output=hard_output, process_group=process_group, value_grid=value_grid)
        return out.squeeze(0), c.squeeze(0)
    dt = compute_dtype(w)
    wc = w.to(dt)
    c = c0.detach().to(dt, copy=True)  # saved for backward: must not alias the caller's (mutable) buffer
    groups, n, d = wc.shape
    group = _usable_group(process_group)
    share = n if group is None else -(-n // torch.distributed.get_world_size(group))  # rows this rank works on
    # chunk_rows counts vectors over all groups; a chunk takes the same columns of every group. Automatic chunks
    # are sized from this rank's rows, so that sharded temporaries shrink with the share.
    rows = -(-(chunk_rows or auto_chunk_rows(groups * share, c.shape[1], d)) // groups)
    # One group: a plain float keeps the scalar kernels (and the windowed path) of the per-tensor case.
    tau_arg = float(t[0]) if groups == 1 else t.to(dt).to(w.device).view(groups, 1, 1)
    o = _Opts(tau_arg, iters, float(eps), float(eps_rel), int(rows), float(window_tol), int(reuse_bytes),
              bool(save_attention), bool(hard_output), group)
    if value_grid and d == 1 and o.group is None:
        got = _grid_cluster(wc, c, o)
        if got is not None:
            return got[0].to(w.dtype), got[1]
    w_tilde, c = _DKMLean.apply(wc, c, o)
    return w_tilde.to(w.dtype), c


def _grid_cluster(w: Tensor, c0: Tensor, o: _Opts) -> Optional[Tuple[Tensor, Tensor]]:
    """dkm_cluster on a value grid (d = 1), or None where it does not pay or cannot meet its bound."""
    thr = stop_threshold(c0, o.eps, o.eps_rel) if (o.eps > 0 or o.eps_rel > 0) else None
    got = _valuegrid.cluster(
        w, c0, o.tau, o.iters, update=_update, converged=None if thr is None else lambda c, p: _converged(c, p, thr),
        hard=(lambda x, c: lookup(c, nearest_centroid(x[..., None], c))[..., 0]) if o.hard_output else None,
        budget=o.reuse_bytes, keep=o.save_attention)
    if got is None:
        return None
    for log in _ITERATION_LOGS:
        log.append(got[2])
    return got[0], got[1]


def _usable_group(group):
    """``group`` when it has more than one rank, else None (one process: nothing to shard)."""
    if group is None:
        return None
    import torch.distributed as dist

    return group if dist.is_initialized() and dist.get_world_size(group) > 1 else None


def dkm_cluster_reference(w: Tensor, c0: Tensor, tau: Tau, iters: int, eps: float = 0.0, *,
                          eps_rel: float = 0.0) -> Tuple[Tensor, Tensor]:
    """Direct autograd DKM (stores N × k distances and attention of every iteration), plain or grouped like
    :func:`dkm_cluster`. Test reference."""
    t = _check_inputs(w, c0, tau, iters, eps)
    if w.dim() == 2:
        out, c = dkm_cluster_reference(w[None], c0[None], t, iters, eps, eps_rel=eps_rel)
        return out[0], c[0]
    t = t.to(w.dtype).to(w.device).view(-1, 1, 1)
    c = c0.detach().to(w.dtype)
    thr = stop_threshold(c, eps, eps_rel)
    a = None
    for _ in range(iters):
        d2 = ((w[:, :, None, :] - c[:, None, :, :]) ** 2).sum(-1)  # G × N × k
        a = torch.softmax(-d2 / t, dim=2)
        c_new = _update(a.sum(1), a.transpose(1, 2) @ w, c)
        done = (eps > 0 or eps_rel > 0) and _converged(c_new, c, thr)
        c = c_new
        if done:
            break
    return a @ c, c


# ----------------------------------------------------------------------------------------------------
# hard assignment, temperature, vector layout


def nearest_centroid(w: Tensor, c: Tensor, chunk_rows: int = 1 << 16) -> Tensor:
    """Index of each vector's nearest centroid (squared Euclidean): w N × d, c k × d -> int64[N]; grouped,
    w G × N × d, c G × k × d -> int64 G × N (indices into each group's own table)."""
    if w.dim() == 2:
        return nearest_centroid(w[None], c[None], chunk_rows)[0]
    w, c = w.detach(), c.detach().to(w.dtype)
    cc = (c * c).sum(2)[:, None, :]  # G × 1 × k
    ct = c.transpose(1, 2)
    out = torch.empty(w.shape[:2], dtype=torch.long, device=w.device)
    for s in _row_chunks(w.shape[1], max(1, chunk_rows // w.shape[0])):
        out[:, s] = torch.baddbmm(cc, w[:, s], ct, alpha=-2.0).argmin(2)
    return out


def hard_cluster(w: Tensor, c: Tensor) -> Tensor:
    """Each vector replaced by its nearest centroid: N × d (or G × N × d, grouped)."""
    return lookup(c.to(w.dtype), nearest_centroid(w, c))


def lookup(c: Tensor, idx: Tensor) -> Tensor:
    """Centroid rows by index: c k × d with idx (N) -> N × d; grouped, c G × k × d with idx G × N ->
    G × N × d."""
    if c.dim() == 2:
        return c[idx]
    return torch.gather(c, 1, idx[..., None].expand(-1, -1, c.shape[2]))


def auto_tau(c: Tensor, scale: float) -> Union[float, Tensor]:
    """Scale-free temperature: scale × median over centroids of the squared distance to the nearest other
    centroid. A weight at a centroid then has logit gap ≥ 1/scale to that neighbour, whatever the layer's
    weight scale. c: k × d -> float; grouped c: G × k × d -> float64 G-vector, one per group."""
    if c.dim() == 2:
        return float(auto_tau(c[None], scale)[0])
    c = c.detach().double()
    if c.shape[1] < 2:
        return torch.full((c.shape[0],), float(scale), dtype=torch.float64)
    nn = nearest_gaps(c).pow(2)
    nn = torch.where(nn > 0, nn, float("nan"))  # duplicates do not count
    med = nn.nanquantile(0.5, dim=1, interpolation="lower")
    # all centroids of a group equal: any positive tau gives the same uniform attention
    flat = (c.abs().amax((1, 2)) ** 2).clamp_min(1e-12)
    return scale * torch.where(torch.isnan(med), flat, med).cpu()


def to_vectors(weight: Tensor, dim: int) -> Tuple[Tensor, int]:
    """Flatten ``weight`` in row-major (C) order into N × dim vectors; returns (vectors, pad).

    The tail is zero-padded when dim does not divide numel; ``pad`` is the number of padded entries.
    """
    flat = weight.reshape(-1)
    pad = (-flat.numel()) % dim
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, dim), pad


def to_group_vectors(weight: Tensor, dim: int, groups: int, axis: Optional[int] = None) -> Tuple[Tensor, int]:
    """``weight`` as G × (N/G) × dim vectors, group g holding axis-0 slices g·C0/G .. (g+1)·C0/G - 1; returns
    (vectors, pad). ``axis`` None: row-major (C) order, the tail zero-padded when dim does not divide numel (with
    G > 1 each group's numel must be a multiple of dim). ``axis`` a: each vector holds dim consecutive entries along
    axis a at fixed other coordinates (dim must divide that axis, and for a = 0 each group's C0/G slices), vectors
    ordered row-major over (axes before a, a / dim, axes after a); pad 0.

    Example: a 3×3 conv weight 32 × 16 × 3 × 3, dim=4, axis=0 -> 1 × 1152 × 4, vector i = w[4j:4j+4, c, y, x]."""
    if axis is None:
        vecs, pad = to_vectors(weight, dim)
        return vecs.view(groups, -1, dim), pad
    shape = weight.shape
    pre, post = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
    vecs = weight.reshape(pre, shape[axis] // dim, dim, post).transpose(2, 3)
    return vecs.reshape(groups, -1, dim), 0


def channel_scale(weight: Tensor, kind: str = "max") -> Tensor:
    """Per-axis-0 scale of each slice, max |w| (``kind="max"``) or sqrt(mean w²) (``"rms"``), 1 for an all-zero
    slice, shaped C0 × 1 × ... to broadcast."""
    dims = tuple(range(1, weight.dim()))
    if kind == "max":
        s = weight.abs().amax(dims, keepdim=True) if dims else weight.abs()
    elif kind == "rms":
        s = weight.square().mean(dims, keepdim=True).sqrt() if dims else weight.abs()
    else:
        raise ConfigError(f"channel_scale got kind={kind!r}: allowed are 'max' and 'rms'")
    return torch.where(s > 0, s, torch.ones_like(s))


def with_slice_max(hard: Tensor, original: Tensor) -> Tensor:
    """``hard`` with each axis-0 slice's largest-|w| entry of ``original`` put back (same shape): a weight whose
    max-|w| channel scale is ``original``'s, so a LUT made for ``original``'s scaled slices reads ``hard`` as its
    own entries (a finalized weight lies within ±scale)."""
    flat, ref = hard.detach().reshape(hard.shape[0], -1).clone(), original.detach().reshape(original.shape[0], -1)
    j = ref.abs().argmax(1, keepdim=True)
    return flat.scatter_(1, j, ref.gather(1, j).to(flat.dtype)).view(hard.shape)


class _ScaledSlices(torch.autograd.Function):
    """(w / s in float32 or float64, s) with s = channel_scale(w), saving only w (the parameter itself, in its own
    dtype) and s: autograd would hold a float32 copy of a half-precision weight and |w| (4 + 4 bytes a weight)."""

    @staticmethod
    def forward(ctx, w: Tensor, kind: str):
        wc = w.to(compute_dtype(w))
        s = channel_scale(wc, kind)
        ctx.save_for_backward(w, s)
        ctx.kind = kind
        return wc / s, s

    @staticmethod
    def backward(ctx, g_v: Tensor, g_s: Tensor):
        w, s = ctx.saved_tensors
        wc = w.to(s.dtype)
        dims = tuple(range(1, w.dim()))
        g_w = g_v / s
        # through s: dL/ds = g_s - sum_j g_v,j w_j / s^2 per slice, then ds/dw (zero for an all-zero slice, s = 1)
        g_scale = g_s - (g_v * wc).sum(dims, keepdim=True) / s.square() if dims else g_s - g_v * wc / s.square()
        if ctx.kind == "max":  # ds/dw: sign(w) at the slice's maxima of |w|, shared evenly among ties (as amax)
            at_max = (wc.abs() == s) & (wc != 0)
            count = at_max.sum(dims, keepdim=True).clamp_(min=1) if dims else at_max.to(s.dtype)
            g_w += torch.where(at_max, wc.sign() * g_scale / count, 0.0)
        else:  # rms: ds/dw_j = w_j / (n s)
            g_w += wc * g_scale / (wc[0].numel() * s) if dims else wc.sign() * g_scale
        return g_w.to(w.dtype), None


def scaled_slices(weight: Tensor, kind: str = "max") -> Tuple[Tensor, Tensor]:
    """(weight / channel_scale(weight, kind), the scale), both in the compute dtype (float32 for half weights), with
    the gradients of that expression; the backward holds only ``weight`` and the scale."""
    if kind not in ("max", "rms"):
        raise ConfigError(f"channel_scale got kind={kind!r}: allowed are 'max' and 'rms'")
    return _ScaledSlices.apply(weight, kind)


def from_vectors(vectors: Tensor, shape, pad: int, axis: Optional[int] = None) -> Tensor:
    """Inverse of :func:`to_vectors` and of :func:`to_group_vectors` (with the same ``axis``)."""
    if axis is not None:
        pre, post = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
        d = vectors.shape[-1]
        out = vectors.reshape(pre, shape[axis] // d, post, d).transpose(2, 3).reshape(shape)
        # reshape can leave odd strides on size-1 axes (e.g. 12, 1, 12, 12 for 24 × 12 × 1 × 1); some CPUs' conv
        # kernels then take another path than for the weight as stored, and outputs differ in the last bit
        return out if out.stride() == torch.empty(shape, device="meta").stride() else \
            out.clone(memory_format=torch.contiguous_format)
    flat = vectors.reshape(-1)
    if pad:
        flat = flat[: flat.numel() - pad]
    return flat.view(shape)
