"""Turn a recipe's model / data / training sections into objects: model, datasets, optimizer, schedule."""
from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any, Callable, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..errors import ConfigError
from .recipe import DataSpec, ModelSpec, TrainingSpec
from .userfn import resolve_function


def build_model(spec: ModelSpec, folder: Optional[str] = None, num_labels: Optional[int] = None) -> nn.Module:
    """The recipe's model, with its checkpoint (a state_dict saved by torch.save) loaded when given.
    ``num_labels``: the classes in the data (a transformers model's head gets that many outputs)."""
    if spec.is_transformers:
        from .hf import load_model

        model = load_model(spec, folder, num_labels)
    elif ":" in spec.name:
        model = _call(resolve_function(spec.name, "model.name", folder), spec.kwargs, "model")
    else:
        from .zoo.models import build_model as build_builtin

        try:
            model = build_builtin(spec.name, **spec.kwargs)
        except TypeError as e:  # the built-in constructors are plain: a TypeError means a wrong kwargs key
            raise ConfigError(f"model.kwargs {spec.kwargs} do not fit model {spec.name!r}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name={spec.name!r} returned {type(model).__name__}, not an nn.Module")
    if spec.checkpoint:
        state = torch.load(_find_file(spec.checkpoint, folder, "model.checkpoint"), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as e:
            raise ConfigError(f"model.checkpoint={spec.checkpoint!r} does not fit model {spec.name!r}: {e}") from None
    return model


def build_data(spec: DataSpec, folder: Optional[str] = None, text: bool = False) -> Tuple[Any, Any]:
    """(train, test): datasets of (input, label) pairs, or with ``text`` (for a transformers model) texts and
    labels, each split as ``(texts, labels)`` or a table with ``text`` and ``label`` columns (a dict of lists or a
    Hugging Face ``datasets.Dataset``)."""
    if ":" in spec.name:
        out = _call(resolve_function(spec.name, "data.name", folder), spec.kwargs, "data")
    else:
        out = _call(_builtin_data(spec.name, text), spec.kwargs, "data")
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ConfigError(f"data.name={spec.name!r} must return (train, test) datasets, got {type(out).__name__}")
    return out[0], out[1]


def _builtin_data(name: str, text: bool) -> Callable:
    from .zoo import data  # imported here: it pulls in numpy/sklearn helpers only when data is needed

    if text:
        if name != "bbc_news":
            raise ConfigError(f"data.name={name!r} is images, but the model is a transformers text model: give "
                              f"bbc_news or 'package.module:function' returning (train, test) texts and labels")
        return _bbc_news_text
    return {"fashion_mnist": data.load_fashion_mnist, "mnist_5k": data.load_mnist_5k, "digits": data.load_digits,
            "bbc_news": _bbc_news}[name]


def _bbc_news(n_features: int = 4096, test_fraction: float = 0.2, seed: int = 0):
    """BBC News as hashed bag-of-words vectors (word 1-2 grams, sublinear tf, l2-normalised), for an MLP.

    A hashing vectorizer needs no fitted vocabulary, so train and test are encoded independently.
    """
    from sklearn.feature_extraction.text import HashingVectorizer

    from .zoo.data import load_bbc_news

    x_tr, y_tr, x_te, y_te, _ = load_bbc_news(test_fraction=test_fraction, seed=seed)
    vec = HashingVectorizer(n_features=n_features, ngram_range=(1, 2), alternate_sign=False, norm=None,
                            stop_words="english")

    def encode(texts, labels):
        x = vec.transform(texts)
        x.data = 1.0 + torch.from_numpy(x.data).log().numpy()  # sublinear tf: 1 + log(count)
        dense = torch.from_numpy(x.toarray()).float()
        dense = dense / dense.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return TensorDataset(dense, torch.tensor(labels, dtype=torch.long))

    return encode(x_tr, y_tr), encode(x_te, y_te)


def _bbc_news_text(test_fraction: float = 0.2, seed: int = 0):
    """BBC News as (texts, labels) per split, for a transformers model (tokenised by the job)."""
    from .zoo.data import load_bbc_news

    x_tr, y_tr, x_te, y_te, _ = load_bbc_news(test_fraction=test_fraction, seed=seed)
    return (x_tr, y_tr), (x_te, y_te)


def _find_file(path: str, folder: Optional[str], where: str) -> str:
    """A relative path is looked up in the current directory, then in the recipe's folder."""
    tries = [Path(path)] + ([Path(folder) / path] if folder and not Path(path).is_absolute() else [])
    for p in tries:
        if p.is_file():
            return str(p)
    raise ConfigError(f"{where}={path!r}: no such file (looked at {', '.join(str(p.resolve()) for p in tries)})")


def _call(fn: Callable, kwargs: dict, section: str):
    """fn(**kwargs), checking the keys against fn's signature first (a TypeError from inside fn stays one)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: just call
        return fn(**kwargs)
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{section}.kwargs {kwargs} do not fit {getattr(fn, '__name__', fn)}{sig}: {e}") from None
    return fn(**kwargs)


def build_optimizer(params, t: TrainingSpec, lr: float) -> torch.optim.Optimizer:
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)


def build_scheduler(opt: torch.optim.Optimizer, t: TrainingSpec, total_steps: int):
    """Stepped once per optimizer step: constant, or cosine from lr to 0 over the phase."""
    if t.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return cosine_schedule(opt, total_steps)


def cosine_schedule(opt: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate times 0.5 (1 + cos(pi step / total_steps)): from lr down to 0 over ``total_steps``
    optimizer steps (stepped once per step), then held at 0."""
    total = max(total_steps, 1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
