"""DKM fine-tuning of a causal LM by distillation from its uncompressed self (label-free), for benchmarks/llm/llm.py.

The student is the model prepared with torchdkm (every Linear of the decoder; lm_head and the tied embedding
stay as they are); the teacher is the fp32 model. Loss: KL(teacher || student) per token
(torchdkm.distillation_loss, T = 1) on windows of the training text; AdamW, cosine learning rate, the DKM
temperature schedule advanced every step; then finalize.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, Optional

import torch
from torch import nn

import torchdkm


def distill_dkm(model: nn.Module, teacher: nn.Module, train_ids: torch.Tensor, config: torchdkm.DKMConfig,
                rules: dict, *, steps: int, batch: int, seq: int, lr: float, seed: int = 0,
                log: Optional[Callable[[str], None]] = None) -> Dict[str, float]:
    """Prepare ``model`` in place, fine-tune it ``steps`` steps on random windows of ``train_ids`` (1-D token ids)
    against ``teacher``'s token distributions, finalize it; returns {layer name: stored bits (LUTs, scales at
    16 bits)} and leaves per-step losses in ``model._distill_log``."""
    torchdkm.prepare(model, config, rules=rules)
    torchdkm.initialize(model)
    teacher.eval()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        t0 = time.perf_counter()
        starts = torch.randint(0, train_ids.numel() - seq, (batch,), generator=gen)
        ids = torch.stack([train_ids[s:s + seq] for s in starts.tolist()])
        with torch.no_grad():
            target = teacher(ids).logits
        loss = torchdkm.distillation_loss(model(ids).logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        torchdkm.step(model)
        losses.append(float(loss.detach()))
        if log is not None:
            log(f"  step {step + 1}/{steps}: KL {losses[-1]:.4f} ({time.perf_counter() - t0:.1f} s)")
    model.eval()
    torchdkm.finalize(model)
    model._distill_log = losses
    return {r.name: r.stored_bits for r in torchdkm.report(model, lut_dtype_bits=16, print_table=False).layers}
