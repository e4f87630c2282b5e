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
- a driver write to configuration space the layout forbids leaves bytes outside the write unchanged,
  and the written bytes either unchanged or stored: the write rules (virtio-net §5.1.4.2, virtio-blk
  §5.2.5) bind the driver, and the spec gives the device no duty towards such a write;
- a target *declares* its known quirks (:func:`model_quirks`: its run's target profile, by default
  the profile of its kind); the model then predicts the quirk's answer and every time it did so is counted in
  :attr:`Lockstep.quirk_hits` under (the rule the quirk stood in for, the quirk's name).

A clause is counted in :attr:`Lockstep.exercised` only where an answer of the target was compared
with the model's: the rule that decided a refusal (and, for an IOTLB message, the handler's own
rule); a driver rule the operation broke on purpose, next to the device's compared reaction (a
feature set breaking exactly one rule, a status write clearing a bit); the rules the target's own
reports are held to (the offer, the configuration values, DEVICE_NEEDS_RESET staying set).

Counters a recorder reads: :attr:`Lockstep.exercised` (clause id -> times checked),
:attr:`Lockstep.quirk_hits`, :attr:`Lockstep.warnings` (SHOULD deviations), :attr:`Lockstep.resyncs`.
"""

from __future__ import annotations

import errno
import functools
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from vdpacert.conformance.client import TargetDied
from vdpacert.conformance.observe import (
    OBSERVABLES,
    Observable,
    Outcome,
    Value,
    config_layout,
    config_value_checks,
    offer_checks,
    probe_spec,
    vq_observables,
)
from vdpacert.conformance.profiles import AUTO, target_profile
from vdpacert.model import features as feature_rules
from vdpacert.model.quirks import QUIRKS
from vdpacert.model.ring_index import decode_packed_base
from vdpacert.model.spec import Level, ModelErrno, Violation
from vdpacert.model.status import (
    DEVICE_ACCEPTS_VALID_FEATURES,
    DEVICE_NEEDS_RESET_STICKS,
    DEVICE_REFUSES_INVALID_FEATURES,
    DEVICE_RESET_CLEARS,
    DRIVER_NEVER_CLEARS,
    StatusBit,
    StatusWrite,
    write_status,
)
from vdpacert.model.vhost_vdpa import (
    MODELLED_QUIRKS,
    STATUS_CLEARS,
    VRING_BASE_RANGE,
    IotlbMessageError,
    VhostVdpaModel,
)
from vdpacert.uapi import vhost as V  # noqa: N812
from vdpacert.uapi.virtio_config import VIRTIO_F_RING_PACKED

if TYPE_CHECKING:
    from vdpacert.conformance.client import VhostClient
    from vdpacert.conformance.targets import Target
    from vdpacert.impl.guestmem import GuestMemory
    from vdpacert.model.vdpa_device import VdpaDeviceSpec

__all__ = ["ClauseViolation", "Lockstep", "SecondOpen", "model_quirks"]

_NEEDS_RESET = int(StatusBit.DEVICE_NEEDS_RESET)
_GROUP_ROWS = ("VHOST_VDPA_GET_VRING_GROUP", "VHOST_VDPA_GET_VRING_DESC_GROUP")
_U32 = struct.Struct("<I")
#: Quirk-only rules (model/quirks.py) a lockstep comparison checks, named by the quirk that documents them.
PACKED_STATE_RULE = QUIRKS["vdpa_sim.packed_vq_state_ignored"].rule
SET_FEATURES_RULE = QUIRKS["vdpa_sim.set_features_requires_access_platform"].rule
LAYOUT_AFTER_RESET_RULE = QUIRKS["vhost_vdpa.stale_ring_layout_after_reset"].rule


@runtime_checkable
class SecondOpen(Protocol):
    """A target that can open its device a second time while held (a second ``open()`` of the char device).

    ``open_again`` tries it: OSError with the errno when refused, else the second file is closed again at once.
    """

    def open_again(self) -> None: ...


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


@functools.lru_cache(maxsize=256)
def _feature_violations(device_id: int, features: int, offered: int) -> tuple[Violation, ...]:
    """The feature rules a driver's word breaks (cached: a run negotiates the same few sets over and over)."""
    return tuple(feature_rules.violations(device_id, features, offered=offered))


