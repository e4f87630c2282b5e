# cython: language_level=3
"""The device side of a virtqueue: split and packed rings, walked in C without the GIL.

This is the datapath the reference devices are built on (see ``virtqueue.pxd`` for the C API
and its contract). Facts it is written from: virtio v1.3 §2.6-2.8 and brief §4-5; Linux's
``drivers/vhost/vhost.c`` and ``vringh.c`` for how a host-side walker defends itself.

Why it is shaped like this:

- **Every access is translated.** Descriptor addresses and ring areas are IOVAs of the queue's
  address space. Each access goes IOVA -> :class:`Iotlb` -> user address ->
  :class:`MemoryRegistry` -> pointer, and only a pointer obtained that way is dereferenced. A
  hole or a missing permission is an ACCESS_FAIL (``fault_iova``, ``fault_perm``) and bad input.
- **Single fetch.** The driver may rewrite ring memory at any moment. Each ring field is copied
  once into a local (followed by a compiler barrier, so the compiler cannot re-read the guest
  copy) and only the local is checked and used: there is no window between check and use.
- **Bounded walks.** A split chain walk stops after ``num`` descriptors (more is a loop), an
  indirect walk after its table size, a packed chain after ``num`` slots. Nothing can hang.
- **Bad input breaks the queue.** The first violation is recorded in ``broken`` and returned by
  every later call until :meth:`reset`; the device answers with DEVICE_NEEDS_RESET. A chain is
  validated completely before anything is written for it, so a hostile chain never causes a
  device write.
- **Ordering.** Used elements are written before the used index (split) and the flags of the
  first used descriptor last (packed), with release fences; a full fence separates publishing
  the used index from reading the driver's event index, as the spec's suppression race demands.
- **Dirty log.** With a :class:`DirtyLog` attached, buffer writes are logged at the gpa the
  registry reports, ring writes (used elements, used idx, used flags, avail_event, the packed
  device event area) at ``log_guest_addr`` + their offset in the device area when the vring was
  set up with VHOST_VRING_F_LOG (brief §5). The log range is checked before the write and the
  bits are set after it (marking first would let the migration thread copy the page and clear
  the bit before the data lands). Packed used descriptors live in the descriptor ring, which has
  no log address in vhost's ABI: they are logged at the gpa of the bytes written.

State after SET_VRING_BASE: for a split ring only ``last_avail_idx`` is restored; the device's
used index is read from the used ring when the queue is next used (not assumed equal to
``last_avail_idx`` as Linux's vdpa_sim does), so chains the driver made available and never got
back are visible as :meth:`inflight` and can be taken again with :meth:`rewind_inflight`.
The vring base cannot say *which* chains were completed, only how many: the rewind is exact
when the device completed chains in the order it took them (as the reference devices do, and
as IN_ORDER requires); a device that completes out of order must finish its in-flight chains
before it reports itself suspended.
"""

import errno

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memcpy

from vdpacert.impl.dirty_log cimport LOG_OK, DirtyLog
from vdpacert.impl.guestmem cimport MemoryRegistry, Region
from vdpacert.impl.iotlb cimport IOTLB_ACCESS_RO, IOTLB_ACCESS_WO, IOTLB_DENIED, IOTLB_MISS, IOTLB_OK, Iotlb
from vdpacert.impl.ring_math cimport vring_need_event

from vdpacert.uapi.virtio_config import VIRTIO_F_IN_ORDER, VIRTIO_F_RING_PACKED
from vdpacert.uapi.virtio_ring import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC


cdef extern from *:
    """
    static inline void vq_compiler_barrier(void) { __asm__ __volatile__("" ::: "memory"); }
    static inline void vq_rmb(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
    static inline void vq_wmb(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
    static inline void vq_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    static inline void vq_store16(void *p, uint16_t v) { __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE); }
    """
    void vq_compiler_barrier() nogil
    void vq_rmb() nogil
    void vq_wmb() nogil
    void vq_mb() nogil
    void vq_store16(void *p, uint16_t v) nogil


# Descriptor and suppression flag values (virtio v1.3 §2.7.5, §2.8.10, §2.8.14).
cdef enum:
    DESC_F_NEXT = 1
    DESC_F_WRITE = 2
    DESC_F_INDIRECT = 4
    PACKED_F_AVAIL = 1 << 7
    PACKED_F_USED = 1 << 15
    USED_F_NO_NOTIFY = 1
    AVAIL_F_NO_INTERRUPT = 1
    EVENT_FLAG_ENABLE = 0
    EVENT_FLAG_DISABLE = 1
    EVENT_FLAG_DESC = 2
    MAX_RING_PIECES = 16        # a ring write of <= 8 bytes split over at most this many mappings

cdef uint64_t U64_MAX = 0xFFFFFFFFFFFFFFFF
cdef uint64_t U32_MAX = 0xFFFFFFFF


cdef inline uint16_t le16(const uint8_t *p) noexcept nogil:
    return <uint16_t>(p[0] | (<uint16_t>p[1] << 8))


cdef inline uint32_t le32(const uint8_t *p) noexcept nogil:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline uint64_t le64(const uint8_t *p) noexcept nogil:
    return le32(p) | (<uint64_t>le32(p + 4) << 32)


cdef inline void put16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = v >> 8


cdef inline void put32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = v >> 24


cdef inline bint overflows(uint64_t addr, uint64_t length) noexcept nogil:
    return length != 0 and addr > U64_MAX - (length - 1)


cdef inline uint8_t *resolve_prefix(MemoryRegistry registry, uint64_t uaddr, uint64_t length, uint64_t *gpa,
                                    uint64_t *available) noexcept nogil:
    # Like MemoryRegistry.resolve, but for the leading part of the range that lies in the region
    # holding `uaddr`: a buffer crossing from one region into the next becomes two segments.
    cdef size_t i
    cdef Region *region
    cdef uint64_t offset
    for i in range(registry.count):
        region = &registry.regions[i]
        if uaddr >= region.uaddr and uaddr - region.uaddr < region.size:
            offset = uaddr - region.uaddr
            available[0] = length if length <= region.size - offset else region.size - offset
            gpa[0] = region.gpa + offset
            return region.base + offset
    return NULL


cdef inline void _begin_chain(Chain *chain, uint32_t seg_base) noexcept nogil:
    chain.head = 0
    chain.ndesc = 0
    chain.n_readable = 0
    chain.n_segs = 0
    chain.readable_len = 0
    chain.writable_len = 0
    chain.segs = NULL
    chain.live = 0
    chain.seg_base = seg_base
    chain.generation = 0


# ---- Python-visible codes ----

