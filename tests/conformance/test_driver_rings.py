"""The driver-side harness on its own: guest layout and canaries, split and packed rings, traffic checks.

No device here: where a device would act, the test writes guest memory directly (through
``layout.memory``, bypassing the driver's bookkeeping, exactly as a device would), so every
validation the harness makes can be shown to pass for honest device behaviour and to fail,
naming the right catalog rule, for dishonest behaviour.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

import pytest

from vdpacert.conformance.driver import DeviceViolation, split
from vdpacert.conformance.driver import memory as M  # noqa: N812
from vdpacert.conformance.driver import packed as P  # noqa: N812
from vdpacert.conformance.driver import traffic as TR  # noqa: N812
from vdpacert.conformance.driver.memory import CANARY, GuestLayout
from vdpacert.conformance.driver.packed import PackedRing, avail_flags, used_flags
from vdpacert.conformance.driver.split import INDIRECT, NEXT, WRITE, RingFull, SplitRing
from vdpacert.impl.guestmem import GuestMemory
from vdpacert.model import rules
from vdpacert.model.ring_index import vring_need_event
from vdpacert.uapi import virtio_blk as B  # noqa: N812
from vdpacert.uapi.virtio_ring import VRING_PACKED_EVENT_FLAG_DESC, VRING_USED_F_NO_NOTIFY

GPA = 0x1_0000_0000


@pytest.fixture
def layout() -> Iterator[GuestLayout]:
    memory = GuestMemory(1 << 20, gpa=GPA, register=False)
    yield GuestLayout(memory)
    memory.close()


# ----- the layout --------------------------------------------------------------------------------------------

def test_three_address_spaces_never_overlap(layout: GuestLayout) -> None:
    size = layout.size
    for a, b in ((layout.iova_base, layout.gpa_base), (layout.iova_base, layout.uaddr_base)):
        assert a + size <= b or b + size <= a
    offset = layout.alloc(100, 64)
    assert (layout.iova(offset), layout.gpa(offset), layout.uaddr(offset)) == (
        layout.iova_base + offset, GPA + offset, layout.memory.uaddr + offset)
    assert layout.offset_of_iova(layout.iova(offset)) == offset
    with pytest.raises(ValueError):
        layout.offset_of_iova(layout.iova_base + size)
    with pytest.raises(ValueError):  # an IOVA base aliasing the gpa range is refused
        GuestLayout(layout.memory, iova_base=GPA, fill=False)


def test_allocator_aligns_reuses_and_refills_canary(layout: GuestLayout) -> None:
    assert layout.read(0, 64) == bytes([CANARY]) * 64
    a = layout.alloc(10, 16, what="a", fill=0)
    b = layout.alloc(100, 4096, what="b")
    assert a % 16 == 0 and b % 4096 == 0 and layout.read(a, 10) == bytes(10)
    assert layout.owner(b + 99) == "b" and layout.owner(b + 100) == "unallocated"
    free_before = layout.free_bytes
    layout.free(a)
    assert layout.read(a, 10) == bytes([CANARY]) * 10
    layout.free(b)
    assert layout.free_bytes == free_before + 110 == layout.size  # holes merged back into one
    assert layout.alloc(1 << 20, 1) == 0
    with pytest.raises(MemoryError):
        layout.alloc(1, 1)


def test_diff_lists_only_writes_outside_open_windows(layout: GuestLayout) -> None:
    readable = layout.alloc(64, 8, what="readable buffer")
    writable = layout.alloc(64, 8, what="writable buffer")
    handle = layout.allow(writable, 64, "writable buffer")
    snap = layout.snapshot()
    layout.write(readable, b"driver data")  # the driver's own writes are not the device's
    layout.memory.write(writable, b"device data")  # the device writing where it may
    assert layout.diff(snap) == []
    layout.memory.write(readable + 3, b"\x00\x01")  # the device writing where it may not
    layout.memory.write(layout.size - 1, b"\x00")
    changes = layout.diff(snap)
    assert [(c.offset, c.length, c.owner) for c in changes] == [
        (readable + 3, 2, "readable buffer"), (layout.size - 1, 1, "unallocated")]
    assert changes[0].iova == layout.iova(readable + 3) and changes[0].gpa == GPA + readable + 3
    assert changes[0].before == b"ve" and changes[0].after == b"\x00\x01"
    with pytest.raises(DeviceViolation) as caught:
        layout.check(snap)
    assert caught.value.clause == M.WRITES_ONLY_GIVEN_MEMORY and f"{readable + 3:#x}" in str(caught.value)
    # A window closed after the snapshot still covers writes made while it was open ...
    snap = layout.snapshot()
    layout.memory.write(writable, b"late")
    layout.forbid(handle)
    assert layout.diff(snap) == []
    # ... but not for a snapshot taken after it closed.
    snap = layout.snapshot()
    layout.memory.write(writable, b"too late")
    assert [c.offset for c in layout.diff(snap)] == [writable]


# ----- split ring --------------------------------------------------------------------------------------------

def device_use_split(ring: SplitRing, entries: list[tuple[int, int]]) -> None:
    """What a device does: write used elements, then bump used idx (raw memory writes)."""
    idx = ring.used_idx()
    for head, length in entries:
        ring.layout.memory.write(ring.used + 4 + 8 * (idx % ring.num), struct.pack("<II", head, length))
        idx = (idx + 1) & 0xFFFF
    ring.layout.memory.write_u16(ring.used + 2, idx)


def test_split_add_lays_out_the_chain_as_the_spec_says(layout: GuestLayout) -> None:
    ring = SplitRing(layout, 8, start=65534)
    chain = ring.add([b"head", b"body"], [100])
    assert chain.slots == [0, 1, 2] and chain.writable_len == 100
    descs = [struct.unpack("<QIHH", layout.read(ring.desc + 16 * i, 16)) for i in range(3)]
    assert [d[1:] for d in descs] == [(4, NEXT, 1), (4, NEXT, 2), (100, WRITE, 0)]
    assert layout.read(layout.offset_of_iova(descs[0][0]), 4) == b"head"
    assert layout.read(layout.offset_of_iova(descs[2][0]), 100) == bytes([CANARY]) * 100
    assert layout.read_u16(ring.avail + 4 + 2 * (65534 % 8)) == 0 and layout.read_u16(ring.avail + 2) == 65535
    second = ring.add([b"x"], [], publish=False)
    assert layout.read_u16(ring.avail + 2) == 65535  # not published yet
    ring.publish()
    assert layout.read_u16(ring.avail + 2) == 0 and layout.read_u16(ring.avail + 4 + 2 * 7) == second.id
    desc, avail, used = ring.addresses
    assert (desc, avail, used) == (layout.iova(ring.desc), layout.iova(ring.avail), layout.iova(ring.used))
    assert ring.base == 65534


def test_split_reap_across_the_16_bit_wrap_frees_everything(layout: GuestLayout) -> None:
    ring = SplitRing(layout, 4, start=65533)
    free_bytes = layout.free_bytes
    for round_ in range(3):
        snap = layout.snapshot()
        chains = [ring.add([bytes([round_])], [32]) for _ in range(2)]
        layout.memory.write(chains[1].writable[0].offset, b"ok")
        device_use_split(ring, [(chains[1].id, 2), (chains[0].id, 0)])
        used = ring.reap()
        assert [(u.id, u.length, u.data) for u in used] == [(chains[1].id, 2, b"ok"), (chains[0].id, 0, b"")]
        assert used[0].written == b"ok" + bytes([CANARY]) * 30
        assert layout.diff(snap) == []
    assert ring.used_idx() == (65533 + 6) & 0xFFFF and ring.in_flight == 0
    assert layout.free_bytes == free_bytes and len(ring.free) == 4


def test_split_indirect_chain(layout: GuestLayout) -> None:
    ring = SplitRing(layout, 4)
    chain = ring.add([b"a", b"b"], [8], indirect=True)
    addr, length, flags, _ = struct.unpack("<QIHH", layout.read(ring.desc, 16))
    assert (length, flags) == (48, INDIRECT) and len(ring.free) == 3
    table = layout.offset_of_iova(addr)
    entries = [struct.unpack("<QIHH", layout.read(table + 16 * i, 16))[1:] for i in range(3)]
    assert entries == [(1, NEXT, 1), (1, NEXT, 2), (8, WRITE, 0)]
    device_use_split(ring, [(chain.id, 8)])
    assert ring.reap()[0].length == 8 and len(ring.free) == 4


@pytest.mark.parametrize("corruption, clause", [
    ("unknown id", split.USED_RING), ("len too long", split.USED_RING), ("idx ahead", split.USED_RING),
    ("unpublished id", split.USED_RING), ("out of order", split.IN_ORDER), ("flags", split.USED_FLAGS)])
def test_split_reap_rejects_what_no_conforming_device_writes(layout: GuestLayout, corruption: str,
                                                             clause: str) -> None:
    ring = SplitRing(layout, 8, in_order=True, event_idx=True)
    a, b = ring.add([], [16]), ring.add([], [16])
    hidden = ring.add([], [16], publish=False)
    entries = {"unknown id": [(5, 0)], "len too long": [(a.id, 17)], "idx ahead": [(a.id, 0)] * 3,
               "unpublished id": [(hidden.id, 0)], "out of order": [(b.id, 0)], "flags": [(a.id, 0)]}[corruption]
    device_use_split(ring, entries)
    if corruption == "flags":
        layout.memory.write_u16(ring.used, VRING_USED_F_NO_NOTIFY)
    with pytest.raises(DeviceViolation) as caught:
        ring.reap()
    assert caught.value.clause == clause


def test_split_ring_full_and_queue_size(layout: GuestLayout) -> None:
    ring = SplitRing(layout, 2)
    ring.add([b"x"], [1])
    with pytest.raises(RingFull):
        ring.add([b"y"])
    for bad in (0, 3, 65536):
        with pytest.raises(ValueError):
            SplitRing(layout, bad)


def test_split_notification_suppression(layout: GuestLayout) -> None:
    ring = SplitRing(layout, 8)
    ring.add([b"x"])
    assert ring.prepare_kick()
    layout.memory.write_u16(ring.used, VRING_USED_F_NO_NOTIFY)
    ring.add([b"x"])
    assert not ring.prepare_kick()
    ring.set_interrupts(False)
    assert layout.read_u16(ring.avail) == 1
    evented = SplitRing(layout, 8, start=65535, event_idx=True)
    for event in (65535, 0, 1):
        layout.memory.write_u16(evented.used + 4 + 8 * 8, event)  # avail_event, as the device sets it
        old = evented.avail_idx
        evented.add([b"x"])
        assert evented.prepare_kick() == vring_need_event(event, evented.avail_idx, old) == (event == old)
    evented.set_used_event(7)
    assert layout.read_u16(evented.avail + 4 + 2 * 8) == 7


def test_split_avail_event_is_the_devices_only_with_event_idx(layout: GuestLayout) -> None:
    plain, evented = SplitRing(layout, 4, name="plain"), SplitRing(layout, 4, event_idx=True, name="evented")
    snap = layout.snapshot()
    for ring in (plain, evented):
        layout.memory.write_u16(ring.used + 2, 0)  # used idx: always the device's
        layout.memory.write_u16(ring.used + 4 + 8 * 4, 3)  # avail_event
    assert [c.owner for c in layout.diff(snap)] == ["plain used ring"]


def test_split_hostile_writers(layout: GuestLayout) -> None:
    ring = SplitRing(layout, 8)
    loop = ring.post_loop()
    (_, _, f0, n0), (_, _, f1, n1) = (struct.unpack("<QIHH", layout.read(ring.desc + 16 * s, 16)) for s in loop.slots)
    assert (f0, n0, f1, n1) == (NEXT, loop.slots[1], NEXT, loop.slots[0]) and loop.bad
    nested = ring.post_nested_indirect()
    outer = layout.offset_of_iova(struct.unpack("<QIHH", layout.read(ring.desc + 16 * nested.id, 16))[0])
    assert struct.unpack("<QIHH", layout.read(outer, 16))[2] == INDIRECT
    wild = ring.post_head_out_of_range()
    assert layout.read_u16(ring.avail + 4 + 2 * 2) == wild.id == 11
    ring.push_avail_idx_ahead()
    assert layout.read_u16(ring.avail + 2) == 9
    device_use_split(ring, [(loop.id, 0)])  # a bad chain used with len 0: allowed
    assert ring.reap()[0].id == loop.id
    device_use_split(ring, [(nested.id, 4)])  # ... but never as if it were valid
    with pytest.raises(DeviceViolation) as caught:
        ring.reap()
    assert caught.value.clause == split.BAD_CHAIN_NOT_USED


# ----- packed ring -------------------------------------------------------------------------------------------

def device_use_packed(ring: PackedRing, slot: int, buffer_id: int, length: int, wrap: int) -> None:
    ring.layout.memory.write(ring.desc + 16 * slot + 8, struct.pack("<IHH", length, buffer_id, used_flags(wrap)))


def test_packed_publish_writes_the_head_flags_last_and_wraps(layout: GuestLayout) -> None:
    ring = PackedRing(layout, 4, start=3)
    assert ring.base == 0x8003_8003
    chain = ring.add([b"h"], [10, 20], publish=False)
    assert chain.slots == [3, 0, 1]
    flags = [ring.read_desc(s)[3] for s in chain.slots]
    assert flags[0] == used_flags(0)  # the head: still the previous lap's "used"
    assert flags[1:] == [NEXT | WRITE | avail_flags(0), WRITE | avail_flags(0)]
    ring.publish()
    assert ring.read_desc(3)[3] == NEXT | avail_flags(1) and ring.read_desc(3)[2] == chain.id
    assert (ring.next_avail, ring.avail_wrap) == (2, 0)
    assert ring.reap() == []  # nothing used yet
    device_use_packed(ring, 3, chain.id, 30, wrap=1)
    (used,) = ring.reap()
    assert (used.id, used.length) == (chain.id, 30) and (ring.next_used, ring.used_wrap) == (2, 0)
    second = ring.add([b"x"])
    device_use_packed(ring, 2, second.id, 0, wrap=0)
    assert [u.id for u in ring.reap()] == [second.id] and (ring.next_used, ring.used_wrap) == (3, 0)


def test_packed_indirect_and_canary_windows(layout: GuestLayout) -> None:
    ring = PackedRing(layout, 4)
    snap = layout.snapshot()
    chain = ring.add([b"a"], [8], indirect=True)
    addr, length, _, flags = ring.read_desc(0)
    assert (length, flags) == (32, INDIRECT | avail_flags(1))
    table = layout.offset_of_iova(addr)
    assert [struct.unpack("<QIHH", layout.read(table + 16 * i, 16))[3] for i in range(2)] == [0, WRITE]
    device_use_packed(ring, 0, chain.id, 8, wrap=1)
    layout.memory.write(ring.device_event, b"\x01\x00\x01\x00")  # device event suppression: the device's
    assert layout.diff(snap) == []
    layout.memory.write(ring.desc + 16 * 2, b"\x01")  # a slot never made available
    layout.memory.write(ring.driver_event, b"\x01")  # the driver's event structure
    assert [c.owner for c in layout.diff(snap)] == ["vq descriptor ring", "vq driver event suppression"]


@pytest.mark.parametrize("corruption, clause", [
    ("wrong wrap", P.USED_DESCRIPTOR), ("garbage bits", P.USED_DESCRIPTOR), ("unknown id", P.USED_DESCRIPTOR),
    ("len too long", P.USED_LENGTH), ("out of order", P.IN_ORDER), ("nothing outstanding", P.USED_DESCRIPTOR)])
def test_packed_reap_rejects_what_no_conforming_device_writes(layout: GuestLayout, corruption: str,
                                                              clause: str) -> None:
    ring = PackedRing(layout, 8, in_order=True)
    if corruption == "nothing outstanding":
        device_use_packed(ring, 0, 0, 0, wrap=1)
    else:
        a, b = ring.add([], [16]), ring.add([], [16])
        slot, buffer_id, length, flags = {
            "wrong wrap": (0, a.id, 0, used_flags(0)), "garbage bits": (0, a.id, 0, P.USED),
            "unknown id": (0, 7, 0, used_flags(1)), "len too long": (0, a.id, 17, used_flags(1)),
            "out of order": (0, b.id, 0, used_flags(1))}[corruption]
        layout.memory.write(ring.desc + 16 * slot + 8, struct.pack("<IHH", length, buffer_id, flags))
    with pytest.raises(DeviceViolation) as caught:
        ring.reap()
    assert caught.value.clause == clause


def test_packed_starting_in_the_second_lap(layout: GuestLayout) -> None:
    ring = PackedRing(layout, 4, start=1, wrap=0)
    assert ring.base == 0x0001_0001
    assert ring.reap() == []  # the zeroed-looking lap is not mistaken for used descriptors
    chain = ring.add([b"x"])
    assert ring.read_desc(1)[3] == avail_flags(0)
    device_use_packed(ring, 1, chain.id, 0, wrap=0)
    assert [u.id for u in ring.reap()] == [chain.id]


def test_packed_notification_suppression_and_hostile_writers(layout: GuestLayout) -> None:
    ring = PackedRing(layout, 8, event_idx=True)
    ring.add([b"x"])
    assert ring.prepare_kick()  # device event flags ENABLE (zeroed)
    layout.memory.write(ring.device_event, struct.pack("<HH", 0, 1))  # DISABLE
    ring.add([b"x"])
    assert not ring.prepare_kick()
    layout.memory.write(ring.device_event, struct.pack("<HH", 0x8000 | 3, VRING_PACKED_EVENT_FLAG_DESC))
    ring.add([b"x"])  # slot 2: the event (slot 3) not passed
    assert not ring.prepare_kick()
    ring.add([b"x"])  # slot 3: passed
    assert ring.prepare_kick()
    ring.set_used_event(5, 1)
    assert layout.read(ring.driver_event, 4) == struct.pack("<HH", 0x8005, VRING_PACKED_EVENT_FLAG_DESC)
    listed = ring.post_indirect_in_list()
    assert [ring.read_desc(s)[3] & (NEXT | INDIRECT) for s in listed.slots] == [NEXT, INDIRECT] and listed.bad
    nested = ring.post_nested_indirect()
    table = layout.offset_of_iova(ring.read_desc(nested.slots[0])[0])
    assert struct.unpack("<QIHH", layout.read(table, 16))[3] == INDIRECT


# ----- traffic -----------------------------------------------------------------------------------------------

def test_frames_round_trip_and_corruption_is_named() -> None:
    frame = TR.build_frame(7, 100)
    assert len(frame) == 100 and frame[12:14] == b"\x88\xb5"
    parsed = TR.parse_frame(TR.net_hdr(num_buffers=1) + frame)
    assert (parsed.seq, parsed.length, parsed.num_buffers) == (7, 100, 1)
    assert zlib.crc32(frame[TR.FRAME_META:]) == struct.unpack_from("<I", frame, 18)[0]
    for bad in (TR.net_hdr(num_buffers=1) + frame[:50] + b"\x00" + frame[51:],  # payload byte flipped
                TR.net_hdr(num_buffers=2) + frame,  # num_buffers without MRG_RXBUF
                TR.net_hdr(num_buffers=1, gso_type=1) + frame,  # an offload never asked for
                TR.net_hdr(num_buffers=1) + frame[:12] + b"\x08\x00" + frame[14:],  # not our EtherType
                b"\x00" * 5):
        with pytest.raises(DeviceViolation) as caught:
            TR.parse_frame(bad)
        assert caught.value.clause == TR.LOOPED_BACK
    with pytest.raises(ValueError):
        TR.build_frame(1, TR.MIN_FRAME - 1)


def test_net_stream_counts_loss_duplicates_and_reordering() -> None:
    stream = TR.NetStream()
    frames = stream.frames(5, [64, 80])
    assert [TR.parse_frame(f, with_header=False).length for f in frames] == [64, 80, 64, 80, 64]
    for index in (0, 2, 1, 2):
        stream.receive(TR.parse_frame(frames[index], with_header=False))
    assert (stream.lost, stream.duplicated, stream.reordered) == ([3, 4], [2], [1])
    with pytest.raises(DeviceViolation, match="duplicated"):
        stream.check(complete=False)
    clean = TR.NetStream()
    clean_frames = clean.frames(3)
    for f in clean_frames:
        clean.receive(TR.parse_frame(f, with_header=False))
    clean.check()
    with pytest.raises(DeviceViolation, match="never sent"):
        clean.receive(TR.parse_frame(TR.build_frame(99, 64), with_header=False))
        clean.check()


def test_blk_requests_and_the_sector_shadow() -> None:
    out = TR.blk_out(5, TR.sector_pattern(5, 1))
    assert out.readable[0] == struct.pack("<IIQ", B.VIRTIO_BLK_T_OUT, 0, 5) and out.writable == (1,)
    assert TR.blk_in(3, 2).writable == (1024, 1) and TR.blk_in(3, 2).data_in_len == 1024
    assert TR.blk_get_id().writable == (20, 1) and TR.blk_flush().readable == (struct.pack("<IIQ", 4, 0, 0),)
    assert TR.blk_write_zeroes([(1, 2)], unmap=True).readable[1] == struct.pack("<QII", 1, 2, 1)
    assert TR.blk_discard([(1, 2), (8, 1)]).readable[1] == struct.pack("<QIIQII", 1, 2, 0, 8, 1, 0)
    shadow = TR.BlkShadow(16)
    data = shadow.write(4, 2)
    assert len(data) == 1024 and TR.identify_sector(data[512:]) == (5, 2)
    assert shadow.mismatches(4, data) == [] and shadow.mismatches(0, bytes(512 * 4)) == []
    stale = TR.sector_pattern(4, 1)
    assert shadow.mismatches(4, stale) == []  # generation 1 is still current for sector 4
    shadow.write(4)
    assert shadow.mismatches(4, stale) == ["sector 4: expected generation 3, got sector 4 generation 1"]
    shadow.zero(4, 1)
    shadow.discard(5, 1)
    shadow.check_read(4, bytes(512) + b"\x42" * 512)  # a discarded sector may read as anything
    with pytest.raises(DeviceViolation) as caught:
        shadow.check_read(6, TR.sector_pattern(7, 1))
    assert caught.value.clause == "blk.IN.ok" and "zeroes" not in str(caught.value)


def test_every_clause_the_harness_names_is_in_the_catalog() -> None:
    ids = rules.by_id()
    named = [split.USED_RING, split.IN_ORDER, split.USED_FLAGS, split.BAD_CHAIN_NOT_USED, P.USED_DESCRIPTOR,
             P.USED_LENGTH, P.IN_ORDER, M.WRITES_ONLY_GIVEN_MEMORY, TR.LOOPED_BACK, "blk.IN.ok"]
    assert all(clause in ids for clause in named)
    with pytest.raises(ValueError):
        DeviceViolation("ring.no.such.rule", "harness bug")
