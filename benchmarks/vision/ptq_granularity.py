"""Post-training k-means at several LUT granularities: what groups of rows and per-row scales buy, no training.

Every Linear/Conv layer with >= 4096 weights (torchdkm's default min_numel; embeddings are left fp32) is
clustered by torchdkm's k-means (prepare -> initialize -> finalize) at 1-d, per granularity:

* per-tensor:        one 2^bits LUT per layer;
* g = 8/16/32/64:    DKMConfig(group_size=g): every g consecutive rows (axis 0 = output channels) own a LUT; a
                     layer whose axis-0 size g does not divide gets, by a rule, the largest divisor of its size
                     that is <= g (listed under the table);
* channel_scale:     DKMConfig(channel_scale=True): each row is divided by its max |w| before clustering;
* channel_scale+g16 / +g64: both.

Sizes come from torchdkm.report(model, lut_dtype_bits=16): bits/weight = the compressed layers' index bits plus
their LUT and scale bits at 16 bits, per weight; MiB = every parameter (compressed layers as stored, the rest
fp32; buffers such as BatchNorm statistics are not counted). The finalized weights are rounded to fp16, so the
quality measured is that of fp16 LUTs and scales.

Models and quality, always against the same model in fp32:

* mobilenet_v2: torchvision's ImageNet MobileNetV2 (benchmarks/vision/mobilenet_v2.py) on natural photos and seeded
  extra views of them (no labels): top-1 agreement with fp32 and mean KL(p_fp32 || p).
* minilm: all-MiniLM-L6-v2 sentence embeddings (mean pooling + L2 normalisation, as sentence-transformers)
  of BBC News articles (stratified split, seed 0, capped): relative error ||e - e_fp32|| / ||e_fp32||
  (mean over test texts) and the test accuracy of a logistic-regression head trained on fp32 train embeddings.

    python benchmarks/vision/ptq_granularity.py --models mobilenet_v2   # full grid of one model (~10 min, 1 thread)
    python benchmarks/vision/ptq_granularity.py --models minilm         # the other; the .md keeps both
    python benchmarks/vision/ptq_granularity.py --models minilm --bits 4
    python benchmarks/vision/ptq_granularity.py --quick             # smoke test, < 1 min, writes only with --out
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness (common.py)
import common  # noqa: E402

import torchdkm  # noqa: E402
from torchdkm.layers import select_layers  # noqa: E402

GRANULARITIES = {
    "per-tensor": {},
    "g8": {"group_size": 8},
    "g16": {"group_size": 16},
    "g32": {"group_size": 32},
    "g64": {"group_size": 64},
    "channel_scale": {"channel_scale": True},
    "channel_scale+g16": {"channel_scale": True, "group_size": 16},
    "channel_scale+g64": {"channel_scale": True, "group_size": 64},
}
DEFAULT_BITS = {"mobilenet_v2": [6, 4, 3], "minilm": [4, 3]}
QUICK_GRANULARITIES = ["per-tensor", "channel_scale+g16"]
TAG = "ptq_granularity"


# ------------------------------------------------------------------------------------------------ compression


def make_config(bits: int, granularity: str):
    """The DKMConfig of one grid cell, or the reason it cannot be built (str) while torchdkm lacks the option."""
    try:
        return torchdkm.DKMConfig(bits=bits, dim=1, **GRANULARITIES[granularity])
    except (TypeError, torchdkm.ConfigError) as e:
        return f"{type(e).__name__}: {e}"


def largest_divisor(n: int, g: int) -> int:
    """The largest divisor of n that is <= g."""
    return next(d for d in range(min(g, n), 0, -1) if n % d == 0)


def group_rules(model: nn.Module, cfg, skip: dict):
    """Rules for ``cfg`` on ``model``: ``skip`` (name -> None) plus, for every selected layer whose axis-0 size
    the group size does not divide, that layer -> cfg with the largest divisor <= group_size.
    Returns (rules, [(layer, rows, group size used)])."""
    rules, changed = dict(skip), []
    g = getattr(cfg, "group_size", None)
    if not g:
        return rules, changed
    for name, mod, _ in select_layers(model, cfg, skip):
        rows = mod.weight.shape[0]
        if rows % g:
            d = largest_divisor(rows, g)
            rules[name] = cfg.replace(group_size=d)
            changed.append((name, rows, d))
    return rules, changed


def expected_bits(model: nn.Module, cfg, rules, lut_bits: int = 16) -> int:
    """Stored bits of the selected layers counted here from the configs (index bits + groups x k x dim LUT entries +
    one scale per axis-0 row when scaled), to check torchdkm.report's count of groups and scales."""
    total = 0
    for _, mod, c in select_layers(model, cfg, rules):
        shape = mod.weight.shape
        groups = 1 if c.group_size is None else shape[0] // c.group_size
        total += -(-mod.weight.numel() // c.dim) * c.bits
        total += (groups * c.k * c.dim + (shape[0] if c.channel_scale else 0)) * lut_bits
    return total


def compress(fp32: nn.Module, cfg, skip: dict):
    """Post-training k-means of a copy of ``fp32``: prepare -> initialize -> finalize, weights rounded to fp16.
    Returns (model, size dict, [(layer, rows, group size used)], k-means seconds)."""
    model = copy.deepcopy(fp32)
    rules, changed = group_rules(model, cfg, skip)
    expected = expected_bits(model, cfg, rules)
    t0 = time.perf_counter()
    torchdkm.prepare(model, cfg, rules)
    torchdkm.initialize(model)
    torchdkm.finalize(model)
    secs = time.perf_counter() - t0
    rep = torchdkm.report(model, lut_dtype_bits=16, print_table=False)
    names = [r.name for r in rep.layers]
    with torch.no_grad():  # the stored values are fp16 LUT entries (and scales)
        for n in names:
            w = model.get_submodule(n).weight
            w.copy_(w.half().float())
    numel = sum(r.numel for r in rep.layers)
    stored = sum(r.bits_per_weight * r.numel for r in rep.layers)
    if abs(stored - expected) > 0.5:
        print(f"WARNING: torchdkm.report counts {stored:.0f} stored bits, the configs give {expected}")
    size = {"bits_per_weight": stored / numel, "mib": rep.compressed_mib, "fp32_mib": rep.fp32_mib,
            "layers": len(names), "layer_weights": numel, "report_bits": stored, "expected_bits": expected}
    return model, size, changed, secs


# ------------------------------------------------------------------------------------------------ models


class MobileNetV2Task:
    """torchvision's ImageNet MobileNetV2 on natural images: top-1 agreement with fp32 and KL to fp32."""

    name = "mobilenet_v2"
    metric_names = ["top1_agree", "kl"]

    def __init__(self, n_images: int):
        import mobilenet_v2 as mv2

        self.mv2 = mv2
        self.model = mv2.load_mobilenet_v2()
        self.x = mv2.natural_images(n_images)
        self.ref = mv2.logits_of(self.model, self.x)
        self.skip = {}
        self.info = f"{len(self.x)} natural images ({len(mv2.photos())} photos + seeded crops/flips)"

    def evaluate(self, model: nn.Module) -> dict:
        logits = self.mv2.logits_of(model, self.x)
        return {"top1_agree": self.mv2.top1_agreement(logits, self.ref), "kl": self.mv2.kl_to_ref(logits, self.ref)}


class MiniLMTask:
    """all-MiniLM-L6-v2 embeddings of BBC News: relative error to fp32 and a fp32-trained logistic-regression head's
    test accuracy on the compressed model's embeddings."""

    name = "minilm"
    metric_names = ["rel_err", "acc"]

    def __init__(self, n_train: int, n_test: int, max_len: int):
        import transformers
        from sklearn.linear_model import LogisticRegression
        from transformers import AutoModel, AutoTokenizer

        from minilm import minilm_path
        from torchdkm.app.zoo.data import load_bbc_news

        tr_t, tr_y, te_t, te_y, classes = load_bbc_news(test_fraction=0.2, seed=0)  # shuffled, stratified
        tok = AutoTokenizer.from_pretrained(minilm_path())
        self.train, self.test = self._tokens(tok, tr_t[:n_train], max_len), self._tokens(tok, te_t[:n_test], max_len)
        self.y_train, self.y_test = torch.tensor(tr_y[:n_train]), torch.tensor(te_y[:n_test])
        # The pooler is unused by mean pooling; without it the size and bits count only what computes embeddings.
        transformers.logging.set_verbosity_error()  # its load report lists the dropped pooler weights
        self.model = AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False).eval()
        self.skip = {n: None for n, m in self.model.named_modules() if isinstance(m, nn.Embedding)}
        self.ref = self.embed(self.model, self.test)
        self.head = LogisticRegression(max_iter=5000).fit(self.embed(self.model, self.train).numpy(),
                                                          self.y_train.numpy())
        self.fp32_acc = self._acc(self.ref)
        self.info = (f"BBC News, {len(self.y_train)} train / {len(self.y_test)} test articles, {max_len} tokens, "
                     f"{len(classes)} classes; logistic-regression head on fp32 train embeddings: fp32 test accuracy "
                     f"{100 * self.fp32_acc:.2f}%")

    @staticmethod
    def _tokens(tok, texts, max_len):
        return tok(texts, max_length=max_len, truncation=True, padding=True, return_tensors="pt")

    @staticmethod
    @torch.no_grad()
    def embed(model: nn.Module, enc, batch: int = 32) -> torch.Tensor:
        """N x 384 sentence embeddings: mean pooling over tokens, L2-normalised."""
        out = []
        for s in range(0, len(enc["input_ids"]), batch):
            ids, mask = enc["input_ids"][s:s + batch], enc["attention_mask"][s:s + batch]
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(h.dtype)
            out.append(F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=1))
        return torch.cat(out)

    def _acc(self, emb: torch.Tensor) -> float:
        return float((self.head.predict(emb.numpy()) == self.y_test.numpy()).mean())

    def evaluate(self, model: nn.Module) -> dict:
        e = self.embed(model, self.test)
        rel = ((e - self.ref).norm(dim=1) / self.ref.norm(dim=1)).mean().item()
        return {"rel_err": rel, "acc": self._acc(e)}


