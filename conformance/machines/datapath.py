"""What the net and blk datapath machines share: a fresh device per example, per-step memory checks, hostile chains.

:class:`DatapathMachine` is the skeleton of both Hypothesis state machines. Each example reopens the
target (a new device, as a new process opening the char device would), lays out guest memory with
canaries, and brings the device up through a :class:`~vdpacert.conformance.driver.device.DriverSession`
with features the subclass draws from the valid sets (split or packed, EVENT_IDX or not, INDIRECT or
not, VHOST_F_LOG_ALL or not, plus the device type's own). After *every* step an invariant runs the
canary check (nothing outside the device-writable windows changed) and, when logging is on, the
dirty-log check of :mod:`.dirty`; then it takes the next step's snapshot and clears the log.

Shared rules: reset at any point (the device is reset and brought up again, maybe with other
features) and hostile chains of every bad-input class the driver harness can write for the ring
layout in use (:data:`vdpacert.model.chains.BAD_INPUTS`). Every device may answer bad input the way
the model's table allows; what the machine insists on is the rows' common part: the chain is never
used as valid, nothing outside the windows is written, and the device (SHOULD) sets
DEVICE_NEEDS_RESET. The device is then reset and brought up again.

Every check names a clause of :mod:`vdpacert.conformance.clauses`, and the machine counts the clauses
it exercised (``self.exercised``, summed per machine class in ``clause_counts``).
"""

from __future__ import annotations

import errno
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
from vdpacert.conformance.driver.packed import AVAIL, USED, PackedRing, avail_flags
from vdpacert.conformance.driver.split import INDIRECT, NEXT, WRITE, Chain, RingFull, SplitRing, Used
from vdpacert.conformance.machines.dirty import NO_SPURIOUS, DirtyLogWatch, changed_pages, log_bytes_for
from vdpacert.conformance.targets import Target, make_target
from vdpacert.model.chains import BAD_INPUTS, BadInput, Layout
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

def hostile_classes(packed: bool, indirect: bool, aliases: bool) -> list[BadInput]:
    """The bad-input classes the harness can write on this ring layout (rows of BAD_INPUTS that apply)."""
    layout = Layout.PACKED if packed else Layout.SPLIT
    out = []
    for bad, row in BAD_INPUTS.items():
        if layout not in row.layouts:
            continue
        if bad is BadInput.INDIRECT_NOT_NEGOTIATED and indirect:
            continue
        if bad is BadInput.ADDRESS_PERMISSION and not aliases:
            continue
        if packed and bad is BadInput.DESCRIPTOR_LOOP:  # a packed list has no links to loop through
            continue
        out.append(bad)
    return out


def _scratch(layout: GuestLayout, chain_allocs: list[int], size: int = 64) -> int:
    offset = layout.alloc(size, 16, what="hostile chain buffer")
    chain_allocs.append(offset)
    return layout.iova(offset)


def _keep(chain: Chain, allocs: list[int]) -> Chain:
    chain.allocations += allocs
    return chain


