"""The kill table: the quick profile run against every seeded-bug mutant, and which clause caught it.

A conformance run that passes a device with a known bug has a hole; the kill table is the
suite's own yardstick (issue 4, "Seeded-bug zoo"). Each mutant is certified in its own
``python -m vdpacert certify`` subprocess: a crash or a hang in one mutant cannot take the
others down, the Hypothesis state of each run stays in its own directory, and the run is exactly
what a vendor would get for that device. Up to ``jobs`` subprocesses run at once.

A mutant is *killed* when its report has a MUST clause with a ``fail`` verdict (the condition
for ``certify``'s exit 1). A mutant whose bug breaks only a SHOULD (its clause hint is a SHOULD
clause) is killed by a ``warn`` verdict on that very clause: the spec lets the device get away
with it, so a warning is all a certification can say, and a warning on its own clause is the
suite saying it (the reference devices run warning-free, which the tests hold). Anything else is a
survivor, with the reason: the suite passed it, only warned elsewhere, crashed, or did not finish
within the timeout. A timeout is never taken for a kill:
a hung target counts only when the suite itself said so (``suite.target.alive`` failed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from vdpacert.conformance import clauses as clause_catalog
from vdpacert.conformance.mutants.registry import MUTANTS, target_string
from vdpacert.conformance.report import read_json
from vdpacert.conformance.verdicts import Verdict

__all__ = ["DEFAULT_TIMEOUT", "KillRow", "KillTable", "certify_argv", "run_mutant", "run_table", "text_table"]

#: Seconds one mutant's quick-profile run may take before it counts as "not killed (timeout)".
DEFAULT_TIMEOUT: Final = 120.0
#: Version of the JSON layout :meth:`KillTable.to_json` writes.
FORMAT: Final = 1
#: The clause a hung or dead target fails, when the suite notices it.
TARGET_ALIVE: Final = "suite.target.alive"
#: Lines of a crashed run's stderr kept as its reason.
_TAIL_LINES: Final = 3


@dataclass(frozen=True)
class KillRow:
    """One mutant's outcome: killed or not, the MUST clauses that failed, and how long the run took.

    ``seconds`` is the wall time of the mutant's whole quick-profile run (start-up included):
    the time from nothing to a verdict. ``reason`` says why a survivor survived ("" when killed).
    """

    mutant: str
    base_target: str
    killed: bool
    clauses: tuple[str, ...]
    seconds: float
    hint: str
    reason: str = ""
    by_warning: bool = False  # killed by a warning on its own SHOULD clause

    @property
    def hint_matched(self) -> bool:
        """The failing clauses include the mutant's clause hint (informational: another clause may catch it first)."""
        return self.hint in self.clauses

    @property
    def verdict(self) -> str:
        """``yes``, ``yes (target hung)`` or ``no (<reason>)`` as the table shows it."""
        if self.killed:
            if self.by_warning:
                return "yes (SHOULD warning)"
            return "yes (target hung)" if TARGET_ALIVE in self.clauses else "yes"
        return f"no ({self.reason})" if self.reason else "no"

    def to_json(self) -> dict[str, Any]:
        return {"mutant": self.mutant, "base_target": self.base_target, "killed": self.killed,
                "clauses": list(self.clauses), "seconds": round(self.seconds, 2), "hint": self.hint,
                "hint_matched": self.hint_matched, "reason": self.reason, "by_warning": self.by_warning}


