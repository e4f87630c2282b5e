"""A small third-party parent written against the protocol, and the fixtures that open it.

:class:`RecordingParent` is what a vendor would write: a two-queue device that keeps its
state, honours the ops' contracts (refuses unoffered features, refuses set_vq_state while
running, forgets everything on reset) and records every op it receives, so a test can assert
exactly what the fronts passed down. It has no datapath; ``kick_vq`` on a live queue just
"uses" a buffer and fires the queue's callback, and :meth:`RecordingParent.access` translates
an IOVA through the map it was given and reports faults the way a datapath would.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from vdpacert.impl.guestmem import GuestMemory, MemoryRegistry
from vdpacert.impl.iotlb import Iotlb, IotlbFault
from vdpacert.impl.parent import (
    NO_CALLBACK,
    VDPA_RESET_F_CLEAN_MAP,
    FaultCallback,
    VdpaCallback,
    VdpaParent,
    VqState,
    VqStatePacked,
    VqStateSplit,
)
from vdpacert.impl.vhost_vdpa import VhostVdpa
from vdpacert.uapi.vhost_types import VHOST_F_LOG_ALL
from vdpacert.uapi.virtio_config import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
)
from vdpacert.uapi.virtio_ids import VIRTIO_ID_NET

OFFERED = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_RING_PACKED) | (1 << 5)  # VERSION_1, RING_PACKED, MAC


class BaseRecordingParent(VdpaParent):
    """The mandatory ops plus bookkeeping; subclasses add optional ops."""

    nvqs = 2
    ngroups = 2
    nas = 2

    def __init__(self, *, offered: int = OFFERED, config: bytes = bytes(range(1, 9)), num_max: int = 256) -> None:
        self.offered = offered
        self.config = bytearray(config)
        self.num_max = num_max
        self.ops: list[tuple[Any, ...]] = []
        self.maps: dict[int, Iotlb] = {}
        self.config_cb: VdpaCallback = NO_CALLBACK
        self.fault_cb: FaultCallback | None = None
        self.registry: MemoryRegistry | None = None
        self.group_asid = [0] * self.ngroups
        self.used = [0] * self.nvqs
        self._reset_state()

    def _reset_state(self) -> None:
        self.status = 0
        self.features = 0
        self.suspended = False
        self.vqs: list[dict[str, Any]] = [
            {"addr": None, "num": 0, "ready": False, "cb": NO_CALLBACK, "state": None} for _ in range(self.nvqs)]

    def record(self, *op: Any) -> None:
        self.ops.append(op)

    def ops_named(self, name: str) -> list[tuple[Any, ...]]:
        return [op for op in self.ops if op[0] == name]

    @property
    def packed(self) -> bool:
        return bool(self.features >> VIRTIO_F_RING_PACKED & 1)

    # virtqueues
    def set_vq_address(self, index: int, desc_area: int, driver_area: int, device_area: int) -> None:
        self.record("set_vq_address", index, desc_area, driver_area, device_area)
        if desc_area % 16:
            raise OSError(errno.EINVAL, "descriptor table must be 16-byte aligned")
        self.vqs[index]["addr"] = (desc_area, driver_area, device_area)

    def set_vq_num(self, index: int, num: int) -> None:
        self.record("set_vq_num", index, num)
        self.vqs[index]["num"] = num

    def kick_vq(self, index: int) -> None:
        self.record("kick_vq", index)
        vq = self.vqs[index]
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK and vq["ready"] and not self.suspended:
            self.used[index] += 1
            vq["cb"]()

    def set_vq_cb(self, index: int, cb: VdpaCallback) -> None:
        self.record("set_vq_cb", index, cb.bound)
        self.vqs[index]["cb"] = cb

    def set_vq_ready(self, index: int, ready: bool) -> None:
        self.record("set_vq_ready", index, ready)
        self.vqs[index]["ready"] = ready

    def get_vq_ready(self, index: int) -> bool:
        return bool(self.vqs[index]["ready"])

    def set_vq_state(self, index: int, state: VqState) -> None:
        self.record("set_vq_state", index, state)
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK and not self.suspended:
            raise OSError(errno.EBUSY, "the queue is running")
        if isinstance(state, VqStatePacked) != self.packed:
            raise OSError(errno.EINVAL, "state of the wrong ring type")
        self.vqs[index]["state"] = state

    def get_vq_state(self, index: int) -> VqState:
        state = self.vqs[index]["state"]
        if state is not None:
            return state  # type: ignore[no-any-return]
        return VqStatePacked(0, 1, 0, 1) if self.packed else VqStateSplit(0)

    def get_vq_align(self) -> int:
        return 4096

    def get_vq_num_max(self) -> int:
        return self.num_max

    # features, device, config
    def get_device_features(self) -> int:
        return self.offered

    def set_driver_features(self, features: int) -> None:
        self.record("set_driver_features", features)
        if features & ~self.offered:
            raise OSError(errno.EINVAL, "features that were not offered")
        self.features = features

    def get_driver_features(self) -> int:
        return self.features

    def get_device_id(self) -> int:
        return VIRTIO_ID_NET

    def get_vendor_id(self) -> int:
        return 0x1AF4

    def get_status(self) -> int:
        return self.status

    def set_status(self, status: int) -> None:
        self.record("set_status", status)
        if status & VIRTIO_CONFIG_S_FEATURES_OK and not self.features >> VIRTIO_F_VERSION_1 & 1:
            status &= ~VIRTIO_CONFIG_S_FEATURES_OK  # refuse a legacy-only feature set
        self.status = status

    def reset(self) -> None:
        self.record("reset")
        self._reset_state()

    def get_config_size(self) -> int:
        return len(self.config)

    def get_config(self, offset: int, length: int) -> bytes:
        return bytes(self.config[offset:offset + length])

    def set_config(self, offset: int, data: bytes) -> None:
        self.record("set_config", offset, data)
        self.config[offset:offset + len(data)] = data

    def set_config_cb(self, cb: VdpaCallback) -> None:
        self.record("set_config_cb", cb.bound)
        self.config_cb = cb

    # what a datapath would do with the map
    def access(self, index: int, iova: int, length: int, perm: int) -> list[tuple[int, int]] | None:
        asid = self.group_asid[self.get_vq_group(index)]
        try:
            return self.maps.get(asid, Iotlb()).translate(iova, length, perm)
        except IotlbFault as fault:
            if self.fault_cb is not None:
                self.fault_cb(asid, fault.iova, fault.perm, fault.reason == "miss")
            return None

    def get_vq_group(self, index: int) -> int:
        return index % self.ngroups


class SetMapParent(BaseRecordingParent):
    """Maps arrive whole through set_map; can suspend/resume; reports sizes, groups, faults."""

    def set_map(self, asid: int, iotlb: Iotlb) -> None:
        self.record("set_map", asid, iotlb.entries())
        self.maps[asid] = iotlb

    def compat_reset(self, flags: int) -> None:
        self.record("compat_reset", flags)
        self._reset_state()
        if flags & VDPA_RESET_F_CLEAN_MAP:
            self.maps.clear()

    def suspend(self) -> None:
        self.record("suspend")
        self.suspended = True

    def resume(self) -> None:
        self.record("resume")
        self.suspended = False

    def get_vq_size(self, index: int) -> int:
        return int(self.vqs[index]["num"])

    def set_group_asid(self, group: int, asid: int) -> None:
        self.record("set_group_asid", group, asid)
        if group >= self.ngroups:
            raise OSError(errno.EINVAL, f"group {group} does not exist")
        self.group_asid[group] = asid

    def set_fault_cb(self, cb: FaultCallback | None) -> None:
        self.fault_cb = cb

    def bind_mm(self, registry: MemoryRegistry) -> None:
        self.record("bind_mm")
        self.registry = registry

    def unbind_mm(self) -> None:
        self.record("unbind_mm")
        self.registry = None

    def get_iova_range(self) -> tuple[int, int]:
        return 0x1000, (1 << 48) - 1


class DmaParent(BaseRecordingParent):
    """Maps arrive one range at a time through dma_map / dma_unmap; nothing else optional."""

    def dma_map(self, asid: int, iova: int, size: int, uaddr: int, perm: int) -> None:
        self.record("dma_map", asid, iova, size, uaddr, perm)
        if perm == 2 and iova == 0xBAD000:  # a range the hardware cannot map
            raise OSError(errno.ENOMEM, "no room in the device's IOMMU")
        self.maps.setdefault(asid, Iotlb()).update(iova, size, uaddr, perm)

    def dma_unmap(self, asid: int, iova: int, size: int) -> None:
        self.record("dma_unmap", asid, iova, size)
        self.maps[asid].invalidate(iova, size)


class LoggingParent(SetMapParent):
    """Also logs dirty pages (the vdpacert extension) and offers VHOST_F_LOG_ALL."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("offered", OFFERED | (1 << VHOST_F_LOG_ALL))
        super().__init__(**kwargs)
        self.log_base: tuple[int, int] | None = None
        self.log_fd: int | None = None
        self.vq_log: dict[int, tuple[bool, int]] = {}

    def set_log_base(self, uaddr: int, size: int) -> None:
        self.record("set_log_base", uaddr, size)
        self.log_base = (uaddr, size)

    def set_log_fd(self, fd: int | None) -> None:
        self.record("set_log_fd", fd is not None)
        self.log_fd = fd

    def set_vq_log(self, index: int, log_used: bool, log_guest_addr: int) -> None:
        self.vq_log[index] = (log_used, log_guest_addr)

    def mark_dirty(self) -> None:
        """What the datapath does after logging a write: signal the log eventfd."""
        if self.log_fd is not None:
            os.eventfd_write(self.log_fd, 1)


