"""``torchdkm compress``: the end-to-end job a recipe describes.

    fp32 epochs (optional) -> prepare -> k-means init -> DKM epochs -> finalize -> artifact, report, plots

Classifiers are evaluated by test accuracy (summary keys ``acc_*``), causal language models (torchdkm.app.lm) by
held-out perplexity (``ppl_*``), at the same points: fp32, k-means init, every epoch, after finalize.

When stdout is not a terminal (a log file, a pipe) the progress bars are off and torchdkm._progress prints a
plain line instead, every ``progress.every_s`` seconds or ``every_steps`` steps (step/total, loss, throughput, ETA);
the set-up phases in between (evaluations, k-means init, BatchNorm re-estimation, finalize) announce themselves and
say how long they took.

Every epoch ends with an atomic checkpoint (model incl. DKM centroids, optimizer, schedule, RNG states,
metrics so far). Data order depends only on (seed, epoch), so ``resume=True`` continues a killed run and
ends with the same weights as an uninterrupted one; ``resume="auto"`` does when there is a checkpoint, else
starts (torchdkm.app.resume: the one command line for torchrun's elastic restarts).

Under ``torchrun`` each rank takes ``batch_size / world_size`` samples of every global batch (the same
global batches as one process), gradients are averaged by DistributedDataParallel, and only rank 0
evaluates, writes files and shows progress.

With ``distributed: {strategy: fsdp}`` the model is instead sharded in place by FSDP2's ``fully_shard`` for each
phase (after prepare and the k-means init). A sharded model can neither be evaluated by rank 0 alone (its
forward is a collective) nor finalized, so every process keeps an unsharded copy: at each epoch's end all ranks
gather the full state dict (and the optimizer's) into rank 0's copy, which is evaluated and checkpointed; after
a phase's last epoch every rank's copy gets it and training, finalize and the outputs go on from that copy.

A failure on one rank stops all of them with the same error (torchdkm.app.distributed.agree): a refused
folder, a NaN/inf loss (checked on every rank before the backward's all-reduce), a failed checkpoint or artifact
write on rank 0. A rank that hangs or dies turns into a DistributedError on the others (torchdkm.app.faults).
"""
from __future__ import annotations

import copy
import math
import random
import sys
import time
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler

from .._progress import ProgressLog
from ..api import finalize, initialize, prepare
from ..config import DKMConfig
from ..distill import distillation_loss
from ..errors import ConfigError, NonFiniteError, TorchDKMError, WriteError
from ..export.coreml import check_layers
from ..parametrization import is_dtensor
from ..stats import dkm_layer_stats, weights_and_centroids
from ..training import recalibrate_batchnorm, soft_weights
from ..training import step as dkm_step
from . import distributed as D
from .build import build_data, build_model, build_optimizer, build_scheduler
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .faults import first_non_finite_output, lost_peers
from .outputs import write_metrics, write_outputs
from .recipe import Recipe, load_recipe
from .resume import checkpoint_to_resume, run_id

RESULT_FILES = ("report.json", CHECKPOINT_NAME)


