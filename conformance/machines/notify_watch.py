"""Notifications in both directions, held against :mod:`vdpacert.model.notify`, and where the rings start.

Used buffer notifications (device to driver). Each queue's driver-side suppression is one of a few
choices drawn at bring-up (:class:`DriverPlan`), taken in turn: split ``flags`` 0, NO_INTERRUPT or
an invalid value (with a ``used_event`` the device must ignore), or with VIRTIO_F_EVENT_IDX a
``used_event`` at, before, inside or well after the entries about to be used (across the
65535 -> 0 wrap when the ring starts there), sometimes with the lower flags bit set, which the
device must ignore; packed ENABLE, DISABLE, DESC at such a slot, or the reserved value. A choice
stays put for one *window*: the used entries the device publishes between two checks. After every
kick and at the end of every step each queue's window is closed: the call eventfd is read once,
the count is compared with the row the model gives for the window, and the next window opens
where this one ended (with the next choice if the device used anything in this one).

Why windows and not "batches": the driver cannot see the device's own decision points, and an
eventfd sums every signal since it was last read. Both are harmless. The device's decision points
cut a window into batches; with flags, every batch has the same row, so "at least one signal"
(MUST) and "none" (SHOULD NOT) carry over to the window; with an event index, the event lies in
exactly one batch when it lies in the window, so again the window's row says what the device owed.
A missing required signal is waited for (``settle``) before it fails; the window is then widened
to whatever the device published meanwhile. Windows a broken queue (DEVICE_NEEDS_RESET) or a new
session ends are dropped, not judged: a device may signal on error. A packed window of a full
ring or more is not judged against SHOULD NOT (the model's window is at most one lap).

The driver's own notifications (available buffer notifications) are decided by the model's row
too: :meth:`vdpacert.conformance.driver.device.DriverSession.kick` asks this watch how to kick.
The rows bind the driver, so a row counts as exercised only where the driver broke it on purpose
and the device's reaction was checked: a required notification sent *late* (the device is
serviced un-notified and its windows checked before the kick), a suppressed one sent anyway, or a
notification where the row leaves it open (nothing new published). Suppressed notifications are
otherwise obeyed (the kick is skipped): the device asked not to be kicked, so it must get to the
buffers on its own, and the machines' own checks then demand them. The device's suppression writes
are checked at every window: used flags 0 under EVENT_IDX, no avail_event written without it, and
no packed DESC without EVENT_IDX.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from hypothesis import strategies as st

from vdpacert.conformance.driver.device import DriverSession, KickChoice
from vdpacert.conformance.driver.packed import PackedRing
from vdpacert.conformance.driver.split import SplitRing
from vdpacert.model.notify import (
    Case,
    Decision,
    Direction,
    NotifyRule,
    RingPosition,
    packed_notification,
    split_notification,
)
from vdpacert.model.ring_index import u16
from vdpacert.model.spec import Level
from vdpacert.uapi.virtio_config import VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_RING_PACKED
from vdpacert.uapi.virtio_ring import (
    VIRTIO_RING_F_EVENT_IDX,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_PACKED_EVENT_F_WRAP_CTR,
    VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
)

__all__ = ["AVAIL_EVENT", "CALL_SIGNALLED", "EVENT_FLAGS", "USED_FLAGS", "DriverDraws", "DriverPlan", "NotifyWatch",
           "QueueDraws", "WindowChoice", "draw_driver"]

CALL_SIGNALLED = "suite.notify.call_signalled"
AVAIL_EVENT = "ring.split.device.avail_event"
USED_FLAGS = "ring.split.device.used_flags"
EVENT_FLAGS = "ring.packed.device.event_flags"

_PACKED_RESERVED = 0x3
#: Split flags without EVENT_IDX: mostly the two valid values, now and then one the model calls invalid.
_SPLIT_FLAGS = (0, VRING_AVAIL_F_NO_INTERRUPT, 0x2, 0, VRING_AVAIL_F_NO_INTERRUPT, 0x3, 0x8000)
#: Split flags with EVENT_IDX: 0 as the driver must write; 1 (the device must ignore the lower bit) now and then.
_EVENT_IDX_FLAGS = (0, 0, VRING_AVAIL_F_NO_INTERRUPT, 0)
_PACKED_FLAGS = (VRING_PACKED_EVENT_FLAG_ENABLE, VRING_PACKED_EVENT_FLAG_DISABLE, VRING_PACKED_EVENT_FLAG_DESC,
                 _PACKED_RESERVED)
#: With EVENT_IDX, DESC half the time: its event lands inside the window or outside it (two rows).
_PACKED_EVENT_IDX_FLAGS = (VRING_PACKED_EVENT_FLAG_DESC, VRING_PACKED_EVENT_FLAG_ENABLE, VRING_PACKED_EVENT_FLAG_DESC,
                           VRING_PACKED_EVENT_FLAG_DISABLE, VRING_PACKED_EVENT_FLAG_DESC, _PACKED_RESERVED)
#: Where the event index goes, from the device's used position when the window opens: at the first entry the
#: device will use (often: a window may hold one entry), inside its next batch, just behind (already passed), or
#: well ahead (0x8000: half the index space away; on a packed ring every offset is taken modulo two laps).
#: Thirteen entries, a prime: a walk in steps of any stride visits them all.
_EVENT_OFFSETS = (0, 1, 0, -1, 2, 0, 40, 0, 3, -3, 0, 9, 0x8000)
#: How the driver makes its kicks, (late, obey, again), taken in turn: none, each alone, late and again.
_KICKS = ((False, False, False), (True, False, False), (False, True, False), (False, False, True), (True, False, True))


@dataclass(frozen=True)
class WindowChoice:
    """What the driver asks of one queue for one window, and how it makes its own notifications meanwhile.

    ``flags``: split avail ``flags`` or packed driver event ``flags``. ``offset``: the event index
    (split ``used_event``, packed DESC slot) relative to the device's used position when the window
    opens; without EVENT_IDX the split ``used_event`` is still written there (the device must
    ignore it). ``late``: required kicks are sent after a look at the un-notified device.
    ``obey``: kicks the device suppressed are skipped (else sent anyway). ``again``: a kick that
    published something is followed by one with nothing new (the driver may send it).
    """

    flags: int = 0
    offset: int = 0
    late: bool = False
    obey: bool = False
    again: bool = False


@dataclass(frozen=True)
class DriverPlan:
    """For one ring layout: where each ring starts (a vring base) and the choices its windows take in turn."""

    starts: Mapping[int, int] = field(default_factory=dict)
    choices: Mapping[int, tuple[WindowChoice, ...]] = field(default_factory=dict)

    def choice(self, index: int, turn: int) -> WindowChoice:
        choices = self.choices.get(index)
        return choices[turn % len(choices)] if choices else WindowChoice()


@dataclass(frozen=True)
class QueueDraws:
    """One queue's drawn material, whatever ring layout it ends up in.

    ``back``: the ring starts this many entries (split) or slots (packed) before the index wrap,
    ``wrap`` the packed wrap counter there; None: at the reset position. The ``turn`` values say
    where the walks through the layout's suppression table, the event offsets and the kick
    behaviours begin (the offsets go in steps of ``stride``): every case comes up within a few
    windows of any bring-up, whatever is drawn, and a draw is four integers, not a permutation.
    """

    back: int | None
    wrap: int
    turn: int
    offset_turn: int
    stride: int
    kick_turn: int

    def start(self, packed: bool, num: int) -> int:
        if self.back is None:
            return 1 << 15 if packed else 0
        return (num - self.back) | self.wrap << 15 if packed else 0x10000 - self.back

    def choices(self, table: Sequence[int]) -> tuple[WindowChoice, ...]:
        count = max(len(table), len(_EVENT_OFFSETS))
        return tuple(WindowChoice(table[(self.turn + i) % len(table)],
                                  _EVENT_OFFSETS[(self.offset_turn + i * self.stride) % len(_EVENT_OFFSETS)],
                                  *_KICKS[(self.kick_turn + i) % len(_KICKS)]) for i in range(count))


@dataclass(frozen=True)
class DriverDraws:
    """What a bring-up draws for the driver side, for any ring layout.

    Other rules bring the device up again with another layout (a hostile class that needs the
    packed ring, a renegotiation); :meth:`plan` serves them from the same draws.
    """

    queues: Mapping[int, QueueDraws] = field(default_factory=dict)

    def plan(self, features: int, queues: Sequence[int], num: int) -> DriverPlan:
        """The plan for a bring-up with ``features`` of ``queues`` of ``num`` entries (no draws: the plain driver)."""
        packed = bool(features >> VIRTIO_F_RING_PACKED & 1)
        event_idx = bool(features >> VIRTIO_RING_F_EVENT_IDX & 1)
        table = {(False, False): _SPLIT_FLAGS, (False, True): _EVENT_IDX_FLAGS,
                 (True, False): _PACKED_FLAGS, (True, True): _PACKED_EVENT_IDX_FLAGS}[packed, event_idx]
        fallback = next(iter(self.queues.values()), None)  # a queue the draws did not know (another queue count)
        drawn = {q: self.queues.get(q, fallback) for q in queues}
        return DriverPlan({q: d.start(packed, num) for q, d in drawn.items() if d is not None},
                          {q: d.choices(table) for q, d in drawn.items() if d is not None})


def _queue_draws(data: st.DataObject, num: int, near_wrap: bool, index: int) -> QueueDraws:
    back = data.draw(st.integers(1, num), label=f"queue {index}: start this far before the wrap") if near_wrap else None
    wrap = int(data.draw(st.booleans(), label=f"queue {index}: packed wrap counter at start")) if near_wrap else 1
    turns = data.draw(st.tuples(st.integers(0, 41), st.integers(0, len(_EVENT_OFFSETS) - 1),
                                st.integers(1, len(_EVENT_OFFSETS) - 1), st.integers(0, len(_KICKS) - 1)),
                      label=f"queue {index}: (suppression, offset, offset stride, kick) turns")
    return QueueDraws(back, wrap, *turns)


def draw_driver(data: st.DataObject, queues: Sequence[int], num: int) -> DriverDraws:
    """Draw :class:`DriverDraws` for ``queues`` of ``num`` entries: near the index wrap about half the time."""
    near_wrap = data.draw(st.booleans(), label="rings start near the index wrap")
    return DriverDraws({q: _queue_draws(data, num, near_wrap, q) for q in queues})


Ring = SplitRing | PackedRing


@dataclass
class _Window:
    """One queue's open window: the ring it belongs to and the device's used position when it opened."""

    ring: Ring
    old: int | RingPosition
    armed: tuple[int, int]  # (flags, event) as the driver wrote them for this window


class NotifyWatch:
    """The used-notification windows of one session's queues, and the session's kick policy.

    ``count`` and ``fail`` are the machine's (a check counts its clause; ``fail`` returns the
    exception to raise); ``status`` reads the device status; ``settle`` is how long a required
    signal is waited for.
    """

    def __init__(self, count: Callable[[str], None], fail: Callable[[str, str], Exception],
                 status: Callable[[], int], settle: float, warn: Callable[[str, str], None] | None = None) -> None:
        self.count, self.fail, self.status, self.settle = count, fail, status, settle
        #: Where a SHOULD-level deviation is filed so the example goes on (None: it stops it, like a MUST).
        self.warn = warn
        self.session: DriverSession | None = None
        self.plan = DriverPlan()
        self.opened: dict[int, int] = {}  # turns taken per queue, across bring-ups: which choice is in effect
        self.windows: dict[int, _Window] = {}

    # ----- wiring ----------------------------------------------------------------------------------------

    def attach(self, session: DriverSession, plan: DriverPlan) -> None:
        """Watch a session just brought up: its kicks come here, every queue opens its first window."""
        self.session, self.plan = session, plan
        session.kick_observer = self
        self.windows.clear()  # the turns (``opened``) go on: re-bring-ups keep walking the cases
        for index in session.rings:
            self._open(index)

    def detach(self) -> None:
        if self.session is not None:
            self.session.kick_observer = None
        self.session = None
        self.windows.clear()

    def _position(self, ring: Ring) -> int | RingPosition:
        return ring.used_idx() if isinstance(ring, SplitRing) else ring.device_used_position()

    def choice(self, index: int) -> WindowChoice:
        """The plan's choice in effect on queue ``index`` (the open window's)."""
        return self.plan.choice(index, self.opened.get(index, 1) - 1)

    def _open(self, index: int, old: int | RingPosition | None = None, *, advance: bool = True) -> None:
        """Open a window on queue ``index`` at the device's used position (``old``: where the last one
        closed), with the plan's next suppression choice (``advance``) or the same one again; a fresh
        window forgets earlier signals."""
        assert self.session is not None
        ring = self.session.rings[index]
        if old is None:
            self.session.notified(index)  # what was signalled before belongs to no window
            old = self._position(ring)
        if advance or index not in self.opened:
            self.opened[index] = self.opened.get(index, 0) + 1
        choice = self.choice(index)
        last = self.windows.get(index)
        if isinstance(ring, SplitRing):
            assert isinstance(old, int)
            armed = (choice.flags, u16(old + choice.offset))
            if last is None or last.ring is not ring or last.armed != armed:  # the same again: nothing to write
                ring.write_avail_flags(armed[0])
                ring.write_used_event(armed[1])
            self.windows[index] = _Window(ring, old, armed)
        else:
            assert isinstance(old, RingPosition)
            at = (old.linear(ring.num) + choice.offset) % (2 * ring.num)
            slot, wrap = (at, 1) if at < ring.num else (at - ring.num, 0)
            armed = (choice.flags, slot | wrap << VRING_PACKED_EVENT_F_WRAP_CTR)
            if last is None or last.ring is not ring or last.armed != armed:
                ring.set_driver_event(*armed)
            self.windows[index] = _Window(ring, old, armed)

    def next_step(self) -> None:
        """The end of a machine step: every window closes (and the next one opens)."""
        self.check()

    # ----- the used-notification check ---------------------------------------------------------------------

    def _rule(self, window: _Window, new: int | RingPosition) -> tuple[NotifyRule, int]:
        """The model's row for the window ending at ``new`` and its length (entries or slots)."""
        ring = window.ring
        if isinstance(ring, SplitRing):
            assert isinstance(window.old, int) and isinstance(new, int)
            rule = split_notification(Direction.USED, event_idx=ring.event_idx, flags=ring.avail_flags(),
                                      event=ring.used_event(), old_idx=window.old, new_idx=new)
            return rule, u16(new - window.old)
        assert isinstance(window.old, RingPosition) and isinstance(new, RingPosition)
        off_wrap, flags = ring.read_driver_event()
        rule = packed_notification(Direction.USED, event_idx=ring.event_idx, event_flags=flags, off_wrap=off_wrap,
                                   num=ring.num, old=window.old, new=new)
        return rule, (new.linear(ring.num) - window.old.linear(ring.num)) % (2 * ring.num)

    def check(self, indexes: Sequence[int] | None = None) -> None:
        """Close the windows of ``indexes`` (default: every queue) and start new ones where they ended."""
        session = self.session
        if session is None:
            return
        for index in list(session.rings) if indexes is None else indexes:
            self._check(session, index)

    def _check(self, session: DriverSession, index: int) -> None:
        ring = session.rings.get(index)
        window = self.windows.get(index)
        if ring is None:
            return
        if window is None or window.ring is not ring:
            self._open(index)
            return
        self._suppression_writes(window)
        new = self._position(ring)
        rule, span = self._rule(window, new)
        signals = session.notified(index)
        if rule.decision is Decision.MUST_NOTIFY and not signals:
            signals = session.wait_notified(index, self.settle)  # a device that signals after publishing
            later = self._position(ring)
            if later != new:  # it published more meanwhile: the window grows, the rows still add up
                new = later
                rule, span = self._rule(window, new)
        judged = not (isinstance(ring, PackedRing) and (span > ring.num or (span == ring.num
                                                        and rule.decision is Decision.SHOULD_NOT_NOTIFY)))
        violation = rule.violation(bool(signals)) if judged else None
        detail = "" if violation is None else f"queue {index}: {violation.message}; " + self._describe(window, new,
                                                                                                      signals)
        self._open(index, new, advance=span > 0)
        if not judged or (violation is not None and self.status() & VIRTIO_CONFIG_S_NEEDS_RESET):
            return  # longer than the model's window, or a broken queue (it may signal, or stop): not judged
        self.count(rule.rule)
        if rule.decision is Decision.MUST_NOTIFY:
            self.count(CALL_SIGNALLED)
        if violation is not None:
            if violation.level is Level.SHOULD and self.warn is not None:
                self.warn(rule.rule, detail)  # a SHOULD not followed: filed, and the example goes on
                return
            raise self.fail(rule.rule, detail)

    @staticmethod
    def _describe(window: _Window, new: int | RingPosition, signals: int) -> str:
        ring = window.ring
        if isinstance(ring, SplitRing):
            return (f"used idx {window.old} -> {new}, avail flags {ring.avail_flags():#x}, used_event "
                    f"{ring.used_event()}, {signals} signal(s) on the call eventfd")
        off_wrap, flags = ring.read_driver_event()
        return (f"used position {window.old} -> {new}, driver event flags {flags:#x} off_wrap {off_wrap:#x}, "
                f"{signals} signal(s) on the call eventfd")

    def _suppression_writes(self, window: _Window) -> None:
        """What the device wrote to suppress the driver's notifications is within what the model allows."""
        ring = window.ring
        if isinstance(ring, SplitRing):
            if ring.event_idx:
                self.count(USED_FLAGS)
                if ring.used_flags() != 0:
                    raise self.fail(USED_FLAGS, f"{ring.name}: used flags {ring.used_flags():#x} under EVENT_IDX")
            else:
                self.count(AVAIL_EVENT)
                if ring.avail_event() != ring.initial_avail_event:
                    raise self.fail(AVAIL_EVENT, f"{ring.name}: avail_event changed from {ring.initial_avail_event} "
                                                 f"to {ring.avail_event()} without EVENT_IDX")
            return
        self.count(EVENT_FLAGS)
        off_wrap, flags = ring.read_device_event()
        if not ring.event_idx and flags & 0x3 == VRING_PACKED_EVENT_FLAG_DESC:
            raise self.fail(EVENT_FLAGS, f"{ring.name}: device event flags DESC (off_wrap {off_wrap:#x}) without "
                                         "EVENT_IDX")

    # ----- the driver's own notifications (KickObserver) -----------------------------------------------------

    def choose_kick(self, index: int, rule: NotifyRule) -> KickChoice:
        choice = self.choice(index)
        if rule.decision is Decision.MUST_NOTIFY and choice.late:
            return KickChoice.LATE
        if rule.decision is Decision.SHOULD_NOT_NOTIFY and choice.obey:
            return KickChoice.SKIP
        return KickChoice.SEND

    def before_late_kick(self, index: int, rule: NotifyRule) -> None:
        """A required notification withheld while the device ran: what it did meanwhile is checked now."""
        self.check()
        self.count(rule.rule)

    def after_kick(self, index: int, rule: NotifyRule, choice: KickChoice) -> None:
        self.check()
        if choice is KickChoice.SEND and rule.decision is not Decision.MUST_NOTIFY:
            self.count(rule.rule)  # a suppressed notification sent anyway, or one the row leaves open
        if self.session is not None and rule.case is not Case.NOTHING_NEW and self.choice(index).again:
            self.session.kick(index)  # once more, nothing new: the device must use nothing it was not given
