"""Cheap per-layer DKM statistics for the metrics log: how soft the assignment still is, how many clusters live.

- ``entropy``: mean over weights of the attention entropy, divided by log k (0 = every weight sits on one
  centroid, 1 = spread uniformly over all k). It falls during DKM training as weights settle on centroids.
- ``gap``: the soft-to-hard weight gap ||A·C - C[nearest]|| / ||W|| (one DKM forward without gradient, current
  centroids, no update): how far the weights the network trains with are from the ones it is shipped with.
  Near 0 the run is in the hard regime; large values mean the hard model will differ from the trained one.
- ``used``: centroids that are the nearest one of at least one weight (out of ``k``; with grouped LUTs the mean
  over tables); a low count means wasted index bits.

Entropy is estimated on an evenly spaced sample of at most ``max_rows`` weight vectors, so it costs a small
fraction of one DKM forward; ``gap`` runs one DKM forward without gradient; ``used`` counts every vector.
"""
from __future__ import annotations

import math
from typing import Dict

import torch
from torch import nn

from .functional import attention, lookup, nearest_centroid
from .parametrization import dkm_parametrization, original_weight


@torch.no_grad()
def dkm_layer_stats(model: nn.Module, max_rows: int = 16384) -> Dict[str, dict]:
    """{layer name: {"entropy", "gap", "used", "k", "tau", "tau_scale", "step"}} for every prepared, initialised
    layer."""
    out = {}
    seen = set()
    for name, module in model.named_modules():
        p = dkm_parametrization(module)
        if p is None or not bool(p.initialized) or id(p) in seen:  # tied layers share one parametrization
            continue
        seen.add(id(p))
        w = original_weight(module).detach()
        vecs = p.split(w.to(p.centroids.dtype))[0]  # G × N × d
        c = p.centroids
        k = c.shape[1]
        step = max(1, vecs.shape[1] // max(1, max_rows // vecs.shape[0]))
        a = attention(vecs[:, ::step], c, p.tau())
        ent = -(a * a.clamp_min(1e-30).log()).sum(-1).mean().item() / math.log(k)
        idx = nearest_centroid(vecs, c)
        counts = torch.zeros(c.shape[:2], device=c.device).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float))
        used = round(float(counts.gt(0).sum(1).float().mean()), 2)
        soft = p.split(p.soft(w).to(c.dtype))[0]
        gap = float((soft - lookup(c, idx)).norm() / vecs.norm().clamp_min(1e-30))
        out[name] = {"entropy": round(ent, 5), "gap": round(gap, 6), "used": used, "k": k,
                     "tau": float(torch.as_tensor(p.tau()).median()),
                     "tau_scale": p.config.tau_scale_at(int(p.step)), "step": int(p.step)}
    return out


@torch.no_grad()
def weights_and_centroids(model: nn.Module, max_values: int = 200_000) -> Dict[str, dict]:
    """{layer: {"weights": 1-D sample of the trained (soft) weights, "centroids": k × d}} for the histograms."""
    out = {}
    seen = set()
    for name, module in model.named_modules():
        p = dkm_parametrization(module)
        if p is None or id(p) in seen:
            continue
        seen.add(id(p))
        w = original_weight(module).detach().float().reshape(-1).cpu()
        step = max(1, w.numel() // max_values)
        out[name] = {"weights": w[::step].clone(), "centroids": p.centroids.detach().float().cpu().clone(),
                     "bits": p.config.bits, "dim": p.config.dim}
    return out
