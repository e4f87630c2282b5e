"""The shadow virtqueue: software-assisted dirty tracking for devices that cannot log (issue 5, mode 2).

Most vDPA devices cannot log the pages they write, so a migrating VMM stands between the guest's
ring and the device (brief §5). A :class:`ShadowVirtqueue` plays the *device* toward the guest's
ring and the *driver* toward the device's ring (a :mod:`~vdpacert.migration.shadow_ring` in VMM
memory):

- it takes every chain the guest makes available, parsed by the model's walker (every class of
  bad input is refused there), and forwards its buffers, at the guest's own IOVAs, on the shadow
  ring;
- when the device uses a shadow chain, it marks dirty the guest bytes the device wrote (the used
  length, across the chain's writable segments in order), writes the guest's used entry itself
  and marks that too (split: used element and used idx; packed: the used descriptor), then
  notifies the guest as the guest's suppression asks (the model's notification table decides);
- it always asks the guest for kicks (split with EVENT_IDX: avail_event at the next entry it has
  not taken, marked dirty when written; packed: device event suppression ENABLE): the guest ring
  is polled on every pass anyway, so asking for fewer kicks would only add latency.

Split and packed guest rings both work (QEMU's shadow virtqueue is split-only). The position in the
guest ring is exactly a vhost vring base (:meth:`ShadowVirtqueue.guest_base`), and the chains taken
but not yet used are :meth:`ShadowVirtqueue.inflight`; a new shadow virtqueue built from both (on
another device) resubmits those chains first, so a migration loses and repeats none, even when the
device uses buffers out of order, which a vring base alone cannot express.

Only guest memory is ever marked dirty: the shadow ring and the indirect-table copies live in VMM
memory. Nothing here blocks: :meth:`ShadowVirtqueue.poll` does one pass and the caller loops.
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from vdpacert.conformance.driver.memory import GuestLayout
from vdpacert.migration.shadow_ring import LayoutMemory, LayoutTranslator, ShadowRing, make_shadow_ring
from vdpacert.model.chains import (
    BadInput,
    Chain,
    ChainFault,
    DriverRuleBroken,
    Layout,
    Segment,
    SplitTable,
    WalkContext,
    walk_chain,
)
from vdpacert.model.guest_memory import AccessFault
from vdpacert.model.notify import Decision, Direction, RingPosition, packed_notification, split_notification
from vdpacert.model.ring_index import PackedVqState, decode_packed_base, encode_packed_base, split_inflight, u16
from vdpacert.model.spec import SpecError
from vdpacert.model.vring_packed import PackedRing, PackedRingTable, advance, is_available, used_flags
from vdpacert.model.vring_split import SplitRing
from vdpacert.uapi.virtio_config import VIRTIO_F_RING_PACKED
from vdpacert.uapi.virtio_ring import (
    VIRTIO_RING_F_EVENT_IDX,
    VRING_DESC_F_WRITE,
    VRING_DESC_SIZE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
)

__all__ = ["DirtySink", "Observer", "ShadowVirtqueue", "SvqError"]

#: Told about every guest chain the device returns: its device-readable bytes and the first byte the
#: device wrote (-1 when it wrote none). The VMM watches the net control queue this way (an OK ack).
Observer = Callable[[bytes, int], None]
#: How long :meth:`ShadowVirtqueue.inject` waits for the device, in seconds.
INJECT_TIMEOUT = 2.0
_INJECT_SLICE = 0.005

_USED_ELEM = struct.Struct("<II")  # struct vring_used_elem: id, len
_PACKED_USED = struct.Struct("<IH")  # the len and id of a used packed descriptor (its flags go last)


class DirtySink(Protocol):
    """Where dirty guest memory is reported: ``length`` bytes at guest-physical ``gpa`` were written."""

    def note(self, gpa: int, length: int) -> None: ...


class SvqError(Exception):
    """A shadow virtqueue cannot go on (a VMM-level error, not a spec clause).

    ``index`` is the queue, ``reason`` what happened, ``bad`` the class of bad guest input when that
    is the cause (the queue is then broken: every later :meth:`ShadowVirtqueue.poll` raises again).
    """

    def __init__(self, index: int, reason: str, bad: BadInput | None = None) -> None:
        super().__init__(f"shadow virtqueue {index}: {reason}")
        self.index = index
        self.reason = reason
        self.bad = bad


class _Refused(Exception):
    """Internal: the guest ring or the migrated state cannot be used as given (becomes SvqError)."""

    def __init__(self, reason: str, bad: BadInput | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.bad = bad


Mark = Callable[[int, int], None]


class _GuestIo:
    """The guest ring's memory as the device side sees it: IOVA reads, and writes that are marked dirty."""

    def __init__(self, layout: GuestLayout, mark: Mark) -> None:
        self.memory = LayoutMemory(layout)
        self.translator = LayoutTranslator(layout)
        self._mark = mark

    def require(self, iova: int, size: int, what: str) -> None:
        """Refuse a ring area outside guest memory once, so later field accesses cannot fault."""
        where = self.translator.translate(iova, size, True)
        if isinstance(where, AccessFault):
            raise _Refused(f"guest {what}: {where}", BadInput.ADDRESS_UNMAPPED)

    def read(self, iova: int, size: int) -> int:
        return int.from_bytes(self.memory.read(iova, size), "little")

    def write(self, iova: int, data: bytes) -> None:
        self.memory.write(iova, data)
        self._mark(iova, len(data))

    def write_u16(self, iova: int, value: int) -> None:
        self.write(iova, value.to_bytes(2, "little"))

    def update_u16(self, iova: int, value: int) -> bool:
        """Write (and mark) only a value that differs: rewriting a field must not dirty a page for nothing."""
        if self.read(iova, 2) == value:
            return False
        self.write_u16(iova, value)
        return True


