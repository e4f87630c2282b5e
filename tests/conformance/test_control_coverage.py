"""Control-path coverage: each clause the lockstep counts has a real comparison behind it, and a device breaking
it is caught naming it; the control machine's quick run reaches every control-path clause of both reference
devices, except the ones proposed as not applicable (with the reason).

Buggy parents here are small subclasses of the reference devices with one realistic bug each, reached as
``python:`` targets like any vendor parent.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from vdpacert.conformance import clauses
from vdpacert.conformance.lockstep import ClauseViolation, Lockstep
from vdpacert.conformance.machines import control_machine
from vdpacert.conformance.machines.control import feature_sets
from vdpacert.conformance.targets import Target, make_target
from vdpacert.conformance.targets.embedded import SimTarget
from vdpacert.conformance.targets.spec import parse_target
from vdpacert.impl.sim_blk import SimBlk
from vdpacert.impl.sim_net import SimNet
from vdpacert.impl.vhost_vdpa import VhostVdpa
from vdpacert.model.status import StatusBit
from vdpacert.uapi import vhost_types as T  # noqa: N812
from vdpacert.uapi import virtio_net as N  # noqa: N812
from vdpacert.uapi.virtio_config import VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1

ACK, DRV, FOK, DOK, FAILED = (int(b) for b in (StatusBit.ACKNOWLEDGE, StatusBit.DRIVER, StatusBit.FEATURES_OK,
                                               StatusBit.DRIVER_OK, StatusBit.FAILED))
UNCHECKED = "vhost_vdpa.invalidate_range_unchecked"
MEMORY = 0x10000

#: Control-path clauses the reference devices cannot exercise through vhost-vdpa, and why (proposed to the
#: Clauses of the areas this file covers that the datapath machines exercise, not the control machine.
DATAPATH = ("vdpa_device.vq_state.used_idx_preserved", "iotlb.translate.miss")
AREAS = ("vhost_vdpa.", "vdpa_device.", "iotlb.", "status.", "features.", "config.", "suite.target.")


def _mine(clause_id: str) -> bool:
    return clause_id.startswith(AREAS) or (clause_id.startswith(("net.", "blk.")) and (
        clause_id.endswith(".requires") or ".config." in clause_id))


@pytest.fixture
def net() -> Iterator[Target]:
    with make_target("sim-net") as target:
        yield target


def owned(ls: Lockstep) -> int:
    """SET_OWNER and one read-write map of 64 KiB at IOVA 0; the memory's user address."""
    m, c = ls.model, ls.client
    memory = ls.new_memory(MEMORY)
    ls.op("VHOST_SET_OWNER", m.VHOST_SET_OWNER, c.set_owner)
    ls.op("UPDATE", lambda: m.write_msg(T.VHOST_IOTLB_UPDATE, 0, 0, MEMORY, memory.uaddr, 3),
          lambda: c.iotlb_update(0, MEMORY, memory.uaddr, 3))
    return memory.uaddr


def negotiate(ls: Lockstep, features: int) -> None:
    for status in (0, ACK, ACK | DRV):
        ls.set_status(status)
    ls.set_features(features)
    ls.set_status(ACK | DRV | FOK)


# ----- quirks -------------------------------------------------------------------------------------

def test_quirk_hits_name_the_rule_the_quirk_stood_in_for(net: Target) -> None:
    ls = Lockstep(net)
    owned(ls)
    m, c = ls.model, ls.client
    for iova, size in ((0x1000, 0), (1 << 63, 1 << 63 | 0x1000)):
        ls.op("INVALIDATE", functools.partial(m.write_msg, T.VHOST_IOTLB_INVALIDATE, 0, iova, size),
              functools.partial(c.iotlb_invalidate, iova, size))
    assert ls.quirk_hits == {("iotlb.invalidate.size_zero", UNCHECKED): 1, ("iotlb.invalidate.wraps", UNCHECKED): 1}


