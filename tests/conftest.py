"""Puts what the tests import besides torchdkm on the path: this folder's helpers (artifact_models, slow_data)
and the benchmark scripts (common, vision, paper_sizes, minilm) that tests/test_benchmarks.py runs."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT / "tests", ROOT / "benchmarks"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
