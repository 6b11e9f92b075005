"""Planned allocation vs uniform, hand rule and QAT, fine-tuned on Fashion-MNIST (compress to a size).

At two budgets per model, the size of uniform 1 bit (16 centroids of 4-d vectors, one LUT per layer) and of uniform
2 bit (4 centroids, 1-d), five rows share vision.py's data, fp32 model, fine-tuning loop (150 steps × batch 128,
AdamW cosine), distillation (KD 0.5) and BatchNorm re-estimation (20 batches), and each method's lr and knob from
tuning.json (chosen on the validation split):

* planned + DKM:   torchdkm.plan(fp32, calibration, budget_bytes=<the uniform row's parameter bytes>) with the
                   library's default candidates (bits 1..8, dims 1/2/4, one LUT or g16, with or without channel
                   scales, or "as is"), then DKM with the planned rules;
* uniform DKM:     every layer at the budget's layout;
* hand rule + DKM: the budget's layout, but the stem (and MobileNet's depthwise layers) at 4 bits 1-d;
* uniform QAT:     LSQ+ per-channel at the budget's whole bits (1 or 2) everywhere;
* planned QAT:     LSQ+ per-channel at the bit width the planner gives each layer, planned at the same budget with
                   1-d per-layer candidates (bits 1..8 or "as is"), replanned with a smaller budget until QAT's own
                   size (indices + fp16 scale and offset per channel) fits.

Calibration for the Fisher diagonal: 256 seeded training images (seed 1), true Fisher (labels drawn from the
model's own softmax). The plan is made once per model and budget, shared by the seeds. Sizes: the whole model
(every parameter and buffer; LUTs and scales at fp32, QAT's scales at fp16), as vision.py counts them.

    python benchmarks/vision/planned.py --models resnet_small --threads 1 --no-progress
    python benchmarks/vision/planned.py --data digits --steps 5 --fp32-epochs 1 --seeds 2 --allow-dirty  # seconds
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))  # benchmarks/: the shared harness (common.py) and render's rule
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402
import vision as V  # noqa: E402
from render import RULE, compare, fmt  # noqa: E402

import torchdkm  # noqa: E402
from torchdkm.planner import default_candidates, describe, plan  # noqa: E402
from torchdkm.sensitivity import fisher_diagonal  # noqa: E402

ROWS = ["planned_dkm", "uniform_dkm", "hand_dkm", "uniform_qat", "planned_qat"]
LABEL = {"planned_dkm": "planned + DKM", "uniform_dkm": "uniform DKM", "hand_dkm": "hand rule + DKM",
         "uniform_qat": "uniform QAT (LSQ+)", "planned_qat": "planned QAT (LSQ+)"}
HAND = {"resnet_small": r"re:stem\.0", "mobilenet_small": r"re:features\.(0|\d+\.0)\.0"}  # stem (+ depthwise)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet_small", "mobilenet_small"])
    p.add_argument("--budgets", nargs="+", default=["1bit", "2bit"], choices=["1bit", "2bit"])
    p.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--calibration", type=int, default=256, help="training images for the Fisher diagonal")
    p.add_argument("--data", choices=["fashion", "digits"], default="fashion")
    p.add_argument("--fp32-epochs", type=int, default=4)
    p.add_argument("--out", type=Path, default=common.results_dir(__file__))
    p.add_argument("--tag", default="planned")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--report-only", action="store_true", help="run nothing: write the report from the JSONs in --out")
    common.harness_args(p)
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    # vision.py's options for the shared pieces (data, fp32 model, tuned settings, distillation, BN re-estimation)
    a.v = V.parse(["--data", a.data, "--steps", str(a.steps), "--fp32-epochs", str(a.fp32_epochs), "--kd", "0.5",
                   "--bn-recal", "20"] + (["--no-progress"] if a.no_progress else []))
    return a


def parameter_bytes(model, size: dict) -> float:
    """The planner's budget for a size dict of common.*_size: the whole model minus its buffers."""
    return size["model_kib"] * 1024 - sum(b.numel() * b.element_size() for b in model.buffers())


