"""The benchmark scripts run end to end (tiny settings: seconds, not minutes)."""
import json
from pathlib import Path

import pytest

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file()


def test_paper_sizes_match_the_paper_within_a_few_percent(tmp_path):
    paper_sizes = pytest.importorskip("paper_sizes")
    models = ["ResNet-50", "MobileNet-v1"]
    try:
        import transformers  # noqa: F401

        models.append("DistilBERT")
    except ImportError:
        pass
    rows = {r["model"]: r for r in paper_sizes.main(["--quick", "--models", *models, "--out", str(tmp_path)])}
    assert set(rows) == set(models)
    for r in rows.values():
        assert abs(r["factor"] / r["paper_factor"] - 1) < 0.03, r
    assert abs(rows["ResNet-50"]["fp32_mib"] - 97.49) < 0.01  # 25,557,032 params
    assert abs(rows["ResNet-50"]["compressed_mib"] - 3.3) / 3.3 < 0.03
    assert 0.72 * 0.97 < rows["MobileNet-v1"]["compressed_mib"] < 0.74 * 1.03


@pytest.mark.skipif(not FASHION, reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")
def test_vision_benchmark_smoke(tmp_path, monkeypatch):
    import common
    import vision

    monkeypatch.setattr(common, "CACHE", tmp_path / "cache")
    vision.main(["--models", "resnet_small", "--budgets", "1bit", "--methods", "ptq_kmeans", "st_kmeans", "qat_lsq",
                 "dkm", "--train-subset", "256", "--test-subset", "128", "--fp32-epochs", "1", "--steps", "2",
                 "--seeds", "1", "--out", str(tmp_path), "--tag", "t", "--no-progress"])
    res = json.loads((tmp_path / "t_resnet_small.json").read_text())
    methods = {r["method"]: r for r in res["runs"]}
    assert set(methods) == {"ptq_kmeans", "st_kmeans", "qat_lsq", "dkm"}
    # the clustering methods store exactly the same thing; uniform QAT adds per-channel scale and offset
    assert methods["dkm"]["kib"] == methods["st_kmeans"]["kib"] == methods["ptq_kmeans"]["kib"]
    assert methods["dkm"]["factor"] > 20
    assert abs(methods["dkm"]["bits_per_weight"] - 1.0) < 0.25
    assert methods["qat_lsq"]["bits_per_weight"] > 1.0
    assert all(0 <= r["top1"] <= 1 for r in res["runs"])
    md = (tmp_path / "t.md").read_text()
    assert "DKM (torchdkm)" in md and "k-means + STE fine-tuning" in md
    assert (tmp_path / "t.png").stat().st_size > 1000
