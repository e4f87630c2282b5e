"""What a guest does while it is migrated: net frames, blk writes and CPU writes at set rates.

Rates are per second of *simulated* time (the migration's :class:`~vdpacert.migration.link.SimClock`):
:meth:`Workload.run` is told how long the guest ran and does that much work, for real, through
the guest's driver and device. Everything it does is recorded so the end of a migration can
prove nothing was lost: every frame carries a sequence number (``NetStream``: loss, duplication
and reordering per queue pair), every blk write a per-sector pattern (``BlkShadow``: what each
sector must read back as). Two workloads made with the same config and seed do exactly the same
operations in the same order, which is what the differential run against an unmigrated twin
relies on.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from vdpacert.conformance.driver import DeviceViolation
from vdpacert.conformance.driver.device import BlkCompletion
from vdpacert.conformance.driver.memory import PAGE
from vdpacert.conformance.driver.split import Chain
from vdpacert.conformance.driver.traffic import (
    OUTHDR,
    SECTOR,
    BlkRequest,
    BlkShadow,
    NetStream,
    blk_in,
    blk_out,
)
from vdpacert.migration.guest import Guest
from vdpacert.uapi import virtio_blk as B  # noqa: N812
from vdpacert.uapi import virtio_net as N  # noqa: N812
from vdpacert.uapi.virtio_ids import VIRTIO_ID_NET

__all__ = ["Workload", "WorkloadConfig", "WorkloadError"]

#: Most chains one batch puts on a ring (a batch must fit the ring with room to spare).
_BATCH = 32
#: Sectors one read-back request covers.
_READ_SECTORS = 64
_CPU_WRITE = 64  # bytes the guest CPU writes into a page it dirties


class WorkloadError(Exception):
    """The guest saw something wrong: a lost or duplicated frame, a blk error, disk contents not as written."""


@dataclass(frozen=True)
class WorkloadConfig:
    """A scenario's ``[workload]`` table (see docs/scenarios.md)."""

    net_frames_per_s: float = 0.0
    frame_bytes: int = 256
    blk_writes_per_s: float = 0.0
    blk_write_sectors: int = 8
    cpu_pages_per_s: float = 0.0
    cpu_working_set_mib: int = 0
    inflight: int = 0
    chain_spans_ring: bool = False
    seed: int = 0


@dataclass
class _Credit:
    """Fractional operations owed: a rate times a duration is rarely a whole number."""

    owed: float = 0.0

    def take(self, rate: float, seconds: float) -> int:
        self.owed += rate * seconds
        whole = int(self.owed)
        self.owed -= whole
        return whole


@dataclass
class WorkloadStats:
    frames: int = 0
    blk_writes: int = 0
    cpu_pages: int = 0
    ops: list[str] = field(default_factory=list)


