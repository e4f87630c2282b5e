"""Hostile chains: one chain (or ring state) per bad-input class, built so that acting on it shows.

Each class of :data:`vdpacert.model.chains.BAD_INPUTS` is written as a chain a lax device would take
for a real request: a device-readable header (a virtio-blk IN of sector 0, which a blk device serves
and any other device copies like any bytes) followed by a device-writable buffer of a sector and a
status byte (or, on a queue the device only reads, a readable payload), broken in exactly the way
the class names. None of those buffers is a device-writable window of the guest layout, so a device
that follows a nested indirect table, walks on through a loop and serves what it collected, ignores
an IOTLB permission or rounds an indirect table's length writes memory it was not given, and a used
entry with a length claims it: :mod:`.ring_checks` names ``suite.canary.no_write_outside_writable``
(``ring.*.device.no_write_readable`` for a readable buffer) and ``ring.device.bad_chain_not_used``,
both MUST.

The chain records its buffers (``readable`` / ``writable`` regions) so the checks of
:mod:`.ring_checks` know what each changed byte belonged to. Which class a chain really is, is the
model's call (:func:`vdpacert.conformance.machines.ring_checks.model_verdict`), not this module's.
"""

from __future__ import annotations

import struct

from vdpacert.conformance.driver.device import Ring
from vdpacert.conformance.driver.memory import GuestLayout, Region
from vdpacert.conformance.driver.packed import AVAIL, USED, PackedRing, avail_flags
from vdpacert.conformance.driver.split import INDIRECT, NEXT, WRITE, Chain, RingFull, SplitRing
from vdpacert.model.chains import BAD_INPUTS, BadInput, Layout
from vdpacert.uapi import virtio_blk as B  # noqa: N812
from vdpacert.uapi.virtio_config import VIRTIO_F_RING_PACKED
from vdpacert.uapi.virtio_ring import VIRTIO_RING_F_INDIRECT_DESC

__all__ = ["DATA_LEN", "HEADER", "HOSTILE_PER_STEP", "NEEDS_INDIRECT", "hostile_classes", "hostile_menu",
           "post_hostile", "with_ring_choice"]

PACKED_BIT, INDIRECT_BIT = 1 << VIRTIO_F_RING_PACKED, 1 << VIRTIO_RING_F_INDIRECT_DESC
#: Classes a hostile step posts, one after the other (each followed by a reset): a step that does more is
#: cheaper than more steps, and a run that draws few hostile steps still sees every class.
HOSTILE_PER_STEP = 3
#: The readable bait: a virtio-blk request header (IN, sector 0), 16 bytes.
HEADER = struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, 0)
#: The writable bait: one sector of data and the status byte, so an IN of sector 0 fits exactly.
DATA_LEN = B.VIRTIO_BLK_SECTOR_SIZE + 1
#: The readable payload on a queue the device only reads (a transmit or control queue).
PAYLOAD_LEN = 64
#: A length that takes any chain past 2^32 bytes in total.
HUGE = 0xFFFF_FFFF
#: Classes written through an indirect table: without VIRTIO_F_INDIRECT_DESC each of them would first be
#: INDIRECT_NOT_NEGOTIATED (its own class), and a direct chain longer than the queue size must revisit a
#: descriptor, which is a loop.
NEEDS_INDIRECT = frozenset({BadInput.CHAIN_TOO_LONG, BadInput.NESTED_INDIRECT, BadInput.INDIRECT_LEN_NOT_MULTIPLE_OF_16,
                            BadInput.ZERO_LENGTH_INDIRECT, BadInput.INDIRECT_IN_CHAIN})

Desc = tuple[int, int, int]  # (iova, len, flags without NEXT)


def hostile_classes(packed: bool, indirect: bool, aliases: bool) -> list[BadInput]:
    """The bad-input classes the harness can write on this ring layout and feature set (rows of BAD_INPUTS)."""
    layout = Layout.PACKED if packed else Layout.SPLIT
    out = []
    for bad, row in BAD_INPUTS.items():
        if layout not in row.layouts:
            continue
        if bad is BadInput.INDIRECT_NOT_NEGOTIATED and indirect:
            continue
        if bad in NEEDS_INDIRECT and not indirect:
            continue
        if bad is BadInput.ADDRESS_PERMISSION and not aliases:
            continue
        if packed and bad is BadInput.DESCRIPTOR_LOOP:  # a packed list has no links to loop through
            continue
        out.append(bad)
    return out


