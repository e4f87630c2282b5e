"""The lockstep core: errno and value mismatches name their clause; latitude is explicit and counted."""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Iterator

import pytest

from vdpacert.conformance.lockstep import ClauseViolation, Lockstep
from vdpacert.conformance.observe import probe_spec
from vdpacert.conformance.targets import Target, make_target
from vdpacert.impl.parent import VqState
from vdpacert.impl.sim_net import SimNet
from vdpacert.model.status import StatusBit
from vdpacert.uapi.vhost_types import VHOST_F_LOG_ALL
from vdpacert.uapi.virtio_config import VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1

ACK, DRV, FOK, DOK = (int(b) for b in (StatusBit.ACKNOWLEDGE, StatusBit.DRIVER, StatusBit.FEATURES_OK,
                                       StatusBit.DRIVER_OK))


class BusyStateNet(SimNet):
    """Answers EBUSY, not EINVAL, for the state of a running queue."""

    def set_vq_state(self, index: int, state: VqState) -> None:
        if self.vq(index).ready and not self.suspended:
            raise OSError(errno.EBUSY, "busy")
        super().set_vq_state(index, state)


class PickyNet(SimNet):
    """Refuses FEATURES_OK for every set: allowed at the cost of a SHOULD."""

    def set_status(self, status: int) -> None:
        super().set_status(status & ~VIRTIO_CONFIG_S_FEATURES_OK)


@pytest.fixture
def net() -> Iterator[Target]:
    with make_target("sim-net") as target:
        yield target


def up(ls: Lockstep, *, driver_ok: bool = True) -> None:
    """Owner, one mapped ring on queue 0, VERSION_1, FEATURES_OK (and DRIVER_OK): every step compared."""
    m, c = ls.model, ls.client
    memory = ls.new_memory(0x10000)
    ls.op("VHOST_SET_OWNER", m.VHOST_SET_OWNER, c.set_owner)
    ls.op("UPDATE", lambda: m.write_msg(2, 0, 0, 0x10000, memory.uaddr, 3), lambda: c.iotlb_update(0, 0x10000,
                                                                                                  memory.uaddr, 3))
    ls.op("NUM", lambda: m.VHOST_SET_VRING_NUM(0, 64), lambda: c.set_vring_num(0, 64))
    ls.op("ADDR", lambda: m.VHOST_SET_VRING_ADDR(0, 0, 0x4000, 0x8000), lambda: c.set_vring_addr(0, 0, 0x4000, 0x8000))
    ls.op("ENABLE", lambda: m.VHOST_VDPA_SET_VRING_ENABLE(0, 1), lambda: c.set_vring_enable(0, 1))
    features = 1 << VIRTIO_F_VERSION_1
    ls.op("FEATURES", lambda: m.VHOST_SET_FEATURES(features), lambda: c.set_features(features))
    for status in (ACK, ACK | DRV, ACK | DRV | FOK) + ((ACK | DRV | FOK | DOK,) if driver_ok else ()):
        ls.set_status(status)
    ls.check_observables()


def test_the_spec_is_read_from_the_target(net: Target) -> None:
    spec = probe_spec(net)
    assert (spec.device_id, spec.nvqs, spec.ngroups, spec.nas, spec.vq_groups) == (1, 3, 2, 2, (0, 0, 1))
    assert {"suspend", "resume", "get_vq_group", "set_group_asid", "get_vq_size"} <= spec.optional_ops
    assert spec.config == net.client.get_config(0, 24) and spec.supports_dirty_log


def test_a_clean_bring_up_agrees_everywhere(net: Target) -> None:
    ls = Lockstep(net)
    up(ls)
    assert ls.exercised["status.device.accept_valid_features"] == 1
    assert not ls.warnings and not ls.quirk_hits


def test_an_errno_mismatch_names_the_models_rule() -> None:
    with make_target(f"python:{__name__}:BusyStateNet") as target:
        ls = Lockstep(target)
        up(ls)
        with pytest.raises(ClauseViolation) as caught:
            ls.set_vring_base(0, 3)
    assert caught.value.clause_id == "vhost_vdpa.vring.running"
    assert "errno 22" in caught.value.message and "errno 16" in caught.value.message


def test_a_refusal_the_target_skips_names_the_models_rule(net: Target) -> None:
    spec = dataclasses.replace(probe_spec(net), nvqs=2, vq_groups=(0, 0))
    ls = Lockstep(net, spec=spec)
    ls.op("VHOST_SET_OWNER", ls.model.VHOST_SET_OWNER, ls.client.set_owner)
    with pytest.raises(ClauseViolation) as caught:
        ls.op("NUM", lambda: ls.model.VHOST_SET_VRING_NUM(2, 8), lambda: ls.client.set_vring_num(2, 8))
    assert caught.value.clause_id == "vhost_vdpa.vring.index"


