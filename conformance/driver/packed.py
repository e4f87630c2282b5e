"""The driver half of a packed virtqueue (virtio v1.3 §2.8), in guest memory, addressed by IOVA.

One descriptor ring both sides write: the driver makes a descriptor available by setting AVAIL to
its wrap counter and USED to the inverse; the device marks it used by setting both to *its* wrap
counter (§2.8.1). Both counters start at 1 and flip whenever the index passes the end of the ring.
The driver writes a chain's descriptors first and its head's flags last (§2.8.21), so the device
never sees half a chain.

Reaping validates every used descriptor: wrap bits that are neither "still available" nor "used
in this lap", a Buffer ID that is not outstanding, a length above the chain's writable bytes, and
(under IN_ORDER) out-of-order use are :class:`~vdpacert.conformance.driver.DeviceViolation` s.
Device-writable windows: the device event suppression area, and each descriptor slot from the
moment the driver makes it available until the driver reclaims it.

The ring may start at any slot with either wrap counter (``start``, ``wrap``), to test the
end-of-ring wrap; descriptors outside the live range are initialised the way a ring that has
really been there would look (used in this lap before ``start``, used in the previous lap after).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence

from vdpacert.conformance.driver import DeviceViolation
from vdpacert.conformance.driver.memory import GuestLayout
from vdpacert.conformance.driver.split import Chain, RingFull, Used, place_buffers, release_chain
from vdpacert.model.notify import Direction, NotifyRule, RingPosition, packed_event_passed, packed_notification
from vdpacert.model.ring_index import PackedVqState, encode_packed_base
from vdpacert.uapi.virtio_ring import (
    VIRTQUEUE_MAX_SIZE,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_DESC_F_USED,
    VRING_PACKED_EVENT_F_WRAP_CTR,
    VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
)

DESC = struct.Struct("<QIHH")  # struct vring_packed_desc: addr, len, id, flags
EVENT = struct.Struct("<HH")  # struct vring_packed_desc_event: off_wrap, flags
AVAIL, USED = 1 << VRING_PACKED_DESC_F_AVAIL, 1 << VRING_PACKED_DESC_F_USED
NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT

USED_DESCRIPTOR = "ring.packed.device.used_descriptor"
USED_LENGTH = "ring.packed.device.used_length"
IN_ORDER = "ring.packed.device.in_order"
BAD_CHAIN_NOT_USED = "ring.device.bad_chain_not_used"


def avail_flags(wrap: int) -> int:
    """AVAIL/USED bits that make a descriptor available under driver wrap counter ``wrap``."""
    return AVAIL if wrap else USED


def used_flags(wrap: int) -> int:
    """AVAIL/USED bits of a descriptor used under wrap counter ``wrap``."""
    return AVAIL | USED if wrap else 0


class PackedRing:
    """The driver half of one packed virtqueue of ``num`` entries (1..32768, any number)."""

    def __init__(self, layout: GuestLayout, num: int, *, start: int = 0, wrap: int = 1, event_idx: bool = False,
                 in_order: bool = False, name: str = "vq") -> None:
        if not 1 <= num <= VIRTQUEUE_MAX_SIZE:
            raise ValueError(f"a packed queue size is in 1..32768, got {num}")
        if not 0 <= start < num or wrap not in (0, 1):
            raise ValueError(f"start slot {start} / wrap {wrap} do not fit a ring of {num}")
        self.layout, self.num, self.name = layout, num, name
        self.event_idx, self.in_order = event_idx, in_order
        self.desc = layout.alloc(16 * num, 16, what=f"{name} descriptor ring", fill=0)
        self.driver_event = layout.alloc(4, 4, what=f"{name} driver event suppression", fill=0)
        self.device_event = layout.alloc(4, 4, what=f"{name} device event suppression", fill=0)
        self._windows = [layout.allow(self.device_event, 4, f"{name} device event suppression")]
        self._slot_windows: list[int | None] = [None] * num
        for slot in range(num):
            self.layout.write_u16(self.desc + 16 * slot + 14, used_flags(wrap if slot < start else 1 - wrap))
        self.start, self.start_wrap = start, wrap
        self.next_avail, self.avail_wrap = start, wrap
        self.next_used, self.used_wrap = start, wrap
        self.kicked_at = self.published = RingPosition(start, wrap)
        self.free_ids: deque[int] = deque(range(num))
        self.outstanding: dict[int, Chain] = {}
        self.order: deque[int] = deque()  # buffer ids in the order they were made available
        self.pending: list[tuple[int, int, int]] = []  # (buffer id, head slot, head flags) not yet published
        self.slots_in_use = 0

    # ----- addresses and state ----------------------------------------------------------------------

    @property
    def addresses(self) -> tuple[int, int, int]:
        """(descriptor ring, driver event, device event) IOVAs, in VHOST_SET_VRING_ADDR's desc/avail/used order."""
        return (self.layout.iova(self.desc), self.layout.iova(self.driver_event),
                self.layout.iova(self.device_event))

    @property
    def base(self) -> int:
        """The VHOST_SET_VRING_BASE value for this ring as laid out (avail and used halves both at start)."""
        return encode_packed_base(PackedVqState(self.start, self.start_wrap, self.start, self.start_wrap))

    @property
    def in_flight(self) -> int:
        return len(self.outstanding)

    def read_desc(self, slot: int) -> tuple[int, int, int, int]:
        """(addr, len, id, flags) of ring slot ``slot``."""
        addr, length, buffer_id, flags = DESC.unpack(self.layout.read(self.desc + 16 * slot, 16))
        return int(addr), int(length), int(buffer_id), int(flags)

    def read_device_event(self) -> tuple[int, int]:
        """The device event suppression structure (off_wrap, flags)."""
        off_wrap, flags = EVENT.unpack(self.layout.read(self.device_event, 4))
        return int(off_wrap), int(flags)

    def read_driver_event(self) -> tuple[int, int]:
        """The driver event suppression structure (off_wrap, flags), as this driver last wrote it."""
        off_wrap, flags = EVENT.unpack(self.layout.read(self.driver_event, 4))
        return int(off_wrap), int(flags)

    def device_used_position(self) -> RingPosition:
        """Where the device's used position is now, read from the ring without reaping anything.

        Walks forward from the driver's next used slot over descriptors used in the current lap, each
        standing for its whole list (§2.8.7); stops at the first one that is not a used, outstanding,
        published buffer (reaping is what judges those). Needed because a packed ring has no used index.
        """
        pos, wrap = self.next_used, self.used_wrap
        seen: set[int] = set()
        walked = 0
        while walked < self.num:
            flags = self.layout.read_u16(self.desc + 16 * pos + 14)
            if flags & (AVAIL | USED) != used_flags(wrap):
                break
            buffer_id = self.layout.read_u16(self.desc + 16 * pos + 12)
            chain = self.outstanding.get(buffer_id)
            if chain is None or buffer_id in seen or buffer_id not in self.order or not chain.slots:
                break
            seen.add(buffer_id)
            walked += len(chain.slots)
            pos += len(chain.slots)
            if pos >= self.num:
                pos, wrap = pos - self.num, wrap ^ 1
        return RingPosition(pos, wrap)

    # ----- raw writers (hostile rings) ---------------------------------------------------------------

    def write_desc(self, slot: int, addr: int, length: int, buffer_id: int, flags: int) -> None:
        self.layout.write(self.desc + 16 * slot, DESC.pack(addr, length, buffer_id, flags))

    def write_indirect(self, table: int, index: int, addr: int, length: int, flags: int) -> None:
        self.layout.write(table + 16 * index, DESC.pack(addr, length, 0, flags))

    def set_driver_event(self, flags: int, off_wrap: int = 0) -> None:
        self.layout.write(self.driver_event, EVENT.pack(off_wrap, flags))

    # ----- notification suppression (§2.8.10) --------------------------------------------------------

    def set_interrupts(self, enabled: bool) -> None:
        self.set_driver_event(VRING_PACKED_EVENT_FLAG_ENABLE if enabled else VRING_PACKED_EVENT_FLAG_DISABLE)

    def set_used_event(self, slot: int, wrap: int) -> None:
        """With EVENT_IDX: notify me once the device has used the descriptor at (``slot``, ``wrap``)."""
        self.set_driver_event(VRING_PACKED_EVENT_FLAG_DESC, slot | wrap << VRING_PACKED_EVENT_F_WRAP_CTR)

    def avail_notification(self) -> NotifyRule:
        """The model's row for notifying the device now: the lists published since the last decision, read
        against the device event suppression structure. Decides nothing."""
        off_wrap, flags = self.read_device_event()
        return packed_notification(Direction.AVAIL, event_idx=self.event_idx, event_flags=flags, off_wrap=off_wrap,
                                   num=self.num, old=self.kicked_at, new=self.published)

    def notification_decided(self) -> None:
        """The driver decided (to notify or not) for everything published so far: the next window starts here."""
        self.kicked_at = self.published

    def prepare_kick(self) -> bool:
        """Does the device want a notification for what was published since the last call?"""
        old, new = self.kicked_at, RingPosition(self.next_avail, self.avail_wrap)
        self.kicked_at = new
        off_wrap, flags = self.read_device_event()
        if flags & 0x3 == VRING_PACKED_EVENT_FLAG_DISABLE:
            return False
        if flags & 0x3 == VRING_PACKED_EVENT_FLAG_DESC and self.event_idx:
            return packed_event_passed(self.num, off_wrap, old, new)
        return old != new

    # ----- the honest driver -------------------------------------------------------------------------

    def _open_slot(self, slot: int) -> None:
        self._slot_windows[slot] = self.layout.allow(self.desc + 16 * slot, 16, f"{self.name} descriptor slot {slot}")

    def _close_slot(self, slot: int) -> None:
        handle = self._slot_windows[slot]
        if handle is not None:
            self.layout.forbid(handle)
            self._slot_windows[slot] = None

    def _write_list(self, chain: Chain, descs: Sequence[tuple[int, int, int]]) -> None:
        """Write a descriptor list at the next slots; the head's flags are held back until publish."""
        if len(descs) > self.num - self.slots_in_use:
            raise RingFull(f"{self.name}: {len(descs)} slots wanted, {self.num - self.slots_in_use} free")
        head_slot, head_flags = self.next_avail, 0
        for i, (addr, length, flags) in enumerate(descs):
            slot = self.next_avail
            flags |= (NEXT if i + 1 < len(descs) else 0) | avail_flags(self.avail_wrap)
            if i == 0:
                self.layout.write(self.desc + 16 * slot, DESC.pack(addr, length, chain.id, 0)[:14])
                head_flags = flags
            else:
                self.write_desc(slot, addr, length, chain.id, flags)
            self._open_slot(slot)
            chain.slots.append(slot)
            self.next_avail += 1
            if self.next_avail == self.num:
                self.next_avail, self.avail_wrap = 0, self.avail_wrap ^ 1
        self.slots_in_use += len(descs)
        self.outstanding[chain.id] = chain
        self.pending.append((chain.id, head_slot, head_flags))

    def _take_id(self, buffer_id: int | None) -> int:
        if buffer_id is not None:
            if buffer_id in self.free_ids:
                self.free_ids.remove(buffer_id)
            return buffer_id
        if not self.free_ids:
            raise RingFull(f"{self.name}: no free buffer id")
        return self.free_ids.popleft()

    def add(self, readable: Sequence[bytes] = (), writable: Sequence[int] = (), *, indirect: bool = False,
            publish: bool = True, buffer_id: int | None = None) -> Chain:
        """Place a chain (readable buffers, then writable lengths), direct or through an indirect table."""
        count = 1 if indirect else len(readable) + len(writable)
        if count == 0:
            raise ValueError("a chain has at least one buffer")
        if count > self.num - self.slots_in_use:
            raise RingFull(f"{self.name}: {count} slots wanted, {self.num - self.slots_in_use} free")
        chain = Chain(self._take_id(buffer_id))
        descs = place_buffers(self.layout, chain, readable, writable, self.name)
        if indirect:
            table = self.layout.alloc(16 * len(descs), 16, what=f"{self.name} indirect table")
            chain.allocations.append(table)
            for i, (addr, length, flags) in enumerate(descs):
                self.write_indirect(table, i, addr, length, flags)  # §2.8.19: no NEXT in an indirect table
            descs = [(self.layout.iova(table), 16 * len(descs), INDIRECT)]
        self._write_list(chain, descs)
        if publish:
            self.publish()
        return chain

    def publish(self) -> None:
        """Make every pending list available: head flags written last, the first list's head after all others."""
        for _, slot, flags in reversed(self.pending):
            self.layout.write_u16(self.desc + 16 * slot + 14, flags)
        self.order.extend(buffer_id for buffer_id, _, _ in self.pending)
        self.pending.clear()
        self.published = RingPosition(self.next_avail, self.avail_wrap)

    def reap(self) -> list[Used]:
        """Every newly used descriptor, in ring order, validated; their slots, ids and buffers are freed."""
        out: list[Used] = []
        while True:
            # flags first: the device writes them last (§2.8.6), so id and len read after them are settled
            flags = self.layout.read_u16(self.desc + 16 * self.next_used + 14)
            _, length, buffer_id, _ = self.read_desc(self.next_used)
            state = flags & (AVAIL | USED)
            where = f"{self.name}: slot {self.next_used} (used wrap counter {self.used_wrap})"
            if not self.order:  # nothing published is outstanding: the slot must still look unused
                if state == used_flags(self.used_wrap) and self._slot_windows[self.next_used] is None:
                    raise DeviceViolation(USED_DESCRIPTOR, f"{where}: a used descriptor (id {buffer_id}, flags "
                                                           f"{flags:#x}) while no buffer is outstanding")
                return out
            if state == avail_flags(self.used_wrap):
                return out  # still available: the device has not used it yet
            if state != used_flags(self.used_wrap):
                raise DeviceViolation(USED_DESCRIPTOR, f"{where}: flags {flags:#x} are neither available nor used "
                                                       f"under the wrap counter {self.used_wrap}")
            chain = self.outstanding.get(buffer_id)
            if chain is None or buffer_id not in self.order:
                raise DeviceViolation(USED_DESCRIPTOR, f"{where}: used descriptor names buffer id {buffer_id}, "
                                                       "which is not outstanding")
            if chain.bad and length:
                raise DeviceViolation(BAD_CHAIN_NOT_USED, f"{where}: hostile list {buffer_id} used with len {length}")
            if length > chain.writable_len:
                raise DeviceViolation(USED_LENGTH, f"{where}: buffer {buffer_id} used with len {length}, above its "
                                                   f"{chain.writable_len} writable bytes")
            if self.in_order and self.order[0] != buffer_id:
                raise DeviceViolation(IN_ORDER, f"{where}: buffer {buffer_id} used before {self.order[0]} "
                                                "under IN_ORDER")
            self.order.remove(buffer_id)
            del self.outstanding[buffer_id]
            self.free_ids.append(buffer_id)
            for _ in range(len(chain.slots)):  # §2.8.6: the used descriptor stands for the whole list
                self._close_slot(self.next_used)
                self.next_used += 1
                if self.next_used == self.num:
                    self.next_used, self.used_wrap = 0, self.used_wrap ^ 1
            self.slots_in_use -= len(chain.slots)
            written = release_chain(self.layout, chain)
            out.append(Used(buffer_id, length, written[:length], written, chain))

    # ----- hostile lists -----------------------------------------------------------------------------

    def post_raw(self, descs: Sequence[tuple[int, int, int]], *, buffer_id: int | None = None,
                 publish: bool = True) -> Chain:
        """Write ``descs`` (addr, len, flags; NEXT and the AVAIL/USED bits added) as one list and publish it.

        The list is registered as outstanding and ``bad``: the device may drop it or use it with len 0.
        """
        chain = Chain(self._take_id(buffer_id), bad=True)
        self._write_list(chain, descs)
        if publish:
            self.publish()
        return chain

    def post_nested_indirect(self) -> Chain:
        """An indirect table whose entry carries INDIRECT (reserved in a packed table, §2.8.19)."""
        inner = self.layout.alloc(16, 16, what=f"{self.name} nested indirect table")
        outer = self.layout.alloc(16, 16, what=f"{self.name} indirect table")
        buf = self.layout.alloc(16, 8, what=f"{self.name} buffer")
        self.write_indirect(inner, 0, self.layout.iova(buf), 16, 0)
        self.write_indirect(outer, 0, self.layout.iova(inner), 16, INDIRECT)
        chain = self.post_raw([(self.layout.iova(outer), 16, INDIRECT)])
        chain.allocations += [inner, outer, buf]
        return chain

    def post_indirect_in_list(self) -> Chain:
        """An INDIRECT descriptor inside a NEXT list (§2.8.19: bad input)."""
        table = self.layout.alloc(16, 16, what=f"{self.name} indirect table")
        buf = self.layout.alloc(16, 8, what=f"{self.name} buffer")
        self.write_indirect(table, 0, self.layout.iova(buf), 16, 0)
        chain = self.post_raw([(self.layout.iova(buf), 16, 0), (self.layout.iova(table), 16, INDIRECT)])
        chain.allocations += [table, buf]
        return chain

    def close(self) -> None:
        """Free everything: outstanding lists, the ring areas and their windows."""
        for chain in list(self.outstanding.values()):
            release_chain(self.layout, chain)
        self.outstanding.clear()
        for slot in range(self.num):
            self._close_slot(slot)
        for handle in self._windows:
            self.layout.forbid(handle)
        for offset in (self.desc, self.driver_event, self.device_event):
            self.layout.free(offset)
