"""VhostVdpaModel: the /dev/vhost-vdpa-N ioctls and IOTLB messages, as Linux 6.x defines them."""

from __future__ import annotations

import contextlib
import errno
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdpacert.model import quirks
from vdpacert.model.feature_bits import mask_of
from vdpacert.model.iotlb import IotlbMap
from vdpacert.model.ring_index import PackedVqState, decode_packed_base
from vdpacert.model.spec import LinuxSource, ModelErrno
from vdpacert.model.status import StatusBit
from vdpacert.model.vdpa_device import VDPA_SIM_NET, VdpaDeviceSpec
from vdpacert.model.vhost_vdpa import (
    IOCTLS,
    OWNER_EXEMPT,
    VHOST_VDPA_RULES,
    IotlbMessageError,
    VhostSnapshot,
    VhostVdpaModel,
)
from vdpacert.uapi import vhost as ioctl_numbers
from vdpacert.uapi import vhost_types as vt

NET = 1
ACK, DRV, FOK, DOK = (
    int(StatusBit.ACKNOWLEDGE),
    int(StatusBit.DRIVER),
    int(StatusBit.FEATURES_OK),
    int(StatusBit.DRIVER_OK),
)
GOOD = mask_of(NET, "VERSION_1", "ACCESS_PLATFORM", "CTRL_VQ", "MAC", "STATUS")
PACKED = mask_of(NET, "RING_PACKED")
UPDATE, INVALIDATE = vt.VHOST_IOTLB_UPDATE, vt.VHOST_IOTLB_INVALIDATE
BEGIN, END = vt.VHOST_IOTLB_BATCH_BEGIN, vt.VHOST_IOTLB_BATCH_END
RW, RO = vt.VHOST_ACCESS_RW, vt.VHOST_ACCESS_RO
B = 1
SIM_BACKEND = (
    B << vt.VHOST_BACKEND_F_IOTLB_MSG_V2
    | B << vt.VHOST_BACKEND_F_IOTLB_BATCH
    | B << vt.VHOST_BACKEND_F_IOTLB_ASID
    | B << vt.VHOST_BACKEND_F_SUSPEND
    | B << vt.VHOST_BACKEND_F_RESUME
    | B << vt.VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK
    | B << vt.VHOST_BACKEND_F_IOTLB_PERSIST
)
PACKED_SIM = replace(VDPA_SIM_NET, device_features=VDPA_SIM_NET.device_features | PACKED)


def fresh(
    spec: VdpaDeviceSpec = VDPA_SIM_NET, *, owner: bool = True, backend: int | None = None
) -> VhostVdpaModel:
    v = VhostVdpaModel(spec)
    v.open()
    if owner:
        v.VHOST_SET_OWNER()
    if backend is not None:
        v.VHOST_SET_BACKEND_FEATURES(backend)
    return v


def raises(code: int, rule: str, fn: Any, *args: Any, **kw: Any) -> ModelErrno:
    with pytest.raises(ModelErrno) as exc:
        fn(*args, **kw)
    assert (exc.value.errno, exc.value.rule) == (code, rule), exc.value
    return exc.value


def msg_fails(cause_errno: int, cause_rule: str, v: VhostVdpaModel, *args: Any, **kw: Any) -> None:
    with pytest.raises(IotlbMessageError) as exc:
        v.write_msg(*args, **kw)
    assert exc.value.errno == errno.EFAULT
    assert (exc.value.cause.errno, exc.value.cause.rule) == (cause_errno, cause_rule)


def bring_up(v: VhostVdpaModel, features: int = GOOD) -> None:
    v.VHOST_VDPA_SET_STATUS(ACK)
    v.VHOST_VDPA_SET_STATUS(ACK | DRV)
    v.VHOST_SET_FEATURES(features)
    v.VHOST_VDPA_SET_STATUS(ACK | DRV | FOK)


def test_ioctl_numbers_match_the_uapi_and_brief() -> None:
    assert IOCTLS["VHOST_GET_FEATURES"] == 0x8008AF00
    assert IOCTLS["VHOST_SET_OWNER"] == 0xAF01
    assert IOCTLS["VHOST_GET_VRING_BASE"] == 0xC008AF12
    assert IOCTLS["VHOST_SET_VRING_ADDR"] == 0x4028AF11
    assert OWNER_EXEMPT <= set(IOCTLS)
    for name in IOCTLS:
        assert hasattr(VhostVdpaModel, name)
        assert IOCTLS[name] == getattr(ioctl_numbers, name)
    for rule in VHOST_VDPA_RULES:
        assert rule.rule.startswith("vhost_vdpa.") and rule.citation is not None


