"""The shadow virtqueue between a conformance driver and the reference devices: traffic, dirty pages, resubmission.

The guest is the suite's :class:`DriverSession` over guest memory; the device is sim-net or sim-blk from
``make_target`` and sees only shadow rings in VMM memory. Between them, :class:`SvqVhost` (below) is the
smallest VMM that works: device-level vhost requests pass through, and each queue's SET_VRING_BASE /
ADDR / KICK / CALL are routed to a :class:`ShadowVirtqueue`, as ``migration/vmm.py`` does. Its
``service`` polls every shadow virtqueue around the embedded device's own kick processing.

What is proved, on split and packed rings: frames and blk data cross the shadow intact and in order
(with EVENT_IDX on and off, indirect chains, rings started just before the 16-bit or end-of-ring
wrap) and the shadow writes only guest memory the spec gives a device; the dirty sink receives exactly
the guest pages that changed and nothing in VMM memory; chains in flight on one device arrive exactly
once after the guest ring moves, by ``guest_base()`` / ``inflight()``, to a second device; a packed chain
as long as the ring goes and comes back with the wrap counters right; hostile chains are refused
with the model's bad-input class and nothing reaches the device.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import pytest

from vdpacert.conformance.driver.device import ACK_DRIVER, DRIVER_OK, FEATURES_OK, DriverSession
from vdpacert.conformance.driver.memory import PAGE, GuestLayout, changed_runs
from vdpacert.conformance.driver.packed import PackedRing
from vdpacert.conformance.driver.split import SplitRing
from vdpacert.conformance.driver.traffic import OUTHDR, SECTOR, BlkRequest, BlkShadow, NetStream, blk_in, blk_out
from vdpacert.conformance.targets import Target, make_target
from vdpacert.migration.svq import ShadowVirtqueue, SvqError
from vdpacert.model.chains import BadInput
from vdpacert.model.notify import Decision
from vdpacert.model.ring_index import PackedVqState, encode_packed_base
from vdpacert.uapi import vhost_types as T  # noqa: N812
from vdpacert.uapi import virtio_blk as B  # noqa: N812
from vdpacert.uapi import virtio_net as N  # noqa: N812
from vdpacert.uapi.virtio_config import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1
from vdpacert.uapi.virtio_ring import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC

GUEST_GPA = 0x1_0000_0000
GUEST_SIZE = 1 << 20
VMM_GPA = 1 << 46  # far above the guest: a dirty mark here would be a mark in VMM memory
VMM_IOVA = 0x10_0000_0000
VMM_SIZE = 1 << 20
CAPACITY = 64


def ring_bits(packed: bool, event_idx: bool = False, indirect: bool = False) -> int:
    return ((1 << VIRTIO_F_RING_PACKED if packed else 0) | (1 << VIRTIO_RING_F_EVENT_IDX if event_idx else 0)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC if indirect else 0))


def net_features(packed: bool, event_idx: bool = False, indirect: bool = False, *, ctrl: bool = False) -> int:
    ctrl_bits = (1 << N.VIRTIO_NET_F_CTRL_VQ | 1 << N.VIRTIO_NET_F_CTRL_MAC_ADDR) if ctrl else 0
    return (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_ACCESS_PLATFORM | 1 << N.VIRTIO_NET_F_MAC | ctrl_bits
            | ring_bits(packed, event_idx, indirect))


def blk_features(packed: bool, event_idx: bool = False, indirect: bool = False) -> int:
    return 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_ACCESS_PLATFORM | ring_bits(packed, event_idx, indirect)


class PageSink:
    """A DirtySink that keeps every note."""

    def __init__(self) -> None:
        self.notes: list[tuple[int, int]] = []

    def note(self, gpa: int, length: int) -> None:
        self.notes.append((gpa, length))

    def pages(self) -> set[int]:
        return {page for gpa, n in self.notes for page in range(gpa // PAGE, (gpa + n - 1) // PAGE + 1)}


@dataclass
class _Pending:
    num: int = 0
    base: int = 0
    addr: tuple[int, int, int] = (0, 0, 0)
    kick: int = -1
    call: int = -1


class SvqVhost:
    """The test's VMM: vhost requests pass through to ``target``, every queue's ring goes through a shadow virtqueue.

    ``inflight``: per queue, the chains a new shadow virtqueue resubmits (set by :meth:`restore`).
    """

    def __init__(self, target: Target, guest: GuestLayout, vmm: GuestLayout, dirty: PageSink | None = None) -> None:
        self.target, self.client = target, target.client
        self.guest, self.vmm, self.dirty = guest, vmm, dirty
        self.features = 0
        self.pending: dict[int, _Pending] = {}
        self.svqs: dict[int, ShadowVirtqueue] = {}
        self.inflight: dict[int, Sequence[int]] = {}

    # device-level requests: as they are
    def set_owner(self) -> None:
        self.client.set_owner()

    def get_backend_features(self) -> int:
        return self.client.get_backend_features()

    def set_backend_features(self, features: int, /) -> None:
        self.client.set_backend_features(features)

    def get_features(self) -> int:
        return self.client.get_features()

    def set_features(self, features: int, /) -> None:
        self.features = features
        self.client.set_features(features)

    def get_status(self) -> int:
        return self.client.get_status()

    def set_status(self, status: int, /) -> None:
        self.client.set_status(status)

    def iotlb_update(self, iova: int, size: int, uaddr: int, perm: int, /, *, asid: int = 0) -> None:
        self.client.iotlb_update(iova, size, uaddr, perm, asid=asid)
        if iova == self.guest.iova_base:  # the VMM's own memory goes next to the guest's
            self.client.iotlb_update(self.vmm.iova_base, self.vmm.size, self.vmm.uaddr_base, T.VHOST_ACCESS_RW)

    # ring requests: recorded, then given to the shadow virtqueue when the queue is enabled
    def set_vring_num(self, index: int, num: int, /) -> None:
        self.pending.setdefault(index, _Pending()).num = num
        self.client.set_vring_num(index, num)

    def set_vring_base(self, index: int, num: int, /) -> None:
        self.pending.setdefault(index, _Pending()).base = num

    def set_vring_addr(self, index: int, desc: int, avail: int, used: int, /, *, flags: int = 0,
                       log_guest_addr: int = 0) -> None:
        self.pending.setdefault(index, _Pending()).addr = (desc, avail, used)

    def set_vring_kick(self, index: int, fd: int, /) -> None:
        self.pending.setdefault(index, _Pending()).kick = fd

    def set_vring_call(self, index: int, fd: int, /) -> None:
        self.pending.setdefault(index, _Pending()).call = fd

    def set_vring_enable(self, index: int, enable: bool, /) -> None:
        if enable:
            ring = self.pending[index]
            desc, avail, used = ring.addr
            svq = ShadowVirtqueue(index, guest=self.guest, vmm=self.vmm, num=ring.num, desc=desc, avail=avail,
                                  used=used, features=self.features, base=ring.base,
                                  inflight=self.inflight.get(index, ()), dirty=self.dirty)
            self.svqs[index] = svq
            svq.attach_guest(ring.kick, ring.call)
            self.client.set_vring_base(index, svq.shadow_base)
            self.client.set_vring_addr(index, *svq.shadow_addresses)
            self.client.set_vring_kick(index, svq.device_kick_fd)
            self.client.set_vring_call(index, svq.device_call_fd)
        self.client.set_vring_enable(index, enable)

    def service(self) -> int:
        moved = sum(svq.poll() for svq in self.svqs.values())
        moved += self.target.service()
        return moved + sum(svq.poll() for svq in self.svqs.values())

    def restore(self, session: DriverSession, states: Mapping[int, tuple[int, list[int]]]) -> None:
        """Bring this device up on the session's existing guest rings, from (base, in-flight) per queue."""
        self.set_owner()
        self.set_status(0)
        self.set_backend_features(session.backend_features)
        self.iotlb_update(self.guest.iova_base, self.guest.size, self.guest.uaddr_base, T.VHOST_ACCESS_RW)
        self.set_status(ACK_DRIVER)
        self.set_features(session.features)
        self.set_status(FEATURES_OK)
        for index, ring in session.rings.items():
            base, inflight = states[index]
            self.inflight[index] = inflight
            self.set_vring_num(index, ring.num)
            self.set_vring_base(index, base)
            self.set_vring_addr(index, *ring.addresses)
            self.set_vring_kick(index, session.kicks[index])
            self.set_vring_call(index, session.calls[index])
            self.set_vring_enable(index, True)
        self.set_status(DRIVER_OK)

    def close(self) -> None:
        for svq in self.svqs.values():
            svq.close()
        self.svqs.clear()


