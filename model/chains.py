"""Descriptor chains: the one walker both ring layouts share, and the table of bad inputs.

Everything a device reads from a ring was written by the driver, and a conformance suite
must assume the driver is hostile. The walker here therefore never raises on ring
contents and always terminates: a chain either parses into readable and writable segments
or stops at the first :class:`BadInput` it meets, and every walk is bounded by the queue
size (and an indirect walk by its table), so a loop cannot spin it.

:data:`BAD_INPUTS` is the data table a test reads: for each class of bad input, the driver
rule it breaks (section and level) and what a device MAY do about it. What a device may
never do is common to every row (:data:`DEVICE_OBLIGATIONS`): crash, write outside the
device-writable buffers it was given, or use the broken chain as if it were valid.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Protocol

from vdpacert.uapi.virtio_ring import (
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_DESC_SIZE,
)

from . import sections
from .guest_memory import AccessFault, FaultReason, ModelMemory, Translator
from .spec import Citation, Level, Rule, Section, SpecError, Violation

# The total length of a chain may reach, but not pass, 2^32 bytes (§2.7.5.2).
MAX_CHAIN_BYTES: Final = 1 << 32

SPLIT_FRAMING_DRIVER: Final = Section("2.7.4.2", "Driver Requirements: Message Framing")
SPLIT_AVAIL_RING_DRIVER: Final = Section("2.7.6.1", "Driver Requirements: The Virtqueue Available Ring")
SPLIT_SUPPLYING: Final = Section("2.7.13", "Supplying Buffers to The Device")
PACKED_SCATTER_GATHER_DRIVER: Final = Section("2.8.17", "Driver Requirements: Scatter-Gather Support")
PACKED_DESC_TABLE_DRIVER: Final = Section("2.8.16", "Driver Requirements: The Virtqueue Descriptor Table")
IOTLB_MISS: Final = sections.vhost_core("vhost_iotlb_miss")


class Layout(enum.Enum):
    SPLIT = "split"
    PACKED = "packed"


class BadInput(enum.Enum):
    """The classes of driver-written ring content a device must survive."""

    DESCRIPTOR_LOOP = "descriptor loop"
    CHAIN_TOO_LONG = "chain longer than the queue size"
    NESTED_INDIRECT = "indirect descriptor inside an indirect table"
    INDIRECT_LEN_NOT_MULTIPLE_OF_16 = "indirect table length not a multiple of 16"
    ZERO_LENGTH_INDIRECT = "zero-length indirect table"
    INDIRECT_NOT_NEGOTIATED = "indirect descriptor without VIRTIO_F_INDIRECT_DESC"
    INDIRECT_IN_CHAIN = "indirect descriptor chained with NEXT"
    ADDRESS_UNMAPPED = "address outside the IOTLB"
    ADDRESS_PERMISSION = "access against the IOTLB permission"
    TOTAL_LENGTH_OVERFLOW = "chain longer than 2^32 bytes in total"
    READABLE_AFTER_WRITABLE = "device-readable descriptor after a device-writable one"
    INDEX_OUT_OF_RANGE = "head or next index outside the descriptor table"
    AVAIL_IDX_AHEAD = "available idx more than the queue size ahead of the device"
    DESC_NOT_AVAILABLE = "chain continues into a descriptor that is not available"


class Reaction(enum.Enum):
    """What a device MAY do on bad input (beyond the obligations every row shares)."""

    NEEDS_RESET = "set DEVICE_NEEDS_RESET and stop using the queue"
    STOP_QUEUE = "stop processing the queue, leaving the chain unused"
    REPORT_IOTLB_FAULT = "report the faulting IOVA to the IOTLB owner (vhost IOTLB miss)"
    LIMIT_CHAIN = "refuse chains above a device limit on descriptors per chain"


#: Rules that hold on every bad input, whatever the device chooses to do.
Obligation = Rule

DEVICE_OBLIGATIONS: Final[tuple[Rule, ...]] = (
    Rule("ring.split.device.no_write_readable", Level.MUST, sections.SPLIT_DESC_TABLE_DEVICE,
         "the device must not write to a device-readable buffer"),
    Rule("ring.packed.device.no_write_readable", Level.MUST, sections.PACKED_DESC_TABLE_DEVICE,
         "the device must not write to a device-readable buffer (packed)"),
    Rule("ring.device.writes_only_given_memory", Level.MUST, sections.SPLIT_USED_RING_DEVICE,
         "the device writes only device-writable buffers of chains it consumed, the used ring entry, used idx "
         "and avail_event (anything else is memory it was not given)"),
    Rule("ring.device.bad_chain_not_used", Level.MUST, sections.SPLIT_USED_RING_DEVICE,
         "a chain found bad is not used as if valid: no used entry claims bytes written into it"),
    Rule("ring.device.needs_reset_on_error", Level.SHOULD, sections.DEVICE_STATUS_DEVICE,
         "a device that has to be reset to recover should set DEVICE_NEEDS_RESET"),
)


@dataclass(frozen=True)
class BadInputRule:
    """One row of the bad-input table: the driver rule broken and the device's freedom."""

    bad: BadInput
    summary: str
    level: Level
    citations: tuple[Citation, ...]
    layouts: frozenset[Layout]
    device_may: tuple[Reaction, ...]

    @property
    def rule(self) -> str:
        """The stable id: ``ring.bad_input.<class>``."""
        return f"ring.bad_input.{self.bad.name.lower()}"

    @property
    def citation(self) -> Citation:
        return self.citations[0]


