"""The ring fuzzer's guest memory and its decoder: any byte string becomes one ring layout to write.

Guest memory is one allocation: a guard page, the region the device is given (mapped read-write
in the IOTLB at :data:`IOVA_BASE`, plus a read-only and a write-only alias of its buffer area),
and another guard page. The guards are never mapped, so any byte of them that changes was
written by something that bypassed the IOTLB.

The region holds the fuzzed queue's rings (sized for the largest queue), a small honest ring for
the partner of a net data queue (a TX frame needs an RX buffer to go anywhere), and a buffer
area of 16 cells of 1 KiB: chains take their buffers from cells 0-7 (the partner from 8-11),
raw indirect tables live in cells 12-15. A descriptor address is drawn from classes that matter
to a device's walker: a cell, an indirect table, the rings themselves, straddling the end of the
region, unmapped, an alias with the wrong permission, or any 64-bit value.

:func:`decode` never fails: :class:`~vdpacert.fuzz.base.ByteReader` reads zeros once the input
is used up, so a short input is a ring with little in it. Honest chains (a real blk request, a
net frame, a control command) are one choice among the raw ones, so random inputs also reach
the datapath past the walker.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from vdpacert.fuzz.base import ByteReader
from vdpacert.uapi import virtio_blk as B  # noqa: N812
from vdpacert.uapi import virtio_net as N  # noqa: N812

PAGE = 4096
GUARD = PAGE
REGION = 6 * PAGE
ALLOCATION = GUARD + REGION + GUARD
IOVA_BASE = 0x4000_0000
#: Where the buffer area is mapped again, read-only and write-only (the permission classes).
RO_ALIAS = 0x5000_0000
WO_ALIAS = 0x5800_0000
#: An IOVA nothing maps.
HOLE = 0x9999_0000
MAX_NUM = 256  # the reference devices' largest queue (get_vq_num_max)

# Region offsets. The fuzzed ring is sized for MAX_NUM: split avail 6 + 2 * 256, used 6 + 8 * 256.
FUZZ_DESC, FUZZ_DRIVER, FUZZ_DEVICE = 0x0000, 0x1000, 0x1400
PARTNER_NUM = 8
PARTNER_DESC, PARTNER_DRIVER, PARTNER_DEVICE = 0x1C80, 0x1D00, 0x1D40
RING_END = 0x2000
BUF_AREA, CELL, CELLS = 0x2000, 1024, 16
BUF_SIZE = CELL * CELLS
FUZZ_CELLS, PARTNER_CELL0, TABLE_CELL0 = 8, 8, 12
INLINE_TABLE = 0x3C0  # an honest indirect table sits at the end of its chain's cell (4 entries)
FILL = 0x5A  # what the buffer area holds before the chains' contents: a device write of 0 shows

NEXT, WRITE, INDIRECT = 1, 2, 4
AVAIL, USED = 1 << 7, 1 << 15
DESC = struct.Struct("<QIHH")  # split: addr len flags next / packed: addr len id flags
MAX_CHAINS = 6
MAX_RAW_DESCS = 4

NET_HDR = 12  # virtio_net_hdr_v1: num_buffers is always there (VERSION_1)
OUTHDR = 16

Write = tuple[int, bytes]  # (region offset, bytes)


def iova(offset: int) -> int:
    return IOVA_BASE + offset


def cell(index: int) -> int:
    return BUF_AREA + CELL * index


@dataclass
class QueuePlan:
    """One queue as the input lays it out: where its rings are, what to write, and when to publish."""

    index: int  # the device's queue index
    kind: str  # "blk", "rx", "tx" or "ctrl"
    num: int
    desc: int
    driver: int
    device: int
    start: int  # split: first avail index; packed: first slot
    wrap: int  # packed: the wrap counter at ``start``
    setup: list[Write] = field(default_factory=list)  # written before the device is started
    stages: list[list[Write]] = field(default_factory=list)  # each published, then the queue kicked
    avail_idx: int = 0  # split: the avail idx once every stage is published
    published: list[int] = field(default_factory=list)  # split: every avail idx value published, in order
    honest: int = 0
    indirect_chains: int = 0

    packed: bool = False

    @property
    def base(self) -> int:
        """SET_VRING_BASE's argument: split, the avail index; packed, slot | wrap << 15 in both halves."""
        if not self.packed:
            return self.start
        half = self.start | self.wrap << 15
        return half | half << 16


