"""A writer for the ``newc`` cpio format, the one the Linux kernel unpacks as an initramfs.

Written here rather than calling ``cpio``/``bsdcpio`` so the harness needs no extra host tool and
every archive is byte-reproducible (fixed mtimes, owners and inode numbers): the base initramfs
can be cached and compared, and the per-run archive appended to it in a few microseconds.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


def _pad4(size: int) -> bytes:
    return b"\0" * (-size % 4)


@dataclass
class CpioWriter:
    """Collects entries and renders one ``newc`` archive; directories are added for every parent."""

    _entries: list[tuple[str, int, bytes]] = field(default_factory=list)
    _dirs: set[str] = field(default_factory=set)
    _rdev: dict[str, tuple[int, int]] = field(default_factory=dict)

    def directory(self, path: str, mode: int = 0o755) -> None:
        path = _relative(path)
        if path in self._dirs or not path:
            return
        parent = path.rpartition("/")[0]
        if parent:
            self.directory(parent)
        self._dirs.add(path)
        self._entries.append((path, stat.S_IFDIR | mode, b""))

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = _relative(path)
        self._parents(path)
        self._entries.append((path, stat.S_IFREG | mode, data))

    def symlink(self, path: str, target: str) -> None:
        path = _relative(path)
        self._parents(path)
        self._entries.append((path, stat.S_IFLNK | 0o777, target.encode()))

    def device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        """A character device node: the kernel opens /dev/console from the archive before /init runs."""
        path = _relative(path)
        self._parents(path)
        self._entries.append((path, stat.S_IFCHR | mode, b""))
        self._rdev[path] = (major, minor)

    def _parents(self, path: str) -> None:
        parent = path.rpartition("/")[0]
        if parent:
            self.directory(parent)

    def render(self) -> bytes:
        """The archive with its trailer; ino numbers count from 1 so no two entries look hard-linked."""
        out = bytearray()
        for ino, (name, mode, data) in enumerate([*self._entries, (TRAILER, 0, b"")], start=1):
            encoded = name.encode() + b"\0"
            nlink = 2 if stat.S_ISDIR(mode) else 1
            rdev_major, rdev_minor = self._rdev.get(name, (0, 0))
            fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev_major, rdev_minor, len(encoded), 0)
            header = MAGIC + b"".join(b"%08X" % value for value in fields)
            out += header + encoded + _pad4(len(header) + len(encoded)) + data + _pad4(len(data))
        return bytes(out)


def _relative(path: str) -> str:
    """The kernel takes names relative to the root; reject ``..`` so an entry cannot escape it."""
    parts = [part for part in path.split("/") if part and part != "."]
    if ".." in parts:
        raise ValueError(f"cpio entry {path!r} climbs out of the archive")
    return "/".join(parts)
