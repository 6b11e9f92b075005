"""Shared pieces of the benchmarks: threads, data, training loop, evaluation, fp32 cache, baselines, tables.

Baselines implemented here (all fine-tuned with the *same* loop, optimizer, lr schedule and steps as DKM):

* ``ptq_kmeans`` - post-training k-means weight sharing (Deep Compression style, no fine-tuning): torchdkm's own
  k-means initialisation (optimal 1-D k-means / k-means++ + Lloyd), then hard assignment.
* ``st_kmeans`` - k-means fine-tuning through hard assignments with a straight-through estimator, the
  TF Model Optimization clustering scheme: the forward uses W_hat = C[idx(W)] + (W - stopgrad(W)); the centroids C
  (k × d) are trainable parameters (gradient = sum of the gradients of the weights assigned to them) and the
  original weights W get the straight-through gradient; the assignments idx are **re-computed every step**
  (nearest centroid of the current W), as TF-MOT does in training mode. Init: the same k-means as DKM.
* ``qat_lsq`` - uniform n-bit quantization-aware training, per-output-channel affine fake-quant with learned step
  size and offset (LSQ+, Bhalgat et al. 2020): w_q = s * clamp(round((w - b) / s), 0, 2^n - 1) + b, round with a
  straight-through gradient, s and b per output channel, initialised from the channel's min/max, s's gradient
  scaled by 1/sqrt(numel_per_channel * (2^n - 1)) as in LSQ. Stored size: n bits per weight + 2 fp32 values
  (s, b) per output channel. Uniform quantization cannot go below 1 bit/weight.
* ``coreml_dkm`` - coremltools' ``DKMPalettizer`` (``coremltools.optimize.torch.palettization``) with
  ``ModuleDKMPalettizerConfig(n_bits, cluster_dim, weight_threshold=0)``, ``palettizer.step()`` after each
  optimizer step, ``finalize()`` at the end.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

import torchdkm
from torchdkm.app.build import cosine_schedule
from torchdkm.functional import from_vectors, nearest_centroid, to_vectors

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(os.environ.get("TORCHDKM_CACHE", Path.home() / ".cache" / "torchdkm"))


def setup_threads(n: Optional[int] = None) -> int:
    """Torch intra-op threads. Default 1 (env TORCHDKM_THREADS): on our shared 2-core machine one thread per
    process was measured 2-3x faster per step than two (small ops lose to thread synchronisation under load)."""
    n = n or int(os.environ.get("TORCHDKM_THREADS", "1"))
    torch.set_num_threads(n)
    return n


# ------------------------------------------------------------------------------------------------ data


def fashion_tensors():
    """(x_train, y_train, x_test, y_test) of Fashion-MNIST, the full 60k/10k split, normalised."""
    from torchdkm.app.zoo.data import load_fashion_mnist

    tr, te = load_fashion_mnist()
    return tr.tensors[0], tr.tensors[1], te.tensors[0], te.tensors[1]


# ------------------------------------------------------------------------------------------------ train / eval


def batches(n: int, batch: int, steps: int, seed: int):
    """Index batches for ``steps`` optimizer steps, reshuffling each pass over the n examples (seeded)."""
    g = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        for idx in torch.randperm(n, generator=g).split(batch):
            if len(idx) < batch:
                continue
            yield idx
            done += 1
            if done == steps:
                return


def train(model: nn.Module, x, y, *, steps: int, lr: float, batch: int = 128, seed: int = 0, wd: float = 0.0,
          schedule: str = "cosine", after_step: Optional[Callable[[], None]] = None, extra_params=(),
          desc: str = "train", progress: bool = True, loss_fn=None) -> float:
    """AdamW for ``steps`` steps (cosine decay to 0, or one-cycle), model in train mode; returns wall seconds."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad] + list(extra_params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    else:
        sched = cosine_schedule(opt, steps)
    loss_fn = loss_fn or (lambda m, xb, yb: nn.functional.cross_entropy(m(xb), yb))
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(total=steps, desc=desc, leave=False, disable=not progress, mininterval=2.0)
    for idx in batches(len(y), batch, steps, seed):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, x[idx], y[idx])
        loss.backward()
        opt.step()
        sched.step()
        if after_step is not None:
            after_step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return time.perf_counter() - t0


