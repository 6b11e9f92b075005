"""User code in recipes: ``"package.module:function"`` found in the recipe's folder, the current directory, then
the installed packages, whichever entry point started the process (the ``torchdkm`` script or ``python -m``)."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

from ..errors import ConfigError


def import_dirs(folder: Optional[str] = None) -> List[str]:
    """Where user modules of a recipe are found first: the recipe's folder, then the current directory."""
    dirs = [str(Path(folder).resolve())] if folder else []
    return list(dict.fromkeys(dirs + [os.getcwd()]))


def resolve_function(ref: str, where: str, folder: Optional[str] = None) -> Callable:
    """``"package.module:function"`` -> the function. The recipe's ``folder`` and the current directory are put
    in front of ``sys.path`` (as ``python -m`` does for the current directory), for every entry point."""
    module_name, _, attr = ref.partition(":")
    dirs = import_dirs(folder)
    sys.path[:0] = [d for d in dirs if d not in sys.path]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        missing = getattr(e, "name", None)
        if missing and module_name.split(".")[0] == missing.split(".")[0]:  # the module itself is not there
            raise ConfigError(f"{where}={ref!r}: cannot import module {module_name!r}: looked in "
                              f"{' and '.join(dirs)} (the recipe's folder and the current directory), then in the "
                              f"installed packages") from None
        raise ConfigError(f"{where}={ref!r}: module {module_name!r} failed to import ({type(e).__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{where}={ref!r}: module {module_name!r} has no function {attr!r}")
    return fn
