"""``run``: boot the prepared kernel, run one command in the guest, return its exit status and output."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from . import host
from .accel import AccelChoice, choose_accel
from .cache import KernelBuild, Layout
from .errors import GuestError, GuestTimeout, RunSpecError
from .guest import GuestCommand, VdpaDevice, environment
from .initramfs import write_initrd
from .qemu import QemuConfig, boot

DEFAULT_TIMEOUT = 900.0
DEFAULT_MEMORY_MIB = 2048
#: A KVM that works prints within a second; one that cannot run the kernel says so or stays silent.
PROBE_FIRST_OUTPUT = 15.0
PROBE_TIMEOUT = 60.0


def default_cpus() -> int:
    return min(2, os.cpu_count() or 1)


@dataclass(frozen=True)
class RunResult:
    """What the command did in the guest."""

    exit_status: int
    output: str  # the command's console output (stdout and stderr, interleaved as written)
    seconds: float  # wall time of the whole boot, from QEMU's start to its exit
    accel: str  # "kvm" or "tcg"
    accel_reason: str = ""
    boot_log: str = ""  # console lines before the command started (kernel errors, the vdpa tool's words)


def _stdout(line: str) -> None:
    print(line, flush=True)


def run(build: KernelBuild, command: Sequence[str], *, devices: Sequence[VdpaDevice | str] = (),
        cwd: str | Path | None = None, env: Mapping[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT,
        memory_mib: int = DEFAULT_MEMORY_MIB, cpus: int | None = None, output: Callable[[str], None] = _stdout,
        accel: str = "auto", on_accel: Callable[[AccelChoice], None] | None = None) -> RunResult:
    """Boot ``build`` with the devices, run ``command`` in ``cwd`` (a host path; default: here), return its result.

    The command's output goes to ``output`` line by line as the guest prints it. A nonzero exit
    status is a result, not an error; errors are for a guest that never reported one
    (:class:`GuestError`, :class:`GuestTimeout`) or a run asked for wrongly (:class:`RunSpecError`).
    A command that cannot be found or run in the guest exits 127 or 126, as in a shell.
    """
    directory = Path(cwd if cwd is not None else os.getcwd())
    if not directory.is_absolute() or not directory.is_dir():
        # The guest sees the host's root, so a directory missing here is missing there.
        raise RunSpecError(f"working directory {str(directory)!r} is not an existing absolute directory")
    parsed = tuple(VdpaDevice.parse(device) if isinstance(device, str) else device for device in devices)
    vdpa_tool = str(host.find_tools([host.VDPA])["vdpa"]) if parsed else "/usr/sbin/vdpa"
    guest_command = GuestCommand(argv=tuple(command), cwd=str(directory),
                                 env=environment(os.environ.get("PATH", ""), env or {}), devices=parsed,
                                 vdpa_tool=vdpa_tool)
    # Checked now, before a probe or a boot: a bad size is the caller's error, not the guest's.
    machine = QemuConfig(build.qemu, build.vmlinuz, build.initramfs, memory_mib=memory_mib,
                         cpus=cpus if cpus is not None else default_cpus())
    choice = choose_accel(accel, qemu=build.qemu, release=build.release, verdicts=Layout(build.cache).accel,
                          probe=lambda: probe_kvm(build))
    if on_accel is not None:
        on_accel(choice)
    with tempfile.TemporaryDirectory(prefix="vdpacert-kernel-") as scratch:
        initrd = write_initrd(build.initramfs, guest_command, Path(scratch) / "initrd.cpio")
        result = boot(replace(machine, initrd=initrd, accel=choice.accel), guest_command.nonce, timeout=timeout,
                      output=output)
    return RunResult(result.exit_status, result.output, result.seconds, choice.accel, choice.reason, result.boot_log)


def probe_kvm(build: KernelBuild) -> str | None:
    """Boot ``true`` under KVM; None if it ran, else why not (QEMU's complaint, or silence)."""
    command = GuestCommand(argv=("true",), cwd="/", env=environment("/usr/bin:/bin", {}))
    with tempfile.TemporaryDirectory(prefix="vdpacert-kvm-probe-") as scratch:
        initrd = write_initrd(build.initramfs, command, Path(scratch) / "initrd.cpio")
        config = QemuConfig(build.qemu, build.vmlinuz, initrd, "kvm", memory_mib=512, cpus=1)
        try:
            boot(config, command.nonce, timeout=PROBE_TIMEOUT, output=lambda line: None,
                 first_output_timeout=PROBE_FIRST_OUTPUT)
        except GuestTimeout:
            return f"no console output within {PROBE_FIRST_OUTPUT:g} s"
        except GuestError as error:
            return _first_complaint(error.console) or "the guest died before running its command"
    return None


def _first_complaint(console: str) -> str:
    for line in console.splitlines():
        if line.startswith("[qemu stderr]"):
            # "qemu-system-x86_64: error: failed to set MSR ..." -> "failed to set MSR ..."
            return line.removeprefix("[qemu stderr]").strip().rpartition(": error: ")[2]
    return ""