@dataclass
class RingInput:
    """A decoded input: the device, its features, the queues and extra buffer-area patches."""

    device: str  # "sim-net" or "sim-blk"
    packed: bool
    event_idx: bool
    indirect: bool
    mrg_rxbuf: bool
    features: int
    queues: list[QueuePlan]
    patches: list[Write]
    early: bool  # publish before DRIVER_OK (the device runs the queue at DRIVER_OK)
    partner_first: bool
    tags: set[str] = field(default_factory=set)


def _blk_cell(reader: ByteReader, base: int) -> tuple[list[tuple[int, int, int]], list[Write]]:
    """An honest blk request in the cell at ``base``: its (iova, len, WRITE?) segments and the bytes to write."""
    rtype = reader.pick((B.VIRTIO_BLK_T_IN, B.VIRTIO_BLK_T_OUT, B.VIRTIO_BLK_T_FLUSH, B.VIRTIO_BLK_T_GET_ID,
                         B.VIRTIO_BLK_T_DISCARD, B.VIRTIO_BLK_T_WRITE_ZEROES, B.VIRTIO_BLK_T_IN, 0x7F))
    sector = reader.below(16)
    writes: list[Write] = [(base, struct.pack("<IIQ", rtype, 0, sector))]
    segs = [(iova(base), OUTHDR, 0)]
    data = base + OUTHDR
    if rtype == B.VIRTIO_BLK_T_OUT:
        segs.append((iova(data), 512, 0))
    elif rtype in (B.VIRTIO_BLK_T_IN, 0x7F):
        segs.append((iova(data), 512, WRITE))
    elif rtype == B.VIRTIO_BLK_T_GET_ID:
        segs.append((iova(data), B.VIRTIO_BLK_ID_BYTES, WRITE))
    elif rtype in (B.VIRTIO_BLK_T_DISCARD, B.VIRTIO_BLK_T_WRITE_ZEROES):
        writes.append((data, struct.pack("<QII", sector, 1 + reader.below(2), 0)))
        segs.append((iova(data), 16, 0))
    segs.append((iova(data + 512), 1, WRITE))
    return segs, writes


def _net_frame(length: int, tag: int) -> bytes:
    """An Ethernet frame of ``length`` bytes (>= 14): unicast to a local address, IPv4 EtherType."""
    head = bytes([0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00])
    return head + bytes((tag + i) & 0xFF for i in range(length - len(head)))


def honest_chain(reader: ByteReader, kind: str, base: int) -> tuple[list[tuple[int, int, int]], list[Write]]:
    """The segments and contents of one well-formed chain of ``kind`` in the cell at ``base``."""
    if kind == "blk":
        return _blk_cell(reader, base)
    if kind == "tx":
        frame = _net_frame(14 + reader.below(200), reader.u8())
        if reader.flag():  # header and frame in one buffer
            return [(iova(base), NET_HDR + len(frame), 0)], [(base, bytes(NET_HDR) + frame)]
        return ([(iova(base), NET_HDR, 0), (iova(base + 64), len(frame), 0)],
                [(base, bytes(NET_HDR)), (base + 64, frame)])
    if kind == "rx":
        size = reader.pick((512, 256, 64, 900))
        if reader.flag():
            return [(iova(base), NET_HDR, WRITE), (iova(base + 64), size, WRITE)], []
        return [(iova(base), size, WRITE)], []
    command = reader.pick(((N.VIRTIO_NET_CTRL_RX, N.VIRTIO_NET_CTRL_RX_PROMISC, b"\x01"),
                           (N.VIRTIO_NET_CTRL_MAC, N.VIRTIO_NET_CTRL_MAC_ADDR_SET, bytes([2, 0, 0, 0, 0, 9])),
                           (N.VIRTIO_NET_CTRL_RX, N.VIRTIO_NET_CTRL_RX_ALLMULTI, b"\x00"),
                           (reader.u8(), reader.u8(), reader.take(reader.below(8)))))
    klass, cmd, data = command
    return ([(iova(base), 2, 0), (iova(base + 16), len(data), 0), (iova(base + 64), 1, WRITE)],
            [(base, bytes([klass, cmd])), (base + 16, data)])


