"""Seeded status and reset bugs (virtio v1.3 §2.1, §3.1): what reset forgets, when the device starts, what sticks."""

from __future__ import annotations

from vdpacert.impl.sim_blk import SimBlk
from vdpacert.uapi.virtio_config import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
)

__all__ = ["ConsumeBeforeDriverOk", "NeedsResetNotSticky", "ResetKeepsVqState"]


class ResetKeepsVqState(SimBlk):
    """Bug: reset disables and forgets the queues but leaves each ring's last_avail_idx where it was, so
    GET_VRING_BASE after a reset reports the old position (and a driver that does not set it starts there)."""

    def reset(self) -> None:
        positions = [self.vq(i).last_avail_idx for i in range(self.nvqs)]
        super().reset()
        self._keep(positions)

    def compat_reset(self, flags: int) -> None:
        positions = [self.vq(i).last_avail_idx for i in range(self.nvqs)]
        super().compat_reset(flags)
        self._keep(positions)

    def _keep(self, positions: list[int]) -> None:
        for index, position in enumerate(positions):
            self.vq(index).set_state(position)  # features are 0 after reset: a split-ring position


class ConsumeBeforeDriverOk(SimBlk):
    """Bug: a kick on an enabled queue is served as soon as FEATURES_OK is set, before DRIVER_OK."""

    def kick_vq(self, index: int) -> None:
        status = self.get_status()
        if status & VIRTIO_CONFIG_S_FEATURES_OK and not status & VIRTIO_CONFIG_S_DRIVER_OK \
                and self.vq_config(index).ready and self._arm(index):
            self.process(index)
            self.finish_queue(index)
            return
        super().kick_vq(index)


class NeedsResetNotSticky(SimBlk):
    """Bug: the device masks DEVICE_NEEDS_RESET out of every status the driver writes (the driver may not set
    it) and stores the result, so the driver's next status write (even one that echoes it) clears it."""

    def set_status(self, status: int) -> None:
        super().set_status(status)
        self._status &= ~VIRTIO_CONFIG_S_NEEDS_RESET