def _describe(refusal: ModelErrno) -> str:
    return f"errno {refusal.errno} ({errno.errorcode.get(refusal.errno, '?')}, {refusal.rule}: {refusal.message})"


def model_quirks(target: Target) -> frozenset[str]:
    """The registry quirks a target declares: those of its run's target profile, else of its kind's default
    profile (``auto``). A vendor's own quirks are left out: they name no answer the model could predict."""
    declared = target.declared_quirks
    if declared is None:
        declared = frozenset(quirk.name for quirk in target_profile(AUTO, kind=target.kind).quirks)
    return declared & QUIRKS.keys()


class Lockstep:
    """A target and its model, driven together (see the module docstring).

    ``spec`` defaults to what the target reports at open; ``quirks`` to :func:`model_quirks`.
    """

    def __init__(self, target: Target, *, spec: VdpaDeviceSpec | None = None,
                 quirks: Iterable[str] | None = None) -> None:
        self.target = target
        self.spec = spec if spec is not None else probe_spec(target)
        self.quirks = model_quirks(target) if quirks is None else frozenset(quirks)
        unknown = self.quirks - QUIRKS.keys()
        if unknown:
            raise ValueError(f"unknown quirks {sorted(unknown)}")
        self.exercised: Counter[str] = Counter()
        #: (rule the quirk stood in for, quirk name) -> times the model predicted the quirk's answer and the
        #: target gave it.
        self.quirk_hits: Counter[tuple[str, str]] = Counter()
        self.resyncs: Counter[str] = Counter()
        self.warnings: list[tuple[str, str]] = []  # (clause, message): SHOULD deviations, in order
        self.steps = 0
        self.ops: Counter[str] = Counter()  # operation name -> times applied
        self.last_refusal: ModelErrno | None = None  # the model's refusal in the last op (None: it accepted)
        self._observables = OBSERVABLES + vq_observables(self.spec.nvqs)
        #: The packed-layout clauses count only on a device that offers it (a driver can write the bit anyway).
        self._offers_packed = bool(self.spec.device_features >> VIRTIO_F_RING_PACKED & 1)
        self._start_model()

    # ----- lifetime -------------------------------------------------------------------------------

    def _start_model(self) -> None:
        self.model = VhostVdpaModel(self.spec, quirks=self.quirks & MODELLED_QUIRKS)
        self.model.open()
        self._memory: list[tuple[int, int]] = []
        self.model.set_user_memory(self._memory)
        self._vq_moved: set[int] = set()  # queues the device may have run: their base is the device's
        self._base_layout: dict[int, bool] = {}  # queue -> packed? when its base was last set (since reset)
        self._quirks_seen: Counter[tuple[str, str]] = Counter()
        self._packed = False  # the ring layout the queue positions were last set or read in
        self._split_after_packed = False  # reset while packed, no SET_FEATURES since: bases are split again

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
        self.last_refusal = refusal
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
        decided = self.model.quirks_decided
        for key, count in decided.items():
            new = count - self._quirks_seen[key]
            if new:
                self.quirk_hits[key] += new
        self._quirks_seen = Counter(decided)

    # ----- operations with latitude -------------------------------------------------------------------

    def set_status(self, status: int) -> None:
        """VHOST_VDPA_SET_STATUS, judged against the model's StatusWrite (see the module docstring)."""
        device = self.model.device
        old, was_packed, had_needs_reset = device.status, device.packed, device.needs_reset
        predicted, _ = self.op("VHOST_VDPA_SET_STATUS", lambda: self.model.VHOST_VDPA_SET_STATUS(status),
                               lambda: self.client.set_status(status), clause="suite.lockstep.status")
        if not isinstance(predicted, StatusWrite):
            refusal = self.last_refusal  # refused on both sides (op compared the errnos)
            if refusal is not None and refusal.rule == STATUS_CLEARS.rule:
                self._count_cleared_bits(old, status)
            return
        reported = self._target("VHOST_VDPA_GET_STATUS", self.client.get_status)
        if not reported.ok or not isinstance(reported.value, int):
            raise ClauseViolation("suite.lockstep.status", f"GET_STATUS after writing {status:#x}: {reported}")
        if predicted.reset:
            self._split_after_packed = was_packed or self._split_after_packed
            self._base_layout.clear()
        elif had_needs_reset and predicted.determined:
            self._judge_needs_reset(f"after writing {status:#x}", reported.value)
        self._judge_status(status, predicted, reported.value)

    def _count_cleared_bits(self, old: int, status: int) -> None:
        """vhost-vdpa refused a write clearing a bit (STATUS_CLEARS): the device's answer to a driver breaking
        ``status.driver.never_clears`` (a bit other than SUSPEND or DEVICE_NEEDS_RESET cleared)."""
        found = write_status(old, status, features_valid=True).driver_violations
        if any(v.rule == DRIVER_NEVER_CLEARS.rule for v in found):
            self.exercised[DRIVER_NEVER_CLEARS.rule] += 1

    def _judge_needs_reset(self, when: str, got: int) -> None:
        """DEVICE_NEEDS_RESET, once the device set it, stays until a reset (§2.1.2)."""
        self.exercised[DEVICE_NEEDS_RESET_STICKS.rule] += 1
        if not got & _NEEDS_RESET:
            raise ClauseViolation(DEVICE_NEEDS_RESET_STICKS.rule,
                                  f"{when} the device reports {got:#x}: DEVICE_NEEDS_RESET, set by the device, "
                                  "was cleared without a reset")

    def _judge_features(self, what: str, sw: StatusWrite, got: int) -> None:
        """FEATURES_OK: refused for a set breaking a MUST rule, SHOULD-accepted otherwise (§2.2.2, §3.1.1).

        A feature rule counts as exercised when it is the only rule the set breaks: the device's answer
        then depends on that rule alone.
        """
        device = self.model.device
        found = _feature_violations(self.spec.device_id, device.driver_features, self.spec.device_features)
        if len(found) == 1:
            self.exercised[found[0].rule] += 1
        if sw.features_accepted is False:
            self.exercised[DEVICE_REFUSES_INVALID_FEATURES.rule] += 1
            if got & StatusBit.FEATURES_OK:
                broken = ", ".join(v.rule for v in found if v.level is Level.MUST)
                raise ClauseViolation(DEVICE_REFUSES_INVALID_FEATURES.rule,
                                      f"{what}; the driver features {device.driver_features:#x} "
                                      f"break {broken}, yet FEATURES_OK stuck")
        else:
            self.exercised[DEVICE_ACCEPTS_VALID_FEATURES.rule] += 1

    def _judge_status(self, written: int, sw: StatusWrite, got: int) -> None:
        what = f"after writing {written:#x} the device reports {got:#x}, the model {sw.status:#x}"
        if sw.reset:
            self.exercised[DEVICE_RESET_CLEARS.rule] += 1
            self._vq_moved.clear()
            if got != 0:
                raise ClauseViolation(DEVICE_RESET_CLEARS.rule, what)
            return
        if sw.features_accepted is not None:
            self._judge_features(what, sw, got)
        if not sw.determined:
            self.exercised.update(v.rule for v in sw.driver_violations)
            self._resync_status(got, "status write breaking a driver rule")
            return
        if got == sw.status:
            return
        tolerated = sw.tolerated.get(got)
        if tolerated is not None:
            self.warnings.append((tolerated.rule, f"{tolerated.level} {tolerated.message} ({what})"))
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

    def get_config(self, offset: int, length: int) -> None:
        """VHOST_VDPA_GET_CONFIG; a read touching a field the offer does not make exist is the driver breaking
        ``config.driver.read_absent_field`` (§2.5.1): the device must still answer it, and does so as predicted."""
        _, actual = self.op("VHOST_VDPA_GET_CONFIG", lambda: self.model.VHOST_VDPA_GET_CONFIG(offset, length),
                            lambda: self.client.get_config(offset, length), clause="suite.lockstep.config")
        layout = config_layout(self.spec.device_id)
        if actual.ok and layout is not None:
            device = self.model.device
            negotiated = self._negotiated()
            found = layout.read(bytes(device.config), offset, length, offered=self.spec.device_features,
                                negotiated=negotiated, features_ok=negotiated is not None).violations
            broken = {v.rule for v in found}
            if len(broken) == 1:  # one driver rule broken: the answer compared is the device's answer to it
                self.exercised[broken.pop()] += 1

    def _negotiated(self) -> int | None:
        """The negotiated features: what the driver wrote and the device offered, once FEATURES_OK stuck."""
        device = self.model.device
        if not device.status & StatusBit.FEATURES_OK:
            return None
        return device.driver_features & self.spec.device_features

    def set_config(self, offset: int, data: bytes) -> None:
        """VHOST_VDPA_SET_CONFIG, judged against the device type's layout (see the module docstring)."""
        before = bytes(self.model.device.config)
        _, actual = self.op("VHOST_VDPA_SET_CONFIG", lambda: self.model.VHOST_VDPA_SET_CONFIG(offset, data),
                                    lambda: self.client.set_config(offset, data), clause="suite.lockstep.config")
        layout = config_layout(self.spec.device_id)
        if not actual.ok or layout is None:  # refused on both sides, or no layout: the model's store stands
            return
        judged = layout.write(before, offset, data, negotiated=self._negotiated() or 0)
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

    def set_features(self, features: int) -> None:
        """VHOST_SET_FEATURES: before FEATURES_OK a conforming parent takes any word (refusal is FEATURES_OK's job)."""
        _, actual = self.op("VHOST_SET_FEATURES", lambda: self.model.VHOST_SET_FEATURES(features),
                            lambda: self.client.set_features(features), clause=SET_FEATURES_RULE)
        if actual.ok:
            self._split_after_packed = False

    def set_vring_base(self, index: int, num: int) -> None:
        """VHOST_SET_VRING_BASE; a split base above 16 bits after a reset from packed checks the layout was dropped."""
        packed = self.model.device.packed
        _, actual = self.op("VHOST_SET_VRING_BASE", lambda: self.model.VHOST_SET_VRING_BASE(index, num),
                            lambda: self.client.set_vring_base(index, num), clause="suite.lockstep.vq_state")
        if not actual.ok:
            refusal = self.last_refusal
            if (self._split_after_packed and self._offers_packed and refusal is not None
                    and refusal.rule == VRING_BASE_RANGE.rule):
                self.exercised[LAYOUT_AFTER_RESET_RULE] += 1
            return
        self._vq_moved.discard(index)
        self._base_layout[index] = packed

    def kick(self, index: int) -> Outcome:
        """Notify queue ``index``; what the device then does is for the observables (or a datapath model) to judge."""
        self.steps += 1
        return self._target(f"kick {index}", lambda: self.client.kick(index))

    def close_and_reopen(self) -> None:
        """release + open: a reset, every mapping dropped, then a fresh open (checked like any step).

        In between, a request on the closed file (EBADF, ``vhost_vdpa.fd.closed``), and, where the target
        can try one, a second open while the first is held (EBUSY, ``vhost_vdpa.open.exclusive``).
        """
        self.steps += 1
        if isinstance(self.target, SecondOpen):
            target = self.target
            self.op("open", self.model.open, lambda: target.open_again())
        channel = self.client.channel
        self.target.close()
        self.model.close()
        self.op("VHOST_VDPA_GET_DEVICE_ID on a closed file", self.model.VHOST_VDPA_GET_DEVICE_ID,
                lambda: channel.ioctl(V.VHOST_VDPA_GET_DEVICE_ID, bytes(_U32.size)))
        self.reopen()

    # ----- after every step ---------------------------------------------------------------------------

    def check_observables(self) -> None:
        """Ask both sides every observable and compare (see the module docstring for the latitude).

        Besides the equality: a refusal both sides give counts its rule; the offer and the configuration
        values are held to the rules a device's own choices obey (:func:`~.observe.offer_checks`,
        :func:`~.observe.config_value_checks`); a packed queue position set by the driver and read back
        checks the device kept the whole packed state.
        """
        self._track_queues()
        for row in self._observables:
            predicted, refusal = _model_outcome(functools.partial(row.model, self.model))
            expected = Outcome(errno=refusal.errno) if refusal is not None else Outcome(predicted)  # type: ignore[arg-type]
            actual = self._target(row.name, functools.partial(row.target, self.client))
            if actual != expected:
                self._observed_difference(row, expected, actual, refusal)
            self.exercised[row.clause] += 1
            if refusal is not None:
                self.exercised[refusal.rule] += 1
            elif row.name == "VHOST_GET_FEATURES" and isinstance(actual.value, int):
                self._judge_reported(*offer_checks(self.spec.device_id, actual.value))
            elif row.name == "VHOST_VDPA_GET_CONFIG" and isinstance(actual.value, bytes):
                self._judge_reported(*config_value_checks(self.spec.device_id, actual.value,
                                                          self.spec.device_features))
            elif (row.index is not None and row.name.startswith("VHOST_GET_VRING_BASE") and self._offers_packed
                  and self._base_layout.get(row.index) and row.index not in self._vq_moved
                  and self.model.device.packed):
                self.exercised[PACKED_STATE_RULE] += 1  # a packed position the driver set, read back whole
        self.exercised["suite.target.alive"] += 1  # every request above was answered

    def _judge_reported(self, checked: Iterable[str], broken: Iterable[Violation]) -> None:
        """Rules on what the device reports about itself: a MUST broken fails, a SHOULD broken warns."""
        self.exercised.update(checked)
        for violation in broken:
            if violation.level is Level.MUST:
                raise ClauseViolation(violation.rule, violation.message)
            warning = (violation.rule, f"{violation.level} {violation.message}")
            if warning not in self.warnings:
                self.warnings.append(warning)

    def _observed_difference(self, row: Observable, expected: Outcome, actual: Outcome,
                             refusal: ModelErrno | None) -> None:
        device = self.model.device
        if row.name == "VHOST_VDPA_GET_STATUS" and isinstance(expected.value, int):
            if isinstance(actual.value, int) and device.needs_reset:
                self._judge_needs_reset(f"after {self.steps} operations", actual.value)
            if actual.value == expected.value | _NEEDS_RESET and self._device_may_fail():
                self._resync_status(expected.value | _NEEDS_RESET, "device error state")
                return
        if (row.index is not None and row.name.startswith(_GROUP_ROWS) and expected.ok and isinstance(actual.value, int)
                and 0 <= actual.value < self.spec.ngroups):
            # Which group a queue is in is the parent's choice (vdpa_config_ops.get_vq_group, no spec rule) and
            # may follow the driver features (a net controlq moves to index 2N once MQ is negotiated): only the
            # range is judged (vhost_vdpa.vring_group.range), and the model learns the device's answer.
            spec = device.spec
            if row.name.startswith("VHOST_VDPA_GET_VRING_DESC_GROUP"):
                desc = list(spec.vq_desc_groups or [spec.group_of(i) for i in range(spec.nvqs)])
                desc[row.index] = actual.value
                device.spec = replace(spec, vq_desc_groups=tuple(desc))
            else:
                groups = list(spec.vq_groups or [spec.group_of(i) for i in range(spec.nvqs)])
                groups[row.index] = actual.value
                device.spec = replace(spec, vq_groups=tuple(groups))
            self.resyncs["queue groups follow the features"] += 1
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
            # not defined by the spec (vdpa_vq_state is a union), so the device's report is taken, except for
            # a queue whose position the driver set in the new layout.
            self._packed = device.packed
            self._vq_moved.update(i for i in range(self.spec.nvqs) if self._base_layout.get(i) != device.packed)
        status = device.status
        running = (status & StatusBit.DRIVER_OK and status & StatusBit.FEATURES_OK
                   and not status & StatusBit.FAILED and not device.suspended)
        if running:
            self._vq_moved.update(i for i, vq in enumerate(device.vqs) if vq.ready)
