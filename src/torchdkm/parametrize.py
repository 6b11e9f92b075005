"""The DKM weight parametrization (``torch.nn.utils.parametrize``).

Registered on ``module.weight``: the optimizer keeps training the original Parameter
(``module.parametrizations.weight.original``) while reading ``module.weight`` returns the clustered
weight. The centroids and the init flag are buffers of the parametrization, so ``state_dict`` /
``load_state_dict`` mid-training resume exactly.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import DKMConfig
from .functional import auto_tau, dkm_cluster, from_vectors, hard_cluster, to_vectors
from .kmeans import kmeans_init


class DKMWeight(nn.Module):
    """Parametrization W -> DKM(W). Train mode: soft DKM with gradients and a warm-started centroid update.
    Eval mode: hard assignment to the nearest current centroid.

    Buffers: ``centroids`` (k × d, float32/64), ``initialized`` (bool scalar).
    """

    def __init__(self, config: DKMConfig, weight: Tensor):
        super().__init__()
        self.config = config
        dt = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.register_buffer("centroids", torch.zeros(config.k, config.dim, dtype=dt, device=weight.device))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=weight.device))

    @torch.no_grad()
    def initialize(self, weight: Tensor) -> None:
        """k-means on the current weight (done by the first forward if not called before)."""
        vecs, _ = to_vectors(weight.detach(), self.config.dim)
        c = kmeans_init(vecs, self.config.k, seed=self.config.seed)
        self.centroids.copy_(c)
        self.initialized.fill_(True)

    def tau(self) -> float:
        cfg = self.config
        return auto_tau(self.centroids, cfg.tau_scale) if cfg.tau == "auto" else float(cfg.tau)

    def forward(self, weight: Tensor) -> Tensor:
        if not bool(self.initialized):
            self.initialize(weight)
        vecs, pad = to_vectors(weight, self.config.dim)
        if not self.training:
            return from_vectors(hard_cluster(vecs, self.centroids), weight.shape, pad)
        cfg = self.config
        w_tilde, c = dkm_cluster(vecs, self.centroids, self.tau(), cfg.iters, cfg.eps, chunk_rows=cfg.chunk_rows)
        with torch.no_grad():
            self.centroids.copy_(c)  # warm start of the next step
        return from_vectors(w_tilde, weight.shape, pad)

    def extra_repr(self) -> str:
        c = self.config
        return f"bits={c.bits}, dim={c.dim}, tau={c.tau!r}, iters={c.iters}"
