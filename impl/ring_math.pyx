# cython: language_level=3
"""Ring index arithmetic and dirty-log page spans, shared by the datapath modules.

The C-level functions live in ``ring_math.pxd`` so the datapath can inline them without
touching Python objects; the ``def`` wrappers below expose the same arithmetic to Python
(tests, the migration code, benchmarks).
"""

from libc.stdint cimport uint16_t, uint64_t

PAGE_SHIFT = LOG_PAGE_SHIFT


cdef int log_page_span(uint64_t addr, uint64_t length, uint64_t *first, uint64_t *last) noexcept nogil:
    # Pages [first, last] that a write of `length` bytes at `addr` touches. A zero-length write
    # touches nothing; a write that would run past 2^64 does not exist and is refused, never
    # wrapped to page 0 (a wrapped range would mark the wrong pages dirty).
    if length == 0:
        return 0
    if length - 1 > <uint64_t>0xFFFFFFFFFFFFFFFF - addr:
        return -1
    first[0] = addr >> LOG_PAGE_SHIFT
    last[0] = (addr + (length - 1)) >> LOG_PAGE_SHIFT
    return 1


cdef int _span_or_raise(uint64_t addr, uint64_t length, uint64_t *first, uint64_t *last) except -1:
    cdef int found = log_page_span(addr, length, first, last)
    if found < 0:
        raise OverflowError(f"a write of {length} bytes at {addr:#x} runs past the 64-bit address space")
    return found


def need_event(int event_idx, int new_idx, int old_idx) -> bool:
    """``vring_need_event`` on 16-bit indices: must a publish from old_idx to new_idx notify?"""
    return vring_need_event(<uint16_t>event_idx, <uint16_t>new_idx, <uint16_t>old_idx)


def inflight(int avail_idx, int last_avail_idx) -> int:
    """How many chains the driver has published that the device has not yet taken."""
    return ring_inflight(<uint16_t>avail_idx, <uint16_t>last_avail_idx)


def page_span(unsigned long long addr, unsigned long long length):
    """The (first, last) 4 KiB pages a write touches, inclusive; None for a zero-length write.

    OverflowError for a write that would run past 2^64.
    """
    cdef uint64_t first = 0, last = 0
    if not _span_or_raise(addr, length, &first, &last):
        return None
    return (first, last)


def mark_dirty(unsigned char[::1] log not None, unsigned long long addr, unsigned long long length):
    """Set the dirty bit of every page the write touches, in a vhost-layout bitmap.

    Bit ``page % 8`` of byte ``page // 8``. Raises IndexError, changing nothing, when the
    bitmap is too small to hold the last page, and OverflowError for a write past 2^64.
    """
    cdef uint64_t first = 0, last = 0, page
    if not _span_or_raise(addr, length, &first, &last):
        return 0
    if (last >> 3) >= <uint64_t>log.shape[0]:
        raise IndexError(f"dirty log of {log.shape[0]} bytes cannot hold page {last}")
    with nogil:
        page = first
        while True:
            log[page >> 3] |= <unsigned char>(1 << (page & 7))
            if page == last:
                break
            page += 1
    return last - first + 1
