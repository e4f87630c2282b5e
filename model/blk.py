"""virtio-blk as the spec defines it: the config layout and what each request does to a disk.

:class:`BlkDiskModel` is a pure ramdisk of a given capacity. ``execute`` takes a request the
way the device sees it (the device-readable bytes, concatenated, and the lengths of the
device-writable buffers) and returns a :class:`BlkOutcome`: the status byte, the bytes the
device writes before it, the disk afterwards, and which rule fixed that answer. Because the
readable bytes arrive concatenated, the model is framing-independent by construction, as a
modern device must be (§2.7.4: no assumption about how the request is split into buffers).

How binding an answer is (``BlkOutcome.level``):

- MUST where the spec says so: IOERR and no data written for a write to a device that
  offers VIRTIO_BLK_F_RO; UNSUPP for unknown discard / write-zeroes flags, for discard with
  ``unmap``, and for zoned requests without VIRTIO_BLK_F_ZONED; zeroes after write zeroes;
  the data of a read, the ID string (§5.2.6, §5.2.6.2).
- SHOULD where only the driver is bound (reads past ``capacity``, data lengths that are not
  a multiple of 512, a GET_ID buffer that is not 20 bytes: §5.2.6.1) and the device's answer
  follows the meaning the spec gives its status codes (IOERR "for device or driver error",
  UNSUPP "for a request unsupported by device", §5.2.6) without a MUST. The reference
  device gives exactly that answer and never touches the disk on an error.

Malformed requests (no device-writable byte for the status, or fewer than 16 readable bytes
of header) are bad input with no single right answer: a device must not crash nor write the
disk; it may complete with IOERR when it has a status byte, or enter an error state and set
DEVICE_NEEDS_RESET (§2.1.2). The outcome then has ``status=None`` and ``bad_input=True``.

Every answer is a row of :data:`BLK_REQUEST_RULES`: a :class:`RequestRule` per request type
and case (``blk.OUT.beyond_capacity``: IOERR, SHOULD, §5.2.6), holding the status byte the
device answers with; the driver rules a request can break are the ``DRIVER_*`` constants
(``blk.driver.*``). :data:`RULES` lists them all, with the config rules.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Final

from vdpacert.uapi import virtio_blk as uapi

from . import sections
from .config_space import ConfigField, ConfigLayout, ConfigWriteRules, Presence, build_layout
from .spec import Citation, Level, Rule, Section, SpecError, Violation

__all__ = [
    "BAD_INPUT_STATUSES",
    "BLK_CONFIG_LAYOUT",
    "BLK_REQUEST_RULES",
    "BLK_REQUEST_TYPES",
    "RULES",
    "Answer",
    "BlkConfig",
    "BlkDiskModel",
    "BlkModelError",
    "BlkOutcome",
    "NotModelled",
    "RequestRule",
    "RequestType",
    "SparseDisk",
    "build_request",
    "discard_segment",
]

SECTOR: Final = uapi.VIRTIO_BLK_SECTOR_SIZE
OUTHDR: Final = uapi.VIRTIO_BLK_OUTHDR_SIZE
SEGMENT: Final = uapi.VIRTIO_BLK_DISCARD_WZ_SEG_SIZE
ID_BYTES: Final = uapi.VIRTIO_BLK_ID_BYTES
UNMAP: Final = uapi.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP

BLK_DEVICE_INIT: Final = Section("5.2.5", "Block Device: Device Initialization")
BLK_DEVICE_INIT_DRIVER: Final = Section("5.2.5.1", "Block Device: Driver Requirements: Device Initialization")
BLK_DEVICE_INIT_DEVICE: Final = Section("5.2.5.2", "Block Device: Device Requirements: Device Initialization")

#: What a device may answer to a malformed request (besides setting DEVICE_NEEDS_RESET, §2.1.2).
BAD_INPUT_STATUSES: Final = frozenset({uapi.VIRTIO_BLK_S_IOERR})


class BlkModelError(SpecError, ValueError):
    """Misuse of the blk model (negative lengths, a disk of the wrong size, ...)."""


class NotModelled(BlkModelError):
    """A negotiated feature whose requests the model does not predict (LIFETIME, SECURE_ERASE, ZONED)."""


# --------------------------------------------------------------------------------------------
# Configuration layout (§5.2.4): 96 bytes up to the zoned characteristics.
# --------------------------------------------------------------------------------------------
#: Writes outside ``writeback``: §5.2.5 defines only that field as writable, without a MUST.
#: ``writeback`` is one byte, so no write can cover part of it: there is no partial-write rule.
CONFIG_WRITE_RULES: Final = ConfigWriteRules(
    unmapped=Rule("blk.config.driver_write.unmapped", Level.SHOULD, BLK_DEVICE_INIT,
                  "a config write should hit a field (only writeback is writable)"),
    read_only=Rule("blk.config.driver_write.read_only", Level.SHOULD, BLK_DEVICE_INIT,
                   "the driver should write only writeback, and only with VIRTIO_BLK_F_CONFIG_WCE negotiated"),
)
WRITEBACK_READ_BEFORE_FEATURES_OK: Final = Rule(
    "blk.config.writeback.read_before_features_ok", Level.MUST, BLK_DEVICE_INIT,
    "the driver must not read writeback before setting FEATURES_OK")
WRITEBACK_VALUE: Final = Rule(
    "blk.config.writeback.value", Level.MUST, BLK_DEVICE_INIT,
    "writeback takes 0 (writethrough) or 1 (writeback)")
WRITEBACK_WRITE: Final = Rule(
    "blk.config.writeback.write", Level.MUST, BLK_DEVICE_INIT,
    "with VIRTIO_BLK_F_CONFIG_WCE negotiated, a whole write of 0 or 1 to writeback sets the cache mode")


def _f(name: str, offset: int, size: int, *exists: int, section: Section = sections.BLK_CONFIG,
       **extra: object) -> ConfigField:
    return ConfigField(name, offset, size, section, exists_if=tuple(exists),
                       **extra)  # type: ignore[arg-type]


_DISCARD = uapi.VIRTIO_BLK_F_DISCARD
_WZ = uapi.VIRTIO_BLK_F_WRITE_ZEROES
_SE = uapi.VIRTIO_BLK_F_SECURE_ERASE
_ZONED = uapi.VIRTIO_BLK_F_ZONED

BLK_CONFIG_LAYOUT: Final[ConfigLayout] = build_layout(
    "blk", uapi.VIRTIO_BLK_CONFIG_SIZE, sections.BLK_CONFIG, (
    _f("capacity", uapi.VIRTIO_BLK_CONFIG_CAPACITY, 8, summary="size in 512-byte sectors, always present"),
    _f("size_max", uapi.VIRTIO_BLK_CONFIG_SIZE_MAX, 4, uapi.VIRTIO_BLK_F_SIZE_MAX),
    _f("seg_max", uapi.VIRTIO_BLK_CONFIG_SEG_MAX, 4, uapi.VIRTIO_BLK_F_SEG_MAX),
    _f("geometry.cylinders", uapi.VIRTIO_BLK_CONFIG_GEOMETRY, 2, uapi.VIRTIO_BLK_F_GEOMETRY),
    _f("geometry.heads", uapi.VIRTIO_BLK_CONFIG_GEOMETRY + 2, 1, uapi.VIRTIO_BLK_F_GEOMETRY),
    _f("geometry.sectors", uapi.VIRTIO_BLK_CONFIG_GEOMETRY + 3, 1, uapi.VIRTIO_BLK_F_GEOMETRY),
    _f("blk_size", uapi.VIRTIO_BLK_CONFIG_BLK_SIZE, 4, uapi.VIRTIO_BLK_F_BLK_SIZE),
    _f("topology.physical_block_exp", uapi.VIRTIO_BLK_CONFIG_TOPOLOGY, 1, uapi.VIRTIO_BLK_F_TOPOLOGY),
    _f("topology.alignment_offset", uapi.VIRTIO_BLK_CONFIG_TOPOLOGY + 1, 1, uapi.VIRTIO_BLK_F_TOPOLOGY),
    _f("topology.min_io_size", uapi.VIRTIO_BLK_CONFIG_TOPOLOGY + 2, 2, uapi.VIRTIO_BLK_F_TOPOLOGY),
    _f("topology.opt_io_size", uapi.VIRTIO_BLK_CONFIG_TOPOLOGY + 4, 4, uapi.VIRTIO_BLK_F_TOPOLOGY),
    _f("writeback", uapi.VIRTIO_BLK_CONFIG_WRITEBACK, 1, uapi.VIRTIO_BLK_F_CONFIG_WCE,
       section=BLK_DEVICE_INIT, writable_if=uapi.VIRTIO_BLK_F_CONFIG_WCE, write_rule=WRITEBACK_WRITE,
       allowed_writes=frozenset({0, 1}), value_rule=WRITEBACK_VALUE,
       read_needs_features_ok=WRITEBACK_READ_BEFORE_FEATURES_OK,
       summary="0 writethrough, 1 writeback; the one driver-writable field (§5.2.5)"),
    _f("unused0", uapi.VIRTIO_BLK_CONFIG_WRITEBACK + 1, 1, section=BLK_DEVICE_INIT_DEVICE, padding=True),
    _f("num_queues", uapi.VIRTIO_BLK_CONFIG_NUM_QUEUES, 2, uapi.VIRTIO_BLK_F_MQ),
    _f("max_discard_sectors", uapi.VIRTIO_BLK_CONFIG_MAX_DISCARD_SECTORS, 4, _DISCARD),
    _f("max_discard_seg", uapi.VIRTIO_BLK_CONFIG_MAX_DISCARD_SEG, 4, _DISCARD),
    _f("discard_sector_alignment", uapi.VIRTIO_BLK_CONFIG_DISCARD_SECTOR_ALIGNMENT, 4, _DISCARD),
    _f("max_write_zeroes_sectors", uapi.VIRTIO_BLK_CONFIG_MAX_WRITE_ZEROES_SECTORS, 4, _WZ),
    _f("max_write_zeroes_seg", uapi.VIRTIO_BLK_CONFIG_MAX_WRITE_ZEROES_SEG, 4, _WZ),
    _f("write_zeroes_may_unmap", uapi.VIRTIO_BLK_CONFIG_WRITE_ZEROES_MAY_UNMAP, 1, _WZ),
    _f("unused1", uapi.VIRTIO_BLK_CONFIG_WRITE_ZEROES_MAY_UNMAP + 1, 3, section=BLK_DEVICE_INIT_DEVICE,
       padding=True, is_bytes=True),
    _f("max_secure_erase_sectors", 60, 4, _SE),
    _f("max_secure_erase_seg", 64, 4, _SE),
    _f("secure_erase_sector_alignment", 68, 4, _SE),
    _f("zoned.zone_sectors", 72, 4, _ZONED),
    _f("zoned.max_open_zones", 76, 4, _ZONED),
    _f("zoned.max_active_zones", 80, 4, _ZONED),
    _f("zoned.max_append_sectors", 84, 4, _ZONED),
    _f("zoned.write_granularity", 88, 4, _ZONED),
    _f("zoned.model", 92, 1, _ZONED),
    _f("zoned.unused2", 93, 3, _ZONED, section=BLK_DEVICE_INIT_DEVICE, padding=True, is_bytes=True),
), write_rules=CONFIG_WRITE_RULES)


@dataclass(frozen=True)
class BlkConfig:
    """The values a virtio-blk device puts in its config; ``render`` gives the 96 bytes."""

    capacity: int
    size_max: int = 0
    seg_max: int = 0
    blk_size: int = SECTOR
    num_queues: int = 1
    writeback: int = 0
    geometry: tuple[int, int, int] = (0, 0, 0)
    topology: tuple[int, int, int, int] = (0, 0, 0, 0)
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0

    def values(self) -> dict[str, int]:
        cyl, heads, secs = self.geometry
        exp, align, min_io, opt_io = self.topology
        return {
            "capacity": self.capacity, "size_max": self.size_max, "seg_max": self.seg_max,
            "geometry.cylinders": cyl, "geometry.heads": heads, "geometry.sectors": secs,
            "blk_size": self.blk_size, "topology.physical_block_exp": exp, "topology.alignment_offset": align,
            "topology.min_io_size": min_io, "topology.opt_io_size": opt_io, "writeback": self.writeback,
            "num_queues": self.num_queues, "max_discard_sectors": self.max_discard_sectors,
            "max_discard_seg": self.max_discard_seg,
            "discard_sector_alignment": self.discard_sector_alignment,
            "max_write_zeroes_sectors": self.max_write_zeroes_sectors,
            "max_write_zeroes_seg": self.max_write_zeroes_seg,
            "write_zeroes_may_unmap": self.write_zeroes_may_unmap,
        }

    def render(self, offered: int | None = None) -> bytes:
        """The config bytes. With ``offered``, fields of features not offered are left zero."""
        values: Mapping[str, int] = self.values()
        if offered is not None:
            values = {k: (0 if BLK_CONFIG_LAYOUT.presence(k, offered) is Presence.ABSENT else v)
                      for k, v in values.items()}
        return BLK_CONFIG_LAYOUT.render(values)


# --------------------------------------------------------------------------------------------
# The disk: sparse and immutable, so a 128 MiB capacity costs nothing until written.
# --------------------------------------------------------------------------------------------
_ZERO_SECTOR: Final = bytes(SECTOR)


@dataclass(frozen=True)
class SparseDisk:
    """``capacity`` sectors of 512 bytes; only sectors that are not all zero are stored."""

    capacity: int
    sectors: Mapping[int, bytes] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if self.capacity < 0:
            raise BlkModelError("capacity is a sector count, never negative")
        clean = {s: bytes(d) for s, d in self.sectors.items() if bytes(d) != _ZERO_SECTOR}
        for s, d in clean.items():
            if not 0 <= s < self.capacity or len(d) != SECTOR:
                raise BlkModelError(f"sector {s} is outside the disk or not {SECTOR} bytes")
        object.__setattr__(self, "sectors", MappingProxyType(clean))

    @classmethod
    def from_bytes(cls, capacity: int, image: bytes) -> SparseDisk:
        if len(image) != capacity * SECTOR:
            raise BlkModelError(f"an image of {capacity} sectors is {capacity * SECTOR} bytes, "
                                f"not {len(image)}")
        return cls(capacity, {i: image[i * SECTOR:(i + 1) * SECTOR] for i in range(capacity)})

    def read(self, sector: int, count: int) -> bytes:
        return b"".join(self.sectors.get(s, _ZERO_SECTOR) for s in range(sector, sector + count))

    def write(self, sector: int, data: bytes) -> SparseDisk:
        updated = dict(self.sectors)
        for i in range(len(data) // SECTOR):
            updated[sector + i] = data[i * SECTOR:(i + 1) * SECTOR]
        return SparseDisk(self.capacity, updated)

    def zero(self, ranges: Iterable[tuple[int, int]]) -> SparseDisk:
        updated = dict(self.sectors)
        for start, count in ranges:
            for s in range(start, start + count):
                updated.pop(s, None)
        return SparseDisk(self.capacity, updated)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SparseDisk):
            return NotImplemented
        return self.capacity == other.capacity and dict(self.sectors) == dict(other.sectors)

    def __hash__(self) -> int:
        return hash((self.capacity, frozenset(self.sectors.items())))


# --------------------------------------------------------------------------------------------
# Request types (§5.2.6): which feature makes each exist and what its data area is.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestType:
    """One request type: its number, the feature it needs (None: always), and its data shape.

    ``data`` is "in" (device writes sectors), "out" (device reads sectors), "none", "id"
    (device writes the 20-byte ID) or "segments" (readable discard / write-zeroes ranges).
    ``unsupp_level`` is how binding UNSUPP is when the feature was not negotiated.
    """

    name: str
    type: int
    feature: int | None
    data: str
    mutates: bool = False
    modelled: bool = True
    unsupp_level: Level = Level.SHOULD


_ZONE_TYPES: Final = (("ZONE_APPEND", 15), ("ZONE_REPORT", 16), ("ZONE_OPEN", 18), ("ZONE_CLOSE", 20),
                      ("ZONE_FINISH", 22), ("ZONE_RESET", 24), ("ZONE_RESET_ALL", 26))

BLK_REQUEST_TYPES: Final[Mapping[int, RequestType]] = MappingProxyType({row.type: row for row in (
    RequestType("IN", uapi.VIRTIO_BLK_T_IN, None, "in"),
    RequestType("OUT", uapi.VIRTIO_BLK_T_OUT, None, "out", mutates=True),
    RequestType("FLUSH", uapi.VIRTIO_BLK_T_FLUSH, uapi.VIRTIO_BLK_F_FLUSH, "none"),
    RequestType("GET_ID", uapi.VIRTIO_BLK_T_GET_ID, None, "id"),
    RequestType("GET_LIFETIME", 10, uapi.VIRTIO_BLK_F_LIFETIME, "in", modelled=False),
    RequestType("DISCARD", uapi.VIRTIO_BLK_T_DISCARD, _DISCARD, "segments", mutates=True),
    RequestType("WRITE_ZEROES", uapi.VIRTIO_BLK_T_WRITE_ZEROES, _WZ, "segments", mutates=True),
    RequestType("SECURE_ERASE", 14, _SE, "segments", mutates=True, modelled=False),
    *(RequestType(name, number, _ZONED, "zone", mutates=True, modelled=False, unsupp_level=Level.MUST)
      for name, number in _ZONE_TYPES),
)})

#: Negotiated features whose requests the model does not predict.
NOT_MODELLED_FEATURES: Final = (1 << uapi.VIRTIO_BLK_F_LIFETIME) | (1 << _SE) | (1 << _ZONED)


# --------------------------------------------------------------------------------------------
# The rules: what the device answers in each case, and what the driver must not do.
# --------------------------------------------------------------------------------------------
_S_OK: Final = uapi.VIRTIO_BLK_S_OK
_S_IOERR: Final = uapi.VIRTIO_BLK_S_IOERR
_S_UNSUPP: Final = uapi.VIRTIO_BLK_S_UNSUPP
_OP: Final = sections.BLK_OPERATION
_OP_DRIVER: Final = sections.BLK_OPERATION_DRIVER
_OP_DEVICE: Final = sections.BLK_OPERATION_DEVICE


class Answer(enum.Enum):
    """The cases a request can end in; the value is the last part of the rule id."""

    OK = "ok"
    OK_NONZERO_SECTOR = "ok_nonzero_sector"
    NO_STATUS_BYTE = "no_status_byte"
    OUTHDR_SHORT = "outhdr_short"
    UNKNOWN_TYPE = "unknown_type"
    NOT_NEGOTIATED = "not_negotiated"
    READ_ONLY = "read_only"
    UNALIGNED_LENGTH = "unaligned_length"
    BEYOND_CAPACITY = "beyond_capacity"
    ID_LENGTH = "length"
    SEGMENT_LENGTH = "segment_length"
    TOO_MANY_SEGMENTS = "too_many_segments"
    TOO_MANY_SECTORS = "too_many_sectors"
    UNKNOWN_FLAG = "unknown_flag"
    UNMAP = "unmap"


@dataclass(frozen=True)
class RequestRule:
    """How a conforming device answers ``request`` (a type name, or "request" before the type is
    known) in case ``answer``: with ``status`` (None: bad input, no single right answer), as
    binding as ``level``, per ``citation``. The id is ``blk.<request>.<answer>``."""

    request: str
    answer: Answer
    status: int | None
    level: Level
    citation: Citation
    summary: str

    @property
    def rule(self) -> str:
        return f"blk.{self.request}.{self.answer.value}"


def _rr(request: str, answer: Answer, status: int | None, level: Level, citation: Citation,
        summary: str) -> RequestRule:
    return RequestRule(request, answer, status, level, citation, summary)


_SEGMENT_TYPES: Final = ("DISCARD", "WRITE_ZEROES")

_REQUEST_RULE_ROWS: Final[tuple[RequestRule, ...]] = (
    # Before the type is known.
    _rr("request", Answer.NO_STATUS_BYTE, None, Level.MUST, _OP,
        "a request without a device-writable status byte is bad input: no crash, no disk write"),
    _rr("request", Answer.OUTHDR_SHORT, None, Level.MUST, _OP,
        "a request shorter than virtio_blk_outhdr is bad input: no crash, no disk write"),
    _rr("request", Answer.UNKNOWN_TYPE, _S_UNSUPP, Level.SHOULD, _OP,
        "a request type the device does not know is answered UNSUPP"),
    # A type whose feature was not negotiated: UNSUPP (MUST for zoned requests, §5.2.6.2).
    *(_rr(t.name, Answer.NOT_NEGOTIATED, _S_UNSUPP, t.unsupp_level,
          _OP_DEVICE if t.unsupp_level is Level.MUST else _OP,
          f"{t.name} without its feature negotiated is answered UNSUPP")
      for t in BLK_REQUEST_TYPES.values() if t.feature is not None),
    # A modelled type that changes the disk, on a device that offers VIRTIO_BLK_F_RO: IOERR.
    *(_rr(t.name, Answer.READ_ONLY, _S_IOERR, Level.MUST if t.name == "OUT" else Level.SHOULD, _OP_DEVICE,
          f"{t.name} on a read-only device is answered IOERR and changes nothing")
      for t in BLK_REQUEST_TYPES.values() if t.mutates and t.modelled),
    # Reads and writes.
    *(row for name in ("IN", "OUT") for row in (
        _rr(name, Answer.UNALIGNED_LENGTH, _S_IOERR, Level.SHOULD, _OP,
            f"{name} data that is not a multiple of 512 bytes is answered IOERR"),
        _rr(name, Answer.BEYOND_CAPACITY, _S_IOERR, Level.SHOULD, _OP,
            f"{name} past capacity is answered IOERR and touches no sector"),
        _rr(name, Answer.OK, _S_OK, Level.MUST, _OP,
            "a read returns the sectors' data" if name == "IN" else "a write stores its data"),
    )),
    _rr("FLUSH", Answer.OK, _S_OK, Level.MUST, _OP_DEVICE,
        "FLUSH completes once every completed write is stable (a ramdisk has no volatile cache)"),
    _rr("FLUSH", Answer.OK_NONZERO_SECTOR, _S_OK, Level.SHOULD, _OP_DEVICE,
        "a FLUSH with a nonzero sector is still a flush: the reference device answers OK"),
    _rr("GET_ID", Answer.ID_LENGTH, _S_IOERR, Level.SHOULD, _OP,
        "GET_ID whose data area is not 20 bytes is answered IOERR"),
    _rr("GET_ID", Answer.OK, _S_OK, Level.MUST, _OP, "GET_ID returns the device ID string, NUL-padded to 20 bytes"),
    # Discard and write zeroes: flags first (UNSUPP, MUST), then shapes and limits (IOERR, SHOULD).
    *(row for name in _SEGMENT_TYPES for row in (
        _rr(name, Answer.UNKNOWN_FLAG, _S_UNSUPP, Level.MUST, _OP_DEVICE,
            f"{name} with a flag other than unmap is answered UNSUPP"),
        _rr(name, Answer.SEGMENT_LENGTH, _S_IOERR, Level.SHOULD, _OP,
            f"{name} data that is not a positive multiple of 16 bytes is answered IOERR"),
        _rr(name, Answer.TOO_MANY_SEGMENTS, _S_IOERR, Level.SHOULD, _OP,
            f"{name} with more segments than the device allows is answered IOERR"),
        _rr(name, Answer.TOO_MANY_SECTORS, _S_IOERR, Level.SHOULD, sections.BLK_CONFIG,
            f"a {name} segment longer than the device allows is answered IOERR"),
        _rr(name, Answer.BEYOND_CAPACITY, _S_IOERR, Level.SHOULD, _OP,
            f"a {name} segment past capacity is answered IOERR"),
    )),
    _rr("DISCARD", Answer.UNMAP, _S_UNSUPP, Level.MUST, _OP_DEVICE, "DISCARD with the unmap flag is answered UNSUPP"),
    _rr("DISCARD", Answer.OK, _S_OK, Level.MUST, _OP,
        "DISCARD completes; what the discarded sectors read afterwards is left open"),
    _rr("WRITE_ZEROES", Answer.OK, _S_OK, Level.MUST, _OP_DEVICE,
        "after WRITE_ZEROES the ranges read as zeroes"),
)

#: Every answer the model gives, keyed by (request type name or "request", case).
BLK_REQUEST_RULES: Final[Mapping[tuple[str, Answer], RequestRule]] = MappingProxyType(
    {(r.request, r.answer): r for r in _REQUEST_RULE_ROWS})
assert len(BLK_REQUEST_RULES) == len(_REQUEST_RULE_ROWS), "one row per (request, answer)"

NO_STATUS_BYTE: Final = BLK_REQUEST_RULES["request", Answer.NO_STATUS_BYTE]
OUTHDR_SHORT: Final = BLK_REQUEST_RULES["request", Answer.OUTHDR_SHORT]
UNKNOWN_TYPE: Final = BLK_REQUEST_RULES["request", Answer.UNKNOWN_TYPE]

# What the driver must not do (§5.2.6, §5.2.6.1).
DRIVER_NO_STATUS_BYTE: Final = Rule(
    "blk.driver.no_status_byte", Level.MUST, _OP, "a request ends in one device-writable status byte")
DRIVER_OUTHDR_SHORT: Final = Rule(
    "blk.driver.outhdr_short", Level.MUST, _OP, "a request starts with the 16-byte virtio_blk_outhdr")
DRIVER_DATA_LENGTH: Final = Rule(
    "blk.driver.data_length", Level.MUST, _OP_DRIVER, "read and write data is a multiple of 512 bytes")
DRIVER_BEYOND_CAPACITY: Final = Rule(
    "blk.driver.beyond_capacity", Level.MUST, _OP_DRIVER, "the driver must not access sectors past capacity")
DRIVER_FLUSH_SECTOR: Final = Rule(
    "blk.driver.flush_sector", Level.MUST, _OP_DRIVER, "a FLUSH request carries sector 0")
DRIVER_FLUSH_DATA: Final = Rule(
    "blk.driver.flush_data", Level.SHOULD, _OP_DRIVER, "a FLUSH request carries no data")
DRIVER_GET_ID_LENGTH: Final = Rule(
    "blk.driver.get_id_length", Level.MUST, _OP_DRIVER, "the data area of GET_ID is 20 bytes")
DRIVER_SEGMENT_LENGTH: Final = Rule(
    "blk.driver.segment_length", Level.MUST, _OP_DRIVER,
    "discard and write zeroes data is a whole number of 16-byte segments, at least one")
DRIVER_TOO_MANY_SEGMENTS: Final = Rule(
    "blk.driver.too_many_segments", Level.MUST, _OP_DRIVER,
    "discard and write zeroes carry at most max_discard_seg / max_write_zeroes_seg segments")
DRIVER_TOO_MANY_SECTORS: Final = Rule(
    "blk.driver.too_many_sectors", Level.MUST, _OP_DRIVER,
    "a discard or write zeroes segment is at most max_discard_sectors / max_write_zeroes_sectors long")

DRIVER_RULES: Final[tuple[Rule, ...]] = (
    DRIVER_NO_STATUS_BYTE, DRIVER_OUTHDR_SHORT, DRIVER_DATA_LENGTH, DRIVER_BEYOND_CAPACITY, DRIVER_FLUSH_SECTOR,
    DRIVER_FLUSH_DATA, DRIVER_GET_ID_LENGTH, DRIVER_SEGMENT_LENGTH, DRIVER_TOO_MANY_SEGMENTS,
    DRIVER_TOO_MANY_SECTORS)

#: Every rule of this module: the config rules, the device's answers, the driver's duties.
RULES: Final[tuple[Rule | RequestRule, ...]] = (*BLK_CONFIG_LAYOUT.rules, *_REQUEST_RULE_ROWS, *DRIVER_RULES)


def request_rule(request: str, answer: Answer) -> RequestRule:
    """The row for ``request`` in case ``answer``; a missing row is a bug in this module."""
    return BLK_REQUEST_RULES[request, answer]


# --------------------------------------------------------------------------------------------
# Outcome.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlkOutcome:
    """What a conforming device does with one request.

    ``data_written`` is what the device writes into the device-writable area from its first
    byte; ``status`` goes into the last writable byte. ``undefined_ranges`` are disk byte
    ranges whose content the spec leaves open afterwards (discarded sectors), and
    ``segments_indeterminate`` says a failed discard / write zeroes may have done part of its
    work on another device (§5.2.6); the reference device does none of it.
    """

    status: int | None
    data_written: bytes
    disk_after: SparseDisk
    rule: str
    level: Level
    citation: Citation
    driver_violations: tuple[Violation, ...] = ()
    bad_input: bool = False
    segments_indeterminate: bool = False
    undefined_ranges: tuple[tuple[int, int], ...] = ()
    writable_total: int = 0

    @property
    def written_prefix(self) -> int:
        """Bytes written contiguously from the first writable byte: the used length's upper bound.

        §2.7.8.2: the device must write at least ``len`` bytes from the start of the writable
        buffers before publishing ``len``; the status byte only counts when the data reaches it.
        """
        if self.status is None:
            return 0
        reaches_status = len(self.data_written) == self.writable_total - 1
        return len(self.data_written) + (1 if reaches_status else 0)


# --------------------------------------------------------------------------------------------
# Building requests (for tests and the conformance suite's drivers).
# --------------------------------------------------------------------------------------------
def build_request(type_: int, sector: int = 0, data: bytes = b"", *, ioprio: int = 0) -> bytes:
    """The device-readable part of a request: ``virtio_blk_outhdr`` then readable data."""
    return struct.pack("<IIQ", type_, ioprio, sector) + data


def discard_segment(sector: int, num_sectors: int, flags: int = 0) -> bytes:
    """One ``struct virtio_blk_discard_write_zeroes``: le64 sector, le32 num_sectors, le32 flags."""
    return struct.pack("<QII", sector, num_sectors, flags)


# --------------------------------------------------------------------------------------------
# The model.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlkDiskModel:
    """A virtio-blk ramdisk as the reference device implements it, without I/O.

    ``read_only`` means VIRTIO_BLK_F_RO is *offered* (the RO rule keys on the offer, §5.2.6.2).
    ``serial`` is the device ID string (at most 20 bytes, NUL-padded on the wire). The
    discard / write-zeroes limits mirror the config fields of the same names; 0 means none.
    """

    capacity: int
    serial: bytes = b""
    read_only: bool = False
    disk: SparseDisk | None = None
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0

    def __post_init__(self) -> None:
        if self.capacity < 0:
            raise BlkModelError("capacity is a sector count, never negative")
        if len(self.serial) > ID_BYTES:
            raise BlkModelError(f"the device ID string is at most {ID_BYTES} bytes")
        if self.disk is None:
            object.__setattr__(self, "disk", SparseDisk(self.capacity))
        elif self.disk.capacity != self.capacity:
            raise BlkModelError("the disk's capacity differs from the model's")

    @property
    def contents(self) -> SparseDisk:
        assert self.disk is not None  # set in __post_init__
        return self.disk

    def after(self, outcome: BlkOutcome) -> BlkDiskModel:
        """The model once ``outcome`` happened (only the disk changes)."""
        return replace(self, disk=outcome.disk_after)

    def config(self, **values: int) -> BlkConfig:
        """This device's config values (capacity and the limits it enforces)."""
        return BlkConfig(capacity=self.capacity, max_discard_sectors=self.max_discard_sectors,
                         max_discard_seg=self.max_discard_seg,
                         max_write_zeroes_sectors=self.max_write_zeroes_sectors,
                         max_write_zeroes_seg=self.max_write_zeroes_seg, **values)  # type: ignore[arg-type]

    # -- helpers ---------------------------------------------------------------------------
    def _out(self, rule: RequestRule, *, data: bytes = b"", disk: SparseDisk | None = None,
             found: Sequence[Violation] = (), writable: int = 0, **extra: object) -> BlkOutcome:
        return BlkOutcome(rule.status, data, disk if disk is not None else self.contents, rule.rule, rule.level,
                          rule.citation, tuple(found), writable_total=writable, **extra)  # type: ignore[arg-type]

    def _in_range(self, sector: int, count: int) -> bool:
        return sector + count <= self.capacity

    # -- the request -----------------------------------------------------------------------
    def execute(self, request_bytes_readable: bytes, writable_lengths: Sequence[int],
                features: int) -> BlkOutcome:
        """Predict the device's answer to one request under the negotiated ``features``."""
        if features < 0:
            raise BlkModelError("a feature word is never negative")
        if any(n < 0 for n in writable_lengths):
            raise BlkModelError("a buffer length is never negative")
        if features & NOT_MODELLED_FEATURES:
            raise NotModelled("LIFETIME, SECURE_ERASE and ZONED requests are not modelled")
        readable = bytes(request_bytes_readable)
        writable = sum(writable_lengths)
        if writable == 0:
            return self._out(NO_STATUS_BYTE, bad_input=True, found=[DRIVER_NO_STATUS_BYTE.violation(
                "request has no device-writable byte for the status (§5.2.6 layout)")])
        if len(readable) < OUTHDR:
            return self._out(OUTHDR_SHORT, bad_input=True, writable=writable, found=[
                DRIVER_OUTHDR_SHORT.violation(f"request header is {len(readable)} bytes, not {OUTHDR}")])
        type_, _ioprio, sector = struct.unpack_from("<IIQ", readable)
        payload = readable[OUTHDR:]
        row = BLK_REQUEST_TYPES.get(type_)
        if row is None:
            return self._out(UNKNOWN_TYPE, writable=writable)
        if row.feature is not None and not features >> row.feature & 1:
            return self._out(request_rule(row.name, Answer.NOT_NEGOTIATED), writable=writable)
        if row.mutates and self.read_only and row.data != "segments":
            return self._out(request_rule(row.name, Answer.READ_ONLY), writable=writable)
        handler = {"in": self._read, "out": self._write, "none": self._flush, "id": self._get_id,
                   "segments": self._segments}[row.data]
        return handler(row, sector, payload, writable)

    # -- per type --------------------------------------------------------------------------
    def _sector_range(self, row: RequestType, sector: int, nbytes: int, writable: int) -> BlkOutcome | None:
        if nbytes % SECTOR:
            return self._out(request_rule(row.name, Answer.UNALIGNED_LENGTH), writable=writable,
                             found=[DRIVER_DATA_LENGTH.violation(
                                 f"{row.name} data is {nbytes} bytes, not a multiple of {SECTOR}")])
        if not self._in_range(sector, nbytes // SECTOR):
            return self._out(request_rule(row.name, Answer.BEYOND_CAPACITY), writable=writable,
                             found=[DRIVER_BEYOND_CAPACITY.violation(
                                 f"{row.name} of {nbytes // SECTOR} sectors at {sector} passes capacity "
                                 f"{self.capacity}")])
        return None

    def _read(self, row: RequestType, sector: int, payload: bytes, writable: int) -> BlkOutcome:
        nbytes = writable - 1
        refused = self._sector_range(row, sector, nbytes, writable)
        if refused is not None:
            return refused
        data = self.contents.read(sector, nbytes // SECTOR)
        return self._out(request_rule("IN", Answer.OK), data=data, writable=writable)

    def _write(self, row: RequestType, sector: int, payload: bytes, writable: int) -> BlkOutcome:
        refused = self._sector_range(row, sector, len(payload), writable)
        if refused is not None:
            return refused
        return self._out(request_rule("OUT", Answer.OK), disk=self.contents.write(sector, payload),
                         writable=writable)

    def _flush(self, row: RequestType, sector: int, payload: bytes, writable: int) -> BlkOutcome:
        found = []
        if sector:
            found.append(DRIVER_FLUSH_SECTOR.violation(f"FLUSH with sector {sector}, not 0"))
        if payload or writable > 1:
            found.append(DRIVER_FLUSH_DATA.violation("FLUSH carries data"))
        # A ramdisk has no volatile cache: every completed write is already stable.
        answer = Answer.OK_NONZERO_SECTOR if sector else Answer.OK
        return self._out(request_rule("FLUSH", answer), writable=writable, found=found)

    def _get_id(self, row: RequestType, sector: int, payload: bytes, writable: int) -> BlkOutcome:
        if writable - 1 != ID_BYTES:
            return self._out(request_rule("GET_ID", Answer.ID_LENGTH), writable=writable,
                             found=[DRIVER_GET_ID_LENGTH.violation(
                                 f"GET_ID data is {writable - 1} bytes, not {ID_BYTES}")])
        return self._out(request_rule("GET_ID", Answer.OK), data=self.serial.ljust(ID_BYTES, b"\0"),
                         writable=writable)

    def _segments(self, row: RequestType, sector: int, payload: bytes, writable: int) -> BlkOutcome:
        name = row.name
        is_discard = name == "DISCARD"
        limit_seg = self.max_discard_seg if is_discard else self.max_write_zeroes_seg
        limit_sectors = self.max_discard_sectors if is_discard else self.max_write_zeroes_sectors

        def ioerr(answer: Answer, driver_rule: Rule, message: str) -> BlkOutcome:
            # A failed discard / write zeroes leaves each segment's fate open (§5.2.6).
            return self._out(request_rule(name, answer), writable=writable,
                             found=[driver_rule.violation(message)], segments_indeterminate=True)

        def unsupp(answer: Answer) -> BlkOutcome:
            return self._out(request_rule(name, answer), writable=writable)

        if len(payload) % SEGMENT or not payload:
            return ioerr(Answer.SEGMENT_LENGTH, DRIVER_SEGMENT_LENGTH,
                         f"{name} data is {len(payload)} bytes, not a positive multiple of {SEGMENT}")
        segs = [struct.unpack_from("<QII", payload, i) for i in range(0, len(payload), SEGMENT)]
        # Flags first: an unknown flag, or unmap on a discard, is UNSUPP whatever the ranges (§5.2.6.2).
        for _start, _count, flags in segs:
            if flags & ~UNMAP:
                return unsupp(Answer.UNKNOWN_FLAG)
            if is_discard and flags & UNMAP:
                return unsupp(Answer.UNMAP)
        if limit_seg and len(segs) > limit_seg:
            return ioerr(Answer.TOO_MANY_SEGMENTS, DRIVER_TOO_MANY_SEGMENTS,
                         f"{len(segs)} segments, the device allows {limit_seg}")
        for start, count, _flags in segs:
            if limit_sectors and count > limit_sectors:
                return ioerr(Answer.TOO_MANY_SECTORS, DRIVER_TOO_MANY_SECTORS,
                             f"segment of {count} sectors, the device allows {limit_sectors}")
            if not self._in_range(start, count):
                return ioerr(Answer.BEYOND_CAPACITY, DRIVER_BEYOND_CAPACITY,
                             f"segment [{start}, +{count}) passes capacity {self.capacity}")
        # Read-only last: an unknown flag is UNSUPP by a MUST, and the malformed requests above are IOERR
        # whatever the disk; the read-only IOERR (a SHOULD) is the answer to an otherwise valid request.
        if self.read_only:
            return self._out(request_rule(name, Answer.READ_ONLY), writable=writable)
        ranges = [(start, count) for start, count, _ in segs if count]
        disk = self.contents.zero(ranges)
        if is_discard:
            # The reference ramdisk deallocates (reads zero), but the driver may assume nothing (§5.2.6.1).
            undefined = tuple((start * SECTOR, count * SECTOR) for start, count in ranges)
            return self._out(request_rule("DISCARD", Answer.OK), disk=disk, writable=writable,
                             undefined_ranges=undefined)
        # After write zeroes, reads of the ranges MUST return zeroes (§5.2.6.2).
        return self._out(request_rule("WRITE_ZEROES", Answer.OK), disk=disk, writable=writable)
