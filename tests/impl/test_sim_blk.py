"""sim-blk end to end: bring-up through the vhost-vdpa front, rings built by ring_driver, real guest memory.

Every test opens the device as userspace would (SET_OWNER, IOTLB UPDATE messages, SET_FEATURES,
SET_VRING_*, status writes) and talks to it only through rings in guest memory.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdpacert.impl.bus import VdpaBus, default_bus, load_mgmtdevs
from vdpacert.impl.guestmem import GuestMemory
from vdpacert.impl.sim_blk import DEFAULT_FEATURES, SUPPORTED_FEATURES, SimBlk
from vdpacert.impl.vhost_vdpa import VhostVdpa, unpack_iotlb_msg
from vdpacert.uapi import vhost_types as T  # noqa: N812
from vdpacert.uapi import virtio_blk as B  # noqa: N812
from vdpacert.uapi.virtio_config import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
)
from vdpacert.uapi.virtio_ids import VIRTIO_ID_BLOCK
from vdpacert.uapi.virtio_ring import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC

try:
    from .ring_driver import CANARY, NEXT, WRITE, Buffers, Guest, PackedDriver, SplitDriver
except ImportError:
    from ring_driver import CANARY, NEXT, WRITE, Buffers, Guest, PackedDriver, SplitDriver

ACK_DRIVER = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
FEATURES_OK = ACK_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK
DRIVER_OK = FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK
RING_BITS = (1 << VIRTIO_F_RING_PACKED) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_RING_F_INDIRECT_DESC)
LOG_ALL = 1 << T.VHOST_F_LOG_ALL
SECTOR = 512
CAPACITY = 64
PAGE = 4096


def ring_features(packed: bool, *, event_idx: bool = False, indirect: bool = False, log: bool = False,
                  offered: int = DEFAULT_FEATURES) -> int:
    """The offer minus the ring/log bits this test does not want."""
    bits = offered & ~RING_BITS & ~LOG_ALL
    bits |= (1 << VIRTIO_F_RING_PACKED) if packed else 0
    bits |= (1 << VIRTIO_RING_F_EVENT_IDX) if event_idx else 0
    bits |= (1 << VIRTIO_RING_F_INDIRECT_DESC) if indirect else 0
    return bits | (LOG_ALL if log else 0)


class Rig:
    """One sim-blk opened through vhost-vdpa, its guest memory mapped with an IOTLB UPDATE."""

    def __init__(self, guest: Guest, dev: SimBlk, *, packed: bool = False, features: int | None = None,
                 num: int = 16, queues: int = 1, base: int | None = None, start: bool = True,
                 log_used: bool = False, drivers: list[SplitDriver | PackedDriver] | None = None) -> None:
        self.guest, self.dev, self.packed = guest, dev, packed
        self.front = VhostVdpa(dev, guest.registry)
        front = self.front
        front.set_owner()
        front.set_backend_features((1 << T.VHOST_BACKEND_F_IOTLB_MSG_V2) | (1 << T.VHOST_BACKEND_F_SUSPEND)
                                   | (1 << T.VHOST_BACKEND_F_RESUME))
        front.iotlb_update(guest.iova_base, guest.size, guest.mem.uaddr, T.VHOST_ACCESS_RW)
        self.config_fd = self._efd()
        front.set_config_call(self.config_fd)
        front.set_status(ACK_DRIVER)
        front.set_features(ring_features(packed) if features is None else features)
        front.set_status(FEATURES_OK)
        self.drivers: list[SplitDriver | PackedDriver] = []
        self.calls: list[int] = []
        for index in range(queues):
            if drivers is not None:  # rings that already exist (a migration destination)
                driver = drivers[index]
            else:
                driver = PackedDriver(guest, num) if packed else SplitDriver(guest, num)
            self.drivers.append(driver)
            front.set_vring_num(index, driver.num)
            front.set_vring_base(index, (0x8000_8000 if packed else 0) if base is None else base)
            desc, driver_area, device_area = driver.addresses
            used_gpa = guest.gpa(guest.offset_of_iova(device_area))
            front.set_vring_addr(index, desc, driver_area, device_area,
                                 flags=(1 << T.VHOST_VRING_F_LOG) if log_used else 0,
                                 log_guest_addr=used_gpa if log_used else 0)
            self.calls.append(self._efd())
            front.set_vring_call(index, self.calls[-1])
            front.set_vring_enable(index, True)
        if start:
            self.start()

    _fds: list[int]

    def _efd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.__dict__.setdefault("_fds", []).append(fd)
        return fd

    def start(self) -> None:
        self.front.set_status(DRIVER_OK)

    def close(self) -> None:
        self.front.close()
        for fd in self._fds:
            os.close(fd)

    @property
    def driver(self) -> SplitDriver | PackedDriver:
        return self.drivers[0]

    def add(self, kind: int, sector: int = 0, out: bytes = b"", in_len: int = 0, *, queue: int = 0,
            indirect: bool = False) -> int:
        readable = [struct.pack("<IIQ", kind, 0, sector)] + ([out] if out else [])
        writable = ([in_len] if in_len else []) + [1]
        return self.drivers[queue].add(readable, writable, indirect=indirect)

    def request(self, kind: int, sector: int = 0, out: bytes = b"", in_len: int = 0, *, queue: int = 0,
                indirect: bool = False) -> tuple[int, int, bytes]:
        """Submit, kick, and return (status, used length, data-in bytes)."""
        head = self.add(kind, sector, out, in_len, queue=queue, indirect=indirect)
        self.front.kick(queue)
        used = dict(self.drivers[queue].get_used())
        assert head in used, f"request {head} was not answered"
        written = self.drivers[queue].written(head)
        return written[-1], used[head], written[:-1]

    def needs_reset(self) -> bool:
        return bool(self.front.get_status() & VIRTIO_CONFIG_S_NEEDS_RESET)


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def packed(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def rig(guest: Guest, packed: bool) -> Iterator[Rig]:
    r = Rig(guest, SimBlk("blk0", capacity=CAPACITY), packed=packed)
    yield r
    r.close()


def sectors(count: int, seed: int = 1) -> bytes:
    return bytes((seed * 31 + i) & 0xFF for i in range(count * SECTOR))


def dwz_segment(sector: int, num: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, num, flags)


# ----- identity and config ---------------------------------------------------------------------------

def test_device_identity_config_and_offer(rig: Rig) -> None:
    front = rig.front
    assert front.get_device_id() == VIRTIO_ID_BLOCK
    offered = front.get_features()
    for bit in (VIRTIO_F_VERSION_1, 33, VIRTIO_F_RING_PACKED, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
                T.VHOST_F_LOG_ALL, B.VIRTIO_BLK_F_SIZE_MAX, B.VIRTIO_BLK_F_SEG_MAX, B.VIRTIO_BLK_F_BLK_SIZE,
                B.VIRTIO_BLK_F_FLUSH, B.VIRTIO_BLK_F_DISCARD, B.VIRTIO_BLK_F_WRITE_ZEROES):
        assert offered >> bit & 1, bit
    assert not offered >> B.VIRTIO_BLK_F_MQ & 1 and not offered >> B.VIRTIO_BLK_F_RO & 1
    config = front.get_config(0, front.get_config_size())
    assert struct.unpack_from("<Q", config, B.VIRTIO_BLK_CONFIG_CAPACITY)[0] == CAPACITY
    assert struct.unpack_from("<I", config, B.VIRTIO_BLK_CONFIG_SEG_MAX)[0] == 256 - 2
    assert struct.unpack_from("<I", config, B.VIRTIO_BLK_CONFIG_BLK_SIZE)[0] == SECTOR
    assert struct.unpack_from("<H", config, B.VIRTIO_BLK_CONFIG_NUM_QUEUES)[0] == 1
    assert struct.unpack_from("<I", config, B.VIRTIO_BLK_CONFIG_MAX_DISCARD_SEG)[0] == 16
    assert config[B.VIRTIO_BLK_CONFIG_WRITE_ZEROES_MAY_UNMAP] == 1
    front.set_config(B.VIRTIO_BLK_CONFIG_CAPACITY, b"\xff" * 8)  # read-only to the driver
    assert front.get_config(0, 8) == struct.pack("<Q", CAPACITY)


# ----- every request type ---------------------------------------------------------------------------------

def test_out_then_in_round_trips(rig: Rig) -> None:
    data = sectors(3, seed=7)
    assert rig.request(B.VIRTIO_BLK_T_OUT, 5, out=data) == (B.VIRTIO_BLK_S_OK, 1, b"")
    assert rig.dev.disk.read(5, len(data)) == data
    status, used_len, got = rig.request(B.VIRTIO_BLK_T_IN, 5, in_len=len(data))
    assert (status, used_len, got) == (B.VIRTIO_BLK_S_OK, len(data) + 1, data)


def test_indirect_requests(guest: Guest, packed: bool) -> None:
    r = Rig(guest, SimBlk("blk0", capacity=CAPACITY), packed=packed, features=ring_features(packed, indirect=True))
    try:
        data = sectors(2, seed=3)
        assert r.request(B.VIRTIO_BLK_T_OUT, 1, out=data, indirect=True)[0] == B.VIRTIO_BLK_S_OK
        assert r.request(B.VIRTIO_BLK_T_IN, 1, in_len=len(data), indirect=True)[2] == data
    finally:
        r.close()


def test_flush_and_get_id(rig: Rig) -> None:
    assert rig.request(B.VIRTIO_BLK_T_FLUSH, 0)[0] == B.VIRTIO_BLK_S_OK
    status, used_len, serial = rig.request(B.VIRTIO_BLK_T_GET_ID, in_len=B.VIRTIO_BLK_ID_BYTES)
    assert status == B.VIRTIO_BLK_S_OK and used_len == B.VIRTIO_BLK_ID_BYTES + 1
    assert serial == b"vdpacert-blk0".ljust(B.VIRTIO_BLK_ID_BYTES, b"\0")


def test_discard_and_write_zeroes(rig: Rig) -> None:
    rig.dev.disk.write(0, sectors(16, seed=9))
    two = dwz_segment(2, 2) + dwz_segment(10, 1)
    assert rig.request(B.VIRTIO_BLK_T_DISCARD, out=two)[0] == B.VIRTIO_BLK_S_OK
    assert rig.request(B.VIRTIO_BLK_T_WRITE_ZEROES, out=dwz_segment(6, 1, B.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))[0] \
        == B.VIRTIO_BLK_S_OK
    disk = rig.dev.disk.read(0, 16 * SECTOR)
    zeroed = {2, 3, 6, 10}
    for s in range(16):
        chunk = disk[s * SECTOR:(s + 1) * SECTOR]
        assert (chunk == bytes(SECTOR)) == (s in zeroed), s


@pytest.mark.parametrize(("kind", "payload", "expected"), [
    (B.VIRTIO_BLK_T_DISCARD, dwz_segment(1, 1, B.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP), B.VIRTIO_BLK_S_UNSUPP),
    (B.VIRTIO_BLK_T_WRITE_ZEROES, dwz_segment(1, 1, 2), B.VIRTIO_BLK_S_UNSUPP),      # unknown flag
    (B.VIRTIO_BLK_T_WRITE_ZEROES, dwz_segment(1, 1) + dwz_segment(CAPACITY, 1), B.VIRTIO_BLK_S_IOERR),
    (B.VIRTIO_BLK_T_DISCARD, dwz_segment(1, 1)[:12], B.VIRTIO_BLK_S_IOERR),          # not whole segments
    (B.VIRTIO_BLK_T_DISCARD, dwz_segment(0, 1) * 17, B.VIRTIO_BLK_S_IOERR),          # over max_discard_seg
])
def test_bad_discard_or_write_zeroes_changes_nothing(rig: Rig, kind: int, payload: bytes, expected: int) -> None:
    rig.dev.disk.fill(0x5A)
    before = rig.dev.disk.digest()
    assert rig.request(kind, out=payload)[0] == expected
    assert rig.dev.disk.digest() == before  # the valid first segment was not applied either


def test_unknown_type_is_unsupp(rig: Rig) -> None:
    assert rig.request(0x77, 0, out=sectors(1), in_len=SECTOR)[0] == B.VIRTIO_BLK_S_UNSUPP


def test_types_not_negotiated_are_unsupp(guest: Guest, packed: bool) -> None:
    offered = DEFAULT_FEATURES & ~((1 << B.VIRTIO_BLK_F_FLUSH) | (1 << B.VIRTIO_BLK_F_DISCARD)
                                   | (1 << B.VIRTIO_BLK_F_WRITE_ZEROES))
    r = Rig(guest, SimBlk("blk0", capacity=CAPACITY), packed=packed, features=ring_features(packed, offered=offered))
    try:
        r.dev.disk.fill(0x11)
        before = r.dev.disk.digest()
        assert r.request(B.VIRTIO_BLK_T_FLUSH)[0] == B.VIRTIO_BLK_S_UNSUPP
        assert r.request(B.VIRTIO_BLK_T_DISCARD, out=dwz_segment(0, 1))[0] == B.VIRTIO_BLK_S_UNSUPP
        assert r.request(B.VIRTIO_BLK_T_WRITE_ZEROES, out=dwz_segment(0, 1))[0] == B.VIRTIO_BLK_S_UNSUPP
        assert r.dev.disk.digest() == before
    finally:
        r.close()


# ----- capacity, alignment, read-only ---------------------------------------------------------------------

def test_capacity_boundary(rig: Rig) -> None:
    last = sectors(1, seed=5)
    assert rig.request(B.VIRTIO_BLK_T_OUT, CAPACITY - 1, out=last)[0] == B.VIRTIO_BLK_S_OK
    assert rig.dev.disk.read(CAPACITY - 1, SECTOR) == last
    before = rig.dev.disk.digest()
    for sector, count in ((CAPACITY - 1, 2), (CAPACITY, 1), ((1 << 64) - 1, 1), ((1 << 55), 1)):
        assert rig.request(B.VIRTIO_BLK_T_OUT, sector, out=sectors(count))[0] == B.VIRTIO_BLK_S_IOERR
    assert rig.dev.disk.digest() == before  # nothing written
    status, used_len, got = rig.request(B.VIRTIO_BLK_T_IN, CAPACITY, in_len=SECTOR)
    assert (status, used_len) == (B.VIRTIO_BLK_S_IOERR, 0)
    assert got == bytes([CANARY]) * SECTOR  # no data byte written
    assert rig.request(B.VIRTIO_BLK_T_IN, CAPACITY - 1, in_len=SECTOR)[2] == last


def test_partial_sector_is_ioerr(rig: Rig) -> None:
    before = rig.dev.disk.digest()
    assert rig.request(B.VIRTIO_BLK_T_OUT, 0, out=b"x" * 100)[0] == B.VIRTIO_BLK_S_IOERR
    assert rig.request(B.VIRTIO_BLK_T_IN, 0, in_len=100)[0] == B.VIRTIO_BLK_S_IOERR
    assert rig.dev.disk.digest() == before


def test_read_only_device_refuses_writes(guest: Guest, packed: bool) -> None:
    dev = SimBlk("ro", capacity=CAPACITY, read_only=True)
    dev.disk.write(0, sectors(1, seed=2))
    r = Rig(guest, dev, packed=packed, features=ring_features(packed, offered=dev.get_device_features()))
    try:
        assert r.front.get_features() >> B.VIRTIO_BLK_F_RO & 1
        before = dev.disk.digest()
        assert r.request(B.VIRTIO_BLK_T_OUT, 0, out=sectors(1))[0] == B.VIRTIO_BLK_S_IOERR
        assert r.request(B.VIRTIO_BLK_T_WRITE_ZEROES, out=dwz_segment(0, 1))[0] == B.VIRTIO_BLK_S_IOERR
        assert r.request(B.VIRTIO_BLK_T_DISCARD, out=dwz_segment(0, 1))[0] == B.VIRTIO_BLK_S_IOERR
        assert dev.disk.digest() == before
        assert r.request(B.VIRTIO_BLK_T_IN, 0, in_len=SECTOR)[2] == sectors(1, seed=2)
    finally:
        r.close()


# ----- negotiation, notifications, kicks, multiqueue ---------------------------------------------------------

def test_features_ok_refused_for_an_invalid_set(guest: Guest) -> None:
    dev = SimBlk("blk0", capacity=CAPACITY)
    front = VhostVdpa(dev, guest.registry)
    try:
        front.set_status(ACK_DRIVER)
        for bad in (ring_features(False) & ~(1 << VIRTIO_F_VERSION_1), ring_features(False) | (1 << B.VIRTIO_BLK_F_RO)):
            front.set_features(bad)
            front.set_status(FEATURES_OK)
            assert front.get_status() == ACK_DRIVER  # FEATURES_OK left clear
        front.set_features(ring_features(False))
        front.set_status(FEATURES_OK)
        assert front.get_status() == FEATURES_OK
    finally:
        front.close()


def test_event_idx_notifications_and_eventfd_kicks(guest: Guest, packed: bool) -> None:
    r = Rig(guest, SimBlk("blk0", capacity=CAPACITY), packed=packed,
            features=ring_features(packed, event_idx=True))
    try:
        kick = r._efd()
        r.front.set_vring_kick(0, kick)
        head = r.add(B.VIRTIO_BLK_T_OUT, 0, out=sectors(1))
        os.eventfd_write(kick, 1)
        assert r.front.poll_kicks(timeout=1.0) == 1
        assert [h for h, _ in r.driver.get_used()] == [head]
        assert os.eventfd_read(r.calls[0]) >= 1  # the used buffer was signalled
    finally:
        r.close()


def test_multiqueue(guest: Guest, packed: bool) -> None:
    dev = SimBlk("mq", capacity=CAPACITY, num_queues=2)
    assert dev.get_device_features() >> B.VIRTIO_BLK_F_MQ & 1 and dev.nvqs == 2
    r = Rig(guest, dev, packed=packed, queues=2,
            features=ring_features(packed) | (1 << B.VIRTIO_BLK_F_MQ))
    try:
        assert struct.unpack("<H", r.front.get_config(B.VIRTIO_BLK_CONFIG_NUM_QUEUES, 2))[0] == 2
        assert r.request(B.VIRTIO_BLK_T_OUT, 1, out=sectors(1, 1), queue=0)[0] == B.VIRTIO_BLK_S_OK
        assert r.request(B.VIRTIO_BLK_T_OUT, 2, out=sectors(1, 2), queue=1)[0] == B.VIRTIO_BLK_S_OK
        assert r.request(B.VIRTIO_BLK_T_IN, 1, in_len=SECTOR, queue=1)[2] == sectors(1, 1)
    finally:
        r.close()


# ----- reset ------------------------------------------------------------------------------------------------

STATES = ["acked", "features_ok", "driver_ok", "traffic", "suspended", "broken", "restored"]


@pytest.mark.parametrize("state", STATES)
def test_reset_from_any_state_returns_the_initial_state(guest: Guest, packed: bool, state: str) -> None:
    initial = SimBlk("blk0", capacity=CAPACITY).state_snapshot()
    dev = SimBlk("blk0", capacity=CAPACITY)
    if state == "acked":
        front = VhostVdpa(dev, guest.registry)
        front.set_status(ACK_DRIVER)
        r = None
    else:
        r = Rig(guest, dev, packed=packed, start=state not in ("features_ok", "restored"),
                base=(0x8000_8003 if packed else 3) if state == "restored" else None)
        front = r.front
        if state in ("traffic", "suspended"):
            r.request(B.VIRTIO_BLK_T_OUT, 0, out=sectors(1))
        if state == "suspended":
            front.suspend()
            r.add(B.VIRTIO_BLK_T_OUT, 1, out=sectors(1))
            front.kick(0)
        if state == "broken":
            r.driver.add([b"short"], [1])
            front.kick(0)
            assert r.needs_reset()
    assert dev.state_snapshot() != initial
    front.set_status(0)
    assert front.get_status() == 0
    assert dev.state_snapshot() == initial
    if r is not None:
        r.close()
    else:
        front.close()


def test_disk_content_survives_reset_and_the_device_comes_back(guest: Guest) -> None:
    dev = SimBlk("blk0", capacity=CAPACITY)
    r = Rig(guest, dev)
    r.request(B.VIRTIO_BLK_T_OUT, 3, out=sectors(1, 4))
    r.close()  # release resets the device
    r = Rig(guest, dev, packed=True)
    try:
        assert r.request(B.VIRTIO_BLK_T_IN, 3, in_len=SECTOR)[2] == sectors(1, 4)
    finally:
        r.close()


# ----- suspend, vring base, migration -----------------------------------------------------------------------

def expected_base(driver: SplitDriver | PackedDriver) -> int:
    """The vring base the device must report once it has taken everything the driver published."""
    if isinstance(driver, SplitDriver):
        return driver.avail_idx
    half = driver.next_avail | (driver.avail_wrap << 15)
    return half | (half << 16)


def test_suspend_get_vring_base_resume_is_exact(rig: Rig) -> None:
    for i in range(3):
        rig.request(B.VIRTIO_BLK_T_OUT, i, out=sectors(1, i))
    base = expected_base(rig.driver)
    rig.front.suspend()
    pending = [rig.add(B.VIRTIO_BLK_T_OUT, 10 + i, out=sectors(1, 10 + i)) for i in range(2)]
    rig.front.kick(0)
    assert rig.driver.get_used() == []  # nothing processed while suspended
    assert rig.front.get_vring_base(0) == base
    assert rig.front.get_vring_base(0) == base  # and reading it changes nothing
    rig.front.resume()
    assert [h for h, _ in rig.driver.get_used()] == pending
    assert rig.front.get_vring_base(0) == expected_base(rig.driver)
    assert rig.dev.disk.read(11, SECTOR) == sectors(1, 11)


def test_migration_to_a_new_device_continues_exactly_once(guest: Guest, packed: bool) -> None:
    source = Rig(guest, SimBlk("src", capacity=CAPACITY), packed=packed)
    driver = source.driver
    for i in range(2):
        source.request(B.VIRTIO_BLK_T_OUT, i, out=sectors(1, i))
    source.front.suspend()
    pending = [source.add(B.VIRTIO_BLK_T_OUT, 20 + i, out=sectors(1, 20 + i)) for i in range(2)]
    source.front.kick(0)
    base = source.front.get_vring_base(0)
    source.close()
    # destination: same guest memory and ring, a fresh device restored at the source's base
    dest_dev = SimBlk("dst", capacity=CAPACITY)
    dest = Rig(guest, dest_dev, packed=packed, base=base, start=False, drivers=[driver])
    try:
        dest.start()
        assert [h for h, _ in driver.get_used()] == pending  # each pending request once, none replayed
        assert dest_dev.disk.read(20, 2 * SECTOR) == sectors(1, 20) + sectors(1, 21)
        assert dest_dev.disk.read(0, 2 * SECTOR) == bytes(2 * SECTOR)  # the completed ones were not rerun
    finally:
        dest.close()


def test_set_vring_base_with_chains_in_flight(guest: Guest, packed: bool) -> None:
    """The source had taken two chains and not answered them: the destination must answer all three."""
    r = Rig(guest, SimBlk("dst", capacity=CAPACITY), packed=packed, start=False)
    try:
        heads = [r.add(B.VIRTIO_BLK_T_OUT, 30 + i, out=sectors(1, 30 + i)) for i in range(3)]
        if packed:
            taken = 2 * 3  # two requests of three descriptors each (header, data, status)
            r.front.set_vring_base(0, (taken | 0x8000) | (0x8000 << 16))
        else:
            r.front.set_vring_base(0, 2)  # last_avail_idx 2 while the used ring still says 0
        assert r.front.get_vring_base(0) == ((6 | 0x8000 | 0x8000 << 16) if packed else 2)
        r.start()
        used = r.driver.get_used()
        assert sorted(h for h, _ in used) == sorted(heads) and len(used) == 3
        assert r.dev.disk.read(30, 3 * SECTOR) == b"".join(sectors(1, 30 + i) for i in range(3))
        assert r.front.get_vring_base(0) == expected_base(r.driver)
        assert not r.needs_reset()
    finally:
        r.close()


def test_a_base_the_ring_contradicts_needs_reset(guest: Guest) -> None:
    r = Rig(guest, SimBlk("dst", capacity=CAPACITY), base=40, start=False)  # used idx 0 is 40 behind, num 16
    try:
        r.start()
        assert r.needs_reset()
    finally:
        r.close()


# ----- dirty log ----------------------------------------------------------------------------------------------

def pages(gpa: int, length: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1)) if length else set()


def add_split_at(driver: SplitDriver, readable: list[tuple[int, bytes]], writable: list[tuple[int, int]]) -> int:
    """A split chain whose buffers sit at chosen guest offsets (so page boundaries are known)."""
    guest = driver.guest
    for offset, data in readable:
        guest.mem.write(offset, data)
    descs = [(guest.iova(o), len(d), 0) for o, d in readable] + [(guest.iova(o), n, WRITE) for o, n in writable]
    indexes = [driver.free.pop(0) for _ in descs]
    for i, (addr, length, flags) in enumerate(descs):
        more = i + 1 < len(indexes)
        driver.write_desc(indexes[i], addr, length, flags | (NEXT if more else 0), indexes[i + 1] if more else 0)
    driver.chains[indexes[0]] = indexes
    driver.buffers[indexes[0]] = Buffers([(o, len(d)) for o, d in readable], list(writable))
    driver.publish(indexes[0])
    return indexes[0]


@pytest.fixture
def log_memory(guest: Guest) -> Iterator[GuestMemory]:
    # one bit per page of guest-physical space up to the end of the guest region
    size = (guest.gpa(guest.size) // PAGE) // 8 + 1
    mem = GuestMemory(size, gpa=0x9_0000_0000, register=False)
    guest.registry.add(mem)
    yield mem
    mem.close()


def test_dirty_log_marks_exactly_the_written_pages(guest: Guest, log_memory: GuestMemory) -> None:
    dev = SimBlk("blk0", capacity=CAPACITY)
    r = Rig(guest, dev, features=ring_features(False, log=True), log_used=True)
    try:
        log_fd = r._efd()
        r.front.set_log_base(log_memory.uaddr)
        r.front.set_log_fd(log_fd)
        driver = r.driver
        assert isinstance(driver, SplitDriver)
        dev.disk.write(0, sectors(2, 8))
        hdr_off, data_off, status_off = 100 * PAGE, 101 * PAGE + 2048, 104 * PAGE + 5
        head = add_split_at(driver, [(hdr_off, struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, 0))],
                            [(data_off, 2 * SECTOR), (status_off, 1)])
        r.front.kick(0)
        assert driver.get_used() == [(head, 2 * SECTOR + 1)]
        used = guest.gpa(driver.used)
        expected = (pages(guest.gpa(data_off), 2 * SECTOR) | pages(guest.gpa(status_off), 1)
                    | pages(used + 2, 2) | pages(used + 4, 8))
        assert set(dev.dirty_log.dirty_pages()) == expected
        assert os.eventfd_read(log_fd) >= 1
        # a write request dirties only its status byte and the used ring: the data it sends is read
        log_memory.fill(0, log_memory.size, 0)
        out_off, status2 = 110 * PAGE, 111 * PAGE
        add_split_at(driver, [(hdr_off, struct.pack("<IIQ", B.VIRTIO_BLK_T_OUT, 0, 4)), (out_off, sectors(1))],
                     [(status2, 1)])
        r.front.kick(0)
        assert set(dev.dirty_log.dirty_pages()) == pages(guest.gpa(status2), 1) | pages(used + 2, 2) | pages(
            used + 4 + 8, 8)
    finally:
        r.close()


def test_dirty_log_on_a_packed_ring(guest: Guest, log_memory: GuestMemory) -> None:
    dev = SimBlk("blk0", capacity=CAPACITY)
    r = Rig(guest, dev, packed=True, features=ring_features(True, log=True), log_used=True)
    try:
        r.front.set_log_base(log_memory.uaddr)
        driver = r.driver
        assert isinstance(driver, PackedDriver)
        head = r.add(B.VIRTIO_BLK_T_IN, 0, in_len=SECTOR)
        r.front.kick(0)
        assert [h for h, _ in driver.get_used()] == [head]
        buffers = driver.buffers[head]
        expected = set().union(*(pages(guest.gpa(o), n) for o, n in buffers.writable))
        expected |= pages(guest.gpa(driver.desc) + 8, 8)  # the used descriptor written over slot 0
        assert set(dev.dirty_log.dirty_pages()) == expected
    finally:
        r.close()


# ----- hostile chains -------------------------------------------------------------------------------------------

def hostile_no_status(r: Rig) -> None:
    r.driver.add([struct.pack("<IIQ", B.VIRTIO_BLK_T_OUT, 0, 0), sectors(1)], [])


def hostile_short_header(r: Rig) -> None:
    r.driver.add([struct.pack("<II", B.VIRTIO_BLK_T_OUT, 0)], [1])


def hostile_loop(r: Rig) -> None:
    driver = r.driver
    iova = r.guest.iova(r.guest.alloc(16))
    if isinstance(driver, SplitDriver):
        driver.write_desc(0, iova, 16, NEXT, 0)  # descriptor 0 chains to itself
        driver.publish(0)
    else:  # a packed chain that never ends: every slot says NEXT
        for slot in range(driver.num):
            driver.write_desc(slot, iova, 16, 0, NEXT | driver.avail_flags(1))


def hostile_unmapped(r: Rig) -> None:
    driver = r.driver
    hdr = r.guest.iova(r.guest.alloc(16))
    if isinstance(driver, SplitDriver):
        driver.write_desc(0, hdr, 16, NEXT, 1)
        driver.write_desc(1, 0x9000_0000, 1, WRITE, 0)
        driver.publish(0)
    else:
        driver.write_desc(1, 0x9000_0000, 1, 0, WRITE | driver.avail_flags(1))
        driver.write_desc(0, hdr, 16, 0, NEXT | driver.avail_flags(1))


@pytest.mark.parametrize("attack", [hostile_no_status, hostile_short_header, hostile_loop, hostile_unmapped])
def test_a_hostile_chain_sets_needs_reset_and_writes_nothing(rig: Rig, attack: object) -> None:
    rig.dev.disk.fill(0x33)
    disk_before = rig.dev.disk.digest()
    attack(rig)  # type: ignore[operator]
    memory_before = rig.guest.snapshot()
    base_before = rig.front.get_vring_base(0)
    rig.front.kick(0)
    assert rig.needs_reset()
    assert os.eventfd_read(rig.config_fd) >= 1  # the driver is told through the config interrupt
    assert rig.guest.snapshot() == memory_before  # not one guest byte written
    assert rig.dev.disk.digest() == disk_before
    assert rig.front.get_vring_base(0) == base_before  # the chain was not consumed
    if attack is hostile_unmapped:
        message = rig.front.read()
        assert message is not None
        _, asid, iova, _, _, perm, msg_type = unpack_iotlb_msg(message)
        assert (msg_type, asid, iova, perm) == (T.VHOST_IOTLB_MISS, 0, 0x9000_0000, T.VHOST_ACCESS_WO)
    # the broken queue stays stopped: a good request is not taken until reset
    rig.front.kick(0)
    assert rig.driver.get_used() == []


def test_requests_before_a_hostile_one_are_answered(guest: Guest) -> None:
    r = Rig(guest, SimBlk("blk0", capacity=CAPACITY))
    try:
        good = r.add(B.VIRTIO_BLK_T_OUT, 2, out=sectors(1, 2))
        hostile_short_header(r)
        r.front.kick(0)
        assert [h for h, _ in r.driver.get_used()] == [good]
        assert r.dev.disk.read(2, SECTOR) == sectors(1, 2)
        assert r.needs_reset() and r.front.get_vring_base(0) == 1
    finally:
        r.close()


# ----- the management device ------------------------------------------------------------------------------------

def test_sim_blk_management_device() -> None:
    bus = VdpaBus()
    assert "sim-blk" in load_mgmtdevs(bus)
    shown = bus.mgmtdev_show("sim-blk")[0]
    assert shown["supported_classes"] == ["block"] and shown["dev_features"] == SUPPORTED_FEATURES
    device = bus.dev_add("blk7", "sim-blk", capacity=128, num_queues=2, queue_size=64)
    assert isinstance(device.parent, SimBlk) and device.parent.capacity == 128 and device.parent.nvqs == 2
    config = bus.dev_config_show("blk7")
    assert config["capacity"] == 128 and config["num_queues"] == 2 and config["seg_max"] == 62
    for attrs in ({"capacity": 0}, {"features": 1 << 50}, {"features": 1 << B.VIRTIO_BLK_F_FLUSH}):
        with pytest.raises(OSError) as refused:
            bus.dev_add("bad", "sim-blk", **attrs)
        assert refused.value.errno == errno.EINVAL
    ro = bus.dev_add("ro", "sim-blk", capacity=8, features=DEFAULT_FEATURES | (1 << B.VIRTIO_BLK_F_RO))
    assert isinstance(ro.parent, SimBlk) and ro.parent.read_only
    bus.dev_del("blk7")
    bus.dev_del("ro")


# ----- a property: the disk behaves like a byte array ------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, CAPACITY + 2), st.integers(1, 4), st.integers(0, 255)),
                min_size=1, max_size=12),
       st.booleans())
def test_reads_and_writes_match_a_plain_byte_array(ops: list[tuple[bool, int, int, int]], packed: bool) -> None:
    guest = Guest()
    r = Rig(guest, SimBlk("prop", capacity=CAPACITY), packed=packed, num=8)
    model = bytearray(CAPACITY * SECTOR)
    try:
        for write, sector, count, seed in ops:
            inside = sector + count <= CAPACITY
            if write:
                status, _, _ = r.request(B.VIRTIO_BLK_T_OUT, sector, out=sectors(count, seed))
                if inside:
                    model[sector * SECTOR:(sector + count) * SECTOR] = sectors(count, seed)
            else:
                status, _, got = r.request(B.VIRTIO_BLK_T_IN, sector, in_len=count * SECTOR)
                if inside:
                    assert got == model[sector * SECTOR:(sector + count) * SECTOR]
            assert status == (B.VIRTIO_BLK_S_OK if inside else B.VIRTIO_BLK_S_IOERR)
        assert r.dev.disk.read(0, CAPACITY * SECTOR) == bytes(model)
    finally:
        r.close()
        guest.close()


def test_devices_naming_one_disk_share_it() -> None:
    """``disk=NAME``: shared storage, as two hosts see one LUN (what a migration's destination needs)."""
    bus = VdpaBus()
    bus.register_mgmtdev(default_bus().mgmtdev("sim-blk"))
    first = bus.dev_add("a", "sim-blk", capacity=64, disk="lun-test").parent
    second = bus.dev_add("b", "sim-blk", capacity=64, disk="lun-test").parent
    alone = bus.dev_add("c", "sim-blk", capacity=64).parent
    assert isinstance(first, SimBlk) and isinstance(second, SimBlk) and isinstance(alone, SimBlk)
    first.disk.write(3, b"\x5a" * 512)
    assert second.disk.read(3, 512) == b"\x5a" * 512
    assert alone.disk.read(3, 512) == bytes(512)
    with pytest.raises(OSError) as refused:
        bus.dev_add("d", "sim-blk", capacity=65, disk="lun-test")
    assert refused.value.errno == errno.EINVAL and "65" in str(refused.value)
    with pytest.raises(OSError):
        bus.dev_add("e", "sim-blk", disk="no spaces allowed")
