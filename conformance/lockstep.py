"""The comparison core: one operation applied to the model and to the target, and every answer compared.

A :class:`Lockstep` holds a target and a :class:`~vdpacert.model.vhost_vdpa.VhostVdpaModel` built
from what the target reports about itself at open (:func:`~vdpacert.conformance.observe.probe_spec`).
:meth:`Lockstep.op` runs one operation on both sides and compares the answers: the same errno when
the model refuses (a :class:`~vdpacert.model.spec.ModelErrno` against the target's ``OSError``), the
same value when both succeed. :meth:`Lockstep.check_observables` then asks both sides every
observable the interface exposes (status, features, config, each vring's base, group and size ...).
Any difference raises :class:`ClauseViolation` naming the clause that decided it: the model's rule
id when the model refused, else the suite clause of the observable.

Where the spec leaves the outcome open the comparison widens *explicitly*, never silently:

- a status write that breaks a driver rule (``StatusWrite.determined`` False) accepts whatever the
  device reports, and the model takes the target's status (a resync, counted);
- refusing FEATURES_OK for a valid set is a SHOULD deviation (``tolerated``): a warning, not a failure;
  accepting FEATURES_OK for an invalid set is always ``status.device.refuse_invalid_features``;
- a device that touched its queues (DRIVER_OK with a ready queue) may enter DEVICE_NEEDS_RESET (§2.1.2)
  and may have moved a queue's position; the model follows the device's report for exactly those;
- a driver write to read-only configuration space leaves the written bytes either unchanged or
  stored (the spec binds the driver only); bytes outside the write must not change;
- a target *declares* its known quirks (:data:`TARGET_QUIRKS`); the model then predicts the quirk's
  answer and every time it did so is counted in :attr:`Lockstep.quirk_hits` under the quirk's rule.

Counters a recorder reads: :attr:`Lockstep.exercised` (clause id -> times checked),
:attr:`Lockstep.quirk_hits`, :attr:`Lockstep.warnings` (SHOULD deviations), :attr:`Lockstep.resyncs`.
"""

from __future__ import annotations

import errno
import functools
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from vdpacert.conformance.client import TargetDied
from vdpacert.conformance.observe import OBSERVABLES, Observable, Outcome, Value, probe_spec, vq_observables
from vdpacert.model import blk, net
from vdpacert.model.quirks import QUIRKS
from vdpacert.model.ring_index import decode_packed_base
from vdpacert.model.spec import ModelErrno
from vdpacert.model.status import (
    DEVICE_ACCEPTS_VALID_FEATURES,
    DEVICE_REFUSES_INVALID_FEATURES,
    DEVICE_RESET_CLEARS,
    StatusBit,
    StatusWrite,
)
from vdpacert.model.vhost_vdpa import MODELLED_QUIRKS, IotlbMessageError, VhostVdpaModel

if TYPE_CHECKING:
    from vdpacert.conformance.client import VhostClient
    from vdpacert.conformance.targets import Target
    from vdpacert.impl.guestmem import GuestMemory
    from vdpacert.model.config_space import ConfigLayout
    from vdpacert.model.vdpa_device import VdpaDeviceSpec

__all__ = ["FRONT_QUIRKS", "TARGET_QUIRKS", "ClauseViolation", "Lockstep"]

#: Quirks of the reference vhost-vdpa front, which applies Linux's checks and no more (impl/vhost_vdpa.py).
FRONT_QUIRKS: frozenset[str] = frozenset({
    "vhost_vdpa.vring_num_bounds_unchecked",  # SET_VRING_NUM is not compared with get_vq_num_max
    "vhost_vdpa.invalidate_range_unchecked",  # INVALIDATE of size 0 or wrapping reaches vhost_vdpa_unmap
})
#: The quirks each kind of target declares (a target profile; a run reports them, never hides them).
TARGET_QUIRKS: dict[str, frozenset[str]] = {
    "sim-net": FRONT_QUIRKS,
    "sim-blk": FRONT_QUIRKS,
    "python": FRONT_QUIRKS,
    "vhost-vdpa": FRONT_QUIRKS | {"vhost_vdpa.iotlb_perm_unchecked"},
}

