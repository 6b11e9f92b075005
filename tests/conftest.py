"""Puts what the tests import besides torchdkm on the path: this folder's helpers (artifact_models, slow_data)
and the benchmark scripts (benchmarks/common.py and benchmarks/<domain>/*.py) that the benchmark tests import."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
for folder in (ROOT / "tests", BENCH, BENCH / "vision", BENCH / "text", BENCH / "llm", BENCH / "engine"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
