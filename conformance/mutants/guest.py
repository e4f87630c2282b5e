"""What a parent driver written in Python needs to touch guest memory itself, for the mutants that do.

The reference devices reach guest memory only through the compiled
:class:`~vdpacert.impl.virtqueue.VirtQueue`, which refuses every hostile chain and clips every
write. A vendor's driver has no such guard: its firmware walks the ring and DMAs on its own. The
mutants that carry such a bug (a walk that follows a nested indirect table, a write one byte past
a buffer, a used length that counts the wrong bytes) use the pieces here to act like that
firmware, while still translating every address through the queue's IOTLB and resolving it in
the device's memory registry, as any parent must (``docs/parent-driver.md``, "Memory"):

- :class:`Dma`: read and write guest memory at an IOVA of one queue's address space, marking the
  dirty log for writes as a logging device does;
- :class:`SplitView`: the fields of a split ring (virtio v1.3 §2.7) read and written through
  :class:`Dma`, and :meth:`SplitView.walk`, a descriptor walk whose two guards (nested indirect
  tables, loops) a mutant may switch off;
- :func:`blk_answer`: what sim-blk answers to IN, OUT, FLUSH, GET_ID and unknown requests (the
  same answers as the compiled loop in ``impl/blk_datapath.pyx``), with the two checks a blk
  mutant may get wrong passed in as hooks.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vdpacert.impl.iotlb import ACCESS_RO, ACCESS_WO, IotlbFault
from vdpacert.uapi import virtio_blk as B  # noqa: N812 - read like the C names
from vdpacert.uapi.vhost_types import VHOST_F_LOG_ALL

if TYPE_CHECKING:
    from vdpacert.impl.sim_device import SimDevice

__all__ = ["BadChain", "BlkRequest", "Dma", "DmaFault", "SplitView", "Walk", "blk_answer", "logging_on"]

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
PACKED_F_AVAIL = 1 << 7
PACKED_F_USED = 1 << 15
SECTOR = B.VIRTIO_BLK_SECTOR_SIZE
OUTHDR = B.VIRTIO_BLK_OUTHDR_SIZE
#: How deep a walk that follows nested indirect tables goes before it gives up (it must end).
MAX_NESTING = 8


class DmaFault(Exception):
    """An access the device could not make (no IOTLB entry, no permission, or not process memory)."""


class BadChain(Exception):
    """The walk found a chain the spec calls bad input (and the walk was not told to tolerate it)."""


def logging_on(dev: SimDevice) -> bool:
    """Dirty logging runs: a bitmap is set and VHOST_F_LOG_ALL is in the driver's features."""
    return dev.dirty_log is not None and bool(dev.features >> VHOST_F_LOG_ALL & 1)


class Dma:
    """Guest memory as queue ``index`` of ``dev`` sees it: IOVA -> IOTLB -> user address -> registry."""

    def __init__(self, dev: SimDevice, index: int) -> None:
        self.dev = dev
        self.iotlb = dev.vq(index).iotlb
        self.registry = dev.registry

    def _pieces(self, iova: int, length: int, perm: int) -> list[tuple[int, int]]:
        if self.iotlb is None:
            raise DmaFault(f"queue has no address space for {iova:#x}")
        try:
            return self.iotlb.translate(iova, length, perm)
        except IotlbFault as fault:
            raise DmaFault(f"IOTLB refused {length} bytes at {iova:#x}: {fault}") from fault

    def read(self, iova: int, length: int) -> bytes:
        out = bytearray()
        for uaddr, size in self._pieces(iova, length, ACCESS_RO):
            found = self.registry.lookup(uaddr, size)
            if found is None:
                raise DmaFault(f"user address {uaddr:#x} is not guest memory")
            memory, offset = found
            out += memory.read(offset, size)
        return bytes(out)

    def write(self, iova: int, data: bytes, *, log: bool = True) -> None:
        """Write ``data`` at ``iova``; with ``log`` (and logging on) mark its pages and signal the log fd."""
        dirty: list[tuple[int, int]] = []
        targets = []
        for uaddr, size in self._pieces(iova, len(data), ACCESS_WO):
            found = self.registry.lookup(uaddr, size)
            if found is None:
                raise DmaFault(f"user address {uaddr:#x} is not guest memory")
            targets.append((found[0], found[1], size))
        done = 0
        for memory, offset, size in targets:
            memory.write(offset, data[done:done + size])
            dirty.append((memory.gpa + offset, size))
            done += size
        log_map = self.dev.dirty_log
        if log and log_map is not None and logging_on(self.dev):
            for gpa, size in dirty:
                log_map.mark_range(gpa, size)
            log_map.signal()

    def read_u16(self, iova: int) -> int:
        value: int = struct.unpack("<H", self.read(iova, 2))[0]
        return value

    def write_u16(self, iova: int, value: int, *, log: bool = True) -> None:
        self.write(iova, struct.pack("<H", value & 0xFFFF), log=log)


