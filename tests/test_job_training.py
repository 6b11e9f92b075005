"""`torchdkm compress` drives the issue-9 training controls: the temperature schedule over the DKM steps,
distillation from the fp32 model, soft-vs-hard diagnostics per epoch, and finalize shipping what was evaluated."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from torchdkm import ConfigError
from torchdkm.app.job import compress
from torchdkm.app.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path, **training):
    raw = yaml.safe_load((ROOT / "recipes" / "digits_mlp.yaml").read_text())
    raw["training"].update(epochs=2, fp32_epochs=2, **training)
    raw["compression"].update(tau_scale=0.3, tau_scale_end=0.02)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_schedule_distillation_and_diagnostics_through_the_cli(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    report = compress(_recipe(tmp_path, distill=0.5, distill_temperature=2.0), out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dkm = [r for r in rows if r["phase"] == "dkm"]
    assert len(dkm) == 2
    for r in dkm:
        assert 0 <= r["test_acc_soft"] <= 1 and r["mean_gap"] >= 0
    layer = next(iter(dkm[0]["dkm"].values()))
    steps_per_epoch = layer["step"]
    assert steps_per_epoch > 0 and next(iter(dkm[1]["dkm"].values()))["step"] == 2 * steps_per_epoch
    # the schedule ran over exactly the DKM steps: soft at the start, at its end value after the last one
    assert layer["tau_scale"] < 0.3 and next(iter(dkm[1]["dkm"].values()))["tau_scale"] == pytest.approx(0.02)
    assert dkm[0]["mean_gap"] > dkm[1]["mean_gap"]  # annealing closes the soft-to-hard gap
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert "teacher" in state  # resuming a distilled run needs the fp32 teacher
    # finalize ships exactly the network evaluated (hard) after the last epoch
    assert report["accuracy"]["final"] == pytest.approx(dkm[-1]["test_acc"], abs=1e-9)


@pytest.mark.parametrize("key, value, match", [("distill", 1.5, "training.distill"),
                                               ("distill_temperature", 0, "distill_temperature"),
                                               ("bn_recal_batches", -1, "bn_recal_batches")])
def test_training_controls_are_validated(tmp_path, key, value, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe(_recipe(tmp_path, **{key: value}))
