"""The device state a live migration carries: a versioned, self-describing snapshot and the rules it obeys.

A :class:`DeviceState` is everything a destination needs to continue a vDPA device where the source
stopped, as seen through the vhost-vdpa user interface only (issue 5): the feature words, status,
config space, queue count and size limit, group-to-address-space bindings, and per queue the ring
layout the driver gave (:class:`VringState`) with the vring base to resume from (brief §3's encoding:
split = last_avail_idx; packed = avail idx bits 0-14, avail wrap 15, used idx 16-30, used wrap 31).
Net devices also carry :class:`NetState` (MAC, queue pairs, RX modes), which a destination rebuilds
by replaying control-queue commands, as QEMU does, because vhost has no ioctl to set it.

Everything is a frozen dataclass of plain ints, bytes, bools and tuples, so a state compares by
value (:meth:`DeviceState.diff` lists the differences) and serializes without custom hooks
(:mod:`vdpacert.migration.blob`).

:func:`validate` holds every consistency rule; a state from an untrusted source (a blob off the
wire, a device answering nonsense at save) is refused with :class:`StateError` naming the field and
the rule. The rules are at least QEMU's VMState checks and Firecracker's snapshot validation
(brief §7) -- in-flight distance within the queue size, aligned non-zero ring addresses, acked
features offered, a known version -- plus the fit to a destination (:class:`DestinationInfo`).

In-flight chains: ``base`` is where the device will read next, ``used_idx`` where the driver sees
the used ring. The chains between them were taken by the device and never used; ``inflight`` names
them (split: head indexes; packed: Buffer IDs), oldest first. :func:`rewound_base` moves the avail
half back to the used position so a destination takes them again: exact for a device that uses
buffers in the order it takes them (every reference device, and any IN_ORDER device).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from vdpacert.model.ring_index import PACKED_IDX_MASK, U16
from vdpacert.uapi import vhost_types as T  # noqa: N812 - read like the C names: T.VHOST_BACKEND_F_SUSPEND
from vdpacert.uapi import virtio_net as N  # noqa: N812
from vdpacert.uapi.virtio_config import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_SUSPEND,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
)
from vdpacert.uapi.virtio_ids import VIRTIO_ID_NET
from vdpacert.uapi.virtio_ring import (
    VIRTQUEUE_MAX_SIZE,
    VRING_AVAIL_ALIGN_SIZE,
    VRING_DESC_ALIGN_SIZE,
    VRING_USED_ALIGN_SIZE,
)

if TYPE_CHECKING:
    from vdpacert.conformance.client import VhostClient

__all__ = [
    "STATE_VERSION", "DestinationInfo", "DeviceState", "NetState", "RestoreError", "StateError", "VringSetup",
    "VringState", "control_queue", "in_flight_count", "packed_slots_ahead", "rewound_base", "sorted_pairs", "validate",
]

STATE_VERSION: Final = 1
#: Feature words are arbitrary-width (virtio v1.4 reaches past bit 63); 128 bits bounds what a blob may claim.
FEATURE_BITS: Final = 128
#: Every VHOST_BACKEND_F_* bit Linux defines (brief §3); anything else is not a backend feature.
KNOWN_BACKEND_FEATURES: Final = sum(1 << bit for bit in (
    T.VHOST_BACKEND_F_IOTLB_MSG_V2, T.VHOST_BACKEND_F_IOTLB_BATCH, T.VHOST_BACKEND_F_IOTLB_ASID,
    T.VHOST_BACKEND_F_SUSPEND, T.VHOST_BACKEND_F_RESUME, T.VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK,
    T.VHOST_BACKEND_F_DESC_ASID, T.VHOST_BACKEND_F_IOTLB_PERSIST))
#: A running device's status: the spec's init sequence completed (§3.1.1).
RUNNING_STATUS: Final = (VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK
                         | VIRTIO_CONFIG_S_DRIVER_OK)
#: Status bits a saved device may also show: SUSPEND (v1.4). NEEDS_RESET and FAILED mean there is nothing to resume.
_STATUS_EXTRA: Final = VIRTIO_CONFIG_S_SUSPEND
#: Largest config space a state may carry (no device type comes near; bounds a hostile blob).
MAX_CONFIG_SIZE: Final = 4096
_U32_LIMIT: Final = 1 << 32
_U64_LIMIT: Final = 1 << 64
_MAC_LEN: Final = 6


class StateError(ValueError):
    """A state breaks a rule: ``field`` is its path (``vrings[2].base``), ``reason`` the rule, both in str()."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class RestoreError(Exception):
    """Applying a state failed at ``step`` (an ioctl name, or a read-back check); the destination was reset.

    ``errno`` is the failing call's errno, None when the step was a check rather than a refused ioctl.
    """

    def __init__(self, step: str, errno: int | None, message: str) -> None:
        detail = f" (errno {errno})" if errno is not None else ""
        super().__init__(f"restore failed at {step}{detail}: {message}")
        self.step = step
        self.errno = errno
        self.message = message


