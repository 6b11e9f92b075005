"""The per-epoch training checkpoint of ``torchdkm compress``, written atomically (torchdkm._fileio), so a crash,
Ctrl-C or a full disk leaves the previous checkpoint intact.

``checkpoint.pt`` is always the newest. With ``training.keep_checkpoints: N`` > 1 the newest N are also kept as
``checkpoint-<phase>-<epoch>.pt`` (the newest is a hard link to ``checkpoint.pt``: no extra disk); older ones
are deleted only once the new one is complete. To go back, copy one over ``checkpoint.pt`` and ``--resume``."""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List

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


def save_checkpoint(path, state: Dict[str, Any], keep: int = 1) -> None:
    """Write a checkpoint dict (tensors, optimizer/scheduler state dicts, RNG states, plain Python, and its
    ``phase`` and ``epoch``) atomically to ``path``; with ``keep`` > 1 also as the newest of ``keep`` numbered
    copies beside it. A failed write raises torchdkm.errors.WriteError (path and cause) and changes nothing."""
    path = Path(path)
    write_atomic(path, lambda f: torch.save(state, f))
    if keep > 1:
        _link_or_copy(path, path.with_name(f"checkpoint-{state['phase']}-{state['epoch']:04d}.pt"))
    for old in kept_checkpoints(path.parent)[:-keep if keep > 1 else None]:
        old.unlink(missing_ok=True)  # only now: the new checkpoint is complete


def kept_checkpoints(folder) -> List[Path]:
    """The numbered checkpoints in ``folder``, oldest first (fp32 epochs before DKM epochs)."""
    found = []
    for p in Path(folder).glob("checkpoint-*-*.pt"):
        m = re.fullmatch(r"checkpoint-(fp32|dkm)-(\d+)\.pt", p.name)
        if m:
            found.append(((m[1] == "dkm", int(m[2])), p))
    return [p for _, p in sorted(found)]


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src``'s content: a hard link where the filesystem has them, else an atomic copy."""
    tmp = dst.with_name(f".{dst.name}.link")
    try:
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        tmp.unlink(missing_ok=True)
        with open(src, "rb") as f:
            write_atomic(dst, lambda out: shutil.copyfileobj(f, out))


def load_checkpoint(path) -> Dict[str, Any]:
    # weights_only=False: the checkpoint holds numpy/Python RNG states; it is a file this tool wrote itself.
    return torch.load(path, map_location="cpu", weights_only=False)
