"""Do the planner's and DKM's defaults transfer? Two tasks that played no part in choosing them.

Tasks: scikit-learn's 8x8 digits with an MLP (64-128-128-10) and BBC News (hashed bag-of-words, 4096 features)
with an MLP (4096-128-128-5), torchdkm's built-in data. Each task's training split loses a seeded 20 % for
validation; the fp32 model is trained to convergence on the rest (AdamW one-cycle, until the training accuracy is
100 %, printed). Then, at a whole-model budget of --budget mean bits per parameter:

* the plan: ``torchdkm.plan`` with its defaults (true Fisher on 64 training samples; bits 1..8, dims 1/2/4, one
  LUT or g16, with or without channel scales, or "as is"), vector layouts row-major ("flat"), which the
  straight-through baseline also uses;
* k-means only: the plan's layouts, k-means, no training;
* DKM: the plan's layouts with every other DKMConfig field at its default, torchdkm.step after each step;
* hard k-means + STE: the same layouts and k-means start, hard assignment forward, straight-through backward,
  centroids trained (benchmarks/common.py).

DKM and STE share the loop (--steps of batch 64, AdamW, cosine to 0, no distillation). Each picks its lr from
{3e-4, 1e-3, 3e-3} on the validation split (seed 0), then runs 3 seeds at that lr; test is read once per run.

    python benchmarks/engine/planner_transfer.py --threads 1
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))
import common  # noqa: E402
from render import RULE, compare, fmt  # noqa: E402

import torchdkm  # noqa: E402
from torchdkm.app.build import _bbc_news  # noqa: E402
from torchdkm.app.zoo.data import load_digits  # noqa: E402
from torchdkm.app.zoo.models import MLP  # noqa: E402
from torchdkm.planner import default_candidates, describe, plan  # noqa: E402

TASKS = {"digits": (lambda: load_digits(test_fraction=0.25, seed=0), dict(in_features=64, hidden=128, num_classes=10),
                    80),
         "bbc_news": (lambda: _bbc_news(4096, 0.2, 0), dict(in_features=4096, hidden=128, num_classes=5), 30)}
LRS = (3e-4, 1e-3, 3e-3)


def tensors(ds):
    return torch.stack([x for x, _ in ds]), torch.stack([torch.as_tensor(y) for _, y in ds])


def split(task):
    train, test = TASKS[task][0]()
    x, y = tensors(train)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_val = len(y) // 5
    return {"train": (x[perm[n_val:]], y[perm[n_val:]]), "val": (x[perm[:n_val]], y[perm[:n_val]]),
            "test": tensors(test)}


def fp32_model(task, data, log):
    """The fp32 MLP trained to convergence: AdamW one-cycle for a fixed number of epochs per task, after which the
    training accuracy is 100 % (logged with the validation accuracy)."""
    torch.manual_seed(0)
    model = MLP(**TASKS[task][1])
    x, y = data["train"]
    common.train(model, x, y, steps=TASKS[task][2] * max(1, len(y) // 64), lr=3e-3, batch=64, seed=0, wd=5e-4,
                 schedule="onecycle", progress=False)
    model.eval()
    acc = {k: common.accuracy(model, *data[k]) for k in ("train", "val")}
    log(f"[{task}] fp32: train {100 * acc['train']:.2f}%, val {100 * acc['val']:.2f}%")
    return model, acc


def run(method, fp32, rules, data, steps, lr, seed):
    model = copy.deepcopy(fp32)
    t0 = time.perf_counter()
    x, y = data["train"]
    if method == "kmeans":
        torchdkm.finalize(torchdkm.prepare(model, rules=rules))
    elif method == "dkm":
        torchdkm.prepare(model, rules={n: None if c is None else c.replace(seed=seed) for n, c in rules.items()})
        common.train(model, x, y, steps=steps, lr=lr, batch=64, seed=seed, after_step=lambda: torchdkm.step(model),
                     progress=False)
        torchdkm.finalize(model)
    else:
        mult = common.st_kmeans_prepare(model, torchdkm.DKMConfig(),
                                        {n: None if c is None else c.replace(seed=seed) for n, c in rules.items()})
        common.train(model, x, y, steps=steps, lr=lr, batch=64, seed=seed, lr_mult=mult, progress=False)
        common.strip_parametrizations(model)
    model.eval()
    return {"method": method, "lr": lr, "seed": seed, "seconds": time.perf_counter() - t0,
            "val": common.accuracy(model, *data["val"]), "test": common.accuracy(model, *data["test"])}


def task_rows(task, a, log):
    data = split(task)
    fp32, acc = fp32_model(task, data, log)
    x, y = data["train"]
    cal = x[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))[:64]]
    t0 = time.perf_counter()
    cands = [c.replace(vector_axis="flat") for c in default_candidates()]
    p = plan(fp32, [cal], budget_bits=a.budget, candidates=cands)
    plan_s = time.perf_counter() - t0
    log(f"[{task}] plan in {plan_s:.1f} s\n{p.table()}")
    runs = [run("kmeans", fp32, p.rules, data, 0, 0.0, 0)]
    chosen = {}
    for method in ("dkm", "ste"):
        sweep = [run(method, fp32, p.rules, data, a.steps, lr, 0) for lr in LRS]
        best = max(sweep, key=lambda r: r["val"])
        chosen[method] = best["lr"]
        runs += [dict(r, sweep=True) for r in sweep]
        runs += [dict(best, sweep=False)] + [run(method, fp32, p.rules, data, a.steps, best["lr"], s) for s in (1, 2)]
        by_lr = ", ".join(f"{r['lr']:g}: {100 * r['val']:.2f}" for r in sweep)
        log(f"[{task}] {method}: val % by lr {by_lr}; chosen lr {best['lr']:g}")
    return {"task": task, "fp32_train": acc["train"], "fp32_val": acc["val"],
            "fp32_test": common.accuracy(fp32, *data["test"]), "plan": p.to_dict(), "plan_s": plan_s,
            "layers": {r.name: describe(r.choice.config) for r in p.rows}, "chosen_lr": chosen, "runs": runs,
            "sizes": {"train": len(y), "val": len(data["val"][1]), "test": len(data["test"][1])}}


def table(results) -> str:
    head = ["task", "row", "lr (chosen on val)", "val %", "test %", "seeds", "DKM vs STE (test)"]
    rows = []
    for res in results:
        rows.append([res["task"], "fp32", "-", f"{100 * res['fp32_val']:.2f}", f"{100 * res['fp32_test']:.2f}", "-",
                     "-"])
        final = {m: [r for r in res["runs"] if r["method"] == m and not r.get("sweep")] for m in ("kmeans", "dkm", "ste")}
        word = compare({r["seed"]: r["test"] for r in final["dkm"]}, {r["seed"]: r["test"] for r in final["ste"]})
        label = {"kmeans": "k-means only (the plan's layouts)", "dkm": "DKM", "ste": "hard k-means + STE"}
        for m, rs in final.items():
            rows.append([res["task"], label[m], "-" if m == "kmeans" else f"{res['chosen_lr'][m]:g}",
                         fmt([r["val"] for r in rs]), fmt([r["test"] for r in rs]), len(rs),
                         word if m == "dkm" else "-"])
    return common.markdown_table(head, rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--budget", type=float, default=1.5, help="mean bits per parameter of the whole model")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=common.results_dir(__file__))
    common.harness_args(p)
    a = p.parse_args(argv)
    common.start(__file__, a, argv)
    threads = common.setup_threads(a.threads)
    out = common.output_path(a.out, a.allow_dirty)
    t0 = time.perf_counter()
    results = [task_rows(t, a, print) for t in a.tasks]
    argv = sys.argv[1:] if argv is None else argv
    md = ["# Planner + DKM defaults on two tasks not used to choose them", "",
          __doc__.split("\n\n")[1].strip(), "", __doc__.split("\n\n")[2].strip(), "",
          f"Command: `python benchmarks/engine/planner_transfer.py {' '.join(argv)}`; budget {a.budget} bits per "
          f"parameter (whole model), {a.steps} steps; torch {torch.__version__}, {threads} thread(s), 2 CPU cores; "
          f"{(time.perf_counter() - t0) / 60:.1f} min.", "", f"Verdict: {RULE}", "", table(results), "",
          "Plans: " + "; ".join(f"{r['task']} ({r['plan_s']:.1f} s): " + ", ".join(f"{n} {c}" for n, c in
                                                                                 r["layers"].items())
                                for r in results) + ".", ""]
    common.write_report(out / "planner_transfer.md", "\n".join(md), results)


if __name__ == "__main__":
    main()