@dataclass(frozen=True)
class VringSetup:
    """One queue as the VMM set it up (SET_VRING_NUM / SET_VRING_ADDR / SET_VRING_ENABLE), recorded for save."""

    index: int
    num: int
    desc: int
    avail: int
    used: int
    enabled: bool


@dataclass(frozen=True)
class VringState:
    """One queue's saved state (see the module docstring for ``base``, ``used_idx`` and ``inflight``).

    ``desc`` / ``avail`` / ``used`` are the IOVAs given to SET_VRING_ADDR (packed: descriptor ring,
    driver event suppression, device event suppression). ``used_idx`` is, split, used->idx as in
    guest memory at save; packed, bits 16-31 of ``base`` (used idx | used wrap << 15).
    """

    index: int
    num: int
    desc: int
    avail: int
    used: int
    enabled: bool
    group: int
    base: int
    used_idx: int
    inflight: tuple[int, ...]


@dataclass(frozen=True)
class NetState:
    """virtio-net state no vhost ioctl sets: the MAC, active queue pairs and RX modes (§5.1.6.5)."""

    mac: bytes
    queue_pairs: int
    promisc: bool
    allmulti: bool
    alluni: bool
    nomulti: bool
    nouni: bool
    nobcast: bool


@dataclass(frozen=True)
class DeviceState:
    """A device's saved state (see the module docstring). ``vrings`` sorted by index, ``group_asid`` by group."""

    version: int
    device_id: int
    device_features: int
    features: int
    backend_features: int
    status: int
    config: bytes
    vqs_count: int
    vring_num_max: int
    group_asid: tuple[tuple[int, int], ...]
    packed: bool
    vrings: tuple[VringState, ...]
    net: NetState | None

    def vring(self, index: int) -> VringState:
        """The saved queue ``index`` (KeyError when it was not set up)."""
        for vring in self.vrings:
            if vring.index == index:
                return vring
        raise KeyError(f"queue {index} is not in the state")

    def diff(self, other: DeviceState) -> list[str]:
        """Every field that differs, as ``path: mine != theirs`` (empty when the states are equal)."""
        out: list[str] = []
        _diff("", self, other, out)
        return out


def _diff(path: str, mine: object, theirs: object, out: list[str]) -> None:
    if dataclasses.is_dataclass(mine) and not isinstance(mine, type) and type(mine) is type(theirs):
        for item in dataclasses.fields(mine):
            _diff(f"{path}.{item.name}" if path else item.name, getattr(mine, item.name),
                  getattr(theirs, item.name), out)
    elif (isinstance(mine, tuple) and isinstance(theirs, tuple) and len(mine) == len(theirs)
          and all(dataclasses.is_dataclass(x) for x in mine)):
        for position, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            _diff(f"{path}[{position}]", a, b, out)
    elif mine != theirs:
        out.append(f"{path}: {_show(mine)} != {_show(theirs)}")


def _show(value: object) -> str:
    if isinstance(value, bytes):
        return value.hex() or "(empty)"
    if isinstance(value, int) and not isinstance(value, bool) and value > 0xFFFF:
        return f"{value:#x}"
    return repr(value)


@dataclass(frozen=True)
class DestinationInfo:
    """What a destination device is, read with GET ioctls only (no owner needed, nothing changes)."""

    device_id: int
    device_features: int
    backend_features: int
    vqs_count: int
    vring_num_max: int
    config_size: int
    ngroups: int
    nas: int

    @classmethod
    def probe(cls, client: VhostClient) -> DestinationInfo:
        """GET_DEVICE_ID, GET_FEATURES, GET_BACKEND_FEATURES, GET_VQS_COUNT, GET_VRING_NUM, GET_CONFIG_SIZE,
        GET_GROUP_NUM, GET_AS_NUM: OSError (the device's errno) when one is refused."""
        return cls(device_id=client.get_device_id(), device_features=client.get_features(),
                   backend_features=client.get_backend_features(), vqs_count=client.get_vqs_count(),
                   vring_num_max=client.get_vring_num(), config_size=client.get_config_size(),
                   ngroups=client.get_group_num(), nas=client.get_as_num())


