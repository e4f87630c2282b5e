"""VdpaDeviceModel: the answers of a conforming parent to each vdpa_config_op."""

from __future__ import annotations

import contextlib
import errno
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdpacert.model import features as feature_rules
from vdpacert.model.feature_bits import mask_of
from vdpacert.model.iotlb import IotlbMap
from vdpacert.model.ring_index import PackedVqState
from vdpacert.model.spec import ModelErrno
from vdpacert.model.status import StatusBit
from vdpacert.model.vdpa_device import (
    INITIAL_PACKED_STATE,
    VDPA_RESET_F_CLEAN_MAP,
    VDPA_SIM_NET,
    VdpaDeviceModel,
    VdpaDeviceSpec,
    VqState,
)
from vdpacert.uapi.vhost_types import VHOST_ACCESS_RW
from vdpacert.uapi.virtio_ids import VIRTIO_ID_NET

NET = VIRTIO_ID_NET
ACK, DRV, FOK, DOK = (
    int(StatusBit.ACKNOWLEDGE),
    int(StatusBit.DRIVER),
    int(StatusBit.FEATURES_OK),
    int(StatusBit.DRIVER_OK),
)
GOOD = mask_of(NET, "VERSION_1", "ACCESS_PLATFORM", "CTRL_VQ", "MAC", "STATUS")
PACKED_SPEC = replace(
    VDPA_SIM_NET,
    device_features=VDPA_SIM_NET.device_features | mask_of(NET, "RING_PACKED"),
    optional_ops=VDPA_SIM_NET.optional_ops | {"get_vq_size", "get_vq_desc_group"},
    vq_desc_groups=(0, 0, 1),
)


def errno_of(fn: Any, *args: Any) -> tuple[int, str]:
    with pytest.raises(ModelErrno) as exc:
        fn(*args)
    return exc.value.errno, exc.value.rule


def negotiate(dev: VdpaDeviceModel, features: int = GOOD) -> None:
    dev.set_status(ACK)
    dev.set_status(ACK | DRV)
    dev.set_driver_features(features)
    dev.set_status(ACK | DRV | FOK)


def test_initial_state_and_identity() -> None:
    dev = VdpaDeviceModel(VDPA_SIM_NET)
    assert dev.get_device_id() == 1
    assert dev.get_vendor_id() == 0
    assert dev.get_device_features() == 0x308830028
    assert dev.get_backend_features() == 1 << 6
    assert dev.get_status() == 0
    assert dev.get_driver_features() == 0
    assert (dev.get_vq_num_max(), dev.get_vq_num_min(), dev.get_vq_align()) == (256, 1, 4096)
    assert dev.get_config_size() == 24
    assert dev.get_config(0, 6) == bytes.fromhex("020000000001")
    assert dev.get_iova_range() == (0, (1 << 64) - 1)
    assert [dev.get_vq_group(i) for i in range(3)] == [0, 0, 1]
    assert dev.vqs == [VqState()] * 3
    assert dev.get_vq_state(0) == 0
    assert not dev.suspended
    assert dev.get_generation() == 0
    assert dev.spec.offer_violations() == []


def test_features_ok_is_kept_for_a_valid_set() -> None:
    dev = VdpaDeviceModel(VDPA_SIM_NET)
    negotiate(dev)
    assert dev.get_status() == ACK | DRV | FOK
    result = dev.set_status(ACK | DRV | FOK | DOK)
    assert result.determined
    assert dev.get_status() == ACK | DRV | FOK | DOK


@pytest.mark.parametrize(
    "bad",
    [
        mask_of(NET, "ACCESS_PLATFORM", "CTRL_VQ"),  # no VERSION_1
        mask_of(NET, "VERSION_1", "CTRL_MAC_ADDR"),  # CTRL_MAC_ADDR needs CTRL_VQ
        mask_of(NET, "VERSION_1", "MQ", "CTRL_VQ"),  # MQ was not offered
    ],
)
def test_features_ok_is_refused_for_an_invalid_set(bad: int) -> None:
    dev = VdpaDeviceModel(VDPA_SIM_NET)
    negotiate(dev, bad)
    assert dev.get_status() == ACK | DRV
    assert not dev.features_valid()


