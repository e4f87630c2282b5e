"""Device status bits and transport-independent feature bits.

Mirrors ``include/uapi/linux/virtio_config.h``; the spec's SUSPEND status bit and
VIRTIO_F_SUSPEND (virtio v1.4) are named as the spec names them.
"""

from typing import Final

# Device status field (virtio v1.3 section 2.1).
VIRTIO_CONFIG_S_ACKNOWLEDGE: Final = 0x01
VIRTIO_CONFIG_S_DRIVER: Final = 0x02
VIRTIO_CONFIG_S_DRIVER_OK: Final = 0x04
VIRTIO_CONFIG_S_FEATURES_OK: Final = 0x08
VIRTIO_CONFIG_S_SUSPEND: Final = 0x10  # virtio v1.4
VIRTIO_CONFIG_S_NEEDS_RESET: Final = 0x40
VIRTIO_CONFIG_S_FAILED: Final = 0x80

# Transport-independent feature bits (virtio v1.3 section 6).
VIRTIO_TRANSPORT_F_START: Final = 28
VIRTIO_TRANSPORT_F_END: Final = 42
VIRTIO_F_NOTIFY_ON_EMPTY: Final = 24  # legacy only
VIRTIO_F_ANY_LAYOUT: Final = 27  # legacy only
VIRTIO_F_VERSION_1: Final = 32
VIRTIO_F_ACCESS_PLATFORM: Final = 33
VIRTIO_F_RING_PACKED: Final = 34
VIRTIO_F_IN_ORDER: Final = 35
VIRTIO_F_ORDER_PLATFORM: Final = 36
VIRTIO_F_SR_IOV: Final = 37
VIRTIO_F_NOTIFICATION_DATA: Final = 38
VIRTIO_F_NOTIF_CONFIG_DATA: Final = 39
VIRTIO_F_RING_RESET: Final = 40
VIRTIO_F_ADMIN_VQ: Final = 41
VIRTIO_F_SUSPEND: Final = 43  # virtio v1.4