def test_the_target_profile_decides_the_quirks(net: Target) -> None:
    net.declared_quirks = frozenset({"acme.own_quirk"})  # a vendor's own quirk names no model answer
    try:
        ls = Lockstep(net)
    finally:
        net.declared_quirks = None
    assert ls.quirks == frozenset()
    owned(ls)
    with pytest.raises(ClauseViolation) as caught:  # strict: the reference front's unchecked INVALIDATE fails
        ls.op("INVALIDATE", lambda: ls.model.write_msg(T.VHOST_IOTLB_INVALIDATE, 0, 0x1000, 0),
              lambda: ls.client.iotlb_invalidate(0x1000, 0))
    assert caught.value.clause_id == "iotlb.invalidate.size_zero"


# ----- what the device reports about itself -------------------------------------------------------

class OfferWithoutCtrlVq(SimNet):
    """Offers CTRL_RX and CTRL_MAC_ADDR but hides the CTRL_VQ they require."""

    def get_device_features(self) -> int:
        return super().get_device_features() & ~(1 << N.VIRTIO_NET_F_CTRL_VQ)


class ConfigPastTheStructure(SimNet):
    """Reports 8 bytes of config space past struct virtio_net_config (reads give zeroes)."""

    def get_config_size(self) -> int:
        return super().get_config_size() + 8

    def get_config(self, offset: int, length: int) -> bytes:
        if offset + length > self.get_config_size():
            raise OSError(errno.EINVAL, "config access out of bounds")
        return (self.config_space + bytes(8))[offset:offset + length]


class MtuBelow1280(SimNet):
    """Reports mtu 1000 with VIRTIO_NET_F_MTU offered (allowed, but below the recommended 1280)."""

    def get_config(self, offset: int, length: int) -> bytes:
        config = bytearray(self.config_space)
        config[N.VIRTIO_NET_CONFIG_MTU:N.VIRTIO_NET_CONFIG_MTU + 2] = (1000).to_bytes(2, "little")
        return bytes(config[offset:offset + length])


def test_the_offer_is_held_to_the_dependency_table(net: Target) -> None:
    ls = Lockstep(net)
    ls.check_observables()
    for rule in ("features.VERSION_1.offered", "net.CTRL_RX.requires", "net.CTRL_MAC_ADDR.requires",
                 "net.CTRL_RX_EXTRA.requires"):
        assert ls.exercised[rule] == 1, rule
    assert not ls.exercised["net.MQ.requires"]  # MQ is not offered: the row has nothing to say
    with make_target(f"python:{__name__}:OfferWithoutCtrlVq") as target, pytest.raises(ClauseViolation) as caught:
        Lockstep(target).check_observables()
    assert caught.value.clause_id == "net.CTRL_RX.requires"


def test_config_space_is_the_device_types_structure(net: Target) -> None:
    ls = Lockstep(net)
    ls.check_observables()
    assert ls.exercised["vdpa_device.config.bounds"] == 1
    assert ls.exercised["net.config.mtu.range"] == ls.exercised["net.config.mtu.min_1280"] == 1
    with make_target(f"python:{__name__}:ConfigPastTheStructure") as target, pytest.raises(ClauseViolation) as caught:
        Lockstep(target).check_observables()
    assert caught.value.clause_id == "vdpa_device.config.bounds"
    with make_target(f"python:{__name__}:MtuBelow1280") as target:
        small = Lockstep(target)
        small.check_observables()
    assert any("net.config.mtu.min_1280" in w for w in small.warnings)  # a SHOULD: warned, not failed


# ----- driver rules broken on purpose -------------------------------------------------------------

class StoresConfigWrites(SimNet):
    """Stores a driver's config write (the legacy way of setting the MAC)."""

    def write_config(self, offset: int, data: bytes) -> None:
        self.update_config(offset, data)


