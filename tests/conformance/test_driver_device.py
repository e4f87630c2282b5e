"""The driver-side harness against the reference devices: bring-up, traffic, wrap, indirect, canaries, violations.

Each test builds an in-process sim-net or sim-blk behind its vhost-vdpa front (as the embedded
target will), hands the front to a :class:`DriverSession` as its client, and drives the device only
through the session: IOTLB messages, named vhost ioctls, rings in guest memory registered in the
process's default registry, kick and call eventfds. The front's ``poll_kicks`` is the ``service``
hook. Where a test needs the device to misbehave it writes guest memory itself, proving the
detectors can fail.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

import pytest

from vdpacert.conformance.driver import BringUpError, DeviceTimeout, DeviceViolation
from vdpacert.conformance.driver import memory as M  # noqa: N812
from vdpacert.conformance.driver import packed as P  # noqa: N812
from vdpacert.conformance.driver import split as S  # noqa: N812
from vdpacert.conformance.driver import traffic as TR  # noqa: N812
from vdpacert.conformance.driver.device import DRIVER_OK, DriverSession, net_queues
from vdpacert.conformance.driver.memory import GuestLayout
from vdpacert.conformance.driver.packed import PackedRing
from vdpacert.conformance.driver.split import SplitRing
from vdpacert.impl.guestmem import GuestMemory
from vdpacert.impl.sim_blk import DEFAULT_FEATURES as BLK_OFFER
from vdpacert.impl.sim_blk import SimBlk
from vdpacert.impl.sim_device import SimDevice
from vdpacert.impl.sim_net import SimNet
from vdpacert.impl.vhost_vdpa import VhostVdpa
from vdpacert.uapi import virtio_blk as B  # noqa: N812
from vdpacert.uapi import virtio_net as N  # noqa: N812
from vdpacert.uapi.vhost_types import VHOST_F_LOG_ALL
from vdpacert.uapi.virtio_config import (
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
)
from vdpacert.uapi.virtio_ring import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC

GPA = 0x2_0000_0000
CAPACITY = 64
RING_BITS = (1 << VIRTIO_F_RING_PACKED) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_RING_F_INDIRECT_DESC)


def bits(*numbers: int) -> int:
    return sum(1 << n for n in numbers)


def ring_bits(packed: bool, indirect: bool, event_idx: bool) -> int:
    return ((1 << VIRTIO_F_RING_PACKED if packed else 0) | (1 << VIRTIO_RING_F_INDIRECT_DESC if indirect else 0)
            | (1 << VIRTIO_RING_F_EVENT_IDX if event_idx else 0))


def net_features(packed: bool = False, *, indirect: bool = False, event_idx: bool = False) -> int:
    return bits(VIRTIO_F_VERSION_1, VIRTIO_F_ACCESS_PLATFORM, N.VIRTIO_NET_F_MAC, N.VIRTIO_NET_F_MTU,
                N.VIRTIO_NET_F_STATUS, N.VIRTIO_NET_F_CTRL_VQ) | ring_bits(packed, indirect, event_idx)


def blk_features(packed: bool = False, *, indirect: bool = False, event_idx: bool = False) -> int:
    return BLK_OFFER & ~RING_BITS & ~(1 << VHOST_F_LOG_ALL) | ring_bits(packed, indirect, event_idx)


Opener = Callable[..., DriverSession]


@pytest.fixture
def layout() -> Iterator[GuestLayout]:
    memory = GuestMemory(4 << 20, gpa=GPA)  # registered in the default registry the devices resolve through
    yield GuestLayout(memory)
    memory.close()


@pytest.fixture
def open_session(layout: GuestLayout) -> Iterator[Opener]:
    """Open a device behind a fresh vhost-vdpa front and bring it up through a DriverSession."""
    opened: list[tuple[DriverSession, VhostVdpa]] = []

    def opener(device: SimDevice, features: int, queues: list[int], *, service: bool = True,
               bring_up: bool = True, **kwargs: object) -> DriverSession:
        front = VhostVdpa(device)
        session = DriverSession(front, layout, features, queues=queues,
                                service=(lambda: front.poll_kicks(0)) if service else None, **kwargs)  # type: ignore[arg-type]
        opened.append((session, front))
        if bring_up:
            session.bring_up()
        return session

    yield opener
    for session, front in reversed(opened):
        session.close()
        front.close()


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def packed(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def front_of(session: DriverSession) -> VhostVdpa:
    assert isinstance(session.client, VhostVdpa)
    return session.client


def net_exchange(session: DriverSession, stream: TR.NetStream, count: int, *, indirect: bool = False) -> None:
    """Post RX buffers, send ``count`` frames, receive and check every one, reap the TX chains."""
    session.post_rx(0, count, indirect=indirect)
    session.send_frames(0, stream.frames(count, [64, 301, 1514]), indirect=indirect)
    for frame in session.receive_frames(0, count):
        stream.receive(frame)
    assert [used.length for used in session.tx_done(0, count)] == [0] * count


# ----- bring-up and honest traffic -----------------------------------------------------------------------

def test_net_bring_up_and_frames_come_back_in_order(open_session: Opener, layout: GuestLayout,
                                                    packed: bool) -> None:
    features = net_features(packed)
    session = open_session(SimNet("drv-net"), features, net_queues(features))
    front = front_of(session)
    assert front.get_status() == DRIVER_OK and front.get_features() & features == features
    assert sorted(session.rings) == [0, 1, 2]
    assert all(isinstance(r, PackedRing if packed else SplitRing) for r in session.rings.values())
    stream = TR.NetStream()
    for _ in range(4):
        snap = layout.snapshot()
        net_exchange(session, stream, 5)
        layout.check(snap)
    stream.check()
    assert stream.received == list(range(20))
    assert session.notified(0) > 0 and session.notified(1) > 0  # used-buffer notifications arrived


def test_blk_writes_then_reads_return_the_pattern(open_session: Opener, layout: GuestLayout, packed: bool) -> None:
    session = open_session(SimBlk("drv-blk", capacity=CAPACITY), blk_features(packed), [0])
    shadow = TR.BlkShadow(CAPACITY)
    snap = layout.snapshot()
    writes = [TR.blk_out(sector, shadow.write(sector, count)) for sector, count in ((0, 1), (5, 3), (63, 1), (5, 1))]
    assert [c.status for c in session.blk_run(0, writes)] == [B.VIRTIO_BLK_S_OK] * 4
    done = session.blk_run(0, [TR.blk_in(0, 8), TR.blk_in(60, 4), TR.blk_flush(), TR.blk_get_id()])
    assert [c.status for c in done] == [B.VIRTIO_BLK_S_OK] * 4
    shadow.check_read(0, done[0].data)
    shadow.check_read(60, done[1].data)
    assert done[0].length == 8 * 512 + 1 and done[0].data[512 * 5:512 * 6] == TR.sector_pattern(5, 6)
    assert done[3].data.rstrip(b"\x00") == b"vdpacert-drv-blk"
    zeroed = session.blk_run(0, [TR.blk_write_zeroes([(5, 2)]), TR.blk_discard([(63, 1)])])
    assert [c.status for c in zeroed] == [B.VIRTIO_BLK_S_OK] * 2
    shadow.zero(5, 2)
    shadow.discard(63, 1)
    (read,) = session.blk_run(0, [TR.blk_in(0, CAPACITY)])
    shadow.check_read(0, read.data)
    layout.check(snap)


def test_a_stale_read_is_named(open_session: Opener) -> None:
    session = open_session(SimBlk("drv-blk", capacity=CAPACITY), blk_features(), [0])
    shadow = TR.BlkShadow(CAPACITY)
    session.blk_run(0, [TR.blk_out(9, shadow.write(9))])
    shadow.write(9)  # the shadow moves on; the disk does not
    (read,) = session.blk_run(0, [TR.blk_in(9)])
    with pytest.raises(DeviceViolation, match="sector 9: expected generation 2, got sector 9 generation 1"):
        shadow.check_read(9, read.data)


# ----- wrap and indirect ---------------------------------------------------------------------------------

def test_split_index_wrap_near_65535(open_session: Opener, layout: GuestLayout) -> None:
    features = net_features()
    session = open_session(SimNet("drv-wrap"), features, net_queues(features), starts={0: 65531, 1: 65533})
    stream = TR.NetStream()
    snap = layout.snapshot()
    for _ in range(4):
        net_exchange(session, stream, 3)  # 12 chains per queue: both cross 65535 -> 0
    stream.check()
    layout.check(snap)
    rx, tx = session.rings[0], session.rings[1]
    assert isinstance(rx, SplitRing) and isinstance(tx, SplitRing)
    assert (rx.avail_idx, rx.used_idx(), tx.used_idx()) == ((65531 + 12) & 0xFFFF, 7, 9)
    front = front_of(session)
    front.suspend()
    assert (front.get_vring_base(0), front.get_vring_base(1)) == (7, 9)


def test_blk_split_wrap_near_65535(open_session: Opener) -> None:
    session = open_session(SimBlk("drv-wrap", capacity=CAPACITY), blk_features(), [0], starts={0: 65530})
    shadow = TR.BlkShadow(CAPACITY)
    for sector in range(10):
        assert session.blk_run(0, [TR.blk_out(sector, shadow.write(sector))])[0].status == B.VIRTIO_BLK_S_OK
    shadow.check_read(0, session.blk_run(0, [TR.blk_in(0, 10)])[0].data)
    ring = session.rings[0]
    assert isinstance(ring, SplitRing) and ring.last_used == (65530 + 11) & 0xFFFF


def test_packed_wrap_from_the_end_of_the_ring(open_session: Opener, layout: GuestLayout) -> None:
    features = net_features(packed=True)
    starts = {0: 0x8000 | 14, 1: 0x8000 | 15, 2: 0x8000 | 13}  # slots 14, 15, 13 of 16, wrap counter 1
    session = open_session(SimNet("drv-pwrap"), features, net_queues(features), starts=starts)
    front = front_of(session)
    assert front.get_vring_base(1) == 0x800F_800F
    stream = TR.NetStream()
    snap = layout.snapshot()
    for _ in range(7):
        net_exchange(session, stream, 5)  # 35 lists on each queue: laps of a 16-slot ring
    stream.check()
    layout.check(snap)
    tx = session.rings[1]
    assert isinstance(tx, PackedRing)
    position = 15 + 2 * 35  # each TX list is two slots (header, frame): five laps, counter ends at 0
    assert (tx.next_used, tx.used_wrap) == (position % 16, 1 - (position // 16) % 2) == (5, 0)
    front.suspend()
    base = front.get_vring_base(1)
    assert base & 0x7FFF == position % 16 and base >> 15 & 1 == tx.avail_wrap


def test_blk_packed_wrap_with_multi_slot_lists(open_session: Opener) -> None:
    session = open_session(SimBlk("drv-pwrap", capacity=CAPACITY), blk_features(packed=True), [0],
                           starts={0: 0x8000 | 15})
    shadow = TR.BlkShadow(CAPACITY)
    for sector in range(0, 30, 3):  # each request is 3 or 2 slots: lists straddle the end of the ring
        done = session.blk_run(0, [TR.blk_out(sector, shadow.write(sector, 3)), TR.blk_in(sector, 3)])
        assert [c.status for c in done] == [B.VIRTIO_BLK_S_OK] * 2
        shadow.check_read(sector, done[1].data)


def test_indirect_chains(open_session: Opener, layout: GuestLayout, packed: bool) -> None:
    features = net_features(packed, indirect=True)
    net = open_session(SimNet("drv-ind"), features, net_queues(features))
    stream = TR.NetStream()
    snap = layout.snapshot()
    net_exchange(net, stream, 6, indirect=True)
    stream.check()
    blk = open_session(SimBlk("drv-ind", capacity=CAPACITY), blk_features(packed, indirect=True), [0])
    shadow = TR.BlkShadow(CAPACITY)
    done = blk.blk_run(0, [TR.blk_out(2, shadow.write(2, 4)), TR.blk_in(0, 8)], indirect=True)
    assert [c.status for c in done] == [B.VIRTIO_BLK_S_OK] * 2
    shadow.check_read(0, done[1].data)
    layout.check(snap)


def test_event_idx_session(open_session: Opener, layout: GuestLayout, packed: bool) -> None:
    features = net_features(packed, event_idx=True)
    session = open_session(SimNet("drv-evt"), features, net_queues(features))
    stream = TR.NetStream()
    snap = layout.snapshot()
    for _ in range(3):
        net_exchange(session, stream, 4)
    stream.check()
    layout.check(snap)  # avail_event / device event area: written, and allowed
    assert session.notified(0) > 0


# ----- the detectors can fail ----------------------------------------------------------------------------

def test_canary_diff_lists_a_scribble_outside_the_windows(open_session: Opener, layout: GuestLayout,
                                                          packed: bool) -> None:
    features = net_features(packed)
    session = open_session(SimNet("drv-can"), features, net_queues(features))
    stream = TR.NetStream()
    snap = layout.snapshot()
    session.post_rx(0, 2)
    (tx_chain,) = session.send_frames(0, stream.frames(1), kick=False)
    frame_buffer = tx_chain.readable[1]
    ring = session.rings[1]
    driver_area = ring.avail if isinstance(ring, SplitRing) else ring.driver_event
    # Scribbles a buggy device might make: into a TX frame it must only read, and into the driver's area.
    layout.memory.write(frame_buffer.offset + 20, b"\xde\xad")
    layout.memory.write(driver_area, b"\x07")
    session.kick(1)
    with pytest.raises(DeviceViolation):  # the corrupted frame is caught on the way back too
        session.receive_frames(0, 1)
    changes = layout.diff(snap)
    assert [(c.offset, c.length) for c in changes] == sorted([(frame_buffer.offset + 20, 2), (driver_area, 1)])
    assert {c.owner for c in changes} == {"vq1 readable buffer", "vq1 avail ring" if not packed
                                          else "vq1 driver event suppression"}
    with pytest.raises(DeviceViolation) as caught:
        layout.check(snap)
    assert caught.value.clause == M.WRITES_ONLY_GIVEN_MEMORY
    assert f"iova {layout.iova(frame_buffer.offset + 20):#x}" in str(caught.value)


def test_used_ring_validation_catches_a_corrupted_used_entry(open_session: Opener, packed: bool) -> None:
    session = open_session(SimBlk("drv-bad", capacity=CAPACITY), blk_features(packed), [0])
    session.blk_submit(0, TR.blk_in(0, 1))  # answered by the kick, not reaped yet
    ring = session.rings[0]
    if isinstance(ring, SplitRing):
        slot = ring.used + 4 + 8 * (ring.last_used % ring.num)
        session.layout.memory.write(slot + 4, struct.pack("<I", 513 + 1))  # len one past the writable bytes
        clause = S.USED_RING
    else:
        session.layout.memory.write(ring.desc + 16 * ring.next_used + 14, struct.pack("<H", P.used_flags(0)))
        clause = P.USED_DESCRIPTOR
    with pytest.raises(DeviceViolation) as caught:
        session.reap(0)
    assert caught.value.clause == clause


def test_used_id_that_was_never_outstanding(open_session: Opener, packed: bool) -> None:
    session = open_session(SimBlk("drv-bad", capacity=CAPACITY), blk_features(packed), [0])
    chain = session.blk_submit(0, TR.blk_flush())
    ring = session.rings[0]
    bogus = (chain.id + 5) % ring.num
    if isinstance(ring, SplitRing):
        session.layout.memory.write(ring.used + 4 + 8 * (ring.last_used % ring.num), struct.pack("<I", bogus))
        clause = S.USED_RING
    else:
        session.layout.memory.write(ring.desc + 16 * ring.next_used + 12, struct.pack("<H", bogus))
        clause = P.USED_DESCRIPTOR
    with pytest.raises(DeviceViolation, match=f"id {bogus}") as caught:
        session.reap(0)
    assert caught.value.clause == clause


def test_a_device_that_never_answers_times_out(open_session: Opener, packed: bool) -> None:
    session = open_session(SimBlk("drv-mute", capacity=CAPACITY), blk_features(packed), [0], service=False)
    session.blk_submit(0, TR.blk_flush())  # the kick eventfd is never serviced
    with pytest.raises(DeviceTimeout, match="queue 0: 0 of 1 used entries"):
        session.reap(0, timeout=0.05)


def test_bring_up_failures_name_the_step(open_session: Opener) -> None:
    with pytest.raises(BringUpError, match="GET_FEATURES"):
        open_session(SimNet("drv-f1"), net_features() | bits(N.VIRTIO_NET_F_MQ), [0, 1])  # MQ not offered
    broken = net_features() & ~bits(N.VIRTIO_NET_F_CTRL_VQ) | bits(N.VIRTIO_NET_F_CTRL_RX)  # needs CTRL_VQ
    offered = SimNet("probe").get_device_features()
    assert broken & ~offered == 0
    with pytest.raises(BringUpError, match="SET_STATUS 0xb"):
        open_session(SimNet("drv-f2"), broken, [0, 1])


def test_hostile_loop_is_not_used_as_valid(open_session: Opener, layout: GuestLayout) -> None:
    session = open_session(SimBlk("drv-loop", capacity=CAPACITY), blk_features(), [0])
    ring = session.rings[0]
    assert isinstance(ring, SplitRing)
    snap = layout.snapshot()
    ring.post_loop()
    session.kick(0)
    assert all(used.length == 0 for used in session.reap(0, 0))  # dropped, or used with len 0
    assert front_of(session).get_status() & VIRTIO_CONFIG_S_NEEDS_RESET
    layout.check(snap)
