"""Traffic that checks itself: net frames with sequence numbers and CRCs, blk sectors with known patterns.

Net: every frame the suite sends is an Ethernet frame of a local experimental EtherType carrying a
sequence number and the CRC32 of its payload, behind a ``virtio_net_hdr_v1`` (virtio v1.3 §5.1.6).
A received frame is parsed and checked (header, EtherType, CRC), and a :class:`NetStream` keeps the
sent and received sequence numbers, so loss, duplication and reordering are counted, not guessed.

Blk: request builders for every request type the suite sends (§5.2.6), and a sector pattern:
each 512-byte sector's content is derived from ``(sector, generation)``, so a :class:`BlkShadow`
that counts the writes knows exactly what every sector must read back, and which sector came
back wrong (stale generation, another sector's data, zeroes).

Everything a conforming device could not have produced raises :class:`~vdpacert.conformance.driver.DeviceViolation`.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from vdpacert.conformance.driver import DeviceViolation
from vdpacert.uapi import virtio_blk as B  # noqa: N812
from vdpacert.uapi import virtio_net as N  # noqa: N812

# ----- net ------------------------------------------------------------------------------------------------

NET_HDR = struct.Struct("<BBHHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
NET_HDR_LEN = N.VIRTIO_NET_HDR_V1_SIZE
ETHERTYPE = 0x88B5  # IEEE 802 local experimental EtherType 1
ETH_HLEN = 14
FRAME_META = ETH_HLEN + 8  # Ethernet header, then le32 seq and le32 CRC32 of the payload
MIN_FRAME = FRAME_META
SRC_MAC = bytes.fromhex("020000c0ffee")
BROADCAST = b"\xff" * 6
#: An RX buffer that holds any MTU-1500 frame and its header (what a driver posts without MRG_RXBUF).
RX_BUF = NET_HDR_LEN + ETH_HLEN + 1500
#: The rule a corrupted, invented or mangled looped-back frame breaks.
LOOPED_BACK = "net.tx.looped_back"


def net_hdr(*, flags: int = 0, gso_type: int = N.VIRTIO_NET_HDR_GSO_NONE, hdr_len: int = 0, gso_size: int = 0,
            csum_start: int = 0, csum_offset: int = 0, num_buffers: int = 0) -> bytes:
    """A ``virtio_net_hdr_v1``; the defaults are a plain transmit header (num_buffers 0, §5.1.6.2.1)."""
    return NET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers)


def _payload(seq: int, length: int) -> bytes:
    pattern = bytes((seq * 31 + i * 7) & 0xFF for i in range(256))
    return (pattern * (length // 256 + 1))[:length]


def build_frame(seq: int, length: int = 64, *, dst: bytes = BROADCAST, src: bytes = SRC_MAC) -> bytes:
    """An Ethernet frame of ``length`` bytes carrying ``seq`` and the CRC32 of its payload."""
    if length < MIN_FRAME:
        raise ValueError(f"a frame carrying seq and CRC is at least {MIN_FRAME} bytes, got {length}")
    payload = _payload(seq, length - FRAME_META)
    return dst + src + struct.pack(">H", ETHERTYPE) + struct.pack("<II", seq & 0xFFFF_FFFF,
                                                                   zlib.crc32(payload)) + payload


@dataclass(frozen=True)
class Frame:
    """A frame received intact: its header fields and what it carried."""

    seq: int
    length: int
    dst: bytes
    src: bytes
    hdr: tuple[int, ...]

    @property
    def num_buffers(self) -> int:
        return self.hdr[6]


def parse_frame(data: bytes, *, with_header: bool = True, mrg_rxbuf: bool = False,
                check_num_buffers: bool = True) -> Frame:
    """Check and parse what the device delivered into one RX chain (``virtio_net_hdr_v1`` + frame).

    A frame that is too short, not ours, or whose CRC does not match is something the device
    invented or mangled: DeviceViolation(net.tx.looped_back). Without MRG_RXBUF the header's
    num_buffers must be 1 (§5.1.6.4); no offload may be claimed for a frame sent without one.
    ``check_num_buffers=False`` reads the header as Linux's virtio_net does without MRG_RXBUF:
    num_buffers unread (a migration's guest cares for the frames, the suite for the header).
    """
    hdr: tuple[int, ...] = (0,) * 7
    if with_header:
        if len(data) < NET_HDR_LEN:
            raise DeviceViolation(LOOPED_BACK, f"{len(data)} bytes received: shorter than virtio_net_hdr_v1")
        hdr = NET_HDR.unpack_from(data)
        data = data[NET_HDR_LEN:]
        if hdr[1] != N.VIRTIO_NET_HDR_GSO_NONE:
            raise DeviceViolation(LOOPED_BACK, f"receive header claims gso_type {hdr[1]} for a frame sent without")
        if not mrg_rxbuf and check_num_buffers and hdr[6] != 1:
            raise DeviceViolation(LOOPED_BACK, f"receive header num_buffers {hdr[6]} without MRG_RXBUF (must be 1)")
    if len(data) < FRAME_META:
        raise DeviceViolation(LOOPED_BACK, f"a {len(data)}-byte frame is shorter than any frame the suite sends")
    if data[12:14] != struct.pack(">H", ETHERTYPE):
        raise DeviceViolation(LOOPED_BACK, f"frame with EtherType {data[12:14].hex()}: not one the suite sent")
    seq, crc = struct.unpack_from("<II", data, ETH_HLEN)
    if zlib.crc32(data[FRAME_META:]) != crc:
        raise DeviceViolation(LOOPED_BACK, f"frame seq {seq} ({len(data)} bytes): payload CRC mismatch")
    return Frame(int(seq), len(data), data[:6], data[6:12], hdr)


@dataclass
class NetStream:
    """Sequence numbers sent and received on one path: what is lost, duplicated or reordered.

    ``lost`` is what was sent and not (yet) received: the caller decides when "not yet" means lost.
    """

    next_seq: int = 0
    sent: dict[int, int] = field(default_factory=dict)  # seq -> frame length
    received: list[int] = field(default_factory=list)
    duplicated: list[int] = field(default_factory=list)
    reordered: list[int] = field(default_factory=list)
    unknown: list[int] = field(default_factory=list)
    _seen: set[int] = field(default_factory=set, repr=False)
    _highest: int = field(default=-1, repr=False)  # the highest seq received (max(received), kept as it grows)

    def frames(self, count: int, lengths: Sequence[int] | int = 64) -> list[bytes]:
        """``count`` new frames, numbered on from the last; lengths cycle through ``lengths``."""
        sizes = [lengths] if isinstance(lengths, int) else list(lengths)
        out = []
        for i in range(count):
            seq, length = self.next_seq, sizes[i % len(sizes)]
            self.next_seq += 1
            self.sent[seq] = length
            out.append(build_frame(seq, length))
        return out

    def receive(self, frame: Frame) -> None:
        """Record one received frame."""
        seq = frame.seq
        if seq not in self.sent:
            self.unknown.append(seq)
        elif seq in self._seen:
            self.duplicated.append(seq)
        else:
            if seq < self._highest:
                self.reordered.append(seq)
            if frame.length != self.sent[seq]:
                raise DeviceViolation(LOOPED_BACK, f"frame seq {seq} came back {frame.length} bytes long, "
                                                   f"sent {self.sent[seq]}")
        self.received.append(seq)
        self._seen.add(seq)
        self._highest = max(self._highest, seq)

    @property
    def lost(self) -> list[int]:
        return [seq for seq in self.sent if seq not in self._seen]

    def check(self, *, in_order: bool = True, complete: bool = True) -> None:
        """DeviceViolation(net.tx.looped_back) for any duplicate, invented frame, reordering, or (``complete``) loss."""
        problems = []
        if self.duplicated:
            problems.append(f"duplicated {self.duplicated[:10]}")
        if self.unknown:
            problems.append(f"never sent {self.unknown[:10]}")
        if in_order and self.reordered:
            problems.append(f"reordered {self.reordered[:10]}")
        if complete and self.lost:
            problems.append(f"lost {self.lost[:10]} ({len(self.lost)} in all)")
        if problems:
            raise DeviceViolation(LOOPED_BACK, "; ".join(problems))


# ----- blk ------------------------------------------------------------------------------------------------

SECTOR = B.VIRTIO_BLK_SECTOR_SIZE
OUTHDR = struct.Struct("<IIQ")  # struct virtio_blk_outhdr: type, ioprio, sector
SEGMENT = struct.Struct("<QII")  # struct virtio_blk_discard_write_zeroes: sector, num_sectors, flags


@dataclass(frozen=True)
class BlkRequest:
    """One request as a chain: readable parts (header, data out), writable lengths (data in, then status)."""

    type: int
    sector: int
    readable: tuple[bytes, ...]
    writable: tuple[int, ...]

    @property
    def data_in_len(self) -> int:
        return sum(self.writable) - 1


def _request(kind: int, sector: int, out: Iterable[bytes] = (), data_in: int = 0) -> BlkRequest:
    readable = (OUTHDR.pack(kind, 0, sector), *(part for part in out if part))
    return BlkRequest(kind, sector, readable, ((data_in,) if data_in else ()) + (1,))


def blk_in(sector: int, count: int = 1) -> BlkRequest:
    return _request(B.VIRTIO_BLK_T_IN, sector, data_in=count * SECTOR)


def blk_out(sector: int, data: bytes) -> BlkRequest:
    return _request(B.VIRTIO_BLK_T_OUT, sector, [data])


def blk_flush() -> BlkRequest:
    return _request(B.VIRTIO_BLK_T_FLUSH, 0)


def blk_get_id() -> BlkRequest:
    return _request(B.VIRTIO_BLK_T_GET_ID, 0, data_in=B.VIRTIO_BLK_ID_BYTES)


def blk_discard(segments: Sequence[tuple[int, int]]) -> BlkRequest:
    """DISCARD of (sector, count) ranges."""
    return _request(B.VIRTIO_BLK_T_DISCARD, 0, [b"".join(SEGMENT.pack(s, n, 0) for s, n in segments)])


def blk_write_zeroes(segments: Sequence[tuple[int, int]], *, unmap: bool = False) -> BlkRequest:
    """WRITE_ZEROES of (sector, count) ranges."""
    flags = B.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if unmap else 0
    return _request(B.VIRTIO_BLK_T_WRITE_ZEROES, 0, [b"".join(SEGMENT.pack(s, n, flags) for s, n in segments)])


def sector_pattern(sector: int, generation: int) -> bytes:
    """The 512 bytes sector ``sector`` holds after its ``generation``-th write (generation 0: zeroes)."""
    if generation == 0:
        return bytes(SECTOR)
    head = struct.pack("<QQ", sector, generation)
    seed = hashlib.blake2b(head, digest_size=64).digest()
    return head + (seed * 8)[:SECTOR - len(head)]


def identify_sector(data: bytes) -> tuple[int, int] | None:
    """(sector, generation) a pattern sector claims to be, or None if it is no pattern (e.g. zeroes)."""
    sector, generation = struct.unpack_from("<QQ", data)
    return (sector, generation) if generation and data == sector_pattern(sector, generation) else None


#: A sector's expected content is unknown: DISCARD leaves it open (§5.2.6), so does a disk never written.
UNKNOWN = -1


class BlkShadow:
    """What every sector of a disk must contain: its pattern generation, 0 for zeroes, or UNKNOWN."""

    def __init__(self, capacity: int, *, zeroed: bool = True) -> None:
        self.capacity = capacity
        self.generation = [0 if zeroed else UNKNOWN] * capacity
        self._writes = 0

    def write(self, sector: int, count: int = 1) -> bytes:
        """The data for an OUT of ``count`` sectors at ``sector``, recorded as the sectors' new content.

        Generations are global and increasing, so no two writes ever produce the same bytes.
        """
        out = []
        for s in range(sector, sector + count):
            self._writes += 1
            self.generation[s] = self._writes
            out.append(sector_pattern(s, self._writes))
        return b"".join(out)

    def zero(self, sector: int, count: int) -> None:
        for s in range(sector, sector + count):
            self.generation[s] = 0

    def discard(self, sector: int, count: int) -> None:
        for s in range(sector, sector + count):
            self.generation[s] = UNKNOWN

    def expected(self, sector: int) -> bytes | None:
        generation = self.generation[sector]
        return None if generation == UNKNOWN else sector_pattern(sector, generation)

    def mismatches(self, sector: int, data: bytes) -> list[str]:
        """One line per sector of ``data`` (read from ``sector`` on) that is not what the shadow expects."""
        problems = []
        for i in range(len(data) // SECTOR):
            s, got = sector + i, data[i * SECTOR:(i + 1) * SECTOR]
            want = self.expected(s)
            if want is None or got == want:
                continue
            found = identify_sector(got)
            if found is not None:
                what = f"sector {found[0]} generation {found[1]}"
            else:
                what = "zeroes" if got == bytes(SECTOR) else f"unknown bytes {got[:8].hex()}..."
            problems.append(f"sector {s}: expected generation {self.generation[s]}, got {what}")
        return problems

    def check_read(self, sector: int, data: bytes) -> None:
        """DeviceViolation(blk.IN.ok) unless every sector read back is what was written last."""
        problems = self.mismatches(sector, data)
        if problems:
            raise DeviceViolation("blk.IN.ok", "; ".join(problems[:8]))