class SpillsConfigWrites(SimNet):
    """Stores a driver's config write and zeroes the byte after it."""

    def write_config(self, offset: int, data: bytes) -> None:
        self.update_config(offset, bytes(data) + b"\0")


def test_a_write_to_driver_read_only_config_may_stick_but_not_spill(net: Target) -> None:
    """The write rules bind the driver: the device may ignore or store the written bytes, nothing more."""
    ls = Lockstep(net)
    ls.set_config(0, b"\x02\x00\x00\x00\x00\x99")
    assert ls.exercised["net.config.driver_write.read_only"] == 2  # the rule that judged it, the rule broken
    with make_target(f"python:{__name__}:StoresConfigWrites") as target:
        stores = Lockstep(target)
        stores.set_config(0, b"\x02\x00\x00\x00\x00\x99")
        assert stores.resyncs["config write ignored"] == 0 and stores.model.device.config[5] == 0x99
    with make_target(f"python:{__name__}:SpillsConfigWrites") as target, pytest.raises(ClauseViolation) as caught:
        Lockstep(target).set_config(0, b"\x02\x00\x00\x00\x00\x99")
    assert caught.value.clause_id == "suite.lockstep.config"


def test_a_feature_rule_counts_when_it_alone_decides(net: Target) -> None:
    ls = Lockstep(net)
    version_1 = 1 << VIRTIO_F_VERSION_1
    ctrl_rx = 1 << N.VIRTIO_NET_F_CTRL_RX
    negotiate(ls, version_1 | ctrl_rx)  # CTRL_RX without CTRL_VQ, nothing else wrong
    assert ls.exercised["net.CTRL_RX.requires"] == 1
    negotiate(ls, ctrl_rx)  # and without VERSION_1: two rules, so neither decides alone
    assert ls.exercised["net.CTRL_RX.requires"] == 1 and not ls.exercised["features.VERSION_1.accepted"]
    assert ls.exercised["status.device.refuse_invalid_features"] == 2
    assert ls.exercised["vdpa_device.set_driver_features"] == 2  # SET_FEATURES taken before FEATURES_OK


def test_a_refused_clear_is_the_answer_to_never_clears(net: Target) -> None:
    ls = Lockstep(net)
    ls.set_status(ACK)
    ls.set_status(DRV)  # clears ACKNOWLEDGE: vhost-vdpa refuses the write
    assert ls.exercised["vhost_vdpa.set_status.clears_bits"] == ls.exercised["status.driver.never_clears"] == 1
    ls.set_status(ACK | DRV)
    assert ls.exercised["status.driver.never_clears"] == 1


class ForgetsNeedsReset(SimBlk):
    """Masks DEVICE_NEEDS_RESET out of the status after every driver write."""

    def set_status(self, status: int) -> None:
        super().set_status(status)
        self._status &= ~VIRTIO_CONFIG_S_NEEDS_RESET


def _broken_ring(ls: Lockstep) -> None:
    """Queue 0 up and running, its available index far ahead (bad input), kicked; then FAILED written."""
    ls.op("VHOST_SET_OWNER", ls.model.VHOST_SET_OWNER, ls.client.set_owner)
    memory = ls.new_memory(MEMORY)
    m, c = ls.model, ls.client
    ls.op("UPDATE", lambda: m.write_msg(T.VHOST_IOTLB_UPDATE, 0, 0, MEMORY, memory.uaddr, 3),
          lambda: c.iotlb_update(0, MEMORY, memory.uaddr, 3))
    ls.op("NUM", lambda: m.VHOST_SET_VRING_NUM(0, 64), lambda: c.set_vring_num(0, 64))
    ls.op("ADDR", lambda: m.VHOST_SET_VRING_ADDR(0, 0, 0x4000, 0x8000), lambda: c.set_vring_addr(0, 0, 0x4000, 0x8000))
    ls.op("ENABLE", lambda: m.VHOST_VDPA_SET_VRING_ENABLE(0, 1), lambda: c.set_vring_enable(0, 1))
    ls.set_features(ls.spec.device_features & ~(1 << VIRTIO_F_RING_PACKED))
    for status in (ACK, ACK | DRV, ACK | DRV | FOK, ACK | DRV | FOK | DOK):
        ls.set_status(status)
    memory.write_u16(0x4002, 1000)  # avail idx 1000 ahead of a 64-entry queue
    ls.kick(0)
    ls.check_observables()
    ls.set_status(ls.model.device.status | FAILED)


