"""Kernel module metadata (the ``.modinfo`` ELF section) and the order to ``insmod`` modules in.

Debian's image package ships no ``modules.dep`` (``depmod`` runs at install time, and we never
install), so the dependencies come from each module's own ``depends=`` field. Debian compresses
its modules with xz; busybox's ``insmod`` cannot be relied on to decompress, so modules are
decompressed on the host before they go into the initramfs.
"""

from __future__ import annotations

import lzma
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

#: Names of the module files a tree may hold, in the order they are tried.
SUFFIXES = (".ko", ".ko.xz")


class ModuleError(ValueError):
    """A module file is not a usable ELF64 kernel module, or a needed module is nowhere to be found."""


def module_name(path: Path | str) -> str:
    """The kernel's name of a module file: the stem, with '-' folded to '_' as the kernel does."""
    name = Path(path).name
    for suffix in SUFFIXES[::-1]:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def read_module(path: Path) -> bytes:
    """The module's ELF bytes, decompressed when the file is ``.ko.xz``."""
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """The ``key=value`` strings of the ``.modinfo`` section; a key may repeat (``alias``, ``parm``)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ModuleError("not a little-endian ELF64 file")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", elf, shoff + index * shentsize)
        return name, offset, size

    _, strtab, _ = section(shstrndx)
    for index in range(shnum):
        name_off, offset, size = section(index)
        end = elf.index(b"\0", strtab + name_off)
        if elf[strtab + name_off: end] == b".modinfo":
            info: dict[str, list[str]] = {}
            for entry in elf[offset: offset + size].split(b"\0"):
                key, sep, value = entry.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
            return info
    raise ModuleError("no .modinfo section (is this a kernel module?)")


def depends(elf: bytes) -> tuple[str, ...]:
    """The modules this one needs loaded first (the ``depends=`` field, comma-separated)."""
    fields = modinfo(elf).get("depends", [""])
    return tuple(name for name in fields[0].split(",") if name)


def index_tree(*roots: Path) -> dict[str, Path]:
    """Module name -> file, over every module under the roots; earlier roots win on a clash."""
    found: dict[str, Path] = {}
    for root in roots:
        for path in sorted(root.rglob("*.ko*")):
            if path.name.endswith(SUFFIXES):
                found.setdefault(module_name(path), path)
    return found


def builtin_names(modules_builtin: str) -> frozenset[str]:
    """The names listed in ``modules.builtin`` (compiled into the image: nothing to load)."""
    return frozenset(module_name(line.strip()) for line in modules_builtin.splitlines() if line.strip())


def load_order(wanted: Iterable[str], available: Mapping[str, Path], builtin: frozenset[str] = frozenset(),
               read: Callable[[Path], bytes] = read_module) -> list[str]:
    """Every wanted module and its dependencies, each after the ones it needs (a depth-first post-order).

    A wanted module that is built into the image is skipped; one that is neither built in nor in
    ``available`` is an error naming it, since the guest would fail later and less clearly.
    """
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, needed_by: str | None) -> None:
        name = name.replace("-", "_")
        if name in order or name in builtin:
            return
        if name in visiting:
            raise ModuleError(f"modules depend on each other in a cycle through {name}")
        if name not in available:
            by = f" (needed by {needed_by})" if needed_by else ""
            raise ModuleError(f"module {name}{by} is neither built into the kernel nor in the module tree")
        visiting.add(name)
        for dep in depends(read(available[name])):
            visit(dep, name)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name, None)
    return order
