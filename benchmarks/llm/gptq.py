"""GPTQ (Frantar et al., ICLR 2023) for benchmarks/llm/llm.py: a post-training baseline, not a library feature.

Each Linear's weight W (out × in) is quantized one input column at a time on the same grid as RTN
(lm_common.rtn_grid: uniform asymmetric min-max per group of g consecutive input weights, fp16 scale and zero);
the rounding error of a column is spread over the columns not yet quantized through the inverse Hessian
H = X^T X of the layer's inputs, so that X W^T changes least. The grid of a group is fixed when its first column is
reached, from the columns as updated so far. Lazy block updates (128 columns), damping 1 % of the mean diagonal,
no activation reordering: the paper's reference configuration with groups.

Layers run in order (the paper's "sequential" mode): the calibration windows go through decoder layer l with the
layers before it already quantized; all Linears of a layer get their Hessians from one pass with the layer still
in full precision, are quantized, and the layer's quantized outputs feed layer l + 1.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import nn

import lm_common as lm


@torch.no_grad()
def gptq_weight(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, damp: float = 0.01,
                block: int = 128) -> torch.Tensor:
    """GPTQ of ``w`` (out × in) given ``hessian`` (in × in, X^T X up to a factor); same shape and dtype as w.

    Every group of ``group_size`` input weights of a row ends up on its own 2^bits-level grid (as
    lm_common.rtn_weight; a shorter last group where group_size does not divide in)."""
    if block % group_size:
        raise ValueError(f"group_size {group_size} must divide the block of {block} columns")
    W = w.detach().float().clone()
    in_f = W.shape[1]
    H = hessian.detach().double().clone()
    dead = H.diagonal() == 0  # inputs that never fire: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damp * H.diagonal().mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    Q = torch.empty_like(W)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1, err = W[:, i1:i2].clone(), torch.empty(W.shape[0], i2 - i1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if i % group_size == 0:  # groups start inside this block (group_size divides block)
                scale, zero = lm.rtn_grid(W1[:, i:i + group_size], bits)
            q = lm.rtn_round(W1[:, i:i + 1], scale, zero, bits)[:, 0]
            Q[:, i1 + i] = q
            e = (W1[:, i] - q) / h1[i, i]
            W1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err[:, i] = e
        W[:, i2:] -= err @ hinv[i1:i2, i2:]
    return Q.to(w.dtype)


@torch.no_grad()
def gptq_quantize_(model: nn.Module, calib_ids: torch.Tensor, bits: int, group_size: int, batch: int = 8,
                   log: Optional[Callable[[str], None]] = None) -> Dict[str, int]:
    """GPTQ every Linear of the decoder layers of a Hugging Face causal LM (``model.model.layers``) in place,
    calibrated on ``calib_ids`` (n × seq token ids; n a multiple of ``batch``); lm_head and the embedding are not
    touched. Returns {layer name: stored bits} (indices + fp16 scale and zero per group, as RTN)."""
    if calib_ids.shape[0] % batch:
        raise ValueError(f"{calib_ids.shape[0]} calibration windows: use a multiple of batch {batch}")
    layers = model.model.layers
    xs, kw = _layer0_inputs(model, calib_ids, batch)
    prefix = {m: n for n, m in model.named_modules()}
    out: Dict[str, int] = {}
    for li, layer in enumerate(layers):
        lins = {prefix[m]: m for m in layer.modules() if isinstance(m, nn.Linear)}
        hess = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in lins.items()}

        def accumulate(name):
            def hook(_mod, inp, _out):
                x = inp[0].reshape(-1, inp[0].shape[-1]).double()
                hess[name] += x.T @ x
            return hook

        hooks = [m.register_forward_hook(accumulate(n)) for n, m in lins.items()]
        for x in xs:
            layer(x, **kw)
        for h in hooks:
            h.remove()
        for n, m in lins.items():
            m.weight.copy_(gptq_weight(m.weight, hess[n], bits, group_size))
            out[n] = lm.rtn_layer_bits(m.weight.shape, bits, group_size)
        xs = [layer(x, **kw) for x in xs]
        if log is not None:
            log(f"  GPTQ layer {li + 1}/{len(layers)}")
    return out


def _layer0_inputs(model: nn.Module, ids: torch.Tensor, batch: int):
    """The hidden states entering decoder layer 0 for each batch of ``ids``, and the keyword arguments the model
    passes every layer (mask, rotary embeddings, positions; the same for equal-shaped batches)."""
    xs, kw = [], {}

    class _Caught(Exception):
        pass

    def catch(_mod, args, kwargs):
        xs.append(args[0] if args else kwargs["hidden_states"])
        kw.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Caught

    hook = model.model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for s in range(0, ids.shape[0], batch):
            try:
                model(ids[s:s + batch], use_cache=False)
            except _Caught:
                pass
    finally:
        hook.remove()
    return xs, kw