def test_a_value_mismatch_names_the_observables_clause(net: Target) -> None:
    spec = probe_spec(net)
    ls = Lockstep(net, spec=dataclasses.replace(spec, device_features=spec.device_features & ~(1 << 5)))
    with pytest.raises(ClauseViolation) as caught:
        ls.op("VHOST_GET_FEATURES", ls.model.VHOST_GET_FEATURES, ls.client.get_features,
              clause="suite.lockstep.features")
    assert caught.value.clause_id == "suite.lockstep.features"
    ls = Lockstep(net, spec=dataclasses.replace(spec, config=bytes(24)))
    with pytest.raises(ClauseViolation) as caught:
        ls.check_observables()
    assert caught.value.clause_id == "suite.lockstep.config"


def test_a_refused_valid_set_is_a_should_warning() -> None:
    with make_target(f"python:{__name__}:PickyNet") as target:
        ls = Lockstep(target)
        up(ls, driver_ok=False)
        assert ls.warnings and "status.device.accept_valid_features" in ls.warnings[0]
        assert ls.model.device.status == ACK | DRV  # the model follows the device


def test_undetermined_writes_and_device_errors_resync_the_model(net: Target) -> None:
    ls = Lockstep(net)
    ls.set_status(DOK)  # skips the whole init sequence: the spec sets no outcome
    ls.check_observables()
    assert ls.exercised["status.driver.init_order"] and ls.resyncs
    assert ls.model.device.status == net.client.get_status()


def test_declared_quirks_are_counted_and_undeclared_ones_fail(net: Target) -> None:
    ls = Lockstep(net)
    ls.op("VHOST_SET_OWNER", ls.model.VHOST_SET_OWNER, ls.client.set_owner)
    ls.op("NUM", lambda: ls.model.VHOST_SET_VRING_NUM(0, 1024), lambda: ls.client.set_vring_num(0, 1024))
    ls.check_observables()
    assert ls.quirk_hits == {("vhost_vdpa.vring_num.bounds", "vhost_vdpa.vring_num_bounds_unchecked"): 1}
    strict = Lockstep(net, quirks=())
    strict.reopen()
    strict.op("VHOST_SET_OWNER", strict.model.VHOST_SET_OWNER, strict.client.set_owner)
    with pytest.raises(ClauseViolation) as caught:
        strict.op("NUM", lambda: strict.model.VHOST_SET_VRING_NUM(0, 1024),
                  lambda: strict.client.set_vring_num(0, 1024))
    assert caught.value.clause_id == "vhost_vdpa.vring_num.bounds"


def test_unbacked_user_addresses_are_predicted(net: Target) -> None:
    ls = Lockstep(net)
    memory = ls.new_memory(0x2000)
    ls.op("VHOST_SET_OWNER", ls.model.VHOST_SET_OWNER, ls.client.set_owner)
    ls.op("UPDATE", lambda: ls.model.write_msg(2, 0, 0x1000, 0x2000, memory.uaddr + 0x1000, 3),
          lambda: ls.client.iotlb_update(0x1000, 0x2000, memory.uaddr + 0x1000, 3))  # runs past the end: EFAULT
    assert ls.exercised["vhost_vdpa.msg.uaddr_unbacked"] == 1


def test_log_all_alone_may_change_on_a_running_device(net: Target) -> None:
    """vhost.h: VHOST_F_LOG_ALL "can be changed while device is active"; every other change stays EBUSY."""
    ls = Lockstep(net)
    up(ls)
    m, c = ls.model, ls.client
    version_1, log_all = 1 << VIRTIO_F_VERSION_1, 1 << VHOST_F_LOG_ALL
    for features in (version_1 | log_all, version_1, version_1 | log_all):
        ls.op("LOG_ALL switch", lambda f=features: m.VHOST_SET_FEATURES(f), lambda f=features: c.set_features(f))
    ls.op("another bit", lambda: m.VHOST_SET_FEATURES(version_1 | log_all | 1), lambda: c.set_features(
            version_1 | log_all | 1))
    with pytest.raises(OSError) as refused:
        c.set_features(version_1 | 1)  # LOG_ALL off and bit 0 on: two changes at once
    assert refused.value.errno == errno.EBUSY
    assert not ls.warnings and not ls.quirk_hits
