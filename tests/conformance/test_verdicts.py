"""Recorder verdicts, merging across workers, the exit-status rule; run and target profiles."""

from __future__ import annotations

import json
from pathlib import Path

import hypothesis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vdpacert.conformance import clauses, profiles
from vdpacert.conformance.profiles import ProfileError, TargetProfile, TargetQuirk
from vdpacert.conformance.verdicts import KEPT_PER_CLAUSE, Recorder, Verdict, exit_status
from vdpacert.model.quirks import QUIRKS

NET, BLK = 1, 2
MUST_ID = "suite.lockstep.errno"
SHOULD_ID = "suite.dirty_log.no_spurious"
MAY_ID = "notify.split.used.flags.nothing_new"
NET_ONLY = "net.loopback.order"


# ----- verdicts --------------------------------------------------------------------------------


def test_verdict_of_each_kind_of_observation() -> None:
    r = Recorder()
    r.exercised(MUST_ID, 3)
    assert r.verdict(MUST_ID) is Verdict.PASS and r.examples(MUST_ID) == 3
    r.failed(MUST_ID, "SET_OWNER answered 0, model predicts EBUSY")
    assert r.verdict(MUST_ID) is Verdict.FAIL

    r.exercised(SHOULD_ID)
    r.failed(SHOULD_ID, "page 3 marked but never written")
    assert r.verdict(SHOULD_ID) is Verdict.WARN  # a SHOULD breach warns, never fails
    r.failed(MAY_ID, "a permission cannot be broken")
    assert r.verdict(MAY_ID) is Verdict.WARN

    r.warned("suite.lockstep.status", "status read twice differed transiently")
    assert r.verdict("suite.lockstep.status") is Verdict.WARN

    r.quirk("status.device.refuse_invalid_features", "vdpa_sim.features_ok_never_refused", "FEATURES_OK kept")
    assert r.verdict("status.device.refuse_invalid_features") is Verdict.QUIRK

    assert r.verdict("suite.lockstep.config", NET) is Verdict.NOT_EXERCISED
    assert r.verdict(NET_ONLY, BLK) is Verdict.NOT_APPLICABLE
    assert r.verdict(NET_ONLY, NET) is Verdict.NOT_EXERCISED
    result = r.result(clauses.clause(NET_ONLY), BLK)
    assert result.reason == "a virtio-net clause; the target is virtio-blk"


def test_observations_win_over_applicability() -> None:
    """A clause recorded on a device it does not apply to is shown as observed (a suite bug is visible)."""
    r = Recorder()
    r.exercised(NET_ONLY)
    assert r.verdict(NET_ONLY, BLK) is Verdict.PASS


def test_results_cover_the_catalog_in_order() -> None:
    results = Recorder().results(NET)
    assert [x.clause.id for x in results] == [c.id for c in clauses.catalog()]
    assert {x.verdict for x in results} == {Verdict.NOT_EXERCISED, Verdict.NOT_APPLICABLE}


def test_exit_status_is_zero_only_without_a_must_failure() -> None:
    r = Recorder()
    assert r.exit_status() == 0
    r.failed(SHOULD_ID, "spurious page")
    r.warned(MUST_ID, "a hint")
    r.quirk("iotlb.update.perm", "vhost_vdpa.iotlb_perm_unchecked")
    assert r.exit_status() == 0
    assert exit_status(r.results(NET)) == 0
    r.failed("blk.data.integrity", "sector 9 lost")
    assert r.exit_status() == 1
    assert exit_status(r.results(BLK)) == 1