class Job:
    """One run of a recipe into ``out_dir``; :meth:`run` does everything and returns the report dict."""

    def __init__(self, recipe: Recipe, out_dir, resume: Union[bool, str] = False, recipe_path: Optional[str] = None):
        self.recipe, self.t = recipe, recipe.training
        self.out = Path(out_dir)
        self.resume = resume
        self.recipe_path = recipe_path or "RECIPE"
        self.ckpt_path = self.out / CHECKPOINT_NAME
        self.metrics: list = []
        self.summary: dict = {}
        self.saved_at: Optional[str] = None  # "phase epoch" of the last checkpoint written, for Ctrl-C
        self.where = "set-up"  # the step (or phase) the run is at: named when a rank is lost
        self.teacher: Optional[nn.Module] = None  # the fp32 model, with training.distill > 0
        self.lm = recipe.model.is_causal_lm
        self.metric = "ppl" if self.lm else "acc"  # what _evaluate measures: perplexity or accuracy
        # fsdp checkpoints the optimizer keyed by parameter name (with one process too, so any number resumes)
        self.fsdp = recipe.distributed.strategy == "fsdp"

    # ------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        self.ctx = D.setup(self.t.device, self.recipe.distributed.strategy, self.recipe.distributed.timeout_s)
        p = self.recipe.progress
        self.progress = ProgressLog(enabled=self.ctx.is_main, every_steps=p.every_steps, every_s=p.every_s)
        try:
            return self._run()
        except KeyboardInterrupt:
            if self.ctx.is_main:
                where = f"after {self.saved_at}" if self.saved_at else "none written in this run"
                cmd = f"torchdkm compress {self.recipe_path} --out {self.out} --resume"
                print(f"\ninterrupted. Last checkpoint: {self.ckpt_path} ({where}); it is intact.\n"
                      f"Resume with:  {cmd}" + ("  (with the same torchrun prefix)" if self.ctx.distributed else ""),
                      file=sys.stderr, flush=True)
            raise
        except RuntimeError as e:  # a collective failed: a rank hung past distributed.timeout_s, or died
            lost = lost_peers(e, self.ctx.rank, self.recipe.distributed.timeout_s, self.where, self._resume_hint()) \
                if self.ctx.distributed and not isinstance(e, TorchDKMError) else None
            if lost is None:
                raise
            raise lost from e
        finally:
            D.teardown(self.ctx)

    def _elapsed(self) -> float:
        """Seconds of work so far, over every session of this run (a resumed run adds its own)."""
        return self.prior_s + time.perf_counter() - self.t0

    def _run(self) -> dict:
        self.t0, self.prior_s = time.perf_counter(), 0.0
        ckpt = self._check_out_dir()  # a collective: every rank knows whether it resumes before rank 0 writes
        _seed_everything(self.t.seed)
        spec, folder = self.recipe.model, self.recipe.folder
        num_labels = None
        self.extra_tests = {}  # causal-lm: {corpus label: held-out ids} of data.extra_test
        corpora = [self.recipe.data.label] + [f"{e.label} (extra test)" for e in self.recipe.data.extra_test]
        with self.progress.phase(f"loading data ({', '.join(corpora)})"):
            if self.lm:
                from .lm import lm_datasets, lm_extra_tests

                train, test = lm_datasets(spec, self.recipe.data, folder)  # windows; held-out ids (N,)
                self.extra_tests = lm_extra_tests(spec, self.recipe.data, folder)
            else:
                train, test = build_data(self.recipe.data, folder, text=spec.is_transformers)
            if spec.is_transformers and not self.lm:
                from .hf import text_datasets

                train, test, num_labels = text_datasets(spec, train, test, folder)
        self.train_set, self.test_set = train, test
        with self.progress.phase(f"loading the model ({spec.transformers or spec.name})"):
            model = build_model(spec, folder, num_labels).to(self.ctx.device)
        if self.t.batch_size % self.ctx.world_size:
            raise ConfigError(f"training.batch_size={self.t.batch_size} is the global batch and must split evenly "
                              f"across {self.ctx.world_size} ranks; give a multiple of {self.ctx.world_size}")
        if len(train) < self.t.batch_size:
            what = f"{len(train)} windows of {spec.max_length} tokens" if self.lm else f"{len(train)} samples"
            raise ConfigError(f"training.batch_size={self.t.batch_size} is larger than the training set "
                              f"({what}); give a smaller batch")
        if ckpt is not None:
            self.metrics, self.summary = ckpt["metrics"], ckpt["summary"]
            self.prior_s = self.summary.get("elapsed_s", 0.0)

        # phase 1: plain training
        fp32_ckpt = ckpt if ckpt is not None and ckpt["phase"] == "fp32" else None
        if fp32_ckpt is not None:
            model.load_state_dict(fp32_ckpt["model"])
        if ckpt is None or fp32_ckpt is not None:
            model = self._train_phase(model, "fp32", self.t.fp32_epochs, self.t.fp32_lr or self.t.lr, fp32_ckpt)
            with self.progress.phase("fp32 evaluation"):
                self.summary[f"{self.metric}_fp32"] = self._evaluate(model)[1]
                self._evaluate_extra(model, "fp32")

        # phase 2: DKM fine-tuning
        comp = self.recipe.compression
        if self.t.distill > 0:  # the fp32 model as it enters compression; kept in DKM checkpoints for resume
            self.teacher = copy.deepcopy(model).eval()
            if ckpt is not None and "teacher" in ckpt:
                self.teacher.load_state_dict(ckpt["teacher"])
            self.teacher.requires_grad_(False)
        dkm_steps = self.t.epochs * self._steps_per_epoch()
        rules = comp.rules if comp.budget is None else self._planned_rules(model, ckpt)
        prepare(model, _with_schedule(comp.config, dkm_steps), {k: _with_schedule(c, dkm_steps) if c else c
                                                                 for k, c in rules.items()})
        if comp.coreml:  # before any training step: a layout Core ML cannot read fails here, not at export
            check_layers(model)
        dkm_ckpt = ckpt if ckpt is not None and ckpt["phase"] == "dkm" else None
        if dkm_ckpt is not None:
            model.load_state_dict(dkm_ckpt["model"])
        else:
            with self.progress.phase("k-means init"):
                initialize(model)  # k-means now, deterministically on every rank, before DDP sees the model
            with self.progress.phase("evaluation after k-means init"):
                self.summary[f"{self.metric}_kmeans_init"] = self._evaluate(model)[1]
        model = self._train_phase(model, "dkm", self.t.epochs, self.t.lr, dkm_ckpt)
        if self.metrics and self.metrics[-1]["phase"] == "dkm":  # after DKM, hard clusters, before finalize
            self.summary[f"{self.metric}_dkm"] = self.metrics[-1][f"test_{self.metric}"]
        if self.t.bn_recal_batches and self.t.epochs:
            self._recalibrate_bn(model)

        # finish: snap to centroids, check ranks agree, write everything
        with self.progress.phase("finalize"):
            snapshot = weights_and_centroids(model) if self.ctx.is_main else {}
            mismatch = D.rank_disagreement(model, self.ctx)
            finalize(model)
            mismatch += D.rank_disagreement(model, self.ctx)
        with self.progress.phase("final evaluation"):
            test_loss, value = self._evaluate(model)
            self._evaluate_extra(model, "final")
        self.summary.update({f"{self.metric}_final": value, "test_loss_final": test_loss,
                             "wall_time_s": self._elapsed()})
        result, error = {}, None
        self.where = "writing the outputs"
        if self.ctx.is_main:
            dist_info = {"world_size": self.ctx.world_size, "ranks_identical": not mismatch,
                         "mismatched": sorted(set(mismatch))}
            try:
                result = write_outputs(self.out, model, self.recipe, self.metrics, self.summary, snapshot, dist_info)
            except WriteError as e:  # the previous file (if any) is intact, and so is the last checkpoint
                error = WriteError(f"{e}. {self._resume_hint()}")
        D.agree(error, self.ctx)
        return result

    # ------------------------------------------------------------------------------------------------
    def _check_out_dir(self) -> Optional[dict]:
        """The checkpoint to resume from (or None). Rank 0 reads the folder and decides (torchdkm.app.resume);
        every rank gets the decision, and a refusal is raised on every rank, before any other collective."""
        ctx = self.ctx
        decide = lambda: checkpoint_to_resume(self.out, self.ckpt_path, RESULT_FILES, self.recipe.raw,  # noqa: E731
                                              self.resume)
        ckpt = D.check_on_every_rank(decide if ctx.is_main else lambda: None, ctx)
        if not D.broadcast_object(ckpt is not None, ctx):
            return None
        if not ctx.is_main:  # the same file rank 0 read (--out is shared by every rank); a failure stops all
            ckpt = D.check_on_every_rank(lambda: load_checkpoint(self.ckpt_path), ctx)
        else:
            D.check_on_every_rank(lambda: None, ctx)
        if ckpt["world_size"] != ctx.world_size and ctx.is_main:
            print(f"note: resuming a {ckpt['world_size']}-process run with {ctx.world_size} process(es); the global "
                  f"batches are the same", file=sys.stderr)
        self.saved_at = f"{ckpt['phase']} epoch {ckpt['epoch']}"
        return ckpt

    def _train_phase(self, model: nn.Module, phase: str, epochs: int, lr: float, ckpt: Optional[dict]) -> nn.Module:
        """Train ``model`` for the phase's epochs; returns the model to go on with: ``model`` itself, or under fsdp
        its unsharded copy holding the trained weights (``model`` is left sharded)."""
        if epochs == 0:
            return model
        ctx, t = self.ctx, self.t
        # The same global batches for any world size: DistributedSampler deals every rank a strided slice of
        # one (seed + epoch) permutation; with drop_last and a batch that is a multiple of the world size,
        # step s of all ranks together covers exactly samples [s*B, (s+1)*B) of that permutation.
        sampler = DistributedSampler(self.train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                     seed=t.seed, drop_last=True)
        loader = DataLoader(self.train_set, batch_size=t.batch_size // ctx.world_size, sampler=sampler,
                            drop_last=True)
        steps = len(loader)
        full = copy.deepcopy(model) if ctx.sharded else model  # taken before fully_shard changes model in place
        net = D.wrap(model, ctx)
        opt = build_optimizer(model.parameters(), t, lr)  # after wrap: fully_shard replaces the parameters
        sched = build_scheduler(opt, t, epochs * steps)
        start = 0
        if ckpt is not None:
            if self.fsdp:
                D.load_optimizer_state(model, opt, ckpt["optimizer"])
            else:
                opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            set_rng_state(ckpt["rng"])
            start = ckpt["epoch"]
        epoch_offset = 0 if phase == "fp32" else t.fp32_epochs  # data order keyed by the run's global epoch
        show = ctx.is_main and sys.stdout.isatty()
        label = "fp32" if phase == "fp32" else "DKM"
        from tqdm.auto import tqdm

        bar = tqdm(range(start, epochs), desc=f"{label} epochs", initial=start, total=epochs, disable=not show)
        per_step = t.batch_size * (self.recipe.model.max_length if self.lm else 1)  # global: every rank's batch
        self.progress.begin(label, epochs * steps, done=start * steps, per_step=per_step,
                            unit="tokens" if self.lm else "samples")
        for epoch in bar:
            sampler.set_epoch(epoch_offset + epoch)
            net.train()
            t_epoch = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
            correct = torch.zeros((), dtype=torch.float64, device=ctx.device)
            predicted = 0  # samples (classifier) or next tokens (causal LM) this rank scored
            for step, (x, y) in enumerate(tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not show)):
                x, y = _to(x, ctx.device), y.to(ctx.device)
                where = self.where = f"{label} epoch {epoch + 1}, step {step + 1} of {steps}"
                opt.zero_grad(set_to_none=True)
                failure = None
                try:
                    logits = self._forward(net, x)
                    loss = self._loss(logits, x, y, distill=phase == "dkm" and self.teacher is not None)
                    if not bool(torch.isfinite(loss)):
                        failure = self._non_finite(f"at {where}: the loss is {float(loss.detach())}"
                                                   f"{self._culprit(model, x)}")
                except NonFiniteError as e:  # a DKM layer refused a NaN/inf weight: say when
                    failure = self._non_finite(f"at {where}: {e}")
                # every rank learns of a failure on any rank here, before the backward's all-reduce, which the
                # failing rank would never join (nccl would wait for the timeout); one 1-element all-reduce
                D.agree(failure, ctx)
                loss.backward()
                opt.step()
                sched.step()
                if phase == "dkm":
                    dkm_step(model)  # the temperature schedule's clock (a buffer: checkpointed with the model)
                loss_sum += loss.detach()
                self.progress.step(loss, note=f"epoch {epoch + 1}/{epochs}")
                hits, n = self._correct(logits.detach(), y)
                correct += hits
                predicted += n
            bad = _first_non_finite(model)  # the last step's update may have broken a weight: never checkpoint it
            D.agree(self._non_finite(f"after {label} epoch {epoch + 1} (step {steps}): {bad} is non-finite")
                    if bad else None, ctx)  # fsdp: each rank checks its own shard
            self.where = f"the end of {label} epoch {epoch + 1}"
            train_loss = D.mean_over_ranks(float(loss_sum) / steps, ctx)
            train_acc = D.mean_over_ranks(float(correct) / predicted, ctx)
            row = {"phase": phase, "epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc,
                   "lr": opt.param_groups[0]["lr"], "epoch_s": round(time.perf_counter() - t_epoch, 3)}
            opt_state = self._gather(model, full, opt, everywhere=epoch + 1 == epochs)
            error = None
            if ctx.is_main:
                m = self.metric
                with self.progress.phase(f"{label} epoch {epoch + 1} evaluation", kind="evaluation"):
                    row["test_loss"], row[f"test_{m}"] = self._evaluate(full)
                    if phase == "dkm":
                        with soft_weights(full):  # the same network with its soft weights A·C: the gap to close
                            row["test_loss_soft"], row[f"test_{m}_soft"] = self._evaluate(full)
                        stats = dkm_layer_stats(full)
                        row["dkm"] = stats
                        for key in ("entropy", "gap"):
                            row[f"mean_{key}"] = sum(s[key] for s in stats.values()) / max(len(stats), 1)
                self.metrics.append(row)
                try:
                    self._save(phase, epoch + 1, full, opt_state, sched)
                except WriteError as e:  # a full disk: the previous checkpoint is intact; say so on every rank
                    error = WriteError(f"{e}; the run stopped after {label} epoch {epoch + 1}. {self._resume_hint()}")
                if error is None:
                    tqdm_write(_epoch_line(label, epoch + 1, epochs, row, m))
            D.agree(error, ctx)  # the others would otherwise wait in the next epoch's first all-reduce
            self.saved_at = f"{phase} epoch {epoch + 1}"  # every rank's errors name the checkpoint rank 0 wrote
            model.train()
        return full

    def _gather(self, model: nn.Module, full: nn.Module, opt, everywhere: bool) -> Optional[dict]:
        """At an epoch's end: under fsdp, the sharded ``model``'s whole state into the unsharded ``full`` (rank 0's
        only, unless ``everywhere``; a collective, so every rank calls it). Returns the optimizer state to
        checkpoint (rank 0; None elsewhere under ddp, where only rank 0 asks)."""
        if self.ctx.sharded:
            state = D.full_model_state(model, everywhere)
            if state:
                full.load_state_dict(state)
            return D.full_optimizer_state(model, opt)
        if self.fsdp:  # one process: nothing sharded, but the checkpoint keeps fsdp's name-keyed format
            return D.full_optimizer_state(model, opt)
        return opt.state_dict() if self.ctx.is_main else None

    def _planned_rules(self, model: nn.Module, ckpt: Optional[dict]) -> dict:
        """compression.budget: the planner's rules for the model entering compression. Planned once, on rank 0,
        and broadcast; kept in the summary (so in every checkpoint), so a resumed run trains the same plan."""
        from .budget import layouts_of, plan_for_recipe, planned_rules

        comp = self.recipe.compression
        layouts = (ckpt or {}).get("summary", {}).get("plan", {}).get("layouts")
        if layouts is None:
            def planned():
                if not self.ctx.is_main:
                    return None
                with self.progress.phase(f"planning for compression.budget={comp.budget.size}"):
                    p = plan_for_recipe(model, comp.rules, comp.budget, self.train_set)
                tqdm_write(p.table())
                return {"layouts": layouts_of(p), **p.to_dict()}

            # a refusal (e.g. a budget below the smallest model) stops every rank with rank 0's message
            found = D.broadcast_object(D.check_on_every_rank(planned, self.ctx), self.ctx)
            self.summary["plan"] = found
            layouts = found["layouts"]
        return planned_rules(layouts, comp.config, comp.rules)

    def _steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, as _train_phase's loader makes them (drop_last, batch split over ranks)."""
        per_rank = len(self.train_set) // self.ctx.world_size
        return per_rank // (self.t.batch_size // self.ctx.world_size)

    def _recalibrate_bn(self, model: nn.Module) -> None:
        """BatchNorm statistics of the hard weights, from the first training batches (rank 0's order)."""
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            return  # nothing to re-estimate (and nothing to announce)
        loader = DataLoader(self.train_set, batch_size=self.t.batch_size, shuffle=False)
        with self.progress.phase("BatchNorm re-estimation"):
            n = recalibrate_batchnorm(model, (_to(x, self.ctx.device) for x, _ in loader),
                                      forward=self._forward, max_batches=self.t.bn_recal_batches)
        if n and self.ctx.is_main:
            with self.progress.phase("evaluation after BatchNorm re-estimation"):
                loss, value = self._evaluate(model)
            self.summary.update({f"{self.metric}_after_bn_recal": value, "bn_recal_batches": n})
            tqdm_write(f"BatchNorm statistics re-estimated on {n} batches under the hard weights: test "
                       f"{_metric_text(self.metric, value)}")

    def _culprit(self, model: nn.Module, x) -> str:
        """Where a non-finite loss came from: the first layer with a NaN/inf output (not under fsdp, where a
        forward is a collective), else the first non-finite weight or centroid."""
        found = "" if self.ctx.sharded else first_non_finite_output(model, self._forward, x)
        return found or _first_non_finite(model, " (first non-finite tensor: {})")

    def _resume_hint(self) -> str:
        """What the last checkpoint allows, for an error that stops the run."""
        if not self.saved_at:
            return "no checkpoint was written in this run"
        return (f"the last checkpoint {self.ckpt_path} (after {self.saved_at}) is intact: `torchdkm compress "
                f"{self.recipe_path} --out {self.out} --resume auto` continues from it")

    def _non_finite(self, what: str) -> NonFiniteError:
        """The error that stops a run gone NaN/inf: what, where, and the last good checkpoint (never overwritten)."""
        if self.saved_at:
            ckpt = (f"the last good checkpoint {self.ckpt_path} (after {self.saved_at}) is intact and "
                    f"`torchdkm compress {self.recipe_path} --out {self.out} --resume` continues from it (the same "
                    f"recipe and data lead to the same step again: to change training.lr, start a new --out folder)")
        else:
            ckpt = "no checkpoint was written in this run"
        return NonFiniteError(f"the run stopped {what}; {ckpt}")

    def _save(self, phase, epoch, model, opt_state, sched) -> None:
        self.summary["elapsed_s"] = self._elapsed()
        state = {"phase": phase, "epoch": epoch, "model": model.state_dict(), "optimizer": opt_state,
                 "scheduler": sched.state_dict(), "rng": rng_state(), "metrics": self.metrics,
                 "summary": self.summary, "recipe": self.recipe.raw, "world_size": self.ctx.world_size,
                 "run_id": run_id()}  # a torchrun restart of the same job resumes from it (torchdkm.app.resume)
        if phase == "dkm" and self.teacher is not None:
            state["teacher"] = self.teacher.state_dict()
        save_checkpoint(self.ckpt_path, state, keep=self.t.keep_checkpoints)
        write_metrics(self.out, self.metrics)
        self.saved_at = f"{phase} epoch {epoch}"

    def _forward(self, model, x):
        """Logits of one batch: (B, C) for a classifier, (B, L, V) for a causal LM."""
        if self.lm:
            from .lm import lm_forward

            return lm_forward(model, x)
        return _logits(model, x)

    def _loss(self, logits, x, y, distill: bool):
        """(1-w) task loss + w KL(teacher || student), w = training.distill (only the KL when w = 1)."""
        w = self.t.distill if distill else 0.0
        loss = 0.0
        if w < 1:
            if self.lm:
                from .lm import next_token_loss

                loss = next_token_loss(logits, y)
            else:
                loss = F.cross_entropy(logits, y)
        if w > 0:
            with torch.no_grad():
                t_logits = self._forward(self.teacher, x)
            kd = distillation_loss(logits, t_logits, temperature=self.t.distill_temperature)
            loss = (1 - w) * loss + w * kd
        return loss

    def _correct(self, logits, y):
        """(right predictions, predictions): samples for a classifier, next tokens for a causal LM."""
        if self.lm:
            from .lm import next_token_correct

            return next_token_correct(logits, y)
        return int((logits.argmax(1) == y).sum()), len(y)

    def _evaluate_extra(self, model: nn.Module, point: str) -> None:
        """Perplexity on every data.extra_test corpus into summary["extra_ppl"][label][point]; rank 0 only."""
        if not self.ctx.is_main or not self.extra_tests:
            return
        from .lm import perplexity

        extra = self.summary.setdefault("extra_ppl", {})
        for label, ids in self.extra_tests.items():
            _, ppl, count = perplexity(model, ids, self.recipe.model.max_length, self.t.eval_batch_size,
                                       self.ctx.device)
            extra.setdefault(label, {"eval_tokens": count})[point] = ppl

    @torch.no_grad()
    def _evaluate(self, model: nn.Module):
        """(mean test loss, test accuracy | perplexity) in eval mode (DKM layers use hard clusters); rank 0 only."""
        if not self.ctx.is_main:
            return math.nan, math.nan
        if self.lm:
            from .lm import perplexity

            nll, ppl, count = perplexity(model, self.test_set, self.recipe.model.max_length,
                                         self.t.eval_batch_size, self.ctx.device)
            self.summary["eval_tokens"] = count
            return nll, ppl
        was_training = model.training
        model.eval()
        loss, correct, n = 0.0, 0, 0
        for x, y in DataLoader(self.test_set, batch_size=self.t.eval_batch_size):
            x, y = _to(x, self.ctx.device), y.to(self.ctx.device)
            logits = _logits(model, x)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
        model.train(was_training)
        return loss / n, correct / n


