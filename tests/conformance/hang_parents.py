"""Vendor parents that would wedge or crash a naive suite, for ``python:hang_parents:FACTORY`` targets.

Each is the reference virtio-net device with one failure a real device shows: firmware that takes
kicks and never answers (``swallows_kicks``), a kick handler that raises while the control path
lives on (``crashes_on_kick``), firmware gone (EIO) after its first kick (``dies_on_kick``), and an
interrupt line that is not wired: buffers are used, the call eventfd never fires (``never_signals``), and
firmware that never returns from a kick (``blocks_forever``: no timeout of the suite's covers it, the
machine's deadline does).
``test_never_hangs`` certifies them and holds the suite to reporting each by clause, in bounded time.
"""

from __future__ import annotations

import threading

from vdpacert.impl.parent import VdpaCallback
from vdpacert.impl.sim_net import SimNet


class SwallowsKicks(SimNet):
    """Takes every kick and does nothing with it: no buffer is ever used."""

    def kick_vq(self, index: int) -> None:
        return None


class CrashesOnKick(SimNet):
    """A bug in the kick handler: every datapath kick raises; the control path still answers."""

    def kick_vq(self, index: int) -> None:
        raise RuntimeError(f"firmware assertion on queue {index}")


class DiesOnKick(SimNet):
    """The firmware crashes on the first datapath kick: the parent raises, and stays dead (EIO) after."""

    dead = False

    def kick_vq(self, index: int) -> None:
        self.dead = True
        raise RuntimeError(f"firmware assertion on queue {index}: device lost")

    def get_status(self) -> int:
        if self.dead:
            raise OSError(5, "device lost")  # EIO: the bus says the function is gone
        return super().get_status()

    def get_device_id(self) -> int:
        if self.dead:
            raise OSError(5, "device lost")
        return super().get_device_id()


class NeverSignals(SimNet):
    """Uses buffers, but no used-buffer notification ever reaches the call eventfd."""

    def signal_callback(self, cb: VdpaCallback) -> None:  # type: ignore[override]
        return None


class BlocksForever(SimNet):
    """A kick never returns: the firmware's doorbell handler waits on something that never happens."""

    def kick_vq(self, index: int) -> None:
        threading.Event().wait()


def blocks_forever() -> BlocksForever:
    return BlocksForever("blocks-forever")


def swallows_kicks() -> SwallowsKicks:
    return SwallowsKicks("swallows-kicks")


def crashes_on_kick() -> CrashesOnKick:
    return CrashesOnKick("crashes-on-kick")


def dies_on_kick() -> DiesOnKick:
    return DiesOnKick("dies-on-kick")


def never_signals() -> NeverSignals:
    return NeverSignals("never-signals")