def with_ring_choice(features: int, packed: bool, indirect: bool) -> int:
    """``features`` with VIRTIO_F_RING_PACKED and VIRTIO_F_INDIRECT_DESC set as asked (neither depends on another)."""
    features &= ~(PACKED_BIT | INDIRECT_BIT)
    return features | (PACKED_BIT if packed else 0) | (INDIRECT_BIT if indirect else 0)


def hostile_menu(features: int, offered: int, aliases: bool) -> list[tuple[BadInput, int]]:
    """Every class the harness can write under any ring layout / INDIRECT_DESC choice the device offers, in
    the table's order (whatever ``features`` are, so a rotation through it visits every class), each with
    the features to write it under: ``features`` when they can, else ``features`` with the fewest of
    those two bits changed.

    A class is then not left to the feature draws: a nested indirect table needs a split ring with
    INDIRECT_DESC, which only a quarter of bring-ups have.
    """
    packed, indirect = bool(features & PACKED_BIT), bool(features & INDIRECT_BIT)
    choices = []
    for p, i in ((packed, indirect), (packed, not indirect), (not packed, indirect), (not packed, not indirect)):
        choice = with_ring_choice(features, p, i)
        if not choice & ~offered & (PACKED_BIT | INDIRECT_BIT):
            choices.append((choice, set(hostile_classes(p, i, aliases))))
    return [(bad, next(choice for choice, classes in choices if bad in classes))
            for bad in BAD_INPUTS if any(bad in classes for _, classes in choices)]


class _Bait:
    """The buffers and tables of one hostile chain, allocated in the layout and none of them a window."""

    def __init__(self, layout: GuestLayout, writable: bool) -> None:
        self.layout = layout
        self.writable = writable
        self.allocations: list[int] = []
        self.readable_regions: list[Region] = []
        self.writable_regions: list[Region] = []

    def _alloc(self, size: int, what: str) -> int:
        offset = self.layout.alloc(size, 16, what=f"hostile chain {what}")
        self.allocations.append(offset)
        return offset

    def header(self) -> Desc:
        offset = self._alloc(len(HEADER), "header")
        self.layout.write(offset, HEADER)
        self.readable_regions.append(Region(offset, len(HEADER), "hostile header"))
        return self.layout.iova(offset), len(HEADER), 0

    def data(self, *, writable: bool | None = None) -> Desc:
        """The second buffer: device-writable (a sector and a status byte) or a readable payload."""
        if self.writable if writable is None else writable:
            offset = self._alloc(DATA_LEN, "writable buffer")
            self.writable_regions.append(Region(offset, DATA_LEN, "hostile writable buffer"))
            return self.layout.iova(offset), DATA_LEN, WRITE
        offset = self._alloc(PAYLOAD_LEN, "readable payload")
        self.layout.write(offset, bytes(range(PAYLOAD_LEN)))
        self.readable_regions.append(Region(offset, PAYLOAD_LEN, "hostile readable payload"))
        return self.layout.iova(offset), PAYLOAD_LEN, 0

    def parts(self) -> list[Desc]:
        """What an honest request would be: the header, then the data buffer."""
        return [self.header(), self.data()]

    def table(self, entries: int) -> int:
        """A zeroed indirect table of ``entries`` descriptors; its layout offset."""
        offset = self._alloc(16 * entries, "indirect table")
        self.layout.fill(offset, 16 * entries, 0)
        return offset

    def keep(self, chain: Chain) -> Chain:
        chain.allocations += self.allocations
        chain.readable += self.readable_regions
        chain.writable += self.writable_regions
        return chain


def _split_table(ring: SplitRing, table: int, descs: list[Desc]) -> None:
    """Fill an indirect table of a split ring with ``descs`` linked by NEXT."""
    for i, (addr, length, flags) in enumerate(descs):
        more = i + 1 < len(descs)
        ring.write_desc(i, addr, length, flags | (NEXT if more else 0), i + 1 if more else 0, table=table)


def _linked(descs: list[Desc], slots: list[int]) -> list[tuple[int, int, int, int]]:
    """Split descriptors for ``slots`` (the next free entries), each linked to the next."""
    out = []
    for i, (addr, length, flags) in enumerate(descs):
        more = i + 1 < len(descs)
        out.append((addr, length, flags | (NEXT if more else 0), slots[i + 1] if more else 0))
    return out