NO_SPACE = POP_NO_SPACE
BAD_LOOP = VQ_BAD_LOOP
BAD_CHAIN_TOO_LONG = VQ_BAD_CHAIN_TOO_LONG
BAD_NESTED_INDIRECT = VQ_BAD_NESTED_INDIRECT
BAD_INDIRECT_LEN = VQ_BAD_INDIRECT_LEN
BAD_INDIRECT_NOT_NEGOTIATED = VQ_BAD_INDIRECT_NOT_NEGOTIATED
BAD_INDIRECT_WITH_NEXT = VQ_BAD_INDIRECT_WITH_NEXT
BAD_UNMAPPED = VQ_BAD_UNMAPPED
BAD_DENIED = VQ_BAD_DENIED
BAD_TOTAL_LEN = VQ_BAD_TOTAL_LEN
BAD_READ_AFTER_WRITE = VQ_BAD_READ_AFTER_WRITE
BAD_INDEX = VQ_BAD_INDEX
BAD_AVAIL_IDX = VQ_BAD_AVAIL_IDX
BAD_TOO_MANY_SEGMENTS = VQ_BAD_TOO_MANY_SEGMENTS
BAD_STATE = VQ_BAD_STATE
ERR_LOG = VQ_ERR_LOG
ERR_CHAIN = VQ_ERR_CHAIN
ERR_NOT_READY = VQ_ERR_NOT_READY
SEG_SLACK = VQ_SEG_SLACK

#: code -> short name, for every status a call can return.
STATUS_NAMES = {
    VQ_BAD_LOOP: "descriptor loop",
    VQ_BAD_CHAIN_TOO_LONG: "chain longer than the queue size",
    VQ_BAD_NESTED_INDIRECT: "nested indirect descriptor",
    VQ_BAD_INDIRECT_LEN: "indirect table length zero or not a multiple of 16",
    VQ_BAD_INDIRECT_NOT_NEGOTIATED: "indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC",
    VQ_BAD_INDIRECT_WITH_NEXT: "indirect descriptor with NEXT",
    VQ_BAD_UNMAPPED: "address unmapped",
    VQ_BAD_DENIED: "permission denied",
    VQ_BAD_TOTAL_LEN: "chain total length over 2^32 - 1",
    VQ_BAD_READ_AFTER_WRITE: "device-readable descriptor after a writable one",
    VQ_BAD_INDEX: "descriptor index out of range",
    VQ_BAD_AVAIL_IDX: "avail idx more than the queue size ahead",
    VQ_BAD_TOO_MANY_SEGMENTS: "chain needs more segments than the queue holds",
    VQ_BAD_STATE: "restored ring state inconsistent with the ring",
    VQ_ERR_LOG: "write outside the dirty log",
    VQ_ERR_CHAIN: "chain not live in this queue",
    VQ_ERR_NOT_READY: "queue not ready",
}


def is_bad_input(code: int) -> bool:
    """True for the codes that are the driver's fault (VQ_BAD_*)."""
    return VQ_BAD_STATE <= code <= VQ_BAD_LOOP


class VirtQueueError(Exception):
    """A datapath call failed. ``code`` is the VqStatus; ``fault`` the ACCESS_FAIL (iova, perm) or None."""

    def __init__(self, code: int, fault: tuple[int, int] | None = None) -> None:
        where = f" (ACCESS_FAIL iova {fault[0]:#x} perm {fault[1]})" if fault else ""
        super().__init__(f"virtqueue: {STATUS_NAMES.get(code, code)}{where}")
        self.code = code
        self.name = STATUS_NAMES.get(code, str(code))
        self.fault = fault


cdef class PoppedChain:
    """A chain taken with :meth:`VirtQueue.pop_chain` (Python wrapper of the C ``Chain``)."""

    cdef Chain chain
    cdef VirtQueue vq

    @property
    def head(self) -> int:
        return self.chain.head

    @property
    def ndesc(self) -> int:
        return self.chain.ndesc

    @property
    def readable_len(self) -> int:
        return self.chain.readable_len

    @property
    def writable_len(self) -> int:
        return self.chain.writable_len

    @property
    def live(self) -> bool:
        return self.vq is not None and bool(self.chain.live) and self.chain.generation == self.vq.generation

    def _segments(self, bint writable) -> list:
        cdef uint32_t i
        if not self.live:
            raise VirtQueueError(VQ_ERR_CHAIN)
        return [(self.chain.segs[i].gpa, self.chain.segs[i].len)
                for i in range(self.chain.n_segs) if self.chain.segs[i].writable == writable]

    @property
    def readable(self) -> list:
        """``[(gpa, length), ...]`` of the device-readable segments, in order."""
        return self._segments(False)

    @property
    def writable(self) -> list:
        """``[(gpa, length), ...]`` of the device-writable segments, in order."""
        return self._segments(True)

    def __repr__(self) -> str:
        return (f"PoppedChain(head={self.chain.head}, ndesc={self.chain.ndesc}, "
                f"readable={self.chain.readable_len}, writable={self.chain.writable_len})")