@dataclass
class Rig:
    target: Target
    guest: GuestLayout
    vmm: SvqVhost
    session: DriverSession
    stream: NetStream = field(default_factory=NetStream)

    def settle(self) -> None:
        """Service until nothing is in flight on any shadow virtqueue (bounded: the embedded device is synchronous)."""
        for _ in range(8):
            self.vmm.service()
            if not any(svq.inflight() for svq in self.vmm.svqs.values()):
                return
        raise AssertionError(f"still in flight: { {i: s.inflight() for i, s in self.vmm.svqs.items()} }")


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as closing:
        yield closing


def vmm_layout(target: Target, size: int = VMM_SIZE) -> GuestLayout:
    return GuestLayout(target.new_memory(size, gpa=VMM_GPA), iova_base=VMM_IOVA)


def open_rig(stack: contextlib.ExitStack, spec: str, features: int, queues: Sequence[int], *, num: int = 16,
             starts: Mapping[int, int] | None = None, dirty: PageSink | None = None,
             vmm_size: int = VMM_SIZE) -> Rig:
    target = stack.enter_context(make_target(spec))
    guest = GuestLayout(target.new_memory(GUEST_SIZE, gpa=GUEST_GPA))
    vmm = SvqVhost(target, guest, vmm_layout(target, vmm_size), dirty)
    stack.callback(vmm.close)
    session = DriverSession(vmm, guest, features, queues=queues, num=num, starts=starts, service=vmm.service)
    stack.callback(session.close)
    session.bring_up()
    return Rig(target, guest, vmm, session)


