# cython: language_level=3
"""Guest memory for the reference devices: anonymous mmap regions with real process addresses.

Userspace tells a vhost-vdpa device where memory is by *user address* (the ``uaddr`` of an
IOTLB UPDATE). To keep that honest, every :class:`GuestMemory` is a real ``mmap`` whose
``uaddr`` is its address in this process, so the same numbers could be handed to a kernel.
A device never dereferences a user address it was given blindly: it asks a
:class:`MemoryRegistry` (the memory the device is bound to, like Linux's ``vdpa_bind_mm``),
which answers only for bytes wholly inside a live registered region. Everything else is an
access fault, never a stray pointer.
"""

import mmap

from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.stdint cimport uint8_t, uint64_t, uintptr_t
from libc.string cimport memcpy, memset

cdef uint64_t _U64_MAX = 0xFFFFFFFFFFFFFFFF


cdef inline bint _fits(uint64_t offset, uint64_t length, uint64_t size) noexcept nogil:
    return offset <= size and length <= size - offset


cdef class GuestMemory:
    """``size`` bytes of zeroed anonymous memory at guest-physical address ``gpa``.

    Reads and writes by offset are bounds-checked (IndexError, nothing touched). The region
    registers itself with the process-wide registry unless ``register=False``. ``shared`` maps it
    MAP_SHARED (shmem-backed) instead of private: a real vhost-vdpa device whose parent works
    on virtual addresses (``use_va``, as vdpa_sim by default) maps only shared memory and skips the
    rest without an error, so guest memory given to such a device must be shared, as QEMU's
    ``share=on`` memory backends are.
    """

    def __cinit__(self, uint64_t size, uint64_t gpa=0, bint register=True, bint shared=False):
        cdef unsigned char[::1] view
        if size == 0:
            raise ValueError("guest memory needs at least one byte")
        if gpa > _U64_MAX - (size - 1):
            raise ValueError(f"a region of {size} bytes at gpa {gpa:#x} runs past 2^64")
        self._map = mmap.mmap(-1, size, flags=(mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE) | mmap.MAP_ANONYMOUS,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        view = self._map
        self._view = view
        self.base = &view[0]
        self.size = size
        self.gpa = gpa
        self.uaddr = <uint64_t><uintptr_t>self.base
        self.closed = False
        self._registries = []
        if register:
            default_registry().add(self)

    cdef uint8_t *ptr(self, uint64_t offset, uint64_t length) noexcept nogil:
        if self.closed or not _fits(offset, length, self.size):
            return NULL
        return self.base + offset

    cdef uint8_t *_checked(self, uint64_t offset, uint64_t length) except NULL:
        if self.closed:
            raise ValueError("guest memory is closed")
        if not _fits(offset, length, self.size):
            raise IndexError(f"{length} bytes at offset {offset:#x} run past guest memory of {self.size:#x} bytes")
        return self.base + offset

    def __len__(self):
        return self.size

    @property
    def is_closed(self) -> bool:
        return self.closed

    def read(self, uint64_t offset, uint64_t length) -> bytes:
        cdef uint8_t *at = self._checked(offset, length)
        return (<char *>at)[:length]

    def write(self, uint64_t offset, const unsigned char[::1] data not None):
        cdef uint64_t length = data.shape[0]
        cdef uint8_t *at = self._checked(offset, length)
        if length:
            memcpy(at, &data[0], length)

    def fill(self, uint64_t offset, uint64_t length, int value=0):
        cdef uint8_t *at = self._checked(offset, length)
        memset(at, value & 0xFF, length)

    def read_u16(self, uint64_t offset) -> int:
        return int.from_bytes(self.read(offset, 2), "little")

    def read_u32(self, uint64_t offset) -> int:
        return int.from_bytes(self.read(offset, 4), "little")

    def read_u64(self, uint64_t offset) -> int:
        return int.from_bytes(self.read(offset, 8), "little")

    def write_u16(self, uint64_t offset, value: int):
        self.write(offset, int(value).to_bytes(2, "little"))

    def write_u32(self, uint64_t offset, value: int):
        self.write(offset, int(value).to_bytes(4, "little"))

    def write_u64(self, uint64_t offset, value: int):
        self.write(offset, int(value).to_bytes(8, "little"))

    def uaddr_of(self, uint64_t offset) -> int:
        self._checked(offset, 0)
        return self.uaddr + offset

    def offset_of_uaddr(self, uint64_t uaddr) -> int:
        if uaddr < self.uaddr or uaddr - self.uaddr >= self.size:
            raise IndexError(f"user address {uaddr:#x} is not inside this region")
        return uaddr - self.uaddr

    def close(self):
        """Unregister and unmap. Idempotent; reads and writes fail afterwards."""
        if self.closed:
            return
        for registry in list(self._registries):
            (<MemoryRegistry>registry).remove(self)
        self.closed = True
        self.base = NULL
        self._view = None
        self._map.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self.closed else f"uaddr={self.uaddr:#x}"
        return f"GuestMemory(size={self.size:#x}, gpa={self.gpa:#x}, {state})"


cdef class MemoryRegistry:
    """The regions a device may reach by user address; lookups need no GIL."""

    def __cinit__(self):
        self.regions = NULL
        self.count = 0
        self.capacity = 0
        self._owners = []

    def __dealloc__(self):
        PyMem_Free(self.regions)

    def add(self, GuestMemory memory not None):
        cdef Region *grown
        if memory.closed:
            raise ValueError("cannot register closed guest memory")
        if memory in self._owners:
            return
        if self.count == self.capacity:
            grown = <Region *>PyMem_Realloc(self.regions, (self.capacity * 2 + 4) * sizeof(Region))
            if grown == NULL:
                raise MemoryError()
            self.regions = grown
            self.capacity = self.capacity * 2 + 4
        self.regions[self.count].uaddr = memory.uaddr
        self.regions[self.count].size = memory.size
        self.regions[self.count].gpa = memory.gpa
        self.regions[self.count].base = memory.base
        self.count += 1
        self._owners.append(memory)
        memory._registries.append(self)

    def remove(self, GuestMemory memory not None):
        cdef size_t i
        for i in range(self.count):
            if self.regions[i].base == memory.base and self._owners[i] is memory:
                self.regions[i] = self.regions[self.count - 1]
                self._owners[i] = self._owners[self.count - 1]
                self._owners.pop()
                self.count -= 1
                memory._registries.remove(self)
                return
        raise KeyError("guest memory is not registered here")

    def __len__(self):
        return self.count

    def __contains__(self, memory):
        return memory in self._owners

    cdef uint8_t *resolve(self, uint64_t uaddr, uint64_t length, uint64_t *gpa) noexcept nogil:
        cdef size_t i
        cdef Region *region
        for i in range(self.count):
            region = &self.regions[i]
            if uaddr >= region.uaddr and _fits(uaddr - region.uaddr, length, region.size):
                if gpa != NULL:
                    gpa[0] = region.gpa + (uaddr - region.uaddr)
                return region.base + (uaddr - region.uaddr)
        return NULL

    def lookup(self, uint64_t uaddr, uint64_t length=1):
        """``(memory, offset)`` holding all ``length`` bytes at ``uaddr``, or None."""
        cdef size_t i
        for i in range(self.count):
            if uaddr >= self.regions[i].uaddr and _fits(uaddr - self.regions[i].uaddr, length, self.regions[i].size):
                return self._owners[i], uaddr - self.regions[i].uaddr
        return None


cdef MemoryRegistry _DEFAULT = MemoryRegistry()


def default_registry() -> MemoryRegistry:
    """The process-wide registry every GuestMemory joins on creation: this process's "mm"."""
    return _DEFAULT