def compress(recipe_path, out_dir=None, resume: Union[bool, str] = False, progress_every_s: Optional[float] = None,
             progress_every_steps: Optional[int] = None) -> dict:
    """Run a recipe file; ``out_dir`` defaults to ``runs/<recipe file name>``. Returns the report dict
    (empty on ranks other than 0). ``resume``: False (start; refuse a folder holding a run), True (continue the
    folder's run) or "auto" (continue it if there is one, else start). ``progress_every_s`` / ``_steps``
    override the recipe's progress section."""
    recipe = load_recipe(recipe_path)
    given = {k: v for k, v in (("every_s", progress_every_s), ("every_steps", progress_every_steps)) if v is not None}
    if given:
        from dataclasses import replace

        from .recipe import parse_progress

        recipe = replace(recipe, progress=parse_progress({**(recipe.raw.get("progress") or {}), **given}))
    out = out_dir if out_dir is not None else Path("runs") / Path(recipe_path).stem
    return Job(recipe, out, resume, recipe_path=str(recipe_path)).run()


def _with_schedule(cfg: DKMConfig, steps: int) -> DKMConfig:
    """A config with tau_scale_end but no anneal_steps anneals over all DKM steps of the run."""
    if cfg.tau_scale_end is not None and not cfg.anneal_steps and steps > 0:
        return cfg.replace(anneal_steps=steps)
    return cfg