def test_violation_is_a_quirk_when_the_profile_declares_one() -> None:
    sim = profiles.target_profile("linux-vdpa-sim")
    r = Recorder()
    rule = "vdpa_device.vq_state.used_idx_preserved"
    assert r.violation(rule, "used idx 4 after restore, expected 2", sim) is False
    assert r.verdict(rule) is Verdict.QUIRK
    (seen,) = r.quirks
    assert (seen.clause, seen.name, seen.count, seen.detail) == \
        (rule, "vdpa_sim.used_idx_reset_on_ready", 1, "used idx 4 after restore, expected 2")
    assert r.exit_status() == 0
    # The same observation against the strict profile is a failure.
    strict = Recorder()
    assert strict.violation(rule, "used idx 4", profiles.target_profile("strict"), minimal_sequence="a\nb") is True
    assert strict.verdict(rule) is Verdict.FAIL and strict.exit_status() == 1
    assert strict.failures[0].minimal_sequence == ("a", "b")


def test_unknown_clause_ids_are_refused_at_record_time() -> None:
    r = Recorder()
    with pytest.raises(KeyError, match=r"did you mean suite\.lockstep\.errno"):
        r.exercised("suite.lockstep.erno")
    with pytest.raises(KeyError):
        r.failed("no.such", "x")
    with pytest.raises(ValueError, match="negative"):
        r.exercised(MUST_ID, -1)


def test_failure_examples_are_capped_but_counts_are_exact() -> None:
    r = Recorder()
    for i in range(KEPT_PER_CLAUSE + 5):
        r.failed(MUST_ID, f"failure {i}")
    assert r.failure_count(MUST_ID) == KEPT_PER_CLAUSE + 5
    assert [f.message for f in r.failures] == [f"failure {i}" for i in range(KEPT_PER_CLAUSE)]


# ----- merging ---------------------------------------------------------------------------------

Event = tuple[str, str, object]
CLAUSE_IDS = [MUST_ID, SHOULD_ID, MAY_ID, NET_ONLY, "blk.data.integrity"]

events = st.lists(st.one_of(
    st.tuples(st.just("exercised"), st.sampled_from(CLAUSE_IDS), st.integers(0, 3)),
    st.tuples(st.just("failed"), st.sampled_from(CLAUSE_IDS), st.sampled_from(["a", "b", "<c>"])),
    st.tuples(st.just("warned"), st.sampled_from(CLAUSE_IDS), st.sampled_from(["w", "x"])),
    st.tuples(st.just("quirk"), st.sampled_from(CLAUSE_IDS), st.sampled_from(["q.one", "q.two"])),
), max_size=3 * KEPT_PER_CLAUSE)


def replay(recorder: Recorder, stream: list[Event]) -> Recorder:
    for kind, clause_id, value in stream:
        if kind == "exercised":
            recorder.exercised(clause_id, int(str(value)))
        elif kind == "failed":
            recorder.failed(clause_id, str(value), minimal_sequence=[f"step {value}"], replay_file=f"{value}.py")
        elif kind == "warned":
            recorder.warned(clause_id, str(value))
        else:
            recorder.quirk(clause_id, str(value), f"detail {value}")
    return recorder


@hypothesis.settings(max_examples=60, deadline=None)
@given(events, events, events)
def test_merge_is_associative_and_equals_one_recorder(a: list[Event], b: list[Event], c: list[Event]) -> None:
    ra, rb, rc = replay(Recorder(), a), replay(Recorder(), b), replay(Recorder(), c)
    single = replay(Recorder(), a + b + c)
    left, right = ra.merge(rb).merge(rc), ra.merge(rb.merge(rc))
    assert left == right == single == Recorder.combine([ra, rb, rc])
    assert left.to_json() == single.to_json()
    assert [x.verdict for x in left.results(NET)] == [x.verdict for x in single.results(NET)]
    assert left.exit_status() == single.exit_status()
    # merge leaves its operands alone; JSON survives a real json round trip
    assert ra == replay(Recorder(), a)
    assert Recorder.from_json(json.loads(json.dumps(single.to_json()))) == single


