"""A vendor parent with one realistic bug, for ``python:buggy_parent:reset_keeps_status`` targets.

The reference virtio-blk device, except that a reset leaves the status byte as it was: the
firmware clears its queues and features but forgets the status register. A driver that resets
and reads the status back sees its old bits (spec §2.1: after a reset the device reports 0).
"""

from __future__ import annotations

from vdpacert.impl.sim_blk import SimBlk


class ResetKeepsStatus(SimBlk):
    def _reset(self, *, clean_map: bool) -> None:
        kept = self._status
        super()._reset(clean_map=clean_map)
        self._status = kept


def reset_keeps_status() -> ResetKeepsStatus:
    return ResetKeepsStatus("buggy-blk")
