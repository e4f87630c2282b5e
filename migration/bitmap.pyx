# cython: language_level=3
"""The migration's dirty bitmap: one bit per 4 KiB guest-physical page, scanned a 64-bit word at a time.

Pre-copy asks "which pages changed since the last round" once per iteration, over all of guest
memory: 32 MiB of bitmap for a 1 TiB guest. At the usual dirty rates most words are zero, so
every loop here reads whole 64-bit words, skips the zero ones, and walks the set bits of the
others with count-trailing-zeros; nothing is done per *page* unless the page is set. The loops
run without the GIL, so a device thread (or a second migration stream) keeps running meanwhile.

Layout: the bytes are vhost's own log layout (brief §5): page ``p`` is bit ``p % 8`` of byte
``p // 8``. The words are those bytes read little-endian, so word ``w`` holds pages
``64w .. 64w + 63`` in bits 0..63 on every host (a big-endian host byte-swaps at each access).
That is what lets :meth:`DirtyBitmap.merge_from_log` OR a device's log in word by word and
:meth:`DirtyBitmap.view` hand the same bytes to a plot or a comparison.

Taking a device's log (:meth:`DirtyBitmap.merge_from_log`): the device keeps setting bits with
an atomic fetch-or while the migration thread reads them, so each nonzero log word is taken
with an atomic exchange against 0. A read followed by a plain store of 0 would erase a bit the
device set in between, and that page would then be migrated stale. The exchange has acquire
order, pairing with the release fence the device issues before marking: once a bit is taken,
the page's new bytes are visible to the copy that follows.

Invariants: bits at or past ``npages`` are always 0, and ``_count`` is the number of set bits
(kept by every mutator from the bits each one newly sets), so :meth:`count` costs nothing and
:meth:`pages` / :meth:`take` fill an exactly sized array in one pass. Not thread-safe: one
owner (the migration thread) calls the methods; the *log* it merges from may be shared.
"""

from array import array

from cpython.array cimport array as carray
from cpython.array cimport clone
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint8_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset


cdef extern from *:
    """
    #include <stdint.h>
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    #define VDPACERT_LE64(x) __builtin_bswap64(x)
    #else
    #define VDPACERT_LE64(x) (x)
    #endif
    /* word <-> host value: bit k of the result is page 64w + k on every host */
    static inline uint64_t vdpacert_le64(uint64_t x) { return VDPACERT_LE64(x); }
    static inline int vdpacert_ctz64(uint64_t x) { return __builtin_ctzll(x); }
    static inline int vdpacert_popcount64(uint64_t x) { return __builtin_popcountll(x); }
    /* The log is written concurrently by the device: every access to it is atomic. */
    static inline uint64_t vdpacert_peek64(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline uint64_t vdpacert_take64(uint64_t *p) { return __atomic_exchange_n(p, 0, __ATOMIC_ACQUIRE); }
    static inline uint8_t vdpacert_peek8(uint8_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline uint8_t vdpacert_take8(uint8_t *p, uint8_t mask) {
        return __atomic_fetch_and(p, (uint8_t)~mask, __ATOMIC_ACQUIRE) & mask;
    }
    static inline void vdpacert_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
    """
    uint64_t le64 "vdpacert_le64"(uint64_t x) noexcept nogil
    int ctz64 "vdpacert_ctz64"(uint64_t x) noexcept nogil
    int popcount64 "vdpacert_popcount64"(uint64_t x) noexcept nogil
    uint64_t peek64 "vdpacert_peek64"(uint64_t *p) noexcept nogil
    uint64_t take64 "vdpacert_take64"(uint64_t *p) noexcept nogil
    uint8_t peek8 "vdpacert_peek8"(uint8_t *p) noexcept nogil
    uint8_t take8 "vdpacert_take8"(uint8_t *p, uint8_t mask) noexcept nogil
    void acquire_fence "vdpacert_acquire"() noexcept nogil


PAGE_SHIFT = 12
PAGE_SIZE = 4096
#: Pages a 64-bit guest-physical address space holds: the largest bitmap that means anything.
MAX_PAGES = 1 << 52

cdef uint64_t _ALL = 0xFFFFFFFFFFFFFFFF
cdef carray _PAGES_TEMPLATE = array("Q")


class PageRangeError(ValueError):
    """A page or guest-physical range outside the bitmap (or negative); nothing was marked."""


cdef inline uint64_t _low_bits(uint64_t n) noexcept nogil:
    """Mask of bits [0, n) for n in 0..64."""
    return _ALL if n >= 64 else ((<uint64_t>1 << n) - 1)


