# cython: language_level=3
"""The virtio-blk request loop of sim-blk: a ramdisk served straight from and into guest buffers.

A request is a chain whose device-readable part starts with ``struct virtio_blk_outhdr``
(le32 type, le32 reserved/ioprio, le64 sector) followed by the data the driver sends, and whose
device-writable part holds the data the device returns followed by one status byte (virtio
v1.3 §5.2.6). The parts are read as byte streams: the device assumes no particular split of
them into descriptors (§2.6.4).

The loop runs without the GIL over :class:`VirtQueue`'s C API and allocates nothing per
request: data moves with one copy between the ramdisk and the chain's segments, the header and
the discard / write-zeroes segments are fetched once into locals (the driver may rewrite guest
memory at any moment; what was checked is what is used). Chains are answered in the order they
were taken and published in batches of up to ``BLK_BATCH`` per used-index update.

Answers (decisions where the spec leaves room are marked *):

- IN / OUT: the data length must be a multiple of 512* and the range must lie inside the
  capacity, else IOERR with nothing transferred (no ramdisk byte written for OUT, no data byte
  written to the guest for IN). OUT on a read-only device (VIRTIO_BLK_F_RO offered): IOERR.
- FLUSH: OK when VIRTIO_BLK_F_FLUSH was negotiated (a ramdisk has no volatile cache), else UNSUPP.
- GET_ID: the 20-byte serial, truncated to the buffer*; always supported (no feature bit).
- DISCARD / WRITE_ZEROES: UNSUPP unless negotiated. The payload is a list of 16-byte segments
  {le64 sector, le32 num_sectors, le32 flags}; a payload that is empty or not a multiple of 16,
  more segments than max_*_seg, a segment over max_*_sectors or outside the capacity is IOERR*;
  an unknown flag, or UNMAP on a discard, is UNSUPP (§5.2.6.2). Every segment is validated before
  any is applied. Both zero their ranges (a discarded sector reads as zeroes afterwards, which
  the spec allows); WRITE_ZEROES on a read-only device, and DISCARD there, are IOERR.
- Any other type: UNSUPP.
- *Malformed requests are bad input*: no device-writable byte for the status, or fewer than 16
  device-readable bytes for the header. The spec leaves the device no way to answer the first
  and makes the second a driver bug; like QEMU's virtio-blk (``virtio_error``), the device
  stops the queue (``BLK_BAD_*`` in ``VirtQueue.broken``; the parent sets DEVICE_NEEDS_RESET),
  writes nothing for that chain and leaves it unconsumed (the avail position stays on it).

Used length*: the number of bytes written contiguously from the start of the writable part:
all of it (data and status) when the data part was filled, as for a successful IN or any
request without a data-in part; otherwise only the data prefix written (0 for a failed IN),
the status byte being written beyond it, which §2.7.8.2 permits ("MAY write more than len").
"""

import mmap

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from vdpacert.impl.virtqueue cimport POP_CHAIN, POP_EMPTY, POP_NO_SPACE, VQ_OK, Chain, VirtQueue

from vdpacert.uapi.virtio_blk import (
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_WRITE_ZEROES,
)


# Request types and status values (virtio v1.3 §5.2.6).
cdef enum:
    T_IN = 0
    T_OUT = 1
    T_FLUSH = 4
    T_GET_ID = 8
    T_DISCARD = 11
    T_WRITE_ZEROES = 13
    S_OK = 0
    S_IOERR = 1
    S_UNSUPP = 2
    F_UNMAP = 1
    OUTHDR_SIZE = 16
    SEG_SIZE = 16

cdef uint64_t SECTOR_SIZE = 1 << BLK_SECTOR_SHIFT

BAD_NO_STATUS = BLK_BAD_NO_STATUS
BAD_SHORT_HEADER = BLK_BAD_SHORT_HEADER
MAX_DWZ_SEGS = BLK_MAX_DWZ_SEGS
BATCH = BLK_BATCH
ID_BYTES = BLK_ID_BYTES

#: Names of the queue-breaking codes this module adds to VirtQueue's.
STATUS_NAMES = {
    BLK_BAD_NO_STATUS: "request without a device-writable status byte",
    BLK_BAD_SHORT_HEADER: "request header shorter than 16 bytes",
}


cdef inline uint32_t le32(const uint8_t *p) noexcept nogil:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline uint64_t le64(const uint8_t *p) noexcept nogil:
    return le32(p) | (<uint64_t>le32(p + 4) << 32)