# ------------------------------------------------------------------------------------------------ run + report


def run_task(task, bits_list, granularities, log=print) -> dict:
    """Every (bits, granularity) cell of one model; cells the installed torchdkm cannot build are recorded as
    skipped with the reason."""
    fp32_mib = common.model_size(task.model, {})["fp32_kib"] / 1024
    rows, skipped = [], []
    for bits in bits_list:
        for gran in granularities:
            cfg = make_config(bits, gran)
            if isinstance(cfg, str):
                skipped.append({"bits": bits, "granularity": gran, "reason": cfg})
                log(f"{task.name} {bits}b {gran}: skipped ({cfg})")
                continue
            model, size, changed, secs = compress(task.model, cfg, task.skip)
            t0 = time.perf_counter()
            r = {"bits": bits, "granularity": gran, **size, **task.evaluate(model), "kmeans_s": secs,
                 "eval_s": time.perf_counter() - t0, "group_fallbacks": changed}
            rows.append(r)
            log(f"{task.name} {bits}b {gran:<18} {r['bits_per_weight']:.3f} b/w {r['mib']:.2f} MiB  "
                + "  ".join(f"{k} {r[k]:.4f}" for k in task.metric_names) + f"  k-means {secs:.1f} s")
    return {"model": task.name, "info": task.info, "fp32_mib": fp32_mib, "rows": rows, "skipped": skipped,
            "fp32_acc": getattr(task, "fp32_acc", None)}


