"""Equal-effort hyperparameter sweep for the vision benchmark, on the validation split only.

Every fine-tuned method gets the same grid size: the learning rate in LRS times LRS-many values of its one
method-specific knob (KNOBS), seed 0, the same steps, loop and fp32 model as benchmarks/vision/vision.py. Each setting
is scored by top-1 on the validation images carved from the training data (``common.train_val_split``); the
test set is not loaded into the sweep at all. The best setting per (model, budget, method) goes to
results/tuning.json, which vision.py reads; every run is listed in results/tuning.md.

Knobs (3 values each; DKM's grid predates its default of 0.1, which sits at the top):

* DKM ``tau_scale`` - the automatic temperature's scale;
* k-means + STE ``centroid_lr_mult`` - the centroids' lr as a multiple of the weights' lr;
* uniform QAT ``scale_lr_mult`` - the LSQ+ scales' and offsets' lr as a multiple of the weights' lr (with Adam
  the LSQ gradient scaling alone does not set their step size);
* coremltools ``palett_tau`` - DKMPalettizer's absolute softmax temperature (its default 1e-4 in the middle).

Post-training k-means has no setting to tune. Runs are reused on a re-run only with the same code, settings and
fp32 model (as in vision.py), so a sweep can be stopped and continued.

    python benchmarks/vision/tune.py                                  # both models, the 1-bit budget (hours on 2 cores)
    python benchmarks/vision/tune.py --models resnet_small --budgets 2bit 1bit
    python benchmarks/vision/tune.py --tiny --out /tmp/t              # seconds: digits, 2 steps, one lr (a smoke run)
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness (common.py)
import common  # noqa: E402
import vision  # noqa: E402

LRS = (3e-4, 1e-3, 3e-3)
KNOBS = {"dkm": ("tau_scale", (0.02, 0.05, 0.1)),
         "st_kmeans": ("centroid_lr_mult", (0.3, 1.0, 3.0)),
         "qat_lsq": ("scale_lr_mult", (0.01, 0.1, 1.0)),
         "coreml_dkm": ("palett_tau", (1e-5, 1e-4, 1e-3))}
SCRIPT = Path(__file__).resolve()


def grid(method: str, lrs=LRS, values=None):
    """The settings tried for ``method``: every lr × every knob value (KNOBS' 3 unless ``values`` are given)."""
    knob, default = KNOBS[method]
    return [{"lr": lr, knob: v} for lr, v in itertools.product(lrs, values or default)]


def knob_values(specs) -> dict:
    """``["dkm=0.2", "coreml_dkm=0.01,0.1"]`` -> {"dkm": [0.2], "coreml_dkm": [0.01, 0.1]}."""
    out = {}
    for spec in specs or []:
        method, _, values = spec.partition("=")
        if method not in KNOBS or not values:
            raise SystemExit(f"--knob-values {spec!r}: expected METHOD=V[,V...] with METHOD one of {list(KNOBS)}")
        try:
            out[method] = [float(v) for v in values.split(",")]
        except ValueError:
            raise SystemExit(f"--knob-values {spec!r}: the values must be numbers") from None
    return out


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="smoke run: digits, resnet_small, 1bit, 2 steps, lr 1e-3")
    p.add_argument("--data", choices=["fashion", "digits"], default=None)
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--budgets", nargs="+", default=None)
    p.add_argument("--methods", nargs="+", default=None, help=f"subset of {list(KNOBS)}")
    p.add_argument("--lrs", type=float, nargs="+", default=None, help=f"default {list(LRS)}")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--fp32-epochs", type=int, default=None)
    p.add_argument("--n-val", type=int, default=None)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--val-subset", type=int, default=None)
    p.add_argument("--knob-values", nargs="+", default=None, metavar="METHOD=V,...",
                   help="try these values of a method's knob instead of KNOBS' (e.g. to extend a grid past its edge)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--kd", type=float, default=0.0, help="distillation weight for every method (as vision.py)")
    p.add_argument("--kd-temperature", type=float, default=2.0)
    p.add_argument("--bn-recal", type=int, default=0, help="BatchNorm re-estimation batches after every method")
    p.add_argument("--merge", nargs="+", default=None, metavar="TAG",
                   help="run nothing: write <--tag>.json/.md from sweeps run under these tags (parallel processes)")
    p.add_argument("--out", type=Path, default=common.results_dir(__file__))
    p.add_argument("--tag", default="tuning")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    common.harness_args(p)
    a = p.parse_args(argv)
    full = dict(data="fashion", models=["resnet_small", "mobilenet_small"], budgets=["1bit"], methods=list(KNOBS),
                lrs=list(LRS), steps=150, fp32_epochs=4)
    tiny = dict(data="digits", models=["resnet_small"], budgets=["1bit"], methods=list(KNOBS), lrs=[1e-3],
                steps=2, fp32_epochs=1)
    for k, v in (tiny if a.tiny else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.n_val is None:
        a.n_val = 5000 if a.data == "fashion" else 300
    a.test_subset = None
    a.knob_values = knob_values(a.knob_values)
    if not common.coreml_available() and "coreml_dkm" in a.methods:
        print("coremltools is not installed: coreml_dkm is not tuned")
        a.methods = [m for m in a.methods if m != "coreml_dkm"]
    return a


def tune_model(name, a, data, old, log):
    """Sweep every (budget, method) of ``name``; returns (runs, chosen) and keeps ``old`` runs of the same key."""
    fp32, info = vision.fp32_for(name, a, data, log)
    key = {"settings": {k: getattr(a, k) for k in ("data", "steps", "iters", "fp32_epochs", "n_val", "train_subset",
                                                   "val_subset", "kd", "kd_temperature", "bn_recal")},
           "code": common.code_version(SCRIPT, vision.SCRIPT)["sources"], "fp32_sha1": info["sha1"]}
    prev = old.get("models", {}).get(name, {})
    runs = prev.get("runs", []) if prev.get("key") == key else []
    for budget in a.budgets:
        for method in a.methods:
            for hp in grid(method, a.lrs, a.knob_values.get(method)):
                r = next((r for r in runs if (r["budget"], r["method"], r["hp"]) == (budget, method, hp)), None)
                if r is None:
                    r = vision.run_one(method, fp32, budget, 0, data, a, log, hp, evals=("val",))
                    if r is None:
                        break  # e.g. uniform QAT at a fractional budget
                    runs.append(r)
                    old.setdefault("models", {})[name] = {"key": key, "runs": runs}  # progress, for a re-run
                    common.write_json(a.out / f"{a.tag}.json", old)
                    log(f"[{name}] {budget} {method:<11} {hp}: val {100 * r['val_top1']:.2f}%  {r['wall_s']:.0f} s")
    return key, runs, choose(runs)


def choose(runs) -> dict:
    """{budget: {method: the setting with the best validation top-1 (first of equals in grid order), its score
    and how many settings were tried}}."""
    chosen = {}
    for r in runs:
        best = chosen.setdefault(r["budget"], {}).get(r["method"])
        if best is None or r["val_top1"] > best["val_top1"]:
            tried = best["settings_tried"] if best else 0
            chosen[r["budget"]][r["method"]] = {"settings": r["hp"], "val_top1": r["val_top1"],
                                                "settings_tried": tried}
        chosen[r["budget"]][r["method"]]["settings_tried"] += 1
    return chosen


def write_md(res, a):
    rows = []
    for name, m in res["models"].items():
        for r in m["runs"]:
            pick = res["chosen"].get(name, {}).get(r["budget"], {}).get(r["method"], {}).get("settings") == r["hp"]
            rows.append([name, r["budget"], vision.LABEL[r["method"]], r["hp"]["lr"],
                         r["hp"][KNOBS[r["method"]][0]], KNOBS[r["method"]][0], f"{100 * r['val_top1']:.2f}",
                         "**chosen**" if pick else ""])
    counts = {}
    for name, m in res["models"].items():
        for r in m["runs"]:
            counts.setdefault((name, r["budget"], r["method"]), 0)
            counts[(name, r["budget"], r["method"])] += 1
    s = res["settings"]
    unswept = [m for m in KNOBS if m not in s["knobs"]]
    tried = {}  # method -> the knob values its runs tried
    for m in res["models"].values():
        for r in m["runs"]:
            tried.setdefault(r["method"], set()).add(r["hp"][KNOBS[r["method"]][0]])
    values = "; ".join(f"{KNOBS[m][0]} {sorted(v)}" for m, v in tried.items())
    md = [f"# Hyperparameter sweep on the validation split ({'tiny' if a.tiny else 'full'} run)", "",
          "Command: " + res.get("command", f"`python benchmarks/vision/tune.py{' --tiny' if a.tiny else ''}`")
          + f"; torch {torch.__version__}, 1 thread per process. Code {res['code']}.", "",
          f"Data: {s['data']}, validation = {s['n_val']} images carved from the training data (seed 0); the test set "
          f"is not used. Each fine-tuned method: lr in {s['lrs']} × its knob's values ({values}), seed 0, "
          f"{s['steps']} steps of batch 128, AdamW cosine to 0 (the vision benchmark's loop). Settings per (model, "
          f"budget, method): {sorted(set(counts.values()))}. Every method alike: distillation weight {s.get('kd', 0)}, "
          f"BatchNorm re-estimated on {s.get('bn_recal', 0)} batches after training. "
          + (f"Not swept here (vision.py runs its defaults): {', '.join(vision.LABEL[m] for m in unswept)}. "
             if unswept else "")
          + "The chosen setting (best validation top-1, first in grid "
          "order among equals) is what `benchmarks/vision/vision.py` uses.", "",
          common.markdown_table(["model", "budget", "method", "lr", "knob value", "knob", "val top-1 %", ""], rows),
          ""]
    common.write_text_atomic(a.out / f"{a.tag}.md", "\n".join(md))


def merge(a):
    """Combine sweeps run in separate processes (one --tag each; say one per model, or one per group of methods)
    into <--tag>.json / .md: the runs of a model are the union of its runs in every part, each part keeps its own
    (model's) key (code, settings, fp32 weights) and the command that re-creates it."""
    parts = {tag: json.loads((a.out / f"{tag}.json").read_text()) for tag in a.merge}
    res = {"models": {}, "parts": {}}
    for tag, part in parts.items():
        for name, m in part["models"].items():
            res["models"].setdefault(name, {"runs": []})["runs"] += m["runs"]
            methods = sorted({r["method"] for r in m["runs"]})
            lrs = sorted({r["hp"]["lr"] for r in m["runs"]})
            s = m["key"]["settings"]
            values = {meth: sorted({r["hp"][KNOBS[meth][0]] for r in m["runs"] if r["method"] == meth})
                      for meth in methods}
            extra = [f"{meth}={','.join(f'{v:g}' for v in vs)}" for meth, vs in values.items()
                     if vs != sorted(KNOBS[meth][1])]
            command = (f"`python benchmarks/vision/tune.py --models {name} --methods {' '.join(methods)} --lrs "
                       f"{' '.join(f'{lr:g}' for lr in lrs)}" + (f" --knob-values {' '.join(extra)}" if extra else "")
                       + f" --kd {s['kd']:g} --bn-recal {s['bn_recal']} --tag {tag}`")
            res["parts"][f"{tag}/{name}"] = {"model": name, "key": m["key"], "command": command,
                                             "git": part.get("code", {}).get("git")}
    res["chosen"] = {name: choose(m["runs"]) for name, m in res["models"].items()}
    runs = [r for m in res["models"].values() for r in m["runs"]]
    res["wall_s"] = sum(r["wall_s"] for r in runs)
    keys = [p["key"]["settings"] for p in res["parts"].values()]
    if any(k != keys[0] for k in keys):
        raise SystemExit(f"the sweeps {a.merge} used different settings, so their runs do not compare: {keys}")
    fp32 = {}  # every part of a model must have fine-tuned the same fp32 weights
    for p in res["parts"].values():
        if fp32.setdefault(p["model"], p["key"]["fp32_sha1"]) != p["key"]["fp32_sha1"]:
            raise SystemExit(f"the sweeps of {p['model']} in {a.merge} started from different fp32 weights; re-run one")
    methods = sorted({r["method"] for r in runs})
    res["settings"] = dict(keys[0], lrs=sorted({r["hp"]["lr"] for r in runs}), knobs={m: KNOBS[m] for m in methods})
    res["command"] = ("in separate processes: " + ", ".join(p["command"] for p in res["parts"].values())
                      + f"; then `python benchmarks/vision/tune.py --merge {' '.join(a.merge)}`")
    res["code"] = sorted({p["key"]["code"] + (f" (git {p['git']})" if p["git"] else "") for p in res["parts"].values()})
    common.write_json(a.out / f"{a.tag}.json", res)
    write_md(res, a)
    return res


def main(argv=None):
    a = parse(argv)
    common.start(__file__, a, argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.merge:
        return merge(a)
    common.setup_threads(a.threads)
    data = vision.load_data(a)
    del data["test"]  # tuning never sees the test set
    path = a.out / f"{a.tag}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    t0 = time.perf_counter()
    chosen = dict(old.get("chosen", {}))
    for name in a.models:
        key, runs, new = tune_model(name, a, data, old, print)
        chosen[name] = {**chosen.get(name, {}), **new}
        old.setdefault("models", {})[name] = {"key": key, "runs": runs}
    res = dict(old, chosen=chosen, code=common.code_version(SCRIPT, vision.SCRIPT),
               settings={"data": a.data, "steps": a.steps, "kd": a.kd, "kd_temperature": a.kd_temperature,
                         "bn_recal": a.bn_recal, "lrs": a.lrs, "knobs": {m: KNOBS[m] for m in a.methods},
                         "n_val": a.n_val, "fp32_epochs": a.fp32_epochs, "train_subset": a.train_subset},
               wall_s=time.perf_counter() - t0)
    common.write_json(path, res)
    write_md(res, a)
    print(f"tuning: {sum(len(m['runs']) for m in res['models'].values())} runs; chosen:")
    print(json.dumps(chosen, indent=1))
    return res


if __name__ == "__main__":
    main()
