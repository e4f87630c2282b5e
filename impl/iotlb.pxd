# One IOVA address space: IOVA ranges mapped to user addresses with RO/WO/RW permission, as Linux's
# vhost_iotlb keeps them. Lookups are nogil for the datapath.
from libc.stdint cimport uint8_t, uint64_t

cdef enum:
    IOTLB_ACCESS_RO = 1
    IOTLB_ACCESS_WO = 2
    IOTLB_ACCESS_RW = 3

# translate() results
cdef enum:
    IOTLB_OK = 0
    IOTLB_MISS = -1        # some byte of the range has no mapping
    IOTLB_DENIED = -2      # mapped, but without the permission asked for


cdef struct IotlbEntry:
    uint64_t start          # first IOVA
    uint64_t last           # last IOVA (inclusive, so a map can end at 2^64 - 1)
    uint64_t uaddr          # user address of `start`
    uint8_t perm


cdef class Iotlb:
    cdef IotlbEntry *table     # sorted by start, never overlapping
    cdef size_t count
    cdef size_t capacity
    cdef readonly size_t limit # most entries it holds (ENOSPC past it); 0 = no limit

    # lookup(): translate [iova, iova + length): on IOTLB_OK, *uaddr is the user address of iova and
    # *contiguous how many bytes from iova are mapped contiguously with the permission (>= 1,
    # may be < length: the caller continues at iova + *contiguous). On a fault *fault_iova is the
    # first IOVA that failed.
    cdef size_t _first_ending_at_or_after(self, uint64_t iova) noexcept nogil
    cdef int lookup(self, uint64_t iova, uint64_t length, uint8_t perm, uint64_t *uaddr,
                    uint64_t *contiguous, uint64_t *fault_iova) noexcept nogil