def plan_dkm(fp32, sens, budget_bytes):
    return plan(fp32, sensitivity=sens, budget_bytes=budget_bytes, candidates=default_candidates())


def plan_qat(fp32, sens, budget_bytes, layers):
    """{layer: bits or None} for per-channel QAT within ``budget_bytes`` (QAT's own size; at least QAT's smallest
    model, 1 bit everywhere, which is larger than 16×4-d LUTs on MobileNet), and that budget."""
    from torchdkm.errors import ConfigError

    ones = dict.fromkeys(layers, 1)
    budget_bytes = max(budget_bytes, parameter_bytes(fp32, qat_size(fp32, layers, ones)))
    cands = [torchdkm.DKMConfig(bits=b, min_numel=0) for b in range(1, 9)]
    target = budget_bytes
    for _ in range(20):  # the planner counts a LUT per layer, QAT a scale and offset per channel: repair the gap
        try:
            p = plan(fp32, sensitivity=sens, budget_bytes=target, candidates=cands)
        except ConfigError:  # below the planner's smallest: QAT's smallest is all it can be
            return ones, budget_bytes
        bits = {n: (None if c is None else c.bits) for n, c in p.rules.items() if n in layers}
        over = parameter_bytes(fp32, qat_size(fp32, layers, bits)) - budget_bytes
        if over <= 0:
            return bits, budget_bytes
        target -= over
    return ones, budget_bytes


def qat_size(fp32, layers, bits):
    quant = {n: b for n, b in bits.items() if b is not None}
    return common.model_size(fp32, {id(layers[n].weight): layers[n].weight.numel() * b + layers[n].weight.shape[0] * 32
                                    for n, b in quant.items()})


