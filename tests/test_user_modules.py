"""User code in recipes (``model.name`` / ``data.name`` = "module:function") through the installed ``torchdkm``
script, whose sys.path holds neither the current directory nor the recipe's folder by itself."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).parent / "torchdkm"
if not SCRIPT.is_file():
    SCRIPT = Path(shutil.which("torchdkm") or SCRIPT)
pytestmark = pytest.mark.skipif(not SCRIPT.is_file(), reason="the torchdkm console script is not installed")

USER_MODEL = """
from torch import nn

def tiny_mlp(width=32):
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 2))
"""
USER_DATA = """
import torch
from torch.utils.data import TensorDataset

def blobs(n=256):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = torch.randn(n, 8, generator=g) + 2.0 * y[:, None].float()
    return TensorDataset(x[: n // 2], y[: n // 2]), TensorDataset(x[n // 2:], y[n // 2:])
"""
RECIPE = """
model: {{name: "{model}", kwargs: {{width: 32}}}}
data: {{name: "{data}"}}
training: {{fp32_epochs: 1, epochs: 1, batch_size: 32, lr: 0.01}}
compression: {{bits: 2, min_numel: 0}}
"""


def _layout(tmp_path, model="usermodels:tiny_mlp", data="userdata:blobs"):
    """recipes/ holds the recipe and usermodels.py; work/ (the current directory) holds userdata.py."""
    recipes, work = tmp_path / "recipes", tmp_path / "work"
    recipes.mkdir()
    work.mkdir()
    (recipes / "usermodels.py").write_text(textwrap.dedent(USER_MODEL))
    (work / "userdata.py").write_text(textwrap.dedent(USER_DATA))
    (recipes / "r.yaml").write_text(RECIPE.format(model=model, data=data))
    return recipes, work


def _run(work, *args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([str(SCRIPT), *args], cwd=work, env=env, capture_output=True, text=True, timeout=240)


def test_installed_script_imports_from_the_recipe_folder_and_the_current_directory(tmp_path):
    recipes, work = _layout(tmp_path)
    r = _run(work, "compress", "../recipes/r.yaml", "--out", "out")
    assert r.returncode == 0, r.stderr
    assert (work / "out" / "model.safetensors").is_file() and "done in" in r.stdout


def test_a_missing_user_module_names_where_it_looked(tmp_path):
    recipes, work = _layout(tmp_path, model="nosuchmodule:net")
    r = _run(work, "compress", str(recipes / "r.yaml"), "--out", "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "cannot import module 'nosuchmodule'" in r.stderr
    assert str(recipes.resolve()) in r.stderr and str(work.resolve()) in r.stderr
    assert not (work / "out").exists()
