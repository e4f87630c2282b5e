"""The host the harness runs on: the tools it needs, the space it needs, and running them with clear errors.

Every external command goes through :func:`run_tool`, so a failure always names the step, the
command and the tail of its stderr, and a missing binary always names the Debian package to
install, instead of a bare ``FileNotFoundError``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import MissingPrerequisite, PrepareError

#: Where system tools live; root's PATH may lack the sbin directories and a user's may lack all of them.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Tool:
    """A host command, the Debian package that provides it, and why the harness needs it."""

    command: str
    package: str
    why: str


APT_GET = Tool("apt-get", "apt", "downloads Debian's kernel packages")
APT_CACHE = Tool("apt-cache", "apt", "finds the newest 6.12 kernel apt offers")
DPKG_DEB = Tool("dpkg-deb", "dpkg", "unpacks the packages without installing them")
MAKE = Tool("make", "make", "runs the kernel's out-of-tree module build")
XZ = Tool("xz", "xz-utils", "decompresses linux-source's tarball")
OBJCOPY = Tool("objcopy", "binutils", "strips debug info from the built modules")
QEMU = Tool("qemu-system-x86_64", "qemu-system-x86", "boots the guest kernel")
VDPA = Tool("vdpa", "iproute2", "creates vdpa devices in the guest (it runs from the host's root)")

#: What prepare needs before it downloads anything (the compiler is checked once the headers name it).
PREPARE_TOOLS = (APT_GET, APT_CACHE, DPKG_DEB, MAKE, XZ, OBJCOPY)


def search_path(path: str | None = None) -> str:
    """The caller's PATH followed by the system directories, so sbin tools are found for any user."""
    return f"{path if path is not None else os.environ.get('PATH', '')}:{SYSTEM_PATH}"


def find_tools(tools: Iterable[Tool], path: str | None = None) -> dict[str, Path]:
    """The absolute path of every tool; all missing ones are named in one error with one install line."""
    found: dict[str, Path] = {}
    missing: list[Tool] = []
    for tool in tools:
        where = shutil.which(tool.command, path=search_path(path))
        if where is None:
            missing.append(tool)
        else:
            found[tool.command] = Path(where)
    if missing:
        names = ", ".join(f"{tool.command} ({tool.why})" for tool in missing)
        packages = " ".join(dict.fromkeys(tool.package for tool in missing))
        raise MissingPrerequisite(f"missing host tools: {names}", f"install them with: apt-get install {packages}")
    return found


def compiler_tool(config_text: str) -> Tool:
    """The compiler the kernel was built with (``CONFIG_CC_VERSION_TEXT``); modules must use the same one.

    Debian's headers pin ``CC`` to e.g. ``x86_64-linux-gnu-gcc-12``, provided by package ``gcc-12``.
    """
    for line in config_text.splitlines():
        if line.startswith("CONFIG_CC_VERSION_TEXT="):
            command = line.partition("=")[2].strip('"').split()[0]
            version = command.rpartition("-")[2]
            package = f"gcc-{version}" if version.isdigit() else "gcc"
            return Tool(command, package, "compiles the modules with the kernel's own compiler")
    raise PrepareError("reading the kernel config", "no CONFIG_CC_VERSION_TEXT: cannot tell which compiler built it")


def check_space(directory: Path, needed_mib: int) -> None:
    """Refuse to start a step that would fill the disk halfway through, leaving a broken cache."""
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free_mib = shutil.disk_usage(probe).free // (1 << 20)
    if free_mib < needed_mib:
        raise MissingPrerequisite(f"not enough space in {probe}: {free_mib} MiB free, about {needed_mib} MiB needed",
                                  "free some space or choose another cache directory (--cache DIR)")


#: stderr phrases by which apt says it could not reach a mirror.
NETWORK_FAILURES = ("Temporary failure resolving", "Could not resolve", "Failed to fetch", "Unable to connect",
                    "Could not connect", "Network is unreachable", "Connection timed out")


#: Longest a prepare step's host command may run (apt over a slow mirror, a module build on one core):
#: a stuck tool (apt waiting on a lock, a hung mirror) becomes a PrepareError instead of a wedged CI job.
TOOL_TIMEOUT = 1800.0


def run_tool(argv: Sequence[str | Path], step: str, *, cwd: Path | None = None,
             env: Mapping[str, str] | None = None, timeout: float = TOOL_TIMEOUT) -> str:
    """Run a host command to completion and return its stdout; failures (and ``timeout``) become harness errors."""
    command = [str(arg) for arg in argv]
    try:
        done = subprocess.run(command, cwd=cwd, env=dict(env) if env is not None else None, capture_output=True,
                              text=True, errors="replace", check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PrepareError(step, f"`{' '.join(command)}` did not finish within {timeout:g} s (killed)") from None
    except FileNotFoundError as error:
        raise MissingPrerequisite(f"{command[0]} not found", f"install the package that provides it ({step})") \
            from error
    if done.returncode != 0:
        stderr = done.stderr.strip() or done.stdout.strip()
        if command[0].endswith(("apt-get", "apt-cache")) and any(p in stderr for p in NETWORK_FAILURES):
            raise MissingPrerequisite(f"{step}: apt could not reach the Debian mirrors",
                                      "check the network (and any proxy) and apt's sources, then retry: "
                                      + _tail(stderr, 3))
        raise PrepareError(step, f"`{' '.join(command)}` exited with status {done.returncode}: {_tail(stderr, 15)}")
    return done.stdout


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def is_root() -> bool:
    return os.geteuid() == 0
