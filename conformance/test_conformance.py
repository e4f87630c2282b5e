"""The suite as pytest tests: one test per suite machine that runs on the target's device type.

Collected by ``pytest --pyargs vdpacert.conformance`` with the vdpacert plugin loaded (see
:mod:`vdpacert.conformance.plugin`). Each test runs its machine with
``hypothesis.stateful.run_state_machine_as_test`` under the run profile's settings and the run's
seed, and files what happened in the process's recorder:

* every example's ``machine.exercised`` counts, after the example (shrinking runs included: a
  check that ran is a check that ran), and its ``machine.quirks`` (if it has them): declared quirks
  the target showed, by (clause, quirk name), filed as quirk observations; and its
  ``machine.warned`` (if it has it): SHOULD deviations the machine noted without stopping;
* a failure naming a clause the target profile declares a quirk for: a quirk, the test passes;
* a failure of a MUST clause: a failure with the shrunk step sequence and a replay file; the
  test fails;
* a failure of a SHOULD (or MAY) clause: the same record, a warn verdict; the test passes with
  a :class:`~vdpacert.conformance.plugin.VdpaWarning`.

An exception naming no clause is a crash of the machine (or of the suite), not a verdict: the
test errors with it, so a broken check can never pass as a clean run.
"""

from __future__ import annotations

import warnings
from typing import Any, cast

import pytest
from hypothesis import seed
from hypothesis.reporting import with_reporter
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test

from vdpacert.conformance import clauses
from vdpacert.conformance.plugin import ENTRY_FIXTURE, ConformanceRun, VdpaWarning, current
from vdpacert.conformance.replay import ReplayFile, StepLog, clause_of, message_of, reproduce_blob
from vdpacert.conformance.suite import SuiteEntry


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if ENTRY_FIXTURE in metafunc.fixturenames:
        entries = current(metafunc.config).entries()
        metafunc.parametrize(ENTRY_FIXTURE, entries, ids=[entry.name for entry in entries])


def _minimal_sequence(lines: list[str], log: StepLog | None) -> tuple[str, ...]:
    """The steps of Hypothesis's final report (``state = ...`` to ``state.teardown()``), else the log's."""
    text = [line for chunk in lines for line in chunk.splitlines()]
    starts = [i for i, line in enumerate(text) if line.startswith("state = ")]
    if starts:
        block = text[starts[-1]:]
        end = next((i for i, line in enumerate(block) if line.startswith("state.teardown()")), len(block) - 1)
        return tuple(block[: end + 1])
    return tuple(step.text for step in log.steps) if log is not None else ()


def _factory(run: ConformanceRun, entry: SuiteEntry, machine_cls: type[RuleBasedStateMachine],
             logs: list[StepLog]) -> type[RuleBasedStateMachine]:
    """A machine factory that notes each example's steps and files its exercised counts.

    A function, not a subclass: Hypothesis takes any callable returning a machine (its stub says
    a class), and a function keeps the example database key free of a generated class's name.
    """

    def make_machine() -> RuleBasedStateMachine:
        machine = machine_cls()
        log = StepLog(run.note_step)
        log.attach(machine)
        logs[:] = [log]  # the last example is the one Hypothesis reports
        teardown = machine.teardown

        def file_counts_after_teardown() -> None:
            try:
                teardown()
            finally:
                counts = getattr(machine, "exercised", None)
                if counts is None:  # a wiring mistake must be loud: silence would read as "nothing exercised"
                    raise TypeError(f"suite entry {entry.name}: {type(machine).__name__} instances have no "
                                    "'exercised' Counter (see vdpacert.conformance.suite)")
                for clause_id, count in counts.items():
                    if count:
                        run.recorder.exercised(clause_id, count)
                for (clause_id, name), count in getattr(machine, "quirks", {}).items():
                    if count:  # the model predicted a declared quirk's answer and the target gave it
                        run.recorder.quirk(clause_id, name, f"the target answered as quirk {name} predicts",
                                           count)
                for clause_id, message in getattr(machine, "warned", ()):
                    run.recorder.warned(clause_id, message)  # a SHOULD not followed; the example goes on

        setattr(machine, "teardown", file_counts_after_teardown)  # noqa: B010 - instance override
        return machine

    # The example database key: the entry and target, not this function's (shared) source.
    factory: Any = seed(run.seed)(make_machine)
    factory._hypothesis_internal_add_digest = f"vdpacert:{entry.name}:{run.target_name}".encode()
    return cast("type[RuleBasedStateMachine]", factory)


def _file_failure(run: ConformanceRun, entry: SuiteEntry, error: BaseException, lines: list[str],
                  log: StepLog | None) -> str | None:
    """Record a clause failure; the text to fail the test with (None: a quirk or a warning)."""
    clause_id = clause_of(error)
    if clause_id is None or not clauses.is_clause(clause_id):
        if clause_id is not None:
            error.add_note(f"vdpacert: the machine names clause {clause_id!r}, which is not in the catalog")
        raise error
    message = message_of(error, clause_id)
    notes = [str(note) for note in getattr(error, "__notes__", [])]
    sequence = _minimal_sequence([*lines, *notes], log)
    replay_path: str | None = None
    if run.target_profile.quirk_for(clause_id) is None:
        replay = ReplayFile(run.target_name, entry.name, run.suite_modules, run.run_profile.name,
                            run.target_profile.name, run.seed, clause_id, message,
                            tuple(log.steps) if log is not None else (), sequence,
                            reproduce_blob([*lines, *notes]))
        replay_path = str(replay.write(run.replay_dir()))
    failed = run.recorder.violation(clause_id, message, run.target_profile, minimal_sequence=sequence,
                                    replay_file=replay_path)
    if not failed:
        return None
    detail = "\n".join([f"{clause_id}: {message}", "minimal sequence:", *(f"  {s}" for s in sequence),
                        f"replay: vdpacert replay {replay_path}"])
    if clauses.clause(clause_id).is_must:
        return detail
    warnings.warn(VdpaWarning(detail), stacklevel=1)
    return None


def test_suite_machine(vdpa_run: ConformanceRun, vdpa_suite_entry: SuiteEntry, request: pytest.FixtureRequest) -> None:
    run, entry = vdpa_run, vdpa_suite_entry
    steps_before = run.steps
    machine_cls = entry.build(run.target(), run.run_profile)
    logs: list[StepLog] = []
    lines: list[str] = []
    failure: str | None = None

    def keep(text: object) -> None:
        lines.append(str(text))

    try:
        with with_reporter(keep):
            run_state_machine_as_test(_factory(run, entry, machine_cls, logs), settings=run.hypothesis_settings())
    except Exception as error:  # a clause failure (filed) or a crash (re-raised)
        failure = _file_failure(run, entry, error, lines, logs[-1] if logs else None)
    finally:
        request.node.user_properties.append(("vdpacert_steps", run.steps - steps_before))
    if failure is not None:
        pytest.fail(failure, pytrace=False)