def test_workers_save_and_the_controller_merges(tmp_path: Path) -> None:
    worker1, worker2 = Recorder(), Recorder()
    worker1.exercised(MUST_ID, 10)
    worker2.exercised(MUST_ID, 5)
    worker2.failed(MUST_ID, "EINVAL expected", minimal_sequence=["set_owner()", "set_owner()"], replay_file="r.py")
    worker1.save(tmp_path / "w1.json")
    worker2.save(tmp_path / "w2.json")
    merged = Recorder.combine(Recorder.load(p) for p in sorted(tmp_path.glob("w*.json")))
    assert merged.examples(MUST_ID) == 15 and merged.failure_count(MUST_ID) == 1
    assert merged.failures[0].replay_file == "r.py"
    assert merged.verdict(MUST_ID) is Verdict.FAIL and merged.exit_status() == 1
    assert Recorder.combine([]) == Recorder()


def test_from_json_refuses_other_formats_and_unknown_clauses() -> None:
    with pytest.raises(ValueError, match="format"):
        Recorder.from_json({"format": 99})
    data = Recorder().to_json()
    data["exercised"] = {"no.such.clause": 1}
    with pytest.raises(KeyError, match="no clause"):
        Recorder.from_json(data)


# ----- run profiles ----------------------------------------------------------------------------


def test_run_profiles() -> None:
    quick, full = profiles.run_profile("quick"), profiles.run_profile("full")
    assert quick.deadline is None and full.deadline is None
    assert quick.max_examples < full.max_examples and quick.stateful_step_count < full.stateful_step_count
    assert quick.time_budget_s < full.time_budget_s
    settings = hypothesis.settings(**quick.settings_kwargs())
    assert (settings.max_examples, settings.stateful_step_count, settings.deadline) == \
        (quick.max_examples, quick.stateful_step_count, None)
    assert quick.with_examples(7).max_examples == 7
    with pytest.raises(ProfileError, match="quick, full"):
        profiles.run_profile("fast")
    with pytest.raises(ProfileError):
        quick.with_examples(0)


# ----- target profiles -------------------------------------------------------------------------


def test_builtin_target_profiles() -> None:
    strict = profiles.target_profile("strict")
    assert strict.quirks == () and strict.quirk_for("iotlb.update.perm") is None
    sim = profiles.target_profile("linux-vdpa-sim")
    assert {q.name for q in sim.quirks} == set(QUIRKS)
    for quirk in QUIRKS.values():
        declared = sim.quirk_for(quirk.rule)
        assert declared is not None and declared.name == quirk.name
        assert declared.origin == "vdpacert.model.quirks" and declared.reference.startswith("Linux ")
    front = profiles.target_profile("linux-vhost-vdpa")
    assert front.quirks and all(q.name.startswith(("vhost_vdpa.", "vdpa.")) for q in front.quirks)
    with pytest.raises(ProfileError, match="built in: auto, strict"):
        profiles.target_profile("linux-sim")


def test_auto_picks_the_profile_of_the_target_kind() -> None:
    reference = profiles.target_profile("auto", kind="sim-net")
    assert reference is profiles.target_profile("auto", kind="python") is profiles.target_profile("reference")
    assert {q.name for q in reference.quirks} == set(profiles.REFERENCE_FRONT_QUIRKS)
    assert profiles.target_profile("auto", kind="vhost-vdpa") is profiles.target_profile("linux-vhost-vdpa")
    # The reference front's quirks are Linux front quirks: a real vhost-vdpa char device has them too.
    assert set(profiles.REFERENCE_FRONT_QUIRKS) <= {q.name for q in profiles.target_profile("linux-vhost-vdpa").quirks}
    with pytest.raises(ProfileError, match="needs a known target kind"):
        profiles.target_profile("auto")


