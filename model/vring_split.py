"""The split virtqueue (virtio v1.3 §2.7): layout, the driver's side, the device's obligations.

Three areas, each written by one side only: the descriptor table and the available ring
(driver), the used ring (device). :class:`SplitDriver` builds chains and publishes them the
way §2.7.13 describes; :class:`SplitDeviceModel` says what a conforming device does with
them: which chain it takes next (available ring order from ``last_avail_idx``), what the
chain is (via :func:`vdpacert.model.chains.walk_chain`, so hostile contents become a typed
:class:`~vdpacert.model.chains.ChainFault`), what it may write, and what goes into the used
ring. Every ring access goes through a :class:`~vdpacert.model.guest_memory.Translator`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from vdpacert.uapi.virtio_config import VIRTIO_F_IN_ORDER
from vdpacert.uapi.virtio_ring import (
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VIRTQUEUE_MAX_SIZE,
    VRING_AVAIL_ALIGN_SIZE,
    VRING_DESC_ALIGN_SIZE,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_DESC_SIZE,
    VRING_USED_ALIGN_SIZE,
    VRING_USED_ELEM_SIZE,
)

from . import sections
from .chains import (
    BadInput,
    Chain,
    ChainFault,
    DeviceRuleBroken,
    DriverRuleBroken,
    Layout,
    RingAccess,
    RingLayoutError,
    SplitTable,
    WalkContext,
    WriteRange,
    driver_access,
    walk_chain,
)
from .guest_memory import IDENTITY, ModelMemory, Translator
from .notify import Direction, NotifyRule, split_notification
from .ring_index import split_inflight, u16
from .spec import Level, Rule, Violation

# Layout rules (§2.7, §2.7.1): checked by :func:`split_ring_violations`.
QUEUE_SIZE: Final = Rule(
    "ring.split.queue_size", Level.MUST, sections.SPLIT_VIRTQUEUES,
    f"a split queue size is a power of 2 in 1..{VIRTQUEUE_MAX_SIZE}")
DESC_ALIGNMENT: Final = Rule(
    "ring.split.descriptor_table.alignment", Level.MUST, sections.SPLIT_DRIVER,
    f"the descriptor table is {VRING_DESC_ALIGN_SIZE}-byte aligned")
AVAIL_ALIGNMENT: Final = Rule(
    "ring.split.available_ring.alignment", Level.MUST, sections.SPLIT_DRIVER,
    f"the available ring is {VRING_AVAIL_ALIGN_SIZE}-byte aligned")
USED_ALIGNMENT: Final = Rule(
    "ring.split.used_ring.alignment", Level.MUST, sections.SPLIT_DRIVER,
    f"the used ring is {VRING_USED_ALIGN_SIZE}-byte aligned")

# What a conforming device never does (raised as DeviceRuleBroken by SplitDeviceModel).
DEVICE_USED_RING: Final = Rule(
    "ring.split.device.used_ring", Level.MUST, sections.SPLIT_USED_RING_DEVICE,
    "a used entry names a chain the device holds, with len at most its writable bytes")
DEVICE_IN_ORDER: Final = Rule(
    "ring.split.device.in_order", Level.MUST, sections.SPLIT_IN_ORDER,
    "with VIRTIO_F_IN_ORDER chains are used in the order they were made available")
DEVICE_AVAIL_EVENT: Final = Rule(
    "ring.split.device.avail_event", Level.MUST, sections.SPLIT_AVAIL_SUPPRESSION,
    "the device writes avail_event only with VIRTIO_F_EVENT_IDX negotiated")
DEVICE_USED_FLAGS: Final = Rule(
    "ring.split.device.used_flags", Level.MUST, sections.SPLIT_AVAIL_SUPPRESSION,
    "with VIRTIO_F_EVENT_IDX negotiated the device keeps used flags 0")

#: Every rule of this module.
RULES: Final[tuple[Rule, ...]] = (QUEUE_SIZE, DESC_ALIGNMENT, AVAIL_ALIGNMENT, USED_ALIGNMENT, DEVICE_USED_RING,
                                  DEVICE_IN_ORDER, DEVICE_AVAIL_EVENT, DEVICE_USED_FLAGS)


def split_ring_violations(num: int, desc: int, avail: int, used: int) -> list[Violation]:
    """The layout rules of §2.7 and §2.7.1 a split ring description breaks (empty if none)."""
    found: list[Violation] = []
    if not 1 <= num <= VIRTQUEUE_MAX_SIZE or num & (num - 1):
        found.append(QUEUE_SIZE.violation(f"queue size {num} is not a power of 2 in 1..{VIRTQUEUE_MAX_SIZE}"))
    for name, addr, align, rule in (("descriptor table", desc, VRING_DESC_ALIGN_SIZE, DESC_ALIGNMENT),
                                    ("available ring", avail, VRING_AVAIL_ALIGN_SIZE, AVAIL_ALIGNMENT),
                                    ("used ring", used, VRING_USED_ALIGN_SIZE, USED_ALIGNMENT)):
        if addr % align:
            found.append(rule.violation(f"{name} at {addr:#x} is not {align}-byte aligned"))
    return found


@dataclass(frozen=True)
class SplitRing:
    """Where a split ring lives (IOVAs, as ``VHOST_SET_VRING_ADDR`` gives them) and its size."""

    num: int
    desc: int
    avail: int
    used: int

    def __post_init__(self) -> None:
        found = split_ring_violations(self.num, self.desc, self.avail, self.used)
        if found:
            raise RingLayoutError(found)

    # Sizes from the table of §2.7 (the event fields are counted whether or not negotiated).
    @property
    def desc_size(self) -> int:
        return VRING_DESC_SIZE * self.num

    @property
    def avail_size(self) -> int:
        return 6 + 2 * self.num

    @property
    def used_size(self) -> int:
        return 6 + VRING_USED_ELEM_SIZE * self.num

    def desc_entry(self, index: int) -> int:
        return self.desc + VRING_DESC_SIZE * index

    @property
    def avail_flags(self) -> int:
        return self.avail

    @property
    def avail_idx(self) -> int:
        return self.avail + 2

    def avail_entry(self, idx: int) -> int:
        return self.avail + 4 + 2 * (idx % self.num)

    @property
    def used_event(self) -> int:
        return self.avail + 4 + 2 * self.num

    @property
    def used_flags(self) -> int:
        return self.used

    @property
    def used_idx(self) -> int:
        return self.used + 2

    def used_entry(self, idx: int) -> int:
        return self.used + 4 + VRING_USED_ELEM_SIZE * (idx % self.num)

    @property
    def avail_event(self) -> int:
        return self.used + 4 + VRING_USED_ELEM_SIZE * self.num


@dataclass(frozen=True)
class UsedElem:
    """``struct vring_used_elem``: the chain's head index and the bytes the device wrote."""

    id: int
    len: int