def _notify(decision: Decision) -> bool:
    # MUST and MAY both notify: a spurious interrupt costs the guest a look, a missing one stalls it.
    return decision is not Decision.SHOULD_NOT_NOTIFY


class _GuestRing(Protocol):
    """The device's half of the guest's ring, whatever its layout."""

    def start(self) -> None: ...
    def peek(self) -> Chain | ChainFault | None: ...
    def take(self, chain: Chain) -> None: ...
    def arm_kick(self) -> bool: ...
    def locate(self, ids: Sequence[int]) -> list[Chain]: ...
    def put_used(self, chain: Chain, written: int) -> None: ...
    def publish_used(self) -> bool: ...
    def base(self) -> int: ...
    def used_index(self) -> int: ...


class _SplitGuest:
    """The device side of a split guest ring: ``last_avail`` (the vring base) and the used idx written."""

    def __init__(self, io: _GuestIo, num: int, desc: int, avail: int, used: int, features: int,
                 base: int) -> None:
        self.io = io
        self.ring = SplitRing(num, desc, avail, used)
        io.require(desc, self.ring.desc_size, "descriptor table")
        io.require(avail, self.ring.avail_size, "available ring")
        io.require(used, self.ring.used_size, "used ring")
        if not 0 <= base <= 0xFFFF:
            raise _Refused(f"split vring base {base:#x} is not a 16-bit index")
        self.event_idx = bool(features >> VIRTIO_RING_F_EVENT_IDX & 1)
        self.last_avail = base
        # As vhost does when a ring is started: the used idx is whatever the ring holds.
        self.used_idx = io.read(self.ring.used_idx, 2)
        self.signalled = self.used_idx
        self.table = SplitTable(io.memory, io.translator, desc, num)
        self.ctx = WalkContext(Layout.SPLIT, num, features, io.memory, io.translator)

    def start(self) -> None:
        # A migrated ring may carry the previous device's NO_NOTIFY (or junk under EVENT_IDX): ask for kicks.
        self.io.update_u16(self.ring.used_flags, 0)
        self.arm_kick()

    def peek(self) -> Chain | ChainFault | None:
        avail_idx = self.io.read(self.ring.avail_idx, 2)
        pending = split_inflight(avail_idx, self.last_avail)
        if pending > self.ring.num:
            return ChainFault(BadInput.AVAIL_IDX_AHEAD,
                              f"avail idx {avail_idx} is {pending} entries past last_avail_idx {self.last_avail}")
        if not pending:
            return None
        head = self.io.read(self.ring.avail_entry(self.last_avail), 2)
        if head >= self.ring.num:
            return ChainFault(BadInput.INDEX_OUT_OF_RANGE, f"available ring names head {head} of {self.ring.num}")
        return walk_chain(self.table, head, self.ctx)

    def take(self, chain: Chain) -> None:
        self.last_avail = u16(self.last_avail + 1)

    def arm_kick(self) -> bool:
        """With EVENT_IDX: a kick for the first entry not taken yet. True if written (look at the ring again:
        the guest may have published before it could see the new value)."""
        return self.event_idx and self.io.update_u16(self.ring.avail_event, self.last_avail)

    def locate(self, ids: Sequence[int]) -> list[Chain]:
        """The chains of migrated in-flight heads: the descriptor table still holds them (the guest frees
        descriptors only when they are used)."""
        if len(set(ids)) != len(ids):
            raise _Refused(f"in-flight heads {list(ids)} repeat a head")
        outstanding = split_inflight(self.last_avail, self.used_idx)
        if outstanding != len(ids):
            raise _Refused(f"{len(ids)} in-flight heads given, but last_avail_idx {self.last_avail} and used idx "
                           f"{self.used_idx} leave {outstanding} chains in flight")
        chains = []
        for head in ids:
            if not 0 <= head < self.ring.num:
                raise _Refused(f"in-flight head {head} is outside the descriptor table of {self.ring.num}",
                               BadInput.INDEX_OUT_OF_RANGE)
            chain = walk_chain(self.table, head, self.ctx)
            if isinstance(chain, ChainFault):
                raise _Refused(f"in-flight head {head}: {chain}", chain.bad)
            chains.append(chain)
        return chains

    def put_used(self, chain: Chain, written: int) -> None:
        self.io.write(self.ring.used_entry(self.used_idx), _USED_ELEM.pack(chain.id, written))
        self.used_idx = u16(self.used_idx + 1)

    def publish_used(self) -> bool:
        self.io.write_u16(self.ring.used_idx, self.used_idx)
        rule = split_notification(Direction.USED, event_idx=self.event_idx,
                                  flags=self.io.read(self.ring.avail_flags, 2),
                                  event=self.io.read(self.ring.used_event, 2), old_idx=self.signalled,
                                  new_idx=self.used_idx)
        self.signalled = self.used_idx
        return _notify(rule.decision)

    def base(self) -> int:
        return self.last_avail

    def used_index(self) -> int:
        return self.used_idx