def post_hostile(ring: Ring, bad: BadInput, *, writable: bool, unmapped_iova: int, ro_alias: int,
                 wo_alias: int) -> Chain | None:
    """Write and publish one chain (or ring state) of class ``bad``; None when no chain stands for it."""
    layout = ring.layout
    w = WRITE if writable else 0
    allocs: list[int] = []
    if isinstance(ring, SplitRing):
        if bad is BadInput.DESCRIPTOR_LOOP:
            return ring.post_loop()
        if bad is BadInput.NESTED_INDIRECT:
            return ring.post_nested_indirect()
        if bad is BadInput.INDEX_OUT_OF_RANGE:
            return ring.post_head_out_of_range()
        if bad is BadInput.AVAIL_IDX_AHEAD:
            ring.push_avail_idx_ahead()
            return None
        buf = _scratch(layout, allocs)
        second = ring.free[1] if len(ring.free) > 1 else 0
        descs: list[tuple[int, int, int, int]]
        if bad in (BadInput.CHAIN_TOO_LONG, BadInput.INDIRECT_LEN_NOT_MULTIPLE_OF_16, BadInput.ZERO_LENGTH_INDIRECT,
                   BadInput.INDIRECT_NOT_NEGOTIATED, BadInput.INDIRECT_IN_CHAIN):
            entries = ring.num + 1 if bad is BadInput.CHAIN_TOO_LONG else 2
            table = layout.alloc(16 * entries, 16, what="hostile indirect table")
            allocs.append(table)
            for i in range(entries):
                more = i + 1 < entries
                ring.write_desc(i, buf, 16, w | (NEXT if more else 0), i + 1 if more else 0, table=table)
            length = {BadInput.INDIRECT_LEN_NOT_MULTIPLE_OF_16: 24, BadInput.ZERO_LENGTH_INDIRECT: 0}.get(
                bad, 16 * entries)
            if bad is BadInput.INDIRECT_IN_CHAIN:
                descs = [(layout.iova(table), length, INDIRECT | NEXT, second), (buf, 16, w, 0)]
            else:
                descs = [(layout.iova(table), length, INDIRECT, 0)]
        elif bad is BadInput.ADDRESS_UNMAPPED:
            descs = [(unmapped_iova, 64, w, 0)]
        elif bad is BadInput.ADDRESS_PERMISSION:
            descs = [(ro_alias if writable else wo_alias, 64, w, 0)]
        elif bad is BadInput.TOTAL_LENGTH_OVERFLOW:
            descs = [(buf, 16, w | NEXT, second), (buf, 0xFFFF_FFFF, w, 0)]
        elif bad is BadInput.READABLE_AFTER_WRITABLE:
            descs = [(buf, 16, WRITE | NEXT, second), (buf, 16, 0, 0)]
        else:
            raise ValueError(f"{bad} cannot be written on a split ring")
        return _keep(ring.post_raw(descs), allocs)
    # packed
    if bad is BadInput.INDIRECT_IN_CHAIN:
        return ring.post_indirect_in_list()
    buf = _scratch(layout, allocs)
    pdescs: list[tuple[int, int, int]]
    if bad in (BadInput.CHAIN_TOO_LONG, BadInput.INDIRECT_LEN_NOT_MULTIPLE_OF_16, BadInput.ZERO_LENGTH_INDIRECT,
               BadInput.INDIRECT_NOT_NEGOTIATED):
        entries = ring.num + 1 if bad is BadInput.CHAIN_TOO_LONG else 2
        table = layout.alloc(16 * entries, 16, what="hostile indirect table")
        allocs.append(table)
        for i in range(entries):
            ring.write_indirect(table, i, buf, 16, w)
        length = {BadInput.INDIRECT_LEN_NOT_MULTIPLE_OF_16: 24, BadInput.ZERO_LENGTH_INDIRECT: 0}.get(
            bad, 16 * entries)
        pdescs = [(layout.iova(table), length, INDIRECT)]
    elif bad is BadInput.ADDRESS_UNMAPPED:
        pdescs = [(unmapped_iova, 64, w)]
    elif bad is BadInput.ADDRESS_PERMISSION:
        pdescs = [(ro_alias if writable else wo_alias, 64, w)]
    elif bad is BadInput.TOTAL_LENGTH_OVERFLOW:
        pdescs = [(buf, 16, w), (buf, 0xFFFF_FFFF, w)]
    elif bad is BadInput.READABLE_AFTER_WRITABLE:
        pdescs = [(buf, 16, WRITE), (buf, 16, 0)]
    elif bad is BadInput.DESC_NOT_AVAILABLE:
        wrap = ring.avail_wrap
        chain = ring.post_raw([(buf, 16, w), (buf, 16, w)], publish=False)
        second_slot = chain.slots[1]
        slot_wrap = wrap if second_slot > chain.slots[0] else 1 - wrap  # the list may wrap past the ring's end
        addr, length, buffer_id, flags = ring.read_desc(second_slot)
        ring.write_desc(second_slot, addr, length, buffer_id, flags & ~(AVAIL | USED) | avail_flags(1 - slot_wrap))
        ring.publish()
        return _keep(chain, allocs)
    else:
        raise ValueError(f"{bad} cannot be written on a packed ring")
    return _keep(ring.post_raw(pdescs), allocs)


# ----- the machine -----------------------------------------------------------------------------------------

