"""YAML recipes for ``torchdkm compress``: which model, which data, how to train, how to compress.

A recipe has four sections (unknown keys anywhere are an error that names them and lists the allowed ones)::

    name: digits-mlp                      # optional, shown in the report
    model:
      name: mlp                           # a built-in model name, or "package.module:function"
      kwargs: {hidden: 128}               # passed to the builder
      checkpoint: null                    # optional state_dict file (torch.save) loaded before training
    data:
      name: digits                        # fashion_mnist | mnist_5k | digits | bbc_news | "package.module:function"
      kwargs: {test_fraction: 0.25}
    training:
      epochs: 3                           # DKM fine-tuning epochs
      fp32_epochs: 5                      # plain training first (0: the model is already trained)
      batch_size: 64                      # global batch; split evenly across torchrun ranks
      optimizer: adam                     # sgd | adam | adamw
      lr: 0.001
      fp32_lr: null                       # lr of the fp32 epochs (null: same as lr)
      schedule: cosine                    # constant | cosine (per step, over each phase)
      weight_decay: 0.0
      momentum: 0.9                       # sgd only
      seed: 0
      device: auto                        # auto | cpu | cuda
      eval_batch_size: 1024
      distill: 0.0                        # weight of distillation from the fp32 model: (1-w) CE + w KD
      distill_temperature: 2.0
      bn_recal_batches: 0                 # re-estimate BatchNorm statistics on this many batches before finalize
    compression:                          # DKMConfig fields, then per-layer rules
      bits: 4
      dim: 1
      tau_scale: 0.05
      tau_scale_end: null                 # anneal tau_scale to this over the DKM epochs (the steps are counted)
      group_size: null                    # null: one LUT per layer; g: one per g output channels
      channel_scale: false                # normalise each output channel by its max |w| before clustering
      rules:
        stem.0: null                      # skip this layer
        "re:.*fc": {bits: 8}              # fields override the global ones above

A custom model function returns an ``nn.Module``; a custom data function returns ``(train, test)`` datasets
of ``(input, label)`` pairs (the loss is cross-entropy). Its module is found in the recipe's folder, then the
current directory, then the installed packages.

A Hugging Face model instead of ``model.name`` (loaded offline; see torchdkm.app.hf)::

    model:
      transformers: path/to/folder        # or a name in the local HF cache, or "package.module:function" -> folder
      task: sequence-classification       # the one task so far
      max_length: 128                     # tokens per text (truncated and padded)
      tokenizer: null                     # null: the model's own
      num_labels: null                    # null: from the data's labels
    data:
      name: bbc_news                      # as text; or "module:function" -> (train, test), each (texts, labels)
                                          # or a table with 'text' and 'label' columns
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional

from ..config import DKMConfig
from ..errors import ConfigError

DATA_NAMES = ("fashion_mnist", "mnist_5k", "digits", "bbc_news")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")
DEVICES = ("auto", "cpu", "cuda")
TASKS = ("sequence-classification",)
_FUNCTION_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class ModelSpec:
    name: str  # a built-in name, "package.module:function", or "transformers" (then ``transformers`` is set)
    kwargs: Dict[str, Any] = field(default_factory=dict)
    checkpoint: Optional[str] = None
    transformers: Optional[str] = None  # a Hugging Face model: local folder, local-cache name or module:function
    task: str = "sequence-classification"
    num_labels: Optional[int] = None  # None: from the training labels
    max_length: int = 128  # tokens per text (truncated and padded to it)
    tokenizer: Optional[str] = None  # None: the model's own

    @property
    def is_transformers(self) -> bool:
        return self.transformers is not None


@dataclass(frozen=True)
class DataSpec:
    name: str
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingSpec:
    epochs: int = 3
    fp32_epochs: int = 0
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    fp32_lr: Optional[float] = None
    schedule: str = "cosine"
    weight_decay: float = 0.0
    momentum: float = 0.9
    seed: int = 0
    device: str = "auto"
    eval_batch_size: int = 1024
    distill: float = 0.0
    distill_temperature: float = 2.0
    bn_recal_batches: int = 0


@dataclass(frozen=True)
class CompressionSpec:
    config: DKMConfig
    rules: Dict[str, Optional[DKMConfig]]


@dataclass(frozen=True)
class Recipe:
    name: str
    model: ModelSpec
    data: DataSpec
    training: TrainingSpec
    compression: CompressionSpec
    raw: Dict[str, Any]  # the validated mapping as written (stored in checkpoints and reports)
    folder: Optional[str] = None  # the recipe file's folder: user modules and relative model paths are found there


def load_recipe(path) -> Recipe:
    """Read and validate a YAML recipe; errors name the file and the offending key."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read recipe {str(path)!r}: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {e}") from None
    try:
        return parse_recipe(raw, default_name=path.stem, folder=str(path.resolve().parent))
    except ConfigError as e:
        raise ConfigError(f"recipe {str(path)!r}: {e}") from None


