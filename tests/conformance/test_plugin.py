"""The pytest plugin and the suite runner: options, sharding, xdist merging, step logs and replay.

This module is also a small suite (``--vdpa-suite test_plugin``): two real machines registered
below, checked through the client against the model. ``bring_up`` writes status steps and
compares GET_STATUS with :func:`vdpacert.model.status.write_status`; ``config_reads`` stores
config windows in a Bundle and reads them back (so replay files carry Bundle references).
The runs happen in subprocesses, as CI would start them.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    VarReference,
    precondition,
    rule,
    run_state_machine_as_test,
)

from vdpacert.conformance import suite
from vdpacert.conformance.plugin import parse_shard, shard
from vdpacert.conformance.profiles import RunProfile
from vdpacert.conformance.replay import ReplayFile, Step, StepLog, clause_of, decode, encode, replay
from vdpacert.conformance.targets import Target
from vdpacert.model.status import write_status
from vdpacert.uapi import virtio_config as C  # noqa: N812

HERE = Path(__file__).resolve().parent
BUGGY = "python:buggy_parent:reset_keeps_status"

# ----- the small suite ---------------------------------------------------------------------------------


class ClauseViolation(AssertionError):
    def __init__(self, clause: str, message: str) -> None:
        super().__init__(f"{clause}: {message}")
        self.clause = clause


class StatusWriter:
    """Opens the target afresh for each example and writes status bytes checked against the model."""

    def open(self, target: Target) -> None:
        self.exercised: Counter[str] = Counter()
        target.reopen()
        self.client = target.client
        self.client.set_owner()
        self.offered = self.client.get_features()
        self.status = 0

    def write(self, new: int, clause: str = "suite.lockstep.status") -> None:
        predicted = write_status(self.status, new, features_valid=True).status
        self.client.set_status(new)
        seen = self.client.get_status()
        self.exercised[clause] += 1
        if seen != predicted:
            raise ClauseViolation(clause, f"wrote {new:#x} over {self.status:#x}: the device reports {seen:#x}, "
                                          f"the model {predicted:#x}")
        self.status = seen


def build_bring_up(target: Target, profile: RunProfile) -> type[RuleBasedStateMachine]:
    class BringUp(StatusWriter, RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.open(target)

        @rule()
        def reset(self) -> None:
            self.write(0, "status.device.reset_clears")

        @precondition(lambda self: self.status == 0)
        @rule()
        def acknowledge(self) -> None:
            self.write(C.VIRTIO_CONFIG_S_ACKNOWLEDGE)

        @precondition(lambda self: self.status == C.VIRTIO_CONFIG_S_ACKNOWLEDGE)
        @rule()
        def driver(self) -> None:
            self.write(self.status | C.VIRTIO_CONFIG_S_DRIVER)

        @precondition(lambda self: self.status == C.VIRTIO_CONFIG_S_ACKNOWLEDGE | C.VIRTIO_CONFIG_S_DRIVER)
        @rule()
        def features_ok(self) -> None:
            self.client.set_features(self.offered)
            self.write(self.status | C.VIRTIO_CONFIG_S_FEATURES_OK)

    return BringUp


def build_config_reads(target: Target, profile: RunProfile) -> type[RuleBasedStateMachine]:
    class ConfigReads(RuleBasedStateMachine):
        windows = Bundle("windows")

        def __init__(self) -> None:
            super().__init__()
            self.exercised: Counter[str] = Counter()
            target.reopen()
            self.client = target.client
            self.client.set_owner()
            self.size = self.client.get_config_size()
            self.first = self.client.get_config(0, self.size)

        @rule(target=windows, offset=st.integers(0, 255), length=st.integers(1, 8))
        def pick(self, offset: int, length: int) -> tuple[int, int]:
            return offset % self.size, length

        @rule(window=windows)
        def read(self, window: tuple[int, int]) -> None:
            offset, length = window
            length = min(length, self.size - offset)
            self.exercised["suite.lockstep.config"] += 1
            if self.client.get_config(offset, length) != self.first[offset:offset + length]:
                raise ClauseViolation("suite.lockstep.config", f"config [{offset}, +{length}) changed")

    return ConfigReads


BRING_UP = suite.register(suite.SuiteEntry("bring_up", None, build_bring_up))
CONFIG_READS = suite.register(suite.SuiteEntry("config_reads", None, build_config_reads))


# ----- helpers ------------------------------------------------------------------------------------------


def run_pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """pytest over the suite module in a fresh process, with this module as the suite."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "HYPOTHESIS"))}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "pytest", "-p", "no:vdpacert", "-p", "vdpacert.conformance.plugin",
               "-p", "no:cacheprovider", "--pyargs", "vdpacert.conformance", "--vdpa-suite", "test_plugin", *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def examples(report: dict[str, Any]) -> dict[str, int]:
    return {c["id"]: c["examples"] for c in report["clauses"] if c["examples"]}