def test_features_are_locked_after_features_ok() -> None:
    dev = VdpaDeviceModel(VDPA_SIM_NET)
    negotiate(dev)
    assert errno_of(dev.set_driver_features, GOOD) == (errno.EBUSY, "vdpa_device.set_driver_features.locked")
    with pytest.raises(ValueError):
        VdpaDeviceModel(VDPA_SIM_NET).set_driver_features(1 << 64)


def test_queue_configuration_ops() -> None:
    dev = VdpaDeviceModel(VDPA_SIM_NET)
    dev.set_vq_num(1, 128)
    dev.set_vq_address(1, 0x1000, 0x2000, 0x3000)
    dev.set_vq_cb(1, True)
    dev.set_vq_ready(1, True)
    assert dev.vqs[1] == VqState(
        num=128, desc_addr=0x1000, driver_addr=0x2000, device_addr=0x3000, ready=True, cb=True
    )
    assert dev.get_vq_ready(1)
    assert not dev.kick_vq(1)  # not DRIVER_OK yet
    negotiate(dev)
    dev.set_status(ACK | DRV | FOK | DOK)
    assert dev.kick_vq(1)
    assert not dev.kick_vq(0)  # not ready
    dev.suspend()
    assert not dev.kick_vq(1)


@pytest.mark.parametrize(
    ("num", "rule"),
    [(0, "vdpa_device.vq_num"), (512, "vdpa_device.vq_num"), (100, "vdpa_device.vq_num.split_pow2")],
)
def test_queue_size_bounds(num: int, rule: str) -> None:
    dev = VdpaDeviceModel(VDPA_SIM_NET)
    assert errno_of(dev.set_vq_num, 0, num) == (errno.EINVAL, rule)
    assert dev.vqs[0].num == 0


def test_packed_queue_sizes_need_not_be_powers_of_two() -> None:
    dev = VdpaDeviceModel(PACKED_SPEC)
    dev.set_driver_features(GOOD | mask_of(NET, "RING_PACKED"))
    dev.set_vq_num(0, 100)
    assert dev.get_vq_size(0) == 100
    assert dev.get_vq_size(1) == 256  # not chosen yet: the maximum


def test_vq_index_out_of_range_is_einval() -> None:
    dev = VdpaDeviceModel(VDPA_SIM_NET)
    for op, args in ((dev.set_vq_ready, (3, True)), (dev.get_vq_state, (3,)), (dev.set_vq_num, (-1, 8))):
        assert errno_of(op, *args) == (errno.EINVAL, "vdpa_device.vq_index")


def test_split_vq_state_round_trips_and_rejects_packed_values() -> None:
    dev = VdpaDeviceModel(VDPA_SIM_NET)
    dev.set_vq_state(0, 0xFFFF)
    assert dev.get_vq_state(0) == 0xFFFF
    assert errno_of(dev.set_vq_state, 0, INITIAL_PACKED_STATE)[1] == "vdpa_device.vq_state.layout"
    assert errno_of(dev.set_vq_state, 0, 0x10000)[1] == "vdpa_device.vq_state.layout"


def test_packed_vq_state_starts_with_wrap_counters_set_and_round_trips() -> None:
    dev = VdpaDeviceModel(PACKED_SPEC)
    dev.set_driver_features(GOOD | mask_of(NET, "RING_PACKED"))
    assert dev.get_vq_state(0) == PackedVqState(0, 1, 0, 1)
    state = PackedVqState(last_avail_idx=0x7FFF, last_avail_counter=0, last_used_idx=3, last_used_counter=1)
    dev.set_vq_state(2, state)
    assert dev.get_vq_state(2) == state
    assert errno_of(dev.set_vq_state, 0, 5)[1] == "vdpa_device.vq_state.layout"


def test_missing_optional_ops_are_eopnotsupp() -> None:
    spec = replace(VDPA_SIM_NET, optional_ops=frozenset())
    dev = VdpaDeviceModel(spec)
    for op, args in (
        (dev.get_vq_size, (0,)),
        (dev.get_vq_group, (0,)),
        (dev.get_vq_desc_group, (0,)),
        (dev.suspend, ()),
        (dev.resume, ()),
        (dev.compat_reset, (1,)),
        (dev.reset_map, (0,)),
        (dev.set_group_asid, (0, 1)),
    ):
        assert errno_of(op, *args) == (errno.EOPNOTSUPP, "vdpa_device.optional_op")