_BOTH: Final = frozenset(Layout)
_SPLIT: Final = frozenset({Layout.SPLIT})
_PACKED: Final = frozenset({Layout.PACKED})
_STOP: Final = (Reaction.NEEDS_RESET, Reaction.STOP_QUEUE)

_ROWS: Final[tuple[BadInputRule, ...]] = (
    BadInputRule(BadInput.DESCRIPTOR_LOOP,
                 "loops in a descriptor chain are forbidden (implied by the 2^32 byte limit)",
                 Level.MUST, (sections.SPLIT_DESC_TABLE_DRIVER, PACKED_SCATTER_GATHER_DRIVER), _BOTH, _STOP),
    BadInputRule(BadInput.CHAIN_TOO_LONG, "a driver must not create a chain longer than the queue size",
                 Level.MUST, (sections.SPLIT_INDIRECT_DRIVER, PACKED_SCATTER_GATHER_DRIVER), _BOTH,
                 (*_STOP, Reaction.LIMIT_CHAIN)),
    BadInputRule(BadInput.NESTED_INDIRECT,
                 "the driver must not set INDIRECT within an indirect descriptor (split; in a packed "
                 "indirect table every flag but WRITE is reserved and ignored by the device)",
                 Level.MUST, (sections.SPLIT_INDIRECT_DRIVER,), _SPLIT, _STOP),
    BadInputRule(BadInput.INDIRECT_LEN_NOT_MULTIPLE_OF_16,
                 "an indirect table is an array of 16-byte descriptors, its length a multiple of 16",
                 Level.MUST, (sections.SPLIT_INDIRECT, sections.PACKED_INDIRECT), _BOTH, _STOP),
    BadInputRule(BadInput.ZERO_LENGTH_INDIRECT,
                 "an indirect table holds at least one descriptor (a buffer has at least one element)",
                 Level.MUST, (sections.SPLIT_INDIRECT, sections.PACKED_INDIRECT), _BOTH, _STOP),
    BadInputRule(BadInput.INDIRECT_NOT_NEGOTIATED,
                 "the driver must not set INDIRECT unless VIRTIO_F_INDIRECT_DESC was negotiated",
                 Level.MUST, (sections.SPLIT_INDIRECT_DRIVER, sections.PACKED_INDIRECT_DRIVER), _BOTH, _STOP),
    BadInputRule(BadInput.INDIRECT_IN_CHAIN,
                 "split: not both INDIRECT and NEXT; packed: no INDIRECT descriptor in a NEXT list",
                 Level.MUST, (sections.SPLIT_INDIRECT_DRIVER, sections.PACKED_INDIRECT_DRIVER), _BOTH, _STOP),
    BadInputRule(BadInput.ADDRESS_UNMAPPED,
                 "every ring and buffer address the driver hands over is mapped for the device",
                 Level.MUST, (sections.VIRTQUEUES, IOTLB_MISS), _BOTH, (*_STOP, Reaction.REPORT_IOTLB_FAULT)),
    BadInputRule(BadInput.ADDRESS_PERMISSION,
                 "device-writable buffers are mapped writable, readable ones readable",
                 Level.MUST, (sections.SPLIT_DESC_TABLE_DEVICE, IOTLB_MISS), _BOTH,
                 (*_STOP, Reaction.REPORT_IOTLB_FAULT)),
    BadInputRule(BadInput.TOTAL_LENGTH_OVERFLOW,
                 "drivers must not add a descriptor chain longer than 2^32 bytes in total",
                 Level.MUST, (sections.SPLIT_DESC_TABLE_DRIVER,), _BOTH, _STOP),
    BadInputRule(BadInput.READABLE_AFTER_WRITABLE,
                 "the driver must place device-writable elements after device-readable ones",
                 Level.MUST, (SPLIT_FRAMING_DRIVER, PACKED_SCATTER_GATHER_DRIVER), _BOTH, _STOP),
    BadInputRule(BadInput.INDEX_OUT_OF_RANGE,
                 "a head or next index names an entry of the descriptor (or indirect) table",
                 Level.MUST, (sections.SPLIT_DESC_TABLE, sections.SPLIT_INDIRECT), _SPLIT, _STOP),
    BadInputRule(BadInput.AVAIL_IDX_AHEAD,
                 "the available ring holds at most queue size entries, and idx never goes back",
                 Level.MUST, (SPLIT_AVAIL_RING_DRIVER, SPLIT_SUPPLYING), _SPLIT, _STOP),
    BadInputRule(BadInput.DESC_NOT_AVAILABLE,
                 "the driver must not make the first descriptor of a list available before the rest",
                 Level.MUST, (PACKED_SCATTER_GATHER_DRIVER,), _PACKED, _STOP),
)

