"""Shared pieces of the benchmarks: threads, data, training loop, evaluation, fp32 cache, baselines, tables.

Baselines implemented here (all fine-tuned with the *same* loop, optimizer, lr schedule and steps as DKM):

* ``ptq_kmeans`` - post-training k-means weight sharing (Deep Compression style, no fine-tuning): torchdkm's own
  k-means initialisation (optimal 1-D k-means / k-means++ + Lloyd), then hard assignment.
* ``st_kmeans`` - k-means fine-tuning through hard assignments with a straight-through estimator, the
  TF Model Optimization clustering scheme: the forward uses W_hat = C[idx(W)] + (W - stopgrad(W)); the centroids C
  (k × d) are trainable parameters (gradient = sum of the gradients of the weights assigned to them) and the
  original weights W get the straight-through gradient; the assignments idx are **re-computed every step**
  (nearest centroid of the current W), as TF-MOT does in training mode. Init: the same k-means as DKM.
  With ``group_size`` / ``channel_scale`` (same meaning as torchdkm's): one trainable k × d table per group of
  axis-0 slices (G × k × d), and each slice divided by its max |W| (recomputed every forward, as torchdkm does)
  before the assignment, multiplied back after: W_hat = s · (C_g[idx(W / s)] + (V - stopgrad V)), V = W / s.
* ``qat_lsq`` - uniform n-bit quantization-aware training, per-output-channel affine fake-quant with learned step
  size and offset (LSQ+, Bhalgat et al. 2020): w_q = s * clamp(round((w - b) / s), 0, 2^n - 1) + b, round with a
  straight-through gradient, s and b per output channel. Init: the range [b, b + (2^n - 1) s] that minimises the
  channel's quantization MSE over a 20 × 20 grid of shrinkings of its min and max ends towards the median
  (LSQ+'s MSE init; min/max alone wastes levels in the tails). s and b get their own learning rate,
  lr × ``scale_lr_mult`` (tuned); s's gradient is scaled by 1/sqrt(numel_per_channel * (2^n - 1)) as in LSQ. What ships: n-bit indices
  + s and b per output channel in **fp16** (the model is evaluated with s, b rounded to fp16, and the size
  counts 2 × 16 bits per channel). Uniform quantization cannot go below 1 bit/weight.
* ``coreml_dkm`` - coremltools' ``DKMPalettizer`` (``coremltools.optimize.torch.palettization``) with
  ``ModuleDKMPalettizerConfig(n_bits, cluster_dim, weight_threshold=0, palett_tau)`` on exactly the layers torchdkm
  compresses (``module_name_configs``), ``palettizer.step()`` after each optimizer step, ``finalize()`` at the
  end. coremltools silently leaves a layer uncompressed when ``cluster_dim`` does not divide its output channels;
  :func:`coreml_palettized` checks the finalized weights (at most 2^bits distinct vectors) and the size counts
  every layer that fails the check at fp32.

Sizes (:func:`clustered_size`, :func:`uniform_size`) have two parts, kept apart in every table:
``bits_per_weight`` - the compressed layers only: their stored bits (indices + LUTs, or indices + scales/offsets)
over their weights; ``model_kib`` - the whole model as shipped: compressed layers + every other parameter +
every buffer (BatchNorm running statistics, num_batches_tracked), each uncompressed tensor at its dtype (fp32).
``factor`` = fp32 model (every parameter and buffer) / ``model_kib``.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

import torchdkm
from torchdkm._fileio import write_atomic, write_text_atomic
from torchdkm.app.build import cosine_schedule
from torchdkm.functional import (channel_scale, from_vectors, lookup, nearest_centroid, to_group_vectors,
                                 to_vectors)

HERE = Path(__file__).resolve().parent
DOMAINS = ("vision", "text", "llm", "engine")  # benchmarks/<domain>/: its scripts and their results/
for _d in DOMAINS:  # a script of one domain may import a helper of another (e.g. text/minilm.py)
    if str(HERE / _d) not in sys.path:
        sys.path.append(str(HERE / _d))
CACHE = Path(os.environ.get("TORCHDKM_CACHE", Path.home() / ".cache" / "torchdkm"))


def results_dir(script) -> Path:
    """The committed results folder of a benchmark script: ``results/`` beside it (e.g. benchmarks/vision/results)."""
    return Path(script).resolve().parent / "results"


# ------------------------------------------------------------------------------------------------ provenance


def git_state(where: Path = HERE) -> dict:
    """The git state of the checkout (or ``git worktree``) holding ``where``: ``commit`` (full sha1), ``git``
    (``git describe --always``, + "-dirty" when ``changed`` is not empty) and ``changed``: tracked files with
    uncommitted changes outside the results folders (benchmarks/<domain>/results/, which a run itself writes, so
    a run's own earlier output does not mark the code dirty). {} outside a git checkout."""
    def git(*args, strip=True):
        r = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=30)
        return (r.stdout.strip() if strip else r.stdout) if r.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        if commit is None:
            return {}
        top = Path(git("rev-parse", "--show-toplevel"))
        status = git("status", "--porcelain=v1", "--untracked-files=no", strip=False) or ""  # "XY path" lines
    except (OSError, subprocess.SubprocessError):
        return {}
    results = [(HERE / d / "results").relative_to(top).as_posix() + "/" for d in DOMAINS
               if (HERE / d / "results").is_relative_to(top)]
    paths = [line[3:].split(" -> ")[-1] for line in status.splitlines()]  # a rename: "old -> new"
    changed = sorted(f for f in paths if f and not any(f.startswith(r) for r in results))
    described = (git("describe", "--always") or commit[:7]) + ("-dirty" if changed else "")
    return {"commit": commit, "git": described, "changed": changed}


