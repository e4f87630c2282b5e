"""One IOVA address space: the interval map from device addresses to user addresses.

A vDPA device never sees guest memory directly; userspace tells vhost-vdpa which IOVA ranges
map to which process addresses, and the device translates every ring and buffer address
through that map. :class:`IotlbModel` is one address space as Linux keeps it
(``drivers/vhost/iotlb.c``) with the rules vhost-vdpa adds on top
(``vhost_vdpa_process_iotlb_update``):

- an UPDATE maps ``[iova, iova + size - 1]``; a zero size, a range that wraps past 2^64, or a
  range outside the device's usable IOVA window is refused with EINVAL;
- an UPDATE that overlaps any existing mapping is refused with EEXIST (vhost-vdpa never
  replaces or merges mappings; the caller must INVALIDATE first);
- an INVALIDATE removes every mapping that intersects the range, whole: a mapping that only
  partly overlaps is dropped entirely, never split (``vhost_iotlb_del_range``);
- a translation walks consecutive mappings and stops at the first hole (a miss) or at a
  mapping that lacks the permission asked for.

The virtio specification says nothing about IOTLBs, so every rule here cites Linux. Batching
(BATCH_BEGIN / BATCH_END) concerns when the *parent* hears about updates, not the map itself,
so it lives in :mod:`vdpacert.model.vhost_vdpa`.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from vdpacert.uapi.vhost_types import VHOST_ACCESS_RO, VHOST_ACCESS_RW, VHOST_ACCESS_WO

from . import sections
from .spec import ErrnoRule

U64_MAX: Final = (1 << 64) - 1
VALID_PERMS: Final = frozenset({VHOST_ACCESS_RO, VHOST_ACCESS_WO, VHOST_ACCESS_RW})


_UPDATE = sections.vhost_vdpa("vhost_vdpa_process_iotlb_update")
_DEL_RANGE = sections.vhost_iotlb("vhost_iotlb_del_range")

UPDATE_SIZE_ZERO: Final = ErrnoRule(
    "iotlb.update.size_zero",
    errno.EINVAL,
    sections.vhost_core("vhost_chr_write_iter"),
    "an IOTLB update must map at least one byte",
)
UPDATE_WRAPS: Final = ErrnoRule(
    "iotlb.update.wraps", errno.EINVAL, _UPDATE, "iova + size - 1 must not pass 2^64 - 1"
)
UPDATE_OUTSIDE_RANGE: Final = ErrnoRule(
    "iotlb.update.outside_iova_range",
    errno.EINVAL,
    _UPDATE,
    "the mapped range must lie inside the device's IOVA range",
)
UPDATE_BAD_PERM: Final = ErrnoRule(
    "iotlb.update.perm",
    errno.EINVAL,
    sections.VHOST_TYPES_UAPI,
    "perm must be VHOST_ACCESS_RO, VHOST_ACCESS_WO or VHOST_ACCESS_RW",
)
UPDATE_OVERLAP: Final = ErrnoRule(
    "iotlb.update.overlap",
    errno.EEXIST,
    _UPDATE,
    "an update must not overlap an existing mapping (invalidate it first)",
)
UPDATE_LIMIT: Final = ErrnoRule(
    "iotlb.update.limit",
    errno.ENOSPC,
    sections.vhost_iotlb("vhost_iotlb_add_range_ctx"),
    "the address space already holds as many mappings as the device supports",
)
INVALIDATE_SIZE_ZERO: Final = ErrnoRule(
    "iotlb.invalidate.size_zero", errno.EINVAL, _DEL_RANGE, "an invalidation must cover at least one byte"
)
INVALIDATE_WRAPS: Final = ErrnoRule(
    "iotlb.invalidate.wraps", errno.EINVAL, _DEL_RANGE, "iova + size - 1 must not pass 2^64 - 1"
)

RULES: Final = (
    UPDATE_SIZE_ZERO,
    UPDATE_WRAPS,
    UPDATE_OUTSIDE_RANGE,
    UPDATE_BAD_PERM,
    UPDATE_OVERLAP,
    UPDATE_LIMIT,
    INVALIDATE_SIZE_ZERO,
    INVALIDATE_WRAPS,
)


@dataclass(frozen=True, order=True)
class IotlbMap:
    """One mapping: IOVAs ``start..last`` (inclusive) go to ``uaddr..`` with ``perm``."""

    start: int
    last: int
    uaddr: int
    perm: int

    @property
    def size(self) -> int:
        return self.last - self.start + 1

    def intersects(self, start: int, last: int) -> bool:
        return self.start <= last and start <= self.last


@dataclass(frozen=True)
class AccessFault:
    """Why a translation failed: ``miss`` (no mapping at ``iova``) or ``perm`` (mapping lacks access)."""

    iova: int
    reason: Literal["miss", "perm"]


Segment = tuple[int, int]  # (uaddr, length)


def _check_u64(name: str, value: int) -> None:
    if not 0 <= value <= U64_MAX:
        raise ValueError(f"{name} is a 64-bit unsigned value, got {value}")


class IotlbModel:
    """The mappings of one address space, with vhost-vdpa's update and invalidate rules.

    ``limit`` is the most mappings the address space holds (None: unbounded, as vhost-vdpa's
    own bookkeeping is); ``iova_range`` is the device's usable window ``(first, last)``
    (``get_iova_range``). Mappings are kept sorted by start, so two models with the same
    mappings compare equal.
    """

    def __init__(
        self,
        *,
        limit: int | None = None,
        iova_range: tuple[int, int] = (0, U64_MAX),
        maps: Iterable[IotlbMap] = (),
    ) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"an IOTLB limit is a positive entry count or None, got {limit}")
        first, last = iova_range
        _check_u64("iova_range.first", first)
        _check_u64("iova_range.last", last)
        if first > last:
            raise ValueError(f"empty IOVA range {iova_range}")
        self.limit = limit
        self.iova_range = (first, last)
        self._maps: list[IotlbMap] = sorted(maps)

    # -- inspection ---------------------------------------------------------------------
    @property
    def maps(self) -> tuple[IotlbMap, ...]:
        return tuple(self._maps)

    def __len__(self) -> int:
        return len(self._maps)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IotlbModel):
            return NotImplemented
        return self._maps == other._maps

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"IotlbModel({len(self._maps)} maps, limit={self.limit})"

    def snapshot(self) -> tuple[IotlbMap, ...]:
        return self.maps

    def copy(self) -> IotlbModel:
        return IotlbModel(limit=self.limit, iova_range=self.iova_range, maps=self._maps)

    def overlapping(self, start: int, last: int) -> tuple[IotlbMap, ...]:
        """Every mapping intersecting ``[start, last]`` (``vhost_iotlb_itree_first`` and next)."""
        return tuple(m for m in self._maps if m.intersects(start, last))

    # -- changes ------------------------------------------------------------------------
    def check_update(self, iova: int, size: int, uaddr: int, perm: int, *, check_perm: bool = True) -> IotlbMap:
        """The mapping an UPDATE would add, or the ModelErrno it must fail with (no change).

        ``check_perm=False`` predicts a front with the ``vhost_vdpa.iotlb_perm_unchecked`` quirk.
        """
        for name, value in (("iova", iova), ("size", size), ("uaddr", uaddr)):
            _check_u64(name, value)
        if size == 0:
            raise UPDATE_SIZE_ZERO.fail(f"iova {iova:#x}")
        if iova > U64_MAX - size + 1:
            raise UPDATE_WRAPS.fail(f"iova {iova:#x} size {size:#x}")
        last = iova + size - 1
        first_ok, last_ok = self.iova_range
        if iova < first_ok or last > last_ok:
            raise UPDATE_OUTSIDE_RANGE.fail(f"[{iova:#x}, {last:#x}] vs [{first_ok:#x}, {last_ok:#x}]")
        if check_perm and perm not in VALID_PERMS:
            raise UPDATE_BAD_PERM.fail(f"perm {perm}")
        clash = self.overlapping(iova, last)
        if clash:
            raise UPDATE_OVERLAP.fail(
                f"[{iova:#x}, {last:#x}] overlaps [{clash[0].start:#x}, {clash[0].last:#x}]"
            )
        if self.limit is not None and len(self._maps) >= self.limit:
            raise UPDATE_LIMIT.fail(f"{len(self._maps)} of {self.limit} entries used")
        return IotlbMap(iova, last, uaddr, perm)

    def update(self, iova: int, size: int, uaddr: int, perm: int, *, check_perm: bool = True) -> IotlbMap:
        """Add ``[iova, iova + size - 1] -> uaddr`` with ``perm``; all-or-nothing."""
        new = self.check_update(iova, size, uaddr, perm, check_perm=check_perm)
        self._maps.append(new)
        self._maps.sort()
        return new

    def invalidate(self, iova: int, size: int) -> tuple[IotlbMap, ...]:
        """Remove, whole, every mapping intersecting ``[iova, iova + size - 1]``; return them."""
        _check_u64("iova", iova)
        _check_u64("size", size)
        if size == 0:
            raise INVALIDATE_SIZE_ZERO.fail(f"iova {iova:#x}")
        if iova > U64_MAX - size + 1:
            raise INVALIDATE_WRAPS.fail(f"iova {iova:#x} size {size:#x}")
        gone = self.overlapping(iova, iova + size - 1)
        self._maps = [m for m in self._maps if m not in gone]
        return gone

    def clear(self) -> None:
        self._maps.clear()

    def replace(self, maps: Iterable[IotlbMap]) -> None:
        """Take ``maps`` as the whole content (a parent's ``set_map``); all-or-nothing on the limit."""
        new = sorted(maps)
        if self.limit is not None and len(new) > self.limit:
            raise UPDATE_LIMIT.fail(f"set_map with {len(new)} entries, limit {self.limit}")
        self._maps = new

    # -- translation ----------------------------------------------------------------------
    def translate(self, iova: int, length: int, write: bool) -> tuple[Segment, ...] | AccessFault:
        """The user-address segments covering ``length`` bytes at ``iova``, or why not.

        A device write needs VHOST_ACCESS_WO in the mapping, a read VHOST_ACCESS_RO. The walk
        stops at the first byte with no mapping (``miss``) or without the permission
        (``perm``), reporting that byte's IOVA (as vhost's ``translate_desc`` does).
        """
        _check_u64("iova", iova)
        if length < 0:
            raise ValueError(f"a length is never negative, got {length}")
        if length and iova > U64_MAX - length + 1:
            return AccessFault(U64_MAX, "miss")
        need = VHOST_ACCESS_WO if write else VHOST_ACCESS_RO
        segments: list[Segment] = []
        addr, left = iova, length
        while left:
            hit = next((m for m in self._maps if m.start <= addr <= m.last), None)
            if hit is None:
                return AccessFault(addr, "miss")
            if not hit.perm & need:
                return AccessFault(addr, "perm")
            chunk = min(left, hit.last - addr + 1)
            segments.append((hit.uaddr + (addr - hit.start), chunk))
            addr += chunk
            left -= chunk
        return tuple(segments)