def _ratio_to_per_tensor(res, r, key):
    base = next((b for b in res["rows"] if b["bits"] == r["bits"] and b["granularity"] == "per-tensor"), None)
    return f"{base[key] / r[key]:.2f}x" if base and r[key] > 0 else "-"


def markdown(res) -> str:
    """Table of one model's results, then the group-size fallbacks and skipped cells."""
    if res["model"] == "mobilenet_v2":
        head = ["bits", "granularity", "bits/weight (incl. LUTs + scales, fp16)", "MiB", "top-1 agreement %",
                "changed top-1 %", "KL to fp32", "KL: per-tensor / this", "k-means s"]
        rows = [["fp32", "-", "32", f"{res['fp32_mib']:.2f}", "100", "0", "0", "-", "-"]]
        for r in res["rows"]:
            rows.append([r["bits"], r["granularity"], f"{r['bits_per_weight']:.3f}", f"{r['mib']:.2f}",
                         f"{100 * r['top1_agree']:.1f}", f"{100 * (1 - r['top1_agree']):.1f}", f"{r['kl']:.4f}",
                         _ratio_to_per_tensor(res, r, "kl"), f"{r['kmeans_s']:.1f}"])
    else:
        head = ["bits", "granularity", "bits/weight (incl. LUTs + scales, fp16)", "MiB", "embedding rel. error",
                "rel. error: per-tensor / this", "BBC accuracy %", "Δ acc vs fp32", "k-means s"]
        rows = [["fp32", "-", "32", f"{res['fp32_mib']:.2f}", "0", "-", f"{100 * res['fp32_acc']:.2f}", "-", "-"]]
        for r in res["rows"]:
            rows.append([r["bits"], r["granularity"], f"{r['bits_per_weight']:.3f}", f"{r['mib']:.2f}",
                         f"{r['rel_err']:.4f}", _ratio_to_per_tensor(res, r, "rel_err"), f"{100 * r['acc']:.2f}",
                         f"{100 * (r['acc'] - res['fp32_acc']):+.2f}", f"{r['kmeans_s']:.1f}"])
    out = [common.markdown_table(head, rows), ""]
    by_g = {}
    for r in res["rows"]:
        g = GRANULARITIES[r["granularity"]].get("group_size")
        for n, rows_, d in r["group_fallbacks"]:
            by_g.setdefault(g, set()).add(f"{n} ({rows_} rows -> groups of {d})")
    if by_g:
        out.append("Where g does not divide a layer's axis-0 size, a rule gave that layer the largest divisor <= g:")
        out += [f"- g = {g}: {', '.join(sorted(v))}" for g, v in sorted(by_g.items())]
        out.append("")
    if res["skipped"]:
        reasons = sorted({s["reason"] for s in res["skipped"]})
        cells = ", ".join(f"{s['bits']}b {s['granularity']}" for s in res["skipped"])
        out += [f"Not run (the installed torchdkm cannot build the config): {cells}. Reason: {'; '.join(reasons)}", ""]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["mobilenet_v2", "minilm"], choices=["mobilenet_v2", "minilm"])
    p.add_argument("--bits", nargs="+", type=int, default=None, help="default: 6 4 3 (MobileNetV2), 4 3 (MiniLM)")
    p.add_argument("--granularities", nargs="+", default=None, choices=list(GRANULARITIES))
    p.add_argument("--images", type=int, default=None, help="natural images for MobileNetV2 (default 320)")
    p.add_argument("--train", type=int, default=None, help="BBC train articles for the head (default 600)")
    p.add_argument("--test", type=int, default=None, help="BBC test articles (default 400)")
    p.add_argument("--max-len", type=int, default=None, help="tokens per article (default 128)")
    p.add_argument("--quick", action="store_true", help="tiny subsets, 2 granularities at 4 bits (smoke test)")
    p.add_argument("--out", type=Path, default=None, help=f"folder for {TAG}.md/.json (default benchmarks/vision/results; "
                                                          f"--quick writes only when given)")
    p.add_argument("--threads", type=int, default=None)
    common.harness_args(p)
    a = p.parse_args(argv)
    common.start(__file__, a, argv)
    argv = sys.argv[1:] if argv is None else argv
    quick = dict(images=16, train=60, test=40, max_len=32, granularities=QUICK_GRANULARITIES, bits=[4])
    full = dict(images=320, train=600, test=400, max_len=128, granularities=list(GRANULARITIES), bits=None)
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    threads = common.setup_threads(a.threads)
    command = " ".join(["python benchmarks/vision/ptq_granularity.py", *argv])
    results = []
    for name in a.models:
        t0 = time.perf_counter()
        task = MobileNetV2Task(a.images) if name == "mobilenet_v2" else MiniLMTask(a.train, a.test, a.max_len)
        print(f"{name}: {task.info} (set-up {time.perf_counter() - t0:.0f} s)")
        res = run_task(task, a.bits or DEFAULT_BITS[name], a.granularities)
        res.update(wall_s=time.perf_counter() - t0, command=command, torch=torch.__version__, threads=threads,
                   code=common.code_version(Path(__file__)), quick=a.quick)
        results.append(res)
        print("\n" + markdown(res) + "\n")
    out = a.out if a.out is not None else (None if a.quick else common.results_dir(__file__))
    out = common.output_path(out, a.allow_dirty)  # a results folder only from a clean tree
    if out is not None:
        write(out, results)
    return results


