# Guest memory: mmap-backed regions with known process addresses, and the registry that resolves a
# user address (uaddr, what IOTLB UPDATE messages carry) to the bytes behind it.
from libc.stdint cimport uint8_t, uint64_t


cdef class GuestMemory:
    cdef readonly uint64_t size
    cdef readonly uint64_t uaddr      # process virtual address of byte 0 (what a kernel would be given)
    cdef readonly uint64_t gpa        # guest-physical address of byte 0 (what the dirty log indexes)
    cdef uint8_t *base
    cdef object _map                  # the mmap object; keeps the mapping alive
    cdef object _view                 # memoryview pinning the buffer while base is in use
    cdef bint closed
    cdef list _registries             # MemoryRegistry objects this region is in

    cdef uint8_t *ptr(self, uint64_t offset, uint64_t length) noexcept nogil   # NULL when out of bounds
    cdef uint8_t *_checked(self, uint64_t offset, uint64_t length) except NULL  # raises when out of bounds


cdef struct Region:
    uint64_t uaddr
    uint64_t size
    uint64_t gpa
    uint8_t *base


cdef class MemoryRegistry:
    # The set of regions a device may touch: the "mm" the device is bound to (vdpa bind_mm).
    cdef Region *regions
    cdef size_t count
    cdef size_t capacity
    cdef list _owners                 # GuestMemory objects, kept alive while registered

    # Pointer to `length` bytes at `uaddr`, all inside one region, and that region's gpa for it;
    # NULL when any byte is outside every registered region.
    cdef uint8_t *resolve(self, uint64_t uaddr, uint64_t length, uint64_t *gpa) noexcept nogil
