"""The certification report: one :class:`Report` built from a run's recorder, written four ways.

* JSON: the machine-readable record a vendor attaches to a release (and reads back: it round-trips);
* JUnit XML: one testcase per clause for CI dashboards. A clause that is not applicable or was not
  exercised is a ``<skipped>`` with the reason: that is a reporting fact, not a check left out;
* HTML: one self-contained page (inline CSS, no script) with the per-clause verdict table;
* text: the per-clause verdict table ``vdpacert certify`` prints at the end.

Every string that reaches a writer can come from a target (an error message, a device's name), so
the XML and HTML writers escape everything and drop characters XML cannot carry.
"""

from __future__ import annotations

import html
import json
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from vdpacert._version import __version__

from . import clauses
from .profiles import TargetProfile
from .verdicts import Failure, Recorder, Verdict

__all__ = [
    "ClauseRow",
    "QuirkRow",
    "Report",
    "RunInfo",
    "build_report",
    "html_page",
    "junit_xml",
    "read_json",
    "text_failures",
    "text_table",
    "write_html",
    "write_json",
    "write_junit",
]

#: Version of the JSON report layout.
FORMAT: Final = 1


@dataclass(frozen=True)
class RunInfo:
    """What was run: the target string, run profile, target profile, seed, times and the device seen.

    ``features`` / ``backend_features`` are what the device offered (None if the run never got that
    far); they decide which feature-gated clauses are not applicable.
    """

    target: str
    profile: str
    target_profile: str
    seed: int | None
    started: datetime
    finished: datetime
    device_id: int | None = None
    features: int | None = None
    backend_features: int | None = None
    version: str = __version__
    address_spaces: int | None = None


@dataclass(frozen=True)
class ClauseRow:
    """One line of the verdict table (plain strings, so a report read back from JSON is the same)."""

    id: str
    section: str
    level: str
    verdict: Verdict
    examples: int
    failures: int
    warnings: int
    quirks: tuple[str, ...]
    reason: str
    summary: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "section": self.section, "level": self.level, "verdict": self.verdict.value,
                "examples": self.examples, "failures": self.failures, "warnings": self.warnings,
                "quirks": list(self.quirks), "reason": self.reason, "summary": self.summary}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClauseRow:
        return cls(data["id"], data["section"], data["level"], Verdict(data["verdict"]), int(data["examples"]),
                   int(data["failures"]), int(data["warnings"]), tuple(data["quirks"]), data["reason"],
                   data["summary"])


@dataclass(frozen=True)
class QuirkRow:
    """A quirk the target profile declares, and how often the run saw it (0: declared, not observed)."""

    name: str
    clause: str
    description: str
    origin: str
    reference: str
    observed: int
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "clause": self.clause, "description": self.description, "origin": self.origin,
                "reference": self.reference, "observed": self.observed, "detail": self.detail}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QuirkRow:
        return cls(data["name"], data["clause"], data["description"], data["origin"], data["reference"],
                   int(data["observed"]), data["detail"])


