"""Render every results table in README.md and docs/*.md from the files in benchmarks/<domain>/results/.

A rendered block sits between two marker comments in the Markdown:

    <!-- render: vision_tag vision_2bit_cs -->
    ... generated: never edit by hand ...
    <!-- /render -->

The first word names a function of TABLES below, the rest are its arguments. ``python benchmarks/render.py``
rewrites every block; ``--check`` changes nothing and lists the blocks that differ from a fresh render
(tests/test_render.py runs it). Only committed results folders are read: benchmarks/scratch/ never is. A result
whose recorded git state ends in ``-dirty`` (the code that made it is not in the history) is never rendered.

The words between two methods come from their fine-tuning seeds, by one rule (RULE, quoted in docs/results.md).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- render: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /render -->)", re.S)

RULE = ("A is **ahead** of B when mean(A) − mean(B) > 2·SE, with SE = √(s_A²/n_A + s_B²/n_B) over the fine-tuning "
        "seeds (s: sample standard deviation), or when A beats B on every shared seed (at least 3); **behind** the "
        "other way round; **level** otherwise. With one seed on either side there is no spread: no word is given. "
        "A comparison at a different size (model size differing by more than 1 %) or a different allocation says "
        "so in its row.")

LABEL = {"fp32": "fp32", "dkm": "DKM (torchdkm)", "ptq_kmeans": "k-means, no fine-tuning",
         "st_kmeans": "k-means + STE", "qat_lsq": "uniform QAT (LSQ+)", "coreml_dkm": "coremltools DKM"}
MODELS = {"resnet_small": "ResNet-small", "mobilenet_small": "MobileNet-small"}
ORDER = ["ptq_kmeans", "st_kmeans", "qat_lsq", "coreml_dkm", "dkm"]
BUDGET_ORDER = ["4bit", "2bit", "1bit", "0.5bit"]


# ------------------------------------------------------------------------------------------------ helpers


class Ctx:
    """What a table function needs: the document it renders into (links are relative to it)."""

    def __init__(self, doc: Path):
        self.doc = doc

    def link(self, path: Path, text: str | None = None) -> str:
        rel = Path(_relpath(path, self.doc.parent))
        return f"[{text or path.name}]({rel.as_posix()})"


def _relpath(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path, start)


def load(rel: str) -> dict:
    path = BENCH / rel
    if "scratch" in path.relative_to(BENCH).parts:
        raise ValueError(f"{rel}: benchmarks/scratch/ is never rendered")
    return json.loads(path.read_text())


def git_of(obj: dict) -> str | None:
    """The git state a result recorded (provenance, else the older ``code`` record)."""
    prov = obj.get("provenance") or {}
    if prov.get("git"):
        return prov["git"] + ("-dirty" if prov.get("dirty") and not prov["git"].endswith("-dirty") else "")
    code = obj.get("code")
    return code.get("git") if isinstance(code, dict) else None


def state(obj: dict, path: Path | None = None) -> str:
    """The recorded git state: in the JSON, or (older text results) in the .md beside it; '' if none."""
    g = git_of(obj)
    if g is None:  # records nested deeper (e.g. one per model): any dirty one makes the file dirty
        found = sorted(set(_gits(obj)), key=lambda x: not x.endswith("-dirty"))
        g = found[0] if found else None
    if g is None and path is not None and path.with_suffix(".md").is_file():
        m = re.search(r"'git': '([^']*)'", path.with_suffix(".md").read_text())
        g = m.group(1) if m else None
    return g or ""


def _gits(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "git" and isinstance(v, str):
                yield v
            else:
                yield from _gits(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _gits(v)


def is_clean(obj: dict, path: Path | None = None) -> bool:
    g = state(obj, path)
    return bool(g) and not g.endswith("-dirty")


def mean_std(xs):
    n = len(xs)
    m = sum(xs) / n
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return m, s, n


def fmt(xs, scale=100.0, digits=2) -> str:
    m, s, n = mean_std([scale * x for x in xs])
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def compare(a: dict, b: dict) -> str:
    """RULE on two {seed: value} maps (higher is better): 'ahead', 'behind', 'level' or '' (one seed)."""
    va, vb = list(a.values()), list(b.values())
    if len(va) < 2 or len(vb) < 2:
        return ""
    ma, sa, na = mean_std(va)
    mb, sb, nb = mean_std(vb)
    se = math.sqrt(sa ** 2 / na + sb ** 2 / nb)
    shared = sorted(set(a) & set(b))
    if ma - mb > 2 * se or (len(shared) >= 3 and all(a[s] > b[s] for s in shared)):
        return "ahead"
    if mb - ma > 2 * se or (len(shared) >= 3 and all(a[s] < b[s] for s in shared)):
        return "behind"
    return "level"


def table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


# ------------------------------------------------------------------------------------------------ vision


def vision_file(tag: str, model: str):
    rel = f"vision/results/{tag}_{model}.json"
    return (load(rel), BENCH / rel) if (BENCH / rel).is_file() else (None, BENCH / rel)


def budget_label(budget: str, run: dict) -> str:
    other = {}
    for c in run.get("fitted_layers", {}).values():
        if "bits" in c:
            key = f"{2 ** c['bits']}×{c['dim']}-d"
            other[key] = other.get(key, 0) + 1
    extra = "".join(f"; {n} layer{'s' * (n > 1)} at {k}" for k, n in other.items())
    return f"{budget.replace('bit', ' bit')} ({2 ** run['bits']}×{run['dim']}-d{extra})"


def allocation(run: dict) -> tuple:
    return tuple(sorted((n, c.get("bits"), c.get("dim")) for n, c in run.get("fitted_layers", {}).items()
                        if "bits" in c))


def vision_groups(res: dict) -> dict:
    groups = {}
    for r in res["runs"]:
        groups.setdefault((r["budget"], r["method"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in groups.items()}


def word(runs: list, ref: list) -> str:
    """RULE between two lists of vision/text runs on test accuracy, with the size / allocation caveat."""
    key = "top1" if "top1" in runs[0] else "acc"
    w = compare({r["seed"]: r[key] for r in runs}, {r["seed"]: r[key] for r in ref})
    if not w:
        return "– (1 seed)"
    size, rsize = runs[0].get("model_kib"), ref[0].get("model_kib")
    notes = []
    if size and rsize and abs(size / rsize - 1) > 0.01:
        notes.append(f"at {size:.1f} vs {rsize:.1f} KiB")
    if "fitted_layers" in runs[0] and allocation(runs[0]) != allocation(ref[0]):
        notes.append("different allocation")
    return w + (f" ({', '.join(notes)})" if notes else "")


def vision_tag(ctx: Ctx, tag: str, *models: str) -> str:
    """Every run of one vision.py tag: one row per model × budget × method, DKM and the others against STE."""
    rows, sources, excluded, commands = [], [], [], []
    for model in models or MODELS:
        res, path = vision_file(tag, model)
        if res is None:
            continue
        if not is_clean(res):
            excluded.append(f"{ctx.link(path)} ({git_of(res) or 'no commit recorded'})")
            continue
        sources.append(ctx.link(path))
        commands += [] if res["command"] in commands else [res["command"]]
        fp = res["fp32"]
        rows.append([MODELS[model], "fp32", "-", "32", f"{fp['model_kib']:.1f}", f"{100 * fp['val_top1']:.2f}",
                     f"{100 * fp['top1']:.2f}", "-", "-"])
        groups = vision_groups(res)
        for (budget, method), runs in sorted(groups.items(), key=lambda kv: (BUDGET_ORDER.index(kv[0][0]),
                                                                            ORDER.index(kv[0][1]))):
            ste = groups.get((budget, "st_kmeans"))
            vs = word(runs, ste) if ste and method not in ("st_kmeans", "ptq_kmeans") else "-"
            rows.append([MODELS[model], LABEL[method], budget_label(budget, runs[0]),
                         f"{runs[0]['bits_per_weight']:.3f}", f"{runs[0]['model_kib']:.1f}",
                         fmt([r["val_top1"] for r in runs]), fmt([r["top1"] for r in runs]), len(runs), vs])
    header = ["model", "method", "budget", "bits/weight", "model KiB", "val top-1 %", "test top-1 %", "seeds",
              "vs k-means + STE"]
    out = [table(header, rows)] if rows else []
    if sources:
        out.append("Source: " + ", ".join(sources) + ". Command" + "s" * (len(commands) > 1) + ": "
                   + "; ".join(f"`{c}`" for c in commands) + ".")
    if excluded:
        out.append("Not shown (made from a tree with uncommitted changes): " + ", ".join(excluded) + ".")
    return "\n\n".join(out)


def vision_new_1bit(ctx: Ctx) -> str:
    """Every clean vision_1bit* tag other than the known granularity/allocation variants (the 1-bit re-runs)."""
    other = {"vision_1bit_cs", "vision_1bit_stem4", "vision_1bit_dw4"}
    tags = sorted({p.name.rsplit("_", 2)[0] if p.name.endswith(("_resnet_small.json", "_mobilenet_small.json"))
                   else "" for p in (BENCH / "vision" / "results").glob("vision_1bit*.json")} - other - {""})
    tags = [t for t in tags if t != "vision_1bit" or any(is_clean(r) for r, _ in (vision_file(t, m) for m in MODELS)
                                                         if r is not None)]
    blocks = [f"**{t}**\n\n" + vision_tag(ctx, t) for t in tags]
    return "\n\n".join(blocks) or "The 1-bit re-run from a clean commit has not landed yet."


def provenance_list(ctx: Ctx) -> str:
    """Every result file of the results folders whose recorded git state is dirty or absent."""
    lines = []
    for domain in ("vision", "text", "llm", "engine"):
        dirty, none = [], []
        for path in sorted((BENCH / domain / "results").rglob("*.json")):
            res = json.loads(path.read_text())
            g = state(res, path)
            (dirty if g.endswith("-dirty") else none if not g else []).append(ctx.link(path, path.relative_to(
                BENCH / domain / "results").as_posix()))
        if dirty:
            lines.append(f"- {domain}, made wholly or partly from a tree with uncommitted changes (those parts are "
                         "never rendered): " + ", ".join(dirty))
        if none:
            lines.append(f"- {domain}, no commit recorded (made before the harness kept one): " + ", ".join(none))
    return "\n".join(lines)


def vision_headline(ctx: Ctx) -> str:
    """The README's vision table: test top-1 % of both CNNs at a few budgets, each row linked to its files."""
    picks = [("vision_2bit_cs", "2bit", ["st_kmeans", "dkm"], " + channel scale"),
             ("vision_baselines_tuned", "2bit", ["qat_lsq"], ""),
             ("vision_05bit_5seeds", "0.5bit", ["st_kmeans", "dkm"], "")]
    other = {"vision_1bit_cs", "vision_1bit_stem4", "vision_1bit_dw4"}  # 1 bit with other granularity/allocation
    ones = sorted({p.name[: -len(f"_{m}.json")] for m in MODELS for p in (BENCH / "vision" / "results").glob(
        f"vision_1bit*_{m}.json")} - other)
    clean_ones = [t for t in ones if all(r is None or is_clean(r) for r, _ in (vision_file(t, m) for m in MODELS))
                  and any(vision_file(t, m)[0] for m in MODELS)]
    if clean_ones:  # the 1-bit re-runs replace the 0.5-bit rows (at most ~8 rows): every method of the first
        picks = picks[:2]  # layout, DKM alone for the others
        for i, t in enumerate(clean_ones):
            res = next(r for r, _ in (vision_file(t, m) for m in MODELS) if r is not None)
            axis = res["settings"].get("vector_axis")
            note = f", vector_axis {axis}" if axis is not None else (f" ({t})" if len(clean_ones) > 1 else "")
            picks.append((t, "1bit", ["st_kmeans", "qat_lsq", "dkm"] if i == 0 else ["dkm"], note))
    header = ["budget", "method"] + [f"{MODELS[m]} test top-1 % (KiB)" for m in MODELS] + ["seeds", "vs STE", "file"]
    fp_row, rows, notes = None, [], {}
    base = {m: vision_file("vision_2bit_cs", m)[0]["fp32"] for m in MODELS}
    for tag, budget, methods, note in picks:
        per = {m: vision_file(tag, m) for m in MODELS}
        for method in methods:
            cells, seeds, words, links = [], set(), [], []
            for m in MODELS:
                res, path = per[m]
                groups = vision_groups(res) if res is not None and is_clean(res) else {}
                runs = groups.get((budget, method))
                if not runs:
                    cells.append("–")
                    continue
                if fp_row is None:
                    fp_row = res
                links.append(ctx.link(path, MODELS[m]))
                seeds.add(len(runs))
                mark = ""
                if res["fp32"].get("sha1") != base[m].get("sha1"):  # another fp32 training run of the same model
                    mark = "*"
                    notes[m] = f"{100 * res['fp32']['top1']:.2f}"
                cells.append(f"{fmt([r['top1'] for r in runs])}{mark} ({runs[0]['model_kib']:.1f})")
                ste = groups.get((budget, "st_kmeans"))
                if ste and method != "st_kmeans":
                    words.append(f"{MODELS[m]}: {word(runs, ste)}")
            if links:
                rows.append([budget.replace("bit", " bit") + note, LABEL[method], *cells,
                             "/".join(map(str, sorted(seeds))), "; ".join(words) or "-", ", ".join(links)])
    if not clean_ones:
        rows.append(["1 bit (16×4-d)", "every method, 3 seeds", *["re-run in progress"] * len(MODELS), "-", "-", "-"])
    fp = []
    for m in MODELS:
        res, _ = vision_file("vision_2bit_cs", m)
        fp.append(f"{100 * res['fp32']['top1']:.2f} ({res['fp32']['model_kib']:.1f})")
    rows.insert(0, ["32 bit", "fp32", *fp, "-", "-", "-"])
    out = table(header, rows)
    if notes:
        out += ("\n\n\\* fine-tuned from another fp32 training run of the same model (same recipe and seed; its test "
                "top-1: " + ", ".join(f"{MODELS[m]} {v}" for m, v in notes.items()) + ").")
    return out


