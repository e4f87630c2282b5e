"""Seeded suspend / vring-base bugs (vhost-vdpa SUSPEND, RESUME, GET/SET_VRING_BASE; brief §3 and §5).

These are the bugs that lose or replay work across a live migration: the saved position is
wrong, the restored one is ignored, the device keeps going while "stopped", or a doorbell rung
while stopped is forgotten.
"""

from __future__ import annotations

import errno

from vdpacert.conformance.mutants.guest import BadChain, DmaFault, SplitView
from vdpacert.impl.parent import VqState, VqStatePacked, VqStateSplit
from vdpacert.impl.sim_blk import SimBlk
from vdpacert.uapi.virtio_config import VIRTIO_CONFIG_S_DRIVER_OK

__all__ = ["ResumeLosesKick", "SetVringBaseIgnored", "SuspendKeepsProcessing", "VringBaseDropsWrapCounters",
           "VringBaseFromAvailIdx"]


class VringBaseFromAvailIdx(SimBlk):
    """Bug: while suspended, GET_VRING_BASE reports the avail index the driver published (the doorbell's
    shadow register), not the device's last_avail_idx: chains made available but never taken are lost
    on the destination."""

    def get_vq_state(self, index: int) -> VqState:
        state = super().get_vq_state(index)
        if self.suspended and isinstance(state, VqStateSplit):
            try:
                return VqStateSplit(SplitView(self, index).avail_idx())
            except (DmaFault, BadChain):
                pass
        return state


class SetVringBaseIgnored(SimBlk):
    """Bug: SET_VRING_BASE is answered success (and EBUSY while running) but never reaches the hardware."""

    def set_vq_state(self, index: int, state: VqState) -> None:
        if self.get_status() & VIRTIO_CONFIG_S_DRIVER_OK and not self.suspended:
            raise OSError(errno.EBUSY, "queue state can only be set before DRIVER_OK or while suspended")


class SuspendKeepsProcessing(SimBlk):
    """Bug: suspend() only acknowledges; the queues keep serving kicks while the device reports itself suspended."""

    def suspend(self) -> None:
        return None


class ResumeLosesKick(SimBlk):
    """Bug: resume() only clears the suspended state; kicks that arrived while suspended are not replayed."""

    def resume(self) -> None:
        self._suspended = False


class VringBaseDropsWrapCounters(SimBlk):
    """Bug (packed rings): GET_VRING_BASE reports both wrap counters as 1 (the register has no room for them),
    so after an odd number of laps the saved state is wrong."""

    def get_vq_state(self, index: int) -> VqState:
        state = super().get_vq_state(index)
        if isinstance(state, VqStatePacked):
            return VqStatePacked(state.last_avail_idx, 1, state.last_used_idx, 1)
        return state
