# cython: language_level=3
"""vhost's dirty page log, as the device side keeps it (brief §5).

Userspace hands the device a bitmap by *user address* (``VHOST_SET_LOG_BASE``) and an eventfd
(``VHOST_SET_LOG_FD``). While ``VHOST_F_LOG_ALL`` is negotiated, every guest-physical page the
device writes gets its bit set: bit ``page % 8`` of byte ``page // 8``, 4 KiB pages. The bits are
set with an atomic fetch-or because the migration thread clears them concurrently and several
queues may log into the same bitmap; a plain read-modify-write could lose a bit, and a lost bit
is a page migrated stale.

The bitmap address is resolved through a :class:`MemoryRegistry` at every mark (the region
could be unmapped between marks), bounded by ``size``: a page outside the log is a typed error
(:class:`DirtyLogError` from Python, ``LOG_ERR_*`` from C), never a stray write into memory
after the bitmap.

Ordering: writers must write guest memory *first*, then mark (``check`` first if they need to
refuse a write that could not be logged). Marking before writing would let the migration
thread copy the page and clear the bit in between, and the write would then be lost.
"""

import errno

from libc.errno cimport EAGAIN
from libc.errno cimport errno as c_errno
from libc.stdint cimport uint8_t, uint64_t
from posix.unistd cimport write

from vdpacert.impl.guestmem cimport MemoryRegistry
from vdpacert.impl.ring_math cimport LOG_PAGE_SHIFT, log_page_span


cdef extern from *:
    """
    static inline void vdpacert_log_or(unsigned char *p, unsigned char mask) {
        __atomic_fetch_or(p, mask, __ATOMIC_RELAXED);
    }
    static inline void vdpacert_log_fence(void) {
        __atomic_thread_fence(__ATOMIC_RELEASE);
    }
    static inline int vdpacert_log_xchg(int *p, int v) {
        return __atomic_exchange_n(p, v, __ATOMIC_ACQ_REL);
    }
    static inline void vdpacert_log_store(int *p, int v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    """
    void vdpacert_log_or(unsigned char *p, unsigned char mask) nogil
    void vdpacert_log_fence() nogil
    int vdpacert_log_xchg(int *p, int v) nogil
    void vdpacert_log_store(int *p, int v) nogil


ERR_RANGE = LOG_ERR_RANGE
ERR_OVERFLOW = LOG_ERR_OVERFLOW
ERR_UNMAPPED = LOG_ERR_UNMAPPED

_REASONS = {
    LOG_ERR_RANGE: "page outside the log",
    LOG_ERR_OVERFLOW: "write runs past 2^64",
    LOG_ERR_UNMAPPED: "log bitmap not in registered memory",
}


class DirtyLogError(Exception):
    """A write that cannot be logged. ``code`` is the ``LOG_ERR_*`` value, ``gpa``/``length`` the write."""

    def __init__(self, code: int, gpa: int, length: int) -> None:
        super().__init__(f"cannot log {length} bytes at gpa {gpa:#x}: {_REASONS.get(code, code)}")
        self.code = code
        self.gpa = gpa
        self.length = length


def log_error_name(code: int) -> str:
    """Human-readable reason of a ``LOG_ERR_*`` code."""
    return _REASONS.get(code, f"log error {code}")