GOOD_TOML = """
name = "acme-dpu"
description = "ACME DPU behind Linux vhost-vdpa"
base = "linux-vhost-vdpa"
quirks = ["vdpa_sim.used_idx_reset_on_ready", "vhost_vdpa.iotlb_perm_unchecked"]

[[quirk]]
name = "acme.event_idx_ignored"
clause = "notify.split.used.event_idx.event_not_passed"
description = "notifies on every used buffer"
reference = "acme fw 4.2 errata 17"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "target.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_toml_target_profile(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD_TOML)
    profile = profiles.target_profile(str(path))
    assert profile == profiles.load_target_profile(path)
    assert profile.name == "acme-dpu"
    names = [q.name for q in profile.quirks]
    assert len(names) == len(set(names))  # the base's iotlb_perm_unchecked is listed once
    assert set(names) >= {q.name for q in profiles.target_profile("linux-vhost-vdpa").quirks}
    own = profile.quirk_for("notify.split.used.event_idx.event_not_passed")
    assert own == TargetQuirk("acme.event_idx_ignored", "notify.split.used.event_idx.event_not_passed",
                              "notifies on every used buffer", str(path), "acme fw 4.2 errata 17")
    assert profile.quirk_for("vdpa_device.vq_state.used_idx_preserved") is not None
    assert profile.quirk_named("acme.event_idx_ignored") is own
    # and a quirk it declares is reported as a quirk
    r = Recorder()
    r.violation("notify.split.used.event_idx.event_not_passed", "notified at used_event+3", profile)
    assert r.verdict("notify.split.used.event_idx.event_not_passed") is Verdict.QUIRK


def test_toml_bad_quirk_name_is_a_clear_error(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "x"\nquirks = ["vdpa_sim.used_idx_reset_on_redy"]\n')
    with pytest.raises(ProfileError) as raised:
        profiles.load_target_profile(path)
    message = str(raised.value)
    assert str(path) in message
    assert "unknown quirk 'vdpa_sim.used_idx_reset_on_redy'" in message
    assert "did you mean vdpa_sim.used_idx_reset_on_ready" in message
    assert "[[quirk]]" in message  # and how to declare one of your own


@pytest.mark.parametrize(("text", "expected"), [
    ('name = "x"\n[[quirk]]\nname = "acme.q"\nclause = "suite.lockstep.erno"\ndescription = "d"\n',
     "did you mean suite.lockstep.errno"),
    ('name = "x"\n[[quirk]]\nname = "NoDots"\nclause = "suite.lockstep.errno"\ndescription = "d"\n',
     "not a dotted lower-case name"),
    ('name = "x"\n[[quirk]]\nname = "vdpa_sim.used_idx_reset_on_ready"\nclause = "suite.lockstep.errno"\n'
     'description = "d"\n', "is a known quirk"),
    ('name = "x"\n[[quirk]]\nname = "acme.q"\nclause = "suite.lockstep.errno"\ndescripton = "d"\n',
     "unknown keys ['descripton']"),
    ('name = "x"\nquirk_list = []\n', "unknown keys ['quirk_list']"),
    ('description = "no name"\n', "'name' must be a non-empty string"),
    ('name = "x"\nquirks = "vdpa_sim.used_idx_reset_on_ready"\n', "'quirks' must be a list"),
    ('name = "x"\nbase = "linux-vdpa-sim"\n[[quirk]]\nname = "acme.q"\nclause = "iotlb.update.perm"\n'
     'description = "d"\n', "both excuse clause iotlb.update.perm"),
    ('name = "x"\nbase = "nope"\n', "no target profile 'nope'"),
    ('name = "x\n', "not valid TOML"),
])
def test_toml_errors_say_what_and_where(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ProfileError) as raised:
        profiles.load_target_profile(path)
    assert expected in str(raised.value)


def test_missing_profile_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read target profile"):
        profiles.target_profile(str(tmp_path / "absent.toml"))


def test_profile_built_in_code_is_validated_too() -> None:
    with pytest.raises(ProfileError, match="declared twice"):
        TargetProfile("p", "", (TargetQuirk("a.b", "iotlb.update.perm", "d", "here"),
                                TargetQuirk("a.b", "iotlb.update.wraps", "d", "here")))
