"""Vision benchmark: DKM vs the baselines users would pick instead, on Fashion-MNIST.

Data: the 60k Fashion-MNIST training images split by ``common.train_val_split`` into 55,000 for training and a
seeded 5,000 for validation (tuning); the 10k test images are used once, for the reported numbers. ``--data
digits`` runs the same path on scikit-learn's 8x8 digits (where Fashion-MNIST is not installed, e.g. CI).

Two model families as in the DKM paper, scaled to 28×28: ``resnet_small`` (BatchNorm + residual blocks) and
``mobilenet_small`` (depthwise-separable, the family the paper calls hard to compress). Each is trained in fp32
once on the training part (seeded, cached under ~/.cache/torchdkm/fp32, env TORCHDKM_CACHE), then compressed at
several budgets (index bits / cluster dim; every Conv2d and Linear layer, min_numel=0):

    4 bit = 2^4 centroids, 1-d    2 bit = 2^2, 1-d    1 bit = 2^4 centroids of 4-d vectors    0.5 bit = 2^4 of 8-d

Methods (functions ``method_<name>`` below; exact definitions in benchmarks/common.py): ``dkm`` (torchdkm DKM
fine-tuning); ``ptq_kmeans`` (post-training k-means, no fine-tuning); ``st_kmeans`` (k-means fine-tuning through
hard assignments, straight-through, TF-MOT style); ``qat_lsq`` (uniform n-bit per-channel LSQ+ QAT, MSE range
init, fp16 scales; only whole bits >= 1); ``coreml_dkm`` (coremltools DKMPalettizer on the same layers, when
installed). Every fine-tuned method uses the same loop: AdamW with cosine decay to 0, --steps steps of batch 128,
the same data order for a given seed; BatchNorm in train mode while fine-tuning, eval mode for evaluation.

Hyperparameters: each method's lr and its one method-specific knob (DKM tau_scale, STE centroid lr multiplier,
QAT scale/offset lr multiplier, coremltools palett_tau) come from results/tuning.json, written by
benchmarks/vision/tune.py from an equal-effort sweep on the validation split (--tuning; --no-tuning uses DEFAULTS;
--lr / --tau-scale / ... override both). Each run records its settings and where they came from.

LUT granularity (``--group-size G``, ``--channel-scale``; default one LUT per layer): the same for every k-means
method (ptq_kmeans, st_kmeans, dkm): one LUT per G consecutive output channels and/or each output channel divided
by its max |w| (``--channel-scale rms``: by its RMS), as torchdkm.DKMConfig(group_size=G, channel_scale=...). A
layer the granularity does not fit (C0 not a multiple of G, ...) gets the nearest one that does
(common.fitted_granularity, logged). qat_lsq and coreml_dkm keep their own granularity (per-channel uniform;
coremltools per-tensor). ``--layer-budget RULE=BUDGET`` gives the layers a rule names (a module name or
``re:<regex>``, torchdkm's rule syntax) another budget, for the k-means methods and uniform QAT alike (QAT at that
budget's whole bits), e.g. to spend bits where per-channel QAT spends its scales. Sizes count every LUT and scale
(fp32 in ``bits_per_weight``/``model_kib`` as everywhere here; ``bits_per_weight_lut16`` at fp16).
``--side-by-side TAG ...`` writes ``<--tag>.md`` comparing runs already made under those tags.

Seeds are fine-tuning seeds (data order, k-means init): the fp32 model is one model, shared by all of them.
At the key budgets (--key-budgets) every method in --seed-methods (default: all) runs --seeds seeds; elsewhere one.

Results are reused on a re-run only when the settings, the code (a hash of the library and benchmark sources) and
the fp32 model (a hash of its weights) are all the same; anything else starts afresh.

    python benchmarks/vision/vision.py            # full (both models, sequentially; per model with --models in parallel)
    python benchmarks/vision/vision.py --quick    # a few minutes: resnet_small, data subsets, short schedules
    python benchmarks/vision/vision.py --data digits --steps 5 --fp32-epochs 2   # seconds, no Fashion-MNIST needed
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness (common.py)
import common  # noqa: E402

import torchdkm  # noqa: E402
from torchdkm.app.zoo.models import build_model  # noqa: E402

BUDGETS = {"4bit": (4, 1), "2bit": (2, 1), "1bit": (4, 4), "0.5bit": (4, 8)}
METHODS = ["ptq_kmeans", "st_kmeans", "qat_lsq", "coreml_dkm", "dkm"]
LABEL = {"fp32": "fp32", "dkm": "DKM (torchdkm)", "ptq_kmeans": "k-means, no fine-tuning",
         "st_kmeans": "k-means + STE fine-tuning", "qat_lsq": "uniform QAT (LSQ+)", "coreml_dkm": "coremltools DKM"}
# Settings used without a tuning.json entry; KNOB names each fine-tuned method's one method-specific setting.
DEFAULTS = {"ptq_kmeans": {}, "dkm": {"lr": 1e-3, "tau_scale": 0.05},
            "st_kmeans": {"lr": 1e-3, "centroid_lr_mult": 1.0}, "qat_lsq": {"lr": 1e-3, "scale_lr_mult": 1.0},
            "coreml_dkm": {"lr": 1e-3, "palett_tau": 1e-4}}
# Training options outside the tuned settings (flags of this script; tune.py runs without them).
TRAINING_OPTIONS = {"tau_scale_end": None, "hard_forward": False, "direct_grad": 0.0, "kd": 0.0, "kd_temperature": 2.0,
                    "bn_recal": 0, "group_size": None, "channel_scale": False, "layer_budget": None,
                    "vector_axis": "flat"}
CLUSTERED = ("ptq_kmeans", "st_kmeans", "dkm")  # the methods --group-size / --channel-scale apply to
KNOB = {"dkm": "tau_scale", "st_kmeans": "centroid_lr_mult", "qat_lsq": "scale_lr_mult", "coreml_dkm": "palett_tau"}
SCRIPT = Path(__file__).resolve()


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few minutes: resnet_small, subsets, short schedules")
    p.add_argument("--data", choices=["fashion", "digits"], default="fashion")
    p.add_argument("--models", nargs="+", default=None, help="resnet_small mobilenet_small")
    p.add_argument("--budgets", nargs="+", default=None, help=f"subset of {list(BUDGETS)}")
    p.add_argument("--methods", nargs="+", default=None, help=f"subset of {METHODS}")
    p.add_argument("--key-budgets", nargs="+", default=None, help="budgets that get --seeds fine-tuning seeds")
    p.add_argument("--coreml-budgets", nargs="+", default=None)
    p.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds at the key budgets")
    p.add_argument("--seed-methods", nargs="+", default=None, help="methods that get --seeds (default: all)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (batch 128)")
    p.add_argument("--tuning", type=Path, default=common.results_dir(__file__) / "tuning.json",
                   help="tune.py output giving each method's settings")
    p.add_argument("--no-tuning", action="store_true", help="ignore --tuning: DEFAULTS and the flags below")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning AdamW lr for every method (override)")
    p.add_argument("--tau-scale", type=float, default=None, help="DKM tau_scale (override)")
    p.add_argument("--centroid-lr-mult", type=float, default=None, help="STE centroid lr multiplier (override)")
    p.add_argument("--scale-lr-mult", type=float, default=None, help="QAT scale/offset lr multiplier (override)")
    p.add_argument("--palett-tau", type=float, default=None, help="coremltools palett_tau (override)")
    p.add_argument("--tau-scale-end", type=float, default=None,
                   help="DKM: anneal tau_scale to this value over the fine-tuning (torchdkm.step each step)")
    p.add_argument("--hard-forward", action="store_true", help="DKM: DKMConfig(hard_forward=True)")
    p.add_argument("--direct-grad", type=float, default=0.0,
                   help="DKM: DKMConfig(direct_grad=...), each weight's own gradient added with this factor")
    p.add_argument("--kd", type=float, default=0.0,
                   help="distillation weight alpha for EVERY fine-tuned method: (1-alpha) CE + alpha KD(fp32 teacher)")
    p.add_argument("--kd-temperature", type=float, default=2.0)
    p.add_argument("--bn-recal", type=int, default=0,
                   help="re-estimate BatchNorm statistics on this many training batches after EVERY method")
    p.add_argument("--group-size", type=int, default=None,
                   help="k-means methods: one LUT per this many output channels (default: one per layer)")
    p.add_argument("--channel-scale", nargs="?", const=True, default=False, choices=[True, "max", "rms"],
                   help="k-means methods: divide each output channel by its max |w| (or 'rms': its RMS) before "
                        "clustering")
    p.add_argument("--layer-budget", nargs="+", default=None, metavar="RULE=BUDGET",
                   help="k-means methods and QAT: layers named by RULE (module name or re:<regex>) at BUDGET "
                        f"(of {list(BUDGETS)}) instead of the run's budget")
    p.add_argument("--side-by-side", nargs="+", default=None, metavar="TAG",
                   help="run nothing: write <--tag>.md comparing the results under these tags")
    p.add_argument("--vector-axis", default="flat", choices=["flat", "output", "input", "auto"],
                   help="DKM: DKMConfig(vector_axis=...), how d-vectors are formed (default: row-major)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--fp32-epochs", type=int, default=None)
    p.add_argument("--n-val", type=int, default=None, help="validation examples carved from the training data")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--val-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--out", type=Path, default=common.results_dir(__file__))
    p.add_argument("--tag", default="vision", help="output file stem")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    common.harness_args(p)
    a = p.parse_args(argv)
    full = dict(models=["resnet_small", "mobilenet_small"], budgets=list(BUDGETS), methods=METHODS,
                key_budgets=["1bit"], coreml_budgets=["2bit", "1bit"], seeds=3, steps=150, fp32_epochs=4,
                train_subset=None, val_subset=None, test_subset=None)
    quick = dict(models=["resnet_small"], budgets=["2bit", "1bit"], methods=METHODS, key_budgets=[],
                 coreml_budgets=["1bit"], seeds=1, steps=40, fp32_epochs=1, train_subset=12800, val_subset=2000,
                 test_subset=2000)
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.n_val is None:
        a.n_val = 5000 if a.data == "fashion" else 300
    if a.seed_methods is None:
        a.seed_methods = list(METHODS)
    if a.layer_budget:
        bad = [x for x in a.layer_budget if "=" not in x or x.rsplit("=", 1)[1] not in BUDGETS]
        if bad:
            p.error(f"--layer-budget {bad}: give RULE=BUDGET with BUDGET one of {list(BUDGETS)}")
        if "coreml_dkm" in a.methods:
            p.error("--layer-budget does not apply to coreml_dkm: leave it out of --methods")
    a.argv = list(sys.argv[1:] if argv is None else argv)  # recorded with the results
    return a


# ------------------------------------------------------------------------------------------------ settings


def load_tuning(path: Path) -> dict:
    return json.loads(Path(path).read_text()) if path and Path(path).is_file() else {}


def method_settings(method: str, model: str, budget: str, a, tuning: dict):
    """(settings dict, source) of ``method``: the flags override tuning.json's choice for (model, budget), else
    for the same model at another tuned budget, else DEFAULTS."""
    hp, source = dict(DEFAULTS[method]), "defaults"
    chosen = {} if a.no_tuning else tuning.get("chosen", {}).get(model, {})
    if budget in chosen and method in chosen[budget]:
        hp.update(chosen[budget][method]["settings"])
        source = f"tuning.json {model} {budget}"
    else:
        other = next((b for b in chosen if method in chosen[b]), None)
        if other is not None:
            hp.update(chosen[other][method]["settings"])
            source = f"tuning.json {model} {other}"
    flags = {"lr": a.lr, **({KNOB[method]: getattr(a, KNOB[method])} if method in KNOB else {})}
    given = {k: v for k, v in flags.items() if k in hp and v is not None}
    if given:
        hp.update(given)
        source += " + flags " + ", ".join(given)
    return hp, source


# ------------------------------------------------------------------------------------------------ methods
# Each method: (model copy, fp32 model, DKMConfig of the budget, its settings, fit, log, fitted) -> (model, size
# dict). ``fit(model, after_step=None, lr_mult=None)`` runs the shared fine-tuning loop with the method's lr;
# ``fitted``: per-layer granularity changes (common.fitted_granularity) that the k-means methods apply as rules.


def clustered_sizes(fp32, cfg, fitted):
    """common.clustered_size (LUTs and scales at fp32), plus bits_per_weight_lut16 (at fp16)."""
    rules = common.granularity_rules(cfg, fitted)
    size = common.clustered_size(fp32, cfg, rules)
    return dict(size, bits_per_weight_lut16=common.clustered_size(fp32, cfg, rules, lut_dtype_bits=16)[
        "bits_per_weight"])


def method_ptq_kmeans(model, fp32, cfg, hp, fit, log, fitted):
    common.ptq_kmeans_apply(model, cfg, common.granularity_rules(cfg, fitted))
    return model, clustered_sizes(fp32, cfg, fitted)


def method_dkm(model, fp32, cfg, hp, fit, log, fitted):
    sched = {} if hp.get("tau_scale_end") is None else dict(tau_scale_end=hp["tau_scale_end"],
                                                              anneal_steps=hp["anneal_steps"])
    run_cfg = cfg.replace(tau_scale=hp["tau_scale"], hard_forward=hp.get("hard_forward", False),
                          direct_grad=hp.get("direct_grad", 0.0), **sched)
    torchdkm.prepare(model, run_cfg, common.granularity_rules(run_cfg, fitted))
    fit(model, after_step=lambda: torchdkm.step(model))
    torchdkm.finalize(model)
    return model, clustered_sizes(fp32, cfg, fitted)


def method_st_kmeans(model, fp32, cfg, hp, fit, log, fitted):
    mult = common.st_kmeans_prepare(model, cfg, common.granularity_rules(cfg, fitted),
                                    centroid_lr_mult=hp["centroid_lr_mult"])
    fit(model, lr_mult=mult)
    return common.strip_parametrizations(model), clustered_sizes(fp32, cfg, fitted)


def method_qat_lsq(model, fp32, cfg, hp, fit, log, fitted):
    layers, mult = common.dkm_layers(model, cfg), {}
    bd = {n: (fitted.get(n, {}).get("bits", cfg.bits), fitted.get(n, {}).get("dim", cfg.dim)) for n in layers}
    if any(b % d for b, d in bd.values()):
        return None, None  # uniform quantization has no fractional bits per weight
    qb = {n: b // d for n, (b, d) in bd.items()}
    for b in set(qb.values()):
        mult.update(common.qat_prepare(model, {n: m for n, m in layers.items() if qb[n] == b}, b,
                                       scale_lr_mult=hp["scale_lr_mult"]))
    fit(model, lr_mult=mult)
    return common.qat_finalize(model), common.uniform_size(fp32, common.dkm_layers(fp32, cfg), qb)


def method_coreml_dkm(model, fp32, cfg, hp, fit, log, fitted):
    layers = list(common.dkm_layers(model, cfg))
    model, pal = common.coreml_prepare(model, layers, cfg.bits, cfg.dim, palett_tau=hp["palett_tau"])
    fit(model, after_step=pal.step)
    model = pal.finalize(inplace=True)
    done = common.coreml_palettized(model, layers, cfg.bits, cfg.dim)
    size = common.clustered_size(fp32, cfg, fp32_layers=sorted(set(layers) - set(done)))
    if size["fp32_layers"]:  # e.g. cluster_dim must divide the output channels: those stay fp32
        log(f"  coremltools left {size['fp32_layers']} uncompressed; its sizes count them at fp32")
    return model, size


METHOD_FNS = {name: globals()[f"method_{name}"] for name in METHODS}
_NOTED = set()  # granularity notes already logged by this process


def layer_budgets(model, cfg, specs) -> dict:
    """{layer name: {"bits": b, "dim": d}} of ``--layer-budget`` specs ("RULE=BUDGET"), matched as torchdkm matches
    its rules (exact names first, then regexes in order; a rule that matches nothing is a ConfigError)."""
    from torchdkm.layers import select_layers

    rules = {}
    for spec in specs or ():
        rule, budget = spec.rsplit("=", 1)
        rules[rule] = cfg.replace(**dict(zip(("bits", "dim"), BUDGETS[budget])))
    return {n: {"bits": c.bits, "dim": c.dim} for n, _, c in select_layers(model, cfg, rules) if c is not cfg}


def granularity(o) -> str:
    """Short name of the LUT granularity of options ``o`` (group_size, channel_scale)."""
    scale = "channel scale" + (" (rms)" if o.channel_scale == "rms" else "")
    parts = ([f"g{o.group_size}"] if o.group_size else []) + ([scale] if o.channel_scale else [])
    return " + ".join(parts) or "per-tensor"


def training_options(a) -> SimpleNamespace:
    """TRAINING_OPTIONS as given in ``a`` (tune.py gives only some of them: the others keep their defaults)."""
    return SimpleNamespace(**{k: getattr(a, k, v) for k, v in TRAINING_OPTIONS.items()})


def run_settings(method: str, hp: dict, a) -> dict:
    """``hp`` plus the training options that apply to ``method`` (what a run records, and how a finished run is
    recognised on a re-run)."""
    o = training_options(a)
    hp = dict(hp)
    if method == "dkm" and o.tau_scale_end is not None:
        hp.update(tau_scale_end=o.tau_scale_end, anneal_steps=a.steps)
    if method == "dkm" and o.vector_axis != "flat":
        hp.update(vector_axis=o.vector_axis)
    if method == "dkm" and o.hard_forward:
        hp.update(hard_forward=True)
    if method == "dkm" and o.direct_grad:
        hp.update(direct_grad=o.direct_grad)
    if o.kd > 0:
        hp.update(kd=o.kd, kd_temperature=o.kd_temperature)
    if o.bn_recal:
        hp.update(bn_recal=o.bn_recal)
    return hp


def run_one(method, fp32, budget, seed, data, a, log, hp, evals=("val", "test")):
    """Compress a copy of fp32 with one method; returns a result dict (accuracies on ``evals``, size, wall)."""
    bits, dim = BUDGETS[budget]
    x, y = data["train"]
    model = copy.deepcopy(fp32)
    o = training_options(a)
    if method not in CLUSTERED:  # qat_lsq, coreml_dkm: their own granularity
        o.group_size, o.channel_scale = None, False
    cfg = torchdkm.DKMConfig(bits=bits, dim=dim, min_numel=0, seed=seed, iters=a.iters, group_size=o.group_size,
                             channel_scale=o.channel_scale, vector_axis=o.vector_axis if method == "dkm" else "flat")
    per_layer = layer_budgets(fp32, cfg, o.layer_budget)
    fitted, notes = common.fitted_granularity(fp32, cfg, common.granularity_rules(cfg, per_layer))
    for name, c in per_layer.items():  # the layer's budget, then its granularity changes
        fitted[name] = {**c, **fitted.get(name, {})}
    for note in notes:
        if (budget, note) not in _NOTED:
            _NOTED.add((budget, note))
            log(f"  {budget}: {note} (every k-means method alike)")
    hp = run_settings(method, hp, a)
    loss_fn = common.kd_loss(fp32, o.kd, o.kd_temperature)  # the same for every fine-tuned method

    def fit(m, after_step=None, lr_mult=None):
        common.train(m, x, y, steps=a.steps, lr=hp["lr"], seed=seed, after_step=after_step, lr_mult=lr_mult,
                     progress=not a.no_progress, desc=f"{method} {budget} s{seed}", loss_fn=loss_fn)

    t0, c0 = time.perf_counter(), time.process_time()
    model, size = METHOD_FNS[method](model, fp32, cfg, hp, fit, log, fitted)
    if model is None:
        return None
    if o.bn_recal:  # BatchNorm statistics of the final weights, the same for every method
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(y), generator=g)[: 128 * o.bn_recal].split(128)
        torchdkm.recalibrate_batchnorm(model, (x[i] for i in idx))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    accs = {("top1" if e == "test" else f"{e}_top1"): common.accuracy(model, *data[e]) for e in evals}
    return dict(method=method, budget=budget, bits=bits, dim=dim, seed=seed, hp=hp, **accs, wall_s=wall, cpu_s=cpu,
                granularity=granularity(o) if method in CLUSTERED else "its own", fitted_layers=fitted, **size)


# ------------------------------------------------------------------------------------------------ one model


def fp32_for(name, a, data, log):
    """The cached fp32 model trained on the training part (its validation accuracy in info['top1'])."""
    x, y = data["train"]
    tag = name + ("" if a.data == "fashion" else f"-{a.data}") + ("" if a.train_subset is None
                                                                    else f"-sub{a.train_subset}")
    return common.fp32_model(tag, lambda: build_model(name), x, y, *data["val"], epochs=a.fp32_epochs, lr=3e-3,
                             progress=not a.no_progress, log=log)


def run_model(name, a, data, log):
    path = a.out / f"{a.tag}_{name}.json"
    settings = {k: getattr(a, k) for k in ("data", "steps", "iters", "fp32_epochs", "n_val", "train_subset",
                                           "val_subset", "test_subset", *TRAINING_OPTIONS)}
    t0 = time.perf_counter()
    fp32, info = fp32_for(name, a, data, log)
    key = {"settings": settings, "code": common.code_version(SCRIPT)["sources"], "fp32_sha1": info["sha1"]}
    old = json.loads(path.read_text()) if path.is_file() else {}
    runs = old.get("runs", []) if old.get("key") == key else []
    if old and not runs:
        log(f"[{name}] {path.name} was made by other code, settings or fp32 model: starting afresh")
    resumed = bool(runs)
    fp32_acc = {e: common.accuracy(fp32, *data[e]) for e in ("val", "test")}
    fp32_size = common.model_size(fp32, {})
    result = dict(model=name, key=key, code=common.code_version(SCRIPT), settings=settings,
                  fp32=dict(info, top1=fp32_acc["test"], val_top1=fp32_acc["val"], model_kib=fp32_size["model_kib"],
                            params=sum(p.numel() for p in fp32.parameters())),
                  runs=runs, threads=torch.get_num_threads(), torch=torch.__version__, machine=platform.machine(),
                  command=" ".join(["python benchmarks/vision/vision.py", *a.argv]),
                  provenance=common.provenance(SCRIPT, a.argv))
    log(f"[{name}] fp32 top-1 val {100 * fp32_acc['val']:.2f}% test {100 * fp32_acc['test']:.2f}% "
        f"({fp32_size['model_kib']:.1f} KiB)")
    have_coreml = "coreml_dkm" in a.methods and common.coreml_available()  # its import takes seconds
    tuning = load_tuning(a.tuning)

    def do(method, budget, seed):
        hp, source = method_settings(method, name, budget, a, tuning)
        done = run_settings(method, hp, a)
        if any(r["method"] == method and r["budget"] == budget and r["seed"] == seed and r["hp"] == done
               for r in runs):
            return
        r = run_one(method, fp32, budget, seed, data, a, log, hp)
        if r is None:
            return
        r["hp_source"] = source
        runs.append(r)
        common.write_json(path, result)
        log(f"[{name}] {method:<11} {budget:<6} seed {seed}: val {100 * r['val_top1']:.2f}% test "
            f"{100 * r['top1']:.2f}%  {r['model_kib']:.1f} KiB ({r['factor']:.1f}x)  {r['wall_s']:.0f} s  [{source}]")

    for budget in a.budgets:
        seeds = a.seeds if budget in a.key_budgets else 1
        for method in a.methods:
            if method == "coreml_dkm" and (not have_coreml or budget not in a.coreml_budgets):
                continue
            for seed in range(seeds if method in a.seed_methods else 1):
                do(method, budget, seed)
    result["wall_s"] = time.perf_counter() - t0 + (old.get("wall_s", 0) if resumed else 0)
    common.write_json(path, result)
    return result


# ------------------------------------------------------------------------------------------------ outputs


def _hp_text(method, hp):
    extra = ([f"BN re-estimated ({hp['bn_recal']} batches)"] if hp.get("bn_recal") else [])
    if method == "ptq_kmeans":
        return ", ".join(extra) or "-"
    parts = [f"lr {hp['lr']:g}", f"{KNOB[method]} {hp[KNOB[method]]:g}"]
    if hp.get("tau_scale_end") is not None:
        parts[-1] += f" -> {hp['tau_scale_end']:g} (cosine)"
    if hp.get("hard_forward"):
        parts.append("hard forward")
    if hp.get("direct_grad"):
        parts.append(f"direct grad {hp['direct_grad']:g}")
    if hp.get("kd"):
        parts.append(f"KD {hp['kd']:g} @T{hp['kd_temperature']:g}")
    return ", ".join(parts + extra)


def budget_label(budget, r) -> str:
    """E.g. "1bit (16×4-d)", or "1bit (16×4-d; 9 layers 16×1-d)" where --layer-budget changed some layers."""
    other = {}
    for c in r.get("fitted_layers", {}).values():
        if "bits" in c:
            key = f"{2 ** c['bits']}×{c['dim']}-d"
            other[key] = other.get(key, 0) + 1
    changed = "".join(f"; {n} layer{'s' * (n > 1)} {k}" for k, n in other.items())
    return f"{budget} ({2 ** r['bits']}×{r['dim']}-d{changed})"


def summarize(results, a):
    """Markdown table (one row per model × budget × method) and the plot, from the measured results."""
    header = ["model", "method", "budget", "bits/weight (compressed layers)", "model KiB (all params + buffers)",
              "factor", "val top-1 %", "test top-1 %", "Δ test vs fp32", "fine-tuning seeds", "settings",
              "fine-tune s wall (CPU)"]
    rows, points = [], {}
    order = {b: i for i, b in enumerate(BUDGETS)}
    for res in results:
        fp = res["fp32"]
        rows.append([res["model"], "fp32", "-", "32", f"{fp['model_kib']:.1f}", "1.0x", f"{100 * fp['val_top1']:.2f}",
                     f"{100 * fp['top1']:.2f}", "-", "-", f"{fp['epochs']} epochs", f"{fp['train_s']:.0f} (train)"])
        groups = {}
        for r in res["runs"]:
            groups.setdefault((r["budget"], r["method"]), []).append(r)
        for (budget, method), rs in sorted(groups.items(), key=lambda kv: (order[kv[0][0]],
                                                                           METHODS.index(kv[0][1]))):
            accs = [r["top1"] for r in rs]
            mean = sum(accs) / len(accs)
            r0 = rs[0]
            left = f" ({len(r0['fp32_layers'])} layer(s) fp32)" if r0.get("fp32_layers") else ""
            rows.append([res["model"], LABEL[method], budget_label(budget, r0),
                         f"{r0['bits_per_weight']:.3f}{left}", f"{r0['model_kib']:.1f}", f"{r0['factor']:.1f}x",
                         common.fmt_acc([r["val_top1"] for r in rs]), common.fmt_acc(accs),
                         f"{100 * (mean - fp['top1']):+.2f}", len(rs), _hp_text(method, r0["hp"]),
                         f"{sum(r['wall_s'] for r in rs) / len(rs):.0f} "
                         f"({sum(r.get('cpu_s', 0) for r in rs) / len(rs):.0f})"])
            points.setdefault(res["model"], {}).setdefault(method, []).append((r0["model_kib"], 100 * mean))
    return common.markdown_table(header, rows), points


def plot(results, points, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.6), squeeze=False)
    for ax, res in zip(axes[0], results):
        for method, pts in points.get(res["model"], {}).items():
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=LABEL[method])
        ax.axhline(100 * res["fp32"]["top1"], color="k", ls="--", lw=1,
                   label=f"fp32 ({res['fp32']['model_kib']:.0f} KiB)")
        ax.set_xscale("log")
        ax.set_xlabel("whole model size (KiB, every parameter and buffer; log scale)")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(res["model"])
        lo = min([p[1] for pts in points.get(res["model"], {}).values() for p in pts] + [100])
        ax.set_ylim(max(lo - 2, 100 * res["fp32"]["top1"] - 25), 100 * res["fp32"]["top1"] + 2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(a, log=print):
    results = []
    for name in ("resnet_small", "mobilenet_small"):
        p = a.out / f"{a.tag}_{name}.json"
        res = json.loads(p.read_text()) if p.is_file() else {}
        if "key" in res:  # files from before results were keyed by code and fp32 model are not mixed in
            results.append(res)
        elif res:
            log(f"{p.name}: an older format without a code/fp32 key, left out of the summary")
    if not results:
        return None
    table, points = summarize(results, a)
    plot(results, points, a.out / f"{a.tag}.png")
    s = results[0]["settings"]
    walls = ", ".join(f"{r['model']} {r.get('wall_s', 0) / 60:.1f} min" for r in results)
    sources = sorted({r.get("hp_source", "?") for res in results for r in res["runs"]})
    by_method = {}
    for res in results:
        for r in res["runs"]:
            if r["method"] in KNOB:  # fine-tuned methods (k-means alone has no settings)
                by_method.setdefault(r["method"], set()).add(r.get("hp_source", "?").startswith("tuning.json"))
    tuned = [m for m in METHODS if by_method.get(m) == {True}]
    untuned = [m for m in METHODS if m in by_method and m not in tuned]
    data = "Fashion-MNIST" if s["data"] == "fashion" else "scikit-learn digits (8x8)"
    commands = list(dict.fromkeys(r["command"] for r in results))  # one process may have run both models
    md = [f"# Vision benchmark: {data} ({'quick' if a.quick else 'full'} run)", "",
          "Command" + ("s" if len(commands) > 1 else "") + ": " + ", ".join(f"`{c}`" for c in commands)
          + (" (in parallel processes)" if len(commands) > 1 else "") + ". "
          f"torch {results[0]['torch']}, {results[0]['threads']} thread(s) per process, 2 CPU cores. "
          f"Code {results[0]['code']}.", "",
          f"Data: training images minus a seeded validation split of {s['n_val']} (train subset "
          f"{s['train_subset'] or 'none'}); fp32 {s['fp32_epochs']} epoch(s) one-cycle AdamW on the training part "
          f"(cached, one model shared by every seed). Fine-tuning {s['steps']} steps × batch 128, AdamW cosine to 0, "
          f"the same loop for every method; DKM tau='auto', iters {s['iters']}. "
          + ("Every method ran its default settings (column `settings`: the same lr for all), NOT tuned: "
             "`benchmarks/vision/tune.py` was not run for this table"
             if sources == ["defaults"] else
             f"{', '.join(LABEL[m] for m in tuned)}: lr and knob (column `settings`) chosen on the validation split "
             "by `benchmarks/vision/tune.py` with the same number of settings per method (see tuning.md)"
             + (f"; {', '.join(LABEL[m] for m in untuned)}: their defaults, not tuned" if untuned else ""))
          + f"; the test set (subset {s['test_subset'] or 'none'}) was evaluated once per run, for this table. "
          f"LUT granularity of the k-means methods: {granularity(_options(s))}. "
          f"Settings came from: {', '.join(sources)}. Options: "
          + (", ".join(f"{k}={s[k]}" for k in TRAINING_OPTIONS if k in s) or "none") + ".", "",
          "Columns: `bits/weight (compressed layers)` = stored bits of the compressed layers only (indices + LUTs "
          "and per-channel scales when on, at fp32; "
          "uniform QAT: indices + fp16 scale and offset per output channel) over their weights; `model KiB` = the "
          "whole model as shipped: compressed layers + every other parameter + every buffer (BatchNorm running "
          "statistics included) at fp32; `factor` = fp32 model / model KiB. coremltools: layers it left "
          "uncompressed (checked on its finalized weights) count at fp32 and are named in the JSON. "
          f"`fine-tuning seeds`: runs from the one fp32 model with different data order and k-means seeds (mean ± "
          f"std). Wall time (this run, including fp32 training when not cached): {walls}.", "",
          table, "", f"![top-1 vs size]({a.tag}.png)", ""]
    common.write_text_atomic(a.out / f"{a.tag}.md", "\n".join(md))
    log("\n" + table)
    return table


def _options(settings: dict) -> SimpleNamespace:
    """TRAINING_OPTIONS as recorded in a result's settings (older results lack the newer ones: defaults)."""
    return SimpleNamespace(**{k: settings.get(k, v) for k, v in TRAINING_OPTIONS.items()})