def repo_relative(path) -> str:
    """``path`` relative to the repository when inside it (committed outputs hold no local paths), else its name."""
    full = Path(path).resolve()
    try:
        return full.relative_to(HERE.parent).as_posix()
    except ValueError:
        return full.name


def harness_args(p) -> None:
    """The flags every benchmark shares (added to its argparse parser)."""
    p.add_argument("--allow-dirty", action="store_true",
                   help="run from a tree with uncommitted changes: what would go into a results folder goes to "
                        "benchmarks/scratch/ instead (git-ignored, never rendered into the docs)")


def output_path(path: Optional[Path], allow_dirty: bool = False) -> Optional[Path]:
    """Where a benchmark may write ``path`` (a file or folder). Inside a committed results folder
    (benchmarks/<domain>/results) only from a clean tree: uncommitted changes to the code are refused, or with
    ``allow_dirty`` redirected to the same place under benchmarks/scratch/. Paths elsewhere are returned as given."""
    if path is None:
        return None
    full = Path(path).resolve()
    for d in DOMAINS:
        base = HERE / d / "results"
        if full == base or base in full.parents:
            break
    else:
        return Path(path)
    state = git_state()
    if state and not state["changed"]:
        return Path(path)
    why = (f"uncommitted changes in {', '.join(state['changed'][:8])}" + (" ..." if len(state["changed"]) > 8 else "")
           if state else "not a git checkout (no commit to record)")
    if not allow_dirty:
        raise SystemExit(f"refusing to write {path} into a results folder: {why}. Commit first (or run from a clean "
                         f"`git worktree`), or pass --allow-dirty to write to benchmarks/scratch/ instead.")
    scratch = HERE / "scratch" / full.relative_to(HERE)
    print(f"--allow-dirty: {why}; writing to {scratch} (git-ignored, not rendered)")
    return scratch