cdef class Ramdisk:
    """``capacity`` 512-byte sectors of zeroed anonymous memory (reserved lazily by the kernel)."""

    def __cinit__(self, uint64_t capacity):
        cdef unsigned char[::1] view
        if capacity == 0:
            raise ValueError("a ramdisk needs at least one sector")
        if capacity > (<uint64_t>1 << 40):
            raise ValueError(f"capacity {capacity} sectors is beyond what a ramdisk can map")
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        try:
            self._map = mmap.mmap(-1, capacity << BLK_SECTOR_SHIFT, flags=flags,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, OverflowError) as error:
            raise ValueError(f"cannot map a ramdisk of {capacity} sectors: {error}") from error
        view = self._map
        self._view = view
        self.base = &view[0]
        self.capacity = capacity
        self.size = capacity << BLK_SECTOR_SHIFT

    def _span(self, uint64_t sector, uint64_t length):
        if sector > self.capacity or length > self.size - (sector << BLK_SECTOR_SHIFT):
            raise IndexError(f"{length} bytes at sector {sector} run past the capacity of {self.capacity} sectors")

    def read(self, uint64_t sector, uint64_t length) -> bytes:
        """``length`` bytes from ``sector`` (IndexError past the capacity)."""
        self._span(sector, length)
        return (<char *>self.base + (sector << BLK_SECTOR_SHIFT))[:length]

    def write(self, uint64_t sector, const unsigned char[::1] data not None) -> None:
        """Store ``data`` at ``sector`` (IndexError past the capacity, nothing written)."""
        cdef uint64_t length = data.shape[0]
        self._span(sector, length)
        if length:
            memcpy(self.base + (sector << BLK_SECTOR_SHIFT), &data[0], length)

    def fill(self, int value) -> None:
        """Set every byte to ``value`` (tests use it to see what a request changed)."""
        memset(self.base, value & 0xFF, self.size)

    def digest(self) -> bytes:
        """A hash of the whole disk, to compare states cheaply."""
        import hashlib
        return hashlib.blake2b(self._map, digest_size=16).digest()

    def __len__(self):
        return self.size

    def __repr__(self):
        return f"Ramdisk({self.capacity} sectors)"


