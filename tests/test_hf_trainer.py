"""DKM in a Hugging Face Trainer (tiny BERT built in the test, no download): prepare -> Trainer.train ->
finalize -> torchdkm.save, reload into a plain model built from the config; Trainer checkpoints keep the
centroids and a resumed run ends where an uninterrupted one does."""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torchdkm  # noqa: E402
from torchdkm import DKMConfig  # noqa: E402
from torchdkm.errors import ConfigError  # noqa: E402
from torchdkm.integrations.hf_trainer import DKMTrainerCallback  # noqa: E402


class _Texts(torch.utils.data.Dataset):
    def __init__(self, tok, texts, labels):
        self.enc = tok(texts, max_length=8, truncation=True, padding="max_length", return_tensors="pt")
        self.labels = torch.tensor(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.enc["input_ids"][i], "attention_mask": self.enc["attention_mask"][i],
                "labels": self.labels[i]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import hf_tiny
    from transformers import AutoTokenizer

    folder = hf_tiny.make_tiny_bert(tmp_path_factory.mktemp("hf") / "tiny")
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    (x, y), (xt, yt) = hf_tiny.texts()
    return folder, _Texts(tok, x, y), _Texts(tok, xt, yt)


def _prepared(folder):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True)
    return torchdkm.prepare(model, DKMConfig(bits=2, min_numel=1000))


def _trainer(model, train, out, max_steps=12, save_steps=6):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=16,
                             learning_rate=3e-3, save_steps=save_steps, logging_steps=3, report_to=[], use_cpu=True,
                             seed=0, disable_tqdm=True, dataloader_num_workers=0)
    return Trainer(model=model, args=args, train_dataset=train, callbacks=[DKMTrainerCallback()])


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_trainer_then_finalize_save_and_reload_into_a_plain_model(tiny, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    folder, train, test = tiny
    model = _prepared(folder)
    trainer = _trainer(model, train, tmp_path / "ck")
    trainer.train()
    logged = [h for h in trainer.state.log_history if "dkm_entropy" in h]
    assert logged and all(0 <= h["dkm_entropy"] <= 1 and 0 < h["dkm_centroids_used"] <= 1 and h["dkm_gap"] >= 0
                          for h in logged)
    steps = {int(m.step) for m in model.modules() if isinstance(m, torchdkm.parametrization.DKMWeight)}
    assert steps == {12}  # the schedule's clock advanced once per optimizer step
    torchdkm.finalize(model.eval())
    torchdkm.save(model, tmp_path / "m.safetensors")
    plain = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(folder, local_files_only=True))
    restored = torchdkm.load(tmp_path / "m.safetensors", plain).eval()
    batch = {k: v for k, v in test.enc.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        assert torch.equal(restored(**batch).logits, model(**batch).logits)
    assert torch.unique(restored.bert.encoder.layer[0].intermediate.dense.weight).numel() <= 4


def test_trainer_checkpoint_keeps_centroids_and_resume_matches_an_uninterrupted_run(tiny, tmp_path):
    from safetensors.torch import load_file

    folder, train, _ = tiny
    full = _prepared(folder)
    _trainer(full, train, tmp_path / "full").train()

    ckpt = load_file(tmp_path / "full" / "checkpoint-6" / "model.safetensors")  # as if the run died after step 6
    cents = [k for k in ckpt if k.endswith("parametrizations.weight.0.centroids")]
    assert len(cents) == sum(1 for m in full.modules() if torchdkm.parametrization.dkm_parametrization(m) is not None)
    assert all(bool(ckpt[k.replace(".centroids", ".initialized")]) for k in cents)
    assert all(int(ckpt[k.replace(".centroids", ".step")]) == 6 for k in cents)

    resumed = _prepared(folder)
    _trainer(resumed, train, tmp_path / "resumed").train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
    a, b = _state(resumed), _state(full)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_callback_refuses_a_model_that_was_not_prepared(tiny, tmp_path):
    from transformers import AutoModelForSequenceClassification

    folder, train, _ = tiny
    model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True)
    with pytest.raises(ConfigError, match="no layer prepared for DKM"):
        _trainer(model, train, tmp_path / "ck").train()
