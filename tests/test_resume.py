"""Whether `torchdkm compress` resumes (torchdkm.app.resume): --resume, --resume auto, torchrun's restarts of the
same job, and the recipe keys that may change on a resume; the numbered checkpoints kept beside checkpoint.pt."""
import pytest
import torch

from torchdkm.app.checkpoint import kept_checkpoints, save_checkpoint
from torchdkm.app.recipe import parse_recipe
from torchdkm.app.resume import checkpoint_to_resume
from torchdkm.errors import ConfigError

RAW = {"model": {"name": "mlp"}, "data": {"name": "digits"}, "training": {"epochs": 1, "keep_checkpoints": 2},
       "distributed": {"timeout_s": 60}}
FILES = ("report.json", "checkpoint.pt")


def _decide(out, mode, raw=RAW):
    return checkpoint_to_resume(out, out / "checkpoint.pt", FILES, raw, mode)


def _write(out, run_id=None, raw=RAW):
    save_checkpoint(out / "checkpoint.pt", {"phase": "dkm", "epoch": 1, "recipe": raw, "run_id": run_id})


def test_auto_starts_an_empty_folder_and_resumes_a_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert _decide(tmp_path, "auto") is None and "starting the run" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"--resume: no checkpoint at .*checkpoint.pt; .*--resume auto"):
        _decide(tmp_path, True)
    _write(tmp_path)
    assert _decide(tmp_path, "auto")["epoch"] == 1 and _decide(tmp_path, True)["epoch"] == 1
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoint.pt\); pass --resume \(or --resume auto\)"):
        _decide(tmp_path, False)


def test_a_restart_removes_the_partial_writes_of_a_killed_process(tmp_path):
    _write(tmp_path)
    (tmp_path / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "notes.tmp").write_text("not ours")
    assert _decide(tmp_path, "auto") is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "notes.tmp"]


def test_only_keys_that_change_no_result_may_differ_on_a_resume(tmp_path):
    _write(tmp_path)
    quiet = dict(RAW, training={"epochs": 1, "keep_checkpoints": 5}, distributed={}, progress={"every_s": 1})
    assert _decide(tmp_path, True, quiet) is not None
    with pytest.raises(ConfigError, match=r"the recipe differs .*\(changed: training.epochs\)"):
        _decide(tmp_path, "auto", dict(RAW, training={"epochs": 2, "keep_checkpoints": 2}))


def test_a_torchrun_restart_resumes_its_own_run_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    _write(tmp_path, run_id="job-a")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # a first start never takes over a folder
    with pytest.raises(ConfigError, match="already holds a run"):
        _decide(tmp_path, False)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a restart of the job that wrote it continues it
    assert _decide(tmp_path, False)["run_id"] == "job-a"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")  # ...but not another job's run
    with pytest.raises(ConfigError, match="already holds a run"):
        _decide(tmp_path, False)


def test_keep_checkpoints_keeps_the_newest_and_links_the_last(tmp_path):
    path = tmp_path / "checkpoint.pt"
    for phase, epoch in [("fp32", 1), ("fp32", 2), ("dkm", 1), ("dkm", 2)]:
        save_checkpoint(path, {"phase": phase, "epoch": epoch, "w": torch.full((3,), float(epoch))}, keep=3)
    assert [p.name for p in kept_checkpoints(tmp_path)] == \
        ["checkpoint-fp32-0002.pt", "checkpoint-dkm-0001.pt", "checkpoint-dkm-0002.pt"]
    assert (tmp_path / "checkpoint-dkm-0002.pt").samefile(path)
    assert torch.load(tmp_path / "checkpoint-fp32-0002.pt")["epoch"] == 2
    save_checkpoint(path, {"phase": "dkm", "epoch": 3}, keep=1)  # keep 1: checkpoint.pt alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


@pytest.mark.parametrize("section, value, message", [
    ("training", {"keep_checkpoints": 0}, r"training.keep_checkpoints=0 is not allowed: give an integer >= 1"),
    ("distributed", {"timeout_s": 0}, r"distributed.timeout_s=0 is not allowed: give a finite number > 0"),
    ("distributed", {"timeout_s": "soon"}, r"distributed.timeout_s='soon' is not allowed"),
])
def test_fault_keys_are_validated(section, value, message):
    raw = {"model": {"name": "mlp"}, "data": {"name": "digits"}, section: value}
    with pytest.raises(ConfigError, match=message):
        parse_recipe(raw)
    ok = parse_recipe(dict(raw, **{section: {"keep_checkpoints": 3} if section == "training" else {"timeout_s": 1e2}}))
    assert ok.training.keep_checkpoints in (1, 3) and ok.distributed.timeout_s in (None, 100.0)
