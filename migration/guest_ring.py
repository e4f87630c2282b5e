"""The guest's side of a shadow virtqueue: its ring, read and written as a device would.

A :class:`~vdpacert.migration.svq.ShadowVirtqueue` is the device toward the guest's ring. This
module is that half, one class per layout behind the :class:`GuestRing` protocol: find the next
chain the guest made available (parsed by the model's walker, so every class of bad input is
refused there), take it, put a used entry back and publish it, ask for kicks, and say where the
ring stands as a vhost vring base. :class:`GuestIo` is the one path to guest memory: every byte
written through it is marked dirty, so the shadow virtqueue's own writes are never missed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Protocol

from vdpacert.conformance.driver.memory import GuestLayout
from vdpacert.migration.shadow_ring import LayoutMemory, LayoutTranslator
from vdpacert.model.chains import BadInput, Chain, ChainFault, Layout, SplitTable, WalkContext, walk_chain
from vdpacert.model.guest_memory import AccessFault
from vdpacert.model.notify import Decision, Direction, RingPosition, packed_notification, split_notification
from vdpacert.model.ring_index import PackedVqState, decode_packed_base, encode_packed_base, split_inflight, u16
from vdpacert.model.vring_packed import PackedRing, PackedRingTable, advance, is_available, used_flags
from vdpacert.model.vring_split import SplitRing
from vdpacert.uapi.virtio_ring import (
    VIRTIO_RING_F_EVENT_IDX,
    VRING_DESC_F_WRITE,
    VRING_DESC_SIZE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
)

__all__ = ["GuestIo", "GuestRing", "Mark", "PackedGuestRing", "RingRefused", "SplitGuestRing", "notify_wanted"]

_USED_ELEM = struct.Struct("<II")  # struct vring_used_elem: id, len
_PACKED_USED = struct.Struct("<IH")  # the len and id of a used packed descriptor (its flags go last)


class RingRefused(Exception):
    """The guest ring or the migrated state cannot be used as given (the shadow virtqueue raises SvqError)."""

    def __init__(self, reason: str, bad: BadInput | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.bad = bad


Mark = Callable[[int, int], None]


class GuestIo:
    """The guest ring's memory as the device side sees it: IOVA reads, and writes that are marked dirty."""

    def __init__(self, layout: GuestLayout, mark: Mark) -> None:
        self.memory = LayoutMemory(layout)
        self.translator = LayoutTranslator(layout)
        self._mark = mark

    def require(self, iova: int, size: int, what: str) -> None:
        """Refuse a ring area outside guest memory once, so later field accesses cannot fault."""
        where = self.translator.translate(iova, size, True)
        if isinstance(where, AccessFault):
            raise RingRefused(f"guest {what}: {where}", BadInput.ADDRESS_UNMAPPED)

    def read(self, iova: int, size: int) -> int:
        return int.from_bytes(self.memory.read(iova, size), "little")

    def write(self, iova: int, data: bytes) -> None:
        self.memory.write(iova, data)
        self._mark(iova, len(data))

    def write_u16(self, iova: int, value: int) -> None:
        self.write(iova, value.to_bytes(2, "little"))

    def update_u16(self, iova: int, value: int) -> bool:
        """Write (and mark) only a value that differs: rewriting a field must not dirty a page for nothing."""
        if self.read(iova, 2) == value:
            return False
        self.write_u16(iova, value)
        return True


def notify_wanted(decision: Decision) -> bool:
    # MUST and MAY both notify: a spurious interrupt costs the guest a look, a missing one stalls it.
    return decision is not Decision.SHOULD_NOT_NOTIFY


class GuestRing(Protocol):
    """The device's half of the guest's ring, whatever its layout."""

    def start(self) -> None: ...
    def peek(self) -> Chain | ChainFault | None: ...
    def take(self, chain: Chain) -> None: ...
    def arm_kick(self) -> bool: ...
    def locate(self, ids: Sequence[int]) -> list[Chain]: ...
    def put_used(self, chain: Chain, written: int) -> None: ...
    def publish_used(self) -> bool: ...
    def base(self) -> int: ...
    def used_index(self) -> int: ...


