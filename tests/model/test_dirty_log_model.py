"""The vhost dirty log model: pages a write touches, the log bits to set, the log's size."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdpacert.model import dirty_log
from vdpacert.model.dirty_log import (
    ADDRESS_SPACE,
    VHOST_PAGE_SIZE,
    DirtyLogError,
    WriteBeyondAddressSpace,
    log_bit,
    log_bits,
    log_size_for,
    page_span,
    pages_touched,
)
from vdpacert.model.spec import LinuxSource, SpecError

PAGE = 4096
LAST_PAGE = 2**52 - 1


def test_the_page_is_vhosts_4k_page_and_logging_is_bit_26() -> None:
    assert VHOST_PAGE_SIZE == PAGE
    assert dirty_log.LOG_ALL_FEATURE == 26
    assert isinstance(dirty_log.LOG_WRITE, LinuxSource)
    assert dirty_log.LOG_WRITE.path == "drivers/vhost/vhost.c"


@pytest.mark.parametrize(("addr", "length", "pages"), [
    (0, 0, range(0)),
    (5 * PAGE + 7, 0, range(0)),
    (0, 1, range(0, 1)),
    (PAGE - 1, 1, range(0, 1)),
    (PAGE - 1, 2, range(0, 2)),
    (PAGE, PAGE, range(1, 2)),
    (PAGE, PAGE + 1, range(1, 3)),
    (3 * PAGE + 100, 10 * PAGE, range(3, 14)),
    (ADDRESS_SPACE - 1, 1, range(LAST_PAGE, LAST_PAGE + 1)),
    (ADDRESS_SPACE - PAGE, PAGE, range(LAST_PAGE, LAST_PAGE + 1)),
    (ADDRESS_SPACE - PAGE - 1, 2, range(LAST_PAGE - 1, LAST_PAGE + 1)),
    (0, ADDRESS_SPACE, range(0, LAST_PAGE + 1)),
    (ADDRESS_SPACE - 1, 0, range(0)),
])
def test_pages_touched_known_cases(addr: int, length: int, pages: range) -> None:
    assert pages_touched(addr, length) == pages  # ranges compare as sequences


@pytest.mark.parametrize(("addr", "length"), [
    (ADDRESS_SPACE - 1, 2), (ADDRESS_SPACE - PAGE, PAGE + 1), (1, ADDRESS_SPACE), (0, ADDRESS_SPACE + 1),
])
def test_a_write_past_2_64_is_a_typed_error(addr: int, length: int) -> None:
    with pytest.raises(WriteBeyondAddressSpace) as caught:
        pages_touched(addr, length)
    assert isinstance(caught.value, SpecError) and isinstance(caught.value, ValueError)
    assert "log_write" in str(caught.value)


@pytest.mark.parametrize(("addr", "length"), [
    (-1, 1), (0, -1), (ADDRESS_SPACE, 0), (True, 1), (0, False), (1.0, 1), ("0", 1), (0, None),
])
def test_bad_arguments_are_typed_errors(addr: object, length: object) -> None:
    with pytest.raises(DirtyLogError):
        pages_touched(addr, length)  # type: ignore[arg-type]


@settings(max_examples=200)
@given(st.integers(0, 2**64 - 1), st.integers(0, 3 * PAGE))
def test_pages_are_exactly_those_holding_a_byte_of_the_write(addr: int, length: int) -> None:
    if addr + length > ADDRESS_SPACE:
        with pytest.raises(WriteBeyondAddressSpace):
            pages_touched(addr, length)
        return
    assert list(pages_touched(addr, length)) == sorted({b // PAGE for b in range(addr, addr + length)})


@settings(max_examples=200)
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64))
def test_large_writes_span_from_the_first_to_the_last_byte(addr: int, length: int) -> None:
    if addr + length > ADDRESS_SPACE:
        with pytest.raises(WriteBeyondAddressSpace):
            page_span(addr, length)
        return
    first, end = page_span(addr, length)
    assert pages_touched(addr, length) == range(first, end)
    if length:
        assert (first, end - 1) == (addr // PAGE, (addr + length - 1) // PAGE)
    else:
        assert first == end


@pytest.mark.parametrize(("page", "where"), [
    (0, (0, 0)), (7, (0, 7)), (8, (1, 0)), (9, (1, 1)), (LAST_PAGE, (2**49 - 1, 7)),
])
def test_log_bit_is_byte_page_over_8_bit_page_mod_8(page: int, where: tuple[int, int]) -> None:
    assert log_bit(page) == where


@pytest.mark.parametrize("page", [-1, LAST_PAGE + 1, True])
def test_log_bit_rejects_pages_outside_64_bit_memory(page: int) -> None:
    with pytest.raises(DirtyLogError):
        log_bit(page)


def test_log_bits_of_writes() -> None:
    assert log_bits(0, 0) == []
    assert log_bits(0, 1) == [(0, 0)]
    assert log_bits(7 * PAGE + PAGE - 1, 2) == [(0, 7), (1, 0)]
    assert log_bits(ADDRESS_SPACE - 1, 1) == [(2**49 - 1, 7)]


@given(st.integers(0, 2**64 - 1), st.integers(0, 20 * PAGE))
def test_log_bits_name_each_touched_page_once(addr: int, length: int) -> None:
    length = min(length, ADDRESS_SPACE - addr)
    bits = log_bits(addr, length)
    assert [byte * 8 + bit for byte, bit in bits] == list(pages_touched(addr, length))
    assert all(0 <= bit < 8 for _, bit in bits)


@pytest.mark.parametrize(("memory", "size"), [
    (0, 0), (1, 1), (PAGE, 1), (8 * PAGE, 1), (8 * PAGE + 1, 2), (2**30, 2**30 // PAGE // 8),
    (ADDRESS_SPACE, 2**49),
])
def test_log_size_for_memory(memory: int, size: int) -> None:
    assert log_size_for(memory) == size


@given(st.integers(1, 2**64))
def test_the_log_holds_the_bit_of_the_last_byte(memory: int) -> None:
    size = log_size_for(memory)
    byte, _ = log_bit((memory - 1) // PAGE)
    assert byte == size - 1


@pytest.mark.parametrize("memory", [-1, ADDRESS_SPACE + 1, None])
def test_log_size_rejects_bad_sizes(memory: object) -> None:
    with pytest.raises(DirtyLogError):
        log_size_for(memory)  # type: ignore[arg-type]
