"""``vdpacert certify`` and ``vdpacert replay`` end to end, in fresh processes as a user runs them.

The suite is the small one :mod:`test_plugin` registers (``--suite test_plugin``): a real status
bring-up machine and a config-read machine. The reference sim-blk passes it; the buggy parent of
:mod:`buggy_parent` (a reset that keeps the status byte) fails ``status.device.reset_clears``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vdpacert import cli

HERE = Path(__file__).resolve().parent
BUGGY = "python:buggy_parent:reset_keeps_status"
RESET_CLEARS = "status.device.reset_clears"


def vdpacert(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "HYPOTHESIS"))}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "vdpacert", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def certify(tmp_path: Path, target: str, *args: str) -> subprocess.CompletedProcess[str]:
    return vdpacert(tmp_path, "certify", "--target", target, "--suite", "test_plugin", "--seed", "11",
                    "--examples", "8", *args)


def test_certify_passes_the_reference_device_and_writes_every_report(tmp_path: Path) -> None:
    done = certify(tmp_path, "sim-blk", "--json", "r.json", "--junit", "r.xml", "--html", "r.html")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["target"], report["profile"], report["seed"], report["exit_status"]) == ("sim-blk", "quick", 11, 0)
    verdicts = {c["id"]: c["verdict"] for c in report["clauses"]}
    assert verdicts["suite.lockstep.status"] == verdicts[RESET_CLEARS] == verdicts["suite.lockstep.config"] == "pass"
    assert {v for c, v in verdicts.items() if c.startswith("net.")} == {"not-applicable"}  # a block device
    assert report["failures"] == []
    cases = ET.parse(tmp_path / "r.xml").getroot().iter("testcase")
    assert sum(1 for _ in cases) == len(report["clauses"])
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    # The table on stdout, the progress on stderr (plain lines: not a terminal), pytest's chatter nowhere.
    assert "exit status 0: no MUST clause failed" in done.stdout
    assert "suite.lockstep.status" in done.stdout and "passed in" not in done.stdout
    assert "vdpacert: [2/2]" in done.stderr and "2 done, 0 failed" in done.stderr
    assert (tmp_path / "vdpacert-report" / "report.json").exists()  # the run's own copy, default directory
    assert not (tmp_path / ".hypothesis").exists()  # Hypothesis's caches stay in the report directory


def test_certify_fails_a_buggy_parent_with_a_replay_file_that_reproduces(tmp_path: Path) -> None:
    done = certify(tmp_path, BUGGY, "--json", "r.json", "-n", "2")
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["exit_status"] == 1
    assert {c["id"]: c["verdict"] for c in report["clauses"]}[RESET_CLEARS] == "fail"
    (failure,) = report["failures"]
    assert failure["clause"] == RESET_CLEARS
    assert failure["minimal_sequence"] == ["state = BringUp()", "state.acknowledge()", "state.reset()",
                                           "state.teardown()"]
    replay_file = Path(failure["replay_file"])
    assert replay_file.parent == tmp_path / "vdpacert-report" / "replays"
    assert f"replay: vdpacert replay {replay_file}" in done.stdout
    recorded = json.loads(replay_file.read_text())
    assert (recorded["target"], recorded["entry"], recorded["seed"], recorded["exact"]) == (BUGGY, "bring_up", 11, True)
    assert [step["rule"] for step in recorded["steps"]] == ["acknowledge", "reset"]

    again = vdpacert(tmp_path, "replay", str(replay_file))
    assert again.returncode == 1, again.stdout + again.stderr
    assert f"reproduced: {RESET_CLEARS} failed at step 2" in again.stdout
    fixed = vdpacert(tmp_path, "replay", str(replay_file), "--target", "sim-blk")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "no longer fails: all 2 steps passed" in fixed.stdout


def test_certify_can_go_on_past_failures_and_each_one_replays(tmp_path: Path) -> None:
    done = certify(tmp_path, BUGGY, "--json", "r.json", "--on-failure", "continue")
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    row = next(c for c in report["clauses"] if c["id"] == RESET_CLEARS)
    assert row["verdict"] == "fail" and row["failures"] == len(report["failures"]) > 1
    assert {f["clause"] for f in report["failures"]} == {RESET_CLEARS}
    first, *later = report["failures"]
    assert first["replay_file"] and all(f["replay_file"] is None for f in later)  # one replay file per clause
    again = vdpacert(tmp_path, "replay", first["replay_file"])
    assert again.returncode == 1 and f"reproduced: {RESET_CLEARS} failed" in again.stdout, again.stdout


def test_a_declared_quirk_is_reported_as_a_quirk_and_passes(tmp_path: Path) -> None:
    (tmp_path / "buggy.toml").write_text(f'''
name = "buggy-blk"
[[quirk]]
name = "buggy.reset_keeps_status"
clause = "{RESET_CLEARS}"
description = "a reset leaves the status byte as it was"
''')
    done = certify(tmp_path, BUGGY, "--target-profile", "buggy.toml", "--json", "r.json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert {c["id"]: c["verdict"] for c in report["clauses"]}[RESET_CLEARS] == "quirk"
    (quirk,) = report["quirks"]
    assert quirk["name"] == "buggy.reset_keeps_status" and quirk["observed"] >= 1
    assert report["failures"] == []
    assert not (tmp_path / "vdpacert-report" / "replays").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--target", "sim-nic"], "unknown kind 'sim-nic'"),
    (["--target-profile", "nope"], "no target profile 'nope'"),
    (["-n", "many"], "give a number of workers"),
])
def test_certify_refuses_bad_usage_before_running(args: list[str], message: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["certify", *args]) == 2
    assert message in capsys.readouterr().err


def test_replay_refuses_a_file_that_is_not_a_replay_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.json").write_text('{"format": 1}')
    assert cli.main(["replay", str(tmp_path / "x.json")]) == 2
    assert "not a vdpacert replay file" in capsys.readouterr().err


def test_progress_draws_a_bar_on_a_terminal_and_lines_elsewhere() -> None:
    import io

    from vdpacert.conformance.progress import Progress

    terminal = io.StringIO()
    bar = Progress(terminal, tty=True, width=80)
    bar.start(4)
    bar.step(7)
    bar.test_done("bring_up", "passed")
    assert bar.render().startswith("[######..................] 1/4 machines, 7 steps, ")
    assert bar.render().endswith("bring_up passed") and len(bar.render()) < 80
    bar.finish()
    assert terminal.getvalue().startswith("\r[") and terminal.getvalue().endswith("\n")
    assert "\n" not in terminal.getvalue()[:-1]  # one line, redrawn in place

    log = io.StringIO()
    plain = Progress(log, tty=False)
    plain.start(2)
    plain.step(1000)  # nothing per step in a log
    plain.test_done("bring_up", "failed", steps=12)
    plain.finish()
    lines = log.getvalue().splitlines()
    assert lines[0] == "vdpacert: running 2 suite machines"
    assert lines[1].startswith("vdpacert: [1/2] bring_up failed (") and lines[1].endswith(", 12 steps)")
    assert lines[2].startswith("vdpacert: 1 done, 1 failed, 1012 steps, ")
    assert "\r" not in log.getvalue()
