"""Dirty tracking mode 1: the device logs its own writes, and :class:`DeviceLogTracker` takes the log.

Real sim-net and sim-blk targets, brought up by conformance's :class:`DriverSession`, carry real
traffic while a tracker holds the log. What the device wrote is known without trusting it: a
snapshot of guest memory before the device runs, compared with memory after it (the suite's own
``changed_runs``). The guest's memory is filled with a canary, so every byte the device writes
changes. The rings are placed in pages of their own, away from the buffers, so the test can tell
a used-ring mark (VHOST_VRING_F_LOG) from a buffer mark.

Most tests switch logging on a running device, as a VMM does for a migration: the guest
negotiates its features without VHOST_F_LOG_ALL, and the tracker's start/stop flip that bit with
SET_FEATURES. One test negotiates LOG_ALL at bring-up instead (``acked_features=None``).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from vdpacert.conformance.driver import traffic as TR  # noqa: N812
from vdpacert.conformance.driver.device import DriverSession, net_queues
from vdpacert.conformance.driver.memory import CANARY, PAGE, GuestLayout, Snapshot, changed_runs
from vdpacert.conformance.machines.datapath import SessionClient
from vdpacert.conformance.machines.dirty import DirtyLogWatch
from vdpacert.conformance.targets import Target, make_target
from vdpacert.migration.bitmap import DirtyBitmap, PageRangeError
from vdpacert.migration.dirty import (
    LOG_ALL,
    CpuDirtyTracker,
    DeviceLogTracker,
    DirtySource,
    ShadowDirtySink,
    pages_for,
)
from vdpacert.uapi import virtio_net as N  # noqa: N812
from vdpacert.uapi.virtio_config import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1

GPA = 0x100_0000
MEMORY = 4 << 20
#: The rings are laid out from this offset on; the buffers come below it (see open_rig).
RING_OFFSET = 1 << 20
CAPACITY = 256
BASE = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_ACCESS_PLATFORM


def features_for(kind: str, packed: bool) -> int:
    extra = 1 << N.VIRTIO_NET_F_MAC if kind == "sim-net" else 0
    return BASE | extra | (1 << VIRTIO_F_RING_PACKED if packed else 0)


@dataclass
class Rig:
    target: Target
    layout: GuestLayout
    tracker: DeviceLogTracker
    session: DriverSession
    kind: str


def ring_pages(pages: set[int]) -> set[int]:
    """The pages of ``pages`` that hold rings (open_rig lays every ring out from RING_OFFSET on)."""
    return {page for page in pages if page >= (GPA + RING_OFFSET) // PAGE}


def open_rig(kind: str, packed: bool, *, ring_log: bool = True, log_all_at_bring_up: bool = False,
             target_spec: str | None = None) -> Rig:
    """A target, its guest memory, a tracker and a session up to DRIVER_OK (logging not started).

    The rings go at RING_OFFSET and up: a block below it is held while the session lays the rings
    out, then given back, so every buffer lands below RING_OFFSET and never shares a page with a ring.
    """
    target = make_target(target_spec or kind)
    layout = GuestLayout(target.new_memory(MEMORY, gpa=GPA))
    features = features_for(kind, packed)
    guest_features = features | (LOG_ALL if log_all_at_bring_up else 0)
    tracker = DeviceLogTracker(target, GPA + MEMORY, acked_features=None if log_all_at_bring_up else features)
    client = SessionClient(target.client)
    if ring_log:
        client.watch = DirtyLogWatch(layout, tracker.log)  # SET_VRING_ADDR gets F_LOG at the used area's gpa
    queues = net_queues(features) if kind == "sim-net" else [0]
    session = DriverSession(client, layout, guest_features, queues=queues, num=64, service=target.service)
    hold = layout.alloc(RING_OFFSET, PAGE, what="keeps the rings above the buffers")
    session.bring_up()
    layout.free(hold)
    return Rig(target, layout, tracker, session, kind)


@pytest.fixture
def rigs() -> Iterator[list[Rig]]:
    opened: list[Rig] = []
    yield opened
    for rig in opened:
        rig.session.close()
        rig.target.close()


def gpa_pages(layout: GuestLayout, snapshot: Snapshot) -> set[int]:
    """Guest-physical pages whose bytes changed since ``snapshot`` (driver writes are kept in the snapshot)."""
    return {layout.gpa_base // PAGE + page for page in changed_runs(snapshot.data, layout.read(0, layout.size))}


def device_round(rig: Rig, stream: TR.NetStream, shadow: TR.BlkShadow, count: int = 6) -> set[int]:
    """Give the device work, let it run, and return the pages it changed (read before the buffers are reaped,
    since reaping frees them and a freed buffer is refilled with canary)."""
    session, layout = rig.session, rig.layout
    snapshot = layout.snapshot()
    if rig.kind == "sim-net":
        session.post_rx(0, count)
        session.send_frames(0, stream.frames(count, [1514, 64, 900]))
        changed = gpa_pages(layout, snapshot)
        for frame in session.receive_frames(0, count):
            stream.receive(frame)
        session.tx_done(0, count)
        stream.check()
    else:
        base = 16  # odd i: write sector base + i; even i: read sectors base + i - 1 and base + i
        requests = [TR.blk_out(base + i, shadow.write(base + i)) if i % 2 else TR.blk_in(base + i - 1, 2)
                    for i in range(count)]
        for request in requests:
            session.blk_submit(0, request, kick=False)
        session.kick(0)
        changed = gpa_pages(layout, snapshot)
        assert all(done.status == 0 for done in session.blk_complete(0, count))
    assert changed, "the device wrote nothing: the test would prove nothing"
    return changed


def log_is_zero(tracker: DeviceLogTracker) -> bool:
    return tracker.log.read(0, tracker.log_bytes) == bytes(tracker.log_bytes)


def tracking(source: DirtySource) -> bool:
    """``source.active``, read through a call so the checker does not carry an earlier answer over a start."""
    return source.active


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("kind", ["sim-net", "sim-blk"])
def test_the_log_holds_exactly_the_pages_the_device_wrote(rigs: list[Rig], kind: str, packed: bool) -> None:
    rig = open_rig(kind, packed)
    rigs.append(rig)
    tracker, stream, shadow = rig.tracker, TR.NetStream(), TR.BlkShadow(CAPACITY)
    into = DirtyBitmap(tracker.npages)

    device_round(rig, stream, shadow)  # before start: LOG_ALL is off, nothing is logged
    assert log_is_zero(tracker) and not tracking(tracker)

    tracker.start()
    assert tracking(tracker)
    for _ in range(3):
        changed = device_round(rig, stream, shadow)
        assert ring_pages(changed) and changed - ring_pages(changed)  # both rings and buffers were written
        assert tracker.sync(into) == len(changed)
        assert set(into.take()) == changed  # every written page, the used rings included, and nothing else
        assert log_is_zero(tracker)  # the sync took every bit
        assert tracker.sync(into) == 0  # ... so the next sync reports only what is new: nothing yet
    assert tracker.signals > 0  # the device signalled the log eventfd (SET_LOG_FD) after logging

    tracker.stop()
    assert not tracker.active
    device_round(rig, stream, shadow)
    assert log_is_zero(tracker)  # logging is off: the traffic marked nothing
    tracker.stop()  # idempotent


def test_pages_written_between_syncs_accumulate_until_taken(rigs: list[Rig]) -> None:
    rig = open_rig("sim-net", False)
    rigs.append(rig)
    tracker, stream, shadow = rig.tracker, TR.NetStream(), TR.BlkShadow(CAPACITY)
    tracker.start()
    first = device_round(rig, stream, shadow)
    second = device_round(rig, stream, shadow)
    into = DirtyBitmap(tracker.npages)
    into.mark_pages(first)  # already known dirty: only the rest is new
    assert tracker.sync(into) == len(second - first)
    assert set(into.pages()) == first | second
    tracker.stop()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_without_vring_log_only_buffers_are_marked(rigs: list[Rig], packed: bool) -> None:
    rig = open_rig("sim-net", packed, ring_log=False)
    rigs.append(rig)
    rig.tracker.start()
    changed = device_round(rig, TR.NetStream(), TR.BlkShadow(CAPACITY))
    into = DirtyBitmap(rig.tracker.npages)
    rig.tracker.sync(into)
    assert ring_pages(changed)  # the device did write its rings ...
    assert set(into.pages()) == changed - ring_pages(changed)  # ... but without VHOST_VRING_F_LOG they are not logged
    rig.tracker.stop()


def test_log_all_negotiated_at_bring_up(rigs: list[Rig]) -> None:
    """acked_features=None: the tracker only installs the log; the features are the caller's."""
    rig = open_rig("sim-blk", False, log_all_at_bring_up=True)
    rigs.append(rig)
    tracker, shadow = rig.tracker, TR.BlkShadow(CAPACITY)
    tracker.start()
    changed = device_round(rig, TR.NetStream(), shadow)
    into = DirtyBitmap(tracker.npages)
    tracker.sync(into)
    assert set(into.pages()) == changed
    tracker.stop()  # LOG_ALL is left on, as asked: the device keeps logging into the tracker's memory
    device_round(rig, TR.NetStream(), shadow)
    assert not log_is_zero(tracker)


