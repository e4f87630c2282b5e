"""Boot the guest in QEMU, stream its console, and read the command's exit status off it.

The console is a virtio console (``hvc0``; built into Debian's image) on QEMU's stdio: output
arrives as the guest writes it, with no serial-port byte-at-a-time emulation. The harness's own
lines carry a per-run nonce (see :mod:`vdpacert.kernel.initramfs`): before ``started`` the console
is the boot log, after it the command's output, and ``exit:N`` ends the run.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import GuestError, GuestSetupError, GuestTimeout, RunSpecError
from .initramfs import HOST_TAG

ACCELS = ("kvm", "tcg")


@dataclass(frozen=True)
class QemuConfig:
    """One boot: which binary, kernel, initrd and accelerator, and how big a machine."""

    qemu: Path
    kernel: Path
    initrd: Path
    accel: str = "tcg"
    memory_mib: int = 2048
    cpus: int = 2
    host_root: str = "/"

    def __post_init__(self) -> None:
        if self.accel not in ACCELS:
            raise RunSpecError(f"accelerator {self.accel!r}: expected one of {', '.join(ACCELS)}")
        if self.memory_mib < 256:
            raise RunSpecError(f"--memory {self.memory_mib} MiB: the guest needs at least 256 MiB")
        if not 1 <= self.cpus <= 64:
            raise RunSpecError(f"--cpus {self.cpus}: expected 1..64")


#: Kernel parameters: console on the virtio console; quiet (errors only) so the console is the
#: command's (kernel warnings stay in dmesg); panic=-1 with QEMU's -no-reboot turns a panic into QEMU
#: exiting instead of a hang; oops=panic so an Oops in the device under test ends the run with its
#: trace on the console (an Oops prints at full verbosity) instead of a half-dead kernel timing out.
KERNEL_APPEND = "console=hvc0 quiet loglevel=3 panic=-1 oops=panic"


def command_line(config: QemuConfig) -> list[str]:
    """The QEMU invocation; no default devices, no network, no display, no reboot."""
    if config.accel == "kvm":
        accel = ["-accel", "kvm", "-cpu", "host"]
    else:
        # All vCPUs on one host thread, taking turns. With a thread per vCPU, a vCPU can go on running its
        # translation of kernel text another vCPU has just patched (a static key flipped through an int3
        # in text_poke_bp) and the guest dies of "Oops: int3": once in about 200 boots of `true`, every
        # time within 200 flips of a tracepoint (kernel_tests' self-patching test). "max" gives the guest
        # every instruction TCG emulates (AVX2...).
        accel = ["-accel", "tcg,thread=single", "-cpu", "max"]
    return [
        str(config.qemu), "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-machine", "q35", *accel,
        "-m", str(config.memory_mib), "-smp", str(config.cpus),
        "-kernel", str(config.kernel), "-initrd", str(config.initrd), "-append", KERNEL_APPEND,
        "-chardev", "stdio,id=console,signal=off", "-device", "virtio-serial-pci",
        "-device", "virtconsole,chardev=console",
        "-virtfs", f"local,path={config.host_root},mount_tag={HOST_TAG},security_model=none,readonly=on,"
                   "multidevs=remap",
        "-monitor", "none", "-serial", "none",
    ]


@dataclass
class Console:
    """Splits the console stream into the boot log, the command's output and the harness's markers."""

    nonce: str
    output: Callable[[str], None] = print
    boot_log: list[str] = field(default_factory=list)
    command_output: list[str] = field(default_factory=list)
    started: bool = False
    exit_status: int | None = None
    setup_failed: str | None = None
    _partial: bytes = b""

    def feed(self, data: bytes) -> None:
        self._partial += data
        *lines, self._partial = self._partial.split(b"\n")
        for line in lines:
            self._line(line.decode(errors="replace").rstrip("\r"))

    def close(self) -> None:
        if self._partial:
            self._line(self._partial.decode(errors="replace").rstrip("\r"))
            self._partial = b""

    @property
    def done(self) -> bool:
        return self.exit_status is not None or self.setup_failed is not None

    def _line(self, line: str) -> None:
        marker = f"VDPACERT:{self.nonce}:"
        # A marker may follow a partial line the command left without a newline.
        before, found, rest = line.partition(marker)
        if found and before:
            self._text(before)
        if not found:
            self._text(line)
        elif rest == "started":
            self.started = True
        elif rest.startswith("exit:") and rest[5:].isdigit():
            self.exit_status = int(rest[5:])
        elif rest.startswith("setup-failed:"):
            self.setup_failed = rest.removeprefix("setup-failed:")
        else:
            self._text(line)

    def _text(self, line: str) -> None:
        if self.done:
            return  # poweroff chatter
        if self.started:
            self.command_output.append(line)
            self.output(line)
        else:
            self.boot_log.append(line)

    def transcript(self) -> str:
        return "\n".join([*self.boot_log, *self.command_output])


@dataclass(frozen=True)
class Boot:
    """What one boot produced."""

    exit_status: int
    output: str
    boot_log: str
    seconds: float


#: QEMU stderr lines that mean the guest can never make progress (QEMU itself lingers, paused).
FATAL_STDERR = (b"KVM internal error", b"failed to set MSR", b"kvm_buf_set_msrs", b"Could not access KVM kernel module")
#: How long QEMU may take to exit after the guest reported (poweroff is a few ms; a stuck one is killed).
POWEROFF_GRACE = 10.0


def boot(config: QemuConfig, nonce: str, *, timeout: float, output: Callable[[str], None] = print,
         first_output_timeout: float | None = None, poweroff_grace: float = POWEROFF_GRACE) -> Boot:
    """Boot, stream, and return the command's exit status; errors for a timeout or a guest that died.

    ``first_output_timeout`` bounds the wait for the guest's first console byte: how a KVM that
    cannot run this kernel shows itself when QEMU does not say so on stderr (the vCPU spins).
    """
    console = Console(nonce, output)
    start = time.monotonic()
    process = subprocess.Popen(command_line(config), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    stderr = bytearray()
    try:
        _pump(process, console, stderr, start, timeout, first_output_timeout, poweroff_grace)
    finally:
        if process.poll() is None:
            _kill(process)
    console.close()
    seconds = time.monotonic() - start
    if console.setup_failed is not None:
        raise GuestSetupError(console.setup_failed, console.transcript() + _stderr_note(stderr))
    if console.exit_status is None:
        why = f"QEMU exited with status {process.returncode}" if process.returncode else "the guest stopped"
        if any(pattern in stderr for pattern in FATAL_STDERR):
            why = "QEMU could not run the guest"
        raise GuestError(f"{why} before the command reported its exit status (a kernel panic, or an init "
                         f"that could not run)", console.transcript() + _stderr_note(stderr))
    return Boot(console.exit_status, "\n".join(console.command_output), "\n".join(console.boot_log), seconds)


def _pump(process: subprocess.Popen[bytes], console: Console, stderr: bytearray, start: float, timeout: float,
          first_output_timeout: float | None, poweroff_grace: float) -> None:
    """Feed the console until QEMU closes its output; enforce the deadlines; kill a stuck or doomed QEMU."""
    assert process.stdout is not None and process.stderr is not None
    got_output = False
    done_at: float | None = None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        selector.register(process.stderr, selectors.EVENT_READ)
        while selector.get_map():
            now = time.monotonic()
            if console.done and done_at is None:
                done_at = now
            limit = timeout if got_output or first_output_timeout is None else min(timeout, first_output_timeout)
            if done_at is not None:
                if now - done_at >= poweroff_grace:
                    return  # reported, but did not power off: the result stands, QEMU is killed
            elif now - start >= limit:
                _kill(process)
                raise GuestTimeout(limit, console.transcript() + _stderr_note(stderr))
            if any(pattern in stderr for pattern in FATAL_STDERR):
                return
            wait = poweroff_grace - (now - done_at) if done_at is not None else limit - (now - start)
            for key, _ in selector.select(timeout=max(0.0, min(1.0, wait))):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                elif key.fileobj is process.stdout:
                    got_output = True
                    console.feed(chunk)
                else:
                    stderr += chunk
    with contextlib.suppress(subprocess.TimeoutExpired):  # closed its output yet lingers: boot() kills it
        process.wait(timeout=poweroff_grace)


def _stderr_note(stderr: bytes | bytearray) -> str:
    text = stderr.decode(errors="replace").strip()
    return f"\n[qemu stderr] {text}" if text else ""


def _kill(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait()
