"""The software-device base (impl/sim_device.py), driven op by op through a minimal device written on it.

:class:`EchoDevice` is a real (if tiny) device type: each chain it takes gets its readable bytes
copied back into its writable part. Everything else (features, status, queues, maps, groups,
suspend, reset, callbacks) is the base's.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from vdpacert.impl.guestmem import default_registry
from vdpacert.impl.iotlb import ACCESS_RW, Iotlb
from vdpacert.impl.parent import VDPA_RESET_F_CLEAN_MAP, VdpaCallback, VqStatePacked, VqStateSplit
from vdpacert.impl.sim_device import SimDevice
from vdpacert.uapi import virtio_net as net
from vdpacert.uapi.vhost_types import VHOST_F_LOG_ALL
from vdpacert.uapi.virtio_config import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
)
from vdpacert.uapi.virtio_ids import VIRTIO_ID_BLOCK, VIRTIO_ID_NET

try:
    from .ring_driver import Guest, PackedDriver, SplitDriver, features
except ImportError:
    from ring_driver import Guest, PackedDriver, SplitDriver, features

V1 = 1 << VIRTIO_F_VERSION_1
PACKED = 1 << VIRTIO_F_RING_PACKED
LOG_ALL = 1 << VHOST_F_LOG_ALL
OFFER = features(packed=True, event_idx=True, indirect=True) | LOG_ALL | (1 << 5)
ACK_DRIVER = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
FEATURES_OK = ACK_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK
DRIVER_OK = FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK


class EchoDevice(SimDevice):
    """Copies each chain's readable bytes into its writable part."""

    def __init__(self, *, device_id: int = VIRTIO_ID_BLOCK, offered: int = OFFER, nvqs: int = 2, ngroups: int = 1,
                 nas: int = 1, vq_groups: list[int] | None = None, **kwargs: object) -> None:
        super().__init__("echo", device_id=device_id, offered=offered, config=bytes(range(16)), nvqs=nvqs,
                         ngroups=ngroups, nas=nas, vq_groups=vq_groups, **kwargs)  # type: ignore[arg-type]
        self.processed = [0] * nvqs
        self.config_writes: list[tuple[int, bytes]] = []

    def process(self, index: int) -> None:
        vq = self.vq(index)
        while (chain := vq.pop_chain()) is not None:
            written = vq.write_chain(chain, 0, vq.read_chain(chain)) if chain.writable_len else 0
            vq.push_chain(chain, written)
            self.processed[index] += 1


class Counter:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


def up(dev: SimDevice, guest: Guest, drivers: list[SplitDriver | PackedDriver], feature_bits: int, *,
       asid: int = 0, start: bool = True) -> list[Counter]:
    """Map the guest, negotiate, configure one queue per driver, DRIVER_OK."""
    dev.bind_mm(guest.registry)
    dev.set_map(asid, guest.iotlb)
    dev.set_status(ACK_DRIVER)
    dev.set_driver_features(feature_bits)
    dev.set_status(FEATURES_OK)
    assert dev.get_status() == FEATURES_OK
    counters = []
    for index, driver in enumerate(drivers):
        dev.set_vq_num(index, driver.num)
        dev.set_vq_address(index, *driver.addresses)
        counters.append(Counter())
        dev.set_vq_cb(index, VdpaCallback(counters[-1]))
        dev.set_vq_ready(index, True)
    if start:
        dev.set_status(DRIVER_OK)
    return counters


# ----- offer and features -------------------------------------------------------------------------

def test_an_offer_that_breaks_the_spec_is_refused_at_creation() -> None:
    with pytest.raises(ValueError, match="VERSION_1"):
        EchoDevice(offered=PACKED)
    with pytest.raises(ValueError, match="needs"):
        EchoDevice(device_id=VIRTIO_ID_NET, offered=V1 | (1 << net.VIRTIO_NET_F_GUEST_TSO4))
    with pytest.raises(ValueError):
        EchoDevice(nvqs=2, ngroups=1, vq_groups=[0, 1])
    with pytest.raises(ValueError):
        EchoDevice(queue_size=65536)


