"""The ring fuzzer's invariants over two pictures of guest memory: the driver's view and what the device left.

Chains are parsed with the model's walker (:func:`vdpacert.model.chains.walk_chain`) over a
snapshot, never with the device's own code, so the two walkers are checked against each other
as a side effect. A device may write a chain's bytes before it takes the next one; a later chain
whose descriptors lay in an earlier chain's writable buffer is therefore parsed both as the
driver wrote it and as it was after the run, and either reading is accepted.

What the device may write (``rings.write_outside``): for each used chain, the first ``len``
bytes of its writable buffers (and, for virtio-blk, the status byte, which is the last writable
byte and may lie beyond ``len``: §5.2.6, §2.7.8.2 "MAY write more than len"); the split used
ring (flags, idx, ring, avail_event); the packed descriptor slots of the chains it used and the
device event suppression area. Nothing else, and never a guard page.

A driver that hands the device a writable buffer over the queue's own rings (its available ring,
used ring or descriptor table) lets the device rewrite what records its work: such a queue's
entries are attributed but not judged, and only the guard pages stay checked.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from vdpacert.fuzz.base import InvariantBroken
from vdpacert.fuzz.rings_layout import (
    BUF_AREA,
    BUF_SIZE,
    GUARD,
    IOVA_BASE,
    REGION,
    RO_ALIAS,
    WO_ALIAS,
    QueuePlan,
)
from vdpacert.model.chains import (
    BadInput,
    Chain,
    ChainFault,
    Layout,
    RawDesc,
    SplitTable,
    WalkContext,
    read_desc_at,
    walk_chain,
)
from vdpacert.model.guest_memory import AccessFault, FaultReason, ModelMemory
from vdpacert.model.vring_packed import PackedRing, PackedRingTable, is_available, is_used

__all__ = ["Allowed", "check_queue", "check_writes"]

_USED_ELEM = struct.Struct("<II")
_DESC = struct.Struct("<QIHH")
MAX_LIST = 256  # the longest list a walk accepts (the largest queue size)
_NONZERO = re.compile(rb"[^\x00]+")
Span = tuple[int, int]  # [start, end) in region offsets


class _View(ModelMemory):
    """A region snapshot as the model's memory, at the IOVA the region is mapped at (reads only)."""

    def __init__(self, data: bytes | bytearray) -> None:
        self._data = data

    def read(self, address: int, length: int) -> bytes:
        at = address - IOVA_BASE
        chunk = bytes(self._data[GUARD + at:GUARD + at + length]) if 0 <= at <= REGION - length else b""
        return chunk if len(chunk) == length else bytes(length)


class _Map:
    """The IOTLB the fuzzer gives the device, as a model translator: model address = main-map IOVA."""

    @staticmethod
    def translate(iova: int, length: int, write: bool) -> int | AccessFault:
        if length == 0:
            return iova
        end = iova + length
        if IOVA_BASE <= iova and end <= IOVA_BASE + REGION:
            return iova
        for alias, writable in ((RO_ALIAS, False), (WO_ALIAS, True)):
            if alias <= iova and end <= alias + BUF_SIZE:
                if writable != write:
                    return AccessFault(iova, length, write, FaultReason.PERMISSION)
                return IOVA_BASE + BUF_AREA + iova - alias
        return AccessFault(iova, length, write, FaultReason.UNMAPPED)


_MAP = _Map()


@dataclass(frozen=True)
class _HeadAnnounced:
    """A packed ring read as a device that trusts the head's NEXT flags reads it (no availability check)."""

    memory: ModelMemory
    rest: ModelMemory  # where the slots after the head are read
    ring: PackedRing
    head: int
    indirect: bool = False
    can_loop: bool = False

    def read(self, index: int) -> RawDesc | ChainFault:
        memory = self.memory if index == self.head else self.rest
        return read_desc_at(memory, _MAP, self.ring.slot(index), f"ring slot {index}", packed=True)

    def successor(self, index: int, desc: RawDesc) -> int | ChainFault | None:
        return (index + 1) % self.ring.num if desc.flags & 1 else None