def provenance(script, argv=None) -> dict:
    """What every result records: the commit (and whether the tree was dirty), the command, the machine (cores,
    threads, torch, python) and the date (UTC)."""
    import datetime
    import platform

    state = git_state()
    rel = Path(script).resolve().relative_to(HERE.parent).as_posix()
    argv = list(sys.argv[1:] if argv is None else argv)
    return {"commit": state.get("commit"), "git": state.get("git"), "dirty": bool(state.get("changed")) or not state,
            "command": " ".join(["python", rel, *argv]),
            "machine": {"cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "python": platform.python_version(), "arch": platform.machine()},
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def provenance_md(run: dict) -> str:
    """One Markdown line of a run's provenance, for the .md a benchmark writes beside its JSON."""
    m = run["machine"]
    return (f"Run {run['date']} at commit {run['git'] or '?'}: `{run['command']}`; {m['cores']} CPU cores, "
            f"{m['threads']} torch thread(s), torch {m['torch']}, Python {m['python']}, {m['arch']}.")


_RUN: dict = {}  # the provenance of this process's run, set by start(); added to every JSON write_json writes


def start(script, a, argv=None) -> dict:
    """Call in a benchmark's main after parsing (``a`` from a parser given :func:`harness_args`): records the run's
    provenance, added to every JSON :func:`write_json` writes, and checks ``a.out`` (:func:`output_path`)."""
    _RUN.clear()
    _RUN.update(provenance(script, argv))
    if getattr(a, "out", None) is not None:
        a.out = output_path(a.out, getattr(a, "allow_dirty", False))
    return dict(_RUN)


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


def digits_tensors():
    """(x_train, y_train, x_test, y_test) of scikit-learn's 8x8 digits as 1-channel images (N, 1, 8, 8), a
    stratified 1347/450 split: the small stand-in that lets the vision path run where Fashion-MNIST is absent."""
    from torchdkm.app.zoo.data import load_digits

    tr, te = load_digits(test_fraction=0.25, seed=0)
    img = lambda t: ((t - 0.3) / 0.4).reshape(-1, 1, 8, 8)  # noqa: E731  (roughly standardised pixels)
    return img(tr.tensors[0]), tr.tensors[1], img(te.tensors[0]), te.tensors[1]


def train_val_split(n, n_val=5000, seed=0):
    """Indices (train, validation) of n training examples: a seeded random n_val held out for tuning, the rest for
    training; both sorted. The test set is never part of it."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


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
          schedule: str = "cosine", after_step: Optional[Callable[[], None]] = None,
          lr_mult: Optional[Dict[nn.Parameter, float]] = None, desc: str = "train", progress: bool = True,
          loss_fn=None) -> float:
    """AdamW for ``steps`` steps (cosine decay to 0, or one-cycle), model in train mode; returns wall seconds.

    Every trainable parameter of ``model`` is optimized (parametrization state such as STE centroids or LSQ
    scales included); ``lr_mult`` maps some of them to their own learning rate, lr × multiplier."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    mult = {id(p): m for p, m in (lr_mult or {}).items()}
    groups: Dict[float, list] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault(mult.get(id(p), 1.0), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "lr": lr * m} for m, ps in groups.items()], lr=lr, weight_decay=wd)
    if schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                    total_steps=steps, pct_start=0.2)
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


def kd_loss(teacher: nn.Module, alpha: float, temperature: float = 2.0):
    """``loss_fn(model, xb, yb)`` for :func:`train`: (1 - alpha) cross-entropy + alpha KL to ``teacher``'s logits
    (torchdkm.distillation_loss at ``temperature``); the teacher is a frozen eval-mode copy. None when alpha = 0."""
    if alpha <= 0:
        return None
    teacher = copy.deepcopy(teacher).eval().requires_grad_(False)

    def loss_fn(m, xb, yb):
        out = m(xb)
        with torch.no_grad():
            t = teacher(xb)
        kd = torchdkm.distillation_loss(out, t, temperature=temperature)
        return (1 - alpha) * nn.functional.cross_entropy(out, yb) + alpha * kd

    return loss_fn


@torch.no_grad()
def accuracy(model: nn.Module, x, y, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(y), batch):
        correct += (model(x[s:s + batch]).argmax(1) == y[s:s + batch]).sum().item()
    return correct / len(y)


def fp32_model(name: str, build: Callable[[], nn.Module], x, y, xt, yt, *, epochs: int, lr: float, batch: int = 128,
               seed: int = 0, cache: Optional[Path] = None, progress: bool = True, log=print):
    """Train ``build()`` in fp32 once (seeded, AdamW one-cycle) and cache it; returns (model, info dict).

    (xt, yt) only gives ``info["top1"]`` when the model is trained here: pass validation data, not the test set.
    ``info["sha1"]`` identifies the weights, so results computed from another fp32 model are never reused."""
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
        return model, dict(blob["info"], sha1=state_hash(model))
    log(f"[{name}] training fp32: {epochs} epochs x {len(y) // batch} steps, batch {batch} (cached at {path})")
    wall = train(model, x, y, steps=steps, lr=lr, batch=batch, seed=seed, wd=5e-4, schedule="onecycle",
                 desc=f"{name} fp32", progress=progress)
    acc = accuracy(model, xt, yt)
    info = {"epochs": epochs, "steps": steps, "lr": lr, "batch": batch, "seed": seed, "train_s": wall, "top1": acc}
    write_atomic(path, lambda f: torch.save({"state_dict": model.state_dict(), "info": info}, f))
    log(f"[{name}] fp32 top-1 {acc:.4f} after {wall:.0f} s")
    return model, dict(info, sha1=state_hash(model))


