# Index arithmetic every datapath module needs, as inline C functions other .pyx files cimport.
from libc.stdint cimport uint16_t, uint64_t

cdef enum:
    LOG_PAGE_SHIFT = 12  # one dirty-log bit covers a 4 KiB page (VHOST_PAGE_SIZE)


cdef inline bint vring_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx) noexcept nogil:
    # True when event_idx lies in [old_idx, new_idx) modulo 2^16: the other side asked to be
    # notified once the index passes event_idx, and this publish did pass it.
    return <uint16_t>(new_idx - event_idx - 1) < <uint16_t>(new_idx - old_idx)


cdef inline uint16_t ring_inflight(uint16_t avail_idx, uint16_t last_avail_idx) noexcept nogil:
    return <uint16_t>(avail_idx - last_avail_idx)


# 1: pages [first, last] set; 0: zero-length write, nothing touched; -1: the write runs past 2^64.
cdef int log_page_span(uint64_t addr, uint64_t length, uint64_t *first, uint64_t *last) noexcept nogil
