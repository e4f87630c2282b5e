"""When a notification must, should not, or may be sent: the suppression rules as a table.

Used buffer notifications go from the device to the driver after it writes used entries;
available buffer notifications go from the driver to the device after it publishes. The
receiving side suppresses them with flags (split ``VRING_AVAIL_F_NO_INTERRUPT`` /
``VRING_USED_F_NO_NOTIFY``; packed ENABLE / DISABLE) or, with VIRTIO_F_EVENT_IDX, with an
event index (split ``used_event`` / ``avail_event``; packed DESC with ``off_wrap``).

The levels are the spec's own, and they are asymmetric: suppression is only a hint, so a
suppressed notification is SHOULD NOT (the receiver MUST handle spurious notifications),
while an unsuppressed one is MUST. The packed section (2.8.10) states the mechanism but
no level at all; its rows carry the split levels by analogy and say so (``normative``
False), so a checker can tell a broken sentence from a broken analogy.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from vdpacert.uapi.virtio_ring import (
    VRING_PACKED_EVENT_F_WRAP_CTR,
    VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
)

from . import sections
from .chains import Layout
from .ring_index import PACKED_IDX_MASK, u16, vring_need_event
from .spec import Level, Section, Violation

SPLIT_AVAIL_SUPPRESSION_DRIVER: Final = Section(
    "2.7.10.1", "Driver Requirements: Available Buffer Notification Suppression"
)
SPLIT_USED_SUPPRESSION_DRIVER: Final = Section(
    "2.7.7.1", "Driver Requirements: Used Buffer Notification Suppression"
)


class Direction(enum.Enum):
    USED = "used buffer notification (device to driver)"
    AVAIL = "available buffer notification (driver to device)"


class Decision(enum.Enum):
    MUST_NOTIFY = "must notify"
    SHOULD_NOT_NOTIFY = "should not notify"
    MAY_NOTIFY = "may notify"  # the spec leaves it open; the receiver must cope either way


class Case(enum.Enum):
    """What the sender observes in the receiver's suppression structure after publishing."""

    NOTHING_NEW = "no entry was published since the last decision"
    FLAGS_CLEAR = "flags is 0"
    FLAGS_SET = "flags is 1"
    FLAGS_INVALID = "flags is neither 0 nor 1"
    EVENT_PASSED = "the event index lies in the window just published"
    EVENT_NOT_PASSED = "the event index lies outside the window just published"
    PACKED_ENABLE = "event flags ENABLE"
    PACKED_DISABLE = "event flags DISABLE"
    PACKED_DESC_WITHOUT_EVENT_IDX = "event flags DESC without VIRTIO_F_EVENT_IDX (invalid)"
    PACKED_RESERVED = "event flags 0x3 (reserved)"


@dataclass(frozen=True)
class NotifyRule:
    """One row: in this layout and direction, with or without EVENT_IDX, in this case, decide so."""

    layout: Layout
    direction: Direction
    event_idx: bool
    case: Case
    decision: Decision
    level: Level | None  # None where the decision is MAY
    citation: Section
    normative: bool  # False where the spec gives no level and the row follows the split rule

    @property
    def rule(self) -> str:
        """The stable id: ``notify.<layout>.<direction>.<event_idx|flags>.<case>``."""
        mode = "event_idx" if self.event_idx else "flags"
        return f"notify.{self.layout.value}.{self.direction.name.lower()}.{mode}.{self.case.name.lower()}"

    @property
    def summary(self) -> str:
        return f"{self.direction.name.lower()} notification, {self.case.value}: {self.decision.value}"

    def violation(self, notified: bool) -> Violation | None:
        """The broken rule if the sender did (``notified``) or did not notify, else None."""
        if self.level is None:
            return None
        if self.decision is Decision.MUST_NOTIFY and not notified:
            what = "a required notification was not sent"
        elif self.decision is Decision.SHOULD_NOT_NOTIFY and notified:
            what = "a suppressed notification was sent"
        else:
            return None
        basis = "" if self.normative else " (level by analogy with the split ring; §2.8.10 states none)"
        return Violation(self.rule, self.level, self.citation, f"{what}: {self.case.value}{basis}")


