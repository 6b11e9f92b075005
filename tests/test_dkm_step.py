"""benchmarks/engine/dkm_step.py: the warm-up rule and a tiny end-to-end run (seconds)."""
import json

import pytest

import dkm_step


def test_steady_drops_warmup_and_reports_spread_and_drift():
    times = [9.5, 8.6, 1.0, 1.2, 0.8, 1.1, 0.9, 2.0]
    s = dkm_step.steady(times, 2)
    assert s["n"] == 6 and s["first"] == 9.5
    assert s["median"] == pytest.approx(1.05)  # the warm-up steps are out: the median of all 8 would be 1.15
    assert s["q1"] <= s["median"] <= s["q3"] and s["q1"] == pytest.approx(0.925) and s["q3"] == pytest.approx(1.175)
    assert s["drift"] == pytest.approx(1.1 / 1.0 - 1)  # median of [1.1, 0.9, 2.0] over [1.0, 1.2, 0.8]
    with pytest.raises(SystemExit, match="no step left"):
        dkm_step.steady(times[:2], 2)


def test_tiny_run_times_plain_and_torchdkm_in_separate_processes(tmp_path):
    out = tmp_path / "step.md"
    res = dkm_step.main(["--quick", "--workloads", "resnet_small_2b", "--steps", "3", "--warmup", "1",
                         "--coreml-steps", "0", "--out", str(out)])
    r = res["resnet_small_2b"]
    assert set(r) == {"plain", "torchdkm"}
    assert all(len(r[m]["times"]) == 3 and r[m]["peak_rss_gib"] > 0 for m in r)
    dkm = r["torchdkm"]
    assert dkm["clustered"] == dkm["layers"] == 16  # every Conv2d and Linear, whatever its size
    assert len(dkm["iterations"]) == 3 and all(len(step) == 16 for step in dkm["iterations"])
    assert all(1 <= i <= 3 for step in dkm["iterations"] for i in step)
    text = out.read_text()
    assert "| resnet_small_2b (batch 8×1×28×28, 16 layers, k=4, d=1) |" in text and "first 1 (warm-up rule)" in text
    assert json.loads(out.with_suffix(".json").read_text())["runs"]["resnet_small_2b"]["plain"]["times"]