def test_needs_reset_sticks_until_reset() -> None:
    with make_target("sim-blk") as target:
        ls = Lockstep(target)
        _broken_ring(ls)
        assert ls.model.device.needs_reset and ls.exercised["status.device.needs_reset_sticks"] == 1
    with make_target(f"python:{__name__}:ForgetsNeedsReset") as target, pytest.raises(ClauseViolation) as caught:
        _broken_ring(Lockstep(target))
    assert caught.value.clause_id == "status.device.needs_reset_sticks"


# ----- positions, the file ------------------------------------------------------------------------

def test_a_packed_position_and_the_layout_after_reset(net: Target) -> None:
    ls = Lockstep(net)
    owned(ls)
    valid, _ = feature_sets(ls.spec.device_id, ls.spec.device_features)
    negotiate(ls, next(w for w in valid if w >> VIRTIO_F_RING_PACKED & 1))
    ls.set_vring_base(0, 0x8005_8003)  # both wrap counters set, used idx 5, avail idx 3
    ls.check_observables()
    assert ls.exercised["vdpa_device.vq_state.packed"] == 1
    ls.set_status(0)
    ls.set_vring_base(0, 0x8005_8003)  # split again: a base above 16 bits is refused
    assert ls.exercised["vhost_vdpa.vring_base.split_range"] == ls.exercised["vhost_vdpa.vring_base.layout"] == 1


class SecondOpenSim(SimTarget):
    """sim-net with the proposed target API: a second open of the same device while this one is held."""

    def open_again(self) -> None:
        front = self._front
        assert front is not None
        VhostVdpa(front.parent).close()


def test_a_closed_file_and_a_second_open(net: Target) -> None:
    ls = Lockstep(net)
    ls.close_and_reopen()
    assert ls.exercised["vhost_vdpa.fd.closed"] == ls.exercised["vhost_vdpa.open.exclusive"] == 1
    with SecondOpenSim(parse_target("sim-net")) as target:
        held = Lockstep(target)
        held.close_and_reopen()
    assert held.exercised["vhost_vdpa.open.exclusive"] == held.exercised["vhost_vdpa.fd.closed"] == 1


# ----- the machine reaches every control-path clause ----------------------------------------------

@pytest.mark.parametrize("name", ["sim-net", "sim-blk"])
def test_the_quick_run_reaches_every_control_clause(name: str) -> None:
    with make_target(name) as target:
        machine = control_machine(target)
        run_state_machine_as_test(machine, settings=settings(
            max_examples=25, stateful_step_count=30, deadline=None, database=None, derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
        ls = machine.lockstep
        backend = target.client.get_backend_features()
    quirked = {clause for clause, _ in ls.quirk_hits}
    reached = {c.id for c in clauses.catalog() if ls.exercised[c.id] or c.id in quirked}
    # What the report calls not applicable when nothing reached it (a reason each), as certify computes it.
    applicable = {c.id for c in clauses.catalog()
                  if c.not_applicable_reason(ls.spec.device_id, ls.spec.device_features, backend, ls.spec.nas) is None}
    wanted = {c for c in applicable if _mine(c)} - set(DATAPATH)
    assert wanted - reached == set()
    unreachable = {c.id for c in clauses.catalog() if c.unreachable}
    assert reached & unreachable == set()  # nothing declared out of reach is reached