cdef class DirtyLog:
    """A vhost dirty bitmap of ``size`` bytes at user address ``log_base``, resolved through ``registry``."""

    def __cinit__(self, MemoryRegistry registry not None, uint64_t log_base, uint64_t size, int fd=-1):
        if size == 0:
            raise OSError(errno.EINVAL, "a dirty log needs at least one byte")
        if log_base > <uint64_t>0xFFFFFFFFFFFFFFFF - (size - 1):
            raise OSError(errno.EINVAL, f"log of {size} bytes at {log_base:#x} runs past 2^64")
        self.registry = registry
        self.log_base = log_base
        self.size = size
        self.fd = fd
        self.pending = 0

    cdef int _bitmap(self, uint64_t gpa, uint64_t length, uint64_t *first, uint64_t *last,
                     uint8_t **bytes_) noexcept nogil:
        cdef int span = log_page_span(gpa, length, first, last)
        if span < 0:
            return LOG_ERR_OVERFLOW
        if span == 0:
            bytes_[0] = NULL
            return LOG_OK
        if (last[0] >> 3) >= self.size:
            return LOG_ERR_RANGE
        bytes_[0] = self.registry.resolve(self.log_base + (first[0] >> 3),
                                          (last[0] >> 3) - (first[0] >> 3) + 1, NULL)
        if bytes_[0] == NULL:
            return LOG_ERR_UNMAPPED
        return LOG_OK

    cdef int check(self, uint64_t gpa, uint64_t length) noexcept nogil:
        cdef uint64_t first = 0, last = 0
        cdef uint8_t *bits = NULL
        return self._bitmap(gpa, length, &first, &last, &bits)

    cdef int mark(self, uint64_t gpa, uint64_t length) noexcept nogil:
        cdef uint64_t first = 0, last = 0, page, byte0
        cdef uint8_t *bits = NULL
        cdef uint8_t mask = 0
        cdef int rc = self._bitmap(gpa, length, &first, &last, &bits)
        if rc != LOG_OK or bits == NULL:
            return rc
        # The data the bits describe must be visible before the bits are.
        vdpacert_log_fence()
        byte0 = first >> 3
        page = first
        while True:
            mask |= <uint8_t>(1 << (page & 7))
            if page == last or (page & 7) == 7:
                vdpacert_log_or(bits + ((page >> 3) - byte0), mask)
                mask = 0
            if page == last:
                break
            page += 1
        vdpacert_log_store(&self.pending, 1)
        return LOG_OK

    cdef int flush(self) noexcept nogil:
        cdef uint64_t one = 1
        cdef ssize_t n
        if not vdpacert_log_xchg(&self.pending, 0) or self.fd < 0:
            return 0
        n = write(self.fd, &one, 8)
        if n != 8:
            # EAGAIN means the counter is saturated: the reader will still wake up.
            return 0 if c_errno == EAGAIN else -c_errno
        return 1

    # ---- Python API (front ends and tests) ----

    def set_fd(self, int fd) -> None:
        """VHOST_SET_LOG_FD: the eventfd signalled after a batch of logged writes (-1: none)."""
        self.fd = fd

    def mark_range(self, uint64_t gpa, uint64_t length) -> int:
        """Log a write of ``length`` bytes at ``gpa``; pages marked. DirtyLogError, nothing set, on error."""
        cdef uint64_t first = 0, last = 0
        cdef int rc = self.mark(gpa, length)
        if rc != LOG_OK:
            raise DirtyLogError(rc, gpa, length)
        if log_page_span(gpa, length, &first, &last) <= 0:
            return 0
        return last - first + 1

    def signal(self) -> bool:
        """flush(): signal the eventfd if anything was marked since the last call."""
        cdef int rc = self.flush()
        if rc < 0:
            raise OSError(-rc, "writing the dirty-log eventfd failed")
        return rc == 1

    def dirty_pages(self) -> list:
        """Every page whose bit is set, ascending (reads the bitmap through the registry)."""
        cdef uint8_t *bits = self.registry.resolve(self.log_base, self.size, NULL)
        cdef uint64_t i
        cdef int b
        if bits == NULL:
            raise DirtyLogError(LOG_ERR_UNMAPPED, self.log_base, self.size)
        pages = []
        for i in range(self.size):
            if bits[i]:
                for b in range(8):
                    if bits[i] & (1 << b):
                        pages.append(i * 8 + b)
        return pages

    @property
    def page_size(self) -> int:
        return 1 << LOG_PAGE_SHIFT

    def __repr__(self) -> str:
        return f"DirtyLog(log_base={self.log_base:#x}, size={self.size:#x}, fd={self.fd})"