# ----- options and sharding ---------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [("1/1", (1, 1)), ("2/4", (2, 4)), ("4/4", (4, 4))])
def test_shard_option_parses(text: str, expected: tuple[int, int]) -> None:
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["0/2", "3/2", "1/0", "2", "a/b", "1/2/3", ""])
def test_bad_shard_option_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="--vdpa-shard"):
        parse_shard(text)


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_shards_are_deterministic_disjoint_and_complete(count: int) -> None:
    ids = [f"test_conformance.py::test_suite_machine[m{i}]" for i in range(13)]
    slices = [shard(ids, index, count) for index in range(1, count + 1)]
    shuffled = random.Random(count).sample(ids, len(ids))
    assert [shard(shuffled, index, count) for index in range(1, count + 1)] == slices  # order-independent
    assert sorted(nodeid for piece in slices for nodeid in piece) == sorted(ids)  # complete and disjoint
    assert max(map(len, slices)) - min(map(len, slices)) <= 1  # balanced


def test_options_reach_the_run_and_the_shard_selects_items(tmp_path: Path) -> None:
    done = run_pytest(tmp_path, "--co", "--vdpa-target", "sim-blk:capacity=4096", "--vdpa-profile", "full",
                      "--vdpa-examples", "3", "--vdpa-seed", "77", "--vdpa-shard", "2/2",
                      "--vdpa-target-profile", "linux-vdpa-sim")
    assert done.returncode == 0, done.stdout + done.stderr
    assert ("vdpacert: target sim-blk:capacity=4096, profile full (3 examples x 100 steps), "
            "target profile linux-vdpa-sim, seed 77, shard 2/2") in done.stdout
    assert "test_suite_machine[config_reads]" in done.stdout
    assert "test_suite_machine[bring_up]" not in done.stdout  # the other shard's
    assert "1 deselected" in done.stdout


@pytest.mark.parametrize(("option", "message"), [
    (["--vdpa-shard", "3/2"], "need 1 <= I <= N"),
    (["--vdpa-target", "sim-nic"], "unknown kind 'sim-nic'"),
    (["--vdpa-target-profile", "nope"], "no target profile 'nope'"),
    (["--vdpa-examples", "0"], "max_examples must be at least 1"),
    (["--vdpa-deadline", "-1"], "--vdpa-deadline must not be negative"),
])
def test_bad_options_are_usage_errors(tmp_path: Path, option: list[str], message: str) -> None:
    done = run_pytest(tmp_path, "--co", *option)
    assert done.returncode == pytest.ExitCode.USAGE_ERROR
    assert message in done.stderr


# ----- parallel runs ------------------------------------------------------------------------------------


def test_recorders_of_two_workers_merge_into_the_single_process_report(tmp_path: Path) -> None:
    common = ("--vdpa-target", "sim-blk", "--vdpa-seed", "5", "--vdpa-examples", "6")
    parallel = run_pytest(tmp_path, *common, "-n", "2", "--vdpa-report-dir", str(tmp_path / "n2"))
    single = run_pytest(tmp_path, *common, "-p", "no:xdist", "--vdpa-report-dir", str(tmp_path / "n0"))
    assert parallel.returncode == 0, parallel.stdout + parallel.stderr
    assert single.returncode == 0, single.stdout + single.stderr
    merged = json.loads((tmp_path / "n2" / "report.json").read_text())
    alone = json.loads((tmp_path / "n0" / "report.json").read_text())
    fragments = sorted((tmp_path / "n2").glob("recorder-gw*.json"))
    assert [f.name for f in fragments] == ["recorder-gw0.json", "recorder-gw1.json"]
    summed: Counter[str] = Counter()
    for fragment in fragments:
        summed.update(json.loads(fragment.read_text())["recorder"]["exercised"])
    assert examples(merged) == dict(summed) == examples(alone)
    assert set(examples(merged)) == {"suite.lockstep.status", "status.device.reset_clears", "suite.lockstep.config"}
    assert merged["seed"] == alone["seed"] == 5
    assert merged["device"]["name"] == "virtio-blk"
    assert merged["summary"]["fail"] == 0