def test_full_bring_up_suspend_get_base_resume_reset() -> None:
    v = VhostVdpaModel(VDPA_SIM_NET)
    v.open()
    v.VHOST_SET_OWNER()
    assert v.VHOST_GET_FEATURES() == 0x308830028
    assert v.VHOST_GET_BACKEND_FEATURES() == SIM_BACKEND == 0x17E
    v.VHOST_SET_BACKEND_FEATURES(SIM_BACKEND)
    assert v.VHOST_VDPA_GET_DEVICE_ID() == 1
    assert (v.VHOST_VDPA_GET_VQS_COUNT(), v.VHOST_VDPA_GET_GROUP_NUM(), v.VHOST_VDPA_GET_AS_NUM()) == (
        3,
        2,
        2,
    )
    assert v.VHOST_VDPA_GET_CONFIG_SIZE() == 24
    assert v.VHOST_VDPA_GET_VRING_NUM() == 256
    assert v.VHOST_VDPA_GET_IOVA_RANGE() == (0, (1 << 64) - 1)
    assert v.VHOST_VDPA_GET_CONFIG(0, 6) == bytes.fromhex("020000000001")
    assert [v.VHOST_VDPA_GET_VRING_GROUP(i) for i in range(3)] == [0, 0, 1]
    bring_up(v)
    assert v.VHOST_VDPA_GET_STATUS() == ACK | DRV | FOK
    assert v.write_msg(UPDATE, 0, 0x0, 0x100000, 0x7F0000000000, RW) == 72
    for i in range(2):
        v.VHOST_SET_VRING_NUM(i, 256)
        v.VHOST_SET_VRING_ADDR(i, 0x10000 * (i + 1), 0x10000 * (i + 1) + 0x1000, 0x10000 * (i + 1) + 0x2000)
        v.VHOST_SET_VRING_BASE(i, 0)
        v.VHOST_SET_VRING_KICK(i, 10 + i)
        v.VHOST_SET_VRING_CALL(i, 20 + i)
        assert v.VHOST_VDPA_SET_VRING_ENABLE(i, 1).determined
    v.VHOST_VDPA_SET_STATUS(ACK | DRV | FOK | DOK)
    assert v.VHOST_VDPA_GET_STATUS() == ACK | DRV | FOK | DOK
    assert v.device.kick_vq(0) and v.device.vqs[0].cb
    v.device.set_vq_state(1, 7)  # the datapath advanced queue 1
    v.VHOST_VDPA_SUSPEND()
    assert v.device.suspended and not v.device.kick_vq(0)
    assert [v.VHOST_GET_VRING_BASE(i) for i in range(3)] == [0, 7, 0]
    v.VHOST_SET_VRING_BASE(1, 5)  # allowed while suspended
    assert v.VHOST_GET_VRING_BASE(1) == 5
    v.VHOST_VDPA_RESUME()
    assert v.device.kick_vq(0)
    result = v.VHOST_VDPA_SET_STATUS(0)
    assert result.reset and v.VHOST_VDPA_GET_STATUS() == 0
    assert v.device.vqs[0].num == 0 and not v.device.suspended
    # IOTLB_PERSIST negotiated: the device keeps its map across the reset.
    assert v.device.iotlb(0).maps == (IotlbMap(0, 0xFFFFF, 0x7F0000000000, RW),)
    v.close()
    assert not v.opened and len(v.device.iotlb(0)) == 0


def test_most_ioctls_need_an_owner_but_vdpa_queries_do_not() -> None:
    v = fresh(owner=False)
    assert v.VHOST_GET_FEATURES() == 0x308830028
    v.VHOST_SET_BACKEND_FEATURES(0)
    v.VHOST_VDPA_SET_STATUS(ACK)
    v.VHOST_VDPA_SUSPEND()  # not DRIVER_OK: succeeds and does nothing
    for name, args in (
        ("VHOST_SET_VRING_NUM", (0, 256)),
        ("VHOST_GET_VRING_BASE", (0,)),
        ("VHOST_VDPA_SET_VRING_ENABLE", (0, 1)),
        ("VHOST_VDPA_GET_VRING_GROUP", (0,)),
        ("VHOST_VDPA_SET_GROUP_ASID", (1, 1)),
        ("VHOST_SET_VRING_KICK", (5, 1)),
    ):
        raises(errno.EPERM, "vhost_vdpa.owner.required", getattr(v, name), *args)
    msg_fails(errno.EPERM, "vhost_vdpa.owner.required", v, UPDATE, 0, 0, 0x1000, 0, RW)
    v.VHOST_SET_OWNER()
    raises(errno.EBUSY, "vhost_vdpa.owner.once", v.VHOST_SET_OWNER)


def test_open_is_exclusive_and_close_starts_afresh() -> None:
    v = fresh(backend=SIM_BACKEND)
    raises(errno.EBUSY, "vhost_vdpa.open.exclusive", v.open)
    bring_up(v)
    v.write_msg(UPDATE, 1, 0, 0x1000, 0, RW)
    v.close()
    raises(errno.EBADF, "vhost_vdpa.fd.closed", v.VHOST_GET_FEATURES)
    v.open()
    snap = v.snapshot()
    assert not snap.owner and snap.backend_features == 0 and snap.address_spaces == ()
    assert snap.device.status == 0 and snap.device.maps == ((), ())


def test_set_features_after_features_ok_is_ebusy() -> None:
    v = fresh()
    bring_up(v)
    raises(errno.EBUSY, "vhost_vdpa.set_features.after_features_ok", v.VHOST_SET_FEATURES, GOOD)