def test_desc_group_defaults_to_the_queue_group() -> None:
    dev = VdpaDeviceModel(PACKED_SPEC)
    assert [dev.get_vq_desc_group(i) for i in range(3)] == [0, 0, 1]


def test_config_space_bounds_and_writes() -> None:
    dev = VdpaDeviceModel(VDPA_SIM_NET)
    dev.set_config(0, b"\x52\x54\x00\x12\x34\x56")
    assert dev.get_config(0, 6) == bytes.fromhex("525400123456")
    assert dev.get_config(24, 0) == b""
    assert errno_of(dev.get_config, 20, 5) == (errno.EINVAL, "vdpa_device.config.bounds")
    assert errno_of(dev.set_config, 23, b"ab") == (errno.EINVAL, "vdpa_device.config.bounds")


def test_group_asid_binding_chooses_the_translation() -> None:
    dev = VdpaDeviceModel(VDPA_SIM_NET)
    dev.set_map(1, [IotlbMap(0, 0xFFF, 0x5000, VHOST_ACCESS_RW)])
    assert dev.iotlb_for_vq(2).translate(0, 4, write=False) != ((0x5000, 4),)
    dev.set_group_asid(1, 1)
    assert dev.iotlb_for_vq(2).translate(0, 4, write=False) == ((0x5000, 4),)
    assert dev.iotlb_for_vq(0) is dev.iotlb(0)
    assert errno_of(dev.set_group_asid, 2, 0) == (errno.EINVAL, "vdpa_device.set_group_asid.group")
    assert errno_of(dev.set_group_asid, 0, 2) == (errno.EINVAL, "vdpa_device.asid")


def test_map_ops_follow_the_parent_kind() -> None:
    setmap = VdpaDeviceModel(VDPA_SIM_NET)
    assert errno_of(setmap.dma_map, 0, 0, 0x1000, 0, VHOST_ACCESS_RW) == (
        errno.EOPNOTSUPP,
        "vdpa_device.map_op",
    )
    dma = VdpaDeviceModel(replace(VDPA_SIM_NET, map_op="dma_map"))
    assert errno_of(dma.set_map, 0, []) == (errno.EOPNOTSUPP, "vdpa_device.map_op")
    dma.dma_map(0, 0x1000, 0x1000, 0x9000, VHOST_ACCESS_RW)
    assert dma.dma_unmap(0, 0x1800, 1) == (IotlbMap(0x1000, 0x1FFF, 0x9000, VHOST_ACCESS_RW),)


def test_reset_keeps_maps_but_compat_reset_with_clean_map_drops_them() -> None:
    dev = VdpaDeviceModel(VDPA_SIM_NET)
    dev.set_map(0, [IotlbMap(0, 0xFFF, 0, VHOST_ACCESS_RW)])
    negotiate(dev)
    dev.reset()
    assert dev.get_status() == 0 and dev.get_driver_features() == 0
    assert len(dev.iotlb(0)) == 1
    assert dev.get_generation() == 1
    dev.compat_reset(0)
    assert len(dev.iotlb(0)) == 1
    dev.compat_reset(VDPA_RESET_F_CLEAN_MAP)
    assert len(dev.iotlb(0)) == 0
    dev.set_map(1, [IotlbMap(0, 0xFFF, 0, VHOST_ACCESS_RW)])
    dev.reset_map(1)
    assert len(dev.iotlb(1)) == 0


def test_error_state_sets_needs_reset_until_reset() -> None:
    dev = VdpaDeviceModel(VDPA_SIM_NET)
    negotiate(dev)
    dev.enter_error_state()
    assert dev.get_status() & StatusBit.DEVICE_NEEDS_RESET
    dev.set_status(0)
    assert dev.get_status() == 0 and not dev.needs_reset