def _free_slots(ring: SplitRing, count: int) -> list[int]:
    if len(ring.free) < count:
        raise RingFull(f"{ring.name}: {count} descriptors wanted, {len(ring.free)} free")
    return [ring.free[i] for i in range(count)]


def _post_split(ring: SplitRing, bad: BadInput, bait: _Bait, *, unmapped_iova: int, ro_alias: int,
                wo_alias: int) -> Chain | None:
    layout = ring.layout
    if bad is BadInput.AVAIL_IDX_AHEAD:
        ring.push_avail_idx_ahead()
        return None
    if bad is BadInput.DESCRIPTOR_LOOP:  # header, data, (data again,) and back: §2.7.5.2 forbids the loop
        head, data = bait.header(), bait.data()
        if bait.writable:  # the loop runs between the two writable descriptors, after a well-formed start
            a, b, c = _free_slots(ring, 3)
            return bait.keep(ring.post_raw([(*head[:2], NEXT, b), (*data[:2], data[2] | NEXT, c),
                                            (*data[:2], data[2] | NEXT, b)]))
        a, b = _free_slots(ring, 2)
        return bait.keep(ring.post_raw([(*head[:2], NEXT, b), (*data[:2], data[2] | NEXT, a)]))
    if bad is BadInput.INDEX_OUT_OF_RANGE:  # the available ring names an entry past the table
        parts = bait.parts()
        return bait.keep(ring.post_raw(_linked(parts, _free_slots(ring, len(parts))), head=ring.num + 3))
    if bad in (BadInput.CHAIN_TOO_LONG, BadInput.NESTED_INDIRECT, BadInput.INDIRECT_LEN_NOT_MULTIPLE_OF_16,
               BadInput.ZERO_LENGTH_INDIRECT, BadInput.INDIRECT_NOT_NEGOTIATED, BadInput.INDIRECT_IN_CHAIN):
        parts = bait.parts()
        if bad is BadInput.CHAIN_TOO_LONG:  # header and queue-size data descriptors: one too many
            parts = [parts[0], *[(parts[1][0], 16, parts[1][2])] * ring.num]
        table = bait.table(len(parts) + 1)  # one spare entry: a length rounded up finds a zeroed descriptor
        _split_table(ring, table, parts)
        length = {BadInput.INDIRECT_LEN_NOT_MULTIPLE_OF_16: 16 * len(parts) + 8,
                  BadInput.ZERO_LENGTH_INDIRECT: 0}.get(bad, 16 * len(parts))
        if bad is BadInput.NESTED_INDIRECT:  # the ring's indirect table holds one entry: another indirect table
            outer = bait.table(1)
            ring.write_desc(0, layout.iova(table), length, INDIRECT, table=outer)
            return bait.keep(ring.post_raw([(layout.iova(outer), 16, INDIRECT, 0)]))
        if bad is BadInput.INDIRECT_IN_CHAIN:
            (second,) = _free_slots(ring, 2)[1:]
            tail = bait.data(writable=True)
            return bait.keep(ring.post_raw([(layout.iova(table), length, INDIRECT | NEXT, second), (*tail, 0)]))
        return bait.keep(ring.post_raw([(layout.iova(table), length, INDIRECT, 0)]))
    descs = _flat(bad, bait, unmapped_iova=unmapped_iova, ro_alias=ro_alias, wo_alias=wo_alias)
    return bait.keep(ring.post_raw(_linked(descs, _free_slots(ring, len(descs)))))


def _flat(bad: BadInput, bait: _Bait, *, unmapped_iova: int, ro_alias: int, wo_alias: int) -> list[Desc]:
    """The classes that are one plain list of descriptors, the same on both layouts."""
    head = bait.header()
    if bad is BadInput.ADDRESS_UNMAPPED:
        length, flags = (DATA_LEN, WRITE) if bait.writable else (PAYLOAD_LEN, 0)
        return [head, (unmapped_iova, length, flags)]
    if bad is BadInput.ADDRESS_PERMISSION:  # writable through the read-only alias, or read through the write-only one
        return [head, (ro_alias, DATA_LEN, WRITE) if bait.writable else (wo_alias, PAYLOAD_LEN, 0)]
    if bad is BadInput.TOTAL_LENGTH_OVERFLOW:
        data = bait.data()
        return [head, data, (data[0], HUGE, data[2])]
    if bad is BadInput.READABLE_AFTER_WRITABLE:
        return [head, bait.data(writable=True), head]
    raise ValueError(f"{bad} is not written as a plain list")