_LAYOUTS: dict[int, ConfigLayout] = {1: net.NET_CONFIG_LAYOUT, 2: blk.BLK_CONFIG_LAYOUT}
_NEEDS_RESET = int(StatusBit.DEVICE_NEEDS_RESET)


class ClauseViolation(AssertionError):
    """The target disagreed with the model; ``clause_id`` is the clause that decided the expected answer.

    An AssertionError so Hypothesis treats it as a failing example and shrinks it.
    """

    def __init__(self, clause_id: str, message: str) -> None:
        super().__init__(f"{clause_id}: {message}")
        self.clause_id = clause_id
        self.message = message


def _model_outcome(call: Callable[[], object]) -> tuple[object, ModelErrno | None]:
    try:
        return call(), None
    except ModelErrno as refusal:
        return None, refusal


def _describe(refusal: ModelErrno) -> str:
    return f"errno {refusal.errno} ({errno.errorcode.get(refusal.errno, '?')}, {refusal.rule}: {refusal.message})"


class Lockstep:
    """A target and its model, driven together (see the module docstring).

    ``spec`` defaults to what the target reports at open; ``quirks`` to :data:`TARGET_QUIRKS` of its kind.
    """

    def __init__(self, target: Target, *, spec: VdpaDeviceSpec | None = None,
                 quirks: Iterable[str] | None = None) -> None:
        self.target = target
        self.spec = spec if spec is not None else probe_spec(target)
        self.quirks = frozenset(TARGET_QUIRKS.get(target.kind, frozenset()) if quirks is None else quirks)
        unknown = self.quirks - QUIRKS.keys()
        if unknown:
            raise ValueError(f"unknown quirks {sorted(unknown)}")
        self.exercised: Counter[str] = Counter()
        self.quirk_hits: Counter[str] = Counter()
        self.resyncs: Counter[str] = Counter()
        self.warnings: list[str] = []
        self.steps = 0
        self.ops: Counter[str] = Counter()  # operation name -> times applied
        self._observables = OBSERVABLES + vq_observables(self.spec.nvqs)
        self._start_model()

    # ----- lifetime -------------------------------------------------------------------------------

    def _start_model(self) -> None:
        self.model = VhostVdpaModel(self.spec, quirks=self.quirks & MODELLED_QUIRKS)
        self.model.open()
        self._memory: list[tuple[int, int]] = []
        self.model.set_user_memory(self._memory)
        self._vq_moved: set[int] = set()  # queues the device may have run: their base is the device's
        self._quirks_seen: Counter[str] = Counter()
        self._packed = False  # the ring layout the queue positions were last set or read in

    def reopen(self) -> None:
        """Close and open both sides: a fresh process opening the device."""
        self.target.reopen()
        self._start_model()

    @property
    def client(self) -> VhostClient:
        return self.target.client

    def new_memory(self, size: int, *, gpa: int = 0) -> GuestMemory:
        """Guest memory on the target; the model learns that its user addresses are backed."""
        memory = self.target.new_memory(size, gpa=gpa)
        self._memory.append((memory.uaddr, memory.size))
        self.model.set_user_memory(self._memory)
        return memory

    def eventfd(self) -> int:
        return self.target.eventfd()

    # ----- one operation ----------------------------------------------------------------------------

    def _target(self, name: str, call: Callable[[], Value]) -> Outcome:
        try:
            try:
                return Outcome(call())
            except OSError as error:
                return Outcome(errno=error.errno)
        except TargetDied as died:
            raise ClauseViolation("suite.target.alive", f"{name}: {died}") from died

    def op(self, name: str, model_call: Callable[[], object], target_call: Callable[[], Value], *,
           clause: str = "suite.lockstep.errno") -> tuple[object, Outcome]:
        """Apply one operation to both sides and compare errno or value; returns (model's answer, target's).

        A value is compared when the target returns one (getters); setters return None on the target.
        """
        self.steps += 1
        self.ops[name] += 1
        predicted, refusal = _model_outcome(model_call)
        actual = self._target(name, target_call)
        self._count_quirks()
        if refusal is not None:
            cause = refusal.cause if isinstance(refusal, IotlbMessageError) else refusal
            if actual.errno == refusal.errno:
                self.exercised[refusal.rule] += 1
                if cause is not refusal:
                    self.exercised[cause.rule] += 1
                return predicted, actual
            rule = cause.rule if actual.ok else refusal.rule
            raise ClauseViolation(rule, f"{name}: the model answers {_describe(cause)}, the target {actual}")
        if not actual.ok:
            raise ClauseViolation(clause, f"{name}: the model accepts (answer {predicted!r}), the target "
                                          f"answered {actual}")
        if actual.value is not None and predicted != actual.value:
            raise ClauseViolation(clause, f"{name}: the model answers {predicted!r}, the target {actual}")
        self.exercised[clause] += 1
        return predicted, actual

    def _count_quirks(self) -> None:
        taken = self.model.quirks_taken
        for name, count in taken.items():
            new = count - self._quirks_seen[name]
            if new:
                self.quirk_hits[QUIRKS[name].rule] += new
        self._quirks_seen = Counter(taken)

    # ----- operations with latitude -------------------------------------------------------------------

    def set_status(self, status: int) -> None:
        """VHOST_VDPA_SET_STATUS, judged against the model's StatusWrite (see the module docstring)."""
        predicted, _ = self.op("VHOST_VDPA_SET_STATUS", lambda: self.model.VHOST_VDPA_SET_STATUS(status),
                                    lambda: self.client.set_status(status), clause="suite.lockstep.status")
        if not isinstance(predicted, StatusWrite):
            return  # refused on both sides (op compared the errnos)
        reported = self._target("VHOST_VDPA_GET_STATUS", self.client.get_status)
        if not reported.ok or not isinstance(reported.value, int):
            raise ClauseViolation("suite.lockstep.status", f"GET_STATUS after writing {status:#x}: {reported}")
        self._judge_status(status, predicted, reported.value)

    def _judge_status(self, written: int, sw: StatusWrite, got: int) -> None:
        what = f"after writing {written:#x} the device reports {got:#x}, the model {sw.status:#x}"
        if sw.reset:
            self.exercised[DEVICE_RESET_CLEARS.rule] += 1
            self._vq_moved.clear()
            if got != 0:
                raise ClauseViolation(DEVICE_RESET_CLEARS.rule, what)
            return
        if sw.features_accepted is False:
            self.exercised[DEVICE_REFUSES_INVALID_FEATURES.rule] += 1
            if got & StatusBit.FEATURES_OK:
                raise ClauseViolation(DEVICE_REFUSES_INVALID_FEATURES.rule,
                                      f"{what}; the driver features {self.model.device.driver_features:#x} "
                                      "break a MUST rule, yet FEATURES_OK stuck")
        elif sw.features_accepted:
            self.exercised[DEVICE_ACCEPTS_VALID_FEATURES.rule] += 1
        if not sw.determined:
            self.exercised.update(v.rule for v in sw.driver_violations)
            self._resync_status(got, "status write breaking a driver rule")
            return
        if got == sw.status:
            return
        tolerated = sw.tolerated.get(got)
        if tolerated is not None:
            self.warnings.append(f"{tolerated.level} {tolerated.rule}: {tolerated.message} ({what})")
            self._resync_status(got, "SHOULD deviation")
            return
        if got == sw.status | _NEEDS_RESET and self._device_may_fail():
            self._resync_status(got, "device error state")
            return
        raise ClauseViolation("suite.lockstep.status", what)

    def _resync_status(self, got: int, why: str) -> None:
        device = self.model.device
        if device.status != got:
            self.resyncs[why] += 1
        device.status = got
        device.needs_reset = bool(got & _NEEDS_RESET)

    def _device_may_fail(self) -> bool:
        """Whether the device may have touched a queue (DRIVER_OK with one ready): an error there is its right."""
        device = self.model.device
        return bool(device.status & StatusBit.DRIVER_OK) and any(vq.ready for vq in device.vqs)

    def set_config(self, offset: int, data: bytes) -> None:
        """VHOST_VDPA_SET_CONFIG; a write the device type's layout forbids leaves the written bytes open."""
        before = bytes(self.model.device.config)
        _, actual = self.op("VHOST_VDPA_SET_CONFIG", lambda: self.model.VHOST_VDPA_SET_CONFIG(offset, data),
                                    lambda: self.client.set_config(offset, data), clause="suite.lockstep.config")
        layout = _LAYOUTS.get(self.spec.device_id)
        if not actual.ok or layout is None:  # refused on both sides, or no layout: the model's store stands
            return
        judged = layout.write(before, offset, data, negotiated=self.model.device.driver_features)
        self.exercised[judged.rule] += 1
        if judged.accepted:
            return
        self.exercised.update(v.rule for v in judged.violations)
        got = self._target("VHOST_VDPA_GET_CONFIG", lambda: self.client.get_config(0, len(before)))
        if not isinstance(got.value, bytes):
            raise ClauseViolation("suite.lockstep.config", f"GET_CONFIG after SET_CONFIG: {got}")
        end = offset + len(data)
        window = got.value[offset:end]
        if got.value[:offset] != before[:offset] or got.value[end:] != before[end:] or window not in (
                before[offset:end], bytes(data)):
            raise ClauseViolation("suite.lockstep.config",
                                  f"SET_CONFIG of {len(data)} bytes at {offset} changed config to {got.value.hex()} "
                                  f"(before {before.hex()})")
        if window != bytes(data):
            self.resyncs["config write ignored"] += 1
        self.model.device.config[:] = got.value

    def set_vring_base(self, index: int, num: int) -> None:
        self.op("VHOST_SET_VRING_BASE", lambda: self.model.VHOST_SET_VRING_BASE(index, num),
                                    lambda: self.client.set_vring_base(index, num), clause="suite.lockstep.vq_state")
        self._vq_moved.discard(index)

    def close_and_reopen(self) -> None:
        """release + open: a reset, every mapping dropped, then a fresh open (checked like any step)."""
        self.steps += 1
        self.reopen()

    # ----- after every step ---------------------------------------------------------------------------

    def check_observables(self) -> None:
        """Ask both sides every observable and compare (see the module docstring for the latitude)."""
        self._track_queues()
        for row in self._observables:
            predicted, refusal = _model_outcome(functools.partial(row.model, self.model))
            expected = Outcome(errno=refusal.errno) if refusal is not None else Outcome(predicted)  # type: ignore[arg-type]
            actual = self._target(row.name, functools.partial(row.target, self.client))
            if actual != expected:
                self._observed_difference(row, expected, actual, refusal)
            self.exercised[row.clause] += 1

    def _observed_difference(self, row: Observable, expected: Outcome, actual: Outcome,
                             refusal: ModelErrno | None) -> None:
        device = self.model.device
        if (row.name == "VHOST_VDPA_GET_STATUS" and isinstance(expected.value, int)
                and actual.value == expected.value | _NEEDS_RESET and self._device_may_fail()):
            self._resync_status(expected.value | _NEEDS_RESET, "device error state")
            return
        if (row.index is not None and row.index in self._vq_moved and row.name.startswith("VHOST_GET_VRING_BASE")
                and isinstance(actual.value, int) and expected.ok):
            state = decode_packed_base(actual.value) if device.packed else actual.value
            if device.packed or actual.value <= 0xFFFF:
                device.set_vq_state(row.index, state)
                self.resyncs["queue ran"] += 1
                return
        clause = refusal.rule if refusal is not None else row.clause
        raise ClauseViolation(clause, f"{row.name}: the model expects {expected}, the target answers {actual}")

    def _track_queues(self) -> None:
        """Mark the queues the device may have processed since their base was last set (their base moved)."""
        device = self.model.device
        if device.packed != self._packed:
            # The features switched the ring layout: a position set in one layout and read in the other is
            # not defined by the spec (vdpa_vq_state is a union), so the device's report is taken.
            self._packed = device.packed
            self._vq_moved.update(range(self.spec.nvqs))
        status = device.status
        running = (status & StatusBit.DRIVER_OK and status & StatusBit.FEATURES_OK
                   and not status & StatusBit.FAILED and not device.suspended)
        if running:
            self._vq_moved.update(i for i, vq in enumerate(device.vqs) if vq.ready)
