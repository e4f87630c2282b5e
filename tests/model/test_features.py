"""Feature negotiation rules: the dependency table, VERSION_1, subsets, and wide feature words."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vdpacert.model import features
from vdpacert.model.features import mask_of
from vdpacert.model.spec import Level, Section

NET, BLK = 1, 2
V1 = mask_of(NET, "VERSION_1")

# The requirement list of brief §4 / virtio §5.1.3.1, restated here as the test oracle.
NET_REQUIRES = [
    ("GUEST_TSO4", ["GUEST_CSUM"]), ("GUEST_TSO6", ["GUEST_CSUM"]), ("GUEST_UFO", ["GUEST_CSUM"]),
    ("GUEST_USO4", ["GUEST_CSUM"]), ("GUEST_USO6", ["GUEST_CSUM"]),
    ("HOST_TSO4", ["CSUM"]), ("HOST_TSO6", ["CSUM"]), ("HOST_UFO", ["CSUM"]), ("HOST_USO", ["CSUM"]),
    ("CTRL_RX", ["CTRL_VQ"]), ("CTRL_VLAN", ["CTRL_VQ"]), ("GUEST_ANNOUNCE", ["CTRL_VQ"]),
    ("MQ", ["CTRL_VQ"]), ("CTRL_MAC_ADDR", ["CTRL_VQ"]), ("VQ_NOTF_COAL", ["CTRL_VQ"]),
    ("NOTF_COAL", ["CTRL_VQ"]), ("RSS", ["CTRL_VQ"]),
]


@pytest.mark.parametrize(("feature", "needs"), NET_REQUIRES)
def test_single_requirement_rules(feature: str, needs: list[str]) -> None:
    alone = features.violations(NET, V1 | mask_of(NET, feature))
    assert [v.rule for v in alone] == [f"net.{feature}.requires"]
    assert alone[0].level is Level.MUST
    assert isinstance(alone[0].citation, Section) and alone[0].citation.number == "5.1.3.1"
    assert features.violations(NET, V1 | mask_of(NET, feature, *needs)) == []


@pytest.mark.parametrize(("feature", "either"), [
    ("GUEST_ECN", ("GUEST_TSO4", "GUEST_TSO6")),
    ("HOST_ECN", ("HOST_TSO4", "HOST_TSO6")),
    ("RSC_EXT", ("HOST_TSO4", "HOST_TSO6")),
])
def test_either_or_requirements(feature: str, either: tuple[str, str]) -> None:
    assert [v.rule for v in features.violations(NET, V1 | mask_of(NET, feature))] == [f"net.{feature}.requires"]
    for one in either:
        base = "GUEST_CSUM" if one.startswith("GUEST") else "CSUM"
        assert features.violations(NET, V1 | mask_of(NET, feature, one, base)) == []


def test_hash_tunnel_needs_ctrl_vq_and_one_of_rss_or_hash_report() -> None:
    broken = features.violations(NET, V1 | mask_of(NET, "HASH_TUNNEL"))
    assert [v.rule for v in broken] == ["net.HASH_TUNNEL.requires"] * 2
    assert features.violations(NET, V1 | mask_of(NET, "HASH_TUNNEL", "CTRL_VQ", "RSS")) == []
    assert features.violations(NET, V1 | mask_of(NET, "HASH_TUNNEL", "CTRL_VQ", "HASH_REPORT")) == []


@pytest.mark.parametrize("feature", ["HASH_REPORT", "CTRL_RX_EXTRA"])
def test_should_level_rules(feature: str) -> None:
    found = features.violations(NET, V1 | mask_of(NET, feature))
    assert [(v.rule, v.level) for v in found] == [(f"net.{feature}.requires", Level.SHOULD)]
    assert features.is_valid(NET, V1 | mask_of(NET, feature))
    # v1.3 states these two in the config-layout requirements: the driver's in 5.1.4.2, the device's in 5.1.4.1.
    assert isinstance(found[0].citation, Section) and found[0].citation.number == "5.1.4.2"
    (offer,) = features.offer_violations(NET, V1 | mask_of(NET, feature))
    assert isinstance(offer.citation, Section) and offer.citation.number == "5.1.4.1"


def test_v14_rules_past_bit_63_are_marked_and_enforced() -> None:
    rss_context = mask_of(NET, "RSS_CONTEXT")
    assert rss_context == 1 << 64
    found = features.violations(NET, V1 | rss_context)
    assert {v.rule for v in found} == {"net.RSS_CONTEXT.requires"}
    assert all(isinstance(v.citation, Section) and v.citation.v14_only for v in found)
    assert features.violations(NET, V1 | rss_context | mask_of(NET, "CTRL_VQ", "RSS")) == []
    tunnel = mask_of(NET, "HOST_UDP_TUNNEL_GSO_CSUM")
    assert {v.rule for v in features.violations(NET, V1 | tunnel)} == {"net.HOST_UDP_TUNNEL_GSO_CSUM.requires"}
    full = mask_of(NET, "HOST_UDP_TUNNEL_GSO_CSUM", "HOST_UDP_TUNNEL_GSO", "HOST_TSO4", "HOST_TSO6",
                   "HOST_USO", "CSUM")
    assert features.violations(NET, V1 | full) == []


def test_version_1_must_be_accepted_and_offered() -> None:
    assert [v.rule for v in features.violations(BLK, 0)] == [features.VERSION_1_RULE]
    assert [v.rule for v in features.offer_violations(BLK, 0)] == ["features.VERSION_1.offered"]
    assert features.violations(BLK, V1) == []


def test_accepting_an_unoffered_bit_is_a_violation() -> None:
    found = features.violations(NET, V1 | mask_of(NET, "MTU"), offered=V1)
    assert [v.rule for v in found] == ["features.subset_of_offered"]
    assert "MTU" in found[0].message


def test_blk_has_no_dependency_rules_but_shares_names_with_net() -> None:
    assert features.dependency_rules(BLK) == ()
    assert features.bit_of(BLK, "MQ") == 12
    assert features.bit_of(NET, "MQ") == 22
    assert features.violations(BLK, V1 | mask_of(BLK, "MQ", "DISCARD", "WRITE_ZEROES")) == []


def test_vdpa_sim_net_offer_seen_on_linux_is_valid() -> None:
    # brief §6: Linux 6.12 vdpasim_net offers 0x308830028.
    assert features.offer_violations(NET, 0x308830028) == []
    assert features.names_of(NET, 0x308830028) == [
        "MTU", "MAC", "STATUS", "CTRL_VQ", "CTRL_MAC_ADDR", "ANY_LAYOUT", "VERSION_1", "ACCESS_PLATFORM"]


def test_parse_accepts_hex_names_and_macros() -> None:
    assert features.parse_features(NET, "0x100400000") == V1 | mask_of(NET, "MQ")
    assert features.parse_features(NET, "VERSION_1, VIRTIO_NET_F_MQ") == V1 | mask_of(NET, "MQ")
    assert features.parse_features(NET, "version_1|ctrl_vq") == V1 | mask_of(NET, "CTRL_VQ")
    with pytest.raises(features.UnknownFeature):
        features.parse_features(NET, "VERSION_1,DISCARD")  # a blk bit
    with pytest.raises(features.UnknownFeature):
        features.parse_features(NET, "-1")


def test_every_rule_cites_a_section_and_every_feature_it_names_exists() -> None:
    for device_id in (NET, BLK):
        table = features.feature_table(device_id)
        for rule in features.dependency_rules(device_id):
            assert isinstance(rule.section, Section) and rule.section.number
            assert rule.feature in table
            assert all(name in table for group in rule.requires for name in group)
        for row in table.values():
            assert row.section.number, row.name


def test_bit_numbers_are_unique_per_device() -> None:
    for device_id in (NET, BLK):
        bits = [row.bit for row in features.feature_table(device_id).values()]
        assert len(bits) == len(set(bits))


def net_words() -> st.SearchStrategy[int]:
    known = sorted(row.bit for row in features.feature_table(NET).values())
    return st.sets(st.sampled_from(known)).map(lambda bits: sum(1 << b for b in bits))


def close_under_dependencies(word: int) -> int:
    """Add, for every unsatisfied group, its first member, until nothing is missing."""
    while True:
        missing = [group for rule in features.dependency_rules(NET) for group in rule.missing(NET, word)]
        if not missing:
            return word | V1
        for group in missing:
            word |= mask_of(NET, group[0])


@given(net_words())
def test_closing_a_set_under_its_rules_makes_it_valid(word: int) -> None:
    closed = close_under_dependencies(word)
    assert features.violations(NET, closed) == []
    assert features.offer_violations(NET, closed) == []


@given(net_words())
def test_driver_and_device_sides_read_the_same_dependency_rows(word: int) -> None:
    driver = {v.rule for v in features.violations(NET, word)} - {features.VERSION_1_RULE}
    device = {v.rule for v in features.offer_violations(NET, word)} - {"features.VERSION_1.offered"}
    assert driver == device


@given(net_words(), net_words())
def test_a_violation_names_a_feature_that_is_set(word: int, offered: int) -> None:
    for violation in features.violations(NET, word, offered=offered):
        if violation.rule.startswith("net."):
            feature = violation.rule.split(".")[1]
            assert word & mask_of(NET, feature)