@pytest.mark.parametrize("driver_features", [
    OFFER | (1 << 40),                  # a bit that was not offered
    OFFER & ~V1,                        # no VERSION_1
])
def test_features_ok_is_refused_for_an_invalid_set(driver_features: int) -> None:
    dev = EchoDevice()
    dev.set_status(ACK_DRIVER)
    dev.set_driver_features(driver_features)
    assert dev.get_driver_features() == driver_features  # stored as given ...
    dev.set_status(FEATURES_OK)
    assert dev.get_status() == ACK_DRIVER  # ... and refused at FEATURES_OK
    assert "FEATURES_OK refused" in dev.last_error
    # the driver may fix the set and try again
    dev.set_driver_features(V1)
    dev.set_status(FEATURES_OK)
    assert dev.get_status() == FEATURES_OK


def test_features_ok_is_refused_for_a_broken_dependency() -> None:
    offer = V1 | (1 << net.VIRTIO_NET_F_CTRL_VQ) | (1 << net.VIRTIO_NET_F_MQ)
    dev = EchoDevice(device_id=VIRTIO_ID_NET, offered=offer)
    dev.set_status(ACK_DRIVER)
    dev.set_driver_features(V1 | (1 << net.VIRTIO_NET_F_MQ))  # MQ without CTRL_VQ
    dev.set_status(FEATURES_OK)
    assert not dev.get_status() & VIRTIO_CONFIG_S_FEATURES_OK
    dev.set_driver_features(offer)
    dev.set_status(FEATURES_OK)
    assert dev.get_status() & VIRTIO_CONFIG_S_FEATURES_OK


def test_features_are_final_after_features_ok() -> None:
    dev = EchoDevice()
    dev.set_driver_features(V1)
    dev.set_status(FEATURES_OK)
    with pytest.raises(OSError) as busy:
        dev.set_driver_features(OFFER)
    assert busy.value.errno == errno.EBUSY
    assert dev.get_driver_features() == V1


# ----- status -----------------------------------------------------------------------------------------

def test_status_bits_are_never_cleared_by_a_write_and_needs_reset_is_the_devices() -> None:
    dev = EchoDevice()
    dev.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE)
    dev.set_status(VIRTIO_CONFIG_S_DRIVER)
    assert dev.get_status() == ACK_DRIVER
    dev.set_status(ACK_DRIVER | VIRTIO_CONFIG_S_NEEDS_RESET)
    assert dev.get_status() == ACK_DRIVER
    dev.set_status(0)
    assert dev.get_status() == 0


def test_driver_ok_without_accepted_features_needs_reset(guest: Guest) -> None:
    dev = EchoDevice()
    config_calls = Counter()
    dev.set_config_cb(VdpaCallback(config_calls))
    dev.set_status(ACK_DRIVER)
    dev.set_driver_features(0)  # no VERSION_1: refused
    dev.set_status(FEATURES_OK)
    dev.set_status(ACK_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK)
    assert dev.get_status() & VIRTIO_CONFIG_S_NEEDS_RESET
    assert config_calls.count == 1


@pytest.mark.parametrize("num", [0, 512])  # no size, or above get_vq_num_max (256)
def test_an_unusable_queue_size_needs_reset_at_driver_ok(guest: Guest, num: int) -> None:
    dev = EchoDevice()
    driver = SplitDriver(guest, 8)
    up(dev, guest, [driver], features(), start=False)
    dev.set_vq_num(0, num)
    dev.set_status(DRIVER_OK)
    assert dev.get_status() & VIRTIO_CONFIG_S_NEEDS_RESET
    assert "cannot be enabled" in dev.last_error


def test_driver_ok_processes_buffers_made_available_before_it(guest: Guest) -> None:
    dev = EchoDevice()
    driver = SplitDriver(guest, 8)
    up(dev, guest, [driver], features(), start=False)
    head = driver.add([b"early"], [5])
    dev.kick_vq(0)  # before DRIVER_OK: the device consumes nothing
    assert driver.get_used() == []
    dev.set_status(DRIVER_OK)
    assert driver.get_used() == [(head, 5)]
    assert driver.written(head) == b"early"