class _PackedGuest:
    """The device side of a packed guest ring: the avail and used positions of ``vdpa_vq_state_packed``."""

    def __init__(self, io: _GuestIo, num: int, desc: int, driver: int, device: int, features: int,
                 base: int) -> None:
        self.io = io
        self.ring = PackedRing(num, desc, driver, device)
        io.require(desc, VRING_DESC_SIZE * num, "descriptor ring")
        io.require(driver, 4, "driver event suppression")
        io.require(device, 4, "device event suppression")
        try:
            state = decode_packed_base(base)
        except ValueError as error:
            raise _Refused(f"packed vring base {base:#x}: {error}") from error
        if state.last_avail_idx >= num or state.last_used_idx >= num:
            raise _Refused(f"packed vring base {base:#x} names a slot past the ring of {num}")
        self.event_idx = bool(features >> VIRTIO_RING_F_EVENT_IDX & 1)
        self.avail = RingPosition(state.last_avail_idx, state.last_avail_counter)
        self.used = RingPosition(state.last_used_idx, state.last_used_counter)
        self.signalled = self.used
        self.ctx = WalkContext(Layout.PACKED, num, features, io.memory, io.translator)

    def start(self) -> None:
        # ENABLE: a kick for every list, whatever the previous device had asked for.
        self.io.update_u16(self.ring.device + 2, VRING_PACKED_EVENT_FLAG_ENABLE)

    def _walk(self, at: RingPosition) -> Chain | ChainFault:
        table = PackedRingTable(self.io.memory, self.io.translator, self.ring, at.idx, at.wrap)
        return walk_chain(table, at.idx, self.ctx)

    def _advance(self, at: RingPosition, steps: int) -> RingPosition:
        return RingPosition(*advance(at.idx, at.wrap, steps, self.ring.num))

    def peek(self) -> Chain | ChainFault | None:
        flags = self.io.read(self.ring.slot(self.avail.idx) + 14, 2)
        if not is_available(flags, self.avail.wrap):
            return None
        return self._walk(self.avail)

    def take(self, chain: Chain) -> None:
        self.avail = self._advance(self.avail, chain.descriptors)

    def arm_kick(self) -> bool:
        return False  # ENABLE already asks for every kick

    def locate(self, ids: Sequence[int]) -> list[Chain]:
        """The lists of migrated in-flight Buffer IDs, read from the guest ring between the used and the avail
        position, where the lists taken and not used are, oldest first.

        That holds when every list taken before them was used, which is what the used position says
        when nothing was used out of order. A list used ahead of an older one overwrites the older
        one's first slots with its used descriptor, and the older list is then gone from the ring:
        refused, rather than resubmitting whatever the slot holds now.
        """
        num = self.ring.num
        left = (self.avail.linear(num) - self.used.linear(num)) % (2 * num)
        at, chains = self.used, []
        for buffer_id in ids:
            chain = self._walk(at) if left else None
            if isinstance(chain, ChainFault):
                raise _Refused(f"in-flight Buffer ID {buffer_id} at slot {at.idx}: {chain}", chain.bad)
            if chain is None or chain.id != buffer_id or chain.descriptors > left:
                found = "nothing" if chain is None else f"Buffer ID {chain.id}"
                raise _Refused(f"in-flight Buffer ID {buffer_id} is not the next list after the used position "
                               f"(slot {at.idx} holds {found}): lists used out of order overwrote it")
            chains.append(chain)
            left -= chain.descriptors
            at = self._advance(at, chain.descriptors)
        if left:
            raise _Refused(f"{left} ring slots between the used and the avail position belong to no in-flight list")
        return chains

    def put_used(self, chain: Chain, written: int) -> None:
        slot = self.ring.slot(self.used.idx)
        self.io.write(slot + 8, _PACKED_USED.pack(written, chain.id))
        # The flags last: they are what makes the descriptor used for the guest (§2.8.6).
        self.io.write_u16(slot + 14, used_flags(self.used.wrap) | (VRING_DESC_F_WRITE if written else 0))
        self.used = self._advance(self.used, chain.descriptors)

    def publish_used(self) -> bool:
        rule = packed_notification(Direction.USED, event_idx=self.event_idx,
                                   event_flags=self.io.read(self.ring.driver + 2, 2),
                                   off_wrap=self.io.read(self.ring.driver, 2), num=self.ring.num,
                                   old=self.signalled, new=self.used)
        self.signalled = self.used
        return _notify(rule.decision)

    def base(self) -> int:
        return encode_packed_base(PackedVqState(self.avail.idx, self.avail.wrap, self.used.idx, self.used.wrap))

    def used_index(self) -> int:
        return self.used.idx | self.used.wrap << 15