# ------------------------------------------------------------------------------------------------ text


def nlp_table(ctx: Ctx, *tags: str) -> str:
    """nlp.py runs of several tags (one fp32 model): accuracy and macro-F1, each method against STE."""
    rows, sources, excluded, groups, fp = [], [], [], {}, None
    for tag in tags:
        path = BENCH / "text" / "results" / f"{tag}.json"
        if not path.is_file():
            excluded.append(f"`{tag}.json` (not yet run)")
            continue
        res = load(f"text/results/{tag}.json")
        if not is_clean(res, path):
            excluded.append(f"{ctx.link(path)} ({state(res, path) or 'no commit recorded'}: the code that made it is "
                            "not in the history)")
            continue
        sources.append(ctx.link(path))
        fp = fp or res
        same_fp32 = res["key"]["fp32_sha1"] == fp["key"]["fp32_sha1"]
        for r in res["runs"]:
            label = LABEL[r["method"]] + (" + direct_grad 1" if res["settings"].get("direct_grad") else "")
            groups.setdefault((r["budget"], label, res["settings"]["steps"], same_fp32), []).append(r)
    if fp is None:
        return "No clean result yet: " + ", ".join(excluded) + "."
    rows.append(["fp32", "-", f"{fp['fp32_mib']:.2f}", f"{100 * fp['fp32']['acc']:.2f}",
                 f"{100 * fp['fp32']['macro_f1']:.2f}", "-", "-", "-"])
    for (budget, label, steps, same), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        runs = sorted(runs, key=lambda r: r["seed"])
        ste = next((v for (b, lab, s, _), v in groups.items() if b == budget and s == steps and
                    lab == LABEL["st_kmeans"]), None)
        vs = word(runs, ste) if ste and label != LABEL["st_kmeans"] else "-"
        rows.append([label + ("" if same else " (another fp32 model)"), budget, f"{runs[0]['mib']:.2f}",
                     fmt([r["acc"] for r in runs]), fmt([r["macro_f1"] for r in runs]), steps, len(runs), vs])
    out = [table(["method", "budget", "MiB", "test accuracy %", "macro-F1 %", "steps", "seeds", "vs STE"], rows),
           "Source: " + ", ".join(sources) + "."]
    if excluded:
        out.append("Not shown: " + ", ".join(excluded) + ".")
    return "\n\n".join(out)


