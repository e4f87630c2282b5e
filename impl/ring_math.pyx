# cython: language_level=3
"""Ring index arithmetic and dirty-log page spans, shared by the datapath modules.

The C-level functions live in ``ring_math.pxd`` so the datapath can inline them without
touching Python objects; the ``def`` wrappers below expose the same arithmetic to Python
(tests, the migration code, benchmarks).
"""

from libc.stdint cimport uint16_t, uint64_t

PAGE_SHIFT = LOG_PAGE_SHIFT


cdef bint log_page_span(uint64_t addr, uint64_t length, uint64_t *first, uint64_t *last) noexcept nogil:
    # Pages [first, last] that a write of `length` bytes at `addr` touches. Returns False for a
    # zero-length write (it touches nothing). A write that would run past 2^64 is clipped at
    # the top of the address space: the bytes that wrap do not exist.
    cdef uint64_t end_inclusive
    if length == 0:
        return False
    if length - 1 > <uint64_t>0xFFFFFFFFFFFFFFFF - addr:
        end_inclusive = <uint64_t>0xFFFFFFFFFFFFFFFF
    else:
        end_inclusive = addr + (length - 1)
    first[0] = addr >> LOG_PAGE_SHIFT
    last[0] = end_inclusive >> LOG_PAGE_SHIFT
    return True


def need_event(int event_idx, int new_idx, int old_idx) -> bool:
    """``vring_need_event`` on 16-bit indices: must a publish from old_idx to new_idx notify?"""
    return vring_need_event(<uint16_t>event_idx, <uint16_t>new_idx, <uint16_t>old_idx)


def inflight(int avail_idx, int last_avail_idx) -> int:
    """How many chains the driver has published that the device has not yet taken."""
    return ring_inflight(<uint16_t>avail_idx, <uint16_t>last_avail_idx)


def page_span(unsigned long long addr, unsigned long long length):
    """The (first, last) 4 KiB pages a write touches, inclusive; None for a zero-length write."""
    cdef uint64_t first = 0, last = 0
    if not log_page_span(addr, length, &first, &last):
        return None
    return (first, last)


def mark_dirty(unsigned char[::1] log not None, unsigned long long addr, unsigned long long length):
    """Set the dirty bit of every page the write touches, in a vhost-layout bitmap.

    Bit ``page % 8`` of byte ``page // 8``. Raises IndexError, changing nothing, when the
    bitmap is too small to hold the last page.
    """
    cdef uint64_t first = 0, last = 0, page
    if not log_page_span(addr, length, &first, &last):
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