def test_invalid_feature_set_is_taken_but_features_ok_refused() -> None:
    v = fresh()
    bring_up(v, mask_of(NET, "VERSION_1", "CTRL_MAC_ADDR"))  # CTRL_MAC_ADDR needs CTRL_VQ
    assert v.VHOST_VDPA_GET_STATUS() == ACK | DRV
    v.VHOST_SET_FEATURES(GOOD)  # not locked: FEATURES_OK was refused
    v.VHOST_VDPA_SET_STATUS(ACK | DRV | FOK)
    assert v.VHOST_VDPA_GET_STATUS() == ACK | DRV | FOK


def test_status_writes_may_not_clear_bits() -> None:
    v = fresh()
    bring_up(v)
    raises(errno.EINVAL, "vhost_vdpa.set_status.clears_bits", v.VHOST_VDPA_SET_STATUS, ACK | DRV)
    assert v.VHOST_VDPA_GET_STATUS() == ACK | DRV | FOK


@pytest.mark.parametrize(
    ("features", "code", "rule"),
    [
        (B << 0, errno.EOPNOTSUPP, "vhost_vdpa.backend_features.unknown"),
        (B << 9, errno.EOPNOTSUPP, "vhost_vdpa.backend_features.unknown"),
        (B << vt.VHOST_BACKEND_F_DESC_ASID, errno.EINVAL, "vhost_vdpa.backend_features.desc_asid"),
        (
            B << vt.VHOST_BACKEND_F_DESC_ASID | B << vt.VHOST_BACKEND_F_IOTLB_ASID,
            errno.EOPNOTSUPP,
            "vhost_vdpa.backend_features.unsupported",
        ),
    ],
)
def test_backend_feature_refusals(features: int, code: int, rule: str) -> None:
    v = fresh()
    raises(code, rule, v.VHOST_SET_BACKEND_FEATURES, features)
    assert v.backend_features == 0


def test_backend_features_depend_on_parent_ops() -> None:
    bare = replace(VDPA_SIM_NET, optional_ops=frozenset(), backend_features=0)
    v = fresh(bare)
    assert v.VHOST_GET_BACKEND_FEATURES() == 0xE  # MSG_V2, BATCH, ASID only
    for bit in (
        vt.VHOST_BACKEND_F_SUSPEND,
        vt.VHOST_BACKEND_F_RESUME,
        vt.VHOST_BACKEND_F_IOTLB_PERSIST,
        vt.VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK,
    ):
        raises(
            errno.EOPNOTSUPP,
            "vhost_vdpa.backend_features.unsupported",
            v.VHOST_SET_BACKEND_FEATURES,
            B << bit,
        )
    assert quirks.quirks_for_rule("vhost_vdpa.backend_features.unsupported")


def test_suspend_and_resume_need_the_parent_op_once_running() -> None:
    v = fresh(replace(VDPA_SIM_NET, optional_ops=frozenset()))
    bring_up(v)
    v.VHOST_VDPA_SET_STATUS(ACK | DRV | FOK | DOK)
    raises(errno.EOPNOTSUPP, "vhost_vdpa.parent_op", v.VHOST_VDPA_SUSPEND)
    raises(errno.EOPNOTSUPP, "vhost_vdpa.parent_op", v.VHOST_VDPA_RESUME)
    raises(errno.EOPNOTSUPP, "vhost_vdpa.parent_op", v.VHOST_VDPA_GET_VRING_GROUP, 0)
    raises(errno.EOPNOTSUPP, "vhost_vdpa.parent_op", v.VHOST_VDPA_GET_VRING_SIZE, 0)
    raises(errno.EOPNOTSUPP, "vhost_vdpa.parent_op", v.VHOST_VDPA_GET_VRING_DESC_GROUP, 0)


def test_vring_index_out_of_range_is_enobufs() -> None:
    v = fresh()
    for name, args in (
        ("VHOST_SET_VRING_NUM", (3, 256)),
        ("VHOST_SET_VRING_BASE", (3, 0)),
        ("VHOST_GET_VRING_BASE", (3,)),
        ("VHOST_SET_VRING_CALL", (7, -1)),
        ("VHOST_VDPA_SET_VRING_ENABLE", (3, 1)),
        ("VHOST_VDPA_SET_GROUP_ASID", (3, 0)),
        ("VHOST_SET_VRING_ADDR", (3, 0, 0, 0)),
    ):
        raises(errno.ENOBUFS, "vhost_vdpa.vring.index", getattr(v, name), *args)


@pytest.mark.parametrize(
    ("num", "rule"),
    [
        (0, "vhost_vdpa.vring_num.invalid"),
        (100, "vhost_vdpa.vring_num.invalid"),
        (0x10000, "vhost_vdpa.vring_num.invalid"),
        (512, "vhost_vdpa.vring_num.bounds"),
    ],
)
def test_vring_num_rules(num: int, rule: str) -> None:
    v = fresh()
    raises(errno.EINVAL, rule, v.VHOST_SET_VRING_NUM, 0, num)
    assert v.device.vqs[0].num == 0