def nlp_val(ctx: Ctx) -> str:
    """The lr check on held-out training articles (nlp.py --val 356), validation accuracy per lr and method."""
    rows, dirty = [], []
    for lr in ("3e-5", "1e-4", "3e-4"):
        row = [lr]
        for method in ("dkm", "st_kmeans"):
            path = BENCH / "text" / "results" / "nlp_val" / f"val_{method}_{lr}.json"
            res = load(f"text/results/nlp_val/val_{method}_{lr}.json")
            if not is_clean(res, path):
                dirty.append(ctx.link(path))
                row.append("– (not shown: dirty tree)")
                continue
            row.append(f"{fmt([r['acc'] for r in res['runs'] if r['method'] == method])} ({ctx.link(path, 'file')})")
        rows.append(row)
    out = table(["lr", "DKM validation accuracy %", "k-means + STE validation accuracy %"], rows)
    return out + ("\n\nNot shown (made from a tree with uncommitted changes): " + ", ".join(dirty) + "." if dirty else "")


# ------------------------------------------------------------------------------------------------ language models


LLM_PICKS = [  # (file, row key, how the setting was picked)
    ("llm.json", "gptq-4b-g64", "GPTQ defaults (no search)"),
    ("llm.json", "kmeans-4b-g16-cs", "no setting to pick"),
    ("llm_dkm36.json", "dkm-distill-4b-g16-cs", "lr 3e-5: first guess, not tuned"),
    ("llm_dkm108.json", "dkm-distill-4b-g16-cs", "lr 3e-5, 108 steps: not tuned"),
    ("llm_dkm36_lr1e-4.json", "dkm-distill-4b-g16-cs", "lr 1e-4: second of {3e-5, 1e-4, 3e-4} on PTB valid[:512]"),
    ("llm_dkm36_lr3e-4.json", "dkm-distill-4b-g16-cs", "lr 3e-4: best of {3e-5, 1e-4, 3e-4} on PTB valid[:512]"),
    ("llm_dkm36_seq512_lr3e-4.json", "dkm-distill-4b-g16-cs", "1 × 512 tokens per step instead of 4 × 128: "
                                                               "one try, not tuned"),
    ("llm.json", "rtn-3b-g64", "no setting to pick"),
    ("llm.json", "dkm-distill-3b-g16-cs", "lr 3e-5, 12 steps: not tuned"),
]