cdef class DirtyBitmap:
    """Pages ``[0, npages)`` of guest-physical memory, one bit each (see the module docstring)."""

    cdef uint64_t *words
    cdef uint64_t nwords
    cdef uint64_t _npages
    cdef uint64_t _count
    cdef Py_ssize_t _shape[1]
    cdef Py_ssize_t _strides[1]

    def __cinit__(self, npages):
        if not isinstance(npages, int) or isinstance(npages, bool):
            raise TypeError(f"npages must be an int, not {type(npages).__name__}")
        if not 0 <= npages <= MAX_PAGES:
            raise ValueError(f"npages must be in [0, 2^52] (4 KiB pages of a 64-bit address space), got {npages}")
        self._npages = npages
        self.nwords = (self._npages + 63) >> 6
        # calloc: a bitmap for a 1 TiB guest is 32 MiB the kernel hands out as zero pages on demand.
        self.words = <uint64_t *>calloc(self.nwords if self.nwords else 1, 8)
        if self.words == NULL:
            raise MemoryError(f"no memory for a bitmap of {npages} pages")
        self._count = 0
        self._shape[0] = <Py_ssize_t>((self._npages + 7) >> 3)
        self._strides[0] = 1

    def __dealloc__(self):
        free(self.words)

    @property
    def npages(self) -> int:
        return self._npages

    @property
    def nbytes(self) -> int:
        """Bytes of the vhost-layout bitmap: what a log for these pages needs (``view()``'s length)."""
        return <uint64_t>self._shape[0]

    # ----- marking ---------------------------------------------------------------------------------

    cdef uint64_t _set_range(self, uint64_t first, uint64_t last) noexcept nogil:
        """Set pages [first, last] (inclusive, both < npages); how many were newly set."""
        cdef uint64_t w = first >> 6, w_last = last >> 6, mask, old, added = 0
        while w <= w_last:
            mask = _ALL
            if w == first >> 6:
                mask &= ~_low_bits(first & 63)
            if w == w_last:
                mask &= _low_bits((last & 63) + 1)
            old = le64(self.words[w])
            added += popcount64(mask & ~old)
            self.words[w] = le64(old | mask)
            w += 1
        self._count += added
        return added

    def mark(self, gpa, length) -> int:
        """Mark every page a write of ``length`` bytes at guest-physical ``gpa`` touches; pages newly set.

        Length 0 touches no page (the vhost log's rule, model/dirty_log.py). A range reaching
        past the last page is a :class:`PageRangeError` and marks nothing.
        """
        if gpa < 0 or length < 0:
            raise PageRangeError(f"a write is never at a negative address or length (gpa={gpa}, length={length})")
        if length == 0:
            return 0
        first, last = gpa >> PAGE_SHIFT, (gpa + length - 1) >> PAGE_SHIFT
        if last >= self._npages:
            raise PageRangeError(f"{length} bytes at gpa {gpa:#x} reach page {last:#x}, past the bitmap's "
                                 f"{self._npages:#x} pages")
        cdef uint64_t f = first, l = last, added
        with nogil:
            added = self._set_range(f, l)
        return added

    def mark_pages(self, pages) -> int:
        """Mark each page number of the iterable; pages newly set. One bad page: PageRangeError, none marked."""
        cdef carray wanted
        try:
            wanted = array("Q", pages)
        except OverflowError:
            raise PageRangeError("a page number is negative or past 2^64") from None
        cdef unsigned long long[::1] view = wanted
        cdef Py_ssize_t i, n = view.shape[0], bad = -1
        cdef uint64_t page, old, bit, added = 0
        with nogil:
            for i in range(n):
                if view[i] >= self._npages:
                    bad = i
                    break
            if bad < 0:
                for i in range(n):
                    page = view[i]
                    bit = <uint64_t>1 << (page & 63)
                    old = le64(self.words[page >> 6])
                    if not old & bit:
                        self.words[page >> 6] = le64(old | bit)
                        added += 1
                self._count += added
        if bad >= 0:
            raise PageRangeError(f"page {view[bad]:#x} is past the bitmap's {self._npages:#x} pages")
        return added

    # ----- reading ---------------------------------------------------------------------------------

    def test(self, page) -> bool:
        """Is ``page`` set? PageRangeError outside ``[0, npages)``."""
        if not 0 <= page < self._npages:
            raise PageRangeError(f"page {page} is outside the bitmap's {self._npages} pages")
        cdef uint64_t p = page
        return bool(le64(self.words[p >> 6]) >> (p & 63) & 1)

    def count(self) -> int:
        """How many pages are set (kept as the bitmap changes: no scan)."""
        return self._count

    def __len__(self) -> int:
        return self._npages

    cdef carray _collect(self, bint clear):
        """The set pages, ascending, in an ``array('Q')`` of exactly ``_count`` entries; zero words if ``clear``."""
        cdef carray out = clone(_PAGES_TEMPLATE, <Py_ssize_t>self._count, False)
        cdef uint64_t *dst = <uint64_t *>out.data.as_voidptr
        cdef uint64_t n = self._count, k = 0, i, w, base
        if n == 0:  # nothing set (the count is exact): no scan
            return out
        with nogil:
            for i in range(self.nwords):
                w = self.words[i]
                if w == 0:
                    continue
                if clear:
                    self.words[i] = 0
                w = le64(w)
                base = i << 6
                while w and k < n:  # k < n: the count is an invariant, but never write past the array
                    dst[k] = base | <uint64_t>ctz64(w)
                    k += 1
                    w &= w - 1
            if clear:
                self._count = 0
        if k != n:
            raise AssertionError(f"dirty bitmap count {n} disagrees with its bits ({k} found)")
        return out

    def pages(self) -> array:
        """The set pages, ascending, as an ``array('Q')``.

        An array rather than a list: at 1 % of a 1 TiB guest that is 2.7 million pages, and making
        a Python int per page would cost more than the scan itself. The array is filled from C, iterates
        as ints, and its buffer is what a copy loop or ``memoryview(...).cast`` wants anyway.
        """
        return self._collect(False)

    def take(self) -> array:
        """:meth:`pages`, clearing each word as it is read: the round's dirty set, in one pass."""
        return self._collect(True)

    # ----- whole-bitmap operations -----------------------------------------------------------------

    def clear(self) -> None:
        """Every bit back to 0."""
        with nogil:
            if self._count:
                memset(self.words, 0, self.nwords * 8)
                self._count = 0

    def merge(self, DirtyBitmap other not None) -> int:
        """OR ``other`` in (it may cover fewer pages, not more); pages newly set."""
        if other._npages > self._npages:
            raise PageRangeError(f"cannot merge a bitmap of {other._npages} pages into one of {self._npages}")
        cdef uint64_t i, theirs, mine, added = 0
        if other is self:
            return 0
        with nogil:
            if other._count:
                for i in range(other.nwords):
                    theirs = le64(other.words[i])
                    if theirs:
                        mine = le64(self.words[i])
                        added += popcount64(theirs & ~mine)
                        self.words[i] = le64(mine | theirs)
                self._count += added
        return added

    def merge_from_log(self, log, *, bint clear=True) -> int:
        """OR a vhost log bitmap into this one; pages newly set (see the module docstring).

        ``log`` is any C-contiguous buffer in vhost's layout, usually the memory the device logs
        into. Pages ``[0, min(npages, 8 * len(log)))`` are taken: with ``clear`` (the default) each
        taken bit is cleared in the log atomically, so a bit the device sets meanwhile is either
        taken now or left for the next call, never lost. Bits for pages past ``npages`` are left
        in the log untouched. ``clear=False`` only reads, and accepts read-only buffers.
        """
        cdef Py_buffer buf
        try:
            PyObject_GetBuffer(log, &buf, PyBUF_WRITABLE if clear else PyBUF_SIMPLE)
        except BufferError as error:
            if clear:
                raise BufferError(f"merge_from_log(clear=True) needs a writable, contiguous buffer ({error}); "
                                  f"pass clear=False to read a log without taking its bits") from None
            raise
        cdef uint64_t added = 0
        try:
            with nogil:
                added = self._merge_log(<uint8_t *>buf.buf, <uint64_t>buf.len, clear)
        finally:
            PyBuffer_Release(&buf)
        return added

    cdef uint64_t _merge_log(self, uint8_t *log, uint64_t nbytes, bint clear) noexcept nogil:
        cdef uint64_t limit = self._npages if self._npages < nbytes * 8 else nbytes * 8  # pages taken
        cdef uint64_t full_words = 0, i, j, theirs, mine, added = 0, tail_end
        cdef uint64_t *log_words
        cdef uint8_t *my_bytes = <uint8_t *>self.words
        cdef uint8_t got, mask
        if (<uintptr_t>log & 7) == 0:  # atomics on a word that straddles two cache lines are not atomic
            full_words = limit >> 6
            log_words = <uint64_t *>log
            for i in range(full_words):
                if peek64(&log_words[i]) == 0:  # the common case: no atomic op, no write
                    continue
                theirs = le64(take64(&log_words[i]) if clear else peek64(&log_words[i]))
                mine = le64(self.words[i])
                added += popcount64(theirs & ~mine)
                self.words[i] = le64(mine | theirs)
        # The rest byte by byte: an unaligned log, the log's last few bytes, the last page's partial byte.
        tail_end = (limit + 7) >> 3
        for j in range(full_words * 8, tail_end):
            mask = 0xFF if (j + 1) * 8 <= limit else <uint8_t>((1 << (limit - j * 8)) - 1)
            if peek8(&log[j]) & mask == 0:
                continue
            got = take8(&log[j], mask) if clear else peek8(&log[j]) & mask
            added += popcount64(got & ~my_bytes[j])
            my_bytes[j] |= got
        if not clear:
            acquire_fence()  # reading only: still order the copy after the bits were seen
        self._count += added
        return added

    # ----- the bytes -------------------------------------------------------------------------------

    def view(self) -> memoryview:
        """A read-only memoryview of the bitmap's bytes (vhost layout, ``nbytes`` long, no copy)."""
        return memoryview(self)

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("a DirtyBitmap's bytes are read-only: mark(), merge() and clear() keep its count")
        buffer.buf = <void *>self.words
        buffer.obj = self
        buffer.len = self._shape[0]
        buffer.readonly = 1
        buffer.itemsize = 1
        buffer.format = "B"
        buffer.ndim = 1
        buffer.shape = self._shape
        buffer.strides = self._strides
        buffer.suboffsets = NULL
        buffer.internal = NULL

    def __releasebuffer__(self, Py_buffer *buffer):
        pass

    def __repr__(self) -> str:
        return f"DirtyBitmap(npages={self._npages}, set={self._count})"
