"""Seeded ring bugs: notification suppression, index wrap, used lengths, and walks a careful device refuses.

All are sim-blk underneath. Some wrap the compiled request loop and then rewrite what it
published, as firmware with a wrong index or length formula would have published it; the
others (:class:`LaxWalkBlk`) take a chain the compiled queue would refuse and answer it
themselves. Split rings only, except :class:`PackedWrapCounterNotFlipped`; on the other layout
they behave like sim-blk.
"""

from __future__ import annotations

import contextlib
import struct
from typing import Any

from vdpacert.conformance.mutants.guest import (
    OUTHDR,
    PACKED_F_AVAIL,
    PACKED_F_USED,
    BadChain,
    BlkRequest,
    Dma,
    DmaFault,
    SplitView,
    Walk,
    blk_answer,
    used_len,
)
from vdpacert.impl.sim_blk import SimBlk
from vdpacert.impl.virtqueue import VirtQueueError

__all__ = [
    "DescriptorCycleUnbounded", "EventIdxAlwaysNotify", "EventIdxMissedNotify", "LaxWalkBlk",
    "NestedIndirectFollowed", "PackedWrapCounterNotFlipped", "UsedIdxWrapOffByOne", "UsedLenCountsReadable",
    "WriteIntoReadable", "WritePastWritableLen",
]

_RING_ERRORS = (DmaFault, BadChain, struct.error)
#: The cycle mutant's watchdog never walks more descriptors than this, whatever the queue size.
WATCHDOG_MAX = 1 << 16


def _split_used_idx(dev: SimBlk, index: int) -> int | None:
    """The used index the device has published in a split ring (None: packed, or unreadable)."""
    if dev.vq(index).packed:
        return None
    try:
        return SplitView(dev, index).used_idx()
    except _RING_ERRORS:
        return None


# ----- notifications ---------------------------------------------------------------------------------


class EventIdxAlwaysNotify(SimBlk):
    """Bug: with VIRTIO_F_EVENT_IDX the device signals after every run that used buffers, never reading used_event."""

    def process(self, index: int) -> None:
        vq = self.vq(index)
        before = (vq.last_used_idx, vq.last_used_counter) if vq.packed else _split_used_idx(self, index)
        super().process(index)
        after = (vq.last_used_idx, vq.last_used_counter) if vq.packed else _split_used_idx(self, index)
        if vq.event_idx and not vq.broken and before != after:
            self.signal_callback(self.vq_config(index).cb)


class EventIdxMissedNotify(SimBlk):
    """Bug: with VIRTIO_F_EVENT_IDX the device signals only when used_event names the *last* entry it published,
    not any entry of the batch (``used_event == new - 1`` instead of vring_need_event)."""

    def __init__(self, name: str = "sim-blk", **kwargs: Any) -> None:
        self._used_before: dict[int, int] = {}
        super().__init__(name, **kwargs)

    def process(self, index: int) -> None:
        before = _split_used_idx(self, index)
        if before is not None:
            self._used_before[index] = before
        super().process(index)

    def finish_queue(self, index: int) -> None:
        vq = self.vq(index)
        old = self._used_before.pop(index, None)
        if old is None or vq.broken or vq.packed or not vq.event_idx:
            super().finish_queue(index)
            return
        try:
            vq.notify_needed()  # the right answer is computed (and its counter consumed), then not used
        except VirtQueueError:
            super().finish_queue(index)
            return
        try:
            view = SplitView(self, index)
            new, event = view.used_idx(), view.used_event()
        except _RING_ERRORS:
            return
        if new != old and event == (new - 1) & 0xFFFF:
            self.signal_callback(self.vq_config(index).cb)


# ----- indexes ---------------------------------------------------------------------------------------------


class UsedIdxWrapOffByOne(SimBlk):
    """Bug: the used index is advanced modulo 0xFFFF instead of 2^16: a batch that reaches 65535 publishes
    the index one short (65535 itself is never written, 0 is)."""

    def process(self, index: int) -> None:
        before = _split_used_idx(self, index)
        super().process(index)
        after = _split_used_idx(self, index)
        if before is None or after is None or self.vq(index).broken:
            return
        count = (after - before) & 0xFFFF
        if count and before + count >= 0xFFFF:
            with contextlib.suppress(*_RING_ERRORS):
                SplitView(self, index).set_used_idx((before + count) % 0xFFFF)


class PackedWrapCounterNotFlipped(SimBlk):
    """Bug (packed rings): used descriptors are always flagged with the initial wrap counter 1; the device
    never flips it when the used position wraps, so on every second lap the driver sees nothing used."""

    def process(self, index: int) -> None:
        vq = self.vq(index)
        if not vq.packed:
            super().process(index)
            return
        pos, wrap = vq.last_used_idx, vq.last_used_counter
        super().process(index)
        num = self.vq_config(index).num
        slots = vq.last_used_idx - pos + (num if vq.last_used_counter != wrap else 0)
        if vq.broken or not num or slots <= 0:
            return
        dma = Dma(self, index)
        desc = self.vq_config(index).desc_area
        try:
            for k in range(min(slots, num)):
                at = desc + 16 * ((pos + k) % num) + 14
                flags = dma.read_u16(at)
                if not flags & (PACKED_F_AVAIL | PACKED_F_USED):  # a used descriptor of a counter-0 lap
                    dma.write_u16(at, flags | PACKED_F_AVAIL | PACKED_F_USED)
        except _RING_ERRORS:
            pass


