"""The feature bits the model knows, by device type, with what each one means.

Feature words are arbitrary-width Python integers: virtio v1.4 already defines bits past
63 (VIRTIO_NET_F_RSS_CONTEXT is bit 64), and nothing in the model truncates to 64 bits.
Names are the spec's short names (``CTRL_VQ``); the full C macro (``VIRTIO_NET_F_CTRL_VQ``)
is kept beside each so either spelling resolves.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from vdpacert.uapi import vhost_types
from vdpacert.uapi import virtio_blk as blk
from vdpacert.uapi import virtio_config as cfg
from vdpacert.uapi import virtio_net as net
from vdpacert.uapi import virtio_ring as ring
from vdpacert.uapi.virtio_ids import VIRTIO_ID_BLOCK, VIRTIO_ID_NET

from . import sections
from .spec import Section, SpecError


@dataclass(frozen=True)
class FeatureBit:
    """One feature bit: its short name, number, C macro and the section defining it."""

    name: str
    bit: int
    macro: str
    summary: str
    section: Section

    @property
    def mask(self) -> int:
        return 1 << self.bit


class UnknownFeature(SpecError, ValueError):
    """A feature name that no table of the given device type defines."""


def _bits(prefix: str, section: Section, rows: Iterable[tuple[str, int, str]]) -> tuple[FeatureBit, ...]:
    return tuple(FeatureBit(name, bit, prefix + name, summary, section) for name, bit, summary in rows)


_V14_FEATURES: Final = Section("6", "Reserved Feature Bits", version="1.4")

TRANSPORT_FEATURES: Final[tuple[FeatureBit, ...]] = (
    FeatureBit("INDIRECT_DESC", ring.VIRTIO_RING_F_INDIRECT_DESC, "VIRTIO_F_INDIRECT_DESC",
               "driver may use indirect descriptor tables", sections.RESERVED_FEATURES),
    FeatureBit("EVENT_IDX", ring.VIRTIO_RING_F_EVENT_IDX, "VIRTIO_F_EVENT_IDX",
               "used_event / avail_event notification suppression", sections.RESERVED_FEATURES),
    *_bits("VIRTIO_F_", sections.RESERVED_FEATURES, (
        ("VERSION_1", cfg.VIRTIO_F_VERSION_1, "compliance with virtio 1.x (non-legacy)"),
        ("ACCESS_PLATFORM", cfg.VIRTIO_F_ACCESS_PLATFORM, "device accesses memory through the platform IOMMU"),
        ("RING_PACKED", cfg.VIRTIO_F_RING_PACKED, "packed virtqueue layout"),
        ("IN_ORDER", cfg.VIRTIO_F_IN_ORDER, "buffers are used in the order they are made available"),
        ("ORDER_PLATFORM", cfg.VIRTIO_F_ORDER_PLATFORM, "memory accesses ordered as the platform orders them"),
        ("SR_IOV", cfg.VIRTIO_F_SR_IOV, "single root I/O virtualization"),
        ("NOTIFICATION_DATA", cfg.VIRTIO_F_NOTIFICATION_DATA, "driver passes extra data in notifications"),
        ("NOTIF_CONFIG_DATA", cfg.VIRTIO_F_NOTIF_CONFIG_DATA, "notification data supplied by the device"),
        ("RING_RESET", cfg.VIRTIO_F_RING_RESET, "individual virtqueue reset"),
        ("ADMIN_VQ", cfg.VIRTIO_F_ADMIN_VQ, "administration virtqueue"),
    )),
    FeatureBit("NOTIFY_ON_EMPTY", cfg.VIRTIO_F_NOTIFY_ON_EMPTY, "VIRTIO_F_NOTIFY_ON_EMPTY",
               "legacy: notify when the available ring runs empty", sections.RESERVED_FEATURES_LEGACY),
    FeatureBit("ANY_LAYOUT", cfg.VIRTIO_F_ANY_LAYOUT, "VIRTIO_F_ANY_LAYOUT",
               "legacy: no assumption about message framing", sections.RESERVED_FEATURES_LEGACY),
    FeatureBit("SUSPEND", cfg.VIRTIO_F_SUSPEND, "VIRTIO_F_SUSPEND",
               "driver may suspend the device with the SUSPEND status bit", _V14_FEATURES),
)

VHOST_FEATURES: Final[tuple[FeatureBit, ...]] = (
    FeatureBit("LOG_ALL", vhost_types.VHOST_F_LOG_ALL, "VHOST_F_LOG_ALL",
               "vhost: log every guest write in the dirty bitmap", sections.RESERVED_FEATURES),
)

NET_FEATURES: Final[tuple[FeatureBit, ...]] = _bits("VIRTIO_NET_F_", sections.NET_FEATURE_BITS, (
    ("CSUM", net.VIRTIO_NET_F_CSUM, "device handles packets with partial checksum"),
    ("GUEST_CSUM", net.VIRTIO_NET_F_GUEST_CSUM, "driver handles packets with partial checksum"),
    ("CTRL_GUEST_OFFLOADS", net.VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, "offload state reconfigurable over ctrl vq"),
    ("MTU", net.VIRTIO_NET_F_MTU, "device reports a maximum MTU"),
    ("MAC", net.VIRTIO_NET_F_MAC, "device has a given MAC address"),
    ("GUEST_TSO4", net.VIRTIO_NET_F_GUEST_TSO4, "driver receives TSOv4"),
    ("GUEST_TSO6", net.VIRTIO_NET_F_GUEST_TSO6, "driver receives TSOv6"),
    ("GUEST_ECN", net.VIRTIO_NET_F_GUEST_ECN, "driver receives TSO with ECN"),
    ("GUEST_UFO", net.VIRTIO_NET_F_GUEST_UFO, "driver receives UFO"),
    ("HOST_TSO4", net.VIRTIO_NET_F_HOST_TSO4, "device receives TSOv4"),
    ("HOST_TSO6", net.VIRTIO_NET_F_HOST_TSO6, "device receives TSOv6"),
    ("HOST_ECN", net.VIRTIO_NET_F_HOST_ECN, "device receives TSO with ECN"),
    ("HOST_UFO", net.VIRTIO_NET_F_HOST_UFO, "device receives UFO"),
    ("MRG_RXBUF", net.VIRTIO_NET_F_MRG_RXBUF, "driver can merge receive buffers"),
    ("STATUS", net.VIRTIO_NET_F_STATUS, "configuration status field is available"),
    ("CTRL_VQ", net.VIRTIO_NET_F_CTRL_VQ, "control channel is available"),
    ("CTRL_RX", net.VIRTIO_NET_F_CTRL_RX, "control channel RX mode support"),
    ("CTRL_VLAN", net.VIRTIO_NET_F_CTRL_VLAN, "control channel VLAN filtering"),
    ("CTRL_RX_EXTRA", net.VIRTIO_NET_F_CTRL_RX_EXTRA, "extra RX mode control"),
    ("GUEST_ANNOUNCE", net.VIRTIO_NET_F_GUEST_ANNOUNCE, "driver can send gratuitous packets"),
    ("MQ", net.VIRTIO_NET_F_MQ, "multiqueue with automatic receive steering"),
    ("CTRL_MAC_ADDR", net.VIRTIO_NET_F_CTRL_MAC_ADDR, "set MAC address through control channel"),
    ("HASH_TUNNEL", net.VIRTIO_NET_F_HASH_TUNNEL, "hash over inner headers of tunnelled packets"),
    ("VQ_NOTF_COAL", net.VIRTIO_NET_F_VQ_NOTF_COAL, "per-virtqueue notification coalescing"),
    ("NOTF_COAL", net.VIRTIO_NET_F_NOTF_COAL, "notification coalescing"),
    ("GUEST_USO4", net.VIRTIO_NET_F_GUEST_USO4, "driver receives USO over IPv4"),
    ("GUEST_USO6", net.VIRTIO_NET_F_GUEST_USO6, "driver receives USO over IPv6"),
    ("HOST_USO", net.VIRTIO_NET_F_HOST_USO, "device receives USO"),
    ("HASH_REPORT", net.VIRTIO_NET_F_HASH_REPORT, "device reports the hash of received packets"),
    ("GUEST_HDRLEN", net.VIRTIO_NET_F_GUEST_HDRLEN, "driver supplies the exact header length"),
    ("RSS", net.VIRTIO_NET_F_RSS, "receive side scaling"),
    ("RSC_EXT", net.VIRTIO_NET_F_RSC_EXT, "extended receive segment coalescing info"),
    ("STANDBY", net.VIRTIO_NET_F_STANDBY, "standby for a primary device with the same MAC"),
    ("SPEED_DUPLEX", net.VIRTIO_NET_F_SPEED_DUPLEX, "device reports speed and duplex"),
)) + _bits("VIRTIO_NET_F_", sections.NET_FEATURE_REQUIREMENTS_V14, (
    ("DEVICE_STATS", net.VIRTIO_NET_F_DEVICE_STATS, "device statistics over the control channel"),
    ("RSS_CONTEXT", net.VIRTIO_NET_F_RSS_CONTEXT, "multiple RSS contexts"),
    ("GUEST_UDP_TUNNEL_GSO", net.VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO, "driver receives GSO over UDP tunnels"),
    ("GUEST_UDP_TUNNEL_GSO_CSUM", net.VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO_CSUM,
     "driver receives UDP tunnel GSO with outer checksum"),
    ("HOST_UDP_TUNNEL_GSO", net.VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO, "device receives GSO over UDP tunnels"),
    ("HOST_UDP_TUNNEL_GSO_CSUM", net.VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO_CSUM,
     "device receives UDP tunnel GSO with outer checksum"),
))

BLK_FEATURES: Final[tuple[FeatureBit, ...]] = _bits("VIRTIO_BLK_F_", sections.BLK_FEATURE_BITS, (
    ("SIZE_MAX", blk.VIRTIO_BLK_F_SIZE_MAX, "maximum size of any single segment is in size_max"),
    ("SEG_MAX", blk.VIRTIO_BLK_F_SEG_MAX, "maximum number of segments in a request is in seg_max"),
    ("GEOMETRY", blk.VIRTIO_BLK_F_GEOMETRY, "disk-style geometry in geometry"),
    ("RO", blk.VIRTIO_BLK_F_RO, "device is read-only"),
    ("BLK_SIZE", blk.VIRTIO_BLK_F_BLK_SIZE, "block size of disk is in blk_size"),
    ("FLUSH", blk.VIRTIO_BLK_F_FLUSH, "cache flush command support"),
    ("TOPOLOGY", blk.VIRTIO_BLK_F_TOPOLOGY, "optimal I/O alignment information"),
    ("CONFIG_WCE", blk.VIRTIO_BLK_F_CONFIG_WCE, "writeback / writethrough cache mode toggle"),
    ("MQ", blk.VIRTIO_BLK_F_MQ, "more than one virtqueue"),
    ("DISCARD", blk.VIRTIO_BLK_F_DISCARD, "discard command support"),
    ("WRITE_ZEROES", blk.VIRTIO_BLK_F_WRITE_ZEROES, "write zeroes command support"),
    ("LIFETIME", blk.VIRTIO_BLK_F_LIFETIME, "device lifetime information"),
    ("SECURE_ERASE", blk.VIRTIO_BLK_F_SECURE_ERASE, "secure erase command support"),
    ("ZONED", blk.VIRTIO_BLK_F_ZONED, "zoned block device"),
))

_DEVICE_FEATURES: Final[Mapping[int, tuple[FeatureBit, ...]]] = MappingProxyType({
    VIRTIO_ID_NET: NET_FEATURES,
    VIRTIO_ID_BLOCK: BLK_FEATURES,
})

DEVICE_NAMES: Final[Mapping[str, int]] = MappingProxyType({"net": VIRTIO_ID_NET, "blk": VIRTIO_ID_BLOCK})


def feature_table(device_id: int) -> Mapping[str, FeatureBit]:
    """Every bit a device of this type may know: its own, the transport's and vhost's."""
    rows = (*TRANSPORT_FEATURES, *VHOST_FEATURES, *_DEVICE_FEATURES.get(device_id, ()))
    return MappingProxyType({row.name: row for row in rows})


@functools.cache
def lookup(device_id: int, name: str) -> FeatureBit:
    """Resolve a short name (``MQ``) or a C macro (``VIRTIO_NET_F_MQ``), case-insensitively.

    Cached: the tables are constant, and the dependency checks resolve the same few names on every status write.
    """
    wanted = name.strip().upper()
    for row in feature_table(device_id).values():
        if wanted in (row.name, row.macro):
            return row
    raise UnknownFeature(f"device type {device_id} defines no feature named {name!r}")


def bit_of(device_id: int, name: str) -> int:
    return lookup(device_id, name).bit


def mask_of(device_id: int, *names: str) -> int:
    """The feature word with exactly the named bits set."""
    word = 0
    for name in names:
        word |= lookup(device_id, name).mask
    return word


def names_of(device_id: int, features: int) -> list[str]:
    """The names of the set bits, lowest first; bits no table knows read ``bit<N>``."""
    by_bit = {row.bit: row.name for row in feature_table(device_id).values()}
    names = []
    bit = 0
    while features >> bit:
        if (features >> bit) & 1:
            names.append(by_bit.get(bit, f"bit{bit}"))
        bit += 1
    return names


def parse_features(device_id: int, text: str) -> int:
    """Read a feature word written as a number (``0x308830028``) or as names (``VERSION_1,MQ``)."""
    text = text.strip()
    if not text:
        return 0
    try:
        word = int(text, 0)
    except ValueError:
        pass
    else:
        if word < 0:
            raise UnknownFeature(f"a feature word is never negative: {text!r}")
        return word
    word = 0
    for part in text.replace("|", ",").replace("+", ",").split(","):
        if part.strip():
            word |= lookup(device_id, part).mask
    return word
