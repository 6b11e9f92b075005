"""benchmarks/llm/lm_common.py on a tiny random Llama built here (no downloads): RTN round trip, perplexity, sizes."""
import math

import pytest
import torch

import lm_common as lm


@pytest.fixture(scope="module")
def tiny_llama():
    """A 2-layer Llama (hidden 64, vocab 100) with lm_head tied to the embedding, like SmolLM2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


# ------------------------------------------------------------------------------------------------ RTN


@pytest.mark.parametrize("bits,group", [(4, 32), (3, 16), (2, 24)])
def test_rtn_levels_and_error(bits, group):
    torch.manual_seed(0)
    w = torch.randn(8, 96)
    q = lm.rtn_weight(w, bits, group)
    assert q.shape == w.shape and q.dtype == w.dtype
    g, gq = w.reshape(8, -1, group), q.reshape(8, -1, group)
    step = (g.amax(-1) - g.amin(-1)) / (2 ** bits - 1)
    for r in range(g.shape[0]):
        for j in range(g.shape[1]):
            assert len(torch.unique(gq[r, j])) <= 2 ** bits
    # round to nearest: at most half a step off (plus fp16 rounding of scale and zero)
    assert ((gq - g).abs() <= step[..., None] * 0.5 + 2e-3 * g.abs().amax()).all()


def test_rtn_recovers_weights_on_its_grid():
    """Weights already fp16-scale * q + fp16-min per group (Q4_1's format) come back exactly."""
    torch.manual_seed(1)
    q = torch.randint(0, 16, (6, 64)).float()
    q[:, ::32] = 0
    q[:, 1::32] = 15  # every group uses both grid ends, as Q4_1's min-max quantizer does
    s = (torch.rand(6, 2, 1) * 0.01 + 1e-3).half().float()
    z = (torch.randn(6, 2, 1) * 0.05).half().float()
    w = (q.reshape(6, 2, 32) * s + z).reshape(6, 64)
    assert torch.equal(lm.rtn_weight(w, 4, 32), w)
    assert not torch.equal(lm.rtn_weight(w, 3, 32), w)


def test_rtn_ragged_last_group_and_constant_group():
    w = torch.randn(3, 40)
    w[0] = 0.25  # constant row: scale 0, every weight is the zero point
    q = lm.rtn_weight(w, 2, 32)  # groups of 32 and 8
    assert torch.equal(q[0], w[0])
    assert len(torch.unique(q[1, 32:])) <= 4 and len(torch.unique(q[1, :32])) <= 4
    assert lm.rtn_layer_bits((3, 40), 2, 32) == 3 * 40 * 2 + 3 * 2 * 32


def test_rtn_quantize_skips_lm_head_and_embedding(tiny_llama):
    import copy

    m = copy.deepcopy(tiny_llama)
    emb = m.model.embed_tokens.weight.clone()
    layers = lm.quantizable_linears(m)
    assert "lm_head" not in layers and len(layers) == 2 * 7
    before = {n: l.weight.clone() for n, l in layers.items()}
    bits = lm.rtn_quantize_(m, 3, 32)
    assert bits == sum(l.weight.numel() * 3 + l.weight.shape[0] * -(-l.weight.shape[1] // 32) * 32
                       for l in layers.values())
    assert torch.equal(m.model.embed_tokens.weight, emb) and m.lm_head.weight is m.model.embed_tokens.weight
    for n, l in layers.items():
        assert not torch.equal(l.weight, before[n])
        assert torch.equal(l.weight, lm.rtn_weight(l.weight, 3, 32))  # idempotent: already on its grid


# ------------------------------------------------------------------------------------------------ perplexity


def test_perplexity_one_window_matches_hf_loss(tiny_llama):
    ids = torch.randint(0, 100, (48,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_llama(ids[None], labels=ids[None]).loss.exp().item()
    assert lm.perplexity(tiny_llama, ids, window=48) == pytest.approx(ref, rel=1e-5)
    assert lm.perplexity(tiny_llama, torch.cat([ids, ids]), window=48, max_tokens=48) == pytest.approx(ref, rel=1e-5)


def test_perplexity_windows_tail_and_batching(tiny_llama):
    ids = torch.randint(0, 100, (16 * 5 + 7,), generator=torch.Generator().manual_seed(1))
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), 16):  # non-overlapping windows, the 7-token tail is one more
            x = ids[s:s + 16][None]
            nll += tiny_llama(x, labels=x).loss.item() * (x.shape[1] - 1)
            n += x.shape[1] - 1
    assert n == lm.scored_tokens(len(ids), 16) == 5 * 15 + 6
    ref = math.exp(nll / n)
    for batch in (1, 2, 4):
        assert lm.perplexity(tiny_llama, ids, window=16, batch=batch) == pytest.approx(ref, rel=1e-5)
    assert lm.scored_tokens(len(ids), 16, max_tokens=33) == 2 * 15  # the 1-token tail predicts nothing


def test_perplexity_random_model_near_vocab_size(tiny_llama):
    """A random model is close to uniform: perplexity near the vocabulary size, far from 1 or inf."""
    ids = torch.randint(0, 100, (64,), generator=torch.Generator().manual_seed(2))
    assert 50 < lm.perplexity(tiny_llama, ids, window=32) < 200


# ------------------------------------------------------------------------------------------------ sizes, data


def test_model_size_counts_tied_once(tiny_llama):
    n_params = sum(p.numel() for p in tiny_llama.parameters())  # parameters() lists the tied tensor once
    assert lm.model_size_mib(tiny_llama, {}) == pytest.approx(n_params * 2 / lm.MIB)
    layers = lm.quantizable_linears(tiny_llama)
    bits = {n: 1000 for n in layers}
    rest = n_params - sum(l.weight.numel() for l in layers.values())
    assert lm.model_size_mib(tiny_llama, bits) == pytest.approx((1000 * len(layers) / 8 + rest * 2) / lm.MIB)


def test_heldout_split_is_deterministic_and_small():
    titles = [f"Article {i}" for i in range(4000)]
    held = [t for t in titles if lm.heldout_title(t)]
    assert held == [t for t in titles if lm.heldout_title(t)]
    assert 0.03 < len(held) / len(titles) < 0.07


def test_wiki_valid_split_is_disjoint_from_test_and_train_novalid():
    titles = [f"Article {i}" for i in range(4000)]
    held = {t for t in titles if lm.heldout_title(t)}
    valid = {t for t in titles if lm.valid_title(t)}
    assert not held & valid and 0.03 < len(valid) / len(titles) < 0.07
    assert all(lm.title_bucket(t) in range(5, 10) for t in valid)


def test_peak_rss_positive():
    lm.reset_peak_rss()
    assert lm.peak_rss_mib() > 0


def test_llm_benchmark_refuses_fewer_tokens_than_one_window(capsys):
    """A --max-tokens below one window used to fail deep in the model with a reshape error; now argparse says why
    before anything loads."""
    import llm

    with pytest.raises(SystemExit):
        llm.main(["--max-tokens", "128"])
    err = capsys.readouterr().err
    assert "--max-tokens 128" in err and "--window (512)" in err


# ------------------------------------------------------------------------------------------------ GPTQ


def test_gptq_with_an_identity_hessian_is_rtn():
    """No correlation between inputs: nothing to compensate, so GPTQ rounds exactly like RTN."""
    import gptq

    torch.manual_seed(0)
    w = torch.randn(8, 96)
    assert torch.equal(gptq.gptq_weight(w, torch.eye(96), 3, 32), lm.rtn_weight(w, 3, 32))


@pytest.mark.parametrize("bits,group", [(3, 32), (4, 64), (3, 128)])
def test_gptq_beats_rtn_on_correlated_inputs_and_stays_on_a_grid(bits, group):
    import gptq

    torch.manual_seed(0)
    in_f = 160  # 128 + a shorter last group / block
    x = torch.randn(512, 24) @ torch.randn(24, in_f) + 0.1 * torch.randn(512, in_f)  # low-rank inputs
    w = torch.randn(16, in_f)
    q = gptq.gptq_weight(w, x.T @ x, bits, group)
    err = lambda wq: ((x @ (w - wq).T) ** 2).sum().item()  # noqa: E731
    assert err(q) < 0.5 * err(lm.rtn_weight(w, bits, group))
    for s in range(0, in_f, group):
        for row in q[:, s:s + group]:
            assert row.unique().numel() <= 2 ** bits


def test_gptq_layer_inputs_replay_the_model(tiny_llama):
    """The hidden states and keyword arguments caught at layer 0, run through the layers by hand, give the model's
    own logits: what GPTQ calibrates on is what the model computes."""
    import gptq

    ids = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    xs, kw = gptq._layer0_inputs(tiny_llama, ids, batch=2)
    with torch.no_grad():
        for x, part in zip(xs, ids.split(2)):
            for layer in tiny_llama.model.layers:
                x = layer(x, **kw)
            logits = tiny_llama.lm_head(tiny_llama.model.norm(x))
            assert torch.allclose(logits, tiny_llama(part).logits, atol=1e-5)


def test_gptq_quantize_decoder_linears_only_and_closer_than_rtn(tiny_llama):
    import copy

    import gptq

    ids = torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(1))
    g, r = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    bits = gptq.gptq_quantize_(g, ids, 3, 32, batch=4)
    lm.rtn_quantize_(r, 3, 32)
    lins = lm.quantizable_linears(g)
    assert set(bits) == set(lins) and len(lins) == 14  # 7 per decoder layer; lm_head is tied and skipped
    assert all(bits[n] == lm.rtn_layer_bits(m.weight.shape, 3, 32) for n, m in lins.items())
    assert torch.equal(g.model.embed_tokens.weight, tiny_llama.model.embed_tokens.weight)
    for m in lins.values():
        assert all(row.unique().numel() <= 8 for row in m.weight.reshape(-1, 32))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
        mse = lambda m: ((m(ids).logits - ref) ** 2).mean().item()  # noqa: E731
        assert mse(g) < mse(r)


def test_torchao_hqq_rows_lie_on_a_symmetric_grid_per_group(tiny_llama):
    """The llm.py HQQ baseline: every group of 32 input weights holds at most 2^bits values, symmetric steps of
    one fp16 scale (q in [-2^(b-1), 2^(b-1) - 1]); sizes count indices + one 16-bit scale per group."""
    pytest.importorskip("torchao")
    import copy

    import llm

    m = copy.deepcopy(tiny_llama)
    bits = llm.hqq(m, dict(bits=3, group=32))
    lins = lm.quantizable_linears(m)
    assert set(bits) == set(lins)
    for n, mod in lins.items():
        w = mod.weight.reshape(-1, 32)
        assert bits[n] == w.numel() * 3 + w.shape[0] * 16
        for g in w:
            vals = g.unique()
            assert vals.numel() <= 8
            step = vals.abs()[vals != 0].min()  # the scale (some level ±1 is used in a trained-looking group)
            q = g / step
            assert torch.allclose(q, q.round(), atol=1e-3) and q.min() >= -4 - 1e-3 and q.max() <= 3 + 1e-3
    assert not torch.equal(m.model.layers[0].mlp.down_proj.weight, tiny_llama.model.layers[0].mlp.down_proj.weight)
