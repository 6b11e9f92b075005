"""``compression.budget``: plan the per-layer layouts for a size, then train DKM with them.

The planner (torchdkm.planner) chooses each layer's layout (bits, dim, group size, channel scale, or "leave it
alone") for the recipe's model as it enters compression (after any fp32 epochs). The planned layout fields replace
those of the recipe's global config; every other field (temperature, schedule, iterations, ...) stays the recipe's.
The recipe's rules still apply: a null rule leaves its layers as they are, a rule with a layout pins its layers at
that layout (counted at its size; the planner spreads the rest of the budget over the other layers).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from torch import nn
from torch.utils.data import DataLoader

from ..config import DKMConfig, match_rule
from ..layers import is_supported
from ..planner import Plan, default_candidates, plan
from .recipe import BudgetSpec

LAYOUT_FIELDS = ("bits", "dim", "group_size", "channel_scale", "vector_axis")


def calibration_batch(dataset, samples: int):
    """The first ``samples`` items of a training set as one batch fisher_diagonal takes: ``(x, y)`` for tensor
    inputs, the input dict for transformers / causal-LM windows (the true Fisher needs no labels)."""
    x, y = next(iter(DataLoader(dataset, batch_size=min(samples, len(dataset)), shuffle=False)))
    return x if isinstance(x, dict) else (x, y)


def ruled_layers(model: nn.Module, rules: Dict[str, Optional[DKMConfig]]
                 ) -> Tuple[List[str], Dict[str, DKMConfig], List[str]]:
    """(planned, pinned, skipped): the compressible layers of ``model`` by the recipe's ``rules`` (exact names and
    ``re:`` patterns, by their precedence). A null rule skips its layers, a rule with a layout pins them at it, the
    planner chooses the rest."""
    planned, pinned, skipped = [], {}, []
    for name, m in model.named_modules():
        if not is_supported(m):
            continue
        hit, _, cfg = match_rule(name, rules)
        if not hit:
            planned.append(name)
        elif cfg is None:
            skipped.append(name)
        else:
            pinned[name] = cfg
    return planned, pinned, skipped


def plan_for_recipe(model: nn.Module, rules: Dict[str, Optional[DKMConfig]], spec: BudgetSpec, dataset) -> Plan:
    """Plan ``model`` (plain) for ``spec``; layers the recipe's ``rules`` skip stay as they are, layers they give
    a layout are pinned at it."""
    layers, pinned, _ = ruled_layers(model, rules)
    cands = default_candidates(bits=spec.bits, dims=spec.dims, group_sizes=spec.group_sizes,
                               channel_scale=spec.channel_scale)
    return plan(model, [calibration_batch(dataset, spec.samples)], budget=spec.size, candidates=cands, layers=layers,
                lut_bits=spec.lut_bits, weighted=spec.weighted, pinned=pinned)  # fisher_diagonal restores the flag


def planned_rules(layouts: Dict[str, Optional[dict]], base: DKMConfig,
                  rules: Optional[Dict[str, Optional[DKMConfig]]] = None) -> Dict[str, Optional[DKMConfig]]:
    """Rules for ``prepare``: each planned layout ({field: value} or None) on the recipe's global config, or on the
    recipe's own rule for a layer it pinned (its training fields kept)."""
    out: Dict[str, Optional[DKMConfig]] = {}
    for name, lay in layouts.items():
        _, _, own = match_rule(name, rules or {})
        out[name] = None if lay is None else (own or base).replace(**lay, min_numel=0)
    return out


def layouts_of(p: Plan) -> Dict[str, Optional[dict]]:
    """The plan's rules (every compressible layer by name: skipped ones None) as plain layout fields
    (checkpointed, so a resumed run trains the same plan)."""
    return {name: None if cfg is None else {f: getattr(cfg, f) for f in LAYOUT_FIELDS} for name, cfg in p.rules.items()}
