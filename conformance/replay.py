"""Replay files: a failure's minimal step sequence, written down so it can be re-run anywhere.

While a suite machine runs, a :class:`StepLog` attached to it notes every rule Hypothesis calls,
with its arguments, before the call (so the failing step is noted too). When a run fails, the
log of the last example, which is Hypothesis's final re-run of the shrunk failing example, is
the minimal sequence; :class:`ReplayFile` stores it with everything needed to rebuild the run:
the target string, the suite entry (and the suite modules that define it), the profiles and the
seed. :func:`replay` opens a fresh target, builds the machine again and calls the same rules with
the same arguments, checking the machine's invariants after every step, exactly as Hypothesis
did; no Hypothesis search is involved, so the replay is deterministic and does not depend on the
Hypothesis version.

Arguments are stored as JSON with tagged forms for what JSON lacks (bytes, tuples, sets, enums,
dataclasses, references to values a rule stored in a Bundle). A value with no such form (an
object of an arbitrary class, ``st.data()``) makes the step list inexact; the file then also
carries Hypothesis's ``@reproduce_failure`` blob, which reproduces the example on the same
Hypothesis version.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import enum
import functools
import hashlib
import importlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from hypothesis.stateful import MultipleResults, RuleBasedStateMachine, VarReference

from vdpacert._version import __version__
from vdpacert.conformance import suite
from vdpacert.conformance.client import TargetDied

__all__ = [
    "FORMAT",
    "ReplayError",
    "ReplayFile",
    "ReplayOutcome",
    "Step",
    "StepLog",
    "clause_of",
    "decode",
    "encode",
    "message_of",
    "replay",
    "reproduce_blob",
]

#: Version of the replay file layout.
FORMAT: Final = 1
#: The clause a target that stops answering breaks (TargetDied carries no clause of its own).
TARGET_ALIVE: Final = "suite.target.alive"
_BLOB: Final = re.compile(r"@reproduce_failure\((['\"][^'\"]+['\"]), (b'[^']*'|b\"[^\"]*\")\)")


class ReplayError(Exception):
    """A replay file that cannot be replayed here (bad file, unknown entry or rule, unencodable step)."""


class Unencodable(TypeError):
    """A step argument with no JSON form."""


# ----- what failed -----------------------------------------------------------------------------


def clause_of(error: BaseException) -> str | None:
    """The clause id an exception reports (``.clause`` / ``.clause_id``, a Clause or an id), or None.

    A :class:`TargetDied` is ``suite.target.alive``; an exception group (Hypothesis's flaky
    report) gives the clause of its first member that has one.
    """
    for attribute in ("clause", "clause_id"):
        value = getattr(error, attribute, None)
        if isinstance(value, str):
            return value
        if value is not None and isinstance(getattr(value, "id", None), str):
            return str(value.id)
    if isinstance(error, TargetDied):
        return TARGET_ALIVE
    if isinstance(error, BaseExceptionGroup):
        for member in error.exceptions:
            found = clause_of(member)
            if found is not None:
                return found
    return None


def message_of(error: BaseException, clause_id: str | None) -> str:
    """The failure's message without a leading ``clause_id:`` (reports show the clause anyway)."""
    message = str(error).strip() or type(error).__name__
    if clause_id is not None and message.startswith(clause_id + ":"):
        return message[len(clause_id) + 1:].strip()
    return message


def reproduce_blob(texts: Iterable[str]) -> tuple[str, str] | None:
    """``(hypothesis version, blob literal)`` from Hypothesis's ``@reproduce_failure(...)`` advice, if given."""
    for text in texts:
        match = _BLOB.search(text)
        if match:
            return ast.literal_eval(match.group(1)), match.group(2)
    return None


# ----- argument encoding -------------------------------------------------------------------------


