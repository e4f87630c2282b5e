"""What the net and blk datapath machines share: a fresh device per example, per-step memory checks, hostile chains.

:class:`DatapathMachine` is the skeleton of both Hypothesis state machines. Each example reopens the
target (a new device, as a new process opening the char device would), lays out guest memory with
canaries, and brings the device up through a :class:`~vdpacert.conformance.driver.device.DriverSession`
with features the subclass draws from the valid sets (split or packed, EVENT_IDX or not, INDIRECT or
not, VHOST_F_LOG_ALL or not, plus the device type's own). After *every* step an invariant runs the
canary check (nothing outside the device-writable windows changed) and, when logging is on, the
dirty-log check of :mod:`.dirty`; then it takes the next step's snapshot and clears the log.

Shared rules: reset at any point (the device is reset and brought up again, maybe with other
features) and hostile chains of every bad-input class of :data:`vdpacert.model.chains.BAD_INPUTS`
(:mod:`.hostile` writes them, switching ring layout or INDIRECT_DESC when a class needs it). Every
device may answer bad input the way the model's table allows; what the machine insists on is the
rows' common part (:mod:`.ring_checks`): the chain is never used as valid, no buffer it was not given
is written, and the device (SHOULD) sets DEVICE_NEEDS_RESET. The same step hands the device ring
sizes and misaligned areas the layout rules forbid, compared with the model's answers. The device is
then reset and brought up again.

Notifications (:mod:`.notify_watch`): each bring-up also draws where the rings start (near the
65535 -> 0 index wrap about half the time, through VHOST_SET_VRING_BASE) and the driver's
suppression choices; after every kick and every step the call eventfd of each queue is compared
with what :mod:`vdpacert.model.notify` says the device owed, and the driver's own kicks follow the
model's rows for what the device asked.

Every check names a clause of :mod:`vdpacert.conformance.clauses`, and the machine counts the clauses
it exercised (``self.exercised``, summed per machine class in ``clause_counts``).
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from collections.abc import Callable
from typing import ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vdpacert.conformance import clauses
from vdpacert.conformance.client import VhostClient
from vdpacert.conformance.driver import DeviceFailure, DeviceTimeout, DeviceViolation
from vdpacert.conformance.driver.device import DriverSession
from vdpacert.conformance.driver.memory import PAGE, GuestLayout, Snapshot
from vdpacert.conformance.driver.packed import PackedRing
from vdpacert.conformance.driver.split import RingFull, SplitRing, Used
from vdpacert.conformance.machines import ring_checks
from vdpacert.conformance.machines.dirty import NO_SPURIOUS, DirtyLogWatch, changed_pages, log_bytes_for
from vdpacert.conformance.machines.hostile import HOSTILE_PER_STEP, hostile_classes, hostile_menu, post_hostile
from vdpacert.conformance.machines.notify_watch import DriverDraws, NotifyWatch, draw_driver
from vdpacert.conformance.machines.traffic_rules import TrafficRules
from vdpacert.conformance.targets import Target, close_shared_targets, shared_target
from vdpacert.conformance.targets.embedded import FrontTarget
from vdpacert.model.chains import BAD_INPUTS, BadInput, ChainFault
from vdpacert.model.ring_index import decode_packed_base
from vdpacert.uapi import vhost_types as T  # noqa: N812
from vdpacert.uapi.virtio_config import VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_RING_PACKED
from vdpacert.uapi.virtio_ring import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC

__all__ = ["DatapathMachine", "DatapathViolation", "Ring", "SessionClient", "clause_of", "hostile_classes",
           "post_hostile", "violation"]

Ring = SplitRing | PackedRing

CANARY = "ring.device.writes_only_given_memory"
BAD_CHAIN = "ring.device.bad_chain_not_used"
NEEDS_RESET_ON_ERROR = "ring.device.needs_reset_on_error"
NO_PROGRESS = "suite.suspend.no_progress"
KICK_NOT_LOST = "suite.suspend.kick_not_lost"
VQ_STATE = "suite.lockstep.vq_state"

RING_BITS = (1 << VIRTIO_F_RING_PACKED, 1 << VIRTIO_RING_F_EVENT_IDX, 1 << VIRTIO_RING_F_INDIRECT_DESC)
LOG_ALL = 1 << T.VHOST_F_LOG_ALL
#: Where a hostile chain points when it wants an IOVA the device has no mapping for, or a mapping
#: with the wrong permission, counted from the end of the layout's IOVA range.
_UNMAPPED_GAP, _RO_ALIAS_GAP, _WO_ALIAS_GAP = 0x20_0000, 0x10_0000, 0x10_1000
#: Bad input a device need not detect, so DEVICE_NEEDS_RESET is not asked for (the other checks stay).
#: A deliberate difference from the table's "device may" column, stated here rather than skipped.
NOT_DETECTABLE: dict[BadInput, str] = {
    BadInput.DESC_NOT_AVAILABLE: "the spec has the device read a list as its head announces it (§2.8.6); only "
                                 "the driver is bound to publish the head last, and devices (DPDK, hardware) "
                                 "do not re-check later descriptors' flags",
}


class DatapathViolation(DeviceFailure):
    """A clause of the catalog broken (the fallback while ``conformance.lockstep.ClauseViolation`` is absent)."""

    def __init__(self, clause: str, message: str) -> None:
        if not clauses.is_clause(clause):
            raise ValueError(f"{clause!r} is not a clause of the catalog")
        super().__init__(f"[{clause}] {message}")
        self.clause = clause
        self.message = message


def violation(clause: str, message: str) -> Exception:
    """The exception for a broken clause: the lockstep machine's ClauseViolation when it exists."""
    try:
        from vdpacert.conformance.lockstep import ClauseViolation  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return DatapathViolation(clause, message)
    made: Exception = ClauseViolation(clause, message)
    return made