def _rows() -> tuple[NotifyRule, ...]:
    must, should_not, may = Decision.MUST_NOTIFY, Decision.SHOULD_NOT_NOTIFY, Decision.MAY_NOTIFY
    rows: list[NotifyRule] = []
    for direction, split_cite in (
        (Direction.USED, sections.SPLIT_USED_SUPPRESSION_DEVICE),
        (Direction.AVAIL, SPLIT_AVAIL_SUPPRESSION_DRIVER),
    ):
        driver_side = SPLIT_USED_SUPPRESSION_DRIVER if direction is Direction.USED else (
            sections.SPLIT_AVAIL_SUPPRESSION)
        split = Layout.SPLIT
        rows += [
            NotifyRule(split, direction, False, Case.NOTHING_NEW, may, None, driver_side, True),
            NotifyRule(split, direction, False, Case.FLAGS_CLEAR, must, Level.MUST, split_cite, True),
            NotifyRule(split, direction, False, Case.FLAGS_SET, should_not, Level.SHOULD, split_cite, True),
            NotifyRule(split, direction, False, Case.FLAGS_INVALID, may, None, driver_side, True),
            NotifyRule(split, direction, True, Case.NOTHING_NEW, may, None, driver_side, True),
            NotifyRule(split, direction, True, Case.EVENT_PASSED, must, Level.MUST, split_cite, True),
            NotifyRule(split, direction, True, Case.EVENT_NOT_PASSED, should_not, Level.SHOULD, split_cite, True),
        ]
        packed, cite = Layout.PACKED, sections.PACKED_EVENT_SUPPRESSION
        for event_idx in (False, True):
            rows += [
                NotifyRule(packed, direction, event_idx, Case.NOTHING_NEW, may, None, cite, False),
                NotifyRule(packed, direction, event_idx, Case.PACKED_ENABLE, must, Level.MUST, cite, False),
                NotifyRule(packed, direction, event_idx, Case.PACKED_DISABLE, should_not, Level.SHOULD, cite,
                           False),
                NotifyRule(packed, direction, event_idx, Case.PACKED_RESERVED, may, None, cite, False),
            ]
        rows += [
            NotifyRule(packed, direction, False, Case.PACKED_DESC_WITHOUT_EVENT_IDX, may, None, cite, False),
            NotifyRule(packed, direction, True, Case.EVENT_PASSED, must, Level.MUST, cite, False),
            NotifyRule(packed, direction, True, Case.EVENT_NOT_PASSED, should_not, Level.SHOULD, cite, False),
        ]
    return tuple(rows)


NOTIFY_RULES: Final[tuple[NotifyRule, ...]] = _rows()
_BY_KEY: Final[Mapping[tuple[Layout, Direction, bool, Case], NotifyRule]] = MappingProxyType(
    {(r.layout, r.direction, r.event_idx, r.case): r for r in NOTIFY_RULES}
)
assert len(_BY_KEY) == len(NOTIFY_RULES), "one row per (layout, direction, event_idx, case)"


def rule_for(layout: Layout, direction: Direction, event_idx: bool, case: Case) -> NotifyRule:
    return _BY_KEY[(layout, direction, event_idx, case)]


def split_notification(
    direction: Direction, *, event_idx: bool, flags: int, event: int, old_idx: int, new_idx: int
) -> NotifyRule:
    """The rule for a split-ring publish that moved an index from ``old_idx`` to ``new_idx``.

    For used notifications ``flags``/``event`` are the available ring's ``flags`` and
    ``used_event`` and the indices are used ``idx``; for available notifications they are the
    used ring's ``flags`` and ``avail_event`` and the indices available ``idx``. With
    EVENT_IDX the flags are ignored entirely (the sender MUST ignore the lower bit, and any
    other bit is the receiver's violation, not a reason to deviate).
    """
    old_idx, new_idx = u16(old_idx), u16(new_idx)
    if old_idx == new_idx:
        case = Case.NOTHING_NEW
    elif event_idx:
        passed = vring_need_event(u16(event), new_idx, old_idx)
        case = Case.EVENT_PASSED if passed else Case.EVENT_NOT_PASSED
    else:
        case = {0: Case.FLAGS_CLEAR, 1: Case.FLAGS_SET}.get(flags, Case.FLAGS_INVALID)
    return rule_for(Layout.SPLIT, direction, event_idx, case)


@dataclass(frozen=True)
class RingPosition:
    """A place in a packed ring: a slot index and the wrap counter in effect there."""

    idx: int
    wrap: int

    def linear(self, num: int) -> int:
        """Position on a circle of two passes: wrap 1 is the first pass, wrap 0 the second."""
        return self.idx + (0 if self.wrap else num)


def packed_event_passed(num: int, off_wrap: int, old: RingPosition, new: RingPosition) -> bool:
    """Did the publish from ``old`` to ``new`` (at most ``num`` slots) cross the event descriptor?

    The event names one slot on one pass (offset in bits 0-14, wrap counter in bit 15); it is
    passed when it lies in ``[old, new)`` on the circle of two passes.
    """
    event = RingPosition(off_wrap & PACKED_IDX_MASK, off_wrap >> VRING_PACKED_EVENT_F_WRAP_CTR & 1)
    period = 2 * num
    distance = (new.linear(num) - old.linear(num)) % period
    return (event.linear(num) - old.linear(num)) % period < distance


def packed_notification(
    direction: Direction,
    *,
    event_idx: bool,
    event_flags: int,
    off_wrap: int,
    num: int,
    old: RingPosition,
    new: RingPosition,
) -> NotifyRule:
    """The rule for a packed-ring publish from ``old`` to ``new``, given the receiver's
    event suppression structure ``{off_wrap, flags}``."""
    flags = event_flags & 0x3
    if old == new:
        case = Case.NOTHING_NEW
    elif flags == VRING_PACKED_EVENT_FLAG_ENABLE:
        case = Case.PACKED_ENABLE
    elif flags == VRING_PACKED_EVENT_FLAG_DISABLE:
        case = Case.PACKED_DISABLE
    elif flags == VRING_PACKED_EVENT_FLAG_DESC:
        if not event_idx:
            case = Case.PACKED_DESC_WITHOUT_EVENT_IDX
        elif packed_event_passed(num, off_wrap, old, new):
            case = Case.EVENT_PASSED
        else:
            case = Case.EVENT_NOT_PASSED
    else:
        case = Case.PACKED_RESERVED
    return rule_for(Layout.PACKED, direction, event_idx, case)
