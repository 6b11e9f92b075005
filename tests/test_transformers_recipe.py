"""Recipes with a Hugging Face model (model.transformers) and text data: a tiny BERT built in the test (no
download), its tokenizer, text from a user function; the artifact reloads into a plain transformers model."""
import json

import pytest
import torch

pytest.importorskip("transformers")

import torchdkm  # noqa: E402
from torchdkm.app.job import compress  # noqa: E402
from torchdkm.app.recipe import parse_recipe  # noqa: E402
from torchdkm.errors import ConfigError  # noqa: E402

RECIPE = """
model:
  transformers: tiny              # a folder next to the recipe
  max_length: 8
data:
  name: hf_tiny:texts             # returns ((texts, labels), (texts, labels))
training: {fp32_epochs: 3, epochs: 2, batch_size: 16, lr: 0.003}
compression: {bits: 2, min_numel: 1000}
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import hf_tiny

    root = tmp_path_factory.mktemp("hf")
    hf_tiny.make_tiny_bert(root / "tiny")
    (root / "r.yaml").write_text(RECIPE)
    return root, compress(root / "r.yaml", root / "out")


def test_tiny_bert_recipe_trains_compresses_and_reports_every_layer(tiny_run):
    root, result = tiny_run
    acc = result["accuracy"]
    assert acc["fp32"] >= 0.9 and acc["final"] >= 0.9  # the 3 word groups are easy; chance is 1/3
    names = [row["name"] for row in result["size"]["layers"]]
    assert "bert.embeddings.position_embeddings" in names and "bert.encoder.layer.1.output.dense" in names
    assert "classifier" not in names  # 96 weights < min_numel
    assert result["model"] == "tiny" and result["size"]["factor"] > 5
    md = (root / "out" / "report.md").read_text()
    assert "| bert.encoder.layer.0.attention.self.query | Linear | [32, 32] | 2 | 1 | 1024 |" in md
    rows = [json.loads(line) for line in (root / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["dkm"]["bert.encoder.layer.0.intermediate.dense"]["k"] == 4


def test_artifact_loads_into_a_plain_transformers_model_with_identical_outputs(tiny_run):
    import hf_tiny
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    root, _ = tiny_run
    cfg = AutoConfig.from_pretrained(root / "tiny", local_files_only=True)
    model = torchdkm.load(root / "out" / "model.safetensors", AutoModelForSequenceClassification.from_config(cfg))
    model.eval()
    tok = AutoTokenizer.from_pretrained(root / "tiny", local_files_only=True)
    (_, _), (texts, labels) = hf_tiny.texts()
    enc = tok(texts, max_length=8, truncation=True, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    acc = (logits.argmax(1) == torch.tensor(labels)).float().mean().item()
    assert acc == pytest.approx(json.loads((root / "out" / "report.json").read_text())["accuracy"]["final"])
    assert torch.unique(model.bert.encoder.layer[0].output.dense.weight).numel() <= 4


def test_transformers_model_section_is_validated(tmp_path):
    base = {"data": {"name": "bbc_news"}}
    r = parse_recipe(dict(base, model={"transformers": "org/name", "max_length": 64}))
    assert r.model.is_transformers and r.model.max_length == 64 and r.model.task == "sequence-classification"
    for model, words in [({"transformers": "x", "task": "token-classification"}, "sequence-classification"),
                         ({"transformers": "x", "max_length": 0}, "integer >= 1"),
                         ({"transformers": "x", "name": "mlp"}, "unknown key"),
                         ({"transformers": ""}, "local model folder")]:
        with pytest.raises(ConfigError, match=words):
            parse_recipe(dict(base, model=model))


def test_a_model_not_found_offline_says_where_it_looked(tmp_path):
    from torchdkm.app.build import build_model

    r = parse_recipe({"model": {"transformers": "no-such-org/no-such-model"}, "data": {"name": "bbc_news"}},
                     folder=str(tmp_path))
    with pytest.raises(ConfigError, match=r"cannot load it offline: not a folder \(looked at .*no-such-model"):
        build_model(r.model, r.folder, 3)


def test_image_data_with_a_text_model_is_refused():
    from torchdkm.app.build import build_data

    r = parse_recipe({"model": {"transformers": "x"}, "data": {"name": "digits"}})
    with pytest.raises(ConfigError, match="'digits' is images, but the model is a transformers text model"):
        build_data(r.data, text=True)