# ----- what a used entry says and where the device writes ----------------------------------------------


class _UsedRewrite(SimBlk):
    """Runs the compiled loop, then visits each used entry it published (split rings)."""

    def process(self, index: int) -> None:
        before = _split_used_idx(self, index)
        super().process(index)
        after = _split_used_idx(self, index)
        if before is None or after is None or self.vq(index).broken:
            return
        view = SplitView(self, index)
        for k in range((after - before) & 0xFFFF):
            with contextlib.suppress(*_RING_ERRORS):
                self.visit(view, (before + k) & 0xFFFF)

    def visit(self, view: SplitView, slot: int) -> None:
        """One used entry at used-ring position ``slot`` (a free-running index)."""


class UsedLenCountsReadable(_UsedRewrite):
    """Bug: the used length is the whole chain's length (readable header and data too), not the bytes written."""

    def visit(self, view: SplitView, slot: int) -> None:
        head, length = view.used_elem(slot)
        view.set_used_elem(slot, head, length + view.walk(head).readable_len)


class WritePastWritableLen(_UsedRewrite):
    """Bug: the DMA into a chain's last writable buffer is one byte too long: the byte after it is overwritten."""

    def visit(self, view: SplitView, slot: int) -> None:
        head, _ = view.used_elem(slot)
        writable = [(addr, length) for addr, length, is_writable in view.walk(head).segments if is_writable]
        if writable:
            addr, length = writable[-1]
            view.dma.write(addr + length, view.dma.read(addr + length - 1, 1))


# ----- walks a careful device refuses ------------------------------------------------------------------------


class LaxWalkBlk(SimBlk):
    """sim-blk whose firmware first looks at each available chain with its own, laxer walk (split rings).

    A chain the lax walk takes in a way the spec forbids (:meth:`triggered`) is answered here,
    by hand, through :class:`SplitView`; the first chain it does not is left, with everything
    after it, to the compiled loop.
    """

    def lax_walk(self, view: SplitView, head: int) -> Walk:
        return view.walk(head)

    def triggered(self, walk: Walk) -> bool:
        return False

    def answer(self, index: int, view: SplitView, walk: Walk) -> int:
        """Answer a triggered chain (as a blk request); the used length to report."""
        readable = view.gather(walk)
        if len(readable) < OUTHDR or walk.writable_len == 0:
            return 0
        request = BlkRequest.parse(readable, walk.writable_len)
        status, data = blk_answer(self.disk.read, self.disk.write, capacity=self.capacity, read_only=self.read_only,
                                  flush=self.backend.flush, serial=self.backend.serial_bytes, request=request)
        written = view.scatter(walk, 0, data)
        view.scatter(walk, request.data_in_len, bytes([status]))
        return used_len(written, request.data_in_len, walk.writable_len)

    def _take_one(self, index: int, view: SplitView) -> bool:
        vq = self.vq(index)
        last = vq.last_avail_idx
        if view.avail_idx() == last:
            return False
        walk = self.lax_walk(view, view.avail_head(last))
        if not self.triggered(walk):
            return False
        length = self.answer(index, view, walk)
        used = view.used_idx()
        view.set_used_elem(used, walk.head, length)
        view.set_used_idx(used + 1)
        vq.set_state((last + 1) & 0xFFFF)  # the compiled queue re-reads the used index at its next use
        self.signal_callback(self.vq_config(index).cb)
        return True

    def process(self, index: int) -> None:
        vq = self.vq(index)
        if not vq.packed and not vq.broken:
            view = SplitView(self, index)
            while True:
                try:
                    if not self._take_one(index, view):
                        break
                except _RING_ERRORS:
                    break
        super().process(index)


class NestedIndirectFollowed(LaxWalkBlk):
    """Bug: an INDIRECT descriptor inside an indirect table is followed (the walk recurses) instead of refused."""

    def lax_walk(self, view: SplitView, head: int) -> Walk:
        return view.walk(head, follow_nested=True)

    def triggered(self, walk: Walk) -> bool:
        return walk.followed_nested


class DescriptorCycleUnbounded(LaxWalkBlk):
    """Bug: the walk is bounded by a watchdog of 10 x the queue size, not by the table size; when the
    watchdog fires, the request gathered so far (the loop's descriptors, again and again) is served
    instead of the chain being treated as bad input."""

    def lax_walk(self, view: SplitView, head: int) -> Walk:
        return view.walk(head, loop_cap=min(10 * view.num, WATCHDOG_MAX))

    def triggered(self, walk: Walk) -> bool:
        return walk.gave_up


class WriteIntoReadable(LaxWalkBlk):
    """Bug: the status byte goes into the chain's last descriptor whatever its WRITE flag says, so a request
    with no device-writable part gets its status written over its own (device-readable) header."""

    def triggered(self, walk: Walk) -> bool:
        return walk.writable_len == 0 and walk.readable_len >= OUTHDR

    def answer(self, index: int, view: SplitView, walk: Walk) -> int:
        request = BlkRequest.parse(view.gather(walk), 1)
        status, _ = blk_answer(self.disk.read, self.disk.write, capacity=self.capacity, read_only=self.read_only,
                               flush=self.backend.flush, serial=self.backend.serial_bytes, request=request)
        addr, length, _ = walk.segments[-1]
        view.dma.write(addr + length - 1, bytes([status]))
        return 1
