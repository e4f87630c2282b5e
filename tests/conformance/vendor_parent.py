"""A small vendor parent driver, as a third party would write one, for ``python:MODULE:FACTORY`` targets.

Two queues, no datapath (a kick on a ready queue fires its callback), maps through ``set_map``,
suspend/resume. ``make_parent(num_max=..., crash_on_config=1)`` is the factory the target string
names; ``crash_on_config`` makes ``get_config`` raise a plain Python exception, the in-process
equivalent of a driver oops.
"""

from __future__ import annotations

import errno

from vdpacert.impl.iotlb import Iotlb
from vdpacert.impl.parent import NO_CALLBACK, VdpaCallback, VdpaParent, VqState, VqStateSplit
from vdpacert.uapi.virtio_config import VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1

OFFERED = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_ACCESS_PLATFORM)
DEVICE_ID = 42  # a device type number of our own: nothing here is net or blk
CONFIG = bytes(range(0x10, 0x20))

made: list[VendorParent] = []  # every instance the factory built, newest last


class VendorParent(VdpaParent):
    nvqs = 2

    def __init__(self, *, num_max: int = 64, crash_on_config: bool = False) -> None:
        self.num_max = num_max
        self.crash_on_config = crash_on_config
        self.config = bytearray(CONFIG)
        self.maps: dict[int, Iotlb] = {}
        self.kicks = [0, 0]
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.features = 0
        self.suspended = False
        self.ready = [False, False]
        self.base = [0, 0]
        self.cbs: list[VdpaCallback] = [NO_CALLBACK, NO_CALLBACK]

    def set_vq_address(self, index: int, desc_area: int, driver_area: int, device_area: int) -> None:
        pass

    def set_vq_num(self, index: int, num: int) -> None:
        pass

    def kick_vq(self, index: int) -> None:
        self.kicks[index] += 1
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK and self.ready[index] and not self.suspended:
            self.cbs[index]()

    def set_vq_cb(self, index: int, cb: VdpaCallback) -> None:
        self.cbs[index] = cb

    def set_vq_ready(self, index: int, ready: bool) -> None:
        self.ready[index] = ready

    def get_vq_ready(self, index: int) -> bool:
        return self.ready[index]

    def set_vq_state(self, index: int, state: VqState) -> None:
        if not isinstance(state, VqStateSplit):
            raise OSError(errno.EINVAL, "split rings only")
        self.base[index] = state.avail_index

    def get_vq_state(self, index: int) -> VqState:
        return VqStateSplit(self.base[index])

    def get_vq_align(self) -> int:
        return 4096

    def get_vq_num_max(self) -> int:
        return self.num_max

    def get_device_features(self) -> int:
        return OFFERED

    def set_driver_features(self, features: int) -> None:
        if features & ~OFFERED:
            raise OSError(errno.EINVAL, "not offered")
        self.features = features

    def get_driver_features(self) -> int:
        return self.features

    def get_device_id(self) -> int:
        return DEVICE_ID

    def get_vendor_id(self) -> int:
        return 0x1AF4

    def get_status(self) -> int:
        return self.status

    def set_status(self, status: int) -> None:
        self.status = status

    def get_config_size(self) -> int:
        return len(self.config)

    def get_config(self, offset: int, length: int) -> bytes:
        if self.crash_on_config:
            raise RuntimeError("vendor driver bug: config read crashed")
        return bytes(self.config[offset:offset + length])

    def set_config(self, offset: int, data: bytes) -> None:
        self.config[offset:offset + len(data)] = data

    def set_config_cb(self, cb: VdpaCallback) -> None:
        pass

    def set_map(self, asid: int, iotlb: Iotlb) -> None:
        self.maps[asid] = iotlb

    def suspend(self) -> None:
        self.suspended = True

    def resume(self) -> None:
        self.suspended = False


def make_parent(num_max: int = 64, crash_on_config: int = 0) -> VendorParent:
    parent = VendorParent(num_max=num_max, crash_on_config=bool(crash_on_config))
    made.append(parent)
    return parent


NOT_A_FACTORY = 7


def make_nothing() -> object:
    return object()