def _qualified(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve(name: str) -> Any:
    module, _, qualname = name.partition(":")
    try:
        found: Any = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as error:
        raise ReplayError(f"cannot find {name!r} named in the replay file: {error}") from error
    return found


def encode(value: Any) -> Any:
    """A JSON form of a rule argument; :class:`Unencodable` when it has none (see the module docstring)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, enum.Enum):
        return {"$enum": _qualified(type(value)), "value": encode(value.value)}
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, bytes | bytearray):
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, VarReference):
        return {"$var": value.name}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return {"$namedtuple": _qualified(type(value)), "items": [encode(v) for v in value]}
    if isinstance(value, tuple):
        return {"$tuple": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, frozenset | set):
        return {"$frozenset" if isinstance(value, frozenset) else "$set": [encode(v) for v in value]}
    if isinstance(value, dict):
        return {"$dict": [[encode(k), encode(v)] for k, v in value.items()]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return {"$dataclass": _qualified(type(value)), "fields": fields}
    raise Unencodable(f"{type(value).__name__} {value!r} has no JSON form")


def decode(data: Any, names: Mapping[str, Any] | None = None) -> Any:
    """The value :func:`encode` stored; ``names`` resolves Bundle references (the machine's values)."""
    if isinstance(data, list):
        return [decode(v, names) for v in data]
    if not isinstance(data, dict):
        return data
    if len(data) == 1 and "$var" in data:
        if names is None or data["$var"] not in names:
            raise ReplayError(f"the step refers to {data['$var']}, which no earlier step stored")
        return names[data["$var"]]
    items = {key: value for key, value in data.items()}
    if "$bytes" in items:
        return bytes.fromhex(items["$bytes"])
    if "$float" in items:
        return float(items["$float"])
    if "$tuple" in items:
        return tuple(decode(v, names) for v in items["$tuple"])
    if "$set" in items:
        return {decode(v, names) for v in items["$set"]}
    if "$frozenset" in items:
        return frozenset(decode(v, names) for v in items["$frozenset"])
    if "$dict" in items:
        return {decode(k, names): decode(v, names) for k, v in items["$dict"]}
    if "$enum" in items:
        return _resolve(items["$enum"])(decode(items["value"], names))
    if "$namedtuple" in items:
        return _resolve(items["$namedtuple"])(*(decode(v, names) for v in items["items"]))
    if "$dataclass" in items:
        return _resolve(items["$dataclass"])(**{k: decode(v, names) for k, v in items["fields"].items()})
    raise ReplayError(f"unknown tagged value {data!r} in the replay file")


# ----- noting steps while Hypothesis runs ---------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One rule call: the rule's name, its encoded arguments (None: not encodable) and a readable line."""

    rule: str
    args: dict[str, Any] | None
    text: str

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "args": self.args, "text": self.text}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Step:
        return cls(str(data["rule"]), data.get("args"), str(data.get("text", data["rule"])))


def _show(value: Any) -> str:
    if isinstance(value, VarReference):
        return value.name
    return repr(value)


class StepLog:
    """The rules one machine instance ran, noted before each call (see the module docstring).

    :meth:`attach` hooks the instance's rule strategy (which still holds Bundle references, so
    a step says ``v1`` rather than a copy of v1's value) and wraps its initialize rules.
    ``on_step`` is called once per step (progress reporting).
    """

    def __init__(self, on_step: Callable[[], None] | None = None) -> None:
        self.steps: list[Step] = []
        self._on_step = on_step

    @property
    def exact(self) -> bool:
        """Whether every step's arguments were encoded (the steps alone replay the example)."""
        return all(step.args is not None for step in self.steps)

    def note(self, rule_name: str, arguments: Mapping[str, Any]) -> None:
        encoded: dict[str, Any] | None
        try:
            encoded = {name: encode(value) for name, value in arguments.items()}
        except Unencodable:
            encoded = None
        text = f"state.{rule_name}({', '.join(f'{k}={_show(v)}' for k, v in arguments.items())})"
        self.steps.append(Step(rule_name, encoded, text))
        if self._on_step is not None:
            self._on_step()

    def attach(self, machine: RuleBasedStateMachine) -> None:
        def noted(drawn: tuple[Any, dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
            rule, arguments = drawn
            self.note(rule.function.__name__, arguments)
            return drawn

        hooked: Any = machine  # Hypothesis's own attributes, typed narrower than what they accept
        hooked._rules_strategy = machine._rules_strategy.map(noted)
        hooked._initialize_rules_to_run = [dataclasses.replace(rule, function=self._noting(rule.function))
                                            for rule in machine._initialize_rules_to_run]

    def _noting(self, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def call(machine: RuleBasedStateMachine, **arguments: Any) -> Any:
            self.note(function.__name__, arguments)
            return function(machine, **arguments)

        return call


# ----- the file ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayFile:
    """Everything ``vdpacert replay`` needs to re-run one failing example (see the module docstring).

    ``suite_modules`` None means the built-in suite. ``blob`` is ``(hypothesis version, blob
    literal)`` when Hypothesis printed one.
    """

    target: str
    entry: str
    suite_modules: tuple[str, ...] | None
    profile: str
    target_profile: str
    seed: int | None
    clause: str | None
    message: str
    steps: tuple[Step, ...]
    minimal_sequence: tuple[str, ...] = ()
    blob: tuple[str, str] | None = None
    version: str = __version__

    @property
    def exact(self) -> bool:
        return all(step.args is not None for step in self.steps)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "tool": "vdpacert", "version": self.version,
            "target": self.target, "entry": self.entry,
            "suite_modules": None if self.suite_modules is None else list(self.suite_modules),
            "profile": self.profile, "target_profile": self.target_profile, "seed": self.seed,
            "clause": self.clause, "message": self.message, "exact": self.exact,
            "steps": [step.to_json() for step in self.steps],
            "minimal_sequence": list(self.minimal_sequence),
            "hypothesis": None if self.blob is None else {"version": self.blob[0], "blob": self.blob[1]},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReplayFile:
        if data.get("format") != FORMAT or data.get("tool") != "vdpacert":
            raise ReplayError(f"not a vdpacert replay file (format {data.get('format')!r}, expected {FORMAT})")
        try:
            modules = data.get("suite_modules")
            blob = data.get("hypothesis")
            return cls(str(data["target"]), str(data["entry"]), None if modules is None else tuple(modules),
                       str(data["profile"]), str(data["target_profile"]), data.get("seed"), data.get("clause"),
                       str(data.get("message", "")), tuple(Step.from_json(s) for s in data["steps"]),
                       tuple(data.get("minimal_sequence", ())),
                       None if not blob else (str(blob["version"]), str(blob["blob"])), str(data.get("version", "")))
        except (KeyError, TypeError, ValueError) as error:
            raise ReplayError(f"a malformed replay file: {error!r}") from error

    def write(self, directory: str | Path) -> Path:
        """Write the file into ``directory`` under a name made of the entry, clause and content hash."""
        text = json.dumps(self.to_json(), indent=1) + "\n"
        digest = hashlib.sha256(text.encode()).hexdigest()[:10]
        clause = re.sub(r"[^A-Za-z0-9_.-]", "_", self.clause or "crash")
        path = Path(directory) / f"replay-{self.entry}-{clause}-{digest}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    @classmethod
    def read(cls, path: str | Path) -> ReplayFile:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as error:
            raise ReplayError(f"cannot read {path}: {error.strerror}") from error
        except json.JSONDecodeError as error:
            raise ReplayError(f"{path} is not JSON: {error}") from error
        if not isinstance(data, dict):
            raise ReplayError(f"{path} is not a replay file")
        return cls.from_json(data)


# ----- replaying -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayOutcome:
    """What a replay saw: ``failed`` (any failure), the clause and message, and the steps it ran."""

    failed: bool
    clause: str | None
    message: str
    expected_clause: str | None
    steps_run: int

    @property
    def reproduced(self) -> bool:
        """The same clause failed again (a different failure is still a failure, but not this one)."""
        return self.failed and self.clause == self.expected_clause


def _run_invariants(machine: RuleBasedStateMachine, initializing: bool) -> None:
    for invariant in machine.invariants:
        if initializing and not invariant.check_during_init:
            continue
        if all(precondition(machine) for precondition in invariant.preconditions):
            invariant.function(machine)


def run_steps(machine: RuleBasedStateMachine, steps: Sequence[Step],
              on_step: Callable[[], None] | None = None) -> None:
    """Call ``steps`` on ``machine`` as Hypothesis would (invariants after each), then tear it down.

    ``on_step`` is called before each step; the first exception a step or invariant raises propagates.
    """
    rules = {rule.function.__name__: rule for rule in machine.rules}
    pending = {rule.function.__name__: rule for rule in machine._initialize_rules_to_run}
    try:
        _run_invariants(machine, bool(pending))
        for step in steps:
            rule = pending.pop(step.rule, None) or rules.get(step.rule)
            if rule is None:
                raise ReplayError(f"{type(machine).__name__} has no rule {step.rule!r} "
                                  "(the machine changed since the file was written?)")
            if step.args is None:
                raise ReplayError(f"step {step.text} has arguments with no JSON form")
            arguments = {name: decode(value, machine.names_to_values) for name, value in step.args.items()}
            if on_step is not None:
                on_step()
            result = rule.function(machine, **arguments)
            if rule.targets:
                values = list(result.values) if isinstance(result, MultipleResults) else [result]
                storing: Any = machine  # Hypothesis names and stores the results exactly as it did
                storing._add_results_to_targets(rule.targets, values)
            _run_invariants(machine, bool(pending))
    finally:
        machine.teardown()


def _replay_blob(machine_cls: type[RuleBasedStateMachine], recorded: ReplayFile) -> None:
    from hypothesis import HealthCheck, Verbosity, reproduce_failure, settings
    from hypothesis import __version__ as hypothesis_version
    from hypothesis.errors import DidNotReproduce
    from hypothesis.stateful import run_state_machine_as_test

    assert recorded.blob is not None
    version, literal = recorded.blob
    if version != hypothesis_version:
        raise ReplayError(f"the steps have arguments with no JSON form and the Hypothesis blob is for version "
                          f"{version}, this is {hypothesis_version}")
    factory = reproduce_failure(version, ast.literal_eval(literal))(machine_cls)
    quiet = settings(deadline=None, database=None, print_blob=False, verbosity=Verbosity.quiet,
                     suppress_health_check=list(HealthCheck))
    with contextlib.suppress(DidNotReproduce):  # the example passes now: nothing to report
        run_state_machine_as_test(factory, settings=quiet)


def replay(recorded: ReplayFile, *, target: str | None = None) -> ReplayOutcome:
    """Re-run ``recorded`` against a fresh target (``target`` overrides the file's); see the module doc.

    ReplayError when the file cannot be replayed here; a failure of the target is the outcome.
    """
    from vdpacert.conformance.profiles import ProfileError, run_profile
    from vdpacert.conformance.targets import make_target

    try:
        suite.load(recorded.suite_modules)
        entry = suite.entry(recorded.entry)
        profile = run_profile(recorded.profile)
    except (ImportError, KeyError, ProfileError) as error:
        raise ReplayError(str(error).strip("'\"")) from error
    if not recorded.exact and recorded.blob is None:
        raise ReplayError("the steps have arguments with no JSON form and the file has no Hypothesis blob")
    try:
        opened = make_target(target or recorded.target)
    except (ValueError, OSError) as error:
        raise ReplayError(f"cannot open target {target or recorded.target}: {error}") from error
    ran = [0]

    def count() -> None:
        ran[0] += 1

    try:
        machine_cls = entry.build(opened, profile)
        try:
            if recorded.exact:
                run_steps(machine_cls(), recorded.steps, count)
            else:  # Hypothesis re-runs the whole example: count it as every step
                ran[0] = len(recorded.steps)
                _replay_blob(machine_cls, recorded)
        except ReplayError:
            raise
        except Exception as error:
            clause = clause_of(error)
            return ReplayOutcome(True, clause, message_of(error, clause), recorded.clause, ran[0])
    finally:
        opened.close()
    return ReplayOutcome(False, None, "", recorded.clause, ran[0])
