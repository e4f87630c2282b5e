"""Seeded virtio-net control-queue bugs (virtio v1.3 §5.1.6.5)."""

from __future__ import annotations

from typing import Any

from vdpacert.impl.sim_net import SimNet
from vdpacert.uapi import virtio_net as N  # noqa: N812 - read like the C names

__all__ = ["MqPairsAboveMax"]


class MqPairsAboveMax(SimNet):
    """Bug: VQ_PAIRS_SET is checked against the spec's limit (0x8000) instead of this device's
    max_virtqueue_pairs, so more pairs than exist are acked OK (pairs past the last one stay silent)."""

    def __init__(self, name: str = "sim-net", **kwargs: Any) -> None:
        kwargs.setdefault("max_vq_pairs", 2)  # the bug needs MQ on offer: sim-net offers it from two pairs up
        super().__init__(name, **kwargs)

    def _process_ctrl(self, index: int) -> None:
        own = self.ctrl.max_virtqueue_pairs
        self.ctrl.max_virtqueue_pairs = N.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX
        try:
            super()._process_ctrl(index)
        finally:
            self.ctrl.max_virtqueue_pairs = own

    def _run_pair(self, pair: int) -> None:
        if pair < self.max_vq_pairs:
            super()._run_pair(pair)
