"""The report writers: JSON keys and round trip, JUnit counts, HTML escaping, the terminal table."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest

from vdpacert.conformance import clauses, profiles
from vdpacert.conformance.report import (
    Report,
    RunInfo,
    build_report,
    html_page,
    junit_xml,
    read_json,
    text_failures,
    text_table,
    write_html,
    write_json,
    write_junit,
)
from vdpacert.conformance.verdicts import Recorder, Verdict

BLK = 2
BLK_FEATURES = (1 << 32) | (1 << 33) | (1 << 9)  # VERSION_1, ACCESS_PLATFORM, FLUSH
EVIL = '<script>alert("x")</script> & \x00\x1b[31m'
STARTED = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
QUIRK_RULE = "status.device.refuse_invalid_features"


def recorded() -> Recorder:
    r = Recorder()
    r.exercised("suite.lockstep.errno", 120)
    r.exercised("blk.data.integrity", 30)
    r.failed("blk.data.integrity", f"sector 7 read back {EVIL}",
             minimal_sequence=["reset()", "out(sector=7)", f"in(sector=7) -> {EVIL}"], replay_file="replay-7.py")
    r.exercised("blk.GET_ID.length", 4)
    r.failed("blk.GET_ID.length", "GET_ID with 19 bytes answered OK")  # SHOULD: a warning
    r.exercised(QUIRK_RULE, 2)
    r.violation(QUIRK_RULE, "FEATURES_OK kept for a broken set", profiles.target_profile("linux-vdpa-sim"))
    return r


@pytest.fixture
def report() -> Report:
    run = RunInfo(f"sim-blk:{EVIL}", "quick", "linux-vdpa-sim", 4242, STARTED, STARTED + timedelta(seconds=75),
                  BLK, BLK_FEATURES, 0x36)
    return build_report(recorded(), run, profiles.target_profile("linux-vdpa-sim"))


def test_report_verdicts_and_exit_status(report: Report) -> None:
    assert [row.id for row in report.clauses] == [c.id for c in clauses.catalog()]
    assert report.row("blk.data.integrity").verdict is Verdict.FAIL
    assert report.row("blk.GET_ID.length").verdict is Verdict.WARN
    assert report.row(QUIRK_RULE).verdict is Verdict.QUIRK
    assert report.row(QUIRK_RULE).quirks == ("vdpa_sim.features_ok_never_refused",)
    assert report.row("suite.lockstep.errno").verdict is Verdict.PASS
    assert report.row("net.loopback.order").verdict is Verdict.NOT_APPLICABLE
    assert report.row("blk.DISCARD.ok").reason == "the device does not offer VIRTIO_BLK_F_DISCARD"
    assert report.row("blk.FLUSH.ok").verdict is Verdict.NOT_EXERCISED
    assert report.exit_status == 1 == recorded().exit_status()
    assert sum(report.counts.values()) == len(report.clauses)


def test_every_declared_quirk_is_listed_with_what_was_observed(report: Report) -> None:
    sim = profiles.target_profile("linux-vdpa-sim")
    assert [q.name for q in report.quirks] == [q.name for q in sim.quirks]
    seen = {q.name: q for q in report.quirks}
    assert seen["vdpa_sim.features_ok_never_refused"].observed == 1
    assert seen["vdpa_sim.features_ok_never_refused"].detail == "FEATURES_OK kept for a broken set"
    assert seen["vdpa_sim.used_idx_reset_on_ready"].observed == 0
    # a quirk recorded but not declared by the profile is still listed
    r = Recorder()
    r.quirk("iotlb.update.perm", "acme.own")
    extra = build_report(r, RunInfo("t", "quick", "strict", None, STARTED, STARTED), profiles.target_profile("strict"))
    assert [(q.name, q.observed, q.origin) for q in extra.quirks] == [("acme.own", 1, "observed")]


def test_json_report_has_the_required_keys_and_round_trips(report: Report, tmp_path: Path) -> None:
    data = report.to_json()
    for key in ("target", "profile", "seed", "started", "finished", "clauses", "failures", "quirks"):
        assert key in data
    assert data["seed"] == 4242 and data["profile"] == "quick" and data["target_profile"] == "linux-vdpa-sim"
    assert datetime.fromisoformat(data["started"]) == STARTED
    assert datetime.fromisoformat(data["finished"]) == STARTED + timedelta(seconds=75)
    assert data["exit_status"] == 1
    assert data["device"] == {"id": 2, "name": "virtio-blk", "features": hex(BLK_FEATURES), "backend_features": "0x36",
                              "address_spaces": None}
    row = next(c for c in data["clauses"] if c["id"] == "blk.data.integrity")
    assert row["section"] == "virtio v1.3 §5.2.6.2 Block Device: Device Requirements: Device Operation"
    assert (row["level"], row["verdict"], row["examples"]) == ("MUST", "fail", 30)
    assert {c["verdict"] for c in data["clauses"]} == {"pass", "fail", "warn", "quirk", "not-exercised",
                                                        "not-applicable"}
    (failure, _) = data["failures"]
    assert failure["clause"] == "blk.data.integrity" and failure["replay_file"] == "replay-7.py"
    assert failure["minimal_sequence"][0] == "reset()" and EVIL in failure["message"]
    quirk = next(q for q in data["quirks"] if q["observed"])
    assert quirk["clause"] == QUIRK_RULE and quirk["name"] == "vdpa_sim.features_ok_never_refused"

    assert Report.from_json(json.loads(json.dumps(data))) == report
    write_json(report, tmp_path / "r.json")
    assert read_json(tmp_path / "r.json") == report


def test_junit_xml_parses_and_counts_match(report: Report, tmp_path: Path) -> None:
    write_junit(report, tmp_path / "r.xml")
    root = ET.parse(tmp_path / "r.xml").getroot()
    suite = root.find("testsuite")
    assert suite is not None
    cases = suite.findall("testcase")
    counts = report.counts
    skipped = counts[Verdict.NOT_APPLICABLE] + counts[Verdict.NOT_EXERCISED]
    assert len(cases) == len(report.clauses) == int(suite.get("tests", "-1")) == int(root.get("tests", "-1"))
    assert len([c for c in cases if c.find("failure") is not None]) == counts[Verdict.FAIL] == \
        int(suite.get("failures", "-1")) == 1
    assert len([c for c in cases if c.find("skipped") is not None]) == skipped == int(suite.get("skipped", "-1"))
    assert [c.get("name") for c in cases] == [row.id for row in report.clauses]
    by_name = {c.get("name"): c for c in cases}
    failure = by_name["blk.data.integrity"].find("failure")
    assert failure is not None and failure.get("type") == "MUST"
    assert "sector 7 read back <script>" in (failure.get("message") or "")
    assert "\\x00" in (failure.get("message") or "")  # XML cannot carry NUL: shown escaped
    assert "vdpacert replay replay-7.py" in (failure.text or "")
    skip = by_name["net.loopback.no_loss"].find("skipped")
    assert skip is not None and skip.get("message") == "not-applicable: a virtio-net clause; the target is virtio-blk"
    quirk_out = by_name[QUIRK_RULE].find("system-out")
    assert quirk_out is not None and "quirk vdpa_sim.features_ok_never_refused" in (quirk_out.text or "")
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["seed"] == "4242" and props["profile"] == "quick" and props["device"] == "virtio-blk"
    assert ET.fromstring(junit_xml(report)).tag == "testsuites"


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_html_is_self_contained_and_escapes_everything(report: Report, tmp_path: Path) -> None:
    write_html(report, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp;" in page
    parser = Tags()
    parser.feed(page)
    assert "script" not in parser.tags and not ({"link", "img", "iframe"} & parser.tags)  # nothing fetched
    text = "".join(parser.text)
    assert EVIL.split(" &")[0] in text  # the message survives, as text
    assert page.count('<tr id="') == len(report.clauses)
    for needle in ("blk.data.integrity", "vdpacert replay replay-7.py", "vdpa_sim.features_ok_never_refused",
                   "Exit status <b class=\"status-1\">1</b>"):
        assert needle in page
    assert html_page(report) == page


def test_text_table(report: Report) -> None:
    table = text_table(report)
    lines = table.splitlines()
    assert lines[0].split() == ["CLAUSE", "LEVEL", "VERDICT", "EXAMPLES", "NOTE"]
    row = next(line for line in lines if line.startswith("blk.data.integrity "))
    assert row.split()[:4] == ["blk.data.integrity", "MUST", "fail", "30"]
    assert "exit status 1: a MUST clause failed" in table
    ids = {row.id for row in report.clauses}
    assert all(len(line) <= 120 for line in lines if line.split() and line.split()[0] in ids)
    assert all(line == line.rstrip() for line in lines)
    wide = text_table(report, width=400)
    assert "\x1b" not in wide and "\x00" not in wide and "read back <script>" in wide  # no terminal escapes
    assert "\\x00\\x1b[31m" in wide
    short = text_table(report, show=[Verdict.FAIL, Verdict.WARN, Verdict.QUIRK])
    listed = [line.split()[0] for line in short.splitlines()[2:] if line and line.split()[0] in ids]
    assert listed == [QUIRK_RULE, "blk.GET_ID.length", "blk.data.integrity"]  # catalog order
    assert f"({len(report.clauses) - 3} rows not listed)" in short
    assert ("quirks: 17 declared, 1 observed: vdpa_sim.features_ok_never_refused on "
            "status.device.refuse_invalid_features x1") in short


def test_text_failures_carry_the_sequence_and_the_replay_command(report: Report) -> None:
    text = text_failures(report)
    assert text.startswith("FAIL blk.data.integrity [MUST] virtio v1.3 §5.2.6.2")
    assert "  minimal sequence:\n    reset()\n    out(sector=7)\n" in text
    assert "  replay: vdpacert replay replay-7.py" in text
    assert "WARN blk.GET_ID.length [SHOULD]" in text
    assert "\x1b" not in text and "\x00" not in text


def test_a_clean_run_exits_zero_in_every_format() -> None:
    r = Recorder()
    r.exercised("suite.lockstep.errno")
    r.failed("suite.dirty_log.no_spurious", "page 9 marked")  # SHOULD
    rep = build_report(r, RunInfo("sim-net", "full", "strict", 1, STARTED, STARTED, 1, None, None))
    assert rep.exit_status == 0 and rep.to_json()["exit_status"] == 0
    assert "exit status 0: no MUST clause failed" in text_table(rep)
    assert ET.fromstring(junit_xml(rep)).get("failures") == "0"
    assert rep.quirks == ()
    assert "declares no quirk" in html_page(rep)
    assert text_failures(rep).startswith("WARN suite.dirty_log.no_spurious")
    assert text_failures(build_report(Recorder(), rep.run)) == ""
