# The device side of one virtqueue (split or packed, virtio v1.3 §2.6-2.8): the datapath the
# reference devices (sim-net, sim-blk) are built on.
#
# How a device uses it (all C calls are nogil; none allocates):
#
#     cdef Chain chain
#     rc = vq.pop(&chain)            # 1 chain, 0 empty, POP_NO_SPACE, <0 queue broken (VqStatus)
#     n = vq.copy_from_chain(&chain, 0, buf, chain.readable_len)       # request bytes
#     n = vq.copy_to_chain(&chain, 0, reply, reply_len)                # reply bytes, logged
#     vq.push(&chain, n)             # used element + used idx (logged), log eventfd flushed
#     if vq.need_notify() == 1: signal the call eventfd
#
# * Every ring and buffer access goes IOVA -> Iotlb.lookup -> uaddr -> MemoryRegistry -> pointer.
#   A failed translation breaks the queue with VQ_BAD_UNMAPPED / VQ_BAD_DENIED and records the
#   ACCESS_FAIL (fault_iova, fault_perm) for the front to report.
# * Any bad input (a VQ_BAD_* code) breaks the queue: every later pop/push returns that code
#   until reset(). The device then sets DEVICE_NEEDS_RESET. Nothing was written for the chain.
# * Ring fields are fetched once into locals; the driver may change memory concurrently.
# * One device thread drives a queue: the object holds no lock (the ring is shared with the
#   driver, and that side is what the barriers and single fetches are for).
# * Notification handling: the queue starts with notifications enabled. A device that polls
#   calls disable_notify(), and enable_notify() before it sleeps (returns 1 if more arrived:
#   keep popping). With EVENT_IDX, pop() itself republishes avail_event when it finds the ring
#   empty, so a device that only pops and sleeps on the kick never misses one.
#
# * Resume after set_state (split): the used index is read from the ring, so inflight_count()
#   is the number of chains taken but not returned; rewind_inflight() (Python) makes them
#   available again. Exact when chains were completed in the order they were taken.
#
# Segments. A chain's segments live in a per-queue arena allocated by set_num():
#     capacity = 2 * num + VQ_SEG_SLACK
# i.e. room for a full direct chain (num descriptors) plus a full indirect table (num entries:
# an indirect table longer than the queue size is VQ_BAD_CHAIN_TOO_LONG), plus slack for
# descriptors split at IOTLB-entry or memory-region boundaries (one descriptor becomes one
# segment per contiguous piece). Popped chains share the arena; it is recycled when no popped
# chain is outstanding (every one pushed or unpopped). A pop that does not fit while others are
# outstanding returns POP_NO_SPACE (state unchanged: push what you hold, then pop again); a
# chain that does not fit an empty arena is bad input (VQ_BAD_TOO_MANY_SEGMENTS, like vhost's
# ENOBUFS). Segment pointers are translated at pop time and stay valid until the chain is
# pushed or the queue is reset/resized.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from vdpacert.impl.dirty_log cimport DirtyLog
from vdpacert.impl.guestmem cimport MemoryRegistry
from vdpacert.impl.iotlb cimport Iotlb

cdef enum:
    VQ_SEG_SLACK = 256
    VQ_MAX_SIZE = 32768

# pop() results that are not errors.
cdef enum:
    POP_EMPTY = 0
    POP_CHAIN = 1
    POP_NO_SPACE = 2       # the segment arena is full of outstanding chains; push some first

