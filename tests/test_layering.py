"""The architecture rules, checked on the source: the model is pure, and impl never reads the model.

A bug copied into both the model and the reference implementation can never be caught, so
``impl/`` must not import behaviour from ``model/``; both may take plain numbers from
``vdpacert.uapi``. The model must do no I/O, so it can be replayed, solved and trusted.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Modules whose import in model/ would mean I/O, concurrency or clocks.
IO_MODULES = {"os", "io", "socket", "fcntl", "mmap", "select", "selectors", "subprocess", "threading",
              "multiprocessing", "asyncio", "time", "pathlib", "shutil", "tempfile", "signal", "ctypes"}
#: Packages model/ must not depend on.
UPPER_LAYERS = ("vdpacert.impl", "vdpacert.conformance", "vdpacert.migration")


def imported_names(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against vdpacert.model
                names.add("vdpacert.model" + ("." + node.module if node.module else ""))
            elif node.module:
                names.add(node.module)
    return names


MODEL_FILES = sorted((ROOT / "model").rglob("*.py"))


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.name)
def test_model_does_no_io_and_imports_no_upper_layer(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    for name in imported_names(tree):
        assert name.split(".")[0] not in IO_MODULES, f"{path.name} imports {name}"
        assert not name.startswith(UPPER_LAYERS), f"{path.name} imports {name}"
    calls = {node.func.id for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert not calls & {"open", "print", "input", "exec", "eval"}, f"{path.name} calls {calls & {'open', 'print'}}"


IMPL_FILES = sorted(p for p in (ROOT / "impl").rglob("*") if p.suffix in {".py", ".pyx", ".pxd"})
MODEL_IMPORT = re.compile(r"^\s*(from|import|cimport)\s+(vdpacert\.model|\.+model)\b", re.M)
MODEL_FROM_PACKAGE = re.compile(r"^\s*from\s+(vdpacert|\.\.)\s+c?import\s+.*\bmodel\b", re.M)


@pytest.mark.parametrize("path", IMPL_FILES, ids=lambda p: p.name)
def test_impl_never_imports_the_model(path: Path) -> None:
    source = path.read_text()
    assert not MODEL_IMPORT.search(source), f"{path.name} imports the model"
    assert not MODEL_FROM_PACKAGE.search(source), f"{path.name} imports the model"


def test_the_scans_see_files() -> None:
    assert len(MODEL_FILES) > 10
    assert any(p.suffix == ".pyx" for p in IMPL_FILES)