cdef class VirtQueue:
    """One virtqueue, configured through the device's config ops and driven by the device."""

    def __cinit__(self, int index=0):
        self.index = index
        self.segs = NULL
        self._reset_all()

    def __dealloc__(self):
        PyMem_Free(self.segs)

    cdef void _reset_all(self) noexcept:
        PyMem_Free(self.segs)
        self.segs = NULL
        self.seg_cap = 0
        self.num = 0
        self.desc_area = self.driver_area = self.device_area = 0
        self.ready = False
        self._features = 0
        self.packed = self.event_idx = self.indirect_desc = self.in_order = False
        self.iotlb = None
        self.memory = None
        self.log = None
        self.log_guest_addr = 0
        self.log_used = False
        self.broken = 0
        self.has_fault = False
        self.fault_iova = 0
        self.fault_perm = 0
        self.generation += 1
        self._reset_ring_state(0, 1, 0, 1)

    cdef void _reset_ring_state(self, uint16_t last_avail_idx, uint8_t last_avail_counter, uint16_t last_used_idx,
                                uint8_t last_used_counter) noexcept:
        self.last_avail_idx = last_avail_idx
        self.last_avail_counter = last_avail_counter
        self.last_used_idx = last_used_idx
        self.last_used_counter = last_used_counter
        self.avail_idx_shadow = last_avail_idx
        self.need_used_sync = True
        self.used_since_signal = 0
        self.notify_enabled = True
        self.avail_event_valid = False
        self.avail_event_written = 0
        self.seg_top = 0
        self.outstanding = 0
        self.generation += 1

    # ---- configuration (the parent's config ops land here) ----

    def set_num(self, num: int) -> None:
        """set_vq_num: the queue size. Allocates the segment arena (2 * num + SEG_SLACK)."""
        cdef VqSegment *arena
        if not 1 <= num <= VQ_MAX_SIZE:
            raise OSError(errno.EINVAL, f"queue size {num} is not in [1, {VQ_MAX_SIZE}]")
        if self.ready:
            self._check_areas(self.desc_area, self.driver_area, self.device_area, num)
        arena = <VqSegment *>PyMem_Malloc((2 * num + VQ_SEG_SLACK) * sizeof(VqSegment))
        if arena == NULL:
            raise MemoryError()
        PyMem_Free(self.segs)
        self.segs = arena
        self.seg_cap = 2 * num + VQ_SEG_SLACK
        self.num = num
        self.seg_top = 0
        self.outstanding = 0
        self.generation += 1

    def set_address(self, uint64_t desc_area, uint64_t driver_area, uint64_t device_area) -> None:
        """set_vq_address: IOVAs of the descriptor area, driver area and device area.

        EINVAL (nothing changed) on a ready queue whose areas would run past 2^64; a queue that is
        not ready is checked when it becomes ready.
        """
        if self.ready:
            self._check_areas(desc_area, driver_area, device_area, self.num)
        self.desc_area = desc_area
        self.driver_area = driver_area
        self.device_area = device_area

    def set_features(self, features: int) -> None:
        """The negotiated feature bits that shape the ring (any width; only ring bits are read).

        EBUSY on a ready queue: the layout of a live ring cannot change under the device.
        """
        features = int(features)
        if self.ready:
            raise OSError(errno.EBUSY, "the ring format cannot change while the queue is ready")
        if features < 0:
            raise OSError(errno.EINVAL, "feature bits cannot be negative")
        self._features = features
        self.packed = bool(features >> VIRTIO_F_RING_PACKED & 1)
        self.event_idx = bool(features >> VIRTIO_RING_F_EVENT_IDX & 1)
        self.indirect_desc = bool(features >> VIRTIO_RING_F_INDIRECT_DESC & 1)
        self.in_order = bool(features >> VIRTIO_F_IN_ORDER & 1)

    @property
    def features(self) -> int:
        return self._features

    def set_iotlb(self, Iotlb iotlb) -> None:
        """The address space of the queue's group (its ASID's IOTLB)."""
        self.iotlb = iotlb

    def set_memory(self, MemoryRegistry memory) -> None:
        """The memory the device is bound to (vdpa bind_mm)."""
        self.memory = memory

    def set_log(self, DirtyLog log=None, uint64_t log_guest_addr=0, bint log_used=False) -> None:
        """Start (a DirtyLog) or stop (None) dirty logging. ``log_used``: VHOST_VRING_F_LOG was set."""
        self.log = log
        self.log_guest_addr = log_guest_addr
        self.log_used = log_used

    def set_ready(self, bint ready) -> None:
        """set_vq_ready. Going ready needs a size (a power of 2 for a split ring), an IOTLB and memory.

        A split queue reads the device's used index from the used ring at its next use.
        """
        if ready and not self.ready:
            if self.num == 0:
                raise OSError(errno.EINVAL, "queue size not set")
            if not self.packed and self.num & (self.num - 1):
                raise OSError(errno.EINVAL, f"split queue size {self.num} is not a power of 2")
            if self.iotlb is None or self.memory is None:
                raise OSError(errno.EINVAL, "queue has no address space or memory")
            if self.packed and (self.last_avail_idx >= self.num or self.last_used_idx >= self.num):
                raise OSError(errno.EINVAL, "packed ring state points past the queue size")
            self._check_areas(self.desc_area, self.driver_area, self.device_area, self.num)
        self.ready = ready
        self.need_used_sync = True
        self.avail_idx_shadow = self.last_avail_idx
        self.avail_event_valid = False

    def _check_areas(self, uint64_t desc, uint64_t driver, uint64_t device, uint32_t num) -> None:
        # Ring offsets are added to the area addresses in 64-bit arithmetic: an area that runs
        # past 2^64 would wrap to low IOVAs, so it is refused up front (EINVAL, as vhost does
        # for a ring it cannot access).
        if self.packed:
            areas = [("descriptor ring", desc, 16 * num), ("driver event area", driver, 4),
                     ("device event area", device, 4)]
        else:
            areas = [("descriptor table", desc, 16 * num), ("available ring", driver, 6 + 2 * num),
                     ("used ring", device, 6 + 8 * num)]
        for name, start, size in areas:
            if start > U64_MAX - (size - 1):
                raise OSError(errno.EINVAL, f"the {name} at {start:#x} runs past 2^64")

    def reset(self) -> None:
        """Back to a freshly created queue: not ready, no size, no address space, state zero, not broken."""
        self._reset_all()

    def get_state(self) -> dict:
        """get_vq_state: split ``{last_avail_idx}``; packed adds the counters and the used index."""
        if not self.packed:
            return {"last_avail_idx": self.last_avail_idx}
        return {"last_avail_idx": self.last_avail_idx, "last_avail_counter": self.last_avail_counter,
                "last_used_idx": self.last_used_idx, "last_used_counter": self.last_used_counter}

    def set_state(self, last_avail_idx: int, last_avail_counter: int = 1, last_used_idx: int = 0,
                  last_used_counter: int = 1) -> None:
        """set_vq_state. Chains popped before are no longer live. EINVAL (state unchanged) when out of range."""
        if not self.packed:
            if not 0 <= last_avail_idx <= 0xFFFF:
                raise OSError(errno.EINVAL, f"split last_avail_idx {last_avail_idx} is not a 16-bit index")
            self._reset_ring_state(last_avail_idx, 1, 0, 1)
            return
        for name, value, limit in (("last_avail_idx", last_avail_idx, 0x7FFF),
                                   ("last_used_idx", last_used_idx, 0x7FFF),
                                   ("last_avail_counter", last_avail_counter, 1),
                                   ("last_used_counter", last_used_counter, 1)):
            if not 0 <= value <= limit:
                raise OSError(errno.EINVAL, f"packed {name} {value} out of range")
        if self.num and (last_avail_idx >= self.num or last_used_idx >= self.num):
            raise OSError(errno.EINVAL, f"packed state indices must be below the queue size {self.num}")
        self._reset_ring_state(last_avail_idx, last_avail_counter, last_used_idx, last_used_counter)

    def inflight(self) -> int:
        """Split: chains between the used index in the ring and last_avail_idx. Packed: slots."""
        cdef int rc = self.inflight_count()
        if rc < 0:
            raise self._error(rc)
        return rc

    def rewind_inflight(self) -> int:
        """Make the in-flight chains available again (from the used index), to be popped in order.

        For a device resuming after set_state: every chain the driver has not got back is taken
        again, none lost, none taken twice, provided the chains were completed in the order they
        were taken (see the module docstring). Returns what inflight() returned. EBUSY while
        popped chains are outstanding.
        """
        cdef int count
        if self.outstanding:
            raise OSError(errno.EBUSY, f"{self.outstanding} popped chains are still outstanding")
        count = self.inflight()
        self.last_avail_idx = self.last_used_idx
        self.last_avail_counter = self.last_used_counter
        self.avail_idx_shadow = self.last_avail_idx
        self.avail_event_valid = False
        self.generation += 1
        return count

    @property
    def access_fail(self) -> tuple | None:
        """The last failed translation as ``(iova, perm)``: what an ACCESS_FAIL message reports."""
        return (self.fault_iova, self.fault_perm) if self.has_fault else None

    def clear_access_fail(self) -> None:
        self.has_fault = False

    @property
    def used_idx(self) -> int:
        return self.last_used_idx

    def _error(self, int code) -> VirtQueueError:
        return VirtQueueError(code, self.access_fail if code in (VQ_BAD_UNMAPPED, VQ_BAD_DENIED) else None)

    # ---- Python wrappers of the datapath (tests, tools); the C API is the real one ----

    def pop_chain(self) -> PoppedChain | None:
        """pop(): the next chain, or None when the ring is empty. VirtQueueError when broken;
        BufferError when the arena is full of outstanding chains."""
        cdef PoppedChain popped = PoppedChain.__new__(PoppedChain)
        cdef int rc = self.pop(&popped.chain)
        if rc == POP_EMPTY:
            return None
        if rc == POP_NO_SPACE:
            raise BufferError("segment arena full: push outstanding chains first")
        if rc < 0:
            raise self._error(rc)
        popped.vq = self
        return popped

    def unpop_chain(self, PoppedChain chain not None) -> None:
        cdef int rc = self.unpop(&chain.chain) if chain.vq is self else VQ_ERR_CHAIN
        if rc < 0:
            raise self._error(rc)

    def read_chain(self, PoppedChain chain not None, uint64_t offset=0, length=None) -> bytes:
        """The readable bytes from ``offset`` (all of them by default)."""
        cdef uint64_t want
        cdef unsigned char[::1] view
        cdef int64_t got
        if chain.vq is not self or not chain.live:
            raise self._error(VQ_ERR_CHAIN)
        want = chain.chain.readable_len - min(offset, chain.chain.readable_len)
        if length is not None:
            want = min(want, <uint64_t>length)
        out = bytearray(want + 1)     # + 1: a view of an empty bytearray has no &view[0]
        view = out
        got = self.copy_from_chain(&chain.chain, offset, &view[0], want)
        if got < 0:
            raise self._error(<int>got)
        return bytes(out[:got])

    def write_chain(self, PoppedChain chain not None, uint64_t offset, const unsigned char[::1] data not None) -> int:
        """copy_to_chain(): bytes written (clipped to the writable part)."""
        cdef int64_t rc
        if chain.vq is not self:
            raise self._error(VQ_ERR_CHAIN)
        rc = self.copy_to_chain(&chain.chain, offset, &data[0] if data.shape[0] else NULL, data.shape[0])
        if rc < 0:
            raise self._error(<int>rc)
        return rc

    def push_chain(self, PoppedChain chain not None, uint32_t written) -> None:
        cdef int rc = self.push(&chain.chain, written) if chain.vq is self else VQ_ERR_CHAIN
        if rc < 0:
            raise self._error(rc)

    def push_chains(self, items) -> None:
        """push_batch() of ``[(chain, written), ...]``: one used-index publication."""
        cdef list pairs = list(items)
        cdef uint32_t n = len(pairs), i
        cdef Chain *chains
        cdef uint32_t *written
        cdef int rc
        cdef PoppedChain popped
        if n == 0:
            return
        for popped, _ in pairs:
            if popped.vq is not self:
                raise self._error(VQ_ERR_CHAIN)
        if len({id(p) for p, _ in pairs}) != n:
            raise self._error(VQ_ERR_CHAIN)
        chains = <Chain *>PyMem_Malloc(n * sizeof(Chain))
        written = <uint32_t *>PyMem_Malloc(n * sizeof(uint32_t))
        try:
            if chains == NULL or written == NULL:
                raise MemoryError()
            for i in range(n):
                popped = pairs[i][0]
                chains[i] = popped.chain
                written[i] = pairs[i][1]
            rc = self.push_batch(chains, written, n)
            if rc < 0:
                raise self._error(rc)
            for i in range(n):
                popped = pairs[i][0]
                popped.chain.live = 0
        finally:
            PyMem_Free(chains)
            PyMem_Free(written)

    def notify_needed(self) -> bool:
        cdef int rc = self.need_notify()
        if rc < 0:
            raise self._error(rc)
        return rc == 1

    def enable_notifications(self) -> bool:
        """enable_notify(): True when more chains arrived meanwhile."""
        cdef int rc = self.enable_notify()
        if rc < 0:
            raise self._error(rc)
        return rc == 1

    def disable_notifications(self) -> None:
        cdef int rc = self.disable_notify()
        if rc < 0:
            raise self._error(rc)

    # ---- internals: errors and translated access ----

    cdef int _fail(self, int code) noexcept nogil:
        if code < 0 and self.broken == 0 and code != VQ_ERR_CHAIN and code != VQ_ERR_NOT_READY:
            self.broken = code
        return code

    cdef int _fault(self, int code, uint64_t iova, uint8_t perm) noexcept nogil:
        self.has_fault = True
        self.fault_iova = iova
        self.fault_perm = perm
        return code

    cdef int _map(self, uint64_t iova, uint64_t length, uint8_t perm, uint8_t **ptr, uint64_t *gpa,
                  uint64_t *contiguous) noexcept nogil:
        # The leading piece of [iova, iova + length) that is contiguous in IOVA, user address and
        # one memory region, with the permission: *ptr, *gpa and its length in *contiguous.
        cdef uint64_t uaddr = 0, mapped = 0, fault = iova
        cdef int result
        if self.iotlb is None or self.memory is None:
            return self._fault(VQ_BAD_UNMAPPED, iova, perm)
        result = self.iotlb.lookup(iova, length, perm, &uaddr, &mapped, &fault)
        if result == IOTLB_MISS:
            return self._fault(VQ_BAD_UNMAPPED, fault, perm)
        if result != IOTLB_OK:
            return self._fault(VQ_BAD_DENIED, fault, perm)
        ptr[0] = resolve_prefix(self.memory, uaddr, mapped, gpa, contiguous)
        if ptr[0] == NULL:
            return self._fault(VQ_BAD_UNMAPPED, iova, perm)
        return VQ_OK

    cdef int _read(self, uint64_t iova, void *dst, uint32_t length) noexcept nogil:
        # One fetch of a ring field into dst; the barrier stops the compiler from re-reading
        # guest memory in place of the local copy.
        cdef uint8_t *ptr = NULL
        cdef uint64_t gpa = 0, piece = 0
        cdef uint32_t done = 0
        cdef int rc
        if overflows(iova, length):
            return self._fault(VQ_BAD_UNMAPPED, iova, IOTLB_ACCESS_RO)
        while done < length:
            rc = self._map(iova + done, length - done, IOTLB_ACCESS_RO, &ptr, &gpa, &piece)
            if rc < 0:
                return rc
            memcpy(<uint8_t *>dst + done, ptr, piece)
            done += <uint32_t>piece
        vq_compiler_barrier()
        return VQ_OK

    cdef int _write_ring(self, uint64_t iova, const void *src, uint32_t length, bint by_area) noexcept nogil:
        # A ring write (used element, index, flags, event): translate every piece and check the
        # log before writing anything, write, then log. by_area: the write is inside the device
        # area and logged at log_guest_addr + offset; otherwise (packed used descriptors in the
        # descriptor ring) at the gpa of each piece.
        cdef uint8_t *ptrs[MAX_RING_PIECES]
        cdef uint64_t gpas[MAX_RING_PIECES]
        cdef uint64_t lens[MAX_RING_PIECES]
        cdef uint64_t gpa = 0, piece = 0, done = 0
        cdef uint8_t *ptr = NULL
        cdef int pieces = 0, i, rc
        cdef bint logging = self.log is not None and self.log_used
        if overflows(iova, length):
            return self._fault(VQ_BAD_UNMAPPED, iova, IOTLB_ACCESS_WO)
        while done < length:
            if pieces == MAX_RING_PIECES:
                return self._fault(VQ_BAD_UNMAPPED, iova + done, IOTLB_ACCESS_WO)
            rc = self._map(iova + done, length - done, IOTLB_ACCESS_WO, &ptr, &gpa, &piece)
            if rc < 0:
                return rc
            ptrs[pieces] = ptr
            gpas[pieces] = gpa
            lens[pieces] = piece
            pieces += 1
            done += piece
        if logging:
            if by_area:
                if self.log.check(self.log_guest_addr + (iova - self.device_area), length) != LOG_OK:
                    return VQ_ERR_LOG
            else:
                for i in range(pieces):
                    if self.log.check(gpas[i], lens[i]) != LOG_OK:
                        return VQ_ERR_LOG
        if pieces == 1 and length == 2 and (<uintptr_t>ptrs[0] & 1) == 0:
            vq_store16(ptrs[0], le16(<const uint8_t *>src))    # indices and flags: one store
        else:
            done = 0
            for i in range(pieces):
                memcpy(ptrs[i], <const uint8_t *>src + done, lens[i])
                done += lens[i]
        if logging:
            if by_area:
                self.log.mark(self.log_guest_addr + (iova - self.device_area), length)
            else:
                for i in range(pieces):
                    self.log.mark(gpas[i], lens[i])
        return VQ_OK

    # ---- split ring ----

    cdef int _sync_used(self) noexcept nogil:
        # The device's used index is whatever the used ring says: after SET_VRING_BASE the
        # chains between it and last_avail_idx are still the device's (in flight).
        cdef uint8_t raw[2]
        cdef uint16_t used
        cdef int rc
        if self.packed:
            self.need_used_sync = False
            return VQ_OK
        rc = self._read(self.device_area + 2, raw, 2)
        if rc < 0:
            return rc
        used = le16(raw)
        if <uint16_t>(self.last_avail_idx - used) > self.num:
            return VQ_BAD_STATE
        self.last_used_idx = used
        self.used_since_signal = 0
        self.need_used_sync = False
        return VQ_OK

    cdef int _split_avail(self) noexcept nogil:
        # 1 when avail->ring[last_avail_idx] holds a published head, 0 when the ring is empty.
        cdef uint8_t raw[2]
        cdef uint16_t idx
        cdef int rc, attempt
        if self.avail_idx_shadow != self.last_avail_idx:
            return 1
        for attempt in range(2):
            rc = self._read(self.driver_area + 2, raw, 2)
            if rc < 0:
                return rc
            idx = le16(raw)
            if <uint16_t>(idx - self.last_avail_idx) > self.num:
                return VQ_BAD_AVAIL_IDX
            self.avail_idx_shadow = idx
            if idx != self.last_avail_idx:
                vq_rmb()      # the ring entries and descriptors after the index
                return 1
            # Empty. With EVENT_IDX, ask for a kick at this index before sleeping, then look
            # once more: the driver may have published between our read and its event check.
            if attempt or not (self.notify_enabled and self.event_idx):
                return 0
            if self.avail_event_valid and self.avail_event_written == self.last_avail_idx:
                return 0
            rc = self._publish_avail_event()
            if rc < 0:
                return rc
            vq_mb()
        return 0

    cdef int _add_buffer(self, Chain *chain, uint64_t addr, uint32_t length, bint writable, uint32_t *cursor,
                         bint *seen_writable) noexcept nogil:
        cdef uint8_t perm = IOTLB_ACCESS_WO if writable else IOTLB_ACCESS_RO
        cdef uint8_t *ptr = NULL
        cdef uint64_t gpa = 0, piece = 0
        cdef int rc
        if writable:
            seen_writable[0] = True
        elif seen_writable[0]:
            return VQ_BAD_READ_AFTER_WRITE
        if chain.readable_len + chain.writable_len + length > U32_MAX:
            return VQ_BAD_TOTAL_LEN
        if writable:
            chain.writable_len += length
        else:
            chain.readable_len += length
        if overflows(addr, length):
            return self._fault(VQ_BAD_UNMAPPED, addr, perm)
        while length:
            rc = self._map(addr, length, perm, &ptr, &gpa, &piece)
            if rc < 0:
                return rc
            if cursor[0] >= self.seg_cap:
                return VQ_BAD_TOO_MANY_SEGMENTS
            self.segs[cursor[0]].ptr = ptr
            self.segs[cursor[0]].gpa = gpa
            self.segs[cursor[0]].len = <uint32_t>piece
            self.segs[cursor[0]].writable = 1 if writable else 0
            cursor[0] += 1
            if not writable:
                chain.n_readable += 1
            addr += piece
            length -= <uint32_t>piece
        return VQ_OK

    cdef int _walk_split(self, Chain *chain, uint16_t head, uint32_t *cursor) noexcept nogil:
        cdef uint8_t raw[16]
        cdef uint64_t table = self.desc_area, addr
        cdef uint32_t table_size = self.num, visited = 0, length, idx = head
        cdef uint16_t flags, nxt
        cdef bint in_indirect = False, seen_writable = False
        cdef int rc
        while True:
            visited += 1
            if visited > table_size:
                return VQ_BAD_LOOP         # more descriptors than the table holds: one repeats
            rc = self._read(table + 16 * <uint64_t>idx, raw, 16)
            if rc < 0:
                return rc
            addr = le64(raw)
            length = le32(raw + 8)
            flags = le16(raw + 12)
            nxt = le16(raw + 14)
            chain.ndesc += 1
            if flags & DESC_F_INDIRECT:
                if in_indirect:
                    return VQ_BAD_NESTED_INDIRECT
                if not self.indirect_desc:
                    return VQ_BAD_INDIRECT_NOT_NEGOTIATED
                if flags & DESC_F_NEXT:
                    return VQ_BAD_INDIRECT_WITH_NEXT
                if length == 0 or length & 15:
                    return VQ_BAD_INDIRECT_LEN
                if (length >> 4) > self.num:
                    return VQ_BAD_CHAIN_TOO_LONG
                if overflows(addr, length):
                    return self._fault(VQ_BAD_UNMAPPED, addr, IOTLB_ACCESS_RO)
                table = addr
                table_size = length >> 4
                idx = 0
                visited = 0
                in_indirect = True
                continue
            rc = self._add_buffer(chain, addr, length, (flags & DESC_F_WRITE) != 0, cursor, &seen_writable)
            if rc < 0:
                return rc
            if not flags & DESC_F_NEXT:
                return VQ_OK
            idx = nxt
            if idx >= table_size:
                return VQ_BAD_INDEX

    cdef int _pop_split(self, Chain *chain) noexcept nogil:
        cdef uint8_t raw[2]
        cdef uint16_t head
        cdef uint32_t cursor = self.seg_top
        cdef int rc
        if self.need_used_sync:
            rc = self._sync_used()
            if rc < 0:
                return rc
        rc = self._split_avail()
        if rc <= 0:
            return rc
        rc = self._read(self.driver_area + 4 + 2 * <uint64_t>(self.last_avail_idx % self.num), raw, 2)
        if rc < 0:
            return rc
        head = le16(raw)
        if head >= self.num:
            return VQ_BAD_INDEX
        _begin_chain(chain, self.seg_top)
        rc = self._walk_split(chain, head, &cursor)
        if rc < 0:
            return rc
        chain.head = head
        chain.avail_before = self.last_avail_idx
        chain.counter_before = 1
        self.last_avail_idx += 1
        self._commit(chain, cursor)
        return POP_CHAIN

    # ---- packed ring ----

    cdef int _walk_packed_indirect(self, Chain *chain, uint64_t table, uint32_t length, uint32_t *cursor,
                                   bint *seen_writable) noexcept nogil:
        # A packed indirect table is walked in order; NEXT inside it means nothing.
        cdef uint8_t raw[16]
        cdef uint32_t i, count = length >> 4
        cdef uint16_t flags
        cdef int rc
        for i in range(count):
            rc = self._read(table + 16 * <uint64_t>i, raw, 16)
            if rc < 0:
                return rc
            flags = le16(raw + 14)
            if flags & DESC_F_INDIRECT:
                return VQ_BAD_NESTED_INDIRECT
            rc = self._add_buffer(chain, le64(raw), le32(raw + 8), (flags & DESC_F_WRITE) != 0, cursor, seen_writable)
            if rc < 0:
                return rc
        return VQ_OK

    cdef int _packed_available(self, uint16_t pos, uint8_t wrap, uint16_t *flags) noexcept nogil:
        cdef uint8_t raw[2]
        cdef int rc = self._read(self.desc_area + 16 * <uint64_t>pos + 14, raw, 2)
        if rc < 0:
            return rc
        flags[0] = le16(raw)
        return ((flags[0] & PACKED_F_AVAIL) != 0) == wrap and ((flags[0] & PACKED_F_USED) != 0) != wrap

    cdef int _pop_packed(self, Chain *chain) noexcept nogil:
        cdef uint8_t raw[16]
        cdef uint16_t pos = self.last_avail_idx, flags = 0, buffer_id = 0
        cdef uint8_t wrap = self.last_avail_counter
        cdef uint32_t cursor = self.seg_top, slots = 0, length
        cdef uint64_t addr
        cdef bint seen_writable = False
        cdef int rc
        if self.last_avail_idx >= self.num or self.last_used_idx >= self.num:
            return VQ_BAD_STATE
        rc = self._packed_available(pos, wrap, &flags)
        if rc < 0:
            return rc
        if rc == 0:
            if not (self.notify_enabled and self.event_idx):
                return POP_EMPTY
            if self.avail_event_valid and self.avail_event_written == (pos | (<uint16_t>wrap << 15)):
                return POP_EMPTY
            rc = self._publish_avail_event()
            if rc < 0:
                return rc
            vq_mb()
            rc = self._packed_available(pos, wrap, &flags)
            if rc <= 0:
                return rc
        vq_rmb()     # the rest of the descriptor is read after its flags said "available"
        rc = self._read(self.desc_area + 16 * <uint64_t>pos, raw, 14)
        if rc < 0:
            return rc
        _begin_chain(chain, self.seg_top)
        while True:
            addr = le64(raw)
            length = le32(raw + 8)
            buffer_id = le16(raw + 12)
            slots += 1
            chain.ndesc += 1
            if flags & DESC_F_INDIRECT:
                if not self.indirect_desc:
                    return VQ_BAD_INDIRECT_NOT_NEGOTIATED
                if flags & DESC_F_NEXT or slots > 1:   # §2.8.7: an indirect descriptor stands for the whole list
                    return VQ_BAD_INDIRECT_WITH_NEXT
                if length == 0 or length & 15:
                    return VQ_BAD_INDIRECT_LEN
                if (length >> 4) > self.num:
                    return VQ_BAD_CHAIN_TOO_LONG
                if overflows(addr, length):
                    return self._fault(VQ_BAD_UNMAPPED, addr, IOTLB_ACCESS_RO)
                rc = self._walk_packed_indirect(chain, addr, length, &cursor, &seen_writable)
            else:
                rc = self._add_buffer(chain, addr, length, (flags & DESC_F_WRITE) != 0, &cursor, &seen_writable)
            if rc < 0:
                return rc
            pos += 1
            if pos == self.num:
                pos = 0
                wrap ^= 1
            if not flags & DESC_F_NEXT:
                break
            if slots >= self.num:
                return VQ_BAD_CHAIN_TOO_LONG
            rc = self._read(self.desc_area + 16 * <uint64_t>pos, raw, 16)
            if rc < 0:
                return rc
            flags = le16(raw + 14)
        chain.head = buffer_id        # the buffer id travels in the chain's last descriptor
        chain.avail_before = self.last_avail_idx
        chain.counter_before = self.last_avail_counter
        self.last_avail_idx = pos
        self.last_avail_counter = wrap
        self._commit(chain, cursor)
        return POP_CHAIN

    # ---- chain bookkeeping ----

    cdef void _commit(self, Chain *chain, uint32_t cursor) noexcept nogil:
        chain.segs = self.segs + chain.seg_base
        chain.n_segs = cursor - chain.seg_base
        chain.live = 1
        chain.generation = self.generation
        self.seg_top = cursor
        self.outstanding += 1

    cdef int _check_chain(self, Chain *chain) noexcept nogil:
        if not chain.live or chain.generation != self.generation or chain.segs != self.segs + chain.seg_base:
            return VQ_ERR_CHAIN
        return VQ_OK

    cdef void _release(self, Chain *chain) noexcept nogil:
        chain.live = 0
        if self.outstanding:
            self.outstanding -= 1
        if self.outstanding == 0:
            self.seg_top = 0      # every chain is back: the arena is free again

    cdef int pop(self, Chain *chain) noexcept nogil:
        cdef int rc
        if self.broken:
            return self.broken
        if not self.ready or self.num == 0:
            return POP_EMPTY
        rc = self._pop_packed(chain) if self.packed else self._pop_split(chain)
        if rc == VQ_BAD_TOO_MANY_SEGMENTS and self.outstanding:
            return POP_NO_SPACE   # may fit once the outstanding chains are pushed
        if rc < 0:
            return self._fail(rc)
        return rc

    cdef int unpop(self, Chain *chain) noexcept nogil:
        cdef uint32_t pos
        cdef uint8_t wrap
        if self._check_chain(chain) < 0 or chain.seg_base + chain.n_segs != self.seg_top:
            return VQ_ERR_CHAIN
        if self.packed:
            pos = chain.avail_before + chain.ndesc
            wrap = chain.counter_before
            if pos >= self.num:
                pos -= self.num
                wrap ^= 1
            if pos != self.last_avail_idx or wrap != self.last_avail_counter:
                return VQ_ERR_CHAIN
        elif <uint16_t>(chain.avail_before + 1) != self.last_avail_idx:
            return VQ_ERR_CHAIN
        self.last_avail_idx = chain.avail_before
        self.last_avail_counter = chain.counter_before
        self.seg_top = chain.seg_base
        self._release(chain)
        return VQ_OK

    # ---- buffer copies ----

    cdef int64_t copy_from_chain(self, Chain *chain, uint64_t offset, void *dst, uint64_t length) noexcept nogil:
        cdef uint32_t i
        cdef uint64_t done = 0, take
        cdef VqSegment *seg
        if self._check_chain(chain) < 0:
            return VQ_ERR_CHAIN
        for i in range(chain.n_readable):
            if done == length:
                break
            seg = &chain.segs[i]
            if offset >= seg.len:
                offset -= seg.len
                continue
            take = seg.len - offset
            if take > length - done:
                take = length - done
            memcpy(<uint8_t *>dst + done, seg.ptr + offset, take)
            done += take
            offset = 0
        return done

    cdef int _log_segment(self, VqSegment *seg, uint64_t skip, uint64_t length, bint mark) noexcept nogil:
        if self.log is None:
            return VQ_OK
        if mark:
            self.log.mark(seg.gpa + skip, length)
            return VQ_OK
        return VQ_OK if self.log.check(seg.gpa + skip, length) == LOG_OK else VQ_ERR_LOG

    cdef int64_t copy_to_chain(self, Chain *chain, uint64_t offset, const void *src, uint64_t length) noexcept nogil:
        cdef uint32_t i, first = chain.n_readable
        cdef uint64_t done, take, skip
        cdef int rc
        cdef int phase
        cdef VqSegment *seg
        if self._check_chain(chain) < 0:
            return VQ_ERR_CHAIN
        if self.broken:
            return self.broken
        if offset >= chain.writable_len:
            return 0
        if length > chain.writable_len - offset:
            length = chain.writable_len - offset
        # Phase 0 checks every range against the log, phase 1 writes, phase 2 logs: a write that
        # cannot be logged never happens, and no bit is set before its data is in place.
        for phase in range(3):
            if phase != 1 and self.log is None:
                continue
            done = 0
            skip = offset
            for i in range(first, chain.n_segs):
                if done == length:
                    break
                seg = &chain.segs[i]
                if skip >= seg.len:
                    skip -= seg.len
                    continue
                take = seg.len - skip
                if take > length - done:
                    take = length - done
                if phase == 1:
                    memcpy(seg.ptr + skip, <const uint8_t *>src + done, take)
                else:
                    rc = self._log_segment(seg, skip, take, phase == 2)
                    if rc < 0:
                        return self._fail(rc)
                done += take
                skip = 0
        return length

    # ---- used ring ----

    cdef int push(self, Chain *chain, uint32_t written) noexcept nogil:
        return self.push_batch(chain, &written, 1)

    cdef int push_batch(self, Chain *chains, const uint32_t *written, uint32_t n) noexcept nogil:
        cdef uint8_t elem[8]
        cdef uint8_t raw[2]
        cdef uint32_t i, length, slots = 0, pos
        cdef uint16_t first_flags = 0, flags
        cdef uint8_t wrap
        cdef int rc
        if self.broken:
            return self.broken
        if not self.ready:
            return VQ_ERR_NOT_READY
        for i in range(n):
            if self._check_chain(&chains[i]) < 0:
                return VQ_ERR_CHAIN
        if n == 0:
            return VQ_OK
        if self.need_used_sync:
            rc = self._sync_used()
            if rc < 0:
                return self._fail(rc)
        if not self.packed:
            for i in range(n):
                length = written[i] if written[i] <= chains[i].writable_len else <uint32_t>chains[i].writable_len
                put32(elem, chains[i].head)
                put32(elem + 4, length)
                rc = self._write_ring(self.device_area + 4 + 8 * <uint64_t>(<uint16_t>(self.last_used_idx + i)
                                                                           % self.num), elem, 8, True)
                if rc < 0:
                    return self._fail(rc)
            vq_wmb()       # the elements before the index that publishes them
            put16(raw, <uint16_t>(self.last_used_idx + n))
            rc = self._write_ring(self.device_area + 2, raw, 2, True)
            if rc < 0:
                return self._fail(rc)
            self.last_used_idx = <uint16_t>(self.last_used_idx + n)
            self.used_since_signal += n
        else:
            pos = self.last_used_idx
            wrap = self.last_used_counter
            for i in range(n):
                length = written[i] if written[i] <= chains[i].writable_len else <uint32_t>chains[i].writable_len
                put32(elem, length)
                put16(elem + 4, chains[i].head)
                rc = self._write_ring(self.desc_area + 16 * <uint64_t>pos + 8, elem, 6, False)
                if rc < 0:
                    return self._fail(rc)
                flags = (PACKED_F_AVAIL | PACKED_F_USED) if wrap else 0
                if length:
                    flags |= DESC_F_WRITE
                if i == 0:
                    first_flags = flags
                else:
                    vq_wmb()
                    put16(raw, flags)
                    rc = self._write_ring(self.desc_area + 16 * <uint64_t>pos + 14, raw, 2, False)
                    if rc < 0:
                        return self._fail(rc)
                slots += chains[i].ndesc
                pos += chains[i].ndesc
                if pos >= self.num:
                    pos -= self.num
                    wrap ^= 1
            # The first descriptor's flags last: the driver sees the whole batch at once.
            vq_wmb()
            put16(raw, first_flags)
            rc = self._write_ring(self.desc_area + 16 * <uint64_t>self.last_used_idx + 14, raw, 2, False)
            if rc < 0:
                return self._fail(rc)
            self.last_used_idx = <uint16_t>pos
            self.last_used_counter = wrap
            self.used_since_signal += slots
        for i in range(n):
            self._release(&chains[i])
        if self.log is not None:
            self.log.flush()
        return VQ_OK

    # ---- notifications ----

    cdef int need_notify(self) noexcept nogil:
        cdef uint8_t raw[4]
        cdef uint32_t count
        cdef uint16_t event, old, off_wrap, flags
        cdef int rc
        if self.broken:
            return self.broken
        if not self.ready or self.used_since_signal == 0:
            return 0
        count = self.used_since_signal
        self.used_since_signal = 0
        vq_mb()       # our used index is visible before we read what the driver asked for
        if not self.packed:
            if not self.event_idx:
                rc = self._read(self.driver_area, raw, 2)
                if rc < 0:
                    return self._fail(rc)
                return 0 if le16(raw) & AVAIL_F_NO_INTERRUPT else 1
            rc = self._read(self.driver_area + 4 + 2 * <uint64_t>self.num, raw, 2)
            if rc < 0:
                return self._fail(rc)
            if count > 0xFFFF:
                return 1
            old = <uint16_t>(self.last_used_idx - count)
            return vring_need_event(le16(raw), self.last_used_idx, old)
        rc = self._read(self.driver_area, raw, 4)
        if rc < 0:
            return self._fail(rc)
        off_wrap = le16(raw)
        flags = le16(raw + 2)
        if flags == EVENT_FLAG_DISABLE:
            return 0
        if flags != EVENT_FLAG_DESC or not self.event_idx or count >= self.num:
            return 1
        # Event offsets live in [0, num) with a wrap bit; compare as vring_need_event on a
        # line where an event from the previous lap sits num below (as Linux's packed ring does).
        event = off_wrap & 0x7FFF
        if (off_wrap >> 15) != self.last_used_counter:
            event = <uint16_t>(event - self.num)
        old = <uint16_t>(self.last_used_idx - count)
        return vring_need_event(event, self.last_used_idx, old)

    cdef int _publish_avail_event(self) noexcept nogil:
        # Tell the driver where we want the next kick: at the first entry we have not taken.
        cdef uint8_t raw[2]
        cdef uint16_t value
        cdef int rc
        if not self.packed:
            value = self.last_avail_idx
            put16(raw, value)
            rc = self._write_ring(self.device_area + 4 + 8 * <uint64_t>self.num, raw, 2, True)
        else:
            value = self.last_avail_idx | (<uint16_t>self.last_avail_counter << 15)
            put16(raw, value)
            rc = self._write_ring(self.device_area, raw, 2, True)
            if rc == VQ_OK:
                vq_wmb()
                put16(raw, EVENT_FLAG_DESC)
                rc = self._write_ring(self.device_area + 2, raw, 2, True)
        if rc < 0:
            return rc
        self.avail_event_written = value
        self.avail_event_valid = True
        return VQ_OK

    cdef int enable_notify(self) noexcept nogil:
        cdef uint8_t raw[2]
        cdef uint16_t flags = 0, idx
        cdef int rc
        if self.broken:
            return self.broken
        self.notify_enabled = True
        if not self.ready:
            return 0
        if self.event_idx:
            rc = self._publish_avail_event()
        else:
            put16(raw, EVENT_FLAG_ENABLE if self.packed else 0)
            rc = self._write_ring(self.device_area + (2 if self.packed else 0), raw, 2, True)
        if rc < 0:
            return self._fail(rc)
        vq_mb()       # the request is visible before we look for work that raced with it
        if self.packed:
            rc = self._packed_available(self.last_avail_idx, self.last_avail_counter, &flags)
            return self._fail(rc) if rc < 0 else rc
        rc = self._read(self.driver_area + 2, raw, 2)
        if rc < 0:
            return self._fail(rc)
        idx = le16(raw)
        if <uint16_t>(idx - self.last_avail_idx) > self.num:
            return self._fail(VQ_BAD_AVAIL_IDX)
        self.avail_idx_shadow = idx
        if idx != self.last_avail_idx:
            vq_rmb()
            return 1
        return 0

    cdef int disable_notify(self) noexcept nogil:
        cdef uint8_t raw[2]
        cdef int rc = VQ_OK
        if self.broken:
            return self.broken
        self.notify_enabled = False
        if not self.ready:
            return 0
        if self.packed:
            put16(raw, EVENT_FLAG_DISABLE)
            rc = self._write_ring(self.device_area + 2, raw, 2, True)
            self.avail_event_valid = False
        elif not self.event_idx:
            put16(raw, USED_F_NO_NOTIFY)
            rc = self._write_ring(self.device_area, raw, 2, True)
        return self._fail(rc) if rc < 0 else 0

    cdef int inflight_count(self) noexcept nogil:
        cdef int rc
        if self.broken:
            return self.broken
        if self.packed:
            if self.last_avail_counter == self.last_used_counter and self.last_avail_idx >= self.last_used_idx:
                return self.last_avail_idx - self.last_used_idx
            return self.last_avail_idx + self.num - self.last_used_idx
        if self.need_used_sync:
            rc = self._sync_used()
            if rc < 0:
                return self._fail(rc)
        return <uint16_t>(self.last_avail_idx - self.last_used_idx)