def run_row(row, fp32, budget, seed, data, a, ctx, log):
    """One fine-tuning run: (result dict)."""
    va, name = a.v, ctx["model"]
    bits, dim = V.BUDGETS[budget]
    method = "dkm" if row.endswith("dkm") else "qat_lsq"
    hp, source = V.method_settings(method, name, budget, va, ctx["tuning"])
    hp = V.run_settings(method, hp, va)
    x, y = data["train"]
    loss_fn = common.kd_loss(fp32, va.kd, va.kd_temperature)
    model = copy.deepcopy(fp32)

    def fit(m, after_step=None, lr_mult=None):
        common.train(m, x, y, steps=a.steps, lr=hp["lr"], seed=seed, after_step=after_step, lr_mult=lr_mult,
                     progress=not a.no_progress, desc=f"{row} {budget} s{seed}", loss_fn=loss_fn)

    t0 = time.perf_counter()
    cfg = torchdkm.DKMConfig(bits=bits, dim=dim, min_numel=0, seed=seed, iters=va.iters)
    layers = common.dkm_layers(fp32, cfg)
    if method == "dkm":
        run_cfg = cfg.replace(tau_scale=hp["tau_scale"])
        if row == "planned_dkm":
            rules = {n: None if c is None else c.replace(tau_scale=hp["tau_scale"], seed=seed, iters=va.iters)
                     for n, c in ctx["plan"][budget].rules.items()}
        elif row == "hand_dkm":
            rules = {HAND[name]: run_cfg.replace(bits=4, dim=1)}
        else:
            rules = None
        torchdkm.prepare(model, run_cfg, rules)
        fit(model, after_step=lambda: torchdkm.step(model))
        torchdkm.finalize(model)
        size = common.clustered_size(fp32, cfg, rules)
    else:
        qb = ctx["qat_bits"][budget] if row == "planned_qat" else dict.fromkeys(layers, bits // dim)
        mult, own = {}, common.dkm_layers(model, cfg)  # the copy's layers: fp32 stays the untouched teacher
        for b in sorted({b for b in qb.values() if b is not None}):
            mult.update(common.qat_prepare(model, {n: own[n] for n, v in qb.items() if v == b}, b,
                                           scale_lr_mult=hp["scale_lr_mult"]))
        fit(model, lr_mult=mult)
        model = common.qat_finalize(model)
        size = qat_size(fp32, layers, qb)
    g = torch.Generator().manual_seed(seed)  # BatchNorm statistics of the final weights, every row alike
    idx = torch.randperm(len(y), generator=g)[: 128 * va.bn_recal].split(128)
    torchdkm.recalibrate_batchnorm(model, (x[i] for i in idx))
    wall = time.perf_counter() - t0
    r = dict(row=row, budget=budget, seed=seed, hp=hp, hp_source=source, wall_s=wall,
             val_top1=common.accuracy(model, *data["val"]), top1=common.accuracy(model, *data["test"]), **size)
    log(f"[{name}] {row:<12} {budget} seed {seed}: val {100 * r['val_top1']:.2f}% test {100 * r['top1']:.2f}% "
        f"{r['model_kib']:.1f} KiB {wall:.0f} s")
    return r


def run_model(name, a, data, log):
    path = a.out / f"{a.tag}_{name}.json"
    fp32, info = V.fp32_for(name, a.v, data, log)
    fp32.eval()
    key = {"code": common.code_version(HERE, HERE.parent / "vision.py")["sources"], "fp32_sha1": info["sha1"],
           "steps": a.steps, "calibration": a.calibration, "data": a.data}
    old = json.loads(path.read_text()) if path.is_file() else {}
    runs = old.get("runs", []) if old.get("key") == key else []
    x, y = data["train"]
    cal = x[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))[: a.calibration]]
    t0 = time.perf_counter()
    sens = fisher_diagonal(fp32, [cal])
    t_sens = time.perf_counter() - t0
    ctx = {"model": name, "tuning": V.load_tuning(a.v.tuning), "plan": {}, "qat_bits": {}, "budgets": {}}
    layers = common.dkm_layers(fp32, torchdkm.DKMConfig(min_numel=0))
    for budget in a.budgets:
        bits, dim = V.BUDGETS[budget]
        uniform = common.clustered_size(fp32, torchdkm.DKMConfig(bits=bits, dim=dim, min_numel=0))
        budget_bytes = parameter_bytes(fp32, uniform)
        t1 = time.perf_counter()
        p = plan_dkm(fp32, sens, budget_bytes)
        t_plan = time.perf_counter() - t1
        ctx["plan"][budget] = p
        ctx["qat_bits"][budget], qat_budget = plan_qat(fp32, sens, budget_bytes, layers)
        ctx["budgets"][budget] = {"budget_bytes": budget_bytes, "uniform_model_kib": uniform["model_kib"],
                                  "plan_seconds": t_plan, "sensitivity_seconds": t_sens,
                                  "plan": {r.name: describe(r.choice.config) for r in p.rows},
                                  "qat_bits": ctx["qat_bits"][budget], "qat_budget_bytes": qat_budget}
        log(f"[{name}] {budget}: budget {budget_bytes / 1024:.1f} KiB of parameters; sensitivity {t_sens:.1f} s, "
            f"plan {t_plan:.1f} s\n{p.table()}\nplanned QAT bits: {ctx['qat_bits'][budget]}")
    result = dict(model=name, key=key, fp32=dict(info, val_top1=common.accuracy(fp32, *data["val"]),
                                                 top1=common.accuracy(fp32, *data["test"])),
                  budgets=ctx["budgets"], runs=runs, torch=torch.__version__, threads=torch.get_num_threads(),
                  command=" ".join(["python benchmarks/vision/planned.py", *a.argv]),
                  provenance=common.provenance(HERE, a.argv))
    for budget in a.budgets:
        for row in a.rows:
            for seed in range(a.seeds):
                if any(r["row"] == row and r["budget"] == budget and r["seed"] == seed for r in runs):
                    continue
                same = [r for r in runs if r["row"] == "uniform_qat" and r["budget"] == budget and r["seed"] == seed]
                uniform_bits = set(ctx["qat_bits"][budget].values()) == {V.BUDGETS[budget][0] // V.BUDGETS[budget][1]}
                if row == "planned_qat" and uniform_bits and same:  # the plan is uniform QAT: the same run
                    runs.append(dict(same[0], row=row, same_as="uniform_qat"))
                    continue
                runs.append(run_row(row, fp32, budget, seed, data, a, ctx, log))
                common.write_json(path, result)
    common.write_json(path, result)
    return result


def summarize(results) -> str:
    header = ["model", "budget", "row", "model KiB", "val top-1 %", "test top-1 %", "seeds",
              "planned + DKM vs this row (test)", "settings"]
    out = []
    for res in results:
        fp = res["fp32"]
        out.append([res["model"], "-", "fp32", "-", f"{100 * fp['val_top1']:.2f}", f"{100 * fp['top1']:.2f}", "-",
                    "-", "-"])
        for budget, b in res["budgets"].items():
            by = {row: [r for r in res["runs"] if r["budget"] == budget and r["row"] == row] for row in ROWS}
            ref = {r["seed"]: r["top1"] for r in by["planned_dkm"]}
            for row, rs in by.items():
                if not rs:
                    continue
                mine = {r["seed"]: r["top1"] for r in rs}
                word = "-" if row == "planned_dkm" else compare(ref, mine) or "one seed"
                word += " (the plan is uniform QAT: its runs)" if rs[0].get("same_as") else ""
                kib = rs[0]["model_kib"]
                ref_kib = by["planned_dkm"][0]["model_kib"] if by["planned_dkm"] else kib
                if row != "planned_dkm" and abs(kib - ref_kib) > 0.01 * ref_kib:
                    word += f" (at {ref_kib:.1f} vs {kib:.1f} KiB)"
                hp = rs[0]["hp"]
                knob = f"tau_scale {hp['tau_scale']:g}" if "tau_scale" in hp else f"scale_lr_mult {hp['scale_lr_mult']:g}"
                out.append([res["model"], f"{budget} ({b['budget_bytes'] / 1024:.1f} KiB params)", LABEL[row],
                            f"{kib:.1f}", fmt([r["val_top1"] for r in rs]), fmt([r["top1"] for r in rs]),
                            len(rs), word, f"lr {hp['lr']:g}, {knob}"])
    return common.markdown_table(header, out)


def main(argv=None):
    a = parse(argv)
    common.setup_threads(a.threads)
    a.out = common.output_path(a.out, a.allow_dirty)
    a.out.mkdir(parents=True, exist_ok=True)
    results = []
    if not a.report_only:
        data = V.load_data(a.v)
        results = [run_model(name, a, data, print) for name in a.models]
    done = [json.loads(p.read_text()) for p in sorted(a.out.glob(f"{a.tag}_*.json"))]
    plans = []
    for res in done:
        for budget, b in res["budgets"].items():
            chosen = ", ".join(f"{n}: {c}" for n, c in b["plan"].items())
            qat = ", ".join(f"{n}: {'as is' if v is None else f'{v}b'}" for n, v in b["qat_bits"].items())
            plans.append(f"- {res['model']} {budget} (sensitivity {b['sensitivity_seconds']:.1f} s, plan "
                         f"{b['plan_seconds']:.1f} s): DKM plan {chosen}. QAT bits {qat}.")
    commands = sorted({r["command"] for r in done})
    md = [f"# Planned allocation vs uniform, hand rule and QAT ({'Fashion-MNIST' if a.data == 'fashion' else 'digits'})",
          "", "Command(s): " + ", ".join(f"`{c}`" for c in commands) + f". torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), 2 CPU cores.", "",
          __doc__.split("\n\n")[1], "",
          f"Rows: {'; '.join(f'{LABEL[r]}' for r in ROWS)}. Verdicts: {RULE}", "",
          summarize(done), "", "Plans:", "", *plans, ""]
    common.write_report(a.out / f"{a.tag}.md", "\n".join(md), done)
    return results


if __name__ == "__main__":
    main()
