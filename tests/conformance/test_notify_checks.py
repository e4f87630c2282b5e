"""Notifications against model/notify.py: required signals arrive, suppressed ones do not, and the suite can tell.

A :class:`NotifyWatch` is attached to a :class:`DriverSession` on a reference device behind its
vhost-vdpa front (as the datapath machines attach it), with a hand-made plan of suppression
choices, and blk requests are run through it. The reference device passes every window; the
seeded notification bugs of the mutant zoo are named by the notify row they break; a device
that writes its suppression fields wrongly (played here by writing guest memory directly) is
named by the ring clause. The driver's own kicks follow the model's rows (late, skipped, sent).
Last, the blk machine itself: rings that start near the index wrap kill the wrap mutant.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test

from vdpacert.conformance.driver import traffic as TR  # noqa: N812
from vdpacert.conformance.driver.device import DriverSession
from vdpacert.conformance.driver.memory import GuestLayout
from vdpacert.conformance.driver.packed import PackedRing
from vdpacert.conformance.driver.split import SplitRing
from vdpacert.conformance.machines.datapath import DatapathMachine, clause_of, violation
from vdpacert.conformance.machines.datapath_blk import blk_machine
from vdpacert.conformance.machines.notify_watch import (
    AVAIL_EVENT,
    CALL_SIGNALLED,
    EVENT_FLAGS,
    USED_FLAGS,
    DriverPlan,
    NotifyWatch,
    WindowChoice,
    draw_driver,
)
from vdpacert.conformance.mutants.registry import target_string
from vdpacert.conformance.mutants.rings import EventIdxAlwaysNotify, EventIdxMissedNotify
from vdpacert.impl.guestmem import GuestMemory
from vdpacert.impl.sim_blk import DEFAULT_FEATURES as BLK_OFFER
from vdpacert.impl.sim_blk import SimBlk
from vdpacert.impl.vhost_vdpa import VhostVdpa
from vdpacert.model.notify import RingPosition
from vdpacert.uapi import virtio_blk as B  # noqa: N812
from vdpacert.uapi.vhost_types import VHOST_F_LOG_ALL
from vdpacert.uapi.virtio_config import VIRTIO_F_RING_PACKED
from vdpacert.uapi.virtio_ring import (
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
)

GPA = 0x3_0000_0000
CAPACITY = 64
SETTLE = 0.05
RING_BITS = (1 << VIRTIO_F_RING_PACKED) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_RING_F_INDIRECT_DESC)


def blk_features(packed: bool, event_idx: bool) -> int:
    return (BLK_OFFER & ~RING_BITS & ~(1 << VHOST_F_LOG_ALL) | (1 << VIRTIO_F_RING_PACKED if packed else 0)
            | (1 << VIRTIO_RING_F_EVENT_IDX if event_idx else 0))


class Watched:
    """A session on a sim-blk (or a mutant of it) with a NotifyWatch attached, and the clauses it counted."""

    def __init__(self, layout: GuestLayout, device: SimBlk, features: int, plan: list[WindowChoice],
                 start: int | None = None) -> None:
        self.front = VhostVdpa(device)
        self.session = DriverSession(self.front, layout, features, queues=[0], num=16,
                                     starts={} if start is None else {0: start},
                                     service=lambda: self.front.poll_kicks(0), timeout=1.0)
        self.counts: Counter[str] = Counter()
        self.watch = NotifyWatch(self.count, violation, self.front.get_status, SETTLE)
        self.session.bring_up()
        self.watch.attach(self.session, DriverPlan({}, {0: tuple(plan)}))
        self.shadow = TR.BlkShadow(CAPACITY)

    def count(self, clause: str) -> None:
        self.counts[clause] += 1

    def writes(self, n: int, sector: int = 0) -> None:
        """``n`` one-sector writes in one batch (one kick), all answered OK."""
        done = self.session.blk_run(0, [TR.blk_out(sector + i, self.shadow.write(sector + i)) for i in range(n)])
        assert [c.status for c in done] == [B.VIRTIO_BLK_S_OK] * n

    @property
    def ring(self) -> SplitRing | PackedRing:
        return self.session.rings[0]

    def close(self) -> None:
        self.watch.detach()
        self.session.close()
        self.front.close()


Opener = Callable[..., Watched]


@pytest.fixture
def layout() -> Iterator[GuestLayout]:
    memory = GuestMemory(2 << 20, gpa=GPA)
    yield GuestLayout(memory)
    memory.close()


@pytest.fixture
def watched(layout: GuestLayout) -> Iterator[Opener]:
    opened: list[Watched] = []

    def opener(device: SimBlk, features: int, plan: list[WindowChoice], start: int | None = None) -> Watched:
        opened.append(Watched(layout, device, features, plan, start))
        return opened[-1]

    yield opener
    for each in reversed(opened):
        each.close()


# ----- used buffer notifications -----------------------------------------------------------------------

#: One choice per window with traffic, in turn: every row of the layout's table comes up in a few batches.
SPLIT_FLAGS_PLAN = [WindowChoice(flags=f, offset=7) for f in (0, 1, 2, 0x8000)]
SPLIT_EVENT_PLAN = [WindowChoice(offset=o) for o in (0, 1, 2, -1, 9)] + [WindowChoice(flags=1, offset=1)]
PACKED_FLAGS_PLAN = [WindowChoice(flags=f, offset=3) for f in (VRING_PACKED_EVENT_FLAG_ENABLE,
                                                             VRING_PACKED_EVENT_FLAG_DISABLE,
                                                             VRING_PACKED_EVENT_FLAG_DESC, 3)]
PACKED_EVENT_PLAN = [WindowChoice(flags=VRING_PACKED_EVENT_FLAG_DESC, offset=o) for o in (0, 4, -2, 20)] + [
    WindowChoice(flags=f) for f in (VRING_PACKED_EVENT_FLAG_ENABLE, VRING_PACKED_EVENT_FLAG_DISABLE, 3)]


@pytest.mark.parametrize(("packed", "event_idx", "plan", "rows"), [
    (False, False, SPLIT_FLAGS_PLAN, ["flags.flags_clear", "flags.flags_set", "flags.flags_invalid",
                                      "flags.nothing_new"]),
    (False, True, SPLIT_EVENT_PLAN, ["event_idx.event_passed", "event_idx.event_not_passed", "event_idx.nothing_new"]),
    (True, False, PACKED_FLAGS_PLAN, ["flags.packed_enable", "flags.packed_disable", "flags.packed_reserved",
                                      "flags.packed_desc_without_event_idx"]),
    (True, True, PACKED_EVENT_PLAN, ["event_idx.event_passed", "event_idx.event_not_passed",
                                     "event_idx.packed_enable", "event_idx.packed_disable",
                                     "event_idx.packed_reserved"]),
], ids=["split-flags", "split-event_idx", "packed-flags", "packed-event_idx"])
def test_the_reference_device_signals_as_the_model_says(watched: Opener, packed: bool, event_idx: bool,
                                                        plan: list[WindowChoice], rows: list[str]) -> None:
    """Batches of 1-3 requests across the wrap, every suppression choice in turn: no window fails."""
    start = (14 | 1 << 15) if packed else 0xFFF4
    w = watched(SimBlk("notify-ref", capacity=CAPACITY), blk_features(packed, event_idx), plan, start)
    for batch in range(20):
        w.writes(1 + batch % 3, sector=batch)
        w.watch.next_step()
    layout = "packed" if packed else "split"
    for row in rows:
        assert w.counts[f"notify.{layout}.used.{row}"] > 0, f"notify.{layout}.used.{row} never came up"
    assert w.counts[CALL_SIGNALLED] > 0
    assert w.counts[{(False, False): AVAIL_EVENT, (False, True): USED_FLAGS}.get((packed, event_idx),
                                                                                 EVENT_FLAGS)] > 0


def test_a_notification_missed_inside_the_batch_is_caught(watched: Opener) -> None:
    """used_event at the first of three entries: the device that only looks at the last one stays silent."""
    w = watched(EventIdxMissedNotify("notify-missed", capacity=CAPACITY), blk_features(False, True),
                [WindowChoice(offset=0)])
    with pytest.raises(Exception) as caught:
        w.writes(3)
    assert clause_of(caught.value) == "notify.split.used.event_idx.event_passed"
    assert "a required notification was not sent" in str(caught.value)


def test_a_notification_sent_although_suppressed_is_flagged(watched: Opener) -> None:
    """used_event well past the batch: a device that signals after every batch breaks the SHOULD NOT row."""
    w = watched(EventIdxAlwaysNotify("notify-always", capacity=CAPACITY), blk_features(False, True),
                [WindowChoice(offset=40)])
    with pytest.raises(Exception) as caught:
        w.writes(2)
    assert clause_of(caught.value) == "notify.split.used.event_idx.event_not_passed"


def test_the_lower_flags_bit_is_ignored_under_event_idx(watched: Opener) -> None:
    """NO_INTERRUPT written anyway (a driver error) with used_event inside the batch: the signal is still due."""
    w = watched(SimBlk("notify-flags", capacity=CAPACITY), blk_features(False, True), [WindowChoice(flags=1, offset=1)])
    w.writes(3)
    assert w.counts["notify.split.used.event_idx.event_passed"] == 1


# ----- what the device writes to suppress the driver's notifications ---------------------------------

@pytest.mark.parametrize(("packed", "event_idx", "clause"), [(False, False, AVAIL_EVENT), (False, True, USED_FLAGS),
                                                             (True, False, EVENT_FLAGS)])
def test_a_wrong_suppression_write_is_named(watched: Opener, packed: bool, event_idx: bool, clause: str) -> None:
    w = watched(SimBlk("notify-supp", capacity=CAPACITY), blk_features(packed, event_idx), [WindowChoice()])
    w.writes(1)
    w.watch.check()
    memory, ring = w.session.layout.memory, w.ring
    if isinstance(ring, PackedRing):  # the device event suppression structure: DESC without EVENT_IDX
        memory.write(ring.device_event, struct.pack("<HH", 3, VRING_PACKED_EVENT_FLAG_DESC))
    elif event_idx:  # used flags under EVENT_IDX
        memory.write(ring.used, struct.pack("<H", 1))
    else:  # avail_event without EVENT_IDX
        memory.write(ring.used + 4 + 8 * ring.num, struct.pack("<H", 0x1234))
    with pytest.raises(Exception) as caught:
        w.watch.check()
    assert clause_of(caught.value) == clause


# ----- the driver's own notifications ----------------------------------------------------------------------

def test_a_required_kick_sent_late_still_gets_the_requests_done(watched: Opener) -> None:
    w = watched(SimBlk("notify-late", capacity=CAPACITY), blk_features(False, False), [WindowChoice(late=True)])
    w.writes(2)
    assert w.counts["notify.split.avail.flags.flags_clear"] == 1  # withheld on purpose, the device looked at


@pytest.mark.parametrize("obey", [True, False])
def test_a_kick_the_device_suppressed(watched: Opener, obey: bool) -> None:
    """Suspended, the device has not moved avail_event: the second kick is one it asked not to get."""
    w = watched(SimBlk("notify-supp-kick", capacity=CAPACITY), blk_features(False, True), [WindowChoice(obey=obey)])
    w.front.suspend()
    first = w.session.blk_submit(0, TR.blk_in(0, 1))
    second = w.session.blk_submit(0, TR.blk_in(1, 1))
    assert w.counts["notify.split.avail.event_idx.event_not_passed"] == (0 if obey else 1)
    w.front.resume()
    done = w.session.blk_complete(0, 2)
    assert sorted(c.id for c in done) == sorted([first.id, second.id])


def test_a_kick_with_nothing_new(watched: Opener) -> None:
    w = watched(SimBlk("notify-idle", capacity=CAPACITY), blk_features(True, False), [WindowChoice()])
    w.writes(1)
    w.session.kick(0)
    assert w.counts["notify.packed.avail.flags.nothing_new"] == 1


def test_the_packed_used_position_is_read_without_reaping(watched: Opener) -> None:
    w = watched(SimBlk("notify-pos", capacity=CAPACITY), blk_features(True, False), [WindowChoice()], 14 | 1 << 15)
    ring = w.ring
    assert isinstance(ring, PackedRing)
    for sector in range(3):
        w.session.blk_submit(0, TR.blk_in(sector, 1), kick=False)
    w.session.kick(0)
    assert ring.device_used_position() == RingPosition(14 + 9 - 16, 0)  # three 3-slot lists past the end
    assert (ring.next_used, ring.used_wrap) == (14, 1)  # nothing reaped yet
    w.session.blk_complete(0, 3)
    assert ring.device_used_position() == RingPosition(ring.next_used, ring.used_wrap) == RingPosition(7, 0)


# ----- ring starts and the machine ---------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_one_draw_serves_every_ring_layout(data: st.DataObject) -> None:
    """Rings at the reset position or near the wrap; every layout's suppression table within each queue's turn."""
    draws = draw_driver(data, [0, 1], 16)
    for packed in (False, True):
        for event_idx in (False, True):
            plan = draws.plan(blk_features(packed, event_idx), [0, 1, 2], 16)  # queue 2 was not drawn
            assert set(plan.choices) == set(plan.starts) == {0, 1, 2}
            for start in plan.starts.values():
                if packed:
                    assert 0 <= start & 0x7FFF < 16 and start >> 15 in (0, 1)
                else:
                    assert start == 0 or 0x10000 - 16 <= start <= 0xFFFF
            flags = {choice.flags for choice in plan.choices[0]}
            assert flags >= ({0, 1, 2, 3} if packed and not event_idx else {0, 1, 2} if packed else
                             {0, 1} if event_idx else {0, 1, 2, 3, 0x8000})
            assert any(choice.late for choice in plan.choices[1]) and any(c.again for c in plan.choices[1])


@pytest.fixture
def _close_targets() -> Iterator[None]:
    yield
    DatapathMachine.close_targets()


@pytest.mark.usefixtures("_close_targets")
def test_the_blk_machine_kills_the_used_index_wrap_mutant() -> None:
    """Only a ring that starts near 65535 shows it: the machine's bring-up must get there by itself."""
    machine = blk_machine(target_string("used_idx_wrap_off_by_one"))
    hunt = settings(max_examples=40, stateful_step_count=20, deadline=None, phases=[Phase.generate],
                    derandomize=True, suppress_health_check=list(HealthCheck), database=None)
    with pytest.raises(Exception) as caught:
        run_state_machine_as_test(machine, settings=hunt)
    # The used index published one short at the wrap: the used ring check, or GET_VRING_BASE after a suspend.
    assert clause_of(caught.value) in {"ring.split.device.used_ring", "vdpa_device.vq_state.used_idx_preserved",
                                       "suite.lockstep.vq_state"}
