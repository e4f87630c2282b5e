# The virtio-blk request loop (virtio v1.3 §5.2.6) over a compiled VirtQueue, and the ramdisk it serves.
from libc.stdint cimport uint8_t, uint32_t, uint64_t

from vdpacert.impl.virtqueue cimport Chain, VirtQueue

cdef enum:
    BLK_SECTOR_SHIFT = 9
    BLK_ID_BYTES = 20
    BLK_MAX_DWZ_SEGS = 256      # most discard / write-zeroes segments one request may carry
    BLK_BATCH = 32              # chains answered before one used-index publication

# Queue-breaking codes of the blk device (VirtQueue.broken), below every VqStatus.
cdef enum BlkBadInput:
    BLK_BAD_NO_STATUS = -64     # no device-writable byte for the status
    BLK_BAD_SHORT_HEADER = -65  # fewer than 16 device-readable bytes for struct virtio_blk_outhdr


cdef class Ramdisk:
    cdef readonly uint64_t capacity      # 512-byte sectors
    cdef readonly uint64_t size          # bytes
    cdef uint8_t *base
    cdef object _map
    cdef object _view
    cdef object __weakref__              # shared disks are looked up weakly by name (sim_blk's ``disk`` attribute)


cdef class BlkBackend:
    cdef readonly Ramdisk disk
    # what the device offers (fixed at creation)
    cdef readonly bint read_only
    cdef readonly uint32_t max_discard_sectors, max_discard_seg
    cdef readonly uint32_t max_write_zeroes_sectors, max_write_zeroes_seg
    cdef uint8_t serial[BLK_ID_BYTES]
    # what the driver negotiated (configure())
    cdef readonly bint flush, discard, write_zeroes
    # statistics
    cdef readonly uint64_t requests, ioerr, unsupp

    cdef bint _range_ok(self, uint64_t sector, uint64_t sectors) noexcept nogil
    cdef uint8_t _discard_write_zeroes(self, VirtQueue vq, Chain *chain, uint32_t kind,
                                       uint64_t data_len) noexcept nogil
    cdef int _handle(self, VirtQueue vq, Chain *chain, uint32_t *used_len) noexcept nogil
    cdef int run(self, VirtQueue vq, uint64_t *completed) noexcept nogil
