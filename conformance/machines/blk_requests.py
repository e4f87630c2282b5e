"""The virtio-blk requests the datapath machine sends: well-formed ones, unsupported ones, and driver errors.

A :class:`Planned` request is a chain to submit plus what the machine needs to judge the answer
(the sectors it touches, whether it may change the disk). Three families, each drawn here and
judged by :class:`vdpacert.model.blk.BlkDiskModel` in the machine:

* :func:`plan_well_formed`: IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES as a driver sends
  them, at sectors anywhere on the disk and around ``capacity`` (past it, the driver breaks
  ``blk.driver.beyond_capacity`` and the model says what the device answers).
* :func:`plan_unsupported`: one request of every type the device has no business executing under
  the negotiated features (every type whose feature was left out, the zoned, lifetime and secure
  erase types included) and of a type the spec does not define. Each gets the data area its type
  has and names one sector, which the machine reads back: a device that executed a ZONE_APPEND,
  SECURE_ERASE or DISCARD it should have refused shows it there.
* :func:`plan_driver_errors`: one request for each driver rule of §5.2.6.1 the negotiated
  features let the device tell apart (data not a multiple of 512, FLUSH with a sector or with
  data, a GET_ID area other than 20 bytes, a discard / write-zeroes payload that is not whole
  segments, too many segments, a segment too long, an unknown flag, unmap on a discard). Each
  request breaks one rule, so the model's answer is the answer to that rule and not to the order
  in which a device checks two of them.

GET_ID with a data area other than 20 bytes: the spec binds only the driver (§5.2.6.1), and the
model grades IOERR as a SHOULD. Linux's ``vdpa_sim_blk`` (``vringh_iov_push_iotlb`` of the 20
ID bytes) copies the NUL-padded ID truncated to the area and answers OK, as QEMU answers OK too;
:func:`get_id_truncated_ok` accepts exactly that answer besides the model's, a stated difference
like the net control queue's ``ALSO_ACCEPTED`` (:mod:`.net_ctrl`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hypothesis import strategies as st

from vdpacert.conformance.driver.traffic import SECTOR, SEGMENT, BlkRequest, sector_pattern
from vdpacert.model.blk import BLK_REQUEST_TYPES, NOT_MODELLED_FEATURES, RequestType
from vdpacert.uapi import virtio_blk as B  # noqa: N812

__all__ = ["UNKNOWN_TYPES", "BlkLimits", "FakeGenerations", "Planned", "fake_data", "get_id_truncated_ok",
           "id_string_problem", "plan_driver_errors", "plan_unsupported", "plan_well_formed", "raw_request"]

OUTHDR = struct.Struct("<IIQ")  # struct virtio_blk_outhdr: type, ioprio, sector
UNMAP = B.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
U32_MAX = 0xFFFF_FFFF
#: Request types the spec does not define, near the defined ones and far away (legacy SCSI_CMD 2 and the
#: legacy barrier bit 0x80000000 included: a VERSION_1 device knows neither).
UNKNOWN_TYPES: tuple[int, ...] = tuple(t for t in (2, 3, 5, 6, 7, 9, 12, 17, 19, 25, 27, 31, 0x80, 0x8000_0000,
                                                   0x8000_0001, U32_MAX) if t not in BLK_REQUEST_TYPES)
#: A ZONE_APPEND carries data like an OUT; a ZONE_REPORT returns a report like an IN (§5.2.6).
_ZONE_APPEND, _ZONE_REPORT = 15, 16
#: Data lengths that are not whole sectors: under one, just under and over one, several.
_UNALIGNED = st.sampled_from([1, 100, SECTOR - 1, SECTOR + 1, 1000, 3 * SECTOR + 7])
#: What a DISCARD / WRITE_ZEROES request can get wrong (a DISCARD also: the unmap flag).
_SEGMENT_ERRORS: tuple[str, ...] = ("segment_length", "too_many_segments", "too_many_sectors", "unknown_flag")


@dataclass(frozen=True)
class BlkLimits:
    """What the machine knows of the device when it builds a request: disk size, limits, negotiated features."""

    capacity: int
    features: int
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0

    def negotiated(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)


@dataclass
class Planned:
    """One request as the machine builds it: what to send, and what the OK case changes in the shadow.

    ``kind`` is how the machine reads the answer (``in`` data is checked against the disk, ``get_id``
    against the serial, ``out`` / ``discard`` / ``write_zeroes`` change the shadow when OK);
    ``segments`` are the whole (sector, count) ranges a discard / write-zeroes payload names,
    ``breaks`` says which driver rule the request breaks on purpose (for messages), and ``fake``
    is the generation of the pattern data it carries if the device must not store it (a sector
    found holding that data names the request that leaked it).
    """

    kind: str
    request: BlkRequest
    sector: int = 0
    count: int = 0
    segments: tuple[tuple[int, int], ...] = ()
    breaks: str = ""
    fake: int = 0  # the pattern generation of the data it carries that no accepted write has (0: none)

    def sectors(self) -> set[int]:
        if self.kind in ("in", "out"):
            return set(range(self.sector, self.sector + self.count))
        return {s for start, n in self.segments for s in range(start, start + n)}

    @property
    def mutates(self) -> bool:
        return self.kind in ("out", "discard", "write_zeroes")

    def describe(self) -> str:
        what = f"{self.kind} type {self.request.type} (sector {self.sector}, count {self.count}, " \
               f"segments {list(self.segments)})"
        return f"{what}, breaking {self.breaks}" if self.breaks else what


def raw_request(type_: int, sector: int = 0, out: Sequence[bytes] = (), data_in: int = 0, *,
                status: bool = True) -> BlkRequest:
    """Any request: the header, readable parts, a writable data area of ``data_in`` bytes, the status byte."""
    readable = (OUTHDR.pack(type_, 0, sector), *(part for part in out if part))
    writable = ((data_in,) if data_in else ()) + ((1,) if status else ())
    return BlkRequest(type_, sector, readable, writable)


def _segments(ranges: Sequence[tuple[int, int]], flags: Sequence[int] | None = None) -> bytes:
    flags = flags if flags is not None else [0] * len(ranges)
    return b"".join(SEGMENT.pack(s, n, f) for (s, n), f in zip(ranges, flags, strict=True))


#: Hands out pattern generations no accepted write ever has (one per request that carries such data).
FakeGenerations = Callable[[], int]


def fake_data(sector: int, nbytes: int, generation: int) -> bytes:
    """``nbytes`` of pattern data of ``generation`` (one of :data:`FakeGenerations`') from ``sector`` on."""
    sectors = -(-nbytes // SECTOR)
    return b"".join(sector_pattern(s & U32_MAX, generation) for s in range(sector, sector + sectors))[:nbytes]


# ----- well-formed ---------------------------------------------------------------------------------------------

def plan_well_formed(data: st.DataObject, limits: BlkLimits, sectors: st.SearchStrategy[int],
                     fake: FakeGenerations) -> Planned:
    """A request as a driver sends it (its sectors may still run past the capacity: the model answers)."""
    # OUT first: a failing example shrinks towards the first kind, and a write is what matters most.
    kind = data.draw(st.sampled_from(["out", "in", "out", "in", "flush", "get_id", "discard", "write_zeroes"]),
                     label="request")
    if kind in ("in", "out"):
        sector, count = data.draw(sectors, label="sector"), data.draw(st.integers(1, 8), label="count")
        if kind == "in":
            return Planned(kind, raw_request(B.VIRTIO_BLK_T_IN, sector, data_in=count * SECTOR), sector, count)
        # Refused-write data: the machine swaps in the shadow's data when the model accepts the write.
        generation = fake()
        out = fake_data(sector, count * SECTOR, generation)
        return Planned(kind, raw_request(B.VIRTIO_BLK_T_OUT, sector, [out]), sector, count, fake=generation)
    if kind == "flush":
        return Planned(kind, raw_request(B.VIRTIO_BLK_T_FLUSH))
    if kind == "get_id":
        return Planned(kind, raw_request(B.VIRTIO_BLK_T_GET_ID, data_in=B.VIRTIO_BLK_ID_BYTES))
    # Half the segments well inside the disk: a request is accepted only if all of its segments are.
    inside = st.integers(0, max(0, limits.capacity - 17))
    ranges = tuple(data.draw(st.lists(st.tuples(st.one_of(inside, sectors), st.integers(0, 16)), min_size=1,
                                      max_size=3), label="segments"))
    if kind == "discard":
        return Planned(kind, raw_request(B.VIRTIO_BLK_T_DISCARD, 0, [_segments(ranges)]), segments=ranges)
    flags = UNMAP if data.draw(st.booleans(), label="unmap") else 0
    return Planned(kind, raw_request(B.VIRTIO_BLK_T_WRITE_ZEROES, 0, [_segments(ranges, [flags] * len(ranges))]),
                   segments=ranges)


# ----- unsupported -------------------------------------------------------------------------------------------

def _shaped(row: RequestType, sector: int, fake: FakeGenerations) -> Planned:
    """A request of type ``row`` with the data area its type has (see the module docstring)."""
    if row.data == "in" or (row.data == "zone" and row.type == _ZONE_REPORT):
        return Planned("unsupported", raw_request(row.type, sector, data_in=SECTOR), sector, 1)
    if row.data == "out" or (row.data == "zone" and row.type == _ZONE_APPEND):
        generation = fake()
        return Planned("unsupported", raw_request(row.type, sector, [fake_data(sector, SECTOR, generation)]), sector,
                       1, segments=((sector, 1),), fake=generation)
    if row.data == "segments":
        return Planned("unsupported", raw_request(row.type, 0, [_segments([(sector, 1)])]), segments=((sector, 1),))
    if row.data == "id":
        return Planned("unsupported", raw_request(row.type, 0, data_in=B.VIRTIO_BLK_ID_BYTES))
    if row.data == "zone":  # open, close, finish, reset: the zone is named by its start sector
        return Planned("unsupported", raw_request(row.type, sector), segments=((sector, 1),))
    return Planned("unsupported", raw_request(row.type, 0))


def plan_unsupported(data: st.DataObject, limits: BlkLimits, sector: int, fake: FakeGenerations) -> list[Planned]:
    """A request of a type the spec does not define, then one of each type whose feature was not negotiated.

    Every request names ``sector`` (in its header or its one segment); those that carry data carry
    pattern data no write the machine records ever has.
    """
    unknown = data.draw(st.sampled_from(UNKNOWN_TYPES), label="unknown type")
    area = data.draw(st.sampled_from(["none", "in", "out"]), label="unknown type data")
    generation = fake() if area == "out" else 0
    out = [fake_data(sector, SECTOR, generation)] if generation else []
    plans = [Planned("unsupported", raw_request(unknown, sector, out, SECTOR if area == "in" else 0), fake=generation)]
    for row in BLK_REQUEST_TYPES.values():
        if row.feature is None or limits.negotiated(row.feature):
            continue
        if not row.modelled and limits.features & NOT_MODELLED_FEATURES:
            continue  # the model cannot predict the others once one of these is negotiated
        plans.append(_shaped(row, sector, fake))
    return plans


# ----- driver errors -------------------------------------------------------------------------------------------

def _segment_error(data: st.DataObject, limits: BlkLimits, kind: str, error: str, sector: int) -> Planned | None:
    """A DISCARD (``kind`` "discard") or WRITE_ZEROES breaking ``error``; None when the device's limits leave
    nothing to break that way (no limit, or one no u32 passes)."""
    is_discard = kind == "discard"
    type_ = B.VIRTIO_BLK_T_DISCARD if is_discard else B.VIRTIO_BLK_T_WRITE_ZEROES
    max_seg = limits.max_discard_seg if is_discard else limits.max_write_zeroes_seg
    max_sectors = limits.max_discard_sectors if is_discard else limits.max_write_zeroes_sectors
    ranges: list[tuple[int, int]] = [(sector, 1)]
    flags = [0]
    tail = b""
    if error == "segment_length":
        # No segment at all, or whole segments and a part of one.
        if data.draw(st.booleans(), label="empty payload"):
            ranges, flags = [], []
        else:
            tail = bytes(data.draw(st.sampled_from([1, 8, SEGMENT.size - 1]), label="tail bytes"))
    elif error == "too_many_segments":
        if not max_seg:
            return None
        count = max_seg + data.draw(st.integers(1, 3), label="extra segments")
        ranges = [((sector + i) % max(1, limits.capacity), 1) for i in range(count)]
        flags = [0] * count
    elif error == "too_many_sectors":
        if not 0 < max_sectors < U32_MAX:
            return None
        ranges = [(sector, data.draw(st.integers(max_sectors + 1, U32_MAX), label="segment sectors"))]
    elif error == "unknown_flag":
        unknown = data.draw(st.sampled_from([2, 4, 0x8000_0000, U32_MAX & ~UNMAP]), label="flag")
        flags = [unknown | (0 if is_discard else data.draw(st.sampled_from([0, UNMAP]), label="and unmap"))]
    elif error == "unmap":
        flags = [UNMAP]
    payload = _segments(ranges, flags) + tail
    return Planned(kind, raw_request(type_, 0, [payload]), segments=tuple(ranges), breaks=error)


def plan_driver_errors(data: st.DataObject, limits: BlkLimits, sectors: st.SearchStrategy[int],
                       fake: FakeGenerations) -> list[Planned]:
    """One request for each driver error the negotiated features let the device tell apart.

    A FLUSH, DISCARD or WRITE_ZEROES error is sent only when its type was negotiated: without it
    the answer is UNSUPP whatever the error, which :func:`plan_unsupported` covers. Sectors are in
    range (a request breaks one rule), one per request from a drawn one on; the data of an OUT is
    pattern data no recorded write has. Few, small draws: a failing example shrinks fast.
    """
    plans: list[Planned] = []
    base = data.draw(st.integers(0, max(0, limits.capacity - 1)), label="sector")
    cursor = iter(range(base, base + 64))

    def sector() -> int:
        return next(cursor) % max(1, limits.capacity)

    at, nbytes = sector(), data.draw(_UNALIGNED, label="in bytes")
    plans.append(Planned("in", raw_request(B.VIRTIO_BLK_T_IN, at, data_in=nbytes), at, -(-nbytes // SECTOR),
                         breaks="in_unaligned"))
    at, nbytes, generation = sector(), data.draw(_UNALIGNED, label="out bytes"), fake()
    plans.append(Planned("out", raw_request(B.VIRTIO_BLK_T_OUT, at, [fake_data(at, nbytes, generation)]), at,
                         -(-nbytes // SECTOR), breaks="out_unaligned", fake=generation))
    room = data.draw(st.sampled_from([0, 1, 8, 19, 21, 32, 40]), label="id area")
    plans.append(Planned("get_id", raw_request(B.VIRTIO_BLK_T_GET_ID, data_in=room), breaks="get_id_length"))
    if limits.negotiated(B.VIRTIO_BLK_F_FLUSH):
        nonzero = data.draw(sectors.filter(bool), label="flush sector")
        plans.append(Planned("flush", raw_request(B.VIRTIO_BLK_T_FLUSH, nonzero), breaks="flush_sector"))
        size = data.draw(st.sampled_from([1, 16, SECTOR]), label="flush data bytes")
        if data.draw(st.booleans(), label="flush data in"):
            request = raw_request(B.VIRTIO_BLK_T_FLUSH, data_in=size)
        else:
            request = raw_request(B.VIRTIO_BLK_T_FLUSH, 0, [bytes(size)])
        plans.append(Planned("flush", request, breaks="flush_data"))
    for kind, bit, errors in (("discard", B.VIRTIO_BLK_F_DISCARD, (*_SEGMENT_ERRORS, "unmap")),
                              ("write_zeroes", B.VIRTIO_BLK_F_WRITE_ZEROES, _SEGMENT_ERRORS)):
        if limits.negotiated(bit):
            plans += [p for error in errors if (p := _segment_error(data, limits, kind, error, sector())) is not None]
    return plans


# ----- an answer besides the model's -----------------------------------------------------------------------

def id_string_problem(area: bytes) -> str | None:
    """What keeps a 20-byte GET_ID answer from being "a NUL-padded ASCII string up to 20 bytes long" (§5.2.6).

    None when it is one: ASCII characters other than NUL, then only NULs to the end of the area.
    """
    text = area.rstrip(b"\0")
    if b"\0" in text:
        return f"a non-NUL byte at offset {len(text) - 1} follows a NUL: not NUL-padded"
    if any(byte > 0x7F for byte in text):
        return "not an ASCII string"
    return None


def get_id_truncated_ok(room: int, serial: bytes | None) -> Callable[[int, bytes, int], str | None]:
    """A judge for the vdpa_sim_blk answer to a GET_ID area of ``room`` bytes (see the module docstring).

    The judge takes (status, data area, used len) and says what is wrong with it as that answer
    (None: it is that answer). ``serial`` is the device's 20-byte ID as an earlier GET_ID returned
    it (None: not known yet, only the shape is judged).
    """
    copied = min(room, B.VIRTIO_BLK_ID_BYTES)
    bound = copied + 1 if copied == room else copied  # the status byte counts only when the ID reaches it

    def judge(status: int, area: bytes, used_len: int) -> str | None:
        if status != B.VIRTIO_BLK_S_OK:
            return f"status {status}"
        if serial is not None and area[:copied] != serial[:copied]:
            return f"ID {area[:copied]!r}, not the first {copied} bytes of {serial!r}"
        if used_len > bound:
            return f"used len {used_len}, but at most {bound} byte(s) from the first writable byte were written"
        return None

    return judge
