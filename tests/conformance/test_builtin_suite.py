"""The built-in suite certifies the reference devices and exercises the control-path clauses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vdpacert.cli import main
from vdpacert.conformance import suite
from vdpacert.conformance.profiles import REFERENCE_FRONT_QUIRKS


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


@pytest.mark.parametrize("target", ["sim-net", "sim-blk"])
def test_the_quick_profile_with_two_workers_reaches_every_clause(target: str, tmp_path: Path) -> None:
    """What CI runs, and issue 4's bar: every clause exercised or not applicable with a reason, nothing failed
    or warned, and the reference front's declared quirks listed as seen."""
    report = tmp_path / "report.json"
    assert main(["certify", "--target", target, "-n", "2", "--seed", "7", "--report-dir", str(tmp_path / "r"),
                 "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    verdicts = {row["id"]: row for row in data["clauses"]}
    assert [c for c, row in verdicts.items() if row["verdict"] in ("not-exercised", "fail", "warn")] == []
    assert all(row["reason"] for row in verdicts.values() if row["verdict"] == "not-applicable")
    assert {q["name"] for q in data["quirks"] if q["observed"]} == set(REFERENCE_FRONT_QUIRKS)
    assert data["target_profile"] == "reference"
