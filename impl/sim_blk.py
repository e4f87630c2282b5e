"""sim-blk: the reference virtio-blk vDPA device, a ramdisk behind a :class:`SimDevice`.

The device is Linux's ``vdpa_sim_blk`` made to follow the spec (virtio v1.3 §5.2): a ramdisk of
``capacity`` 512-byte sectors, ``num_queues`` request queues (VIRTIO_BLK_F_MQ when more than one),
requests IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES answered by the compiled loop in
:mod:`vdpacert.impl.blk_datapath` (whose docstring lists every answer, including the cases the
spec leaves to the device). Requests past the capacity are IOERR with nothing written; request
types not negotiated are UNSUPP; a malformed request (no status byte, header shorter than 16
bytes) stops its queue and sets DEVICE_NEEDS_RESET.

Offered by default: VERSION_1, ACCESS_PLATFORM, RING_PACKED, EVENT_IDX, INDIRECT_DESC,
VHOST_F_LOG_ALL and SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH, DISCARD, WRITE_ZEROES (+ MQ with more than
one queue). A ``features`` attribute replaces the offer with a subset of that set, optionally
plus VIRTIO_BLK_F_RO, which makes the disk read-only.

Config space (``struct virtio_blk_config``, little-endian): capacity, size_max, seg_max (queue
size - 2, what Linux's driver can always fit), blk_size 512, num_queues, the discard and
write-zeroes limits, write_zeroes_may_unmap 1. Read-only to the driver (CONFIG_WCE is not offered).

Management device ``sim-blk`` (:data:`MGMTDEV`, loaded by :mod:`vdpacert.impl.bus`): attributes
``capacity``, ``num_queues``, ``queue_size``, ``features``, ``disk``, and vdpa_sim's ``batch_mapping``
and ``max_iotlb_entries`` (as sim-net's); :func:`create` is its factory.

Shared storage: devices created with the same ``disk`` name share one ramdisk, as two hosts see the
same LUN of a SAN. That is what a migration needs (the disk is not part of the device's state: the
destination reads what the source wrote), and a device whose ``capacity`` differs from the shared
disk's is refused. The disk lives while any device holds it.
"""

from __future__ import annotations

import struct
import weakref

from vdpacert.impl.blk_datapath import BlkBackend, Ramdisk
from vdpacert.impl.bus import MgmtDev
from vdpacert.impl.sim_device import TRANSPORT_FEATURES, SimDevice, feature_word, iotlb_cap
from vdpacert.uapi import virtio_blk as B  # noqa: N812 - read like the C names: B.VIRTIO_BLK_F_FLUSH
from vdpacert.uapi.virtio_ids import VIRTIO_ID_BLOCK

#: Defaults: vdpa_sim_blk's capacity (128 MiB), vdpa_sim's queue size.
DEFAULT_CAPACITY = 0x40000
DEFAULT_QUEUE_SIZE = 256
DEFAULT_SIZE_MAX = 0x10000
#: Most request queues one sim-blk device has.
MAX_QUEUES = 64
#: Segments one DISCARD / WRITE_ZEROES request may carry (config max_discard_seg / max_write_zeroes_seg).
DEFAULT_DWZ_SEGS = 16
_U32_MAX = 0xFFFFFFFF
#: Shared ramdisks by ``disk`` name, alive while a device holds them.
_SHARED_DISKS: weakref.WeakValueDictionary[str, Ramdisk] = weakref.WeakValueDictionary()


#: The default offer of a single-queue device.
DEFAULT_FEATURES = TRANSPORT_FEATURES | feature_word(
    B.VIRTIO_BLK_F_SIZE_MAX, B.VIRTIO_BLK_F_SEG_MAX,
    B.VIRTIO_BLK_F_BLK_SIZE, B.VIRTIO_BLK_F_FLUSH, B.VIRTIO_BLK_F_DISCARD, B.VIRTIO_BLK_F_WRITE_ZEROES)
#: Everything a ``features`` attribute may name (the default offer, MQ, and RO for a read-only disk).
SUPPORTED_FEATURES = DEFAULT_FEATURES | feature_word(B.VIRTIO_BLK_F_MQ, B.VIRTIO_BLK_F_RO)


def blk_config(*, capacity: int, size_max: int, seg_max: int, num_queues: int, max_discard_sectors: int,
               max_discard_seg: int, max_write_zeroes_sectors: int, max_write_zeroes_seg: int,
               blk_size: int = B.VIRTIO_BLK_SECTOR_SIZE) -> bytes:
    """``struct virtio_blk_config`` as the device presents it (every field the device has a value for)."""
    config = bytearray(B.VIRTIO_BLK_CONFIG_SIZE)
    struct.pack_into("<Q", config, B.VIRTIO_BLK_CONFIG_CAPACITY, capacity)
    struct.pack_into("<I", config, B.VIRTIO_BLK_CONFIG_SIZE_MAX, size_max)
    struct.pack_into("<I", config, B.VIRTIO_BLK_CONFIG_SEG_MAX, seg_max)
    struct.pack_into("<I", config, B.VIRTIO_BLK_CONFIG_BLK_SIZE, blk_size)
    struct.pack_into("<H", config, B.VIRTIO_BLK_CONFIG_NUM_QUEUES, num_queues)
    struct.pack_into("<I", config, B.VIRTIO_BLK_CONFIG_MAX_DISCARD_SECTORS, max_discard_sectors)
    struct.pack_into("<I", config, B.VIRTIO_BLK_CONFIG_MAX_DISCARD_SEG, max_discard_seg)
    struct.pack_into("<I", config, B.VIRTIO_BLK_CONFIG_DISCARD_SECTOR_ALIGNMENT, 1)
    struct.pack_into("<I", config, B.VIRTIO_BLK_CONFIG_MAX_WRITE_ZEROES_SECTORS, max_write_zeroes_sectors)
    struct.pack_into("<I", config, B.VIRTIO_BLK_CONFIG_MAX_WRITE_ZEROES_SEG, max_write_zeroes_seg)
    config[B.VIRTIO_BLK_CONFIG_WRITE_ZEROES_MAY_UNMAP] = 1
    return bytes(config)