def test_failed_stops_processing(guest: Guest) -> None:
    dev = EchoDevice()
    driver = SplitDriver(guest, 8)
    up(dev, guest, [driver], features())
    dev.set_status(DRIVER_OK | VIRTIO_CONFIG_S_FAILED)
    driver.add([b"x"], [1])
    dev.kick_vq(0)
    assert driver.get_used() == []


@pytest.mark.parametrize("packed", [False, True])
def test_used_buffer_callback_and_eventfd_trigger(guest: Guest, packed: bool) -> None:
    dev = EchoDevice()
    driver: SplitDriver | PackedDriver = PackedDriver(guest, 8) if packed else SplitDriver(guest, 8)
    counters = up(dev, guest, [driver], features(packed=packed))
    driver.add([b"a"], [1])
    dev.kick_vq(0)
    assert counters[0].count == 1
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        dev.set_vq_cb(0, VdpaCallback(None, fd))  # a trigger fd alone is signalled directly
        driver.add([b"b"], [1])
        dev.kick_vq(0)
        assert os.eventfd_read(fd) == 1
    finally:
        os.close(fd)


# ----- queue state, suspend ------------------------------------------------------------------------

def test_set_vq_state_rules(guest: Guest) -> None:
    dev = EchoDevice()
    driver = SplitDriver(guest, 8)
    up(dev, guest, [driver], features(), start=False)
    dev.set_vq_state(0, VqStateSplit(5))
    assert dev.get_vq_state(0) == VqStateSplit(5)
    with pytest.raises(OSError) as wrong:
        dev.set_vq_state(0, VqStatePacked(0, 1, 0, 1))
    assert wrong.value.errno == errno.EINVAL
    dev.set_vq_state(0, VqStateSplit(0))
    dev.set_status(DRIVER_OK)
    with pytest.raises(OSError) as busy:
        dev.set_vq_state(0, VqStateSplit(1))
    assert busy.value.errno == errno.EINVAL  # a running queue, as mlx5_vdpa answers (lockstep finding)
    dev.suspend()
    dev.set_vq_state(0, VqStateSplit(0))  # allowed while suspended


def test_packed_state_round_trips(guest: Guest) -> None:
    dev = EchoDevice()
    driver = PackedDriver(guest, 8)
    up(dev, guest, [driver], features(packed=True), start=False)
    state = VqStatePacked(3, 0, 2, 1)
    dev.set_vq_state(0, state)
    assert dev.get_vq_state(0) == state


def test_suspend_holds_kicks_and_resume_runs_them(guest: Guest) -> None:
    dev = EchoDevice()
    driver = SplitDriver(guest, 8)
    up(dev, guest, [driver], features())
    driver.add([b"1"], [1])
    dev.kick_vq(0)
    dev.suspend()
    second = driver.add([b"2"], [1])
    dev.kick_vq(0)
    assert dev.processed[0] == 1
    assert dev.get_vq_state(0) == VqStateSplit(1)  # exact: the second chain was not taken
    dev.resume()
    assert dev.processed[0] == 2
    assert driver.get_used()[-1] == (second, 1)
    assert dev.get_vq_state(0) == VqStateSplit(2)


def test_queue_enabled_after_driver_ok_runs_at_once(guest: Guest) -> None:
    dev = EchoDevice()
    drivers = [SplitDriver(guest, 8), SplitDriver(guest, 8)]
    up(dev, guest, drivers[:1], features())
    dev.set_vq_num(1, 8)
    dev.set_vq_address(1, *drivers[1].addresses)
    head = drivers[1].add([b"late"], [4])
    dev.set_vq_ready(1, True)
    assert drivers[1].get_used() == [(head, 4)]
    assert dev.get_backend_features()  # ENABLE_AFTER_DRIVER_OK is offered


def test_addresses_of_an_enabled_queue_cannot_change(guest: Guest) -> None:
    dev = EchoDevice()
    driver = SplitDriver(guest, 8)
    up(dev, guest, [driver], features())
    with pytest.raises(OSError) as live:
        dev.set_vq_address(0, *driver.addresses)
    assert live.value.errno == errno.EINVAL
    with pytest.raises(OSError) as misaligned:
        dev.set_vq_address(1, 0x1008, 0x2000, 0x3000)
    assert misaligned.value.errno == errno.EINVAL
    dev.set_vq_ready(0, False)
    dev.set_vq_address(0, *driver.addresses)


