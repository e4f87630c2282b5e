"""The virtio front (virtio_vdpa) over a third-party parent: status, features, config, find_vqs."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from vdpacert.impl.guestmem import GuestMemory, MemoryRegistry
from vdpacert.impl.iotlb import ACCESS_RW
from vdpacert.impl.virtio_front import VirtioVdpa, layout_queue
from vdpacert.uapi.virtio_config import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
)

VERSION_1 = 1 << VIRTIO_F_VERSION_1
PACKED = 1 << VIRTIO_F_RING_PACKED


def errno_of(call: Any, *args: Any, **kwargs: Any) -> int:
    with pytest.raises(OSError) as caught:
        call(*args, **kwargs)
    assert caught.value.errno is not None
    return caught.value.errno


@pytest.fixture
def virtio(parent: Any, registry: MemoryRegistry) -> Any:
    front = VirtioVdpa(parent, registry)
    yield front
    front.close()


def negotiate(front: VirtioVdpa, features: int = VERSION_1) -> None:
    front.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE)
    front.add_status(VIRTIO_CONFIG_S_DRIVER)
    front.finalize_features(features)


def test_status_and_features(virtio: VirtioVdpa, parent: Any) -> None:
    assert parent.registry is not None  # bound to the front's memory
    assert virtio.get_features() == parent.offered
    negotiate(virtio, VERSION_1 | PACKED)
    assert virtio.get_status() == VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK
    assert virtio.get_driver_features() == VERSION_1 | PACKED
    assert errno_of(virtio.finalize_features, VERSION_1) == errno.EBUSY
    assert errno_of(virtio.set_status, VIRTIO_CONFIG_S_ACKNOWLEDGE) == errno.EINVAL
    assert errno_of(virtio.set_status, 0x100) == errno.EINVAL
    virtio.set_status(0)
    assert virtio.get_status() == 0 and parent.features == 0


def test_feature_refusals(virtio: VirtioVdpa) -> None:
    negotiate_args = (VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
    virtio.set_status(negotiate_args)
    assert errno_of(virtio.finalize_features, 1 << 40) == errno.EINVAL  # not offered
    assert errno_of(virtio.finalize_features, PACKED) == errno.ENODEV  # the device cleared FEATURES_OK


def test_config_access(virtio: VirtioVdpa, parent: Any) -> None:
    assert virtio.config_read(0, 4) == bytes([1, 2, 3, 4])
    assert parent.ops_named("set_driver_features") == [("set_driver_features", 0)]
    virtio.config_write(7, b"\xEE")
    assert virtio.config_read(6, 2) == bytes([7, 0xEE])
    for offset, length in ((7, 2), (9, 0), (-1, 1)):
        assert errno_of(virtio.config_read, offset, length) == errno.EINVAL
    assert errno_of(virtio.config_write, 8, b"x") == errno.EINVAL
    assert virtio.generation() == 0


def test_find_vqs_lays_out_split_rings_and_sets_them_up(virtio: VirtioVdpa, parent: Any,
                                                       memory: GuestMemory) -> None:
    negotiate(virtio)
    hits: list[int] = []
    memory.fill(0, 0x10000, 0xFF)
    layouts = virtio.find_vqs(memory, [64, None], [lambda: hits.append(0), None], config_cb=lambda: hits.append(9))
    first, second = layouts
    assert (first.num, second.num, first.packed) == (64, 256, False)
    assert first.desc == memory.gpa and first.driver == memory.gpa + 16 * 64
    assert first.device % 4096 == 0 and first.device >= first.driver + 6 + 2 * 64
    assert second.desc % 4096 == 0 and second.desc >= first.end_offset + memory.gpa
    assert memory.read(first.desc_offset, first.end_offset - first.desc_offset) == bytes(first.end_offset)
    assert parent.vqs[0]["addr"] == (first.desc, first.driver, first.device)
    assert parent.vqs[1]["num"] == 256 and parent.vqs[1]["ready"]
    assert parent.maps[0].entries() == [(memory.gpa, memory.gpa + memory.size - 1, memory.uaddr, ACCESS_RW)]
    assert parent.maps[1].entries() == parent.maps[0].entries()  # every address space
    virtio.add_status(VIRTIO_CONFIG_S_DRIVER_OK)
    virtio.notify(0)
    virtio.notify(1)  # no callback for queue 1
    parent.config_cb()
    assert hits == [0, 9] and parent.used == [1, 1]
    assert errno_of(virtio.find_vqs, memory, [8]) == errno.EBUSY
    virtio.del_vqs()
    assert not parent.vqs[0]["ready"] and parent.maps[0].entries() == []
    assert errno_of(virtio.notify, 0) == errno.EINVAL


def test_find_vqs_packed_layout(virtio: VirtioVdpa, memory: GuestMemory) -> None:
    negotiate(virtio, VERSION_1 | PACKED)
    (layout,) = virtio.find_vqs(memory, [100])  # packed sizes need not be powers of two
    assert layout.packed and layout.driver == layout.desc + 1600 and layout.device == layout.driver + 4


def test_find_vqs_errors(kinds: Any, virtio: VirtioVdpa, parent: Any, memory: GuestMemory,
                         registry: MemoryRegistry) -> None:
    assert errno_of(virtio.find_vqs, memory, [8]) == errno.EINVAL  # before FEATURES_OK
    negotiate(virtio)
    assert errno_of(virtio.find_vqs, memory, [8, 8, 8]) == errno.EINVAL  # more queues than nvqs
    assert errno_of(virtio.find_vqs, memory, [100]) == errno.EINVAL  # split size not a power of two
    assert errno_of(virtio.find_vqs, memory, [512]) == errno.EINVAL  # above the device maximum
    assert errno_of(virtio.find_vqs, memory, [8], [None, None]) == errno.EINVAL
    with GuestMemory(0x1000, register=False) as small:
        registry.add(small)
        assert errno_of(virtio.find_vqs, small, [256]) == errno.ENOMEM
    with GuestMemory(0x10000, register=False) as stranger:
        assert errno_of(virtio.find_vqs, stranger, [8]) == errno.EINVAL  # not in the front's registry
    parent.vqs[0]["ready"] = True  # already set up behind the driver's back
    assert errno_of(virtio.find_vqs, memory, [8]) == errno.ENOENT
    assert parent.maps[0].entries() == []  # rolled back
    assert virtio.queues == {}


def test_find_vqs_with_a_dma_map_parent(kinds: Any, memory: GuestMemory, registry: MemoryRegistry) -> None:
    parent = kinds.DmaParent()
    with VirtioVdpa(parent, registry) as front:
        negotiate(front)
        front.find_vqs(memory, [16])
        assert parent.ops_named("dma_map")[0] == ("dma_map", 0, memory.gpa, memory.size, memory.uaddr, ACCESS_RW)
    assert ("dma_unmap", 1, memory.gpa, memory.size) in parent.ops  # close drops the mapping


def test_closed_front(virtio: VirtioVdpa, parent: Any, registry: MemoryRegistry) -> None:
    virtio.close()
    virtio.close()
    assert errno_of(virtio.get_status) == errno.ENODEV
    assert parent.registry is None
    VirtioVdpa(parent, registry).close()  # the parent is free again


def test_layout_queue_alignment() -> None:
    split = layout_queue(0, 8, False, 3, 0x1000, 64)
    assert split.desc_offset == 64 and split.device_offset % 64 == 0
    assert split.end_offset == split.device_offset + 6 + 8 * 8
