"""The clause catalog: complete over the model, every clause cited, applicability with reasons."""

from __future__ import annotations

import pytest

from vdpacert.conformance import clauses
from vdpacert.conformance.clauses import CLAUSE_ID, Clause, UnknownClause
from vdpacert.model import rules
from vdpacert.model.quirks import QUIRKS
from vdpacert.model.spec import Level, LinuxSource, Section

NET, BLK = 1, 2
VERSION_1, RING_PACKED, EVENT_IDX, LOG_ALL = 1 << 32, 1 << 34, 1 << 29, 1 << 26
NET_CTRL_VQ, BLK_FLUSH, BLK_RO = 1 << 17, 1 << 9, 1 << 5
BACKEND_SUSPEND, BACKEND_RESUME = 1 << 4, 1 << 5


def suite_clauses() -> list[Clause]:
    return [c for c in clauses.catalog() if c.origin == clauses.SUITE]


def test_ids_unique_well_formed_summarised_and_cited() -> None:
    catalog = clauses.catalog()
    ids = [c.id for c in catalog]
    assert len(ids) == len(set(ids))
    for c in catalog:
        assert CLAUSE_ID.match(c.id), c.id
        assert c.summary.strip(), c.id
        assert c.level_name in ("MUST", "SHOULD", "MAY")
        if isinstance(c.citation, Section):
            assert c.citation.number and c.citation.title, c.id
        else:
            assert isinstance(c.citation, LinuxSource)
            assert c.citation.path.startswith(("drivers/", "include/")) and c.citation.symbol, c.id
        assert c.section == c.citation


def test_every_model_rule_is_a_clause_with_the_same_id_level_and_citation() -> None:
    model = rules.catalog()
    assert len(model) >= 318  # the model grows; every rule it has is a clause
    for entry in model:
        c = clauses.clause(entry.rule)
        assert (c.level, c.citation, c.summary) == (entry.level, entry.citation, entry.summary)
        assert c.origin == f"model:{entry.source}"
    assert [c.id for c in clauses.catalog()[: len(model)]] == [e.rule for e in model]


def test_every_quirk_names_a_clause() -> None:
    for quirk in QUIRKS.values():
        assert clauses.is_clause(quirk.rule), quirk.name
    for c in (c for c in clauses.catalog() if c.origin == "model:quirks"):  # rules stated only through a quirk
        assert c.level is Level.MUST and c.id not in rules.by_id()


def test_suite_clauses_are_a_small_cited_set_with_the_brief_ids() -> None:
    suite = suite_clauses()
    assert 15 <= len(suite) <= 30
    for c in suite:
        assert isinstance(c.citation, Section | LinuxSource)
        assert c.level in (Level.MUST, Level.SHOULD)
    ids = {c.id for c in suite}
    assert {"suite.lockstep.errno", "suite.canary.no_write_outside_writable", "suite.dirty_log.covers_writes",
            "suite.dirty_log.no_spurious", "net.loopback.order", "net.loopback.no_loss", "net.loopback.no_duplicate",
            "blk.data.integrity", "suite.target.alive", "suite.notify.call_signalled"} <= ids
    assert clauses.clause("suite.dirty_log.no_spurious").level is Level.SHOULD
    assert clauses.clause("suite.canary.no_write_outside_writable").citation.number == "2.7.5.1"  # type: ignore[union-attr]


def test_device_type_applicability() -> None:
    tx = clauses.clause("net.loopback.order")
    blk = clauses.clause("blk.data.integrity")
    generic = clauses.clause("suite.lockstep.errno")
    assert tx.applies_to(NET) and not tx.applies_to(BLK)
    assert blk.applies_to(BLK) and not blk.applies_to(NET)
    assert generic.applies_to(NET) and generic.applies_to(BLK) and generic.applies_to(3)
    assert tx.not_applicable_reason(BLK) == "a virtio-net clause; the target is virtio-blk"
    assert blk.not_applicable_reason(5) == "a virtio-blk clause; the target is device id 5"
    assert clauses.clause("net.MQ.requires").not_applicable_reason(BLK) is not None
    assert clauses.clause("blk.IN.ok").not_applicable_reason(NET) is not None


def test_feature_gates_name_the_missing_bits() -> None:
    packed_event = clauses.clause("notify.packed.used.event_idx.event_passed")
    assert packed_event.requires_features == RING_PACKED | EVENT_IDX
    assert packed_event.applies_to(NET)  # features unknown: never dropped on a guess
    assert packed_event.applies_to(NET, VERSION_1 | RING_PACKED | EVENT_IDX)
    assert packed_event.not_applicable_reason(NET, VERSION_1 | EVENT_IDX) == \
        "the device does not offer VIRTIO_F_RING_PACKED"
    assert clauses.clause("net.ctrl.RX_PROMISC.not_negotiated").not_applicable_reason(NET, VERSION_1) == \
        "the device does not offer VIRTIO_NET_F_CTRL_VQ"
    assert clauses.clause("blk.FLUSH.ok").not_applicable_reason(BLK, VERSION_1) == \
        "the device does not offer VIRTIO_BLK_F_FLUSH"
    assert clauses.clause("blk.OUT.read_only").applies_to(BLK, VERSION_1 | BLK_RO)
    # A rule about leaving a feature out applies whatever is offered.
    assert clauses.clause("blk.FLUSH.not_negotiated").applies_to(BLK, VERSION_1)
    assert clauses.clause("suite.dirty_log.covers_writes").not_applicable_reason(NET, VERSION_1) == \
        "the device does not offer VHOST_F_LOG_ALL"
    assert clauses.clause("suite.dirty_log.covers_writes").applies_to(NET, VERSION_1 | LOG_ALL)
    kick = clauses.clause("suite.suspend.kick_not_lost")
    assert kick.not_applicable_reason(NET, VERSION_1, BACKEND_SUSPEND) == \
        "the device does not offer backend feature VHOST_BACKEND_F_RESUME"
    assert kick.applies_to(NET, VERSION_1, BACKEND_SUSPEND | BACKEND_RESUME)


