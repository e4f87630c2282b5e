"""The device status field (virtio v1.3 §2.1, §3.1) as an explicit transition table.

A driver brings a device up by setting status bits one step at a time::

    reset(0) -> ACKNOWLEDGE -> DRIVER -> FEATURES_OK -> DRIVER_OK

and never clears a bit except by writing 0 (a reset). FAILED may be set at any time; a
v1.4 device that offers VIRTIO_F_SUSPEND may be suspended (SUSPEND set) and resumed (SUSPEND
cleared) while DRIVER_OK. DEVICE_NEEDS_RESET is the device's own bit: the driver never sets it.

The table below, :data:`DRIVER_STEPS`, says which step the driver may take in which phase and
what phase it leads to; :func:`write_status` splits one status write into steps, checks each
against the table, and returns what a conforming device then reports. A write that breaks a
driver rule is still answered: the spec gives the device no obligation then, so the model
says so (``determined=False``) and lists the broken rules, and the suite only checks that
the device survives it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from vdpacert.uapi import virtio_config as cfg

from . import sections
from .spec import Level, Rule, Violation


class StatusBit(enum.IntFlag):
    """The bits of the device status field, with the spec's names."""

    ACKNOWLEDGE = cfg.VIRTIO_CONFIG_S_ACKNOWLEDGE
    DRIVER = cfg.VIRTIO_CONFIG_S_DRIVER
    DRIVER_OK = cfg.VIRTIO_CONFIG_S_DRIVER_OK
    FEATURES_OK = cfg.VIRTIO_CONFIG_S_FEATURES_OK
    SUSPEND = cfg.VIRTIO_CONFIG_S_SUSPEND
    DEVICE_NEEDS_RESET = cfg.VIRTIO_CONFIG_S_NEEDS_RESET
    FAILED = cfg.VIRTIO_CONFIG_S_FAILED


KNOWN_BITS: Final = int(
    StatusBit.ACKNOWLEDGE | StatusBit.DRIVER | StatusBit.DRIVER_OK | StatusBit.FEATURES_OK
    | StatusBit.SUSPEND | StatusBit.DEVICE_NEEDS_RESET | StatusBit.FAILED
)


class Phase(enum.Enum):
    """How far initialization has gone (§3.1.1), read off the driver's bits."""

    RESET = "reset"
    ACKNOWLEDGED = "acknowledged"
    DRIVER_LOADED = "driver loaded"
    FEATURES_OK = "features ok"
    DRIVER_OK = "driver ok"


class Step(enum.Enum):
    """One thing a driver does to the status field."""

    ACKNOWLEDGE = "set ACKNOWLEDGE"
    DRIVER = "set DRIVER"
    FEATURES_OK = "set FEATURES_OK"
    DRIVER_OK = "set DRIVER_OK"
    FAILED = "set FAILED"
    SUSPEND = "set SUSPEND"
    RESUME = "clear SUSPEND"


#: The initialization order of §3.1.1: the bit each step sets, in order.
INIT_SEQUENCE: Final = (
    (Step.ACKNOWLEDGE, StatusBit.ACKNOWLEDGE),
    (Step.DRIVER, StatusBit.DRIVER),
    (Step.FEATURES_OK, StatusBit.FEATURES_OK),
    (Step.DRIVER_OK, StatusBit.DRIVER_OK),
)

#: (phase, step) -> phase after the step, for every step a driver may take (§3.1.1).
#: FEATURES_OK leads to Phase.FEATURES_OK only if the device accepts the features; a refusal
#: leaves the driver in DRIVER_LOADED (see :func:`write_status`).
DRIVER_STEPS: Final[Mapping[tuple[Phase, Step], Phase]] = MappingProxyType({
    (Phase.RESET, Step.ACKNOWLEDGE): Phase.ACKNOWLEDGED,
    (Phase.ACKNOWLEDGED, Step.DRIVER): Phase.DRIVER_LOADED,
    (Phase.DRIVER_LOADED, Step.FEATURES_OK): Phase.FEATURES_OK,
    (Phase.FEATURES_OK, Step.DRIVER_OK): Phase.DRIVER_OK,
    # v1.4: suspend and resume only a live device that negotiated VIRTIO_F_SUSPEND.
    (Phase.DRIVER_OK, Step.SUSPEND): Phase.DRIVER_OK,
    (Phase.DRIVER_OK, Step.RESUME): Phase.DRIVER_OK,
})