def test_spec_validation_rejects_inconsistent_parents() -> None:
    with pytest.raises(ValueError):
        VdpaDeviceSpec(device_id=1, device_features=0, nvqs=2, vq_groups=(0, 1))  # ngroups 1
    with pytest.raises(ValueError):
        VdpaDeviceSpec(device_id=1, device_features=0, nvqs=1, optional_ops=frozenset({"bogus"}))
    with pytest.raises(ValueError):
        VdpaDeviceSpec(device_id=1, device_features=0, nvqs=1, map_op="platform", nas=2)
    with pytest.raises(ValueError):
        VdpaDeviceSpec(device_id=1, device_features=1 << 64, nvqs=1)


# -- properties ----------------------------------------------------------------------------------
_offered_bits = [b for b in range(64) if VDPA_SIM_NET.device_features >> b & 1]
_any_features = st.builds(
    lambda picks, extra: sum(1 << b for b in picks) | extra,
    st.sets(st.sampled_from(_offered_bits)),
    st.sampled_from([0, 0, 1 << 22, 1 << 34]),
)  # sometimes an unoffered bit

_device_op = st.one_of(
    st.tuples(
        st.just("set_status"),
        st.sampled_from([0, ACK, ACK | DRV, ACK | DRV | FOK, ACK | DRV | FOK | DOK, 0x80, 0x40]),
    ),
    st.tuples(st.just("set_driver_features"), _any_features),
    st.tuples(st.just("set_vq_num"), st.integers(0, 3), st.sampled_from([0, 1, 64, 100, 256, 512])),
    st.tuples(
        st.just("set_vq_address"),
        st.integers(0, 3),
        st.integers(0, 1 << 20),
        st.integers(0, 1 << 20),
        st.integers(0, 1 << 20),
    ),
    st.tuples(st.just("set_vq_ready"), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("set_vq_cb"), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("set_vq_state"), st.integers(0, 3), st.integers(0, 0x1FFFF)),
    st.tuples(st.just("set_config"), st.integers(0, 26), st.binary(max_size=4)),
    st.tuples(st.just("set_group_asid"), st.integers(0, 2), st.integers(0, 2)),
    st.tuples(st.just("set_map"), st.integers(0, 2), st.integers(0, 3)),
    st.tuples(st.just("suspend")),
    st.tuples(st.just("resume")),
    st.tuples(st.just("enter_error_state")),
)


def apply(dev: VdpaDeviceModel, op: tuple[Any, ...]) -> None:
    name, *args = op
    if name == "set_map":
        asid, n = args
        args = [asid, [IotlbMap(i * 0x1000, i * 0x1000 + 0xFFF, 0, VHOST_ACCESS_RW) for i in range(n)]]
    getattr(dev, name)(*args)


@settings(max_examples=120, deadline=None)
@given(st.lists(_device_op, max_size=25))
def test_reset_returns_the_initial_state_from_any_reachable_state(ops: list[tuple[Any, ...]]) -> None:
    dev = VdpaDeviceModel(VDPA_SIM_NET)
    initial = dev.snapshot()
    for op in ops:
        with contextlib.suppress(ModelErrno):
            apply(dev, op)
    maps = dev.snapshot().maps
    dev.reset()
    after = dev.snapshot()
    assert after.without_maps() == initial.without_maps()
    assert after.maps == maps  # kept across a plain reset
    dev.compat_reset(VDPA_RESET_F_CLEAN_MAP)
    assert dev.snapshot().maps == initial.maps


@settings(max_examples=120, deadline=None)
@given(st.lists(_device_op, max_size=25))
def test_failed_ops_change_nothing_and_features_ok_implies_valid(ops: list[tuple[Any, ...]]) -> None:
    dev = VdpaDeviceModel(VDPA_SIM_NET)
    for op in ops:
        before = dev.snapshot()
        try:
            apply(dev, op)
        except ModelErrno:
            assert dev.snapshot() == before
        if dev.get_status() & StatusBit.FEATURES_OK:
            assert feature_rules.is_valid(
                NET, dev.get_driver_features(), offered=VDPA_SIM_NET.device_features
            )


@settings(max_examples=200, deadline=None)
@given(_any_features)
def test_features_ok_is_accepted_exactly_for_valid_sets(features: int) -> None:
    dev = VdpaDeviceModel(VDPA_SIM_NET)
    negotiate(dev, features)
    accepted = bool(dev.get_status() & StatusBit.FEATURES_OK)
    assert accepted == feature_rules.is_valid(NET, features, offered=VDPA_SIM_NET.device_features)
