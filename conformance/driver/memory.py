"""Guest memory as the driver lays it out for one test device: allocation, three address spaces, canaries.

One :class:`GuestLayout` wraps one :class:`~vdpacert.impl.guestmem.GuestMemory` (the target hands it
out, or a unit test makes one). Everything in it is reachable three ways: by the device through
the IOTLB (the *IOVA*, what rings and descriptors carry), by the guest-physical address (*gpa*,
what the dirty log is indexed by) and by the process's user address (*uaddr*, what an IOTLB
UPDATE maps to). :class:`GuestLayout` picks an IOVA base that overlaps neither of the others, so
a device that mixes them up touches the wrong bytes and gets caught.

Canaries: the whole region starts filled with :data:`CANARY`, and freed ranges are refilled.
The device may write only where the spec lets it (virtio v1.3 §2.7.8.2: device-writable
buffers of chains it was given, the used ring, used idx/flags, avail_event; for packed rings
the used descriptors and the device event suppression area). Rings declare those *windows*
with :meth:`GuestLayout.allow` and withdraw them with :meth:`GuestLayout.forbid`.
:meth:`GuestLayout.snapshot` records the memory; every later *driver* write made through the
layout is applied to the snapshot too, so :meth:`GuestLayout.diff` lists exactly the bytes
someone else (the device) changed outside every window open at any time since the snapshot.
Writes made directly on :attr:`GuestLayout.memory` bypass that bookkeeping on purpose: that is
how a test plays a misbehaving device.
"""

from __future__ import annotations

import bisect
import struct
import weakref
from dataclasses import dataclass

from vdpacert.conformance.driver import DeviceViolation
from vdpacert.impl.guestmem import GuestMemory

CANARY = 0xA5
PAGE = 4096
#: Candidate IOVA bases, tried in order: the first that overlaps neither the gpa nor the uaddr range wins.
IOVA_CANDIDATES = (0x4000_0000, 0x10_0000_0000, 0x7A00_0000_0000, 0xFFFF_0000_0000)
#: The catalog rule a write outside the windows breaks.
WRITES_ONLY_GIVEN_MEMORY = "ring.device.writes_only_given_memory"
_U16, _U32, _U64 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")
_SHOWN = 16  # bytes of before/after kept in a Change


def _overlaps(a: int, a_len: int, b: int, b_len: int) -> bool:
    return a < b + b_len and b < a + a_len


