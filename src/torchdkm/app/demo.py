"""``torchdkm demo``: a short version of the vision benchmark (benchmarks/vision.py).

ResNetSmall (BatchNorm + residual blocks, 0.175 M parameters) on Fashion-MNIST: train fp32 (cached), then
compress it with DKM at two budgets - 2 bits/weight (2^2 centroids, 1-d) and 1 bit/weight (2^4 centroids of
4-d vectors) - fine-tuning each for a few hundred steps; print the table, write the 1-bit model as a torchdkm
artifact, the plot and the table into ``out_dir``. About 5 minutes on 2 CPU cores the first time; the fp32
checkpoint is cached (``~/.cache/torchdkm/demo``, env ``TORCHDKM_CACHE``), so a second run is quicker.
Without the Fashion-MNIST package it says how to install it and falls back to scikit-learn's digits (an MLP).
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
from ..api import finalize, prepare
from ..config import DKMConfig
from ..report import report
from ..serialization import save
from .build import cosine_schedule
from .plots import pyplot, save_png

BUDGETS = (("2 bits/weight", 2, 1), ("1 bit/weight", 4, 4))


def _cache_dir(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("TORCHDKM_CACHE", Path.home() / ".cache" / "torchdkm")) / "demo"


def _data(train_subset, test_subset, log):
    """(name, x, y, xt, yt, build_model)."""
    from .zoo import data
    from .zoo.models import MLP, ResNetSmall

    try:
        tr, te = data.load_fashion_mnist()
        name, build = "Fashion-MNIST, ResNetSmall", ResNetSmall
    except FileNotFoundError:
        log(f"Fashion-MNIST is not installed (looked in {data.FASHION_MNIST_ROOT}). Install it with:\n"
            "    apt-get install -y dataset-fashion-mnist\n"
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


def run_demo(out_dir: str = "out/demo", quick: bool = False, *, fp32_steps: Optional[int] = None,
             steps: Optional[int] = None, train_subset: Optional[int] = None, test_subset: Optional[int] = None,
             cache_dir=None, progress: bool = True, log=print) -> list:
    """Run the demo; returns the table rows (dicts). ``quick``: fewer steps (a smoke run, ~1 minute).

    The keyword-only arguments shrink it further (tests): fp32_steps / steps (DKM fine-tuning steps per budget),
    train_subset / test_subset, cache_dir (fp32 checkpoint cache).
    """
    t_start = time.perf_counter()
    torch.manual_seed(0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name, x, y, xt, yt, build = _data(train_subset, test_subset, log)
    per_epoch = max(1, len(y) // 128)
    fp32_steps = fp32_steps or (per_epoch // 2 if quick else per_epoch)  # 1 epoch (Fashion-MNIST: 468 steps)
    steps = steps or (40 if quick else 150)
    log(f"torchdkm demo: {name}; train {len(y)}, test {len(yt)} examples; torch threads {torch.get_num_threads()}")

    cache = _cache_dir(cache_dir)
    key = f"{'resnet_small' if name.startswith('Fashion') else 'mlp'}-{len(y)}-{fp32_steps}-v1"
    ckpt = cache / f"fp32-{key}.pt"
    torch.manual_seed(0)
    base = build()
    if ckpt.is_file():
        base.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        log(f"fp32 model loaded from the cache {ckpt} (delete it to retrain)")
        fp32_s = 0.0
    else:
        log(f"training fp32 for {fp32_steps} steps (batch 128); cached afterwards at {ckpt}, so a second run is quicker")
        t = time.perf_counter()
        _train(base, x, y, fp32_steps, 3e-3, "fp32 training", progress, onecycle=True)
        fp32_s = time.perf_counter() - t
        write_atomic(ckpt, lambda f: torch.save(base.state_dict(), f))
    fp32_rep = report(base, print_table=False)
    rows = [dict(model="fp32", bits_per_weight=32.0, kib=fp32_rep.fp32_bytes / 1024, factor=1.0,
                 top1=_accuracy(base, xt, yt), seconds=fp32_s)]
    last = None
    for label, bits, dim in BUDGETS:
        model = prepare(copy.deepcopy(base), DKMConfig(bits=bits, dim=dim, min_numel=0))
        t = time.perf_counter()
        _train(model, x, y, steps, 1e-3, f"DKM {label}", progress)
        finalize(model)
        secs = time.perf_counter() - t
        r = report(model, print_table=False)
        n = sum(row.numel for row in r.layers)
        rows.append(dict(model=f"DKM {2 ** bits} centroids x {dim}-d", bits_per_weight=sum(row.stored_bits for row in r.layers) / n,
                         kib=r.compressed_bytes / 1024, factor=r.factor, top1=_accuracy(model, xt, yt), seconds=secs))
        last = (model, label)

    table = _table(rows)
    log("\n" + table)
    write_text_atomic(out / "table.md", f"# torchdkm demo: {name}\n\n{table}\n")
    _plot(rows, out / "accuracy_vs_size.png", name)
    model, label = last
    path = out / "model_1bit.safetensors"
    save(model, path)
    log(f"wrote the {label} model as a torchdkm artifact: {path} ({path.stat().st_size / 1024:.1f} KiB on disk)")
    log(f"wrote {out / 'table.md'} and {out / 'accuracy_vs_size.png'}; total {time.perf_counter() - t_start:.0f} s")
    return rows


def _table(rows) -> str:
    lines = ["| model | bits/weight | size KiB | factor | top-1 % | train s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['bits_per_weight']:.2f} | {r['kib']:.1f} | {r['factor']:.1f}x | "
                     f"{100 * r['top1']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def _plot(rows, path, title) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["kib"] for r in rows[1:]], [100 * r["top1"] for r in rows[1:]], "o-", label="DKM (torchdkm)")
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
