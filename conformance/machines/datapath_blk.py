"""The virtio-blk datapath machine: every request type, good and bad, at any sector, vs the model.

The model is :class:`vdpacert.model.blk.BlkDiskModel`: for each request (readable bytes, writable
lengths, negotiated features) it gives the status byte, the data the device writes and the disk
afterwards, with the rule that fixed the answer and the driver rules the request breaks.
:mod:`.blk_requests` builds what the machine sends: IN, OUT, FLUSH, GET_ID, DISCARD and
WRITE_ZEROES at sectors anywhere on the disk and around ``capacity`` (also when their feature is
not negotiated: UNSUPP is then the answer); every type the device must not execute under the
negotiated features (the zoned, lifetime and secure-erase types included) and a type the spec
does not define; one request per driver rule of §5.2.6.1 the device can tell apart. A driver rule
(``blk.driver.*``) counts as exercised when a request broke it and the device's answer was
compared with what the model allows.

Every status is compared with the model (citing the model's rule), every used length with what
the device can have written from the first writable byte (§2.7.8.2), every read with both the
model and a :class:`~vdpacert.conformance.driver.traffic.BlkShadow` of sector patterns
(``blk.data.integrity``; a discarded sector's content is left open). Data the device must not
store (a refused OUT, a ZONE_APPEND without ZONED, ...) is pattern data of a generation no
accepted write has, so a sector found holding it names the refused request's rule. The GET_ID
string is the device's own: the first answer must be a NUL-padded ASCII string and is learned,
later ones must repeat it. One answer is accepted besides the model's: OK with the ID truncated
to a GET_ID area other than 20 bytes (Linux's vdpa_sim_blk; see :mod:`.blk_requests`).

Requests of one batch that touch the same sector (one of them writing) are split into separate
kicks: virtio-blk leaves the order of concurrent requests open, so only their separate outcomes
are predictable. A failed DISCARD / WRITE_ZEROES may have done part of its work (§5.2.6), so the
in-range sectors it named are left open afterwards.

Rules without draws (GET_ID, the capacity boundary) make a device that gets those wrong fail in
the shortest example there is. Also: sectors written then zeroed or discarded and read back,
hostile chains (shared with the net machine), malformed requests (no status byte, a header
shorter than 16 bytes: IOERR or DEVICE_NEEDS_RESET, never a disk write), suspend/resume with
requests kicked while suspended, and reset at any point (the disk survives a reset).
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import replace
from typing import ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import initialize, precondition, rule

from vdpacert.conformance.driver import DeviceTimeout
from vdpacert.conformance.driver.device import BlkCompletion
from vdpacert.conformance.driver.split import RingFull
from vdpacert.conformance.driver.traffic import (
    SECTOR,
    UNKNOWN,
    BlkShadow,
    blk_discard,
    blk_get_id,
    blk_in,
    blk_out,
    blk_write_zeroes,
    identify_sector,
    sector_pattern,
)
from vdpacert.conformance.machines.blk_requests import (
    BlkLimits,
    Planned,
    fake_data,
    get_id_truncated_ok,
    id_string_problem,
    plan_driver_errors,
    plan_unsupported,
    plan_well_formed,
    raw_request,
)
from vdpacert.conformance.machines.datapath import KICK_NOT_LOST, NEEDS_RESET_ON_ERROR, DatapathMachine
from vdpacert.model.blk import BAD_INPUT_STATUSES, BlkDiskModel, BlkOutcome
from vdpacert.uapi import virtio_blk as B  # noqa: N812
from vdpacert.uapi.virtio_config import VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1

__all__ = ["BlkDatapathMachine", "Planned", "blk_machine"]

INTEGRITY = "blk.data.integrity"
USED_LEN_SPLIT = "ring.split.device.used_ring"
USED_LEN_PACKED = "ring.packed.device.used_length"
_OPTIONAL = (B.VIRTIO_BLK_F_FLUSH, B.VIRTIO_BLK_F_DISCARD, B.VIRTIO_BLK_F_WRITE_ZEROES, B.VIRTIO_BLK_F_SIZE_MAX,
             B.VIRTIO_BLK_F_SEG_MAX, B.VIRTIO_BLK_F_BLK_SIZE)
#: A generation no OUT the shadow records ever reaches: data for writes the model refuses.
_REFUSED_GENERATION = 1 << 40
#: Requests per kick: a request takes up to 3 descriptors and the ring has NUM (16) of them.
MAX_GROUP = 5
GET_ID_LENGTH = "blk.GET_ID.length"


class BlkDatapathMachine(DatapathMachine):
    """See the module docstring. ``TARGET`` is a sim-blk (or compatible) target string."""

    TARGET: ClassVar[str] = "sim-blk:capacity=256"
    NUM: ClassVar[int] = 16

    def __init__(self) -> None:
        super().__init__()
        config = self.client.client.get_config(0, B.VIRTIO_BLK_CONFIG_WRITE_ZEROES_MAY_UNMAP + 1)
        self.capacity = struct.unpack_from("<Q", config, B.VIRTIO_BLK_CONFIG_CAPACITY)[0]

        def u32(offset: int, feature: int) -> int:
            return int(struct.unpack_from("<I", config, offset)[0]) if self.offered >> feature & 1 else 0

        self.model = BlkDiskModel(
            self.capacity, read_only=bool(self.offered >> B.VIRTIO_BLK_F_RO & 1),
            max_discard_sectors=u32(B.VIRTIO_BLK_CONFIG_MAX_DISCARD_SECTORS, B.VIRTIO_BLK_F_DISCARD),
            max_discard_seg=u32(B.VIRTIO_BLK_CONFIG_MAX_DISCARD_SEG, B.VIRTIO_BLK_F_DISCARD),
            max_write_zeroes_sectors=u32(B.VIRTIO_BLK_CONFIG_MAX_WRITE_ZEROES_SECTORS, B.VIRTIO_BLK_F_WRITE_ZEROES),
            max_write_zeroes_seg=u32(B.VIRTIO_BLK_CONFIG_MAX_WRITE_ZEROES_SEG, B.VIRTIO_BLK_F_WRITE_ZEROES))
        self.shadow = BlkShadow(self.capacity)  # a new device's disk reads as zeroes
        self.serial: bytes | None = None
        self.fakes = 0
        #: fake-data generation -> the rule under which the device refused the request carrying it
        self.leaks: dict[int, str] = {_REFUSED_GENERATION: "blk.request.no_status_byte"}
        self.tolerated: Counter[str] = Counter()
        self.recent: list[int] = []  # sectors recent OUTs stored data in

    @property
    def limits(self) -> BlkLimits:
        """What request builders need to know: the disk, its discard / write-zeroes limits, the features."""
        m = self.model
        return BlkLimits(self.capacity, self.features, m.max_discard_sectors, m.max_discard_seg,
                         m.max_write_zeroes_sectors, m.max_write_zeroes_seg)

    def next_fake(self) -> int:
        """A pattern generation no accepted write has, for data the device may refuse (see :attr:`leaks`)."""
        self.fakes += 1
        return _REFUSED_GENERATION + self.fakes

    # ----- features and queues ---------------------------------------------------------------------------

    def device_features(self, data: st.DataObject) -> int:
        offered = self.offered
        features = (1 << VIRTIO_F_VERSION_1) | (offered & 1 << VIRTIO_F_ACCESS_PLATFORM)
        features |= offered & 1 << B.VIRTIO_BLK_F_RO  # a read-only disk stays read-only for this driver too
        for bit in _OPTIONAL:
            # Two in three: most request types (and their driver errors) need their feature negotiated.
            if offered >> bit & 1 and data.draw(st.sampled_from([True, False, True]), label=f"blk feature {bit}"):
                features |= 1 << bit
        return features

    def queues(self, features: int) -> list[int]:
        return [0]

    def hostile_targets(self) -> list[tuple[int, bool]]:
        return [(0, True), (0, False)]

    # ----- building requests -----------------------------------------------------------------------------

    def data_sectors(self) -> st.SearchStrategy[int]:
        """A sector a recent OUT stored data in (any sector of the disk when there is none)."""
        anywhere = st.integers(0, max(0, self.capacity - 1))
        return st.one_of(st.sampled_from(self.recent), anywhere) if self.recent else anywhere

    def sectors(self) -> st.SearchStrategy[int]:
        cap = self.capacity
        return st.one_of(st.integers(0, max(0, cap - 1)), st.integers(max(0, cap - 4), cap + 4),
                         st.sampled_from([2**32, 2**63, 2**64 - 1]))

    def plan(self, data: st.DataObject) -> Planned:
        return plan_well_formed(data, self.limits, self.sectors(), self.next_fake)

    def predict(self, planned: Planned) -> tuple[Planned, BlkOutcome]:
        """The model's answer; an OUT it accepts gets real pattern data (and the shadow learns it)."""
        request = planned.request
        outcome = self.model.execute(b"".join(request.readable), request.writable, self.features)
        if planned.kind == "out" and outcome.status == B.VIRTIO_BLK_S_OK:
            data = self.shadow.write(planned.sector, planned.count)
            self.recent = [planned.sector, *self.recent[:7]]
            planned = replace(planned, request=blk_out(planned.sector, data))
            outcome = self.model.execute(b"".join(planned.request.readable), planned.request.writable,
                                         self.features)
        if planned.fake and outcome.status != B.VIRTIO_BLK_S_OK:
            self.leaks[planned.fake] = outcome.rule
        # The requests of a batch commute (see batches()), so the model runs them in submission order.
        self.model = self.model.after(outcome)
        if outcome.status == B.VIRTIO_BLK_S_OK:
            for start, count in planned.segments:
                if planned.kind == "discard":
                    self.shadow.discard(start, count)
                elif planned.kind == "write_zeroes":
                    self.shadow.zero(start, count)
        elif outcome.segments_indeterminate:
            # A failed discard / write zeroes may have done part of its work (§5.2.6): those sectors are open.
            for start, count in planned.segments:
                if start < self.capacity:
                    self.shadow.discard(start, min(count, self.capacity - start))
        return planned, outcome

    @staticmethod
    def batches(plans: list[Planned]) -> list[list[Planned]]:
        """Split into groups with no sector written by one request and touched by another (order is open).

        A group is at most MAX_GROUP requests, so one kick never needs more descriptors than the ring has.
        """
        groups: list[list[Planned]] = [[]]
        written: set[int] = set()
        touched: set[int] = set()
        for plan in plans:
            sectors = plan.sectors()
            if sectors & written or (plan.mutates and sectors & touched) or len(groups[-1]) >= MAX_GROUP:
                groups.append([])
                written, touched = set(), set()
            groups[-1].append(plan)
            touched |= sectors
            if plan.mutates:
                written |= sectors
        return [g for g in groups if g]

    # ----- checking answers --------------------------------------------------------------------------------

    def check(self, planned: Planned, outcome: BlkOutcome, done: BlkCompletion) -> None:
        """Status, used length and data of one answer against the model's; the driver rules it broke are exercised."""
        self.count(outcome.rule)
        self.exercised.update(v.rule for v in outcome.driver_violations)
        what = planned.describe()
        if done.status != outcome.status:
            note = ""
            if outcome.rule == GET_ID_LENGTH:
                problem = self.get_id_also_accepted(planned, done)
                if problem is None:
                    return
                note = f"; {problem}"
            raise self.fail(outcome.rule, f"{what}: status {done.status}, the model says {outcome.status} "
                                          f"({outcome.rule}, {outcome.level}{note})")
        used_clause = USED_LEN_PACKED if self.packed else USED_LEN_SPLIT
        self.count(used_clause)
        written = outcome.written_prefix
        if done.length > written:
            raise self.fail(used_clause, f"{what}: used len {done.length}, but only {written} byte(s) from the "
                                         "first writable byte were written")
        if outcome.status != B.VIRTIO_BLK_S_OK:
            return
        if planned.kind == "in":
            self.check_read(planned, outcome, done)
        elif planned.kind == "get_id":
            if self.serial is None:
                problem = id_string_problem(done.data)
                if problem is not None:
                    raise self.fail(outcome.rule, f"GET_ID answered {done.data!r}: {problem}")
                self.serial = done.data
                self.model = replace(self.model, serial=done.data.rstrip(b"\0"))
            elif done.data != self.serial:
                raise self.fail(outcome.rule, f"GET_ID answered {done.data!r}, earlier {self.serial!r}")

    def get_id_also_accepted(self, planned: Planned, done: BlkCompletion) -> str | None:
        """None if the answer is OK with the ID truncated to the area (vdpa_sim_blk: see
        :mod:`.blk_requests`), else why it is not that answer either."""
        used_clause = USED_LEN_PACKED if self.packed else USED_LEN_SPLIT
        problem = get_id_truncated_ok(planned.request.data_in_len, self.serial)(done.status, done.data, done.length)
        if problem is None:
            self.count(used_clause)
            self.tolerated[GET_ID_LENGTH] += 1
            return None
        if problem.startswith("used len"):
            raise self.fail(used_clause, f"{planned.describe()}: OK with the ID truncated, but {problem}")
        return f"nor the truncated-ID answer: {problem}"

    def check_read(self, planned: Planned, outcome: BlkOutcome, done: BlkCompletion) -> None:
        self.count(INTEGRITY)
        for i in range(planned.count):
            sector = planned.sector + i
            got = done.data[i * SECTOR:(i + 1) * SECTOR]
            if self.shadow.generation[sector] == UNKNOWN:  # discarded: any content will do
                continue
            if got != outcome.data_written[i * SECTOR:(i + 1) * SECTOR]:
                found = identify_sector(got)
                leaked = self.leaks.get(found[1]) if found is not None else None
                if leaked is not None:  # the data of a request the device refused: that refusal's rule is broken
                    raise self.fail(leaked, f"IN at {planned.sector}: sector {sector} holds the data of a request the "
                                            f"device refused ({leaked}: it must change nothing)")
                problems = self.shadow.mismatches(sector, got) or [f"sector {sector} differs from the model"]
                raise self.fail(INTEGRITY, f"IN at {planned.sector}: {problems[0]}")

    def run_batch(self, plans: list[Planned], *, indirect: bool) -> None:
        assert self.session is not None
        for group in self.batches(plans):
            predicted = [self.predict(plan) for plan in group]
            chains = [self.session.blk_submit(0, plan.request, indirect=indirect and self.indirect, kick=False)
                      for plan, _ in predicted]
            self.session.kick(0)
            self.finish(predicted, [c.id for c in chains], "requests never completed", "blk.IN.ok")

    def finish(self, predicted: list[tuple[Planned, BlkOutcome]], ids: list[int], what: str, clause: str) -> None:
        assert self.session is not None
        done: dict[int, BlkCompletion] = {}
        while len(done) < len(ids):
            try:
                got = self.session.blk_complete(0, len(ids) - len(done), timeout=self.settle)
            except DeviceTimeout as error:
                missing = [plan.kind for (plan, _), i in zip(predicted, ids, strict=True) if i not in done]
                raise self.fail(clause, f"{what}: {missing} ({error})") from None
            done.update((c.id, c) for c in got)
        for (plan, outcome), chain_id in zip(predicted, ids, strict=True):
            self.check(plan, outcome, done[chain_id])

    # ----- rules ---------------------------------------------------------------------------------------

    @initialize(data=st.data())
    def bring_up_device(self, data: st.DataObject) -> None:
        self.bring_up(self.draw_features(data))

    def run_plans(self, plans: list[Planned], *, indirect: bool) -> None:
        try:
            self.run_batch(plans, indirect=indirect)
        except (RingFull, MemoryError):
            self.bring_up(self.features)  # the harness ran out of room: start the queue over

    @precondition(lambda self: self.session is not None)
    @rule(data=st.data(), n=st.integers(1, 5), indirect=st.booleans())
    def requests(self, data: st.DataObject, n: int, indirect: bool) -> None:
        self.run_plans([self.plan(data) for _ in range(n)], indirect=indirect)

    @precondition(lambda self: self.session is not None)
    @rule()
    def identify(self) -> None:
        """GET_ID as a driver sends it when it probes the disk: the ID string, the same one every time.

        Nothing is drawn, so a device that answers it wrong fails in the shortest example there is.
        """
        self.run_plans([Planned("get_id", blk_get_id())], indirect=False)

    @precondition(lambda self: self.session is not None and self.capacity > 0)
    @rule()
    def capacity_boundary(self) -> None:
        """Two sectors from the last one: an OUT, then an IN (past the capacity: the model's answer), then the last
        sector read back (a refused OUT must not have stored the part that fits).

        Nothing is drawn, so a device that gets the boundary wrong fails in the shortest example there is.
        """
        last = self.capacity - 1
        fake = self.next_fake()
        self.run_plans([Planned("out", raw_request(B.VIRTIO_BLK_T_OUT, last, [fake_data(last, 2 * SECTOR, fake)]),
                                last, 2, fake=fake),
                        Planned("in", blk_in(last, 2), last, 2), Planned("in", blk_in(last, 1), last, 1)],
                       indirect=False)

    @precondition(lambda self: self.session is not None)
    @rule(data=st.data(), indirect=st.booleans())
    def zero_written_sectors(self, data: st.DataObject, indirect: bool) -> None:
        """An OUT, a WRITE_ZEROES or DISCARD over part of it, the whole range read back.

        Zeroes where WRITE_ZEROES went (§5.2.6.2), anything where DISCARD went, the written data
        elsewhere; without the feature negotiated, the zeroing request is UNSUPP and changes nothing.
        """
        count = data.draw(st.integers(1, 8), label="count")
        sector = data.draw(st.integers(0, max(0, self.capacity - count)), label="sector")
        start = sector + data.draw(st.integers(0, count - 1), label="zero from")
        length = data.draw(st.integers(1, sector + count - start), label="zero count")
        kind = data.draw(st.sampled_from(["write_zeroes", "discard"]), label="zeroing request")
        if kind == "discard":
            zeroing = Planned(kind, blk_discard([(start, length)]), segments=((start, length),))
        else:
            unmap = data.draw(st.booleans(), label="unmap")
            zeroing = Planned(kind, blk_write_zeroes([(start, length)], unmap=unmap), segments=((start, length),))
        fake = self.next_fake()
        write = Planned("out", raw_request(B.VIRTIO_BLK_T_OUT, sector, [fake_data(sector, count * SECTOR, fake)]),
                        sector, count, fake=fake)
        self.run_plans([write, zeroing, Planned("in", blk_in(sector, count), sector, count)], indirect=indirect)

    @precondition(lambda self: self.session is not None)
    @rule(data=st.data(), indirect=st.booleans())
    def unsupported_requests(self, data: st.DataObject, indirect: bool) -> None:
        """An undefined type and every type not negotiated: UNSUPP as the model says, then the sector reads as before.

        The sector is one the disk holds data in when there is one, so a device that executed a
        ZONE_APPEND, SECURE_ERASE or DISCARD it should have refused shows it in the read.
        """
        sector = data.draw(self.data_sectors(), label="sector")
        self.run_plans(plan_unsupported(data, self.limits, sector, self.next_fake), indirect=indirect)
        self.run_plans([Planned("in", blk_in(sector, 1), sector, 1)], indirect=False)

    @precondition(lambda self: self.session is not None)
    @rule(data=st.data(), indirect=st.booleans())
    def driver_errors(self, data: st.DataObject, indirect: bool) -> None:
        """One request per driver rule it can break (and maybe a good one among them): answered as the model allows."""
        plans = plan_driver_errors(data, self.limits, self.sectors(), self.next_fake)
        if data.draw(st.booleans(), label="and a well-formed request"):
            plans.insert(data.draw(st.integers(0, len(plans)), label="at"), self.plan(data))
        self.run_plans(plans, indirect=indirect)

    @precondition(lambda self: self.session is not None)
    @rule(data=st.data())
    def malformed_request(self, data: st.DataObject) -> None:
        """No status byte, or a header under 16 bytes: no disk write, and no success claimed.

        The driver breaks ``blk.driver.no_status_byte`` / ``blk.driver.outhdr_short``; the model
        says the request is bad input. No device clause says how to answer it: an error status, a
        used entry of len 0 (nothing written) and DEVICE_NEEDS_RESET are all fine; a chain left
        unused without DEVICE_NEEDS_RESET is the SHOULD of §2.1.2 not followed (a warning).
        """
        assert self.session is not None
        if data.draw(st.booleans(), label="short header"):
            size = data.draw(st.integers(0, 15), label="header bytes")
            readable: tuple[bytes, ...] = (struct.pack("<IIQ", B.VIRTIO_BLK_T_OUT, 0, 0)[:size],) if size else ()
            writable: tuple[int, ...] = (1,)
        else:
            readable = (struct.pack("<IIQ", B.VIRTIO_BLK_T_OUT, 0, 0), sector_pattern(0, _REFUSED_GENERATION))
            writable = ()
        outcome = self.model.execute(b"".join(readable), writable, self.features)
        assert outcome.bad_input, f"the model takes {readable!r} / {writable} as a request ({outcome.rule})"
        ring = self.session.rings[0]
        chain = ring.add(list(readable), list(writable))
        self.session.kick(0)
        self.target.service()
        used = self.reap_all(0)
        self.count(outcome.rule)
        self.exercised.update(v.rule for v in outcome.driver_violations)
        status = self.status()
        if not status & VIRTIO_CONFIG_S_NEEDS_RESET:
            answered = [u for u in used if u.id == chain.id]
            if not answered:  # swallowed: the state §2.1.2 says a device SHOULD flag with DEVICE_NEEDS_RESET
                self.warn(NEEDS_RESET_ON_ERROR, f"{outcome.rule}: the chain was left unused and "
                                                "DEVICE_NEEDS_RESET is not set")
            elif answered[0].length and writable and answered[0].written[-1] not in BAD_INPUT_STATUSES:
                raise self.fail(outcome.rule, f"{outcome.rule}: answered status {answered[0].written[-1]} with "
                                              f"used len {answered[0].length}, not an error status (used: "
                                              f"{[(u.id, u.length) for u in used]})")
            # Else an error status, or used with len 0: the device wrote nothing and says so (§2.7.8.2
            # lets len under-count), which no device clause forbids for a request the driver malformed.
            return self.after_malformed()
        self.bring_up(self.features)
        return self.after_malformed()

    def after_malformed(self) -> None:
        """Whatever the device did, the disk must be as before: read sector 0 back."""
        self.run_batch([Planned("in", blk_in(0, 1), 0, 1)], indirect=False)

    @precondition(lambda self: self.session is not None and self.can_suspend)
    @rule(data=st.data(), n=st.integers(1, 3))
    def suspend_with_requests(self, data: st.DataObject, n: int) -> None:
        """Requests kicked while suspended: nothing moves, GET_VRING_BASE is consistent, all done after resume."""
        assert self.session is not None
        plans = self.batches([self.plan(data) for _ in range(n)])[0]
        self.client.client.suspend()
        predicted = [self.predict(plan) for plan in plans]
        ids: list[int] = []

        def submit() -> None:
            assert self.session is not None
            ids.extend(self.session.blk_submit(0, plan.request, kick=False).id for plan, _ in predicted)
            self.session.kick(0)

        try:
            self.expect_no_progress("requests kicked while suspended", submit)
        except (RingFull, MemoryError):
            self.client.client.resume()
            self.bring_up(self.features)
            return
        self.check_vring_base(0)
        self.client.client.resume()
        self.target.service()
        self.count(KICK_NOT_LOST)
        self.finish(predicted, ids, "requests kicked while suspended, lost on resume", KICK_NOT_LOST)


def blk_machine(target: str) -> type[BlkDatapathMachine]:
    """A BlkDatapathMachine class bound to ``target`` (its own clause counter)."""
    name = "BlkDatapath_" + "".join(c if c.isalnum() else "_" for c in target)
    return type(name, (BlkDatapathMachine,), {"TARGET": target, "clause_counts": Counter()})