def _post_packed(ring: PackedRing, bad: BadInput, bait: _Bait, *, unmapped_iova: int, ro_alias: int,
                 wo_alias: int) -> Chain:
    layout = ring.layout
    if bad in (BadInput.CHAIN_TOO_LONG, BadInput.INDIRECT_LEN_NOT_MULTIPLE_OF_16, BadInput.ZERO_LENGTH_INDIRECT,
               BadInput.INDIRECT_NOT_NEGOTIATED):
        parts = bait.parts()
        if bad is BadInput.CHAIN_TOO_LONG:
            parts = [parts[0], *[(parts[1][0], 16, parts[1][2])] * ring.num]
        table = bait.table(len(parts) + 1)
        for i, (addr, length, flags) in enumerate(parts):
            ring.write_indirect(table, i, addr, length, flags)
        size = {BadInput.INDIRECT_LEN_NOT_MULTIPLE_OF_16: 16 * len(parts) + 8,
                BadInput.ZERO_LENGTH_INDIRECT: 0}.get(bad, 16 * len(parts))
        return bait.keep(ring.post_raw([(layout.iova(table), size, INDIRECT)]))
    if bad is BadInput.INDIRECT_IN_CHAIN:  # §2.8.19: an indirect descriptor may not sit in a NEXT list
        head = bait.header()
        table = bait.table(1)
        addr, length, flags = bait.data()
        ring.write_indirect(table, 0, addr, length, flags)
        return bait.keep(ring.post_raw([head, (layout.iova(table), 16, INDIRECT)]))
    if bad is BadInput.DESC_NOT_AVAILABLE:
        return _post_not_available(ring, bait)
    return bait.keep(ring.post_raw(_flat(bad, bait, unmapped_iova=unmapped_iova, ro_alias=ro_alias,
                                         wo_alias=wo_alias)))


def _post_not_available(ring: PackedRing, bait: _Bait) -> Chain:
    """A two-descriptor list whose second descriptor is not made available (§2.8.17 binds the driver).

    A device may read the list as its head announces it (see ``NOT_DETECTABLE`` of the datapath
    machine), so this one chain may also be used as valid: it is not ``bad``, and its writable buffer
    is a window.
    """
    wrap = ring.avail_wrap
    chain = ring.post_raw(bait.parts(), publish=False)
    second = chain.slots[1]
    slot_wrap = wrap if second > chain.slots[0] else 1 - wrap  # the list may wrap past the ring's end
    addr, length, buffer_id, flags = ring.read_desc(second)
    ring.write_desc(second, addr, length, buffer_id, flags & ~(AVAIL | USED) | avail_flags(1 - slot_wrap))
    ring.publish()
    chain.bad = False
    bait.keep(chain)
    for region in chain.writable:
        chain.windows.append(ring.layout.allow(region.offset, region.length, f"{ring.name} writable buffer of "
                                                                             f"list {chain.id}"))
    return chain


def post_hostile(ring: Ring, bad: BadInput, *, writable: bool, unmapped_iova: int, ro_alias: int,
                 wo_alias: int) -> Chain | None:
    """Write and publish one chain (or ring state) of class ``bad``; None when no chain stands for it.

    ``writable``: the queue is one the device writes into (a receive queue, a blk queue), so the bait
    carries a device-writable buffer; otherwise a readable payload. RingFull / MemoryError when there is
    no room (nothing is published then).
    """
    bait = _Bait(ring.layout, writable)
    try:
        if isinstance(ring, SplitRing):
            return _post_split(ring, bad, bait, unmapped_iova=unmapped_iova, ro_alias=ro_alias, wo_alias=wo_alias)
        return _post_packed(ring, bad, bait, unmapped_iova=unmapped_iova, ro_alias=ro_alias, wo_alias=wo_alias)
    except (RingFull, MemoryError):
        for offset in bait.allocations:
            ring.layout.free(offset)
        raise