BAD_INPUTS: Final[Mapping[BadInput, BadInputRule]] = MappingProxyType({row.bad: row for row in _ROWS})
assert set(BAD_INPUTS) == set(BadInput), "every bad-input class has a row"


@dataclass(frozen=True)
class ChainFault:
    """The walk stopped at bad input: which class, where, and (for addresses) the fault."""

    bad: BadInput
    detail: str
    access: AccessFault | None = None

    @property
    def row(self) -> BadInputRule:
        return BAD_INPUTS[self.bad]

    def __str__(self) -> str:
        row = self.row
        return f"{self.bad.value}: {self.detail} [{row.level} {row.citation}]"


@dataclass(frozen=True)
class Segment:
    """One buffer element of a parsed chain: IOVA, length, direction, and the model address."""

    addr: int
    len: int
    writable: bool
    target: int | None = None  # model address from the translator; None for a zero-length element


@dataclass(frozen=True)
class Chain:
    """A parsed chain the device may use.

    ``head`` is the ring slot (split: descriptor index) the chain starts at, ``id`` what the
    used ring reports for it (split: the head index; packed: the Buffer ID), ``descriptors``
    how many slots of the descriptor ring or table it occupies (packed devices skip that many).
    """

    head: int
    id: int
    segments: tuple[Segment, ...]
    descriptors: int
    indirect: bool

    @property
    def readable(self) -> tuple[Segment, ...]:
        return tuple(s for s in self.segments if not s.writable)

    @property
    def writable(self) -> tuple[Segment, ...]:
        return tuple(s for s in self.segments if s.writable)

    @property
    def writable_len(self) -> int:
        return sum(s.len for s in self.writable)

    @property
    def total_len(self) -> int:
        return sum(s.len for s in self.segments)


@dataclass(frozen=True)
class RawDesc:
    """A descriptor as read from memory; ``next`` is the split link, ``id`` the packed Buffer ID."""

    addr: int
    len: int
    flags: int
    next: int = 0
    id: int = 0


def access_fault(fault: AccessFault, what: str) -> ChainFault:
    bad = BadInput.ADDRESS_PERMISSION if fault.reason is FaultReason.PERMISSION else BadInput.ADDRESS_UNMAPPED
    return ChainFault(bad, f"{what}: {fault}", fault)


def read_desc_at(
    memory: ModelMemory, translator: Translator, iova: int, what: str, *, packed: bool = False
) -> RawDesc | ChainFault:
    """Read one 16-byte descriptor through the translator.

    The layouts differ only in the last four bytes: split ``{flags, next}``, packed ``{id, flags}``.
    """
    where = translator.translate(iova, VRING_DESC_SIZE, False)
    if isinstance(where, AccessFault):
        return access_fault(where, what)
    raw = memory.read(where, VRING_DESC_SIZE)
    addr = int.from_bytes(raw[0:8], "little")
    length = int.from_bytes(raw[8:12], "little")
    u16a = int.from_bytes(raw[12:14], "little")
    u16b = int.from_bytes(raw[14:16], "little")
    if packed:
        return RawDesc(addr, length, flags=u16b, id=u16a)
    return RawDesc(addr, length, flags=u16a, next=u16b)


class DescTable(Protocol):
    """Where a walk reads descriptors from and how it moves to the next one."""

    @property
    def indirect(self) -> bool: ...

    @property
    def can_loop(self) -> bool: ...

    def read(self, index: int) -> RawDesc | ChainFault: ...

    def successor(self, index: int, desc: RawDesc) -> int | ChainFault | None: ...