class SplitGuestRing:
    """The device side of a split guest ring: ``last_avail`` (the vring base) and the used idx written."""

    def __init__(self, io: GuestIo, num: int, desc: int, avail: int, used: int, features: int,
                 base: int) -> None:
        self.io = io
        self.ring = SplitRing(num, desc, avail, used)
        io.require(desc, self.ring.desc_size, "descriptor table")
        io.require(avail, self.ring.avail_size, "available ring")
        io.require(used, self.ring.used_size, "used ring")
        if not 0 <= base <= 0xFFFF:
            raise RingRefused(f"split vring base {base:#x} is not a 16-bit index")
        self.event_idx = bool(features >> VIRTIO_RING_F_EVENT_IDX & 1)
        self.last_avail = base
        # As vhost does when a ring is started: the used idx is whatever the ring holds.
        self.used_idx = io.read(self.ring.used_idx, 2)
        self.signalled = self.used_idx
        self.table = SplitTable(io.memory, io.translator, desc, num)
        self.ctx = WalkContext(Layout.SPLIT, num, features, io.memory, io.translator)

    def start(self) -> None:
        # A migrated ring may carry the previous device's NO_NOTIFY (or junk under EVENT_IDX): ask for kicks.
        self.io.update_u16(self.ring.used_flags, 0)
        self.arm_kick()

    def peek(self) -> Chain | ChainFault | None:
        avail_idx = self.io.read(self.ring.avail_idx, 2)
        pending = split_inflight(avail_idx, self.last_avail)
        if pending > self.ring.num:
            return ChainFault(BadInput.AVAIL_IDX_AHEAD,
                              f"avail idx {avail_idx} is {pending} entries past last_avail_idx {self.last_avail}")
        if not pending:
            return None
        head = self.io.read(self.ring.avail_entry(self.last_avail), 2)
        if head >= self.ring.num:
            return ChainFault(BadInput.INDEX_OUT_OF_RANGE, f"available ring names head {head} of {self.ring.num}")
        return walk_chain(self.table, head, self.ctx)

    def take(self, chain: Chain) -> None:
        self.last_avail = u16(self.last_avail + 1)

    def arm_kick(self) -> bool:
        """With EVENT_IDX: a kick for the first entry not taken yet. True if written (look at the ring again:
        the guest may have published before it could see the new value)."""
        return self.event_idx and self.io.update_u16(self.ring.avail_event, self.last_avail)

    def locate(self, ids: Sequence[int]) -> list[Chain]:
        """The chains of migrated in-flight heads: the descriptor table still holds them (the guest frees
        descriptors only when they are used)."""
        if len(set(ids)) != len(ids):
            raise RingRefused(f"in-flight heads {list(ids)} repeat a head")
        outstanding = split_inflight(self.last_avail, self.used_idx)
        if outstanding != len(ids):
            raise RingRefused(f"{len(ids)} in-flight heads given, but last_avail_idx {self.last_avail} and used idx "
                           f"{self.used_idx} leave {outstanding} chains in flight")
        chains = []
        for head in ids:
            if not 0 <= head < self.ring.num:
                raise RingRefused(f"in-flight head {head} is outside the descriptor table of {self.ring.num}",
                               BadInput.INDEX_OUT_OF_RANGE)
            chain = walk_chain(self.table, head, self.ctx)
            if isinstance(chain, ChainFault):
                raise RingRefused(f"in-flight head {head}: {chain}", chain.bad)
            chains.append(chain)
        return chains

    def put_used(self, chain: Chain, written: int) -> None:
        self.io.write(self.ring.used_entry(self.used_idx), _USED_ELEM.pack(chain.id, written))
        self.used_idx = u16(self.used_idx + 1)

    def publish_used(self) -> bool:
        self.io.write_u16(self.ring.used_idx, self.used_idx)
        rule = split_notification(Direction.USED, event_idx=self.event_idx,
                                  flags=self.io.read(self.ring.avail_flags, 2),
                                  event=self.io.read(self.ring.used_event, 2), old_idx=self.signalled,
                                  new_idx=self.used_idx)
        self.signalled = self.used_idx
        return notify_wanted(rule.decision)

    def base(self) -> int:
        return self.last_avail

    def used_index(self) -> int:
        return self.used_idx