def state_hash(model: nn.Module) -> str:
    """sha1 (12 hex digits) of a model's state dict: names, dtypes, shapes and bytes."""
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def code_version(*scripts: Path) -> dict:
    """What produced a result: ``sources`` = sha1 of the library's sources (src/torchdkm, every .py) and of
    benchmarks/common.py and ``scripts``, so any edit changes it; ``git`` = ``git describe --always --dirty``
    for people (absent outside a checkout). Reused results must match ``sources``."""
    files = sorted(Path(torchdkm.__file__).resolve().parent.rglob("*.py")) + [HERE / "common.py"]
    files += [Path(f).resolve() for f in scripts]
    h = hashlib.sha1()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    out = {"sources": h.hexdigest()[:12]}
    try:
        r = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=HERE, capture_output=True, text=True,
                           timeout=10)
        if r.returncode == 0:
            out["git"] = r.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


# ------------------------------------------------------------------------------------------------ sizes


def model_size(model: nn.Module, compressed: Dict[int, float]) -> dict:
    """Size of ``model`` when each parameter whose id is a key of ``compressed`` takes that many bits and every
    other parameter and buffer is stored at its dtype ({} gives the fp32 model)."""
    params = {id(p): p for p in model.parameters()}
    buffers = {id(b): b for b in model.buffers()}
    fp32 = sum(p.numel() for p in params.values()) * 4 + sum(b.numel() * b.element_size() for b in buffers.values())
    other = sum(p.numel() * p.element_size() for i, p in params.items() if i not in compressed)
    other += sum(b.numel() * b.element_size() for b in buffers.values())
    layer_bits = sum(compressed.values())
    total = layer_bits / 8 + other
    n_w = sum(params[i].numel() for i in compressed)
    return {"model_kib": total / 1024, "fp32_kib": fp32 / 1024, "factor": fp32 / total,
            "layers_kib": layer_bits / 8 / 1024, "bits_per_weight": layer_bits / n_w if n_w else 32.0,
            "layers": len(compressed)}


def clustered_size(model: nn.Module, config: torchdkm.DKMConfig, rules=None, fp32_layers=(),
                   lut_dtype_bits: int = 32) -> dict:
    """Size of ``model`` (fp32, unprepared) clustered with ``config``/``rules`` as torchdkm stores it: per layer
    ceil(numel/dim) × bits index bits + its G × 2^bits × dim LUT entries (G = 1 per-tensor) + one scale per
    axis-0 slice when channel_scale is on, each at ``lut_dtype_bits`` (default fp32; torchdkm.report's count),
    everything else as is.
    ``fp32_layers``: layers of that selection a method left uncompressed; they count at 32 bits per weight, in
    the whole model and in bits_per_weight alike (which then still covers the same layers as for torchdkm).

    Keys: model_kib (whole model: every parameter and buffer), fp32_kib, factor, layers_kib and bits_per_weight
    (the selected layers only), layers (how many compressed), fp32_layers."""
    import copy

    m = torchdkm.prepare(copy.deepcopy(model), config, rules)
    r = torchdkm.report(m, lut_dtype_bits=lut_dtype_bits, print_table=False)
    mods = dict(model.named_modules())
    names = {row.name for row in r.layers}
    unknown = sorted(set(fp32_layers) - names)
    if unknown:
        raise ValueError(f"fp32_layers {unknown} are not among the selected layers {sorted(names)}")
    bits = {id(mods[row.name].weight): (row.numel * 32 if row.name in fp32_layers else row.stored_bits)
            for row in r.layers}
    return dict(model_size(model, bits), layers=len(names) - len(set(fp32_layers)), fp32_layers=sorted(fp32_layers))


