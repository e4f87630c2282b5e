"""A vendor parent with a real memory leak, for ``python:leaky_parent:leaky_net`` soak targets.

The reference virtio-net device, except that its kick handler keeps a trace record of every kick in
a module-level list nobody ever trims: the memory outlives each device instance (a migration's
fresh destination keeps adding to it), as a leak in a shared driver structure does.
"""

from __future__ import annotations

from vdpacert.impl.sim_net import SimNet

#: Every kick's trace record, never freed.
LEAKED: list[bytes] = []
#: Bytes each kick leaks.
RECORD = 128 << 10


class LeakyNet(SimNet):
    def kick_vq(self, index: int) -> None:
        LEAKED.append(bytes([index & 0xFF]) * RECORD)  # written, so resident
        super().kick_vq(index)


def leaky_net() -> LeakyNet:
    return LeakyNet("leaky-net")
