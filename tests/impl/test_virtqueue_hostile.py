"""Hostile guest input: every bad-input class breaks the queue, is reported by name, and changes nothing.

Each case builds a ring no honest driver would, lets the device pop, and checks: the right
VQ_BAD_* code, the queue stays broken (later pops and pushes return the same code), the
ACCESS_FAIL record for translation faults, and not one byte of guest memory changed (guest
memory starts as canary bytes, so any device write shows).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vdpacert.impl.virtqueue as vqmod
from vdpacert.impl.iotlb import ACCESS_RO, ACCESS_RW, ACCESS_WO
from vdpacert.impl.virtqueue import VirtQueueError, is_bad_input

try:
    from .ring_driver import AVAIL, INDIRECT, NEXT, WRITE, Guest, PackedDriver, SplitDriver, device_queue, features
except ImportError:
    from ring_driver import AVAIL, INDIRECT, NEXT, WRITE, Guest, PackedDriver, SplitDriver, device_queue, features

NUM = 4
HOLE = 0x9999_0000          # an IOVA nothing maps
U64 = 2**64


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


def buf(guest: Guest, size: int = 64) -> int:
    return guest.iova(guest.alloc(size, 16, zero=False))


def table(guest: Guest, entries: list[tuple[int, int, int, int]]) -> int:
    """An indirect table in guest memory: [(addr, len, flags, next)]; its IOVA."""
    offset = guest.alloc(16 * max(len(entries), 1), 16)
    for i, (addr, length, flags, next_) in enumerate(entries):
        guest.mem.write(offset + 16 * i, struct.pack("<QIHH", addr, length, flags, next_))
    return guest.iova(offset)


# ---- split cases: (guest, driver) -> None, building the ring; expected code; ring features ----

def s_loop(g: Guest, d: SplitDriver) -> None:
    d.write_desc(0, buf(g), 8, NEXT, 1)
    d.write_desc(1, buf(g), 8, NEXT, 0)
    d.publish(0)


def s_self_loop(g: Guest, d: SplitDriver) -> None:
    d.write_desc(2, buf(g), 8, NEXT | WRITE, 2)
    d.publish(2)


def s_indirect_loop(g: Guest, d: SplitDriver) -> None:
    t = table(g, [(buf(g), 8, NEXT, 1), (buf(g), 8, NEXT, 0)])
    d.write_desc(0, t, 32, INDIRECT)
    d.publish(0)


def s_indirect_too_long(g: Guest, d: SplitDriver) -> None:
    t = table(g, [(buf(g), 8, NEXT, i + 1) for i in range(NUM)] + [(buf(g), 8, 0, 0)])
    d.write_desc(0, t, 16 * (NUM + 1), INDIRECT)
    d.publish(0)


def s_nested_indirect(g: Guest, d: SplitDriver) -> None:
    inner = table(g, [(buf(g), 8, 0, 0)])
    t = table(g, [(buf(g), 8, NEXT, 1), (inner, 16, INDIRECT, 0)])
    d.write_desc(0, t, 32, INDIRECT)
    d.publish(0)


def s_indirect_len(length: int) -> Callable[[Guest, SplitDriver], None]:
    def build(g: Guest, d: SplitDriver) -> None:
        t = table(g, [(buf(g), 8, 0, 0), (buf(g), 8, 0, 0)])
        d.write_desc(0, t, length, INDIRECT)
        d.publish(0)
    return build


def s_indirect(g: Guest, d: SplitDriver) -> None:
    d.write_desc(0, table(g, [(buf(g), 8, 0, 0)]), 16, INDIRECT)
    d.publish(0)


def s_indirect_with_next(g: Guest, d: SplitDriver) -> None:
    d.write_desc(0, table(g, [(buf(g), 8, 0, 0)]), 16, INDIRECT | NEXT, 1)
    d.write_desc(1, buf(g), 8, 0)
    d.publish(0)


def s_unmapped(writable: int) -> Callable[[Guest, SplitDriver], None]:
    def build(g: Guest, d: SplitDriver) -> None:
        d.write_desc(0, buf(g), 8, NEXT, 1)
        d.write_desc(1, HOLE, 8, writable)
        d.publish(0)
    return build


def s_past_the_map(g: Guest, d: SplitDriver) -> None:
    d.write_desc(0, g.iova(g.size - 8), 16, 0)       # the last 8 bytes are mapped, the rest not
    d.publish(0)


def s_wraps_2_64(g: Guest, d: SplitDriver) -> None:
    g.iotlb.update(0, 0x1000, g.mem.uaddr, ACCESS_RW)   # would be hit if the range wrapped
    d.write_desc(0, U64 - 8, 16, WRITE)
    d.publish(0)


def s_unregistered_uaddr(g: Guest, d: SplitDriver) -> None:
    g.iotlb.update(0x5000_0000, 0x1000, 0x10, ACCESS_RW)    # a user address no region holds
    d.write_desc(0, 0x5000_0000, 8, 0)
    d.publish(0)


def s_write_to_read_only(g: Guest, d: SplitDriver) -> None:
    g.iotlb.update(0x5000_0000, 0x1000, g.mem.uaddr + g.alloc(0x1000, 0x1000, zero=False), ACCESS_RO)
    d.write_desc(0, 0x5000_0000, 8, WRITE)
    d.publish(0)


def s_read_from_write_only(g: Guest, d: SplitDriver) -> None:
    g.iotlb.update(0x5000_0000, 0x1000, g.mem.uaddr + g.alloc(0x1000, 0x1000, zero=False), ACCESS_WO)
    d.write_desc(0, 0x5000_0000, 8, 0)
    d.publish(0)


def s_total_len(g: Guest, d: SplitDriver) -> None:
    d.write_desc(0, buf(g), 16, NEXT, 1)
    d.write_desc(1, buf(g), 0xFFFF_FFF8, 0)             # 16 + 0xFFFFFFF8 > 2^32 - 1
    d.publish(0)


def s_read_after_write(g: Guest, d: SplitDriver) -> None:
    d.write_desc(0, buf(g), 8, WRITE | NEXT, 1)
    d.write_desc(1, buf(g), 8, 0)
    d.publish(0)


def s_head_out_of_range(g: Guest, d: SplitDriver) -> None:
    d.write_desc(0, buf(g), 8, 0)
    d.publish(NUM)


def s_next_out_of_range(g: Guest, d: SplitDriver) -> None:
    d.write_desc(0, buf(g), 8, NEXT, NUM)
    d.publish(0)


def s_indirect_next_out_of_range(g: Guest, d: SplitDriver) -> None:
    t = table(g, [(buf(g), 8, NEXT, 2), (buf(g), 8, 0, 0)])
    d.write_desc(0, t, 32, INDIRECT)
    d.publish(0)


def s_avail_idx_too_far(g: Guest, d: SplitDriver) -> None:
    d.write_desc(0, buf(g), 8, 0)
    d.set_avail_idx(d.avail_idx + NUM + 1)


def s_too_many_segments(g: Guest, d: SplitDriver) -> None:
    data = g.alloc(0x2000, 16)
    for i in range(0x2000 // 16):                       # 16-byte IOTLB entries
        g.iotlb.update(0x6000_0000 + 16 * i, 16, g.mem.uaddr + data + 16 * i, ACCESS_RW)
    d.write_desc(0, 0x6000_0000, 16 * (2 * NUM + vqmod.SEG_SLACK + 1), 0)
    d.publish(0)


SPLIT_CASES = {
    "loop": (s_loop, vqmod.BAD_LOOP, False),
    "self_loop": (s_self_loop, vqmod.BAD_LOOP, False),
    "indirect_loop": (s_indirect_loop, vqmod.BAD_LOOP, True),
    "indirect_longer_than_queue": (s_indirect_too_long, vqmod.BAD_CHAIN_TOO_LONG, True),
    "nested_indirect": (s_nested_indirect, vqmod.BAD_NESTED_INDIRECT, True),
    "indirect_len_zero": (s_indirect_len(0), vqmod.BAD_INDIRECT_LEN, True),
    "indirect_len_24": (s_indirect_len(24), vqmod.BAD_INDIRECT_LEN, True),
    "indirect_not_negotiated": (s_indirect, vqmod.BAD_INDIRECT_NOT_NEGOTIATED, False),
    "indirect_with_next": (s_indirect_with_next, vqmod.BAD_INDIRECT_WITH_NEXT, True),
    "unmapped_readable": (s_unmapped(0), vqmod.BAD_UNMAPPED, False),
    "unmapped_writable": (s_unmapped(WRITE), vqmod.BAD_UNMAPPED, False),
    "past_the_map": (s_past_the_map, vqmod.BAD_UNMAPPED, False),
    "wraps_2_64": (s_wraps_2_64, vqmod.BAD_UNMAPPED, False),
    "unregistered_uaddr": (s_unregistered_uaddr, vqmod.BAD_UNMAPPED, False),
    "write_to_read_only": (s_write_to_read_only, vqmod.BAD_DENIED, False),
    "read_from_write_only": (s_read_from_write_only, vqmod.BAD_DENIED, False),
    "total_len_over_2_32": (s_total_len, vqmod.BAD_TOTAL_LEN, False),
    "readable_after_writable": (s_read_after_write, vqmod.BAD_READ_AFTER_WRITE, False),
    "head_out_of_range": (s_head_out_of_range, vqmod.BAD_INDEX, False),
    "next_out_of_range": (s_next_out_of_range, vqmod.BAD_INDEX, False),
    "indirect_next_out_of_range": (s_indirect_next_out_of_range, vqmod.BAD_INDEX, True),
    "avail_idx_too_far": (s_avail_idx_too_far, vqmod.BAD_AVAIL_IDX, False),
    "too_many_segments": (s_too_many_segments, vqmod.BAD_TOO_MANY_SEGMENTS, False),
}

EXPECTED_FAULTS = {
    "unmapped_readable": lambda g: (HOLE, ACCESS_RO),
    "unmapped_writable": lambda g: (HOLE, ACCESS_WO),
    "past_the_map": lambda g: (g.iova(g.size), ACCESS_RO),
    "wraps_2_64": lambda g: (U64 - 8, ACCESS_WO),
    "unregistered_uaddr": lambda g: (0x5000_0000, ACCESS_RO),
    "write_to_read_only": lambda g: (0x5000_0000, ACCESS_WO),
    "read_from_write_only": lambda g: (0x5000_0000, ACCESS_RO),
}


def assert_broken_and_untouched(guest: Guest, vq: vqmod.VirtQueue, code: int, before: bytes,
                                good_chain: vqmod.PoppedChain | None = None) -> None:
    with pytest.raises(VirtQueueError) as bad:
        vq.pop_chain()
    assert bad.value.code == code, bad.value
    assert is_bad_input(code)
    assert vq.broken == code
    with pytest.raises(VirtQueueError) as again:      # it stays broken: no retry, no progress
        vq.pop_chain()
    assert again.value.code == code
    if good_chain is not None:                         # nor can anything still be completed
        with pytest.raises(VirtQueueError):
            vq.write_chain(good_chain, 0, b"zz")
        with pytest.raises(VirtQueueError):
            vq.push_chain(good_chain, 2)
    assert guest.snapshot() == before                  # not one byte written


@pytest.mark.parametrize("case", sorted(SPLIT_CASES))
def test_split_hostile_class(guest: Guest, case: str) -> None:
    build, code, indirect = SPLIT_CASES[case]
    driver = SplitDriver(guest, NUM)
    vq = device_queue(guest, driver, features(indirect=indirect))
    # one honest chain first, taken and still held: it must not be completed after the break
    driver.write_desc(3, buf(guest), 8, WRITE)
    driver.publish(3)
    good = vq.pop_chain()
    if case == "too_many_segments":      # while a chain is held this is "no space yet", not bad input
        vq.push_chain(good, 0)
        good = None
    build(guest, driver)
    before = guest.snapshot()
    assert_broken_and_untouched(guest, vq, code, before, good)
    fault = EXPECTED_FAULTS.get(case)
    assert vq.access_fail == (fault(guest) if fault else None)


def test_unmapped_available_ring(guest: Guest) -> None:
    driver = SplitDriver(guest, NUM)
    vq = device_queue(guest, driver, features(), ready=False)
    desc, _, used = driver.addresses
    vq.set_address(desc, HOLE, used)
    vq.set_ready(True)
    before = guest.snapshot()
    assert_broken_and_untouched(guest, vq, vqmod.BAD_UNMAPPED, before)
    assert vq.access_fail == (HOLE + 2, ACCESS_RO)          # avail->idx is read first


def test_read_only_used_ring_fails_the_push_and_writes_nothing(guest: Guest) -> None:
    driver = SplitDriver(guest, NUM)
    vq = device_queue(guest, driver, features(), ready=False)
    desc, avail, _ = driver.addresses
    guest.iotlb.update(0x5000_0000, 0x1000, guest.mem.uaddr + driver.used, ACCESS_RO)
    vq.set_address(desc, avail, 0x5000_0000)
    vq.set_ready(True)
    driver.add([b"x"], [4])
    chain = vq.pop_chain()
    vq.write_chain(chain, 0, b"abcd")
    before = guest.snapshot()
    with pytest.raises(VirtQueueError) as denied:
        vq.push_chain(chain, 4)
    assert denied.value.code == vqmod.BAD_DENIED
    assert vq.access_fail == (0x5000_0000 + 4, ACCESS_WO)   # the used element
    assert guest.snapshot() == before


def test_ring_areas_past_2_64_are_refused(guest: Guest) -> None:
    driver = SplitDriver(guest, NUM)
    vq = device_queue(guest, driver, features(), ready=False)
    vq.set_address(U64 - 32, *driver.addresses[1:])
    with pytest.raises(OSError):
        vq.set_ready(True)
    assert not vq.ready


def test_reset_clears_a_broken_queue(guest: Guest) -> None:
    driver = SplitDriver(guest, NUM)
    vq = device_queue(guest, driver, features())
    s_loop(guest, driver)
    with pytest.raises(VirtQueueError):
        vq.pop_chain()
    vq.reset()
    assert vq.broken == 0 and vq.access_fail is None


# ---- packed cases ----

def ptable(guest: Guest, entries: list[tuple[int, int, int]]) -> int:
    """A packed indirect table: [(addr, len, flags)] in the packed layout (id at 12, flags at 14)."""
    offset = guest.alloc(16 * len(entries), 16)
    for i, (addr, length, flags) in enumerate(entries):
        guest.mem.write(offset + 16 * i, struct.pack("<QIHH", addr, length, 0, flags))
    return guest.iova(offset)


def p_desc(d: PackedDriver, slot: int, addr: int, length: int, flags: int, buffer_id: int = 0) -> None:
    d.write_desc(slot, addr, length, buffer_id, flags | AVAIL)    # available on lap 1


def p_too_long(g: Guest, d: PackedDriver) -> None:
    for slot in range(NUM):
        p_desc(d, slot, buf(g), 8, NEXT)


def p_indirect_len(length: int) -> Callable[[Guest, PackedDriver], None]:
    def build(g: Guest, d: PackedDriver) -> None:
        p_desc(d, 0, ptable(g, [(buf(g), 8, 0)]), length, INDIRECT)
    return build


def p_indirect_too_long(g: Guest, d: PackedDriver) -> None:
    p_desc(d, 0, ptable(g, [(buf(g), 8, 0)] * (NUM + 1)), 16 * (NUM + 1), INDIRECT)


def p_nested(g: Guest, d: PackedDriver) -> None:
    inner = ptable(g, [(buf(g), 8, 0)])
    p_desc(d, 0, ptable(g, [(buf(g), 8, 0), (inner, 16, INDIRECT)]), 32, INDIRECT)


def p_indirect_with_next(g: Guest, d: PackedDriver) -> None:
    p_desc(d, 0, ptable(g, [(buf(g), 8, 0)]), 16, INDIRECT | NEXT)
    p_desc(d, 1, buf(g), 8, 0)


def p_indirect_after_first(g: Guest, d: PackedDriver) -> None:
    # Found by the datapath machine: an INDIRECT descriptor as the *second* element of a NEXT list
    # (without NEXT itself) is bad input too (§2.8.7), not an indirect table to walk.
    p_desc(d, 0, buf(g), 8, NEXT)
    p_desc(d, 1, ptable(g, [(buf(g), 8, WRITE)]), 16, INDIRECT)


def p_unmapped(g: Guest, d: PackedDriver) -> None:
    p_desc(d, 0, buf(g), 8, NEXT)
    p_desc(d, 1, HOLE, 8, WRITE)


def p_read_after_write(g: Guest, d: PackedDriver) -> None:
    p_desc(d, 0, buf(g), 8, WRITE | NEXT)
    p_desc(d, 1, buf(g), 8, 0)


def p_indirect_read_after_write(g: Guest, d: PackedDriver) -> None:
    p_desc(d, 0, ptable(g, [(buf(g), 8, WRITE), (buf(g), 8, 0)]), 32, INDIRECT)


def p_total_len(g: Guest, d: PackedDriver) -> None:
    p_desc(d, 0, buf(g), 16, NEXT)
    p_desc(d, 1, buf(g), 0xFFFF_FFF8, 0)


def p_denied(g: Guest, d: PackedDriver) -> None:
    g.iotlb.update(0x5000_0000, 0x1000, g.mem.uaddr + g.alloc(0x1000, 0x1000, zero=False), ACCESS_RO)
    p_desc(d, 0, 0x5000_0000, 8, WRITE)


PACKED_CASES = {
    "chain_longer_than_ring": (p_too_long, vqmod.BAD_CHAIN_TOO_LONG, False),
    "indirect_len_zero": (p_indirect_len(0), vqmod.BAD_INDIRECT_LEN, True),
    "indirect_len_40": (p_indirect_len(40), vqmod.BAD_INDIRECT_LEN, True),
    "indirect_longer_than_queue": (p_indirect_too_long, vqmod.BAD_CHAIN_TOO_LONG, True),
    "indirect_not_negotiated": (p_indirect_len(16), vqmod.BAD_INDIRECT_NOT_NEGOTIATED, False),
    "nested_indirect": (p_nested, vqmod.BAD_NESTED_INDIRECT, True),
    "indirect_with_next": (p_indirect_with_next, vqmod.BAD_INDIRECT_WITH_NEXT, True),
    "indirect_after_first": (p_indirect_after_first, vqmod.BAD_INDIRECT_WITH_NEXT, True),
    "unmapped": (p_unmapped, vqmod.BAD_UNMAPPED, False),
    "readable_after_writable": (p_read_after_write, vqmod.BAD_READ_AFTER_WRITE, False),
    "indirect_readable_after_writable": (p_indirect_read_after_write, vqmod.BAD_READ_AFTER_WRITE, True),
    "total_len_over_2_32": (p_total_len, vqmod.BAD_TOTAL_LEN, False),
    "write_to_read_only": (p_denied, vqmod.BAD_DENIED, False),
}


@pytest.mark.parametrize("case", sorted(PACKED_CASES))
def test_packed_hostile_class(guest: Guest, case: str) -> None:
    build, code, indirect = PACKED_CASES[case]
    driver = PackedDriver(guest, NUM)
    vq = device_queue(guest, driver, features(packed=True, indirect=indirect))
    build(guest, driver)
    before = guest.snapshot()
    assert_broken_and_untouched(guest, vq, code, before)
    assert vq.get_state()["last_avail_idx"] == 0          # nothing was consumed


# ---- fuzz: arbitrary rings never make the device write outside what it was given ----

descriptor = st.tuples(st.integers(0, 0x13F), st.sampled_from([0, 1, 8, 16, 32, 64, 0x1000, 0xFFFFFFFF]),
                       st.sampled_from([0, 1, 2, 3] * 3 + [4, 5, 6, 7]), st.integers(0, NUM + 1))


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(descs=st.lists(descriptor, min_size=NUM, max_size=NUM),
       heads=st.lists(st.integers(0, NUM + 1), min_size=NUM, max_size=NUM),
       avail_idx=st.integers(0, 0xFFFF), indirect=st.booleans(), packed=st.booleans())
def test_fuzzed_rings_never_write_outside_writable_buffers(descs: list, heads: list, avail_idx: int,
                                                          indirect: bool, packed: bool) -> None:
    guest = Guest(1 << 16)
    try:
        data = guest.alloc(0x140 * 16, 16, zero=False)     # what descriptors point into (incl. tables)
        driver: SplitDriver | PackedDriver
        if packed:
            driver = PackedDriver(guest, NUM)
            for slot, (unit, length, flags, _) in enumerate(descs):
                addr = guest.iova(data + 16 * unit) if unit < 0x13F else HOLE
                driver.write_desc(slot, addr, length, heads[slot], (flags & 7) | (AVAIL if unit & 1 else 0x8000))
        else:
            driver = SplitDriver(guest, NUM)
            for i, (unit, length, flags, next_) in enumerate(descs):
                addr = guest.iova(data + 16 * unit) if unit < 0x13F else HOLE
                driver.write_desc(i, addr, length, flags, next_)
            for slot, head in enumerate(heads):
                driver.set_avail_ring(slot, head)
            driver.set_avail_idx(avail_idx % (NUM + 2))
        vq = device_queue(guest, driver, features(packed=packed, indirect=indirect))
        before = guest.snapshot()
        allowed = set()
        for _ in range(NUM + 1):                            # at most NUM chains can be available
            try:
                chain = vq.pop_chain()
            except VirtQueueError as error:
                assert is_bad_input(error.code)
                break
            if chain is None:
                break
            for gpa, length in chain.writable:
                allowed.update(range(gpa - guest.mem.gpa, gpa - guest.mem.gpa + min(length, 0x2000)))
            vq.write_chain(chain, 0, b"\x5a" * min(chain.writable_len, 0x2000))
            vq.push_chain(chain, chain.writable_len)
        after = guest.snapshot()
        ring = range(driver.desc, driver.desc + 16 * NUM) if packed else range(driver.used, driver.used + 6 + 8 * NUM)
        changed = {i for i in range(len(before)) if before[i] != after[i]}
        assert changed <= allowed | set(ring)
    finally:
        guest.close()
