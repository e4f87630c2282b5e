"""The device status transition table (virtio §2.1, §3.1)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vdpacert.model import status
from vdpacert.model.status import Phase, StatusBit, Step, write_status

ACK, DRV, FOK, DOK = 1, 2, 8, 4
FAILED, NEEDS_RESET, SUSPEND = 128, 64, 16


def test_the_normal_bring_up_is_determined_at_every_step() -> None:
    value = 0
    for bit, step in ((ACK, Step.ACKNOWLEDGE), (DRV, Step.DRIVER), (FOK, Step.FEATURES_OK), (DOK, Step.DRIVER_OK)):
        answer = write_status(value, value | bit, features_valid=True)
        assert answer.determined and answer.steps == (step,)
        assert answer.status == value | bit
        value = answer.status
    assert status.phase_of(value) is Phase.DRIVER_OK


def test_features_ok_is_refused_for_an_invalid_set() -> None:
    answer = write_status(ACK | DRV, ACK | DRV | FOK, features_valid=False)
    assert answer.determined
    assert answer.features_accepted is False
    assert answer.status == ACK | DRV


def test_refusing_a_valid_set_is_only_a_should() -> None:
    answer = write_status(ACK | DRV, ACK | DRV | FOK, features_valid=True)
    assert answer.status == ACK | DRV | FOK
    (refused, rule), = answer.tolerated.items()
    assert refused == ACK | DRV
    assert rule.rule == "status.device.accept_valid_features" and str(rule.level) == "SHOULD"


def test_writing_zero_resets_from_anywhere() -> None:
    for old in (0, ACK, ACK | DRV | FOK | DOK, FAILED | ACK, NEEDS_RESET | 15):
        answer = write_status(old, 0, features_valid=False, needs_reset=True)
        assert answer.reset and answer.status == 0 and answer.determined


@pytest.mark.parametrize(("old", "new", "rule"), [
    (ACK | DRV | FOK, ACK | DRV, "status.driver.never_clears"),
    (ACK, ACK | FOK, "status.driver.init_order"),
    (0, DRV, "status.driver.init_order"),
    (ACK | DRV, ACK | DRV | DOK, "status.driver.init_order"),
    (ACK | FAILED, ACK | DRV | FAILED, "status.driver.reset_after_failed"),
    (ACK, ACK | NEEDS_RESET, "status.driver.no_device_bits"),
    (ACK, ACK | 0x20, "status.driver.no_device_bits"),
    (15, 15 | SUSPEND, "status.driver.suspend_needs_feature"),
])
def test_driver_rule_breaks_are_named_and_leave_the_outcome_open(old: int, new: int, rule: str) -> None:
    answer = write_status(old, new, features_valid=True)
    assert not answer.determined
    assert rule in {v.rule for v in answer.driver_violations}


def test_suspend_and_resume_with_the_feature() -> None:
    live = ACK | DRV | FOK | DOK
    suspended = write_status(live, live | SUSPEND, features_valid=True, suspend_negotiated=True)
    assert suspended.determined and suspended.suspended and suspended.steps == (Step.SUSPEND,)
    resumed = write_status(live | SUSPEND, live, features_valid=True, suspend_negotiated=True)
    assert resumed.determined and not resumed.suspended and resumed.steps == (Step.RESUME,)
    early = write_status(ACK | DRV | FOK, ACK | DRV | FOK | SUSPEND, features_valid=True, suspend_negotiated=True)
    assert not early.determined


def test_needs_reset_sticks_until_reset() -> None:
    answer = write_status(ACK | NEEDS_RESET, ACK | DRV | NEEDS_RESET, features_valid=True, needs_reset=True)
    assert answer.determined and answer.status == ACK | DRV | NEEDS_RESET
    cleared = write_status(ACK | NEEDS_RESET, ACK | DRV, features_valid=True, needs_reset=True)
    assert cleared.status & NEEDS_RESET  # the driver cannot clear the device's bit


def test_status_is_eight_bits() -> None:
    with pytest.raises(ValueError):
        write_status(0, 256, features_valid=True)


def test_every_table_row_cites_a_section() -> None:
    for rule in (*status.DRIVER_RULES, *status.DEVICE_RULES):
        assert str(rule.citation).startswith(("virtio v1.3 §", "virtio v1.4 §"))


@given(st.lists(st.tuples(st.integers(0, 255), st.booleans()), max_size=12))
def test_any_write_history_then_reset_reads_zero(history: list[tuple[int, bool]]) -> None:
    value = 0
    for written, valid in history:
        value = write_status(value, written, features_valid=valid).status
        assert 0 <= value <= 255
    assert write_status(value, 0, features_valid=False).status == 0


@given(st.lists(st.sampled_from([ACK, DRV, FOK, DOK, FAILED]), max_size=8))
def test_features_ok_never_reads_set_after_an_invalid_set(bits: list[int]) -> None:
    value = 0
    for bit in bits:
        value = write_status(value, value | bit, features_valid=False).status
        assert not value & StatusBit.FEATURES_OK


@given(st.lists(st.sampled_from([ACK, DRV, FOK, DOK]), max_size=8))
def test_determined_writes_never_clear_a_bit(bits: list[int]) -> None:
    value = 0
    for bit in bits:
        answer = write_status(value, value | bit, features_valid=True)
        if answer.determined:
            assert answer.status & value == value
        value = answer.status
