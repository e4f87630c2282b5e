"""The packed virtqueue (virtio v1.3 §2.8): one descriptor ring both sides write, two wrap counters.

A descriptor is available when its AVAIL bit equals the driver's wrap counter and its USED
bit does not; it is used when both bits equal the device's wrap counter. Both counters
start at 1 and flip each time their side passes the last slot (§2.8.1), so a chain that
runs off the end of the ring carries the flipped counter in the descriptors after the wrap.
The device's position is exactly ``struct vdpa_vq_state_packed``
(:class:`~vdpacert.model.ring_index.PackedVqState`): last_avail_idx/counter for where it
reads next, last_used_idx/counter for where it writes the next used descriptor.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from vdpacert.uapi.virtio_config import VIRTIO_F_IN_ORDER
from vdpacert.uapi.virtio_ring import (
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VIRTQUEUE_MAX_SIZE,
    VRING_DESC_ALIGN_SIZE,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_DESC_SIZE,
    VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_DESC_F_USED,
    VRING_PACKED_EVENT_F_WRAP_CTR,
)

from . import sections
from .chains import (
    BadInput,
    Chain,
    ChainFault,
    DeviceRuleBroken,
    DriverRuleBroken,
    Layout,
    RawDesc,
    RingAccess,
    RingLayoutError,
    WalkContext,
    WriteRange,
    driver_access,
    read_desc_at,
    walk_chain,
)
from .guest_memory import IDENTITY, ModelMemory, Translator
from .notify import Direction, NotifyRule, RingPosition, packed_notification
from .ring_index import PackedVqState
from .spec import Level, Rule, Section, Violation

DESC_F_AVAIL: Final = 1 << VRING_PACKED_DESC_F_AVAIL
DESC_F_USED: Final = 1 << VRING_PACKED_DESC_F_USED
EVENT_SUPPRESS_ALIGN: Final = 4
EVENT_SUPPRESS_SIZE: Final = 4

PACKED_LAYOUT: Final = Section("2.8.10.1", "Structure Size and Alignment")
PACKED_DRIVER: Final = Section("2.8.11", "Driver Requirements: Virtqueues")

# Layout rules: checked by :func:`packed_ring_violations`.
QUEUE_SIZE: Final = Rule(
    "ring.packed.queue_size", Level.MUST, sections.PACKED_VIRTQUEUES,
    f"a packed queue size is in 1..{VIRTQUEUE_MAX_SIZE} (not only powers of 2)")
DESC_ALIGNMENT: Final = Rule(
    "ring.packed.descriptor_ring.alignment", Level.MUST, PACKED_DRIVER,
    f"the descriptor ring is {VRING_DESC_ALIGN_SIZE}-byte aligned")
DRIVER_EVENT_ALIGNMENT: Final = Rule(
    "ring.packed.driver_event_suppression.alignment", Level.MUST, PACKED_DRIVER,
    f"the driver event suppression structure is {EVENT_SUPPRESS_ALIGN}-byte aligned")
DEVICE_EVENT_ALIGNMENT: Final = Rule(
    "ring.packed.device_event_suppression.alignment", Level.MUST, PACKED_DRIVER,
    f"the device event suppression structure is {EVENT_SUPPRESS_ALIGN}-byte aligned")

# What a conforming device never does (raised as DeviceRuleBroken by PackedDeviceModel).
DEVICE_USED_DESCRIPTOR: Final = Rule(
    "ring.packed.device.used_descriptor", Level.MUST, sections.PACKED_DEVICE,
    "a used descriptor names the Buffer ID of a list the device holds")
DEVICE_USED_LENGTH: Final = Rule(
    "ring.packed.device.used_length", Level.MUST, sections.PACKED_DESC_TABLE_DEVICE,
    "a used descriptor's len is at most the list's writable bytes")
DEVICE_IN_ORDER: Final = Rule(
    "ring.packed.device.in_order", Level.MUST, sections.PACKED_IN_ORDER,
    "with VIRTIO_F_IN_ORDER lists are used in the order they were made available")
DEVICE_EVENT_FLAGS: Final = Rule(
    "ring.packed.device.event_flags", Level.MUST, sections.PACKED_EVENT_SUPPRESSION,
    "the device sets RING_EVENT_FLAGS_DESC only with VIRTIO_F_EVENT_IDX negotiated")

#: Every rule of this module.
RULES: Final[tuple[Rule, ...]] = (QUEUE_SIZE, DESC_ALIGNMENT, DRIVER_EVENT_ALIGNMENT, DEVICE_EVENT_ALIGNMENT,
                                  DEVICE_USED_DESCRIPTOR, DEVICE_USED_LENGTH, DEVICE_IN_ORDER, DEVICE_EVENT_FLAGS)


def packed_ring_violations(num: int, desc: int, driver: int, device: int) -> list[Violation]:
    """The layout rules a packed ring description breaks: size 1..32768 (any, not only powers
    of 2), descriptor ring 16-aligned, both event suppression structures 4-aligned."""
    found: list[Violation] = []
    if not 1 <= num <= VIRTQUEUE_MAX_SIZE:
        found.append(QUEUE_SIZE.violation(f"queue size {num} is not in 1..{VIRTQUEUE_MAX_SIZE}"))
    for name, addr, align, rule in (("descriptor ring", desc, VRING_DESC_ALIGN_SIZE, DESC_ALIGNMENT),
                                    ("driver event suppression", driver, EVENT_SUPPRESS_ALIGN, DRIVER_EVENT_ALIGNMENT),
                                    ("device event suppression", device, EVENT_SUPPRESS_ALIGN, DEVICE_EVENT_ALIGNMENT)):
        if addr % align:
            found.append(rule.violation(f"{name} at {addr:#x} is not {align}-byte aligned"))
    return found


@dataclass(frozen=True)
class PackedRing:
    """Where a packed ring lives: descriptor ring, driver area (driver event suppression,
    read by the device) and device area (device event suppression, written by the device)."""

    num: int
    desc: int
    driver: int
    device: int

    def __post_init__(self) -> None:
        found = packed_ring_violations(self.num, self.desc, self.driver, self.device)
        if found:
            raise RingLayoutError(found)

    def slot(self, index: int) -> int:
        return self.desc + VRING_DESC_SIZE * (index % self.num)


def advance(idx: int, wrap: int, steps: int, num: int) -> tuple[int, int]:
    """Move a (slot, wrap counter) position ``steps`` slots on, flipping the counter per pass."""
    passes, idx = divmod(idx + steps, num)
    return idx, wrap ^ (passes & 1)


def is_available(flags: int, wrap: int) -> bool:
    """AVAIL matches the wrap counter and USED does not (§2.8.1)."""
    return bool(flags & DESC_F_AVAIL) == bool(wrap) and bool(flags & DESC_F_USED) != bool(wrap)


def is_used(flags: int, wrap: int) -> bool:
    """AVAIL and USED both match the wrap counter (§2.8.1)."""
    return bool(flags & DESC_F_AVAIL) == bool(wrap) == bool(flags & DESC_F_USED)


def avail_flags(wrap: int) -> int:
    return DESC_F_AVAIL if wrap else DESC_F_USED


def used_flags(wrap: int) -> int:
    return DESC_F_AVAIL | DESC_F_USED if wrap else 0


@dataclass(frozen=True)
class EventSuppress:
    """``struct pvirtq_event_suppress``: ``off_wrap`` (offset bits 0-14, wrap bit 15) and flags."""

    off_wrap: int
    flags: int

    @classmethod
    def at(cls, off: int, wrap: int, flags: int) -> EventSuppress:
        return cls(off | wrap << VRING_PACKED_EVENT_F_WRAP_CTR, flags)


def write_packed_desc(memory: ModelMemory, iova: int, addr: int, length: int, id_: int, flags: int,
                      translator: Translator = IDENTITY) -> None:
    """Write a raw packed descriptor, any values at all (tests use it to build hostile rings)."""
    io = RingAccess(memory, translator)
    driver_access(io.write(iova, 8, addr, "desc.addr"))
    driver_access(io.write(iova + 8, 4, length, "desc.len"))
    driver_access(io.write(iova + 12, 2, id_, "desc.id"))
    driver_access(io.write(iova + 14, 2, flags, "desc.flags"))


@dataclass(frozen=True)
class PackedRingTable:
    """The descriptor ring seen from a start position: slot ``start + k`` must carry the wrap
    counter in force there, so a list that crosses the end expects the flipped counter."""

    memory: ModelMemory
    translator: Translator
    ring: PackedRing
    start: int
    wrap: int
    indirect: bool = False
    can_loop: bool = False

    def read(self, index: int) -> RawDesc | ChainFault:
        desc = read_desc_at(self.memory, self.translator, self.ring.slot(index), f"ring slot {index}", packed=True)
        if isinstance(desc, ChainFault):
            return desc
        steps = (index - self.start) % self.ring.num
        _, wrap = advance(self.start, self.wrap, steps, self.ring.num)
        if not is_available(desc.flags, wrap):
            return ChainFault(BadInput.DESC_NOT_AVAILABLE,
                              f"slot {index} continues the list from slot {self.start} but is not available")
        return desc

    def successor(self, index: int, desc: RawDesc) -> int | ChainFault | None:
        return (index + 1) % self.ring.num if desc.flags & VRING_DESC_F_NEXT else None


def _has(features: int, bit: int) -> bool:
    return bool(features >> bit & 1)


class PackedDriver:
    """A conforming driver for a packed ring (§2.8.21-2.8.22): writes lists, the first
    descriptor's flags last, and reaps used descriptors by skipping each list's length."""

    def __init__(self, memory: ModelMemory, ring: PackedRing, *, features: int = 0,
                 translator: Translator = IDENTITY, next_avail: int = 0, avail_wrap: int = 1) -> None:
        self.memory = memory
        self.ring = ring
        self.features = features
        self.translator = translator
        self._io = RingAccess(memory, translator)
        self.next_avail, self.avail_wrap = next_avail, avail_wrap
        self.next_used, self.used_wrap = next_avail, avail_wrap
        self._kicked = RingPosition(next_avail, avail_wrap)
        self._free_ids: deque[int] = deque(range(ring.num))
        self._sizes: dict[int, int] = {}
        self.in_flight = 0  # ring slots handed to the device and not yet reaped
        driver_access(self._io.write(ring.driver, 2, 0, "driver event off_wrap"))
        driver_access(self._io.write(ring.driver + 2, 2, 0, "driver event flags"))

    @property
    def event_idx(self) -> bool:
        return _has(self.features, VIRTIO_RING_F_EVENT_IDX)

    def add(self, segments: Sequence[tuple[int, int, bool]], *, indirect_table: int | None = None) -> int:
        """Make a list of ``(addr, len, device_writable)`` elements available; returns its Buffer ID."""
        if not segments:
            raise DriverRuleBroken("a buffer has at least one element (§2.8)")
        writable = [w for _, _, w in segments]
        if writable != sorted(writable):
            raise DriverRuleBroken("device-writable elements must follow device-readable ones (§2.8.17)")
        if len(segments) > self.ring.num:
            raise DriverRuleBroken("a list is at most queue size descriptors long (§2.8.17)")
        if indirect_table is not None:
            if not _has(self.features, VIRTIO_RING_F_INDIRECT_DESC):
                raise DriverRuleBroken("INDIRECT needs VIRTIO_F_INDIRECT_DESC (§2.8.19)")
            for i, (addr, length, w) in enumerate(segments):
                write_packed_desc(self.memory, indirect_table + VRING_DESC_SIZE * i, addr, length, 0,
                                  VRING_DESC_F_WRITE if w else 0, self.translator)
            ring_descs = [(indirect_table, VRING_DESC_SIZE * len(segments), VRING_DESC_F_INDIRECT)]
        else:
            ring_descs = [(a, n, VRING_DESC_F_WRITE if w else 0) for a, n, w in segments]
        if self.in_flight + len(ring_descs) > self.ring.num:
            raise DriverRuleBroken("not enough free slots for the whole list (§2.8.17)")
        buffer_id = self._free_ids.popleft()
        first = (self.next_avail, self.avail_wrap)
        first_flags = 0
        for i, (addr, length, flags) in enumerate(ring_descs):
            flags |= (VRING_DESC_F_NEXT if i < len(ring_descs) - 1 else 0) | avail_flags(self.avail_wrap)
            if i == 0:
                first_flags, flags = flags, 0  # exposed last, after the rest of the list
            write_packed_desc(self.memory, self.ring.slot(self.next_avail), addr, length, buffer_id, flags,
                              self.translator)
            self.next_avail, self.avail_wrap = advance(self.next_avail, self.avail_wrap, 1, self.ring.num)
        driver_access(self._io.write(self.ring.slot(first[0]) + 14, 2, first_flags, "desc.flags"))
        self._sizes[buffer_id] = len(ring_descs)
        self.in_flight += len(ring_descs)
        return buffer_id

    def kick(self) -> NotifyRule:
        """Whether the descriptors made available since the last kick need a notification."""
        off_wrap = driver_access(self._io.read(self.ring.device, 2, "device event off_wrap"))
        flags = driver_access(self._io.read(self.ring.device + 2, 2, "device event flags"))
        new = RingPosition(self.next_avail, self.avail_wrap)
        rule = packed_notification(Direction.AVAIL, event_idx=self.event_idx, event_flags=flags,
                                   off_wrap=off_wrap, num=self.ring.num, old=self._kicked, new=new)
        self._kicked = new
        return rule

    def reap(self) -> list[tuple[int, int]]:
        """``(buffer id, len)`` of every used descriptor the device has written, in ring order."""
        out: list[tuple[int, int]] = []
        while self.in_flight:
            slot = self.ring.slot(self.next_used)
            flags = driver_access(self._io.read(slot + 14, 2, "desc.flags"))
            if not is_used(flags, self.used_wrap):
                break
            buffer_id = driver_access(self._io.read(slot + 12, 2, "desc.id"))
            length = driver_access(self._io.read(slot + 8, 4, "desc.len"))
            size = self._sizes.pop(buffer_id, None)
            if size is None:
                raise DriverRuleBroken(f"used Buffer ID {buffer_id} is not in flight")
            self._free_ids.append(buffer_id)
            self.in_flight -= size
            self.next_used, self.used_wrap = advance(self.next_used, self.used_wrap, size, self.ring.num)
            out.append((buffer_id, length))
        return out

    def set_driver_event(self, event: EventSuppress) -> None:
        driver_access(self._io.write(self.ring.driver, 2, event.off_wrap, "driver event off_wrap"))
        driver_access(self._io.write(self.ring.driver + 2, 2, event.flags, "driver event flags"))


class PackedDeviceModel:
    """What a conforming device does with a packed ring.

    It starts processing descriptors in ring order (§2.8.12), walks each list (or its
    indirect table), writes one used descriptor per list at ``last_used_idx`` with the list's
    Buffer ID, the bytes written and flags matching its wrap counter, and skips the list's
    length. Bad input stops the queue (``fault``).
    """

    def __init__(self, memory: ModelMemory, ring: PackedRing, *, features: int = 0,
                 translator: Translator = IDENTITY, state: PackedVqState | None = None) -> None:
        self.memory = memory
        self.ring = ring
        self.features = features
        self.translator = translator
        self.state = state or PackedVqState(0, 1, 0, 1)
        self.fault: ChainFault | None = None
        self._outstanding: list[Chain] = []
        self._io = RingAccess(memory, translator)
        self._ctx = WalkContext(Layout.PACKED, ring.num, features, memory, translator)

    @property
    def event_idx(self) -> bool:
        return _has(self.features, VIRTIO_RING_F_EVENT_IDX)

    @property
    def in_order(self) -> bool:
        return _has(self.features, VIRTIO_F_IN_ORDER)

    @property
    def outstanding(self) -> tuple[Chain, ...]:
        return tuple(self._outstanding)

    def peek(self) -> Chain | ChainFault | None:
        """The list the device must start next, parsed; None if the next slot is not available."""
        if self.fault is not None:
            return self.fault
        idx, wrap = self.state.last_avail_idx, self.state.last_avail_counter
        flags = self._io.read(self.ring.slot(idx) + 14, 2, "desc.flags")
        if isinstance(flags, ChainFault):
            return flags
        if not is_available(flags, wrap):
            return None
        table = PackedRingTable(self.memory, self.translator, self.ring, idx, wrap)
        return walk_chain(table, idx, self._ctx)

    def consume(self) -> Chain | ChainFault | None:
        chain = self.peek()
        if isinstance(chain, ChainFault):
            self.fault = chain
        elif chain is not None:
            self._outstanding.append(chain)
            idx, wrap = advance(self.state.last_avail_idx, self.state.last_avail_counter, chain.descriptors,
                                self.ring.num)
            self.state = dataclasses.replace(self.state, last_avail_idx=idx, last_avail_counter=wrap)
        return chain

    def _slot_ranges(self) -> list[WriteRange]:
        held = sum(c.descriptors for c in self._outstanding)
        first = self.state.last_used_idx
        ranges: list[WriteRange] = []
        while held:
            run = min(held, self.ring.num - first)
            ranges.append(WriteRange(self.ring.slot(first), VRING_DESC_SIZE * run, "used descriptor slots"))
            held -= run
            first = 0
        return ranges

    def may_write(self) -> tuple[WriteRange, ...]:
        """The writable buffers of lists consumed and not yet used, the ring slots those lists
        occupy (where their used descriptors go) and the device event suppression structure."""
        ranges = [WriteRange(s.addr, s.len, f"writable buffer of Buffer ID {c.id}")
                  for c in self._outstanding for s in c.writable if s.len]
        ranges += self._slot_ranges()
        ranges.append(WriteRange(self.ring.device, EVENT_SUPPRESS_SIZE, "device event suppression"))
        return tuple(ranges)

    def write_allowed(self, iova: int, length: int) -> bool:
        return any(r.covers(iova, length) for r in self.may_write())

    def complete(self, buffer_id: int, written: int) -> NotifyRule | ChainFault:
        return self.complete_batch([(buffer_id, written)])

    def complete_batch(self, items: Sequence[tuple[int, int]]) -> NotifyRule | ChainFault:
        """Write one used descriptor per list (``id``, ``len`` = bytes written, WRITE if any were,
        AVAIL = USED = device wrap counter), skipping each list's length; then say whether the
        driver must be notified."""
        remaining = list(self._outstanding)
        for buffer_id, written in items:
            chain = next((c for c in remaining if c.id == buffer_id), None)
            if chain is None:
                raise DeviceRuleBroken(DEVICE_USED_DESCRIPTOR.violation(
                    f"Buffer ID {buffer_id} is not a list the device holds"))
            if not 0 <= written <= chain.writable_len:
                raise DeviceRuleBroken(DEVICE_USED_LENGTH.violation(
                    f"len {written} exceeds {chain.writable_len} writable bytes"))
            if self.in_order and remaining[0] is not chain:
                raise DeviceRuleBroken(DEVICE_IN_ORDER.violation(
                    f"Buffer ID {buffer_id} used before {remaining[0].id}"))
            remaining.remove(chain)
        old = RingPosition(self.state.last_used_idx, self.state.last_used_counter)
        for buffer_id, written in items:
            chain = next(c for c in self._outstanding if c.id == buffer_id)
            slot = self.ring.slot(self.state.last_used_idx)
            flags = used_flags(self.state.last_used_counter) | (VRING_DESC_F_WRITE if written else 0)
            fault = (self._io.write(slot + 8, 4, written, "desc.len")
                     or self._io.write(slot + 12, 2, buffer_id, "desc.id")
                     or self._io.write(slot + 14, 2, flags, "desc.flags"))
            if fault is not None:
                self.fault = fault
                return fault
            self._outstanding.remove(chain)
            idx, wrap = advance(self.state.last_used_idx, self.state.last_used_counter, chain.descriptors,
                                self.ring.num)
            self.state = dataclasses.replace(self.state, last_used_idx=idx, last_used_counter=wrap)
        return self.used_notification(old)

    def used_notification(self, old: RingPosition) -> NotifyRule | ChainFault:
        """Must the device notify for the used descriptors written since ``old``?"""
        off_wrap = self._io.read(self.ring.driver, 2, "driver event off_wrap")
        flags = self._io.read(self.ring.driver + 2, 2, "driver event flags")
        if isinstance(off_wrap, ChainFault):
            return off_wrap
        if isinstance(flags, ChainFault):
            return flags
        new = RingPosition(self.state.last_used_idx, self.state.last_used_counter)
        return packed_notification(Direction.USED, event_idx=self.event_idx, event_flags=flags, off_wrap=off_wrap,
                                   num=self.ring.num, old=old, new=new)

    def set_device_event(self, event: EventSuppress) -> ChainFault | None:
        """Write the device event suppression structure (DESC needs EVENT_IDX, §2.8.10)."""
        if event.flags & 0x3 == 0x2 and not self.event_idx:
            raise DeviceRuleBroken(DEVICE_EVENT_FLAGS.violation(
                "RING_EVENT_FLAGS_DESC is only valid with VIRTIO_F_EVENT_IDX"))
        return (self._io.write(self.ring.device, 2, event.off_wrap, "device event off_wrap")
                or self._io.write(self.ring.device + 2, 2, event.flags, "device event flags"))