LLM_SHORT = {"gptq-4b-g64", "kmeans-4b-g16-cs", "llm_dkm36.json", "llm_dkm108.json", "llm_dkm36_lr3e-4.json"}


def llm_table(ctx: Ctx, short: str = "") -> str:
    """SmolLM2-135M: the source GGUF as its own row, then every clean row; how each setting was picked.
    ``short``: the README's rows only."""
    base = BENCH / "llm" / "results"
    rows, excluded = [], []
    fp32_file = base / "llm_fp32.json"
    gguf_mib = load("llm/results/llm.json")["settings"]["gguf_mib"]
    fp = load("llm/results/llm_fp32.json")["rows"]["fp32"] if fp32_file.is_file() else None
    if fp is not None and is_clean(fp):
        rows.append(["source file: SmolLM2-135M-Instruct Q4_1 GGUF (evaluated dequantized)", "Q4_1", f"{gguf_mib:.1f}",
                     f"{fp['ptb_valid512_ppl']:.2f}", f"{fp['ptb_ppl']:.2f}", f"{fp['wiki_ppl']:.2f}",
                     "the model as published", ctx.link(fp32_file)])
    else:
        rows.append(["source file: SmolLM2-135M-Instruct Q4_1 GGUF", "Q4_1", f"{gguf_mib:.1f}", "–", "–", "–",
                     "the model as published (its perplexity: re-run pending)", "–"])
    for fname, key, picked in LLM_PICKS:
        if short and not ({fname, key} & LLM_SHORT):
            continue
        path = base / fname
        r = load(f"llm/results/{fname}")["rows"][key]
        if not is_clean(r):
            excluded.append(f"{key} in {ctx.link(path)}")
            continue
        valid = r.get("ptb_valid512_ppl")
        rows.append([r["method"], f"{r['bits_per_weight']:.3f}",
                     f"{r['model_mib']:.1f} ({100 * (r['model_mib'] / gguf_mib - 1):+.0f} %)",
                     "-" if valid is None else f"{valid:.2f}", f"{r['ptb_ppl']:,.2f}", f"{r['wiki_ppl']:,.2f}",
                     picked, ctx.link(path)])
    head = ["method", "bits/weight", "model MiB (vs the source file)", "PTB valid[:512] ppl", "PTB test ppl", "Wiki ppl",
            "how the setting was picked", "file"]
    out = table(head, rows)
    if excluded:
        out += ("\n\nNot shown (made from a tree with uncommitted changes; the language-model re-run replaces them): "
                + ", ".join(excluded) + ".")
    return out