def uniform_size(model: nn.Module, layers: Dict[str, nn.Module], bits: Union[int, Dict[str, int]],
                 scale_bits: int = 16) -> dict:
    """Size of per-output-channel uniform n-bit quantization of ``layers`` (modules of ``model``; ``bits`` one n
    for all or {layer name: n}): n bits per weight + scale and offset per output channel at ``scale_bits`` (fp16:
    what ships); same keys as :func:`clustered_size`."""
    n = bits if isinstance(bits, dict) else dict.fromkeys(layers, bits)
    return model_size(model, {id(m.weight): m.weight.numel() * n[name] + m.weight.shape[0] * 2 * scale_bits
                                for name, m in layers.items()})


def dkm_layers(model: nn.Module, config: torchdkm.DKMConfig, rules=None) -> Dict[str, nn.Module]:
    """The layers torchdkm.prepare would compress (name -> module), so every method compresses the same ones."""
    from torchdkm.layers import select_layers

    return {name: mod for name, mod, _ in select_layers(model, config, rules)}


def fitted_granularity(model: nn.Module, config: torchdkm.DKMConfig, rules=None):
    """Per-layer changes that let ``config``'s group_size / channel_scale fit every selected layer, so all methods
    cluster with the same granularity: ({layer name: {field: value}}, notes for the log).

    A group_size g that does not divide the layer's C0 axis-0 slices (or whose groups' weights ``dim`` does not
    divide) becomes the largest divisor of C0 up to g that fits (None if none does); channel_scale is dropped
    where ``dim`` does not divide a slice's weights (torchdkm's layout rules, DKMConfig.layout_problem)."""
    from torchdkm.layers import select_layers

    changes, notes = {}, []
    for name, mod, cfg in select_layers(model, config, rules):
        shape = tuple(mod.weight.shape)
        if cfg.layout_problem(shape) is None:
            continue
        rows, per_slice, d = shape[0], mod.weight.numel() // shape[0], cfg.dim
        c = {}
        if cfg.scale_kind and d > 1 and per_slice % d:
            c["channel_scale"] = False
        if cfg.group_size is not None:
            fits = [x for x in range(1, min(cfg.group_size, rows) + 1) if rows % x == 0 and (x * per_slice) % d == 0]
            if not fits or fits[-1] != cfg.group_size:
                c["group_size"] = fits[-1] if fits else None
        assert cfg.replace(**c).layout_problem(shape) is None, (name, shape, c)
        changes[name] = c
        notes.append(f"{name} {list(shape)}: " + ", ".join(
            f"group_size {cfg.group_size} -> {c['group_size']} (largest divisor of {rows} up to {cfg.group_size}"
            f"{f' whose {d}-vectors fit' if d > 1 else ''})" if k == "group_size" else
            f"no channel scale (dim {d} does not divide its {per_slice} weights per slice)" for k in c))
    return changes, notes


def granularity_rules(config: torchdkm.DKMConfig, changes: Dict[str, dict]) -> Optional[dict]:
    """torchdkm rules giving each layer of ``changes`` (from :func:`fitted_granularity`) ``config`` with its
    changes; None when there are none."""
    return {name: config.replace(**c) for name, c in changes.items()} or None


# ------------------------------------------------------------------------------------------------ baselines


class _STKMeans(nn.Module):
    """Parametrization W -> C[nearest(W)] + (W - stopgrad W): TF-MOT style clustering with trainable centroids.

    centroids: k × d (one table) or G × k × d (one per group of consecutive axis-0 slices); scale_kind "max" (or
    "rms", DKMConfig.scale_kind): each axis-0 slice divided by s = its max |W| (or RMS) before the assignment and
    multiplied by s after (s recomputed every forward from the current W and differentiable, as in torchdkm)."""

    def __init__(self, centroids: torch.Tensor, dim: int, scale_kind: Optional[str] = None):
        super().__init__()
        self.centroids = nn.Parameter(centroids.clone())
        self.dim = dim
        self.scale_kind = scale_kind

    def forward(self, w):
        scale = channel_scale(w, self.scale_kind) if self.scale_kind else None
        v = w if scale is None else w / scale
        if self.centroids.dim() == 2:
            vecs, pad = to_vectors(v, self.dim)
        else:
            vecs, pad = to_group_vectors(v, self.dim, self.centroids.shape[0])
        idx = nearest_centroid(vecs, self.centroids)
        hard = lookup(self.centroids, idx) + (vecs - vecs.detach())
        out = from_vectors(hard, w.shape, pad)
        return out if scale is None else out * scale