class Workload:
    """Drives one :class:`Guest` (see the module docstring)."""

    def __init__(self, guest: Guest, config: WorkloadConfig) -> None:
        self.guest = guest
        self.config = config
        self.rng = random.Random(config.seed)
        self.stats = WorkloadStats()
        self._net, self._blk, self._cpu = _Credit(), _Credit(), _Credit()
        self.is_net = guest.device_id == VIRTIO_ID_NET
        # A batch must fit its ring with room to spare (in-flight chains, a chain as long as the ring):
        # a TX chain takes 2 descriptors, a blk request 3.
        # A blk batch is writes plus as many reads: 6 descriptors per write.
        self.batch = max(1, min(_BATCH, guest.config.queue_size // (4 if self.is_net else 12)))
        self.pairs = 1
        self.streams: dict[int, NetStream] = {}
        self.rx_posted: dict[int, list[Chain]] = {}
        self.capacity = 0 if self.is_net else int.from_bytes(guest.vmm.client.get_config(0, 8), "little")
        self.shadow = BlkShadow(self.capacity) if not self.is_net else None
        self.written: set[int] = set()
        self._to_read: list[int] = []  # sectors of the last batch of writes, read with the next batch
        self.pending: dict[int, list[Chain]] = {}  # blk: requests submitted and not yet completed, per queue
        working_set = config.cpu_working_set_mib << 20
        if config.cpu_pages_per_s:
            room = guest.layout.free_bytes // 2 // PAGE * PAGE
            size = min(working_set or room, room)
            self.cpu_region = guest.layout.alloc(size, PAGE, what="guest CPU working set", fill=0)
            self.cpu_pages = size // PAGE
        else:
            self.cpu_region, self.cpu_pages = 0, 0

    # ----- the steady state -------------------------------------------------------------------------------

    def run(self, seconds: float) -> None:
        """Do ``seconds`` worth of work at the configured rates."""
        if seconds <= 0:
            return
        frames = self._net.take(self.config.net_frames_per_s, seconds) if self.is_net else 0
        writes = self._blk.take(self.config.blk_writes_per_s, seconds) if not self.is_net else 0
        pages = self._cpu.take(self.config.cpu_pages_per_s, seconds) if self.cpu_pages else 0
        while frames:
            batch = min(frames, self.batch)
            self._net_batch(batch)
            frames -= batch
        while writes:
            batch = min(writes, self.batch)
            self._blk_batch(batch)
            writes -= batch
        for _ in range(pages):
            page = self.rng.randrange(self.cpu_pages)
            offset = self.cpu_region + page * PAGE + self.rng.randrange(PAGE // _CPU_WRITE) * _CPU_WRITE
            self.guest.layout.write(offset, self.rng.randbytes(_CPU_WRITE))
        self.stats.cpu_pages += pages

    def _stream(self, pair: int) -> NetStream:
        return self.streams.setdefault(pair, NetStream())

    def _net_batch(self, count: int) -> None:
        session = self.guest.session
        per_pair: dict[int, int] = {}
        for _ in range(count):
            pair = self.stats.frames % self.pairs
            per_pair[pair] = per_pair.get(pair, 0) + 1
            self.stats.frames += 1
        for pair, n in sorted(per_pair.items()):
            stream = self._stream(pair)
            session.post_rx(pair, n, kick=False)
            session.send_frames(pair, stream.frames(n, self.config.frame_bytes))
            self._receive(pair, n)
            session.tx_done(pair, n)

    def _receive(self, pair: int, count: int) -> None:
        try:
            # The guest's driver reads headers as Linux's does: num_buffers only with MRG_RXBUF (Linux's
            # vdpa_sim_net leaves the transmit header's 0 there; the conformance suite reports that).
            for frame in self.guest.session.receive_frames(pair, count, check_num_buffers=False):
                self._stream(pair).receive(frame)
        except DeviceViolation as error:
            raise WorkloadError(f"pair {pair}: {error}") from error

    def _blk_batch(self, count: int) -> None:
        """``count`` pattern writes, submitted with reads of the previous batch's sectors (one kick).

        The reads are what a guest's page cache does: buffers the device fills, in pages the guest does
        not write itself, so a device write the migration fails to find dirty leaves a page behind.
        Only sectors whose writes have completed are read: requests in flight together have no order.
        """
        assert self.shadow is not None
        sectors = self.config.blk_write_sectors
        queue = self.stats.blk_writes % len(self.guest.queues)
        writes = []
        for _ in range(count):
            sector = self.rng.randrange(max(1, self.capacity - sectors))
            writes.append(blk_out(sector, self.shadow.write(sector, sectors)))
            self.written.update(range(sector, sector + sectors))
        fresh = {s for w in writes for s in range(w.sector, w.sector + sectors)}
        reads = [blk_in(sector, sectors) for sector in self._to_read
                 if fresh.isdisjoint(range(sector, sector + sectors))]
        self.stats.blk_writes += count
        done = self.guest.session.blk_run(queue, writes + reads)
        self._check_ok(done)
        for completion in done[len(writes):]:
            problems = self.shadow.mismatches(completion.request.sector, completion.data)
            if problems:
                raise WorkloadError("read back: " + "; ".join(problems[:4]))
        self._to_read = [w.sector for w in writes]

    @staticmethod
    def _check_ok(done: list[BlkCompletion]) -> None:
        bad = [c for c in done if c.status != B.VIRTIO_BLK_S_OK]
        if bad:
            raise WorkloadError(f"{len(bad)} blk request(s) failed: status {[c.status for c in bad][:8]}")

    # ----- the guest's control path -----------------------------------------------------------------------

    def set_mac(self, mac: bytes) -> None:
        self._ctrl(N.VIRTIO_NET_CTRL_MAC, N.VIRTIO_NET_CTRL_MAC_ADDR_SET, mac)

    def set_promisc(self, on: bool) -> None:
        self._ctrl(N.VIRTIO_NET_CTRL_RX, N.VIRTIO_NET_CTRL_RX_PROMISC, bytes([on]))

    def set_pairs(self, pairs: int) -> None:
        self._ctrl(N.VIRTIO_NET_CTRL_MQ, N.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, pairs.to_bytes(2, "little"))
        self.pairs = pairs

    def _ctrl(self, cls: int, cmd: int, data: bytes) -> None:
        ack = self.guest.ctrl(cls, cmd, data)
        if ack != N.VIRTIO_NET_OK:
            raise WorkloadError(f"control command {cls}/{cmd} was answered {ack}")

    # ----- moments a scenario asks for --------------------------------------------------------------------

    def leave_inflight(self, count: int) -> None:
        """Make ``count`` chains available and do not wait for them: RX buffers no frame has come for yet,
        blk writes not kicked. At switch-over they are the chains a migration must neither lose nor repeat."""
        if not count:
            return
        session = self.guest.session
        if self.is_net:
            self.rx_posted.setdefault(0, []).extend(session.post_rx(0, count, kick=False))
            return
        assert self.shadow is not None
        sectors = self.config.blk_write_sectors
        for _ in range(count):
            sector = self.rng.randrange(max(1, self.capacity - sectors))
            request = blk_out(sector, self.shadow.write(sector, sectors))
            self.written.update(range(sector, sector + sectors))
            self.pending.setdefault(0, []).append(session.blk_submit(0, request, kick=False))

    def chain_spanning_ring(self) -> None:
        """blk: one OUT request whose chain has as many descriptors as the ring has slots (header,
        queue_size - 2 one-sector data buffers, status): a packed ring's wrap counter flips inside it."""
        if self.is_net:
            raise ValueError("a chain spanning the ring is a blk request here")
        assert self.shadow is not None
        num = self.guest.config.queue_size
        count = num - 2
        sector = self.rng.randrange(max(1, self.capacity - count))
        data = self.shadow.write(sector, count)
        parts = tuple(data[i * SECTOR:(i + 1) * SECTOR] for i in range(count))
        request = BlkRequest(B.VIRTIO_BLK_T_OUT, sector, (OUTHDR.pack(B.VIRTIO_BLK_T_OUT, 0, sector), *parts), (1,))
        self.written.update(range(sector, sector + count))
        self._check_ok(self.guest.session.blk_run(0, [request]))

    # ----- the end: everything accounted for --------------------------------------------------------------

    def drain(self) -> None:
        """Complete everything outstanding: frames still owed, in-flight RX buffers, pending blk requests."""
        session = self.guest.session
        if self.is_net:
            for pair, chains in list(self.rx_posted.items()):
                owed = len(chains)  # buffers posted without frames: send frames for them now, a batch at a time
                while owed:
                    count = min(owed, self.batch)
                    session.send_frames(pair, self._stream(pair).frames(count, self.config.frame_bytes))
                    self._receive(pair, count)
                    session.tx_done(pair, count)
                    self.stats.frames += count
                    owed -= count
                self.rx_posted[pair] = []
            return
        for queue, chains in list(self.pending.items()):
            # A later batch on the same queue may have reaped some of them already (a reap takes every
            # used entry there is): only those still outstanding are waited for.
            ring = session.rings[queue]
            waiting = [c for c in chains if ring.outstanding.get(c.id) is c]
            if waiting:
                session.kick(queue)
                self._check_ok(session.blk_complete(queue, len(waiting)))
            self.pending[queue] = []

    def verify(self) -> str:
        """WorkloadError unless every frame came back exactly once, in order, and the disk reads back as written;
        else :meth:`digest` of what was just read (the disk is read once for both)."""
        problems = []
        for pair, stream in sorted(self.streams.items()):
            try:
                stream.check(in_order=True, complete=True)
            except DeviceViolation as error:
                problems.append(f"pair {pair}: {error.message}")
        disk = self._read_back() if self.shadow is not None else []
        if self.shadow is not None:
            for sector, data in disk:
                problems += self.shadow.mismatches(sector, data)
        if problems:
            raise WorkloadError("; ".join(problems[:8]) + (f" (and {len(problems) - 8} more)" if len(problems) > 8
                                                           else ""))
        return self._digest(disk)

    def _read_back(self) -> list[tuple[int, bytes]]:
        """Every written sector (and its neighbourhood, in whole requests), read through the device."""
        out = []
        starts = sorted({s - s % _READ_SECTORS for s in self.written})
        for batch_start in range(0, len(starts), self.batch):
            chunk = starts[batch_start:batch_start + self.batch]
            requests = [blk_in(s, min(_READ_SECTORS, self.capacity - s)) for s in chunk]
            done = self.guest.session.blk_run(0, requests)
            self._check_ok(done)
            out += [(c.request.sector, c.data) for c in done]
        return out

    def digest(self) -> str:
        """What the guest observed, as one hash: the frames received per pair, and the disk as read back now."""
        return self._digest(self._read_back() if self.shadow is not None else [])

    def _digest(self, disk: list[tuple[int, bytes]]) -> str:
        h = hashlib.sha256()
        for pair, stream in sorted(self.streams.items()):
            h.update(f"{pair}:{stream.received}".encode())
        for sector, data in disk:
            h.update(sector.to_bytes(8, "little") + data)
        return h.hexdigest()
