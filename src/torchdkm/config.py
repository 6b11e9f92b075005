"""DKMConfig and per-layer rules.

Rules map a module name to a :class:`DKMConfig` (compress with it) or ``None`` (skip). A key is either an
exact module name (``"features.0"``) or a regex prefixed with ``"re:"`` that must match the whole name
(``re.fullmatch``). Precedence, highest first:

1. an exact-name rule;
2. the first ``re:`` rule, in the mapping's order, that matches;
3. the global config, for supported layers with at least ``min_numel`` weights.

A layer named by a rule (1 or 2) is compressed whatever its size.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Mapping, Optional, Union

from .errors import ConfigError

TauSpec = Union[float, str]
SCALE_KINDS = {False: None, True: "max", "max": "max", "rms": "rms"}
VECTOR_AXES = ("flat", "output", "input", "auto")
_NAMED_AXES = {"output": 0, "input": 1}


@dataclass(frozen=True)
class DKMConfig:
    """How one layer is clustered.

    bits:      index width b; k = 2**bits centroids (1..8).
    dim:       cluster dimension d: weights are clustered as d-vectors (b/d bits per weight).
    tau:       softmax temperature. ``"auto"`` (default) is scale-free:
               tau = tau_scale * median_j min_{l != j} ||c_j - c_l||^2 over the layer's current centroids,
               recomputed every step, so one setting fits layers of any weight scale.
               A positive float is used as is.
    tau_scale: the factor of the ``"auto"`` rule (with a schedule: its value at the start).
    tau_scale_end: with ``anneal_steps`` > 0, tau_scale moves to this value along a half cosine over the first
               ``anneal_steps`` calls of ``torchdkm.step(model)`` and stays there (soft to hard).
    anneal_steps: length of that schedule in training steps (0: tau_scale is constant).
    hard_forward: train with the hard-assigned weights C[nearest] in the forward pass (what ``finalize``
               ships, so training, evaluation and the shipped model agree), while gradients flow through
               the soft DKM output A·C (straight-through from soft to hard; Agustsson et al. 2017).
               False: the network computes with A·C itself, as in the DKM paper.
    direct_grad: β >= 0. Adds β × each weight's own upstream gradient to the gradient DKM gives it through the
               attention and the centroids (the forward value is unchanged: A·C + β·(W − stopgrad(W))). Near the
               hard regime DKM moves every weight of a cluster with the cluster's mean gradient, so a weight
               leaves its cluster only from near a boundary; the direct term lets each weight follow its own
               gradient across boundaries, as straight-through k-means does, while the centroids stay DKM's
               attention-weighted means. 0 (default): DKM's gradient only, as in the paper.
    iters:     maximum k-means iterations per forward pass (warm-started from the last step).
    eps, eps_rel: stop early after an iteration when max|C_new - C| <= max(eps, eps_rel * s), s = the median
               distance of a centroid to its nearest other centroid at the start of the step. ``eps_rel`` is
               scale-free (default: no centroid moved 1% of the typical spacing); ``eps`` is absolute; both 0
               run exactly ``iters`` iterations.
    save_attention: keep the forward's last attention (N × k, up to 64 MiB per layer) until backward, which then
               recomputes it once less; memory is held between forward and backward (default off).
    group_size: None (default): one k × d LUT per layer ("per-tensor"). g: every g consecutive slices along axis 0
               (output channels of Linear/Conv, rows of Embedding, input rows of transformers Conv1D) get their own
               LUT, clustered on their own (Core ML's ``per_grouped_channel``). g must divide the layer's axis-0
               size, and d its number of weights per group.
    channel_scale: False (default), "max" (or True) or "rms": divide each axis-0 slice by its max |w| or by its
               root mean square before clustering and multiply it back after, so one LUT serves slices of different
               magnitude (Core ML's per-channel scale); the scales are stored (one per slice, in the LUT's dtype).
               "max" is coremltools' choice; "rms" is robust to a few outlier weights per slice (measured far better
               on MiniLM, whose hidden dimension has outliers; "max" better on MobileNetV2 and SmolLM2, see the
               README). With dim > 1, dim must divide the slice size.
    vector_axis: how d-vectors (dim > 1) are formed from the weight:
               "flat": d consecutive weights in row-major order (for a Linear, along its inputs; for a 3×3 conv,
               along the kernel width and across kernel rows);
               "output": d consecutive slices of axis 0 (output channels of Linear/Conv) at the same position;
               "input": d consecutive entries of axis 1 (input channels of a conv, inputs of a Linear);
               "auto" (default): "flat" where Core ML can ship it (dim divides the last axis of size > 1), else
               "output", else "input" (whichever dim divides; per layer, see ``torchdkm.report``); "flat" where none
               does. Measured level with "flat" at 1 bit (16 × 4-d) on two CNNs (docs/results.md).
               Core ML reads vectors along one axis, which "flat" is only when dim divides the last axis.
               "output" needs dim to divide each group's slices (C0 / G), "input" dim to divide axis 1.
    shard:     under torch.distributed (a process group of R > 1 ranks, e.g. torchrun + DDP), split this layer's
               DKM rows across the ranks of the default group: each computes attention for N/R rows and keeps
               only their state for the backward; the k·(d+1) statistics are all-reduced per iteration, and each
               rank's rows of the clustered weight and of its gradient are broadcast by their owner (results equal
               one process's to float rounding; see torchdkm.functional.dkm_cluster). No effect in one process.
    min_numel: layers with fewer weights are left alone unless a rule names them.
    seed:      seed of the k-means initialisation.
    chunk_rows: rows per chunk in the memory-lean backward (None = chosen from sizes).
    """

    bits: int = 4
    dim: int = 1
    tau: TauSpec = "auto"
    tau_scale: float = 0.1
    tau_scale_end: Optional[float] = None
    anneal_steps: int = 0
    hard_forward: bool = False
    direct_grad: float = 0.0
    iters: int = 3
    eps: float = 0.0
    eps_rel: float = 1e-2
    save_attention: bool = False
    group_size: Optional[int] = None
    channel_scale: Union[bool, str] = False
    vector_axis: str = "auto"
    shard: bool = False
    min_numel: int = 4096
    seed: int = 0
    chunk_rows: Optional[int] = None

    def __post_init__(self):
        _check_int("bits", self.bits, 1, 8)
        _check_int("dim", self.dim, 1, None)
        _check_int("iters", self.iters, 1, None)
        _check_int("min_numel", self.min_numel, 0, None)
        _check_int("seed", self.seed, 0, None)
        if self.chunk_rows is not None:
            _check_int("chunk_rows", self.chunk_rows, 1, None)
        if isinstance(self.tau, str):
            if self.tau != "auto":
                raise ConfigError(f"DKMConfig.tau={self.tau!r} is not allowed: give a float > 0 or 'auto'")
        elif not _is_number(self.tau) or not (self.tau > 0 and math.isfinite(self.tau)):
            raise ConfigError(f"DKMConfig.tau={self.tau!r} is not allowed: give a finite float > 0 or 'auto'")
        if not _is_number(self.tau_scale) or not (self.tau_scale > 0 and math.isfinite(self.tau_scale)):
            raise ConfigError(f"DKMConfig.tau_scale={self.tau_scale!r} is not allowed: give a finite float > 0")
        _check_int("anneal_steps", self.anneal_steps, 0, None)
        if self.tau_scale_end is not None and not (
                _is_number(self.tau_scale_end) and self.tau_scale_end > 0 and math.isfinite(self.tau_scale_end)):
            raise ConfigError(f"DKMConfig.tau_scale_end={self.tau_scale_end!r} is not allowed: give a finite float > 0 "
                              f"or None")
        if self.anneal_steps and self.tau_scale_end is None:
            raise ConfigError(f"DKMConfig.anneal_steps={self.anneal_steps} needs tau_scale_end (the value to anneal "
                              f"tau_scale to); give tau_scale_end or anneal_steps=0")
        if not isinstance(self.hard_forward, bool):
            raise ConfigError(f"DKMConfig.hard_forward={self.hard_forward!r} is not allowed: give True or False")
        for name in ("eps", "eps_rel", "direct_grad"):
            v = getattr(self, name)
            if not _is_number(v) or not (v >= 0 and math.isfinite(v)):
                raise ConfigError(f"DKMConfig.{name}={v!r} is not allowed: give a finite float >= 0")
        if self.group_size is not None:
            _check_int("group_size", self.group_size, 1, None)
        if self.channel_scale not in SCALE_KINDS:
            raise ConfigError(f"DKMConfig.channel_scale={self.channel_scale!r} is not allowed: give False, 'max' (or "
                              f"True) or 'rms'")
        if self.vector_axis not in VECTOR_AXES:
            raise ConfigError(f"DKMConfig.vector_axis={self.vector_axis!r} is not allowed: give one of "
                              f"{', '.join(map(repr, VECTOR_AXES))}")
        if not isinstance(self.shard, bool):
            raise ConfigError(f"DKMConfig.shard={self.shard!r} is not allowed: give True or False")
        if not isinstance(self.save_attention, bool):
            raise ConfigError(f"DKMConfig.save_attention={self.save_attention!r} is not allowed: give True or False")

    @property
    def scale_kind(self) -> Optional[str]:
        """The per-slice scale statistic ("max" or "rms"), or None without scales."""
        return SCALE_KINDS[self.channel_scale]

    @property
    def k(self) -> int:
        return 2 ** self.bits

    def groups(self, shape) -> int:
        """Number of LUTs for a weight of ``shape``."""
        return 1 if self.group_size is None else shape[0] // self.group_size

    def axis(self, shape) -> Optional[int]:
        """The weight axis the d-vectors run along for a weight of ``shape`` (None: row-major, "flat"); "auto"
        resolved. Always None for dim = 1."""
        if self.dim == 1 or self.vector_axis == "flat":
            return None
        if self.vector_axis != "auto":
            return _NAMED_AXES[self.vector_axis]
        groups = self.groups(shape)
        for axis in (None, 0, 1):
            if axis is None or axis < len(shape):
                if coreml_layout_problem(shape, self.dim, groups, axis) is None:
                    return axis
        return None

    def layout_problem(self, shape) -> Optional[str]:
        """Why this config cannot lay out a weight of ``shape`` (group_size, channel_scale, dim, vector_axis), or
        None."""
        numel = math.prod(shape)
        rows, g = shape[0], self.group_size
        if g is not None and rows % g:
            fits = [x for x in range(1, min(g, rows) + 1) if rows % x == 0][-1]
            return f"group_size={g} does not divide its {rows} axis-0 slices (the largest divisor up to {g} is {fits})"
        axis = self.axis(shape)
        if axis is not None:
            if axis >= len(shape):
                return f"vector_axis={self.vector_axis!r} needs a weight with an axis {axis}"
            size = _axis_size(shape, self.groups(shape), axis)
            if size % self.dim:
                what = "axis-0 slices per LUT" if axis == 0 else f"entries along axis {axis}"
                return f"vector_axis={self.vector_axis!r}: dim={self.dim} does not divide its {size} {what}"
            return None
        if g is not None and self.dim > 1 and (numel // rows * g) % self.dim:
            return f"dim={self.dim} does not divide the {numel // rows * g} weights of a group of {g} slices"
        if self.channel_scale and self.dim > 1 and (numel // rows) % self.dim:
            return f"channel_scale with dim={self.dim} needs dim to divide the {numel // rows} weights per slice"
        return None

    def tau_scale_at(self, step: int) -> float:
        """The tau_scale of training step ``step`` (0-based) under the schedule."""
        if not self.anneal_steps or self.tau_scale_end is None:
            return self.tau_scale
        f = min(1.0, step / self.anneal_steps)
        return self.tau_scale_end + (self.tau_scale - self.tau_scale_end) * 0.5 * (1.0 + math.cos(math.pi * f))

    def replace(self, **changes) -> "DKMConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


def flat_axis(shape) -> int:
    """The axis row-major d-vectors run along: the last one of size > 1 (trailing size-1 axes add nothing)."""
    return max([i for i, s in enumerate(shape) if s > 1], default=len(shape) - 1)


def _axis_size(shape, groups: int, axis: int) -> int:
    """Entries a d-vector along ``axis`` may span: the axis' size, or for axis 0 the slices of one LUT."""
    return shape[0] // groups if axis == 0 else shape[axis]