def tqdm_write(line: str) -> None:
    """One line past the progress bars, flushed: visible at once when stdout is a log file."""
    from tqdm.auto import tqdm

    tqdm.write(line)
    sys.stdout.flush()


def _to(x, device):
    """A batch input (a tensor, or a dict of tensors for a transformers model) on ``device``."""
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


def _logits(model, x):
    """model(x) or model(**x) for a dict input; a transformers output gives its ``.logits``."""
    out = model(**x) if isinstance(x, dict) else model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def _first_non_finite(model: nn.Module, fmt: str = "{}") -> str:
    """'parameter NAME' / 'DKM centroids of layer NAME' of the first NaN/inf tensor (one pass), or ''."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        t = t.to_local() if is_dtensor(t) else t  # fsdp: this rank's shard; no collective, so a failing rank exits
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            kind = "DKM centroids" if name.endswith(".centroids") else "parameter"
            return fmt.format(f"{kind} {name!r}")
    return ""


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _metric_value(metric: str, value: float) -> str:
    """'97.50%' (accuracy) or '23.41' (perplexity)."""
    return f"{value:.2f}" if metric == "ppl" else f"{100 * value:.2f}%"


def _metric_text(metric: str, value: float) -> str:
    """'accuracy 97.50%' or 'perplexity 23.41'."""
    return f"{'perplexity' if metric == 'ppl' else 'accuracy'} {_metric_value(metric, value)}"


def _epoch_line(label: str, epoch: int, epochs: int, row: dict, metric: str = "acc") -> str:
    line = (f"{label} epoch {epoch}/{epochs}: train loss {row['train_loss']:.4f}, "
            f"test {metric} {_metric_value(metric, row[f'test_{metric}'])}, {row['epoch_s']:.1f} s")
    if f"test_{metric}_soft" in row:
        line += f" (soft weights {_metric_value(metric, row[f'test_{metric}_soft'])})"
    if "mean_entropy" in row:
        line += f", attention entropy {row['mean_entropy']:.3f}, soft-hard gap {row['mean_gap']:.3f}"
    return line
