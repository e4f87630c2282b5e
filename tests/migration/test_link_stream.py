"""The simulated link and the RAM / device-state stream: timing, real copies, faults, and an untrusting receiver.

The stream tests move guest memory between two real reference targets (the memory each hands out
is what its device reaches), including memory a sim-net device has just written by looping frames
back, and check byte equality. Every damaged chunk must be refused with nothing written: the
destination is compared with a snapshot taken before the damaged chunk was offered.
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdpacert.conformance.driver.device import DriverSession, net_queues
from vdpacert.conformance.driver.memory import GuestLayout
from vdpacert.conformance.driver.traffic import NetStream
from vdpacert.conformance.targets import Target, make_target
from vdpacert.impl.guestmem import GuestMemory
from vdpacert.migration.link import Link, LinkDropped, SimClock
from vdpacert.migration.stream import (
    HEADER_SIZE,
    PAGE_SIZE,
    RECORD_SIZE,
    StreamError,
    apply_chunk,
    decode_state,
    encode_pages,
    encode_state,
    ram_stream_size,
)
from vdpacert.uapi import virtio_net as N  # noqa: N812
from vdpacert.uapi.virtio_config import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1

MIB = 1 << 20
GPA = 0x1_0000_0000  # guest memory well above 0, so the gpa offset is exercised
SIZE = 2 * MIB
FIRST = GPA // PAGE_SIZE
NPAGES = SIZE // PAGE_SIZE


@pytest.fixture(scope="module")
def targets() -> Iterator[tuple[Target, Target]]:
    source, destination = make_target("sim-net"), make_target("sim-net")
    yield source, destination
    source.close()
    destination.close()


@pytest.fixture
def memories(targets: tuple[Target, Target]) -> tuple[GuestMemory, GuestMemory]:
    """A source memory with distinct content on every page and a zeroed destination at the same gpa."""
    source, destination = targets
    src, dst = source.new_memory(SIZE, gpa=GPA), destination.new_memory(SIZE, gpa=GPA)
    rng = random.Random(7)
    src.write(0, rng.randbytes(SIZE))
    return src, dst


def pages_equal(a: GuestMemory, b: GuestMemory, pages: list[int]) -> bool:
    return all(a.read((p - FIRST) * PAGE_SIZE, PAGE_SIZE) == b.read((p - FIRST) * PAGE_SIZE, PAGE_SIZE) for p in pages)


# ----- the clock and the link -----------------------------------------------------------------------------


def test_clock_moves_only_forward() -> None:
    clock = SimClock()
    clock.advance(0.25)
    clock.advance(0)
    assert clock.now == 0.25
    for bad in (-1e-9, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            clock.advance(bad)
    assert clock.now == 0.25


def test_send_takes_serialization_time_plus_latency_once_per_message() -> None:
    clock = SimClock()
    link = Link(clock, bandwidth_bytes_s=MIB, latency_s=0.002)
    payload = bytes(range(256)) * 4096  # 1 MiB
    got = link.send(payload)
    assert clock.now == pytest.approx(1.0 + 0.002)
    link.send(b"x" * 1024)
    assert clock.now == pytest.approx(1.002 + 1024 / MIB + 0.002)
    assert (link.messages, link.bytes_sent) == (2, MIB + 1024)
    assert got == payload and got is not payload  # the receiver holds its own copy
    assert link.transfer_time(MIB + 1024, messages=2) == pytest.approx(clock.now)


def test_delivered_bytes_do_not_follow_later_changes_of_the_senders_buffer() -> None:
    link = Link(SimClock(), 1e9, 0)
    buffer = bytearray(b"abcdef")
    got = link.send(memoryview(buffer))
    buffer[0] = ord("Z")
    assert got == b"abcdef"


def test_a_dropped_link_delivers_nothing_and_takes_no_time() -> None:
    clock = SimClock()
    link = Link(clock, 1000.0, 0.01)
    link.send(b"a" * 10)
    before = clock.now
    link.drop()
    with pytest.raises(LinkDropped):
        link.send(b"b" * 10)
    assert link.dropped and clock.now == before and (link.messages, link.bytes_sent) == (1, 10)


def test_corrupt_next_flips_exactly_one_byte_of_exactly_one_message() -> None:
    link = Link(SimClock(), 1e9, 0)
    link.corrupt_next(3)
    assert link.send(b"") == b""  # nothing to corrupt: stays armed
    first = link.send(b"\x00" * 8)
    assert first == b"\x00\x00\x00\xff\x00\x00\x00\x00"
    assert link.send(b"\x00" * 8) == b"\x00" * 8
    link.corrupt_next()  # no offset: the middle byte
    assert link.send(b"\x01\x02\x03") == b"\x01\xfd\x03"
    link.corrupt_next(10)  # modulo the length
    assert link.send(b"\x00\x00\x00") == b"\x00\xff\x00"
    assert link.corrupted == 3
    with pytest.raises(ValueError):
        link.corrupt_next(-1)


@pytest.mark.parametrize(("bandwidth", "latency"), [(0, 0), (-1, 0), (float("inf"), 0), (1, -1), (1, float("nan"))])
def test_link_refuses_impossible_parameters(bandwidth: float, latency: float) -> None:
    with pytest.raises(ValueError):
        Link(SimClock(), bandwidth, latency)


# ----- the RAM stream ----------------------------------------------------------------------------------------


def test_pages_cross_the_link_byte_equal(memories: tuple[GuestMemory, GuestMemory]) -> None:
    src, dst = memories
    rng = random.Random(1)
    pages = rng.sample(range(FIRST, FIRST + NPAGES), 300) + list(range(FIRST + 10, FIRST + 40))
    pages = list(dict.fromkeys(pages))  # runs and scattered pages, no repeats, unsorted
    clock = SimClock()
    link = Link(clock, bandwidth_bytes_s=100 * MIB, latency_s=0.001)
    chunks = list(encode_pages(src, pages, chunk_pages=64))
    written = sum(apply_chunk(dst, link.send(chunk)) for chunk in chunks)
    assert written == len(pages)
    assert pages_equal(src, dst, pages)
    untouched = sorted(set(range(FIRST, FIRST + NPAGES)) - set(pages))
    assert all(dst.read((p - FIRST) * PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE) for p in untouched[:50])
    nbytes, messages = ram_stream_size(len(pages), chunk_pages=64)
    assert (link.bytes_sent, link.messages, len(chunks)) == (nbytes, messages, messages)
    assert clock.now == pytest.approx(link.transfer_time(nbytes, messages))


def test_whole_memory_with_edge_pages(memories: tuple[GuestMemory, GuestMemory]) -> None:
    src, dst = memories
    for chunk in encode_pages(src, range(FIRST, FIRST + NPAGES)):
        apply_chunk(dst, chunk)
    assert src.read(0, SIZE) == dst.read(0, SIZE)


def test_no_pages_make_no_chunks(memories: tuple[GuestMemory, GuestMemory]) -> None:
    assert list(encode_pages(memories[0], [])) == []
    assert ram_stream_size(0) == (0, 0)


@pytest.mark.parametrize("pages", [[FIRST - 1], [FIRST + NPAGES], [FIRST, FIRST + 1, FIRST], [0]])
def test_encode_refuses_pages_outside_memory_or_repeated_before_any_chunk(
        memories: tuple[GuestMemory, GuestMemory], pages: list[int]) -> None:
    with pytest.raises(ValueError, match="page"):
        encode_pages(memories[0], pages)


def test_encode_refuses_a_chunk_size_out_of_range(memories: tuple[GuestMemory, GuestMemory]) -> None:
    for bad in (0, 1 << 17):
        with pytest.raises(ValueError, match="chunk_pages"):
            encode_pages(memories[0], [FIRST], chunk_pages=bad)


@settings(max_examples=60)
@given(data=st.data())
def test_every_single_byte_corruption_is_refused_with_nothing_written(
        targets: tuple[Target, Target], data: st.DataObject) -> None:
    source, destination = targets
    src, dst = source.new_memory(64 * PAGE_SIZE, gpa=GPA), destination.new_memory(64 * PAGE_SIZE, gpa=GPA)
    try:
        src.write(0, random.Random(3).randbytes(64 * PAGE_SIZE))
        pages = data.draw(st.lists(st.integers(FIRST, FIRST + 63), min_size=1, max_size=8, unique=True))
        (chunk,) = encode_pages(src, pages, chunk_pages=8)
        link = Link(SimClock(), 1e9, 0)
        link.corrupt_next(data.draw(st.integers(0, len(chunk) - 1)))
        damaged = link.send(chunk)
        with pytest.raises(StreamError):
            apply_chunk(dst, damaged)
        assert dst.read(0, 64 * PAGE_SIZE) == bytes(64 * PAGE_SIZE)
    finally:
        src.close()
        dst.close()


def forge(records: list[tuple[int, bytes]], *, count: int | None = None) -> bytes:
    """A chunk with a valid CRC around whatever records it is given: what only the range checks can catch."""
    body = struct.pack("<I", len(records) if count is None else count)
    body += b"".join(struct.pack("<Q", page) + data for page, data in records)
    return b"VDPARAM1" + struct.pack("<I", zlib.crc32(body)) + body


@pytest.mark.parametrize(("records", "count", "why"), [
    ([(FIRST, b"\x11" * PAGE_SIZE), (FIRST + NPAGES, b"\x22" * PAGE_SIZE)], None, "not in guest memory"),
    ([(FIRST, b"\x11" * PAGE_SIZE), (FIRST - 1, b"\x22" * PAGE_SIZE)], None, "not in guest memory"),
    ([(FIRST + 1, b"\x11" * PAGE_SIZE), (FIRST + 1, b"\x22" * PAGE_SIZE)], None, "twice"),
    ([(FIRST, b"\x11" * PAGE_SIZE)], 2, "records take"),
    ([], 0, "count 0"),
    ([(FIRST, b"\x11" * 100)], None, "records take"),
])
def test_well_formed_but_wrong_chunks_are_refused_with_nothing_written(
        memories: tuple[GuestMemory, GuestMemory], records: list[tuple[int, bytes]], count: int | None,
        why: str) -> None:
    _, dst = memories
    with pytest.raises(StreamError, match=why):
        apply_chunk(dst, forge(records, count=count))
    assert dst.read(0, 2 * PAGE_SIZE) == bytes(2 * PAGE_SIZE)


def test_truncated_and_foreign_messages_are_refused(memories: tuple[GuestMemory, GuestMemory]) -> None:
    src, dst = memories
    (chunk,) = encode_pages(src, [FIRST, FIRST + 1])
    for bad in (chunk[:HEADER_SIZE - 1], chunk[:-1], chunk + b"\x00", encode_state(b"{}"), b""):
        with pytest.raises(StreamError):
            apply_chunk(dst, bad)
    assert len(chunk) == HEADER_SIZE + 2 * RECORD_SIZE
    assert dst.read(0, 2 * PAGE_SIZE) == bytes(2 * PAGE_SIZE)


def test_memory_not_on_a_page_boundary_is_refused(targets: tuple[Target, Target]) -> None:
    memory = targets[0].new_memory(4 * PAGE_SIZE, gpa=GPA + 512)
    with pytest.raises(ValueError, match="page"):
        encode_pages(memory, [FIRST])
    memory.close()


# ----- the device-state message ------------------------------------------------------------------------------


def test_state_message_round_trip_and_every_corruption_refused() -> None:
    blob = b'{"version": 1, "vrings": []}' * 3
    message = encode_state(blob)
    assert decode_state(message) == blob
    assert decode_state(encode_state(b"")) == b""
    link = Link(SimClock(), 1e9, 0)
    for at in range(len(message)):
        link.corrupt_next(at)
        with pytest.raises(StreamError):
            decode_state(link.send(message))
    for bad in (message[:-1], message + b"!", message[:10], forge([(FIRST, bytes(PAGE_SIZE))])):
        with pytest.raises(StreamError):
            decode_state(bad)


# ----- memory a real device wrote --------------------------------------------------------------------------


def test_memory_written_by_a_device_migrates_byte_equal() -> None:
    """sim-net loops frames back into RX buffers; every page of its guest memory then crosses the stream."""
    with make_target("sim-net") as source, make_target("sim-net") as destination:
        memory = source.new_memory(SIZE, gpa=GPA)
        features = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_ACCESS_PLATFORM) | (1 << N.VIRTIO_NET_F_MAC)
        session = DriverSession(source.client, GuestLayout(memory), features, queues=net_queues(features),
                                num=64, service=source.service).bring_up()
        stream = NetStream()
        session.post_rx(0, 32)
        session.send_frames(0, stream.frames(32, 300))
        for frame in session.receive_frames(0, 32):
            stream.receive(frame)
        stream.check()
        assert len(stream.received) == 32
        copy = destination.new_memory(SIZE, gpa=GPA)
        link = Link(SimClock(), 1000 * MIB, 0.001)
        for chunk in encode_pages(memory, range(FIRST, FIRST + NPAGES)):
            apply_chunk(copy, link.send(chunk))
        assert copy.read(0, SIZE) == memory.read(0, SIZE)
        session.close()
