"""The vhost-vdpa front over a third-party parent: every ioctl, errno path and IOTLB message.

The expected errnos are those of Linux's drivers/vhost/vdpa.c and vhost.c (cited per test);
arguments go through ``ioctl()`` packed exactly as ``fcntl.ioctl`` would carry them.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from typing import Any

import pytest

from vdpacert.impl.guestmem import GuestMemory, MemoryRegistry
from vdpacert.impl.parent import VDPA_RESET_F_CLEAN_MAP, VqStatePacked, VqStateSplit
from vdpacert.impl.vhost_vdpa import (
    MAX_PENDING_MESSAGES,
    VHOST_VDPA_BACKEND_FEATURES,
    VhostVdpa,
    decode_vring_base,
    encode_vring_base,
    pack_iotlb_msg,
    unpack_iotlb_msg,
)
from vdpacert.uapi import vhost as V  # noqa: N812
from vdpacert.uapi import vhost_types as T  # noqa: N812
from vdpacert.uapi.virtio_config import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
)

ACK_DRIVER = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
STATE = T.VHOST_VRING_STATE
FILE = T.VHOST_VRING_FILE
RW, RO, WO = T.VHOST_ACCESS_RW, T.VHOST_ACCESS_RO, T.VHOST_ACCESS_WO
BIT = {name: 1 << getattr(T, f"VHOST_BACKEND_F_{name}") for name in (
    "IOTLB_MSG_V2", "IOTLB_BATCH", "IOTLB_ASID", "SUSPEND", "RESUME", "ENABLE_AFTER_DRIVER_OK", "DESC_ASID",
    "IOTLB_PERSIST")}


def errno_of(call: Any, *args: Any, **kwargs: Any) -> int:
    with pytest.raises(OSError) as caught:
        call(*args, **kwargs)
    assert caught.value.errno is not None
    return caught.value.errno


def drive_to_driver_ok(front: VhostVdpa, features: int = 1 << VIRTIO_F_VERSION_1) -> None:
    front.set_status(ACK_DRIVER)
    front.set_features(features)
    front.set_status(ACK_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK)
    front.set_status(ACK_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK)


# ----- open, close, owner ---------------------------------------------------------------------

def test_open_resets_with_clean_map_and_a_second_open_is_ebusy(parent: Any,
                                                                registry: MemoryRegistry) -> None:
    with VhostVdpa(parent, registry) as front:
        assert parent.ops[0] == ("compat_reset", VDPA_RESET_F_CLEAN_MAP)  # vhost_vdpa_open -> vhost_vdpa_reset
        assert errno_of(VhostVdpa, parent, registry) == errno.EBUSY
        assert not front.closed
    assert front.closed
    VhostVdpa(parent, registry).close()  # free again after release


def test_closed_file_refuses_everything(vhost: VhostVdpa) -> None:
    vhost.close()
    vhost.close()  # idempotent
    assert errno_of(vhost.ioctl, V.VHOST_GET_FEATURES, bytes(8)) == errno.EBADF
    assert errno_of(vhost.write, pack_iotlb_msg(T.VHOST_IOTLB_BATCH_BEGIN)) == errno.EBADF
    assert errno_of(vhost.read) == errno.EBADF


def test_set_owner_binds_mm_and_twice_is_ebusy(vhost: VhostVdpa, parent: Any,
                                                registry: MemoryRegistry) -> None:
    assert vhost.ioctl(V.VHOST_SET_OWNER) == 0
    assert parent.registry is registry and vhost.owner
    assert errno_of(vhost.ioctl, V.VHOST_SET_OWNER) == errno.EBUSY  # vhost_dev_set_owner


def test_failed_bind_mm_leaves_no_owner(kinds: Any, registry: MemoryRegistry) -> None:
    class Refusing(kinds.SetMapParent):
        def bind_mm(self, registry: MemoryRegistry) -> None:
            raise OSError(errno.ENOMEM, "cannot bind")

    with VhostVdpa(Refusing(), registry) as front:
        assert errno_of(front.set_owner) == errno.ENOMEM
        assert not front.owner  # vhost_dev_reset_owner on bind_mm failure
        assert errno_of(front.set_vring_num, 0, 8) == errno.EPERM


@pytest.mark.parametrize(("request_", "arg"), [
    (V.VHOST_SET_VRING_NUM, STATE.pack(0, 8)),
    (V.VHOST_SET_VRING_ADDR, T.VHOST_VRING_ADDR.pack(0, 0, 0, 0, 0, 0)),
    (V.VHOST_SET_VRING_BASE, STATE.pack(0, 0)),
    (V.VHOST_GET_VRING_BASE, STATE.pack(0, 0)),
    (V.VHOST_SET_VRING_KICK, FILE.pack(0, -1)),
    (V.VHOST_SET_VRING_CALL, FILE.pack(0, -1)),
    (V.VHOST_SET_VRING_ERR, FILE.pack(0, -1)),
    (V.VHOST_VDPA_SET_VRING_ENABLE, STATE.pack(0, 1)),
    (V.VHOST_VDPA_GET_VRING_GROUP, STATE.pack(0, 0)),
    (V.VHOST_VDPA_SET_GROUP_ASID, STATE.pack(0, 0)),
    (V.VHOST_VDPA_GET_VRING_SIZE, STATE.pack(0, 0)),
    (V.VHOST_SET_MEM_TABLE, bytes(8)),
    (V.VHOST_RESET_OWNER, 0),
])
def test_vring_and_dev_ioctls_need_the_owner(vhost: VhostVdpa, request_: int, arg: bytes | int) -> None:
    assert errno_of(vhost.ioctl, request_, arg) == errno.EPERM  # vhost_dev_check_owner


def test_device_level_ioctls_work_without_owner(kinds: Any, vhost: VhostVdpa) -> None:
    assert vhost.get_device_id() == 1
    assert vhost.get_features() == kinds.SetMapParent().offered
    assert vhost.get_vqs_count() == 2
    assert vhost.get_config_size() == 8
    assert vhost.get_status() == 0
    assert vhost.get_vring_num() == 256


def test_reset_owner_is_not_a_vhost_vdpa_request(owned: VhostVdpa) -> None:
    # vhost_dev_ioctl passes it on; vhost_vdpa_vring_ioctl reads an index through a NULL pointer.
    assert errno_of(owned.ioctl, V.VHOST_RESET_OWNER, 0) == errno.EFAULT
    assert errno_of(owned.ioctl, 0xC008AF6F, STATE.pack(5, 0)) == errno.ENOBUFS
    assert errno_of(owned.ioctl, 0xC008AF6F, STATE.pack(1, 0)) == errno.ENOTTY


def test_close_releases_everything(parent: Any, registry: MemoryRegistry, memory: GuestMemory,
                                   efd: Any) -> None:
    front = VhostVdpa(parent, registry)
    front.set_owner()
    front.iotlb_update(memory.gpa, 0x1000, memory.uaddr)
    call = efd()
    front.set_vring_call(0, call)
    parent.ops.clear()
    front.close()
    names = [op[0] for op in parent.ops]
    assert names[0] == "compat_reset" and "unbind_mm" in names
    assert ("set_vq_cb", 0, False) in parent.ops
    assert parent.maps == {}
    assert front.address_spaces() == {}


# ----- features and status ------------------------------------------------------------------

def test_features_roundtrip_through_packed_ioctl(owned: VhostVdpa, parent: Any) -> None:
    out = owned.ioctl(V.VHOST_GET_FEATURES, bytes(8))
    assert struct.unpack("<Q", out)[0] == parent.offered
    wanted = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_RING_PACKED)
    assert owned.ioctl(V.VHOST_SET_FEATURES, struct.pack("<Q", wanted)) == struct.pack("<Q", wanted)
    assert parent.features == wanted


def test_feature_errors(owned: VhostVdpa) -> None:
    assert errno_of(owned.set_features, 1 << 40) == errno.EINVAL  # the parent refused: vdpa_set_features fails
    assert errno_of(owned.ioctl, V.VHOST_SET_FEATURES, 0) == errno.EFAULT
    assert errno_of(owned.ioctl, V.VHOST_GET_FEATURES, bytes(4)) == errno.EFAULT
    drive_to_driver_ok(owned)
    assert errno_of(owned.set_features, 1 << VIRTIO_F_VERSION_1) == errno.EBUSY  # after FEATURES_OK


def test_status_rules(owned: VhostVdpa, parent: Any) -> None:
    owned.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE)
    assert errno_of(owned.set_status, VIRTIO_CONFIG_S_DRIVER) == errno.EINVAL  # clears ACKNOWLEDGE
    assert owned.get_status() == VIRTIO_CONFIG_S_ACKNOWLEDGE
    owned.set_status(ACK_DRIVER)
    owned.set_features(0)  # no VERSION_1: the parent refuses FEATURES_OK by clearing it
    owned.set_status(ACK_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK)
    assert owned.get_status() == ACK_DRIVER
    parent.ops.clear()
    owned.set_status(0)
    assert parent.ops == [("compat_reset", VDPA_RESET_F_CLEAN_MAP)]
    assert owned.get_status() == 0


def test_reset_keeps_maps_with_iotlb_persist(kinds: Any, owned: VhostVdpa, parent: Any, memory: GuestMemory) -> None:
    class Persistent(kinds.SetMapParent):
        def reset_map(self, asid: int) -> None:
            self.record("reset_map", asid)

    assert not owned.get_backend_features() & BIT["IOTLB_PERSIST"]  # set_map without reset_map
    owned.close()
    with VhostVdpa(Persistent(), MemoryRegistry()) as front:
        assert front.get_backend_features() & BIT["IOTLB_PERSIST"]
        front.set_backend_features(BIT["IOTLB_PERSIST"])
        front.parent.ops.clear()  # type: ignore[attr-defined]
        front.set_status(0)
        assert front.parent.ops == [("reset",)]  # type: ignore[attr-defined]


# ----- backend features ---------------------------------------------------------------------

def test_backend_features_offer(vhost: VhostVdpa) -> None:
    offer = vhost.get_backend_features()
    assert offer == VHOST_VDPA_BACKEND_FEATURES | BIT["SUSPEND"] | BIT["RESUME"]


def test_backend_features_of_a_minimal_parent(kinds: Any, registry: MemoryRegistry) -> None:
    with VhostVdpa(kinds.DmaParent(), registry) as front:
        assert front.get_backend_features() == VHOST_VDPA_BACKEND_FEATURES
        assert errno_of(front.set_backend_features, BIT["SUSPEND"]) == errno.EOPNOTSUPP
        assert errno_of(front.set_backend_features, BIT["RESUME"]) == errno.EOPNOTSUPP
        assert errno_of(front.set_backend_features, BIT["IOTLB_PERSIST"]) == errno.EOPNOTSUPP
        assert errno_of(front.set_backend_features, BIT["DESC_ASID"]) == errno.EINVAL  # needs IOTLB_ASID
        assert errno_of(front.set_backend_features, BIT["DESC_ASID"] | BIT["IOTLB_ASID"]) == errno.EOPNOTSUPP
        front.set_backend_features(BIT["ENABLE_AFTER_DRIVER_OK"])  # accepted whatever the parent says


def test_set_backend_features(vhost: VhostVdpa) -> None:
    assert errno_of(vhost.set_backend_features, 1 << 20) == errno.EOPNOTSUPP
    assert errno_of(vhost.set_backend_features, 1 << 0) == errno.EOPNOTSUPP  # bit 0 is no backend feature
    wanted = BIT["IOTLB_MSG_V2"] | BIT["IOTLB_BATCH"] | BIT["SUSPEND"] | BIT["RESUME"]
    assert vhost.ioctl(V.VHOST_SET_BACKEND_FEATURES, struct.pack("<Q", wanted)) == struct.pack("<Q", wanted)
    assert vhost.acked_backend_features == wanted


# ----- config -------------------------------------------------------------------------------

def test_config_read_write_and_bounds(vhost: VhostVdpa, parent: Any) -> None:
    out = vhost.ioctl(V.VHOST_VDPA_GET_CONFIG, T.VHOST_VDPA_CONFIG.pack(2, 4) + bytes(4) + b"tail")
    assert out == T.VHOST_VDPA_CONFIG.pack(2, 4) + bytes([3, 4, 5, 6]) + b"tail"
    assert parent.ops_named("set_driver_features") == [("set_driver_features", 0)]  # read before features
    vhost.set_config(6, b"\xAA\xBB")
    assert vhost.get_config(0, 8) == bytes([1, 2, 3, 4, 5, 6, 0xAA, 0xBB])
    for offset, length in ((0, 0), (9, 1), (6, 3), (8, 1), (0xFFFFFFFF, 2)):
        assert errno_of(vhost.get_config, offset, length) == errno.EINVAL  # E2BIG is reported as EINVAL
        assert errno_of(vhost.set_config, offset, bytes(length)) == errno.EINVAL
    assert vhost.get_config(7, 1) == b"\xBB"
    assert errno_of(vhost.ioctl, V.VHOST_VDPA_GET_CONFIG, T.VHOST_VDPA_CONFIG.pack(0, 8) + bytes(4)) == errno.EFAULT
    assert errno_of(vhost.ioctl, V.VHOST_VDPA_SET_CONFIG, T.VHOST_VDPA_CONFIG.pack(0, 8)) == errno.EFAULT
    assert parent.config == bytearray([1, 2, 3, 4, 5, 6, 0xAA, 0xBB])  # refused writes changed nothing


def test_config_call_eventfd(vhost: VhostVdpa, parent: Any, efd: Any) -> None:
    fd = efd()
    vhost.set_config_call(fd)
    parent.config_cb()
    parent.config_cb()
    assert os.eventfd_read(fd) == 2
    assert parent.config_cb.trigger is not None and parent.config_cb.trigger != fd  # our own reference
    assert errno_of(vhost.set_config_call, 9999) == errno.EBADF
    parent.config_cb()  # Linux drops the old eventfd on a bad fd: nothing signalled
    assert errno_of(os.eventfd_read, fd) == errno.EAGAIN
    with open(os.devnull, "rb") as not_eventfd:
        assert errno_of(vhost.set_config_call, not_eventfd.fileno()) == errno.EINVAL
    vhost.set_config_call(-1)
    assert parent.ops_named("set_config_cb")[-1] == ("set_config_cb", True)


# ----- vrings -------------------------------------------------------------------------------

def test_vring_index_is_checked_against_nvqs(owned: VhostVdpa) -> None:
    assert errno_of(owned.set_vring_num, 2, 8) == errno.ENOBUFS
    assert errno_of(owned.get_vring_base, 7) == errno.ENOBUFS
    assert errno_of(owned.set_group_asid, 2, 0) == errno.ENOBUFS  # the group index is checked against nvqs
    assert errno_of(owned.ioctl, V.VHOST_SET_VRING_NUM, bytes(2)) == errno.EFAULT


@pytest.mark.parametrize("num", [0, 3, 100, 0x10000, 1 << 20])
def test_set_vring_num_rejects_non_power_of_two(owned: VhostVdpa, num: int) -> None:
    assert errno_of(owned.set_vring_num, 0, num) == errno.EINVAL


def test_set_vring_num_passes_sizes_above_the_device_maximum(owned: VhostVdpa, parent: Any) -> None:
    owned.set_vring_num(1, 32768)  # Linux does not compare with get_vq_num_max
    assert parent.vqs[1]["num"] == 32768
    assert owned.get_vring_size(1) == 32768


def test_set_vring_addr(owned: VhostVdpa, parent: Any) -> None:
    arg = T.VHOST_VRING_ADDR.pack(1, 0, 0x10000, 0x12000, 0x11000, 0)
    assert owned.ioctl(V.VHOST_SET_VRING_ADDR, arg) == arg
    assert parent.vqs[1]["addr"] == (0x10000, 0x11000, 0x12000)  # desc, driver (avail), device (used)
    assert errno_of(owned.set_vring_addr, 0, 0x10000, 0x11001, 0x12000) == errno.EINVAL  # avail 2-aligned
    assert errno_of(owned.set_vring_addr, 0, 0x10000, 0x11000, 0x12002) == errno.EINVAL  # used 4-aligned
    assert errno_of(owned.set_vring_addr, 0, 0x10000, 0x11000, 0x12000, log_guest_addr=2) == errno.EINVAL
    assert errno_of(owned.set_vring_addr, 0, 0x10000, 0x11000, 0x12000, flags=2) == errno.EOPNOTSUPP
    assert errno_of(owned.set_vring_addr, 0, 0x10008, 0x11000, 0x12000) == errno.EINVAL  # the parent refused
    assert parent.vqs[0]["addr"] is None


def test_split_vring_base(owned: VhostVdpa, parent: Any) -> None:
    owned.set_vring_base(0, 0xFFFF)
    assert parent.vqs[0]["state"] == VqStateSplit(0xFFFF)
    out = owned.ioctl(V.VHOST_GET_VRING_BASE, STATE.pack(0, 0))
    assert STATE.unpack(out) == (0, 0xFFFF)
    assert errno_of(owned.set_vring_base, 0, 0x10000) == errno.EINVAL


def test_packed_vring_base_encoding(owned: VhostVdpa, parent: Any) -> None:
    owned.set_features((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_RING_PACKED))
    num = 0x1234 | (1 << 15) | (0x0567 << 16) | (0 << 31)
    owned.set_vring_base(1, num)
    assert parent.vqs[1]["state"] == VqStatePacked(0x1234, 1, 0x0567, 0)
    assert owned.get_vring_base(1) == num
    owned.set_vring_base(0, 0xFFFFFFFF)
    assert parent.vqs[0]["state"] == VqStatePacked(0x7FFF, 1, 0x7FFF, 1)
    assert owned.get_vring_base(0) == 0xFFFFFFFF


def test_reset_forgets_the_packed_layout(owned: VhostVdpa, parent: Any) -> None:
    """Lockstep finding: a packed layout kept across reset made GET_VRING_BASE answer EIO for the split
    state a reset device reports; after a reset nothing is negotiated, so the split encoding applies."""
    owned.set_features((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_RING_PACKED))
    owned.set_status(0)
    owned.set_vring_base(0, 0x1234)
    assert owned.get_vring_base(0) == 0x1234
    assert errno_of(owned.set_vring_base, 0, 0x10000) == errno.EINVAL  # split: a 16-bit index


def test_vring_base_helpers_are_inverse() -> None:
    for num in (0, 1, 0x8000, 0x7FFF_7FFF, 0x8001_8001, 0xFFFF_FFFF):
        assert encode_vring_base(decode_vring_base(num, packed=True)) == num
    assert encode_vring_base(decode_vring_base(0xBEEF, packed=False)) == 0xBEEF


def test_set_vring_base_while_running_is_the_parents_errno(owned: VhostVdpa, parent: Any) -> None:
    drive_to_driver_ok(owned)
    assert errno_of(owned.set_vring_base, 0, 5) == errno.EBUSY
    owned.suspend()
    owned.set_vring_base(0, 5)
    assert owned.get_vring_base(0) == 5


def test_get_vring_base_rejects_a_state_of_the_wrong_kind(owned: VhostVdpa, parent: Any) -> None:
    parent.vqs[0]["state"] = VqStatePacked(1, 1, 1, 1)  # a buggy parent: packed state for a split ring
    assert errno_of(owned.get_vring_base, 0) == errno.EIO


def test_vring_enable_groups_and_sizes(owned: VhostVdpa, parent: Any) -> None:
    owned.set_vring_enable(1, True)
    assert parent.vqs[1]["ready"] is True
    owned.ioctl(V.VHOST_VDPA_SET_VRING_ENABLE, STATE.pack(1, 0))
    assert parent.vqs[1]["ready"] is False
    assert STATE.unpack(owned.ioctl(V.VHOST_VDPA_GET_VRING_GROUP, STATE.pack(1, 0))) == (1, 1)
    assert owned.get_group_num() == 2 and owned.get_as_num() == 2
    assert errno_of(owned.get_vring_desc_group, 0) == errno.EOPNOTSUPP
    owned.set_vring_num(0, 64)
    assert owned.get_vring_size(0) == 64


def test_group_asid(owned: VhostVdpa, parent: Any) -> None:
    owned.set_group_asid(1, 1)
    assert parent.group_asid == [0, 1]
    assert errno_of(owned.set_group_asid, 0, 2) == errno.EINVAL  # asid >= nas


def test_optional_vring_ops_absent_are_eopnotsupp(kinds: Any, registry: MemoryRegistry) -> None:
    class NoGroups(kinds.DmaParent):
        get_vq_group = None  # type: ignore[assignment]

    with VhostVdpa(kinds.DmaParent(), registry) as front:
        front.set_owner()
        assert errno_of(front.set_group_asid, 0, 1) == errno.EOPNOTSUPP
        assert errno_of(front.get_vring_size, 0) == errno.EOPNOTSUPP
    with VhostVdpa(NoGroups(), registry) as front:
        front.set_owner()
        assert errno_of(front.get_vring_group, 0) == errno.EOPNOTSUPP


def test_get_vring_group_out_of_range_is_eio(owned: VhostVdpa, parent: Any) -> None:
    parent.get_vq_group = lambda index: 2  # a buggy parent: group 2 of 2
    assert errno_of(owned.get_vring_group, 1) == errno.EIO


def test_desc_group(kinds: Any, registry: MemoryRegistry) -> None:
    class DescGroups(kinds.SetMapParent):
        def get_vq_desc_group(self, index: int) -> int:
            return 1

    with VhostVdpa(DescGroups(), registry) as front:
        front.set_owner()
        assert front.get_backend_features() & BIT["DESC_ASID"]
        front.set_backend_features(BIT["DESC_ASID"] | BIT["IOTLB_ASID"])
        assert front.get_vring_desc_group(0) == 1


# ----- suspend / resume -------------------------------------------------------------------------

def test_suspend_resume(owned: VhostVdpa, parent: Any) -> None:
    owned.suspend()  # before DRIVER_OK: nothing to preserve, the parent is not called
    assert parent.ops_named("suspend") == []
    drive_to_driver_ok(owned)
    owned.ioctl(V.VHOST_VDPA_SUSPEND)
    assert parent.suspended and owned.suspended
    owned.resume()
    assert not parent.suspended and not owned.suspended


def test_suspend_without_the_op(kinds: Any, registry: MemoryRegistry) -> None:
    with VhostVdpa(kinds.DmaParent(), registry) as front:
        front.suspend()  # not DRIVER_OK yet: success
        drive_to_driver_ok(front)
        assert errno_of(front.suspend) == errno.EOPNOTSUPP
        assert errno_of(front.resume) == errno.EOPNOTSUPP


# ----- eventfds ---------------------------------------------------------------------------------

def test_kick_and_call_eventfd_errors(owned: VhostVdpa, efd: Any) -> None:
    assert errno_of(owned.set_vring_kick, 0, 12345) == errno.EBADF
    assert errno_of(owned.set_vring_call, 0, 12345) == errno.EBADF
    assert errno_of(owned.set_vring_err, 0, 12345) == errno.EBADF
    read_end, write_end = os.pipe()
    try:
        assert errno_of(owned.set_vring_kick, 0, read_end) == errno.EINVAL
        assert errno_of(owned.set_vring_call, 1, write_end) == errno.EINVAL
    finally:
        os.close(read_end)
        os.close(write_end)
    owned.set_vring_err(0, efd())
    owned.set_vring_err(0, -1)


def test_call_eventfd_is_signalled_by_the_parent_callback(owned: VhostVdpa, parent: Any,
                                                          efd: Any) -> None:
    call = efd()
    owned.ioctl(V.VHOST_SET_VRING_CALL, FILE.pack(0, call))
    assert parent.vqs[0]["cb"].trigger is not None
    drive_to_driver_ok(owned)
    owned.set_vring_enable(0, True)
    owned.kick(0)
    owned.kick(0)
    assert os.eventfd_read(call) == 2
    owned.set_vring_call(0, -1)
    assert not parent.vqs[0]["cb"].bound
    owned.kick(0)
    assert errno_of(os.eventfd_read, call) == errno.EAGAIN
    assert errno_of(owned.kick, 2) == errno.EINVAL


def test_user_may_close_its_eventfds_after_handing_them_over(owned: VhostVdpa, parent: Any) -> None:
    kick, call = os.eventfd(0), os.eventfd(0, os.EFD_NONBLOCK)
    owned.set_vring_kick(0, kick)
    owned.set_vring_call(0, call)
    trigger = parent.vqs[0]["cb"].trigger
    os.close(kick)
    parent.vqs[0]["cb"]()  # still signals our own reference
    assert os.eventfd_read(trigger) == 1
    os.close(call)


def test_poll_kicks(owned: VhostVdpa, parent: Any, efd: Any) -> None:
    kicks = [efd(0), efd(0)]
    for index, fd in enumerate(kicks):
        owned.set_vring_kick(index, fd)
    assert owned.poll_kicks() == 0
    os.eventfd_write(kicks[1], 3)
    assert owned.poll_kicks(timeout=1.0) == 1
    assert parent.ops_named("kick_vq") == [("kick_vq", 1)]
    os.eventfd_write(kicks[0], 1)
    os.eventfd_write(kicks[1], 1)
    assert owned.poll_kicks() == 2
    assert owned.poll_kicks() == 0  # drained
    owned.set_vring_kick(1, -1)
    os.eventfd_write(kicks[1], 1)
    assert owned.poll_kicks() == 0


def test_kick_thread_services_eventfds_and_stops(owned: VhostVdpa, parent: Any, efd: Any) -> None:
    kick, call = efd(0), efd()
    owned.set_vring_kick(0, kick)
    owned.set_vring_call(0, call)
    drive_to_driver_ok(owned)
    owned.set_vring_enable(0, True)
    owned.start_kick_thread()
    owned.start_kick_thread()  # idempotent
    assert errno_of(owned.poll_kicks) == errno.EBUSY
    os.eventfd_write(kick, 1)
    deadline = time.monotonic() + 10
    while parent.used[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert parent.used[0] == 1
    assert os.eventfd_read(call) == 1
    # rebinding while the thread polls: the new eventfd is serviced, the old one no longer
    new_kick = efd(0)
    owned.set_vring_kick(0, new_kick)
    os.eventfd_write(new_kick, 1)
    while parent.used[0] == 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert parent.used[0] == 2
    owned.stop_kick_thread()
    owned.stop_kick_thread()
    os.eventfd_write(new_kick, 1)
    assert owned.poll_kicks() == 1


def test_kick_thread_survives_a_failing_parent(kinds: Any, registry: MemoryRegistry, efd: Any) -> None:
    class Failing(kinds.SetMapParent):
        def kick_vq(self, index: int) -> None:
            raise RuntimeError("firmware fell over")

    with VhostVdpa(Failing(), registry) as front:
        front.set_owner()
        kick = efd(0)
        front.set_vring_kick(0, kick)
        front.start_kick_thread()
        os.eventfd_write(kick, 1)
        deadline = time.monotonic() + 10
        while not front.kick_errors and time.monotonic() < deadline:
            time.sleep(0.005)
        assert isinstance(front.kick_errors[0], RuntimeError)
        assert front._kick_thread is not None and front._kick_thread.is_alive()


def test_parent_calls_are_serialized(owned: VhostVdpa, parent: Any) -> None:
    inside = threading.Event()
    overlaps: list[int] = []
    active = [0]

    original = parent.kick_vq

    def slow_kick(index: int) -> None:
        active[0] += 1
        overlaps.append(active[0])
        inside.set()
        time.sleep(0.01)
        original(index)
        active[0] -= 1

    parent.kick_vq = slow_kick  # type: ignore[method-assign]
    threads = [threading.Thread(target=owned.kick, args=(i % 2,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max(overlaps) == 1 and len(overlaps) == 8


# ----- IOTLB messages -----------------------------------------------------------------------------

def test_update_and_invalidate_with_set_map(owned: VhostVdpa, parent: Any, memory: GuestMemory) -> None:
    assert owned.write(pack_iotlb_msg(T.VHOST_IOTLB_UPDATE, memory.gpa, 0x2000, memory.uaddr, RW)) == 72
    assert parent.ops_named("set_map")[-1] == ("set_map", 0, [(memory.gpa, memory.gpa + 0x1FFF, memory.uaddr, RW)])
    assert parent.access(0, memory.gpa + 0x10, 4, WO) == [(memory.uaddr + 0x10, 4)]
    owned.iotlb_update(memory.gpa + 0x2000, 0x1000, memory.uaddr + 0x2000, RO)
    owned.iotlb_invalidate(memory.gpa + 0x1FFF, 2)  # meets both entries: both go, whole
    assert parent.ops_named("set_map")[-1] == ("set_map", 0, [])
    assert owned.address_spaces() == {0: []}


def test_invalidate_range_is_unchecked_as_in_linux(owned: VhostVdpa, parent: Any, memory: GuestMemory) -> None:
    """Lockstep finding: since Linux 6.5 an INVALIDATE of size 0 reaches vhost_vdpa_unmap, which asks
    for [iova, iova + size - 1 mod 2^64] unchecked (quirk vhost_vdpa.invalidate_range_unchecked)."""
    owned.iotlb_update(memory.gpa, 0x2000, memory.uaddr)
    owned.iotlb_update(memory.gpa + 0x2000, 0x1000, memory.uaddr + 0x2000)
    owned.iotlb_invalidate(memory.gpa + 0x2000, 0)  # [+0x2000, +0x1FFF]: no entry spans both ends
    assert len(owned.address_spaces()[0]) == 2
    owned.iotlb_invalidate(memory.gpa + 0x1000, 0)  # [+0x1000, +0xFFF]: the first entry spans both ends
    assert owned.address_spaces()[0] == [(memory.gpa + 0x2000, memory.gpa + 0x2FFF, memory.uaddr + 0x2000, RW)]
    owned.iotlb_invalidate(0, 0)  # last = 2^64 - 1: every entry goes
    assert owned.address_spaces() == {0: []}
    assert parent.ops_named("set_map")[-1] == ("set_map", 0, [])


def test_update_errors_are_efault_with_the_reason_as_cause(owned: VhostVdpa, memory: GuestMemory,
                                                          parent: Any) -> None:
    owned.iotlb_update(memory.gpa, 0x1000, memory.uaddr)

    def cause(msg: bytes) -> int:
        with pytest.raises(OSError) as caught:
            owned.write(msg)
        assert caught.value.errno == errno.EFAULT
        return caught.value.__cause__.errno  # type: ignore[union-attr]

    assert cause(pack_iotlb_msg(T.VHOST_IOTLB_UPDATE, memory.gpa + 0xFFF, 2, memory.uaddr, RW)) == errno.EEXIST
    assert cause(pack_iotlb_msg(T.VHOST_IOTLB_UPDATE, 0x0, 0x1000, memory.uaddr, RW)) == errno.EINVAL  # < first
    assert cause(pack_iotlb_msg(T.VHOST_IOTLB_UPDATE, 1 << 48, 0x1000, memory.uaddr, RW)) == errno.EINVAL  # > last
    assert cause(pack_iotlb_msg(T.VHOST_IOTLB_UPDATE, 0x2000_0000, 0x1000, 0x1000, RW)) == errno.EINVAL  # no memory
    past_end = memory.uaddr + memory.size - 0x800
    assert cause(pack_iotlb_msg(T.VHOST_IOTLB_UPDATE, 0x2000_0000, 0x1000, past_end, RW)) == errno.EINVAL
    assert cause(pack_iotlb_msg(T.VHOST_IOTLB_UPDATE, 0x2000_0000, 0x1000, memory.uaddr, 0)) == errno.EINVAL
    assert cause(pack_iotlb_msg(T.VHOST_IOTLB_MISS, 0x1000, 1)) == errno.EINVAL  # not a userspace message
    assert cause(pack_iotlb_msg(T.VHOST_IOTLB_INVALIDATE, 0x1000, 1, asid=0)[:4] + bytes(68)) == errno.EINVAL
    assert owned.address_spaces() == {0: [(memory.gpa, memory.gpa + 0xFFF, memory.uaddr, RW)]}
    assert len(parent.ops_named("set_map")) == 1


def test_malformed_messages_are_einval(owned: VhostVdpa) -> None:
    assert errno_of(owned.write, b"\x02\x00") == errno.EINVAL
    assert errno_of(owned.write, struct.pack("<I", 7) + bytes(68)) == errno.EINVAL
    assert errno_of(owned.write, pack_iotlb_msg(T.VHOST_IOTLB_UPDATE, 0x1000, 0x1000, 0)[:39]) == errno.EINVAL
    assert errno_of(owned.write, pack_iotlb_msg(T.VHOST_IOTLB_UPDATE, 0x1000, 0, 0)) == errno.EINVAL


def test_messages_need_the_owner(vhost: VhostVdpa, memory: GuestMemory) -> None:
    with pytest.raises(OSError) as caught:
        vhost.iotlb_update(memory.gpa, 0x1000, memory.uaddr)
    assert caught.value.errno == errno.EFAULT and caught.value.__cause__.errno == errno.EPERM  # type: ignore[union-attr]


def test_v1_messages_and_the_40_byte_minimum(owned: VhostVdpa, memory: GuestMemory) -> None:
    v1 = pack_iotlb_msg(T.VHOST_IOTLB_UPDATE, memory.gpa, 0x1000, memory.uaddr, RW, version=T.VHOST_IOTLB_MSG)
    assert owned.write(v1[:40]) == 72  # vhost_chr_write_iter reports sizeof(struct vhost_msg)
    assert owned.address_spaces()[0][0][0] == memory.gpa


def test_asid_is_ignored_until_negotiated(owned: VhostVdpa, memory: GuestMemory) -> None:
    owned.iotlb_update(memory.gpa, 0x1000, memory.uaddr, asid=1)
    assert set(owned.address_spaces()) == {0}
    owned.set_backend_features(BIT["IOTLB_MSG_V2"] | BIT["IOTLB_ASID"])
    owned.iotlb_update(memory.gpa, 0x1000, memory.uaddr, asid=1)
    assert set(owned.address_spaces()) == {0, 1}
    with pytest.raises(OSError) as caught:
        owned.iotlb_update(memory.gpa, 0x1000, memory.uaddr, asid=2)  # asid >= nas
    assert caught.value.__cause__.errno == errno.EINVAL  # type: ignore[union-attr]
    with pytest.raises(OSError):
        owned.iotlb_invalidate(0x1000, 1, asid=3)


def test_invalidate_or_batch_end_on_an_unused_asid_is_refused(owned: VhostVdpa) -> None:
    owned.set_backend_features(BIT["IOTLB_MSG_V2"] | BIT["IOTLB_ASID"] | BIT["IOTLB_BATCH"])
    for msg in (pack_iotlb_msg(T.VHOST_IOTLB_INVALIDATE, 0x1000, 1, asid=1),
                pack_iotlb_msg(T.VHOST_IOTLB_BATCH_END, asid=1)):
        with pytest.raises(OSError) as caught:
            owned.write(msg)
        assert caught.value.errno == errno.EFAULT and caught.value.__cause__.errno == errno.EINVAL  # type: ignore[union-attr]


def test_batch_calls_set_map_once_at_batch_end(owned: VhostVdpa, parent: Any, memory: GuestMemory) -> None:
    owned.set_backend_features(BIT["IOTLB_MSG_V2"] | BIT["IOTLB_BATCH"] | BIT["IOTLB_ASID"])
    owned.iotlb_batch_begin(asid=1)
    assert owned.in_batch
    for page in range(4):
        owned.iotlb_update(memory.gpa + page * 0x1000, 0x1000, memory.uaddr + page * 0x1000, asid=1)
    owned.iotlb_invalidate(memory.gpa + 0x3000, 0x1000, asid=1)
    with pytest.raises(OSError) as caught:
        owned.iotlb_update(memory.gpa + 0x10000, 0x1000, memory.uaddr, asid=0)  # another asid mid-batch
    assert caught.value.__cause__.errno == errno.EINVAL  # type: ignore[union-attr]
    assert parent.ops_named("set_map") == []
    owned.iotlb_batch_end(asid=1)
    assert not owned.in_batch
    maps = parent.ops_named("set_map")
    assert len(maps) == 1 and maps[0][1] == 1 and len(maps[0][2]) == 3


def test_dma_map_parent_gets_each_range(kinds: Any, registry: MemoryRegistry, memory: GuestMemory) -> None:
    parent = kinds.DmaParent()
    with VhostVdpa(parent, registry) as front:
        front.set_owner()
        front.iotlb_update(memory.gpa, 0x2000, memory.uaddr, RW)
        front.iotlb_update(memory.gpa + 0x4000, 0x1000, memory.uaddr + 0x4000, RO)
        assert parent.ops_named("dma_map") == [
            ("dma_map", 0, memory.gpa, 0x2000, memory.uaddr, RW),
            ("dma_map", 0, memory.gpa + 0x4000, 0x1000, memory.uaddr + 0x4000, RO)]
        with pytest.raises(OSError) as caught:
            front.iotlb_update(0xBAD000, 0x1000, memory.uaddr + 0x8000, WO)
        assert caught.value.__cause__.errno == errno.ENOMEM  # type: ignore[union-attr]
        assert len(front.address_spaces()[0]) == 2  # the refused range was rolled back
        front.iotlb_invalidate(memory.gpa + 0x1000, 0x4000)
        assert parent.ops_named("dma_unmap") == [("dma_unmap", 0, memory.gpa, 0x2000),
                                                 ("dma_unmap", 0, memory.gpa + 0x4000, 0x1000)]
        front.iotlb_update(memory.gpa, 0x1000, memory.uaddr)
        parent.ops.clear()
    assert ("dma_unmap", 0, memory.gpa, 0x1000) in parent.ops  # release removes the address space


def test_faults_are_read_as_messages(owned: VhostVdpa, parent: Any, memory: GuestMemory) -> None:
    assert owned.read() is None
    owned.iotlb_update(memory.gpa, 0x1000, memory.uaddr, RO)
    assert parent.access(0, memory.gpa, 8, WO) is None  # write through a read-only mapping
    assert parent.access(0, memory.gpa + 0x1000, 8, RO) is None  # unmapped
    denied, miss = owned.read(), owned.read()
    assert owned.read() is None
    assert denied is not None and miss is not None and len(denied) == 72
    assert unpack_iotlb_msg(denied) == (T.VHOST_IOTLB_MSG, 0, memory.gpa, 0, 0, WO, T.VHOST_IOTLB_ACCESS_FAIL)
    assert unpack_iotlb_msg(miss)[2:] == (memory.gpa + 0x1000, 0, 0, RO, T.VHOST_IOTLB_MISS)
    owned.set_backend_features(BIT["IOTLB_MSG_V2"])
    parent.access(0, 0x5000, 1, RO)
    msg = owned.read()
    assert msg is not None and unpack_iotlb_msg(msg)[0] == T.VHOST_IOTLB_MSG_V2


def test_fault_queue_is_bounded(owned: VhostVdpa, parent: Any) -> None:
    for i in range(MAX_PENDING_MESSAGES + 5):
        parent.access(0, 0x1000 + i, 1, RO)
    assert owned.pending_messages == MAX_PENDING_MESSAGES and owned.dropped_messages == 5
    first = owned.read()
    assert first is not None and unpack_iotlb_msg(first)[2] == 0x1005


# ----- dirty log extension ------------------------------------------------------------------------

def test_log_ioctls_are_enotty_without_logging(vhost: VhostVdpa, owned: VhostVdpa) -> None:
    assert errno_of(vhost.set_log_base, 0x1000) == errno.ENOTTY
    assert errno_of(vhost.set_log_fd, -1) == errno.ENOTTY


def test_log_ioctls_need_log_all_offered(kinds: Any, registry: MemoryRegistry) -> None:
    with VhostVdpa(kinds.LoggingParent(offered=1 << VIRTIO_F_VERSION_1), registry) as front:
        front.set_owner()
        assert errno_of(front.set_log_base, 0x1000) == errno.ENOTTY


def test_log_base_and_fd_with_a_logging_parent(kinds: Any, registry: MemoryRegistry, memory: GuestMemory,
                                               efd: Any) -> None:
    parent = kinds.LoggingParent()
    with VhostVdpa(parent, registry) as front:
        assert errno_of(front.set_log_base, memory.uaddr) == errno.EPERM
        front.set_owner()
        front.set_log_base(memory.uaddr + 0x1000)
        assert parent.log_base == (memory.uaddr + 0x1000, memory.size - 0x1000)
        assert errno_of(front.set_log_base, 0x10) == errno.EFAULT
        assert errno_of(front.set_log_fd, 4242) == errno.EBADF
        log = efd()
        front.set_log_fd(log)
        parent.mark_dirty()
        assert os.eventfd_read(log) == 1
        front.set_vring_addr(0, 0x10000, 0x11000, 0x12000, flags=1 << T.VHOST_VRING_F_LOG, log_guest_addr=0x12000)
        assert parent.vq_log[0] == (True, 0x12000)
        front.set_log_fd(-1)
        assert parent.log_fd is None


# ----- packing through ioctl() ---------------------------------------------------------------

def test_every_get_returns_the_packed_struct(owned: VhostVdpa) -> None:
    assert owned.ioctl(V.VHOST_VDPA_GET_DEVICE_ID, bytes(4)) == struct.pack("<I", 1)
    assert owned.ioctl(V.VHOST_VDPA_GET_STATUS, bytes(1)) == b"\x00"
    assert owned.ioctl(V.VHOST_VDPA_GET_VRING_NUM, bytes(2)) == struct.pack("<H", 256)
    assert owned.ioctl(V.VHOST_VDPA_GET_IOVA_RANGE, bytes(16)) == struct.pack("<QQ", 0x1000, (1 << 48) - 1)
    assert owned.ioctl(V.VHOST_VDPA_GET_CONFIG_SIZE, bytes(4)) == struct.pack("<I", 8)
    assert owned.ioctl(V.VHOST_VDPA_GET_VQS_COUNT, bytes(4)) == struct.pack("<I", 2)
    assert owned.ioctl(V.VHOST_VDPA_GET_GROUP_NUM, bytes(4)) == struct.pack("<I", 2)
    assert owned.ioctl(V.VHOST_VDPA_GET_AS_NUM, bytes(4)) == struct.pack("<I", 2)
    assert owned.ioctl(V.VHOST_GET_BACKEND_FEATURES, bytes(8)) == struct.pack("<Q", owned.get_backend_features())
    for request in (V.VHOST_VDPA_GET_DEVICE_ID, V.VHOST_VDPA_GET_IOVA_RANGE, V.VHOST_GET_BACKEND_FEATURES):
        assert errno_of(owned.ioctl, request, 0) == errno.EFAULT
    with pytest.raises(TypeError):
        owned.ioctl(V.VHOST_GET_FEATURES, "8 bytes")  # type: ignore[arg-type]


def test_default_iova_range_is_the_whole_space(kinds: Any, registry: MemoryRegistry) -> None:
    with VhostVdpa(kinds.DmaParent(), registry) as front:
        assert front.get_iova_range() == (0, (1 << 64) - 1)


def test_set_mem_table_is_accepted_and_ignored(owned: VhostVdpa, parent: Any) -> None:
    parent.ops.clear()
    owned.ioctl(V.VHOST_SET_MEM_TABLE, struct.pack("<II", 1, 0) + bytes(32))
    assert parent.ops == []
    assert errno_of(owned.ioctl, V.VHOST_SET_MEM_TABLE, struct.pack("<II", 0, 1)) == errno.EOPNOTSUPP
    assert errno_of(owned.ioctl, V.VHOST_SET_MEM_TABLE, struct.pack("<II", 65, 0)) == errno.E2BIG
    assert errno_of(owned.ioctl, V.VHOST_SET_MEM_TABLE, struct.pack("<II", 2, 0) + bytes(32)) == errno.EFAULT


def test_bring_up_traffic_and_base_restore_end_to_end(kinds: Any, registry: MemoryRegistry, memory: GuestMemory,
                                                       efd: Any) -> None:
    parent = kinds.SetMapParent()
    with VhostVdpa(parent, registry) as front:
        front.set_owner()
        front.set_backend_features(BIT["IOTLB_MSG_V2"] | BIT["IOTLB_BATCH"] | BIT["SUSPEND"] | BIT["RESUME"])
        front.set_status(ACK_DRIVER)
        front.set_features(1 << VIRTIO_F_VERSION_1)
        front.set_status(ACK_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK)
        front.iotlb_batch_begin()
        front.iotlb_update(memory.gpa, memory.size, memory.uaddr)
        front.iotlb_batch_end()
        call = efd()
        for index in range(2):
            front.set_vring_num(index, 256)
            front.set_vring_addr(index, memory.gpa + index * 0x4000, memory.gpa + index * 0x4000 + 0x1000,
                                 memory.gpa + index * 0x4000 + 0x2000)
            front.set_vring_base(index, 7)
            front.set_vring_call(index, call)
            front.set_vring_enable(index, True)
        front.set_status(ACK_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK)
        front.kick(1)
        assert os.eventfd_read(call) == 1
        front.suspend()
        assert [front.get_vring_base(i) for i in range(2)] == [7, 7]
        front.resume()
        assert parent.access(0, memory.gpa + 0x100, 16, RW) == [(memory.uaddr + 0x100, 16)]
