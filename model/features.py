"""Feature negotiation rules: which feature words a driver may accept and a device may offer.

The rules are data. :data:`NET_DEPENDENCIES` and its siblings are the "X requires Y" table of
the spec (each row in conjunctive normal form: every group needs at least one of its
members); :func:`violations` and :func:`offer_violations` read them, and
:mod:`vdpacert.model.z3_features` builds its solver constraints from the very same rows, so
the Python checks and the Z3 encodings cannot disagree.

Public API::

    violations(device_id, features, *, offered=None) -> list[Violation]
    offer_violations(device_id, offered) -> list[Violation]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from vdpacert.uapi.virtio_config import VIRTIO_F_VERSION_1
from vdpacert.uapi.virtio_ids import VIRTIO_ID_BLOCK, VIRTIO_ID_NET

from . import sections
from .feature_bits import (
    DEVICE_NAMES,
    FeatureBit,
    UnknownFeature,
    bit_of,
    feature_table,
    lookup,
    mask_of,
    names_of,
    parse_features,
)
from .spec import Level, Rule, Section, Violation

__all__ = [
    "DEVICE_NAMES",
    "VERSION_1_RULE",
    "Dependency",
    "FeatureBit",
    "UnknownFeature",
    "bit_of",
    "dependency_rules",
    "feature_table",
    "has_must_violation",
    "is_valid",
    "lookup",
    "mask_of",
    "names_of",
    "offer_violations",
    "parse_features",
    "violations",
]


@dataclass(frozen=True)
class Dependency:
    """``feature`` may only be set together with at least one member of every group in ``requires``.

    ``requires=(("CTRL_VQ",), ("RSS", "HASH_REPORT"))`` reads "requires CTRL_VQ, and RSS or
    HASH_REPORT". The same row binds the driver (2.2.1: it must not accept a feature without
    what it requires) and the device (2.2.2: it must not offer one without what it requires).
    """

    rule: str
    feature: str
    requires: tuple[tuple[str, ...], ...]
    level: Level
    section: Section
    device_section: Section | None = None  # where the device-side (offer) rule is written, if elsewhere

    @property
    def citation(self) -> Section:
        return self.section

    @property
    def offer_citation(self) -> Section:
        return self.device_section or self.section

    def missing(self, device_id: int, features: int) -> list[tuple[str, ...]]:
        """The groups left unsatisfied by ``features`` (empty when the rule holds)."""
        if not features & mask_of(device_id, self.feature):
            return []
        return [group for group in self.requires if not features & mask_of(device_id, *group)]

    def describe(self) -> str:
        return f"{self.feature} requires " + " and ".join(" or ".join(group) for group in self.requires)


def _requires(prefix: str, feature: str, *groups: tuple[str, ...] | str,
              level: Level = Level.MUST, section: Section = sections.NET_FEATURE_REQUIREMENTS,
              device_section: Section | None = None) -> Dependency:
    normalized = tuple((group,) if isinstance(group, str) else group for group in groups)
    return Dependency(f"{prefix}.{feature}.requires", feature, normalized, level, section, device_section)


_V14 = sections.NET_FEATURE_REQUIREMENTS_V14

#: virtio-net feature bit requirements (section 5.1.3.1).
NET_DEPENDENCIES: Final[tuple[Dependency, ...]] = (
    _requires("net", "GUEST_TSO4", "GUEST_CSUM"),
    _requires("net", "GUEST_TSO6", "GUEST_CSUM"),
    _requires("net", "GUEST_ECN", ("GUEST_TSO4", "GUEST_TSO6")),
    _requires("net", "GUEST_UFO", "GUEST_CSUM"),
    _requires("net", "GUEST_USO4", "GUEST_CSUM"),
    _requires("net", "GUEST_USO6", "GUEST_CSUM"),
    _requires("net", "HOST_TSO4", "CSUM"),
    _requires("net", "HOST_TSO6", "CSUM"),
    _requires("net", "HOST_ECN", ("HOST_TSO4", "HOST_TSO6")),
    _requires("net", "HOST_UFO", "CSUM"),
    _requires("net", "HOST_USO", "CSUM"),
    _requires("net", "CTRL_RX", "CTRL_VQ"),
    _requires("net", "CTRL_VLAN", "CTRL_VQ"),
    _requires("net", "GUEST_ANNOUNCE", "CTRL_VQ"),
    _requires("net", "MQ", "CTRL_VQ"),
    _requires("net", "CTRL_MAC_ADDR", "CTRL_VQ"),
    _requires("net", "NOTF_COAL", "CTRL_VQ"),
    _requires("net", "VQ_NOTF_COAL", "CTRL_VQ"),
    _requires("net", "RSC_EXT", ("HOST_TSO4", "HOST_TSO6")),
    _requires("net", "RSS", "CTRL_VQ"),
    _requires("net", "HASH_TUNNEL", "CTRL_VQ", ("RSS", "HASH_REPORT")),
    # Added in v1.3 as recommendations only (v1.2 shipped without them), in the config-layout
    # requirements rather than in the 5.1.3.1 list.
    _requires("net", "HASH_REPORT", "CTRL_VQ", level=Level.SHOULD,
              section=sections.NET_CONFIG_DRIVER, device_section=sections.NET_CONFIG_DEVICE),
    _requires("net", "CTRL_RX_EXTRA", "CTRL_VQ", level=Level.SHOULD,
              section=sections.NET_CONFIG_DRIVER, device_section=sections.NET_CONFIG_DEVICE),
    _requires("net", "RSS_CONTEXT", "CTRL_VQ", "RSS", section=_V14),
    _requires("net", "GUEST_UDP_TUNNEL_GSO", "GUEST_TSO4", "GUEST_TSO6", "GUEST_USO4", "GUEST_USO6",
              section=_V14),
    _requires("net", "GUEST_UDP_TUNNEL_GSO_CSUM", "GUEST_UDP_TUNNEL_GSO", section=_V14),
    _requires("net", "HOST_UDP_TUNNEL_GSO", "HOST_TSO4", "HOST_TSO6", "HOST_USO", section=_V14),
    _requires("net", "HOST_UDP_TUNNEL_GSO_CSUM", "HOST_UDP_TUNNEL_GSO", section=_V14),
)

_DEPENDENCIES: Final[Mapping[int, tuple[Dependency, ...]]] = MappingProxyType({
    VIRTIO_ID_NET: NET_DEPENDENCIES,
    VIRTIO_ID_BLOCK: (),  # section 5.2.3 defines no bit that requires another
})

#: The rules that are not dependency rows.
VERSION_1_ACCEPTED: Final = Rule(
    "features.VERSION_1.accepted", Level.MUST, sections.RESERVED_FEATURES_DRIVER,
    "a modern device offers VERSION_1 and the driver must accept it")
VERSION_1_OFFERED: Final = Rule(
    "features.VERSION_1.offered", Level.MUST, sections.RESERVED_FEATURES_DEVICE,
    "the device must offer VERSION_1")
SUBSET_OF_OFFERED: Final = Rule(
    "features.subset_of_offered", Level.MUST, sections.FEATURE_BITS_DRIVER,
    "the driver must not accept a feature the device did not offer")
VERSION_1_RULE: Final = VERSION_1_ACCEPTED.rule
VERSION_1_OFFER_RULE: Final = VERSION_1_OFFERED.rule
SUBSET_RULE: Final = SUBSET_OF_OFFERED.rule


def dependency_rules(device_id: int) -> tuple[Dependency, ...]:
    """The dependency rows binding a device of this type (empty for unknown types)."""
    return _DEPENDENCIES.get(device_id, ())


def _dependency_violations(device_id: int, features: int, side: str) -> list[Violation]:
    found = []
    for dep in dependency_rules(device_id):
        for group in dep.missing(device_id, features):
            needed = " or ".join(group)
            found.append(Violation(
                dep.rule, dep.level, dep.offer_citation if side == "offers" else dep.citation,
                f"{side} {dep.feature} (bit {bit_of(device_id, dep.feature)}) without {needed}",
            ))
    return found


def violations(device_id: int, features: int, *, offered: int | None = None) -> list[Violation]:
    """Every rule the driver's accepted feature word breaks; empty means the set is valid.

    Checked: each dependency row (5.1.3.1 for net), VERSION_1 (a conforming device always
    offers it and section 6.1 obliges the driver to accept it), and, when ``offered`` is given,
    that nothing outside the offer was accepted (2.2.1).
    """
    if features < 0:
        raise ValueError("a feature word is never negative")
    found = _dependency_violations(device_id, features, "accepts")
    if not features >> VIRTIO_F_VERSION_1 & 1:
        found.append(VERSION_1_ACCEPTED.violation("VERSION_1 (bit 32) not accepted"))
    if offered is not None and features & ~offered:
        extra = ", ".join(names_of(device_id, features & ~offered))
        found.append(SUBSET_OF_OFFERED.violation(f"accepts {extra}"))
    return found


def offer_violations(device_id: int, offered: int) -> list[Violation]:
    """Every rule the device's offered feature word breaks (2.2.2 and 6.2)."""
    if offered < 0:
        raise ValueError("a feature word is never negative")
    found = _dependency_violations(device_id, offered, "offers")
    if not offered >> VIRTIO_F_VERSION_1 & 1:
        found.append(VERSION_1_OFFERED.violation("VERSION_1 (bit 32) not offered"))
    return found


def all_rules() -> tuple[Dependency | Rule, ...]:
    """Every feature rule of every device type the model knows."""
    rows: list[Dependency | Rule] = [VERSION_1_ACCEPTED, VERSION_1_OFFERED, SUBSET_OF_OFFERED]
    for device_rows in _DEPENDENCIES.values():
        rows += device_rows
    return tuple(rows)


RULES: Final = all_rules()


def has_must_violation(found: list[Violation]) -> bool:
    return any(v.level is Level.MUST for v in found)


def is_valid(device_id: int, features: int, *, offered: int | None = None) -> bool:
    """True when no MUST rule is broken: the set a conforming device must not refuse... or may.

    A set with only SHOULD violations is still one a device may accept; the device
    "SHOULD accept any valid subset" (2.2.2) and MUST refuse the others.
    """
    return not has_must_violation(violations(device_id, features, offered=offered))
