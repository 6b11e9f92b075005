"""Atomic file writes and the per-epoch training checkpoint of ``torchdkm compress``.

Every file is written to a temporary name in the same folder, flushed to disk, then renamed over the
target (``os.replace`` is atomic on POSIX and Windows), so a crash or Ctrl-C leaves either the old file or
the new one, never a torn one.
"""
from __future__ import annotations

import io
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by the owner only; results should get the usual permissions (umask).
_FILE_MODE = 0o666 & ~_umask()


def atomic_write(path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), _FILE_MODE)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt included: never leave the temporary file behind
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def rng_state() -> Dict[str, Any]:
    """Every random state a training step can consume (torch CPU and CUDA, numpy, Python)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, state: Dict[str, Any]) -> None:
    """Write a checkpoint dict (tensors, optimizer/scheduler state dicts, RNG states, plain Python) atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path) -> Dict[str, Any]:
    # weights_only=False: the checkpoint holds numpy/Python RNG states; it is a file this tool wrote itself.
    return torch.load(path, map_location="cpu", weights_only=False)
