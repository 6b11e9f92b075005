"""Which modules torchdkm compresses, and the record a finalized layer keeps."""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .config import DKMConfig, check_rules, match_rule
from .errors import ConfigError

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
SUPPORTED_NAMES = "Linear, Conv1d, Conv2d, Conv3d, Embedding, transformers Conv1D"


def is_supported(module: nn.Module) -> bool:
    if isinstance(module, SUPPORTED):
        return True
    # transformers' GPT-2 style Conv1D, without importing transformers (slow) when the model doesn't use it.
    hf = sys.modules.get("transformers.pytorch_utils")
    return hf is not None and isinstance(module, getattr(hf, "Conv1D", ()))


@dataclass
class FinalizedLayer:
    """Left on a module by ``finalize`` as ``module._torchdkm``: what will be stored.

    lut: G × k × d centroids in the weight's dtype, one table per group of axis-0 slices (G = 1: per-tensor).
    pad: zero entries appended so d divides the weight's numel.
    scale: per-axis-0-slice scales (C0) in the weight's dtype, or None: the weight is lut[idx] × scale.
    axis: the weight axis the d-vectors run along (None: row-major; see torchdkm.functional.to_group_vectors).
    """

    bits: int
    dim: int
    pad: int
    lut: Tensor
    scale: Optional[Tensor] = None
    axis: Optional[int] = None

    @property
    def groups(self) -> int:
        return self.lut.shape[0]


def select_layers(model: nn.Module, config: DKMConfig, rules=None) -> List[Tuple[str, nn.Module, DKMConfig]]:
    """(name, module, config) of every layer to compress, by the precedence documented in config.py (layers
    sharing a weight are all listed: see :func:`tied_partners`)."""
    rules = check_rules(rules)
    used, shadowed = set(), set()
    chosen = []
    for name, module in model.named_modules():
        matched, key, cfg = match_rule(name, rules)
        supported = is_supported(module)
        if matched and not supported:
            if key == name:
                raise ConfigError(
                    f"rule {key!r} names layer {name!r} of type {type(module).__name__}, which torchdkm cannot "
                    f"compress; supported types: {SUPPORTED_NAMES}"
                )
            matched = False  # a regex rule only applies to supported layers
        if matched:
            used.add(key)
            shadowed.update(k for k in rules if k.startswith("re:") and k != key and re.fullmatch(k[3:], name))
            if cfg is not None:
                chosen.append((name, module, cfg))
        elif supported and module.weight.numel() >= config.min_numel:
            chosen.append((name, module, config))
    unused = [k for k in rules if k not in used]
    hidden = [k for k in unused if k in shadowed]
    if hidden:
        raise ConfigError(
            f"rule(s) {hidden} never apply: every layer they match is taken by an exact-name rule or an earlier "
            f"regex rule (exact name first, then regex rules in order); reorder or remove them"
        )
    if unused:
        names = [n for n, m in model.named_modules() if is_supported(m)]
        shown = ", ".join(repr(n) for n in names[:12]) + (", ..." if len(names) > 12 else "")
        raise ConfigError(f"rule(s) {unused} match no supported layer of this model; its supported layers are: {shown}")
    return chosen


def tied_partners(chosen) -> Dict[str, List[Tuple[str, nn.Module]]]:
    """Chosen layers that share one weight tensor (tied weights, e.g. an LM head tied to its embedding): {first
    layer's name: [(name, module) of the others]}; the others are removed from ``chosen`` in place. The shared
    tensor is clustered once, with the first layer's config; a layer that a rule skips (None) was never chosen."""
    owner: Dict[int, int] = {}
    partners: Dict[str, List[Tuple[str, nn.Module]]] = {}
    keep = []
    for name, module, cfg in chosen:
        w = module.weight
        if id(w) in owner:
            first_name, _, first_cfg = keep[owner[id(w)]]
            if cfg != first_cfg:
                raise ConfigError(
                    f"layers {first_name!r} and {name!r} share one weight tensor (tied weights) but get different "
                    f"configs; the shared tensor is clustered once: give both the same config, or skip one with "
                    f"rules={{{name!r}: None}}"
                )
            partners.setdefault(first_name, []).append((name, module))
            continue
        owner[id(w)] = len(keep)
        keep.append((name, module, cfg))
        if not torch.isfinite(w).all():
            bad = int((~torch.isfinite(w)).sum())
            raise ConfigError(
                f"layer {name!r} has {bad} non-finite weight(s) (NaN/inf) out of {w.numel()}: "
                f"DKM needs finite weights; fix or skip this layer"
            )
    chosen[:] = keep
    return partners


def finalized_record(module: nn.Module) -> Optional[FinalizedLayer]:
    """The record ``finalize`` (or ``load``) left on ``module`` as ``module._torchdkm``, or None."""
    fin = getattr(module, "_torchdkm", None)
    return fin if isinstance(fin, FinalizedLayer) else None
