"""Which feature sets a reference device accepts: the spec's dependency rules, written for the impl.

A device "SHOULD accept any valid subset of offered features" and otherwise MUST refuse
FEATURES_OK (virtio v1.3 §2.2.2). "Valid" here means three things, checked by
:func:`acceptable`:

- every bit was offered (a driver MUST NOT accept a feature the device did not offer);
- VERSION_1 is among them (the reference devices are modern-only: no legacy interface);
- no negotiated bit lacks a feature it depends on (virtio v1.3 §5.1.3.1 for net; v1.4 adds the
  RSS_CONTEXT and UDP-tunnel GSO rules). virtio-blk has no such rules.

The table is the impl's own reading of the spec, kept apart from the formal model on purpose
(a misreading in one shows up as a disagreement instead of being copied into both). Only the
MUST-level rules are here: the SHOULD-level ones (HASH_REPORT or CTRL_RX_EXTRA without CTRL_VQ)
describe what a driver should not do, not what a device may refuse, so a device accepts them.

The same table serves devices checking what they *offer*: a device MUST NOT offer a feature
that requires one it does not offer (:func:`offer_problems`).
"""

from __future__ import annotations

from dataclasses import dataclass

from vdpacert.uapi import virtio_net as net
from vdpacert.uapi.virtio_config import VIRTIO_F_VERSION_1
from vdpacert.uapi.virtio_ids import VIRTIO_ID_BLOCK, VIRTIO_ID_NET


@dataclass(frozen=True)
class Dependency:
    """``feature`` needs every bit of ``all_of`` and, when ``any_of`` is not empty, at least one of it."""

    feature: int
    all_of: tuple[int, ...] = ()
    any_of: tuple[int, ...] = ()

    def satisfied_by(self, features: int) -> bool:
        if not features >> self.feature & 1:
            return True
        if any(not features >> bit & 1 for bit in self.all_of):
            return False
        return not self.any_of or any(features >> bit & 1 for bit in self.any_of)

    def describe(self) -> str:
        parts = [" and ".join(str(bit) for bit in self.all_of)] if self.all_of else []
        if self.any_of:
            parts.append("one of " + ", ".join(str(bit) for bit in self.any_of))
        return f"feature {self.feature} needs " + " and ".join(parts)


def _needs(features: tuple[int, ...], *, all_of: tuple[int, ...] = (),
           any_of: tuple[int, ...] = ()) -> list[Dependency]:
    return [Dependency(feature, all_of, any_of) for feature in features]


_HOST_TSO = (net.VIRTIO_NET_F_HOST_TSO4, net.VIRTIO_NET_F_HOST_TSO6)
_GUEST_TSO = (net.VIRTIO_NET_F_GUEST_TSO4, net.VIRTIO_NET_F_GUEST_TSO6)

#: virtio-net (v1.3 §5.1.3.1, plus the v1.4 rules for bits past 63).
NET_DEPENDENCIES: tuple[Dependency, ...] = (
    *_needs((net.VIRTIO_NET_F_GUEST_TSO4, net.VIRTIO_NET_F_GUEST_TSO6, net.VIRTIO_NET_F_GUEST_UFO,
             net.VIRTIO_NET_F_GUEST_USO4, net.VIRTIO_NET_F_GUEST_USO6), all_of=(net.VIRTIO_NET_F_GUEST_CSUM,)),
    *_needs((net.VIRTIO_NET_F_GUEST_ECN,), any_of=_GUEST_TSO),
    *_needs((net.VIRTIO_NET_F_HOST_TSO4, net.VIRTIO_NET_F_HOST_TSO6, net.VIRTIO_NET_F_HOST_UFO,
             net.VIRTIO_NET_F_HOST_USO), all_of=(net.VIRTIO_NET_F_CSUM,)),
    *_needs((net.VIRTIO_NET_F_HOST_ECN, net.VIRTIO_NET_F_RSC_EXT), any_of=_HOST_TSO),
    *_needs((net.VIRTIO_NET_F_CTRL_RX, net.VIRTIO_NET_F_CTRL_VLAN, net.VIRTIO_NET_F_GUEST_ANNOUNCE,
             net.VIRTIO_NET_F_MQ, net.VIRTIO_NET_F_CTRL_MAC_ADDR, net.VIRTIO_NET_F_NOTF_COAL,
             net.VIRTIO_NET_F_VQ_NOTF_COAL, net.VIRTIO_NET_F_RSS), all_of=(net.VIRTIO_NET_F_CTRL_VQ,)),
    Dependency(net.VIRTIO_NET_F_HASH_TUNNEL, all_of=(net.VIRTIO_NET_F_CTRL_VQ,),
               any_of=(net.VIRTIO_NET_F_RSS, net.VIRTIO_NET_F_HASH_REPORT)),
    # virtio v1.4
    Dependency(net.VIRTIO_NET_F_RSS_CONTEXT, all_of=(net.VIRTIO_NET_F_CTRL_VQ, net.VIRTIO_NET_F_RSS)),
    Dependency(net.VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO,
               all_of=(*_GUEST_TSO, net.VIRTIO_NET_F_GUEST_USO4, net.VIRTIO_NET_F_GUEST_USO6)),
    Dependency(net.VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO_CSUM, all_of=(net.VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO,)),
    Dependency(net.VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO, all_of=(*_HOST_TSO, net.VIRTIO_NET_F_HOST_USO)),
    Dependency(net.VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO_CSUM, all_of=(net.VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO,)),
)

#: device ID -> its dependency rules. A device type not listed has none the impl knows of.
DEPENDENCIES: dict[int, tuple[Dependency, ...]] = {
    VIRTIO_ID_NET: NET_DEPENDENCIES,
    VIRTIO_ID_BLOCK: (),
}


def broken_dependencies(device_id: int, features: int) -> list[Dependency]:
    """The rules of ``device_id`` that ``features`` breaks (empty when it breaks none)."""
    return [rule for rule in DEPENDENCIES.get(device_id, ()) if not rule.satisfied_by(features)]


def refusal_reason(device_id: int, offered: int, features: int) -> str | None:
    """Why a device offering ``offered`` must refuse FEATURES_OK for ``features``; None to accept."""
    if features < 0:
        return "a feature set cannot be negative"
    extra = features & ~offered
    if extra:
        return f"features {extra:#x} were not offered"
    if not features >> VIRTIO_F_VERSION_1 & 1:
        return "VERSION_1 was not accepted (the device has no legacy interface)"
    broken = broken_dependencies(device_id, features)
    if broken:
        return "; ".join(rule.describe() for rule in broken)
    return None


def acceptable(device_id: int, offered: int, features: int) -> bool:
    """Whether a device of type ``device_id`` offering ``offered`` accepts ``features`` at FEATURES_OK."""
    return refusal_reason(device_id, offered, features) is None


def offer_problems(device_id: int, offered: int) -> list[str]:
    """What is wrong with an offer: no VERSION_1, or a bit offered without a feature it needs.

    An ``any_of`` rule is satisfiable when at least one alternative is offered.
    """
    problems = []
    if not offered >> VIRTIO_F_VERSION_1 & 1:
        problems.append("VERSION_1 is not offered")
    problems += [f"offered {rule.describe()}" for rule in broken_dependencies(device_id, offered)]
    return problems