def write(out: Path, results: list) -> None:
    """{TAG}.md and .json in ``out``: this run's models, plus the other models of the files already there (so
    each model can be run apart; every section names the command that made it)."""
    path = out / f"{TAG}.json"
    old = json.loads(path.read_text()).get("results", []) if path.is_file() else []
    mine = {r["model"] for r in results}
    results = [r for r in old if r["model"] not in mine] + results
    results.sort(key=lambda r: list(DEFAULT_BITS).index(r["model"]))
    titles = {"mobilenet_v2": "MobileNetV2 (torchvision ImageNet weights)", "minilm": "all-MiniLM-L6-v2 embeddings"}
    md = ["# Post-training k-means by LUT granularity", "",
          "No training: torchdkm prepare -> initialize (k-means) -> finalize, 1-d clusters, every Linear/Conv layer "
          "with >= 4096 weights (embeddings stay fp32). bits/weight: the compressed layers' indices + LUTs + scales "
          "(LUTs and scales at 16 bits, torchdkm.report(..., lut_dtype_bits=16)); MiB: all parameters (compressed "
          "layers as stored, the rest fp32; buffers not counted). Weights rounded to fp16 after finalize. "
          "'per-tensor / this': how many times smaller the error is than per-tensor's at the same bits.", ""]
    for res in results:
        md += [f"## {titles[res['model']]}{' (quick run)' if res['quick'] else ''}", "",
               f"Command: `{res['command']}`; torch {res['torch']}, {res['threads']} thread(s), shared 2-core CPU; "
               f"{res['wall_s'] / 60:.1f} min wall. Code {', '.join(f'{k} {v}' for k, v in res['code'].items())}.", "",
               res["info"] + ".", "", markdown(res)]
        if res["model"] == "mobilenet_v2":
            md += ["Reference from the issue (its own image set, outside this project): at 6 bits per-tensor ~40% of "
                   "top-1 changed on natural images, KL 0.064; groups of 16 cut KL 2.4x, a per-channel scale 2.9x.", ""]
    out.mkdir(parents=True, exist_ok=True)
    common.write_text_atomic(out / f"{TAG}.md", "\n".join(md))
    common.write_json(path, {"results": results})
    print(f"wrote {out / (TAG + '.md')} and .json")


if __name__ == "__main__":
    main()
