"""The sections of the virtio specification the model's rules cite.

Numbers follow virtio v1.3 (OASIS Committee Specification Draft 01); sections that only
exist in v1.4 carry ``version="1.4"`` and the v1.4 draft's numbering. Keeping them in one
table means a renumbering in a later spec revision is a one-file change.
"""

from __future__ import annotations

from typing import Final

from .spec import LinuxSource, Section

# Chapter 2: basic facilities of a virtio device.
DEVICE_STATUS: Final = Section("2.1", "Device Status Field")
DEVICE_STATUS_DRIVER: Final = Section("2.1.1", "Driver Requirements: Device Status Field")
DEVICE_STATUS_DEVICE: Final = Section("2.1.2", "Device Requirements: Device Status Field")
FEATURE_BITS: Final = Section("2.2", "Feature Bits")
FEATURE_BITS_DRIVER: Final = Section("2.2.1", "Driver Requirements: Feature Bits")
FEATURE_BITS_DEVICE: Final = Section("2.2.2", "Device Requirements: Feature Bits")
NOTIFICATIONS: Final = Section("2.3", "Notifications")
DEVICE_RESET_DEVICE: Final = Section("2.4.1", "Device Requirements: Device Reset")
DEVICE_RESET_DRIVER: Final = Section("2.4.2", "Driver Requirements: Device Reset")
CONFIG_SPACE: Final = Section("2.5", "Device Configuration Space")
CONFIG_SPACE_DRIVER: Final = Section("2.5.1", "Driver Requirements: Device Configuration Space")
CONFIG_SPACE_DEVICE: Final = Section("2.5.2", "Device Requirements: Device Configuration Space")
VIRTQUEUES: Final = Section("2.6", "Virtqueues")
VIRTQUEUE_RESET: Final = Section("2.6.1", "Virtqueue Reset")

# Split virtqueues.
SPLIT_VIRTQUEUES: Final = Section("2.7", "Split Virtqueues")
SPLIT_DRIVER: Final = Section("2.7.1", "Driver Requirements: Virtqueues")
SPLIT_MESSAGE_FRAMING: Final = Section("2.7.4", "Message Framing")
SPLIT_DESC_TABLE: Final = Section("2.7.5", "The Virtqueue Descriptor Table")
SPLIT_DESC_TABLE_DEVICE: Final = Section(
    "2.7.5.1", "Device Requirements: The Virtqueue Descriptor Table"
)
SPLIT_DESC_TABLE_DRIVER: Final = Section(
    "2.7.5.2", "Driver Requirements: The Virtqueue Descriptor Table"
)
SPLIT_INDIRECT: Final = Section("2.7.5.3", "Indirect Descriptors")
SPLIT_INDIRECT_DRIVER: Final = Section("2.7.5.3.1", "Driver Requirements: Indirect Descriptors")
SPLIT_INDIRECT_DEVICE: Final = Section("2.7.5.3.2", "Device Requirements: Indirect Descriptors")
SPLIT_AVAIL_RING: Final = Section("2.7.6", "The Virtqueue Available Ring")
SPLIT_USED_SUPPRESSION: Final = Section("2.7.7", "Used Buffer Notification Suppression")
SPLIT_USED_SUPPRESSION_DEVICE: Final = Section(
    "2.7.7.2", "Device Requirements: Used Buffer Notification Suppression"
)
SPLIT_USED_RING: Final = Section("2.7.8", "The Virtqueue Used Ring")
SPLIT_USED_RING_DEVICE: Final = Section("2.7.8.2", "Device Requirements: The Virtqueue Used Ring")
SPLIT_IN_ORDER: Final = Section("2.7.9", "In-order use of descriptors")
SPLIT_AVAIL_SUPPRESSION: Final = Section("2.7.10", "Available Buffer Notification Suppression")
SPLIT_RECEIVING_USED: Final = Section("2.7.14", "Receiving Used Buffers From The Device")

# Packed virtqueues.
PACKED_VIRTQUEUES: Final = Section("2.8", "Packed Virtqueues")
PACKED_WRAP_COUNTERS: Final = Section("2.8.1", "Driver and Device Ring Wrap Counters")
PACKED_WRITE_FLAG: Final = Section("2.8.3", "Write Flag")
PACKED_SCATTER_GATHER: Final = Section("2.8.5", "Scatter-Gather Support")
PACKED_NEXT_FLAG: Final = Section("2.8.6", "Next Flag: Descriptor Chaining")
PACKED_INDIRECT: Final = Section("2.8.7", "Indirect Flag: Scatter-Gather Support")
PACKED_IN_ORDER: Final = Section("2.8.8", "In-order use of descriptors")
PACKED_EVENT_SUPPRESSION: Final = Section("2.8.10", "Driver and Device Event Suppression")
PACKED_DEVICE: Final = Section("2.8.12", "Device Requirements: Virtqueues")
PACKED_DESC_TABLE_DEVICE: Final = Section(
    "2.8.15", "Device Requirements: The Virtqueue Descriptor Table"
)
PACKED_SCATTER_GATHER_DEVICE: Final = Section(
    "2.8.18", "Device Requirements: Scatter-Gather Support"
)
PACKED_INDIRECT_DRIVER: Final = Section("2.8.19", "Driver Requirements: Indirect Descriptors")

