"""Virtqueue layout constants (``include/uapi/linux/virtio_ring.h``)."""

from typing import Final

VIRTIO_RING_F_INDIRECT_DESC: Final = 28
VIRTIO_RING_F_EVENT_IDX: Final = 29

# Split ring descriptor flags.
VRING_DESC_F_NEXT: Final = 1
VRING_DESC_F_WRITE: Final = 2
VRING_DESC_F_INDIRECT: Final = 4

# Packed ring descriptor flag bit numbers (not masks).
VRING_PACKED_DESC_F_AVAIL: Final = 7
VRING_PACKED_DESC_F_USED: Final = 15

# Split ring suppression flags.
VRING_USED_F_NO_NOTIFY: Final = 1
VRING_AVAIL_F_NO_INTERRUPT: Final = 1

# Packed ring event suppression.
VRING_PACKED_EVENT_FLAG_ENABLE: Final = 0x0
VRING_PACKED_EVENT_FLAG_DISABLE: Final = 0x1
VRING_PACKED_EVENT_FLAG_DESC: Final = 0x2
VRING_PACKED_EVENT_F_WRAP_CTR: Final = 15

# Alignment of the three split ring areas.
VRING_DESC_ALIGN_SIZE: Final = 16
VRING_AVAIL_ALIGN_SIZE: Final = 2
VRING_USED_ALIGN_SIZE: Final = 4

# Sizes of the ring structures in bytes.
VRING_DESC_SIZE: Final = 16  # struct vring_desc / struct vring_packed_desc
VRING_USED_ELEM_SIZE: Final = 8  # struct vring_used_elem

# The largest queue size either layout allows (virtio v1.3 sections 2.7 and 2.8).
VIRTQUEUE_MAX_SIZE: Final = 32768
