"""DKM inside a Hugging Face ``transformers.Trainer``: prepare the model, train with the Trainer, finalize, save.

    model = AutoModelForSequenceClassification.from_pretrained(path)
    torchdkm.prepare(model, torchdkm.DKMConfig(bits=4))            # before the Trainer is built
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[DKMTrainerCallback()])
    trainer.train()                                               # or train(resume_from_checkpoint=True)
    torchdkm.finalize(model)
    torchdkm.save(model, "model.safetensors")                     # later: torchdkm.load(file, AutoModel...from_config(cfg))

The Trainer's own checkpoints (``checkpoint-N/model.safetensors``) hold the model's ``state_dict``, which for a
prepared model includes every layer's DKM centroids and init flag (buffers of the parametrization) next to the
trained weights: ``train(resume_from_checkpoint=...)`` on a model prepared the same way continues with the
centroids of step N (no new k-means). ``Trainer.evaluate`` runs in eval mode, i.e. with the hard assignment the
model will be shipped with.

The callback itself only adds what the Trainer cannot know: the k-means initialisation before the first step
(deterministic, not inside the first forward), the temperature schedule's clock (``torchdkm.step`` after every
optimizer step, so ``DKMConfig(tau_scale_end=..., anneal_steps=...)`` anneals), DKM statistics in the Trainer's logs (``dkm_entropy``: mean
attention entropy over layers, 0 = hard; ``dkm_gap``: mean soft-to-hard weight gap; ``dkm_centroids_used``: fraction of the centroids that are some weight's
nearest), and optionally finalize at the end of training.

Progress in logs: the k-means initialisation announces itself and its duration (printed by the main process), and
when stdout is not a terminal (a log file: the Trainer's bar is no use there) the callback makes the Trainer log
every ``progress_every_s`` seconds or ``progress_every_steps`` steps, whichever comes first, and adds to those logs
``progress`` ("step/total"), ``samples_per_second`` (of this session's training) and ``eta_s`` (seconds left).
With several processes only the step count applies: a Trainer log gathers the loss from every rank, so all must
decide to log at the same step, which clocks cannot promise.
"""
from __future__ import annotations

import sys

from ..api import finalize, initialize
from .._progress import DEFAULT_EVERY_S, ProgressLog
from ..errors import ConfigError, MissingDependencyError
from ..parametrization import dkm_parametrization
from ..stats import dkm_layer_stats
from ..training import step as dkm_step

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError("torchdkm.integrations.hf_trainer needs transformers: "
                                 "pip install 'torchdkm[transformers]'") from None


class DKMTrainerCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` for a model already prepared with ``torchdkm.prepare``.

    ``finalize_at_end``: snap to the centroids when training ends (then the model is plain again; keep False if
    you will resume or evaluate the soft model). ``log_stats``: add ``dkm_entropy`` / ``dkm_centroids_used`` to
    every log line (costs about one DKM forward of every layer per logging step, for the gap).
    ``progress_every_s`` / ``progress_every_steps``: when stdout is not a terminal, a Trainer log at least this
    often (0 turns one off), with progress, throughput and ETA in it.
    """

    def __init__(self, finalize_at_end: bool = False, log_stats: bool = True,
                 progress_every_s: float = DEFAULT_EVERY_S, progress_every_steps: int = 0):
        self.finalize_at_end, self.log_stats = finalize_at_end, log_stats
        for name, value in (("progress_every_s", progress_every_s), ("progress_every_steps", progress_every_steps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"DKMTrainerCallback({name}={value!r}) is not allowed: give a number >= 0 (0: off)")
        self.progress_every_s, self.progress_every_steps = progress_every_s, progress_every_steps

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or not any(dkm_parametrization(m) is not None for m in model.modules()):
            raise ConfigError("DKMTrainerCallback: the Trainer's model has no layer prepared for DKM; call "
                              "torchdkm.prepare(model, config) before building the Trainer")
        every_s = self.progress_every_s if args.world_size <= 1 else 0  # see the module docstring
        self.progress = ProgressLog(enabled=state.is_world_process_zero, every_steps=self.progress_every_steps,
                                    every_s=every_s)
        self.log_progress = not sys.stdout.isatty()  # the same on every rank, unlike progress.lines
        with self.progress.phase("DKM k-means init"):
            initialize(model)  # layers restored from a checkpoint are initialised already and keep their centroids
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
        self.progress.begin("DKM", state.max_steps, done=state.global_step, per_step=per_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            dkm_step(model)  # a buffer: Trainer checkpoints keep the schedule's position
        progress = getattr(self, "progress", None)
        if progress is not None and self.log_progress:
            progress.done = state.global_step  # the Trainer's count (it resumes from checkpoints too)
            if progress.due():
                control.should_log = True  # the Trainer logs now: loss, lr, and our progress fields

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if logs is None:
            return
        extra = {}
        progress = getattr(self, "progress", None)
        if progress is not None and self.log_progress and "loss" in logs:  # a training log, not evaluate()'s
            rate = progress.rate()
            extra = {"progress": f"{state.global_step}/{state.max_steps}",
                     "samples_per_second": round(rate * progress.per_step, 3),
                     "eta_s": round((state.max_steps - state.global_step) / rate, 1) if rate > 0 else None}
            progress.last_done, progress.t_last = state.global_step, progress.clock()
        if self.log_stats and model is not None:
            stats = dkm_layer_stats(model)
            if stats:
                extra.update({"dkm_entropy": round(sum(s["entropy"] for s in stats.values()) / len(stats), 4),
                              "dkm_gap": round(sum(s["gap"] for s in stats.values()) / len(stats), 4),
                              "dkm_centroids_used": round(sum(s["used"] for s in stats.values()) /
                                                          sum(s["k"] for s in stats.values()), 4)})
        if not extra:
            return
        logs.update(extra)
        if state.log_history:  # the Trainer appended a copy of ``logs`` before calling us: keep it complete
            state.log_history[-1].update(extra)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.finalize_at_end and model is not None:
            finalize(model)
