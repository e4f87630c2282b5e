"""Where prepare keeps what it downloads and builds, and the record of a finished prepare.

Layout (``CACHE`` is ``--cache``, else ``$VDPACERT_KERNEL_CACHE``, else ``~/.cache/vdpacert/kernel``)::

    CACHE/debs/                      the .deb files apt downloaded (kept: a re-prepare fetches nothing)
    CACHE/busybox/bin/busybox        busybox-static, unpacked (not installed: it conflicts with busybox)
    CACHE/<release>/root/            image + headers + kbuild, unpacked with dpkg-deb -x and fixed up
    CACHE/<release>/modules/         vringh.c and vdpa_sim/*.c, their Kbuild file and the built .ko
    CACHE/<release>/initramfs.cpio   busybox, modules, /init (each run appends its own small archive)
    CACHE/<release>/stamps/<step>    a step finished (an interrupted prepare resumes after it)
    CACHE/<release>/build.json       the finished build (:class:`KernelBuild`): what ``run`` boots
    CACHE/current                    the release ``run`` uses
    CACHE/accel.json                 whether KVM could run the kernel here (probed once per host/QEMU)
    CACHE/.lock                      taken by prepare, so parallel prepares do not race

Nothing goes into the repository, and nothing is installed on the host except QEMU.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import NotPrepared
from .initramfs import recipe

CACHE_ENV = "VDPACERT_KERNEL_CACHE"


def default_cache() -> Path:
    """``$VDPACERT_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/vdpacert/kernel``, else ``~/.cache/vdpacert/kernel``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vdpacert" / "kernel"


@dataclass(frozen=True)
class Layout:
    """The paths of one cache directory."""

    cache: Path

    @property
    def debs(self) -> Path:
        return self.cache / "debs"

    @property
    def busybox(self) -> Path:
        return self.cache / "busybox" / "bin" / "busybox"

    @property
    def current(self) -> Path:
        return self.cache / "current"

    @property
    def accel(self) -> Path:
        return self.cache / "accel.json"

    def release_dir(self, release: str) -> Path:
        return self.cache / release

    def root(self, release: str) -> Path:
        return self.release_dir(release) / "root"

    def modules(self, release: str) -> Path:
        return self.release_dir(release) / "modules"

    def initramfs(self, release: str) -> Path:
        return self.release_dir(release) / "initramfs.cpio"

    def manifest(self, release: str) -> Path:
        return self.release_dir(release) / "build.json"

    def stamp(self, release: str, step: str) -> Path:
        return self.release_dir(release) / "stamps" / step

    def done(self, release: str, step: str) -> bool:
        return self.stamp(release, step).exists()

    def mark(self, release: str, step: str, note: str = "") -> None:
        self.stamp(release, step).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.stamp(release, step), note)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise prepares on this cache (a second one waits, then finds the work done)."""
        self.cache.mkdir(parents=True, exist_ok=True)
        with open(self.cache / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def write_atomic(path: Path, text: str) -> None:
    """Write then rename, so a reader never sees half a file and a crash leaves the old one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


@dataclass(frozen=True)
class KernelBuild:
    """A prepared kernel: everything ``run`` needs to boot it."""

    cache: Path
    version: str  # Debian package version, e.g. 6.12.117-1~deb12u1
    release: str  # uname -r in the guest, e.g. 6.12.117+deb12-amd64
    vmlinuz: Path
    initramfs: Path
    modules: tuple[str, ...]  # in load order
    qemu: Path
    recipe: str = ""  # what the initramfs was made from (see initramfs.recipe); another one means redo it

    def to_json(self) -> str:
        fields = asdict(self)
        fields.update(cache=str(self.cache), vmlinuz=str(self.vmlinuz), initramfs=str(self.initramfs),
                      qemu=str(self.qemu), modules=list(self.modules))
        return json.dumps(fields, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> KernelBuild:
        fields = json.loads(text)
        return cls(cache=Path(fields["cache"]), version=fields["version"], release=fields["release"],
                   vmlinuz=Path(fields["vmlinuz"]), initramfs=Path(fields["initramfs"]),
                   modules=tuple(fields["modules"]), qemu=Path(fields["qemu"]), recipe=fields.get("recipe", ""))

    def missing(self) -> list[Path]:
        """Files the build names that are gone (a cache cleaned by hand, QEMU uninstalled)."""
        return [path for path in (self.vmlinuz, self.initramfs, self.qemu) if not path.exists()]


def load_build(cache: Path) -> KernelBuild:
    """The build ``run`` uses; an error saying to prepare when there is none or it is incomplete."""
    layout = Layout(cache)
    hint = f"run `vdpacert kernel prepare --cache {cache}` first"
    try:
        release = layout.current.read_text().strip()
        build = KernelBuild.from_json(layout.manifest(release).read_text())
    except (OSError, ValueError, KeyError) as error:
        raise NotPrepared(f"no prepared kernel in {cache}: {hint}") from error
    if build.recipe != recipe():
        raise NotPrepared(f"the kernel in {cache} was prepared by another version of vdpacert: {hint} "
                          "(it redoes only what changed)")
    if build.missing():
        raise NotPrepared(f"the kernel prepared in {cache} lacks {', '.join(map(str, build.missing()))}: {hint}")
    return build


def find_build(cache: Path) -> KernelBuild | None:
    try:
        return load_build(cache)
    except NotPrepared:
        return None
