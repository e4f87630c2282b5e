"""``vdpacert bench migration`` measures what it says: every row is complete and self-consistent, and each
mode carries the evidence that it ran as named (the device log really taken with logging on and empty
with it off, the shadow rows really through shadow virtqueues). No figure is asserted: speed is for the
benchmark to print, not for tests to judge."""

from __future__ import annotations

import contextlib
import io
import json
import re
from typing import Any

import pytest

from vdpacert.bench import migration
from vdpacert.cli import main

#: A data row of the printed datapath table: workload, ring, unit, then the six figures.
ROW = re.compile(r"^(\S+)\s+(split|packed)\s+(frames|writes)\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)\s+([\d,]+)\s+([\d.]+)"
                 r"\s+([\d.]+)\s+([\d.]+)$")


def number(text: str) -> float:
    return float(text.replace(",", ""))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """One short run of the command (tiny slices, a 1 GiB scan), shared by the module: its JSON and its stdout."""
    out = tmp_path_factory.mktemp("bench") / "migration.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(["bench", "migration", "--seconds", "0.05", "--scan-guest-gib", "1", "--json", str(out)])
    assert status == 0
    return json.loads(out.read_text()), printed.getvalue()


def test_every_workload_and_ring_has_a_row(run: tuple[dict[str, Any], str]) -> None:
    rows = run[0]["datapath"]
    assert sorted((r["workload"], r["ring"]) for r in rows) == sorted(
        (case.name, ring) for case in migration.CASES for ring in ("split", "packed"))
    for row in rows:
        assert row["unit"] == ("frames" if row["workload"].startswith("net") else "writes")


def test_rates_and_ratios_are_the_quotients_of_what_was_counted(run: tuple[dict[str, Any], str]) -> None:
    for row in run[0]["datapath"]:
        every = row["sync_every"]
        for mode in ("direct", "log", "shadow"):
            ops, seconds = row[f"{mode}_ops"], row[f"{mode}_s"]
            # Whole slices only, and at least one per block: each mode had its turns.
            assert ops > 0 and ops % every == 0 and ops // every >= migration.BLOCKS
            assert seconds > 0
            assert row[f"{mode}_per_s"] == pytest.approx(ops / seconds)
        assert row["log_ratio"] == pytest.approx(row["log_per_s"] / row["direct_per_s"])
        assert row["shadow_ratio"] == pytest.approx(row["shadow_per_s"] / row["direct_per_s"])


def test_printed_ratios_are_the_quotients_of_the_printed_rates(run: tuple[dict[str, Any], str]) -> None:
    text = run[1]
    assert "Python" in text.split(migration.DATAPATH_HEADER)[0]  # the header says what bounds the rates
    printed = [m for line in text.splitlines() if (m := ROW.match(line))]
    assert len(printed) == len(run[0]["datapath"])
    for match in printed:
        direct, log_on, on_off, shadow, shadow_direct = (number(match[i]) for i in (4, 5, 6, 7, 8))
        # Rates are printed to the unit, ratios to 3 decimals: equal up to that rounding.
        assert on_off == pytest.approx(log_on / direct, abs=6e-4)
        assert shadow_direct == pytest.approx(shadow / direct, abs=6e-4)


def test_the_log_is_taken_when_on_and_empty_when_off(run: tuple[dict[str, Any], str]) -> None:
    for row in run[0]["datapath"]:
        name = f"{row['workload']} {row['ring']}"
        assert row["log_pages"] > 0, f"{name}: logging on, yet the syncs found no page logged"
        assert row["direct_log_pages"] == 0, f"{name}: logging off, yet the device logged pages"


def test_the_shadow_rows_ran_through_shadow_virtqueues(run: tuple[dict[str, Any], str]) -> None:
    for row in run[0]["datapath"]:
        name = f"{row['workload']} {row['ring']}"
        assert row["data_queues"] == (2 if row["unit"] == "frames" else 1)
        assert row["shadow_shadowed"] == row["data_queues"] and row["direct_shadowed"] == 0, name
        # The device's own vring base: the guest ring's position when direct, the shadow ring's otherwise.
        assert row["direct_device_base_is_guest"] is True, name
        assert row["shadow_device_base_is_guest"] is False, name
        assert row["shadow_pages"] > 0, f"{name}: the shadow virtqueues noted no page the device wrote"


def test_scan_row_covers_the_asked_guest(run: tuple[dict[str, Any], str]) -> None:
    (scan,) = run[0]["scan"]
    assert scan["guest_bytes"] == migration.GIB
    assert scan["log_bytes"] == migration.GIB // 4096 // 8
    pages = migration.GIB // 4096
    assert 0.009 * pages <= scan["dirty_pages"] <= 0.01 * pages
    sync_s = scan["merge_s"] + scan["take_s"]
    assert sync_s > 0 and scan["memcpy_s"] > 0
    assert scan["sync_ms"] == pytest.approx(1e3 * sync_s)
    assert scan["guest_gib_per_s"] == pytest.approx(1 / sync_s)  # a 1 GiB guest
    assert scan["memcpy_ratio"] == pytest.approx(sync_s / scan["memcpy_s"])


@pytest.mark.parametrize("argv", [["--seconds", "0"], ["--seconds", "-1"], ["--scan-guest-gib", "0"],
                                  ["--scan-guest-gib", "5000"]])
def test_cli_refuses_bad_arguments(argv: list[str]) -> None:
    assert main(["bench", "migration", *argv]) == 2


def test_measure_case_refuses_a_non_positive_time() -> None:
    with pytest.raises(ValueError, match="seconds"):
        migration.measure_case(migration.CASES[0], False, 0)

