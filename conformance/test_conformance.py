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

By default the first failure stops the machine and Hypothesis shrinks it. A run that *keeps going*
(``--vdpa-on-failure continue``, the default on a real device) files each failure the moment a
rule, an invariant or the teardown raises it, with the steps of the example so far as its sequence,
and ends only that example: its later steps do nothing (model and device no longer agree, so no
later comparison would mean anything) and the next example starts from a reset device. One bug
then costs one example, not the rest of the machine's clauses. The test fails at the end if any
MUST failure was filed.

An exception naming no clause is a crash of the machine (or of the suite), not a verdict: the
test errors with it, so a broken check can never pass as a clean run.

Every machine runs under a deadline (``--vdpa-deadline``): a target that stops answering inside a
call no timeout covers (a parent blocked forever, an ioctl that never returns) is interrupted by
SIGALRM, reported under ``suite.target.alive``, and the run goes on with the next machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from types import FrameType
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


Filer = Callable[[BaseException, StepLog], None]
#: The clause a machine that runs past its deadline fails: the target stopped answering.
TARGET_ALIVE = "suite.target.alive"
#: Seconds between further interrupts once the deadline passed (a teardown may block on the same device).
DEADLINE_REPEAT = 10.0


class MachineDeadline(BaseException):
    """A machine ran past its deadline.

    A BaseException, not an Exception: Hypothesis would take an Exception for a failing example and
    run it again to report it, and a replay on a device that stopped answering hangs again.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the machine did not finish within its {seconds:g} s deadline: the target stopped "
                         "answering")


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`MachineDeadline` in this thread after ``seconds``, and every few seconds after that.

    SIGALRM interrupts a blocked system call or lock wait, so even a call into a target that never
    returns ends. Only the main thread receives signals: elsewhere (or with ``seconds`` 0) no deadline.
    """
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: FrameType | None) -> None:
        raise MachineDeadline(seconds)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, DEADLINE_REPEAT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _keep_going(machine: RuleBasedStateMachine, log: StepLog, file: Filer) -> Callable[[], bool]:
    """Make ``machine`` file its clause failures with ``file`` and then idle to the end of its example.

    Rules (the initialize rules too) and invariants are wrapped on this instance only: an exception
    naming a clause is filed and ends the example's work; anything else is a crash and propagates.
    Returns a function telling whether the example has ended so (for the teardown).
    """
    ended = False

    def filed(error: Exception) -> None:
        nonlocal ended
        if clause_of(error) is None:  # a crash of the machine, never a verdict
            raise error
        ended = True
        file(error, log)

    def guarded(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def call(state: RuleBasedStateMachine, **arguments: Any) -> Any:
            if ended:
                return None
            try:
                return function(state, **arguments)
            except Exception as error:  # filed, or re-raised by filed() when it names no clause
                filed(error)
                return None

        return call

    def guard_drawn(drawn: tuple[Any, dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
        rule, arguments = drawn
        return dataclasses.replace(rule, function=guarded(rule.function)), arguments

    hooked: Any = machine  # Hypothesis's own attributes (see StepLog.attach)
    hooked._rules_strategy = machine._rules_strategy.map(guard_drawn)
    hooked._initialize_rules_to_run = [dataclasses.replace(rule, function=guarded(rule.function))
                                        for rule in machine._initialize_rules_to_run]
    check_invariants = machine.check_invariants

    def checked(*arguments: Any, **keywords: Any) -> None:
        if ended:
            return
        try:
            check_invariants(*arguments, **keywords)
        except Exception as error:  # filed, or re-raised by filed() when it names no clause
            filed(error)

    setattr(machine, "check_invariants", checked)  # noqa: B010 - instance override
    return lambda: ended


def _factory(run: ConformanceRun, entry: SuiteEntry, machine_cls: type[RuleBasedStateMachine],
             logs: list[StepLog], file: Filer | None = None) -> type[RuleBasedStateMachine]:
    """A machine factory that notes each example's steps and files its exercised counts.

    A function, not a subclass: Hypothesis takes any callable returning a machine (its stub says
    a class), and a function keeps the example database key free of a generated class's name.
    With ``file`` the machine keeps going past failures (:func:`_keep_going`).
    """

    def make_machine() -> RuleBasedStateMachine:
        machine = machine_cls()
        log = StepLog(run.note_step)
        log.attach(machine)
        logs[:] = [log]  # the last example is the one Hypothesis reports
        ended = _keep_going(machine, log, file) if file is not None else (lambda: False)
        teardown = machine.teardown

        def run_teardown() -> None:
            if file is None:
                teardown()
                return
            try:
                teardown()
            except Exception as error:  # filed, ignored or re-raised below
                if clause_of(error) is None:
                    raise
                if not ended():  # after a filed failure, a teardown check compares a model the device left
                    file(error, log)

        def file_counts_after_teardown() -> None:
            try:
                run_teardown()
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
                  log: StepLog | None, *, write_replay: bool = True) -> str | None:
    """Record a clause failure; the text to fail the test with (None: a quirk or a warning).

    ``write_replay`` False files it without a replay file (a clause seen again in a run that keeps going).
    """
    clause_id = clause_of(error)
    if clause_id is None or not clauses.is_clause(clause_id):
        if clause_id is not None:
            error.add_note(f"vdpacert: the machine names clause {clause_id!r}, which is not in the catalog")
        raise error
    message = message_of(error, clause_id)
    notes = [str(note) for note in getattr(error, "__notes__", [])]
    sequence = _minimal_sequence([*lines, *notes], log)
    replay_path: str | None = None
    if write_replay and run.target_profile.quirk_for(clause_id) is None:
        replay = ReplayFile(run.target_name, entry.name, run.suite_modules, run.run_profile.name,
                            run.target_profile.name, run.seed, clause_id, message,
                            tuple(log.steps) if log is not None else (), sequence,
                            reproduce_blob([*lines, *notes]))
        replay_path = str(replay.write(run.replay_dir()))
    failed = run.recorder.violation(clause_id, message, run.target_profile, minimal_sequence=sequence,
                                    replay_file=replay_path)
    if not failed:
        return None
    heading = "sequence (as found, unshrunk):" if run.keeps_going else "minimal sequence:"
    detail = "\n".join([f"{clause_id}: {message}", heading, *(f"  {s}" for s in sequence),
                        *([f"replay: vdpacert replay {replay_path}"] if replay_path is not None else [])])
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
    failures: list[str] = []
    replayed: set[str | None] = set()  # going on, each clause gets one replay file per machine

    def keep(text: object) -> None:
        lines.append(str(text))

    def file_and_go_on(error: BaseException, log: StepLog) -> None:
        clause_id = clause_of(error)
        failure = _file_failure(run, entry, error, [], log, write_replay=clause_id not in replayed)
        replayed.add(clause_id)
        if failure is not None:
            failures.append(failure)

    try:
        with with_reporter(keep), _deadline(run.deadline):
            factory = _factory(run, entry, machine_cls, logs, file_and_go_on if run.keeps_going else None)
            run_state_machine_as_test(factory, settings=run.hypothesis_settings())
    except MachineDeadline as hung:
        log = logs[-1] if logs else None
        sequence = tuple(step.text for step in log.steps) if log is not None else ()
        if run.recorder.violation(TARGET_ALIVE, str(hung), run.target_profile, minimal_sequence=sequence):
            failures.append("\n".join([f"{TARGET_ALIVE}: {hung}", "steps of the example that hung:",
                                        *(f"  {step}" for step in sequence)]))
    except Exception as error:  # a clause failure (filed) or a crash (re-raised)
        failure = _file_failure(run, entry, error, lines, logs[-1] if logs else None)
        if failure is not None:
            failures.append(failure)
    finally:
        request.node.user_properties.append(("vdpacert_steps", run.steps - steps_before))
    if failures:
        pytest.fail("\n\n".join(_distinct(failures)), pytrace=False)


def _distinct(failures: list[str]) -> list[str]:
    """The first failure text of each clause, then a count of the repeats (a run that keeps going)."""
    first: dict[str, str] = {}
    seen: dict[str, int] = {}
    for text in failures:
        clause_id = text.partition(":")[0]
        first.setdefault(clause_id, text)
        seen[clause_id] = seen.get(clause_id, 0) + 1
    return [text if seen[c] == 1 else f"{text}\n(failed in {seen[c]} examples)" for c, text in first.items()]