# ----- ring arithmetic -------------------------------------------------------------------------------

def _packed_position(idx: int, wrap: int, num: int) -> int:
    """A packed ring position on the 2*num cycle a (slot, wrap counter) pair runs through (counters start at 1)."""
    return idx if wrap else idx + num


def in_flight_count(vring: VringState, packed: bool) -> int:
    """How far the device's avail position is ahead of its used position.

    Split: ``(last_avail_idx - used_idx) mod 2^16``, chains. Packed: descriptor *slots* between the used
    half and the avail half of ``base`` (wrap counters included, so a full ring is ``num``, not 0); a
    chain takes one slot per descriptor, so this bounds the chains from above. A value above ``num``
    means the two positions cannot belong to one ring.
    """
    if not packed:
        return (vring.base - vring.used_idx) & U16
    if vring.num < 1:
        raise StateError(f"vrings[{vring.index}].num", "a packed ring has at least one entry")
    return packed_slots_ahead(vring.base, vring.num)


def packed_slots_ahead(base: int, num: int) -> int:
    """Slots from the used half of a packed ``base`` to its avail half, on a ring of ``num`` (>= 1) entries."""
    avail = _packed_position(base & PACKED_IDX_MASK, base >> 15 & 1, num)
    used = _packed_position(base >> 16 & PACKED_IDX_MASK, base >> 31 & 1, num)
    return (avail - used) % (2 * num)


def rewound_base(vring: VringState, packed: bool) -> int:
    """The base with its avail half moved back to the used position, so in-flight chains are taken again."""
    if not packed:
        return vring.used_idx & U16
    used_half = vring.base >> 16 & U16
    return used_half | used_half << 16


def control_queue(features: int, config: bytes, device_id: int) -> int | None:
    """The net controlq's index for these features (§5.1.2: after N pairs, N from config only with MQ), or None."""
    if device_id != VIRTIO_ID_NET or not features >> N.VIRTIO_NET_F_CTRL_VQ & 1:
        return None
    return 2 * _max_pairs(features, config)


def _max_pairs(features: int, config: bytes) -> int:
    if not features >> N.VIRTIO_NET_F_MQ & 1:
        return 1
    end = N.VIRTIO_NET_CONFIG_MAX_VIRTQUEUE_PAIRS + 2
    if len(config) < end:
        raise StateError("config", f"{len(config)} bytes hold no max_virtqueue_pairs (MQ is acked)")
    value: int = struct.unpack_from("<H", config, N.VIRTIO_NET_CONFIG_MAX_VIRTQUEUE_PAIRS)[0]
    return value


# ----- validation ------------------------------------------------------------------------------------

def _int(field: str, value: object, limit: int, low: int = 0) -> int:
    # bool is an int subclass; True is never a count or an address.
    if not isinstance(value, int) or isinstance(value, bool):
        raise StateError(field, f"must be an integer, not {type(value).__name__}")
    if not low <= value < limit:
        shown = str(value) if abs(value) < _U64_LIMIT else f"a {value.bit_length()}-bit value"  # hostile giants
        raise StateError(field, f"{shown} is outside [{low}, {limit - 1:#x}]")
    return value


def _bool(field: str, value: object) -> None:
    if not isinstance(value, bool):
        raise StateError(field, f"must be a boolean, not {type(value).__name__}")


def _bytes(field: str, value: object, max_len: int) -> bytes:
    if not isinstance(value, bytes):
        raise StateError(field, f"must be bytes, not {type(value).__name__}")
    if len(value) > max_len:
        raise StateError(field, f"{len(value)} bytes is more than {max_len}")
    return value


def _tuple(field: str, value: object) -> tuple[object, ...]:
    if not isinstance(value, tuple):
        raise StateError(field, f"must be a tuple, not {type(value).__name__}")
    return value


