"""The impl's own feature acceptance table (impl/features.py): spec dependency rules, offered bits, VERSION_1."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdpacert.impl.features import (
    NET_DEPENDENCIES,
    acceptable,
    broken_dependencies,
    offer_problems,
    refusal_reason,
)
from vdpacert.uapi import virtio_blk as blk
from vdpacert.uapi import virtio_net as net
from vdpacert.uapi.virtio_config import VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1
from vdpacert.uapi.virtio_ids import VIRTIO_ID_BLOCK, VIRTIO_ID_NET

V1 = 1 << VIRTIO_F_VERSION_1
ALL = (1 << 128) - 1  # an offer of every bit, so only the dependency rules decide


def bits(*numbers: int) -> int:
    return sum(1 << n for n in numbers)


# (feature, a set that satisfies its rule, a set that breaks it) straight from virtio v1.3 §5.1.3.1 / v1.4.
NET_CASES = [
    (net.VIRTIO_NET_F_GUEST_TSO4, bits(net.VIRTIO_NET_F_GUEST_CSUM), 0),
    (net.VIRTIO_NET_F_GUEST_TSO6, bits(net.VIRTIO_NET_F_GUEST_CSUM), 0),
    (net.VIRTIO_NET_F_GUEST_UFO, bits(net.VIRTIO_NET_F_GUEST_CSUM), bits(net.VIRTIO_NET_F_CSUM)),
    (net.VIRTIO_NET_F_GUEST_USO4, bits(net.VIRTIO_NET_F_GUEST_CSUM), 0),
    (net.VIRTIO_NET_F_GUEST_USO6, bits(net.VIRTIO_NET_F_GUEST_CSUM), 0),
    (net.VIRTIO_NET_F_HOST_TSO4, bits(net.VIRTIO_NET_F_CSUM), bits(net.VIRTIO_NET_F_GUEST_CSUM)),
    (net.VIRTIO_NET_F_HOST_TSO6, bits(net.VIRTIO_NET_F_CSUM), 0),
    (net.VIRTIO_NET_F_HOST_UFO, bits(net.VIRTIO_NET_F_CSUM), 0),
    (net.VIRTIO_NET_F_HOST_USO, bits(net.VIRTIO_NET_F_CSUM), 0),
    (net.VIRTIO_NET_F_GUEST_ECN, bits(net.VIRTIO_NET_F_GUEST_TSO6, net.VIRTIO_NET_F_GUEST_CSUM),
     bits(net.VIRTIO_NET_F_HOST_TSO4, net.VIRTIO_NET_F_CSUM)),
    (net.VIRTIO_NET_F_HOST_ECN, bits(net.VIRTIO_NET_F_HOST_TSO4, net.VIRTIO_NET_F_CSUM),
     bits(net.VIRTIO_NET_F_GUEST_TSO4, net.VIRTIO_NET_F_GUEST_CSUM)),
    (net.VIRTIO_NET_F_RSC_EXT, bits(net.VIRTIO_NET_F_HOST_TSO6, net.VIRTIO_NET_F_CSUM), 0),
    (net.VIRTIO_NET_F_CTRL_RX, bits(net.VIRTIO_NET_F_CTRL_VQ), 0),
    (net.VIRTIO_NET_F_CTRL_VLAN, bits(net.VIRTIO_NET_F_CTRL_VQ), 0),
    (net.VIRTIO_NET_F_GUEST_ANNOUNCE, bits(net.VIRTIO_NET_F_CTRL_VQ), 0),
    (net.VIRTIO_NET_F_MQ, bits(net.VIRTIO_NET_F_CTRL_VQ), 0),
    (net.VIRTIO_NET_F_CTRL_MAC_ADDR, bits(net.VIRTIO_NET_F_CTRL_VQ), 0),
    (net.VIRTIO_NET_F_NOTF_COAL, bits(net.VIRTIO_NET_F_CTRL_VQ), 0),
    (net.VIRTIO_NET_F_VQ_NOTF_COAL, bits(net.VIRTIO_NET_F_CTRL_VQ), 0),
    (net.VIRTIO_NET_F_RSS, bits(net.VIRTIO_NET_F_CTRL_VQ), 0),
    (net.VIRTIO_NET_F_HASH_TUNNEL, bits(net.VIRTIO_NET_F_CTRL_VQ, net.VIRTIO_NET_F_HASH_REPORT),
     bits(net.VIRTIO_NET_F_CTRL_VQ)),
    (net.VIRTIO_NET_F_HASH_TUNNEL, bits(net.VIRTIO_NET_F_CTRL_VQ, net.VIRTIO_NET_F_RSS),
     bits(net.VIRTIO_NET_F_HASH_REPORT)),
    (net.VIRTIO_NET_F_RSS_CONTEXT, bits(net.VIRTIO_NET_F_CTRL_VQ, net.VIRTIO_NET_F_RSS),
     bits(net.VIRTIO_NET_F_CTRL_VQ)),
    (net.VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO,
     bits(net.VIRTIO_NET_F_GUEST_CSUM, net.VIRTIO_NET_F_GUEST_TSO4, net.VIRTIO_NET_F_GUEST_TSO6,
          net.VIRTIO_NET_F_GUEST_USO4, net.VIRTIO_NET_F_GUEST_USO6),
     bits(net.VIRTIO_NET_F_GUEST_CSUM, net.VIRTIO_NET_F_GUEST_TSO4, net.VIRTIO_NET_F_GUEST_TSO6,
          net.VIRTIO_NET_F_GUEST_USO4)),
    (net.VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO_CSUM,
     bits(net.VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO, net.VIRTIO_NET_F_CSUM, net.VIRTIO_NET_F_HOST_TSO4,
          net.VIRTIO_NET_F_HOST_TSO6, net.VIRTIO_NET_F_HOST_USO),
     bits(net.VIRTIO_NET_F_CSUM, net.VIRTIO_NET_F_HOST_TSO4, net.VIRTIO_NET_F_HOST_TSO6, net.VIRTIO_NET_F_HOST_USO)),
]


@pytest.mark.parametrize(("feature", "good", "bad"), NET_CASES)
def test_each_net_dependency_rule(feature: int, good: int, bad: int) -> None:
    assert acceptable(VIRTIO_ID_NET, ALL, V1 | (1 << feature) | good)
    assert not acceptable(VIRTIO_ID_NET, ALL, V1 | (1 << feature) | bad)
    reason = refusal_reason(VIRTIO_ID_NET, ALL, V1 | (1 << feature) | bad)
    assert reason is not None and f"feature {feature} needs" in reason
    # the prerequisites alone are always fine: rules bind the dependent bit, not its requirements
    assert acceptable(VIRTIO_ID_NET, ALL, V1 | good)


def test_every_rule_in_the_table_is_exercised() -> None:
    assert {rule.feature for rule in NET_DEPENDENCIES} <= {case[0] for case in NET_CASES} | {
        net.VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO_CSUM, net.VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO}


def test_should_level_rules_are_not_refused() -> None:
    # HASH_REPORT / CTRL_RX_EXTRA without CTRL_VQ is a driver SHOULD NOT, not a reason to refuse
    assert acceptable(VIRTIO_ID_NET, ALL, V1 | bits(net.VIRTIO_NET_F_HASH_REPORT, net.VIRTIO_NET_F_CTRL_RX_EXTRA))


def test_offered_bits_and_version_1() -> None:
    offered = V1 | bits(blk.VIRTIO_BLK_F_FLUSH, VIRTIO_F_RING_PACKED)
    assert acceptable(VIRTIO_ID_BLOCK, offered, V1)
    assert acceptable(VIRTIO_ID_BLOCK, offered, offered)
    assert not acceptable(VIRTIO_ID_BLOCK, offered, bits(blk.VIRTIO_BLK_F_FLUSH))  # no VERSION_1
    assert not acceptable(VIRTIO_ID_BLOCK, offered, V1 | bits(blk.VIRTIO_BLK_F_RO))  # not offered
    assert "not offered" in (refusal_reason(VIRTIO_ID_BLOCK, offered, V1 | bits(blk.VIRTIO_BLK_F_RO)) or "")
    assert not acceptable(VIRTIO_ID_BLOCK, offered, -1)


def test_bits_past_63_are_ordinary_bits() -> None:
    offered = V1 | bits(net.VIRTIO_NET_F_CTRL_VQ, net.VIRTIO_NET_F_RSS, net.VIRTIO_NET_F_RSS_CONTEXT)
    assert acceptable(VIRTIO_ID_NET, offered, offered)
    assert not acceptable(VIRTIO_ID_NET, offered & ~(1 << 64), offered)  # bit 64 not offered
    assert broken_dependencies(VIRTIO_ID_NET, V1 | bits(net.VIRTIO_NET_F_RSS_CONTEXT))


def test_block_has_no_dependency_rules() -> None:
    every_blk_bit = bits(*range(0, 24))
    assert broken_dependencies(VIRTIO_ID_BLOCK, every_blk_bit) == []


def test_offer_problems() -> None:
    assert offer_problems(VIRTIO_ID_BLOCK, V1) == []
    assert offer_problems(VIRTIO_ID_BLOCK, 0) == ["VERSION_1 is not offered"]
    problems = offer_problems(VIRTIO_ID_NET, V1 | bits(net.VIRTIO_NET_F_MQ))
    assert len(problems) == 1 and f"feature {net.VIRTIO_NET_F_MQ} needs" in problems[0]


PREREQUISITES = bits(net.VIRTIO_NET_F_CSUM, net.VIRTIO_NET_F_GUEST_CSUM, net.VIRTIO_NET_F_CTRL_VQ,
                     net.VIRTIO_NET_F_GUEST_TSO4, net.VIRTIO_NET_F_HOST_TSO4, net.VIRTIO_NET_F_RSS)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=(1 << 70) - 1))
def test_adding_prerequisites_never_makes_a_set_unacceptable(features: int) -> None:
    features |= V1
    if acceptable(VIRTIO_ID_NET, ALL, features):
        assert acceptable(VIRTIO_ID_NET, ALL, features | PREREQUISITES)
    # and a set is acceptable exactly when no rule is broken (offer = everything, VERSION_1 present)
    assert acceptable(VIRTIO_ID_NET, ALL, features) == (broken_dependencies(VIRTIO_ID_NET, features) == [])