@dataclass
class Allowed:
    """Spans of the region the device may have written, gathered queue by queue."""

    spans: list[Span]

    def add_chain(self, chain: Chain, length: int, status_tail: bool) -> None:
        left = length
        last: Span | None = None
        for seg in chain.writable:
            if seg.target is None or not seg.len:
                continue
            start = seg.target - IOVA_BASE
            if left > 0:
                self.spans.append((start, start + min(left, seg.len)))
                left -= seg.len
            last = (start + seg.len - 1, start + seg.len)
        if status_tail and last is not None:
            self.spans.append(last)


def _walks(q: QueuePlan, features: int, views: Sequence[_View], head: int) -> list[Chain | ChainFault]:
    out: list[Chain | ChainFault] = []
    for view in views:
        ctx = WalkContext(Layout.PACKED if q.packed else Layout.SPLIT, q.num, features, view, _MAP)
        if q.packed:
            ring = PackedRing(q.num, IOVA_BASE + q.desc, IOVA_BASE + q.driver, IOVA_BASE + q.device)
            table = PackedRingTable(view, _MAP, ring, head, _wrap_for(q, head))
            walked = walk_chain(table, head, ctx)
            out.append(walked)
            if (isinstance(walked, ChainFault) and walked.bad is BadInput.DESC_NOT_AVAILABLE
                    and is_available(int.from_bytes(view.read(ring.slot(head) + 14, 2), "little"), _wrap_for(q, head))):
                # Not detectable by a device (it may read a list as its head announces it): the list as if
                # every slot of it were available is a reading the device may use, its later slots read
                # as the driver wrote them or as the device itself had rewritten them.
                out += [walk_chain(_HeadAnnounced(view, rest, ring, head), head, ctx) for rest in views]
        else:
            out.append(walk_chain(SplitTable(view, _MAP, IOVA_BASE + q.desc, q.num), head, ctx))
    return out


def _distinct(memories: Sequence[bytes]) -> tuple[_View, ...]:
    """Views of the memories, each content once (most kicks change nothing a walk reads twice)."""
    out: list[bytes] = []
    for memory in memories:
        if not any(memory == seen for seen in out):
            out.append(memory)
    return tuple(_View(memory) for memory in out)


def _wrap_for(q: QueuePlan, slot: int) -> int:
    return q.wrap if slot >= q.start else 1 - q.wrap


