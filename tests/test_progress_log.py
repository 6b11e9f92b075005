"""Long runs that talk: `torchdkm compress` with its output in a file prints plain progress lines (step/total,
loss, throughput, ETA) at the configured interval and announces each set-up phase with its duration, without a
progress bar's carriage returns; the throttle itself on a fake clock; the Trainer callback's progress in the
Trainer's logs."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from torchdkm._progress import ProgressLog
from torchdkm.app.cli import build_parser
from torchdkm.app.recipe import parse_recipe
from torchdkm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "recipes" / "digits_mlp.yaml"
STEP_LINE = re.compile(r"^(fp32|DKM) step (\d+)/(\d+) \(epoch (\d+)/(\d+)\): loss ([\d.]+), ([\d.]+) samples/s, "
                       r"ETA (\S+( s)?)$", re.M)

BN_MLP = '''
from torch import nn


def build():
    """The digits MLP with a BatchNorm, so the run re-estimates BatchNorm statistics before finalize."""
    return nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))
'''


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """The digits recipe (12 fp32 + 4 DKM epochs of 21 steps) on an MLP with a BatchNorm, stdout and stderr
    into one file as under nohup; the recipe asks for a line every 1000 steps, the command line every 5."""
    root = tmp_path_factory.mktemp("progress")
    raw = yaml.safe_load(DIGITS.read_text())
    raw["model"] = {"name": "bn_mlp:build"}
    raw["compression"]["rules"] = {"3": {"bits": 4}}  # the output layer, as net.4 of the plain MLP
    raw["training"]["bn_recal_batches"] = 2
    raw["progress"] = {"every_s": 0, "every_steps": 1000}
    (root / "bn_mlp.py").write_text(BN_MLP)
    (root / "r.yaml").write_text(yaml.safe_dump(raw))
    log = root / "run.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    with open(log, "wb") as f:
        r = subprocess.run([sys.executable, "-m", "torchdkm", "compress", str(root / "r.yaml"), "--out",
                            str(root / "out"), "--progress-every-steps", "5"], stdout=f, stderr=subprocess.STDOUT,
                           env=env, cwd=root, timeout=300)
    text = log.read_bytes().decode("utf-8")
    assert r.returncode == 0, text[-3000:]
    return text, raw


def test_progress_lines_every_n_steps_with_step_total_loss_throughput_and_eta(logged_run):
    text, raw = logged_run
    lines = STEP_LINE.findall(text)
    steps = 1347 // 64  # digits: 1347 training samples, batch 64, drop_last
    for phase, epochs in (("fp32", raw["training"]["fp32_epochs"]), ("DKM", raw["training"]["epochs"])):
        got = [ln for ln in lines if ln[0] == phase]
        total = epochs * steps
        # the command line's every 5 steps beat the recipe's 1000: a line at step 5, 10, ... of the phase
        assert [int(ln[1]) for ln in got] == list(range(5, total + 1, 5)), got
        assert {int(ln[2]) for ln in got} == {total}
        for ln in got:  # the epoch a step falls in, and a throughput and ETA that are numbers
            assert int(ln[3]) == (int(ln[1]) - 1) // steps + 1 and int(ln[4]) == epochs
            assert float(ln[6]) > 0 and re.fullmatch(r"[\d.]+ s|\d+m\d\ds|\d+h\d\dm", ln[7])
    assert len(lines) == text.count(" step ")  # every step line has the full form


def test_set_up_phases_announced_with_durations_in_order(logged_run):
    text, _ = logged_run
    phases = ["loading data (digits)", "loading the model (bn_mlp:build)", "fp32 evaluation", "k-means init",
              "evaluation after k-means init", "BatchNorm re-estimation", "finalize", "final evaluation"]
    at = []
    for p in phases:
        start = text.index(f"\n{p} ...\n") if f"\n{p} ...\n" in text else text.index(f"{p} ...\n")
        assert re.search(rf"^{re.escape(p)}: finished in [\d.]+ s$", text, re.M), p
        at.append(start)
    assert at == sorted(at)
    assert text.index("fp32 evaluation ...") > text.rindex("fp32 step")  # after the fp32 epochs
    assert text.index("k-means init ...") < text.index("DKM step")


def test_no_progress_bar_garbage_in_the_log(logged_run):
    text, _ = logged_run
    assert "\r" not in text and "it/s" not in text and "\x1b[" not in text
    assert re.search(r"^done in \d+ s: accuracy", text, re.M)


def test_under_torchrun_only_rank_0_prints_progress(tmp_path):
    """Two processes, the same global steps: every step line and every phase once, in one file."""
    log = tmp_path / "run.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "torchdkm",
           "compress", str(DIGITS), "--out", str(tmp_path / "out"), "--progress-every-s", "0",
           "--progress-every-steps", "10"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    with open(log, "wb") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, timeout=300)
    text = log.read_text()
    assert r.returncode == 0, text[-3000:]
    steps = [int(m[1]) for m in STEP_LINE.findall(text) if m[0] == "DKM"]
    assert steps == list(range(10, 4 * 21 + 1, 10))  # once each: rank 1 is silent
    for p in ("k-means init", "finalize", "final evaluation"):
        assert len(re.findall(rf"^{p} \.\.\.$", text, re.M)) == 1, p


def test_step_lines_every_s_seconds_on_a_fake_clock(capsys):
    now = [0.0]
    p = ProgressLog(every_s=30, every_steps=0, lines=True, clock=lambda: now[0])
    p.begin("DKM", total=10, per_step=4, unit="tokens")
    printed = []
    for step in range(10):
        now[0] += 12.0  # 12 s a step: a line after steps 3, 6, 9 (at least 30 s since the last line each time)
        printed.append(p.step(loss=1.0 + step))
    assert [i + 1 for i, x in enumerate(printed) if x] == [3, 6, 9]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "DKM step 3/10: loss 2.0000, 0.333 tokens/s, ETA 1m24s"  # mean of 1, 2, 3; 7 steps x 12 s
    assert out[1].startswith("DKM step 6/10: loss 5.0000,")  # the mean of the steps since the last line
    assert len(out) == 3


def test_resumed_phase_counts_its_earlier_steps_but_not_their_time():
    now = [100.0]
    p = ProgressLog(every_s=0, every_steps=2, lines=True, clock=lambda: now[0])
    p.begin("fp32", total=40, done=30, per_step=64)  # a resumed run: 30 steps were done by an earlier session
    now[0] += 1.0
    p.step()
    now[0] += 1.0
    assert p.step() and p.done == 32 and p.rate() == 1.0
    assert p.line() == "fp32 step 32/40: 64 samples/s, ETA 8.0 s"


def test_phases_print_nothing_on_other_ranks_and_say_when_they_stopped(capsys):
    with ProgressLog(enabled=False).phase("k-means init"):
        pass
    assert capsys.readouterr().out == ""
    with pytest.raises(RuntimeError):
        with ProgressLog(lines=True).phase("final evaluation"):
            raise RuntimeError("boom")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "final evaluation ..." and re.fullmatch(r"final evaluation: stopped after [\d.]+ s", out[1])


def test_a_recurring_phase_is_quiet_once_it_proved_fast(capsys):
    now = [0.0]
    p = ProgressLog(lines=True, clock=lambda: now[0])
    for took in (0.2, 0.2, 5.0):
        with p.phase("epoch evaluation", kind="eval"):
            now[0] += took
    out = capsys.readouterr().out.splitlines()
    assert out == ["epoch evaluation ...", "epoch evaluation: finished in 0.2 s"]  # the 2nd and 3rd pass quietly


def test_progress_settings_checked_in_recipe_and_command_line():
    base = {"model": {"name": "mlp"}, "data": {"name": "digits"}}
    spec = parse_recipe(dict(base, progress={"every_s": 5, "every_steps": 10})).progress
    assert (spec.every_s, spec.every_steps) == (5, 10)
    assert parse_recipe(base).progress.every_s == 30  # the default
    with pytest.raises(ConfigError, match=r"progress.every_steps=2.5 is not allowed: give an integer >= 0"):
        parse_recipe(dict(base, progress={"every_steps": 2.5}))
    with pytest.raises(ConfigError, match=r"progress: unknown key\(s\) \['every'\]"):
        parse_recipe(dict(base, progress={"every": 5}))
    parser = build_parser()
    args = parser.parse_args(["compress", "r.yaml", "--progress-every-s", "2.5", "--progress-every-steps", "3"])
    assert (args.progress_every_s, args.progress_every_steps) == (2.5, 3)
    with pytest.raises(SystemExit):
        parser.parse_args(["compress", "r.yaml", "--progress-every-s", "-1"])


def test_trainer_callback_logs_progress_through_the_trainer(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import hf_tiny
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    import torchdkm
    from torchdkm.integrations.hf_trainer import DKMTrainerCallback
    from test_hf_trainer import _Texts

    folder = hf_tiny.make_tiny_bert(tmp_path / "tiny")
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    (x, y), _ = hf_tiny.texts()
    model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True)
    torchdkm.prepare(model, torchdkm.DKMConfig(bits=2, min_numel=1000))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=16,
                             logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True, dataloader_num_workers=0)
    cb = DKMTrainerCallback(progress_every_s=0, progress_every_steps=4)
    trainer = Trainer(model=model, args=args, train_dataset=_Texts(tok, x, y), callbacks=[cb])
    trainer.train()
    # logging_steps=1000: the Trainer logs at steps 4, 8, 12 only because the callback asked it to
    logged = [h for h in trainer.state.log_history if "progress" in h]
    assert [h["progress"] for h in logged] == ["4/12", "8/12", "12/12"]
    assert [h["step"] for h in logged] == [4, 8, 12]
    assert all(h["samples_per_second"] > 0 and "loss" in h and "dkm_entropy" in h for h in logged)
    assert logged[0]["eta_s"] > 0 and logged[-1]["eta_s"] == 0
    out = capsys.readouterr().out
    assert re.search(r"^DKM k-means init \.\.\.$", out, re.M)
    assert re.search(r"^DKM k-means init: finished in [\d.]+ s$", out, re.M)
    with pytest.raises(ConfigError, match=r"progress_every_s=-1"):
        DKMTrainerCallback(progress_every_s=-1)


def test_a_resumed_run_may_change_its_progress_section_only(tmp_path):
    from torchdkm.app.job import compress

    raw = yaml.safe_load(DIGITS.read_text())
    raw["training"].update(fp32_epochs=1, epochs=1)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    first = compress(tmp_path / "r.yaml", tmp_path / "out")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(dict(raw, progress={"every_steps": 3})))
    again = compress(tmp_path / "r.yaml", tmp_path / "out", resume=True)  # printing differs, the run does not
    assert again["accuracy"] == first["accuracy"]
    raw["training"]["lr"] = 0.01
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(dict(raw, progress={"every_steps": 3})))
    with pytest.raises(ConfigError, match=r"the recipe differs .*\(changed: training\.lr\)"):
        compress(tmp_path / "r.yaml", tmp_path / "out", resume=True)


def test_a_long_phase_says_it_is_still_running(capsys):
    import time

    p = ProgressLog(every_s=0.1, lines=True)
    with p.phase("k-means init"):
        time.sleep(1.0)  # beats at 0.1, 0.3, 0.7 s: the waits double
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "k-means init ..." and re.fullmatch(r"k-means init: finished in [\d.]+ s", out[-1])
    beats = out[1:-1]
    assert len(beats) == 3 and all(re.fullmatch(r"k-means init: still running, [\d.]+ s so far", b) for b in beats)
    at = [float(re.search(r"([\d.]+) s so far", b)[1]) for b in beats]
    assert at[0] >= 0.1 and at[1] - at[0] > 0.15 and at[2] - at[1] > 0.35  # printed to 0.1 s
    with ProgressLog(every_s=0.05, lines=False).phase("k-means init"):  # a terminal: no heartbeat
        time.sleep(0.2)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and re.fullmatch(r"k-means init: finished in [\d.]+ s", out[1])