def test_a_suspended_queue_takes_new_addresses(guest: Guest) -> None:
    """Lockstep finding: only a *running* queue refuses (the model's vhost_vdpa.vring.running); while
    suspended the addresses change and the queue resumes at them."""
    dev = EchoDevice()
    driver = SplitDriver(guest, 8)
    up(dev, guest, [driver], features())
    dev.suspend()
    dev.set_vq_address(0, *driver.addresses)
    assert dev.vq(0).ready and (dev.vq(0).desc_area, dev.vq(0).driver_area, dev.vq(0).device_area) \
        == tuple(driver.addresses)
    dev.resume()


def test_a_failed_device_lets_its_queues_be_moved(guest: Guest) -> None:
    """Certify finding: once the driver sets FAILED the device processes nothing, so no queue is running
    and SET_VRING_ADDR / SET_VRING_BASE are taken (the model's vhost_vdpa.vring.running agrees)."""
    dev = EchoDevice()
    driver = SplitDriver(guest, 8)
    up(dev, guest, [driver], features())
    with pytest.raises(OSError):
        dev.set_vq_state(0, VqStateSplit(3))
    dev.set_status(dev.get_status() | 0x80)  # FAILED
    dev.set_vq_address(0, *driver.addresses)
    dev.set_vq_state(0, VqStateSplit(3))
    assert dev.get_vq_state(0) == VqStateSplit(3)


# ----- maps, groups, address spaces -------------------------------------------------------------------

def test_set_map_keeps_a_private_copy_all_or_nothing(guest: Guest) -> None:
    dev = EchoDevice(max_iotlb_entries=2)
    given = Iotlb()
    given.update(0x1000, 0x1000, guest.mem.uaddr, ACCESS_RW)
    dev.set_map(0, given)
    given.update(0x5000, 0x1000, guest.mem.uaddr, ACCESS_RW)  # the caller's object changes later
    assert dev.address_space(0).entries() == [(0x1000, 0x1FFF, guest.mem.uaddr, ACCESS_RW)]
    too_big = Iotlb()
    for i in range(3):
        too_big.update(0x10000 * (i + 1), 0x1000, guest.mem.uaddr, ACCESS_RW)
    with pytest.raises(OSError) as full:
        dev.set_map(0, too_big)
    assert full.value.errno == errno.ENOSPC
    assert len(dev.address_space(0)) == 1  # the old map stayed
    with pytest.raises(OSError):
        dev.set_map(1, given)  # one address space only


def test_dma_map_unmap_and_reset_map(guest: Guest) -> None:
    dev = EchoDevice(batch_mapping=False)
    dev.dma_map(0, 0x1000, 0x2000, guest.mem.uaddr, ACCESS_RW)
    dev.dma_map(0, 0x8000, 0x1000, guest.mem.uaddr, ACCESS_RW)
    with pytest.raises(OSError) as overlap:
        dev.dma_map(0, 0x2000, 0x1000, guest.mem.uaddr, ACCESS_RW)
    assert overlap.value.errno == errno.EEXIST
    dev.dma_unmap(0, 0x1000, 0x2000)
    assert [e[0] for e in dev.address_space(0).entries()] == [0x8000]
    dev.reset_map(0)
    assert len(dev.address_space(0)) == 0  # the initial map is empty, not a pass-through


def test_groups_translate_through_their_address_space(guest: Guest) -> None:
    dev = EchoDevice(ngroups=2, nas=2, vq_groups=[0, 1])
    faults: list[tuple[int, int, int, bool]] = []
    dev.set_fault_cb(lambda *fault: faults.append(fault))
    drivers = [SplitDriver(guest, 8), SplitDriver(guest, 8)]
    dev.set_group_asid(1, 1)
    up(dev, guest, drivers, features(), asid=1)  # only address space 1 is mapped
    assert dev.get_vq_group(1) == 1 and dev.group_asid(1) == 1
    head = drivers[1].add([b"ok"], [2])
    dev.kick_vq(1)
    assert drivers[1].get_used() == [(head, 2)]
    drivers[0].add([b"no"], [2])
    dev.kick_vq(0)  # group 0 is in address space 0, which maps nothing
    assert dev.get_status() & VIRTIO_CONFIG_S_NEEDS_RESET
    assert faults and faults[0][0] == 0 and faults[0][3] is True  # a MISS in address space 0
    for bad in ((2, 0), (0, 2)):
        with pytest.raises(OSError) as error:
            dev.set_group_asid(*bad)
        assert error.value.errno == errno.EINVAL


