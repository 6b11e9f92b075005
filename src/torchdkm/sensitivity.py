"""Per-weight sensitivity: the diagonal of the Fisher information from calibration batches.

F_i = mean over samples s of (∂ loss_s / ∂ w_i)², one float32 value per weight of every compressible layer (O(N)
memory). A sample is one row of a batch (an image, a sequence); each gets its own backward pass, so F is the mean
of per-sample squared gradients, not the square of a batch gradient. The loss of a sample:

* ``"true"`` (default, no labels needed): the cross-entropy of the model's output against labels drawn from its
  own softmax (every position of a sequence output). A KL to the model's own predictions would have zero
  gradient at the model itself; sampled labels give the true Fisher E_y[g gᵀ] in expectation.
* ``"empirical"``: the cross-entropy against the batch's labels (``(inputs, labels)`` batches, or a dict with
  ``"labels"`` passed to a model that returns ``.loss``).
* a callable ``loss(output, sample) -> scalar``: any loss of one sample's output.

½ Σ F_i δ_i² then estimates the loss increase of a weight perturbation δ (torchdkm.planner, torchdkm.ptq).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError
from .layers import is_supported
from .parametrization import require_plain

__all__ = ["Sensitivity", "fisher_diagonal"]

LossSpec = Union[str, Callable]
_LOSSES = ("true", "empirical")


@dataclass
class Sensitivity:
    """The Fisher diagonal of a model's compressible layers.

    fisher: {layer name: float32 tensor shaped like its weight}; a tied weight appears once, under the first
    layer that holds it. samples: how many samples were averaged. loss: the loss that was used."""

    fisher: Dict[str, Tensor]
    samples: int
    loss: str = "true"
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.fisher:
            raise ConfigError(f"no sensitivity for layer {name!r}; layers measured: {list(self.fisher)[:12]}")
        return self.fisher[name]

    def summary(self) -> List[dict]:
        """Per layer: numel, mean and total Fisher, and the layer's share of the model's total (most fragile
        layers have the largest mean)."""
        total = sum(float(f.sum()) for f in self.fisher.values()) or 1.0
        return [{"layer": n, "numel": f.numel(), "mean": float(f.mean()), "total": float(f.sum()),
                 "share": float(f.sum()) / total} for n, f in self.fisher.items()]

    def table(self) -> str:
        head = f"{'layer':<40} {'weights':>10} {'mean F':>11} {'total F':>11} {'share':>7}"
        rows = [head, "-" * len(head)]
        for r in self.summary():
            rows.append(f"{r['layer'][-40:]:<40} {r['numel']:>10} {r['mean']:>11.3e} {r['total']:>11.3e} "
                        f"{100 * r['share']:>6.1f}%")
        rows.append(f"{len(self.fisher)} layers, {self.samples} samples, loss {self.loss!r}")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def fisher_diagonal(model: nn.Module, batches: Iterable, *, loss: LossSpec = "true",
                    layers: Optional[Sequence[str]] = None, max_samples: Optional[int] = None,
                    seed: int = 0) -> Sensitivity:
    """The Fisher diagonal of every compressible layer's weight (or of ``layers``, by module name).

    batches: an iterable (a DataLoader works) of inputs ``x`` (B × ...), ``(x, labels, ...)`` tuples, or dicts of
    keyword tensors (B × ...). The model runs in eval mode; its training flag and ``requires_grad`` flags are
    restored. Example: ``fisher_diagonal(net, [torch.randn(8, 3, 32, 32)])["conv1"]`` -> a tensor shaped like
    ``net.conv1.weight``, mean of 8 per-sample squared gradients.
    """
    import time

    if not (loss in _LOSSES or callable(loss)):
        raise ConfigError(f"fisher_diagonal: loss={loss!r} is not allowed: give 'true', 'empirical' or a callable "
                          f"loss(output, sample) -> scalar")
    require_plain(model, "torchdkm.fisher_diagonal")
    named = _weights(model, layers)
    if not named:
        raise ConfigError("fisher_diagonal: the model has no compressible layer (Linear, Conv, Embedding) to measure")
    params = list(named.values())
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    flags = [p.requires_grad for p in params]
    training = model.training
    gen = torch.Generator().manual_seed(seed)
    count, start = 0, time.perf_counter()
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        for batch in batches:
            for sample in _samples(batch):
                if max_samples is not None and count >= max_samples:
                    break
                value = _sample_loss(model, sample, loss, gen)
                grads = torch.autograd.grad(value, params, allow_unused=True)
                for a, g in zip(acc, grads):
                    if g is not None:
                        a.add_(g.detach().float().square())
                count += 1
            if max_samples is not None and count >= max_samples:
                break
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(training)
    if count == 0:
        raise ConfigError("fisher_diagonal: the calibration batches held no sample")
    out = {name: a.div_(count) for name, a in zip(named, acc)}
    return Sensitivity(out, count, loss if isinstance(loss, str) else getattr(loss, "__name__", "custom"),
                       time.perf_counter() - start)


def _weights(model: nn.Module, layers: Optional[Sequence[str]]) -> Dict[str, Tensor]:
    """{name: weight} of the supported layers (or the named ones), each tensor once (tied: first name)."""
    modules = dict(model.named_modules())
    if layers is not None:
        missing = [n for n in layers if n not in modules or not is_supported(modules[n])]
        if missing:
            shown = [n for n, m in modules.items() if is_supported(m)][:12]
            raise ConfigError(f"fisher_diagonal: layers {missing} are not compressible layers of this model; "
                              f"its compressible layers include {shown}")
    out, seen = {}, set()
    for name, m in modules.items():
        if (layers is None and is_supported(m)) or (layers is not None and name in layers):
            if id(m.weight) not in seen:
                seen.add(id(m.weight))
                out[name] = m.weight
    return out


def _samples(batch):
    """Split one batch into one-row samples (same structure, leading size 1)."""
    if isinstance(batch, Tensor):
        return [batch[i:i + 1] for i in range(batch.shape[0])]
    if isinstance(batch, dict):
        n = next(v.shape[0] for v in batch.values() if isinstance(v, Tensor))
        return [{k: v[i:i + 1] if isinstance(v, Tensor) else v for k, v in batch.items()} for i in range(n)]
    if isinstance(batch, (tuple, list)):
        n = batch[0].shape[0]
        return [type(batch)(t[i:i + 1] if isinstance(t, Tensor) else t for t in batch) for i in range(n)]
    raise ConfigError(f"fisher_diagonal: a batch must be a tensor, a (inputs, labels) tuple or a dict of tensors, "
                      f"got {type(batch).__name__}")


def run_batch(model: nn.Module, sample, with_labels: bool = False):
    """``model``'s output on one calibration batch: a tensor, an (inputs, labels) tuple (inputs only) or a dict of
    keyword arguments (``labels`` only ``with_labels``)."""
    if isinstance(sample, Tensor):
        return model(sample)
    if isinstance(sample, dict):
        kw = sample if with_labels else {k: v for k, v in sample.items() if k != "labels"}
        return model(**kw)
    return model(sample[0])


def _logits(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if not isinstance(logits, Tensor):
        raise ConfigError(f"fisher_diagonal: cannot find logits in the model's output ({type(out).__name__}); give "
                          f"loss=callable(output, sample)")
    return logits


def _sample_loss(model: nn.Module, sample, loss: LossSpec, gen: torch.Generator) -> Tensor:
    if callable(loss):
        return loss(run_batch(model, sample, True), sample)
    if loss == "empirical":
        if isinstance(sample, dict):
            out = run_batch(model, sample, True)
            value = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
            if value is None:
                raise ConfigError("fisher_diagonal(loss='empirical'): a dict batch needs a model that returns .loss")
            return value
        if isinstance(sample, Tensor) or len(sample) < 2:
            raise ConfigError("fisher_diagonal(loss='empirical') needs (inputs, labels) batches")
        logits = _logits(run_batch(model, sample, False))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), sample[1].reshape(-1), reduction="sum")
    logits = _logits(run_batch(model, sample, False))
    logits = logits.reshape(-1, logits.shape[-1]).float()
    with torch.no_grad():
        y = torch.multinomial(logits.softmax(-1).cpu().double(), 1, generator=gen)[:, 0].to(logits.device)
    return F.cross_entropy(logits, y, reduction="sum")
