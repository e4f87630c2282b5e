"""Take a device's :class:`~vdpacert.migration.state.DeviceState` through the user interface only.

Everything comes from vhost-vdpa GET ioctls on the source's client, from what the VMM recorded of
its own SET calls (features it acked, ring addresses, group ASIDs: vhost has no getter for them),
and from guest memory (used->idx and the ring slots of in-flight chains). Nothing here changes the
device, so a save can be retried, and a save of a device that is still running is merely stale.

The caller suspends the source first when it can (VHOST_VDPA_SUSPEND): only then is
GET_VRING_BASE final. The state is validated before it is returned, so a device answering
nonsense (a base further ahead than its ring holds, a status that is not running, a chain running
past the avail position) raises :class:`~vdpacert.migration.state.StateError` naming the field.

In-flight chains (taken by the device, not used) are named from the driver's side of the ring,
which the device does not write: split, the heads in avail ring slots ``[used_idx, last_avail_idx)``;
packed, the Buffer IDs of the descriptor lists from the used position to the avail position (the
device overwrites a list with its used descriptor only when it uses it). Both assume the device
uses buffers in the order it took them, as :func:`~vdpacert.migration.state.rewound_base` does.
A source that knows the exact list (a shadow virtqueue: optional ``vring_inflight(index)``
returning the ids, or None for a queue it does not shadow) is asked first.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Final, Protocol

from vdpacert.conformance.client import VhostClient
from vdpacert.migration.state import (
    STATE_VERSION,
    DeviceState,
    NetState,
    StateError,
    VringSetup,
    VringState,
    packed_slots_ahead,
    sorted_pairs,
    validate,
)
from vdpacert.model.ring_index import decode_packed_base
from vdpacert.model.vring_packed import advance, is_available
from vdpacert.uapi.vhost_types import VHOST_F_LOG_ALL
from vdpacert.uapi.virtio_config import VIRTIO_F_RING_PACKED
from vdpacert.uapi.virtio_ring import VRING_DESC_F_NEXT, VRING_DESC_SIZE

__all__ = ["ReadGuest", "SaveSource", "packed_inflight_ids", "save_device_state", "split_inflight_heads"]

_U16: Final = struct.Struct("<H")
_PACKED_DESC: Final = struct.Struct("<QIHH")  # struct vring_packed_desc: addr, len, id, flags
_AVAIL_RING: Final = 4  # struct vring_avail: flags, idx, then ring[]
_USED_IDX: Final = 2  # struct vring_used: flags, then idx

ReadGuest = Callable[[int, int], bytes]


class SaveSource(Protocol):
    """What the VMM knows of the source device (implemented by migration/vmm.py).

    ``client`` is the source's vhost client, already suspended by the caller when it could be;
    ``features`` / ``backend_features`` / ``group_asid`` / ``vrings`` are what the VMM set (one
    :class:`VringSetup` per queue it set up). Read-only properties, so plain attributes fit too.
    """

    @property
    def client(self) -> VhostClient: ...
    @property
    def features(self) -> int: ...
    @property
    def backend_features(self) -> int: ...
    @property
    def group_asid(self) -> Mapping[int, int]: ...
    @property
    def vrings(self) -> Mapping[int, VringSetup]: ...

    def vring_base(self, index: int) -> int:
        """Direct mode: ``client.get_vring_base(index)``; shadow mode: the shadow queue's guest-side base."""
        ...

    def read_guest(self, iova: int, length: int) -> bytes:
        """Guest memory by IOVA (used->idx, avail ring slots, packed descriptors)."""
        ...

    def net_state(self) -> NetState | None:
        """The net device's MAC, pairs and RX modes as the VMM tracked them (None for other devices)."""
        ...


def split_inflight_heads(read_guest: ReadGuest, setup: VringSetup, used_idx: int,
                         last_avail_idx: int) -> tuple[int, ...]:
    """Heads in avail ring slots ``[used_idx, last_avail_idx)``, oldest first (nothing when the distance
    is more than the ring holds: validation refuses that state, and reading it would be unbounded)."""
    distance = (last_avail_idx - used_idx) & 0xFFFF
    if not 0 < distance <= setup.num:
        return ()
    return tuple(_U16.unpack(read_guest(setup.avail + _AVAIL_RING + 2 * ((used_idx + k) % setup.num), 2))[0]
                 for k in range(distance))