def side_by_side(a, log=print):
    """``<a.tag>.md``: the results under the tags ``a.side_by_side`` (e.g. per-tensor and grouped LUTs of the same
    settings) in one table, one row per model × budget × method, one column group per tag."""
    res = {}
    for tag in a.side_by_side:
        for p in sorted(a.out.glob(f"{tag}_*.json")):
            r = json.loads(p.read_text())
            if "key" in r and p.stem == f"{tag}_{r['model']}":
                res[(tag, r["model"])] = r
    if not res:
        raise SystemExit(f"no results under tags {a.side_by_side} in {a.out}")
    order = {b: i for i, b in enumerate(BUDGETS)}
    models = sorted({m for _, m in res})
    gran = {t: granularity(_options(r["settings"])) for (t, _), r in res.items()}
    header = ["model", "budget", "method"]
    for t in a.side_by_side:
        header += [f"{gran.get(t, t)}: bits/w (fp32 LUT+scale)", "bits/w (fp16)", "val top-1 %", "test top-1 %"]
    rows = []
    for model in models:
        groups = {}
        for t in a.side_by_side:
            for r in res.get((t, model), {}).get("runs", []):
                groups.setdefault((r["budget"], r["method"]), {}).setdefault(t, []).append(r)
        fp = next(r["fp32"] for (_, m), r in res.items() if m == model)
        rows.append([model, "fp32", "-"] + ["32", "-", f"{100 * fp['val_top1']:.2f}", f"{100 * fp['top1']:.2f}"]
                    * len(a.side_by_side))
        for (budget, method), by_tag in sorted(groups.items(), key=lambda kv: (order[kv[0][0]],
                                                                             METHODS.index(kv[0][1]))):
            r0 = next(iter(by_tag.values()))[0]
            row = [model, budget_label(budget, r0), LABEL[method]]
            for t in a.side_by_side:
                rs = sorted(by_tag.get(t, []), key=lambda r: r["seed"])
                if not rs:
                    row += ["-"] * 4
                    continue
                b16 = rs[0].get("bits_per_weight_lut16")
                row += [f"{rs[0]['bits_per_weight']:.3f}", "-" if b16 is None else f"{b16:.3f}",
                        common.fmt_acc([r["val_top1"] for r in rs]) + f" (n={len(rs)})",
                        common.fmt_acc([r["top1"] for r in rs])]
            rows.append(row)
    table = common.markdown_table(header, rows)
    first = next(iter(res.values()))
    shared = {k: v for k, v in first["settings"].items() if k not in ("group_size", "channel_scale")}
    differ = sorted(k for r in res.values() for k, v in shared.items() if r["settings"].get(k) != v)
    fitted = sorted({f"`{t}` {run['budget']} {name}: " + ", ".join(f"{k}={v}" for k, v in c.items())
                     for (t, _), r in res.items() for run in r["runs"]
                     for name, c in run.get("fitted_layers", {}).items()})
    sources = sorted({run.get("hp_source", "?") for r in res.values() for run in r["runs"]})
    tags = ", ".join(f"`{t}` ({gran.get(t, t)})" for t in a.side_by_side)
    md = [f"# Vision benchmark, LUT granularity side by side: {tags}", "",
          "Commands (each with the code that ran it: `git describe`, sha1 of the library and benchmark sources):", ""]
    md += [f"    {r.get('command', '?')}  # {r['code'].get('git', '?')}, sources {r['code']['sources']}"
           for r in res.values()]
    md += ["", f"torch {first['torch']}, {first['threads']} thread(s) per process, {first['machine']}. "
           f"Settings of `{a.side_by_side[0]}` "
           + (f"(the other tags differ in {differ} as well as the granularity): " if differ else
              "(the same for every tag apart from the granularity): ")
           + ", ".join(f"{k}={v}" for k, v in shared.items()) + f". Fine-tuning lr/knobs: {', '.join(sources)}.", "",
           "bits/w: stored bits of the compressed layers (indices + every LUT + every per-channel scale) over their "
           "weights, LUT entries and scales at fp32 (as in vision.md) and at fp16; the models are evaluated with "
           "fp32 LUTs and scales. Accuracies: mean ± std over the fine-tuning seeds (n), one fp32 model.", "",
           table, ""]
    if fitted:
        md += ["Layers the granularity did not fit, given the nearest one that does (every k-means method alike): "
               + "; ".join(fitted) + ".", ""]
    common.write_text_atomic(a.out / f"{a.tag}.md", "\n".join(md))
    log("\n" + table)
    return table