def st_kmeans_prepare(model: nn.Module, config: torchdkm.DKMConfig, rules=None, centroid_lr_mult: float = 1.0
                      ) -> Dict[nn.Parameter, float]:
    """Register the straight-through k-means parametrization (initialised by torchdkm's k-means on the same
    vectors torchdkm clusters: per group, scaled when channel_scale is on); returns {centroid parameter:
    lr multiplier} for train(). Each layer takes its own config from ``rules`` like torchdkm.prepare."""
    from torchdkm.layers import select_layers, tied_partners

    mult = {}
    chosen = select_layers(model, config, rules)
    partners = tied_partners(chosen)  # tied layers (an LM head and its embedding) share one table, as in torchdkm
    for name, mod, cfg in chosen:
        w = mod.weight.detach()
        problem = cfg.layout_problem(tuple(w.shape))
        if problem:
            raise torchdkm.ConfigError(f"layer {name!r} (weight {tuple(w.shape)}): {problem}")
        v = w / channel_scale(w, cfg.scale_kind) if cfg.scale_kind else w
        groups = cfg.groups(w.shape)
        vecs = to_vectors(v, cfg.dim)[0] if groups == 1 else to_group_vectors(v, cfg.dim, groups)[0]
        c = torchdkm.kmeans_init(vecs, cfg.k, seed=cfg.seed)  # k × d, or G × k × d grouped
        p = _STKMeans(c, cfg.dim, scale_kind=cfg.scale_kind)
        parametrize.register_parametrization(mod, "weight", p, unsafe=True)
        for _, partner in partners.get(name, ()):
            parametrize.register_parametrization(partner, "weight", p, unsafe=True)
        mult[p.centroids] = centroid_lr_mult
    return mult


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


@torch.no_grad()
def mse_range(flat: torch.Tensor, qmax: int, grid: int = 20):
    """Per row of ``flat`` (C × n): the (lo, hi) of a uniform grid of qmax + 1 levels that minimises the
    quantization MSE, among lo = m - f (m - min), hi = m + g (max - m) for m the row's median and f, g each on
    ``grid`` values in (0, 1] (both ends searched apart: one outlier should not shrink the other side)."""
    lo0, hi0 = flat.min(1).values, flat.max(1).values
    m = flat.median(1).values
    fracs = torch.linspace(1.0 / grid, 1.0, grid, dtype=flat.dtype)[:, None]  # (grid, 1)
    best = torch.full_like(lo0, float("inf"))
    b_lo, b_hi = lo0.clone(), hi0.clone()
    los = m - fracs * (m - lo0)  # (grid, C): every lower end at once, one upper end per pass
    for g in fracs[:, 0].tolist():
        hi = (m + g * (hi0 - m)).expand_as(los)
        s = ((hi - los) / qmax).clamp_min(1e-12)[..., None]
        q = ((flat - los[..., None]) / s).round().clamp(0, qmax) * s + los[..., None]
        err, i = (q - flat).pow(2).sum(2).min(0)  # best lower end per channel for this upper end
        better = err < best
        best = torch.where(better, err, best)
        b_lo = torch.where(better, los.gather(0, i[None])[0], b_lo)
        b_hi = torch.where(better, hi[0], b_hi)
    return b_lo, b_hi


class _LSQ(nn.Module):
    """Per-output-channel affine uniform fake-quant with learned step and offset (LSQ+), STE on round."""

    def __init__(self, w: torch.Tensor, bits: int):
        super().__init__()
        self.qmax = 2 ** bits - 1
        flat = w.detach().reshape(w.shape[0], -1)
        lo, hi = mse_range(flat, self.qmax)
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


def qat_prepare(model: nn.Module, layers: Dict[str, nn.Module], bits: int, scale_lr_mult: float = 1.0
                ) -> Dict[nn.Parameter, float]:
    """Register LSQ+ fake-quant on ``layers``; returns {scale or offset parameter: lr multiplier} for train()."""
    mult = {}
    for mod in layers.values():
        q = _LSQ(mod.weight, bits)
        parametrize.register_parametrization(mod, "weight", q, unsafe=True)
        mult.update({q.step: scale_lr_mult, q.offset: scale_lr_mult})
    return mult


