"""Types and flags of the vhost interface (``include/uapi/linux/vhost_types.h``)."""

import struct
from typing import Final

# struct vhost_iotlb_msg.type
VHOST_IOTLB_MISS: Final = 1
VHOST_IOTLB_UPDATE: Final = 2
VHOST_IOTLB_INVALIDATE: Final = 3
VHOST_IOTLB_ACCESS_FAIL: Final = 4
VHOST_IOTLB_BATCH_BEGIN: Final = 5
VHOST_IOTLB_BATCH_END: Final = 6

# struct vhost_iotlb_msg.perm
VHOST_ACCESS_RO: Final = 0x1
VHOST_ACCESS_WO: Final = 0x2
VHOST_ACCESS_RW: Final = 0x3

# struct vhost_msg.type / struct vhost_msg_v2.type
VHOST_IOTLB_MSG: Final = 0x1
VHOST_IOTLB_MSG_V2: Final = 0x2

# struct vhost_vring_addr.flags
VHOST_VRING_F_LOG: Final = 0

VHOST_VRING_LITTLE_ENDIAN: Final = 0
VHOST_VRING_BIG_ENDIAN: Final = 1

VHOST_PAGE_SIZE: Final = 0x1000
VHOST_FILE_UNBIND: Final = -1

# vhost's own feature bits, carried in the device feature word.
VHOST_F_LOG_ALL: Final = 26
VHOST_NET_F_VIRTIO_NET_HDR: Final = 27

# Backend feature bit numbers (VHOST_SET_BACKEND_FEATURES).
VHOST_BACKEND_F_IOTLB_MSG_V2: Final = 0x1
VHOST_BACKEND_F_IOTLB_BATCH: Final = 0x2
VHOST_BACKEND_F_IOTLB_ASID: Final = 0x3
VHOST_BACKEND_F_SUSPEND: Final = 0x4
VHOST_BACKEND_F_RESUME: Final = 0x5
VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK: Final = 0x6
VHOST_BACKEND_F_DESC_ASID: Final = 0x7
VHOST_BACKEND_F_IOTLB_PERSIST: Final = 0x8

# Wire layouts (native x86-64 / little-endian, as the kernel reads them).
# struct vhost_vring_state { unsigned int index; unsigned int num; }
VHOST_VRING_STATE: Final = struct.Struct("<II")
# struct vhost_vring_file { unsigned int index; int fd; }
VHOST_VRING_FILE: Final = struct.Struct("<Ii")
# struct vhost_vring_addr { index; flags; desc_user_addr; used_user_addr; avail_user_addr; log_guest_addr; }
VHOST_VRING_ADDR: Final = struct.Struct("<IIQQQQ")
# struct vhost_vdpa_config { __u32 off; __u32 len; __u8 buf[]; } (header only)
VHOST_VDPA_CONFIG: Final = struct.Struct("<II")
# struct vhost_vdpa_iova_range { __u64 first; __u64 last; }
VHOST_VDPA_IOVA_RANGE: Final = struct.Struct("<QQ")
# struct vhost_msg_v2 { __u32 type; __u32 asid; union { struct vhost_iotlb_msg iotlb; __u8 padding[64]; }; }
# struct vhost_iotlb_msg { __u64 iova; __u64 size; __u64 uaddr; __u8 perm; __u8 type; } (padded to 32)
VHOST_MSG_V2: Final = struct.Struct("<IIQQQBB38x")
assert VHOST_MSG_V2.size == 72
