"""Control operations checked by making the device work afterwards: translations, DRIVER_OK, vring state.

A control-path answer proves little on its own. A device can acknowledge an IOTLB INVALIDATE and keep
the stale translation, program a read-only mapping read-write, keep an identity pass-through under
userspace's map, acknowledge SET_GROUP_ASID while the group still translates through address space 0,
serve a kick before DRIVER_OK, keep its ring positions across a reset, report the driver's avail index
as its own position after SUSPEND, or answer SET_VRING_BASE without applying it. None of that shows
until the device uses memory or a queue, so :class:`TrafficRules` (a base class of
:class:`~vdpacert.conformance.machines.datapath.DatapathMachine`: the net and blk machines both run it,
on split and packed rings) does the control operation and then provokes the device:

- a :class:`Probe` is one valid request of the device type (a blk IN of sector 0; a net receive
  buffer the machine's ``provoke`` feeds with a frame) with one buffer moved to a *probe IOVA*: an
  alias, mapped (or not) by the rule, of a page of guest memory nothing else uses, so whatever the
  device does through that IOVA shows in that page and nowhere else;
- what must happen is the model's: :class:`~vdpacert.model.iotlb.IotlbModel` copies of what userspace
  mapped in each address space translate the probe IOVA (mapped and permitted: the device must reach
  the page; a miss or a permission fault: it must not touch it, and the chain is bad input it may not
  use as valid), the model's initial queue state says what a reset leaves, and the ring the driver
  sees says where a suspended device stands and where a restored one resumes.

Every scenario starts from quiet rings (nothing outstanding; otherwise the device is reset and brought
up again first) and ends the same way, which is itself checked: after a reset every vring base reads
as the model's initial state, and a request posted and kicked during the next bring-up, before
DRIVER_OK, is left alone. The device-type machine's own model starts afresh after that bring-up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from vdpacert.conformance.client import VhostClient
from vdpacert.conformance.driver import DeviceTimeout, DeviceViolation
from vdpacert.conformance.driver.memory import PAGE
from vdpacert.conformance.driver.packed import PackedRing
from vdpacert.conformance.driver.split import Chain, RingFull, SplitRing, Used
from vdpacert.conformance.driver.traffic import OUTHDR, RX_BUF, SECTOR
from vdpacert.conformance.machines.dirty import changed_pages
from vdpacert.model.iotlb import AccessFault, IotlbModel
from vdpacert.model.ring_index import PackedVqState, encode_packed_base
from vdpacert.model.vdpa_device import VqState
from vdpacert.uapi import vhost_types as T  # noqa: N812
from vdpacert.uapi import virtio_blk as B  # noqa: N812
from vdpacert.uapi.virtio_config import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_RING_PACKED,
)
from vdpacert.uapi.virtio_ids import VIRTIO_ID_BLOCK, VIRTIO_ID_NET

if TYPE_CHECKING:
    from vdpacert.conformance.client import Channel
    from vdpacert.conformance.driver.device import DriverSession
    from vdpacert.conformance.driver.memory import GuestLayout
    from vdpacert.conformance.machines.datapath import SessionClient
    from vdpacert.conformance.targets import Target

__all__ = ["Probe", "TrafficRules"]

Ring = SplitRing | PackedRing

NO_ACCESS = "suite.iotlb.no_access_unmapped"
ASID_ISOLATION = "suite.iotlb.asid_isolation"
NO_USE_BEFORE_DRIVER_OK = "suite.status.no_use_before_driver_ok"
RESET_CLEARS = "status.device.reset_clears"
BASE_LAYOUT_AFTER_RESET = "vhost_vdpa.vring_base.layout"
VQ_STATE = "suite.lockstep.vq_state"
LOCKSTEP_ERRNO = "suite.lockstep.errno"
USED_RING = "suite.lockstep.used_ring"
RESTORED_SPLIT = "vdpa_device.vq_state.used_idx_preserved"
RESTORED_PACKED = "vdpa_device.vq_state.packed"
TRANSLATE_MISS = "iotlb.translate.miss"
MAPS_RANGE = "iotlb.update.maps_range"
BAD_UNMAPPED = "ring.bad_input.address_unmapped"
BAD_PERMISSION = "ring.bad_input.address_permission"
NO_PROGRESS = "suite.suspend.no_progress"
KICK_NOT_LOST = "suite.suspend.kick_not_lost"

#: Where the probe IOVAs start, past the layout's end (the machine's own aliases sit below 0x30_0000).
_PROBE_GAP = 0x30_0000
#: What a probe page holds while a probe runs: not the canary, not zero, not a sector pattern.
_PROBE_FILL = 0x5A
#: Known deviations that make a scenario's prediction wrong for a target declaring them (never checked then).
_PASSTHROUGH_QUIRK = "vdpa_sim.passthrough_default_map"
_PACKED_STATE_QUIRK = "vdpa_sim.packed_vq_state_ignored"
_STALE_LAYOUT_QUIRK = "vhost_vdpa.stale_ring_layout_after_reset"
#: Translation scenarios: how the probe IOVA is (not) mapped. Few, so each comes often: a device's own
#: unmapped-address handling is also probed by the machine's hostile chains (an IOVA past every mapping).
_TRANSLATIONS = ("invalidated", "read_only", "write_only", "user_address")


@dataclass(frozen=True)
class Probe:
    """One valid request the device must act on when the machine provokes ``queue``.

    ``readable`` / ``writable`` are the chain's buffers (readable first, as a driver lays them);
    ``target`` indexes the buffer (over readable + writable) a translation scenario moves to a probe
    IOVA. ``writes`` says whether the device writes that buffer (else it reads it).
    """

    queue: int
    readable: tuple[bytes, ...]
    writable: tuple[int, ...]
    target: int
    what: str

    @property
    def writes(self) -> bool:
        return self.target >= len(self.readable)

    @property
    def target_len(self) -> int:
        buffers = [len(part) for part in self.readable] + list(self.writable)
        return buffers[self.target]


@dataclass(frozen=True)
class Outcome:
    """What one provoked probe did: its chain used (and with what length), the probe pages it changed."""

    used: Used | None
    output: int  # bytes the device reported written, over every used entry of the step
    changed: frozenset[int]  # probe-page offsets whose bytes changed
    violation: str  # a ring rule the device broke while the probe was reaped ("" when none)


class _GatedClient(VhostClient):
    """The session's vhost client for one bring-up, with a hook just before DRIVER_OK is written.

    ``backend_extra`` is OR-ed into SET_BACKEND_FEATURES (IOTLB_ASID for the address-space scenarios,
    which Linux only reads from a message when it was negotiated). Everything else goes to the
    same channel as the machine's own client.
    """

    def __init__(self, channel: Channel, before_driver_ok: Callable[[], None], backend_extra: int = 0) -> None:
        super().__init__(channel)
        self.before_driver_ok = before_driver_ok
        self.backend_extra = backend_extra
        self.fired = False

    def set_backend_features(self, features: int) -> None:
        super().set_backend_features(features | self.backend_extra)

    def set_status(self, status: int) -> None:
        if status & VIRTIO_CONFIG_S_DRIVER_OK and not self.fired:
            self.fired = True
            self.before_driver_ok()
        super().set_status(status)


class TrafficRules:
    """The rules (see the module docstring); :class:`DatapathMachine` provides what is declared here."""

    # ----- what DatapathMachine provides (declared for the type checker, defined there) -----------------

    settle: float
    target: Target
    layout: GuestLayout
    client: SessionClient
    session: DriverSession | None
    features: int
    aliases: bool
    scratch: int
    ro_alias: int
    wo_alias: int

    def bring_up(self, features: int) -> None:
        raise NotImplementedError

    def provoke(self, queue: int) -> None:
        raise NotImplementedError

    def ring(self, index: int) -> Ring:
        raise NotImplementedError

    def status(self) -> int:
        raise NotImplementedError

    def count(self, clause: str) -> None:
        raise NotImplementedError

    def fail(self, clause: str, message: str) -> Exception:
        raise NotImplementedError

    def expect_no_progress(self, what: str, action: Callable[[], object]) -> None:
        raise NotImplementedError

    @property
    def can_suspend(self) -> bool:
        raise NotImplementedError

    # ----- per-example facts, learned on first use ----------------------------------------------------------

    _probe_pages: tuple[int, int] | None = None
    _device_kind: int | None = None
    _asid_capable: bool | None = None

    def device_kind(self) -> int:
        """VHOST_VDPA_GET_DEVICE_ID."""
        if self._device_kind is None:
            self._device_kind = self.target.device_id
        return self._device_kind

    def asid_capable(self) -> bool:
        """More than one address space, and IOTLB_ASID to address them in messages (else isolation is moot)."""
        if self._asid_capable is None:
            client = self.target.client
            self._asid_capable = bool(client.get_as_num() > 1
                                      and client.get_backend_features() >> T.VHOST_BACKEND_F_IOTLB_ASID & 1)
        return self._asid_capable

    def quirk(self, name: str) -> bool:
        """Whether the run's target profile declares the named deviation (a prediction it breaks is not made)."""
        return name in (self.target.declared_quirks or frozenset())

    # ----- probes ---------------------------------------------------------------------------------------

    def probes(self) -> list[Probe]:
        """Valid requests of this device type, each with the buffer a scenario may move.

        net: a receive buffer on receiveq1, which ``provoke(0)`` feeds with one frame (a transmitted
        frame is no probe: a device may use a chain it cannot read with length 0, and a frame it did
        not read leaves no trace). blk: an IN of sector 0, with its data buffer (written) or its header
        (read) moved.
        """
        kind = self.device_kind()
        if kind == VIRTIO_ID_NET:
            return [Probe(0, (), (RX_BUF,), 0, "receive buffer")]
        if kind == VIRTIO_ID_BLOCK:
            header = OUTHDR.pack(B.VIRTIO_BLK_T_IN, 0, 0)
            return [Probe(0, (header,), (SECTOR, 1), 1, "IN data buffer"),
                    Probe(0, (header,), (SECTOR, 1), 0, "IN request header")]
        return []

    def probe_pages(self) -> tuple[int, int] | None:
        """Two page-aligned pages of guest memory nothing else uses (None: the layout is full)."""
        if self._probe_pages is None:
            try:
                first = self.layout.alloc(PAGE, PAGE, what="probe page A (reached only through a probe IOVA)")
                second = self.layout.alloc(PAGE, PAGE, what="probe page B (reached only through a probe IOVA)")
            except MemoryError:
                return None
            self._probe_pages = (first, second)
        return self._probe_pages

    def can_probe(self) -> bool:
        return self.session is not None and bool(self.probes()) and self.probe_pages() is not None

    def probe_iova(self, index: int) -> int:
        """The ``index``-th probe IOVA: past the layout and the machine's own alias pages."""
        return self.layout.iova_base + self.layout.size + _PROBE_GAP + index * PAGE

    def usable_iova(self, iova: int, space: IotlbModel) -> bool:
        """Inside the device's IOVA range and clear of every mapping ``space`` holds."""
        first, last = self.target.client.get_iova_range()
        return first <= iova and iova + PAGE - 1 <= last and not space.overlapping(iova, iova + PAGE - 1)

    def mapped_by_userspace(self) -> IotlbModel:
        """Address space 0 as the machine mapped it: the layout read-write, its alias page RO and WO."""
        space = IotlbModel()
        space.update(self.layout.iova_base, self.layout.size, self.layout.uaddr_base, T.VHOST_ACCESS_RW)
        if self.aliases:
            space.update(self.ro_alias, PAGE, self.layout.uaddr(self.scratch), T.VHOST_ACCESS_RO)
            space.update(self.wo_alias, PAGE, self.layout.uaddr(self.scratch), T.VHOST_ACCESS_WO)
        return space

    # ----- running a probe ---------------------------------------------------------------------------------

    def quiesce(self) -> None:
        """Rings with nothing outstanding on a healthy device, so the probe is the only chain to take."""
        assert self.session is not None
        busy = any(ring.in_flight for ring in self.session.rings.values())
        if busy or self.status() & (VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED):
            self.bring_up(self.features)

    def post_probe(self, probe: Probe, target_iova: int | None = None, *, bad: bool = False) -> Chain:
        """Publish ``probe`` as one direct chain, its target buffer's descriptor naming ``target_iova``.

        A ``bad`` chain may not be used as valid (reaping it with a used length is a violation).
        """
        ring = self.ring(probe.queue)
        chain = ring.add(list(probe.readable), list(probe.writable), publish=False)
        if target_iova is not None:
            # addr is the first field of a descriptor in both layouts; len, flags and next/id stay as written
            self.layout.write_u64(ring.desc + 16 * chain.slots[probe.target], target_iova)
        chain.bad = bad
        ring.publish()
        return chain

    def run_probe(self, probe: Probe, target_iova: int | None, *, bad: bool) -> Outcome:
        """Post, provoke, and collect what the device did: every ring reaped, every probe page compared."""
        assert self.session is not None
        session = self.session
        pages = self.probe_pages()
        assert pages is not None
        before = {offset: self.layout.read(offset, PAGE) for offset in pages}
        chain = self.post_probe(probe, target_iova, bad=bad)
        self.provoke(probe.queue)
        self.target.service()
        used: Used | None = None
        output = 0
        broken = ""
        for index in list(session.rings):
            # a valid chain is waited for (an asynchronous device answers later); a bad one only looked at
            wait = index == probe.queue and not bad
            try:
                entries = session.reap(index, 0)
                if wait and chain.id in session.rings[index].outstanding:
                    entries += session.reap(index, 1, timeout=self.settle)
            except DeviceViolation as error:
                broken = broken or f"[{error.clause}] {error.message}"
                continue
            except DeviceTimeout:
                pass  # only the wait can time out: what the first look reaped is counted below
            for entry in entries:
                output += entry.length
                if index == probe.queue and entry.id == chain.id:
                    used = entry
        changed = frozenset(offset for offset in pages if self.layout.read(offset, PAGE) != before[offset])
        return Outcome(used, output, changed, broken)

    def expect(self, probe: Probe, iova: int, space: IotlbModel, what: str, clause: str | None = None) -> None:
        """Run ``probe`` with its target buffer at ``iova`` and hold the device to ``space``'s translation.

        Translated: the device reaches the page the model names (a write lands there and in no other
        probe page; a read produces the request's answer). Not translated (a miss or a permission
        fault): no probe page changes, the chain is not used as valid, the request produces nothing.
        ``clause`` replaces the clauses a failure names (the address-space scenarios cite isolation).
        """
        pages = self.probe_pages()
        assert pages is not None
        where = space.translate(iova, probe.target_len, probe.writes)
        predicted = None if isinstance(where, AccessFault) else (where[0][0] - self.layout.uaddr_base) // PAGE * PAGE
        for page in pages:
            self.layout.fill(page, PAGE, _PROBE_FILL)
            if not probe.writes:  # whichever page the device reaches holds the buffer it is meant to read
                self.layout.write(page, probe.readable[probe.target])
        window = self.layout.allow(predicted, PAGE, "probe page the model maps") if predicted is not None else None
        try:
            outcome = self.run_probe(probe, iova, bad=predicted is None)
        finally:
            if window is not None:
                self.layout.forbid(window)
            for page in pages:
                self.layout.fill(page, PAGE, self.layout.canary)
        if isinstance(where, AccessFault):
            self.not_reached(outcome, where, what, clause)
        else:
            assert predicted is not None
            self.reached(probe, outcome, predicted, what, clause)

    def reached(self, probe: Probe, outcome: Outcome, page: int, what: str, clause: str | None) -> None:
        self.count(MAPS_RANGE)
        self.count(NO_ACCESS)
        if outcome.violation:
            raise self.fail(clause or NO_ACCESS, f"{what}: {outcome.violation}")
        if outcome.used is None:
            raise self.fail(clause or MAPS_RANGE, f"{what}: the chain was never used, although the model "
                                                  "translates the buffer")
        if probe.writes and page not in outcome.changed:
            raise self.fail(clause or MAPS_RANGE, f"{what}: the chain was used (len {outcome.used.length}) but the "
                                                  f"page the mapping names (offset {page:#x}) was not written")
        stray = outcome.changed - {page}
        if stray:
            raise self.fail(clause or NO_ACCESS, f"{what}: the device wrote probe page(s) "
                                                 f"{sorted(hex(p) for p in stray)}, which no mapping of it names")
        if not probe.writes and outcome.output == 0:
            raise self.fail(clause or MAPS_RANGE, f"{what}: the request produced nothing, although its buffer is "
                                                  "mapped readable")

    def not_reached(self, outcome: Outcome, fault: AccessFault, what: str, clause: str | None) -> None:
        self.count(NO_ACCESS)
        self.count(BAD_PERMISSION if fault.reason == "perm" else BAD_UNMAPPED)
        if fault.reason == "miss":
            self.count(TRANSLATE_MISS)
        why = f"the model has a {fault.reason} fault at IOVA {fault.iova:#x}"
        if outcome.changed:
            raise self.fail(clause or NO_ACCESS, f"{what}: the device wrote probe page(s) "
                                                 f"{sorted(hex(p) for p in outcome.changed)} ({why})")
        if outcome.violation:
            raise self.fail(clause or NO_ACCESS, f"{what}: {outcome.violation} ({why})")
        if outcome.output:
            raise self.fail(clause or NO_ACCESS, f"{what}: {outcome.output} byte(s) of answer came back, so the "
                                                 f"device used the buffer ({why})")

    def gated_bring_up(self, features: int, before_driver_ok: Callable[[], None], backend_extra: int = 0) -> None:
        """The machine's bring-up, with ``before_driver_ok`` run once the queues are set up, before DRIVER_OK."""
        own = self.client.client
        self.client.client = _GatedClient(own.channel, before_driver_ok, backend_extra)
        try:
            self.bring_up(features)
        finally:
            self.client.client = own

    # ----- the rules ---------------------------------------------------------------------------------------
    #
    # Each rule runs one scenario from quiet rings, then :meth:`restart`: a reset (every vring base reads
    # as the model's initial state) and a bring-up that kicks a request before DRIVER_OK (nothing may
    # move; the rings are then laid afresh, so the device-type machine starts clean). So every call checks
    # the reset and DRIVER_OK rules after whatever traffic the scenario left, and a bug there fails on an
    # example's first call.

    @precondition(lambda self: self.can_probe())
    @rule(data=st.data())
    def translation_then_traffic(self, data: st.DataObject) -> None:
        """Map or unmap a probe IOVA, then make the device use it: it reaches exactly what the model maps.

        Scenarios: mapped read-write (the device must reach the page: the positive control), then
        INVALIDATEd whole or through one byte inside it (an invalidation drops every mapping it
        touches, whole); mapped read-only under a buffer the device writes, or write-only under one it
        reads; never mapped, at the page's user address (which a device that kept an identity
        pass-through reaches).
        """
        plans = [(scenario, probe) for probe in self.probes() for scenario in _TRANSLATIONS
                 if (scenario != "read_only" or probe.writes) and (scenario != "write_only" or not probe.writes)
                 and (scenario != "user_address" or not self.quirk(_PASSTHROUGH_QUIRK))]
        scenario, probe = data.draw(st.sampled_from(plans), label="translation scenario and probe")
        self.quiesce()
        self.translation_scenario(data, scenario, probe)
        self.restart()

    @precondition(lambda self: self.can_probe() and self.asid_capable())
    @rule(mapped=st.booleans())
    def address_space_then_traffic(self, mapped: bool) -> None:
        """Bind the probe queue's group to address space 1, then make the device use it: it translates there only.

        Only on a device with more than one address space (with one, isolation has nothing to say).
        """
        probe = next((p for p in self.probes() if p.writes), None)
        if probe is not None:
            self.group_asid_scenario(probe, mapped=mapped)
        self.restart()

    @precondition(lambda self: self.can_probe())
    @rule(data=st.data())
    def vring_state_then_traffic(self, data: st.DataObject) -> None:
        """Traffic, suspend or restore, then make the device use the queue: it stands and resumes where the model says.

        Scenarios: requests completed (then the reset of :meth:`restart` has positions to forget);
        SUSPEND with every earlier chain used, chains published and kicked (GET_VRING_BASE is exactly
        the position before them), RESUME (they are served); the same suspended queue moved to a fresh
        ring at another position by SET_VRING_ADDR and SET_VRING_BASE, RESUME (a request completes
        at that position).
        """
        scenarios = ["traffic"] + (["suspended_base", "restored_base"] if self.can_suspend else [])
        scenario = data.draw(st.sampled_from(scenarios), label="vring state scenario")
        self.quiesce()
        probe = self.probes()[0]
        for _ in range(data.draw(st.integers(0 if scenario != "traffic" else 1, 3), label="requests first")):
            self.complete_probe(probe, USED_RING, f"{probe.what} before the {scenario.replace('_', ' ')} scenario")
        if scenario == "suspended_base":
            self.suspended_base_scenario(data, probe)
        elif scenario == "restored_base":
            self.restored_base_scenario(data, probe)
        self.restart()

    def restart(self) -> None:
        """Reset and check the vring bases, then bring the device up with a request kicked before DRIVER_OK."""
        self.reset_clears_vring_state()
        self.early_kick(self.probes()[0])

    # ----- translation scenarios ---------------------------------------------------------------------------

    def translation_scenario(self, data: st.DataObject, scenario: str, probe: Probe) -> None:
        pages = self.probe_pages()
        assert pages is not None
        page = pages[0]
        uaddr = self.layout.uaddr(page)
        client = self.target.client
        space = self.mapped_by_userspace()
        iova = uaddr if scenario == "user_address" else self.probe_iova(0)
        if not self.usable_iova(iova, space):
            return
        at = f"{probe.what} at IOVA {iova:#x}"
        if scenario == "invalidated":
            client.iotlb_update(iova, PAGE, uaddr, T.VHOST_ACCESS_RW)
            space.update(iova, PAGE, uaddr, T.VHOST_ACCESS_RW)
            self.expect(probe, iova, space, f"{at}, just mapped read-write")
            whole = data.draw(st.booleans(), label="invalidate the whole mapping (else one byte inside it)")
            offset, size = (0, PAGE) if whole else (data.draw(st.integers(0, PAGE - 1), label="byte"), 1)
            client.iotlb_invalidate(iova + offset, size)
            space.invalidate(iova + offset, size)
            self.quiesce()
            self.expect(probe, iova, space, f"{at}, after an INVALIDATE of [{iova + offset:#x}, +{size:#x}) took "
                                            "its mapping away")
        elif scenario in ("read_only", "write_only"):
            perm = T.VHOST_ACCESS_RO if scenario == "read_only" else T.VHOST_ACCESS_WO
            client.iotlb_update(iova, PAGE, uaddr, perm)
            space.update(iova, PAGE, uaddr, perm)
            try:
                self.expect(probe, iova, space, f"{at}, mapped {scenario.replace('_', '-')}")
            finally:
                client.iotlb_invalidate(iova, PAGE)
        else:
            self.expect(probe, iova, space, f"{at}, which nothing maps (it equals the page's user address)")

    def group_asid_scenario(self, probe: Probe, *, mapped: bool) -> None:
        """Bind the probe queue's group to address space 1 before DRIVER_OK: its translations come from there only.

        Address space 1 maps the layout as 0 does (the group's rings and other buffers stay where
        they are); the probe IOVA is mapped to page A in address space 0 only, and with ``mapped`` to
        page B in address space 1. So the device's write must land in B, or (not ``mapped``) fault
        without touching anything. A device still translating through address space 0 writes A.
        """
        pages = self.probe_pages()
        assert pages is not None
        page_a, page_b = pages
        layout, client = self.layout, self.target.client
        iova = self.probe_iova(1)
        if not self.usable_iova(iova, self.mapped_by_userspace()):
            return
        space1 = IotlbModel()
        space1.update(layout.iova_base, layout.size, layout.uaddr_base, T.VHOST_ACCESS_RW)
        if mapped:
            space1.update(iova, PAGE, layout.uaddr(page_b), T.VHOST_ACCESS_RW)
        done: list[tuple[int, int, int]] = []  # (asid, iova, size) of every mapping made, to invalidate after
        groups: list[int] = []

        def bind() -> None:
            groups.append(client.get_vring_group(probe.queue))
            client.iotlb_update(iova, PAGE, layout.uaddr(page_a), T.VHOST_ACCESS_RW, asid=0)
            done.append((0, iova, PAGE))
            for entry in space1.maps:
                client.iotlb_update(entry.start, entry.size, entry.uaddr, entry.perm, asid=1)
                done.append((1, entry.start, entry.size))
            client.set_group_asid(groups[0], 1)

        try:
            # The features in use, not new ones: every draw of the failing step is one more thing to shrink.
            self.gated_bring_up(self.features, bind, 1 << T.VHOST_BACKEND_F_IOTLB_ASID)
            self.count(ASID_ISOLATION)
            there = "to probe page B" if mapped else "nowhere"
            self.expect(probe, iova, space1, f"{probe.what} at IOVA {iova:#x} on queue {probe.queue}, its group "
                                             f"{groups[0]} bound to address space 1, which maps the IOVA {there} "
                                             "(address space 0 maps it to probe page A)", ASID_ISOLATION)
        finally:
            for asid, start, size in done:  # while IOTLB_ASID is negotiated, so the asid is read
                client.iotlb_invalidate(start, size, asid=asid)

    # ----- vring state scenarios ---------------------------------------------------------------------------

    def complete_probe(self, probe: Probe, clause: str, what: str) -> Used:
        """Run ``probe`` at its own addresses and return its used entry (``clause`` fails when it never comes)."""
        outcome = self.run_probe(probe, None, bad=False)
        if outcome.violation:
            raise self.fail(clause, f"{what}: {outcome.violation}")
        if outcome.used is None:
            raise self.fail(clause, f"{what}: the chain was never used")
        return outcome.used

    def reset_clears_vring_state(self) -> None:
        """A reset: the status reads 0 and every queue's GET_VRING_BASE is the model's initial state.

        After a reset no feature is negotiated, so the base is a split position (0) even when the
        rings were packed; a device keeping its last position fails ``status.device.reset_clears``.
        """
        assert self.session is not None
        was_packed = bool(self.features >> VIRTIO_F_RING_PACKED & 1)
        moved = {index: self.position(ring) for index, ring in self.session.rings.items()}
        self.client.set_status(0)
        self.count(RESET_CLEARS)
        status = self.status()
        if status != 0:
            raise self.fail(RESET_CLEARS, f"status reads {status:#x} after a reset")
        initial = VqState()  # the model's queue after a reset
        fresh_packed = encode_packed_base(initial.packed)
        for index, before in moved.items():
            base = self.client.client.get_vring_base(index)
            if was_packed:
                self.count(BASE_LAYOUT_AFTER_RESET)
                if base == fresh_packed and self.quirk(_STALE_LAYOUT_QUIRK):
                    continue
                if base == fresh_packed:
                    raise self.fail(BASE_LAYOUT_AFTER_RESET, f"queue {index}: GET_VRING_BASE after a reset is "
                                                             f"{base:#x}, a fresh packed ring's encoding; no "
                                                             "feature is negotiated then, so it is split")
            if base != initial.avail_index:
                raise self.fail(RESET_CLEARS, f"queue {index}: GET_VRING_BASE after a reset is {base:#x}, not the "
                                              f"initial {initial.avail_index} (before the reset: {before:#x})")

    def early_kick(self, probe: Probe) -> None:
        """Bring the device up again; just before DRIVER_OK, post a request and kick: the device may not touch it.

        Kicking before DRIVER_OK breaks a driver rule (§3.1.1); the device's part (§2.1.2, §3.1.2) is to
        consume no buffer and send no used buffer notification until DRIVER_OK: no byte of guest
        memory changes, no used entry, no call. The rings are then laid afresh, still before
        DRIVER_OK, so the device starts clean.
        """

        def before_driver_ok() -> None:
            assert self.session is not None
            session = self.session
            self.count(NO_USE_BEFORE_DRIVER_OK)
            snapshot = self.layout.snapshot()
            self.post_probe(probe)
            self.provoke(probe.queue)
            self.target.service()
            # one comparison of the whole memory; the page-by-page diff only when something changed
            untouched = self.layout.memory.read(0, self.layout.size) == snapshot.data
            changed = {} if untouched else changed_pages(self.layout, snapshot)
            what = f"{probe.what} kicked after FEATURES_OK, before DRIVER_OK (status {self.status():#x})"
            if changed:
                _page, runs = next(iter(changed.items()))
                raise self.fail(NO_USE_BEFORE_DRIVER_OK, f"{what}: the device wrote {len(changed)} page(s) of guest "
                                                         f"memory, first at offset {runs[0][0]:#x} "
                                                         f"({self.layout.owner(runs[0][0])})")
            try:
                used = {index: len(ring.reap()) for index, ring in session.rings.items()}
            except DeviceViolation as error:
                raise self.fail(NO_USE_BEFORE_DRIVER_OK, f"{what}: {error}") from None
            calls = {index: session.notified(index) for index in session.rings}
            if any(used.values()) or any(calls.values()):
                raise self.fail(NO_USE_BEFORE_DRIVER_OK, f"{what}: used entries per queue {used}, used buffer "
                                                         f"notifications per queue {calls}")
            # Take the request back: every queue set up afresh (legal before DRIVER_OK), so the device starts
            # on empty rings and the machine's own model sees nothing it was not told about.
            for index in list(session.rings):
                session.rings.pop(index).close()
                session.add_queue(index)

        self.gated_bring_up(self.features, before_driver_ok)  # traffic ran in this step: the log stays as it is

    @staticmethod
    def position(ring: Ring) -> int:
        """The vring base of a ring whose published chains are all used: where its device stands."""
        if isinstance(ring, SplitRing):
            return ring.avail_idx
        return encode_packed_base(PackedVqState(ring.next_avail, ring.avail_wrap, ring.next_used, ring.used_wrap))

    def suspend_and_check_bases(self, data: st.DataObject, probe: Probe) -> list[Chain]:
        """SUSPEND with every chain used, then publish and kick requests: each base is exactly the position before.

        The device used every chain published before SUSPEND, so its last_avail_idx is where the driver's
        ring stands then; chains published while it is suspended can never have been taken, so a base
        counting them reports the driver's avail index, not the device's position (a destination would
        skip them). The published chains are returned.
        """
        assert self.session is not None
        session = self.session
        expected = {index: self.position(ring) for index, ring in session.rings.items() if ring.in_flight == 0}
        self.client.client.suspend()
        chains: list[Chain] = []
        wanted = data.draw(st.integers(1, 3), label="requests while suspended")

        def publish() -> None:
            for _ in range(wanted):
                try:
                    chains.append(self.post_probe(probe))
                except (RingFull, MemoryError):
                    return
                self.provoke(probe.queue)

        self.expect_no_progress("requests kicked while suspended", publish)
        for index, want in expected.items():
            base = self.client.client.get_vring_base(index)
            self.count(VQ_STATE)
            if base != want:
                layout = "packed" if isinstance(session.rings[index], PackedRing) else "split"
                raise self.fail(VQ_STATE, f"queue {index} ({layout}): GET_VRING_BASE while suspended is {base:#x}; "
                                          f"every chain published before SUSPEND was used, so the device stands at "
                                          f"{want:#x} ({len(chains)} chain(s) published since must not count)")
        return chains

    def suspended_base_scenario(self, data: st.DataObject, probe: Probe) -> None:
        """The suspended bases checked, then RESUME: the chains kicked while suspended are served."""
        assert self.session is not None
        chains = self.suspend_and_check_bases(data, probe)
        self.client.client.resume()
        self.target.service()
        self.count(KICK_NOT_LOST)
        try:
            got = self.session.reap(probe.queue, len(chains), timeout=self.settle)
        except (DeviceTimeout, DeviceViolation) as error:
            raise self.fail(KICK_NOT_LOST, f"{probe.what} kicked while suspended, after RESUME: {error}") from None
        missing = {chain.id for chain in chains} - {entry.id for entry in got}
        if missing:
            raise self.fail(KICK_NOT_LOST, f"chains {sorted(missing)} kicked while suspended were never used")

    def restored_base_scenario(self, data: st.DataObject, probe: Probe) -> None:
        """The suspended bases checked, the probe queue moved to a fresh ring elsewhere, RESUME: a request lands there.

        This is a migration's restore: the chains published while suspended go with the old ring
        (the fresh ring is empty, its used index equal to the base), and the device must take the
        next chain at exactly the base it was given.
        """
        assert self.session is not None
        session = self.session
        index = probe.queue
        packed = isinstance(session.rings[index], PackedRing)
        num = session.rings[index].num
        if packed:
            slot = data.draw(st.sampled_from([0, 1, num - 1]) | st.integers(0, num - 1), label="restored slot")
            start = slot | data.draw(st.integers(0, 1), label="restored wrap counter") << 15
        else:
            start = data.draw(st.sampled_from([0xFFFF, 0xFFFE, 0x8000, 1]) | st.integers(0, 0xFFFF),
                              label="restored avail index")
        self.suspend_and_check_bases(data, probe)
        if packed and self.quirk(_PACKED_STATE_QUIRK):
            self.client.client.resume()
            return
        session.starts[index] = start
        ring = session.make_ring(index)
        session.rings.pop(index).close()
        session.rings[index] = ring
        try:  # the model: a suspended queue is not running, so both are accepted (vhost_vdpa.vring.running)
            self.client.set_vring_addr(index, *ring.addresses)
            self.client.set_vring_base(index, ring.base)
        except OSError as error:
            raise self.fail(LOCKSTEP_ERRNO, f"queue {index} while suspended: SET_VRING_ADDR / SET_VRING_BASE "
                                            f"{ring.base:#x} refused ({error})") from None
        base = self.client.client.get_vring_base(index)
        self.count(VQ_STATE)
        if base != ring.base:
            raise self.fail(VQ_STATE, f"queue {index}: SET_VRING_BASE {ring.base:#x} succeeded while suspended, "
                                      f"then GET_VRING_BASE reads {base:#x}")
        self.client.client.resume()
        clause = RESTORED_PACKED if packed else RESTORED_SPLIT
        self.count(clause)
        self.complete_probe(probe, clause, f"{probe.what} on queue {index} restored at base {ring.base:#x}")
