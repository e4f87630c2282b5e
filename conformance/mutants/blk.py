"""Seeded blk bugs: a vendor's request loop written in Python over the compiled queue, with one check wrong.

:class:`PyLoopBlk` is sim-blk with its IN, OUT, FLUSH, GET_ID and unknown-type requests answered
by a Python loop (``pop_chain`` / ``read_chain`` / ``write_chain`` / ``push_chain``) instead of
the compiled one, giving the same answers (:func:`~vdpacert.conformance.mutants.guest.blk_answer`).
DISCARD, WRITE_ZEROES and malformed requests go back to the compiled loop. The mutants each
replace one hook of that loop.
"""

from __future__ import annotations

from vdpacert.conformance.mutants.guest import OUTHDR, BlkRequest, blk_answer, used_len
from vdpacert.impl.sim_blk import SimBlk
from vdpacert.uapi import virtio_blk as B  # noqa: N812 - read like the C names

__all__ = ["BlkWritePastCapacity", "GetIdNotNulPadded", "PyLoopBlk"]

_LEFT_TO_COMPILED = (B.VIRTIO_BLK_T_DISCARD, B.VIRTIO_BLK_T_WRITE_ZEROES)


class PyLoopBlk(SimBlk):
    """sim-blk answering IN / OUT / FLUSH / GET_ID / unknown types in Python (honest as written)."""

    def range_ok(self, capacity: int, sector: int, sectors: int) -> bool:
        """Whether ``sectors`` sectors from ``sector`` lie inside the disk."""
        return sector <= capacity and sectors <= capacity - sector

    def id_answer(self, serial: bytes, room: int) -> bytes:
        """The GET_ID bytes for a data area of ``room`` bytes (``serial`` is NUL-padded to 20)."""
        return serial[:min(room, B.VIRTIO_BLK_ID_BYTES)]

    def disk_read(self, sector: int, length: int) -> bytes:
        return self.disk.read(sector, length)

    def disk_write(self, sector: int, data: bytes) -> None:
        self.disk.write(sector, data)

    def answer(self, request: BlkRequest) -> tuple[int, bytes, int | None] | None:
        """``(status, data, used length or None for the honest one)``; None leaves the request to the compiled loop."""
        if request.kind in _LEFT_TO_COMPILED:
            return None
        status, data = blk_answer(self.disk_read, self.disk_write, capacity=self.capacity,
                                  read_only=self.read_only, flush=self.backend.flush,
                                  serial=self.backend.serial_bytes, request=request,
                                  range_ok=self.range_ok, id_answer=self.id_answer)
        return status, data, None

    def process(self, index: int) -> None:
        vq = self.vq(index)
        while True:
            chain = vq.pop_chain()
            if chain is None:
                return
            header = vq.read_chain(chain, 0, OUTHDR) if chain.writable_len and chain.readable_len >= OUTHDR else b""
            request = BlkRequest.parse(vq.read_chain(chain), chain.writable_len) if header else None
            answer = None if request is None else self.answer(request)
            if request is None or answer is None:
                vq.unpop_chain(chain)
                self.backend.process(vq)  # malformed (breaks the queue) or not ours: the compiled loop
                return
            status, data, length = answer
            written = vq.write_chain(chain, 0, data) if data else 0
            vq.write_chain(chain, request.data_in_len, bytes([status]))
            vq.push_chain(chain, used_len(written, request.data_in_len, chain.writable_len) if length is None
                          else length)


class BlkWritePastCapacity(PyLoopBlk):
    """Bug: the capacity check looks at the first sector only; a write running off the end is stored
    as far as it fits and answered OK (a read past the end returns zeroes)."""

    def range_ok(self, capacity: int, sector: int, sectors: int) -> bool:
        return sector < capacity

    def disk_read(self, sector: int, length: int) -> bytes:
        fits = max(0, min(length, (self.capacity - sector) * B.VIRTIO_BLK_SECTOR_SIZE))
        return self.disk.read(sector, fits) + bytes(length - fits)

    def disk_write(self, sector: int, data: bytes) -> None:
        fits = max(0, min(len(data), (self.capacity - sector) * B.VIRTIO_BLK_SECTOR_SIZE))
        self.disk.write(sector, data[:fits])


class GetIdNotNulPadded(PyLoopBlk):
    """Bug: GET_ID copies strlen(serial) bytes (a C string copy) and leaves the rest of the 20-byte area as it was."""

    def id_answer(self, serial: bytes, room: int) -> bytes:
        return serial.rstrip(b"\0")[:min(room, B.VIRTIO_BLK_ID_BYTES)]
