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
"""
from __future__ import annotations

from ..api import finalize, initialize
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
    """

    def __init__(self, finalize_at_end: bool = False, log_stats: bool = True):
        self.finalize_at_end, self.log_stats = finalize_at_end, log_stats

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or not any(dkm_parametrization(m) is not None for m in model.modules()):
            raise ConfigError("DKMTrainerCallback: the Trainer's model has no layer prepared for DKM; call "
                              "torchdkm.prepare(model, config) before building the Trainer")
        initialize(model)  # layers restored from a checkpoint are initialised already and keep their centroids

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            dkm_step(model)  # a buffer: Trainer checkpoints keep the schedule's position

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if not self.log_stats or model is None or logs is None:
            return
        stats = dkm_layer_stats(model)
        if not stats:
            return
        extra = {"dkm_entropy": round(sum(s["entropy"] for s in stats.values()) / len(stats), 4),
                 "dkm_gap": round(sum(s["gap"] for s in stats.values()) / len(stats), 4),
                 "dkm_centroids_used": round(sum(s["used"] for s in stats.values()) /
                                             sum(s["k"] for s in stats.values()), 4)}
        logs.update(extra)
        if state.log_history:  # the Trainer appended a copy of ``logs`` before calling us: keep it complete
            state.log_history[-1].update(extra)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.finalize_at_end and model is not None:
            finalize(model)
