# cython: language_level=3
"""The physical limit for the datapath benchmark: ``memcpy`` of the same bytes in a C loop.

Timed in C around the whole loop, so no per-copy Python overhead hides the hardware figure.
"""

from libc.stdint cimport uint64_t, uintptr_t
from libc.string cimport memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec


cdef double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


def copy_pairs(list pairs, uint64_t size, uint64_t rounds) -> float:
    """Copy ``size`` bytes from each ``(src_uaddr, dst_uaddr)`` pair, ``rounds`` times; seconds taken.

    The addresses must be valid process memory of at least ``size`` bytes (the benchmark's own
    guest memory); nothing here checks them.
    """
    cdef Py_ssize_t n = len(pairs), i
    cdef uint64_t r
    cdef double start, end
    src_list = [int(p[0]) for p in pairs]
    dst_list = [int(p[1]) for p in pairs]
    cdef unsigned long long[::1] srcs = memoryview(bytearray(8 * n)).cast("Q")
    cdef unsigned long long[::1] dsts = memoryview(bytearray(8 * n)).cast("Q")
    for i in range(n):
        srcs[i] = src_list[i]
        dsts[i] = dst_list[i]
    with nogil:
        start = _now()
        for r in range(rounds):
            for i in range(n):
                memcpy(<void *><uintptr_t>dsts[i], <const void *><uintptr_t>srcs[i], size)
        end = _now()
    return end - start