def clause_of(error: BaseException) -> str | None:
    """The clause a violation names, whichever exception class carried it (None: not a violation)."""
    for attr in ("clause_id", "clause"):
        value = getattr(error, attr, None)
        if isinstance(value, str):
            return value
    return None


class SessionClient:
    """The named vhost calls a DriverSession makes, over a VhostClient, with two changes.

    SET_OWNER is sent once per open (a reset and second bring-up reuses the ownership), and when a
    dirty log is watched every SET_VRING_ADDR asks for used-ring logging at the device area's gpa.
    """

    def __init__(self, client: VhostClient) -> None:
        self.client = client
        self.owned = False
        self.watch: DirtyLogWatch | None = None

    def set_owner(self) -> None:
        if not self.owned:
            self.client.set_owner()
            self.owned = True

    def get_backend_features(self) -> int:
        return self.client.get_backend_features()

    def set_backend_features(self, features: int, /) -> None:
        self.client.set_backend_features(features)

    def get_features(self) -> int:
        return self.client.get_features()

    def set_features(self, features: int, /) -> None:
        self.client.set_features(features)

    def get_status(self) -> int:
        return self.client.get_status()

    def set_status(self, status: int, /) -> None:
        self.client.set_status(status)

    def set_vring_num(self, index: int, num: int, /) -> None:
        self.client.set_vring_num(index, num)

    def set_vring_base(self, index: int, num: int, /) -> None:
        self.client.set_vring_base(index, num)

    def set_vring_addr(self, index: int, desc: int, avail: int, used: int, /, *, flags: int = 0,
                       log_guest_addr: int = 0) -> None:
        if self.watch is not None:
            log_flags, log_guest_addr = self.watch.vring_log(used)
            flags |= log_flags
        self.client.set_vring_addr(index, desc, avail, used, flags=flags, log_guest_addr=log_guest_addr)

    def set_vring_kick(self, index: int, fd: int, /) -> None:
        self.client.set_vring_kick(index, fd)

    def set_vring_call(self, index: int, fd: int, /) -> None:
        self.client.set_vring_call(index, fd)

    def set_vring_enable(self, index: int, enable: bool, /) -> None:
        self.client.set_vring_enable(index, enable)

    def iotlb_update(self, iova: int, size: int, uaddr: int, perm: int, /, *, asid: int = 0) -> None:
        self.client.iotlb_update(iova, size, uaddr, perm, asid=asid)


# ----- hostile chains --------------------------------------------------------------------------------------
# Built by .hostile (hostile_classes, post_hostile; re-exported here) and checked by .ring_checks.


