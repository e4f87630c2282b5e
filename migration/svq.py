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
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from vdpacert.conformance.driver.memory import GuestLayout
from vdpacert.migration.guest_ring import (
    GuestIo,
    GuestRing,
    PackedGuestRing,
    RingRefused,
    SplitGuestRing,
)
from vdpacert.migration.shadow_ring import ShadowRing, make_shadow_ring
from vdpacert.model.chains import (
    BadInput,
    Chain,
    ChainFault,
    DriverRuleBroken,
    Segment,
)
from vdpacert.model.spec import SpecError
from vdpacert.uapi.virtio_config import VIRTIO_F_RING_PACKED

__all__ = ["DirtySink", "Observer", "ShadowVirtqueue", "SvqError"]

#: Told about every guest chain the device returns: its device-readable bytes and the first byte the
#: device wrote (-1 when it wrote none). The VMM watches the net control queue this way (an OK ack).
Observer = Callable[[bytes, int], None]
#: How long :meth:`ShadowVirtqueue.inject` waits for the device, in seconds.
INJECT_TIMEOUT = 2.0
_INJECT_SLICE = 0.005



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
        io = self._io = GuestIo(guest, self._mark)
        packed = bool(features >> VIRTIO_F_RING_PACKED & 1)
        try:
            self._ring: GuestRing = (PackedGuestRing if packed else SplitGuestRing)(io, num, desc, avail, used,
                                                                                features, base)
            resubmit = self._ring.locate(list(inflight))
        except RingRefused as refused:
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
