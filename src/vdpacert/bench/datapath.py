"""``vdpacert bench datapath``: the reference datapath against the physical and the Python limit.

For every workload (sim-net loopback of 64 B, 1500 B and 64 KiB frames; sim-blk 4 KiB reads),
ring layout (split, packed) and batch size (chains offered per kick), three figures are
measured in the same run, on the same kind of rings in the same guest memory:

- the compiled device, driven through the vhost-vdpa front exactly as userspace drives it
  (IOTLB messages, vring ioctls, a ``kick`` per batch); only the kicks are timed;
- the same ring walk written in pure Python (:mod:`.pyloop`), doing the same copies;
- a plain ``memmove`` of the same bytes between the same buffers: the physical limit.

Descriptors per second counts every descriptor the device consumed (a loopback frame uses
one TX and one RX descriptor; a blk read a header and a data+status descriptor).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from vdpacert.impl.guestmem import GuestMemory
from vdpacert.impl.parent import VdpaParent
from vdpacert.impl.vhost_vdpa import VhostVdpa
from vdpacert.uapi import vhost_types
from vdpacert.uapi.virtio_config import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
)

from . import _memcpy, pyloop
from .rings import Arena, BenchRing, Piece

NET_HDR = 12
QUEUE_SIZE = 256
SECTOR = 512


@dataclass(frozen=True)
class Row:
    workload: str
    ring: str
    batch: int
    desc_per_s: float
    gbytes_per_s: float
    python_desc_per_s: float
    memcpy_gbytes_per_s: float

    @property
    def speedup(self) -> float:
        return self.desc_per_s / self.python_desc_per_s if self.python_desc_per_s else float("inf")

    @property
    def memcpy_fraction(self) -> float:
        return self.gbytes_per_s / self.memcpy_gbytes_per_s if self.memcpy_gbytes_per_s else 0.0

    def as_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Workload:
    name: str
    device: str              # "net" or "blk"
    payload: int             # bytes moved per chain (frame or data bytes)
    descs_per_item: int      # descriptors the device consumes per frame / request


WORKLOADS = (
    Workload("net-64B", "net", 64, 2),
    Workload("net-1500B", "net", 1500, 2),
    Workload("net-64KiB", "net", 65536, 2),
    Workload("blk-4KiB-read", "blk", 4096, 2),
)


def _bring_up(front: VhostVdpa, memory: GuestMemory, features: int, rings: dict[int, BenchRing]) -> None:
    front.set_owner()
    front.set_backend_features(1 << vhost_types.VHOST_BACKEND_F_IOTLB_MSG_V2)
    front.iotlb_update(0, memory.size, memory.uaddr, vhost_types.VHOST_ACCESS_RW)
    front.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
    front.set_features(features)
    front.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK)
    if not front.get_status() & VIRTIO_CONFIG_S_FEATURES_OK:
        raise RuntimeError(f"the device refused features {features:#x}")
    for index, ring in rings.items():
        front.set_vring_num(index, ring.num)
        front.set_vring_base(index, 0x80008000 if ring.packed else 0)
        front.set_vring_addr(index, *ring.addresses)
        front.set_vring_enable(index, True)
    front.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK
                     | VIRTIO_CONFIG_S_DRIVER_OK)


def _features(packed: bool) -> int:
    word = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_ACCESS_PLATFORM)
    return word | (1 << VIRTIO_F_RING_PACKED) if packed else word


def _memory_for(workload: Workload) -> int:
    per_chain = 2 * (workload.payload + NET_HDR + 64) + 64
    return max(1 << 20, per_chain * QUEUE_SIZE + (1 << 16))


def _timed(seconds: float, round_: Callable[[], float]) -> tuple[float, int]:
    """Run rounds until ``seconds`` of timed work; (timed seconds, rounds)."""
    spent, rounds = 0.0, 0
    while spent < seconds or rounds < 3:
        spent += round_()
        rounds += 1
    return spent, rounds


# ---------------------------------------------------------------------------------------------
# The compiled devices.
# ---------------------------------------------------------------------------------------------
def _net_rings(arena: Arena, workload: Workload, packed: bool) -> tuple[BenchRing, BenchRing]:
    size = NET_HDR + workload.payload
    rx = BenchRing(arena, QUEUE_SIZE, [Piece(size, True)], packed=packed)
    tx = BenchRing(arena, QUEUE_SIZE, [Piece(size, False)], packed=packed)
    frame = bytes(NET_HDR) + bytes(range(256)) * (workload.payload // 256) + bytes(workload.payload % 256)
    for (addr,) in tx.buffers:
        arena.memory.write(addr, frame)
    return rx, tx


def _blk_ring(arena: Arena, packed: bool, capacity_sectors: int) -> BenchRing:
    ring = BenchRing(arena, QUEUE_SIZE, [Piece(16, False), Piece(4096 + 1, True)], packed=packed)
    for chain, (header, _data) in enumerate(ring.buffers):
        sector = (chain * 8) % (capacity_sectors - 8)
        arena.memory.write(header, struct.pack("<IIQ", 0, 0, sector))  # VIRTIO_BLK_T_IN
    return ring


def measure_device(workload: Workload, packed: bool, batch: int, seconds: float) -> float:
    """Descriptors per second of the compiled device behind the vhost-vdpa front."""
    memory = GuestMemory(_memory_for(workload))
    arena = Arena(memory)
    device: VdpaParent
    if workload.device == "net":
        from vdpacert.impl.sim_net import create as create_net

        device = create_net("bench-net", mtu=65535, queue_size=QUEUE_SIZE)
        rx, tx = _net_rings(arena, workload, packed)
        rings, kick = {0: rx, 1: tx}, 1
    else:
        from vdpacert.impl.sim_blk import create as create_blk

        capacity = 1 << 15  # 16 MiB
        device = create_blk("bench-blk", capacity=capacity, queue_size=QUEUE_SIZE)
        rings, kick = {0: _blk_ring(arena, packed, capacity)}, 0
    front = VhostVdpa(device)
    try:
        _bring_up(front, memory, _features(packed), rings)
        offered = 0

        def round_() -> float:
            nonlocal offered
            for ring in rings.values():
                ring.offer(batch)
            start = time.perf_counter()
            front.kick(kick)
            spent = time.perf_counter() - start
            offered += batch
            return spent

        spent, rounds = _timed(seconds, round_)
        _check_completed(rings, kick, offered, packed)
        return rounds * batch * workload.descs_per_item / spent
    finally:
        front.close()
        memory.close()


def _check_completed(rings: dict[int, BenchRing], kick: int, offered: int, packed: bool) -> None:
    """A benchmark of a device that did nothing would be a lie: every offered chain must be used."""
    if packed:
        if not all(ring.last_offered_used() for ring in rings.values()):
            raise RuntimeError("the device left offered chains unused")
        return
    used = rings[kick].used_idx()
    if used != offered & 0xFFFF:
        raise RuntimeError(f"the device used {used} of {offered & 0xFFFF} chains")


# ---------------------------------------------------------------------------------------------
# The pure-Python ring walk, on its own rings of the same shape.
# ---------------------------------------------------------------------------------------------
def _py_queue(mem: memoryview, iotlb: pyloop.PyIotlb, ring: BenchRing) -> pyloop.PySplitQueue | pyloop.PyPackedQueue:
    if ring.packed:
        return pyloop.PyPackedQueue(mem, iotlb, ring.num, ring.desc)
    return pyloop.PySplitQueue(mem, iotlb, ring.num, *ring.addresses)


def measure_python(workload: Workload, packed: bool, batch: int, seconds: float) -> float:
    memory = GuestMemory(_memory_for(workload), register=False)
    arena = Arena(memory)
    mem = pyloop.guest_buffer(memory.uaddr, memory.size)
    iotlb = pyloop.PyIotlb([(0, memory.size, 0)])
    done = [0]  # chains the Python walk completed, checked against what was offered
    try:
        if workload.device == "net":
            rx_ring, tx_ring = _net_rings(arena, workload, packed)
            rx, tx = _py_queue(mem, iotlb, rx_ring), _py_queue(mem, iotlb, tx_ring)

            def work() -> None:
                while (taken := tx.pop()) is not None:
                    into = rx.pop()
                    if into is None:
                        raise RuntimeError("no RX buffer")
                    written = pyloop.copy_chain(mem, taken[1], into[1])
                    _push(rx, into, written)
                    _push(tx, taken, 0)
                    done[0] += 1

            rings: tuple[BenchRing, ...] = (rx_ring, tx_ring)
        else:
            capacity = 1 << 15
            disk = bytearray(capacity * SECTOR)
            ring = _blk_ring(arena, packed, capacity)
            queue = _py_queue(mem, iotlb, ring)

            def work() -> None:
                while (taken := queue.pop()) is not None:
                    (hdr_off, _hdr_len, _), (data_off, data_len, _) = taken[1]
                    kind, _prio, sector = struct.unpack_from("<IIQ", mem, hdr_off)
                    start = sector * SECTOR
                    if kind != 0 or start + data_len - 1 > len(disk):
                        raise RuntimeError("unexpected request")
                    mem[data_off:data_off + data_len - 1] = disk[start:start + data_len - 1]
                    mem[data_off + data_len - 1] = 0  # VIRTIO_BLK_S_OK
                    _push(queue, taken, data_len)
                    done[0] += 1

            rings = (ring,)

        def round_() -> float:
            for ring_ in rings:
                ring_.offer(batch)
            start = time.perf_counter()
            work()
            return time.perf_counter() - start

        spent, rounds = _timed(seconds, round_)
        if done[0] != rounds * batch:
            raise RuntimeError(f"the Python walk completed {done[0]} of {rounds * batch} chains")
        return rounds * batch * workload.descs_per_item / spent
    finally:
        mem.release()
        memory.close()


def _push(queue: pyloop.PySplitQueue | pyloop.PyPackedQueue, taken: tuple[Any, ...], written: int) -> None:
    if isinstance(queue, pyloop.PyPackedQueue):
        queue.push(taken[0], written, taken[2])
    else:
        queue.push(taken[0], written)


# ---------------------------------------------------------------------------------------------
# memcpy of the same bytes between the same buffers.
# ---------------------------------------------------------------------------------------------
def measure_memcpy(workload: Workload, seconds: float) -> float:
    """GB/s of ``memcpy`` moving the same bytes between the same kind of buffers, in a C loop.

    Net: each TX buffer's frame into its RX buffer. Blk: each request's 4 KiB from a disk-sized
    region at the request's sector into its data buffer. The same working set as the device run.
    """
    size = _memory_for(workload)
    if workload.device == "blk":
        size += (1 << 15) * SECTOR
    memory = GuestMemory(size, register=False)
    arena = Arena(memory)
    try:
        if workload.device == "net":
            rx, tx = _net_rings(arena, workload, packed=False)
            pairs = [(memory.uaddr + t[0] + NET_HDR, memory.uaddr + r[0] + NET_HDR)
                     for t, r in zip(tx.buffers, rx.buffers, strict=True)]
        else:
            ring = _blk_ring(arena, False, 1 << 15)
            disk = memory.uaddr + arena.alloc((1 << 15) * SECTOR, 4096)
            pairs = [(disk + (chain * 8) % ((1 << 15) - 8) * SECTOR, memory.uaddr + data)
                     for chain, (_header, data) in enumerate(ring.buffers)]
        rounds, spent = 1, 0.0
        while spent < seconds:
            spent = _memcpy.copy_pairs(pairs, workload.payload, rounds)
            rounds *= 2
        return (rounds // 2) * len(pairs) * workload.payload / spent / 1e9
    finally:
        memory.close()


def run(seconds: float = 0.25, *, batches: tuple[int, ...] = (1, 32), workloads: tuple[Workload, ...] = WORKLOADS,
        progress: Callable[[str], None] | None = None) -> Iterator[Row]:
    memcpy_cache: dict[int, float] = {}
    for workload in workloads:
        if workload.payload not in memcpy_cache:
            memcpy_cache[workload.payload] = measure_memcpy(workload, seconds)
        for packed in (False, True):
            for batch in batches:
                ring = "packed" if packed else "split"
                if progress:
                    progress(f"{workload.name} {ring} batch {batch}")
                device = measure_device(workload, packed, batch, seconds)
                python = measure_python(workload, packed, batch, seconds)
                items_per_s = device / workload.descs_per_item
                yield Row(workload.name, ring, batch, device, items_per_s * workload.payload / 1e9, python,
                          memcpy_cache[workload.payload])