_LENS = (0, 1, NET_HDR, OUTHDR, 60, 72, 512, 513, 256, -1, -2, -3, 0xFFFF_FFFF, 0xFFFF_FFF0, 0x1000, 0x2000)
_ADDRS = ("cell",) * 6 + ("table", "table", "ring", "ring", "straddle", "outside", "outside", "ro", "wo", "any")


class _Raw:
    """Decodes raw descriptor fields (any value the classes allow) for one input."""

    def __init__(self, reader: ByteReader, tables: Sequence[tuple[int, int]]) -> None:
        self.r = reader
        self.tables = tables  # (region offset, entries) of the raw indirect tables

    def addr(self) -> int:
        r = self.r
        kind = r.pick(_ADDRS)
        if kind == "cell":
            return iova(cell(r.below(CELLS)) + r.pick((0, 0, 0, 1, 16, 64, 512, 1023)))
        if kind == "table" and self.tables:
            return iova(r.pick(self.tables)[0])
        if kind in ("ring", "table"):
            return iova(r.below(RING_END))
        if kind == "straddle":
            return iova(REGION - 1 - r.below(64))
        if kind == "outside":
            return r.pick((HOLE, IOVA_BASE - 1 - r.below(PAGE), iova(REGION + r.below(PAGE)), 0))
        if kind == "ro":
            return RO_ALIAS + r.below(BUF_SIZE)
        if kind == "wo":
            return WO_ALIAS + r.below(BUF_SIZE)
        return r.u64()

    def length(self) -> int:
        r = self.r
        value = r.pick(_LENS)
        if value == -1:
            return 16 * r.below(9)
        if value == -2:
            return r.u16()
        if value == -3:
            return r.u32()
        return value

    def split_flags(self) -> int:
        f = self.r.u8()
        return (f & 7) | (0x10 if f & 0x80 else 0)  # bit 4: a flag no spec defines, which must be ignored

    def packed_flags(self, wrap: int) -> int:
        f = self.r.u8()
        state = f >> 5
        avail = {0: AVAIL if wrap else USED, 1: AVAIL if wrap else USED, 2: AVAIL if wrap else USED,
                 3: AVAIL if wrap else USED, 4: (AVAIL | USED) if wrap else 0, 5: USED if wrap else AVAIL,
                 6: 0, 7: AVAIL | USED}[state]
        return (f & 7) | avail


def _wrap_at(q: QueuePlan, slot: int) -> int:
    """The driver's wrap counter for ``slot`` when the ring starts at (start, wrap)."""
    return q.wrap if slot >= q.start else 1 - q.wrap


def _put_split(q: QueuePlan, index: int, addr: int, length: int, flags: int, nxt: int, *, table: int | None = None
               ) -> Write:
    base = q.desc if table is None else table
    return base + 16 * index, DESC.pack(addr & (2**64 - 1), length & 0xFFFF_FFFF, flags & 0xFFFF, nxt & 0xFFFF)


def _put_packed(base: int, slot: int, addr: int, length: int, buffer_id: int, flags: int) -> Write:
    return base + 16 * slot, DESC.pack(addr & (2**64 - 1), length & 0xFFFF_FFFF, buffer_id & 0xFFFF, flags & 0xFFFF)