def net_round(rig: Rig, count: int, *, indirect: bool = False) -> None:
    """RX buffers, ``count`` frames on TX, each received and checked, TX chains reaped."""
    session = rig.session
    session.post_rx(0, count, indirect=indirect)
    session.send_frames(0, rig.stream.frames(count, [64, 301, 1514]), indirect=indirect)
    for frame in session.receive_frames(0, count):
        rig.stream.receive(frame)
    assert [used.length for used in session.tx_done(0, count)] == [0] * count


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def packed(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def wrap_starts(packed: bool, num: int = 16) -> dict[int, int]:
    """Guest rings starting a few entries before the 16-bit index wrap (split) or the end of the ring in the
    second lap (packed, wrap counter 0): the shadow ring starts fresh whatever the guest's position."""
    if packed:
        return {0: num - 3, 1: num - 2}
    return {0: 0xFFFD, 1: 0xFFFB}


# ----- traffic -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_net_loopback_through_the_shadow_across_the_wrap(stack: contextlib.ExitStack, packed: bool,
                                                         event_idx: bool, indirect: bool) -> None:
    rig = open_rig(stack, "sim-net", net_features(packed, event_idx, indirect), [0, 1], starts=wrap_starts(packed))
    snapshot = rig.guest.snapshot()
    for _ in range(4):
        net_round(rig, 5, indirect=indirect)
    rig.stream.check()
    assert rig.stream.received == list(range(20))
    rig.guest.check(snapshot)  # the shadow wrote only what the spec lets a device write
    svqs = rig.vmm.svqs
    assert svqs[0].inflight() == [] and svqs[1].inflight() == []
    rig.target.client.suspend()
    device_base = rig.target.client.get_vring_base(0)
    if packed:  # 20 single-slot lists from slot 13, wrap 0: slot 1, wrap 0 after the two flips
        assert svqs[0].guest_base() == encode_packed_base(PackedVqState(1, 0, 1, 0))
        assert svqs[0].guest_used_idx() == 1
        assert device_base == encode_packed_base(PackedVqState(4, 0, 4, 0))  # the shadow ring, from (0, 1)
    else:
        assert svqs[0].guest_base() == (0xFFFD + 20) & 0xFFFF == svqs[0].guest_used_idx()
        assert device_base == 20  # the device only ever saw the shadow ring, which starts at 0


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_blk_writes_then_reads_through_the_shadow(stack: contextlib.ExitStack, packed: bool, indirect: bool) -> None:
    rig = open_rig(stack, f"sim-blk:capacity={CAPACITY}", blk_features(packed, indirect=indirect), [0])
    shadow = BlkShadow(CAPACITY)
    writes = [blk_out(sector, shadow.write(sector, count)) for sector, count in ((0, 1), (5, 3), (63, 1), (5, 1))]
    done = rig.session.blk_run(0, writes, indirect=indirect)
    assert [c.status for c in done] == [B.VIRTIO_BLK_S_OK] * 4
    reads = rig.session.blk_run(0, [blk_in(0, 8), blk_in(60, 4)], indirect=indirect)
    assert [c.status for c in reads] == [B.VIRTIO_BLK_S_OK] * 2
    shadow.check_read(0, reads[0].data)
    shadow.check_read(60, reads[1].data)