def _packed_position(q: QueuePlan, slots: int) -> tuple[int, int]:
    """The ring slot and wrap counter ``slots`` slots past the queue's start."""
    return (q.start + slots) % q.num, q.wrap ^ ((q.start + slots) // q.num & 1)


def _u16(data: bytes | bytearray, offset: int) -> int:
    return int.from_bytes(data[GUARD + offset:GUARD + offset + 2], "little")


@dataclass
class QueueResult:
    """What one queue's check found: used entries, the valid chains ahead of the first bad input."""

    used: int
    taken: list[Chain]  # valid chains ahead of the first bad one (or of the end): the device may take them
    bad_reached: bool  # a bad chain (or a bad avail idx) follows those
    clobbered: bool = False  # the device rewrote its own rings through a buffer: entries not judged

    @property
    def available(self) -> int:
        return len(self.taken)


def check_queue(q: QueuePlan, features: int, stages: Sequence[tuple[int, bytes]], afters: Sequence[bytes],
                allowed: Allowed, *, status_tail: bool, used_positions: Sequence[int] = ()) -> QueueResult:
    """``rings.used_entry`` for one queue; adds what the device may write there to ``allowed``.

    ``stages``: at each kick of this queue, the avail idx the device could see (split) and the
    driver's view of memory; the last one holds everything the driver wrote. A chain counts as
    made available if it parses in any view, or as the device left memory. ``afters``: memory
    after each kick (the used ring holds only the last ``num`` entries, the driver reads it as it goes);
    ``used_positions``: packed, the device's used position (GET_VRING_BASE's high half) after each.
    """
    views = _distinct([view for _, view in stages] + list(afters))
    try:
        if q.packed:
            return _check_packed(q, features, views, stages[-1][1], afters, allowed, status_tail, used_positions)
        return _check_split(q, features, stages, views, afters, allowed, status_tail)
    except InvariantBroken as broken:
        # A chain whose device-writable buffer lies over this queue's own rings lets the device overwrite
        # the used entries (or descriptors, or the available ring) it reads and writes: the ring no longer
        # records what the device did. Such a driver gave the device write access to its rings; only the
        # guard pages stay checked, as for a clobbered available ring.
        if broken.invariant != "rings.used_entry" or not _writable_over_own_rings(q, features, views):
            raise
        return _not_judged(allowed)


def _not_judged(allowed: Allowed) -> QueueResult:
    """A queue whose rings the device could rewrite through its buffers: anything in the region is allowed."""
    allowed.spans.append((0, REGION))
    return QueueResult(0, [], True, clobbered=True)


def _device_area(q: QueuePlan) -> Span:
    """The device area, the device's to write: the split used ring, or the packed device event suppression."""
    return (q.device, q.device + (4 if q.packed else 6 + 8 * q.num))


def _ring_areas(q: QueuePlan) -> list[Span]:
    """The queue's rings: its descriptor table, driver area and device area."""
    driver_end = q.driver + (4 if q.packed else 6 + 2 * q.num)
    return [(q.desc, q.desc + 16 * q.num), (q.driver, driver_end), _device_area(q)]


def _writable_over_own_rings(q: QueuePlan, features: int, views: Sequence[_View]) -> bool:
    """Whether any chain, from any slot of the table in any view, has a writable buffer over the queue's rings."""
    areas = _ring_areas(q)
    for head in range(q.num):
        for chain in _walks(q, features, views, head):
            if not isinstance(chain, Chain):
                continue
            for seg in chain.writable:
                if seg.target is None or not seg.len:
                    continue
                start = seg.target - IOVA_BASE
                if any(start < end and begin < start + seg.len for begin, end in areas):
                    return True
    return False


def _check_split(q: QueuePlan, features: int, stages: Sequence[tuple[int, bytes]], views: tuple[_View, ...],
                 afters: Sequence[bytes], allowed: Allowed, status_tail: bool) -> QueueResult:
    allowed.spans.append(_device_area(q))
    # Each stage was kicked: the device saw every idx published, and each avail entry as it was when
    # its idx was published (a later stage of a small ring may reuse the slot). An idx at most a ring
    # ahead of what was published before may be valid (the device may have consumed all of that).
    heads: list[int] = []
    stage_of: list[int] = []
    bad_idx = False
    for k, (idx, view) in enumerate(stages):
        pending = (idx - q.start) & 0xFFFF
        if not len(heads) <= pending <= len(heads) + q.num:
            bad_idx = True
            continue
        heads += [_u16(view, q.driver + 4 + 2 * ((q.start + i) % q.num)) for i in range(len(heads), pending)]
        stage_of += [k] * (pending - len(stage_of))
    # A writable buffer over this queue's available ring lets the device rewrite what it reads next
    # (the idx, the heads): the driver's picture of what was made available no longer holds, so the
    # entries are then only attributed (for rings.write_outside), not judged.
    area = slice(GUARD + q.driver, GUARD + q.driver + 4 + 2 * q.num)
    if any(view[area] != stages[-1][1][area] for view in afters):
        # The device then walks heads (and descriptors, indirect tables) its own writes made, in states no
        # snapshot holds: any chain it found was the driver's gift of write access to its own rings. Only
        # the guard pages around the region stay checked for such an input.
        return _not_judged(allowed)
    elems: list[tuple[int, int]] = []
    for view in afters:
        now = (_u16(view, q.device + 2) - q.start) & 0xFFFF
        if not len(elems) <= now <= len(elems) + q.num:
            raise InvariantBroken("rings.used_entry", f"queue {q.index}: used idx moved from {len(elems)} to {now} "
                                  f"entries past the start in one kick (queue size {q.num})")
        for i in range(len(elems), now):
            at = GUARD + q.device + 4 + 8 * ((q.start + i) % q.num)
            elems.append(_USED_ELEM.unpack(view[at:at + 8]))
    if len(elems) > len(heads):
        raise InvariantBroken("rings.used_entry", f"queue {q.index}: used idx moved {len(elems)} on, but "
                              f"{len(heads)} chains were made available (avail idx {[i for i, _ in stages]}, "
                              f"start {q.start})")
    # Which position each used entry answers: the first not yet answered with that head (the reference
    # devices complete in order, so the first match is the right one).
    open_positions = list(range(len(heads)))
    for i, (head, length) in enumerate(elems):
        position = next((p for p in open_positions if head == heads[p]), None)
        walks = _walks(q, features, views, head) if head < q.num else []
        if position is None:
            raise InvariantBroken("rings.used_entry", f"queue {q.index}: used entry {i} names {head}, which is "
                                  f"not an available head not yet used (available {heads})")
        open_positions.remove(position)
        _admit(q, walks, head, length, allowed, status_tail)
    count = len(elems)
    taken: list[Chain] = []
    for head, stage in zip(heads, stage_of, strict=True):
        walked = _walks(q, features, (_View(stages[stage][1]),), head)[0] if head < q.num else None
        if not isinstance(walked, Chain):
            return QueueResult(count, taken, True)
        taken.append(walked)
    return QueueResult(count, taken, bad_idx)


def _admit(q: QueuePlan, walks: Sequence[Chain | ChainFault], chain_id: int, length: int, allowed: Allowed,
           status_tail: bool) -> None:
    chains = [w for w in walks if isinstance(w, Chain)]
    if not chains:
        reason = next((str(w) for w in walks if isinstance(w, ChainFault)), "head outside the table")
        raise InvariantBroken("rings.used_entry", f"queue {q.index}: chain {chain_id} was used but is bad input "
                              f"({reason})")
    most = max(c.writable_len for c in chains)
    if length > most:
        raise InvariantBroken("rings.used_entry", f"queue {q.index}: chain {chain_id} used with len {length}, "
                              f"above its {most} writable bytes")
    for chain in chains:
        allowed.add_chain(chain, length, status_tail)


def _available_packed(q: QueuePlan, features: int, view: _View) -> tuple[list[Chain], bool]:
    """The lists the driver made available from the start position, up to the first bad one."""
    out: list[Chain] = []
    slots = 0
    while slots < q.num:
        slot, wrap = _packed_position(q, slots)
        flags = int.from_bytes(view.read(IOVA_BASE + q.desc + 16 * slot + 14, 2), "little")
        if not is_available(flags, wrap):
            return out, False
        walked = next((w for w in _walks(q, features, (view,), slot) if isinstance(w, Chain)), None)
        if walked is None:
            return out, True
        out.append(walked)
        slots += walked.descriptors
    return out, False


def _used_list(q: QueuePlan, features: int, views: tuple[_View, ...], after: bytes, done: int,
               status_tail: bool) -> list[tuple[int, list[Span]]]:
    """The readings of the used descriptor ``done`` slots past the start: for each distinct size of the
    list it answers, that size and what the device could have written for it."""
    slot, lap = _packed_position(q, done)
    at = GUARD + q.desc + 16 * slot
    _, length, buffer_id, flags = _DESC.unpack(after[at:at + 16])
    if not is_used(flags, lap):
        raise InvariantBroken("rings.used_entry", f"queue {q.index}: the device moved past slot {slot} "
                              f"without a used descriptor there (flags {flags:#x}, wrap {lap})")
    # The list the device took at this slot, as the driver had written it at some kick (the device
    # goes on from where it stopped, so a list is not always reachable from the start).
    walks = _walks(q, features, views, slot)
    match = [c for c in walks if isinstance(c, Chain) and c.id == buffer_id]
    if not match:
        reason = next((str(w) for w in walks if isinstance(w, ChainFault)), "")
        raise InvariantBroken("rings.used_entry", f"queue {q.index}: used descriptor at slot {slot} names "
                              f"Buffer ID {buffer_id}, not a list made available there {reason}")
    readings: list[tuple[int, list[Span]]] = []
    for size in sorted({c.descriptors for c in match}):
        allowed = Allowed([])
        _admit(q, [c for c in match if c.descriptors == size], buffer_id, length, allowed, status_tail)
        allowed.spans += [(q.desc + 16 * s, q.desc + 16 * s + 16) for s in ((slot + k) % q.num for k in range(size))]
        readings.append((size, allowed.spans))
    return readings


def _follow_used(q: QueuePlan, features: int, views: tuple[_View, ...], after: bytes, done: int,
                 target: tuple[int, int], status_tail: bool) -> tuple[int, int, list[Span]]:
    """Walk the used descriptors from ``done`` slots past the start to the device's used position
    ``target`` (slot, wrap): the slots walked, the lists counted and the spans the device may have written.

    A list whose head announces more descriptors than the driver made available has several readings
    (its later slots as the driver wrote them, or as the device itself rewrote them in an earlier lap),
    each of its own size; the one the device took is the one whose used descriptors lead to where the
    device says it is, so every reading is followed (depth first, each position once).
    """
    bound = done + q.num + MAX_LIST
    stack: list[tuple[int, int, list[Span]]] = [(done, 0, [])]
    seen: set[int] = set()
    first_error: InvariantBroken | None = None
    while stack:
        at, lists, spans = stack.pop()
        if _packed_position(q, at) == target:
            return at, lists, spans
        if at in seen:
            continue
        seen.add(at)
        if at > bound:
            first_error = first_error or InvariantBroken(
                "rings.used_entry", f"queue {q.index}: used position {target} is not reached from "
                f"{q.start}/{q.wrap} through the used descriptors")
            continue
        try:
            readings = _used_list(q, features, views, after, at, status_tail)
        except InvariantBroken as error:
            first_error = first_error or error
            continue
        stack += [(at + size, lists + 1, spans + more) for size, more in reversed(readings)]
    assert first_error is not None  # the start position is always explored
    raise first_error


def _check_packed(q: QueuePlan, features: int, views: tuple[_View, ...], driver: bytes, afters: Sequence[bytes],
                  allowed: Allowed, status_tail: bool, used_positions: Sequence[int]) -> QueueResult:
    allowed.spans.append(_device_area(q))
    chains, bad = _available_packed(q, features, _View(driver))
    # Follow the used descriptors from the start to where the device says it is after each kick, reading
    # each as the driver would right after that kick (a later lap may overwrite it). A device that reads
    # a list as its head announces it may go round the ring more than once.
    done = used = 0
    for after, position in zip(afters, used_positions, strict=True):
        done, lists, spans = _follow_used(q, features, views, after, done, (position & 0x7FFF, position >> 15 & 1),
                                          status_tail)
        used += lists
        allowed.spans += spans
    return QueueResult(used, chains, bad)


def check_writes(before: bytes | bytearray, after: bytes, allowed: Allowed) -> None:
    """``rings.write_outside``: every changed byte lies in an allowed span of the region."""
    if before == after:
        return
    xor = (int.from_bytes(before, "little") ^ int.from_bytes(after, "little")).to_bytes(len(after), "little")
    spans = sorted(allowed.spans)
    for run in _NONZERO.finditer(xor):
        start, end = run.start() - GUARD, run.end() - GUARD
        if start < 0 or end > REGION:
            raise InvariantBroken("rings.write_outside", f"guard page bytes changed at region offset {start:#x}")
        at = start
        while at < end:
            cover = max((e for s, e in spans if s <= at < e), default=None)
            if cover is None:
                raise InvariantBroken("rings.write_outside", f"byte at region offset {at:#x} (iova "
                                      f"{IOVA_BASE + at:#x}) changed from {before[GUARD + at]:#04x} to "
                                      f"{after[GUARD + at]:#04x} outside every used writable buffer and ring area")
            at = cover
