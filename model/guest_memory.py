"""Guest memory as the model sees it, and the address translation every ring access goes through.

A vDPA device never touches guest memory by physical address: it presents an IOVA and the
IOTLB (``VHOST_IOTLB_UPDATE`` entries with a permission of RO, WO or RW) decides where, and
whether, the access lands. The ring models therefore read and write a :class:`ModelMemory`
only through a :class:`Translator`, so a descriptor pointing outside the IOTLB, or a
device-writable buffer mapped read-only, shows up as a typed :class:`AccessFault` value
rather than as a silent success. The vDPA device model plugs its own IOTLB in here; this
module ships an identity translator and a small range table for tests.

Pure data, no I/O: the "memory" is a sparse dict of pages that reads back zeros where
nothing was written, so a 64-bit address space costs nothing until it is used.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Protocol

from .spec import SpecError

ADDRESS_SPACE_END: Final = 1 << 64
PAGE_SIZE: Final = 4096


class Perm(enum.IntFlag):
    """IOTLB access permission, with the values of ``VHOST_ACCESS_RO/WO/RW``."""

    RO = 1
    WO = 2
    RW = 3


class FaultReason(enum.Enum):
    """Why a translation failed: nothing is mapped there, or the mapping forbids the access."""

    UNMAPPED = "no IOTLB entry covers the range"
    PERMISSION = "the IOTLB entry does not allow this access"
    NOT_CONTIGUOUS = "the range crosses IOTLB entries that are not contiguous in memory"


@dataclass(frozen=True)
class AccessFault:
    """A refused access: a value the walkers return, not an exception a device could crash on."""

    iova: int
    length: int
    write: bool
    reason: FaultReason

    def __str__(self) -> str:
        kind = "write" if self.write else "read"
        return f"{kind} of {self.length} bytes at iova {self.iova:#x}: {self.reason.value}"


class Translator(Protocol):
    """Maps ``[iova, iova + length)`` to a model address for a read or a write.

    Returns the :class:`ModelMemory` address of the first byte when the whole range is mapped
    contiguously with the needed permission, else an :class:`AccessFault`. A zero-length
    range touches no byte; translators may still check its start address.
    """

    def translate(self, iova: int, length: int, write: bool) -> int | AccessFault: ...


def _check_range(address: int, length: int) -> None:
    if not 0 <= address < ADDRESS_SPACE_END or length < 0 or address + length > ADDRESS_SPACE_END:
        raise ValueError(f"range {address:#x}+{length:#x} is outside the 64-bit address space")


class ModelMemory:
    """A sparse little-endian byte store covering the whole 64-bit address space.

    Unwritten bytes read as zero (like freshly zeroed guest pages). Bad addresses are a
    :class:`ValueError`: memory itself has no permissions, translators do.
    """

    def __init__(self) -> None:
        self._pages: dict[int, bytearray] = {}

    def read(self, address: int, length: int) -> bytes:
        _check_range(address, length)
        out = bytearray()
        while length:
            page, offset = divmod(address, PAGE_SIZE)
            chunk = min(length, PAGE_SIZE - offset)
            data = self._pages.get(page)
            out += data[offset:offset + chunk] if data is not None else bytes(chunk)
            address += chunk
            length -= chunk
        return bytes(out)

    def write(self, address: int, data: bytes) -> None:
        _check_range(address, len(data))
        view = memoryview(data)
        while view:
            page, offset = divmod(address, PAGE_SIZE)
            chunk = min(len(view), PAGE_SIZE - offset)
            self._pages.setdefault(page, bytearray(PAGE_SIZE))[offset:offset + chunk] = view[:chunk]
            address += chunk
            view = view[chunk:]

    def _read_int(self, address: int, size: int) -> int:
        return int.from_bytes(self.read(address, size), "little")

    def _write_int(self, address: int, size: int, value: int) -> None:
        if not 0 <= value < 1 << (8 * size):
            raise ValueError(f"{value:#x} does not fit in {size} bytes")
        self.write(address, value.to_bytes(size, "little"))

    def read_u16(self, address: int) -> int:
        return self._read_int(address, 2)

    def read_u32(self, address: int) -> int:
        return self._read_int(address, 4)

    def read_u64(self, address: int) -> int:
        return self._read_int(address, 8)

    def write_u16(self, address: int, value: int) -> None:
        self._write_int(address, 2, value)

    def write_u32(self, address: int, value: int) -> None:
        self._write_int(address, 4, value)

    def write_u64(self, address: int, value: int) -> None:
        self._write_int(address, 8, value)


class IdentityTranslator:
    """Every IOVA maps to the same model address with every permission (no IOMMU)."""

    def translate(self, iova: int, length: int, write: bool) -> int | AccessFault:
        if not 0 <= iova < ADDRESS_SPACE_END or iova + length > ADDRESS_SPACE_END:
            return AccessFault(iova, length, write, FaultReason.UNMAPPED)
        return iova


IDENTITY: Final = IdentityTranslator()


@dataclass(frozen=True)
class IotlbEntry:
    """One IOTLB mapping, as a ``VHOST_IOTLB_UPDATE`` describes it: ``size`` bytes at ``iova``."""

    iova: int
    size: int
    addr: int
    perm: Perm

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError("an IOTLB entry covers at least one byte")
        _check_range(self.iova, self.size)
        _check_range(self.addr, self.size)

    @property
    def last(self) -> int:
        return self.iova + self.size - 1


class RangeTranslator:
    """A small IOTLB: a list of non-overlapping entries, each with its own permission.

    A range may cross entries only where they continue each other in both IOVA and model
    address (the model hands out one address per access); everything else is a fault.
    """

    def __init__(self, entries: Iterable[IotlbEntry] = ()) -> None:
        self._entries: list[IotlbEntry] = []
        for entry in entries:
            self.add(entry)

    @property
    def entries(self) -> tuple[IotlbEntry, ...]:
        return tuple(self._entries)

    def add(self, entry: IotlbEntry) -> None:
        for other in self._entries:
            if entry.iova <= other.last and other.iova <= entry.last:
                raise SpecError(f"IOTLB entry at {entry.iova:#x} overlaps the one at {other.iova:#x}")
        self._entries.append(entry)
        self._entries.sort(key=lambda e: e.iova)

    def map(self, iova: int, size: int, addr: int | None = None, perm: Perm = Perm.RW) -> None:
        self.add(IotlbEntry(iova, size, iova if addr is None else addr, perm))

    def _covering(self, iova: int) -> IotlbEntry | None:
        for entry in self._entries:
            if entry.iova <= iova <= entry.last:
                return entry
        return None

    def translate(self, iova: int, length: int, write: bool) -> int | AccessFault:
        needed = Perm.WO if write else Perm.RO
        first = self._covering(iova)
        if first is None:
            return AccessFault(iova, length, write, FaultReason.UNMAPPED)
        if not first.perm & needed:
            return AccessFault(iova, length, write, FaultReason.PERMISSION)
        entry, end = first, iova + length
        while end - 1 > entry.last:
            following = self._covering(entry.last + 1)
            if following is None:
                return AccessFault(iova, length, write, FaultReason.UNMAPPED)
            if not following.perm & needed:
                return AccessFault(iova, length, write, FaultReason.PERMISSION)
            if following.addr != entry.addr + entry.size:
                return AccessFault(iova, length, write, FaultReason.NOT_CONTIGUOUS)
            entry = following
        return first.addr + (iova - first.iova)
