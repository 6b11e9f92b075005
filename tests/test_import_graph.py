"""The package's imports point one way: app -> export / serialization -> core, and never at the package face.

Every ``import`` statement of every module under src/torchdkm is read with ``ast`` (function-level imports
included) and resolved to the torchdkm module it loads.
"""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "torchdkm"


def module_names(src: Path, package: str = PACKAGE) -> dict:
    """{dotted module name: file} of every module of ``package`` under ``src`` (a package is its __init__)."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, modules: dict, package: str = PACKAGE) -> set:
    """The modules of ``package`` that module ``name`` imports anywhere in its body."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]  # the package a relative import starts from
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == package)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != package:
                continue
            for alias in node.names:  # `from pkg import sub` loads the submodule, `from pkg import name` the face
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return found


def layer(name: str, package: str = PACKAGE) -> int:
    """0 core, 1 export and serialization, 2 app and the ``python -m`` entry; the package face is not layered."""
    part = name.split(".")[1] if "." in name else ""
    if part in ("app", "__main__"):
        return 2
    if part in ("export", "serialization"):
        return 1
    return 0


def problems(src: Path, package: str = PACKAGE) -> list:
    """Every import that breaks the rules, as readable lines (empty when the graph is clean)."""
    modules = module_names(src, package)
    graph = {name: imports(name, path, modules, package) for name, path in modules.items()}
    out = []
    for name, targets in sorted(graph.items()):
        for target in sorted(targets):
            if name == package:
                continue  # the face imports what it exports
            if target == package:
                out.append(f"{name} imports the package face {package}")
            elif layer(target, package) > layer(name, package):
                out.append(f"{name} (layer {layer(name, package)}) imports {target} (layer {layer(target, package)})")
    out += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph, package)]
    return out


def cycles(graph: dict, package: str = PACKAGE) -> list:
    """Cycles among modules (the package face left out: every module implicitly loads it first)."""
    edges = {a: sorted(b for b in bs if b in graph and b != package) for a, bs in graph.items() if a != package}
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in edges.get(node, ()):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    return found


def test_imports_point_one_way_with_no_cycle():
    assert problems(SRC) == []


def test_the_graph_is_read_at_all():
    modules = module_names(SRC)
    assert {"torchdkm.functional", "torchdkm.app.cli", "torchdkm.app.zoo.data", "torchdkm.export.onnx"} <= set(modules)
    job = imports("torchdkm.app.job", modules["torchdkm.app.job"], modules)
    assert {"torchdkm.api", "torchdkm.app.distributed", "torchdkm.stats"} <= job  # `from . import distributed`


def _write(root: Path, files: dict) -> Path:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize("files, expected", [
    ({"core.py": "def f():\n    from .app import cli\n"}, "pkg.core (layer 0) imports pkg.app.cli (layer 2)"),
    ({"core.py": "from .export.onnx import x\n"}, "pkg.core (layer 0) imports pkg.export.onnx (layer 1)"),
    ({"serialization.py": "import pkg.app.cli\n"}, "pkg.serialization (layer 1) imports pkg.app.cli (layer 2)"),
    ({"export/onnx.py": "from ..app.cli import main\n"}, "pkg.export.onnx (layer 1) imports pkg.app.cli (layer 2)"),
    ({"core.py": "from . import __version__\n"}, "pkg.core imports the package face pkg"),
    ({"app/cli.py": "from pkg import save\n"}, "pkg.app.cli imports the package face pkg"),
    ({"a.py": "from . import b\n", "b.py": "def g():\n    from .a import x\n"}, "import cycle: pkg.a -> pkg.b -> pkg.a"),
])
def test_the_checker_catches_each_kind_of_violation(tmp_path, files, expected):
    base = {"__init__.py": "from .core import f\n", "core.py": "", "serialization.py": "", "a.py": "", "b.py": "",
            "app/__init__.py": "", "app/cli.py": "", "export/__init__.py": "", "export/onnx.py": ""}
    src = _write(tmp_path, {**base, **files})
    assert expected in problems(src, "pkg")
    assert problems(_write(tmp_path / "clean", base), "pkg") == []
