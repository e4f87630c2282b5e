"""The driver-facing side of vDPA: what a kernel virtio driver sees through ``virtio_vdpa``.

Linux's ``drivers/virtio/virtio_vdpa.c`` turns a vDPA parent into an ordinary virtio device:
the driver negotiates features, reads config and asks for virtqueues (``find_vqs``), and the
transport lays the rings out in guest memory and hands their addresses to the parent. This
module does the same over any :class:`~vdpacert.impl.parent.VdpaParent`, with the rings in a
:class:`~vdpacert.impl.guestmem.GuestMemory` and an identity IOVA map (IOVA == guest-physical
address), the DMA view a driver without an IOMMU has.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vdpacert.impl.guestmem import GuestMemory, default_registry
from vdpacert.impl.iotlb import ACCESS_RW, Iotlb
from vdpacert.impl.parent import NO_CALLBACK, VdpaCallback, VdpaParent, bind_parent, has_op, unbind_parent
from vdpacert.uapi.virtio_config import VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_RING_PACKED
from vdpacert.uapi.virtio_ring import VIRTQUEUE_MAX_SIZE

if TYPE_CHECKING:
    from vdpacert.impl.guestmem import MemoryRegistry


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


@dataclass(frozen=True)
class VirtqueueLayout:
    """Where one virtqueue's areas are: IOVAs (== guest-physical) and offsets into the memory."""

    index: int
    num: int
    packed: bool
    desc: int  # descriptor table / descriptor ring
    driver: int  # avail ring / driver event suppression
    device: int  # used ring / device event suppression
    desc_offset: int
    driver_offset: int
    device_offset: int
    end_offset: int  # first byte after this queue's areas


def layout_queue(index: int, num: int, packed: bool, base_offset: int, gpa: int, align: int) -> VirtqueueLayout:
    """Lay out one queue from ``base_offset``: split as vring_init does (used at ``align``), packed compactly."""
    desc = _align_up(base_offset, max(align, 16))
    if packed:
        driver = _align_up(desc + 16 * num, 4)
        device = driver + 4
        end = device + 4
    else:
        driver = desc + 16 * num
        device = _align_up(driver + 6 + 2 * num, max(align, 4))
        end = device + 6 + 8 * num
    return VirtqueueLayout(index, num, packed, gpa + desc, gpa + driver, gpa + device, desc, driver, device, end)