def test_indirect_tables_wait_for_vmm_memory_and_none_is_lost(stack: contextlib.ExitStack, packed: bool) -> None:
    num = 16
    rig = open_rig(stack, f"sim-blk:capacity={CAPACITY}", blk_features(packed, indirect=True), [0], num=num,
                   vmm_size=1024)  # the shadow ring, and room for two 16-entry table copies at a time
    shadow = BlkShadow(CAPACITY)
    requests = []
    for sector in (0, 14, 28, 42):  # four requests of num elements: header, 14 sectors, status
        data = shadow.write(sector, num - 2)
        requests.append(BlkRequest(B.VIRTIO_BLK_T_OUT, sector, (OUTHDR.pack(B.VIRTIO_BLK_T_OUT, 0, sector),
                                   *(data[i * SECTOR:(i + 1) * SECTOR] for i in range(num - 2))), (1,)))
    done = rig.session.blk_run(0, requests, indirect=True)
    assert [c.status for c in done] == [B.VIRTIO_BLK_S_OK] * 4
    read = rig.session.blk_run(0, [blk_in(0, 56)])[0]
    shadow.check_read(0, read.data)


def test_vmm_memory_too_small_for_any_table_is_an_error_not_a_stall(stack: contextlib.ExitStack) -> None:
    rig = open_rig(stack, f"sim-blk:capacity={CAPACITY}", blk_features(False, indirect=True), [0], vmm_size=512)
    rig.session.rings[0].add([OUTHDR.pack(B.VIRTIO_BLK_T_IN, 0, 0)], [SECTOR] * 14 + [1], indirect=True)
    with pytest.raises(SvqError, match="VMM memory"):
        rig.vmm.service()
    assert rig.vmm.svqs[0].inflight() == []


# ----- dirty tracking ----------------------------------------------------------------------------------------