def coreml_layout_problem(shape, dim: int, groups: int, axis: Optional[int]) -> Optional[str]:
    """Why Core ML cannot read the d-vectors of a weight of ``shape`` laid out along ``axis`` (None: row-major), or
    None. Core ML's LUT op takes vectors along one axis: dim must divide it, and for axis 0 each LUT's slices."""
    if dim == 1:
        return None
    a = flat_axis(shape) if axis is None else axis
    size = _axis_size(shape, groups, a)
    if size % dim:
        where = "row-major vectors run along" if axis is None else "vector_axis is"
        what = f"its {size} axis-0 slices per LUT" if a == 0 else f"its size {size}"
        return f"{where} axis {a}, and dim={dim} does not divide {what}"
    return None


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_int(name, value, lo, hi):
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    if not ok:
        allowed = f"an integer in {lo}..{hi}" if hi is not None else f"an integer >= {lo}"
        raise ConfigError(f"DKMConfig.{name}={value!r} is not allowed: give {allowed}")


Rules = Mapping[str, Optional[DKMConfig]]


def check_rules(rules: Optional[Rules]) -> dict:
    """Validate a rules mapping; returns a plain dict. Regexes are compiled here to fail early."""
    if rules is None:
        return {}
    if not isinstance(rules, Mapping):
        raise ConfigError(f"rules must be a mapping of module name -> DKMConfig or None, got {type(rules).__name__}")
    for key, cfg in rules.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"rule key {key!r} is not allowed: give a module name or 're:<regex>'")
        if cfg is not None and not isinstance(cfg, DKMConfig):
            raise ConfigError(f"rule {key!r} maps to {type(cfg).__name__}: allowed are a DKMConfig or None (skip)")
        if key.startswith("re:"):
            try:
                re.compile(key[3:])
            except re.error as e:
                raise ConfigError(f"rule {key!r} is not a valid regex: {e}") from None
    return dict(rules)


def match_rule(name: str, rules: dict):
    """(matched, rule_key, config_or_None) for one module name, by the documented precedence."""
    if name in rules:
        return True, name, rules[name]
    for key, cfg in rules.items():
        if key.startswith("re:") and re.fullmatch(key[3:], name):
            return True, key, cfg
    return False, None, None
