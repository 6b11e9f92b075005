"""The README's "Saving, loading and exporting" snippets run as written."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippets():
    text = README.read_text()
    section = text.split("## Saving, loading and exporting", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_save_load_export_snippets_run(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    blocks = _snippets()
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(blocks[0], "README.md: save/load/export", "exec"), scope)
    assert {"model.safetensors", "model.onnx"} <= {p.name for p in tmp_path.iterdir()}
    pytest.importorskip("coremltools")
    exec(compile(blocks[1], "README.md: Core ML", "exec"), scope)
    assert (tmp_path / "model.mlpackage").exists()