def parse_recipe(raw, default_name: str = "recipe", folder: Optional[str] = None) -> Recipe:
    """Validate a recipe mapping (as loaded from YAML) into a :class:`Recipe`; ``folder``: where the recipe file
    lies (its user modules are importable from there)."""
    _check_mapping("recipe", raw)
    _check_keys("recipe", raw, ("name", "model", "data", "training", "compression"),
                required=("model", "data"))
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"name={name!r} is not allowed: give a non-empty string")
    return Recipe(
        name=name,
        model=_parse_model(raw["model"]),
        data=_parse_data(raw["data"]),
        training=_parse_training(raw.get("training") or {}),
        compression=_parse_compression(raw.get("compression") or {}),
        raw=raw,
        folder=folder,
    )


def _parse_model(raw) -> ModelSpec:
    from .zoo.models import MODEL_NAMES

    _check_mapping("model", raw)
    ckpt = raw.get("checkpoint")
    if ckpt is not None and (not isinstance(ckpt, str) or not ckpt):
        raise ConfigError(f"model.checkpoint={ckpt!r} is not allowed: give a file path or null")
    kwargs = _check_kwargs("model.kwargs", raw.get("kwargs"))
    if "transformers" not in raw:
        _check_keys("model", raw, ("name", "kwargs", "checkpoint"), required=("name",))
        return ModelSpec(_check_source("model.name", raw["name"], MODEL_NAMES), kwargs, ckpt)
    _check_keys("model", raw, ("transformers", "task", "num_labels", "max_length", "tokenizer", "kwargs",
                               "checkpoint"))
    src = raw["transformers"]
    if not isinstance(src, str) or not src:
        raise ConfigError(f"model.transformers={src!r} is not allowed: give a local model folder, a model name in "
                          f"the local Hugging Face cache (e.g. org/name), or 'package.module:function' returning a folder")
    task = raw.get("task", "sequence-classification")
    _choice("model.task", task, TASKS)
    num_labels = raw.get("num_labels")
    if num_labels is not None:
        _int("model.num_labels", num_labels, 2)
    max_length = raw.get("max_length", 128)
    _int("model.max_length", max_length, 1)
    tok = raw.get("tokenizer")
    if tok is not None and (not isinstance(tok, str) or not tok):
        raise ConfigError(f"model.tokenizer={tok!r} is not allowed: give a tokenizer folder or name, or null "
                          f"(the model's own)")
    return ModelSpec("transformers", kwargs, ckpt, src, task, num_labels, max_length, tok)


def _parse_data(raw) -> DataSpec:
    _check_mapping("data", raw)
    _check_keys("data", raw, ("name", "kwargs"), required=("name",))
    name = _check_source("data.name", raw["name"], DATA_NAMES)
    return DataSpec(name, _check_kwargs("data.kwargs", raw.get("kwargs")))