@pytest.mark.parametrize(
    ("addrs", "kw", "code", "rule"),
    [
        ((0x1000, 0x2001, 0x3000), {}, errno.EINVAL, "vhost_vdpa.vring_addr.align"),
        ((0x1000, 0x2000, 0x3002), {}, errno.EINVAL, "vhost_vdpa.vring_addr.align"),
        (
            (0x1000, 0x2000, 0x3000),
            {"flags": 1, "log_guest_addr": 2},
            errno.EINVAL,
            "vhost_vdpa.vring_addr.align",
        ),
        ((0x1000, 0x2000, 0x3000), {"flags": 2}, errno.EOPNOTSUPP, "vhost_vdpa.vring_addr.flags"),
        ((0x1008, 0x2000, 0x3000), {}, errno.EINVAL, "vhost_vdpa.vring_addr.desc_align"),
    ],
)
def test_vring_addr_rules(addrs: tuple[int, int, int], kw: dict[str, int], code: int, rule: str) -> None:
    v = fresh()
    raises(code, rule, v.VHOST_SET_VRING_ADDR, 0, *addrs, **kw)
    v.VHOST_SET_VRING_ADDR(0, 0x1000, 0x2002, 0x3004, flags=1, log_guest_addr=0x4000)
    assert v.snapshot().vqs[0].log_used and v.snapshot().vqs[0].log_addr == 0x4000


def test_vring_base_and_addr_are_refused_while_running_unsuspended() -> None:
    v = fresh(backend=SIM_BACKEND)
    bring_up(v)
    v.VHOST_SET_VRING_NUM(0, 8)
    v.VHOST_SET_VRING_ADDR(0, 0x1000, 0x2000, 0x3000)
    v.VHOST_VDPA_SET_VRING_ENABLE(0, 1)
    v.VHOST_VDPA_SET_STATUS(ACK | DRV | FOK | DOK)
    v.VHOST_SET_VRING_BASE(1, 7)  # lockstep finding: only a running (enabled) queue refuses, as mlx5_vdpa does
    v.VHOST_SET_VRING_ADDR(1, 0x1000, 0x2000, 0x3000)
    raises(errno.EINVAL, "vhost_vdpa.vring.running", v.VHOST_SET_VRING_BASE, 0, 1)
    raises(errno.EINVAL, "vhost_vdpa.vring.running", v.VHOST_SET_VRING_ADDR, 0, 0x1000, 0x2000, 0x3000)
    v.VHOST_VDPA_SUSPEND()
    v.VHOST_SET_VRING_BASE(0, 1)
    v.VHOST_SET_VRING_ADDR(0, 0x1000, 0x2000, 0x3000)
    assert v.VHOST_GET_VRING_BASE(0) == 1


def test_a_queue_a_device_cannot_start_is_not_running() -> None:
    # Certify finding: enabled with size 0 (never set) the device cannot start the queue, so it is not running.
    v = fresh(backend=SIM_BACKEND)
    bring_up(v)
    v.VHOST_VDPA_SET_VRING_ENABLE(0, 1)
    v.VHOST_VDPA_SET_STATUS(ACK | DRV | FOK | DOK)
    v.VHOST_SET_VRING_BASE(0, 2)
    assert v.VHOST_GET_VRING_BASE(0) == 2


def test_a_failed_device_runs_no_queue() -> None:
    # Lockstep finding: FAILED set before DRIVER_OK leaves the queues stopped, so their base may be set.
    v = fresh(backend=SIM_BACKEND)
    bring_up(v)
    v.VHOST_SET_VRING_NUM(0, 8)
    v.VHOST_SET_VRING_ADDR(0, 0x1000, 0x2000, 0x3000)
    v.VHOST_VDPA_SET_VRING_ENABLE(0, 1)
    v.VHOST_VDPA_SET_STATUS(ACK | DRV | FOK | 0x80)
    v.VHOST_VDPA_SET_STATUS(ACK | DRV | FOK | DOK | 0x80)
    v.VHOST_SET_VRING_BASE(0, 3)
    assert v.VHOST_GET_VRING_BASE(0) == 3


def test_split_vring_base_is_16_bits() -> None:
    v = fresh()
    raises(errno.EINVAL, "vhost_vdpa.vring_base.split_range", v.VHOST_SET_VRING_BASE, 0, 0x10000)


def test_packed_vring_base_encoding() -> None:
    v = fresh(PACKED_SIM)
    v.VHOST_SET_FEATURES(GOOD | PACKED)
    assert v.VHOST_GET_VRING_BASE(0) == 0x80008000  # both wrap counters start at 1
    v.VHOST_SET_VRING_BASE(0, 0x0005_8003)
    assert v.device.get_vq_state(0) == PackedVqState(3, 1, 5, 0)
    assert v.VHOST_GET_VRING_BASE(0) == 0x0005_8003


