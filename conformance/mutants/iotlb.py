"""Seeded memory-translation bugs: a device that reaches guest memory userspace never gave it, or kept.

sim-blk and sim-net take their maps whole (``set_map``, the default) or op by op (``dma_map`` / ``dma_unmap``,
with ``batch_mapping=0``) and keep a private
:class:`~vdpacert.impl.iotlb.Iotlb` per address space; each mutant gets one step of that wrong.
"""

from __future__ import annotations

import errno
from typing import Any

from vdpacert.impl.iotlb import ACCESS_RW, Iotlb
from vdpacert.impl.sim_blk import SimBlk
from vdpacert.impl.sim_net import SimNet

__all__ = ["IDENTITY_LIMIT", "AsidIgnored", "IdentityMapKept", "InvalidateIgnored", "PermIgnored"]

#: The identity pass-through covers user space (x86-64: addresses below 2^47).
IDENTITY_LIMIT = 1 << 47


class InvalidateIgnored(SimBlk):
    """Bug: IOTLB INVALIDATE is acknowledged but the device's own map keeps the entries (stale translations)."""

    def dma_unmap(self, asid: int, iova: int, size: int) -> None:
        self._check_asid(asid)

    def set_map(self, asid: int, iotlb: Iotlb) -> None:
        # The whole map arrives again after an invalidation: only what is new is programmed.
        self._check_asid(asid)
        own = self.address_space(asid)
        for start, last, uaddr, perm in iotlb.entries():
            if not any(s <= last and e >= start for s, e, _, _ in own.entries()):
                own.update(start, last - start + 1, uaddr, perm)


class PermIgnored(SimBlk):
    """Bug: every mapping is programmed read-write, whatever permission userspace gave (RO buffers get written)."""

    def dma_map(self, asid: int, iova: int, size: int, uaddr: int, perm: int) -> None:
        super().dma_map(asid, iova, size, uaddr, ACCESS_RW)

    def set_map(self, asid: int, iotlb: Iotlb) -> None:  # the default style (batch_mapping), same bug
        widened = Iotlb()
        for start, last, uaddr, _ in iotlb.entries():
            widened.update(start, last - start + 1, uaddr, ACCESS_RW)
        super().set_map(asid, widened)


def _carve(iotlb: Iotlb, first: int, last: int) -> None:
    """Cut ``[first, last]`` out of the identity entries of ``iotlb`` (entries whose IOVA equals their address)."""
    for start, end, uaddr, _ in iotlb.entries():
        if start == uaddr and start <= last and end >= first:
            iotlb.del_range(start, end)
            if start < first:
                iotlb.update(start, first - start, start, ACCESS_RW)
            if end > last:
                iotlb.update(last + 1, end - last, last + 1, ACCESS_RW)


def _fill_identity(iotlb: Iotlb) -> None:
    """Map every IOVA below :data:`IDENTITY_LIMIT` that nothing maps to the same user address."""
    cursor = 0
    for start, last, _, _ in sorted(iotlb.entries()):
        if start > cursor and cursor < IDENTITY_LIMIT:
            iotlb.update(cursor, min(start, IDENTITY_LIMIT) - cursor, cursor, ACCESS_RW)
        cursor = max(cursor, last + 1)
    if cursor < IDENTITY_LIMIT:
        iotlb.update(cursor, IDENTITY_LIMIT - cursor, cursor, ACCESS_RW)


class IdentityMapKept(SimBlk):
    """Bug: like vdpa_sim, the device starts with an identity pass-through map (IOVA = user address), but it
    never drops it when userspace installs its own: userspace's ranges are carved out of it and every hole
    falls back to it, so any IOVA that happens to be a user address of the process is reachable."""

    def __init__(self, name: str = "sim-blk", **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self._identity_everywhere()

    def _identity_everywhere(self) -> None:
        for asid in range(self.nas):
            _fill_identity(self.address_space(asid))

    def dma_map(self, asid: int, iova: int, size: int, uaddr: int, perm: int) -> None:
        self._check_asid(asid)
        if size:
            _carve(self.address_space(asid), iova, iova + size - 1)
        super().dma_map(asid, iova, size, uaddr, perm)

    def dma_unmap(self, asid: int, iova: int, size: int) -> None:
        super().dma_unmap(asid, iova, size)
        _fill_identity(self.address_space(asid))

    def set_map(self, asid: int, iotlb: Iotlb) -> None:
        super().set_map(asid, iotlb)
        _fill_identity(self.address_space(asid))

    def reset_map(self, asid: int) -> None:
        super().reset_map(asid)
        _fill_identity(self.address_space(asid))

    def compat_reset(self, flags: int) -> None:
        super().compat_reset(flags)
        self._identity_everywhere()


class AsidIgnored(SimNet):
    """Bug: SET_GROUP_ASID is validated and acknowledged, but every group keeps translating through address
    space 0 (the control queue cannot be given its own ASID, as QEMU's shadow control queue needs)."""

    def set_group_asid(self, group: int, asid: int) -> None:
        if not 0 <= group < self.ngroups:
            raise OSError(errno.EINVAL, f"group {group} does not exist ({self.ngroups})")
        self._check_asid(asid)