class SimBlk(SimDevice):
    """A virtio-blk device backed by a ramdisk (see the module docstring).

    ``features`` replaces the default offer (a subset of :data:`SUPPORTED_FEATURES`; RO makes the
    disk read-only, as does ``read_only=True``). ``serial`` is the GET_ID answer (at most 20 bytes;
    default derived from the name). ``batch_mapping`` and ``max_iotlb_entries`` are :class:`SimDevice`'s
    (None: its default). ValueError for any attribute the device cannot honour.
    """

    def __init__(self, name: str = "sim-blk", *, capacity: int = DEFAULT_CAPACITY, num_queues: int = 1,
                 queue_size: int = DEFAULT_QUEUE_SIZE, features: int | None = None, read_only: bool = False,
                 serial: bytes | None = None, size_max: int = DEFAULT_SIZE_MAX,
                 max_discard_sectors: int = _U32_MAX, max_discard_seg: int = DEFAULT_DWZ_SEGS,
                 max_write_zeroes_sectors: int = _U32_MAX, max_write_zeroes_seg: int = DEFAULT_DWZ_SEGS,
                 disk: str = "", batch_mapping: bool | None = None, max_iotlb_entries: int | None = None) -> None:
        if not 1 <= num_queues <= MAX_QUEUES:
            raise ValueError(f"num_queues {num_queues} is not in [1, {MAX_QUEUES}]")
        if features is None:
            offered = DEFAULT_FEATURES | (1 << B.VIRTIO_BLK_F_MQ if num_queues > 1 else 0)
        else:
            if features & ~SUPPORTED_FEATURES:
                raise ValueError(f"sim-blk cannot offer features {features & ~SUPPORTED_FEATURES:#x}")
            offered = features
        if read_only:
            offered |= 1 << B.VIRTIO_BLK_F_RO
        if num_queues > 1 and not offered >> B.VIRTIO_BLK_F_MQ & 1:
            raise ValueError(f"{num_queues} queues need VIRTIO_BLK_F_MQ in the offer")
        if serial is None:
            serial = f"vdpacert-{name}".encode()[:B.VIRTIO_BLK_ID_BYTES]
        self.disk = shared_disk(disk, capacity) if disk else Ramdisk(capacity)
        self.backend = BlkBackend(self.disk, read_only=bool(offered >> B.VIRTIO_BLK_F_RO & 1), serial=bytes(serial),
                                  max_discard_sectors=max_discard_sectors, max_discard_seg=max_discard_seg,
                                  max_write_zeroes_sectors=max_write_zeroes_sectors,
                                  max_write_zeroes_seg=max_write_zeroes_seg)
        config = blk_config(capacity=capacity, size_max=size_max, seg_max=max(1, queue_size - 2),
                            num_queues=num_queues, max_discard_sectors=max_discard_sectors,
                            max_discard_seg=max_discard_seg, max_write_zeroes_sectors=max_write_zeroes_sectors,
                            max_write_zeroes_seg=max_write_zeroes_seg)
        super().__init__(name, device_id=VIRTIO_ID_BLOCK, offered=offered, config=config, nvqs=num_queues,
                         queue_size=queue_size, batch_mapping=batch_mapping, **iotlb_cap(max_iotlb_entries))

    @property
    def capacity(self) -> int:
        return int(self.disk.capacity)

    @property
    def read_only(self) -> bool:
        return bool(self.backend.read_only)

    def features_ok(self, features: int) -> None:
        self.backend.configure(features)

    def reset_device(self) -> None:
        self.backend.configure(0)

    def process(self, index: int) -> None:
        self.backend.process(self.vq(index))


def shared_disk(name: str, capacity: int) -> Ramdisk:
    """The shared ramdisk called ``name`` (made on first use); ValueError when its capacity differs."""
    disk = _SHARED_DISKS.get(name)
    if disk is None:
        disk = Ramdisk(capacity)
        _SHARED_DISKS[name] = disk
    elif disk.capacity != capacity:
        raise ValueError(f"shared disk {name!r} has {disk.capacity} sectors, not {capacity}")
    return disk


def create(name: str, *, capacity: int = DEFAULT_CAPACITY, num_queues: int = 1,
           queue_size: int = DEFAULT_QUEUE_SIZE, features: int | None = None, disk: str = "",
           batch_mapping: bool | None = None, max_iotlb_entries: int | None = None) -> SimBlk:
    """The management device's factory: ``vdpa dev add name NAME mgmtdev sim-blk [attr value ...]``."""
    return SimBlk(name, capacity=capacity, num_queues=num_queues, queue_size=queue_size, features=features,
                  disk=disk, batch_mapping=batch_mapping, max_iotlb_entries=max_iotlb_entries)


#: The ``sim-blk`` management device (registered on the bus by :func:`vdpacert.impl.bus.load_mgmtdevs`).
MGMTDEV = MgmtDev(
    name="sim-blk",
    factory=create,
    supported_attrs=frozenset({"capacity", "num_queues", "queue_size", "features", "disk", "batch_mapping",
                               "max_iotlb_entries"}),
    device_class="block",
    max_supported_vqs=MAX_QUEUES,
    supported_features=SUPPORTED_FEATURES,
)