def _has(features: int, bit: int) -> bool:
    return bool(features >> bit & 1)


def write_split_desc(memory: ModelMemory, iova: int, addr: int, length: int, flags: int, next_: int,
                     translator: Translator = IDENTITY) -> None:
    """Write a raw descriptor, any values at all (tests use it to build hostile tables)."""
    io = RingAccess(memory, translator)
    driver_access(io.write(iova, 8, addr, "desc.addr"))
    driver_access(io.write(iova + 8, 4, length, "desc.len"))
    driver_access(io.write(iova + 12, 2, flags, "desc.flags"))
    driver_access(io.write(iova + 14, 2, next_, "desc.next"))


class SplitDriver:
    """A conforming driver: allocates descriptors, builds chains, publishes, reaps (§2.7.13-14).

    ``start_idx`` starts both the available and used ``idx`` somewhere other than 0 (as after a
    migration), so tests can cross the 16-bit wrap without 65536 round trips.
    """

    def __init__(self, memory: ModelMemory, ring: SplitRing, *, features: int = 0,
                 translator: Translator = IDENTITY, start_idx: int = 0) -> None:
        self.ring = ring
        self.features = features
        self._io = RingAccess(memory, translator)
        self.memory = memory
        self.translator = translator
        self.avail_idx = u16(start_idx)  # the published idx
        self.last_used_idx = u16(start_idx)
        self._added = 0
        self._free: deque[int] = deque(range(ring.num))
        self._chains: dict[int, list[int]] = {}
        driver_access(self._io.write(ring.avail_flags, 2, 0, "avail.flags"))
        driver_access(self._io.write(ring.avail_idx, 2, self.avail_idx, "avail.idx"))
        driver_access(self._io.write(ring.used_flags, 2, 0, "used.flags"))  # §2.7.10.1: initialise to 0
        driver_access(self._io.write(ring.used_idx, 2, self.last_used_idx, "used.idx"))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def event_idx(self) -> bool:
        return _has(self.features, VIRTIO_RING_F_EVENT_IDX)

    def _write_desc(self, iova: int, addr: int, length: int, flags: int, next_: int) -> None:
        write_split_desc(self.memory, iova, addr, length, flags, next_, self.translator)

    def add(self, segments: Sequence[tuple[int, int, bool]], *, indirect_table: int | None = None) -> int:
        """Place a chain of ``(addr, len, device_writable)`` elements; returns its head index.

        With ``indirect_table`` the elements go into an indirect table at that IOVA and the ring
        gets one INDIRECT descriptor. The chain is visible to the device after :meth:`publish`.
        """
        if not segments:
            raise DriverRuleBroken("a buffer has at least one element (§2.7.13.1)")
        writable = [w for _, _, w in segments]
        if writable != sorted(writable):
            raise DriverRuleBroken("device-writable elements must follow device-readable ones (§2.7.4.2)")
        if sum(length for _, length, _ in segments) > 1 << 32:
            raise DriverRuleBroken("a chain is at most 2^32 bytes (§2.7.5.2)")
        if len(segments) > self.ring.num:
            raise DriverRuleBroken("a chain is at most queue size descriptors long (§2.7.5.3.1)")
        if self._added + split_inflight(self.avail_idx, self.last_used_idx) >= self.ring.num:
            raise DriverRuleBroken("the available ring is full")
        if indirect_table is not None:
            if not _has(self.features, VIRTIO_RING_F_INDIRECT_DESC):
                raise DriverRuleBroken("INDIRECT needs VIRTIO_F_INDIRECT_DESC (§2.7.5.3.1)")
            for i, (addr, length, w) in enumerate(segments):
                last = i == len(segments) - 1
                flags = (VRING_DESC_F_WRITE if w else 0) | (0 if last else VRING_DESC_F_NEXT)
                self._write_desc(indirect_table + VRING_DESC_SIZE * i, addr, length, flags, 0 if last else i + 1)
            used = [self._alloc(1)[0]]
            self._write_desc(self.ring.desc_entry(used[0]), indirect_table, VRING_DESC_SIZE * len(segments),
                             VRING_DESC_F_INDIRECT, 0)
        else:
            used = self._alloc(len(segments))
            for i, (addr, length, w) in enumerate(segments):
                last = i == len(segments) - 1
                flags = (VRING_DESC_F_WRITE if w else 0) | (0 if last else VRING_DESC_F_NEXT)
                self._write_desc(self.ring.desc_entry(used[i]), addr, length, flags, 0 if last else used[i + 1])
        head = used[0]
        self._chains[head] = used
        driver_access(self._io.write(self.ring.avail_entry(self.avail_idx + self._added), 2, head, "avail.ring"))
        self._added += 1
        return head

    def _alloc(self, count: int) -> list[int]:
        if count > len(self._free):
            raise DriverRuleBroken(f"{count} descriptors needed, {len(self._free)} free")
        return [self._free.popleft() for _ in range(count)]

    def publish(self) -> NotifyRule:
        """Expose the added chains by moving avail ``idx`` (wrapping at 2^16); say whether to kick."""
        old = self.avail_idx
        self.avail_idx = u16(old + self._added)
        self._added = 0
        driver_access(self._io.write(self.ring.avail_idx, 2, self.avail_idx, "avail.idx"))
        flags = driver_access(self._io.read(self.ring.used_flags, 2, "used.flags"))
        event = driver_access(self._io.read(self.ring.avail_event, 2, "avail_event"))
        return split_notification(Direction.AVAIL, event_idx=self.event_idx, flags=flags, event=event,
                                  old_idx=old, new_idx=self.avail_idx)

    def reap(self) -> list[UsedElem]:
        """Take every used entry the device has published, freeing their descriptors."""
        used_idx = driver_access(self._io.read(self.ring.used_idx, 2, "used.idx"))
        out: list[UsedElem] = []
        while self.last_used_idx != used_idx:
            entry = self.ring.used_entry(self.last_used_idx)
            elem = UsedElem(driver_access(self._io.read(entry, 4, "used.id")),
                            driver_access(self._io.read(entry + 4, 4, "used.len")))
            if elem.id not in self._chains:
                raise DriverRuleBroken(f"used id {elem.id} is not the head of a chain in flight")
            self._free.extend(self._chains.pop(elem.id))
            out.append(elem)
            self.last_used_idx = u16(self.last_used_idx + 1)
        return out

    def set_used_event(self, value: int) -> None:
        driver_access(self._io.write(self.ring.used_event, 2, u16(value), "used_event"))

    def set_no_interrupt(self, suppress: bool) -> None:
        """VRING_AVAIL_F_NO_INTERRUPT; with EVENT_IDX the driver must keep flags 0 (§2.7.7.1)."""
        if suppress and self.event_idx:
            raise DriverRuleBroken("with VIRTIO_F_EVENT_IDX the driver MUST set avail flags to 0 (§2.7.7.1)")
        driver_access(self._io.write(self.ring.avail_flags, 2, int(suppress), "avail.flags"))


