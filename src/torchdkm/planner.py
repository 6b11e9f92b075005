"""Size budget in, per-layer rules out: which layer gets how many bits, at what layout.

For every compressible layer and every candidate layout (bits 1..8, dim 1/2/4, one LUT or groups of 16 slices,
with or without per-slice scales, or "leave it alone"), the planner clusters the layer (Fisher-weighted k-means, as
torchdkm.ptq does), estimates the loss increase as ½ Σ F_i (w_i − ŵ_i)² (F: the Fisher diagonal, see
torchdkm.sensitivity), and counts the candidate's exact stored size as ``torchdkm.report`` does:
ceil(numel / dim) · bits index bits + (G · k · dim + C0 if scaled) · lut_bits; a layer left alone costs its numel at
its dtype. Then it solves the multiple-choice knapsack: one candidate per layer, least total Δloss, total size ≤
budget, by a DP over the size in units of u = ceil(B / resolution) bits, each candidate's size rounded up to whole
units. Every plan the DP returns fits the budget exactly (rounding up only overcounts), and its Δloss is at most
that of the best plan for the budget B − L·u (L layers): with the default resolution 2**15 the DP can lose at most
L / 32768 of the budget (0.16 % for 53 layers). Sizes of at most ``resolution`` bits are solved exactly.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .config import DKMConfig
from .errors import ConfigError
from .functional import hard_cluster
from .kmeans import kmeans_1d_costs, kmeans_init
from .layers import is_supported
from .parametrization import DKMWeight, require_plain
from .ptq import fisher_weights, weighted_error
from .sensitivity import Sensitivity, fisher_diagonal

__all__ = ["Plan", "PlanRow", "Candidate", "plan", "default_candidates", "parse_budget", "solve_mckp",
           "candidate_bits", "rules_yaml"]


@dataclass(frozen=True)
class Candidate:
    """One way to store one layer: ``config`` (None: leave it alone), its stored size in bits, its estimated
    loss increase."""

    config: Optional[DKMConfig]
    bits: int
    dloss: float


@dataclass
class PlanRow:
    name: str
    shape: tuple
    numel: int
    choice: Candidate
    candidates: List[Candidate]

    @property
    def bits_per_weight(self) -> float:
        return self.choice.bits / self.numel


@dataclass
class Plan:
    """The plan: ``rules`` for ``torchdkm.prepare`` / ``torchdkm.palettize`` (every compressible layer named:
    a DKMConfig or None), one row per planned layer, and the totals. ``total_bytes`` is what ``torchdkm.report``
    will count for the compressed model (planned layers at their stored bits + every other parameter)."""

    rows: List[PlanRow]
    rules: Dict[str, Optional[DKMConfig]]
    budget_bytes: float
    total_bytes: float
    fixed_bytes: float
    params: int
    seconds: Dict[str, float] = field(default_factory=dict)

    @property
    def dloss(self) -> float:
        return sum(r.choice.dloss for r in self.rows)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.total_bytes / self.params

    def table(self) -> str:
        head = f"{'layer':<36} {'shape':<18} {'config':<22} {'bits/w':>7} {'KiB':>9} {'est. dloss':>11}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.name[-36:]:<36} {str(list(r.shape))[:18]:<18} {describe(r.choice.config):<22} "
                         f"{r.bits_per_weight:>7.3f} {r.choice.bits / 8 / 1024:>9.2f} {r.choice.dloss:>11.4g}")
        lines.append("-" * len(head))
        lines.append(f"total {self.total_bytes / 1024:.2f} KiB ({self.bits_per_weight:.3f} bits/weight, other "
                     f"parameters {self.fixed_bytes / 1024:.2f} KiB) vs budget {self.budget_bytes / 1024:.2f} KiB "
                     f"({8 * self.budget_bytes / self.params:.3f} bits/weight); estimated loss increase "
                     f"{self.dloss:.4g}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict:
        return {"budget_bytes": self.budget_bytes, "total_bytes": self.total_bytes, "fixed_bytes": self.fixed_bytes,
                "bits_per_weight": self.bits_per_weight, "dloss": self.dloss, "seconds": self.seconds,
                "layers": [{"name": r.name, "shape": list(r.shape), "config": describe(r.choice.config),
                            "bits": r.choice.bits, "dloss": r.choice.dloss} for r in self.rows]}


def describe(cfg: Optional[DKMConfig]) -> str:
    """Short label of a candidate: '4b', '4b d2', '3b g16 scale', 'as is'."""
    if cfg is None:
        return "as is"
    parts = [f"{cfg.bits}b"] + ([f"d{cfg.dim}"] if cfg.dim > 1 else []) + (
        [f"g{cfg.group_size}"] if cfg.group_size else []) + (["scale"] if cfg.channel_scale else [])
    return " ".join(parts)


def default_candidates(bits: Iterable[int] = range(1, 9), dims: Iterable[int] = (1, 2, 4),
                       group_sizes: Iterable[Optional[int]] = (None, 16),
                       channel_scale: Iterable[bool] = (False, True), max_vector_rate: float = 2.0) -> List[DKMConfig]:
    """The candidate layouts (every combination; dim > 1 uses vector_axis 'auto' and only rates bits/dim ≤
    ``max_vector_rate``: above 2 bits per weight the 1-d layouts serve, and the vector k-means estimates cost most
    there). A layer whose axis-0 size a group size does not divide gets the largest divisor below it; layouts a
    layer cannot take are dropped."""
    return [DKMConfig(bits=b, dim=d, group_size=g, channel_scale=s, vector_axis="auto" if d > 1 else "flat",
                      min_numel=0)
            for b in bits for d in dims for g in group_sizes for s in channel_scale
            if d == 1 or b / d <= max_vector_rate]


def candidate_bits(cfg: DKMConfig, shape: Sequence[int], lut_bits: int = 32) -> int:
    """Stored bits of a layer of ``shape`` under ``cfg``, as torchdkm.report counts them."""
    numel = math.prod(shape)
    table = cfg.groups(shape) * cfg.k * cfg.dim + (shape[0] if cfg.channel_scale else 0)
    return -(-numel // cfg.dim) * cfg.bits + table * lut_bits


def fit_config(cfg: DKMConfig, shape: Sequence[int]) -> Optional[DKMConfig]:
    """``cfg`` for a weight of ``shape``: the group size lowered to the largest divisor of axis 0 that fits (one
    group: None), or None if the layout still does not fit."""
    if cfg.group_size is not None:
        g = max(x for x in range(1, min(cfg.group_size, shape[0]) + 1) if shape[0] % x == 0)
        cfg = cfg.replace(group_size=None if g == shape[0] else g)
    return None if cfg.layout_problem(tuple(shape)) else cfg


def parse_budget(text) -> Tuple[str, float]:
    """'64KiB' -> ('bytes', 65536); '2.5 bits' -> ('bits', 2.5); '1.5MB' -> ('bytes', 1.5e6); a number: bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool) and text > 0:
        return "bytes", float(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z/ ]*?)\s*", str(text))
    units = {"": 1, "b": 1, "byte": 1, "bytes": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024 ** 2,
             "gib": 1024 ** 3}
    if m:
        value, unit = float(m.group(1)), m.group(2).strip().lower()
        if unit in ("bit", "bits", "bits/weight", "bpw") and 0 < value <= 32:
            return "bits", value
        if unit in units and value > 0:
            return "bytes", value * units[unit]
    raise ConfigError(f"budget {text!r} is not allowed: give a size ('64KiB', '1.5MiB', '300kB', a number of bytes) or "
                      f"mean bits per weight ('2.5 bits')")


