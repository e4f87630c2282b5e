"""The ``.pyi`` stubs of the compiled modules say what the modules really export.

Cython modules carry no type information, so ``mypy --strict`` trusts a hand-written ``.pyi``
beside each ``.pyx``. A stub that drifts from its module is worse than none: mypy then approves
calls that fail at run time. This is the drift check: for every compiled module, each public
name the stub declares exists on the module (with the same parameters and, for ``Final``
constants, the same value), and each public name the module defines is declared in the stub.
The stubs are read from the repository with ``ast``; the modules are the compiled ones, imported.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: package -> folder of every package with Cython modules (as setup.py compiles them).
COMPILED_PACKAGES = {"vdpacert.impl": ROOT / "impl", "vdpacert.migration": ROOT / "migration",
                     "vdpacert.bench": ROOT / "src" / "vdpacert" / "bench"}

#: (module name, .pyx path) of every compiled module.
COMPILED = sorted((f"{package}.{pyx.stem}", pyx)
                  for package, folder in COMPILED_PACKAGES.items() for pyx in folder.glob("*.pyx"))

#: A top-level ``NAME = ...`` of a .pyx: a Python-visible module attribute the module itself defines
#: (``cdef`` globals and imports are not matched).
PYX_ASSIGNMENT = re.compile(r"^([A-Za-z]\w*)\s*=", re.MULTILINE)


def public(name: str) -> bool:
    return not name.startswith("_")


def stub_tree(pyx: Path) -> ast.Module:
    return ast.parse(pyx.with_suffix(".pyi").read_text(), filename=str(pyx.with_suffix(".pyi")))


def declared(body: list[ast.stmt]) -> dict[str, ast.stmt]:
    """Names a module or class body declares (defs, classes, annotated and plain assignments; no imports)."""
    names: dict[str, ast.stmt] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        elif isinstance(node, ast.Assign):
            names.update((target.id, node) for target in node.targets if isinstance(target, ast.Name))
    return names


def is_property(node: ast.stmt) -> bool:
    return isinstance(node, ast.FunctionDef) and any(
        isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list)


def is_classmethod(node: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "classmethod" for d in node.decorator_list)


def load(name: str) -> ModuleType:
    return importlib.import_module(name)


def stub_parameters(node: ast.FunctionDef, method: bool) -> list[tuple[str, str, bool, object]]:
    """``(name, kind, has_default, default)`` per parameter, as inspect reports them (``method``: drop the first)."""
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    kinds = ["POSITIONAL_ONLY"] * len(args.posonlyargs) + ["POSITIONAL_OR_KEYWORD"] * len(args.args)
    rows = [(a.arg, kind, d) for a, kind, d in zip(positional, kinds, defaults, strict=True)]
    if args.vararg:
        rows.append((args.vararg.arg, "VAR_POSITIONAL", None))
    rows += [(a.arg, "KEYWORD_ONLY", d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)]
    if args.kwarg:
        rows.append((args.kwarg.arg, "VAR_KEYWORD", None))
    if method:
        rows = rows[1:]
    return [(name, kind, d is not None, literal(d)) for name, kind, d in rows]


def literal(node: ast.expr | None) -> object:
    if node is None or (isinstance(node, ast.Constant) and node.value is Ellipsis):
        return Ellipsis  # no default, or a default the stub does not spell out
    return ast.literal_eval(node)


def runtime_parameters(func: Any) -> list[tuple[str, str, bool, object]] | None:
    """The same rows from the compiled function, or None when Cython gives no signature (slot wrappers)."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return None
    params = list(signature.parameters.values())
    if [p.kind.name for p in params[-2:]] == ["VAR_POSITIONAL", "VAR_KEYWORD"] and len(params) <= 3:
        return None  # ``(self, /, *args, **kwargs)``: a wrapper that hides the real parameters
    return [(p.name, p.kind.name, p.default is not p.empty, p.default) for p in params]


def assert_same_parameters(where: str, node: ast.FunctionDef, func: Any, method: bool) -> None:
    actual = runtime_parameters(func)
    if actual is None:
        return
    expected = stub_parameters(node, method)
    assert [row[:3] for row in expected] == [row[:3] for row in actual], f"{where}: parameters differ"
    for (name, _, has_default, default), runtime in zip(expected, actual, strict=True):
        if has_default and default is not Ellipsis:
            assert default == runtime[3], f"{where}: default of {name} is {runtime[3]!r}, stub says {default!r}"


def split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [part.strip() for part in [*parts, current] if part.strip()]


def pyx_constructor(pyx: Path, cname: str) -> ast.FunctionDef | None:
    """The constructor of ``cdef class cname`` in the .pyx (``__init__``, else ``__cinit__``), as a Python def.

    Cython hides a ``cdef class`` constructor's signature from ``inspect``, so it is read from the
    source: C types and ``not None`` are dropped, names, ``*`` markers and defaults kept.
    """
    source = pyx.read_text()
    start = re.search(rf"^cdef class {cname}\b.*:$", source, re.MULTILINE)
    assert start, f"no cdef class {cname} in {pyx.name}"
    end = re.search(r"^\S", source[start.end():], re.MULTILINE)
    body = source[start.end():start.end() + end.start() if end else len(source)]
    found = [re.search(rf"^    def {method}\((.*?)\):", body, re.MULTILINE | re.DOTALL)
             for method in ("__init__", "__cinit__")]
    match = found[0] or found[1]
    if match is None:
        return None
    params = []
    for param in split_top_level(match.group(1)):
        left, eq, default = param.partition("=")
        left = left.replace(" not None", "").strip()
        name = left if left.startswith("*") else re.findall(r"\w+", left)[-1]
        params.append(f"{name}={default.strip()}" if eq else name)
    node = ast.parse(f"def {cname}({', '.join(params)}): pass").body[0]
    assert isinstance(node, ast.FunctionDef)
    return node