class SplitDeviceModel:
    """What a conforming device does with a split ring.

    State is what vDPA keeps per queue: ``last_avail_idx`` (the next available entry to take,
    ``VHOST_SET_VRING_BASE``) and ``used_idx``. A chain the walker rejects stops the queue
    (``fault``); the model then consumes nothing more, which is one of the reactions every
    :data:`~vdpacert.model.chains.BAD_INPUTS` row allows.
    """

    def __init__(self, memory: ModelMemory, ring: SplitRing, *, features: int = 0,
                 translator: Translator = IDENTITY, last_avail_idx: int = 0, used_idx: int = 0) -> None:
        self.memory = memory
        self.ring = ring
        self.features = features
        self.translator = translator
        self.last_avail_idx = u16(last_avail_idx)
        self.used_idx = u16(used_idx)
        self.fault: ChainFault | None = None
        self._outstanding: list[Chain] = []  # consumed and not yet used, in consumption order
        self._io = RingAccess(memory, translator)
        self._ctx = WalkContext(Layout.SPLIT, ring.num, features, memory, translator)
        self._table = SplitTable(memory, translator, ring.desc, ring.num)

    @property
    def event_idx(self) -> bool:
        return _has(self.features, VIRTIO_RING_F_EVENT_IDX)

    @property
    def in_order(self) -> bool:
        return _has(self.features, VIRTIO_F_IN_ORDER)

    @property
    def outstanding(self) -> tuple[Chain, ...]:
        return tuple(self._outstanding)

    def pending(self) -> int | ChainFault:
        """Chains published and not yet taken; more than the queue size is bad input."""
        avail_idx = self._io.read(self.ring.avail_idx, 2, "avail.idx")
        if isinstance(avail_idx, ChainFault):
            return avail_idx
        count = split_inflight(avail_idx, self.last_avail_idx)
        if count > self.ring.num:
            return ChainFault(BadInput.AVAIL_IDX_AHEAD,
                              f"avail idx {avail_idx} is {count} entries past last_avail_idx {self.last_avail_idx}")
        return count

    def next_head(self, ahead: int = 0) -> int | ChainFault | None:
        """The head index in available ring entry ``last_avail_idx + ahead``, if published."""
        count = self.pending()
        if isinstance(count, ChainFault) or count <= ahead:
            return None if isinstance(count, int) else count
        head = self._io.read(self.ring.avail_entry(self.last_avail_idx + ahead), 2, "avail.ring")
        if isinstance(head, int) and head >= self.ring.num:
            return ChainFault(BadInput.INDEX_OUT_OF_RANGE, f"available ring names head {head} of {self.ring.num}")
        return head

    def expected_order(self) -> list[int] | ChainFault:
        """Heads in the order the device takes them: available ring order (§2.7.6)."""
        count = self.pending()
        if isinstance(count, ChainFault):
            return count
        heads: list[int] = []
        for ahead in range(count):
            head = self.next_head(ahead)
            if isinstance(head, ChainFault):
                return head
            assert head is not None
            heads.append(head)
        return heads

    def peek(self) -> Chain | ChainFault | None:
        """The chain the device must take next, parsed; None when nothing is published."""
        if self.fault is not None:
            return self.fault
        head = self.next_head()
        if head is None or isinstance(head, ChainFault):
            return head
        return walk_chain(self._table, head, self._ctx)

    def consume(self) -> Chain | ChainFault | None:
        """Take the next chain: ``last_avail_idx`` moves on; bad input stops the queue instead."""
        chain = self.peek()
        if isinstance(chain, ChainFault):
            self.fault = chain
        elif chain is not None:
            self._outstanding.append(chain)
            self.last_avail_idx = u16(self.last_avail_idx + 1)
        return chain

    def may_write(self) -> tuple[WriteRange, ...]:
        """Everything the device may write now: the writable buffers of chains it consumed and
        has not returned, the used ring slots they will take, used ``flags``/``idx`` and,
        with EVENT_IDX, ``avail_event``. Nothing else (§2.7.5.1, §2.7.8, §2.7.10)."""
        ranges = [WriteRange(s.addr, s.len, f"writable buffer of chain {c.head}")
                  for c in self._outstanding for s in c.writable if s.len]
        ranges += [WriteRange(self.ring.used_entry(self.used_idx + i), VRING_USED_ELEM_SIZE, "used ring entry")
                   for i in range(len(self._outstanding))]
        ranges += [WriteRange(self.ring.used_flags, 2, "used flags"), WriteRange(self.ring.used_idx, 2, "used idx")]
        if self.event_idx:
            ranges.append(WriteRange(self.ring.avail_event, 2, "avail_event"))
        return tuple(ranges)

    def write_allowed(self, iova: int, length: int) -> bool:
        return any(r.covers(iova, length) for r in self.may_write())

    def _broken(self, message: str) -> DeviceRuleBroken:
        return DeviceRuleBroken(DEVICE_USED_RING.violation(message))

    def complete(self, head: int, written: int) -> NotifyRule | ChainFault:
        return self.complete_batch([(head, written)])

    def complete_batch(self, items: Sequence[tuple[int, int]]) -> NotifyRule | ChainFault:
        """Return chains: one used entry ``{id: head, len: bytes written}`` each, then one ``idx``
        update, then the notification rule for the window just published (§2.7.7.2).

        Raises :class:`DeviceRuleBroken` for what no conforming device does: returning a chain it
        does not hold, claiming more bytes than its writable buffers hold, or (IN_ORDER) using
        chains out of the order they were made available (§2.7.9).
        """
        remaining = list(self._outstanding)
        for head, written in items:
            chain = next((c for c in remaining if c.head == head), None)
            if chain is None:
                raise self._broken(f"used id {head} is not a chain the device holds")
            if not 0 <= written <= chain.writable_len:
                raise self._broken(f"len {written} for chain {head} exceeds its {chain.writable_len} writable bytes")
            if self.in_order and remaining[0] is not chain:
                raise DeviceRuleBroken(DEVICE_IN_ORDER.violation(f"chain {head} used before chain {remaining[0].head}"))
            remaining.remove(chain)
        old = self.used_idx
        for head, written in items:
            entry = self.ring.used_entry(self.used_idx)
            fault = self._io.write(entry, 4, head, "used.id") or self._io.write(entry + 4, 4, written, "used.len")
            if fault is not None:
                self.fault = fault
                return fault
            self._outstanding.remove(next(c for c in self._outstanding if c.head == head))
            self.used_idx = u16(self.used_idx + 1)
        fault = self._io.write(self.ring.used_idx, 2, self.used_idx, "used.idx")
        if fault is not None:
            self.fault = fault
            return fault
        return self.used_notification(old)

    def used_notification(self, old_used_idx: int) -> NotifyRule | ChainFault:
        """Must the device notify for the entries published since ``old_used_idx``?"""
        flags = self._io.read(self.ring.avail_flags, 2, "avail.flags")
        event = self._io.read(self.ring.used_event, 2, "used_event")
        if isinstance(flags, ChainFault):
            return flags
        if isinstance(event, ChainFault):
            return event
        return split_notification(Direction.USED, event_idx=self.event_idx, flags=flags, event=event,
                                  old_idx=old_used_idx, new_idx=self.used_idx)

    def set_avail_event(self, value: int) -> ChainFault | None:
        """Ask for a kick once avail ``idx`` passes ``value`` (EVENT_IDX only, §2.7.10.2)."""
        if not self.event_idx:
            raise DeviceRuleBroken(DEVICE_AVAIL_EVENT.violation("avail_event is only written with VIRTIO_F_EVENT_IDX"))
        return self._io.write(self.ring.avail_event, 2, u16(value), "avail_event")

    def set_no_notify(self, suppress: bool) -> ChainFault | None:
        """VRING_USED_F_NO_NOTIFY; with EVENT_IDX the device MUST keep flags 0 (§2.7.10.2)."""
        if suppress and self.event_idx:
            raise DeviceRuleBroken(DEVICE_USED_FLAGS.violation(
                "with VIRTIO_F_EVENT_IDX the device MUST set used flags to 0"))
        return self._io.write(self.ring.used_flags, 2, int(suppress), "used.flags")

