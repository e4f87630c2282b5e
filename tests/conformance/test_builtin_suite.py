"""The built-in suite certifies the reference devices and exercises the control-path clauses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vdpacert.cli import main
from vdpacert.conformance import suite


def test_the_builtin_suite_registers_the_control_machine() -> None:
    suite.load(None)
    assert "control" in {entry.name for entry in suite.entries()}


@pytest.mark.parametrize("target", ["sim-net", "sim-blk"])
def test_certify_passes_the_reference_devices(target: str, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    assert main(["certify", "--target", target, "--examples", "8", "--report-dir", str(tmp_path / "r"),
                 "--json", str(report)]) == 0
    clauses = {row["id"]: row for row in json.loads(report.read_text())["clauses"]}
    for clause in ("suite.lockstep.errno", "suite.lockstep.status", "suite.lockstep.features"):
        assert clauses[clause]["verdict"] == "pass", clauses[clause]
        assert clauses[clause]["examples"] > 0
    assert not [row for row in clauses.values() if row["verdict"] == "fail"]


def test_certify_quick_profile_with_two_workers(tmp_path: Path) -> None:
    """What CI runs: the quick profile on two pytest-xdist workers, recorders merged."""
    report = tmp_path / "report.json"
    assert main(["certify", "--target", "sim-net", "-n", "2", "--seed", "7", "--report-dir", str(tmp_path / "r"),
                 "--json", str(report)]) == 0
    clauses = {row["id"]: row for row in json.loads(report.read_text())["clauses"]}
    assert clauses["suite.lockstep.errno"]["verdict"] == "pass"
