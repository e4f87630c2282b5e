"""The UAPI constants equal what the Linux headers produce (values checked against brief §3)."""

from __future__ import annotations

import pytest

from vdpacert.uapi import vhost, vhost_types, virtio_config, virtio_ring

KNOWN_IOCTLS = {
    # Values as the C preprocessor gives them on x86-64 (brief §3 lists the first four).
    "VHOST_GET_FEATURES": 0x8008AF00,
    "VHOST_SET_OWNER": 0xAF01,
    "VHOST_GET_VRING_BASE": 0xC008AF12,
    "VHOST_SET_VRING_ADDR": 0x4028AF11,
    "VHOST_SET_FEATURES": 0x4008AF00,
    "VHOST_SET_VRING_NUM": 0x4008AF10,
    "VHOST_SET_VRING_BASE": 0x4008AF12,
    "VHOST_SET_VRING_KICK": 0x4008AF20,
    "VHOST_SET_VRING_CALL": 0x4008AF21,
    "VHOST_SET_BACKEND_FEATURES": 0x4008AF25,
    "VHOST_GET_BACKEND_FEATURES": 0x8008AF26,
    "VHOST_VDPA_GET_DEVICE_ID": 0x8004AF70,
    "VHOST_VDPA_GET_STATUS": 0x8001AF71,
    "VHOST_VDPA_SET_STATUS": 0x4001AF72,
    "VHOST_VDPA_GET_CONFIG": 0x8008AF73,
    "VHOST_VDPA_SET_CONFIG": 0x4008AF74,
    "VHOST_VDPA_SET_VRING_ENABLE": 0x4008AF75,
    "VHOST_VDPA_GET_VRING_NUM": 0x8002AF76,
    "VHOST_VDPA_GET_IOVA_RANGE": 0x8010AF78,
    "VHOST_VDPA_GET_CONFIG_SIZE": 0x8004AF79,
    "VHOST_VDPA_SUSPEND": 0xAF7D,
    "VHOST_VDPA_RESUME": 0xAF7E,
    "VHOST_VDPA_GET_VRING_SIZE": 0xC008AF82,
}


@pytest.mark.parametrize(("name", "value"), sorted(KNOWN_IOCTLS.items()))
def test_ioctl_numbers_match_the_kernel_encoding(name: str, value: int) -> None:
    assert getattr(vhost, name) == value


def test_ioctl_numbers_are_distinct() -> None:
    numbers = {name: getattr(vhost, name) for name in dir(vhost) if name.startswith("VHOST_")
               and name != "VHOST_VIRTIO"}
    assert len(set(numbers.values())) == len(numbers)


def test_iotlb_message_v2_is_72_bytes_with_fields_where_the_kernel_reads_them() -> None:
    raw = vhost_types.VHOST_MSG_V2.pack(vhost_types.VHOST_IOTLB_MSG_V2, 7, 0x1000, 0x2000, 0x3000,
                                        vhost_types.VHOST_ACCESS_RW, vhost_types.VHOST_IOTLB_UPDATE)
    assert len(raw) == 72
    assert raw[0:4] == (2).to_bytes(4, "little")
    assert raw[4:8] == (7).to_bytes(4, "little")
    assert int.from_bytes(raw[8:16], "little") == 0x1000
    assert int.from_bytes(raw[16:24], "little") == 0x2000
    assert int.from_bytes(raw[24:32], "little") == 0x3000
    assert raw[32] == vhost_types.VHOST_ACCESS_RW
    assert raw[33] == vhost_types.VHOST_IOTLB_UPDATE


def test_vring_addr_struct_is_40_bytes() -> None:
    assert vhost_types.VHOST_VRING_ADDR.size == 40


def test_backend_feature_bits_follow_brief() -> None:
    assert [vhost_types.VHOST_BACKEND_F_IOTLB_MSG_V2, vhost_types.VHOST_BACKEND_F_IOTLB_BATCH,
            vhost_types.VHOST_BACKEND_F_IOTLB_ASID, vhost_types.VHOST_BACKEND_F_SUSPEND,
            vhost_types.VHOST_BACKEND_F_RESUME, vhost_types.VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK,
            vhost_types.VHOST_BACKEND_F_DESC_ASID, vhost_types.VHOST_BACKEND_F_IOTLB_PERSIST] == list(range(1, 9))


def test_status_and_ring_bits() -> None:
    assert (virtio_config.VIRTIO_CONFIG_S_ACKNOWLEDGE, virtio_config.VIRTIO_CONFIG_S_DRIVER,
            virtio_config.VIRTIO_CONFIG_S_DRIVER_OK, virtio_config.VIRTIO_CONFIG_S_FEATURES_OK,
            virtio_config.VIRTIO_CONFIG_S_SUSPEND, virtio_config.VIRTIO_CONFIG_S_NEEDS_RESET,
            virtio_config.VIRTIO_CONFIG_S_FAILED) == (1, 2, 4, 8, 16, 64, 128)
    assert (virtio_ring.VRING_PACKED_DESC_F_AVAIL, virtio_ring.VRING_PACKED_DESC_F_USED) == (7, 15)
    assert vhost_types.VHOST_F_LOG_ALL == 26
