"""Collect the DKM investigation runs (benchmarks/vision/results/tuning/*.json, written by vision.py --out
benchmarks/vision/results/tuning --tag ...) into one table: results/tuning/summary.md. Every number is read from the runs.

The runs were made with, e.g.:

    python benchmarks/vision/vision.py --models resnet_small --budgets 1bit --methods dkm --seeds 1 --tau-scale 0.2 \
        --out benchmarks/vision/results/tuning --tag tau0.2
    python benchmarks/vision/vision.py --models resnet_small --budgets 1bit --methods dkm st_kmeans --seeds 1 --steps 600 \
        --lr 3e-3 --out benchmarks/vision/results/tuning --tag steps600_lr3e-3
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness (common.py)
import common  # noqa: E402

LABEL = {"dkm": "DKM (torchdkm)", "st_kmeans": "k-means + STE", "qat_lsq": "uniform QAT (LSQ+)"}


def main(folder: Path = common.results_dir(__file__) / "tuning", main_results: Path = common.results_dir(__file__)):
    rows = []
    sources = sorted(folder.glob("*_*.json")) + sorted(main_results.glob("vision_*.json"))
    for path in sources:
        res = json.loads(path.read_text())
        s = res["settings"]
        fp = res["fp32"]["top1"]
        for r in res["runs"]:
            if r["budget"] != "1bit" or r["method"] not in LABEL:
                continue
            hp = r.get("hp", s)  # newer vision.py runs record their own settings
            rows.append((res["model"], r["method"], s["steps"], hp.get("lr"), hp.get("tau_scale"), s["iters"], r["seed"],
                         r["top1"], fp, path.name))
    rows.sort(key=lambda t: (t[0], t[2], t[3], t[4], t[1], t[6]))
    table = common.markdown_table(
        ["model", "method", "steps", "lr", "tau_scale", "iters", "seed", "top-1 %", "Δ vs fp32", "source"],
        [[m, LABEL[me], st, lr, ts if me == "dkm" else "-", it if me == "dkm" else "-", sd, f"{100 * a:.2f}",
          f"{100 * (a - fp):+.2f}", src] for m, me, st, lr, ts, it, sd, a, fp, src in rows])
    md = ["# DKM investigation at the 1-bit budget (2^4 centroids of 4-d vectors)", "",
          "Fashion-MNIST, full train/test split, same cached fp32 models and loop as benchmarks/vision/vision.py "
          "(AdamW, cosine to 0, batch 128). `source` is the JSON each row was read from; vision_*.json rows are the "
          "main benchmark's.", "", table, ""]
    (folder / "summary.md").write_text("\n".join(md))
    print(table)


if __name__ == "__main__":
    main()
