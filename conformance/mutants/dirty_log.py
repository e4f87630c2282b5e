"""Seeded dirty-log bugs (brief §5: what vhost logs while VHOST_F_LOG_ALL is negotiated).

A migration that trusts one of these devices copies a page too early and never again: the
destination sees a stale used ring (chains replayed or lost) or stale buffer contents.
"""

from __future__ import annotations

from vdpacert.conformance.mutants.guest import BadChain, DmaFault, SplitView, logging_on
from vdpacert.impl.sim_blk import SimBlk

__all__ = ["LogMissesBufferWrites", "LogMissesUsedRing"]


class LogMissesUsedRing(SimBlk):
    """Bug: VHOST_VRING_F_LOG from SET_VRING_ADDR is dropped: buffer writes are logged, used-ring writes never."""

    def set_vq_log(self, index: int, log_used: bool, log_guest_addr: int) -> None:
        super().set_vq_log(index, False, log_guest_addr)


class LogMissesBufferWrites(SimBlk):
    """Bug: the device logs only what its firmware writes to the used ring (split rings), not the data its DMA
    engine puts into device-writable buffers."""

    def _apply_log(self, index: int) -> None:
        self.vq(index).set_log(None)  # the DMA engine has no logging hook

    def process(self, index: int) -> None:
        cfg, vq = self.vq_config(index), self.vq(index)
        if vq.packed or not cfg.log_used or not logging_on(self):
            super().process(index)
            return
        try:
            view = SplitView(self, index)
            before = view.used_idx()
        except (DmaFault, BadChain):
            super().process(index)
            return
        super().process(index)
        log = self.dirty_log
        try:
            after = view.used_idx()
        except (DmaFault, BadChain):
            return
        if log is None or after == before:
            return
        for k in range((after - before) & 0xFFFF):
            log.mark_range(cfg.log_guest_addr + 4 + 8 * ((before + k) % cfg.num), 8)
        log.mark_range(cfg.log_guest_addr + 2, 2)
        log.signal()