class DatapathMachine(RuleBasedStateMachine):
    """The skeleton (see the module docstring). Subclasses set TARGET and implement the device hooks."""

    TARGET: ClassVar[str] = ""
    MEMORY: ClassVar[int] = 4 << 20
    GPA: ClassVar[int] = 0x100_0000
    LOG_GPA: ClassVar[int] = 0x7F00_0000
    NUM: ClassVar[int] = 32
    #: Seconds to wait for what the model says must come (the embedded targets answer synchronously).
    SETTLE: ClassVar[float] = 0.25
    clause_counts: ClassVar[Counter[str]] = Counter()
    _targets: ClassVar[dict[str, Target]] = {}

    # ----- lifecycle -------------------------------------------------------------------------------------

    @classmethod
    def shared_target(cls) -> Target:
        """One open target per target string for the whole run; each example reopens it."""
        target = DatapathMachine._targets.get(cls.TARGET)
        if target is None or target.closed:
            target = DatapathMachine._targets[cls.TARGET] = make_target(cls.TARGET)
        return target

    @classmethod
    def close_targets(cls) -> None:
        for target in DatapathMachine._targets.values():
            target.close()
        DatapathMachine._targets.clear()

    def __init__(self) -> None:
        super().__init__()
        self.target = self.shared_target()
        self.target.reopen()
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

    def teardown(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
        type(self).clause_counts.update(self.exercised)

    def count(self, clause: str) -> None:
        self.exercised[clause] += 1

    def fail(self, clause: str, message: str) -> Exception:
        self.count(clause)
        return violation(clause, message)

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
        features = self.device_features(data)
        for bit in RING_BITS:
            if self.offered & bit and data.draw(st.booleans(), label=f"ring feature {bit:#x}"):
                features |= bit
        if self.offered & LOG_ALL and data.draw(st.booleans(), label="VHOST_F_LOG_ALL"):
            features |= LOG_ALL
        return features

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
        self.features = features
        logging = bool(features & LOG_ALL)
        self.client.watch = self.watch if logging else None
        session = DriverSession(self.client, self.layout, features, queues=self.queues(features), num=self.NUM,
                                service=self.target.service, timeout=self.SETTLE)
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
        self.bring_up(self.features if same else self.draw_features(data))

    def reap_all(self, index: int) -> list[Used]:
        assert self.session is not None
        return self.session.reap(index, 0)

    @precondition(lambda self: self.session is not None)
    @rule(data=st.data())
    def hostile_chain(self, data: st.DataObject) -> None:
        """A chain of one bad-input class: never used as valid; the device should ask to be reset."""
        assert self.session is not None
        targets = [(q, w) for q, w in self.hostile_targets() if self.ring(q).in_flight == 0]
        if not targets:
            return
        queue, writable = data.draw(st.sampled_from(targets), label="hostile queue")
        bad = data.draw(st.sampled_from(hostile_classes(self.packed, self.indirect, self.aliases)), label="bad input")
        ring = self.ring(queue)
        try:
            chain = post_hostile(ring, bad, writable=writable, unmapped_iova=self.unmapped_iova,
                                 ro_alias=self.ro_alias, wo_alias=self.wo_alias)
        except (RingFull, MemoryError):
            return
        self.count(BAD_INPUTS[bad].rule)
        self.provoke(queue)
        self.target.service()
        self.count(BAD_CHAIN)
        for index in self.session.rings:
            try:
                self.reap_all(index)
            except DeviceViolation as error:
                if error.clause == BAD_CHAIN:
                    raise self.fail(BAD_CHAIN, f"{bad.value}: {error.message}") from None
                raise
        used = chain is not None and chain.id not in ring.outstanding
        if bad in NOT_DETECTABLE:
            self.bring_up(self.features)
            return
        self.count(NEEDS_RESET_ON_ERROR)
        if not self.status() & VIRTIO_CONFIG_S_NEEDS_RESET:
            raise self.fail(NEEDS_RESET_ON_ERROR, f"queue {queue}: {bad.value} ({BAD_INPUTS[bad].rule}) "
                                                  f"{'was used with len 0' if used else 'was left unused'} and "
                                                  "DEVICE_NEEDS_RESET is not set")
        self.bring_up(self.features)

    def wait_used(self, index: int, count: int, clause: str, what: str) -> list[Used]:
        """At least ``count`` used entries of queue ``index`` within SETTLE seconds, else ``clause``."""
        assert self.session is not None
        try:
            return self.session.reap(index, count, timeout=self.SETTLE)
        except DeviceTimeout as error:
            raise self.fail(clause, f"{what}: {error}") from None
