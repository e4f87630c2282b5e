"""The ``vdpacert`` command line, run as a user runs it (a real subprocess for the entry point)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vdpacert import __version__
from vdpacert.cli import main


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vdpacert", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"vdpacert {__version__}"


def test_check_names_the_ctrl_vq_rule_and_its_section_and_exits_1() -> None:
    result = run("features", "check", "--device", "net", "VERSION_1,MQ")
    assert result.returncode == 1
    assert "net.MQ.requires" in result.stdout
    assert "CTRL_VQ" in result.stdout
    assert "§5.1.3.1" in result.stdout


def test_check_valid_set_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["features", "check", "--device", "net", "VERSION_1,CTRL_VQ,MQ"]) == 0
    assert "valid" in capsys.readouterr().out


def test_check_hex_equals_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["features", "check", "--device", "net", hex((1 << 32) | (1 << 22))]) == 1
    assert "net.MQ.requires" in capsys.readouterr().out


def test_should_rule_warns_but_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["features", "check", "--device", "net", "VERSION_1,HASH_REPORT"]) == 0
    out = capsys.readouterr().out
    assert "WARN SHOULD net.HASH_REPORT.requires" in out


def test_offer_check_requires_version_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["features", "check", "--device", "blk", "--offer", "0x246"]) == 1
    assert "features.VERSION_1.offered" in capsys.readouterr().out


def test_offered_restricts_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["features", "check", "--device", "net", "--offered", "VERSION_1",
                 "VERSION_1,CTRL_VQ"]) == 1
    assert "features.subset_of_offered" in capsys.readouterr().out


def test_unknown_feature_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["features", "check", "--device", "net", "VERSION_1,NO_SUCH_BIT"]) == 2
    assert "NO_SUCH_BIT" in capsys.readouterr().err


def test_unknown_device_is_a_usage_error() -> None:
    result = run("features", "check", "--device", "gpu", "0x1")
    assert result.returncode == 2
    assert "unknown device" in result.stderr


def test_explain_lists_bits_and_rules(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["features", "explain", "--device", "net"]) == 0
    out = capsys.readouterr().out
    assert "CTRL_VQ" in out
    assert "MQ requires CTRL_VQ" in out
    assert "HASH_TUNNEL requires CTRL_VQ and RSS or HASH_REPORT" in out


def test_no_command_prints_help_and_exits_2() -> None:
    result = run()
    assert result.returncode == 2
    assert "features" in result.stderr


def test_rules_lists_the_catalog_with_citations(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "5.1.3.1"]) == 0
    out = capsys.readouterr().out
    assert "net.MQ.requires" in out and "§5.1.3.1" in out
    assert "status.driver" not in out


def test_rules_filters_by_level(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "--level", "SHOULD", "net.HASH_REPORT"]) == 0
    out = capsys.readouterr().out
    assert "net.HASH_REPORT.requires" in out
    assert out.strip().endswith("1 rule(s)")
