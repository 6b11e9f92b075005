"""The snippets of docs/export.md (the artifact, compact, ONNX, Core ML) run as written."""
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "export.md"


def _snippets():
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_save_load_export_snippets_run(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    blocks = _snippets()
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(blocks[0], "docs/export.md: save/load/export", "exec"), scope)
    assert {"model.safetensors", "model.onnx"} <= {p.name for p in tmp_path.iterdir()}
    pytest.importorskip("coremltools")
    exec(compile(blocks[1], "docs/export.md: Core ML", "exec"), scope)
    assert (tmp_path / "model.mlpackage").exists()
