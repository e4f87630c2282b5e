"""A test-side virtio driver: builds split and packed rings by hand in guest memory.

Written from virtio v1.3 §2.7 (split) and §2.8 (packed), independently of the device code it
exercises. Everything is laid out in one :class:`Guest` region whose IOVA, guest-physical and
user addresses all differ, so a device that mixes them up reads or logs the wrong bytes.
Raw writers (``write_desc``, ``set_avail_idx``, ...) let hostile tests build rings no honest
driver would.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from vdpacert.impl.guestmem import GuestMemory, MemoryRegistry
from vdpacert.impl.iotlb import ACCESS_RW, Iotlb
from vdpacert.impl.virtqueue import VirtQueue
from vdpacert.uapi.virtio_config import VIRTIO_F_RING_PACKED
from vdpacert.uapi.virtio_ring import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC

NEXT, WRITE, INDIRECT = 1, 2, 4
AVAIL, USED = 1 << 7, 1 << 15
PAGE = 4096

IOVA_BASE = 0x4000_0000
GPA_BASE = 0x1_0000_0000
CANARY = 0xA5


def features(*, packed: bool = False, event_idx: bool = False, indirect: bool = False) -> int:
    bits = 1 << 32  # VERSION_1
    if packed:
        bits |= 1 << VIRTIO_F_RING_PACKED
    if event_idx:
        bits |= 1 << VIRTIO_RING_F_EVENT_IDX
    if indirect:
        bits |= 1 << VIRTIO_RING_F_INDIRECT_DESC
    return bits


class Guest:
    """One guest memory region (filled with canary bytes), its registry and a RW IOTLB map of it."""

    def __init__(self, size: int = 1 << 20, *, gpa: int = GPA_BASE, iova: int = IOVA_BASE) -> None:
        self.mem = GuestMemory(size, gpa=gpa, register=False)
        self.mem.fill(0, size, CANARY)
        self.registry = MemoryRegistry()
        self.registry.add(self.mem)
        self.iotlb = Iotlb()
        self.iotlb.update(iova, size, self.mem.uaddr, ACCESS_RW)
        self.iova_base = iova
        self.size = size
        self._next = 0

    def alloc(self, size: int, align: int = 16, *, zero: bool = True) -> int:
        """Offset of ``size`` fresh bytes (zeroed unless ``zero`` is False: then canary)."""
        offset = (self._next + align - 1) // align * align
        if offset + size > self.size:
            raise MemoryError("guest memory exhausted")
        self._next = offset + size
        if zero and size:
            self.mem.fill(offset, size, 0)
        return offset

    def iova(self, offset: int) -> int:
        return self.iova_base + offset

    def gpa(self, offset: int) -> int:
        return self.mem.gpa + offset

    def offset_of_iova(self, iova: int) -> int:
        return iova - self.iova_base

    def snapshot(self) -> bytes:
        return self.mem.read(0, self.size)

    def close(self) -> None:
        self.mem.close()


@dataclass
class Buffers:
    """Guest offsets of a chain's buffers: readable then writable, as (offset, length)."""

    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)


def _place(guest: Guest, readable: Iterable[bytes], writable: Iterable[int]) -> Buffers:
    buffers = Buffers()
    for data in readable:
        offset = guest.alloc(len(data), 8)
        guest.mem.write(offset, data)
        buffers.readable.append((offset, len(data)))
    for length in writable:
        buffers.writable.append((guest.alloc(length, 8, zero=False), length))  # canary-filled
    return buffers


def _descs(guest: Guest, buffers: Buffers) -> list[tuple[int, int, int]]:
    """(iova, length, flags-without-NEXT) of each buffer, in chain order."""
    return ([(guest.iova(o), n, 0) for o, n in buffers.readable]
            + [(guest.iova(o), n, WRITE) for o, n in buffers.writable])