def test_vring_enable_before_and_after_driver_ok() -> None:
    v = fresh()
    bring_up(v)
    assert v.VHOST_VDPA_SET_VRING_ENABLE(0, 1).determined
    v.VHOST_VDPA_SET_STATUS(ACK | DRV | FOK | DOK)
    late = v.VHOST_VDPA_SET_VRING_ENABLE(1, 1)
    assert late.ready and not late.determined  # ENABLE_AFTER_DRIVER_OK not negotiated
    off = v.VHOST_VDPA_SET_VRING_ENABLE(0, 0)
    assert not off.ready and not off.determined  # no VIRTIO_F_RING_RESET
    w = fresh(backend=B << vt.VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK)
    bring_up(w)
    w.VHOST_VDPA_SET_STATUS(ACK | DRV | FOK | DOK)
    assert w.VHOST_VDPA_SET_VRING_ENABLE(2, 1).determined and w.device.get_vq_ready(2)


def test_group_asid_ioctls() -> None:
    v = fresh()
    raises(errno.EINVAL, "vhost_vdpa.set_group_asid.asid", v.VHOST_VDPA_SET_GROUP_ASID, 1, 2)
    raises(
        errno.EINVAL, "vdpa_device.set_group_asid.group", v.VHOST_VDPA_SET_GROUP_ASID, 2, 1
    )  # ngroups 2 < nvqs 3
    v.VHOST_VDPA_SET_GROUP_ASID(1, 1)
    assert v.device.group_asid == [0, 1]


def test_config_bounds_are_einval_including_e2big() -> None:
    v = fresh()
    for off, length in ((0, 0), (25, 1), (20, 5), (0, 25)):
        raises(errno.EINVAL, "vhost_vdpa.config.bounds", v.VHOST_VDPA_GET_CONFIG, off, length)
    raises(errno.EINVAL, "vhost_vdpa.config.bounds", v.VHOST_VDPA_SET_CONFIG, 24, b"x")
    v.VHOST_VDPA_SET_CONFIG(23, b"x")
    assert v.VHOST_VDPA_GET_CONFIG(23, 1) == b"x"


def test_dirty_log_ioctls_are_enotty_unless_the_device_logs() -> None:
    v = fresh()
    raises(errno.ENOTTY, "vhost_vdpa.log.unsupported", v.VHOST_SET_LOG_BASE, 0x1000)
    raises(errno.ENOTTY, "vhost_vdpa.log.unsupported", v.VHOST_SET_LOG_FD, 3)
    logging = fresh(replace(VDPA_SIM_NET, supports_dirty_log=True), owner=False)
    raises(errno.EPERM, "vhost_vdpa.owner.required", logging.VHOST_SET_LOG_BASE, 0x1000)
    logging.VHOST_SET_OWNER()
    logging.VHOST_SET_LOG_BASE(0x1000)
    logging.VHOST_SET_LOG_FD(3)
    assert logging.snapshot().log_base == 0x1000 and logging.snapshot().log_fd
    raises(errno.EBADF, "vhost_vdpa.eventfd", logging.VHOST_SET_LOG_FD, -2)


# -- IOTLB messages -----------------------------------------------------------------------------------
def test_iotlb_overlap_and_partial_invalidation() -> None:
    v = fresh(backend=SIM_BACKEND)
    v.write_msg(UPDATE, 0, 0x0, 0x4000, 0xA000, RW)
    msg_fails(errno.EEXIST, "iotlb.update.overlap", v, UPDATE, 0, 0x3000, 0x2000, 0xB000, RW)
    v.write_msg(INVALIDATE, 0, 0x3000, 0x10)  # hits the first mapping: dropped whole
    assert v.device.iotlb(0).maps == ()
    v.write_msg(UPDATE, 0, 0x3000, 0x2000, 0xB000, RW)
    assert v.device.iotlb(0).maps == (IotlbMap(0x3000, 0x4FFF, 0xB000, RW),)


def test_iotlb_message_framing_errors_are_einval_directly() -> None:
    v = fresh()
    raises(errno.EINVAL, "vhost_vdpa.msg.update_size_zero", v.write_msg, UPDATE, 0, 0x1000, 0, 0, RW)
    raises(errno.EINVAL, "vhost_vdpa.msg.type", v.write_msg, UPDATE, 0, 0, 0x1000, 0, RW, version=3)
    msg_fails(errno.EINVAL, "vhost_vdpa.msg.asid", v, vt.VHOST_IOTLB_MISS, 0, 0, 0x1000, 0, RW)  # no AS yet
    msg_fails(errno.EINVAL, "iotlb.update.perm", v, UPDATE, 0, 0, 0x1000, 0, 0)  # fails, but creates AS 0
    msg_fails(errno.EINVAL, "vhost_vdpa.msg.iotlb_type", v, vt.VHOST_IOTLB_MISS, 0, 0, 0x1000, 0, RW)
    msg_fails(errno.EINVAL, "vhost_vdpa.msg.iotlb_type", v, vt.VHOST_IOTLB_ACCESS_FAIL, 0, 0, 0x1000, 0, RW)
    assert quirks.quirks_for_rule("iotlb.update.perm")


