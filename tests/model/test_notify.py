"""The notification table: its levels, and its decisions against vring_need_event."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdpacert.model.chains import Layout
from vdpacert.model.notify import (
    NOTIFY_RULES,
    Case,
    Decision,
    Direction,
    RingPosition,
    packed_event_passed,
    packed_notification,
    rule_for,
    split_notification,
)
from vdpacert.model.ring_index import u16, vring_need_event
from vdpacert.model.spec import Level

U16 = st.integers(0, 0xFFFF)


def test_levels_are_the_specs() -> None:
    for rule in NOTIFY_RULES:
        expected = {Decision.MUST_NOTIFY: Level.MUST, Decision.SHOULD_NOT_NOTIFY: Level.SHOULD,
                    Decision.MAY_NOTIFY: None}[rule.decision]
        assert rule.level is expected
        assert rule.normative is (rule.layout is Layout.SPLIT)
    split_used = rule_for(Layout.SPLIT, Direction.USED, False, Case.FLAGS_SET)
    assert split_used.citation.number == "2.7.7.2" and split_used.decision is Decision.SHOULD_NOT_NOTIFY
    # with EVENT_IDX a notification short of the event is SHOULD NOT, not MUST NOT
    assert rule_for(Layout.SPLIT, Direction.USED, True, Case.EVENT_NOT_PASSED).level is Level.SHOULD
    assert rule_for(Layout.SPLIT, Direction.AVAIL, True, Case.EVENT_PASSED).citation.number == "2.7.10.1"
    assert rule_for(Layout.PACKED, Direction.USED, True, Case.EVENT_PASSED).citation.number == "2.8.10"


def test_violations() -> None:
    must = rule_for(Layout.SPLIT, Direction.USED, False, Case.FLAGS_CLEAR)
    should_not = rule_for(Layout.SPLIT, Direction.USED, True, Case.EVENT_NOT_PASSED)
    may = rule_for(Layout.SPLIT, Direction.USED, False, Case.FLAGS_INVALID)
    v = must.violation(notified=False)
    assert v is not None and v.level is Level.MUST and must.violation(notified=True) is None
    v = should_not.violation(notified=True)
    assert v is not None and v.level is Level.SHOULD and should_not.violation(notified=False) is None
    assert may.violation(True) is None and may.violation(False) is None
    packed = rule_for(Layout.PACKED, Direction.USED, False, Case.PACKED_ENABLE).violation(False)
    assert packed is not None and "analogy" in packed.message


@pytest.mark.parametrize("direction", list(Direction))
@pytest.mark.parametrize(("flags", "decision"), [(0, Decision.MUST_NOTIFY), (1, Decision.SHOULD_NOT_NOTIFY),
                                                 (2, Decision.MAY_NOTIFY), (3, Decision.MAY_NOTIFY)])
def test_split_flags_without_event_idx(direction: Direction, flags: int, decision: Decision) -> None:
    rule = split_notification(direction, event_idx=False, flags=flags, event=5, old_idx=5, new_idx=6)
    assert rule.decision is decision


@settings(max_examples=400)
@given(event=U16, old=U16, count=st.integers(1, 32768), flags=U16, direction=st.sampled_from(list(Direction)))
def test_split_event_idx_follows_vring_need_event(event: int, old: int, count: int, flags: int,
                                                  direction: Direction) -> None:
    new = u16(old + count)
    rule = split_notification(direction, event_idx=True, flags=flags, event=event, old_idx=old, new_idx=new)
    must = vring_need_event(event, new, old)
    assert rule.decision is (Decision.MUST_NOTIFY if must else Decision.SHOULD_NOT_NOTIFY)
    # the same thing said the spec's way: some entry written at an index equal to event
    assert must == any(u16(old + k) == event for k in range(count))


def test_spec_example_used_event_zero() -> None:
    """§2.7.7: with used_event 0 the device notifies after the first buffer, and again each time
    the 16-bit used idx comes round to write index 0 (the note says "the 65536th buffer")."""
    first = split_notification(Direction.USED, event_idx=True, flags=0, event=0, old_idx=0, new_idx=1)
    again = split_notification(Direction.USED, event_idx=True, flags=0, event=0, old_idx=65535, new_idx=1)
    between = split_notification(Direction.USED, event_idx=True, flags=0, event=0, old_idx=1, new_idx=2)
    assert (first.decision, again.decision) == (Decision.MUST_NOTIFY, Decision.MUST_NOTIFY)
    assert between.decision is Decision.SHOULD_NOT_NOTIFY
    nothing = split_notification(Direction.USED, event_idx=True, flags=0, event=0, old_idx=7, new_idx=7)
    assert nothing.case is Case.NOTHING_NEW and nothing.decision is Decision.MAY_NOTIFY


def _linux_style(num: int, off_wrap: int, new: RingPosition, count: int) -> bool:
    """Linux's packed check: shift the event back a ring if its wrap differs from the new one."""
    wrap, event = off_wrap >> 15, off_wrap & 0x7FFF
    if wrap != new.wrap:
        event -= num
    return vring_need_event(u16(event), new.idx, u16(new.idx - count))


@settings(max_examples=500)
@given(data=st.data(), num=st.integers(1, 32768))
def test_packed_desc_event_matches_the_linux_formula(data: st.DataObject, num: int) -> None:
    old_idx, old_wrap = data.draw(st.integers(0, num - 1)), data.draw(st.integers(0, 1))
    count = data.draw(st.integers(1, num))
    off, wrap = data.draw(st.integers(0, num - 1)), data.draw(st.integers(0, 1))
    passes, new_idx = divmod(old_idx + count, num)
    old, new = RingPosition(old_idx, old_wrap), RingPosition(new_idx, old_wrap ^ (passes & 1))
    off_wrap = off | wrap << 15
    assert packed_event_passed(num, off_wrap, old, new) == _linux_style(num, off_wrap, new, count)
    rule = packed_notification(Direction.USED, event_idx=True, event_flags=2, off_wrap=off_wrap, num=num,
                               old=old, new=new)
    expected = Decision.MUST_NOTIFY if _linux_style(num, off_wrap, new, count) else Decision.SHOULD_NOT_NOTIFY
    assert rule.decision is expected


@pytest.mark.parametrize(("flags", "event_idx", "case"), [
    (0, False, Case.PACKED_ENABLE), (1, True, Case.PACKED_DISABLE), (2, False, Case.PACKED_DESC_WITHOUT_EVENT_IDX),
    (3, True, Case.PACKED_RESERVED), (0xFFFC, True, Case.PACKED_ENABLE),
])
def test_packed_flags(flags: int, event_idx: bool, case: Case) -> None:
    rule = packed_notification(Direction.AVAIL, event_idx=event_idx, event_flags=flags, off_wrap=0, num=8,
                               old=RingPosition(0, 1), new=RingPosition(2, 1))
    assert rule.case is case
    same = packed_notification(Direction.AVAIL, event_idx=event_idx, event_flags=flags, off_wrap=0, num=8,
                               old=RingPosition(2, 1), new=RingPosition(2, 1))
    assert same.case is Case.NOTHING_NEW
