"""The per-epoch training checkpoint of ``torchdkm compress``, written atomically (torchdkm._fileio), so a crash
or Ctrl-C leaves the previous checkpoint intact."""
from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch

from .._fileio import write_atomic

CHECKPOINT_NAME = "checkpoint.pt"


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
    write_atomic(path, lambda f: torch.save(state, f))


def load_checkpoint(path) -> Dict[str, Any]:
    # weights_only=False: the checkpoint holds numpy/Python RNG states; it is a file this tool wrote itself.
    return torch.load(path, map_location="cpu", weights_only=False)