# ----- step logs and replay -------------------------------------------------------------------------------


class Colour(enum.IntEnum):
    RED = 1


@dataclasses.dataclass(frozen=True)
class Window:
    offset: int
    data: bytes


@pytest.mark.parametrize("value", [
    None, True, 7, 1 << 70, -3, 0.5, "text", b"\x00\xff", bytearray(b"ab"), (1, (2, b"x")), [1, [2]],
    frozenset({1, 2}), {3}, {"k": (1, 2), 5: None}, Colour.RED, Window(4, b"\x01"),
])
def test_arguments_round_trip_through_json(value: Any) -> None:
    assert decode(json.loads(json.dumps(encode(value)))) == value


def test_bundle_references_are_stored_by_name() -> None:
    assert encode(VarReference("windows_0")) == {"$var": "windows_0"}
    assert decode({"$var": "windows_0"}, {"windows_0": (3, 4)}) == (3, 4)


def test_clause_of_reads_the_exception() -> None:
    assert clause_of(ClauseViolation("suite.lockstep.status", "x")) == "suite.lockstep.status"
    assert clause_of(ValueError("no clause")) is None
    assert clause_of(ExceptionGroup("flaky", [ValueError(), ClauseViolation("suite.lockstep.config", "y")])) == (
        "suite.lockstep.config")


def test_a_replay_file_reruns_bundle_steps_deterministically(tmp_path: Path) -> None:
    """A step log with a Bundle reference, written, read back and replayed on a fresh target."""
    log = StepLog()
    log.note("pick", {"offset": 3, "length": 2})
    log.note("read", {"window": VarReference("windows_0")})
    assert log.exact
    recorded = ReplayFile("sim-blk", "config_reads", ("test_plugin",), "quick", "strict", 1,
                          "suite.lockstep.config", "", tuple(log.steps))
    path = recorded.write(tmp_path)
    assert ReplayFile.read(path) == recorded
    outcome = replay(ReplayFile.read(path))
    assert (outcome.failed, outcome.steps_run) == (False, 2)


def test_replay_reproduces_the_buggy_parent_and_not_the_reference(tmp_path: Path) -> None:
    steps = (Step("acknowledge", {}, "state.acknowledge()"), Step("reset", {}, "state.reset()"))
    recorded = ReplayFile(BUGGY, "bring_up", ("test_plugin",), "quick", "strict", 1,
                          "status.device.reset_clears", "", steps)
    outcome = replay(recorded)
    assert outcome.reproduced and outcome.steps_run == 2
    assert "the device reports 0x1, the model 0x0" in outcome.message
    assert not replay(recorded, target="sim-blk").failed