# ------------------------------------------------------------------------------------------------ engine and others


def include(ctx: Ctx, rel: str, n: str = "1") -> str:
    """The n-th Markdown table of a results .md file, copied as it is, with its source link."""
    path = BENCH / rel
    tables = re.findall(r"((?:^\|.*\|\n)+)", path.read_text() + "\n", re.M)
    return tables[int(n) - 1].rstrip("\n") + f"\n\nSource: {ctx.link(path)}."


def paper_sizes(ctx: Ctx) -> str:
    res = load("engine/results/paper_sizes.json")
    if not is_clean(res):
        return f"Not shown: {ctx.link(BENCH / 'engine' / 'results' / 'paper_sizes.json')} has no clean commit recorded."
    rows = []
    for r in res["rows"]:
        pm = r["paper_mib"]
        pm = "-" if pm is None else (f"{pm[0]}" if pm[0] == pm[1] else f"{pm[0]}–{pm[1]}")
        rows.append([r["model"], f"{r['params'] / 1e6:.2f} M", f"{r['fp32_mib']:.2f}", f"{r['compressed_mib']:.3f}",
                     pm, f"{r['factor']:.1f}×", f"{r['paper_factor']}×", r["config"]])
    path = BENCH / "engine" / "results" / "paper_sizes.json"
    return table(["model", "params", "fp32 MiB", "torchdkm MiB", "paper MiB", "factor", "paper factor", "config"],
                 rows) + f"\n\nSource: {ctx.link(path)}."


