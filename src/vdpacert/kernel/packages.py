"""Debian's 6.12 kernel packages: pick a version, download them with apt, unpack them without installing.

All five packages are pinned to one Debian version so the headers match the image the modules are
loaded into (a module built against other headers is refused by the kernel's modversions check).
``apt-get download`` fetches into the cache without touching the host's package state, and
``dpkg-deb -x`` unpacks into a private root, whose absolute symlinks and include lines (written for
an installed kernel under ``/usr/src``) are then pointed into that root so the tree builds.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import host
from .errors import MissingPrerequisite, PrepareError

SERIES = "6.12"
FLAVOUR = "amd64"
#: The metapackage whose Depends names the newest image of the series (and so its ABI name).
META_PACKAGE = f"linux-image-{SERIES}-{FLAVOUR}"
SOURCE_PACKAGE = f"linux-source-{SERIES}"
BUSYBOX_PACKAGE = "busybox-static"


@dataclass(frozen=True)
class KernelPackages:
    """One Debian kernel version and the names of the packages the harness takes from it."""

    version: str  # the Debian version, e.g. 6.12.117-1~deb12u1
    abi: str  # the ABI name, e.g. 6.12.117+deb12
    flavour: str = FLAVOUR

    @property
    def release(self) -> str:
        """What ``uname -r`` says in the guest, and the name of its /lib/modules directory."""
        return f"{self.abi}-{self.flavour}"

    @property
    def unpacked(self) -> tuple[str, ...]:
        """The packages unpacked into the private root: the image, its headers and the kbuild tools."""
        return (f"linux-image-{self.release}", f"linux-headers-{self.release}", f"linux-headers-{self.abi}-common",
                f"linux-kbuild-{self.abi}")

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.unpacked, SOURCE_PACKAGE)

    def pinned(self) -> list[str]:
        """``name=version`` for apt, so nothing drifts to another version between the packages."""
        return [f"{name}={self.version}" for name in self.names]


# --- Debian version ordering (Debian Policy §5.6.12) -------------------------------------------------

def _order(char: str) -> int:
    # '~' sorts before everything, even the end of the string; letters before other symbols.
    if char == "~":
        return -1
    if char.isalpha():
        return ord(char)
    return ord(char) + 256


NON_DIGITS = re.compile(r"[^0-9]*")
DIGITS = re.compile(r"[0-9]*")


def _leading(pattern: re.Pattern[str], text: str) -> str:
    match = pattern.match(text)
    return match.group(0) if match else ""


def _compare_part(a: str, b: str) -> int:
    """Alternate non-digit runs (compared char by char in dpkg's order) and digit runs (as numbers)."""
    while a or b:
        a_text, b_text = _leading(NON_DIGITS, a), _leading(NON_DIGITS, b)
        for i in range(max(len(a_text), len(b_text))):
            ca = _order(a_text[i]) if i < len(a_text) else 0
            cb = _order(b_text[i]) if i < len(b_text) else 0
            if ca != cb:
                return -1 if ca < cb else 1
        a, b = a[len(a_text):], b[len(b_text):]
        a_num, b_num = _leading(DIGITS, a), _leading(DIGITS, b)
        if int(a_num or 0) != int(b_num or 0):
            return -1 if int(a_num or 0) < int(b_num or 0) else 1
        a, b = a[len(a_num):], b[len(b_num):]
    return 0


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as Debian version ``a`` sorts before, equal to or after ``b`` (as ``dpkg --compare-versions``)."""

    def split(version: str) -> tuple[int, str, str]:
        epoch, _, rest = version.rpartition(":") if ":" in version else ("0", "", version)
        upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "0")
        return int(epoch or 0), upstream, revision

    ea, ua, ra = split(a)
    eb, ub, rb = split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _compare_part(ua, ub) or _compare_part(ra, rb)


def newest(versions: Iterable[str]) -> str | None:
    best: str | None = None
    for version in versions:
        if best is None or compare_versions(version, best) > 0:
            best = version
    return best


# --- apt ----------------------------------------------------------------------------------------------

def stanzas(text: str) -> list[dict[str, str]]:
    """The paragraphs of ``apt-cache show`` output as dicts (continuation lines joined)."""
    out: list[dict[str, str]] = []
    for block in re.split(r"\n\s*\n", text.strip()):
        fields: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            out.append(fields)
    return out


def choose(meta_text: str, source_text: str) -> KernelPackages:
    """The newest version both the image metapackage and linux-source offer, with the image's ABI name.

    The ABI name (``6.12.117+deb12``) is not derivable from the version string, so it is read from
    the metapackage's dependency on the versioned image package.
    """
    abis: dict[str, str] = {}
    for fields in stanzas(meta_text):
        version = fields.get("Version", "")
        match = re.search(rf"linux-image-(\S+)-{FLAVOUR} \(= {re.escape(version)}\)", fields.get("Depends", ""))
        if version and match:
            abis[version] = match.group(1)
    sources = {fields["Version"] for fields in stanzas(source_text) if "Version" in fields}
    best = newest(set(abis) & sources)
    if best is None:
        offered = ", ".join(sorted(abis)) or "none"
        raise MissingPrerequisite(
            f"apt offers no {SERIES} kernel with a matching {SOURCE_PACKAGE} (images: {offered}; "
            f"sources: {', '.join(sorted(sources)) or 'none'})",
            "add Debian's bookworm-security suite to apt's sources (deb http://deb.debian.org/debian-security "
            "bookworm-security main) and run apt-get update")
    return KernelPackages(version=best, abi=abis[best])


def compiler_packages(kernel: KernelPackages) -> list[str]:
    """The ``gcc-N`` packages the headers package depends on: Debian pins the kernel's own compiler."""
    text = host.run_tool(["apt-cache", "show", f"{kernel.unpacked[1]}={kernel.version}"],
                         f"apt-cache show {kernel.unpacked[1]}")
    return compilers_in(stanzas(text)[0].get("Depends", "") if text.strip() else "")


def compilers_in(depends: str) -> list[str]:
    return sorted(set(re.findall(r"(?<![\w.+-])(gcc-\d+)(?![\w.+-])", depends)))


def resolve(update: Callable[[], None], *, refresh: bool = False) -> KernelPackages:
    """Ask apt for the newest 6.12 kernel; run ``apt-get update`` first on request or when apt knows none."""
    if refresh:
        update()

    def show(name: str) -> str:
        try:
            return host.run_tool(["apt-cache", "show", name], f"apt-cache show {name}")
        except PrepareError:  # "No packages found": the lists may be missing or stale
            return ""

    meta, source = show(META_PACKAGE), show(SOURCE_PACKAGE)
    if not (meta and source) and not refresh:
        update()
        meta, source = show(META_PACKAGE), show(SOURCE_PACKAGE)
    return choose(meta, source)


def apt_update() -> None:
    """``apt-get update``, which only root may run; a clear error otherwise."""
    if not host.is_root():
        raise MissingPrerequisite("apt's package lists lack Debian's 6.12 kernel (or are stale)",
                                  "run `apt-get update` as root, then prepare again")
    host.run_tool(["apt-get", "update"], "apt-get update")


@dataclass(frozen=True)
class Download:
    """One file ``apt-get download --print-uris`` says it would fetch."""

    url: str
    filename: str
    size: int
    checksum: str


def parse_print_uris(text: str) -> list[Download]:
    out = []
    for line in text.splitlines():
        match = re.match(r"'([^']+)' (\S+) (\d+) (\S+)", line.strip())
        if match:
            out.append(Download(match[1], match[2], int(match[3]), match[4]))
    return out


def _apt_options() -> list[str]:
    # As root apt drops to the _apt user to download, which cannot write a root-owned cache and
    # only warns before going on unsandboxed: say so up front instead.
    return ["-o", "APT::Sandbox::User=root"] if host.is_root() else []


def download(specs: Sequence[str], dest: Path) -> tuple[dict[str, Path], int]:
    """Fetch ``name=version`` specs into ``dest`` unless already there; returns name -> file and bytes fetched."""
    dest.mkdir(parents=True, exist_ok=True)
    planned = parse_print_uris(host.run_tool(["apt-get", *_apt_options(), "download", "--print-uris", *specs],
                                             "apt-get download --print-uris"))
    by_name: dict[str, Download] = {}
    for spec in specs:
        name = spec.partition("=")[0]
        matches = [item for item in planned if item.filename.startswith(f"{name}_")]
        if not matches:
            raise PrepareError("apt-get download", f"apt did not plan a download for {spec}")
        by_name[name] = matches[0]
    missing = [spec for spec in specs if not _present(dest / by_name[spec.partition("=")[0]].filename,
                                                       by_name[spec.partition("=")[0]].size)]
    if missing:
        host.run_tool(["apt-get", *_apt_options(), "download", *missing], "apt-get download", cwd=dest)
    files = {name: dest / item.filename for name, item in by_name.items()}
    for name, path in files.items():
        if not _present(path, by_name[name].size):
            raise PrepareError("apt-get download", f"{path.name} is missing or has the wrong size after download")
    fetched = sum(by_name[spec.partition("=")[0]].size for spec in missing)
    return files, fetched


def _present(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def unpack(debs: Iterable[Path], root: Path) -> None:
    """``dpkg-deb -x`` every package into a fresh ``root`` (built aside and renamed, so never half there)."""
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for deb in debs:
        host.run_tool(["dpkg-deb", "-x", deb, partial], f"unpacking {deb.name}")
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)


def _inside(root: Path, target: str) -> Path:
    """Where an absolute path of an installed kernel lies in ``root``.

    What follows ``/usr/src/`` is kept, so a tree fixed in a cache that later moved is fixed again.
    """
    if "/usr/src/" in target:
        return root / "usr" / "src" / target.rpartition("/usr/src/")[2]
    return root / target.lstrip("/")


INCLUDE_LINE = re.compile(r"^include\s+(/\S+)\s*$", re.M)


def fix_tree(root: Path) -> list[str]:
    """Point what an installed kernel finds at ``/`` into ``root``; returns what was changed.

    - absolute symlinks (``lib/modules/R/build -> /usr/src/linux-headers-R``) become relative ones
      inside root;
    - a headers Makefile's ``include /usr/src/linux-headers-X-common/Makefile`` names root's copy.
      The rewrite is idempotent: an include already inside root is left alone.
    """
    changed: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            link = Path(dirpath, name)
            if link.is_symlink():
                target = os.readlink(link)
                if target.startswith("/"):
                    inside = root / target.lstrip("/")
                    link.unlink()
                    link.symlink_to(os.path.relpath(inside, link.parent))
                    changed.append(f"symlink {link.relative_to(root)} -> {target} made relative")
    for makefile in sorted((root / "usr" / "src").glob("linux-headers-*/Makefile")):
        text = makefile.read_text()
        fixed = INCLUDE_LINE.sub(lambda match: f"include {_inside(root, match.group(1))}", text)
        if fixed != text:
            makefile.write_text(fixed)
            changed.append(f"{makefile.relative_to(root)}: include lines now inside {root}")
    return changed
