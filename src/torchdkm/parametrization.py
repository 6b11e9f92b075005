"""The two weight parametrizations torchdkm registers (``torch.nn.utils.parametrize``), and the one set of
helpers that finds them.

:class:`DKMWeight` (training form, from ``prepare``): the optimizer keeps training the original Parameter
(``module.parametrizations.weight.original``) while reading ``module.weight`` returns the clustered weight.
The centroids and the init flag are buffers of the parametrization, so ``state_dict`` / ``load_state_dict``
mid-training resume exactly.

:class:`LUTWeight` (compact inference form, from ``compact``): the parametrized tensor is the packed indices;
reading ``module.weight`` rebuilds the dense weight from them and the LUT.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Optional, Sequence, Tuple, Type, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .config import DKMConfig
from .errors import ConfigError, NonFiniteError
from .functional import (auto_tau, compute_dtype, dkm_cluster, from_vectors, hard_cluster, scaled_slices,
                         to_group_vectors)
from .kmeans import kmeans_init
from .layers import finalized_record
from .lut import packed_to_weight


class DKMWeight(nn.Module):
    """Parametrization W -> DKM(W). Train mode: soft DKM with gradients and a warm-started centroid update
    (with ``config.hard_forward`` the value is the hard assignment and the gradient the soft one's).
    Eval mode: hard assignment to the nearest current centroid (``soft_eval = True``: the soft DKM output with
    the current centroids, no update; for diagnostics, see torchdkm.training.soft_weights).

    Buffers: ``centroids`` (G × k × d, float32/64: one table per group, G = 1 per-tensor), ``initialized`` (bool
    scalar), ``step`` (int64 scalar: the training steps counted by ``torchdkm.step``, which drive the
    temperature schedule). ``name`` (the layer's name in the model) only labels errors: a centroid update that
    would be NaN/inf raises :class:`NonFiniteError` and leaves the centroids at their last finite values.
    """

    def __init__(self, config: DKMConfig, weight: Tensor, name: str = ""):
        super().__init__()
        problem = config.layout_problem(tuple(weight.shape))
        if problem:
            raise ConfigError(f"layer {name!r} (weight {tuple(weight.shape)}): {problem}")
        self.config = config
        self.name = name
        self.groups = config.groups(weight.shape)
        self.axis = config.axis(tuple(weight.shape))  # the resolved vector axis (None: row-major)
        dt = compute_dtype(weight)
        self.register_buffer("centroids", torch.zeros(self.groups, config.k, config.dim, dtype=dt,
                                                      device=weight.device))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=weight.device))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=weight.device))
        self.soft_eval = False
        # Tied weights: {read key: output} during one forward pass of the prepared model, else None (see
        # begin_pass); the second read of the shared tensor (an LM head after its embedding) reuses the first's.
        self._memo: Optional[dict] = None
        # torchdkm.accumulate: {read key: a leaf W~} held across one optimizer step's micro-batches, else None.
        self._held: Optional[dict] = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the schedule existed have no step counter: they resume at step 0.
        state_dict.setdefault(prefix + "step", torch.zeros((), dtype=torch.int64))
        c = state_dict.get(prefix + "centroids")
        if c is not None and c.dim() == 2:  # written before grouped LUTs: k × d, one table
            state_dict[prefix + "centroids"] = c[None]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def split(self, weight: Tensor) -> Tuple[Tensor, int, Optional[Tensor]]:
        """(vectors G × N × d, pad, scale C0 × 1 × ... or None), in the compute dtype (float32 for half weights):
        the weight as DKM clusters it, each axis-0 slice divided by its scale when ``channel_scale`` is on."""
        kind = self.config.scale_kind
        w, scale = scaled_slices(weight, kind) if kind else (weight.to(compute_dtype(weight)), None)
        vecs, pad = to_group_vectors(w, self.config.dim, self.groups, self.axis)
        return vecs, pad, scale

    def join(self, vecs: Tensor, like: Tensor, pad: int, scale: Optional[Tensor]) -> Tensor:
        """Inverse of :meth:`split`, in ``like``'s shape and dtype; the scale multiplies in that dtype, as
        torchdkm.lut.indices_to_weight rebuilds finalized weights."""
        out = from_vectors(vecs, like.shape, pad, self.axis).to(like.dtype)
        return out if scale is None else out * scale.to(like.dtype)

    @torch.no_grad()
    def initialize(self, weight: Tensor) -> None:
        """k-means on the current weight (done by the first forward if not called before)."""
        vecs, _, _ = self.split(weight.detach())
        self._check_finite(vecs, weight.numel(), "k-means initialisation")
        c = kmeans_init(vecs, self.config.k, seed=self.config.seed)
        self.centroids.copy_(c)
        self.initialized.fill_(True)

    def tau(self) -> Union[float, Tensor]:
        """The temperature of the next forward: absolute, or tau_scale (at this step of the schedule) times the
        median squared nearest-centroid distance of each group's table (a G-vector)."""
        cfg = self.config
        return auto_tau(self.centroids, cfg.tau_scale_at(int(self.step))) if cfg.tau == "auto" else float(cfg.tau)

    def soft(self, weight: Tensor) -> Tensor:
        """The soft DKM output A·C for the current centroids, without updating them (diagnostics)."""
        cfg = self.config
        vecs, pad, scale = self.split(weight)
        w_tilde, _ = dkm_cluster(vecs, self.centroids, self.tau(), cfg.iters, cfg.eps, eps_rel=cfg.eps_rel,
                                 chunk_rows=cfg.chunk_rows)
        return self.join(w_tilde, weight, pad, scale)

    @staticmethod
    def read_key(weight: Tensor, training: bool) -> tuple:
        """What makes two reads of the weight give the same DKM output: the same tensor, unchanged (its version
        counter), the same mode."""
        return id(weight), weight._version, training, torch.is_grad_enabled()

    def forward(self, weight: Tensor) -> Tensor:
        key = self.read_key(weight, self.training)
        if self._held is not None and key in self._held:
            return self._held[key]
        if self._memo is None:
            return self._forward(weight)
        # Same tensor, unchanged, same mode: the same value and the same autograd graph, so the gradients of
        # every read meet in one DKM backward, and the centroids move once per pass.
        if key not in self._memo:
            self._memo[key] = self._forward(weight)
        return self._memo[key]

    def _forward(self, weight: Tensor) -> Tensor:
        if not bool(self.initialized):
            self.initialize(weight)
        if not self.training and self.soft_eval:
            return self.soft(weight)
        vecs, pad, scale = self.split(weight)
        if not self.training:
            return self.join(hard_cluster(vecs, self.centroids), weight, pad, scale)
        cfg = self.config
        # hard_forward: the value is C[nearest] (the shipped weight), the gradient the soft output's
        w_tilde, c = dkm_cluster(vecs, self.centroids, self.tau(), cfg.iters, cfg.eps, eps_rel=cfg.eps_rel,
                                 chunk_rows=cfg.chunk_rows, save_attention=cfg.save_attention,
                                 hard_output=cfg.hard_forward, process_group=_world() if cfg.shard else None)
        # A NaN/inf weight gives NaN outputs (and may give NaN centroids, which would then stay NaN for good):
        # refuse the update and keep the last finite centroids. One sync for both checks.
        if not bool(torch.isfinite(c).all() & torch.isfinite(vecs).all()):
            self._check_finite(vecs, weight.numel(), "DKM centroid update")
            raise NonFiniteError(f"layer {self.name!r}: the DKM centroid update gave {_count_bad(c)} non-finite "
                                 f"value(s) of {c.numel()} although the weight is finite; the centroids keep their "
                                 f"last finite values")
        with torch.no_grad():
            self.centroids.copy_(c)  # warm start of the next step
        out = self.join(w_tilde, weight, pad, scale)
        if cfg.direct_grad:  # same value; each weight also gets β × its own gradient (see DKMConfig.direct_grad)
            out = out + cfg.direct_grad * (weight - weight.detach())
        return out

    def _check_finite(self, vecs: Tensor, numel: int, action: str) -> None:
        if not bool(torch.isfinite(vecs).all()):  # vecs: the weight as N × d vectors (a zero-padded tail)
            raise NonFiniteError(f"layer {self.name!r}: its weight has {_count_bad(vecs)} non-finite value(s) of "
                                 f"{numel}, so the {action} is refused; the centroids keep their last finite "
                                 f"values (a too-high learning rate or a NaN/inf loss usually causes this)")

    def extra_repr(self) -> str:
        c = self.config
        sched = f", tau_scale {c.tau_scale}->{c.tau_scale_end} over {c.anneal_steps} steps" if c.anneal_steps else ""
        gran = (f", groups={self.groups} of {c.group_size}" if c.group_size else "") + (
            f", channel_scale={c.scale_kind}" if c.scale_kind else "")
        direct = f", direct_grad={c.direct_grad:g}" if c.direct_grad else ""
        axis = "" if self.axis is None else f", vector_axis={self.axis}"
        return (f"bits={c.bits}, dim={c.dim}{axis}{gran}, tau={c.tau!r}, iters={c.iters}{sched}, "
                f"hard_forward={c.hard_forward}{direct}")


def _tied(model: nn.Module) -> Iterator[nn.Module]:
    """The DKMWeights and LUTWeights (compact mode) of ``model`` that more than one module reads (tied weights)."""
    seen: dict = {}
    for p in (dkm_parametrization(m) or find_parametrization(m, LUTWeight) for m in model.modules()):
        if p is not None:
            seen[id(p)] = (p, seen.get(id(p), (p, 0))[1] + 1)
    return (p for p, reads in seen.values() if reads > 1)


def begin_pass(model: nn.Module, *_) -> None:
    """Forward pre-hook of a prepared (or compact) model with tied weights: within one forward pass DKM (the
    rebuild) runs once per shared tensor, not once per read (an embedding and its tied LM head: half the work)."""
    for p in _tied(model):
        p._memo = {}


def end_pass(model: nn.Module, *_) -> None:
    """Forward hook (always called, also on an exception): outside a pass every read runs DKM itself."""
    for p in _tied(model):
        p._memo = None


def hook_passes(model: nn.Module) -> None:
    """Register begin_pass / end_pass on ``model`` once (prepare with tied layers, compact with tied layers)."""
    if begin_pass not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(begin_pass)
        model.register_forward_hook(end_pass, always_call=True)


def is_dtensor(t) -> bool:
    """Whether ``t`` is a torch.distributed DTensor (a parameter sharded by FSDP's fully_shard)."""
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor: a DTensor's shards gathered (a collective: every rank must call it), else ``t``."""
    return t.full_tensor() if is_dtensor(t) else t


def _world():
    """The default process group when torch.distributed runs with more than one rank, else None."""
    import torch.distributed as dist

    return dist.group.WORLD if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _count_bad(t: Tensor) -> int:
    return int((~torch.isfinite(t.detach())).sum())


class LUTWeight(nn.Module):
    """Parametrization: packed indices -> dense weight of ``shape`` = lut[idx] (× scale), entries past numel
    dropped (see torchdkm.lut.indices_to_weight).

    The packed indices (the parametrized tensor) are padded to whole packing groups (at most 6 extra bytes,
    see torchdkm.packing) so that the rebuild is a few plain ops. Buffers ``lut``: G × k × d and ``scale``
    (C0, or None), in the weight's dtype.
    """

    def __init__(self, lut: Tensor, bits: int, shape: Sequence[int], scale: Optional[Tensor] = None,
                 axis: Optional[int] = None):
        super().__init__()
        self.register_buffer("lut", lut)
        self.register_buffer("scale", scale)
        self.bits, self.shape, self.axis = bits, tuple(shape), axis
        self._memo: Optional[dict] = None  # tied layers: the rebuilt weight within one forward pass (begin_pass)

    def forward(self, packed: Tensor) -> Tensor:
        if self._memo is None:
            return packed_to_weight(packed, self.lut, self.bits, self.shape, self.lut.dtype, self.scale, self.axis)
        key = (id(packed), packed._version)
        if key not in self._memo:
            self._memo[key] = packed_to_weight(packed, self.lut, self.bits, self.shape, self.lut.dtype, self.scale,
                                               self.axis)
        return self._memo[key]

    def extra_repr(self) -> str:
        scale = "" if self.scale is None else f", scale={tuple(self.scale.shape)}"
        axis = "" if self.axis is None else f", vector_axis={self.axis}"
        return f"bits={self.bits}, lut={tuple(self.lut.shape)}{scale}{axis}, shape={self.shape}"


# ----------------------------------------------------------------------------------------------------
# lookups


def weight_parametrizations(module: nn.Module) -> Optional[nn.ModuleList]:
    """The parametrizations registered on ``module.weight`` (a ParametrizationList), or None."""
    return getattr(getattr(module, "parametrizations", None), "weight", None)


def find_parametrization(module: nn.Module, kind: Type[nn.Module] = DKMWeight) -> Optional[nn.Module]:
    """The first parametrization of type ``kind`` on ``module.weight``, or None."""
    plist = weight_parametrizations(module)
    return None if plist is None else next((p for p in plist if isinstance(p, kind)), None)


def dkm_parametrization(module: nn.Module) -> Optional[DKMWeight]:
    """The DKMWeight on ``module.weight`` (the layer is prepared for DKM), or None."""
    return find_parametrization(module, DKMWeight)


def dkm_layers(model: nn.Module) -> Iterator[DKMWeight]:
    """Every DKMWeight of ``model``, in module order, each once (tied layers share one)."""
    seen = set()
    for module in model.modules():
        p = dkm_parametrization(module)
        if p is not None and id(p) not in seen:
            seen.add(id(p))
            yield p


def remove_weight_parametrizations(module: nn.Module) -> None:
    """Remove ``module.weight``'s parametrizations, leaving the original tensor as the plain weight.

    torch gives a parametrized module a generated class holding the ``weight`` property, and ``copy.deepcopy``
    makes the copy share that class; removing the property from it would break every copy (its ``weight`` would
    vanish). So the module first gets a class of its own."""
    cls = type(module)
    module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


def is_compact(module: nn.Module) -> bool:
    """Whether ``module.weight`` is rebuilt from packed indices by :class:`LUTWeight`."""
    return find_parametrization(module, LUTWeight) is not None


def original_weight(module: nn.Module) -> Tensor:
    """The tensor under ``module.weight``'s parametrizations (for DKM: the trained Parameter), or the plain weight."""
    plist = weight_parametrizations(module)
    return plist.original if plist is not None else module.weight


class LayerSpec(NamedTuple):
    bits: int
    dim: int
    groups: int  # LUTs (1: per-tensor)
    scaled: bool  # per-axis-0-slice scales stored
    axis: Optional[int] = None  # the vector axis (None: row-major)


def layer_spec(module: nn.Module) -> Optional[LayerSpec]:
    """The layout of a layer prepared for DKM or finalized, or None for any other module."""
    p = dkm_parametrization(module)
    if p is not None:
        return LayerSpec(p.config.bits, p.config.dim, p.groups, p.config.scale_kind is not None, p.axis)
    fin = finalized_record(module)
    return LayerSpec(fin.bits, fin.dim, fin.groups, fin.scale is not None, fin.axis) if fin is not None else None


def require_plain(model: nn.Module, action: str, *, dense: bool = False) -> None:
    """Raise ConfigError naming the first layer of ``model`` still prepared for DKM (and, with ``dense``, the
    first in compact mode): ``action`` (what the caller is, e.g. ``"torchdkm.save"``) cannot take it."""
    for name, module in model.named_modules():
        if dkm_parametrization(module) is not None:
            raise ConfigError(f"{action} needs a plain model (or a finalized one), but layer {name!r} is still "
                              f"prepared for DKM (training form): call torchdkm.finalize(model) first")
        if dense and is_compact(module):
            raise ConfigError(f"{action} wants a dense model, but layer {name!r} is in compact mode: call {action} "
                              f"before torchdkm.compact")