@dataclass
class Walk:
    """One chain as a walk found it: ``(iova, length, writable)`` per descriptor, and what it tolerated."""

    head: int
    segments: list[tuple[int, int, bool]] = field(default_factory=list)
    followed_nested: bool = False
    gave_up: bool = False  # the loop guard ran out (only with a ``loop_cap``)

    @property
    def readable_len(self) -> int:
        return sum(length for _, length, writable in self.segments if not writable)

    @property
    def writable_len(self) -> int:
        return sum(length for _, length, writable in self.segments if writable)


class SplitView:
    """The split ring of queue ``index`` (the areas the driver gave with SET_VRING_ADDR), through :class:`Dma`."""

    def __init__(self, dev: SimDevice, index: int) -> None:
        cfg = dev.vq_config(index)
        self.num = cfg.num
        self.desc_area, self.driver_area, self.device_area = cfg.desc_area, cfg.driver_area, cfg.device_area
        self.dma = Dma(dev, index)

    # driver area: flags, idx, ring[num], used_event
    def avail_idx(self) -> int:
        return self.dma.read_u16(self.driver_area + 2)

    def avail_head(self, slot: int) -> int:
        return self.dma.read_u16(self.driver_area + 4 + 2 * (slot % self.num))

    def used_event(self) -> int:
        return self.dma.read_u16(self.driver_area + 4 + 2 * self.num)

    # device area: flags, idx, ring[num] of {le32 id, le32 len}, avail_event
    def used_idx(self) -> int:
        return self.dma.read_u16(self.device_area + 2)

    def set_used_idx(self, value: int, *, log: bool = True) -> None:
        self.dma.write_u16(self.device_area + 2, value, log=log)

    def used_elem_addr(self, slot: int) -> int:
        return self.device_area + 4 + 8 * (slot % self.num)

    def used_elem(self, slot: int) -> tuple[int, int]:
        head, length = struct.unpack("<II", self.dma.read(self.used_elem_addr(slot), 8))
        return int(head), int(length)

    def set_used_elem(self, slot: int, head: int, length: int, *, log: bool = True) -> None:
        self.dma.write(self.used_elem_addr(slot), struct.pack("<II", head, length), log=log)

    def desc(self, table: int, index: int) -> tuple[int, int, int, int]:
        addr, length, flags, nxt = struct.unpack("<QIHH", self.dma.read(table + 16 * index, 16))
        return int(addr), int(length), int(flags), int(nxt)

    def walk(self, head: int, *, follow_nested: bool = False, loop_cap: int | None = None) -> Walk:
        """The chain starting at descriptor ``head``; BadChain for bad input the walk does not tolerate.

        With ``follow_nested`` an INDIRECT descriptor inside an indirect table is followed (at most
        :data:`MAX_NESTING` deep) instead of refused. With ``loop_cap`` the walk does not stop
        at a table's size: it goes on for ``loop_cap`` descriptors in all, then gives up
        (``gave_up``) and returns what it collected, so even a buggy device never hangs.
        """
        walk = Walk(head)
        table, size, index = self.desc_area, self.num, head
        visited = steps = depth = 0
        seen_writable = False
        if head >= size:
            raise BadChain(f"head {head} is outside the table of {size}")
        while True:
            visited += 1
            steps += 1
            if loop_cap is not None and steps > loop_cap:
                walk.gave_up = True
                return walk
            if loop_cap is None and visited > size:
                raise BadChain("descriptor loop")
            addr, length, flags, nxt = self.desc(table, index)
            if flags & DESC_F_INDIRECT:
                if depth and not follow_nested:
                    raise BadChain("nested indirect descriptor")
                if depth >= MAX_NESTING:
                    raise BadChain("indirect tables nested too deep even for this device")
                if flags & DESC_F_NEXT or length == 0 or length % 16:
                    raise BadChain("malformed indirect descriptor")
                walk.followed_nested |= depth > 0
                table, size, index, visited, depth = addr, length // 16, 0, 0, depth + 1
                continue
            writable = bool(flags & DESC_F_WRITE)
            if seen_writable and not writable:
                raise BadChain("device-readable descriptor after a writable one")
            seen_writable |= writable
            walk.segments.append((addr, length, writable))
            if not flags & DESC_F_NEXT:
                return walk
            index = nxt
            if index >= size:
                raise BadChain(f"next {index} is outside the table of {size}")

    def gather(self, walk: Walk) -> bytes:
        """The device-readable bytes of a walked chain, in order."""
        return b"".join(self.dma.read(addr, length) for addr, length, writable in walk.segments if not writable)

    def scatter(self, walk: Walk, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset`` of the writable part (clipped to it, as an honest device does)."""
        done = 0
        for addr, length, writable in walk.segments:
            if not writable:
                continue
            if offset >= length:
                offset -= length
                continue
            take = min(length - offset, len(data) - done)
            if take <= 0:
                break
            self.dma.write(addr + offset, data[done:done + take])
            done += take
            offset = 0
        return done


@dataclass(frozen=True)
class BlkRequest:
    """One virtio-blk request as read from a chain: header fields, data out, room for data in."""

    kind: int
    sector: int
    data_out: bytes
    data_in_len: int  # writable bytes before the status byte

    @classmethod
    def parse(cls, readable: bytes, writable_len: int) -> BlkRequest:
        kind, _, sector = struct.unpack_from("<IIQ", readable)
        return cls(kind, sector, readable[OUTHDR:], writable_len - 1)


def _range_ok(capacity: int, sector: int, sectors: int) -> bool:
    return sector <= capacity and sectors <= capacity - sector


RangeCheck = Callable[[int, int, int], bool]
IdAnswer = Callable[[bytes, int], bytes]


def _honest_id(serial: bytes, room: int) -> bytes:
    return serial[:min(room, B.VIRTIO_BLK_ID_BYTES)]


def blk_answer(dev_disk_read: Callable[[int, int], bytes], dev_disk_write: Callable[[int, bytes], None], *,
               capacity: int, read_only: bool, flush: bool, serial: bytes, request: BlkRequest,
               range_ok: RangeCheck = _range_ok, id_answer: IdAnswer = _honest_id) -> tuple[int, bytes]:
    """``(status, data_in)`` for IN / OUT / FLUSH / GET_ID / unknown types, as sim-blk answers them.

    DISCARD and WRITE_ZEROES are not handled here (the callers leave them to the compiled loop).
    ``range_ok(capacity, sector, sectors)`` and ``id_answer(serial20, room)`` are the checks a
    mutant replaces; the defaults are the honest ones.
    """
    kind, sector = request.kind, request.sector
    if kind == B.VIRTIO_BLK_T_IN:
        size = request.data_in_len
        if size % SECTOR or not range_ok(capacity, sector, size // SECTOR):
            return B.VIRTIO_BLK_S_IOERR, b""
        return B.VIRTIO_BLK_S_OK, dev_disk_read(sector, size) if size else b""
    if kind == B.VIRTIO_BLK_T_OUT:
        data = request.data_out
        if read_only or len(data) % SECTOR or not range_ok(capacity, sector, len(data) // SECTOR):
            return B.VIRTIO_BLK_S_IOERR, b""
        if data:
            dev_disk_write(sector, data)
        return B.VIRTIO_BLK_S_OK, b""
    if kind == B.VIRTIO_BLK_T_FLUSH:
        return (B.VIRTIO_BLK_S_OK if flush else B.VIRTIO_BLK_S_UNSUPP), b""
    if kind == B.VIRTIO_BLK_T_GET_ID:
        return B.VIRTIO_BLK_S_OK, id_answer(serial, request.data_in_len)
    return B.VIRTIO_BLK_S_UNSUPP, b""


def used_len(written: int, data_in_len: int, writable_len: int) -> int:
    """sim-blk's used length: the whole writable part when the data part was filled, else the prefix written."""
    return writable_len if written == data_in_len else written
