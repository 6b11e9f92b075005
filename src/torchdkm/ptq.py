"""Post-training palettization: k-means per layer, no training loop.

``palettize(model, config, rules, calibration=batches)`` measures the Fisher diagonal F on the calibration batches
(torchdkm.sensitivity), clusters every selected layer with k-means weighted by F (SqueezeLLM's sensitivity-weighted
k-means: it minimises ½ Σ F_i (w_i − ŵ_i)², the second-order estimate of the loss increase), and finalizes the
model. Without calibration data it runs the plain k-means. The result is a finalized model like any other:
``torchdkm.save``, ``export_onnx`` and Core ML take it.

With per-slice scales the weight is clustered as v = w / s, so each value's k-means weight is F · s² (the error
in w is s² times the error in v); with dim > 1 a vector's weight is the sum of its entries' F · s².

``compensate=True`` then picks each Linear's indices with GPTQ's error feedback on the calibration inputs
(torchdkm.compensate) instead of the nearest centroid: the LUTs stay, the layer's outputs move less.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
from torch import Tensor, nn

from .api import finalize, finalize_layer, prepare
from .compensate import compensated_indices, input_hessians
from .config import DKMConfig, Rules
from .errors import ConfigError
from .functional import to_group_vectors
from .kmeans import kmeans_init
from .layers import select_layers
from .parametrization import DKMWeight, dkm_parametrization, original_weight
from .sensitivity import Sensitivity, fisher_diagonal, run_batch

__all__ = ["palettize", "fisher_weights", "weighted_error"]


@torch.no_grad()
def palettize(model: nn.Module, config: Optional[DKMConfig] = None, rules: Optional[Rules] = None, *,
              calibration: Optional[Iterable] = None, sensitivity: Optional[Sensitivity] = None,
              weighted: Optional[bool] = None, loss="true", max_samples: Optional[int] = None,
              compensate: bool = False) -> nn.Module:
    """Compress ``model`` in place post-training and return it finalized.

    config / rules: which layers, at what layout, exactly as for ``torchdkm.prepare``.
    calibration: batches for the Fisher diagonal (see torchdkm.sensitivity.fisher_diagonal; ``loss`` and
    ``max_samples`` go there), or ``sensitivity``: one already measured. weighted: Fisher-weighted k-means
    (default: whenever calibration or sensitivity is given), False: plain k-means.
    compensate: choose the indices of every Linear with a scalar LUT (dim 1) by GPTQ's error feedback on the
    inputs the calibration batches give it (each batch is run once through the model as it was, then the k-means
    above); other layers, and weights read by several modules (tied), take the nearest centroid. Needs
    ``calibration`` (also when ``sensitivity`` is given) and memory for one in × in float64 matrix per Linear.

    Example::

        palettize(net, DKMConfig(bits=4, group_size=16, channel_scale=True), calibration=[x[:32]])
        torchdkm.save(net, "net.safetensors")
    """
    if weighted is None:
        weighted = calibration is not None or sensitivity is not None
    if compensate:
        if calibration is None:
            raise ConfigError("palettize(compensate=True) needs calibration batches (calibration=...): the inputs "
                              "of each Linear decide how its rounding errors are spread")
        calibration = list(calibration)  # read twice: the Fisher diagonal, the input Hessians
    if weighted and sensitivity is None:
        if calibration is None:
            raise ConfigError("palettize(weighted=True) needs calibration batches (calibration=...) or a measured "
                              "sensitivity (sensitivity=...); give one, or weighted=False for plain k-means")
        with torch.enable_grad():
            sensitivity = fisher_diagonal(model, calibration, loss=loss, max_samples=max_samples)
    by_tensor = _by_tensor(model, sensitivity) if weighted else {}
    hessians = {}
    if compensate:
        linears = _compensable(model, config, rules)
        found = input_hessians(model, linears, (run_batch(model, b) for b in calibration))
        hessians = {id(linears[name].weight): h for name, h in found.items()}
    prepare(model, config, rules)
    for module in model.modules():
        p = dkm_parametrization(module)
        if p is None or bool(p.initialized):
            continue
        w = original_weight(module)
        vecs, _, _ = p.split(w)
        f = by_tensor.get(id(w))
        if weighted and f is None:
            raise ConfigError(f"palettize: the sensitivity has no entry for layer {p.name!r}; measure it on this "
                              f"model (layers measured: {list(sensitivity.fisher)[:8]})")
        weight = None if f is None else fisher_weights(p, w, f)
        p.centroids.copy_(kmeans_init(vecs, p.config.k, seed=p.config.seed, weight=weight))
        p.initialized.fill_(True)
        if id(w) in hessians:
            finalize_layer(module, p, _compensated(p, w, hessians.pop(id(w))))
    return finalize(model)


def _compensated(p: DKMWeight, w: Tensor, hessian: Tensor) -> Tensor:
    """GPTQ's indices (out × in) for a Linear's weight ``w`` on its k-means LUTs: row r's table is its group's
    LUT (rows are grouped in order) times its scale."""
    _, _, scale = p.split(w)
    lut = p.centroids[:, :, 0].double()  # G × k
    table = lut.repeat_interleave(w.shape[0] // lut.shape[0], dim=0)
    if scale is not None:
        table = table * scale.reshape(-1, 1).double()
    return compensated_indices(w, table, hessian)


def _compensable(model: nn.Module, config: Optional[DKMConfig], rules: Optional[Rules]) -> Dict[str, nn.Linear]:
    """{name: module} of the Linears palettize will cluster with a scalar LUT whose weight no other module reads."""
    readers: Dict[int, int] = {}
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, Tensor):
            readers[id(w)] = readers.get(id(w), 0) + 1
    return {name: m for name, m, cfg in select_layers(model, config or DKMConfig(), rules)
            if isinstance(m, nn.Linear) and cfg.dim == 1 and readers[id(m.weight)] == 1}


def fisher_weights(p: DKMWeight, w: Tensor, fisher: Tensor) -> Tensor:
    """The k-means weight of each of the layer's vectors (G × N): Σ over its entries of F · s² (s: the slice's
    scale, 1 without scales), in the layout ``p.split`` gives."""
    _, _, scale = p.split(w)
    f = fisher.to(device=w.device, dtype=torch.float64)
    if scale is not None:
        f = f * scale.double() ** 2
    fv, _ = to_group_vectors(f, p.config.dim, p.groups, p.axis)
    return fv.sum(-1)


def weighted_error(original: Tensor, compressed: Tensor, fisher: Optional[Tensor] = None) -> float:
    """½ Σ F_i (w_i − ŵ_i)² (F = 1 without ``fisher``): the estimated loss increase of replacing w by ŵ."""
    d2 = (original.detach().double() - compressed.detach().double()) ** 2
    return 0.5 * float((d2 if fisher is None else d2 * fisher.double()).sum())


def _by_tensor(model: nn.Module, sensitivity: Sensitivity) -> Dict[int, Tensor]:
    """{id(weight tensor): Fisher} for every module whose name the sensitivity has, and its tied partners."""
    modules = dict(model.named_modules())
    out = {}
    for name, f in sensitivity.fisher.items():
        m = modules.get(name)
        if m is not None and getattr(m, "weight", None) is not None:
            if tuple(m.weight.shape) != tuple(f.shape):
                raise ConfigError(f"palettize: the sensitivity of layer {name!r} has shape {tuple(f.shape)}, its "
                                  f"weight {tuple(m.weight.shape)}: measure it on this model")
            out[id(m.weight)] = f
    return out