def test_a_one_gib_guest_with_a_log_covering_it(rigs: list[Rig]) -> None:
    """1 GiB of guest memory at gpa 0 (mapped lazily: only what is touched costs), rings and buffers in its
    last MiB: the log (32 KiB) takes the top pages, and only the ones written."""
    size, tail = 1 << 30, 1 << 20
    target = make_target("sim-net")
    layout = GuestLayout(target.new_memory(size, gpa=0), fill=False)
    layout.alloc(size - tail, PAGE, what="the guest's untouched memory")
    layout.fill(size - tail, tail, CANARY)
    features = features_for("sim-net", False)
    tracker = DeviceLogTracker(target, size, acked_features=features)
    assert tracker.log_bytes == 32 << 10 and tracker.npages == 1 << 18
    client = SessionClient(target.client)
    client.watch = DirtyLogWatch(layout, tracker.log)
    session = DriverSession(client, layout, features, queues=net_queues(features), service=target.service)
    session.bring_up()
    rigs.append(Rig(target, layout, tracker, session, "sim-net"))
    tracker.start()
    stream = TR.NetStream()
    session.post_rx(0, 8, kick=False)
    session.send_frames(0, stream.frames(8, 1514), kick=False)
    before = layout.read(size - tail, tail)
    session.kick(0)
    session.kick(1)
    changed = {(size - tail) // PAGE + page for page in changed_runs(before, layout.read(size - tail, tail))}
    into = DirtyBitmap(tracker.npages)
    assert tracker.sync(into) == len(changed) > 2
    assert set(into.pages()) == changed
    assert max(changed) >= (size - tail) // PAGE
    for frame in session.receive_frames(0, 8):
        stream.receive(frame)
    stream.check()
    tracker.stop()


def test_a_device_that_cannot_log_refuses_start_and_nothing_is_left_on() -> None:
    """A device offering no VHOST_F_LOG_ALL answers SET_LOG_BASE with ENOTTY, as Linux's vhost-vdpa does."""
    offered = make_target("sim-net")
    features = offered.client.get_features() & ~LOG_ALL
    offered.close()
    target = make_target(f"sim-net:features={features:x}")
    try:
        tracker = DeviceLogTracker(target, MEMORY, acked_features=BASE)
        target.client.set_owner()
        with pytest.raises(OSError) as refused:
            tracker.start()
        assert refused.value.errno == errno.ENOTTY
        assert not tracker.active
        tracker.stop()  # nothing to stop: no error
    finally:
        target.close()


def test_bad_construction_and_sync_are_typed_errors() -> None:
    target = make_target("sim-blk")
    try:
        with pytest.raises(ValueError, match="guest_size"):
            DeviceLogTracker(target, 0)
        with pytest.raises(ValueError, match="inside the guest"):
            DeviceLogTracker(target, 1 << 30, log_gpa=1 << 29)
        with pytest.raises(ValueError, match="acked_features"):
            DeviceLogTracker(target, 1 << 20, acked_features=-1)
        tracker = DeviceLogTracker(target, (1 << 20) + 1)
        assert tracker.npages == 257 and tracker.log.gpa >= 1 << 20
        # A bitmap smaller than the log takes the pages it covers; the rest (the VMM's own memory above the
        # guest, in a migration) is dropped from the log, not left to pile up.
        tracker.log.write(0, bytes([0b0010_0000]) + bytes(31) + bytes([0b0000_0001]))  # pages 5 and 256
        smaller = DirtyBitmap(256)
        assert tracker.sync(smaller) == 1 and list(smaller.pages()) == [5]
        assert tracker.log.read(0, tracker.log_bytes) == bytes(tracker.log_bytes)
        assert tracker.sync(DirtyBitmap(257)) == 0
    finally:
        target.close()


def test_stop_after_the_target_closed_is_quiet() -> None:
    target = make_target("sim-blk")
    tracker = DeviceLogTracker(target, MEMORY)
    target.client.set_owner()
    tracker.start()
    target.close()
    tracker.stop()
    assert not tracker.active


# ----- the sources that are told what was written ---------------------------------------------------------

@pytest.mark.parametrize("source_type", [CpuDirtyTracker, ShadowDirtySink])
def test_noted_pages_are_reported_only_while_tracking(source_type: type[CpuDirtyTracker]) -> None:
    source: DirtySource = source_type(64 * PAGE)
    assert isinstance(source, (CpuDirtyTracker, ShadowDirtySink))
    into = DirtyBitmap(pages_for(64 * PAGE))
    source.note(0, PAGE)  # not tracking yet: dropped
    source.start()
    source.note(PAGE - 1, 2)  # pages 0 and 1
    source.note(63 * PAGE, PAGE)
    source.note(5 * PAGE, 0)  # nothing
    assert source.sync(into) == 3 and list(into.pages()) == [0, 1, 63]
    assert source.sync(into) == 0  # the sync moved them
    source.note(10 * PAGE, 1)
    source.stop()
    source.note(11 * PAGE, 1)  # after stop: dropped
    assert source.sync(into) == 1 and list(into.take()) == [0, 1, 10, 63]  # noted before stop: still reported
    with pytest.raises(PageRangeError):
        source.note(64 * PAGE - 1, 2)
    with pytest.raises(PageRangeError):
        source.note(-1, 1)
    source.start()
    assert source.sync(into) == 0  # a new round starts empty
