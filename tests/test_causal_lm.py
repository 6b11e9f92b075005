"""A causal LM (a tiny random LLaMA, tied embeddings like SmolLM2) end to end: bf16 weights, grouped LUTs with
per-channel scales, label-free distillation from the uncompressed model, save -> from_config + load -> the same
logits -> generate()."""
import copy

import pytest
import torch

import torchdkm
from hf_tiny import tiny_llama_config
from torchdkm import DKMConfig

transformers = pytest.importorskip("transformers")


def _tiny_llama(dtype):
    cfg = tiny_llama_config()
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype), cfg


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_causal_lm_distill_finalize_save_load_generate(tmp_path, dtype):
    model, cfg = _tiny_llama(dtype)
    teacher = copy.deepcopy(model).eval()
    # every Linear and the tied embedding/head (clustered once, read by both)
    torchdkm.prepare(model, DKMConfig(bits=4, group_size=8, channel_scale=True, min_numel=0))
    p = torchdkm.parametrization.dkm_parametrization(model.lm_head)
    assert p is torchdkm.parametrization.dkm_parametrization(model.model.embed_tokens)
    assert p.centroids.dtype == torch.float32  # DKM computes in float32 inside a bf16 model
    ids = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3)
    losses = []
    for _ in range(4):
        with torch.no_grad():
            target = teacher(ids).logits
        loss = torchdkm.distillation_loss(model(ids).logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        torchdkm.step(model)
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert model.model.layers[0].mlp.up_proj.parametrizations.weight.original.dtype == dtype  # trains in its dtype
    model.eval()
    torchdkm.finalize(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    with torch.no_grad():
        logits = model(ids).logits
    path = tmp_path / "lm.safetensors"
    torchdkm.save(model, path, lut_dtype=dtype)
    fresh = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    torchdkm.load(path, fresh)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, logits)
    out = fresh.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11)
    info = torchdkm.inspect_file(path)
    assert info["lut_dtype"] == str(dtype)[6:] and all(r["channel_scale"] for r in info["layers"])
    rep = torchdkm.report(model, lut_dtype_bits=16 if dtype == torch.bfloat16 else 32, print_table=False)
    assert info["totals"]["compressed_bytes"] == pytest.approx(rep.compressed_bytes)
