"""The compiled dirty bitmap against a plain set of page numbers, and against a device logging concurrently.

Every operation of :class:`~vdpacert.migration.bitmap.DirtyBitmap` has an obvious meaning on a
``set[int]`` of pages; Hypothesis drives both with the same random operations (ranges crossing
byte, word and page boundaries, length 0, the last page, merges, takes, logs shorter and longer
than the bitmap, unaligned logs) and compares after every step: the pages, the count, and the raw
bytes in vhost's layout. Bad input must raise and leave the bitmap as it was. The last test has
the reference device's own log writer (atomic fetch-or, in another thread) mark pages while
``merge_from_log`` takes them, and checks that no page is lost or counted twice.
"""

from __future__ import annotations

import ctypes
import random
import sys
import threading
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from vdpacert.impl.dirty_log import DirtyLog
from vdpacert.impl.guestmem import GuestMemory, MemoryRegistry
from vdpacert.migration.bitmap import MAX_PAGES, PAGE_SIZE, DirtyBitmap, PageRangeError


def log_bytes(pages: set[int], nbytes: int) -> bytes:
    """The vhost log layout of ``pages``: bit page % 8 of byte page // 8."""
    out = bytearray(nbytes)
    for page in pages:
        out[page // 8] |= 1 << (page % 8)
    return bytes(out)


def pages_of(raw: bytes | bytearray | memoryview) -> set[int]:
    return {8 * i + b for i, byte in enumerate(bytes(raw)) if byte for b in range(8) if byte >> b & 1}


# ----- the reference model, step by step ---------------------------------------------------------------------

class BitmapVersusSet(RuleBasedStateMachine):
    """One DirtyBitmap and one set, the same operations on both."""

    @initialize(npages=st.integers(0, 200) | st.sampled_from([1, 63, 64, 65, 127, 128, 129, 511, 512, 513]))
    def create(self, npages: int) -> None:
        self.npages = npages
        self.bitmap = DirtyBitmap(npages)
        self.model: set[int] = set()

    def _page(self, data: st.DataObject) -> int:
        # Word and byte boundaries and both ends, more often than uniform drawing would find them.
        edges = [p for p in (0, 7, 8, 63, 64, 65, self.npages - 1) if 0 <= p < self.npages]
        return data.draw(st.sampled_from(edges) | st.integers(0, self.npages - 1)) if self.npages else 0

    @rule(data=st.data(), offset=st.integers(0, PAGE_SIZE - 1),
          length=st.integers(0, 3 * PAGE_SIZE) | st.integers(0, 130 * PAGE_SIZE))
    def mark(self, data: st.DataObject, offset: int, length: int) -> None:
        gpa = self._page(data) * PAGE_SIZE + offset if self.npages else offset
        touched = set(range(gpa // PAGE_SIZE, (gpa + length - 1) // PAGE_SIZE + 1)) if length else set()
        if touched and max(touched) >= self.npages:
            before = bytes(self.bitmap.view())
            with pytest.raises(PageRangeError):
                self.bitmap.mark(gpa, length)
            assert bytes(self.bitmap.view()) == before  # nothing marked
            return
        assert self.bitmap.mark(gpa, length) == len(touched - self.model)
        self.model |= touched

    @rule(data=st.data(), count=st.integers(0, 6), bad=st.booleans())
    def mark_pages(self, data: st.DataObject, count: int, bad: bool) -> None:
        pages = [self._page(data) for _ in range(count)] if self.npages else []
        if bad:
            pages.insert(data.draw(st.integers(0, len(pages))), self.npages + data.draw(st.integers(0, 70)))
            before = bytes(self.bitmap.view())
            with pytest.raises(PageRangeError):
                self.bitmap.mark_pages(iter(pages))
            assert bytes(self.bitmap.view()) == before  # one bad page: none marked
            return
        assert self.bitmap.mark_pages(iter(pages)) == len(set(pages) - self.model)
        self.model |= set(pages)

    @rule(data=st.data())
    def test_page(self, data: st.DataObject) -> None:
        if self.npages:
            page = self._page(data)
            assert self.bitmap.test(page) == (page in self.model)
        with pytest.raises(PageRangeError):
            self.bitmap.test(self.npages)

    @rule()
    def take(self) -> None:
        assert list(self.bitmap.take()) == sorted(self.model)
        self.model.clear()

    @rule()
    def clear(self) -> None:
        self.bitmap.clear()
        self.model.clear()

    @rule(data=st.data(), smaller=st.integers(0, 70))
    def merge(self, data: st.DataObject, smaller: int) -> None:
        other_pages = max(0, self.npages - smaller)
        other = DirtyBitmap(other_pages)
        chosen = set(data.draw(st.lists(st.integers(0, other_pages - 1), max_size=8))) if other_pages else set()
        other.mark_pages(chosen)
        assert self.bitmap.merge(other) == len(chosen - self.model)
        self.model |= chosen
        assert list(other.pages()) == sorted(chosen)  # the source is untouched
        with pytest.raises(PageRangeError):
            self.bitmap.merge(DirtyBitmap(self.npages + 1))

    @rule(data=st.data(), extra=st.integers(-9, 9), skew=st.integers(0, 7), clear=st.booleans())
    def merge_from_log(self, data: st.DataObject, extra: int, skew: int, clear: bool) -> None:
        nbytes = max(0, (self.npages + 7) // 8 + extra)
        span = 8 * nbytes
        logged = set(data.draw(st.lists(st.integers(0, span - 1), max_size=12))) if span else set()
        if span and data.draw(st.booleans()):
            logged |= {span - 1, min(span - 1, self.npages)}  # the log's last bit, the first past the bitmap
        backing = bytearray(skew) + bytearray(log_bytes(logged, nbytes))
        log = memoryview(backing)[skew:]  # skew: a log that does not start on a word boundary
        taken = {p for p in logged if p < self.npages}
        assert self.bitmap.merge_from_log(log, clear=clear) == len(taken - self.model)
        self.model |= taken
        left = logged - taken if clear else logged  # pages past the bitmap are never taken
        assert pages_of(log) == left

    @invariant()
    def agrees(self) -> None:
        if not hasattr(self, "bitmap"):
            return
        assert self.bitmap.count() == len(self.model)
        assert list(self.bitmap.pages()) == sorted(self.model)
        assert bytes(self.bitmap.view()) == log_bytes(self.model, (self.npages + 7) // 8)
        assert len(self.bitmap) == self.bitmap.npages == self.npages


TestBitmapVersusSet = BitmapVersusSet.TestCase
TestBitmapVersusSet.settings = settings(max_examples=150, stateful_step_count=30)


# ----- single behaviours -------------------------------------------------------------------------------------

@given(npages=st.integers(1, 5000), data=st.data())
@settings(max_examples=60)
def test_mark_covers_exactly_the_touched_pages(npages: int, data: st.DataObject) -> None:
    end = npages * PAGE_SIZE
    gpa = data.draw(st.integers(0, end - 1))
    length = data.draw(st.integers(0, end - gpa))
    bitmap = DirtyBitmap(npages)
    bitmap.mark(gpa, length)
    expected = set(range(gpa // PAGE_SIZE, (gpa + length + PAGE_SIZE - 1) // PAGE_SIZE)) if length else set()
    assert set(bitmap.pages()) == expected


def test_pages_are_an_unsigned_64_bit_array() -> None:
    bitmap = DirtyBitmap(130)
    bitmap.mark_pages([129, 0, 64])
    got = bitmap.pages()
    assert isinstance(got, array) and got.typecode == "Q" and list(got) == [0, 64, 129]
    assert memoryview(got).cast("B").nbytes == 24


def test_bad_arguments_are_typed_errors_and_change_nothing() -> None:
    bitmap = DirtyBitmap(16)
    bitmap.mark(0, 1)
    for gpa, length in ((-1, 1), (0, -1), (16 * PAGE_SIZE - 1, 2), (16 * PAGE_SIZE, 1)):
        with pytest.raises(PageRangeError):
            bitmap.mark(gpa, length)
    assert bitmap.mark(16 * PAGE_SIZE - 1, 1) == 1  # the last byte of the last page is inside
    assert bitmap.mark(1 << 70, 0) == 0  # length 0 touches no page, wherever it is
    with pytest.raises(PageRangeError):
        bitmap.mark_pages([1, -1])
    with pytest.raises(PageRangeError):
        bitmap.test(-1)
    assert list(bitmap.pages()) == [0, 15]
    with pytest.raises(ValueError, match="npages"):
        DirtyBitmap(-1)
    with pytest.raises(ValueError, match="npages"):
        DirtyBitmap(MAX_PAGES + 1)
    with pytest.raises(TypeError):
        DirtyBitmap(4.0)  # type: ignore[arg-type]
    assert isinstance(PageRangeError("x"), ValueError)


def test_the_bytes_are_read_only_and_clear_needs_a_writable_log() -> None:
    bitmap = DirtyBitmap(64)
    view = bitmap.view()
    assert view.readonly and view.nbytes == bitmap.nbytes == 8
    with pytest.raises(TypeError):
        view[0] = 1
    log = bytes([0x81]) + bytes(7)
    with pytest.raises(BufferError, match="clear=False"):
        bitmap.merge_from_log(log)
    assert bitmap.count() == 0
    assert bitmap.merge_from_log(log, clear=False) == 2 and list(bitmap.pages()) == [0, 7]
    assert bitmap.merge(bitmap) == 0  # merging into itself is a no-op


def test_a_one_tib_guest_bitmap_is_cheap_to_make_and_exact_at_its_ends() -> None:
    npages = (1 << 40) // PAGE_SIZE
    bitmap = DirtyBitmap(npages)
    assert bitmap.nbytes == 32 << 20
    bitmap.mark((1 << 40) - 1, 1)
    bitmap.mark(0, 1)
    bitmap.mark(5 << 30, 3 * PAGE_SIZE)
    assert bitmap.count() == 5
    assert list(bitmap.take()) == [0, *range(5 << 18, (5 << 18) + 3), npages - 1]
    assert bitmap.count() == 0 and not bitmap.test(npages - 1)


def test_no_bit_is_lost_while_the_device_logs_concurrently() -> None:
    """The reference device's log writer (atomic fetch-or) marks every page once, in random order, in another
    thread; merge_from_log takes the log in a loop meanwhile. Every page must be taken exactly once."""
    npages = 1 << 15
    registry = MemoryRegistry()
    memory = GuestMemory(npages // 8, gpa=1 << 40, register=False)
    registry.add(memory)
    writer = DirtyLog(registry, memory.uaddr, memory.size)
    order = list(range(npages))
    random.Random(5).shuffle(order)
    done = threading.Event()

    def device() -> None:
        for page in order:
            writer.mark_range(page * PAGE_SIZE, 1)
        done.set()

    bitmap = DirtyBitmap(npages)
    log = memoryview((ctypes.c_char * memory.size).from_address(memory.uaddr)).cast("B")
    thread = threading.Thread(target=device)
    taken = 0
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL back and forth often, so the two really interleave
    try:
        thread.start()
        while not done.is_set():
            taken += bitmap.merge_from_log(log)
        thread.join()
    finally:
        sys.setswitchinterval(interval)
    taken += bitmap.merge_from_log(log)
    assert taken == npages == bitmap.count()
    assert memory.read(0, memory.size) == bytes(memory.size)
    log.release()
    memory.close()