@dataclass(frozen=True)
class SplitTable:
    """A split descriptor table (the ring's, or an indirect one): links by ``next``."""

    memory: ModelMemory
    translator: Translator
    base: int
    entries: int
    indirect: bool = False
    can_loop: bool = True

    def read(self, index: int) -> RawDesc | ChainFault:
        where = "indirect table" if self.indirect else "descriptor table"
        return read_desc_at(self.memory, self.translator, self.base + VRING_DESC_SIZE * index,
                            f"{where} entry {index}")

    def successor(self, index: int, desc: RawDesc) -> int | ChainFault | None:
        if not desc.flags & VRING_DESC_F_NEXT:
            return None
        if desc.next >= self.entries:
            return ChainFault(BadInput.INDEX_OUT_OF_RANGE,
                              f"descriptor {index} links to {desc.next}, table has {self.entries} entries")
        return desc.next


@dataclass(frozen=True)
class PackedIndirectTable:
    """A packed indirect table: its entries are used in order, all of them, and every flag
    except WRITE is reserved and ignored by the device (§2.8.7)."""

    memory: ModelMemory
    translator: Translator
    base: int
    entries: int
    indirect: bool = True
    can_loop: bool = False

    def read(self, index: int) -> RawDesc | ChainFault:
        desc = read_desc_at(self.memory, self.translator, self.base + VRING_DESC_SIZE * index,
                            f"indirect table entry {index}", packed=True)
        if isinstance(desc, ChainFault):
            return desc
        return RawDesc(desc.addr, desc.len, desc.flags & VRING_DESC_F_WRITE)

    def successor(self, index: int, desc: RawDesc) -> int | ChainFault | None:
        return index + 1 if index + 1 < self.entries else None


@dataclass(frozen=True)
class WalkContext:
    """What a walk needs besides the table: layout, queue size, features, memory access."""

    layout: Layout
    queue_size: int
    features: int
    memory: ModelMemory
    translator: Translator

    @property
    def indirect_negotiated(self) -> bool:
        return bool(self.features >> VIRTIO_RING_F_INDIRECT_DESC & 1)


class _Segments:
    """Collects segments and enforces the per-element rules: order, total length, mapping."""

    def __init__(self, ctx: WalkContext) -> None:
        self.ctx = ctx
        self.items: list[Segment] = []
        self.total = 0
        self.seen_writable = False

    def add(self, desc: RawDesc, where: str) -> ChainFault | None:
        writable = bool(desc.flags & VRING_DESC_F_WRITE)
        if writable:
            self.seen_writable = True
        elif self.seen_writable:
            return ChainFault(BadInput.READABLE_AFTER_WRITABLE, f"{where} is device-readable after a writable one")
        self.total += desc.len
        if self.total > MAX_CHAIN_BYTES:
            return ChainFault(BadInput.TOTAL_LENGTH_OVERFLOW, f"{where} brings the chain to {self.total} bytes")
        target: int | None = None
        if desc.len:
            mapped = self.ctx.translator.translate(desc.addr, desc.len, writable)
            if isinstance(mapped, AccessFault):
                return access_fault(mapped, f"{where} buffer")
            target = mapped
        self.items.append(Segment(desc.addr, desc.len, writable, target))
        return None


def _indirect_table(desc: RawDesc, ctx: WalkContext, where: str) -> DescTable | ChainFault:
    if desc.len == 0:
        return ChainFault(BadInput.ZERO_LENGTH_INDIRECT, f"{where} refers to an empty indirect table")
    if desc.len % VRING_DESC_SIZE:
        return ChainFault(BadInput.INDIRECT_LEN_NOT_MULTIPLE_OF_16,
                          f"{where} refers to an indirect table of {desc.len} bytes")
    entries = desc.len // VRING_DESC_SIZE
    if ctx.layout is Layout.SPLIT:
        # A split chain is the entries its NEXT links reach (§2.7.5.3): each is translated as it is read,
        # so a table whose unreached tail is unmapped holds a valid chain (Linux's vringh reads so too).
        return SplitTable(ctx.memory, ctx.translator, desc.addr, entries, indirect=True)
    # A packed indirect table is used whole, in order (§2.8.19): all of it must be readable.
    mapped = ctx.translator.translate(desc.addr, desc.len, False)
    if isinstance(mapped, AccessFault):
        return access_fault(mapped, f"{where} indirect table")
    return PackedIndirectTable(ctx.memory, ctx.translator, desc.addr, entries)


@dataclass(frozen=True)
class _Walked:
    descriptors: int  # descriptors read from the table the walk started in
    last_id: int  # the Buffer ID field of the last of them (packed chains report it)
    indirect: bool


