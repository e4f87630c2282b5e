"""The QEMU command line, the console's split into boot log / output / markers, and boot()'s deadlines.

boot() is exercised against a stand-in for QEMU (a shell script printing what a guest would), so
the streaming, timeout and kill paths run in milliseconds; kernel_tests/ boots the real thing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vdpacert.kernel.errors import GuestError, GuestSetupError, GuestTimeout, RunSpecError
from vdpacert.kernel.qemu import Console, QemuConfig, boot, command_line

NONCE = "0123456789abcdef"


def config(qemu: Path = Path("/usr/bin/qemu-system-x86_64"), accel: str = "tcg") -> QemuConfig:
    return QemuConfig(qemu, Path("/c/vmlinuz"), Path("/c/initrd"), accel=accel, memory_mib=1024, cpus=2)


def test_tcg_command_line() -> None:
    line = command_line(config())
    joined = " ".join(line)
    assert line[0] == "/usr/bin/qemu-system-x86_64"
    assert "-accel tcg,thread=single" in joined and "-nographic" in line and "-no-reboot" in line
    assert "-m 1024 -smp 2" in joined and "-kernel /c/vmlinuz -initrd /c/initrd" in joined
    append = line[line.index("-append") + 1]
    assert "console=hvc0" in append and "quiet" in append and "panic=-1" in append
    virtfs = line[line.index("-virtfs") + 1]
    assert virtfs.startswith("local,path=/,mount_tag=hostroot,security_model=none,readonly=on")
    assert "virtconsole,chardev=console" in line and "stdio,id=console,signal=off" in line


def test_kvm_command_line_uses_the_host_cpu() -> None:
    joined = " ".join(command_line(config(accel="kvm")))
    assert "-accel kvm -cpu host" in joined and "tcg" not in joined


@pytest.mark.parametrize(("field", "value", "complaint"), [
    ("accel", "hvf", "accelerator"), ("memory_mib", 64, "256 MiB"), ("cpus", 0, "--cpus 0")])
def test_bad_machine_sizes_are_refused(field: str, value: object, complaint: str) -> None:
    with pytest.raises(RunSpecError, match=complaint):
        QemuConfig(Path("q"), Path("k"), Path("i"), **{field: value})  # type: ignore[arg-type]


def feed_bytewise(console: Console, text: str) -> None:
    for byte in text.encode():
        console.feed(bytes([byte]))
    console.close()


def test_console_splits_boot_log_output_and_markers_across_any_chunking() -> None:
    seen: list[str] = []
    console = Console(NONCE, seen.append)
    feed_bytewise(console, f"[    1.0] boot noise\r\nVDPACERT:{NONCE}:started\r\nline 1\r\n"
                           f"VDPACERT:forged:exit:0\r\nno newline yetVDPACERT:{NONCE}:exit:42\r\n"
                           "reboot: Power down\r\n")
    assert console.boot_log == ["[    1.0] boot noise"]
    assert seen == console.command_output == ["line 1", "VDPACERT:forged:exit:0", "no newline yet"]
    assert console.exit_status == 42 and console.done


def test_console_reports_a_failed_setup_step() -> None:
    console = Console(NONCE, lambda line: None)
    feed_bytewise(console, f"Error: vdpa: no such mgmtdev\nVDPACERT:{NONCE}:setup-failed:vdpa dev add name x\n")
    assert console.setup_failed == "vdpa dev add name x" and not console.started
    assert console.transcript() == "Error: vdpa: no such mgmtdev"


#: A stand-in for QEMU: behaves as $FAKE_GUEST says, knows the nonce from $FAKE_NONCE.
FAKE_QEMU = r"""#!/bin/sh
echo $$ > "$FAKE_PIDFILE"
m="VDPACERT:$FAKE_NONCE"
case "$FAKE_GUEST" in
ok)      printf 'boot\r\n%s:started\r\nhello\r\npartial' "$m"; sleep 0.2; printf ' line\r\n%s:exit:3\r\n' "$m";;
panic)   printf 'Kernel panic - not syncing: Attempted to kill init!\r\n'; exit 0;;
hang)    printf '%s:started\r\nworking\r\n' "$m"; exec sleep 60;;
silent)  exec sleep 60;;
kvm)     echo 'KVM internal error. Suberror: 1' >&2; exec sleep 60;;
linger)  printf '%s:started\r\n%s:exit:0\r\n' "$m" "$m"; exec sleep 60;;
setup)   printf 'insmod: cannot insert vdpa.ko\r\n%s:setup-failed:insmod vdpa\r\n' "$m"; exit 0;;
esac
"""


@pytest.fixture
def fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[QemuConfig, Path]:
    script = tmp_path / "qemu-system-x86_64"
    script.write_text(FAKE_QEMU)
    script.chmod(0o755)
    pidfile = tmp_path / "pid"
    monkeypatch.setenv("FAKE_NONCE", NONCE)
    monkeypatch.setenv("FAKE_PIDFILE", str(pidfile))
    return config(script), pidfile


def guest(monkeypatch: pytest.MonkeyPatch, behaviour: str) -> None:
    monkeypatch.setenv("FAKE_GUEST", behaviour)


def assert_dead(pidfile: Path) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(int(pidfile.read_text()), 0)


def test_boot_streams_output_and_returns_the_exit_status(fake_qemu: tuple[QemuConfig, Path],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    guest(monkeypatch, "ok")
    seen: list[str] = []
    result = boot(fake_qemu[0], NONCE, timeout=30, output=seen.append)
    assert result.exit_status == 3 and seen == ["hello", "partial line"]
    assert result.output == "hello\npartial line" and result.boot_log == "boot"


def test_a_guest_that_dies_without_a_status_is_an_error_with_its_console(
        fake_qemu: tuple[QemuConfig, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    guest(monkeypatch, "panic")
    with pytest.raises(GuestError, match="before the command reported its exit status") as error:
        boot(fake_qemu[0], NONCE, timeout=30, output=lambda line: None)
    assert "Attempted to kill init" in str(error.value)


def test_a_failed_setup_step_is_named(fake_qemu: tuple[QemuConfig, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    guest(monkeypatch, "setup")
    with pytest.raises(GuestSetupError, match="insmod vdpa") as error:
        boot(fake_qemu[0], NONCE, timeout=30, output=lambda line: None)
    assert error.value.step == "insmod vdpa" and "cannot insert" in str(error.value)


def test_the_timeout_kills_qemu_and_names_itself(fake_qemu: tuple[QemuConfig, Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    guest(monkeypatch, "hang")
    with pytest.raises(GuestTimeout, match=r"timeout of 0\.5 s; QEMU was killed") as error:
        boot(fake_qemu[0], NONCE, timeout=0.5, output=lambda line: None)
    assert "working" in str(error.value)
    assert_dead(fake_qemu[1])


def test_no_first_output_in_time_is_a_timeout(fake_qemu: tuple[QemuConfig, Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    guest(monkeypatch, "silent")
    with pytest.raises(GuestTimeout):
        boot(fake_qemu[0], NONCE, timeout=60, first_output_timeout=0.3, output=lambda line: None)
    assert_dead(fake_qemu[1])


def test_kvm_saying_it_cannot_run_the_guest_ends_the_boot_at_once(
        fake_qemu: tuple[QemuConfig, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    guest(monkeypatch, "kvm")
    with pytest.raises(GuestError, match="QEMU could not run the guest") as error:
        boot(fake_qemu[0], NONCE, timeout=60, output=lambda line: None)
    assert "KVM internal error" in str(error.value)
    assert_dead(fake_qemu[1])


def test_a_guest_that_reported_but_does_not_power_off_keeps_its_result(
        fake_qemu: tuple[QemuConfig, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    guest(monkeypatch, "linger")
    result = boot(fake_qemu[0], NONCE, timeout=60, output=lambda line: None, poweroff_grace=0.3)
    assert result.exit_status == 0
    assert_dead(fake_qemu[1])