def test_asid_is_ignored_without_iotlb_asid_and_checked_with_it() -> None:
    v = fresh(backend=B << vt.VHOST_BACKEND_F_IOTLB_MSG_V2)
    v.write_msg(UPDATE, 1, 0, 0x1000, 0x5000, RW)  # asid field not read: lands in AS 0
    assert len(v.device.iotlb(0)) == 1 and len(v.device.iotlb(1)) == 0
    w = fresh(backend=SIM_BACKEND)
    msg_fails(errno.EINVAL, "vhost_vdpa.msg.asid", w, UPDATE, 2, 0, 0x1000, 0, RW)
    msg_fails(errno.EINVAL, "vhost_vdpa.msg.asid", w, INVALIDATE, 1, 0, 0x1000)  # AS 1 never used
    w.write_msg(UPDATE, 1, 0, 0x1000, 0x6000, RW)
    assert w.device.iotlb(1).maps == (IotlbMap(0, 0xFFF, 0x6000, RW),)


def test_batched_updates_reach_a_set_map_parent_at_batch_end() -> None:
    v = fresh(backend=SIM_BACKEND)
    v.write_msg(BEGIN, 1)
    v.write_msg(UPDATE, 1, 0x0, 0x1000, 0xA000, RW)
    v.write_msg(UPDATE, 1, 0x1000, 0x1000, 0xB000, RO)
    msg_fails(errno.EEXIST, "iotlb.update.overlap", v, UPDATE, 1, 0x800, 0x10, 0, RW)  # checked at once
    msg_fails(errno.EINVAL, "vhost_vdpa.msg.batch_asid", v, UPDATE, 0, 0x8000, 0x1000, 0, RW)
    assert len(v.device.iotlb(1)) == 0  # the parent has not heard yet
    v.write_msg(END, 1)
    assert len(v.device.iotlb(1)) == 2 and not v.snapshot().in_batch


def test_a_dma_map_parent_sees_each_update_immediately() -> None:
    v = fresh(replace(VDPA_SIM_NET, map_op="dma_map"), backend=SIM_BACKEND)
    v.write_msg(BEGIN, 0)
    v.write_msg(UPDATE, 0, 0x0, 0x1000, 0xA000, RW)
    assert len(v.device.iotlb(0)) == 1
    v.write_msg(INVALIDATE, 0, 0x0, 0x1)
    assert len(v.device.iotlb(0)) == 0
    v.write_msg(END, 0)


def test_device_entry_limit_fails_the_update_with_enospc_cause() -> None:
    v = fresh(replace(VDPA_SIM_NET, iotlb_limit=2), backend=SIM_BACKEND)
    v.write_msg(UPDATE, 0, 0x0, 0x1000, 0, RW)
    v.write_msg(UPDATE, 0, 0x1000, 0x1000, 0, RW)
    msg_fails(errno.ENOSPC, "iotlb.update.limit", v, UPDATE, 0, 0x2000, 0x1000, 0, RW)
    assert len(v.address_space(0) or ()) == 2 and len(v.device.iotlb(0)) == 2


def test_reset_without_iotlb_persist_cleans_the_device_map() -> None:
    v = fresh(backend=B << vt.VHOST_BACKEND_F_IOTLB_MSG_V2)
    v.write_msg(UPDATE, 0, 0x0, 0x1000, 0, RW)
    v.VHOST_VDPA_SET_STATUS(ACK)
    v.VHOST_VDPA_SET_STATUS(0)
    assert len(v.device.iotlb(0)) == 0  # compat_reset(CLEAN_MAP)
    assert len(v.address_space(0) or ()) == 1  # vhost-vdpa's own record survives until release
    msg_fails(errno.EEXIST, "iotlb.update.overlap", v, UPDATE, 0, 0x0, 0x1000, 0, RW)


def test_quirk_registry_is_consistent() -> None:
    assert quirks.QUIRKS
    for name, q in quirks.QUIRKS.items():
        assert q.name == name and isinstance(q.linux_source, LinuxSource)
        assert q.spec_says and q.linux_does
    with pytest.raises(quirks.UnknownQuirk):
        quirks.quirk("no.such.quirk")
    assert quirks.quirk("vdpa_sim.used_idx_reset_on_ready").rule == "vdpa_device.vq_state.used_idx_preserved"