def _walk(table: DescTable, start: int, ctx: WalkContext, out: _Segments) -> _Walked | ChainFault:
    """Walk one table from ``start``, adding segments to ``out``."""
    index, count, last_id = start, 0, 0
    visited: set[int] = set()
    while True:
        if table.can_loop and index in visited:
            return ChainFault(BadInput.DESCRIPTOR_LOOP, f"descriptor {index} is reached twice")
        if count >= ctx.queue_size:
            return ChainFault(BadInput.CHAIN_TOO_LONG, f"more than {ctx.queue_size} descriptors")
        visited.add(index)
        count += 1
        desc = table.read(index)
        if isinstance(desc, ChainFault):
            return desc
        last_id = desc.id
        where = f"{'indirect ' if table.indirect else ''}descriptor {index}"
        if desc.flags & VRING_DESC_F_INDIRECT:
            if table.indirect:
                return ChainFault(BadInput.NESTED_INDIRECT, f"{where} is an indirect inside an indirect table")
            if not ctx.indirect_negotiated:
                return ChainFault(BadInput.INDIRECT_NOT_NEGOTIATED, f"{where} sets INDIRECT")
            chained = desc.flags & VRING_DESC_F_NEXT or (ctx.layout is Layout.PACKED and count > 1)
            if chained:
                return ChainFault(BadInput.INDIRECT_IN_CHAIN, f"{where} is an indirect descriptor in a NEXT list")
            inner = _indirect_table(desc, ctx, where)
            if isinstance(inner, ChainFault):
                return inner
            walked = _walk(inner, 0, ctx, out)
            if isinstance(walked, ChainFault):
                return walked
            return _Walked(count, last_id, indirect=True)
        bad = out.add(desc, where)
        if bad is not None:
            return bad
        following = table.successor(index, desc)
        if following is None:
            return _Walked(count, last_id, indirect=False)
        if isinstance(following, ChainFault):
            return following
        index = following


def walk_chain(table: DescTable, head: int, ctx: WalkContext) -> Chain | ChainFault:
    """Parse the chain starting at ``head`` of ``table``, or name the first bad input in it.

    Never raises on ring contents and always terminates: each table is walked at most
    ``queue_size`` steps, loops are caught by revisiting, and an indirect table is entered
    at most once (nested indirects are refused).
    """
    out = _Segments(ctx)
    walked = _walk(table, head, ctx, out)
    if isinstance(walked, ChainFault):
        return walked
    chain_id = head if ctx.layout is Layout.SPLIT else walked.last_id
    return Chain(head, chain_id, tuple(out.items), walked.descriptors, walked.indirect)


class DeviceRuleBroken(SpecError):
    """The model was asked to do something a conforming device must not do."""

    def __init__(self, violation: Violation) -> None:
        super().__init__(str(violation))
        self.violation = violation


class DriverRuleBroken(SpecError, ValueError):
    """The model driver was asked to build something a conforming driver must not build."""


@dataclass(frozen=True)
class WriteRange:
    """A range of IOVAs the device may write, and why."""

    iova: int
    len: int
    why: str

    def covers(self, iova: int, length: int) -> bool:
        return self.iova <= iova and iova + length <= self.iova + self.len


class RingAccess:
    """u16/u32 ring fields through a translator; faults come back as ChainFault values."""

    def __init__(self, memory: ModelMemory, translator: Translator) -> None:
        self.memory = memory
        self.translator = translator

    def _where(self, iova: int, size: int, write: bool, what: str) -> int | ChainFault:
        mapped = self.translator.translate(iova, size, write)
        return access_fault(mapped, what) if isinstance(mapped, AccessFault) else mapped

    def read(self, iova: int, size: int, what: str) -> int | ChainFault:
        where = self._where(iova, size, False, what)
        if isinstance(where, ChainFault):
            return where
        return int.from_bytes(self.memory.read(where, size), "little")

    def write(self, iova: int, size: int, value: int, what: str) -> ChainFault | None:
        where = self._where(iova, size, True, what)
        if isinstance(where, ChainFault):
            return where
        self.memory.write(where, value.to_bytes(size, "little"))
        return None


def driver_access(result: int | ChainFault | None) -> int:
    """Driver-side access: the driver owns its memory, so a fault is a misconfigured test."""
    if isinstance(result, ChainFault):
        raise DriverRuleBroken(f"driver cannot access its own ring: {result}")
    return result or 0


class RingLayoutError(SpecError, ValueError):
    """A ring description that breaks a layout rule; ``violations`` says which."""

    def __init__(self, violations: Sequence[Violation]) -> None:
        super().__init__("; ".join(str(v) for v in violations))
        self.violations = tuple(violations)
