"""`torchdkm compress` stops a run whose loss, weights or centroids go NaN/inf, names the layer and the step,
and leaves the last good checkpoint intact and resumable."""
import pytest
import torch

from torchdkm.app.job import compress
from torchdkm.errors import NonFiniteError

MODULE = '''
import os
import torch
from torch import nn
from torch.utils.data import TensorDataset
from torchdkm.parametrization import original_weight


class Poison(nn.Module):
    """Counts training forwards; at call POISON_AT it poisons the input (mode "input") or the next layer's
    weight (mode "weight"), as an exploding update or a bad batch would."""

    def __init__(self, target):
        super().__init__()
        self.calls, self.target = 0, [target]  # a list: not a submodule

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == int(os.environ.get("POISON_AT", "0")):
                if os.environ.get("POISON_MODE") == "input":
                    return x * float("nan")
                with torch.no_grad():
                    original_weight(self.target[0])[0, 0] = float("inf")
        return x


def net():
    fc = nn.Linear(8, 32)
    return nn.Sequential(Poison(fc), fc, nn.ReLU(), nn.Linear(32, 2))


def blobs(n=256):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = torch.randn(n, 8, generator=g) + 2.0 * y[:, None].float()
    return TensorDataset(x[: n // 2], y[: n // 2]), TensorDataset(x[n // 2:], y[n // 2:])
'''
RECIPE = """
model: {{name: "{mod}:net"}}
data: {{name: "{mod}:blobs"}}
training: {{fp32_epochs: 1, epochs: 2, batch_size: 32, lr: 0.01}}
compression: {{bits: 2, min_numel: 0}}
"""


@pytest.fixture
def recipe(tmp_path, request):
    mod = f"poison_{request.node.name.replace('[', '_').replace(']', '').replace('-', '_')}"
    (tmp_path / f"{mod}.py").write_text(MODULE)
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(mod=mod))
    return path


def _weights(out):
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]


def test_non_finite_weight_in_dkm_stops_names_layer_and_step_and_resumes(recipe, tmp_path, monkeypatch):
    clean = compress(recipe, tmp_path / "clean")  # uninterrupted reference run
    # 4 steps per epoch: call 10 is step 2 of the second DKM epoch (fp32 epoch: calls 1-4, DKM epoch 1: 5-8)
    monkeypatch.setenv("POISON_AT", "10")
    monkeypatch.setenv("POISON_MODE", "weight")
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError) as e:
        compress(recipe, out)
    msg = str(e.value)
    assert "at DKM epoch 2, step 2 of 4" in msg and "layer '1'" in msg and "1 non-finite value(s) of 256" in msg
    assert "after dkm epoch 1" in msg and "is intact" in msg and "--resume" in msg
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert (ckpt["phase"], ckpt["epoch"]) == ("dkm", 1)
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert not (out / "report.json").exists()

    monkeypatch.delenv("POISON_AT")
    resumed = compress(recipe, out, resume=True)
    assert resumed["accuracy"] == clean["accuracy"]
    a, b = _weights(out), _weights(tmp_path / "clean")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_at_the_step_before_any_checkpoint(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("POISON_AT", "2")
    monkeypatch.setenv("POISON_MODE", "input")
    with pytest.raises(NonFiniteError, match=r"at fp32 epoch 1, step 2 of 4: the loss is nan; no checkpoint was "
                                             r"written in this run"):
        compress(recipe, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_weight_broken_by_an_epochs_last_update_is_never_checkpointed(recipe, tmp_path, monkeypatch):
    real_step = torch.optim.Adam.step

    def step(self, *a, **k):  # the 4th update (the fp32 epoch's last) turns the output layer's bias into inf
        out = real_step(self, *a, **k)
        self._n = getattr(self, "_n", 0) + 1
        if self._n == 4:
            with torch.no_grad():
                self.param_groups[0]["params"][-1].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    with pytest.raises(NonFiniteError, match=r"after fp32 epoch 1 \(step 4\): parameter '3.bias' is non-finite"):
        compress(recipe, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
