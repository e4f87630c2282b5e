"""``vdpacert mutants``: real quick-profile runs kill real mutants, and the table and JSON say so.

The end-to-end test certifies two mutants chosen to be caught early (one net, one blk) in
subprocesses, two at a time, through the CLI; the format tests build rows by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vdpacert.cli import main
from vdpacert.conformance.mutants.killtable import KillRow, KillTable, certify_argv, run_mutant, run_table, text_table
from vdpacert.conformance.mutants.registry import MUTANTS, target_string

NET_MUTANT = "features_ok_without_version_1"  # killed by any drawn feature set without VERSION_1
BLK_MUTANT = "used_len_counts_readable"
SEED = 1


def test_two_mutants_killed_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kill.json"
    status = main(["mutants", "--only", NET_MUTANT, BLK_MUTANT, "-n", "2", "--seed", str(SEED), "--json", str(out)])
    printed = capsys.readouterr()
    assert status == 0, printed.out + printed.err
    data = json.loads(out.read_text(encoding="utf-8"))
    assert (data["killed"], data["total"], data["seed"], data["jobs"], data["profile"]) == (2, 2, SEED, 2, "quick")
    assert data["wall_seconds"] > 0
    rows = {row["mutant"]: row for row in data["rows"]}
    assert list(rows) == [NET_MUTANT, BLK_MUTANT]  # registry order as asked, whatever finished first
    for name, row in rows.items():
        assert set(row) >= {"mutant", "base_target", "killed", "clauses", "seconds", "hint"}
        assert row["base_target"] == MUTANTS[name].base_target
        assert row["killed"] is True and row["clauses"] and row["reason"] == ""
        assert row["hint"] == MUTANTS[name].clause_hint
        assert row["hint_matched"] == (row["hint"] in row["clauses"])
        assert 0 < row["seconds"] <= data["wall_seconds"] + 1
    # The FEATURES_OK bug is caught by the clause it breaks.
    assert "status.device.refuse_invalid_features" in rows[NET_MUTANT]["clauses"]
    lines = printed.out.splitlines()
    assert lines[0].split()[:4] == ["mutant", "base", "killed", "secs"]
    assert any(line.startswith(NET_MUTANT) and " yes " in line for line in lines)
    assert any(line.startswith(BLK_MUTANT) and " yes " in line for line in lines)
    assert f"2/2 mutants killed (seed {SEED}, 2 at a time)" in printed.out
    assert "[2/2]" in printed.err


def test_a_timeout_is_not_a_kill() -> None:
    row = run_mutant(NET_MUTANT, SEED, timeout=0.2)
    assert (row.killed, row.reason, row.clauses) == (False, "timeout", ())
    assert row.verdict == "no (timeout)"


def test_unknown_mutant_is_bad_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mutants", "--only", "no_such_mutant"]) == 2
    assert "no mutant no_such_mutant" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no_such_mutant"):
        run_table(["no_such_mutant"], SEED)


def test_certify_command_line() -> None:
    argv = certify_argv(NET_MUTANT, 7, Path("/w"))
    assert argv[1:4] == ["-m", "vdpacert", "certify"]
    assert argv[argv.index("--target") + 1] == target_string(NET_MUTANT)
    assert argv[argv.index("--profile") + 1] == "quick"
    assert argv[argv.index("--seed") + 1] == "7"
    assert argv[argv.index("--json") + 1] == "/w/report.json"


def test_table_and_json_format() -> None:
    rows = (
        KillRow("a_mutant", "sim-net", True, ("x.y", "hint.clause"), 3.25, "hint.clause"),
        KillRow("b", "sim-blk", True, ("suite.target.alive",), 12.0, "other"),
        KillRow("c", "sim-blk", False, ("w.clause",), 1.0, "c.hint", "only warnings"),
        KillRow("d", "sim-net", False, (), 120.0, "d.hint", "timeout"),
        KillRow("e", "sim-blk", True, ("blk.OUT.beyond_capacity",), 4.0, "blk.OUT.beyond_capacity", by_warning=True),
    )
    table = KillTable(rows, seed=5, jobs=2, timeout=120.0, wall_seconds=70.04)
    assert (table.killed, table.all_killed) == (3, False)
    text = text_table(table).splitlines()
    assert text[0].split() == ["mutant", "base", "killed", "secs", "hint", "failed", "clauses"]
    assert set(text[1]) == {"-"}
    assert text[2].split() == ["a_mutant", "sim-net", "yes", "3.2", "yes", "x.y,", "hint.clause"]
    assert text[3].split() == ["b", "sim-blk", "yes", "(target", "hung)", "12.0", "no", "suite.target.alive"]
    assert text[4].split() == ["c", "sim-blk", "no", "(only", "warnings)", "1.0", "-", "warn:", "w.clause"]
    assert text[5].split() == ["d", "sim-net", "no", "(timeout)", "120.0", "-", "-"]
    assert text[6].split() == ["e", "sim-blk", "yes", "(SHOULD", "warning)", "4.0", "yes", "warn:",
                               "blk.OUT.beyond_capacity"]
    assert text[-1] == "3/5 mutants killed (seed 5, 2 at a time), wall time 70.0 s"
    # Columns line up: every row's seconds ends where the header's "secs" ends.
    end = text[0].index("secs") + len("secs")
    assert all(line[end - 1].isdigit() for line in text[2:6])
    data = table.to_json()
    assert (data["killed"], data["total"], data["wall_seconds"], data["timeout"]) == (3, 5, 70.04, 120.0)
    assert data["rows"][0] == {"mutant": "a_mutant", "base_target": "sim-net", "killed": True,
                               "clauses": ["x.y", "hint.clause"], "seconds": 3.25, "hint": "hint.clause",
                               "hint_matched": True, "reason": "", "by_warning": False}
    assert data["rows"][3]["killed"] is False and data["rows"][3]["reason"] == "timeout"