cdef class BlkBackend:
    """The request handler of one sim-blk device: its ramdisk, its limits and the negotiated features."""

    def __cinit__(self, Ramdisk disk not None, *, bint read_only=False, bytes serial=b"",
                  uint32_t max_discard_sectors=0xFFFFFFFF, uint32_t max_discard_seg=16,
                  uint32_t max_write_zeroes_sectors=0xFFFFFFFF, uint32_t max_write_zeroes_seg=16):
        if len(serial) > BLK_ID_BYTES:
            raise ValueError(f"a virtio-blk serial has at most {BLK_ID_BYTES} bytes")
        for limit in (max_discard_seg, max_write_zeroes_seg):
            if not 1 <= limit <= BLK_MAX_DWZ_SEGS:
                raise ValueError(f"a segment limit must be in [1, {BLK_MAX_DWZ_SEGS}], got {limit}")
        self.disk = disk
        self.read_only = read_only
        memset(self.serial, 0, BLK_ID_BYTES)
        if serial:
            memcpy(self.serial, <const char *>serial, len(serial))
        self.max_discard_sectors = max_discard_sectors
        self.max_discard_seg = max_discard_seg
        self.max_write_zeroes_sectors = max_write_zeroes_sectors
        self.max_write_zeroes_seg = max_write_zeroes_seg
        self.configure(0)

    def configure(self, features: int) -> None:
        """The negotiated features (FEATURES_OK): which optional request types are answered."""
        features = int(features)
        self.flush = bool(features >> VIRTIO_BLK_F_FLUSH & 1)
        self.discard = bool(features >> VIRTIO_BLK_F_DISCARD & 1)
        self.write_zeroes = bool(features >> VIRTIO_BLK_F_WRITE_ZEROES & 1)

    @property
    def serial_bytes(self) -> bytes:
        return (<char *>self.serial)[:BLK_ID_BYTES]

    def reset_stats(self) -> None:
        self.requests = self.ioerr = self.unsupp = 0

    def process(self, VirtQueue vq not None) -> int:
        """Answer every request available on ``vq``; how many were completed.

        The caller checks ``vq.broken`` afterwards: bad input stops the queue (see the module docstring).
        """
        cdef uint64_t completed = 0
        with nogil:
            self.run(vq, &completed)
        return completed

    # ---- the loop (no GIL) ----

    cdef bint _range_ok(self, uint64_t sector, uint64_t sectors) noexcept nogil:
        return sector <= self.disk.capacity and sectors <= self.disk.capacity - sector

    cdef uint8_t _discard_write_zeroes(self, VirtQueue vq, Chain *chain, uint32_t kind,
                                       uint64_t data_len) noexcept nogil:
        cdef uint8_t segs[BLK_MAX_DWZ_SEGS * SEG_SIZE]
        cdef uint64_t count, i, sector
        cdef uint32_t num, flags, max_sectors, max_segs
        cdef bint is_discard = kind == T_DISCARD
        if is_discard:
            max_sectors, max_segs = self.max_discard_sectors, self.max_discard_seg
        else:
            max_sectors, max_segs = self.max_write_zeroes_sectors, self.max_write_zeroes_seg
        if data_len == 0 or data_len % SEG_SIZE:
            return S_IOERR
        count = data_len // SEG_SIZE
        if count > max_segs:
            return S_IOERR
        # One fetch of every segment; validation and application both use this copy.
        if vq.copy_from_chain(chain, OUTHDR_SIZE, segs, data_len) != <int64_t>data_len:
            return S_IOERR
        for i in range(count):
            sector = le64(segs + i * SEG_SIZE)
            num = le32(segs + i * SEG_SIZE + 8)
            flags = le32(segs + i * SEG_SIZE + 12)
            if flags & ~(<uint32_t>F_UNMAP) or (is_discard and flags & F_UNMAP):
                return S_UNSUPP
            if num > max_sectors or not self._range_ok(sector, num):
                return S_IOERR
        if self.read_only:
            return S_IOERR
        for i in range(count):
            sector = le64(segs + i * SEG_SIZE)
            num = le32(segs + i * SEG_SIZE + 8)
            memset(self.disk.base + (sector << BLK_SECTOR_SHIFT), 0, <uint64_t>num << BLK_SECTOR_SHIFT)
        return S_OK

    cdef int _handle(self, VirtQueue vq, Chain *chain, uint32_t *used_len) noexcept nogil:
        # Answer one popped chain: status written, *used_len set; or <0 (bad input / queue broken).
        cdef uint8_t hdr[OUTHDR_SIZE]
        cdef uint8_t status = S_OK
        cdef uint32_t kind
        cdef uint64_t sector, data_out, data_in, prefix = 0, n
        cdef int64_t rc
        if chain.writable_len == 0:
            return BLK_BAD_NO_STATUS
        if chain.readable_len < OUTHDR_SIZE:
            return BLK_BAD_SHORT_HEADER
        vq.copy_from_chain(chain, 0, hdr, OUTHDR_SIZE)
        kind = le32(hdr)
        sector = le64(hdr + 8)
        data_out = chain.readable_len - OUTHDR_SIZE
        data_in = chain.writable_len - 1
        if kind == T_IN:
            if data_in % SECTOR_SIZE or not self._range_ok(sector, data_in >> BLK_SECTOR_SHIFT):
                status = S_IOERR
            elif data_in:
                rc = vq.copy_to_chain(chain, 0, self.disk.base + (sector << BLK_SECTOR_SHIFT), data_in)
                if rc < 0:
                    return <int>rc
                prefix = data_in
        elif kind == T_OUT:
            if self.read_only or data_out % SECTOR_SIZE or not self._range_ok(sector, data_out >> BLK_SECTOR_SHIFT):
                status = S_IOERR
            elif data_out:
                vq.copy_from_chain(chain, OUTHDR_SIZE, self.disk.base + (sector << BLK_SECTOR_SHIFT), data_out)
        elif kind == T_FLUSH:
            status = S_OK if self.flush else S_UNSUPP
        elif kind == T_GET_ID:
            n = data_in if data_in < BLK_ID_BYTES else BLK_ID_BYTES
            if n:
                rc = vq.copy_to_chain(chain, 0, self.serial, n)
                if rc < 0:
                    return <int>rc
            prefix = n
        elif kind == T_DISCARD or kind == T_WRITE_ZEROES:
            if (kind == T_DISCARD and not self.discard) or (kind == T_WRITE_ZEROES and not self.write_zeroes):
                status = S_UNSUPP
            else:
                status = self._discard_write_zeroes(vq, chain, kind, data_out)
        else:
            status = S_UNSUPP
        rc = vq.copy_to_chain(chain, data_in, &status, 1)
        if rc < 0:
            return <int>rc
        if status == S_IOERR:
            self.ioerr += 1
        elif status == S_UNSUPP:
            self.unsupp += 1
        used_len[0] = <uint32_t>chain.writable_len if prefix == data_in else <uint32_t>prefix
        return VQ_OK

    cdef int run(self, VirtQueue vq, uint64_t *completed) noexcept nogil:
        cdef Chain chains[BLK_BATCH]
        cdef uint32_t lens[BLK_BATCH]
        cdef uint32_t n = 0
        cdef int rc
        while True:
            rc = vq.pop(&chains[n])
            if rc == POP_NO_SPACE and n:
                rc = vq.push_batch(chains, lens, n)   # free the arena, then take the chain again
                if rc < 0:
                    return rc
                completed[0] += n
                n = 0
                continue
            if rc != POP_CHAIN:
                break                                 # empty, or the queue is broken (rc < 0)
            rc = self._handle(vq, &chains[n], &lens[n])
            if rc < 0:
                if rc == BLK_BAD_NO_STATUS or rc == BLK_BAD_SHORT_HEADER:
                    vq.unpop(&chains[n])              # not consumed: the avail position stays on it
                    if n and vq.push_batch(chains, lens, n) == VQ_OK:
                        completed[0] += n
                    vq._fail(rc)
                return rc                             # (a copy failure has broken the queue already)
            self.requests += 1
            n += 1
            if n == BLK_BATCH:
                rc = vq.push_batch(chains, lens, n)
                if rc < 0:
                    return rc
                completed[0] += n
                n = 0
        if n:
            if vq.push_batch(chains, lens, n) < 0:
                return vq.broken
            completed[0] += n
        return vq.broken