def solve_mckp(sizes: Sequence[Sequence[int]], losses: Sequence[Sequence[float]], budget: int,
               resolution: int = 1 << 15) -> Optional[List[int]]:
    """The multiple-choice knapsack: one index per group minimising Σ loss with Σ size ≤ budget (integers), or
    None when even the smallest choices exceed it. DP over ceil(size / u), u = ceil(budget / resolution): the result
    always fits; exact when budget ≤ resolution, else at least as good as the optimum at budget − len(sizes)·u."""
    if sum(min(s) for s in sizes) > budget:
        return None
    unit = max(1, -(-budget // resolution))
    cap = budget // unit
    inf = float("inf")
    best = torch.full((cap + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    picks = []
    for sz, ls in zip(sizes, losses):
        new = torch.full_like(best, inf)
        arg = torch.full((cap + 1,), -1, dtype=torch.int32)
        for j, (s, l) in enumerate(zip(sz, ls)):
            c = -(-int(s) // unit)
            if c > cap:
                continue
            cand = torch.full_like(best, inf)
            cand[c:] = best[:cap + 1 - c] + float(l)
            better = cand < new
            new = torch.where(better, cand, new)
            arg = torch.where(better, torch.tensor(j, dtype=torch.int32), arg)
        best = new
        picks.append(arg)
    if not bool(torch.isfinite(best).any()):  # fits in exact sizes but not after rounding up: the smallest choices
        return [min(range(len(s)), key=lambda j: (s[j], losses[i][j])) for i, s in enumerate(sizes)]
    at = int(torch.argmin(best))
    out = []
    for i in range(len(sizes) - 1, -1, -1):
        j = int(picks[i][at])
        out.append(j)
        at -= -(-int(sizes[i][j]) // unit)
    return out[::-1]


def plan(model: nn.Module, calibration: Optional[Iterable] = None, *, budget_bytes: Optional[float] = None,
         budget_bits: Optional[float] = None, budget=None, sensitivity: Optional[Sensitivity] = None,
         candidates: Optional[Sequence[DKMConfig]] = None, layers: Optional[Sequence[str]] = None,
         lut_bits: int = 32, weighted: bool = True, loss="true", max_samples: Optional[int] = None,
         kmeans_iters: int = 10, exact_k: int = 64, bins: Optional[int] = 512, sample: int = 4096,
         resolution: int = 1 << 15, pinned: Optional[Dict[str, DKMConfig]] = None,
         seed: int = 0) -> Plan:
    """Plan a compressed model of at most ``budget_bytes`` (or ``budget_bits`` mean bits per parameter of the whole
    model, or ``budget``: '64KiB' / '2.5 bits'), as counted by ``torchdkm.report`` (compressed layers + every other
    parameter at its dtype; LUTs at ``lut_bits``).

    calibration: batches for the Fisher diagonal (or ``sensitivity``, measured before). layers: the layers to plan
    (default every compressible one); the others stay as they are. pinned: {layer name: DKMConfig}, layers given
    their config (counted at its size, named so in the rules; tied partners alike), the rest planned within what is
    left. weighted: estimate each candidate with the Fisher-weighted k-means (as ``palettize`` runs it) or the
    plain one (as DKM starts from).
    Estimates: d = 1 from one weighted DP per row length over at most ``bins`` value bins per row (None: every value
    its own bin up to max(1024, 4k) values, as kmeans_init; 512 measured within 2 % at 64 centroids), exact up to
    ``exact_k`` centroids, beyond that the error taken to fall 4× per bit; d > 1 from a k-means fitted on about ``sample`` vectors in all (at least 4 per
    centroid per LUT; ``kmeans_iters`` Lloyd iterations), every vector then assigned.

    Example::

        p = plan(net, [x[:32]], budget="2.5 bits"); print(p.table())
        torchdkm.palettize(net, rules=p.rules, sensitivity=...)   # or prepare(net, rules=p.rules) and train
    """
    require_plain(model, "torchdkm.plan")
    if lut_bits not in (16, 32):
        raise ConfigError(f"plan: lut_bits={lut_bits!r} is not allowed: give 32 (float32 LUTs) or 16")
    given = [x is not None for x in (budget_bytes, budget_bits, budget)]
    if sum(given) != 1:
        raise ConfigError("plan needs exactly one budget: budget_bytes=..., budget_bits=... (mean bits per weight) or "
                          "budget='64KiB' / '2.5 bits'")
    if budget is not None:
        kind, value = parse_budget(budget)
        budget_bytes, budget_bits = (value, None) if kind == "bytes" else (None, value)
    params = {id(p): p for p in model.parameters()}
    n_params = sum(p.numel() for p in params.values())
    if budget_bits is not None:
        if not budget_bits > 0:
            raise ConfigError(f"plan: budget_bits={budget_bits!r} is not allowed: give a mean bits per weight > 0")
        budget_bytes = budget_bits * n_params / 8
    if not budget_bytes > 0:
        raise ConfigError(f"plan: budget_bytes={budget_bytes!r} is not allowed: give a size > 0")
    t0 = time.perf_counter()
    pins = _pins(model, pinned or {}, lut_bits)
    targets = {n: m for n, m in _targets(model, layers).items() if id(m.weight) not in pins}
    if sensitivity is None:
        if calibration is None:
            raise ConfigError("plan needs calibration batches (the second argument) or sensitivity=... to estimate "
                              "each layer's loss increase")
        with torch.enable_grad():
            sensitivity = fisher_diagonal(model, calibration, loss=loss, layers=list(targets), max_samples=max_samples,
                                          seed=seed)
    t1 = time.perf_counter()
    pool = default_candidates() if candidates is None else list(candidates)
    planned = {id(m.weight) for m in targets.values()}
    fixed_bits = sum(pins[i][1] if i in pins else p.numel() * p.element_size() * 8
                     for i, p in params.items() if i not in planned)
    free = int(math.floor(budget_bytes * 8)) - fixed_bits
    smallest = fixed_bits + sum(_smallest_bits(m.weight, pool, lut_bits) for m in targets.values())
    if smallest > budget_bytes * 8:  # refused before any clustering
        _refuse(budget_bytes, n_params, smallest, fixed_bits)
    missing = [n for n in targets if n not in sensitivity.fisher]
    if missing:
        raise ConfigError(f"plan: the sensitivity has no entry for layer(s) {missing[:8]}; measure it on this model")
    rows = _candidates({n: m.weight.detach() for n, m in targets.items()}, sensitivity.fisher, pool, lut_bits,
                       weighted, kmeans_iters, exact_k, sample, seed, bins)
    t2 = time.perf_counter()
    pick = solve_mckp([[c.bits for c in r.candidates] for r in rows], [[c.dloss for c in r.candidates] for r in rows],
                      free, resolution) if free >= 0 else None
    if pick is None:
        _refuse(budget_bytes, n_params, smallest, fixed_bits)
    for r, j in zip(rows, pick):
        r.choice = r.candidates[j]
    rules = _rules(model, rows, {i: cfg for i, (cfg, _) in pins.items()})
    total = (fixed_bits + sum(r.choice.bits for r in rows)) / 8
    return Plan(rows, rules, budget_bytes, total, fixed_bits / 8, n_params,
                {"sensitivity": t1 - t0, "candidates": t2 - t1, "solve": time.perf_counter() - t2})


def _refuse(budget_bytes: float, n_params: int, smallest: int, fixed_bits: int):
    raise ConfigError(f"plan: a budget of {budget_bytes:.0f} bytes ({8 * budget_bytes / n_params:.3f} bits/weight) is "
                      f"below the smallest model these candidates can make: {math.ceil(smallest / 8)} bytes "
                      f"({smallest / n_params:.3f} bits/weight, other parameters {fixed_bits / 8:.0f} bytes); give at "
                      f"least that, or add smaller candidates")


def _smallest_bits(w: Tensor, pool, lut_bits: int) -> int:
    """The fewest bits any candidate (or leaving it alone) stores the layer in."""
    sizes = [w.numel() * w.element_size() * 8]
    for cfg in pool:
        cfg = fit_config(cfg.replace(min_numel=0), tuple(w.shape))
        if cfg is not None:
            sizes.append(candidate_bits(cfg, tuple(w.shape), lut_bits))
    return min(sizes)


def _targets(model: nn.Module, layers: Optional[Sequence[str]]) -> Dict[str, nn.Module]:
    modules = dict(model.named_modules())
    if layers is not None:
        bad = [n for n in layers if n not in modules or not is_supported(modules[n])]
        if bad:
            raise ConfigError(f"plan: layers {bad} are not compressible layers of this model")
    out, seen = {}, set()
    for name, m in modules.items():
        if is_supported(m) and (layers is None or name in layers) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            out[name] = m
    return out


@torch.no_grad()
def _candidates(weights: Dict[str, Tensor], fishers: Dict[str, Tensor], pool, lut_bits: int, weighted: bool,
                iters: int, exact_k: int, sample: int, seed: int, bins: Optional[int] = None) -> List[PlanRow]:
    """Every candidate of every layer with its exact size and its estimated loss increase ½ Σ F (w − ŵ)². The d = 1
    layouts of all layers with rows of one length share one DP (kmeans_1d_costs): the DP's cost is per batch of rows
    far more than per row."""
    setups = []
    for name, w in weights.items():
        shape, fisher = tuple(w.shape), fishers[name]
        keep = Candidate(None, w.numel() * w.element_size() * 8, 0.0)
        todo, layouts = {}, {}
        for cfg in pool:
            cfg = fit_config(cfg.replace(min_numel=0), shape)
            if cfg is None:
                continue
            size = candidate_bits(cfg, shape, lut_bits)
            p = DKMWeight(cfg, w, name)
            lay = (cfg.dim, p.groups, cfg.scale_kind, p.axis)
            if (cfg.bits,) + lay in todo or size >= keep.bits:  # a duplicate, or no smaller than the layer as is
                continue
            todo[(cfg.bits,) + lay] = (cfg, size)
            if lay not in layouts:
                vecs, _, _ = p.split(w)
                layouts[lay] = (p, vecs, fisher_weights(p, w, fisher))
        setups.append((name, w, keep, todo, layouts, {}))
    if weighted:  # d = 1: one DP per row length over all layers' layouts, every bit width read from it
        by_len: Dict[int, list] = {}
        for s_i, (_, _, _, todo, layouts, _) in enumerate(setups):
            for lay, (_, vecs, _) in layouts.items():
                if lay[0] == 1:
                    kmax = max(2 ** key[0] for key in todo if key[1:] == lay)
                    by_len.setdefault(vecs.shape[1], []).append((s_i, lay, kmax))
        for items in by_len.values():
            kdp = min(max(k for _, _, k in items), exact_k)
            cost = kmeans_1d_costs(torch.cat([setups[i][4][lay][1][..., 0] for i, lay, _ in items]), kdp,
                                   torch.cat([setups[i][4][lay][2] for i, lay, _ in items]),
                                   None if bins is None else max(bins, 8 * kdp))
            at = 0
            for i, lay, _ in items:
                todo, layouts, est = setups[i][3], setups[i][4], setups[i][5]
                g = layouts[lay][1].shape[0]
                per_k = cost[at:at + g].sum(0)
                at += g
                for key in todo:
                    if key[1:] == lay:
                        k = 2 ** key[0]
                        # beyond kdp centroids the error is taken to fall 4× per bit (~ 2^(-2 bits))
                        est[key] = 0.5 * float(per_k[min(k, kdp) - 1]) * (1.0 if k <= kdp else (kdp / k) ** 2)
    rows = []
    for name, w, keep, todo, layouts, est in setups:
        for key, (cfg, _) in todo.items():
            if key not in est:  # d > 1, or plain k-means: cluster, then measure with the Fisher weights
                p, vecs, wts = layouts[key[1:]]
                est[key] = _measured(p, vecs, wts, cfg, wts if weighted else None, iters, sample if cfg.dim > 1 else 0,
                                     seed)
        out = [keep] + [Candidate(cfg, size, est[key]) for key, (cfg, size) in todo.items()]
        rows.append(PlanRow(name, tuple(w.shape), w.numel(), keep, out))
    return rows


def _measured(p: DKMWeight, vecs: Tensor, wts: Tensor, cfg: DKMConfig, fit_weight: Optional[Tensor], iters: int,
              sample: int = 0, seed: int = 0) -> float:
    """½ Σ wts · ||v − nearest centroid||² (= ½ Σ F (w − ŵ)²) with the centroids of a k-means of the vectors
    (G × N × d; with ``sample`` > 0 fitted on at most that many vectors per group, then every vector assigned)."""
    g, n, _ = vecs.shape
    fit, fw = vecs, fit_weight
    sample = max(sample // g, 4 * cfg.k) if sample else 0  # about ``sample`` vectors in all, ≥ 4 per centroid
    if sample and n > sample:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:sample].to(vecs.device)
        fit, fw = vecs[:, idx], None if fit_weight is None else fit_weight[:, idx]
    c = kmeans_init(fit, cfg.k, seed=cfg.seed, iters=iters, weight=fw)
    c = c if c.dim() == 3 else c[None]
    err = (hard_cluster(vecs, c.to(vecs.dtype)) - vecs).double().pow(2).sum(-1)
    return 0.5 * float((err * wts).sum())


def _pins(model: nn.Module, pinned: Dict[str, DKMConfig], lut_bits: int) -> Dict[int, Tuple[DKMConfig, int]]:
    """{id(weight): (its config fitted to it, its stored bits)} of the pinned layers."""
    modules = dict(model.named_modules())
    out = {}
    for name, cfg in pinned.items():
        m = modules.get(name)
        if m is None or not is_supported(m):
            raise ConfigError(f"plan: pinned layer {name!r} is not a compressible layer of this model")
        if not isinstance(cfg, DKMConfig):
            raise ConfigError(f"plan: pinned[{name!r}] is {cfg!r}; give a DKMConfig")
        fitted = fit_config(cfg.replace(min_numel=0), tuple(m.weight.shape))
        if fitted is None:
            raise ConfigError(f"plan: pinned[{name!r}] = {describe(cfg)} does not fit its weight "
                              f"{tuple(m.weight.shape)}: {cfg.layout_problem(tuple(m.weight.shape))}")
        out[id(m.weight)] = (fitted, candidate_bits(fitted, tuple(m.weight.shape), lut_bits))
    return out


def _rules(model: nn.Module, rows: List[PlanRow], pins: Optional[Dict[int, DKMConfig]] = None
           ) -> Dict[str, Optional[DKMConfig]]:
    """Rules naming every compressible layer: its planned or pinned config (tied partners the same) or None."""
    by_tensor = dict(pins or {})
    modules = dict(model.named_modules())
    for r in rows:
        by_tensor[id(modules[r.name].weight)] = r.choice.config
    return {name: by_tensor.get(id(m.weight)) for name, m in modules.items() if is_supported(m)}


def rules_yaml(rules: Dict[str, Optional[DKMConfig]]) -> str:
    """The rules as the YAML of a recipe's ``compression.rules`` (layout fields only; null: skip)."""
    lines = []
    for name, cfg in rules.items():
        if cfg is None:
            lines.append(f'  "{name}": null')
        else:
            lines.append(f'  "{name}": {{bits: {cfg.bits}, dim: {cfg.dim}, group_size: '
                         f'{"null" if cfg.group_size is None else cfg.group_size}, channel_scale: '
                         f'{"true" if cfg.channel_scale else "false"}, vector_axis: {cfg.vector_axis}}}')
    return "rules:\n" + "\n".join(lines) + "\n"
