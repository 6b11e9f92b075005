"""The main job until the Fashion-MNIST demo lands: an MLP on scikit-learn's digits, fp32 vs DKM."""
from __future__ import annotations

import copy
import os
import time

import torch
from torch import nn

from . import DKMConfig, finalize, prepare, report


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=0.3, random_state=0, stratify=y)
    f, l = torch.float32, torch.long
    return torch.tensor(xtr, dtype=f), torch.tensor(ytr, dtype=l), torch.tensor(xte, dtype=f), torch.tensor(yte, dtype=l)


def _train(model, x, y, epochs, lr=1e-3):
    opt = torch.optim.Adam(model.parameters(), lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


@torch.no_grad()
def _accuracy(model, x, y):
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def run_demo(out_dir: str = "out/demo", quick: bool = False) -> list:
    torch.manual_seed(0)
    xtr, ytr, xte, yte = _digits()
    base = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    _train(base, xtr, ytr, 5 if quick else 30)
    rows = [("fp32", 32.0, report(base, print_table=False).fp32_mib * 1024, 1.0, _accuracy(base, xte, yte), 0.0)]
    for bits, dim in ((2, 1), (4, 4)):
        model = prepare(copy.deepcopy(base), DKMConfig(bits=bits, dim=dim, min_numel=0))
        t = time.perf_counter()
        _train(model, xtr, ytr, 2 if quick else 10)
        finalize(model)
        r = report(model, print_table=False)
        rows.append((f"DKM {2**bits}x{dim}-d", bits / dim, r.compressed_mib * 1024, r.factor,
                     _accuracy(model, xte, yte), time.perf_counter() - t))
    print("| model | bits/weight | KiB | factor | top-1 | fine-tune s |")
    print("|---|---|---|---|---|---|")
    for name, b, kib, f, acc, s in rows:
        print(f"| {name} | {b:.2f} | {kib:.1f} | {f:.1f}x | {acc:.4f} | {s:.1f} |")
    os.makedirs(out_dir, exist_ok=True)
    return rows