def check_dirty_exact(rig: Rig, sink: PageSink, before: bytes) -> None:
    """The sink's pages are exactly the guest pages that changed, and every changed byte was noted."""
    after = rig.guest.memory.read(0, rig.guest.size)
    changed = changed_runs(before, after)
    base = rig.guest.gpa_base
    assert all(base <= gpa and gpa + n <= base + rig.guest.size for gpa, n in sink.notes), "a note outside guest memory"
    assert sink.pages() == {base // PAGE + page for page in changed}
    noted = bytearray(rig.guest.size)
    for gpa, n in sink.notes:
        noted[gpa - base:gpa - base + n] = b"\1" * n
    missed = [(start, end) for runs in changed.values() for start, end in runs if not all(noted[start:end])]
    assert missed == [], f"changed bytes never noted: {missed[:5]}"


@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
def test_dirty_sink_gets_exactly_the_guest_pages_net_traffic_changed(stack: contextlib.ExitStack, packed: bool,
                                                                     event_idx: bool) -> None:
    sink = PageSink()
    rig = open_rig(stack, "sim-net", net_features(packed, event_idx), [0, 1], dirty=sink)
    net_round(rig, 3)  # warm-up: later used entries overwrite used entries, not zeroes
    session = rig.session
    # Buffers of three pages and more, filled only at their start: marking what was given rather than what the
    # device reported written would dirty their tails.
    posted = session.post_rx(0, 4, size=2 * PAGE + 100, kick=False)
    session.send_frames(0, rig.stream.frames(4, [64, 1514, 700, 80]), kick=False)
    before = rig.guest.memory.read(0, rig.guest.size)  # after the guest's own writes
    sink.notes.clear()
    rig.settle()
    check_dirty_exact(rig, sink, before)
    assert {rig.guest.gpa(chain.writable[0].offset) // PAGE for chain in posted} <= sink.pages()
    for frame in session.receive_frames(0, 4):
        rig.stream.receive(frame)
    session.tx_done(0, 4)
    rig.stream.check()


def test_dirty_sink_gets_exactly_the_pages_blk_reads_wrote_across_indirect_segments(
        stack: contextlib.ExitStack, packed: bool) -> None:
    sink = PageSink()
    rig = open_rig(stack, f"sim-blk:capacity={CAPACITY}", blk_features(packed, indirect=True), [0], dirty=sink)
    shadow = BlkShadow(CAPACITY)
    rig.session.blk_run(0, [blk_out(10, shadow.write(10, 12))])
    ring = rig.session.rings[0]
    # Two data segments: the used len runs across both, in order, then the status byte.
    requests = [BlkRequest(B.VIRTIO_BLK_T_IN, sector, (OUTHDR.pack(B.VIRTIO_BLK_T_IN, 0, sector),), writable)
                for sector, writable in ((10, (3 * SECTOR, 9 * SECTOR, 1)), (12, (SECTOR, 1)))]
    chains = [ring.add(list(r.readable), list(r.writable), indirect=True, publish=False) for r in requests]
    ring.publish()
    before = rig.guest.memory.read(0, rig.guest.size)
    sink.notes.clear()
    rig.settle()
    check_dirty_exact(rig, sink, before)
    used = {u.id: u for u in rig.session.reap(0, 2)}
    assert [used[c.id].length for c in chains] == [12 * SECTOR + 1, SECTOR + 1]
    shadow.check_read(10, used[chains[0].id].data[:12 * SECTOR])
    shadow.check_read(12, used[chains[1].id].data[:SECTOR])


def test_dirty_tracking_can_be_switched_off_and_on(stack: contextlib.ExitStack) -> None:
    sink = PageSink()
    rig = open_rig(stack, "sim-net", net_features(False), [0, 1])
    net_round(rig, 2)
    assert sink.notes == []
    for svq in rig.vmm.svqs.values():
        svq.dirty = sink
    net_round(rig, 2)
    ring = rig.session.rings[0]
    assert isinstance(ring, SplitRing)
    assert rig.guest.gpa(ring.used) // PAGE in sink.pages()


# ----- guest notifications ----------------------------------------------------------------------------------

@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
def test_guest_is_notified_as_its_suppression_asks(stack: contextlib.ExitStack, packed: bool,
                                                   event_idx: bool) -> None:
    rig = open_rig(stack, "sim-net", net_features(packed, event_idx), [0, 1])
    session, ring = rig.session, rig.session.rings[0]

    def rx_notifications_for_a_round() -> int:
        session.notified(0)
        net_round(rig, 3)
        return session.notified(0)

    if event_idx:  # an event index past the next round, then the next used entry itself
        if isinstance(ring, PackedRing):
            ring.set_used_event((ring.next_used + 5) % ring.num, ring.used_wrap ^ ((ring.next_used + 5) // ring.num))
        else:
            ring.set_used_event(ring.last_used + 5)
        assert rx_notifications_for_a_round() == 0
        if isinstance(ring, PackedRing):
            ring.set_used_event(ring.next_used, ring.used_wrap)
        else:
            ring.set_used_event(ring.last_used)
    else:
        ring.set_interrupts(False)
        assert rx_notifications_for_a_round() == 0
        ring.set_interrupts(True)
    assert rx_notifications_for_a_round() >= 1
    rig.stream.check()
    session.post_rx(0, 1, kick=False)  # and the shadow asks the guest for every kick
    assert ring.avail_notification().decision is Decision.MUST_NOTIFY


# ----- migration: in-flight chains ------------------------------------------------------------------------------

def test_inflight_chains_are_resubmitted_exactly_once_on_a_second_device(stack: contextlib.ExitStack,
                                                                         packed: bool) -> None:
    features = net_features(packed)
    rig = open_rig(stack, "sim-net", features, [0, 1])
    session = rig.session
    posted = session.post_rx(0, 6)
    session.send_frames(0, rig.stream.frames(2))
    for frame in session.receive_frames(0, 2):
        rig.stream.receive(frame)
    session.tx_done(0, 2)
    source = rig.vmm
    source.client.suspend()
    source.service()  # take back whatever the device used before it stopped
    states = {i: (svq.guest_base(), svq.inflight()) for i, svq in source.svqs.items()}
    assert states[0][1] == [chain.id for chain in posted[2:]]  # four RX buffers forwarded, never used
    assert states[1][1] == []
    source.close()

    target = stack.enter_context(make_target("sim-net"))
    destination = SvqVhost(target, rig.guest, vmm_layout(target))
    stack.callback(destination.close)
    destination.restore(session, states)
    session.service = destination.service
    assert destination.svqs[0].inflight() == states[0][1]
    session.send_frames(0, rig.stream.frames(4, [64, 700]))  # into the resubmitted buffers
    for frame in session.receive_frames(0, 4):
        rig.stream.receive(frame)
    session.tx_done(0, 4)
    net_round(rig, 3)
    rig.stream.check()
    assert rig.stream.received == list(range(9))
    assert not session.rings[0].outstanding and destination.svqs[0].inflight() == []


def test_inflight_state_that_does_not_match_the_ring_is_refused(stack: contextlib.ExitStack, packed: bool) -> None:
    rig = open_rig(stack, "sim-net", net_features(packed), [0, 1])
    rig.session.post_rx(0, 3)
    svq = rig.vmm.svqs[0]
    base, inflight = svq.guest_base(), svq.inflight()
    assert len(inflight) == 3
    desc, avail, used = rig.session.rings[0].addresses
    vmm = vmm_layout(rig.target)
    guest_before, vmm_free = rig.guest.memory.read(0, rig.guest.size), vmm.free_bytes
    for wrong in (inflight[:2], inflight[::-1] if packed else [inflight[0], *inflight[:2]]):
        with pytest.raises(SvqError) as info:
            ShadowVirtqueue(0, guest=rig.guest, vmm=vmm, num=16, desc=desc, avail=avail, used=used,
                            features=rig.session.features, base=base, inflight=wrong)
        assert info.value.index == 0 and "in-flight" in info.value.reason
    assert rig.guest.memory.read(0, rig.guest.size) == guest_before and vmm.free_bytes == vmm_free


# ----- the packed wrap counters -------------------------------------------------------------------------------

def test_packed_chain_as_long_as_the_ring_crosses_its_end_and_comes_back(stack: contextlib.ExitStack) -> None:
    num = 8
    rig = open_rig(stack, f"sim-blk:capacity={CAPACITY}", blk_features(True), [0], num=num, starts={0: 5 | 1 << 15})
    shadow = BlkShadow(CAPACITY)
    data = shadow.write(20, 6)
    out = BlkRequest(B.VIRTIO_BLK_T_OUT, 20, (OUTHDR.pack(B.VIRTIO_BLK_T_OUT, 0, 20),
                                              *(data[i * SECTOR:(i + 1) * SECTOR] for i in range(6))), (1,))
    inp = BlkRequest(B.VIRTIO_BLK_T_IN, 20, (OUTHDR.pack(B.VIRTIO_BLK_T_IN, 0, 20),), (SECTOR,) * 6 + (1,))
    svq = rig.vmm.svqs[0]
    assert rig.session.blk_run(0, [out])[0].status == B.VIRTIO_BLK_S_OK
    assert svq.guest_base() == encode_packed_base(PackedVqState(5, 0, 5, 0))  # one lap: both counters flipped
    read = rig.session.blk_run(0, [inp])[0]
    assert read.status == B.VIRTIO_BLK_S_OK and read.length == 6 * SECTOR + 1
    shadow.check_read(20, read.data)
    assert svq.guest_base() == encode_packed_base(PackedVqState(5, 1, 5, 1))
    assert svq.guest_used_idx() == 5 | 1 << 15


# ----- hostile guests -----------------------------------------------------------------------------------------

def shadow_published(svq: ShadowVirtqueue, rig: Rig) -> int:
    """Split: the shadow avail idx; packed: the flags of the first shadow descriptor (0 until one is written)."""
    _, avail, _ = svq.shadow_addresses
    desc = svq.shadow_addresses[0]
    vmm = rig.vmm.vmm
    if rig.session.packed:
        return vmm.read_u16(vmm.offset_of_iova(desc) + 14)
    return vmm.read_u16(vmm.offset_of_iova(avail) + 2)


@pytest.mark.parametrize(("layout", "post", "bad"), [
    ("split", "post_loop", BadInput.DESCRIPTOR_LOOP),
    ("split", "post_head_out_of_range", BadInput.INDEX_OUT_OF_RANGE),
    ("packed", "post_indirect_in_list", BadInput.INDIRECT_IN_CHAIN),
])
def test_hostile_guest_chain_is_refused_and_nothing_is_forwarded(stack: contextlib.ExitStack, layout: str,
                                                                 post: str, bad: BadInput) -> None:
    packed = layout == "packed"
    rig = open_rig(stack, f"sim-blk:capacity={CAPACITY}", blk_features(packed, indirect=True), [0])
    svq = rig.vmm.svqs[0]
    base = svq.guest_base()
    ring = rig.session.rings[0]
    assert isinstance(ring, PackedRing if packed else SplitRing)
    getattr(ring, post)()
    with pytest.raises(SvqError) as info:
        rig.vmm.service()
    assert info.value.bad is bad and info.value.index == 0
    assert svq.inflight() == [] and svq.guest_base() == base and shadow_published(svq, rig) == 0
    with pytest.raises(SvqError):  # the queue stays broken
        svq.poll()


# ----- the VMM's own requests and the observer ------------------------------------------------------------

def test_vmm_request_injected_on_the_control_queue_reaches_the_device(stack: contextlib.ExitStack) -> None:
    features = net_features(False, ctrl=True)
    rig = open_rig(stack, "sim-net", features, [0, 1, 2])
    mac = bytes.fromhex("02aabbccdd01")
    command = bytes([N.VIRTIO_NET_CTRL_MAC, N.VIRTIO_NET_CTRL_MAC_ADDR_SET]) + mac
    before = rig.guest.memory.read(0, rig.guest.size)
    assert rig.vmm.svqs[2].inject(command, rig.target.service) == N.VIRTIO_NET_OK
    assert rig.target.client.get_config(0, 6) == mac
    assert rig.guest.memory.read(0, rig.guest.size) == before  # the guest never sees the VMM's request
    net_round(rig, 2)
    rig.stream.check()


def test_observer_sees_each_returned_chain_before_the_guest(stack: contextlib.ExitStack, packed: bool) -> None:
    rig = open_rig(stack, f"sim-blk:capacity={CAPACITY}", blk_features(packed), [0])
    svq = rig.vmm.svqs[0]
    seen: list[tuple[bytes, int, int]] = []
    ring = rig.session.rings[0]
    svq.observer = lambda readable, first: seen.append((readable, first, len(ring.reap())))
    data = bytes(range(256)) * 2
    rig.session.blk_run(0, [blk_out(3, data)])
    assert seen == [(struct.pack("<IIQ", B.VIRTIO_BLK_T_OUT, 0, 3) + data, B.VIRTIO_BLK_S_OK, 0)]
