"""Build glue: map the product folders into one ``vdpacert`` package and compile ``impl/``.

The repository keeps each product part in a top-level folder (``model/``, ``impl/``,
``conformance/``, ``migration/``) and the small root package (CLI, version, UAPI constants)
in ``src/vdpacert``. ``package_dir`` maps them all under ``vdpacert``, so nothing is ever
installed as a top-level ``model`` or ``impl`` module.

Cython needs to see that layout too, to resolve ``cimport vdpacert.impl.x`` against the
``.pxd`` files: a staging include tree ``build/cython-include/vdpacert/impl`` holds copies of
them under their package path.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import Extension, find_packages, setup

ROOT = Path(__file__).parent.resolve()

#: package name -> folder, relative to the project root (setuptools wants relative paths).
PACKAGE_DIRS = {
    "vdpacert": "src/vdpacert",
    "vdpacert.model": "model",
    "vdpacert.impl": "impl",
    "vdpacert.conformance": "conformance",
    "vdpacert.migration": "migration",
}


def packages() -> list[str]:
    found = []
    for package, folder in PACKAGE_DIRS.items():
        found.append(package)
        found += [f"{package}.{sub}" for sub in find_packages(str(ROOT / folder))]
    return sorted(set(found))


def cython_include_tree() -> Path:
    """Copy impl/*.pxd under vdpacert/impl/ so Cython resolves package-qualified cimports."""
    staging = ROOT / "build" / "cython-include"
    target = staging / "vdpacert" / "impl"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    (staging / "vdpacert" / "__init__.pxd").touch()
    (target / "__init__.pxd").touch()
    for pxd in (ROOT / "impl").glob("*.pxd"):
        shutil.copy2(pxd, target / pxd.name)
    return staging


def sanitizers() -> str:
    """``VDPACERT_SANITIZE`` (e.g. ``address,undefined``): build the extensions with these gcc sanitizers."""
    return os.environ.get("VDPACERT_SANITIZE", "").strip()


def extensions() -> list[Extension]:
    from Cython.Build import cythonize

    sanitize = sanitizers()
    compile_args = ["-O2", "-fno-strict-aliasing"]
    link_args: list[str] = []
    if sanitize:
        # Every report aborts (no "recover and go on"), so a sanitizer finding can never pass as a green run.
        flags = [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
        compile_args = ["-O1", *flags]
        link_args = flags
    #: (package, folder) of every package with Cython modules: the reference implementation, the
    #: migration's dirty-bitmap scanner, and the benchmark's C baseline.
    compiled = (("vdpacert.impl", "impl"), ("vdpacert.migration", "migration"),
                ("vdpacert.bench", "src/vdpacert/bench"))
    modules = [
        Extension(
            f"{package}.{pyx.stem}",
            [f"{folder}/{pyx.name}"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )
        for package, folder in compiled
        for pyx in sorted((ROOT / folder).glob("*.pyx"))
    ]
    return cythonize(
        modules,
        include_path=[str(cython_include_tree())],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
        build_dir="build/cython",
    )


setup(
    package_dir=PACKAGE_DIRS,
    packages=packages(),
    package_data={"vdpacert": ["py.typed"], "vdpacert.impl": ["*.pxd", "*.pyi"], "vdpacert.bench": ["*.pyi"],
                  "vdpacert.migration": ["*.pyi", "scenarios/*.toml", "scenarios/linux/*.toml"],
                  "vdpacert.fuzz": ["corpus/*/*"]},
    ext_modules=extensions(),
    # A sanitizer build keeps its objects apart: setuptools reuses up-to-date objects of the build tree, and a
    # plain object linked into a "sanitized" wheel would silently check nothing.
    options={"build": {"build_base": f"build/sanitize-{sanitizers().replace(',', '-')}"}} if sanitizers() else {},
)
