"""vhost's dirty log: exactly the pages the device wrote, at the right addresses, and the eventfd."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdpacert.impl.dirty_log import ERR_OVERFLOW, ERR_RANGE, ERR_UNMAPPED, DirtyLog, DirtyLogError
from vdpacert.impl.guestmem import GuestMemory, MemoryRegistry
from vdpacert.impl.virtqueue import ERR_LOG, VirtQueueError

try:
    from .ring_driver import CANARY, PAGE, Guest, PackedDriver, SplitDriver, device_queue, features
except ImportError:
    from ring_driver import CANARY, PAGE, Guest, PackedDriver, SplitDriver, device_queue, features

GUEST_GPA = 0x10_0000          # guest pages 0x100 - 0x1ff
LOG_BYTES = 0x100              # pages 0 - 0x7ff can be logged
USED_LOG_GPA = 0x40_0000       # log_guest_addr: where vhost says the used ring is (page 0x400)


class Setup:
    def __init__(self, log_bytes: int = LOG_BYTES) -> None:
        self.guest = Guest(1 << 20, gpa=GUEST_GPA)
        self.log_mem = GuestMemory(log_bytes + 16, gpa=0x7000_0000, register=False)
        self.log_mem.fill(log_bytes, 16, CANARY)             # just past the bitmap
        self.registry = MemoryRegistry()
        self.registry.add(self.log_mem)
        self.efd = os.eventfd(0, os.EFD_NONBLOCK)
        self.log = DirtyLog(self.registry, self.log_mem.uaddr, log_bytes, self.efd)
        self.log_bytes = log_bytes

    def signalled(self) -> int:
        try:
            return os.eventfd_read(self.efd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        os.close(self.efd)
        self.log_mem.close()
        self.guest.close()


@pytest.fixture
def env() -> Iterator[Setup]:
    setup = Setup()
    yield setup
    setup.close()


def pages(gpa: int, length: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1)) if length else set()


# ---- the log itself ----

def test_marks_exactly_the_pages_of_a_write(env: Setup) -> None:
    assert env.log.mark_range(0x1FFF, 1) == 1
    assert env.log.mark_range(0x4FFF, 2) == 2
    assert env.log.mark_range(0x9000, 0x3000) == 3
    assert env.log.mark_range(0x20000, 0) == 0
    assert env.log.dirty_pages() == [1, 4, 5, 9, 10, 11]
    assert env.log_mem.read(0, 2) == bytes([0b0011_0010, 0b0000_1110])   # bit page % 8 of byte page // 8


def test_a_page_outside_the_log_is_an_error_and_sets_nothing(env: Setup) -> None:
    last_page = env.log_bytes * 8 - 1
    with pytest.raises(DirtyLogError) as outside:
        env.log.mark_range((last_page - 1) * PAGE, 3 * PAGE)             # two pages in, one out
    assert outside.value.code == ERR_RANGE
    with pytest.raises(DirtyLogError) as wrap:
        env.log.mark_range(2**64 - 8, 16)
    assert wrap.value.code == ERR_OVERFLOW
    assert env.log.dirty_pages() == []
    assert env.log_mem.read(env.log_bytes, 16) == bytes([CANARY]) * 16  # nothing past the bitmap
    assert env.log.mark_range(last_page * PAGE, PAGE) == 1
    assert env.log.dirty_pages() == [last_page]


def test_an_unmapped_bitmap_is_an_error(env: Setup) -> None:
    stray = DirtyLog(MemoryRegistry(), env.log_mem.uaddr, LOG_BYTES)
    with pytest.raises(DirtyLogError) as unmapped:
        stray.mark_range(0, 1)
    assert unmapped.value.code == ERR_UNMAPPED
    with pytest.raises(OSError):
        DirtyLog(env.registry, 2**64 - 4, 8)


def test_eventfd_is_signalled_once_per_flush_after_marks(env: Setup) -> None:
    assert env.log.signal() is False                                   # nothing marked
    env.log.mark_range(0, 1)
    env.log.mark_range(PAGE, 1)
    assert env.log.signal() is True
    assert env.signalled() == 1
    assert env.log.signal() is False
    env.log.set_fd(-1)
    env.log.mark_range(0, 1)
    assert env.log.signal() is False                                   # no fd: nothing to signal


@settings(max_examples=60)
@given(st.lists(st.tuples(st.integers(0, LOG_BYTES * 8 * PAGE - 1), st.integers(0, 3 * PAGE)), max_size=12))
def test_marks_agree_with_a_plain_set_of_pages(writes: list[tuple[int, int]]) -> None:
    setup = Setup()
    try:
        expected: set[int] = set()
        for gpa, length in writes:
            span = pages(gpa, length)
            if span and max(span) >= LOG_BYTES * 8:
                with pytest.raises(DirtyLogError):
                    setup.log.mark_range(gpa, length)
            else:
                setup.log.mark_range(gpa, length)
                expected |= span
        assert setup.log.dirty_pages() == sorted(expected)
    finally:
        setup.close()


# ---- the datapath's writes ----

def split_queue(env: Setup, num: int = 8, *, event_idx: bool = False, log_used: bool = False):
    driver = SplitDriver(env.guest, num)
    vq = device_queue(env.guest, driver, features(event_idx=event_idx))
    vq.set_log(env.log, USED_LOG_GPA, log_used)
    return driver, vq


def test_buffer_writes_mark_the_pages_actually_written(env: Setup) -> None:
    driver, vq = split_queue(env)
    env.guest.alloc(PAGE - 100 - (env.guest._next % PAGE), 1)   # the next buffer starts 100 bytes before a page
    head = driver.add([b"request"], [3 * PAGE])
    chain = vq.pop_chain()
    (gpa, _), = chain.writable
    assert vq.write_chain(chain, 0, b"x" * 150) == 150         # crosses one page boundary
    assert env.log.dirty_pages() == sorted(pages(gpa, 150))
    vq.write_chain(chain, 2 * PAGE, b"y" * 10)                 # a third page, not the middle one
    vq.push_chain(chain, 2 * PAGE + 10)
    assert env.log.dirty_pages() == sorted(pages(gpa, 150) | pages(gpa + 2 * PAGE, 10))
    assert env.signalled() == 1                                 # once, after the push
    assert driver.get_used() == [(head, 2 * PAGE + 10)]


def test_reads_and_pops_log_nothing(env: Setup) -> None:
    driver, vq = split_queue(env, log_used=True)
    driver.add([b"only readable"])
    chain = vq.pop_chain()
    assert vq.read_chain(chain) == b"only readable"
    assert env.log.dirty_pages() == []
    assert env.signalled() == 0


def test_used_ring_writes_are_logged_at_log_guest_addr_only_with_f_log(env: Setup) -> None:
    driver, vq = split_queue(env)
    driver.add([b"a"], [1])
    chain = vq.pop_chain()
    vq.push_chain(chain, 0)                                     # nothing written into the buffer
    assert env.log.dirty_pages() == []                          # and no F_LOG: ring writes unlogged
    vq.set_log(env.log, USED_LOG_GPA, True)
    driver.add([b"b"], [1])
    vq.push_chain(vq.pop_chain(), 0)
    # used element and used idx, at log_guest_addr + offset (not at the ring's real gpa)
    assert env.log.dirty_pages() == [USED_LOG_GPA // PAGE]
    assert env.guest.gpa(driver.used) // PAGE != USED_LOG_GPA // PAGE


def test_used_flags_and_avail_event_are_logged(env: Setup) -> None:
    # 512 entries: the used ring is 6 + 8 * 512 bytes, so avail_event (offset 4100) is on its second page
    _, vq = split_queue(env, 512, event_idx=True, log_used=True)
    assert vq.pop_chain() is None                               # empty: publishes avail_event
    assert env.log.dirty_pages() == [USED_LOG_GPA // PAGE + 1]
    plain_driver, plain = split_queue(env, 4, log_used=True)
    env.log_mem.fill(0, LOG_BYTES, 0)
    plain.disable_notifications()                               # writes used->flags
    assert env.log.dirty_pages() == [USED_LOG_GPA // PAGE]
    assert plain_driver.used_flags() == 1


def test_packed_used_descriptors_are_logged_where_they_are_written(env: Setup) -> None:
    driver = PackedDriver(env.guest, 4)
    vq = device_queue(env.guest, driver, features(packed=True, event_idx=True))
    vq.set_log(env.log, USED_LOG_GPA, True)
    driver.add([b"p"], [8])
    chain = vq.pop_chain()
    vq.write_chain(chain, 0, b"12345678")
    (gpa, _), = chain.writable
    vq.push_chain(chain, 8)
    ring_page = env.guest.gpa(driver.desc) // PAGE
    assert env.log.dirty_pages() == sorted({gpa // PAGE, ring_page})
    assert vq.pop_chain() is None                               # device event area: at log_guest_addr
    assert env.log.dirty_pages() == sorted({gpa // PAGE, ring_page, USED_LOG_GPA // PAGE})


def test_a_buffer_outside_the_log_is_never_written(env: Setup) -> None:
    small = Setup(log_bytes=0x20)                               # pages 0 - 0xff: not the guest's
    try:
        driver, vq = split_queue(small)
        head = driver.add([b"r"], [16])
        chain = vq.pop_chain()
        with pytest.raises(VirtQueueError) as refused:
            vq.write_chain(chain, 0, b"z" * 16)
        assert refused.value.code == ERR_LOG
        assert vq.broken == ERR_LOG
        assert driver.written(head) == bytes([CANARY]) * 16
        assert small.log.dirty_pages() == []
    finally:
        small.close()


def test_a_used_ring_outside_the_log_is_never_written(env: Setup) -> None:
    driver, vq = split_queue(env)
    vq.set_log(env.log, 2**40, True)                            # far past the 0x100-byte bitmap
    driver.add([b"r"], [4])
    chain = vq.pop_chain()
    before = env.guest.snapshot()
    with pytest.raises(VirtQueueError) as refused:
        vq.push_chain(chain, 0)
    assert refused.value.code == ERR_LOG
    assert env.guest.snapshot() == before
    assert driver.used_idx() == 0


def test_batches_signal_the_eventfd_once(env: Setup) -> None:
    driver, vq = split_queue(env, log_used=True)
    for _ in range(4):
        driver.add([b"q"], [4])
    chains = [vq.pop_chain() for _ in range(4)]
    written = set()
    for chain in chains:
        vq.write_chain(chain, 0, b"data")
        (gpa, _), = chain.writable
        written |= pages(gpa, 4)
    assert env.signalled() == 0                                 # buffer writes alone: not yet
    vq.push_chains([(c, 4) for c in chains])
    assert env.signalled() == 1
    assert env.log.dirty_pages() == sorted(written | {USED_LOG_GPA // PAGE})


def test_stopping_the_log_stops_marking(env: Setup) -> None:
    driver, vq = split_queue(env, log_used=True)
    vq.set_log(None)
    driver.add([b"a"], [4])
    chain = vq.pop_chain()
    vq.write_chain(chain, 0, b"abcd")
    vq.push_chain(chain, 4)
    assert env.log.dirty_pages() == []
    assert env.signalled() == 0