def ptq_granularity(ctx: Ctx) -> str:
    """Post-training k-means at each LUT granularity (ptq_granularity.py), one table per model from a clean run."""
    path = BENCH / "vision" / "results" / "ptq_granularity.json"
    out, dirty = [], []
    for res in load("vision/results/ptq_granularity.json")["results"]:
        if not is_clean(res):
            dirty.append(f"{res['model']} ({state(res)})")
            continue
        if res["model"] == "mobilenet_v2":
            head = ["bits", "granularity", "bits/weight", "top-1 agreement with fp32 %", "KL to fp32"]
            rows = [[r["bits"], r["granularity"], f"{r['bits_per_weight']:.3f}", f"{100 * r['top1_agree']:.1f}",
                     f"{r['kl']:.4f}"] for r in res["rows"]]
        else:
            head = ["bits", "granularity", "bits/weight", "embedding rel. error", "BBC accuracy %"]
            rows = [[r["bits"], r["granularity"], f"{r['bits_per_weight']:.3f}", f"{r['rel_err']:.4f}",
                     f"{100 * r['acc']:.2f}"] for r in res["rows"]]
        out.append(f"**{res['model']}** (`{res['command']}`)\n\n" + table(head, rows))
    if dirty:
        out.append(f"Not shown (made from a tree with uncommitted changes): {', '.join(dirty)} in {ctx.link(path)}.")
    return "\n\n".join(out)