# Chapter 3: initialization and operation.
DEVICE_INIT: Final = Section("3.1", "Device Initialization")
DEVICE_INIT_DRIVER: Final = Section("3.1.1", "Driver Requirements: Device Initialization")
DEVICE_OPERATION: Final = Section("3.2", "Device Operation")
DEVICE_CONFIG_CHANGE: Final = Section("3.2.1", "Notification of Device Configuration Changes")

# Chapter 5: device types.
NET_FEATURE_BITS: Final = Section("5.1.3", "Network Device: Feature bits")
NET_FEATURE_REQUIREMENTS: Final = Section("5.1.3.1", "Network Device: Feature bit requirements")
NET_CONFIG: Final = Section("5.1.4", "Network Device: Device configuration layout")
NET_CONFIG_DEVICE: Final = Section(
    "5.1.4.1", "Network Device: Device Requirements: Device configuration layout"
)
NET_CONFIG_DRIVER: Final = Section(
    "5.1.4.2", "Network Device: Driver Requirements: Device configuration layout"
)
NET_OPERATION: Final = Section("5.1.6", "Network Device: Device Operation")
NET_TRANSMIT: Final = Section("5.1.6.2", "Network Device: Packet Transmission")
NET_RECEIVE: Final = Section("5.1.6.4", "Network Device: Processing of Incoming Packets")
NET_CONTROL_VQ: Final = Section("5.1.6.5", "Network Device: Control Virtqueue")
NET_CTRL_RX: Final = Section("5.1.6.5.1", "Network Device: Packet Receive Filtering")
NET_CTRL_MAC: Final = Section("5.1.6.5.2", "Network Device: Setting MAC Address Filtering")
NET_CTRL_MQ: Final = Section("5.1.6.5.6", "Network Device: Automatic receive steering in multiqueue mode")
NET_FEATURE_REQUIREMENTS_V14: Final = Section(
    "5.1.3.1", "Network Device: Feature bit requirements", version="1.4"
)
BLK_FEATURE_BITS: Final = Section("5.2.3", "Block Device: Feature bits")
BLK_CONFIG: Final = Section("5.2.4", "Block Device: Device configuration layout")
BLK_OPERATION: Final = Section("5.2.6", "Block Device: Device Operation")
BLK_OPERATION_DRIVER: Final = Section("5.2.6.1", "Block Device: Driver Requirements: Device Operation")
BLK_OPERATION_DEVICE: Final = Section("5.2.6.2", "Block Device: Device Requirements: Device Operation")

# Chapter 6: reserved (transport-independent) feature bits.
RESERVED_FEATURES: Final = Section("6", "Reserved Feature Bits")
RESERVED_FEATURES_DRIVER: Final = Section("6.1", "Driver Requirements: Reserved Feature Bits")
RESERVED_FEATURES_DEVICE: Final = Section("6.2", "Device Requirements: Reserved Feature Bits")
RESERVED_FEATURES_LEGACY: Final = Section("6.3", "Legacy Interface: Reserved Feature Bits")

# virtio v1.4 additions.
SUSPEND_STATUS: Final = Section("2.1", "Device Status Field: SUSPEND", version="1.4")
SUSPEND_FEATURE: Final = Section("6", "Reserved Feature Bits: VIRTIO_F_SUSPEND", version="1.4")

# Where the spec is silent: the vhost / vhost-vdpa interface is defined by Linux.
VHOST_UAPI: Final = LinuxSource("include/uapi/linux/vhost.h", "vhost ioctls")
VHOST_TYPES_UAPI: Final = LinuxSource("include/uapi/linux/vhost_types.h", "vhost types")


def vhost_vdpa(symbol: str) -> LinuxSource:
    """A function of ``drivers/vhost/vdpa.c`` that defines an ioctl's behaviour."""
    return LinuxSource("drivers/vhost/vdpa.c", symbol)


def vhost_iotlb(symbol: str) -> LinuxSource:
    """A function of ``drivers/vhost/iotlb.c`` (the IOTLB interval tree)."""
    return LinuxSource("drivers/vhost/iotlb.c", symbol)


def vhost_core(symbol: str) -> LinuxSource:
    """A function of ``drivers/vhost/vhost.c`` (vhost core: log, IOTLB messages, vrings)."""
    return LinuxSource("drivers/vhost/vhost.c", symbol)