def exception_sample(cls: type[BaseException], init: ast.FunctionDef) -> BaseException:
    """An instance built from the stub's ``__init__`` annotations, to see its instance attributes."""
    samples = {"int": 0, "str": "x", "bytes": b""}
    args = []
    for arg in init.args.args[1:len(init.args.args) - len(init.args.defaults)]:
        annotation = ast.unparse(arg.annotation) if arg.annotation else ""
        assert annotation in samples, f"{cls.__name__}.__init__: no sample value for {annotation!r}"
        args.append(samples[annotation])
    return cls(*args)


def test_every_compiled_module_has_a_stub() -> None:
    assert len(COMPILED) >= 8
    missing = [str(pyx.relative_to(ROOT)) for _, pyx in COMPILED if not pyx.with_suffix(".pyi").exists()]
    assert not missing, f"compiled modules without a .pyi stub: {missing}"


@pytest.mark.parametrize(("name", "pyx"), COMPILED, ids=[name for name, _ in COMPILED])
def test_stub_declares_only_what_the_module_has(name: str, pyx: Path) -> None:
    module = load(name)
    absent = [n for n in declared(stub_tree(pyx).body) if public(n) and not hasattr(module, n)]
    assert not absent, f"{name}.pyi declares names the module does not have: {absent}"


@pytest.mark.parametrize(("name", "pyx"), COMPILED, ids=[name for name, _ in COMPILED])
def test_module_defines_nothing_the_stub_leaves_out(name: str, pyx: Path) -> None:
    module = load(name)
    stub = declared(stub_tree(pyx).body)
    own = {n for n, value in vars(module).items()
           if public(n) and callable(value) and getattr(value, "__module__", None) == name}
    own |= {n for n in PYX_ASSIGNMENT.findall(pyx.read_text()) if public(n)}
    assert own, f"{name} has no public names at all: is it the compiled module?"
    undeclared = sorted(own - set(stub))
    assert not undeclared, f"{name} defines public names its stub does not declare: {undeclared}"


@pytest.mark.parametrize(("name", "pyx"), COMPILED, ids=[name for name, _ in COMPILED])
def test_final_constants_have_the_module_values(name: str, pyx: Path) -> None:
    module = load(name)
    for node in stub_tree(pyx).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            stub_value = ast.literal_eval(node.value)
            assert getattr(module, node.target.id) == stub_value, f"{name}.{node.target.id} differs from its stub"


@pytest.mark.parametrize(("name", "pyx"), COMPILED, ids=[name for name, _ in COMPILED])
def test_functions_have_the_stub_parameters(name: str, pyx: Path) -> None:
    module = load(name)
    for fname, node in declared(stub_tree(pyx).body).items():
        if isinstance(node, ast.FunctionDef) and public(fname):
            assert_same_parameters(f"{name}.{fname}", node, getattr(module, fname), method=False)


@pytest.mark.parametrize(("name", "pyx"), COMPILED, ids=[name for name, _ in COMPILED])
def test_classes_match_their_stubs(name: str, pyx: Path) -> None:
    module = load(name)
    for cname, cnode in declared(stub_tree(pyx).body).items():
        if not isinstance(cnode, ast.ClassDef):
            continue
        cls = getattr(module, cname)
        assert isinstance(cls, type), f"{name}.{cname} is declared as a class but is {cls!r}"
        members = declared(cnode.body)
        instance: object = cls
        init = members.get("__init__")
        if issubclass(cls, BaseException) and isinstance(init, ast.FunctionDef):
            instance = exception_sample(cls, init)  # exceptions set their attributes in __init__
        absent = [m for m in members if public(m) and not hasattr(instance, m)]
        assert not absent, f"{name}.{cname}: the stub declares members the class does not have: {absent}"
        undeclared = sorted(m for m in vars(cls) if public(m) and m not in members)
        assert not undeclared, f"{name}.{cname}: members missing from the stub: {undeclared}"
        constructor = pyx_constructor(pyx, cname) if not issubclass(cls, BaseException) else None
        if constructor is not None:
            assert isinstance(init, ast.FunctionDef), f"{name}.{cname}: the stub has no __init__"
            expected = stub_parameters(constructor, method=False)
            assert stub_parameters(init, method=False) == expected, f"{name}.{cname}.__init__ differs from the .pyx"
        for mname, mnode in members.items():
            if not isinstance(mnode, ast.FunctionDef) or is_property(mnode):
                continue
            if public(mname) or mname == "__init__":
                # Looked up on the class, a method keeps ``self`` and a classmethod is bound (no ``cls``).
                assert_same_parameters(f"{name}.{cname}.{mname}", mnode, getattr(cls, mname),
                                       method=is_classmethod(mnode))