@pytest.fixture
def kinds() -> SimpleNamespace:
    """The parent classes above, for tests that build or subclass them (conftest is not importable)."""
    return SimpleNamespace(SetMapParent=SetMapParent, DmaParent=DmaParent, LoggingParent=LoggingParent,
                           BaseRecordingParent=BaseRecordingParent, OFFERED=OFFERED)


@pytest.fixture
def registry() -> MemoryRegistry:
    return MemoryRegistry()


@pytest.fixture
def memory(registry: MemoryRegistry) -> Iterator[GuestMemory]:
    mem = GuestMemory(1 << 20, gpa=0x10_0000, register=False)
    registry.add(mem)
    yield mem
    mem.close()


@pytest.fixture
def parent() -> SetMapParent:
    return SetMapParent()


@pytest.fixture
def vhost(parent: SetMapParent, registry: MemoryRegistry) -> Iterator[VhostVdpa]:
    front = VhostVdpa(parent, registry)
    yield front
    front.close()


@pytest.fixture
def owned(vhost: VhostVdpa) -> VhostVdpa:
    vhost.set_owner()
    return vhost


@pytest.fixture
def efd() -> Iterator[Any]:
    """Make eventfds that are closed after the test."""
    made: list[int] = []

    def make(flags: int = os.EFD_NONBLOCK) -> int:
        fd = os.eventfd(0, flags | os.EFD_CLOEXEC)
        made.append(fd)
        return fd

    yield make
    for fd in made:
        with contextlib.suppress(OSError):
            os.close(fd)
