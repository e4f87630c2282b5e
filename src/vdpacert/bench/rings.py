"""Driver-side rings for the benchmark: every chain built once, then re-offered each round.

Each slot of the ring owns a fixed chain (its descriptors and buffers never change), so one
round of a benchmark costs the driver almost nothing: a split ring only bumps ``avail->idx``
(the available ring is filled once with heads in slot order, and a device that completes in
order returns them in that order), a packed ring rewrites one flags field per descriptor with
the current wrap counter. What is timed is the device, not this driver.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vdpacert.impl.guestmem import GuestMemory

NEXT, WRITE = 1, 2
AVAIL, USED = 1 << 7, 1 << 15


@dataclass(frozen=True)
class Piece:
    """One descriptor of a chain: ``length`` bytes, device-writable or not."""

    length: int
    writable: bool


class Arena:
    """Bump allocation of guest memory; IOVA == offset (the benchmark maps the region at IOVA 0)."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.top = 0

    def alloc(self, size: int, align: int = 64) -> int:
        offset = (self.top + align - 1) // align * align
        if offset + size > self.memory.size:
            raise MemoryError(f"benchmark guest memory of {self.memory.size} bytes is too small")
        self.top = offset + size
        return offset


class BenchRing:
    """``num // len(pieces)`` fixed chains of ``pieces`` in a split or packed ring of ``num`` entries.

    ``num`` must be a multiple of the chain length, so every chain keeps its slots lap after lap.
    """

    def __init__(self, arena: Arena, num: int, pieces: list[Piece], *, packed: bool) -> None:
        if num % len(pieces):
            raise ValueError(f"a ring of {num} entries does not hold whole chains of {len(pieces)}")
        self.memory = arena.memory
        self.num = num
        self.packed = packed
        self.per_chain = len(pieces)
        self.chains = num // len(pieces)
        self.desc = arena.alloc(16 * num, 16)
        if packed:
            self.driver_area = arena.alloc(4, 4)
            self.device_area = arena.alloc(4, 4)
        else:
            self.driver_area = arena.alloc(6 + 2 * num, 2)
            self.device_area = arena.alloc(6 + 8 * num, 4)
        # (addr, len, flags without AVAIL/USED) of every descriptor, by slot.
        self.layout: list[tuple[int, int, int]] = []
        self.buffers: list[list[int]] = []
        for _chain in range(self.chains):
            addrs = [arena.alloc(piece.length) for piece in pieces]
            self.buffers.append(addrs)
            for k, (piece, addr) in enumerate(zip(pieces, addrs, strict=True)):
                flags = (WRITE if piece.writable else 0) | (NEXT if k < self.per_chain - 1 else 0)
                self.layout.append((addr, piece.length, flags))
        if not packed:
            for slot, (addr, length, flags) in enumerate(self.layout):
                nxt = slot + 1 if flags & NEXT else 0
                self.memory.write(self.desc + 16 * slot, struct.pack("<QIHH", addr, length, flags, nxt))
            heads = b"".join(struct.pack("<H", chain * self.per_chain) for chain in range(self.chains))
            self.memory.write(self.driver_area + 4, (heads * self.per_chain)[: 2 * num])
        self.avail_idx = 0          # split: free-running avail idx
        self.next_chain = 0         # the fixed chain offered next
        self.wrap = 1               # packed: driver wrap counter of slot `next_chain * per_chain`

    @property
    def addresses(self) -> tuple[int, int, int]:
        return self.desc, self.driver_area, self.device_area

    def offer(self, count: int) -> None:
        """Make the next ``count`` chains available."""
        for _ in range(count):
            chain = self.next_chain
            if self.packed:
                self._offer_packed(chain)
            self.next_chain = (chain + 1) % self.chains
            if self.packed and self.next_chain == 0:
                self.wrap ^= 1
        if not self.packed:
            self.avail_idx = (self.avail_idx + count) & 0xFFFF
            self.memory.write_u16(self.driver_area + 2, self.avail_idx)

    def _offer_packed(self, chain: int) -> None:
        # The device overwrote the head with a used descriptor (id, len, flags) last lap, so the
        # whole chain is rewritten; the head last, so the device never sees half a chain.
        mark = AVAIL if self.wrap else USED
        first = chain * self.per_chain
        for slot in reversed(range(first, first + self.per_chain)):
            addr, length, flags = self.layout[slot]
            self.memory.write(self.desc + 16 * slot, struct.pack("<QIHH", addr, length, chain, flags | mark))

    def used_idx(self) -> int:
        """Split: the device's used->idx."""
        return self.memory.read_u16(self.device_area + 2)

    def last_offered_used(self) -> bool:
        """Packed: has the device marked the most recently offered chain used?

        A used descriptor has AVAIL and USED both equal to the wrap counter of its lap (§2.8.1).
        """
        chain = (self.next_chain - 1) % self.chains
        wrap = self.wrap if self.next_chain != 0 else self.wrap ^ 1
        flags = self.memory.read_u16(self.desc + 16 * chain * self.per_chain + 14)
        return bool(flags & AVAIL) == bool(flags & USED) == bool(wrap)