# -- properties -------------------------------------------------------------------------------------
_vhost_op = st.one_of(
    st.tuples(st.just("VHOST_SET_OWNER")),
    st.tuples(
        st.just("VHOST_SET_FEATURES"), st.sampled_from([GOOD, GOOD | PACKED, 0, mask_of(NET, "VERSION_1")])
    ),
    st.tuples(st.just("VHOST_SET_BACKEND_FEATURES"), st.sampled_from([0, SIM_BACKEND, 0xE, 1, 1 << 7])),
    st.tuples(
        st.just("VHOST_VDPA_SET_STATUS"),
        st.sampled_from([0, ACK, ACK | DRV, ACK | DRV | FOK, ACK | DRV | FOK | DOK, 0x80]),
    ),
    st.tuples(st.just("VHOST_SET_VRING_NUM"), st.integers(0, 3), st.sampled_from([0, 64, 100, 256, 512])),
    st.tuples(
        st.just("VHOST_SET_VRING_ADDR"),
        st.integers(0, 3),
        st.sampled_from([0x1000, 0x1008]),
        st.sampled_from([0x2000, 0x2001]),
        st.sampled_from([0x3000, 0x3002]),
    ),
    st.tuples(st.just("VHOST_SET_VRING_BASE"), st.integers(0, 3), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("VHOST_GET_VRING_BASE"), st.integers(0, 3)),
    st.tuples(st.just("VHOST_SET_VRING_CALL"), st.integers(0, 3), st.integers(-2, 5)),
    st.tuples(st.just("VHOST_SET_VRING_KICK"), st.integers(0, 3), st.integers(-2, 5)),
    st.tuples(st.just("VHOST_VDPA_SET_VRING_ENABLE"), st.integers(0, 3), st.integers(0, 1)),
    st.tuples(st.just("VHOST_VDPA_SET_GROUP_ASID"), st.integers(0, 3), st.integers(0, 2)),
    st.tuples(st.just("VHOST_VDPA_SET_CONFIG"), st.integers(0, 26), st.binary(max_size=3)),
    st.tuples(st.just("VHOST_VDPA_SUSPEND")),
    st.tuples(st.just("VHOST_VDPA_RESUME")),
    st.tuples(st.just("VHOST_SET_LOG_BASE"), st.just(0x1000)),
    st.tuples(
        st.just("write_msg"),
        st.sampled_from([UPDATE, INVALIDATE, BEGIN, END, 1]),
        st.integers(0, 2),
        st.integers(0, 8).map(lambda p: p * 0x1000),
        st.integers(0, 3).map(lambda p: p * 0x1000),
        st.just(0x9000),
        st.sampled_from([RW, RO, 0]),
    ),
)


def run(v: VhostVdpaModel, op: tuple[Any, ...]) -> Any:
    name, *args = op
    return getattr(v, name)(*args)


def _drop_empty_spaces(s: VhostSnapshot) -> VhostSnapshot:
    return replace(s, address_spaces=tuple(a for a in s.address_spaces if a[1]))


@settings(max_examples=150, deadline=None)
@given(st.lists(_vhost_op, max_size=30))
def test_failed_ioctls_and_messages_change_nothing(ops: list[tuple[Any, ...]]) -> None:
    v = fresh(PACKED_SIM, owner=False)
    for op in ops:
        before = v.snapshot()
        try:
            run(v, op)
        except ModelErrno:
            after = v.snapshot()
            if op[0] == "write_msg" and op[1] in (UPDATE, BEGIN):
                # Linux allocates the address space record before it validates the message.
                assert _drop_empty_spaces(after) == _drop_empty_spaces(before)
            else:
                assert after == before
        status = v.device.status
        if status & StatusBit.FEATURES_OK:
            assert v.device.features_valid()


@settings(max_examples=150, deadline=None)
@given(st.lists(_vhost_op, max_size=30))
def test_status_zero_returns_the_device_to_its_initial_state(ops: list[tuple[Any, ...]]) -> None:
    v = fresh(PACKED_SIM, owner=False)
    initial = v.snapshot().device
    for op in ops:
        with contextlib.suppress(ModelErrno):
            run(v, op)
    persist = v.has_backend_feature(vt.VHOST_BACKEND_F_IOTLB_PERSIST)
    maps = v.device.snapshot().maps
    v.VHOST_VDPA_SET_STATUS(0)
    after = v.snapshot()
    assert after.device.without_maps() == initial.without_maps()
    assert not after.suspended
    assert after.device.maps == (maps if persist else initial.maps)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2), st.integers(0, 0xFFFF))
def test_split_vring_base_round_trips(index: int, base: int) -> None:
    v = fresh()
    v.VHOST_SET_FEATURES(GOOD)
    v.VHOST_SET_VRING_BASE(index, base)
    assert v.VHOST_GET_VRING_BASE(index) == base
    assert v.device.get_vq_state(index) == base


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2), st.integers(0, 0xFFFFFFFF))
def test_packed_vring_base_round_trips(index: int, base: int) -> None:
    v = fresh(PACKED_SIM)
    v.VHOST_SET_FEATURES(GOOD | PACKED)
    v.VHOST_SET_VRING_BASE(index, base)
    assert v.VHOST_GET_VRING_BASE(index) == base
    assert v.device.get_vq_state(index) == decode_packed_base(base)


# ----- lockstep findings: declared quirks and backed user memory ---------------------------------

