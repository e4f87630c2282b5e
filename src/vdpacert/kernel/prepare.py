"""``prepare``: fill the cache with a bootable Debian 6.12 kernel, the vdpa_sim modules and an initramfs.

Each step says what it did and how long it took; each finished step leaves a stamp, so an
interrupted prepare resumes where it stopped and a second prepare does nothing (and says so).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from . import build as kbuild
from . import host, modinfo, packages
from .accel import choose_accel
from .cache import KernelBuild, Layout, find_build, write_atomic
from .errors import MissingPrerequisite, PrepareError
from .initramfs import GUEST_MODULES, base_archive, recipe
from .packages import KernelPackages
from .run import probe_kvm

Progress = Callable[[str], None]

#: Disk the first prepare needs: ~280 MB of packages, ~450 MB unpacked, 150 MB of transient source.
SPACE_NEEDED_MIB = 1200


def _quiet(line: str) -> None:
    pass


@contextmanager
def _step(progress: Progress, name: str) -> Iterator[list[str]]:
    """Time a step and report it with the notes the step appended."""
    start = time.monotonic()
    notes: list[str] = []
    yield notes
    progress(f"{name}: {'; '.join(notes) or 'done'} ({time.monotonic() - start:.1f} s)")


def prepare(cache: Path, *, progress: Progress = _quiet, refresh: bool = False, accel: str = "auto") -> KernelBuild:
    """Make the cache hold a bootable kernel; returns it. Cached: a second call does nothing.

    ``refresh`` asks apt (after ``apt-get update``) whether a newer 6.12 is out and prepares it if so.
    """
    layout = Layout(cache.expanduser().resolve())
    with layout.locked():
        existing = find_build(layout.cache)
        if existing is not None and not refresh:
            progress(f"already prepared: Linux {existing.release} (Debian {existing.version}) in {layout.cache}; "
                     "nothing to do (--refresh looks for a newer 6.12)")
            return existing
        start = time.monotonic()
        with _step(progress, "host tools") as notes:
            _require_debian()
            host.find_tools(host.PREPARE_TOOLS)
            qemu = ensure_qemu(progress)
            notes.append(f"apt, dpkg-deb, make, xz, objcopy, {qemu}")
        with _step(progress, "kernel version") as notes:
            kernel = packages.resolve(packages.apt_update, refresh=refresh)
            # Before 280 MB of downloads: the compiler the headers package depends on (gcc-12).
            compilers = [host.Tool(name, name, f"compiles the modules ({kernel.unpacked[1]} depends on it)")
                         for name in packages.compiler_packages(kernel)]
            host.find_tools(compilers)
            notes.append(f"Debian {kernel.version} (uname -r {kernel.release}), built with "
                         f"{', '.join(tool.command for tool in compilers) or 'an unnamed compiler'}")
        if existing is not None and existing.release == kernel.release and existing.qemu == qemu:
            progress(f"already prepared: Linux {kernel.release} is the newest apt offers; nothing to do")
            return existing
        host.check_space(layout.cache, SPACE_NEEDED_MIB if not layout.done(kernel.release, "unpack") else 50)
        debs = _download(layout, kernel, progress)
        _unpack(layout, kernel, debs, progress)
        compiler = _compiler(layout, kernel)
        _sources(layout, kernel, debs[packages.SOURCE_PACKAGE], progress)
        _build(layout, kernel, compiler, progress)
        _busybox(layout, debs[packages.BUSYBOX_PACKAGE], progress)
        order = _initramfs(layout, kernel, progress)
        result = KernelBuild(cache=layout.cache, version=kernel.version, release=kernel.release,
                             vmlinuz=layout.root(kernel.release) / "boot" / f"vmlinuz-{kernel.release}",
                             initramfs=layout.initramfs(kernel.release), modules=tuple(order), qemu=qemu,
                             recipe=recipe())
        write_atomic(layout.manifest(kernel.release), result.to_json())
        write_atomic(layout.current, kernel.release + "\n")
        with _step(progress, "accelerator") as notes:
            choice = choose_accel(accel, qemu=qemu, release=kernel.release, verdicts=layout.accel,
                                               probe=lambda: probe_kvm(result))
            notes.append(f"{choice.accel} ({choice.reason})")
        progress(f"prepared Linux {kernel.release} in {layout.cache} ({time.monotonic() - start:.1f} s in all)")
        return result


def _require_debian() -> None:
    """The kernel comes from Debian's archive through apt: say so plainly on any other host."""
    try:
        host.find_tools([host.APT_GET, host.APT_CACHE, host.DPKG_DEB])
    except MissingPrerequisite as error:
        raise MissingPrerequisite(error.what, "prepare needs a Debian bookworm host (apt and dpkg): the kernel, "
                                              "its headers and linux-source come from Debian's archive") from None


