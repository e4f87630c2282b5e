"""The vhost dirty log: which bits a device write must set, and how big the log is.

With VHOST_F_LOG_ALL negotiated and a log installed by VHOST_SET_LOG_BASE, the device marks
every guest page it writes so that a live migration can copy it again. The log is a bitmap
with one bit per VHOST_PAGE_SIZE (4 KiB) page of guest physical memory: page ``p`` is bit
``p % 8`` of the byte at ``log_base + p // 8`` (brief §5; Linux ``drivers/vhost/vhost.c``
log_write). A write of ``length`` bytes at ``addr`` must set the bit of every page holding at
least one of its bytes, and no other.

The page arithmetic lives in :func:`page_span`, written with plain integer operators only, so
that :mod:`vdpacert.model.z3_proofs` can evaluate this very function over 64-bit
bit-vectors and prove it covers exactly the touched pages, including writes of length 0 and
writes that end exactly at 2^64. Guest physical addresses are 64-bit: a write that would
run past 2^64 is bad input and raises :class:`WriteBeyondAddressSpace`.

Public API::

    page_span(addr, length) -> tuple[int, int]      # first page, one past the last page
    pages_touched(addr, length) -> range
    log_bit(page) -> tuple[int, int]                  # (byte offset in the log, bit)
    log_bits(addr, length) -> list[tuple[int, int]]
    log_size_for(memory_bytes) -> int                 # bytes of log covering [0, memory_bytes)
"""

from __future__ import annotations

from typing import Any, Final

from vdpacert.uapi.vhost_types import VHOST_F_LOG_ALL, VHOST_PAGE_SIZE

from . import sections
from .spec import LinuxSource, SpecError

__all__ = [
    "ADDRESS_SPACE",
    "LOG_ALL_FEATURE",
    "LOG_WRITE",
    "VHOST_PAGE_SIZE",
    "DirtyLogError",
    "WriteBeyondAddressSpace",
    "log_bit",
    "log_bits",
    "log_size_for",
    "page_span",
    "pages_touched",
]

#: Guest physical addresses are 64-bit: the last byte a write may touch is 2^64 - 1.
ADDRESS_SPACE: Final = 1 << 64
#: Bits of log per byte of log: page ``p`` lives in byte ``p // 8``.
LOG_BITS_PER_BYTE: Final = 8
#: The feature bit that turns logging on (vhost's own bit in the device feature word).
LOG_ALL_FEATURE: Final = VHOST_F_LOG_ALL

#: Where the page-granular marking is defined (vhost is Linux's interface, not virtio's).
LOG_WRITE: Final[LinuxSource] = sections.vhost_core("log_write")


class DirtyLogError(SpecError, ValueError):
    """Bad input to the dirty-log model: not a non-negative integer, or outside 64-bit memory."""


class WriteBeyondAddressSpace(DirtyLogError):
    """A write whose last byte would lie at or past 2^64: no 64-bit guest address names it."""


def page_span(addr: Any, length: Any) -> tuple[Any, Any]:
    """``(first, end)``: the write touches pages ``first <= page < end``; ``first == end`` if none.

    Plain operators only (no ``range``, ``min`` or ``isinstance``), because the Z3 proof
    evaluates this function on symbolic bit-vectors; :func:`pages_touched` does the type
    checks. ``addr + length == 2^64`` is a valid write that covers the last page.
    """
    if addr < 0 or length < 0:
        raise DirtyLogError(f"address and length are never negative (addr={addr}, length={length})")
    if addr >= ADDRESS_SPACE:
        raise DirtyLogError(f"address {addr} is not a 64-bit guest address [{LOG_WRITE}]")
    if addr + length > ADDRESS_SPACE:
        raise WriteBeyondAddressSpace(
            f"a write of {length} bytes at {addr} runs past the end of 64-bit memory [{LOG_WRITE}]"
        )
    first = addr // VHOST_PAGE_SIZE
    if length == 0:
        return first, first
    last = (addr + length - 1) // VHOST_PAGE_SIZE
    return first, last + 1


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DirtyLogError(f"{name} must be an int, got {type(value).__name__}")
    return value


def pages_touched(addr: int, length: int) -> range:
    """The pages holding at least one byte of the write ``[addr, addr + length)``.

    Empty for ``length == 0``: a zero-length write dirties nothing.
    """
    first, end = page_span(_check_int("addr", addr), _check_int("length", length))
    return range(first, end)


def log_bit(page: int) -> tuple[int, int]:
    """Where page ``page``'s dirty bit lives: ``(byte offset from log_base, bit within the byte)``."""
    page = _check_int("page", page)
    if not 0 <= page < ADDRESS_SPACE // VHOST_PAGE_SIZE:
        raise DirtyLogError(f"page {page} is outside 64-bit guest memory")
    return page // LOG_BITS_PER_BYTE, page % LOG_BITS_PER_BYTE


def log_bits(addr: int, length: int) -> list[tuple[int, int]]:
    """Every ``(byte offset, bit)`` of the log the write must set, lowest page first.

    One entry per page, so the list is as long as :func:`pages_touched`; use that range
    directly for writes spanning many pages.
    """
    return [log_bit(page) for page in pages_touched(addr, length)]


def log_size_for(memory_bytes: int) -> int:
    """Bytes of log needed to cover guest physical memory ``[0, memory_bytes)``.

    One bit per page, rounded up to whole pages and then to whole bytes. Userspace usually
    allocates the log in larger words (QEMU uses 64-bit chunks); this is the minimum a device
    may rely on.
    """
    memory_bytes = _check_int("memory_bytes", memory_bytes)
    _, end = page_span(0, memory_bytes)
    return int((end + LOG_BITS_PER_BYTE - 1) // LOG_BITS_PER_BYTE)
