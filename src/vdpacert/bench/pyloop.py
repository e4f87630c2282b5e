"""The device side of the datapath written in pure Python: the benchmark's baseline.

It does the same work as the compiled datapath for one loopback or one read: read the
available index once, walk the descriptor chain, translate every address through an IOTLB
(a sorted list searched with :mod:`bisect`), copy the bytes, and write the used element and
index (split) or the used descriptor (packed). It is deliberately plain, idiomatic Python
over a buffer of the guest memory, so "N times faster than Python" means something.
"""

from __future__ import annotations

import bisect
import ctypes
import struct
from collections.abc import Sequence

DESC = struct.Struct("<QIHH")  # split: addr, len, flags, next / packed: addr, len, id, flags
USED_ELEM = struct.Struct("<II")
U16 = struct.Struct("<H")
NEXT, WRITE = 1, 2
AVAIL_BIT, USED_BIT = 1 << 7, 1 << 15


class PyIotlb:
    """IOVA -> offset in one guest buffer, from ``(iova, size, offset)`` maps."""

    def __init__(self, maps: Sequence[tuple[int, int, int]]) -> None:
        self.maps = sorted(maps)
        self.starts = [iova for iova, _, _ in self.maps]

    def offset(self, iova: int, length: int) -> int:
        at = bisect.bisect_right(self.starts, iova) - 1
        if at < 0:
            raise LookupError(f"iova {iova:#x} is not mapped")
        start, size, base = self.maps[at]
        if iova + length > start + size:
            raise LookupError(f"iova {iova:#x}+{length} runs past its mapping")
        return base + iova - start


def guest_buffer(uaddr: int, size: int) -> memoryview:
    """A writable view of guest memory by its process address (no copy, no pin)."""
    return memoryview((ctypes.c_char * size).from_address(uaddr)).cast("B")


class PySplitQueue:
    def __init__(self, mem: memoryview, iotlb: PyIotlb, num: int, desc: int, avail: int, used: int) -> None:
        self.mem, self.iotlb, self.num = mem, iotlb, num
        self.desc, self.avail, self.used = (iotlb.offset(desc, 16 * num), iotlb.offset(avail, 6 + 2 * num),
                                            iotlb.offset(used, 6 + 8 * num))
        self.last_avail = 0
        self.used_idx = U16.unpack_from(mem, self.used + 2)[0]

    def pop(self) -> tuple[int, list[tuple[int, int, bool]]] | None:
        avail_idx = U16.unpack_from(self.mem, self.avail + 2)[0]
        if avail_idx == self.last_avail:
            return None
        head = U16.unpack_from(self.mem, self.avail + 4 + 2 * (self.last_avail % self.num))[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        segments = []
        index = head
        for _ in range(self.num):
            addr, length, flags, nxt = DESC.unpack_from(self.mem, self.desc + 16 * index)
            segments.append((self.iotlb.offset(addr, length), length, bool(flags & WRITE)))
            if not flags & NEXT:
                return head, segments
            index = nxt
        raise ValueError("descriptor loop")

    def push(self, head: int, written: int) -> None:
        USED_ELEM.pack_into(self.mem, self.used + 4 + 8 * (self.used_idx % self.num), head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        U16.pack_into(self.mem, self.used + 2, self.used_idx)


class PyPackedQueue:
    def __init__(self, mem: memoryview, iotlb: PyIotlb, num: int, desc: int) -> None:
        self.mem, self.iotlb, self.num = mem, iotlb, num
        self.desc = iotlb.offset(desc, 16 * num)
        self.avail_slot, self.avail_wrap = 0, 1
        self.used_slot, self.used_wrap = 0, 1

    def pop(self) -> tuple[int, list[tuple[int, int, bool]], int] | None:
        segments = []
        slot, wrap = self.avail_slot, self.avail_wrap
        for count in range(1, self.num + 1):
            addr, length, buffer_id, flags = DESC.unpack_from(self.mem, self.desc + 16 * slot)
            if bool(flags & AVAIL_BIT) != bool(wrap) or bool(flags & USED_BIT) == bool(wrap):
                if count == 1:
                    return None
                raise ValueError("chain runs into a descriptor that is not available")
            segments.append((self.iotlb.offset(addr, length), length, bool(flags & WRITE)))
            slot += 1
            if slot == self.num:
                slot, wrap = 0, wrap ^ 1
            if not flags & NEXT:
                self.avail_slot, self.avail_wrap = slot, wrap
                return buffer_id, segments, count
        raise ValueError("chain longer than the queue")

    def push(self, buffer_id: int, written: int, count: int) -> None:
        at = self.desc + 16 * self.used_slot
        struct.pack_into("<IH", self.mem, at + 8, written, buffer_id)
        flags = (AVAIL_BIT | USED_BIT) if self.used_wrap else 0
        U16.pack_into(self.mem, at + 14, flags | (U16.unpack_from(self.mem, at + 14)[0] & WRITE))
        self.used_slot += count
        if self.used_slot >= self.num:
            self.used_slot -= self.num
            self.used_wrap ^= 1


def copy_chain(mem: memoryview, source: list[tuple[int, int, bool]], target: list[tuple[int, int, bool]]) -> int:
    """Copy the readable bytes of ``source`` into the writable segments of ``target``; bytes copied."""
    data = b"".join(bytes(mem[offset:offset + length]) for offset, length, writable in source if not writable)
    done = 0
    for offset, length, writable in target:
        if not writable or done == len(data):
            continue
        take = min(length, len(data) - done)
        mem[offset:offset + take] = data[done:done + take]
        done += take
    return done