def ensure_qemu(progress: Progress) -> Path:
    """QEMU's path, installing ``qemu-system-x86`` with apt when it is missing and we are root.

    Installed rather than unpacked into the cache: QEMU links some thirty shared libraries, and
    apt is the only sane way to get their closure (busybox, static and dependency-free, is unpacked).
    """
    try:
        return host.find_tools([host.QEMU])[host.QEMU.command]
    except MissingPrerequisite:
        if not host.is_root():
            raise MissingPrerequisite("qemu-system-x86_64 not found",
                                      "as root, run: apt-get install --no-install-recommends qemu-system-x86") from None
    progress("installing qemu-system-x86 with apt-get (QEMU is missing) ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "qemu-system-x86"]
    try:
        host.run_tool(command, "apt-get install qemu-system-x86", env=env)
    except PrepareError:  # stale lists are the usual cause: update once and retry
        packages.apt_update()
        host.run_tool(command, "apt-get install qemu-system-x86", env=env)
    return host.find_tools([host.QEMU])[host.QEMU.command]


def _download(layout: Layout, kernel: KernelPackages, progress: Progress) -> dict[str, Path]:
    with _step(progress, "download") as notes:
        specs = [*kernel.pinned(), packages.BUSYBOX_PACKAGE]
        files, fetched = packages.download(specs, layout.debs)
        total = sum(path.stat().st_size for path in files.values())
        notes.append(f"{len(files)} packages, {fetched / 1e6:.1f} MB fetched"
                     + (f" ({(total - fetched) / 1e6:.1f} MB already in the cache)" if total != fetched else ""))
    return files


def _unpack(layout: Layout, kernel: KernelPackages, debs: dict[str, Path], progress: Progress) -> None:
    root = layout.root(kernel.release)
    with _step(progress, "unpack") as notes:
        if layout.done(kernel.release, "unpack") and root.is_dir():
            # A cache moved since: its include lines still name the old place.
            fixes = packages.fix_tree(root)
            notes.append("already unpacked" + (f", {len(fixes)} paths re-pointed" if fixes else ""))
            return
        packages.unpack([debs[name] for name in kernel.unpacked], root)
        fixes = packages.fix_tree(root)
        if not (root / "boot" / f"vmlinuz-{kernel.release}").is_file():
            raise PrepareError("unpack", f"linux-image-{kernel.release} holds no boot/vmlinuz-{kernel.release}")
        layout.mark(kernel.release, "unpack", "\n".join(fixes))
        notes.append(f"{len(kernel.unpacked)} packages with dpkg-deb -x; {len(fixes)} absolute paths made to "
                     "point inside the cache")


def _headers(layout: Layout, kernel: KernelPackages) -> Path:
    return layout.root(kernel.release) / "usr" / "src" / f"linux-headers-{kernel.release}"


def _compiler(layout: Layout, kernel: KernelPackages) -> Path:
    config = (layout.root(kernel.release) / "boot" / f"config-{kernel.release}").read_text()
    tool = host.compiler_tool(config)
    return host.find_tools([tool])[tool.command]


def _include_dirs(layout: Layout, kernel: KernelPackages) -> list[Path]:
    src = layout.root(kernel.release) / "usr" / "src"
    bases = [src / f"linux-headers-{kernel.abi}-common", _headers(layout, kernel)]
    subdirs = ("arch/x86/include", "arch/x86/include/generated", "include", "arch/x86/include/uapi",
               "arch/x86/include/generated/uapi", "include/uapi", "include/generated/uapi")
    return [base / sub for base in bases for sub in subdirs]


def _sources(layout: Layout, kernel: KernelPackages, source_deb: Path, progress: Progress) -> None:
    with _step(progress, "sources") as notes:
        if layout.done(kernel.release, "sources"):
            notes.append("already extracted")
            return
        dest = layout.modules(kernel.release)
        shutil.rmtree(dest, ignore_errors=True)
        taken = kbuild.extract_sources(source_deb, dest, _include_dirs(layout, kernel))
        layout.mark(kernel.release, "sources", "\n".join(taken))
        notes.append(f"{len(taken)} files from {source_deb.name}'s tarball: {', '.join(taken)}")


def _build(layout: Layout, kernel: KernelPackages, compiler: Path, progress: Progress) -> None:
    with _step(progress, "build") as notes:
        if layout.done(kernel.release, "build"):
            notes.append("already built")
            return
        built = kbuild.build_modules(_headers(layout, kernel), layout.modules(kernel.release), compiler)
        layout.mark(kernel.release, "build")
        notes.append(f"{', '.join(path.name for path in built)} with {compiler.name} (make M=, out of tree)")


def _busybox(layout: Layout, deb: Path, progress: Progress) -> None:
    with _step(progress, "busybox") as notes:
        directory = layout.busybox.parent.parent
        stamp = directory / ".from"
        if layout.busybox.is_file() and stamp.is_file() and stamp.read_text() == deb.name:
            notes.append("already unpacked")
            return
        packages.unpack([deb], directory)
        if not layout.busybox.is_file():
            raise PrepareError("busybox", f"{deb.name} holds no bin/busybox")
        write_atomic(stamp, deb.name)
        notes.append(f"{deb.name} unpacked (not installed: busybox-static conflicts with the busybox package)")


def _initramfs(layout: Layout, kernel: KernelPackages, progress: Progress) -> list[str]:
    with _step(progress, "initramfs") as notes:
        release_modules = layout.root(kernel.release) / "lib" / "modules" / kernel.release
        available = modinfo.index_tree(layout.modules(kernel.release), release_modules)
        builtin = modinfo.builtin_names((release_modules / "modules.builtin").read_text())
        try:
            order = modinfo.load_order(GUEST_MODULES, available, builtin)
        except modinfo.ModuleError as error:
            raise PrepareError("initramfs", str(error)) from error
        archive = base_archive(layout.busybox.read_bytes(),
                               [(name, modinfo.read_module(available[name])) for name in order])
        partial = layout.initramfs(kernel.release).with_name("initramfs.cpio.partial")
        partial.write_bytes(archive)
        partial.replace(layout.initramfs(kernel.release))
        notes.append(f"{len(archive) / 1e6:.1f} MB: busybox + {len(order)} modules ({' '.join(order)})")
    return order