class VirtioVdpa:
    """A virtio device backed by ``parent``, as the virtio core sees it through virtio_vdpa.

    Constructing it claims the parent (EBUSY when vhost-vdpa or another virtio front holds it)
    and resets the device. All parent calls go through the binding's lock.
    """

    def __init__(self, parent: VdpaParent, registry: MemoryRegistry | None = None) -> None:
        self._binding = bind_parent(parent, "virtio_vdpa")
        self.parent = parent
        self._lock = self._binding.lock
        self._registry = registry if registry is not None else default_registry()
        self._closed = False
        self._features_valid = False
        self._queues: dict[int, VirtqueueLayout] = {}
        self._mapped: list[tuple[int, int, int, int]] = []  # (asid, iova, size, uaddr)
        try:
            with self._lock:
                if has_op(parent, "bind_mm"):
                    parent.bind_mm(self._registry)
                self._reset()
        except BaseException:
            unbind_parent(self._binding)
            raise

    # ----- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        try:
            with self._lock:
                self._reset()
                self._queues.clear()
                self._unmap_memory()
                if has_op(self.parent, "unbind_mm"):
                    self.parent.unbind_mm()
                self._closed = True
        finally:
            unbind_parent(self._binding)

    def __enter__(self) -> VirtioVdpa:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise OSError(errno.ENODEV, "the virtio device was closed")

    # ----- status and features ---------------------------------------------------------------

    def _reset(self) -> None:
        self._features_valid = False
        self.parent.reset()

    def reset(self) -> None:
        """virtio_vdpa_reset: the device forgets features, status and queues."""
        self._check_open()
        with self._lock:
            self._reset()
            self._queues.clear()

    def get_status(self) -> int:
        self._check_open()
        with self._lock:
            return self.parent.get_status()

    def set_status(self, status: int) -> None:
        """Write the status byte; 0 is a reset. Clearing any other bit is the driver's bug: EINVAL."""
        self._check_open()
        if not 0 <= status <= 0xFF:
            raise OSError(errno.EINVAL, f"status {status} is not a byte")
        with self._lock:
            if status == 0:
                self._reset()
                self._queues.clear()
                return
            old = self.parent.get_status()
            if old & ~status:
                raise OSError(errno.EINVAL, f"status {status:#x} clears bits of {old:#x}; only a reset may")
            self.parent.set_status(status)

    def add_status(self, bits: int) -> None:
        """virtio_add_status: OR ``bits`` into the status."""
        self.set_status(self.get_status() | bits)

    def get_features(self) -> int:
        """The device's offered features, full width."""
        self._check_open()
        with self._lock:
            return self.parent.get_device_features()

    def get_driver_features(self) -> int:
        self._check_open()
        with self._lock:
            return self.parent.get_driver_features()

    def finalize_features(self, features: int) -> None:
        """Accept ``features``, set FEATURES_OK and check the device kept it (virtio_features_ok).

        Bits the device did not offer are refused before the device sees them (EINVAL); a device
        that clears FEATURES_OK refused the set: ENODEV, as the virtio core reports it.
        """
        self._check_open()
        with self._lock:
            offered = self.parent.get_device_features()
            if features & ~offered:
                raise OSError(errno.EINVAL, f"features {features & ~offered:#x} were not offered")
            status = self.parent.get_status()
            if status & VIRTIO_CONFIG_S_FEATURES_OK:
                raise OSError(errno.EBUSY, "features were already finalized")
            self._features_valid = True
            self.parent.set_driver_features(features)
            self.parent.set_status(status | VIRTIO_CONFIG_S_FEATURES_OK)
            if not self.parent.get_status() & VIRTIO_CONFIG_S_FEATURES_OK:
                raise OSError(errno.ENODEV, f"the device refused features {features:#x}")

    # ----- config ------------------------------------------------------------------------------

    def _check_config(self, offset: int, length: int) -> None:
        size = self.parent.get_config_size()
        if offset < 0 or length < 0 or offset > size or length > size - offset:
            raise OSError(errno.EINVAL, f"config access of {length} bytes at {offset} is outside {size} bytes")

    def config_read(self, offset: int, length: int) -> bytes:
        self._check_open()
        with self._lock:
            self._check_config(offset, length)
            if not self._features_valid:  # vdpa_get_config: reading first negotiates no features
                self._features_valid = True
                self.parent.set_driver_features(0)
            return bytes(self.parent.get_config(offset, length))

    def config_write(self, offset: int, data: bytes) -> None:
        self._check_open()
        with self._lock:
            self._check_config(offset, len(data))
            self.parent.set_config(offset, bytes(data))

    def generation(self) -> int:
        self._check_open()
        with self._lock:
            return self.parent.get_generation() if has_op(self.parent, "get_generation") else 0

    # ----- virtqueues -----------------------------------------------------------------------------

    @property
    def queues(self) -> dict[int, VirtqueueLayout]:
        return dict(self._queues)

    def find_vqs(self, memory: GuestMemory, sizes: Sequence[int | None],
                 callbacks: Sequence[Callable[[], None] | None] | None = None, *,
                 config_cb: Callable[[], None] | None = None) -> list[VirtqueueLayout]:
        """Lay out ``len(sizes)`` queues in ``memory`` and hand them to the device, ready.

        ``sizes[i]`` None means the device maximum. Errors: EINVAL for a bad size, a queue
        count above nvqs, memory this process's registry does not hold, or no FEATURES_OK yet;
        ENOMEM when the rings do not fit; ENOENT when a queue is already (or will not become)
        ready, as virtio_vdpa_setup_vq reports; EBUSY when queues exist (del_vqs first).
        """
        self._check_open()
        callbacks = list(callbacks) if callbacks is not None else [None] * len(sizes)
        if len(callbacks) != len(sizes):
            raise OSError(errno.EINVAL, "one callback (or None) per queue")
        with self._lock:
            parent = self.parent
            if self._queues:
                raise OSError(errno.EBUSY, "queues exist: del_vqs first")
            if not parent.get_status() & VIRTIO_CONFIG_S_FEATURES_OK:
                raise OSError(errno.EINVAL, "find_vqs before FEATURES_OK")
            if len(sizes) > parent.nvqs:
                raise OSError(errno.EINVAL, f"{len(sizes)} queues asked, the device has {parent.nvqs}")
            if self._registry.lookup(memory.uaddr, memory.size) is None:
                raise OSError(errno.EINVAL, "the ring memory is not in this front's memory registry")
            packed = bool(parent.get_driver_features() >> VIRTIO_F_RING_PACKED & 1)
            layouts = self._plan(memory, sizes, packed)
            for layout in layouts:
                memory.fill(layout.desc_offset, layout.end_offset - layout.desc_offset, 0)
            self._map_memory(memory)
            try:
                for layout, callback in zip(layouts, callbacks, strict=True):
                    self._setup_vq(layout, callback)
                    self._queues[layout.index] = layout
                if config_cb is not None:
                    parent.set_config_cb(VdpaCallback(config_cb))
            except BaseException:
                self._del_vqs()
                raise
            return layouts

    def _plan(self, memory: GuestMemory, sizes: Sequence[int | None], packed: bool) -> list[VirtqueueLayout]:
        parent = self.parent
        num_max = parent.get_vq_num_max()
        num_min = parent.get_vq_num_min() if has_op(parent, "get_vq_num_min") else 1
        align = parent.get_vq_align()
        if align <= 0 or align & (align - 1):
            raise OSError(errno.EIO, f"the device reports vq alignment {align}, not a power of two")
        layouts, cursor = [], 0
        for index, size in enumerate(sizes):
            num = num_max if size is None else size
            if not max(1, num_min) <= num <= min(num_max, VIRTQUEUE_MAX_SIZE):
                raise OSError(errno.EINVAL, f"queue {index}: size {num} is outside [{num_min}, {num_max}]")
            if not packed and num & (num - 1):
                raise OSError(errno.EINVAL, f"queue {index}: a split ring size must be a power of two, got {num}")
            layout = layout_queue(index, num, packed, cursor, memory.gpa, align)
            if layout.end_offset > memory.size:
                raise OSError(errno.ENOMEM, f"queue {index} does not fit in {memory.size} bytes of ring memory")
            layouts.append(layout)
            cursor = layout.end_offset
        return layouts

    def _setup_vq(self, layout: VirtqueueLayout, callback: Callable[[], None] | None) -> None:
        parent, index = self.parent, layout.index
        if parent.get_vq_ready(index):
            raise OSError(errno.ENOENT, f"queue {index} is already set up")
        parent.set_vq_cb(index, NO_CALLBACK if callback is None else VdpaCallback(callback))
        parent.set_vq_num(index, layout.num)
        try:
            parent.set_vq_address(index, layout.desc, layout.driver, layout.device)
        except OSError as error:
            raise OSError(errno.EINVAL, f"the device refused queue {index}'s addresses: {error}") from error
        parent.set_vq_ready(index, True)
        if not parent.get_vq_ready(index):
            raise OSError(errno.ENOENT, f"queue {index} did not become ready")

    def _map_memory(self, memory: GuestMemory) -> None:
        """Identity IOVA map of ``memory`` in every address space the device has."""
        if any(iova == memory.gpa and uaddr == memory.uaddr for _, iova, _, uaddr in self._mapped):
            return
        self._unmap_memory()
        parent = self.parent
        for asid in range(parent.nas):
            if has_op(parent, "dma_map"):
                parent.dma_map(asid, memory.gpa, memory.size, memory.uaddr, ACCESS_RW)
            else:
                iotlb = Iotlb()
                iotlb.update(memory.gpa, memory.size, memory.uaddr, ACCESS_RW)
                parent.set_map(asid, iotlb)
            self._mapped.append((asid, memory.gpa, memory.size, memory.uaddr))

    def _unmap_memory(self) -> None:
        parent = self.parent
        for asid, iova, size, _ in self._mapped:
            if has_op(parent, "dma_map"):
                parent.dma_unmap(asid, iova, size)
            else:
                parent.set_map(asid, Iotlb())
        self._mapped.clear()

    def notify(self, index: int) -> None:
        """virtqueue_notify: kick the device for queue ``index``."""
        self._check_open()
        if index not in self._queues:
            raise OSError(errno.EINVAL, f"queue {index} was not set up by find_vqs")
        with self._lock:
            self.parent.kick_vq(index)

    def _del_vqs(self) -> None:
        for index in sorted(self._queues):
            self.parent.set_vq_ready(index, False)
            self.parent.set_vq_cb(index, NO_CALLBACK)
        self._queues.clear()
        self._unmap_memory()

    def del_vqs(self) -> None:
        """Disable every queue find_vqs set up and drop the ring memory's mapping."""
        self._check_open()
        with self._lock:
            self._del_vqs()
