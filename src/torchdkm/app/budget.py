"""``compression.budget``: plan the per-layer layouts for a size, then train DKM with them.

The planner (torchdkm.planner) chooses each layer's layout (bits, dim, group size, channel scale, or "leave it
alone") for the recipe's model as it enters compression (after any fp32 epochs). The planned layout fields replace
those of the recipe's global config; every other field (temperature, schedule, iterations, ...) stays the recipe's.
"""
from __future__ import annotations

from typing import Dict, Optional

from torch import nn
from torch.utils.data import DataLoader

from ..config import DKMConfig
from ..planner import Plan, default_candidates, plan
from .recipe import BudgetSpec

LAYOUT_FIELDS = ("bits", "dim", "group_size", "channel_scale", "vector_axis")


def calibration_batch(dataset, samples: int):
    """The first ``samples`` items of a training set as one batch fisher_diagonal takes: ``(x, y)`` for tensor
    inputs, the input dict for transformers / causal-LM windows (the true Fisher needs no labels)."""
    x, y = next(iter(DataLoader(dataset, batch_size=min(samples, len(dataset)), shuffle=False)))
    return x if isinstance(x, dict) else (x, y)


def plan_for_recipe(model: nn.Module, skipped: Dict[str, None], spec: BudgetSpec, dataset) -> Plan:
    """Plan ``model`` (plain) for ``spec``; layers the recipe's rules skip (``null``) stay as they are."""
    from ..layers import is_supported

    layers = [n for n, m in model.named_modules() if is_supported(m) and n not in skipped]
    cands = default_candidates(bits=spec.bits, dims=spec.dims, group_sizes=spec.group_sizes,
                               channel_scale=spec.channel_scale)
    return plan(model, [calibration_batch(dataset, spec.samples)], budget=spec.size, candidates=cands, layers=layers,
                lut_bits=spec.lut_bits, weighted=spec.weighted)  # fisher_diagonal restores the training flag


def planned_rules(layouts: Dict[str, Optional[dict]], base: DKMConfig) -> Dict[str, Optional[DKMConfig]]:
    """Rules for ``prepare``: each planned layout ({field: value} or None) on the recipe's global config."""
    return {name: None if lay is None else base.replace(**lay, min_numel=0) for name, lay in layouts.items()}


def layouts_of(p: Plan, skipped: Dict[str, None]) -> Dict[str, Optional[dict]]:
    """The plan's rules as plain layout fields (checkpointed, so a resumed run trains the same plan)."""
    out: Dict[str, Optional[dict]] = {n: None for n in skipped}
    for name, cfg in p.rules.items():
        if name not in out:
            out[name] = None if cfg is None else {f: getattr(cfg, f) for f in LAYOUT_FIELDS}
    return out