@dataclass(frozen=True)
class KillTable:
    """Every row of one kill-table run, in registry order, with the run's seed and wall time."""

    rows: tuple[KillRow, ...]
    seed: int
    jobs: int
    timeout: float
    wall_seconds: float

    @property
    def killed(self) -> int:
        return sum(row.killed for row in self.rows)

    @property
    def all_killed(self) -> bool:
        return self.killed == len(self.rows)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "tool": "vdpacert", "profile": "quick", "seed": self.seed, "jobs": self.jobs,
                "timeout": self.timeout, "wall_seconds": round(self.wall_seconds, 2), "killed": self.killed,
                "total": len(self.rows), "rows": [row.to_json() for row in self.rows]}

    def write_json(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")


def certify_argv(name: str, seed: int, workdir: Path) -> list[str]:
    """The command line certifying mutant ``name`` with the quick profile (report and replays in ``workdir``)."""
    return [sys.executable, "-m", "vdpacert", "certify", "--target", target_string(name), "--profile", "quick",
            "--seed", str(seed), "--json", str(workdir / "report.json"), "--report-dir", str(workdir / "run")]


def _tail(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return " / ".join(lines[-_TAIL_LINES:])


def _run(argv: Sequence[str], workdir: Path, timeout: float) -> int | None:
    """Run ``argv`` in its own session with output to files; its exit status, or None when it timed out.

    On a timeout the whole session (the certify process and anything it started) is killed.
    """
    with open(workdir / "stdout", "wb") as out, open(workdir / "stderr", "wb") as err:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return None


def run_mutant(name: str, seed: int, *, timeout: float = DEFAULT_TIMEOUT) -> KillRow:
    """Certify mutant ``name`` with the quick profile in a subprocess and say whether the suite killed it."""
    mutant = MUTANTS[name]
    with tempfile.TemporaryDirectory(prefix=f"vdpacert-mutant-{name}-") as tmp:
        workdir = Path(tmp)
        started = time.monotonic()
        status = _run(certify_argv(name, seed, workdir), workdir, timeout)
        seconds = time.monotonic() - started
        report_path = workdir / "report.json"
        report = read_json(report_path) if report_path.exists() else None

        def row(killed: bool, clauses: Iterable[str] = (), reason: str = "", by_warning: bool = False) -> KillRow:
            return KillRow(name, mutant.base_target, killed, tuple(clauses), seconds, mutant.clause_hint, reason,
                           by_warning)

        if report is None:
            if status is None:
                return row(False, reason="timeout")
            return row(False, reason=f"suite crashed, exit {status}: {_tail(workdir / 'stderr')}")
        failed = [r.id for r in report.clauses if r.verdict is Verdict.FAIL]
        if failed:
            return row(True, failed)
        if status is None:
            return row(False, reason="timeout")
        if status != 0:
            return row(False, reason=f"suite crashed, exit {status}: {_tail(workdir / 'stderr')}")
        warned = [r.id for r in report.clauses if r.verdict is Verdict.WARN]
        if mutant.clause_hint in warned and not clause_catalog.clause(mutant.clause_hint).is_must:  # in warned: known
            return row(True, [mutant.clause_hint], by_warning=True)
        return row(False, warned, "only warnings" if warned else "survived")


def run_table(names: Sequence[str], seed: int, *, jobs: int = 1, timeout: float = DEFAULT_TIMEOUT,
              on_row: Callable[[KillRow], None] | None = None) -> KillTable:
    """Run every mutant of ``names`` (``jobs`` at a time); ``on_row`` hears each row as it finishes.

    Threads only wait on the subprocesses, so ``jobs`` is the number of certify processes at once.
    """
    unknown = [name for name in names if name not in MUTANTS]
    if unknown:
        raise ValueError(f"no mutant {', '.join(map(repr, unknown))}; known: {', '.join(MUTANTS)}")
    started = time.monotonic()
    done: dict[str, KillRow] = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(run_mutant, name, seed, timeout=timeout): name for name in names}
        for future in as_completed(futures):
            result = future.result()
            done[result.mutant] = result
            if on_row is not None:
                on_row(result)
    rows = tuple(done[name] for name in names)
    return KillTable(rows, seed, max(1, jobs), timeout, time.monotonic() - started)


def text_table(table: KillTable) -> str:
    """The kill table as the CLI prints it: one line per mutant, then the totals."""
    header = ("mutant", "base", "killed", "secs", "hint", "failed clauses")
    lines: list[tuple[str, ...]] = [header]
    for row in table.rows:
        hint = ("yes" if row.hint_matched else "no") if row.killed else "-"
        warned = row.by_warning or (not row.killed and row.clauses)
        clauses = "warn: " + ", ".join(row.clauses) if warned else ", ".join(row.clauses)
        lines.append((row.mutant, row.base_target, row.verdict, f"{row.seconds:.1f}", hint, clauses or "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    numeric = header.index("secs")
    text = ["  ".join(cell.rjust(width) if i == numeric else cell.ljust(width)
                      for i, (cell, width) in enumerate(zip(line, widths, strict=False))) + "  " + line[-1]
            for line in lines]
    text.insert(1, "-" * max(len(line) for line in text))
    text.append("")
    text.append(f"{table.killed}/{len(table.rows)} mutants killed (seed {table.seed}, {table.jobs} at a time), "
                f"wall time {table.wall_seconds:.1f} s")
    return "\n".join(text) + "\n"