def test_bind_and_unbind_mm(guest: Guest) -> None:
    dev = EchoDevice()
    dev.bind_mm(guest.registry)
    assert dev.registry is guest.registry
    dev.unbind_mm()
    assert dev.registry is default_registry()


# ----- config ----------------------------------------------------------------------------------------

def test_config_bounds_read_only_writes_and_device_updates() -> None:
    dev = EchoDevice()
    calls = Counter()
    dev.set_config_cb(VdpaCallback(calls))
    assert dev.get_config(4, 4) == bytes([4, 5, 6, 7])
    for offset, length in ((15, 2), (16, 1), (-1, 1)):
        with pytest.raises(OSError) as outside:
            dev.get_config(offset, length)
        assert outside.value.errno == errno.EINVAL
    dev.set_config(0, b"\xff")
    assert dev.get_config(0, 1) == b"\x00"  # read-only by default
    generation = dev.get_generation()
    dev.update_config(2, b"\xaa\xbb")
    assert dev.get_config(2, 2) == b"\xaa\xbb"
    assert dev.get_generation() != generation and calls.count == 1


# ----- logging ---------------------------------------------------------------------------------------

def test_logging_runs_only_with_log_all_negotiated(guest: Guest) -> None:
    dev = EchoDevice()
    log_offset = guest.alloc(64)
    dev.bind_mm(guest.registry)
    dev.set_log_base(guest.mem.uaddr_of(log_offset), 64)
    dev.set_driver_features(V1)
    dev.set_status(FEATURES_OK)
    assert dev.vq(0).log is None
    dev.reset()
    dev.set_driver_features(V1 | LOG_ALL)
    dev.set_status(FEATURES_OK)
    assert dev.vq(0).log is dev.dirty_log is not None


# ----- reset --------------------------------------------------------------------------------------------

def dirty_everything(dev: EchoDevice, guest: Guest) -> None:
    drivers = [SplitDriver(guest, 8), SplitDriver(guest, 8)]
    up(dev, guest, drivers, features(event_idx=True))
    drivers[0].add([b"x"], [1])
    dev.kick_vq(0)
    dev.set_vq_log(1, True, 0x1000)
    dev.update_config(0, b"\x99")
    dev.suspend()
    dev.set_vq_state(1, VqStateSplit(7))


@pytest.mark.parametrize("how", ["reset", "status0", "compat_reset"])
def test_reset_returns_every_piece_of_state_to_initial(guest: Guest, how: str) -> None:
    fresh = EchoDevice(ngroups=2, nas=2, vq_groups=[0, 1]).state_snapshot()
    dev = EchoDevice(ngroups=2, nas=2, vq_groups=[0, 1])
    dev.set_group_asid(1, 1)
    dirty_everything(dev, guest)
    assert dev.state_snapshot() != fresh
    {"reset": dev.reset, "status0": lambda: dev.set_status(0), "compat_reset": lambda: dev.compat_reset(0)}[how]()
    assert dev.state_snapshot() == fresh
    assert len(dev.address_space(0)) == 1  # mappings survive a plain reset ...
    dev.compat_reset(VDPA_RESET_F_CLEAN_MAP)
    assert len(dev.address_space(0)) == 0  # ... and go with CLEAN_MAP


def test_the_device_works_again_after_reset(guest: Guest) -> None:
    dev = EchoDevice()
    dirty_everything(dev, guest)
    dev.reset()
    driver = SplitDriver(guest, 8)
    up(dev, guest, [driver], features(packed=False))
    head = driver.add([b"again"], [5])
    dev.kick_vq(0)
    assert driver.get_used() == [(head, 5)]
