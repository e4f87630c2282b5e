"""vhost and vhost-vdpa ioctl numbers (``include/uapi/linux/vhost.h``).

Each number is built with the kernel's ``_IOC`` encoding, so the values equal what the
C preprocessor produces for x86-64 (for example VHOST_GET_FEATURES == 0x8008af00).
"""

from typing import Final

_IOC_NONE: Final = 0
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:  # noqa: N802 - kernel name
    return (direction << 30) | (size << 16) | (type_ << 8) | nr


def _IO(type_: int, nr: int) -> int:  # noqa: N802
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, size: int) -> int:  # noqa: N802
    return _IOC(_IOC_READ, type_, nr, size)


def _IOW(type_: int, nr: int, size: int) -> int:  # noqa: N802
    return _IOC(_IOC_WRITE, type_, nr, size)


def _IOWR(type_: int, nr: int, size: int) -> int:  # noqa: N802
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, size)


VHOST_VIRTIO: Final = 0xAF

# Sizes of the argument types, as sizeof() gives them on x86-64.
_U8, _U16, _U32, _U64, _INT = 1, 2, 4, 8, 4
_VRING_STATE = 8  # struct vhost_vring_state
_VRING_FILE = 8  # struct vhost_vring_file
_VRING_ADDR = 40  # struct vhost_vring_addr
_MEMORY = 8  # struct vhost_memory (header)
_VDPA_CONFIG = 8  # struct vhost_vdpa_config (header)
_IOVA_RANGE = 16  # struct vhost_vdpa_iova_range

VHOST_GET_FEATURES: Final = _IOR(VHOST_VIRTIO, 0x00, _U64)
VHOST_SET_FEATURES: Final = _IOW(VHOST_VIRTIO, 0x00, _U64)
VHOST_SET_OWNER: Final = _IO(VHOST_VIRTIO, 0x01)
VHOST_RESET_OWNER: Final = _IO(VHOST_VIRTIO, 0x02)
VHOST_SET_MEM_TABLE: Final = _IOW(VHOST_VIRTIO, 0x03, _MEMORY)
VHOST_SET_LOG_BASE: Final = _IOW(VHOST_VIRTIO, 0x04, _U64)
VHOST_SET_LOG_FD: Final = _IOW(VHOST_VIRTIO, 0x07, _INT)
VHOST_SET_VRING_NUM: Final = _IOW(VHOST_VIRTIO, 0x10, _VRING_STATE)
VHOST_SET_VRING_ADDR: Final = _IOW(VHOST_VIRTIO, 0x11, _VRING_ADDR)
VHOST_SET_VRING_BASE: Final = _IOW(VHOST_VIRTIO, 0x12, _VRING_STATE)
VHOST_GET_VRING_BASE: Final = _IOWR(VHOST_VIRTIO, 0x12, _VRING_STATE)
VHOST_SET_VRING_KICK: Final = _IOW(VHOST_VIRTIO, 0x20, _VRING_FILE)
VHOST_SET_VRING_CALL: Final = _IOW(VHOST_VIRTIO, 0x21, _VRING_FILE)
VHOST_SET_VRING_ERR: Final = _IOW(VHOST_VIRTIO, 0x22, _VRING_FILE)
VHOST_SET_BACKEND_FEATURES: Final = _IOW(VHOST_VIRTIO, 0x25, _U64)
VHOST_GET_BACKEND_FEATURES: Final = _IOR(VHOST_VIRTIO, 0x26, _U64)

VHOST_VDPA_GET_DEVICE_ID: Final = _IOR(VHOST_VIRTIO, 0x70, _U32)
VHOST_VDPA_GET_STATUS: Final = _IOR(VHOST_VIRTIO, 0x71, _U8)
VHOST_VDPA_SET_STATUS: Final = _IOW(VHOST_VIRTIO, 0x72, _U8)
VHOST_VDPA_GET_CONFIG: Final = _IOR(VHOST_VIRTIO, 0x73, _VDPA_CONFIG)
VHOST_VDPA_SET_CONFIG: Final = _IOW(VHOST_VIRTIO, 0x74, _VDPA_CONFIG)
VHOST_VDPA_SET_VRING_ENABLE: Final = _IOW(VHOST_VIRTIO, 0x75, _VRING_STATE)
VHOST_VDPA_GET_VRING_NUM: Final = _IOR(VHOST_VIRTIO, 0x76, _U16)
VHOST_VDPA_SET_CONFIG_CALL: Final = _IOW(VHOST_VIRTIO, 0x77, _INT)
VHOST_VDPA_GET_IOVA_RANGE: Final = _IOR(VHOST_VIRTIO, 0x78, _IOVA_RANGE)
VHOST_VDPA_GET_CONFIG_SIZE: Final = _IOR(VHOST_VIRTIO, 0x79, _U32)
VHOST_VDPA_GET_AS_NUM: Final = _IOR(VHOST_VIRTIO, 0x7A, _INT)
VHOST_VDPA_GET_VRING_GROUP: Final = _IOWR(VHOST_VIRTIO, 0x7B, _VRING_STATE)
VHOST_VDPA_SET_GROUP_ASID: Final = _IOW(VHOST_VIRTIO, 0x7C, _VRING_STATE)
VHOST_VDPA_SUSPEND: Final = _IO(VHOST_VIRTIO, 0x7D)
VHOST_VDPA_RESUME: Final = _IO(VHOST_VIRTIO, 0x7E)
VHOST_VDPA_GET_VRING_DESC_GROUP: Final = _IOWR(VHOST_VIRTIO, 0x7F, _VRING_STATE)
VHOST_VDPA_GET_VQS_COUNT: Final = _IOR(VHOST_VIRTIO, 0x80, _U32)
VHOST_VDPA_GET_GROUP_NUM: Final = _IOR(VHOST_VIRTIO, 0x81, _U32)
VHOST_VDPA_GET_VRING_SIZE: Final = _IOWR(VHOST_VIRTIO, 0x82, _VRING_STATE)
