"""Transmit packets for the net datapath machine: well formed, or breaking one driver rule of §5.1.6.2 on purpose.

A packet is what the driver places on a transmitq: ``virtio_net_hdr_v1`` and one Ethernet frame (two
buffers), or, to break ``net.driver.tx.short_header``, fewer bytes than the header (one buffer).
Every frame is a suite frame (:func:`~vdpacert.conformance.driver.traffic.build_frame`: sequence
number at byte 14, CRC32 of the payload), so whatever comes back on a receiveq can be traced.

This module only builds bytes. What the device must do with each packet (loop it back with which
receive header, or drop it under which rule) is :meth:`vdpacert.model.net.LoopbackNet.transmit`'s
decision, and the machine compares the device with it.

Two choices keep each check a comparison with one answer:

- A checksum request (NEEDS_CSUM) is placed after the frame's sequence number and CRC
  (``csum_start`` = :data:`CSUM_START`), so completing it never hides the sequence number, and the
  partial sum is chosen so the completed checksum is not zero: ones' complement has two zeros
  (0x0000 and 0xFFFF), and a device may store either.
- NEEDS_CSUM without VIRTIO_NET_F_CSUM (:attr:`TxKind.CSUM_NOT_NEGOTIATED`) has no device rule: the
  device may ignore the flag (the model's reading) or honour it. The frame is built so both readings
  give the same bytes (its checksum field is a fixed point of the completion), and the machine sends
  it only when GUEST_CSUM is off too, where the receive header carries flags 0 either way (§5.1.6.4.1).
"""

from __future__ import annotations

import enum
import random
import struct
import zlib
from dataclasses import dataclass
from typing import Final

from hypothesis import strategies as st

from vdpacert.conformance.driver.traffic import ETH_HLEN, FRAME_META, build_frame, net_hdr
from vdpacert.model.net import complete_checksum
from vdpacert.uapi import virtio_net as N  # noqa: N812 - read like the C names

__all__ = ["CSUM_START", "TxKind", "TxPacket", "build_packet", "fixed_point_frame", "kinds_for", "plain_packet"]

#: Where checksummed frames start their sum: the payload, after the sequence number and the CRC.
CSUM_START: Final = FRAME_META
#: Checksum field offsets from CSUM_START (even, so the field is one 16-bit word of the sum): IP, UDP, TCP-like.
CSUM_OFFSETS: Final = (0, 6, 16)
#: Transmit buffers shorter than virtio_net_hdr_v1.
SHORT_LENGTHS: Final = (1, 6, N.VIRTIO_NET_HDR_V1_SIZE - 1)
GSO_TYPES: Final = (N.VIRTIO_NET_HDR_GSO_TCPV4, N.VIRTIO_NET_HDR_GSO_TCPV6, N.VIRTIO_NET_HDR_GSO_UDP,
                    N.VIRTIO_NET_HDR_GSO_UDP_L4)
_NEEDS_CSUM: Final = N.VIRTIO_NET_HDR_F_NEEDS_CSUM


class TxKind(enum.Enum):
    """What a transmitted packet does; each kind but PLAIN and CSUM breaks the driver rule it names."""

    PLAIN = "plain"
    CSUM = "csum"  # NEEDS_CSUM with CSUM negotiated and a checksum field inside the frame
    NUM_BUFFERS = "num_buffers"  # net.driver.tx.num_buffers
    RX_FLAGS = "flags"  # DATA_VALID / RSC_INFO: net.driver.tx.flags
    CSUM_NOT_NEGOTIATED = "flags_without_csum"  # net.driver.tx.flags_without_csum
    CSUM_BAD_OFFSETS = "csum_offsets"  # net.driver.tx.csum_offsets
    GSO = "gso"  # net.driver.tx.gso (this machine never negotiates a HOST_* GSO feature)
    SHORT_HEADER = "short_header"  # net.driver.tx.short_header
    OVER_MTU = "mtu"  # longer than mtu + the Ethernet header: net.driver.tx.mtu (with MTU negotiated)


@dataclass(frozen=True)
class TxPacket:
    """The buffers of one transmit chain, the sequence number it carries (or stands for) and its kind."""

    buffers: tuple[bytes, ...]
    seq: int
    kind: TxKind

    @property
    def data(self) -> bytes:
        """Header and frame as the device reads them: what the model's ``transmit`` takes."""
        return b"".join(self.buffers)


def _has(features: int, bit: int) -> bool:
    return bool(features >> bit & 1)


def kinds_for(features: int) -> list[TxKind]:
    """The kinds this machine sends under ``features``, those only some feature sets allow first.

    See the module docstring for why NEEDS_CSUM without CSUM is sent only with GUEST_CSUM off too.
    """
    csum, guest_csum = _has(features, N.VIRTIO_NET_F_CSUM), _has(features, N.VIRTIO_NET_F_GUEST_CSUM)
    kinds = []
    if csum:
        kinds += [TxKind.CSUM, TxKind.CSUM_BAD_OFFSETS]
    elif not guest_csum:
        kinds.append(TxKind.CSUM_NOT_NEGOTIATED)
    return [*kinds, TxKind.NUM_BUFFERS, TxKind.RX_FLAGS, TxKind.GSO, TxKind.SHORT_HEADER, TxKind.OVER_MTU]


def _reseal(frame: bytearray) -> bytes:
    """Recompute the suite frame's payload CRC (the checksum field lies in the payload)."""
    struct.pack_into("<I", frame, FRAME_META - 4, zlib.crc32(bytes(frame[FRAME_META:])))
    return bytes(frame)


def _set_field(frame: bytes, at: int, value: int) -> bytes:
    out = bytearray(frame)
    out[at:at + 2] = value.to_bytes(2, "big")
    return _reseal(out)