def changed_runs(before: bytes | bytearray | memoryview, now: bytes | bytearray | memoryview
                 ) -> dict[int, list[tuple[int, int]]]:
    """For every 4 KiB page whose bytes differ, the runs ``(start, end)`` of changed byte offsets.

    Pages are compared whole first, so an unchanged page costs one comparison, not 4096.
    """
    view_before, view_now = memoryview(before), memoryview(now)
    out: dict[int, list[tuple[int, int]]] = {}
    for page in range(0, len(view_now), PAGE):
        end = min(page + PAGE, len(view_now))
        if view_now[page:end] == view_before[page:end]:
            continue
        runs: list[tuple[int, int]] = []
        for offset in range(page, end):
            if view_now[offset] != view_before[offset]:
                if runs and runs[-1][1] == offset:
                    runs[-1] = (runs[-1][0], offset + 1)
                else:
                    runs.append((offset, offset + 1))
        out[page // PAGE] = runs
    return out


@dataclass(frozen=True)
class Region:
    """A byte range of the layout, by offset, with what it holds."""

    offset: int
    length: int
    what: str

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class Change:
    """A run of bytes changed outside every device-writable window: where, in which allocation, what."""

    offset: int
    length: int
    iova: int
    gpa: int
    owner: str  # the allocation the run starts in, or "unallocated"
    before: bytes  # the first bytes of the run as the driver left them
    after: bytes  # ... and as they are now

    def __str__(self) -> str:
        return (f"{self.length} byte(s) at offset {self.offset:#x} (iova {self.iova:#x}, gpa {self.gpa:#x}, "
                f"in {self.owner}): {self.before.hex()} -> {self.after.hex()}")


class Snapshot:
    """The memory as of :meth:`GuestLayout.snapshot`, kept in step with later driver writes."""

    __slots__ = ("__weakref__", "data", "epoch")

    def __init__(self, data: bytearray, epoch: int) -> None:
        self.data = data
        self.epoch = epoch


@dataclass
class _Window:
    region: Region
    removed: int | None = None  # the epoch it was withdrawn in; None while open


class GuestLayout:
    """The driver's view of one guest-memory region: allocator, addresses, canaries, device windows."""

    def __init__(self, memory: GuestMemory, *, iova_base: int | None = None, canary: int = CANARY,
                 fill: bool = True, refill: bool = True) -> None:
        self.memory = memory
        #: Whether freed allocations are filled with the canary again. A migration's guest turns it off:
        #: a real driver does not rewrite buffers it got back, and a rewrite would hide a device write that
        #: was never logged (the driver's own write marks the page dirty).
        self.refill = refill
        self.size = memory.size
        self.canary = canary
        self.iova_base = self._pick_iova(iova_base)
        self._holes: list[tuple[int, int]] = [(0, self.size)]  # free [start, end), sorted, never adjacent
        self._allocations: dict[int, tuple[int, str]] = {}  # offset -> (size, what)
        self._starts: list[int] = []  # sorted allocation offsets, to name the owner of a change
        self._windows: dict[int, _Window] = {}
        self._next_window = 0
        self._epoch = 0
        self._snapshots: weakref.WeakSet[Snapshot] = weakref.WeakSet()
        if fill:
            memory.fill(0, self.size, canary)

    def _pick_iova(self, wanted: int | None) -> int:
        taken = ((self.memory.gpa, self.size), (self.memory.uaddr, self.size))
        for base in (wanted,) if wanted is not None else IOVA_CANDIDATES:
            if base % PAGE == 0 and not any(_overlaps(base, self.size, start, n) for start, n in taken):
                return base
        raise ValueError(f"no page-aligned IOVA base clear of gpa {self.memory.gpa:#x} and uaddr "
                         f"{self.memory.uaddr:#x} (asked for {wanted!r})")

    # ----- addresses -------------------------------------------------------------------------------

    @property
    def gpa_base(self) -> int:
        return self.memory.gpa

    @property
    def uaddr_base(self) -> int:
        return self.memory.uaddr

    def iova(self, offset: int) -> int:
        return self.iova_base + offset

    def gpa(self, offset: int) -> int:
        return self.memory.gpa + offset

    def uaddr(self, offset: int) -> int:
        return self.memory.uaddr + offset

    def offset_of_iova(self, iova: int) -> int:
        offset = iova - self.iova_base
        if not 0 <= offset < self.size:
            raise ValueError(f"iova {iova:#x} is outside this layout")
        return offset

    # ----- allocation ------------------------------------------------------------------------------

    def alloc(self, size: int, align: int = 16, *, what: str = "", fill: int | None = None) -> int:
        """Offset of ``size`` fresh bytes aligned to ``align`` (canary-filled unless ``fill`` says a byte)."""
        if align <= 0 or align & (align - 1):
            raise ValueError(f"alignment must be a power of 2, got {align}")
        size = max(size, 1)  # every allocation has its own offset
        for index, (start, end) in enumerate(self._holes):
            offset = (start + align - 1) & -align
            if offset + size <= end:
                pieces = [(s, e) for s, e in ((start, offset), (offset + size, end)) if e > s]
                self._holes[index:index + 1] = pieces
                self._allocations[offset] = (size, what or f"alloc@{offset:#x}")
                bisect.insort(self._starts, offset)
                if fill is not None:
                    self.fill(offset, size, fill)
                return offset
        raise MemoryError(f"guest memory exhausted: no {size} bytes aligned to {align} for {what or 'alloc'}")

    def free(self, offset: int) -> None:
        """Give an allocation back; its bytes become canary again (unless :attr:`refill` is off)."""
        size, _ = self._allocations.pop(offset)
        self._starts.pop(bisect.bisect_left(self._starts, offset))
        if self.refill:
            self.fill(offset, size, self.canary)
        start, end = offset, offset + size
        index = bisect.bisect_left(self._holes, (start, end))
        if index < len(self._holes) and self._holes[index][0] == end:
            end = self._holes.pop(index)[1]
        if index > 0 and self._holes[index - 1][1] == start:
            index -= 1
            start = self._holes.pop(index)[0]
        self._holes.insert(index, (start, end))

    def owner(self, offset: int) -> str:
        """The name of the allocation holding ``offset`` ("unallocated" if none)."""
        index = bisect.bisect_right(self._starts, offset) - 1
        if index >= 0:
            start = self._starts[index]
            size, what = self._allocations[start]
            if offset < start + size:
                return what
        return "unallocated"

    @property
    def free_bytes(self) -> int:
        return sum(end - start for start, end in self._holes)

    # ----- driver writes (kept in step with every live snapshot) ----------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raw = bytes(data)
        self.memory.write(offset, raw)
        for snapshot in self._snapshots:
            snapshot.data[offset:offset + len(raw)] = raw

    def fill(self, offset: int, length: int, value: int) -> None:
        self.memory.fill(offset, length, value)
        for snapshot in self._snapshots:
            snapshot.data[offset:offset + length] = bytes([value]) * length

    def write_u16(self, offset: int, value: int) -> None:
        self.write(offset, _U16.pack(value & 0xFFFF))

    def write_u32(self, offset: int, value: int) -> None:
        self.write(offset, _U32.pack(value & 0xFFFF_FFFF))

    def write_u64(self, offset: int, value: int) -> None:
        self.write(offset, _U64.pack(value))

    def read(self, offset: int, length: int) -> bytes:
        return self.memory.read(offset, length)

    def read_u16(self, offset: int) -> int:
        return self.memory.read_u16(offset)

    def read_u32(self, offset: int) -> int:
        return self.memory.read_u32(offset)

    # ----- device-writable windows and the canary check ------------------------------------------

    def allow(self, offset: int, length: int, what: str) -> int:
        """Open a window the device may write; a handle for :meth:`forbid`."""
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"window {what} [{offset:#x}, +{length:#x}) is outside the layout")
        handle = self._next_window
        self._next_window += 1
        self._windows[handle] = _Window(Region(offset, length, what))
        return handle

    def forbid(self, handle: int) -> None:
        """Close a window. Snapshots taken while it was open still accept the device's writes there."""
        window = self._windows.get(handle)
        if window is None or window.removed is not None:
            return
        if not self._snapshots:
            del self._windows[handle]
        else:
            window.removed = self._epoch

    def windows(self, snapshot: Snapshot | None = None) -> list[Region]:
        """The windows open now, or (with ``snapshot``) open at any time since it was taken."""
        return sorted((w.region for w in self._windows.values()
                       if w.removed is None or (snapshot is not None and w.removed >= snapshot.epoch)),
                      key=lambda r: r.offset)

    def snapshot(self) -> Snapshot:
        self._epoch += 1
        snap = Snapshot(bytearray(self.memory.read(0, self.size)), self._epoch)
        self._snapshots.add(snap)
        oldest = min(s.epoch for s in self._snapshots)
        for handle in [h for h, w in self._windows.items() if w.removed is not None and w.removed < oldest]:
            del self._windows[handle]
        return snap

    def diff(self, snapshot: Snapshot) -> list[Change]:
        """Every run of bytes changed since ``snapshot`` outside the windows open since then."""
        now = bytearray(self.memory.read(0, self.size))
        before = snapshot.data
        for region in self.windows(snapshot):
            now[region.offset:region.end] = before[region.offset:region.end]
        if now == before:
            return []
        runs: list[tuple[int, int]] = []
        for page_runs in changed_runs(before, now).values():
            for start, end in page_runs:
                if runs and runs[-1][1] == start:  # a run that crosses a page boundary stays one change
                    runs[-1] = (runs[-1][0], end)
                else:
                    runs.append((start, end))
        return [Change(start, end - start, self.iova(start), self.gpa(start), self.owner(start),
                       bytes(before[start:min(end, start + _SHOWN)]), bytes(now[start:min(end, start + _SHOWN)]))
                for start, end in runs]

    def check(self, snapshot: Snapshot) -> None:
        """DeviceViolation(ring.device.writes_only_given_memory) if :meth:`diff` finds anything."""
        changes = self.diff(snapshot)
        if changes:
            shown = "; ".join(str(c) for c in changes[:8])
            more = f" (and {len(changes) - 8} more)" if len(changes) > 8 else ""
            raise DeviceViolation(WRITES_ONLY_GIVEN_MEMORY,
                                  f"the device wrote memory it was not given: {shown}{more}")
