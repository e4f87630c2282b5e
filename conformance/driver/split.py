"""The driver half of a split virtqueue (virtio v1.3 §2.7), in guest memory, addressed by IOVA.

Written from the spec, not from any device: the descriptor table, the available ring the driver
writes and the used ring the device writes. Everything the device writes back is validated when
it is reaped, and a device that gets it wrong raises :class:`~vdpacert.conformance.driver.DeviceViolation`
naming the catalog rule (a used id that was not outstanding, a length above the chain's writable
bytes, used idx running ahead of what was made available, nonzero used flags under EVENT_IDX,
out-of-order use under IN_ORDER). The ring opens device-writable windows in the
:class:`~vdpacert.conformance.driver.memory.GuestLayout` for the used ring and for the writable
buffers of outstanding chains, so the canary check knows what the device may touch.

Indices are free-running 16-bit counters that may start anywhere (``start``), so the 65535 -> 0
wrap is one argument away. Raw writers (:meth:`SplitRing.write_desc`, :meth:`SplitRing.post_raw`,
...) build rings no honest driver would, for the hostile-input checks.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from vdpacert.conformance.driver import DeviceViolation
from vdpacert.conformance.driver.memory import GuestLayout, Region
from vdpacert.model.notify import Direction, NotifyRule, split_notification
from vdpacert.model.ring_index import vring_need_event
from vdpacert.uapi.virtio_ring import (
    VIRTQUEUE_MAX_SIZE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
)

DESC = struct.Struct("<QIHH")  # struct vring_desc: addr, len, flags, next
USED_ELEM = struct.Struct("<II")  # struct vring_used_elem: id, len
NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT

USED_RING = "ring.split.device.used_ring"
IN_ORDER = "ring.split.device.in_order"
USED_FLAGS = "ring.split.device.used_flags"
BAD_CHAIN_NOT_USED = "ring.device.bad_chain_not_used"


class RingFull(Exception):
    """The driver has no room for the chain (a harness condition, not a device failure)."""


@dataclass
class Chain:
    """One buffer the driver made available: its id, its buffers, and what to give back when it is used.

    ``id`` is the head descriptor index (split) or the Buffer ID (packed); ``slots`` the descriptor
    indexes (split) or ring slots (packed) it occupies. A ``bad`` chain was built hostile on purpose:
    the device must not use it as if it were valid.
    """

    id: int
    readable: list[Region] = field(default_factory=list)
    writable: list[Region] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    allocations: list[int] = field(default_factory=list)
    windows: list[int] = field(default_factory=list)
    bad: bool = False

    @property
    def writable_len(self) -> int:
        return sum(region.length for region in self.writable)


@dataclass(frozen=True)
class Used:
    """A used entry as reaped: the chain's id, the length the device reported, and what it wrote.

    ``data`` is the first ``length`` bytes of the writable buffers; ``written`` all of them (the
    canary shows in whatever the device left alone).
    """

    id: int
    length: int
    data: bytes
    written: bytes
    chain: Chain


def place_buffers(layout: GuestLayout, chain: Chain, readable: Sequence[bytes], writable: Sequence[int],
                  name: str) -> list[tuple[int, int, int]]:
    """Allocate and fill the chain's buffers; (iova, length, flags-without-NEXT) of each, readable first.

    Writable buffers stay canary-filled and become device-writable windows.
    """
    descs = []
    for data in readable:
        offset = layout.alloc(len(data), 8, what=f"{name} readable buffer")
        layout.write(offset, data)
        chain.allocations.append(offset)
        chain.readable.append(Region(offset, len(data), "readable"))
        descs.append((layout.iova(offset), len(data), 0))
    for length in writable:
        offset = layout.alloc(length, 8, what=f"{name} writable buffer")
        chain.allocations.append(offset)
        chain.writable.append(Region(offset, length, "writable"))
        chain.windows.append(layout.allow(offset, length, f"{name} writable buffer of chain {chain.id}"))
        descs.append((layout.iova(offset), length, WRITE))
    return descs


def release_chain(layout: GuestLayout, chain: Chain) -> bytes:
    """Close the chain's windows and free its memory; the writable bytes as they were just before."""
    written = b"".join(layout.read(region.offset, region.length) for region in chain.writable)
    for handle in chain.windows:
        layout.forbid(handle)
    for offset in chain.allocations:
        layout.free(offset)
    chain.windows.clear()
    chain.allocations.clear()
    return written