#: Status rules are plain :class:`~vdpacert.model.spec.Rule` rows.
StatusRule = Rule


# Driver-side rules: a write that breaks one is the driver's fault.
DRIVER_NEVER_CLEARS: Final = StatusRule(
    "status.driver.never_clears", Level.MUST, sections.DEVICE_STATUS_DRIVER,
    "the driver must not clear a status bit except by writing 0 (reset)")
DRIVER_FOLLOWS_INIT_ORDER: Final = StatusRule(
    "status.driver.init_order", Level.MUST, sections.DEVICE_INIT_DRIVER,
    "the driver must set status bits in the order of the initialization sequence")
DRIVER_NO_DEVICE_BITS: Final = StatusRule(
    "status.driver.no_device_bits", Level.MUST, sections.DEVICE_STATUS_DRIVER,
    "DEVICE_NEEDS_RESET and bits the spec does not define are not the driver's to set")
DRIVER_RESETS_AFTER_FAILED: Final = StatusRule(
    "status.driver.reset_after_failed", Level.MUST, sections.DEVICE_STATUS_DRIVER,
    "after setting FAILED the driver must reset before re-initializing")
DRIVER_SUSPEND_NEEDS_FEATURE: Final = StatusRule(
    "status.driver.suspend_needs_feature", Level.MUST, sections.SUSPEND_STATUS,
    "SUSPEND may only be set with VIRTIO_F_SUSPEND negotiated and DRIVER_OK set")

# Device-side rules: what a conforming device does in answer.
DEVICE_REFUSES_INVALID_FEATURES: Final = StatusRule(
    "status.device.refuse_invalid_features", Level.MUST, sections.FEATURE_BITS_DEVICE,
    "the device must not set FEATURES_OK for a feature set it cannot accept")
DEVICE_ACCEPTS_VALID_FEATURES: Final = StatusRule(
    "status.device.accept_valid_features", Level.SHOULD, sections.FEATURE_BITS_DEVICE,
    "the device should accept any valid subset of the features it offered")
DEVICE_RESET_CLEARS: Final = StatusRule(
    "status.device.reset_clears", Level.MUST, sections.DEVICE_RESET_DEVICE,
    "after a reset the device status reads 0 and all device state is back to its initial value")
DEVICE_NEEDS_RESET_STICKS: Final = StatusRule(
    "status.device.needs_reset_sticks", Level.MUST, sections.DEVICE_STATUS_DEVICE,
    "DEVICE_NEEDS_RESET stays set until the driver resets the device")

DRIVER_RULES: Final = (DRIVER_NEVER_CLEARS, DRIVER_FOLLOWS_INIT_ORDER, DRIVER_NO_DEVICE_BITS,
                       DRIVER_RESETS_AFTER_FAILED, DRIVER_SUSPEND_NEEDS_FEATURE)
DEVICE_RULES: Final = (DEVICE_REFUSES_INVALID_FEATURES, DEVICE_ACCEPTS_VALID_FEATURES, DEVICE_RESET_CLEARS,
                       DEVICE_NEEDS_RESET_STICKS)
RULES: Final = DRIVER_RULES + DEVICE_RULES


def phase_of(status: int) -> Phase:
    """The initialization phase a status value shows (the highest step reached in order)."""
    phase = Phase.RESET
    for step, bit in INIT_SEQUENCE:
        if not status & bit:
            break
        phase = DRIVER_STEPS.get((phase, step), phase)
    return phase


@dataclass(frozen=True)
class StatusWrite:
    """What a conforming device does with one write to the status field.

    ``status`` is what the device reports afterwards. ``tolerated`` lists other values a
    device may report at the cost of a SHOULD rule (refusing a valid feature set). When
    ``determined`` is False the driver broke a rule (``driver_violations``) and the spec sets
    no outcome: ``status`` is then what a device that simply stores the bits would report.
    """

    status: int
    steps: tuple[Step, ...] = ()
    reset: bool = False
    features_accepted: bool | None = None
    determined: bool = True
    driver_violations: tuple[Violation, ...] = ()
    tolerated: Mapping[int, Violation] = field(default_factory=dict)

    @property
    def suspended(self) -> bool:
        return bool(self.status & StatusBit.SUSPEND)


