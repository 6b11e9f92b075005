"""The one atomic file writer: every file torchdkm writes (artifacts, ONNX models, checkpoints, reports,
plots) goes through :func:`write_atomic`, so a crash or Ctrl-C leaves either the old file or the new one,
never a torn one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import TorchDKMError, WriteError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file in ``path``'s folder (created if missing), fsync it, rename it over
    ``path`` (``os.replace``, atomic on POSIX and Windows), then fsync the folder so the rename is durable too.

    ``f`` is open for binary writing; a writer that wants a file name may write to ``f.name`` instead
    (safetensors.save_file does; recent versions even rename their own temporary file onto that name), so
    the file is chmodded and fsynced by name afterwards, not through ``f``. The file gets the permissions a
    plain ``open()`` would give (mkstemp makes 0600).

    A failure (a full disk, ...) raises :class:`~torchdkm.errors.WriteError` naming ``path`` and the cause, with
    the previous file at ``path`` untouched and no temporary file left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e) from e
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            write(f)
        fd = os.open(tmp, os.O_RDWR)
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o666 & ~_umask())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:  # KeyboardInterrupt included: never leave the temporary file behind
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, Exception) and not isinstance(e, TorchDKMError):  # ours already say what
            raise _write_error(path, e) from e
        raise
    try:  # make the rename itself durable; not possible on every platform
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _write_error(path: Path, e: BaseException) -> WriteError:
    """The error for a failed write of ``path``: the OS's reason where the chain holds one (torch.save reports a
    full disk as 'unexpected pos ...', with the OSError only as its context), else the error itself."""
    cause, seen = e, set()
    while cause is not None and not (isinstance(cause, OSError) and cause.errno) and id(cause) not in seen:
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and cause.errno:
        reason = f"{cause.strerror or cause} (errno {cause.errno})"
    else:
        reason = f"{type(e).__name__}: {e}"
    return WriteError(f"could not write {path}: {reason}; the previous {path.name}, if any, is unchanged")


def write_text_atomic(path, text: str) -> None:
    """:func:`write_atomic` of ``text`` as UTF-8."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))