# Status codes. VQ_BAD_* are the driver's fault (hostile or buggy guest): the queue breaks.
# VQ_ERR_LOG breaks the queue too (a write it cannot log must not happen). VQ_ERR_CHAIN and
# VQ_ERR_NOT_READY are device programming errors: reported, the queue is left as it was.
cdef enum VqStatus:
    VQ_OK = 0
    VQ_BAD_LOOP = -1                     # a walk visits more descriptors than its table holds
    VQ_BAD_CHAIN_TOO_LONG = -2           # packed chain over num slots / indirect table over num entries
    VQ_BAD_NESTED_INDIRECT = -3          # INDIRECT inside an indirect table
    VQ_BAD_INDIRECT_LEN = -4             # indirect table length zero or not a multiple of 16
    VQ_BAD_INDIRECT_NOT_NEGOTIATED = -5  # INDIRECT without VIRTIO_RING_F_INDIRECT_DESC
    VQ_BAD_INDIRECT_WITH_NEXT = -6       # INDIRECT together with NEXT
    VQ_BAD_UNMAPPED = -7                 # IOTLB miss, or a uaddr outside registered memory
    VQ_BAD_DENIED = -8                   # mapped without the permission the access needs
    VQ_BAD_TOTAL_LEN = -9                # chain total length over 2^32 - 1
    VQ_BAD_READ_AFTER_WRITE = -10        # device-readable descriptor after a writable one
    VQ_BAD_INDEX = -11                   # head or next index outside the (indirect) table
    VQ_BAD_AVAIL_IDX = -12               # split avail idx more than num ahead of last_avail_idx
    VQ_BAD_TOO_MANY_SEGMENTS = -13       # a chain needs more segments than the arena holds
    VQ_BAD_STATE = -14                   # restored state inconsistent with the ring (see set_ready)
    VQ_ERR_LOG = -32                     # a write could not be logged (page outside the log)
    VQ_ERR_CHAIN = -33                   # push/unpop of a chain that is not live in this queue
    VQ_ERR_NOT_READY = -34               # push on a queue that is not ready


cdef struct VqSegment:
    uint8_t *ptr          # process pointer to the bytes (resolved through the IOTLB and registry)
    uint64_t gpa          # guest-physical address of ptr (what the dirty log indexes)
    uint32_t len
    uint8_t writable      # 0: device-readable, 1: device-writable


cdef struct Chain:
    uint16_t head         # split: head descriptor index; packed: buffer id (of the last descriptor)
    uint16_t ndesc        # descriptors walked (packed: ring slots; the used index advances by this)
    uint32_t n_readable   # segs[0:n_readable] are device-readable ...
    uint32_t n_segs       # ... segs[n_readable:n_segs] device-writable
    uint64_t readable_len
    uint64_t writable_len
    VqSegment *segs       # into the queue's arena
    # bookkeeping: the device must not change these
    uint16_t avail_before     # last_avail_idx before this pop (for unpop)
    uint8_t counter_before    # packed avail wrap counter before this pop
    uint8_t live              # 1 between pop and push/unpop
    uint32_t seg_base         # arena index of segs[0]
    uint32_t generation       # queue generation at pop (reset/resize/set_state make chains stale)


