"""Every shipped scenario migrates (or fails as it expects) with nothing lost, and the checks can fail.

The shipped scenarios run end to end here, each a real pre-copy migration between two reference
devices with an unmigrated twin. A negative control proves the verification is not a formality:
a device whose dirty log misses its buffer writes (a mutant of the conformance zoo) leaves the
destination's memory behind, and the run says so.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from vdpacert.cli import main
from vdpacert.conformance.mutants.registry import target_string
from vdpacert.migration.orchestrator import Migration
from vdpacert.migration.scenario import (
    linux_scenarios,
    load_scenario,
    load_scenario_text,
    packaged_scenario,
    shipped_scenarios,
)

SHIPPED = {path.stem: path for path in shipped_scenarios()}


def test_at_least_twelve_scenarios_with_a_regression_for_each_field_bug() -> None:
    assert len(SHIPPED) >= 12
    regressions = {load_scenario(path).regression for path in SHIPPED.values()} - {""}
    for bug in ("avail/used indices not restored", "multiqueue state lost", "stale avail_idx",
                "packed wrap counter stale", "device writes not dirtied", "dirty logging not stopped",
                "in-flight requests lost or replayed twice"):
        assert any(bug in text for text in regressions), bug


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_scenario_passes(name: str) -> None:
    scenario = load_scenario(SHIPPED[name])
    result = Migration(scenario).run()
    assert result.passed, (result.outcome, result.problems, result.error)
    assert not result.problems
    assert result.outcome == scenario.migration.expect
    if scenario.migration.expect == "failed":
        assert result.error is not None
        assert any("dirty tracking stopped" in line for line in result.checks)
    else:
        assert result.migrated and result.error is None
        assert any("byte-equal" in line for line in result.checks)
        assert any("device state equal" in line for line in result.checks)
        assert 0 < result.downtime_s
    assert any("guest and twin agree" in line for line in result.checks)


def test_a_device_that_does_not_log_its_buffer_writes_is_caught() -> None:
    source = target_string("dirty_log_misses_buffers", capacity=8192, disk="lun-negative-control")
    scenario = load_scenario_text(f"""
description = "negative control"
[device]
target = "{source}"
destination = "sim-blk:capacity=8192,disk=lun-negative-control"
[memory]
size_mib = 16
[workload]
blk_writes_per_s = 8000
[migration]
mode = "device-log"
downtime_ms = 20
""", "negative-control")
    result = Migration(scenario).run()
    assert not result.verified and not result.passed
    assert any("destination memory differs" in line and "never marked dirty" in line for line in result.problems)


def test_the_command_writes_json_and_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    status = main(["migrate", "net-split-near-wrap", "blk-corrupt-ram", "-q", "--json", str(out), "--plot", str(png)])
    assert status == 0
    rows = json.loads(out.read_text())
    assert [r["scenario"] for r in rows] == ["net-split-near-wrap", "blk-corrupt-ram"]
    for row in rows:
        assert list(row)[:9] == ["scenario", "converged", "iterations", "bytes_sent", "total_s", "downtime_s",
                                 "verified", "faults", "error"]
        assert row["verified"] is True and row["passed"] is True
    assert rows[0]["error"] is None and rows[0]["bytes_sent"] > 16 << 20
    assert rows[1]["error"] and rows[1]["faults"] == ["corrupt-stream@1"]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100
    assert "2 passed, 0 failed" in capsys.readouterr().out


def test_a_bad_scenario_is_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[migration]\nmode = 'telepathy'\n")
    assert main(["migrate", str(bad)]) == 2
    assert "migration.mode" in capsys.readouterr().err
    assert main(["migrate"]) == 2


def test_list_names_every_shipped_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in SHIPPED)


def test_linux_scenarios_name_three_char_devices_and_shadow_tracking() -> None:
    """The guest-kernel scenarios (run by kernel_tests/ under ``vdpacert kernel run``) load, by name too."""
    paths = linux_scenarios()
    assert paths
    for path in paths:
        scenario = load_scenario(path)
        assert packaged_scenario(f"linux/{path.stem}") == path
        devices = {scenario.device.target, scenario.device.destination_target, scenario.device.twin_target}
        assert len(devices) == 3 and all(d.startswith("vhost-vdpa:/dev/vhost-vdpa-") for d in devices)
        assert scenario.migration.mode == "shadow"  # Linux's vhost-vdpa cannot log
    assert packaged_scenario("../../etc/passwd") is None and packaged_scenario("no-such") is None
