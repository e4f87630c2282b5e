"""Build vringh, vdpa_sim, vdpa_sim_net and vdpa_sim_blk out of tree against Debian's own headers.

Debian builds its 6.12 kernel without ``CONFIG_VDPA_SIM`` (and so without ``CONFIG_VRINGH``, which
only the simulator selects); everything else they need (vdpa, vhost_iotlb) is a module of the
image. Only the few source files are taken from linux-source's 145 MB tarball, which is streamed
through ``xz`` and abandoned as soon as they are found (the rest of the tree is never written).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

from . import host
from .errors import PrepareError

#: The modules built here, in the order they must be loaded.
MODULES = ("vringh", "vdpa_sim", "vdpa_sim_net", "vdpa_sim_blk")
#: Files taken from the source tree: vringh.c alone, and every file of the simulator's directory.
VRINGH_SOURCE = "drivers/vhost/vringh.c"
SIMULATOR_DIR = "drivers/vdpa/vdpa_sim/"

#: One flat directory holds all four modules: vringh.c lives in drivers/vhost upstream, but its
#: users only need it loaded first (modpost resolves its exports from this directory's symvers).
KBUILD = "# vringh is normally selected by CONFIG_VDPA_SIM, which Debian's config leaves off.\n" \
         + "".join(f"obj-m += {name}.o\n" for name in MODULES)


def kbuild_file() -> str:
    return KBUILD


def _wanted(member: str) -> str | None:
    """The path under the source root of a member the build needs, else None."""
    rel = member.partition("/")[2]  # drop the tarball's top directory (linux-source-6.12/)
    if rel == VRINGH_SOURCE or (rel.startswith(SIMULATOR_DIR) and rel != SIMULATOR_DIR and "/" not in
                                rel[len(SIMULATOR_DIR):]):
        return rel
    return None


INCLUDE = re.compile(r'^\s*#\s*include\s*<([^>]+)>', re.M)


def missing_headers(sources: Iterable[Path], include_dirs: Iterable[Path]) -> set[str]:
    """The ``<...>`` headers the sources include that no include directory of the headers package has.

    Debian's headers package carries every header these four files include in 6.12; should a
    later version drop one, it is taken from the source tarball too instead of failing the build.
    """
    dirs = list(include_dirs)
    wanted: set[str] = set()
    for source in sources:
        wanted.update(INCLUDE.findall(source.read_text(errors="replace")))
    return {name for name in wanted if not any((d / name).exists() for d in dirs)}


def extract_sources(source_deb: Path, dest: Path, include_dirs: Iterable[Path]) -> list[str]:
    """Unpack linux-source's tarball from its .deb and copy the needed files flat into ``dest``.

    Returns the tarball paths taken. Headers the headers package lacks go to ``dest/include``.
    """
    include_dirs = list(include_dirs)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="linux-source-", dir=dest.parent) as scratch:
        host.run_tool(["dpkg-deb", "-x", source_deb, scratch], f"unpacking {source_deb.name}")
        tarballs = sorted(Path(scratch).glob("usr/src/linux-source-*.tar.xz"))
        if not tarballs:
            raise PrepareError("extracting sources", f"{source_deb.name} holds no usr/src/linux-source-*.tar.xz")
        return _stream_extract(tarballs[0], dest, include_dirs)


def _stream_extract(tarball: Path, dest: Path, include_dirs: list[Path]) -> list[str]:
    # xz decompresses with every core (the tarball is multi-block); tarfile reads the stream and
    # lets us stop as soon as the last needed member went by.
    xz = subprocess.Popen(["xz", "-dc", "-T0", str(tarball)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    taken: list[str] = []
    headers: set[str] | None = None  # the headers still to take, known once the sources are in
    simulator = "before"  # the tarball lists a directory's files together: before, inside, after it
    try:
        assert xz.stdout is not None
        with tarfile.open(fileobj=xz.stdout, mode="r|") as stream:
            for member in stream:
                rel = member.name.partition("/")[2]
                if rel.startswith(SIMULATOR_DIR):
                    simulator = "inside"
                elif simulator == "inside":
                    simulator = "after"
                name = _wanted(member.name)
                if name and member.isfile():
                    _copy_member(stream, member, dest / Path(name).name)
                    taken.append(name)
                elif headers and member.isfile() and rel.startswith("include/") and rel[8:] in headers:
                    _copy_member(stream, member, dest / "include" / rel[8:])
                    taken.append(rel)
                    headers.discard(rel[8:])
                if headers is None and VRINGH_SOURCE in taken and simulator == "after":
                    headers = missing_headers(sorted(dest.glob("*.[ch]")), [*include_dirs, dest / "include"])
                if headers is not None and not headers:
                    break
    except tarfile.TarError as error:
        raise PrepareError("extracting sources", f"{tarball.name} is not a readable tar.xz: {error}") from error
    finally:
        xz.kill()
        xz.wait()
    if VRINGH_SOURCE not in taken or not any(t.startswith(SIMULATOR_DIR) for t in taken):
        raise PrepareError("extracting sources", f"{tarball.name} lacks {VRINGH_SOURCE} or {SIMULATOR_DIR}")
    if headers is None:  # the stream ended right after the sources
        headers = missing_headers(sorted(dest.glob("*.[ch]")), [*include_dirs, dest / "include"])
    if headers:
        raise PrepareError("extracting sources", f"headers found neither in the headers package nor in "
                                                 f"{tarball.name}: {', '.join(sorted(headers))}")
    return taken


def _copy_member(stream: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    source = stream.extractfile(member)
    if source is None:
        raise PrepareError("extracting sources", f"cannot read {member.name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with source, open(target, "wb") as out:
        shutil.copyfileobj(source, out)


def make_command(headers_dir: Path, module_dir: Path, jobs: int) -> list[str]:
    """The out-of-tree build: kbuild's ``M=`` mode against the unpacked headers.

    ``CONFIG_DEBUG_INFO_BTF_MODULES=`` skips BTF generation, which would need ``pahole`` on the host
    and only serves BPF tracing of these modules' types; the kernel loads modules without it.
    """
    return ["make", "-C", str(headers_dir), f"M={module_dir}", f"-j{jobs}", "CONFIG_DEBUG_INFO_BTF_MODULES=",
            "modules"]


def build_modules(headers_dir: Path, module_dir: Path, compiler: Path) -> list[Path]:
    """Write the Kbuild file, run the build, strip debug info; returns the built .ko files."""
    (module_dir / "Kbuild").write_text(kbuild_file())
    include = module_dir / "include"
    env = dict(os.environ)
    # The compiler the kernel names may live outside a user's PATH (e.g. /usr/bin lacking).
    env["PATH"] = f"{compiler.parent}:{host.search_path()}"
    if include.is_dir():
        env["KCPPFLAGS"] = f"{env.get('KCPPFLAGS', '')} -I{include}".strip()
    host.run_tool(make_command(headers_dir, module_dir, jobs=os.cpu_count() or 1), "building the vdpa_sim modules",
                  env=env)
    built = [module_dir / f"{name}.ko" for name in MODULES]
    for module in built:
        if not module.is_file():
            raise PrepareError("building the vdpa_sim modules", f"make succeeded but {module.name} is missing")
        # Debug info is 90 % of each file; the initramfs is smaller and boots faster without it.
        host.run_tool(["objcopy", "--strip-debug", module], f"stripping {module.name}")
    return built