def validate(state: DeviceState, destination: DestinationInfo | None = None) -> None:
    """Refuse a state that no device could be in, or that ``destination`` cannot take: StateError, first rule broken.

    Types are checked too (a state may have been built by hand from untrusted values), so after this
    returns every field has the type its annotation says.
    """
    if not isinstance(state, DeviceState):
        raise StateError("state", f"must be a DeviceState, not {type(state).__name__}")
    _int("version", state.version, 1 << 16)
    if state.version != STATE_VERSION:
        raise StateError("version", f"state version {state.version} is unknown (this reader knows {STATE_VERSION})")
    _int("device_id", state.device_id, _U32_LIMIT)
    offered = _int("device_features", state.device_features, 1 << FEATURE_BITS)
    acked = _int("features", state.features, 1 << FEATURE_BITS)
    if acked & ~offered:
        raise StateError("features", f"acked bits {acked & ~offered:#x} were never offered ({offered:#x})")
    if not acked >> VIRTIO_F_VERSION_1 & 1:
        raise StateError("features", "VERSION_1 is not acked: vhost-vdpa devices are modern only")
    backend = _int("backend_features", state.backend_features, _U64_LIMIT)
    if backend & ~KNOWN_BACKEND_FEATURES:
        raise StateError("backend_features", f"bits {backend & ~KNOWN_BACKEND_FEATURES:#x} are no VHOST_BACKEND_F_*")
    status = _int("status", state.status, 1 << 8)
    if status & RUNNING_STATUS != RUNNING_STATUS or status & ~(RUNNING_STATUS | _STATUS_EXTRA):
        raise StateError("status", f"{status:#x} is not a running device (ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK, "
                                   "no NEEDS_RESET or FAILED)")
    config = _bytes("config", state.config, MAX_CONFIG_SIZE)
    vqs_count = _int("vqs_count", state.vqs_count, _U32_LIMIT, low=1)
    num_max = _int("vring_num_max", state.vring_num_max, 1 << 16, low=1)
    _bool("packed", state.packed)
    ring_packed = bool(acked >> VIRTIO_F_RING_PACKED & 1)
    if state.packed != ring_packed:
        raise StateError("packed", f"says {state.packed} while RING_PACKED is {'' if ring_packed else 'not '}acked")
    _validate_group_asid(state.group_asid)
    _validate_vrings(state, vqs_count, num_max)
    _validate_net(state, acked, config)
    if destination is not None:
        _validate_fit(state, destination)


def _validate_group_asid(pairs: object) -> None:
    previous = -1
    for position, pair in enumerate(_tuple("group_asid", pairs)):
        where = f"group_asid[{position}]"
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise StateError(where, "must be a (group, asid) pair")
        group = _int(f"{where}.group", pair[0], _U32_LIMIT)
        _int(f"{where}.asid", pair[1], _U32_LIMIT)
        if group <= previous:
            raise StateError(where, f"group {group} repeats or is out of order (pairs are sorted by group)")
        previous = group


def _validate_vrings(state: DeviceState, vqs_count: int, num_max: int) -> None:
    previous = -1
    for position, vring in enumerate(_tuple("vrings", state.vrings)):
        if not isinstance(vring, VringState):
            raise StateError(f"vrings[{position}]", f"must be a VringState, not {type(vring).__name__}")
        index = _int(f"vrings[{position}].index", vring.index, vqs_count)
        if index <= previous:
            raise StateError(f"vrings[{position}].index", f"queue {index} repeats or is out of order")
        previous = index
        _validate_vring(f"vrings[{index}]", vring, state.packed, num_max)


def _validate_vring(where: str, vring: VringState, packed: bool, num_max: int) -> None:
    num = _int(f"{where}.num", vring.num, VIRTQUEUE_MAX_SIZE + 1, low=1)
    if not packed and num & (num - 1):
        raise StateError(f"{where}.num", f"split queue size {num} is not a power of 2 (§2.7)")
    if num > num_max:
        raise StateError(f"{where}.num", f"queue size {num} is above the device's maximum {num_max}")
    aligns = ((VRING_DESC_ALIGN_SIZE, 4, 4) if packed
              else (VRING_DESC_ALIGN_SIZE, VRING_AVAIL_ALIGN_SIZE, VRING_USED_ALIGN_SIZE))
    for name, align in zip(("desc", "avail", "used"), aligns, strict=True):
        address = _int(f"{where}.{name}", getattr(vring, name), _U64_LIMIT)
        if address == 0:
            raise StateError(f"{where}.{name}", "a ring address is never 0")
        if address % align:
            raise StateError(f"{where}.{name}", f"{address:#x} is not {align}-byte aligned")
    _bool(f"{where}.enabled", vring.enabled)
    _int(f"{where}.group", vring.group, _U32_LIMIT)
    inflight = _tuple(f"{where}.inflight", vring.inflight)
    if packed:
        base = _int(f"{where}.base", vring.base, _U32_LIMIT)
        for half, shift in (("avail", 0), ("used", 16)):
            idx = base >> shift & PACKED_IDX_MASK
            if idx >= num:
                raise StateError(f"{where}.base", f"{half} index {idx} is past the ring's {num} entries")
        used_idx = _int(f"{where}.used_idx", vring.used_idx, 1 << 16)
        if used_idx != base >> 16:
            raise StateError(f"{where}.used_idx", f"{used_idx:#x} is not the used half of base {base:#x}")
    else:
        _int(f"{where}.base", vring.base, 1 << 16)  # no wrap counters in a split base
        _int(f"{where}.used_idx", vring.used_idx, 1 << 16)
    distance = in_flight_count(vring, packed)
    if distance > num:
        raise StateError(f"{where}.base", f"the device is {distance} entries ahead of the used position, "
                                          f"more than the {num} a ring holds")
    if packed:
        # Chains take one slot per descriptor: at least one chain when any slot is outstanding, at most one per slot.
        if (distance == 0) != (len(inflight) == 0) or len(inflight) > distance:
            raise StateError(f"{where}.inflight", f"{len(inflight)} in-flight ids for {distance} outstanding slots")
    elif len(inflight) != distance:
        raise StateError(f"{where}.inflight", f"{len(inflight)} in-flight heads, but last_avail_idx - used_idx "
                                              f"= {distance}")
    seen: set[int] = set()
    for position, ident in enumerate(inflight):
        value = _int(f"{where}.inflight[{position}]", ident, num)
        if value in seen:
            raise StateError(f"{where}.inflight[{position}]", f"id {value} is in flight twice")
        seen.add(value)