PLANNED_ROWS = {"planned_dkm": "planned + DKM", "uniform_dkm": "uniform DKM", "hand_dkm": "hand rule + DKM",
                "uniform_qat": "uniform QAT (LSQ+)", "planned_qat": "planned QAT (LSQ+)"}


def planned(ctx: Ctx) -> str:
    """benchmarks/vision/planned.py: one row per budget × method, both CNNs side by side, each row against the
    planned + DKM row of its budget and model."""
    files = {m: vision_file("planned", m) for m in MODELS}
    have = {m: res for m, (res, _) in files.items() if res is not None and is_clean(res)}
    left = [ctx.link(path) for m, (res, path) in files.items() if res is not None and m not in have]
    if not have:
        return "No results from a clean commit yet: `python benchmarks/vision/planned.py` makes them." + (
            f" Left out: {', '.join(left)}." if left else "")
    head = ["budget (size of)", "method"] + [f"{MODELS[m]} test top-1 % (KiB)" for m in have] + [
        "seeds", "planned + DKM vs this row"]
    rows = []
    for budget in ("1bit", "2bit"):
        for row, label in PLANNED_ROWS.items():
            cells, words, seeds = [], [], set()
            for m, res in have.items():
                rs = sorted((r for r in res["runs"] if r["budget"] == budget and r["row"] == row),
                            key=lambda r: r["seed"])
                ref = [r for r in res["runs"] if r["budget"] == budget and r["row"] == "planned_dkm"]
                if not rs:
                    cells.append("-")
                    continue
                seeds.add(len(rs))
                cells.append(f"{fmt([r['top1'] for r in rs])} ({rs[0]['model_kib']:.1f})")
                if row != "planned_dkm" and ref:
                    words.append(f"{MODELS[m]}: {word(ref, rs)}")
            if any(c != "-" for c in cells):
                rows.append([f"uniform {budget.replace('bit', ' bit')}", label, *cells,
                             "/".join(map(str, sorted(seeds))), "; ".join(words) or "-"])
    links = ", ".join(ctx.link(path, MODELS[m]) for m, (_, path) in files.items() if m in have)
    out = table(head, rows) + f"\n\nSource: {links}; every row's plan and settings in [planned.md]" \
        f"({Path(_relpath(BENCH / 'vision' / 'results' / 'planned.md', ctx.doc.parent)).as_posix()})."
    if left:
        out += f"\n\nNot shown (made from a tree with uncommitted changes): {', '.join(left)}."
    return out


def lowest_mean(rows: list, setting):
    """Of whole.py ``rows``, the ``setting(row)`` whose rows have the lowest mean validation score (over its seeds:
    by its best seed alone, a setting with more seeds would be favoured by luck); None for no rows."""
    scores: dict = {}
    for r in rows:
        scores.setdefault(setting(r), []).append(r["valid_score"])
    return min(scores, key=lambda v: sum(scores[v]) / len(scores[v])) if scores else None


def dkm_variant(rows: list, method: str = "planned-dkm") -> str:
    """Of one budget's whole.py DKM settings of ``method`` (row ``variant``), the one with the best mean validation
    score over its seeds ('' = DKM's defaults)."""
    return lowest_mean([r for r in rows if r["method"] == method], lambda r: r.get("variant", "")) or ""