@pytest.mark.parametrize("device", [NET, BLK])
def test_for_device_and_not_applicable_partition_the_catalog(device: int) -> None:
    features, backend = VERSION_1 | NET_CTRL_VQ | BLK_FLUSH, 0
    applies = clauses.for_device(device, features, backend)
    reasons = clauses.not_applicable(device, features, backend)
    assert {c.id for c in applies}.isdisjoint(reasons)
    assert len(applies) + len(reasons) == len(clauses.catalog())
    assert all(reasons.values())
    other = "blk." if device == NET else "net."
    assert not [c for c in applies if c.id.startswith(other)]
    assert "suite.lockstep.errno" in {c.id for c in applies}
    assert list(reasons) == [c.id for c in clauses.catalog() if c.id in reasons]  # catalog order


def test_unknown_clause_is_a_key_error_with_suggestions() -> None:
    with pytest.raises(KeyError) as raised:
        clauses.clause("suite.lockstep.erno")
    assert isinstance(raised.value, UnknownClause)
    assert str(raised.value).startswith("no clause 'suite.lockstep.erno' in the catalog")
    assert "did you mean suite.lockstep.errno" in str(raised.value)
    with pytest.raises(KeyError, match="no clause 'zzz'"):
        clauses.clause("zzz")


def test_clause_for_rule_prefers_the_model_rule() -> None:
    assert clauses.clause_for_rule("vhost_vdpa.owner.required").id == "vhost_vdpa.owner.required"
    assert clauses.clause_for_rule(None).id == "suite.lockstep.errno"
    assert clauses.clause_for_rule("not.a.rule", fallback="suite.lockstep.status").id == "suite.lockstep.status"


def test_may_rows_are_named_may_and_never_must() -> None:
    may = clauses.clause("notify.split.used.flags.nothing_new")
    assert may.level is None and may.level_name == "MAY" and not may.is_must
    assert "[MAY]" in str(may)


def test_a_malformed_clause_is_refused() -> None:
    with pytest.raises(ValueError, match="dotted"):
        Clause("NoDots", Section("2.1", "x"), Level.MUST, "s", "suite")
    with pytest.raises(ValueError, match="no summary"):
        Clause("suite.x", Section("2.1", "x"), Level.MUST, "", "suite")


def test_every_unreachable_clause_is_a_model_rule_and_not_applicable_with_its_reason() -> None:
    model_rules = {entry.rule for entry in rules.catalog()} | {quirk.rule for quirk in QUIRKS.values()}
    assert clauses.UNREACHABLE and set(clauses.UNREACHABLE) <= model_rules
    for clause_id, reason in clauses.UNREACHABLE.items():
        assert clauses.clause(clause_id).not_applicable_reason(1) == reason
    assert clauses.clause("vhost_vdpa.vring.index").not_applicable_reason(1) is None  # the rule that decides


def test_address_space_isolation_needs_two_address_spaces() -> None:
    isolation = clauses.clause("suite.iotlb.asid_isolation")
    assert isolation.not_applicable_reason(2, address_spaces=None) is None  # not known: kept
    assert isolation.not_applicable_reason(2, address_spaces=2) is None
    assert isolation.not_applicable_reason(2, address_spaces=1) == (
        "the device has 1 address space; the clause needs at least 2")


def test_a_clause_waiting_on_the_device_says_what_it_waits_for() -> None:
    waiting = clauses.clause("notify.split.avail.flags.flags_set")
    assert waiting.precondition and waiting.applies_to(1)  # checkable on any device that does it
    reason = waiting.not_applicable_reason(1)
    assert reason is not None and "VRING_USED_F_NO_NOTIFY" in reason and "no check of it ran" in reason
    assert set(clauses.PRECONDITIONS) <= {c.id for c in clauses.catalog()}


def test_a_command_rule_needs_its_feature_but_not_negotiated_does_not() -> None:
    offer = 1 << 17  # CTRL_VQ only
    assert clauses.clause("net.ctrl.VLAN_ADD.ok").not_applicable_reason(1, offer) is not None
    assert clauses.clause("net.ctrl.driver.VLAN_ADD.bad_value").not_applicable_reason(1, offer) is not None
    assert clauses.clause("net.ctrl.VLAN_ADD.not_negotiated").not_applicable_reason(1, offer) is None
    assert clauses.clause("net.ctrl.VLAN_ADD.ok").not_applicable_reason(1, offer | 1 << 19) is None