def _validate_net(state: DeviceState, acked: int, config: bytes) -> None:
    net = state.net
    if (state.device_id == VIRTIO_ID_NET) != (net is not None):
        raise StateError("net", "a net device carries net state and no other device does")
    if net is None:
        return
    if not isinstance(net, NetState):
        raise StateError("net", f"must be a NetState, not {type(net).__name__}")
    mac = _bytes("net.mac", net.mac, _MAC_LEN)
    if len(mac) != _MAC_LEN:
        raise StateError("net.mac", f"a MAC has {_MAC_LEN} bytes, not {len(mac)}")
    pairs = _int("net.queue_pairs", net.queue_pairs, N.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX + 1, low=1)
    limit = _max_pairs(acked, config)
    if pairs > limit:
        raise StateError("net.queue_pairs", f"{pairs} pairs, but the device has {limit}"
                                            f"{'' if acked >> N.VIRTIO_NET_F_MQ & 1 else ' (MQ is not acked)'}")
    for name in ("promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast"):
        _bool(f"net.{name}", getattr(net, name))
    cvq = control_queue(acked, config, state.device_id)
    if cvq is not None and all(vring.index != cvq for vring in state.vrings):
        # The restore replays the saved MAC / MQ / RX mode through it (§5.1.6.5).
        raise StateError(f"vrings[{cvq}]", "CTRL_VQ is acked: the control queue must be saved")


def _validate_fit(state: DeviceState, destination: DestinationInfo) -> None:
    if state.device_id != destination.device_id:
        raise StateError("device_id", f"device {state.device_id} cannot be restored on device {destination.device_id}")
    missing = state.features & ~destination.device_features
    if missing:
        raise StateError("features", f"the destination does not offer acked features {missing:#x}")
    missing = state.backend_features & ~destination.backend_features
    if missing:
        raise StateError("backend_features", f"the destination does not offer backend features {missing:#x}")
    if state.vqs_count != destination.vqs_count:
        raise StateError("vqs_count", f"{state.vqs_count} queues saved, the destination has {destination.vqs_count}")
    if len(state.config) != destination.config_size:
        raise StateError("config", f"{len(state.config)} bytes saved, the destination's config space has "
                                   f"{destination.config_size}")
    for vring in state.vrings:
        if vring.num > destination.vring_num_max:
            raise StateError(f"vrings[{vring.index}].num", f"queue size {vring.num} is above the destination's "
                                                           f"maximum {destination.vring_num_max}")
        if vring.group >= destination.ngroups:
            raise StateError(f"vrings[{vring.index}].group", f"group {vring.group} does not exist on the destination "
                                                             f"({destination.ngroups} groups)")
    for position, (group, asid) in enumerate(state.group_asid):
        if group >= destination.ngroups:
            raise StateError(f"group_asid[{position}].group", f"group {group} does not exist on the destination "
                                                              f"({destination.ngroups} groups)")
        if asid >= destination.nas:
            raise StateError(f"group_asid[{position}].asid", f"address space {asid} does not exist on the "
                                                             f"destination ({destination.nas})")


def sorted_pairs(pairs: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """group -> asid pairs in the order a state keeps them."""
    return tuple(sorted((int(group), int(asid)) for group, asid in pairs))