@torch.no_grad()
def accuracy(model: nn.Module, x, y, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(y), batch):
        correct += (model(x[s:s + batch]).argmax(1) == y[s:s + batch]).sum().item()
    return correct / len(y)


def fp32_model(name: str, build: Callable[[], nn.Module], x, y, xt, yt, *, epochs: int, lr: float, batch: int = 128,
               seed: int = 0, cache: Optional[Path] = None, progress: bool = True, log=print):
    """Train ``build()`` in fp32 once (seeded, AdamW one-cycle) and cache it; returns (model, info dict)."""
    cache = Path(cache) if cache is not None else CACHE
    steps = epochs * (len(y) // batch)
    key = hashlib.sha1(f"{name}|{epochs}|{lr}|{batch}|{seed}|{len(y)}|v1".encode()).hexdigest()[:10]
    path = cache / "fp32" / f"{name}-{key}.pt"
    torch.manual_seed(seed)
    model = build()
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(blob["state_dict"])
        log(f"[{name}] fp32 checkpoint loaded from cache {path} (delete it to retrain)")
        return model, blob["info"]
    log(f"[{name}] training fp32: {epochs} epochs x {len(y) // batch} steps, batch {batch} (cached at {path})")
    wall = train(model, x, y, steps=steps, lr=lr, batch=batch, seed=seed, wd=5e-4, schedule="onecycle",
                 desc=f"{name} fp32", progress=progress)
    acc = accuracy(model, xt, yt)
    info = {"epochs": epochs, "steps": steps, "lr": lr, "batch": batch, "seed": seed, "train_s": wall, "top1": acc}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": model.state_dict(), "info": info}, tmp)
    os.replace(tmp, path)
    log(f"[{name}] fp32 top-1 {acc:.4f} after {wall:.0f} s")
    return model, info


# ------------------------------------------------------------------------------------------------ sizes


def kmeans_size(model: nn.Module, config: torchdkm.DKMConfig, rules=None) -> dict:
    """Compressed size of ``model`` clustered with ``config`` on the same layers DKM uses, as torchdkm.report counts."""
    import copy

    m = torchdkm.prepare(copy.deepcopy(model), config, rules)
    r = torchdkm.report(m, print_table=False)
    n_w = sum(row.numel for row in r.layers)
    return {"kib": r.compressed_bytes / 1024, "factor": r.factor, "fp32_kib": r.fp32_bytes / 1024,
            "bits_per_weight": sum(row.stored_bits for row in r.layers) / n_w, "layers": len(r.layers)}


def uniform_size(model: nn.Module, layers: Dict[str, nn.Module], bits: int) -> dict:
    """Size of per-channel uniform n-bit quantization: n bits per weight + (scale, offset) fp32 per channel."""
    params = {id(p): p for p in model.parameters()}
    fp32 = sum(p.numel() for p in params.values()) * 4
    q_ids = {id(m.weight) for m in layers.values()}
    q_bits = sum(m.weight.numel() * bits + m.weight.shape[0] * 64 for m in layers.values())
    other = sum(p.numel() * p.element_size() for i, p in params.items() if i not in q_ids)
    total = q_bits / 8 + other
    n_w = sum(m.weight.numel() for m in layers.values())
    return {"kib": total / 1024, "factor": fp32 / total, "fp32_kib": fp32 / 1024, "bits_per_weight": q_bits / n_w,
            "layers": len(layers)}


def dkm_layers(model: nn.Module, config: torchdkm.DKMConfig, rules=None) -> Dict[str, nn.Module]:
    """The layers torchdkm.prepare would compress (name -> module), so every method compresses the same ones."""
    from torchdkm.layers import select_layers

    return {name: mod for name, mod, _ in select_layers(model, config, rules)}


# ------------------------------------------------------------------------------------------------ baselines


class _STKMeans(nn.Module):
    """Parametrization W -> C[nearest(W)] + (W - stopgrad W): TF-MOT style clustering with trainable centroids."""

    def __init__(self, centroids: torch.Tensor, dim: int):
        super().__init__()
        self.centroids = nn.Parameter(centroids.clone())
        self.dim = dim

    def forward(self, w):
        vecs, pad = to_vectors(w, self.dim)
        idx = nearest_centroid(vecs, self.centroids)
        hard = self.centroids[idx] + (vecs - vecs.detach())
        return from_vectors(hard, w.shape, pad)


def st_kmeans_prepare(model: nn.Module, config: torchdkm.DKMConfig, rules=None) -> List[nn.Parameter]:
    """Register the straight-through k-means parametrization (k-means initialised); returns the centroid params."""
    cents = []
    for _, mod in dkm_layers(model, config, rules).items():
        vecs, _ = to_vectors(mod.weight.detach(), config.dim)
        c = torchdkm.kmeans_init(vecs, config.k, seed=config.seed)
        p = _STKMeans(c, config.dim)
        parametrize.register_parametrization(mod, "weight", p, unsafe=True)
        cents.append(p.centroids)
    return cents


def ptq_kmeans_apply(model: nn.Module, config: torchdkm.DKMConfig, rules=None) -> nn.Module:
    """Post-training k-means (no fine-tuning): torchdkm's k-means init then hard assignment (= prepare + finalize)."""
    return torchdkm.finalize(torchdkm.prepare(model, config, rules))


def strip_parametrizations(model: nn.Module) -> nn.Module:
    """Bake every parametrization's current output into a plain weight."""
    for mod in model.modules():
        if parametrize.is_parametrized(mod):
            for name in list(mod.parametrizations.keys()):
                parametrize.remove_parametrizations(mod, name, leave_parametrized=True)
    return model


class _LSQ(nn.Module):
    """Per-output-channel affine uniform fake-quant with learned step and offset (LSQ+), STE on round."""

    def __init__(self, w: torch.Tensor, bits: int):
        super().__init__()
        self.qmax = 2 ** bits - 1
        flat = w.detach().reshape(w.shape[0], -1)
        lo, hi = flat.min(1).values, flat.max(1).values
        shape = (-1,) + (1,) * (w.dim() - 1)
        self.step = nn.Parameter(((hi - lo) / self.qmax).clamp_min(1e-8).reshape(shape))
        self.offset = nn.Parameter(lo.reshape(shape).clone())
        self.grad_scale = 1.0 / math.sqrt(flat.shape[1] * self.qmax)

    def forward(self, w):
        g = self.grad_scale
        s = self.step * g + (self.step - self.step * g).detach()
        b = self.offset * g + (self.offset - self.offset * g).detach()
        v = ((w - b) / s).clamp(0, self.qmax)
        q = v + (v.round() - v).detach()
        return q * s + b


def qat_prepare(model: nn.Module, layers: Dict[str, nn.Module], bits: int) -> List[nn.Parameter]:
    extra = []
    for mod in layers.values():
        q = _LSQ(mod.weight, bits)
        parametrize.register_parametrization(mod, "weight", q, unsafe=True)
        extra += [q.step, q.offset]
    return extra


def coreml_available() -> bool:
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import coremltools.optimize.torch.palettization  # noqa: F401
        return True
    except Exception:
        return False


def coreml_prepare(model: nn.Module, layers: Dict[str, nn.Module], bits: int, dim: int):
    """coremltools DKMPalettizer on the given layers; returns (palettized model, palettizer, names it palettized)."""
    import logging

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from coremltools.optimize.torch.palettization import (DKMPalettizer, DKMPalettizerConfig,
                                                              ModuleDKMPalettizerConfig)
    cfg = ModuleDKMPalettizerConfig(n_bits=bits, cluster_dim=None if dim == 1 else dim, weight_threshold=0)
    config = DKMPalettizerConfig(module_name_configs={name: cfg for name in layers})
    pal = DKMPalettizer(model, config)
    model = pal.prepare(inplace=True)
    done = [n for n, m in model.named_modules() if hasattr(m, "weight_fake_quant")]
    return model, pal, done


# ------------------------------------------------------------------------------------------------ tables


def fmt_acc(values: List[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    t = torch.tensor(values, dtype=torch.float64) * 100
    return f"{t.mean():.2f} ± {t.std():.2f}"


def markdown_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