cdef class VirtQueue:
    cdef readonly int index
    # configuration (set_* Python methods)
    cdef readonly uint32_t num
    cdef readonly uint64_t desc_area, driver_area, device_area
    cdef readonly bint ready
    cdef readonly bint packed, event_idx, indirect_desc, in_order
    cdef object _features
    cdef readonly Iotlb iotlb
    cdef readonly MemoryRegistry memory
    cdef readonly DirtyLog log           # None: not logging
    cdef readonly uint64_t log_guest_addr
    cdef readonly bint log_used          # VHOST_VRING_F_LOG: ring writes are logged at log_guest_addr
    # ring state
    cdef readonly uint16_t last_avail_idx
    cdef readonly uint8_t last_avail_counter   # packed only
    cdef readonly uint16_t last_used_idx       # split: the device's used->idx shadow; packed: slot
    cdef readonly uint8_t last_used_counter    # packed only
    cdef uint16_t avail_idx_shadow       # split: the last avail->idx read
    cdef bint need_used_sync             # split: read used->idx from the ring before next use
    cdef uint32_t used_since_signal      # need_notify(): used entries (packed: slots) since the last decision
    cdef bint notify_enabled
    cdef uint16_t avail_event_written    # the avail_event / off_wrap last published
    cdef bint avail_event_valid
    cdef readonly int broken             # 0, or the VqStatus that broke the queue
    cdef readonly uint64_t fault_iova    # the last ACCESS_FAIL: first failing IOVA ...
    cdef readonly uint8_t fault_perm     # ... and the access asked for (1 RO/read, 2 WO/write)
    cdef readonly bint has_fault
    # segment arena
    cdef VqSegment *segs
    cdef uint32_t seg_cap
    cdef uint32_t seg_top
    cdef readonly uint32_t outstanding   # chains popped and neither pushed nor unpopped
    cdef uint32_t generation

    # ---- the datapath (C API, nogil) ----
    # Take the next available chain. POP_CHAIN (1), POP_EMPTY (0), POP_NO_SPACE (2), or a
    # negative VqStatus (the queue is broken; it stays so until reset()). A queue that is not
    # ready returns POP_EMPTY.
    cdef int pop(self, Chain *chain) noexcept nogil
    # Undo the most recent pop (LIFO): the chain will be popped again. 0 or VQ_ERR_CHAIN.
    cdef int unpop(self, Chain *chain) noexcept nogil
    # Copy up to `length` bytes of the readable part, from `offset`, into dst. Bytes copied (>= 0).
    cdef int64_t copy_from_chain(self, Chain *chain, uint64_t offset, void *dst, uint64_t length) noexcept nogil
    # Copy `length` bytes into the writable part at `offset` (clipped to writable_len), logging
    # every byte range written. Bytes written, or VQ_ERR_LOG / VQ_ERR_CHAIN (nothing written).
    cdef int64_t copy_to_chain(self, Chain *chain, uint64_t offset, const void *src, uint64_t length) noexcept nogil
    # Return a chain to the driver with `written` bytes (clipped to writable_len). 0 or <0.
    cdef int push(self, Chain *chain, uint32_t written) noexcept nogil
    # Return n chains at once: one used-index publication, one log flush. All or nothing.
    cdef int push_batch(self, Chain *chains, const uint32_t *written, uint32_t n) noexcept nogil
    # After pushes: must the driver be notified (EVENT_IDX used_event / packed off_wrap, or the
    # NO_INTERRUPT / DISABLE flags)? 1 yes, 0 no, <0 broken.
    cdef int need_notify(self) noexcept nogil
    # Kick suppression. enable: 1 if more chains arrived meanwhile (keep popping), 0, or <0.
    cdef int enable_notify(self) noexcept nogil
    cdef int disable_notify(self) noexcept nogil
    # Split: chains the driver's used idx is behind last_avail_idx (taken, not returned).
    # Packed: ring slots between last_used and last_avail. <0 broken.
    cdef int inflight_count(self) noexcept nogil

    # ---- internals ----
    cdef void _reset_all(self) noexcept
    cdef void _reset_ring_state(self, uint16_t last_avail_idx, uint8_t last_avail_counter, uint16_t last_used_idx,
                                uint8_t last_used_counter) noexcept
    cdef int _fail(self, int code) noexcept nogil
    cdef int _fault(self, int code, uint64_t iova, uint8_t perm) noexcept nogil
    cdef int _map(self, uint64_t iova, uint64_t length, uint8_t perm, uint8_t **ptr, uint64_t *gpa,
                  uint64_t *contiguous) noexcept nogil
    cdef int _read(self, uint64_t iova, void *dst, uint32_t length) noexcept nogil
    cdef int _write_ring(self, uint64_t iova, const void *src, uint32_t length, bint by_area) noexcept nogil
    cdef int _sync_used(self) noexcept nogil
    cdef int _split_avail(self) noexcept nogil
    cdef int _add_buffer(self, Chain *chain, uint64_t addr, uint32_t length, bint writable, uint32_t *cursor,
                         bint *seen_writable) noexcept nogil
    cdef int _walk_split(self, Chain *chain, uint16_t head, uint32_t *cursor) noexcept nogil
    cdef int _pop_split(self, Chain *chain) noexcept nogil
    cdef int _walk_packed_indirect(self, Chain *chain, uint64_t table, uint32_t length, uint32_t *cursor,
                                   bint *seen_writable) noexcept nogil
    cdef int _packed_available(self, uint16_t pos, uint8_t wrap, uint16_t *flags) noexcept nogil
    cdef int _pop_packed(self, Chain *chain) noexcept nogil
    cdef int _publish_avail_event(self) noexcept nogil
    cdef void _commit(self, Chain *chain, uint32_t cursor) noexcept nogil
    cdef int _check_chain(self, Chain *chain) noexcept nogil
    cdef void _release(self, Chain *chain) noexcept nogil
    cdef int _log_segment(self, VqSegment *seg, uint64_t skip, uint64_t length, bint mark) noexcept nogil
