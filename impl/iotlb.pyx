# cython: language_level=3
"""One IOVA address space, kept the way Linux's vhost-vdpa keeps it.

Entries map ``[start, last]`` (inclusive, so a map may end at 2^64 - 1) to a user address with
RO, WO or RW permission. The rules, from ``drivers/vhost/vdpa.c`` and ``drivers/vhost/iotlb.c``:

- an update that overlaps any existing entry is refused with EEXIST: vhost-vdpa never merges
  or replaces mappings (``vhost_vdpa_process_iotlb_update``), userspace invalidates first;
- an invalidation removes every entry that intersects the range, whole: a partly covered
  entry is dropped, never split (``vhost_iotlb_del_range``);
- an address space may be capped at a number of entries; an update past the cap is ENOSPC.

Entries live in one array sorted by ``start``, so a translation is a binary search with no
Python objects involved; the datapath calls the C-level ``Iotlb.lookup`` without the GIL.
"""

import errno

from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memmove

cdef uint64_t _U64_MAX = 0xFFFFFFFFFFFFFFFF

ACCESS_RO = IOTLB_ACCESS_RO
ACCESS_WO = IOTLB_ACCESS_WO
ACCESS_RW = IOTLB_ACCESS_RW


class IotlbFault(Exception):
    """A translation that hit a hole (``reason == "miss"``) or lacked permission (``"denied"``).

    ``iova`` is the first address that failed and ``perm`` the access asked for: what a
    vhost ACCESS_FAIL / MISS message reports.
    """

    def __init__(self, iova: int, perm: int, reason: str) -> None:
        super().__init__(f"IOTLB {reason} at iova {iova:#x} for access {perm}")
        self.iova = iova
        self.perm = perm
        self.reason = reason