def load_data(a, log=print):
    """{'train': (x, y), 'val': (x, y), 'test': (x, y)}: validation carved from the training data."""
    x, y, xt, yt = common.fashion_tensors() if a.data == "fashion" else common.digits_tensors()
    tr, va = common.train_val_split(len(y), n_val=a.n_val, seed=0)
    if a.train_subset:
        g = torch.Generator().manual_seed(1234)
        tr = tr[torch.randperm(len(tr), generator=g)[: a.train_subset]]
    if a.val_subset:
        va = va[: a.val_subset]
    if a.test_subset:
        xt, yt = xt[: a.test_subset], yt[: a.test_subset]
    log(f"{a.data}: train {len(tr)}, validation {len(va)} (from the training data), test {len(yt)}")
    return {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": (xt, yt)}


def main(argv=None):
    a = parse(argv)
    if a.side_by_side:
        return side_by_side(a)
    common.setup_threads(a.threads)
    a.out = common.output_path(a.out, a.allow_dirty)  # a results folder only from a clean tree
    a.out.mkdir(parents=True, exist_ok=True)
    data = load_data(a)
    t0 = time.perf_counter()
    for name in a.models:
        run_model(name, a, data, print)
    write_summary(a)
    print(f"total wall {time.perf_counter() - t0:.0f} s; results in {a.out}/{a.tag}.md, {a.tag}.png, "
          f"{a.tag}_<model>.json")


if __name__ == "__main__":
    main()