class PackedGuestRing:
    """The device side of a packed guest ring: the avail and used positions of ``vdpa_vq_state_packed``."""

    def __init__(self, io: GuestIo, num: int, desc: int, driver: int, device: int, features: int,
                 base: int) -> None:
        self.io = io
        self.ring = PackedRing(num, desc, driver, device)
        io.require(desc, VRING_DESC_SIZE * num, "descriptor ring")
        io.require(driver, 4, "driver event suppression")
        io.require(device, 4, "device event suppression")
        try:
            state = decode_packed_base(base)
        except ValueError as error:
            raise RingRefused(f"packed vring base {base:#x}: {error}") from error
        if state.last_avail_idx >= num or state.last_used_idx >= num:
            raise RingRefused(f"packed vring base {base:#x} names a slot past the ring of {num}")
        self.event_idx = bool(features >> VIRTIO_RING_F_EVENT_IDX & 1)
        self.avail = RingPosition(state.last_avail_idx, state.last_avail_counter)
        self.used = RingPosition(state.last_used_idx, state.last_used_counter)
        self.signalled = self.used
        self.ctx = WalkContext(Layout.PACKED, num, features, io.memory, io.translator)

    def start(self) -> None:
        # ENABLE: a kick for every list, whatever the previous device had asked for.
        self.io.update_u16(self.ring.device + 2, VRING_PACKED_EVENT_FLAG_ENABLE)

    def _walk(self, at: RingPosition) -> Chain | ChainFault:
        table = PackedRingTable(self.io.memory, self.io.translator, self.ring, at.idx, at.wrap)
        return walk_chain(table, at.idx, self.ctx)

    def _advance(self, at: RingPosition, steps: int) -> RingPosition:
        return RingPosition(*advance(at.idx, at.wrap, steps, self.ring.num))

    def peek(self) -> Chain | ChainFault | None:
        flags = self.io.read(self.ring.slot(self.avail.idx) + 14, 2)
        if not is_available(flags, self.avail.wrap):
            return None
        return self._walk(self.avail)

    def take(self, chain: Chain) -> None:
        self.avail = self._advance(self.avail, chain.descriptors)

    def arm_kick(self) -> bool:
        return False  # ENABLE already asks for every kick

    def locate(self, ids: Sequence[int]) -> list[Chain]:
        """The lists of migrated in-flight Buffer IDs, read from the guest ring between the used and the avail
        position, where the lists taken and not used are, oldest first.

        That holds when every list taken before them was used, which is what the used position says
        when nothing was used out of order. A list used ahead of an older one overwrites the older
        one's first slots with its used descriptor, and the older list is then gone from the ring:
        refused, rather than resubmitting whatever the slot holds now.
        """
        num = self.ring.num
        left = (self.avail.linear(num) - self.used.linear(num)) % (2 * num)
        at, chains = self.used, []
        for buffer_id in ids:
            chain = self._walk(at) if left else None
            if isinstance(chain, ChainFault):
                raise RingRefused(f"in-flight Buffer ID {buffer_id} at slot {at.idx}: {chain}", chain.bad)
            if chain is None or chain.id != buffer_id or chain.descriptors > left:
                found = "nothing" if chain is None else f"Buffer ID {chain.id}"
                raise RingRefused(f"in-flight Buffer ID {buffer_id} is not the next list after the used position "
                               f"(slot {at.idx} holds {found}): lists used out of order overwrote it")
            chains.append(chain)
            left -= chain.descriptors
            at = self._advance(at, chain.descriptors)
        if left:
            raise RingRefused(f"{left} ring slots between the used and the avail position belong to no in-flight list")
        return chains

    def put_used(self, chain: Chain, written: int) -> None:
        slot = self.ring.slot(self.used.idx)
        self.io.write(slot + 8, _PACKED_USED.pack(written, chain.id))
        # The flags last: they are what makes the descriptor used for the guest (§2.8.6).
        self.io.write_u16(slot + 14, used_flags(self.used.wrap) | (VRING_DESC_F_WRITE if written else 0))
        self.used = self._advance(self.used, chain.descriptors)

    def publish_used(self) -> bool:
        rule = packed_notification(Direction.USED, event_idx=self.event_idx,
                                   event_flags=self.io.read(self.ring.driver + 2, 2),
                                   off_wrap=self.io.read(self.ring.driver, 2), num=self.ring.num,
                                   old=self.signalled, new=self.used)
        self.signalled = self.used
        return notify_wanted(rule.decision)

    def base(self) -> int:
        return encode_packed_base(PackedVqState(self.avail.idx, self.avail.wrap, self.used.idx, self.used.wrap))

    def used_index(self) -> int:
        return self.used.idx | self.used.wrap << 15
