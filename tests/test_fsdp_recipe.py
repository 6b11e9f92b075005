"""`torchdkm compress` with `distributed: {strategy: fsdp}` under torchrun (2 CPU processes, gloo): the run completes
and its artifact scores as reported, a killed run resumes to the same weights, a bad strategy is a clear error."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from torch import nn

from torchdkm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240
RECIPE = {  # the digits MLP, small: a few seconds of training over an fp32 and a DKM phase
    "name": "digits-fsdp",
    "model": {"name": "mlp", "kwargs": {"in_features": 64, "hidden": 64, "num_classes": 10}},
    "data": {"name": "digits", "kwargs": {"test_fraction": 0.25, "seed": 0}},
    "training": {"fp32_epochs": 2, "epochs": 3, "batch_size": 64, "optimizer": "adam", "lr": 0.003, "seed": 0},
    "compression": {"bits": 2, "min_numel": 500},
    "distributed": {"strategy": "fsdp"},
}
PER_RANK_EPOCH = 672  # digits: 1347 training samples, 21 global batches of 64, 32 samples per rank and step

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")


def _recipe(folder: Path, **data) -> Path:
    raw = dict(RECIPE, data=dict(RECIPE["data"], **data))
    path = folder / "fsdp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _torchrun(recipe, out, *extra, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "torchdkm", "compress", str(recipe), "--out", str(out), *extra]
    full_env = dict(os.environ, OMP_NUM_THREADS="1",
                    PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]), **env)
    return subprocess.Popen(cmd, env=full_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc):
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err[-3000:]
    return out


def _state(out):
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """One uninterrupted 2-process fsdp run."""
    folder = tmp_path_factory.mktemp("fsdp")
    _finish(_torchrun(_recipe(folder), folder / "out"))
    return folder / "out"


@needs_gloo
def test_fsdp_run_writes_an_artifact_that_scores_as_reported(fsdp_run):
    import torchdkm
    from torchdkm.app.zoo.data import load_digits
    from torchdkm.app.zoo.models import MLP

    report = json.loads((fsdp_run / "report.json").read_text())
    assert report["distributed"] == {"world_size": 2, "ranks_identical": True, "mismatched": []}
    assert report["accuracy"]["final"] > 0.7
    ckpt = _state(fsdp_run)  # the last checkpoint holds the full, unsharded state, keyed like the plain model
    assert (ckpt["phase"], ckpt["epoch"]) == ("dkm", RECIPE["training"]["epochs"])
    assert "net.0.parametrizations.weight.original" in ckpt["model"]
    assert "net.0.parametrizations.weight.original" in ckpt["optimizer"]["state"]  # name-keyed: fsdp's format
    assert not list(fsdp_run.glob(".*.tmp"))
    model = torchdkm.load(fsdp_run / "model.safetensors", MLP(**RECIPE["model"]["kwargs"]))
    assert torch.unique(model.net[2].weight).numel() <= 4  # 2 bits
    x, y = load_digits(test_fraction=0.25, seed=0)[1].tensors
    with torch.no_grad():
        acc = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(report["accuracy"]["final"], abs=1e-6)


@needs_gloo
def test_fsdp_killed_run_resumes_to_the_same_weights(fsdp_run, tmp_path):
    # the same digits, slowed after the first DKM epoch so the run is still going when it is killed
    recipe, out = _recipe(tmp_path, name="slow_data:slow_digits"), tmp_path / "out"
    after = (RECIPE["training"]["fp32_epochs"] + 1) * PER_RANK_EPOCH
    proc = _torchrun(recipe, out, SLOW_DATA_SLEEP="0.01", SLOW_DATA_AFTER=str(after))
    deadline = time.time() + TIMEOUT
    while not ((out / "checkpoint.pt").exists() and _state(out)["phase"] == "dkm"):
        assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "no DKM checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun stops both workers mid-epoch (they run in their own sessions)
    proc.communicate(timeout=TIMEOUT)
    ckpt = _state(out)
    assert ckpt["phase"] == "dkm" and ckpt["epoch"] < RECIPE["training"]["epochs"]
    assert not (out / "report.json").exists()

    _finish(_torchrun(recipe, out, "--resume"))
    resumed, uninterrupted = _state(out)["model"], _state(fsdp_run)["model"]
    assert resumed.keys() == uninterrupted.keys()
    for k in resumed:  # DKM centroids included; the optimizer (Adam) state was restored from its full dict
        diff = (resumed[k].double() - uninterrupted[k].double()).abs().max()
        assert diff <= 1e-6, (k, float(diff))
    ra, rb = (json.loads((o / "report.json").read_text()) for o in (out, fsdp_run))
    assert ra["accuracy"] == rb["accuracy"]


def test_bad_strategy_names_the_value_and_the_choices():
    from torchdkm.app.recipe import parse_recipe

    with pytest.raises(ConfigError, match=r"distributed.strategy='zero' is not allowed: give one of ddp, fsdp"):
        parse_recipe(dict(RECIPE, distributed={"strategy": "zero"}))
    with pytest.raises(ConfigError, match=r"distributed: unknown key\(s\) \['stratgy'\]; allowed keys are: strategy"):
        parse_recipe(dict(RECIPE, distributed={"stratgy": "fsdp"}))
    assert parse_recipe({k: v for k, v in RECIPE.items() if k != "distributed"}).distributed.strategy == "ddp"


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.Adam(p, lr=0.01), lambda p: torch.optim.SGD(p, lr=0.01)],
                         ids=["adam", "sgd-stateless"])
def test_fsdp_optimizer_state_round_trips_in_one_process(make_opt):
    """With one process fsdp wraps nothing, but checkpoints the optimizer in the same name-keyed format."""
    import copy

    import torchdkm
    from torchdkm.app import distributed as D

    def train(model, opt, seed):
        opt.zero_grad()
        model(torch.randn(8, 16, generator=torch.Generator().manual_seed(seed))).square().mean().backward()
        opt.step()

    def build():
        torch.manual_seed(0)
        return torchdkm.prepare(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)),
                                torchdkm.DKMConfig(bits=2, min_numel=0))

    model = build()
    opt = make_opt(model.parameters())
    train(model, opt, 0)
    opt.param_groups[0]["lr"] = 0.05  # as a schedule leaves it: restored even for a stateless optimizer
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(D.full_optimizer_state(model, opt))
    assert set(saved_opt["state"]) <= {n for n, _ in model.named_parameters()}
    twin = build()
    twin.load_state_dict(saved_model)
    twin_opt = make_opt(twin.parameters())
    D.load_optimizer_state(twin, twin_opt, saved_opt)
    assert twin_opt.param_groups[0]["lr"] == 0.05
    train(model, opt, 1)
    train(twin, twin_opt, 1)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name


def test_teardown_frees_the_runs_cyclic_garbage_before_it_destroys_the_process_group(monkeypatch):
    """A resumed fsdp run's DTensor optimizer state, held in reference cycles and freed at interpreter exit after
    the process group, made gloo abort the process ("terminate called without an active exception")."""
    import gc
    import weakref

    from torchdkm.app import distributed as D

    class Node:
        pass

    a, b = Node(), Node()
    a.peer, b.peer, a.state = b, a, torch.zeros(3)
    freed = weakref.ref(a)
    del a, b
    seen = []
    monkeypatch.setattr(D.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(D.dist, "destroy_process_group", lambda: seen.append(freed() is None))
    gc.disable()  # only teardown's own collection may free the cycle
    try:
        D.teardown(D.Context(rank=0, world_size=2))
    finally:
        gc.enable()
    assert seen == [True]
