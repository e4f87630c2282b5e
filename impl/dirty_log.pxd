# vhost's dirty log (VHOST_SET_LOG_BASE / VHOST_SET_LOG_FD): a bitmap in user memory, one bit per
# 4 KiB guest-physical page, that the device sets for every guest page it writes while
# VHOST_F_LOG_ALL is negotiated. The datapath marks through the C API below, without the GIL.
from libc.stdint cimport uint8_t, uint64_t

from vdpacert.impl.guestmem cimport MemoryRegistry

# Results of check() / mark(); nothing is set when one of the errors is returned.
cdef enum:
    LOG_OK = 0
    LOG_ERR_RANGE = -1      # a page past the end of the log (its byte is at or beyond `size`)
    LOG_ERR_OVERFLOW = -2   # the write runs past 2^64
    LOG_ERR_UNMAPPED = -3   # the bitmap bytes are not inside one registered memory region


cdef class DirtyLog:
    cdef readonly MemoryRegistry registry   # resolves log_base (a user address) at every mark
    cdef readonly uint64_t log_base         # user address of byte 0 of the bitmap
    cdef readonly uint64_t size             # bitmap bytes: pages [0, 8 * size) can be logged
    cdef readonly int fd                    # log eventfd (VHOST_SET_LOG_FD), -1 for none
    cdef int pending                        # marks since the last flush (atomic flag)

    # 0 when every page of [gpa, gpa + length) can be logged, else a LOG_ERR_* code. Pure check,
    # sets nothing: callers check before writing guest memory, write, then mark.
    cdef int _bitmap(self, uint64_t gpa, uint64_t length, uint64_t *first, uint64_t *last,
                     uint8_t **bytes_) noexcept nogil
    cdef int check(self, uint64_t gpa, uint64_t length) noexcept nogil
    # Set (atomic fetch-or) the bit of every page the write touched. All or nothing.
    cdef int mark(self, uint64_t gpa, uint64_t length) noexcept nogil
    # Signal the log eventfd (8-byte write of 1) if anything was marked since the last flush.
    # 1 signalled, 0 nothing to signal or no fd, -errno when the write failed.
    cdef int flush(self) noexcept nogil
