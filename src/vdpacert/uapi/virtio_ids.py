"""Device IDs (virtio spec v1.3 section 5, ``include/uapi/linux/virtio_ids.h``)."""

from typing import Final

VIRTIO_ID_NET: Final = 1
VIRTIO_ID_BLOCK: Final = 2