# ----- the machine -----------------------------------------------------------------------------------------

class DatapathMachine(TrafficRules, RuleBasedStateMachine):
    """The skeleton (see the module docstring). Subclasses set TARGET and implement the device hooks."""

    TARGET: ClassVar[str] = ""
    MEMORY: ClassVar[int] = 4 << 20
    GPA: ClassVar[int] = 0x100_0000
    LOG_GPA: ClassVar[int] = 0x7F00_0000
    NUM: ClassVar[int] = 32
    #: Seconds to wait for what the model says must come from an embedded target (it answers synchronously).
    SETTLE: ClassVar[float] = 0.25
    #: ... and from a real device, whose kernel thread may run late (a guest kernel under TCG: whole seconds).
    #: ``VDPACERT_SETTLE`` overrides it. Only a device that breaks a rule makes a run wait this long.
    REAL_DEVICE_SETTLE: ClassVar[float] = 5.0
    clause_counts: ClassVar[Counter[str]] = Counter()

    # ----- lifecycle -------------------------------------------------------------------------------------

    @classmethod
    def shared_target(cls) -> Target:
        """The run's open target for this target string (:func:`~vdpacert.conformance.targets.shared_target`:
        the one the control machine uses too); each example reopens it."""
        return shared_target(cls.TARGET)

    @classmethod
    def close_targets(cls) -> None:
        close_shared_targets()

    def __init__(self) -> None:
        super().__init__()
        self.target = self.shared_target()
        self.target.reopen()
        in_process = isinstance(self.target, FrontTarget)
        self.settle = self.SETTLE if in_process else float(os.environ.get("VDPACERT_SETTLE", self.REAL_DEVICE_SETTLE))
        self.exercised: Counter[str] = Counter()
        self.layout = GuestLayout(self.target.new_memory(self.MEMORY, gpa=self.GPA))
        self.client = SessionClient(self.target.client)
        self.client.set_owner()
        self.offered = self.client.get_features()
        self.watch = DirtyLogWatch(self.layout, self.target.new_memory(log_bytes_for(self.layout), gpa=self.LOG_GPA))
        self.log_installed = False
        self.session: DriverSession | None = None
        self.features = 0
        self.snapshot: Snapshot | None = None
        self.scratch = self.layout.alloc(PAGE, PAGE, what="alias page (mapped read-only and write-only)")
        end = self.layout.iova_base + self.layout.size
        self.unmapped_iova, self.ro_alias, self.wo_alias = end + _UNMAPPED_GAP, end + _RO_ALIAS_GAP, end + _WO_ALIAS_GAP
        self.aliases = False
        #: Used-buffer notifications and the driver's own kicks, held against model/notify.py. An in-process
        #: front runs the device inside ``service``: a signal it owes cannot come later, so none is waited for
        #: (a shrinking run replays a missed one hundreds of times).
        #: SHOULD deviations this example noted without stopping (the runner files them as warnings).
        self.warned: list[tuple[str, str]] = []
        self.notify = NotifyWatch(self.count, self.fail, self.status, 0.0 if in_process else self.settle,
                                  warn=self.warn)
        self.ring_draws = DriverDraws()

    def teardown(self) -> None:
        self.notify.detach()
        if self.session is not None:
            self.session.close()
            self.session = None
        type(self).clause_counts.update(self.exercised)

    def count(self, clause: str) -> None:
        self.exercised[clause] += 1

    def fail(self, clause: str, message: str) -> Exception:
        self.count(clause)
        return violation(clause, message)

    def warn(self, clause: str, message: str) -> None:
        """A SHOULD-level deviation: counted, noted for the report, and the example goes on."""
        self.count(clause)
        self.warned.append((clause, message))

    # ----- what a device type provides -------------------------------------------------------------------

    def device_features(self, data: st.DataObject) -> int:
        """Draw the device-type part of a valid feature set (subset of ``self.offered``)."""
        raise NotImplementedError

    def queues(self, features: int) -> list[int]:
        raise NotImplementedError

    def after_bring_up(self) -> None:
        """Reset the model's view: the device was just (re)initialised with ``self.features``."""

    def hostile_targets(self) -> list[tuple[int, bool]]:
        """(queue index, chain is device-writable) pairs a hostile chain may be posted on."""
        raise NotImplementedError

    def provoke(self, queue: int) -> None:
        """Make the device walk the chain just posted on ``queue`` (kick it, feed its partner)."""
        assert self.session is not None
        self.session.kick(queue)

    # ----- features and bring-up -------------------------------------------------------------------------

    def draw_features(self, data: st.DataObject) -> int:
        # The ring layout first, as one choice of four: the notification rows differ in all four.
        packed, event_idx, indirect = RING_BITS
        layouts = [bits for bits in (0, packed, event_idx, packed | event_idx) if not bits & ~self.offered]
        features = data.draw(st.sampled_from(layouts), label="ring layout (RING_PACKED, EVENT_IDX)")
        if self.offered & indirect and data.draw(st.booleans(), label="INDIRECT_DESC"):
            features |= indirect
        features |= self.device_features(data)
        if self.offered & LOG_ALL and data.draw(st.booleans(), label="VHOST_F_LOG_ALL"):
            features |= LOG_ALL
        self.draw_ring_plan(data, features)
        return features

    def draw_ring_plan(self, data: st.DataObject, features: int) -> None:
        """The driver side of the next bring-up with ``features``: ring starts (near the index wrap about
        half the time) and per-step notification choices (see :mod:`.notify_watch`)."""
        self.ring_draws = draw_driver(data, self.queues(features), self.NUM)

    def bring_up(self, features: int) -> None:
        """(Re)initialise the device: reset, features, queues, DRIVER_OK; the dirty log; the alias maps."""
        if self.session is not None:
            self.session.close()
            # A reset leaves vhost's IOTLB alone (Linux vhost_vdpa keeps it until close or INVALIDATE, and
            # answers an overlapping UPDATE with EEXIST), so unmap before the next bring-up maps again.
            client = self.target.client
            client.iotlb_invalidate(self.layout.iova_base, self.layout.size)
            if self.aliases:
                client.iotlb_invalidate(self.ro_alias, PAGE)
                client.iotlb_invalidate(self.wo_alias, PAGE)
        self.notify.detach()
        self.features = features
        logging = bool(features & LOG_ALL)
        self.client.watch = self.watch if logging else None
        plan = self.ring_draws.plan(features, self.queues(features), self.NUM)
        session = DriverSession(self.client, self.layout, features, queues=self.queues(features), num=self.NUM,
                                starts=plan.starts, service=self.target.service, timeout=self.settle)
        self.session = session
        if logging and not self.log_installed:  # before DRIVER_OK: the device may write its rings from then on
            try:
                self.target.client.set_log_base(self.watch.log.uaddr)
                self.target.client.set_log_fd(self.target.eventfd())
                self.log_installed = True
            except OSError as error:  # Linux vhost-vdpa: no device log (brief §5); the checks do not apply
                if error.errno not in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        self.watch.active = logging and self.log_installed
        session.bring_up()
        self.notify.attach(session, plan)
        self.aliases = False
        try:
            uaddr = self.layout.uaddr(self.scratch)
            self.client.iotlb_update(self.ro_alias, PAGE, uaddr, T.VHOST_ACCESS_RO)
            self.client.iotlb_update(self.wo_alias, PAGE, uaddr, T.VHOST_ACCESS_WO)
            self.aliases = True
        except OSError:
            pass
        self.after_bring_up()

    @property
    def packed(self) -> bool:
        return bool(self.features & 1 << VIRTIO_F_RING_PACKED)

    @property
    def indirect(self) -> bool:
        return bool(self.features & 1 << VIRTIO_RING_F_INDIRECT_DESC)

    def ring(self, index: int) -> Ring:
        assert self.session is not None
        return self.session.rings[index]

    def status(self) -> int:
        return self.client.get_status()

    # ----- the per-step memory checks ----------------------------------------------------------------------

    @invariant()
    def device_wrote_only_where_allowed(self) -> None:
        """Canaries intact, and the dirty log marks exactly what was written (then: next snapshot)."""
        if self.snapshot is not None:
            self.count(CANARY)
            self.layout.check(self.snapshot)
            if self.log_installed:
                findings = self.watch.check(self.snapshot)
                for clause in {"suite.dirty_log.covers_writes", "suite.dirty_log.covers_used_ring", NO_SPURIOUS}:
                    if self.watch.active or clause == NO_SPURIOUS:
                        self.count(clause)
                musts = [f for f in findings if f.clause != NO_SPURIOUS]
                for finding in musts + findings:
                    raise self.fail(finding.clause, finding.message)
        self.snapshot = self.layout.snapshot()
        if self.log_installed:
            self.watch.clear()

    def expect_no_progress(self, what: str, action: Callable[[], object]) -> None:
        """Run ``action`` (kicks while suspended): not one byte of guest memory may change."""
        snapshot = self.layout.snapshot()
        action()
        self.target.service()
        self.count(NO_PROGRESS)
        changed = changed_pages(self.layout, snapshot)
        if changed:
            _page, runs = next(iter(changed.items()))
            offset = runs[0][0]
            raise self.fail(NO_PROGRESS, f"{what}: the suspended device wrote {len(changed)} page(s), first at "
                                         f"offset {offset:#x} ({self.layout.owner(offset)})")

    @invariant()
    def notifications_as_the_model_says(self) -> None:
        """Every queue's used-notification window closes (signals vs the model's row); the next step's opens."""
        self.notify.next_step()

    # ----- vring base --------------------------------------------------------------------------------------

    def check_vring_base(self, index: int) -> int:
        """GET_VRING_BASE of a suspended queue, checked against the ring the driver sees (all used reaped)."""
        ring = self.ring(index)
        base = self.client.client.get_vring_base(index)
        self.count(VQ_STATE)
        if isinstance(ring, SplitRing):
            used, avail = ring.used_idx(), ring.avail_idx
            if (base - used) & 0xFFFF > (avail - used) & 0xFFFF:
                raise self.fail(VQ_STATE, f"queue {index}: GET_VRING_BASE {base} is not between used idx {used} "
                                          f"and avail idx {avail}")
            return base
        state = decode_packed_base(base)
        num = ring.num

        def linear(idx: int, wrap: int) -> int:
            return (idx + (0 if wrap else num)) % (2 * num)

        used_pos = linear(ring.next_used, ring.used_wrap)
        if (state.last_used_idx, state.last_used_counter) != (ring.next_used, ring.used_wrap):
            raise self.fail(VQ_STATE, f"queue {index}: GET_VRING_BASE {base:#x} says used at slot "
                                      f"{state.last_used_idx} wrap {state.last_used_counter}; the ring shows "
                                      f"slot {ring.next_used} wrap {ring.used_wrap}")
        avail_pos = linear(state.last_avail_idx, state.last_avail_counter)
        driver_pos = linear(ring.next_avail, ring.avail_wrap)
        if (avail_pos - used_pos) % (2 * num) > (driver_pos - used_pos) % (2 * num):
            raise self.fail(VQ_STATE, f"queue {index}: GET_VRING_BASE {base:#x} puts the device's avail position "
                                      f"past the driver's (slot {ring.next_avail} wrap {ring.avail_wrap})")
        return base

    @property
    def can_suspend(self) -> bool:
        assert self.session is not None
        wanted = 1 << T.VHOST_BACKEND_F_SUSPEND | 1 << T.VHOST_BACKEND_F_RESUME
        return self.session.backend_features & wanted == wanted

    # ----- shared rules ------------------------------------------------------------------------------------

    @precondition(lambda self: self.session is not None)
    @rule(data=st.data(), same=st.booleans())
    def reset_and_bring_up_again(self, data: st.DataObject, same: bool) -> None:
        """Reset at any point: whatever was in flight is abandoned; the device starts over."""
        self.count("suite.lockstep.status")
        if same:
            self.draw_ring_plan(data, self.features)
        self.bring_up(self.features if same else self.draw_features(data))

    def reap_all(self, index: int) -> list[Used]:
        assert self.session is not None
        return self.session.reap(index, 0)

    @precondition(lambda self: self.session is not None)
    @rule(data=st.data())
    def hostile_chain(self, data: st.DataObject) -> None:
        """Chains of HOSTILE_PER_STEP consecutive bad-input classes (:mod:`.hostile`), and the ring layouts a
        driver may not hand over.

        For each chain the model walks what was published and names its row. Once the device has seen
        it: nothing written into the buffers of any outstanding chain, the hostile queue's used ring as
        the model predicts, every ring reaped and validated; after the first, the layout probes (they
        reset the device); last, since it is a SHOULD, DEVICE_NEEDS_RESET; then the device comes up again
        for the next. See :mod:`.ring_checks`.
        """
        pick = data.draw(st.integers(0, len(BAD_INPUTS) - 1), label="bad input")
        for step in range(HOSTILE_PER_STEP):
            assert self.session is not None
            menu = hostile_menu(self.features, self.offered, self.aliases)
            # Rotated by the hostile chains this example already posted: consecutive classes within a step,
            # and examples whose draws repeat (Hypothesis favours the first choice) still walk the whole menu.
            posted: int = getattr(self, "hostile_posted", 0)
            bad, features = menu[(pick + posted) % len(menu)]
            if features != self.features:  # the class needs the other ring layout or INDIRECT_DESC
                self.bring_up(features)
            targets = [(q, w) for q, w in self.hostile_targets() if self.ring(q).in_flight == 0]
            if not targets:
                return
            queue, writable = data.draw(st.sampled_from(targets), label="hostile queue")
            ring = self.ring(queue)
            snapshot = self.snapshot if step == 0 and self.snapshot is not None else self.layout.snapshot()
            position = ring_checks.device_position(ring)
            try:
                chain = post_hostile(ring, bad, writable=writable, unmapped_iova=self.unmapped_iova,
                                     ro_alias=self.ro_alias, wo_alias=self.wo_alias)
            except (RingFull, MemoryError):
                return
            self.hostile_posted = posted + 1
            aliases = [(self.ro_alias, self.scratch, T.VHOST_ACCESS_RO),
                       (self.wo_alias, self.scratch, T.VHOST_ACCESS_WO)] if self.aliases else []
            fault = ring_checks.model_verdict(ring, position, self.features,
                                              ring_checks.layout_translator(self.layout, aliases))
            if not isinstance(fault, ChainFault) or fault.bad is not bad:
                raise AssertionError(f"harness: the {bad.value} chain on queue {queue} is {fault} to the model")
            self.count(fault.row.rule)
            self.provoke(queue)
            self.target.service()
            rings = self.session.rings
            ring_checks.check_after_bad(self, self.layout, snapshot, rings.values(), ring, chain, fault,
                                        packed=self.packed)
            for index, each in rings.items():
                had = each.in_flight > 0
                try:
                    reaped = self.reap_all(index)
                except DeviceViolation as error:
                    raise self.fail(error.clause, f"{bad.value} on queue {queue}: {error.message}") from None
                if had or reaped:
                    for clause in ring_checks.used_rules(each, bool(reaped)):
                        self.count(clause)
            used = chain is not None and chain.id not in ring.outstanding
            status = self.status()
            if step == 0:
                ring_checks.check_ring_layout(self, self.target, backend_features=self.session.backend_features,
                                              features=self.features, packed=self.packed, index=queue,
                                              num=ring.num, addresses=ring.addresses)
            if bad not in NOT_DETECTABLE:
                if status & VIRTIO_CONFIG_S_NEEDS_RESET:
                    self.count(NEEDS_RESET_ON_ERROR)
                else:  # a SHOULD (§2.1.2): warned, the example goes on
                    self.warn(NEEDS_RESET_ON_ERROR, f"queue {queue}: {bad.value} ({fault.row.rule}) "
                                                    f"{'was used with len 0' if used else 'was left unused'} "
                                                    "and DEVICE_NEEDS_RESET is not set")
            self.bring_up(self.features)

    def wait_used(self, index: int, count: int, clause: str, what: str) -> list[Used]:
        """At least ``count`` used entries of queue ``index`` within SETTLE seconds, else ``clause``."""
        assert self.session is not None
        try:
            return self.session.reap(index, count, timeout=self.settle)
        except DeviceTimeout as error:
            raise self.fail(clause, f"{what}: {error}") from None