def write_status(
    old: int,
    new: int,
    *,
    features_valid: bool,
    suspend_negotiated: bool = False,
    needs_reset: bool = False,
) -> StatusWrite:
    """Answer the driver's write of ``new`` over a device whose status reads ``old``.

    ``features_valid`` says whether the driver's accepted features have no MUST violation
    (see :func:`vdpacert.model.features.is_valid`); it decides FEATURES_OK. ``needs_reset`` is
    the device's own error state, which only a reset clears.
    """
    if not 0 <= new <= 0xFF:
        raise ValueError(f"the device status field is 8 bits wide, got {new}")
    if new == 0:
        return StatusWrite(status=0, reset=True)

    problems: list[Violation] = []
    device_bit = int(StatusBit.DEVICE_NEEDS_RESET)
    old, new = int(old), int(new)
    if new & ~KNOWN_BITS:
        problems.append(DRIVER_NO_DEVICE_BITS.violation(f"bits {new & ~KNOWN_BITS:#x} are undefined"))
    if new & device_bit and not old & device_bit:
        problems.append(DRIVER_NO_DEVICE_BITS.violation("driver wrote DEVICE_NEEDS_RESET"))

    driver_old = old & ~device_bit
    driver_new = new & ~device_bit
    cleared = driver_old & ~driver_new & ~int(StatusBit.SUSPEND)
    if cleared:
        problems.append(DRIVER_NEVER_CLEARS.violation(f"write clears {StatusBit(cleared)!r}"))
    if old & StatusBit.FAILED and driver_new & ~driver_old & ~StatusBit.FAILED:
        problems.append(DRIVER_RESETS_AFTER_FAILED.violation("bits set after FAILED without a reset"))

    steps, order_problems = _steps_of(driver_old, driver_new, suspend_negotiated)
    problems += order_problems

    accepted: bool | None = None
    status = driver_new | (device_bit if needs_reset else 0)
    tolerated: dict[int, Violation] = {}
    features_ok = int(StatusBit.FEATURES_OK)
    if Step.FEATURES_OK in steps:
        accepted = features_valid
        if not features_valid:
            status &= ~features_ok
            if Step.DRIVER_OK in steps:
                problems.append(DRIVER_FOLLOWS_INIT_ORDER.violation(
                    "DRIVER_OK in the same write as a refused FEATURES_OK"))
        else:
            tolerated[status & ~features_ok] = DEVICE_ACCEPTS_VALID_FEATURES.violation(
                "device refused FEATURES_OK for a valid feature set")

    if problems:
        return StatusWrite(status=status, steps=steps, features_accepted=accepted, determined=False,
                           driver_violations=tuple(problems))
    return StatusWrite(status=status, steps=steps, features_accepted=accepted, tolerated=tolerated)


def _steps_of(old: int, new: int, suspend_negotiated: bool) -> tuple[tuple[Step, ...], list[Violation]]:
    """Split a write into the driver steps it takes, in order, checking each against the table."""
    steps: list[Step] = []
    problems: list[Violation] = []
    phase = phase_of(old)
    for step, bit in INIT_SEQUENCE:
        if new & bit and not old & bit:
            after = DRIVER_STEPS.get((phase, step))
            if after is None:
                problems.append(DRIVER_FOLLOWS_INIT_ORDER.violation(f"{step.value} in phase {phase.value}"))
            else:
                phase = after
            steps.append(step)
    if new & StatusBit.FAILED and not old & StatusBit.FAILED:
        steps.append(Step.FAILED)
    suspend_changed = (old ^ new) & StatusBit.SUSPEND
    if suspend_changed:
        step = Step.SUSPEND if new & StatusBit.SUSPEND else Step.RESUME
        steps.append(step)
        if not suspend_negotiated or (phase, step) not in DRIVER_STEPS:
            problems.append(DRIVER_SUSPEND_NEEDS_FEATURE.violation(
                f"{step.value} with VIRTIO_F_SUSPEND {'' if suspend_negotiated else 'not '}negotiated "
                f"in phase {phase.value}"))
    return tuple(steps), problems
