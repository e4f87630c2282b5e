"""The migration stream: guest pages and the device state, framed so the destination can trust what it applies.

Every message starts with the same 16-byte header, little-endian::

    0   8  magic       b"VDPARAM1" (a chunk of RAM pages) or b"VDPASTM1" (the device-state message)
    8   4  crc32       zlib.crc32 of every byte from offset 12 to the end (the count and the body)
    12  4  count       RAM: the number of page records; state: the length of the blob
    16     body        RAM: ``count`` records of (u64 guest page number, 4096 bytes); state: the blob

A page number is the guest-physical address divided by 4096 (the dirty log's index, brief §5), so the
memory's own ``gpa`` is subtracted to find the bytes; a memory must start on a page boundary, and only
pages it holds whole are addressable.

The destination treats the stream as untrusted: :func:`apply_chunk` checks the magic, the count against
the length, the CRC, and that every page is in range and appears once, *before* it writes anything, so a
bad chunk raises :class:`StreamError` and leaves the memory as it was. CRC32 (not a cryptographic hash):
the threat is a damaged stream, not a forger, and CRC32 catches every error burst of up to 32 bits --
every single-byte corruption -- at zlib's speed.

Speed: a pre-copy pass moves hundreds of MiB, so pages are read in runs (one ``GuestMemory.read`` per run
of consecutive pages), sliced with memoryviews, CRC'd piecewise and joined once; the destination writes
straight from memoryview slices of the chunk. Nothing is copied more than the two times the format needs
(out of guest memory, into the chunk).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vdpacert.impl.guestmem import GuestMemory

__all__ = [
    "HEADER_SIZE",
    "MAX_CHUNK_PAGES",
    "PAGE_SIZE",
    "RAM_MAGIC",
    "RECORD_SIZE",
    "STATE_MAGIC",
    "StreamError",
    "apply_chunk",
    "decode_state",
    "encode_pages",
    "encode_state",
    "ram_stream_size",
]

PAGE_SIZE = 4096
RAM_MAGIC = b"VDPARAM1"
STATE_MAGIC = b"VDPASTM1"
_HEADER = struct.Struct("<8sII")  # magic, crc32, count / length
_CRC_FROM = 12  # the CRC covers the count and the body
HEADER_SIZE = _HEADER.size
_PAGE_NO = struct.Struct("<Q")
RECORD_SIZE = _PAGE_NO.size + PAGE_SIZE
#: The most pages one chunk may carry (256 MiB): a bound on what one message makes the destination hold.
MAX_CHUNK_PAGES = 1 << 16
_MAX_STATE = (1 << 32) - 1


class StreamError(ValueError):
    """A migration-stream message the destination refuses (bad magic, count, length, CRC or page); nothing applied."""


def _page_span(memory: GuestMemory) -> tuple[int, int]:
    """The guest page numbers ``[first, end)`` that ``memory`` holds whole."""
    if memory.gpa % PAGE_SIZE:
        raise ValueError(f"guest memory at gpa {memory.gpa:#x} does not start on a {PAGE_SIZE}-byte page")
    first = memory.gpa // PAGE_SIZE
    return first, first + memory.size // PAGE_SIZE


def ram_stream_size(npages: int, *, chunk_pages: int = 256) -> tuple[int, int]:
    """``(bytes, messages)`` :func:`encode_pages` makes of ``npages`` pages: what a link needs to plan with."""
    _check_chunk_pages(chunk_pages)
    messages = -(-npages // chunk_pages)
    return npages * RECORD_SIZE + messages * HEADER_SIZE, messages


def _check_chunk_pages(chunk_pages: int) -> None:
    if not 1 <= chunk_pages <= MAX_CHUNK_PAGES:
        raise ValueError(f"chunk_pages must be in 1..{MAX_CHUNK_PAGES}, not {chunk_pages}")


def encode_pages(memory: GuestMemory, pages: Sequence[int], *, chunk_pages: int = 256) -> Iterator[bytes]:
    """The chunks carrying ``pages`` (guest page numbers, each once) of ``memory``, in the order given.

    The pages are checked before the first chunk is made (ValueError for a page ``memory`` does not hold
    whole, or one given twice), so a bad request never leaves half a stream behind; the chunks are then
    made lazily, so a large dirty set never sits in memory at once. Each chunk reads the memory when it is
    made: a page written after its chunk was made is not in it (the dirty log says to send it again).
    """
    _check_chunk_pages(chunk_pages)
    first, end = _page_span(memory)
    if pages:
        low, high = min(pages), max(pages)
        if low < first or high >= end:
            bad = low if low < first else high
            raise ValueError(f"page {bad} (gpa {bad * PAGE_SIZE:#x}) is not in guest memory "
                             f"[{first * PAGE_SIZE:#x}, {end * PAGE_SIZE:#x})")
        if len(set(pages)) != len(pages):
            raise ValueError("a page is given more than once")
    return _chunks(memory, pages, first, chunk_pages)


def _chunks(memory: GuestMemory, pages: Sequence[int], first: int, chunk_pages: int) -> Iterator[bytes]:
    for start in range(0, len(pages), chunk_pages):
        batch = pages[start:start + chunk_pages]
        parts: list[bytes | memoryview] = [b"", struct.pack("<I", len(batch))]
        crc = zlib.crc32(parts[1])
        i = 0
        while i < len(batch):
            # One read per run of consecutive pages: a sorted dirty set is mostly runs.
            run = 1
            while i + run < len(batch) and batch[i + run] == batch[i] + run:
                run += 1
            data = memoryview(memory.read((batch[i] - first) * PAGE_SIZE, run * PAGE_SIZE))
            for k in range(run):
                number = _PAGE_NO.pack(batch[i + k])
                page = data[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]
                crc = zlib.crc32(page, zlib.crc32(number, crc))
                parts += (number, page)
            i += run
        parts[0] = RAM_MAGIC + struct.pack("<I", crc)
        yield b"".join(parts)


def _header(message: bytes | bytearray | memoryview, magic: bytes, what: str) -> tuple[memoryview, int]:
    """The message as a byte view and its count, after checking the magic and the CRC."""
    view = memoryview(message).cast("B")
    if len(view) < HEADER_SIZE:
        raise StreamError(f"{what}: {len(view)} bytes is shorter than the {HEADER_SIZE}-byte header")
    got_magic, crc, count = _HEADER.unpack_from(view, 0)
    if got_magic != magic:
        raise StreamError(f"{what}: magic {bytes(got_magic)!r} is not {magic!r}")
    if zlib.crc32(view[_CRC_FROM:]) != crc:
        raise StreamError(f"{what}: CRC32 mismatch (the message was damaged)")
    return view, count


def apply_chunk(memory: GuestMemory, chunk: bytes | bytearray | memoryview) -> int:
    """Write one RAM chunk into ``memory``; returns the pages written. Everything is checked before any write."""
    view, count = _header(chunk, RAM_MAGIC, "RAM chunk")
    if not 1 <= count <= MAX_CHUNK_PAGES:
        raise StreamError(f"RAM chunk: count {count} is not in 1..{MAX_CHUNK_PAGES}")
    if len(view) != HEADER_SIZE + count * RECORD_SIZE:
        raise StreamError(f"RAM chunk: {len(view)} bytes, but {count} records take "
                          f"{HEADER_SIZE + count * RECORD_SIZE}")
    first, end = _page_span(memory)
    offsets = range(HEADER_SIZE, len(view), RECORD_SIZE)
    pages = [_PAGE_NO.unpack_from(view, at)[0] for at in offsets]
    for page in pages:
        if not first <= page < end:
            raise StreamError(f"RAM chunk: page {page} (gpa {page * PAGE_SIZE:#x}) is not in guest memory "
                              f"[{first * PAGE_SIZE:#x}, {end * PAGE_SIZE:#x})")
    if len(set(pages)) != count:
        raise StreamError("RAM chunk: a page appears twice")
    for page, at in zip(pages, offsets, strict=True):
        memory.write((page - first) * PAGE_SIZE, view[at + _PAGE_NO.size:at + RECORD_SIZE])
    return count


def encode_state(blob: bytes | bytearray | memoryview) -> bytes:
    """The device-state message carrying ``blob`` (already serialized, e.g. by migration/blob.py)."""
    body = memoryview(blob).cast("B")
    if len(body) > _MAX_STATE:
        raise ValueError(f"a device state of {len(body)} bytes does not fit the message's u32 length")
    length = struct.pack("<I", len(body))
    crc = zlib.crc32(body, zlib.crc32(length))
    return b"".join((STATE_MAGIC, struct.pack("<I", crc), length, body))


def decode_state(message: bytes | bytearray | memoryview) -> bytes:
    """The blob a device-state message carries; StreamError for a bad magic, length or CRC."""
    view, length = _header(message, STATE_MAGIC, "state message")
    if len(view) != HEADER_SIZE + length:
        raise StreamError(f"state message: {len(view)} bytes, but the header says {HEADER_SIZE + length}")
    return view[HEADER_SIZE:].tobytes()