def llm_whole(ctx: Ctx, *which: str) -> str:
    """SmolLM2 as whole files: the Q4_1 source, llama.cpp's quantizers of the same weights, and torchdkm's whole
    models (embedding/head compressed), one evaluator; sorted by size. Seeds of one torchdkm row are shown as
    mean ± std. ``short``: of torchdkm's rows only those chosen on validation and, per budget, the best DKM and the
    best STE setting by mean validation score (over layouts, calibrations, starts and training settings)."""
    files = {"llama.cpp": BENCH / "llm" / "results" / "llamacpp.json", "torchdkm": BENCH / "llm" / "results" / "whole.json"}
    rows, left = [], []
    for who, path in files.items():
        res = load(str(path.relative_to(BENCH)))
        if not is_clean(res):
            left.append(ctx.link(path))
            continue
        if who == "llama.cpp":
            rows += [(r["file_mib"], [r["label"], f"{r['file_mib']:.1f}", f"{r['ptb_ppl']:,.2f}",
                                      f"{r['wiki_ppl']:,.2f}"]) for r in res["rows"]]
            continue
        groups: dict = {}
        where = lambda r: (r["budget"], r.get("layout", ""), r.get("calib", ""), r["method"])  # noqa: E731
        how = lambda r: (r.get("train_set", ""), r.get("variant", ""))  # noqa: E731
        for r in res["rows"]:
            groups.setdefault((where(r), how(r)), []).append(r)
        family = lambda r: r["method"].rsplit("-", 1)[-1]  # noqa: E731  (dkm, ste: fine-tuned)
        for (setting, trained_how), runs in groups.items():
            chosen = any(r.get("chosen") for r in runs)
            # of a fine-tuned family's settings at one budget (layouts, calibrations, starts, training settings and
            # DKM variants): the one with the best mean validation score
            trained = family(runs[0]) in ("dkm", "ste") and (setting, trained_how) == lowest_mean(
                [r for r in res["rows"] if r["budget"] == setting[0] and family(r) == family(runs[0])],
                lambda r: (where(r), how(r)))
            if "short" in which and not chosen and not trained:
                continue
            label = f"torchdkm {runs[0]['label']}" + (" (chosen on validation)" if chosen else "")
            cells = []
            for key in ("ptb_ppl", "wiki_ppl"):
                m, sd, n = mean_std([r[key] for r in runs])
                cells.append(f"{m:,.2f}" + (f" ± {sd:.2f} ({n} seeds)" if n > 1 else ""))
            rows.append((runs[0]["file_mib"], [label, f"{runs[0]['file_mib']:.1f}", *cells]))
    out = table(["model (every file from the same Q4_1 weights)", "file MiB", "PTB test ppl", "Wiki test ppl"],
                [r for _, r in sorted(rows, key=lambda x: -x[0])])
    out += "\n\nSources: " + ", ".join(ctx.link(p) for p in files.values()) + "."
    if left:
        out += f"\n\nNot shown (no clean commit recorded): {', '.join(left)}."
    return out


TABLES = {f.__name__: f for f in (vision_tag, vision_headline, vision_new_1bit, provenance_list, nlp_table, nlp_val,
                                   llm_table, include, paper_sizes, ptq_granularity, planned,
                                   llm_whole)}
TABLES["rule"] = lambda ctx: RULE


# ------------------------------------------------------------------------------------------------ driver


def render_text(text: str, doc: Path) -> str:
    ctx = Ctx(doc)

    def one(m):
        name, *args = m.group("spec").split()
        return m.group(1) + TABLES[name](ctx, *args).rstrip("\n") + "\n" + m.group(4)

    return BLOCK.sub(one, text)


def run(check: bool, docs=None) -> list:
    """Render every block of ``docs``; returns the files that differ (check) or were rewritten."""
    changed = []
    for doc in docs or DOCS:
        text = doc.read_text()
        new = render_text(text, doc)
        if new != text:
            changed.append(doc)
            if not check:
                doc.write_text(new)
    return changed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block differs from a render")
    a = p.parse_args(argv)
    changed = run(a.check)
    for doc in changed:
        print(("differs from a fresh render: " if a.check else "rendered: ") + str(doc.relative_to(ROOT)))
    if a.check and changed:
        print("run `python benchmarks/render.py` (tables are rendered from the results, never typed)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