def packed_inflight_ids(read_guest: ReadGuest, setup: VringSetup, base: int) -> tuple[int, ...]:
    """Buffer IDs of the descriptor lists between the used and avail halves of ``base``, oldest first.

    Each list is walked by its NEXT flags and named by its last descriptor's id (§2.8.6); every slot
    must still hold an available descriptor of its pass of the ring, and no list may run past the avail
    position, else StateError: the device's base does not describe this ring.
    """
    where = f"vrings[{setup.index}].inflight"
    if not 1 <= setup.num or not 0 <= base < 1 << 32:
        return ()  # validation refuses the state; there is no ring to read
    position = decode_packed_base(base)
    remaining = packed_slots_ahead(base, setup.num)
    if remaining > setup.num or max(position.last_avail_idx, position.last_used_idx) >= setup.num:
        return ()
    slot, wrap = position.last_used_idx, position.last_used_counter
    ids: list[int] = []
    while remaining:
        _, _, buffer_id, flags = _PACKED_DESC.unpack(read_guest(setup.desc + VRING_DESC_SIZE * slot, VRING_DESC_SIZE))
        if not is_available(flags, wrap):
            raise StateError(where, f"slot {slot} (wrap {wrap}) holds no available descriptor (flags {flags:#x}) "
                                    "though it lies before the device's avail position")
        slot, wrap = advance(slot, wrap, 1, setup.num)
        remaining -= 1
        if not flags & VRING_DESC_F_NEXT:
            ids.append(buffer_id)
        elif not remaining:
            raise StateError(where, "a descriptor list runs past the device's avail position")
    return tuple(ids)


def _exact_inflight(source: SaveSource, index: int) -> tuple[int, ...] | None:
    """The source's own in-flight list when it keeps one (a shadow virtqueue knows, in any order); else None.

    Optional on purpose: SaveSource stays minimal, and a VMM without shadows has nothing better than the rings.
    """
    known = getattr(source, "vring_inflight", None)
    if not callable(known):
        return None
    found = known(index)
    return None if found is None else tuple(found)


def _vring_state(source: SaveSource, setup: VringSetup, packed: bool) -> VringState:
    client = source.client
    group = client.get_vring_group(setup.index)
    base = source.vring_base(setup.index)
    exact = _exact_inflight(source, setup.index)
    if packed:
        used_idx = base >> 16 & 0xFFFF
        inflight = exact if exact is not None else packed_inflight_ids(source.read_guest, setup, base)
    else:
        used_idx = _U16.unpack(source.read_guest(setup.used + _USED_IDX, 2))[0]
        inflight = exact if exact is not None else split_inflight_heads(source.read_guest, setup, used_idx, base)
    return VringState(index=setup.index, num=setup.num, desc=setup.desc, avail=setup.avail, used=setup.used,
                      enabled=setup.enabled, group=group, base=base, used_idx=used_idx, inflight=inflight)


def save_device_state(source: SaveSource) -> DeviceState:
    """Read the source's state (see the module docstring); StateError when what it answers is inconsistent.

    VHOST_F_LOG_ALL is left out of ``features``: dirty logging is the migration's, not the guest's, and a
    destination starts without it.
    """
    client = source.client
    features = source.features & ~(1 << VHOST_F_LOG_ALL)
    packed = bool(features >> VIRTIO_F_RING_PACKED & 1)
    config_size = client.get_config_size()
    # A zero-length GET_CONFIG is EINVAL on vhost-vdpa: an empty config space is read as no bytes.
    config = client.get_config(0, config_size) if config_size else b""
    for index, setup in source.vrings.items():
        if setup.index != index:
            raise StateError(f"vrings[{index}].index", f"the VMM recorded queue {setup.index} under index {index}")
    vrings = tuple(_vring_state(source, setup, packed) for _, setup in sorted(source.vrings.items()))
    state = DeviceState(
        version=STATE_VERSION, device_id=client.get_device_id(), device_features=client.get_features(),
        features=features, backend_features=source.backend_features, status=client.get_status(), config=config,
        vqs_count=client.get_vqs_count(), vring_num_max=client.get_vring_num(),
        group_asid=sorted_pairs(source.group_asid.items()), packed=packed, vrings=vrings, net=source.net_state())
    validate(state)
    return state