def build_drawn_status(target: Target, profile: RunProfile) -> type[RuleBasedStateMachine]:
    """Status writes drawn inside the rule (``st.data()``): steps with no JSON form, replayed by blob."""

    class DrawnStatus(StatusWriter, RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.open(target)

        @rule(data=st.data())
        def write_drawn(self, data: st.DataObject) -> None:
            if data.draw(st.booleans(), label="reset"):
                self.write(0, "status.device.reset_clears")
            else:
                self.write(self.status | C.VIRTIO_CONFIG_S_ACKNOWLEDGE)

    return DrawnStatus


def test_steps_with_drawn_data_replay_through_the_hypothesis_blob(tmp_path: Path) -> None:
    from hypothesis import settings
    from hypothesis.stateful import run_state_machine_as_test

    from vdpacert.conformance.replay import reproduce_blob
    from vdpacert.conformance.targets import make_target

    entry = suite.register(suite.SuiteEntry("drawn_status", None, build_drawn_status))
    logs: list[StepLog] = []
    with make_target(BUGGY) as target:
        machine_cls = entry.build(target, RunProfile("t", "", 50, 10, 1.0))

        def factory() -> RuleBasedStateMachine:
            machine = machine_cls()
            logs[:] = [StepLog()]
            logs[0].attach(machine)
            return machine

        with pytest.raises(ClauseViolation) as caught:
            run_state_machine_as_test(factory, settings=settings(max_examples=50, database=None, print_blob=True,
                                                                 deadline=None))  # type: ignore[arg-type]
    assert not logs[0].exact  # a DataObject has no JSON form
    blob = reproduce_blob(caught.value.__notes__)
    assert blob is not None
    recorded = ReplayFile(BUGGY, "drawn_status", ("test_plugin",), "quick", "strict", None,
                          clause_of(caught.value), str(caught.value), tuple(logs[0].steps), blob=blob)
    again = ReplayFile.read(recorded.write(tmp_path))
    assert again.blob == blob and not again.exact
    assert replay(again).reproduced
    assert not replay(again, target="sim-blk").failed


# ----- going on past failures ---------------------------------------------------------------------------


def clause_row(report: dict[str, Any], clause_id: str) -> dict[str, Any]:
    return next(row for row in report["clauses"] if row["id"] == clause_id)


def test_a_run_that_keeps_going_files_every_failing_example_and_still_fails(tmp_path: Path) -> None:
    common = ("--vdpa-target", BUGGY, "--vdpa-seed", "3", "--vdpa-examples", "12", "-p", "no:xdist",
              "-k", "bring_up")
    stopped = run_pytest(tmp_path, *common, "--vdpa-report-dir", str(tmp_path / "stop"))
    going = run_pytest(tmp_path, *common, "--vdpa-on-failure", "continue", "--vdpa-report-dir", str(tmp_path / "go"))
    assert stopped.returncode == going.returncode == pytest.ExitCode.TESTS_FAILED, going.stdout + going.stderr
    assert "going on past failures" in going.stdout and "going on past failures" not in stopped.stdout
    first = json.loads((tmp_path / "stop" / "report.json").read_text())
    later = json.loads((tmp_path / "go" / "report.json").read_text())
    assert clause_row(first, "status.device.reset_clears")["failures"] == 1  # the machine stopped there
    kept = clause_row(later, "status.device.reset_clears")
    assert kept["verdict"] == "fail" and 1 < kept["failures"] <= 12  # at most one per example: it ends there
    assert kept["examples"] >= kept["failures"]
    # Each example's own steps, unshrunk, end at the reset that failed; one replay file per clause.
    assert all(f["minimal_sequence"][-2:] == ["state.reset()", "state.teardown()"] or
               f["minimal_sequence"][-1] == "state.reset()" for f in later["failures"])
    assert len(list((tmp_path / "go" / "replays").glob("*"))) == 1
    assert "sequence (as found, unshrunk):" in going.stdout
    assert f"(failed in {kept['failures']} examples)" in going.stdout


def test_a_run_that_keeps_going_passes_a_clean_target(tmp_path: Path) -> None:
    done = run_pytest(tmp_path, "--vdpa-target", "sim-blk", "--vdpa-seed", "3", "--vdpa-examples", "6",
                      "--vdpa-on-failure", "continue", "-p", "no:xdist", "--vdpa-report-dir", str(tmp_path / "r"))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["summary"]["fail"] == 0 and report["failures"] == []
    assert set(examples(report)) == {"suite.lockstep.status", "status.device.reset_clears", "suite.lockstep.config"}


class Countdown(RuleBasedStateMachine):
    """Fails clause ``suite.lockstep.status`` at its third step; crashes instead when told to."""

    crash = False

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    @rule()
    def step(self) -> None:
        self.steps += 1
        if self.steps == 3:
            if self.crash:
                raise KeyError("a bug of the machine itself")
            raise ClauseViolation("suite.lockstep.status", "third step")


def keep_going_run(crash: bool) -> tuple[list[tuple[str | None, int]], list[int]]:
    from hypothesis import settings

    from vdpacert.conformance.test_conformance import _keep_going

    filed: list[tuple[str | None, int]] = []
    finished: list[int] = []

    def make() -> RuleBasedStateMachine:
        machine = Countdown()
        machine.crash = crash
        log = StepLog()
        log.attach(machine)
        _keep_going(machine, log, lambda error, log: filed.append((clause_of(error), len(log.steps))))
        teardown = machine.teardown
        setattr(machine, "teardown", lambda: (finished.append(machine.steps), teardown()))  # noqa: B010
        return machine

    run_state_machine_as_test(make, settings=settings(max_examples=10, stateful_step_count=6, database=None,  # type: ignore[arg-type]
                                                      derandomize=True))
    return filed, finished


def test_keep_going_files_a_clause_failure_and_idles_to_the_end_of_the_example() -> None:
    filed, finished = keep_going_run(crash=False)
    assert filed and all(entry == ("suite.lockstep.status", 3) for entry in filed)  # the steps up to the failure
    assert all(steps <= 3 for steps in finished)  # no rule ran after the failure
    assert len(filed) == sum(steps == 3 for steps in finished)


def test_keep_going_lets_a_crash_through() -> None:
    with pytest.raises(KeyError, match="a bug of the machine itself"):
        keep_going_run(crash=True)
