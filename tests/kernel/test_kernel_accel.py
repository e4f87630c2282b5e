"""KVM is used only after a probe boot shows it works; the verdict is probed once per host, QEMU and kernel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vdpacert.kernel.accel import choose_accel
from vdpacert.kernel.errors import RunSpecError


class Probe:
    """Counts probe boots and answers as a host whose KVM does or does not work would."""

    def __init__(self, failure: str | None) -> None:
        self.failure = failure
        self.calls = 0

    def __call__(self) -> str | None:
        self.calls += 1
        return self.failure


@pytest.fixture
def qemu(tmp_path: Path) -> Path:
    binary = tmp_path / "qemu-system-x86_64"
    binary.write_text("#!/bin/sh\n")
    return binary


@pytest.fixture
def kvm(tmp_path: Path) -> Path:
    device = tmp_path / "kvm"  # stands in for /dev/kvm: only its presence and access are looked at
    device.write_text("")
    return device


def test_a_failing_probe_means_tcg_with_the_reason_and_is_not_repeated(tmp_path: Path, qemu: Path, kvm: Path) -> None:
    probe = Probe("failed to set MSR 0x10a to 0x69")
    verdicts = tmp_path / "accel.json"
    first = choose_accel("auto", qemu=qemu, release="6.12.117+deb12-amd64", verdicts=verdicts, probe=probe, device=kvm)
    assert first.accel == "tcg" and "failed to set MSR" in first.reason
    again = choose_accel("auto", qemu=qemu, release="6.12.117+deb12-amd64", verdicts=verdicts, probe=probe, device=kvm)
    assert again.accel == "tcg" and "cached" in again.reason
    assert probe.calls == 1
    assert json.loads(verdicts.read_text())["accel"] == "tcg"


def test_a_working_probe_means_kvm(tmp_path: Path, qemu: Path, kvm: Path) -> None:
    choice = choose_accel("auto", qemu=qemu, release="r", verdicts=tmp_path / "a.json", probe=Probe(None), device=kvm)
    assert choice.accel == "kvm"


def test_another_guest_kernel_or_qemu_is_probed_again(tmp_path: Path, qemu: Path, kvm: Path) -> None:
    probe = Probe("KVM internal error")
    verdicts = tmp_path / "accel.json"
    choose_accel("auto", qemu=qemu, release="6.12.115", verdicts=verdicts, probe=probe, device=kvm)
    choose_accel("auto", qemu=qemu, release="6.12.117", verdicts=verdicts, probe=probe, device=kvm)
    qemu.write_text("#!/bin/sh\n# upgraded\n")
    choose_accel("auto", qemu=qemu, release="6.12.117", verdicts=verdicts, probe=probe, device=kvm)
    assert probe.calls == 3


def test_no_kvm_device_means_tcg_without_probing(tmp_path: Path, qemu: Path) -> None:
    probe = Probe(None)
    choice = choose_accel("auto", qemu=qemu, release="r", verdicts=tmp_path / "a.json", probe=probe,
                          device=tmp_path / "no-kvm")
    assert (choice.accel, probe.calls) == ("tcg", 0) and "no-kvm" in choice.reason


@pytest.mark.parametrize("asked", ["kvm", "tcg"])
def test_an_explicit_accelerator_is_obeyed_without_probing(tmp_path: Path, qemu: Path, asked: str) -> None:
    probe = Probe("x")
    choice = choose_accel(asked, qemu=qemu, release="r", verdicts=tmp_path / "a.json", probe=probe)
    assert (choice.accel, probe.calls) == (asked, 0)
    with pytest.raises(RunSpecError, match="expected one of auto, kvm, tcg"):
        choose_accel("hvf", qemu=qemu, release="r", verdicts=tmp_path / "a.json", probe=probe)