def _ones_sum(body: bytes) -> int:
    if len(body) % 2:
        body += b"\0"
    total = sum(int.from_bytes(body[i:i + 2], "big") for i in range(0, len(body), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def fixed_point_frame(seq: int, length: int, csum_offset: int) -> bytes:
    """A suite frame whose checksum field already holds what completing the checksum would store there.

    With the field at zero the sum of the rest is S; completion stores ~(S + x), so x is a fixed point
    when 2x = -S in ones' complement arithmetic (mod 0xFFFF, where 2 has the inverse 0x8000).
    """
    at = CSUM_START + csum_offset
    frame = build_frame(seq, length)
    for tweak in range(256):
        if tweak:  # S hit a zero of ones' complement: change one payload byte past the field and retry
            frame = _set_field(frame, length - 2, tweak)
        base = _set_field(frame, at, 0)
        rest = _ones_sum(base[CSUM_START:])
        x = ((0xFFFF - rest) * 0x8000) % 0xFFFF
        candidate = _set_field(base, at, x)
        if x not in (0, 0xFFFF) and complete_checksum(candidate, CSUM_START, csum_offset) == candidate:
            return candidate
    raise AssertionError(f"no checksum fixed point for a {length}-byte frame")  # pragma: no cover


def _partial_checksum_frame(seq: int, length: int, csum_offset: int, partial: int) -> bytes:
    """A suite frame with ``partial`` (a pseudo-header sum) in its checksum field; completing it gives no zero."""
    at = CSUM_START + csum_offset
    for step in range(3):
        frame = _set_field(build_frame(seq, length), at, (partial + step) & 0xFFFF)
        done = complete_checksum(frame, CSUM_START, csum_offset)
        if done[at:at + 2] not in (b"\x00\x00", b"\xff\xff"):
            return frame
    raise AssertionError("three consecutive partial sums cannot all complete to zero")  # pragma: no cover


def plain_packet(seq: int, length: int) -> TxPacket:
    """A well-formed packet: a plain transmit header (no offload) and a suite frame."""
    return TxPacket((net_hdr(), build_frame(seq, length)), seq, TxKind.PLAIN)


def build_packet(data: st.DataObject, kind: TxKind, seq: int, length: int, features: int, *,
                 mtu: int = 1500) -> TxPacket:
    """A packet of ``kind`` carrying ``seq`` (a frame of ``length`` bytes where the kind has one; OVER_MTU
    frames are longer than ``mtu`` plus the Ethernet header instead).

    The header values come from one Hypothesis draw (a seed for ``random.Random``), like the control
    commands' data; the packet's bytes go to the model, which says what the device must do with them.
    """
    rng = random.Random(data.draw(st.integers(0, 2**32 - 1), label=f"{kind.value} packet seed"))
    csum_offset = rng.choice(CSUM_OFFSETS)
    if kind is TxKind.PLAIN:
        return plain_packet(seq, length)
    if kind is TxKind.OVER_MTU:
        return TxPacket(plain_packet(seq, mtu + ETH_HLEN + 1 + rng.randint(0, 64)).buffers, seq, kind)
    if kind is TxKind.SHORT_HEADER:
        return TxPacket((bytes([seq & 0xFF]) * rng.choice(SHORT_LENGTHS),), seq, kind)
    if kind is TxKind.NUM_BUFFERS:
        hdr = net_hdr(num_buffers=rng.choice((1, 2, 0xFFFF)))
        return TxPacket((hdr, build_frame(seq, length)), seq, kind)
    if kind is TxKind.RX_FLAGS:
        flags = rng.choice((N.VIRTIO_NET_HDR_F_DATA_VALID, N.VIRTIO_NET_HDR_F_RSC_INFO))
        if _has(features, N.VIRTIO_NET_F_CSUM) and rng.random() < 0.5:
            frame = _partial_checksum_frame(seq, length, csum_offset, rng.randint(0, 0xFFFF))
            hdr = net_hdr(flags=flags | _NEEDS_CSUM, csum_start=CSUM_START, csum_offset=csum_offset)
            return TxPacket((hdr, frame), seq, kind)
        return TxPacket((net_hdr(flags=flags), build_frame(seq, length)), seq, kind)
    if kind is TxKind.CSUM:
        frame = _partial_checksum_frame(seq, length, csum_offset, rng.randint(0, 0xFFFF))
        return TxPacket((net_hdr(flags=_NEEDS_CSUM, csum_start=CSUM_START, csum_offset=csum_offset), frame), seq,
                        kind)
    if kind is TxKind.CSUM_NOT_NEGOTIATED:
        hdr = net_hdr(flags=_NEEDS_CSUM, csum_start=CSUM_START, csum_offset=csum_offset)
        return TxPacket((hdr, fixed_point_frame(seq, length, csum_offset)), seq, kind)
    if kind is TxKind.CSUM_BAD_OFFSETS:
        start = rng.choice((CSUM_START, length - 1, length + 20, 0xFFF0))
        offset = length - start - 1 if start < length else csum_offset
        hdr = net_hdr(flags=_NEEDS_CSUM, csum_start=start, csum_offset=offset)
        return TxPacket((hdr, build_frame(seq, length)), seq, kind)
    if kind is TxKind.GSO:
        flags = _NEEDS_CSUM if _has(features, N.VIRTIO_NET_F_CSUM) else 0
        hdr = net_hdr(flags=flags, gso_type=rng.choice(GSO_TYPES), hdr_len=CSUM_START + 20, gso_size=1448,
                      csum_start=CSUM_START, csum_offset=csum_offset)
        return TxPacket((hdr, build_frame(seq, length)), seq, kind)
    raise ValueError(f"no builder for {kind}")