def _parse_training(raw) -> TrainingSpec:
    _check_mapping("training", raw)
    _check_keys("training", raw, tuple(f.name for f in fields(TrainingSpec)))
    floats = ("lr", "fp32_lr", "weight_decay", "momentum", "distill", "distill_temperature")  # YAML reads 1e-3 (no dot) as a string
    t = TrainingSpec(**{k: _float_or_keep(v) if k in floats else v for k, v in raw.items()})
    _int("training.epochs", t.epochs, 0)
    _int("training.fp32_epochs", t.fp32_epochs, 0)
    _int("training.batch_size", t.batch_size, 1)
    _int("training.eval_batch_size", t.eval_batch_size, 1)
    _int("training.seed", t.seed, 0)
    _choice("training.optimizer", t.optimizer, OPTIMIZERS)
    _choice("training.schedule", t.schedule, SCHEDULES)
    _choice("training.device", t.device, DEVICES)
    _number("training.lr", t.lr, positive=True)
    if t.fp32_lr is not None:
        _number("training.fp32_lr", t.fp32_lr, positive=True)
    _number("training.weight_decay", t.weight_decay)
    _number("training.momentum", t.momentum)
    _number("training.distill_temperature", t.distill_temperature, positive=True)
    _int("training.bn_recal_batches", t.bn_recal_batches, 0)
    if not (isinstance(t.distill, (int, float)) and not isinstance(t.distill, bool) and 0 <= t.distill <= 1):
        raise ConfigError(f"training.distill={t.distill!r} is not allowed: give a number in [0, 1] (the weight of "
                          f"the distillation loss; 0 = off)")
    if t.epochs + t.fp32_epochs == 0:
        raise ConfigError("training.epochs and training.fp32_epochs are both 0: nothing to train")
    return t


def _parse_compression(raw) -> CompressionSpec:
    _check_mapping("compression", raw)
    cfg_keys = tuple(f.name for f in fields(DKMConfig))
    _check_keys("compression", raw, cfg_keys + ("rules",))
    glob = _dkm_config("compression", DKMConfig(), {k: v for k, v in raw.items() if k != "rules"})
    rules_raw = raw.get("rules") or {}
    _check_mapping("compression.rules", rules_raw)
    rules: Dict[str, Optional[DKMConfig]] = {}
    for key, value in rules_raw.items():
        where = f"compression.rules[{key!r}]"
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: a rule key must be a module name or 're:<regex>'")
        if value is None:
            rules[key] = None
            continue
        _check_mapping(where, value)
        _check_keys(where, value, cfg_keys)
        rules[key] = _dkm_config(where, glob, value)
    return CompressionSpec(glob, rules)


def _dkm_config(where: str, base: DKMConfig, changes: dict) -> DKMConfig:
    for key in ("tau_scale", "tau_scale_end", "eps", "eps_rel"):  # YAML reads 1e-5 as a string; accept numbers written that way
        if isinstance(changes.get(key), str):
            changes = dict(changes, **{key: _float_or_keep(changes[key])})
    if isinstance(changes.get("tau"), str) and changes["tau"] != "auto":
        changes = dict(changes, tau=_float_or_keep(changes["tau"]))
    try:
        return base.replace(**changes)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------------------------------
# small checks with messages that say what was given and what is allowed


def _check_mapping(where: str, value) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping (key: value lines), got {type(value).__name__}: {value!r}")


def _check_keys(where: str, raw: dict, allowed, required=()) -> None:
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed keys are: {', '.join(allowed)}")
    missing = [k for k in required if k not in raw]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")


def _check_source(where: str, value, builtins) -> str:
    if isinstance(value, str) and (value in builtins or _FUNCTION_REF.match(value)):
        return value
    raise ConfigError(f"{where}={value!r} is not allowed: give one of {', '.join(builtins)} "
                      f"or 'package.module:function'")


def _check_kwargs(where: str, value) -> dict:
    if value is None:
        return {}
    _check_mapping(where, value)
    bad = [k for k in value if not isinstance(k, str) or not k.isidentifier()]
    if bad:
        raise ConfigError(f"{where}: key(s) {bad} are not valid argument names")
    return dict(value)


def _int(where: str, value, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ConfigError(f"{where}={value!r} is not allowed: give an integer >= {lo}")


def _number(where: str, value, positive: bool = False) -> None:
    value = _float_or_keep(value)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise ConfigError(f"{where}={value!r} is not allowed: give a finite number {'> 0' if positive else '>= 0'}")


def _float_or_keep(value):
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _choice(where: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}={value!r} is not allowed: give one of {', '.join(allowed)}")