@dataclass(frozen=True)
class Report:
    run: RunInfo
    clauses: tuple[ClauseRow, ...]
    failures: tuple[Failure, ...]
    quirks: tuple[QuirkRow, ...]
    _rows: Mapping[str, ClauseRow] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_rows", {row.id: row for row in self.clauses})

    def row(self, clause_id: str) -> ClauseRow:
        return self._rows[clause_id]

    @property
    def exit_status(self) -> int:
        """0 only when no MUST clause failed (a fail verdict exists only on MUST clauses)."""
        return 1 if any(row.verdict is Verdict.FAIL for row in self.clauses) else 0

    @property
    def counts(self) -> dict[Verdict, int]:
        """Clauses per verdict, every verdict present (zeros included), in :class:`Verdict` order."""
        found = Counter(row.verdict for row in self.clauses)
        return {verdict: found[verdict] for verdict in Verdict}

    def failures_of(self, clause_id: str) -> tuple[Failure, ...]:
        return tuple(f for f in self.failures if f.clause == clause_id)

    def to_json(self) -> dict[str, Any]:
        run = self.run
        return {
            "format": FORMAT,
            "tool": "vdpacert",
            "version": run.version,
            "target": run.target,
            "profile": run.profile,
            "target_profile": run.target_profile,
            "seed": run.seed,
            "started": run.started.isoformat(),
            "finished": run.finished.isoformat(),
            "device": {"id": run.device_id,
                       "name": None if run.device_id is None else clauses.device_name(run.device_id),
                       "features": _hex(run.features), "backend_features": _hex(run.backend_features),
                       "address_spaces": run.address_spaces},
            "exit_status": self.exit_status,
            "summary": {verdict.value: n for verdict, n in self.counts.items()},
            "clauses": [row.to_json() for row in self.clauses],
            "failures": [f.to_json() for f in self.failures],
            "quirks": [q.to_json() for q in self.quirks],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Report:
        if data.get("format") != FORMAT:
            raise ValueError(f"report format {data.get('format')!r} is not {FORMAT}")
        device = data["device"]
        run = RunInfo(data["target"], data["profile"], data["target_profile"], data["seed"],
                      datetime.fromisoformat(data["started"]), datetime.fromisoformat(data["finished"]),
                      device["id"], _unhex(device["features"]), _unhex(device["backend_features"]),
                      data["version"], device.get("address_spaces"))
        return cls(run, tuple(ClauseRow.from_json(c) for c in data["clauses"]),
                   tuple(Failure.from_json(f) for f in data["failures"]),
                   tuple(QuirkRow.from_json(q) for q in data["quirks"]))


def _hex(value: int | None) -> str | None:
    """Feature words as hex strings: they reach past 64 bits, beyond what many JSON readers keep exactly."""
    return None if value is None else hex(value)


def _unhex(value: str | None) -> int | None:
    return None if value is None else int(value, 16)


def build_report(recorder: Recorder, run: RunInfo, target_profile: TargetProfile | None = None) -> Report:
    """The report of a run: every catalog clause's verdict, the kept failures, and every quirk.

    Every quirk the profile declares is listed (observed or not), and so is a quirk the run saw that
    the profile does not declare: a quirk is never hidden.
    """
    rows = tuple(
        ClauseRow(r.clause.id, str(r.clause.citation), r.clause.level_name, r.verdict, r.examples, r.failures,
                  r.warnings, r.quirks, r.reason, r.clause.summary)
        for r in recorder.results(run.device_id, run.features, run.backend_features, run.address_spaces))
    seen = {(q.clause, q.name): q for q in recorder.quirks}
    quirks = []
    for declared in () if target_profile is None else target_profile.quirks:
        observation = seen.pop((declared.clause, declared.name), None)
        quirks.append(QuirkRow(declared.name, declared.clause, declared.description, declared.origin,
                               declared.reference, 0 if observation is None else observation.count,
                               "" if observation is None else observation.detail))
    declared_by_name = {} if target_profile is None else {q.name: q for q in target_profile.quirks}
    for observation in seen.values():
        named = declared_by_name.get(observation.name)
        if named is not None:  # one declared behaviour that decides more than one clause (size 0 and wrapping)
            quirks.append(QuirkRow(observation.name, observation.clause, named.description, named.origin,
                                   named.reference, observation.count, observation.detail))
            continue
        quirks.append(QuirkRow(observation.name, observation.clause, "not declared by the target profile",
                               "observed", "", observation.count, observation.detail))
    return Report(run, rows, recorder.failures, tuple(quirks))


# ----- JSON ------------------------------------------------------------------------------------


def write_json(report: Report, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Report:
    return Report.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


# ----- JUnit XML -------------------------------------------------------------------------------

#: Characters XML 1.0 cannot carry at all (not even escaped): C0 controls but tab, LF, CR; surrogates; FFFE/FFFF.
_XML_ILLEGAL: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_text(text: str) -> str:
    """``text`` with characters XML cannot carry shown as ``\\xNN`` (ElementTree escapes the rest)."""
    return _XML_ILLEGAL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _label(report: Report, failure: Failure) -> str:
    """"fail" or "warn" as the verdict counts it: a failure of a SHOULD or MAY clause is a warning."""
    return "fail" if failure.kind == "fail" and report.row(failure.clause).level == "MUST" else "warn"


def _failure_text(failure: Failure) -> str:
    lines = [f"{failure.kind}: {failure.message}"]
    if failure.minimal_sequence is not None:
        lines += ["minimal sequence:", *(f"  {step}" for step in failure.minimal_sequence)]
    if failure.replay_file is not None:
        lines.append(f"replay: vdpacert replay {failure.replay_file}")
    return "\n".join(lines)


def _clause_details(report: Report, row: ClauseRow) -> str:
    parts = [_failure_text(f) for f in report.failures_of(row.id)]
    parts += [f"quirk {q.name}: {q.description} (seen {q.observed} times){': ' + q.detail if q.detail else ''}"
              for q in report.quirks if q.clause == row.id and q.observed]
    return "\n\n".join(parts)


def junit_xml(report: Report) -> str:
    """JUnit XML: one testcase per clause (see the module docstring for how verdicts map)."""
    run = report.run
    counts = report.counts
    skipped = counts[Verdict.NOT_APPLICABLE] + counts[Verdict.NOT_EXERCISED]
    elapsed = (run.finished - run.started).total_seconds()
    suites = ET.Element("testsuites", name="vdpacert", tests=str(len(report.clauses)),
                        failures=str(counts[Verdict.FAIL]), errors="0", skipped=str(skipped), time=f"{elapsed:.3f}")
    suite = ET.SubElement(suites, "testsuite", name=_xml_text(f"vdpacert certify {run.target}"),
                          tests=str(len(report.clauses)), failures=str(counts[Verdict.FAIL]), errors="0",
                          skipped=str(skipped), time=f"{elapsed:.3f}", timestamp=run.started.isoformat())
    properties = ET.SubElement(suite, "properties")
    for name, value in (("target", run.target), ("profile", run.profile), ("target_profile", run.target_profile),
                        ("seed", "" if run.seed is None else str(run.seed)), ("version", run.version),
                        ("device", "" if run.device_id is None else clauses.device_name(run.device_id))):
        ET.SubElement(properties, "property", name=name, value=_xml_text(value))
    for row in report.clauses:
        case = ET.SubElement(suite, "testcase", classname=f"vdpacert.clauses.{row.id.split('.', 1)[0]}",
                             name=row.id, time="0")
        details = _xml_text(_clause_details(report, row))
        if row.verdict is Verdict.FAIL:
            first = report.failures_of(row.id)
            message = first[0].message if first else f"{row.failures} failures"
            failure = ET.SubElement(case, "failure", type=row.level,
                                    message=_xml_text(f"{row.id} [{row.level}]: {message}"))
            failure.text = details
        elif row.verdict in (Verdict.NOT_APPLICABLE, Verdict.NOT_EXERCISED):
            ET.SubElement(case, "skipped", message=_xml_text(f"{row.verdict.value}: {row.reason}"))
        else:
            out = f"{row.verdict.value}: {row.examples} examples ({row.section})"
            ET.SubElement(case, "system-out").text = out + ("\n" + details if details else "")
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def write_junit(report: Report, path: str | Path) -> None:
    Path(path).write_text(junit_xml(report), encoding="utf-8")


# ----- HTML ------------------------------------------------------------------------------------

_CSS: Final = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; position: sticky; top: 0; }
td.n { text-align: right; }
code, pre { font: 12px/1.3 ui-monospace, monospace; }
pre { background: #f6f6f6; padding: 6px; overflow-x: auto; white-space: pre-wrap; }
.verdict { font-weight: 600; white-space: nowrap; }
.pass { color: #17692a; } .fail { color: #b00020; } .warn { color: #9a6200; } .quirk { color: #5b3ea5; }
.not-exercised { color: #666; } .not-applicable { color: #999; }
.status-0 { color: #17692a; } .status-1 { color: #b00020; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def html_page(report: Report) -> str:
    """A self-contained HTML page: run facts, verdict counts, the clause table, failures and quirks."""
    run = report.run
    counts = ", ".join(f'<span class="{v.value}">{n} {v.value}</span>' for v, n in report.counts.items())
    device = "unknown" if run.device_id is None else clauses.device_name(run.device_id)
    facts = [("target", run.target), ("device", device), ("run profile", run.profile),
             ("target profile", run.target_profile), ("seed", run.seed), ("started", run.started.isoformat()),
             ("finished", run.finished.isoformat()), ("vdpacert", run.version)]
    out = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>vdpacert report: {_e(run.target)}</title>", f"<style>{_CSS}</style></head><body>",
        f"<h1>vdpacert certification: <code>{_e(run.target)}</code></h1>",
        "<table>", *(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts), "</table>",
        f'<p>Exit status <b class="status-{report.exit_status}">{report.exit_status}</b>'
        f" ({'no MUST clause failed' if report.exit_status == 0 else 'a MUST clause failed'}). "
        f"Clauses: {counts}.</p>",
        "<h2>Clauses</h2>",
        "<table><tr><th>Clause</th><th>Level</th><th>Verdict</th><th>Examples</th><th>Section</th>"
        "<th>Summary / note</th></tr>",
    ]
    for row in report.clauses:
        note = _e(row.summary)
        extra = row.reason or ", ".join(row.quirks)
        if extra:
            note += f"<br><i>{_e(extra)}</i>"
        out.append(f'<tr id="{_e(row.id)}"><td><code>{_e(row.id)}</code></td><td>{_e(row.level)}</td>'
                   f'<td class="verdict {_e(row.verdict.value)}">{_e(row.verdict.value)}</td>'
                   f'<td class="n">{row.examples}</td><td>{_e(row.section)}</td><td>{note}</td></tr>')
    out.append("</table>")
    out.append(f"<h2>Failures and warnings ({len(report.failures)})</h2>")
    for failure in report.failures:
        out.append(f'<h3><a href="#{_e(failure.clause)}"><code>{_e(failure.clause)}</code></a> '
                   f'<span class="{_label(report, failure)}">{_label(report, failure)}</span></h3>'
                   f"<p>{_e(failure.message)}</p>")
        if failure.minimal_sequence is not None:
            out.append(f"<pre>{_e(chr(10).join(failure.minimal_sequence))}</pre>")
        if failure.replay_file is not None:
            out.append(f"<p>Replay: <code>vdpacert replay {_e(failure.replay_file)}</code></p>")
    out.append(f"<h2>Quirks ({len(report.quirks)})</h2>")
    if report.quirks:
        out.append("<table><tr><th>Quirk</th><th>Clause</th><th>Observed</th><th>What the target does</th>"
                   "<th>Declared by</th></tr>")
        for q in report.quirks:
            seen = _e(q.description) + (f"<br><i>{_e(q.detail)}</i>" if q.detail else "")
            origin = _e(q.origin) + (f"<br>{_e(q.reference)}" if q.reference else "")
            out.append(f"<tr><td><code>{_e(q.name)}</code></td><td><code>{_e(q.clause)}</code></td>"
                       f'<td class="n">{q.observed}</td><td>{seen}</td><td>{origin}</td></tr>')
        out.append("</table>")
    else:
        out.append("<p>The target profile declares no quirk and none was observed.</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_html(report: Report, path: str | Path) -> None:
    Path(path).write_text(html_page(report), encoding="utf-8")


# ----- terminal --------------------------------------------------------------------------------


#: Control characters a terminal would act on (escape sequences from a target must not reach it).
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f]")


def _clip(text: str, width: int) -> str:
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", " ".join(text.split()))
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def text_table(report: Report, *, show: Iterable[Verdict] | None = None, width: int = 120) -> str:
    """The per-clause verdict table; ``show`` limits the rows listed (the totals always count all)."""
    wanted = set(Verdict if show is None else show)
    rows = [row for row in report.clauses if row.verdict in wanted]
    id_width = min(max((len(row.id) for row in rows), default=6), 60)
    head = f"{'CLAUSE':<{id_width}}  {'LEVEL':<6}  {'VERDICT':<14}  {'EXAMPLES':>8}  NOTE"
    lines = [head, "-" * min(len(head) + 20, width)]
    note_width = max(width - id_width - 38, 20)
    for row in rows:
        first = report.failures_of(row.id)
        if first:
            note = first[0].message
        elif row.quirks:
            note = "quirk " + ", ".join(row.quirks)
        elif row.verdict is Verdict.NOT_APPLICABLE:
            note = row.reason
        else:
            note = row.summary
        line = (f"{_clip(row.id, id_width):<{id_width}}  {row.level:<6}  {row.verdict.value:<14}  "
                f"{row.examples:>8}  {_clip(note, note_width)}")
        lines.append(line.rstrip())
    totals = ", ".join(f"{n} {v.value}" for v, n in report.counts.items() if n)
    hidden = len(report.clauses) - len(rows)
    lines.append("")
    lines.append(f"{len(report.clauses)} clauses: {totals}" + (f" ({hidden} rows not listed)" if hidden else ""))
    observed = [q for q in report.quirks if q.observed]
    if report.quirks:
        declared = {q.name for q in report.quirks if q.origin != "observed"}
        lines.append(f"quirks: {len(declared)} declared, {len({q.name for q in observed})} observed: "
                     + (", ".join(f"{q.name} on {q.clause} x{q.observed}" for q in observed) or "none"))
    lines.append(f"exit status {report.exit_status}: "
                 + ("no MUST clause failed" if report.exit_status == 0 else "a MUST clause failed"))
    return "\n".join(lines) + "\n"


def text_failures(report: Report) -> str:
    """Each kept failure and warning with its minimal sequence and replay command, for the terminal."""
    blocks = []
    for failure in report.failures:
        row = report.row(failure.clause)
        lines = [f"{_label(report, failure).upper()} {failure.clause} [{row.level}] {row.section}",
                 f"  {_clip(failure.message, 10_000)}"]
        if failure.minimal_sequence is not None:
            lines += ["  minimal sequence:", *(f"    {_clip(step, 10_000)}" for step in failure.minimal_sequence)]
        if failure.replay_file is not None:
            lines.append(f"  replay: vdpacert replay {_clip(failure.replay_file, 10_000)}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + ("\n" if blocks else "")