class SplitDriver:
    """The driver half of a split ring of ``num`` entries (§2.7)."""

    def __init__(self, guest: Guest, num: int) -> None:
        self.guest = guest
        self.num = num
        self.desc = guest.alloc(16 * num, 16)
        self.avail = guest.alloc(6 + 2 * num, 2)
        self.used = guest.alloc(6 + 8 * num, 4)
        self.free = list(range(num))
        self.avail_idx = 0
        self.last_used = 0
        self.chains: dict[int, list[int]] = {}
        self.buffers: dict[int, Buffers] = {}

    @property
    def addresses(self) -> tuple[int, int, int]:
        return self.guest.iova(self.desc), self.guest.iova(self.avail), self.guest.iova(self.used)

    # raw layout access
    def write_desc(self, index: int, addr: int, length: int, flags: int, next_: int = 0, *,
                   table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.guest.mem.write(base + 16 * index, struct.pack("<QIHH", addr, length, flags, next_))

    def set_avail_ring(self, slot: int, head: int) -> None:
        self.guest.mem.write_u16(self.avail + 4 + 2 * (slot % self.num), head)

    def set_avail_idx(self, value: int) -> None:
        self.guest.mem.write_u16(self.avail + 2, value & 0xFFFF)

    def set_avail_flags(self, value: int) -> None:
        self.guest.mem.write_u16(self.avail, value)

    def set_used_event(self, value: int) -> None:
        self.guest.mem.write_u16(self.avail + 4 + 2 * self.num, value & 0xFFFF)

    def used_idx(self) -> int:
        return self.guest.mem.read_u16(self.used + 2)

    def used_flags(self) -> int:
        return self.guest.mem.read_u16(self.used)

    def avail_event(self) -> int:
        return self.guest.mem.read_u16(self.used + 4 + 8 * self.num)

    def used_elem(self, slot: int) -> tuple[int, int]:
        return struct.unpack("<II", self.guest.mem.read(self.used + 4 + 8 * (slot % self.num), 8))

    def start_at(self, index: int) -> None:
        """Pretend the ring has already carried ``index`` chains (to test 2^16 wrap)."""
        self.avail_idx = self.last_used = index & 0xFFFF
        self.set_avail_idx(index)
        self.guest.mem.write_u16(self.used + 2, index & 0xFFFF)

    # honest driver operations
    def add(self, readable: Sequence[bytes] = (), writable: Sequence[int] = (), *, indirect: bool = False,
            publish: bool = True) -> int:
        buffers = _place(self.guest, readable, writable)
        descs = _descs(self.guest, buffers)
        if indirect:
            table = self.guest.alloc(16 * len(descs), 16)
            for i, (addr, length, flags) in enumerate(descs):
                more = NEXT if i + 1 < len(descs) else 0
                self.write_desc(i, addr, length, flags | more, i + 1 if more else 0, table=table)
            descs = [(self.guest.iova(table), 16 * len(descs), INDIRECT)]
        if len(descs) > len(self.free):
            raise MemoryError("no free descriptors")
        indexes = [self.free.pop(0) for _ in descs]
        for i, (addr, length, flags) in enumerate(descs):
            more = i + 1 < len(indexes)
            self.write_desc(indexes[i], addr, length, flags | (NEXT if more else 0), indexes[i + 1] if more else 0)
        head = indexes[0]
        self.chains[head] = indexes
        self.buffers[head] = buffers
        if publish:
            self.publish(head)
        return head

    def publish(self, *heads: int) -> None:
        """Put heads in the avail ring, then (after them, as the spec orders it) the new idx."""
        for head in heads:
            self.set_avail_ring(self.avail_idx, head)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def get_used(self) -> list[tuple[int, int]]:
        """(id, len) of every newly used chain; their descriptors become free again."""
        out = []
        while self.last_used != self.used_idx():
            head, length = self.used_elem(self.last_used)
            out.append((head, length))
            self.free.extend(self.chains.pop(head, []))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def written(self, head: int) -> bytes:
        """The bytes of a chain's writable buffers, concatenated."""
        return b"".join(self.guest.mem.read(o, n) for o, n in self.buffers[head].writable)


class PackedDriver:
    """The driver half of a packed ring of ``num`` entries (§2.8): wrap counters start at 1."""

    def __init__(self, guest: Guest, num: int) -> None:
        self.guest = guest
        self.num = num
        self.desc = guest.alloc(16 * num, 16)
        self.driver_event = guest.alloc(4, 4)
        self.device_event = guest.alloc(4, 4)
        self.next_avail = 0
        self.avail_wrap = 1
        self.next_used = 0
        self.used_wrap = 1
        self.next_id = 0
        self.slots: dict[int, int] = {}
        self.buffers: dict[int, Buffers] = {}
        self.pending_head: tuple[int, int] | None = None

    @property
    def addresses(self) -> tuple[int, int, int]:
        return self.guest.iova(self.desc), self.guest.iova(self.driver_event), self.guest.iova(self.device_event)

    def avail_flags(self, wrap: int) -> int:
        return AVAIL if wrap else USED

    def write_desc(self, slot: int, addr: int, length: int, buffer_id: int, flags: int) -> None:
        self.guest.mem.write(self.desc + 16 * slot, struct.pack("<QIHH", addr, length, buffer_id, flags))

    def write_indirect(self, table: int, index: int, addr: int, length: int, flags: int) -> None:
        self.guest.mem.write(table + 16 * index, struct.pack("<QIHH", addr, length, 0, flags))

    def read_desc(self, slot: int) -> tuple[int, int, int, int]:
        return struct.unpack("<QIHH", self.guest.mem.read(self.desc + 16 * slot, 16))

    def set_driver_event(self, off_wrap: int, flags: int) -> None:
        self.guest.mem.write(self.driver_event, struct.pack("<HH", off_wrap, flags))

    def device_event_state(self) -> tuple[int, int]:
        return struct.unpack("<HH", self.guest.mem.read(self.device_event, 4))

    def start_at(self, slot: int, wrap: int = 1) -> None:
        """Pretend both sides are at ``slot`` with wrap counter ``wrap`` (descriptors zeroed)."""
        self.next_avail = self.next_used = slot
        self.avail_wrap = self.used_wrap = wrap

    def add(self, readable: Sequence[bytes] = (), writable: Sequence[int] = (), *, indirect: bool = False,
            publish: bool = True, buffer_id: int | None = None) -> int:
        """Write a chain; the head's flags last (or later, by :meth:`publish`). The buffer id."""
        buffers = _place(self.guest, readable, writable)
        descs = _descs(self.guest, buffers)
        if indirect:
            table = self.guest.alloc(16 * len(descs), 16)
            for i, (addr, length, flags) in enumerate(descs):
                self.write_indirect(table, i, addr, length, flags)
            descs = [(self.guest.iova(table), 16 * len(descs), INDIRECT)]
        if buffer_id is None:
            buffer_id = self.next_id
            self.next_id = (self.next_id + 1) & 0xFFFF
        head_slot = self.next_avail
        head_flags = 0
        for i, (addr, length, flags) in enumerate(descs):
            flags |= (NEXT if i + 1 < len(descs) else 0) | self.avail_flags(self.avail_wrap)
            if i == 0:
                # the id field is written now, the flags that make it visible at publish time
                self.write_desc(self.next_avail, addr, length, buffer_id, self.avail_flags(1 - self.avail_wrap))
                head_flags = flags
            else:
                self.write_desc(self.next_avail, addr, length, buffer_id, flags)
            self.next_avail += 1
            if self.next_avail == self.num:
                self.next_avail = 0
                self.avail_wrap ^= 1
        self.slots[buffer_id] = len(descs)
        self.buffers[buffer_id] = buffers
        self.pending_head = (head_slot, head_flags)
        if publish:
            self.publish()
        return buffer_id

    def publish(self) -> None:
        if self.pending_head is not None:
            slot, flags = self.pending_head
            self.guest.mem.write_u16(self.desc + 16 * slot + 14, flags)
            self.pending_head = None

    def get_used(self) -> list[tuple[int, int]]:
        out = []
        while True:
            _, length, buffer_id, flags = self.read_desc(self.next_used)
            used = bool(flags & USED)
            if bool(flags & AVAIL) != used or used != bool(self.used_wrap):
                return out
            out.append((buffer_id, length))
            self.next_used += self.slots.pop(buffer_id, 1)
            if self.next_used >= self.num:
                self.next_used -= self.num
                self.used_wrap ^= 1

    def written(self, buffer_id: int) -> bytes:
        return b"".join(self.guest.mem.read(o, n) for o, n in self.buffers[buffer_id].writable)


def device_queue(guest: Guest, driver: SplitDriver | PackedDriver, feature_bits: int, *,
                 ready: bool = True) -> VirtQueue:
    """A device-side VirtQueue configured as a parent would be for this driver's ring."""
    vq = VirtQueue()
    vq.set_num(driver.num)
    vq.set_features(feature_bits)
    vq.set_address(*driver.addresses)
    vq.set_iotlb(guest.iotlb)
    vq.set_memory(guest.registry)
    if ready:
        vq.set_ready(True)
    return vq