class SplitRing:
    """The driver half of one split virtqueue of ``num`` entries (a power of 2 up to 32768)."""

    def __init__(self, layout: GuestLayout, num: int, *, start: int = 0, event_idx: bool = False,
                 in_order: bool = False, name: str = "vq") -> None:
        if not 1 <= num <= VIRTQUEUE_MAX_SIZE or num & (num - 1):
            raise ValueError(f"a split queue size is a power of 2 in 1..32768, got {num}")
        self.layout, self.num, self.name = layout, num, name
        self.event_idx, self.in_order = event_idx, in_order
        self.desc = layout.alloc(16 * num, 16, what=f"{name} descriptor table", fill=0)
        self.avail = layout.alloc(6 + 2 * num, 2, what=f"{name} avail ring", fill=0)
        self.used = layout.alloc(6 + 8 * num, 4, what=f"{name} used ring", fill=0)
        # §2.7.8: flags, idx and ring are the device's; avail_event only with EVENT_IDX (§2.7.10).
        self._windows = [layout.allow(self.used, 4 + 8 * num, f"{name} used flags/idx/ring")]
        if event_idx:
            self._windows.append(layout.allow(self.used + 4 + 8 * num, 2, f"{name} avail_event"))
        self.free: deque[int] = deque(range(num))
        self.outstanding: dict[int, Chain] = {}
        self.order: deque[int] = deque()  # heads in the order they were made available
        self.pending: list[int] = []  # added, not yet published
        self.start = start & 0xFFFF
        self.avail_idx = self.last_used = self.kicked_at = self.start
        self.write_avail_idx(self.start)
        layout.write_u16(self.used + 2, self.start)
        #: avail_event as the driver laid it out. With EVENT_IDX, as a ring that has really run up to ``start``
        #: looks: the device last asked for a kick at the first entry it has not taken (a fresh ring: 0).
        #: Without it the field is not the device's to write (§2.7.10): it must stay as it is.
        self.initial_avail_event = self.start if event_idx else 0
        layout.write_u16(self.used + 4 + 8 * num, self.initial_avail_event)

    # ----- addresses and state ----------------------------------------------------------------------

    @property
    def addresses(self) -> tuple[int, int, int]:
        """(desc, avail, used) IOVAs, as VHOST_SET_VRING_ADDR takes them."""
        return self.layout.iova(self.desc), self.layout.iova(self.avail), self.layout.iova(self.used)

    @property
    def base(self) -> int:
        """The VHOST_SET_VRING_BASE value for this ring as laid out: the next avail index."""
        return self.start

    @property
    def in_flight(self) -> int:
        return len(self.outstanding)

    def used_idx(self) -> int:
        return self.layout.read_u16(self.used + 2)

    def used_flags(self) -> int:
        return self.layout.read_u16(self.used)

    def avail_event(self) -> int:
        return self.layout.read_u16(self.used + 4 + 8 * self.num)

    def avail_flags(self) -> int:
        return self.layout.read_u16(self.avail)

    def used_event(self) -> int:
        return self.layout.read_u16(self.avail + 4 + 2 * self.num)

    def read_used_elem(self, slot: int) -> tuple[int, int]:
        head, length = USED_ELEM.unpack(self.layout.read(self.used + 4 + 8 * (slot % self.num), 8))
        return int(head), int(length)

    # ----- raw writers (hostile rings) ---------------------------------------------------------------

    def write_desc(self, index: int, addr: int, length: int, flags: int, next_: int = 0, *,
                   table: int | None = None) -> None:
        """Descriptor ``index`` of the ring's table, or of the indirect table at offset ``table``."""
        base = self.desc if table is None else table
        self.layout.write(base + 16 * index, DESC.pack(addr, length, flags, next_))

    def write_avail_slot(self, slot: int, head: int) -> None:
        self.layout.write_u16(self.avail + 4 + 2 * (slot % self.num), head)

    def write_avail_idx(self, value: int) -> None:
        self.layout.write_u16(self.avail + 2, value)

    def write_avail_flags(self, value: int) -> None:
        self.layout.write_u16(self.avail, value)

    def write_used_event(self, value: int) -> None:
        self.layout.write_u16(self.avail + 4 + 2 * self.num, value)

    # ----- notification suppression (§2.7.7, §2.7.10) -------------------------------------------------

    def set_interrupts(self, enabled: bool) -> None:
        """Without EVENT_IDX: avail flags 0 asks for used notifications, NO_INTERRUPT asks the device not to."""
        self.write_avail_flags(0 if enabled else VRING_AVAIL_F_NO_INTERRUPT)

    def set_used_event(self, idx: int) -> None:
        """With EVENT_IDX: notify me once used idx passes ``idx``."""
        self.write_used_event(idx)

    def prepare_kick(self) -> bool:
        """Does the device want a notification for what was published since the last call? (virtqueue_kick_prepare)."""
        old, new = self.kicked_at, self.avail_idx
        self.kicked_at = new
        if self.event_idx:
            return vring_need_event(self.avail_event(), new, old)
        return not self.used_flags() & VRING_USED_F_NO_NOTIFY

    def avail_notification(self) -> NotifyRule:
        """The model's row for notifying the device now: what was published since the last decision, read
        against the device's suppression (used flags, or avail_event with EVENT_IDX). Decides nothing."""
        return split_notification(Direction.AVAIL, event_idx=self.event_idx, flags=self.used_flags(),
                                  event=self.avail_event(), old_idx=self.kicked_at, new_idx=self.avail_idx)

    def notification_decided(self) -> None:
        """The driver decided (to notify or not) for everything published so far: the next window starts here."""
        self.kicked_at = self.avail_idx

    # ----- the honest driver -------------------------------------------------------------------------

    def _take(self, count: int) -> list[int]:
        if count > len(self.free):
            raise RingFull(f"{self.name}: {count} descriptors wanted, {len(self.free)} free")
        return [self.free.popleft() for _ in range(count)]

    def add(self, readable: Sequence[bytes] = (), writable: Sequence[int] = (), *, indirect: bool = False,
            publish: bool = True) -> Chain:
        """Place a chain (readable buffers, then writable lengths), direct or through an indirect table."""
        count = 1 if indirect else len(readable) + len(writable)
        if count == 0:
            raise ValueError("a chain has at least one buffer")
        slots = self._take(count)
        chain = Chain(slots[0], slots=slots)
        descs = place_buffers(self.layout, chain, readable, writable, self.name)
        if indirect:
            table = self.layout.alloc(16 * len(descs), 16, what=f"{self.name} indirect table")
            chain.allocations.append(table)
            for i, (addr, length, flags) in enumerate(descs):
                more = i + 1 < len(descs)
                self.write_desc(i, addr, length, flags | (NEXT if more else 0), i + 1 if more else 0, table=table)
            descs = [(self.layout.iova(table), 16 * len(descs), INDIRECT)]
        for i, (addr, length, flags) in enumerate(descs):
            more = i + 1 < len(slots)
            self.write_desc(slots[i], addr, length, flags | (NEXT if more else 0), slots[i + 1] if more else 0)
        self.outstanding[chain.id] = chain
        self.pending.append(chain.id)
        if publish:
            self.publish()
        return chain

    def publish(self, *heads: int) -> None:
        """Put heads (default: every pending one) in the avail ring, then the new idx after them (§2.7.13)."""
        chosen = list(heads) if heads else list(self.pending)
        for head in chosen:
            self.write_avail_slot(self.avail_idx, head)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
            self.order.append(head)
            if head in self.pending:
                self.pending.remove(head)
        self.write_avail_idx(self.avail_idx)

    def reap(self) -> list[Used]:
        """Every newly used entry, in ring order, validated; their descriptors and buffers are freed."""
        used_idx = self.used_idx()
        fresh = (used_idx - self.last_used) & 0xFFFF
        published = len(self.outstanding) - len(self.pending)
        if fresh > published:
            raise DeviceViolation(USED_RING, f"{self.name}: used idx moved from {self.last_used} to {used_idx} "
                                             f"({fresh} entries) with only {published} chains outstanding")
        if fresh and self.event_idx and self.used_flags() != 0:
            raise DeviceViolation(USED_FLAGS, f"{self.name}: used flags {self.used_flags():#x} under EVENT_IDX")
        out = []
        for _ in range(fresh):
            head, length = self.read_used_elem(self.last_used)
            chain = self.outstanding.get(head)
            where = f"{self.name}: used ring slot {self.last_used % self.num} (idx {self.last_used})"
            if chain is None or head in self.pending:
                raise DeviceViolation(USED_RING, f"{where} names id {head}, which is not an outstanding chain")
            if chain.bad and length:
                raise DeviceViolation(BAD_CHAIN_NOT_USED, f"{where}: hostile chain {head} used with len {length}")
            if length > chain.writable_len:
                raise DeviceViolation(USED_RING, f"{where}: chain {head} used with len {length}, "
                                                 f"above its {chain.writable_len} writable bytes")
            if self.in_order and self.order and self.order[0] != head:
                raise DeviceViolation(IN_ORDER, f"{where}: chain {head} used before {self.order[0]} under IN_ORDER")
            self.order.remove(head)
            del self.outstanding[head]
            self.free.extend(chain.slots)
            written = release_chain(self.layout, chain)
            out.append(Used(head, length, written[:length], written, chain))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    # ----- hostile chains ----------------------------------------------------------------------------

    def post_raw(self, descs: Sequence[tuple[int, int, int, int]], *, head: int | None = None,
                 publish: bool = True) -> Chain:
        """Write ``descs`` (addr, len, flags, next) verbatim into free table entries and make the first available.

        ``next`` values are used as given, so loops and out-of-range indexes are easy. The chain is
        registered as outstanding and ``bad``: the device may drop it or use it with len 0, never more.
        ``head`` overrides the index published in the avail ring (e.g. one past the table).
        """
        slots = self._take(len(descs))
        for slot, (addr, length, flags, next_) in zip(slots, descs, strict=True):
            self.write_desc(slot, addr, length, flags, next_)
        chain = Chain(slots[0] if head is None else head, slots=slots, bad=True)
        self.outstanding[chain.id] = chain
        self.pending.append(chain.id)
        if publish:
            self.publish()
        return chain

    def post_loop(self) -> Chain:
        """Two descriptors that name each other with NEXT (§2.7.5.2: loops are bad input)."""
        a, b = self.free[0], self.free[1]
        buf = self.layout.alloc(16, 8, what=f"{self.name} loop buffer")
        addr = self.layout.iova(buf)
        chain = self.post_raw([(addr, 16, NEXT, b), (addr, 16, NEXT, a)])
        chain.allocations.append(buf)
        return chain

    def post_nested_indirect(self) -> Chain:
        """An indirect table whose entry is itself INDIRECT (§2.7.5.3.1)."""
        inner = self.layout.alloc(16, 16, what=f"{self.name} nested indirect table")
        outer = self.layout.alloc(16, 16, what=f"{self.name} indirect table")
        buf = self.layout.alloc(16, 8, what=f"{self.name} buffer")
        self.write_desc(0, self.layout.iova(buf), 16, 0, table=inner)
        self.write_desc(0, self.layout.iova(inner), 16, INDIRECT, table=outer)
        chain = self.post_raw([(self.layout.iova(outer), 16, INDIRECT, 0)])
        chain.allocations += [inner, outer, buf]
        return chain

    def post_head_out_of_range(self) -> Chain:
        """An avail ring entry naming a descriptor past the table (§2.7.5)."""
        buf = self.layout.alloc(16, 8, what=f"{self.name} buffer")
        chain = self.post_raw([(self.layout.iova(buf), 16, 0, 0)], head=self.num + 3)
        chain.allocations.append(buf)
        return chain

    def push_avail_idx_ahead(self, by: int | None = None) -> None:
        """Move avail idx more than the queue size past the last used index (§2.7.6.1: bad input)."""
        self.write_avail_idx(self.last_used + (self.num + 1 if by is None else by))

    def close(self) -> None:
        """Free everything: outstanding chains, the ring areas and their windows."""
        for chain in list(self.outstanding.values()):
            release_chain(self.layout, chain)
        self.outstanding.clear()
        for handle in self._windows:
            self.layout.forbid(handle)
        for offset in (self.desc, self.avail, self.used):
            self.layout.free(offset)