@torch.no_grad()
def qat_finalize(model: nn.Module) -> nn.Module:
    """Round every LSQ scale and offset to fp16 (what ships), then bake the quantized weights in."""
    for mod in model.modules():
        if isinstance(mod, _LSQ):
            mod.step.copy_(mod.step.half().float())
            mod.offset.copy_(mod.offset.half().float())
    return strip_parametrizations(model)


def coreml_available() -> bool:
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import coremltools.optimize.torch.palettization  # noqa: F401
        return True
    except Exception:
        return False


def coreml_prepare(model: nn.Module, layers: Iterable[str], bits: int, dim: int, palett_tau: float = 1e-4):
    """coremltools DKMPalettizer on exactly the named layers (``module_name_configs``, nothing else);
    returns (prepared model, palettizer). Call ``palettizer.step()`` after each optimizer step."""
    import logging

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from coremltools.optimize.torch.palettization import (DKMPalettizer, DKMPalettizerConfig,
                                                              ModuleDKMPalettizerConfig)
    cfg = ModuleDKMPalettizerConfig(n_bits=bits, cluster_dim=None if dim == 1 else dim, weight_threshold=0,
                                    palett_tau=float(palett_tau))
    pal = DKMPalettizer(model, DKMPalettizerConfig(module_name_configs={name: cfg for name in layers}))
    return pal.prepare(inplace=True), pal


def cluster_sizes(w: torch.Tensor, dim: int) -> torch.Tensor:
    """How many vectors each distinct ``dim``-vector of ``w`` stands for, in torchdkm's layout (consecutive elements
    of the flattened weight; a zero-padded last vector, if any, left out)."""
    flat = w.detach().reshape(-1)
    return torch.unique(flat[: flat.numel() // dim * dim].reshape(-1, dim), dim=0, return_counts=True)[1]


def distinct_vectors(w: torch.Tensor, dim: int) -> int:
    """Distinct ``dim``-vectors of ``w`` in the fewer of the two layouts: torchdkm's (consecutive elements of the
    flattened weight) and coremltools' (``dim`` consecutive output channels at one position)."""
    flat = w.detach().reshape(-1)
    counts = []
    if flat.numel() % dim == 0:
        counts.append(cluster_sizes(w, dim).numel())
    if w.shape[0] % dim == 0:
        v = w.detach().reshape(w.shape[0] // dim, dim, -1).transpose(1, 2).reshape(-1, dim)
        counts.append(torch.unique(v, dim=0).shape[0])
    return min(counts) if counts else flat.numel()


def coreml_palettized(model: nn.Module, layers: Iterable[str], bits: int, dim: int) -> List[str]:
    """Which of ``layers`` the finalized coremltools model really stores palettized: at most 2^bits distinct
    ``dim``-vectors (coremltools skips a layer silently, e.g. when cluster_dim does not divide its channels)."""
    mods = dict(model.named_modules())
    return [n for n in layers if distinct_vectors(mods[n].weight, dim) <= 2 ** bits]


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


def write_report(md_path: Path, text: str, rows) -> None:
    """A benchmark's outputs: ``text`` as ``md_path`` and {"rows": rows} (with the run's provenance) as the .json
    beside it; the text is also printed."""
    md_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(md_path, text)
    write_json(md_path.with_suffix(".json"), {"rows": rows})
    print(text)


def write_results(stem: Path, res: dict, markdown) -> None:
    """A benchmark's results so far: ``res`` with this run's provenance as ``stem``.json, ``markdown(res)`` as .md."""
    res["provenance"] = dict(_RUN)
    write_json(stem.with_suffix(".json"), res)
    write_text_atomic(stem.with_suffix(".md"), markdown(res))


def write_json(path: Path, obj) -> None:
    """``obj`` as indented JSON, atomically; a dict gets this run's ``provenance`` (see :func:`start`) if it has none."""
    if isinstance(obj, dict) and _RUN and "provenance" not in obj:
        obj = {**obj, "provenance": dict(_RUN)}
    write_text_atomic(path, json.dumps(obj, indent=1))
