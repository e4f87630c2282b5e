"""Certify Linux's vdpa_sim_net and vdpa_sim_blk in a guest kernel and print the findings (issue 6).

``vdpacert certify`` runs the quick profile on ``/dev/vhost-vdpa-0`` with the ``linux-vdpa-sim``
target profile (Linux's known deviations declared as quirks). Its JSON report is printed after a
marker line; the test checks that the run reached a verdict (a report whose exit status is the
command's, every failure with its clause, message and replay file, every quirk hit named) and
prints the findings: a deviation found is a result of the certification, not a failure of this
test, but a crash of a suite machine, an unreadable report or a device the suite never reached is.
On a real device the suite goes on past each failure (``--vdpa-on-failure`` auto), so one finding
does not hide the clauses after it; each distinct finding is printed once with its count and the
steps that found it, and the whole report is kept under the test's temporary directory.

    python -m pytest kernel_tests -p no:cacheprovider -s
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from vdpacert.kernel import KernelBuild, default_cache, prepare, run

TIMEOUT = 1500.0
MARK = "--- vdpacert certify json ---"
DEVICES = {"net": ("vdpa0:vdpasim_net:mac=02:00:00:00:00:01", 1), "blk": ("blk0:vdpasim_blk", 2)}


@pytest.fixture(scope="module")
def build() -> KernelBuild:
    return prepare(default_cache(), progress=lambda line: print(f"prepare: {line}", file=sys.stderr))


def _certify(build: KernelBuild, device: str) -> tuple[int, dict[str, Any], str]:
    script = (f'"{sys.executable}" -m vdpacert certify --target vhost-vdpa:/dev/vhost-vdpa-0 '
              f'--target-profile linux-vdpa-sim --seed 6 --json /tmp/report.json; status=$?; '
              f'echo "{MARK}"; cat /tmp/report.json; exit $status')
    lines: list[str] = []
    result = run(build, ["sh", "-c", script], devices=[device], cwd="/tmp", timeout=TIMEOUT, output=lines.append)
    marker = lines.index(MARK)
    return result.exit_status, json.loads("\n".join(lines[marker + 1:])), "\n".join(lines[:marker])


@pytest.mark.parametrize("kind", sorted(DEVICES))
def test_vdpa_sim_is_certified_and_its_findings_printed(build: KernelBuild, kind: str, tmp_path: Path) -> None:
    device, device_id = DEVICES[kind]
    status, report, output = _certify(build, device)
    kept = tmp_path / f"vdpa_sim_{kind}.json"
    kept.write_text(json.dumps(report, indent=1))
    assert "a suite machine crashed" not in output, output
    assert report["device"]["id"] == device_id and report["target_profile"] == "linux-vdpa-sim"
    assert status == report["exit_status"] and status in (0, 1), output
    for failure in report["failures"]:
        assert failure["clause"] and failure["message"]
    print(f"\n=== Linux vdpa_sim_{kind} (6.12), quick profile: " +
          ", ".join(f"{n} {v}" for v, n in sorted(report["summary"].items())))
    rows = {row["id"]: row for row in report["clauses"]}
    first = {failure["clause"]: failure for failure in reversed(report["failures"])}
    print(f"report: {kept}")
    for clause_id, failure in sorted(first.items()):
        row = rows[clause_id]
        print(f"FINDING {clause_id} [{row['level']}, {row['verdict']}] in {row['failures'] + row['warnings']} "
              f"example(s): {failure['message']}")
        for step in failure["minimal_sequence"] or ():
            print(f"    {step}")
    for row in report["clauses"]:
        if row["verdict"] == "quirk":
            print(f"QUIRK {', '.join(row['quirks'])} on {row['id']} [{row['level']}]")
    verdicts = [row["verdict"] for row in report["clauses"]]
    applicable = [v for v in verdicts if v != "not-applicable"]
    reached = [v for v in applicable if v != "not-exercised"]
    # Going on past failures, a bug ends one example, not the machine: a good part of the applicable clauses
    # get a verdict (in these runs 44-66 %; stopping at the first failure reached about 25 %).
    assert verdicts.count("pass") > 0 and 3 * len(reached) >= len(applicable), report["summary"]
