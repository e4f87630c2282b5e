"""What a run observed, per clause, and the verdict that follows from it.

A :class:`Recorder` is the only place a check reports to: ``exercised`` each time it checks a
clause, then ``failed`` / ``warned`` / ``quirk`` when the check found something. Verdicts are
computed at the end from the counts, the clause's level and whether the clause applies to the
device, so the rules live in one place:

========== ===============================================================================
verdict    when
========== ===============================================================================
fail       a MUST clause has at least one failure
warn       a failure on a SHOULD (or MAY) clause, or an explicit warning on any clause
quirk      the target deviated exactly as its profile declares (listed, never hidden)
pass       exercised at least once and nothing of the above
n/a        the clause does not apply to the device (and nothing was recorded for it)
not-ex.    applies, but no check of it ran
========== ===============================================================================

pytest-xdist runs one recorder per worker; recorders serialize to plain JSON dicts and merge.
Merging is concatenation of the event streams (counts add, failure examples keep the first
:data:`KEPT_PER_CLAUSE` per clause in stream order), so it is associative and merging the
workers' recorders equals one recorder that saw all their events in the same order.
"""

from __future__ import annotations

import enum
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from . import clauses
from .clauses import Clause
from .profiles import TargetProfile

__all__ = [
    "KEPT_PER_CLAUSE",
    "ClauseResult",
    "Failure",
    "QuirkObservation",
    "Recorder",
    "Verdict",
    "exit_status",
]

#: Failure examples kept per clause (the counts are always exact).
KEPT_PER_CLAUSE: Final = 20
#: Version of the JSON form of a recorder.
FORMAT: Final = 1


class Verdict(enum.StrEnum):
    PASS = "pass"
    FAIL = "fail"
    WARN = "warn"
    QUIRK = "quirk"
    NOT_EXERCISED = "not-exercised"
    NOT_APPLICABLE = "not-applicable"

    def __str__(self) -> str:
        return self.value


Kind = Literal["fail", "warn"]
_KINDS: Final[tuple[Kind, ...]] = ("fail", "warn")


@dataclass(frozen=True)
class Failure:
    """One failing (or warning) observation: the clause, what happened, and how to reproduce it.

    ``minimal_sequence`` is the shrunk operation sequence (one line per step), ``replay_file`` the
    standalone file ``vdpacert replay`` reproduces it from.
    """

    clause: str
    kind: Kind
    message: str
    minimal_sequence: tuple[str, ...] | None = None
    replay_file: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"clause": self.clause, "kind": self.kind, "message": self.message,
                "minimal_sequence": None if self.minimal_sequence is None else list(self.minimal_sequence),
                "replay_file": self.replay_file}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Failure:
        kind = data["kind"]
        if kind not in ("fail", "warn"):
            raise ValueError(f"failure kind must be 'fail' or 'warn', not {kind!r}")
        sequence = data.get("minimal_sequence")
        return cls(str(data["clause"]), kind, str(data["message"]),
                   None if sequence is None else tuple(str(step) for step in sequence), data.get("replay_file"))


@dataclass(frozen=True)
class QuirkObservation:
    """A declared deviation seen ``count`` times; ``detail`` is the first observation's message."""

    clause: str
    name: str
    count: int
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"clause": self.clause, "name": self.name, "count": self.count, "detail": self.detail}


@dataclass(frozen=True)
class ClauseResult:
    """The verdict of one clause and the numbers behind it; ``reason`` explains n/a and not-exercised."""

    clause: Clause
    verdict: Verdict
    examples: int
    failures: int
    warnings: int
    quirks: tuple[str, ...]
    reason: str


def _sequence(steps: Sequence[str] | str | None) -> tuple[str, ...] | None:
    if steps is None:
        return None
    if isinstance(steps, str):
        return tuple(steps.splitlines())
    return tuple(str(step) for step in steps)