@dataclass(eq=False)  # compared by identity: the deque removes exactly the one that came back
class _Taken:
    """A guest chain taken from the guest ring and not yet used: its shadow id once forwarded."""

    chain: Chain
    shadow_id: int | None = None


@dataclass(eq=False)
class _Injected:
    """A request of the VMM's own on the shadow ring (:meth:`ShadowVirtqueue.inject`): VMM memory only."""

    allocations: tuple[int, ...]  # VMM offsets: the request, then its status byte
    written: int | None = None  # the used len, once the device returned it
    abandoned: bool = False  # the wait for it timed out: its memory goes back when the device returns it


def _drain(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(BlockingIOError):  # not signalled since the last pass
            os.eventfd_read(fd)


class ShadowVirtqueue:
    """One guest queue interposed on (see the module docstring).

    ``guest``: the guest's memory (the guest ring and its buffers; dirty marks are its gpas).
    ``vmm``: VMM memory the shadow ring and indirect-table copies are allocated in, mapped for the
    device at ``vmm.iova``. ``num``/``desc``/``avail``/``used``: the guest ring as the guest gave
    SET_VRING_NUM/ADDR. ``features``: acked (RING_PACKED, EVENT_IDX, INDIRECT_DESC matter).
    ``base``: the guest ring's vring base to start from. ``inflight``: guest heads / Buffer IDs taken
    from the ring (the base is past them) and never used, oldest first: forwarded before anything
    else. ``dirty``: where written guest memory is reported (None: no tracking; settable).

    Refused with :class:`SvqError` (nothing allocated, guest memory untouched): a guest ring outside
    guest memory, a bad base, in-flight chains that do not match the base or are bad input, VMM memory
    too small.
    """

    def __init__(self, index: int, *, guest: GuestLayout, vmm: GuestLayout, num: int, desc: int, avail: int,
                 used: int, features: int, base: int, inflight: Sequence[int] = (),
                 dirty: DirtySink | None = None) -> None:
        self.index = index
        self.dirty = dirty
        self.guest = guest
        self.vmm = vmm
        self.features = features
        io = self._io = _GuestIo(guest, self._mark)
        packed = bool(features >> VIRTIO_F_RING_PACKED & 1)
        try:
            self._ring: _GuestRing = (_PackedGuest if packed else _SplitGuest)(io, num, desc, avail, used,
                                                                                features, base)
            resubmit = self._ring.locate(list(inflight))
        except _Refused as refused:
            raise SvqError(index, refused.reason, refused.bad) from None
        except SpecError as error:  # the model's layout rules (size, alignment)
            raise SvqError(index, f"guest ring: {error}") from error
        try:
            self._shadow: ShadowRing = make_shadow_ring(vmm, num, features, name=f"svq{index}")
        except MemoryError as error:
            raise SvqError(index, f"VMM memory has no room for the shadow ring: {error}") from error
        self._taken: deque[_Taken] = deque(_Taken(chain) for chain in resubmit)
        self._by_shadow: dict[int, _Taken | _Injected] = {}
        #: Called for every guest chain the device returns, before the guest sees it (None: nobody).
        self.observer: Observer | None = None
        self._broken: SvqError | None = None
        self._closed = False
        self._guest_kick: int | None = None
        self._guest_call: int | None = None
        self.device_kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.device_call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ring.start()  # the first guest-memory write: a refused construction leaves the guest ring as it was

    # ----- what the VMM hands the device and the guest ------------------------------------------------

    def attach_guest(self, kick_fd: int, call_fd: int) -> None:
        """The guest's eventfds (SET_VRING_KICK / CALL as the guest gave them); not owned, never closed here."""
        self._guest_kick, self._guest_call = kick_fd, call_fd

    @property
    def shadow_addresses(self) -> tuple[int, int, int]:
        """(desc, avail / driver event, used / device event) IOVAs of the shadow ring, for SET_VRING_ADDR."""
        return self._shadow.addresses

    @property
    def shadow_base(self) -> int:
        """SET_VRING_BASE for the shadow ring: it always starts fresh."""
        return self._shadow.base

    # ----- the pass -----------------------------------------------------------------------------------

    def poll(self) -> int:
        """One pass: forward what the guest made available, kick the device if it allows, return what the
        device used to the guest (dirty marks, guest notification). Returns the chains moved (forwarded
        plus returned); 0 means nothing happened. Never blocks.

        A guest chain that is bad input is not forwarded (those before it are): the queue is broken and
        :class:`SvqError` names the :class:`BadInput`, now and on every later call.
        """
        self._usable()
        _drain(self._guest_kick)
        _drain(self.device_call_fd)
        moved = 0
        while True:
            forwarded, fault, stalled = self._forward()
            if forwarded and self._shadow.publish():
                os.eventfd_write(self.device_kick_fd, 1)
            returned = self._reap()
            moved += forwarded + returned
            if fault is not None:
                self._broken = SvqError(self.index, f"guest chain not forwarded: {fault}", fault.bad)
                raise self._broken
            if not (stalled and returned):  # room freed for chains that did not fit: one more round
                return moved

    def _usable(self) -> None:
        if self._closed:
            raise SvqError(self.index, "closed")
        if self._broken is not None:
            raise self._broken

    def _forward(self) -> tuple[int, ChainFault | None, bool]:
        """Forward the resubmissions, then the guest's new chains: (forwarded, bad input met, out of room)."""
        forwarded = 0
        for taken in self._taken:
            if taken.shadow_id is None:
                if not self._send(taken):
                    return forwarded, None, True
                forwarded += 1
        armed = False
        while True:
            chain = self._ring.peek()
            if chain is None:
                if armed or not self._ring.arm_kick():
                    return forwarded, None, False
                armed = True
                continue
            if isinstance(chain, ChainFault):
                return forwarded, chain, False
            taken = _Taken(chain)
            if not self._send(taken):
                return forwarded, None, True
            self._ring.take(chain)
            self._taken.append(taken)
            forwarded += 1

    def _send(self, taken: _Taken) -> bool:
        """Add the chain to the shadow ring; False when it does not fit yet (the ring or VMM memory is full)."""
        chain = taken.chain
        if not self._shadow.room(1 if chain.indirect else len(chain.segments)):
            return False
        try:
            shadow_id = self._shadow.add(chain.segments, indirect=chain.indirect)
        except MemoryError as error:
            if not self._shadow.in_flight:  # nothing will come back to free memory: this never fits
                raise SvqError(self.index, f"VMM memory cannot hold an indirect table: {error}") from error
            return False
        taken.shadow_id = shadow_id
        self._by_shadow[shadow_id] = taken
        return True

    def _reap(self) -> int:
        try:
            done = self._shadow.reap()
        except DriverRuleBroken as error:
            self._broken = SvqError(self.index, f"the device broke the shadow ring: {error}")
            raise self._broken from error
        returned: list[tuple[_Taken, int]] = []
        for shadow_id, length in done:
            owner = self._by_shadow.pop(shadow_id)
            if isinstance(owner, _Injected):
                owner.written = length
                if owner.abandoned:
                    for offset in owner.allocations:
                        self.vmm.free(offset)
            else:
                returned.append((owner, length))
        for taken, length in returned:
            if length > taken.chain.writable_len:
                self._broken = SvqError(self.index, f"the device used guest chain {taken.chain.id} with len {length}, "
                                                    f"above its {taken.chain.writable_len} writable bytes")
                raise self._broken
        for taken, length in returned:
            self._mark_written(taken.chain, length)
            if self.observer is not None:  # before the guest can see it: a state saved after includes it
                self.observer(*self._contents(taken.chain, length))
            self._ring.put_used(taken.chain, length)
            self._taken.remove(taken)
        if returned and self._ring.publish_used() and self._guest_call is not None:
            os.eventfd_write(self._guest_call, 1)
        return len(returned)

    def _contents(self, chain: Chain, written: int) -> tuple[bytes, int]:
        """What an observer is told: the chain's device-readable bytes, and the first byte written (or -1)."""
        memory = self._io.memory
        readable = b"".join(memory.read(s.addr, s.len) for s in chain.readable if s.len)
        first = next((s for s in chain.writable if s.len), None)
        return readable, (memory.read(first.addr, 1)[0] if written and first is not None else -1)

    # ----- the VMM's own requests -------------------------------------------------------------------

    def inject(self, command: bytes, service: Callable[[], object], *, timeout: float = INJECT_TIMEOUT) -> int:
        """Send a request of the VMM's own to the device and wait for it: ``command`` device-readable, then
        one device-writable status byte, which is returned once the device used the request.

        For a destination VMM replaying the guest's control commands (QEMU's vhost_vdpa_net_load through
        its control-queue shadow): the request lives in VMM memory, is never seen by the guest and marks
        nothing dirty. Sent ahead of any guest chain not yet forwarded, so the device state it restores is
        in place before the guest's own requests. ``service`` lets an embedded device act on the kick;
        the wait is bounded (SvqError after ``timeout`` seconds), never a hang.
        """
        self._usable()
        if not command:
            raise ValueError("an injected request carries at least one device-readable byte")
        if not self._shadow.room(2):
            raise SvqError(self.index, "no room on the shadow ring for a VMM request")
        vmm = self.vmm
        try:
            out = vmm.alloc(len(command), 8, what=f"svq{self.index} injected request")
        except MemoryError as error:
            raise SvqError(self.index, f"VMM memory cannot hold the request: {error}") from error
        try:
            status = vmm.alloc(1, 1, what=f"svq{self.index} injected status", fill=0xFF)
        except MemoryError as error:
            vmm.free(out)
            raise SvqError(self.index, f"VMM memory cannot hold the request: {error}") from error
        vmm.write(out, command)
        injected = _Injected((out, status))
        segments = (Segment(vmm.iova(out), len(command), False), Segment(vmm.iova(status), 1, True))
        self._by_shadow[self._shadow.add(segments, indirect=False)] = injected
        try:
            if self._shadow.publish():
                os.eventfd_write(self.device_kick_fd, 1)
            self._await(injected, service, timeout)
            return vmm.read(status, 1)[0]
        finally:
            if injected.written is None:  # still on the device ring: its memory must outlive the wait
                injected.abandoned = True
            else:
                for offset in injected.allocations:
                    vmm.free(offset)

    def _await(self, injected: _Injected, service: Callable[[], object], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.device_call_fd, select.POLLIN)
        while True:
            service()
            self._reap()
            if injected.written is not None:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SvqError(self.index, f"the device did not use the VMM's request within {timeout:g} s")
            poller.poll(max(1, int(min(remaining, _INJECT_SLICE) * 1000)))
            _drain(self.device_call_fd)

    # ----- dirty tracking ---------------------------------------------------------------------------

    def _mark(self, iova: int, length: int) -> None:
        sink = self.dirty
        if sink is not None and length:
            sink.note(self.guest.gpa(self.guest.offset_of_iova(iova)), length)

    def _mark_written(self, chain: Chain, written: int) -> None:
        """The device wrote ``written`` bytes into the chain's writable segments, filling them in order."""
        for segment in chain.writable:
            if written <= 0:
                return
            piece = min(written, segment.len)
            self._mark(segment.addr, piece)
            written -= piece

    # ----- state ------------------------------------------------------------------------------------

    def guest_base(self) -> int:
        """The guest ring's vring base now: where the shadow virtqueue takes the next chain (packed: and
        where it writes the next used descriptor)."""
        return self._ring.base()

    def guest_used_idx(self) -> int:
        """Split: the guest used idx written so far; packed: the next used slot | used wrap counter << 15."""
        return self._ring.used_index()

    def inflight(self) -> list[int]:
        """Guest heads / Buffer IDs taken from the guest ring and not yet used, oldest first."""
        return [taken.chain.id for taken in self._taken]

    def close(self) -> None:
        """Close the device eventfds and give the shadow ring's VMM memory back (idempotent). Stop the device
        first (suspend or reset): it must not read the shadow ring once its memory is reused."""
        if self._closed:
            return
        self._closed = True
        self._shadow.close()
        for owner in self._by_shadow.values():
            if isinstance(owner, _Injected):
                for offset in owner.allocations:
                    self.vmm.free(offset)
        self._by_shadow.clear()
        for fd in (self.device_kick_fd, self.device_call_fd):
            os.close(fd)
