"""Whether ``torchdkm compress`` resumes: ``--resume`` (there must be a checkpoint), ``--resume auto`` (resume when
there is one, else start) or neither (start; refuse a folder that holds a run), and torchrun's restarts.

Rank 0 alone reads the folder and decides (torchdkm.app.job broadcasts the decision), so every rank agrees before
any collective. A worker that torchrun restarted (``TORCHELASTIC_RESTART_COUNT`` > 0) resumes even without
``--resume`` when the checkpoint was written by the same torchrun job (its ``TORCHELASTIC_RUN_ID``, a fresh uuid
under ``--standalone``): the folder then holds this run, not an older one.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Union

from ..errors import ConfigError
from .checkpoint import load_checkpoint

# recipe keys that change what is printed or kept, not what is computed: a resume may change them
NOT_COMPUTED = {"progress": None, "training": ("keep_checkpoints",), "distributed": ("timeout_s",)}


def run_id() -> Optional[str]:
    """torchrun's id of this job (restarts keep it), or None outside torchrun / with the default id 'none'."""
    rid = os.environ.get("TORCHELASTIC_RUN_ID")
    return rid if rid and rid != "none" else None


def checkpoint_to_resume(out: Path, ckpt_path: Path, result_files, raw: dict,
                         mode: Union[bool, str]) -> Optional[dict]:
    """The checkpoint to continue from, or None to start; a ConfigError when the folder may not be used.
    ``result_files``: the names that mean the folder holds a run; ``raw``: the recipe mapping; ``mode``: False |
    True (``--resume``) | 'auto'."""
    has = ckpt_path.is_file()
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    if mode is True and not has:
        raise ConfigError(f"--resume: no checkpoint at {ckpt_path}; run without --resume to start (or with "
                          f"--resume auto, which starts when there is none)")
    if mode is False and has and restarted and run_id() is not None:
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("run_id") == run_id():  # written by an earlier attempt of this very torchrun job
            _check_same_recipe(ckpt, raw, ckpt_path)
            _remove_partial_writes(out)
            return ckpt
    if mode and has:
        ckpt = load_checkpoint(ckpt_path)
        _check_same_recipe(ckpt, raw, ckpt_path)
        _remove_partial_writes(out)  # only in a run this command continues
        return ckpt
    existing = [n for n in result_files if (out / n).exists()]
    if existing:
        raise ConfigError(f"{out} already holds a run ({', '.join(existing)}); pass --resume (or --resume auto) to "
                          f"continue it, or choose another --out folder (nothing was overwritten)")
    if mode == "auto":
        print(f"--resume auto: no checkpoint at {ckpt_path}; starting the run", file=sys.stderr, flush=True)
    return None


def _remove_partial_writes(out: Path) -> None:
    """Delete the temporary files of writes a killed process left (torchdkm._fileio writes ``.NAME.*.tmp`` and
    renames it): a job preempted again and again would otherwise fill the disk with partial checkpoints."""
    if out.is_dir():
        for p in list(out.glob(".*.tmp")) + list(out.glob(".checkpoint-*.pt.link")):
            p.unlink(missing_ok=True)


def _check_same_recipe(ckpt: dict, raw: dict, ckpt_path: Path) -> None:
    a, b = computed_part(ckpt["recipe"]), computed_part(raw)
    if a != b:
        diff = sorted(_diff_keys(a, b))
        raise ConfigError(f"--resume: the recipe differs from the one {ckpt_path} was trained with "
                          f"(changed: {', '.join(diff)}); restore it or start a new --out folder")


def computed_part(raw: dict) -> dict:
    """A recipe mapping without the keys in NOT_COMPUTED."""
    out = {}
    for key, value in raw.items():
        if key in NOT_COMPUTED and NOT_COMPUTED[key] is None:
            continue
        if key in NOT_COMPUTED and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in NOT_COMPUTED[key]}
            if not value:
                continue  # only such keys: as if the section were not there
        out[key] = value
    return out


def _diff_keys(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            yield from _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".") or "(whole recipe)"