class Recorder:
    """Per-clause observations of one run (or one worker of a run). See the module docstring."""

    def __init__(self) -> None:
        self._exercised: Counter[str] = Counter()
        self._counts: dict[Kind, Counter[str]] = {"fail": Counter(), "warn": Counter()}
        self._failures: list[Failure] = []
        self._kept: Counter[str] = Counter()  # failures kept per clause
        self._quirks: dict[tuple[str, str], list[Any]] = {}  # (clause, name) -> [count, first detail]

    # ----- recording -------------------------------------------------------------------------

    def exercised(self, clause_id: str, count: int = 1) -> None:
        """A check of ``clause_id`` ran ``count`` times (whatever its outcome: call this for failures too)."""
        clauses.clause(clause_id)
        if count < 0:
            raise ValueError(f"count must not be negative, not {count}")
        self._exercised[clause_id] += count

    def failed(self, clause_id: str, message: str, *, minimal_sequence: Sequence[str] | str | None = None,
               replay_file: str | None = None) -> None:
        """The target broke ``clause_id``. On a SHOULD or MAY clause this makes a warn verdict, not a fail."""
        self._add(Failure(clauses.clause(clause_id).id, "fail", message, _sequence(minimal_sequence), replay_file))

    def warned(self, clause_id: str, message: str, *, minimal_sequence: Sequence[str] | str | None = None,
               replay_file: str | None = None) -> None:
        """Something worth reporting that does not fail the clause (typically a SHOULD not followed)."""
        self._add(Failure(clauses.clause(clause_id).id, "warn", message, _sequence(minimal_sequence), replay_file))

    def quirk(self, clause_id: str, name: str, detail: str = "", count: int = 1) -> None:
        """The target deviated on ``clause_id`` as its profile's quirk ``name`` declares (``count`` times)."""
        clauses.clause(clause_id)
        if count < 1:
            raise ValueError(f"a quirk is seen at least once, not {count} times")
        entry = self._quirks.setdefault((clause_id, name), [0, ""])
        entry[0] += count
        if not entry[1]:
            entry[1] = detail

    def violation(self, clause_id: str, message: str, profile: TargetProfile | None, *,
                  minimal_sequence: Sequence[str] | str | None = None, replay_file: str | None = None) -> bool:
        """A failure, unless ``profile`` declares a quirk for the clause: then a quirk. True if it failed.

        The one call a check makes when the target disagrees with the model, so excusing a failure
        by a declared quirk never depends on each check remembering to look the profile up.
        """
        declared = None if profile is None else profile.quirk_for(clause_id)
        if declared is not None:
            self.quirk(clause_id, declared.name, message)
            return False
        self.failed(clause_id, message, minimal_sequence=minimal_sequence, replay_file=replay_file)
        return True

    def _add(self, failure: Failure) -> None:
        self._counts[failure.kind][failure.clause] += 1
        if self._kept[failure.clause] < KEPT_PER_CLAUSE:
            self._kept[failure.clause] += 1
            self._failures.append(failure)

    # ----- reading ---------------------------------------------------------------------------

    def examples(self, clause_id: str) -> int:
        return self._exercised[clause_id]

    def failure_count(self, clause_id: str) -> int:
        return self._counts["fail"][clause_id]

    def warning_count(self, clause_id: str) -> int:
        return self._counts["warn"][clause_id]

    @property
    def failures(self) -> tuple[Failure, ...]:
        """The kept failures and warnings, in the order they were recorded."""
        return tuple(self._failures)

    @property
    def quirks(self) -> tuple[QuirkObservation, ...]:
        return tuple(QuirkObservation(c, n, count, detail) for (c, n), (count, detail) in self._quirks.items())

    def verdict(self, clause_id: str, device_id: int | None = None, features: int | None = None,
                backend_features: int | None = None, address_spaces: int | None = None) -> Verdict:
        return self.result(clauses.clause(clause_id), device_id, features, backend_features, address_spaces).verdict

    def result(self, clause: Clause, device_id: int | None = None, features: int | None = None,
               backend_features: int | None = None, address_spaces: int | None = None) -> ClauseResult:
        """The verdict of ``clause``; ``device_id`` None skips the applicability test."""
        cid = clause.id
        fails, warns, examples = self._counts["fail"][cid], self._counts["warn"][cid], self._exercised[cid]
        names = tuple(n for (c, n) in self._quirks if c == cid)
        reason = ""
        if fails and clause.is_must:
            verdict = Verdict.FAIL
        elif fails or warns:
            verdict = Verdict.WARN
        elif names:
            verdict = Verdict.QUIRK
        elif examples:
            verdict = Verdict.PASS
        else:
            na = None if device_id is None else clause.not_applicable_reason(device_id, features, backend_features,
                                                                             address_spaces)
            verdict = Verdict.NOT_EXERCISED if na is None else Verdict.NOT_APPLICABLE
            reason = "no check of this clause ran" if na is None else na
        return ClauseResult(clause, verdict, examples, fails, warns, names, reason)

    def results(self, device_id: int | None = None, features: int | None = None,
                backend_features: int | None = None, address_spaces: int | None = None) -> tuple[ClauseResult, ...]:
        """One result per catalog clause, in catalog order."""
        return tuple(self.result(c, device_id, features, backend_features, address_spaces) for c in clauses.catalog())

    def exit_status(self) -> int:
        """0 when no MUST clause failed, else 1 (warnings, quirks and gaps do not fail a run)."""
        failed = (cid for cid, count in self._counts["fail"].items() if count)
        return 1 if any(clauses.clause(cid).is_must for cid in failed) else 0

    # ----- merging and serializing -----------------------------------------------------------

    def merge(self, other: Recorder) -> Recorder:
        """A new recorder: this one's events followed by ``other``'s (neither is changed)."""
        merged = Recorder.from_json(self.to_json())
        merged.absorb(other)
        return merged

    def absorb(self, other: Recorder) -> None:
        """Append ``other``'s events to this recorder."""
        self._exercised.update(other._exercised)
        for kind in _KINDS:
            self._counts[kind].update(other._counts[kind])
        for failure in other._failures:
            if self._kept[failure.clause] < KEPT_PER_CLAUSE:
                self._kept[failure.clause] += 1
                self._failures.append(failure)
        for key, (count, detail) in other._quirks.items():
            entry = self._quirks.setdefault(key, [0, ""])
            entry[0] += count
            if not entry[1]:
                entry[1] = detail

    @classmethod
    def combine(cls, recorders: Iterable[Recorder]) -> Recorder:
        """All recorders merged in order (an empty iterable gives an empty recorder)."""
        merged = cls()
        for recorder in recorders:
            merged.absorb(recorder)
        return merged

    def to_json(self) -> dict[str, Any]:
        """A plain dict of lists, ints and strings (stable key order, for ``json.dump``)."""
        return {
            "format": FORMAT,
            "exercised": {c: n for c, n in self._exercised.items() if n},
            "failure_counts": {kind: dict(counter) for kind, counter in self._counts.items()},
            "failures": [f.to_json() for f in self._failures],
            "quirks": [q.to_json() for q in self.quirks],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Recorder:
        if data.get("format") != FORMAT:
            raise ValueError(f"recorder format {data.get('format')!r} is not {FORMAT}")
        recorder = cls()
        for cid, count in data["exercised"].items():
            recorder.exercised(cid, int(count))
        for kind in _KINDS:
            for cid, count in data["failure_counts"].get(kind, {}).items():
                clauses.clause(cid)
                recorder._counts[kind][cid] += int(count)
        for item in data["failures"]:
            failure = Failure.from_json(item)
            clauses.clause(failure.clause)
            recorder._kept[failure.clause] += 1
            recorder._failures.append(failure)
        for item in data["quirks"]:
            clauses.clause(item["clause"])
            recorder._quirks[(item["clause"], item["name"])] = [int(item["count"]), str(item["detail"])]
        return recorder

    def save(self, path: str | Path) -> None:
        """Write the JSON form (what each xdist worker leaves for the controller to merge)."""
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Recorder:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recorder) and _canonical(self) == _canonical(other)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (f"Recorder(exercised={sum(self._exercised.values())}, failures={sum(self._counts['fail'].values())}, "
                f"warnings={sum(self._counts['warn'].values())}, quirks={len(self._quirks)})")


def _canonical(recorder: Recorder) -> dict[str, Any]:
    """The JSON form without zero counts (a Counter that saw +0 equals one that saw nothing)."""
    data = recorder.to_json()
    data["failure_counts"] = {kind: {c: n for c, n in counts.items() if n}
                              for kind, counts in data["failure_counts"].items()}
    return data


def exit_status(results: Iterable[ClauseResult]) -> int:
    """The run's exit status from its verdicts: 0 only when no (MUST) clause failed."""
    return 1 if any(r.verdict is Verdict.FAIL for r in results) else 0
