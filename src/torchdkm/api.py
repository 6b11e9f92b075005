"""prepare / initialize / finalize: the model-level lifecycle (prepare -> train with your own loop -> finalize)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import DKMConfig, Rules
from .errors import ConfigError
from .functional import from_vectors, hard_cluster, to_vectors
from .layers import FinalizedLayer, select_layers
from .parametrization import DKMWeight, dkm_parametrization, original_weight, require_plain


def prepare(model: nn.Module, config: Optional[DKMConfig] = None, rules: Optional[Rules] = None) -> nn.Module:
    """Register DKM on every chosen layer's weight, in place; returns ``model``.

    Every supported layer with at least ``config.min_numel`` weights uses ``config``; ``rules`` maps a
    module name or ``"re:<regex>"`` to a DKMConfig or ``None`` (skip) - see torchdkm.config for precedence.
    Centroids are initialised by k-means on the first forward (or ``initialize(model)``).

    Example::

        model = prepare(model, DKMConfig(bits=4), rules={"classifier": DKMConfig(bits=8), "re:.*embed.*": None})
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"prepare wants an nn.Module, got {type(model).__name__}")
    config = DKMConfig() if config is None else config
    if not isinstance(config, DKMConfig):
        raise ConfigError(f"prepare's config must be a DKMConfig, got {type(config).__name__}")
    require_plain(model, "torchdkm.prepare")
    for name, module, cfg in select_layers(model, config, rules):
        # unsafe=True: the safe path evaluates the parametrization once, which would run k-means + a DKM
        # step at prepare time (shape and dtype are preserved by construction).
        parametrize.register_parametrization(module, "weight", DKMWeight(cfg, module.weight, name), unsafe=True)
    return model


@torch.no_grad()
def initialize(model: nn.Module) -> nn.Module:
    """Run the k-means initialisation of every prepared layer now (otherwise the first forward does)."""
    for module in model.modules():
        p = dkm_parametrization(module)
        if p is not None and not bool(p.initialized):
            p.initialize(original_weight(module))
    return model


@torch.no_grad()
def finalize(model: nn.Module, *, coreml: bool = False) -> nn.Module:
    """Snap every prepared layer's weight to its nearest centroid and remove the DKM machinery, in place.

    Afterwards each such layer is a plain module whose weight holds at most 2**bits distinct d-vectors;
    ``module._torchdkm`` records bits, dim, padding and the LUT (k × d). Calling it twice changes nothing.
    Core ML metadata is an export step: ``torchdkm.export.coreml.attach_metadata(model)`` after finalize
    (``coreml=True`` is no longer accepted and says so).
    """
    if coreml:
        raise ConfigError("finalize(model, coreml=True) moved to an export step: call torchdkm.finalize(model), "
                          "then torchdkm.export.coreml.attach_metadata(model)")
    for module in model.modules():
        p = dkm_parametrization(module)
        if p is None:
            continue
        w = original_weight(module)
        if not bool(p.initialized):
            p.initialize(w)
        vecs, pad = to_vectors(w, p.config.dim)
        hard = from_vectors(hard_cluster(vecs, p.centroids), w.shape, pad).to(w.dtype)
        lut = p.centroids.to(w.dtype).clone()
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        module.weight.copy_(hard)
        module._torchdkm = FinalizedLayer(bits=p.config.bits, dim=p.config.dim, pad=pad, lut=lut)
    return model
