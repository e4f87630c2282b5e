"""The real thing: prepare Debian's 6.12 kernel with vdpa_sim, boot it in QEMU, run commands in it.

Needs a Debian bookworm host with apt reaching Debian's mirrors (bookworm-security for the 6.12
kernel), make, gcc-12, binutils, xz-utils and iproute2; QEMU is installed by prepare when missing
(as root). The first prepare downloads about 280 MB into the cache (``$VDPACERT_KERNEL_CACHE``, else
``~/.cache/vdpacert/kernel``); later ones reuse it. Each boot takes a few seconds under TCG.

    python -m pytest kernel_tests -p no:cacheprovider
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import vdpacert
from vdpacert.kernel import KernelBuild, default_cache, prepare, run

TIMEOUT = 300.0


@pytest.fixture(scope="module")
def build() -> KernelBuild:
    return prepare(default_cache(), progress=lambda line: print(f"prepare: {line}", file=sys.stderr))


def test_prepare_again_does_nothing_and_says_so(build: KernelBuild) -> None:
    said: list[str] = []
    assert prepare(build.cache, progress=said.append) == build
    assert len(said) == 1 and "nothing to do" in said[0]


def test_the_guest_runs_debians_612_and_offers_both_simulators(build: KernelBuild) -> None:
    lines: list[str] = []
    result = run(build, ["sh", "-c", "uname -r && vdpa mgmtdev show"], timeout=TIMEOUT, output=lines.append)
    assert result.exit_status == 0, result.output
    assert lines[0] == build.release and build.release.startswith("6.12.")
    assert "vdpasim_net: " in lines and "vdpasim_blk: " in lines
    assert "  supported_classes net" in lines and "  supported_classes block" in lines
    assert result.output == "\n".join(lines)
    assert result.accel in ("kvm", "tcg") and result.accel_reason


def test_a_failing_command_gives_back_its_exit_status_and_output(build: KernelBuild) -> None:
    result = run(build, ["sh", "-c", "echo about to fail; echo on stderr >&2; exit 3"], timeout=TIMEOUT,
                 output=lambda line: None)
    assert result.exit_status == 3
    assert result.output.splitlines() == ["about to fail", "on stderr"]
    missing = run(build, ["vdpacert-no-such-command"], timeout=TIMEOUT, output=lambda line: None)
    assert missing.exit_status == 127


def test_devices_asked_for_are_vhost_vdpa_nodes_the_command_is_told_about(build: KernelBuild) -> None:
    script = ('echo "$VDPACERT_VHOST_VDPA"; vdpa dev show; '
              'for d in /dev/vhost-vdpa-*; do test -c "$d" && echo "$d"; done')
    result = run(build, ["sh", "-c", script], devices=["vdpa0:vdpasim_net:mac=02:00:00:00:00:01", "blk0:vdpasim_blk"],
                 timeout=TIMEOUT, output=lambda line: None)
    lines = result.output.splitlines()
    assert result.exit_status == 0, result.output
    assert lines[0] == "vdpa0=/dev/vhost-vdpa-0 blk0=/dev/vhost-vdpa-1"
    assert any(line.startswith("vdpa0: type network mgmtdev vdpasim_net") for line in lines)
    assert any(line.startswith("blk0: type block mgmtdev vdpasim_blk") for line in lines)
    assert lines[-2:] == ["/dev/vhost-vdpa-0", "/dev/vhost-vdpa-1"]


def test_the_hosts_python_and_checkout_run_read_only_with_a_writable_tmp(build: KernelBuild, tmp_path: Path) -> None:
    probe = ("import os, vdpacert; print(vdpacert.__file__); print(os.environ['HOME']); "
             "open('/tmp/vdpacert-guest-write', 'w').write('x'); print('tmp writable'); "
             "open(os.path.join(os.path.dirname(os.__file__), 'guest-write'), 'w')")
    # The write that must fail goes beside the host's standard library, not beside vdpacert: a checkout under
    # /tmp (a CI clone) sits in the guest's writable /tmp overlay.
    result = run(build, [sys.executable, "-c", probe], cwd=tmp_path, timeout=TIMEOUT, output=lambda line: None)
    lines = result.output.splitlines()
    assert lines[:3] == [vdpacert.__file__, "/tmp/vdpacert-home", "tmp writable"]
    assert result.exit_status == 1 and "Read-only file system" in result.output
    assert not Path("/tmp/vdpacert-guest-write").exists(), "the guest's writes stay in the guest"


def test_a_guest_that_patches_its_own_code_while_both_vcpus_run_survives(build: KernelBuild) -> None:
    # Each flip of a tracepoint rewrites the kernel text of its static key (an int3 first, then the new
    # instruction) while two busy loops keep both vCPUs switching tasks through that very code. Under TCG with
    # a host thread per vCPU this killed the guest with "Oops: int3" in 10 boots out of 10, and the same race
    # killed one CI boot in about 200 during start-up (see vdpacert.kernel.qemu.command_line).
    script = ("mount -t tracefs nodev /sys/kernel/tracing; key=/sys/kernel/tracing/events/sched/sched_switch/enable; "
              "nproc; (while :; do /bin/true; done) & a=$!; (while :; do /bin/true; done) & b=$!; "
              "n=0; while [ $n -lt 200 ]; do echo 1 >$key && echo 0 >$key || exit 9; n=$((n + 1)); done; "
              'kill $a $b; echo "flipped $n"')
    result = run(build, ["sh", "-c", script], cpus=2, timeout=TIMEOUT, output=lambda line: None)
    assert result.exit_status == 0, result.output
    assert result.output.splitlines() == ["2", "flipped 200"]


def test_the_command_line_returns_the_commands_exit_status(build: KernelBuild) -> None:
    done = subprocess.run([sys.executable, "-m", "vdpacert", "kernel", "run", "--cache", str(build.cache), "--",
                           "sh", "-c", "echo from the guest; exit 5"], capture_output=True, text=True,
                          timeout=TIMEOUT + 60, check=False)
    assert done.returncode == 5, done.stderr
    assert done.stdout == "from the guest\n"
    assert "exit status 5" in done.stderr