cdef class Iotlb:
    """The IOVA -> user address map of one address space (see the module docstring)."""

    def __cinit__(self, size_t limit=0):
        self.table = NULL
        self.count = 0
        self.capacity = 0
        self.limit = limit

    def __dealloc__(self):
        PyMem_Free(self.table)

    cdef size_t _first_ending_at_or_after(self, uint64_t iova) noexcept nogil:
        # Index of the first entry whose last >= iova (entries are sorted and disjoint, so their
        # `last` values are sorted too).
        cdef size_t lo = 0, hi = self.count, mid
        while lo < hi:
            mid = (lo + hi) // 2
            if self.table[mid].last < iova:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def update(self, uint64_t iova, uint64_t size, uint64_t uaddr, int perm):
        """Map ``size`` bytes at ``iova`` to ``uaddr``. OSError EINVAL / EEXIST / ENOSPC."""
        cdef uint64_t last
        cdef size_t at
        cdef IotlbEntry *grown
        if size == 0:
            raise OSError(errno.EINVAL, "an IOTLB update must map at least one byte")
        if iova > _U64_MAX - (size - 1):
            raise OSError(errno.EINVAL, f"iova {iova:#x} + size {size:#x} runs past 2^64")
        if uaddr > _U64_MAX - (size - 1):
            raise OSError(errno.EINVAL, f"uaddr {uaddr:#x} + size {size:#x} runs past 2^64")
        if perm not in (IOTLB_ACCESS_RO, IOTLB_ACCESS_WO, IOTLB_ACCESS_RW):
            raise OSError(errno.EINVAL, f"IOTLB permission {perm} is not RO, WO or RW")
        last = iova + (size - 1)
        at = self._first_ending_at_or_after(iova)
        if at < self.count and self.table[at].start <= last:
            raise OSError(errno.EEXIST, f"[{iova:#x}, {last:#x}] overlaps the mapping at {self.table[at].start:#x}")
        if self.limit and self.count >= self.limit:
            raise OSError(errno.ENOSPC, f"the address space holds its limit of {self.limit} mappings")
        if self.count == self.capacity:
            grown = <IotlbEntry *>PyMem_Realloc(self.table, (self.capacity * 2 + 8) * sizeof(IotlbEntry))
            if grown == NULL:
                raise MemoryError()
            self.table = grown
            self.capacity = self.capacity * 2 + 8
        memmove(&self.table[at + 1], &self.table[at], (self.count - at) * sizeof(IotlbEntry))
        self.table[at].start = iova
        self.table[at].last = last
        self.table[at].uaddr = uaddr
        self.table[at].perm = <uint8_t>perm
        self.count += 1

    def del_range(self, uint64_t start, uint64_t last) -> int:
        """Remove every entry intersecting ``[start, last]``; how many were removed."""
        cdef size_t first, end
        if last < start:
            return 0
        first = self._first_ending_at_or_after(start)
        end = first
        while end < self.count and self.table[end].start <= last:
            end += 1
        if end > first:
            memmove(&self.table[first], &self.table[end], (self.count - end) * sizeof(IotlbEntry))
            self.count -= end - first
        return end - first

    def invalidate(self, uint64_t iova, uint64_t size) -> int:
        """Remove every entry intersecting ``size`` bytes at ``iova``. EINVAL for size 0 or a wrap."""
        if size == 0:
            raise OSError(errno.EINVAL, "an IOTLB invalidation must cover at least one byte")
        if iova > _U64_MAX - (size - 1):
            raise OSError(errno.EINVAL, f"iova {iova:#x} + size {size:#x} runs past 2^64")
        return self.del_range(iova, iova + (size - 1))

    def clear(self):
        self.count = 0

    def copy(self) -> Iotlb:
        cdef Iotlb twin = Iotlb(self.limit)
        cdef size_t i
        for i in range(self.count):
            entry = self.table[i]
            twin.update(entry.start, entry.last - entry.start + 1, entry.uaddr, entry.perm)
        return twin

    def entries(self) -> list:
        """``[(start, last, uaddr, perm), ...]`` in IOVA order."""
        cdef size_t i
        return [(self.table[i].start, self.table[i].last, self.table[i].uaddr, self.table[i].perm)
                for i in range(self.count)]

    def __len__(self):
        return self.count

    def __eq__(self, other):
        return isinstance(other, Iotlb) and self.entries() == other.entries()

    def __repr__(self):
        return f"Iotlb({self.count} entries, limit={self.limit})"

    cdef int lookup(self, uint64_t iova, uint64_t length, uint8_t perm, uint64_t *uaddr,
                    uint64_t *contiguous, uint64_t *fault_iova) noexcept nogil:
        cdef size_t at
        cdef IotlbEntry *entry
        cdef uint64_t span
        fault_iova[0] = iova
        at = self._first_ending_at_or_after(iova)
        if at >= self.count or self.table[at].start > iova:
            return IOTLB_MISS
        entry = &self.table[at]
        if (entry.perm & perm) != perm:
            return IOTLB_DENIED
        uaddr[0] = entry.uaddr + (iova - entry.start)
        span = entry.last - iova  # bytes after iova within the entry, minus one (avoids overflow)
        contiguous[0] = length if length == 0 or length - 1 <= span else span + 1
        return IOTLB_OK

    def translate(self, uint64_t iova, uint64_t length, int perm) -> list:
        """``[(uaddr, length), ...]`` covering the range, or IotlbFault at the first bad byte."""
        cdef uint64_t uaddr = 0, contiguous = 0, fault = 0
        cdef int result
        pieces = []
        if length and iova > _U64_MAX - (length - 1):
            raise IotlbFault(iova, perm, "miss")
        while length:
            result = self.lookup(iova, length, <uint8_t>perm, &uaddr, &contiguous, &fault)
            if result != IOTLB_OK:
                raise IotlbFault(fault, perm, "miss" if result == IOTLB_MISS else "denied")
            pieces.append((uaddr, contiguous))
            length -= contiguous
            iova += contiguous
        return pieces