def test_declared_quirks_change_the_answer_and_are_counted() -> None:
    v = VhostVdpaModel(VDPA_SIM_NET, quirks={"vhost_vdpa.vring_num_bounds_unchecked",
                                             "vhost_vdpa.iotlb_perm_unchecked",
                                             "vhost_vdpa.invalidate_range_unchecked"})
    v.open()
    v.VHOST_SET_OWNER()
    v.VHOST_SET_VRING_NUM(0, 1024)  # above vq_num_max 256: stored, as Linux's set_vq_num cannot fail
    assert v.device.vqs[0].num == 1024
    v.write_msg(vt.VHOST_IOTLB_UPDATE, 0, 0x1000, 0x1000, 0x10000, 0)  # perm 0 accepted
    v.write_msg(vt.VHOST_IOTLB_UPDATE, 0, 0x3000, 0x1000, 0x20000, vt.VHOST_ACCESS_RW)
    v.write_msg(vt.VHOST_IOTLB_INVALIDATE, 0, 0x3000, 0)  # [0x3000, 0x2FFF]: spans nothing
    assert len(v.address_space(0) or ()) == 2
    v.write_msg(vt.VHOST_IOTLB_INVALIDATE, 0, 0, 0)  # last = 2^64 - 1: everything
    assert len(v.address_space(0) or ()) == 0
    assert v.quirks_taken == {"vhost_vdpa.vring_num_bounds_unchecked": 1, "vhost_vdpa.iotlb_perm_unchecked": 1,
                              "vhost_vdpa.invalidate_range_unchecked": 2}
    with pytest.raises(ValueError, match="not modelled"):
        VhostVdpaModel(VDPA_SIM_NET, quirks={"vdpa_sim.passthrough_default_map"})


def test_declared_vdpa_sim_feature_quirks_change_the_answer_and_are_counted() -> None:
    """vdpa_sim refuses any feature set without ACCESS_PLATFORM and never refuses FEATURES_OK."""
    declared = {"vdpa_sim.set_features_requires_access_platform", "vdpa_sim.features_ok_never_refused"}
    v = VhostVdpaModel(VDPA_SIM_NET, quirks=declared)
    v.open()
    v.VHOST_SET_OWNER()
    without = GOOD & ~mask_of(NET, "ACCESS_PLATFORM")
    raises(errno.EINVAL, "vhost_vdpa.set_features.refused", v.VHOST_SET_FEATURES, without)
    invalid = mask_of(NET, "VERSION_1", "ACCESS_PLATFORM", "MQ")  # MQ without CTRL_VQ breaks a MUST
    v.VHOST_SET_FEATURES(invalid)
    ack_driver = int(StatusBit.ACKNOWLEDGE | StatusBit.DRIVER)
    v.VHOST_VDPA_SET_STATUS(ack_driver)
    v.VHOST_VDPA_SET_STATUS(ack_driver | StatusBit.FEATURES_OK)
    assert v.VHOST_VDPA_GET_STATUS() & StatusBit.FEATURES_OK  # kept, as vdpa_sim stores the byte as written
    assert v.quirks_taken == dict.fromkeys(declared, 1)
    plain = fresh()
    plain.VHOST_SET_FEATURES(without)  # the spec's device takes it
    plain.VHOST_SET_FEATURES(invalid)
    plain.VHOST_VDPA_SET_STATUS(ack_driver)
    plain.VHOST_VDPA_SET_STATUS(ack_driver | StatusBit.FEATURES_OK)
    assert not plain.VHOST_VDPA_GET_STATUS() & StatusBit.FEATURES_OK


def test_without_quirks_the_rules_hold() -> None:
    v = fresh()
    raises(errno.EINVAL, "vhost_vdpa.vring_num.bounds", v.VHOST_SET_VRING_NUM, 0, 1024)
    with pytest.raises(IotlbMessageError) as caught:
        v.write_msg(vt.VHOST_IOTLB_INVALIDATE, 0, 0, 0)
    assert caught.value.errno == errno.EFAULT
    with pytest.raises(IotlbMessageError) as caught:  # a wrapping invalidation of an allocated space
        v.write_msg(vt.VHOST_IOTLB_UPDATE, 0, 0x1000, 0x1000, 0x10000, vt.VHOST_ACCESS_RW)
        v.write_msg(vt.VHOST_IOTLB_INVALIDATE, 0, 0x2000, (1 << 64) - 1)
    assert caught.value.cause.rule == "iotlb.invalidate.wraps"


def test_an_update_of_unbacked_user_memory_fails_once_memory_is_known() -> None:
    v = fresh()
    v.write_msg(vt.VHOST_IOTLB_UPDATE, 0, 0x1000, 0x1000, 0xDEAD000, vt.VHOST_ACCESS_RW)  # unknown: not checked
    v.set_user_memory([(0x10000, 0x2000), (0x12000, 0x1000)])
    v.write_msg(vt.VHOST_IOTLB_UPDATE, 0, 0x2000, 0x3000, 0x10000, vt.VHOST_ACCESS_RW)  # two adjacent ranges
    with pytest.raises(IotlbMessageError) as caught:
        v.write_msg(vt.VHOST_IOTLB_UPDATE, 0, 0x8000, 0x1001, 0x12000, vt.VHOST_ACCESS_RW)  # one byte past
    assert caught.value.errno == errno.EFAULT and caught.value.cause.rule == "vhost_vdpa.msg.uaddr_unbacked"
