"""The compiled ``vdpacert.impl.ring_math`` agrees with the model's index arithmetic.

A differential test: the Cython module is written from the spec independently of
``vdpacert.model.ring_index``, so agreement over random inputs checks both.
"""

from __future__ import annotations

import importlib.machinery

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vdpacert.impl import ring_math
from vdpacert.model import dirty_log, ring_index

u16 = st.integers(0, 0xFFFF)
u64 = st.integers(0, 2**64 - 1)


def test_the_module_is_compiled_not_python() -> None:
    assert ring_math.__file__ is not None
    assert ring_math.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


@given(u16, u16, u16)
def test_need_event_matches_model(event: int, new: int, old: int) -> None:
    assert ring_math.need_event(event, new, old) == ring_index.vring_need_event(event, new, old)


@given(u16, u16)
def test_inflight_matches_model(avail: int, last_avail: int) -> None:
    assert ring_math.inflight(avail, last_avail) == ring_index.split_inflight(avail, last_avail)


@pytest.mark.parametrize(("addr", "length", "span"), [
    (0, 0, None),
    (0, 1, (0, 0)),
    (4095, 1, (0, 0)),
    (4095, 2, (0, 1)),
    (4096, 4096, (1, 1)),
    (4096, 4097, (1, 2)),
    (2**64 - 4096, 4096, (2**52 - 1, 2**52 - 1)),  # ends exactly at 2^64
])
def test_page_span_examples(addr: int, length: int, span: tuple[int, int] | None) -> None:
    assert ring_math.page_span(addr, length) == span


@given(u64, st.integers(0, 1 << 20))
def test_page_span_covers_first_and_last_byte(addr: int, length: int) -> None:
    if addr + length > 2**64:
        with pytest.raises(OverflowError):
            ring_math.page_span(addr, length)
        return
    span = ring_math.page_span(addr, length)
    if length == 0:
        assert span is None
        return
    assert span == (addr // 4096, (addr + length - 1) // 4096)


@given(st.one_of(u64, st.integers(2**64 - 2**20, 2**64 - 1)), st.integers(0, 1 << 24))
def test_page_span_matches_the_model_dirty_log(addr: int, length: int) -> None:
    try:
        model_pages = dirty_log.pages_touched(addr, length)
    except dirty_log.WriteBeyondAddressSpace:
        with pytest.raises(OverflowError):
            ring_math.page_span(addr, length)
        return
    span = ring_math.page_span(addr, length)
    assert (None if not model_pages else (model_pages.start, model_pages.stop - 1)) == span


def test_mark_dirty_refuses_a_write_past_2_64() -> None:
    log = bytearray(8)
    with pytest.raises(OverflowError):
        ring_math.mark_dirty(log, 2**64 - 1, 2)
    assert log == bytearray(8)


def test_mark_dirty_sets_exactly_the_touched_pages() -> None:
    log = bytearray(4)
    assert ring_math.mark_dirty(log, 4095, 4098) == 3  # pages 0, 1, 2
    assert log == bytearray([0b111, 0, 0, 0])
    assert ring_math.mark_dirty(log, 31 * 4096, 1) == 1
    assert log == bytearray([0b111, 0, 0, 0b1000_0000])


def test_mark_dirty_refuses_a_page_past_the_log_and_changes_nothing() -> None:
    log = bytearray(1)
    with pytest.raises(IndexError):
        ring_math.mark_dirty(log, 7 * 4096, 4097)  # pages 7 and 8; the log holds 0-7
    assert log == bytearray(1)
