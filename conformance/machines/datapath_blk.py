"""The virtio-blk datapath machine: requests at random sectors and at the capacity boundary, vs the model.

The model is :class:`vdpacert.model.blk.BlkDiskModel`: for each request (readable bytes, writable
lengths, negotiated features) it gives the status byte, the data the device writes and the disk
afterwards, with the rule that fixed the answer. The machine submits IN, OUT, FLUSH, GET_ID,
DISCARD and WRITE_ZEROES (also when their feature is not negotiated: UNSUPP is then the answer),
with sectors drawn anywhere on the disk and around ``capacity``. Every status is compared with the
model (citing the model's rule), every read with both the model and a
:class:`~vdpacert.conformance.driver.traffic.BlkShadow` of sector patterns (``blk.data.integrity``:
a discarded sector's content is left open), every used length against what the device can have
written from the first writable byte (§2.7.8.2: the device MUST have written at least ``len``).

Requests of one batch that touch the same sector (one of them writing) are split into separate
kicks: virtio-blk leaves the order of concurrent requests open, so only their separate outcomes
are predictable. The GET_ID string is the device's own: the first answer is learned, later ones
must repeat it.

Also: hostile chains (shared with the net machine), malformed requests (no status byte, a header
shorter than 16 bytes: IOERR or DEVICE_NEEDS_RESET, never a disk write), suspend/resume with
requests kicked while suspended, and reset at any point (the disk survives a reset).
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, replace
from typing import ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import initialize, precondition, rule

from vdpacert.conformance.driver import DeviceTimeout
from vdpacert.conformance.driver.device import BlkCompletion
from vdpacert.conformance.driver.split import RingFull
from vdpacert.conformance.driver.traffic import (
    SECTOR,
    UNKNOWN,
    BlkRequest,
    BlkShadow,
    blk_discard,
    blk_flush,
    blk_get_id,
    blk_in,
    blk_out,
    blk_write_zeroes,
    sector_pattern,
)
from vdpacert.conformance.machines.datapath import KICK_NOT_LOST, NEEDS_RESET_ON_ERROR, DatapathMachine
from vdpacert.model.blk import BAD_INPUT_STATUSES, BlkDiskModel, BlkOutcome
from vdpacert.uapi import virtio_blk as B  # noqa: N812
from vdpacert.uapi.virtio_config import VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1

__all__ = ["BlkDatapathMachine", "blk_machine"]

INTEGRITY = "blk.data.integrity"
USED_LEN_SPLIT = "ring.split.device.used_ring"
USED_LEN_PACKED = "ring.packed.device.used_length"
_OPTIONAL = (B.VIRTIO_BLK_F_FLUSH, B.VIRTIO_BLK_F_DISCARD, B.VIRTIO_BLK_F_WRITE_ZEROES, B.VIRTIO_BLK_F_SIZE_MAX,
             B.VIRTIO_BLK_F_SEG_MAX, B.VIRTIO_BLK_F_BLK_SIZE)
#: A generation no OUT the shadow records ever reaches: data for writes the model refuses.
_REFUSED_GENERATION = 1 << 40


@dataclass
class Planned:
    """One request as the machine builds it: what to send, and what the OK case changes in the shadow."""

    kind: str
    request: BlkRequest
    sector: int = 0
    count: int = 0
    segments: tuple[tuple[int, int], ...] = ()

    def sectors(self) -> set[int]:
        if self.kind in ("in", "out"):
            return set(range(self.sector, self.sector + self.count))
        return {s for start, n in self.segments for s in range(start, start + n)}

    @property
    def mutates(self) -> bool:
        return self.kind in ("out", "discard", "write_zeroes")


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
        self.refused_writes = 0

    # ----- features and queues ---------------------------------------------------------------------------

    def device_features(self, data: st.DataObject) -> int:
        offered = self.offered
        features = (1 << VIRTIO_F_VERSION_1) | (offered & 1 << VIRTIO_F_ACCESS_PLATFORM)
        features |= offered & 1 << B.VIRTIO_BLK_F_RO  # a read-only disk stays read-only for this driver too
        for bit in _OPTIONAL:
            if offered >> bit & 1 and data.draw(st.booleans(), label=f"blk feature {bit}"):
                features |= 1 << bit
        return features

    def queues(self, features: int) -> list[int]:
        return [0]

    def hostile_targets(self) -> list[tuple[int, bool]]:
        return [(0, True), (0, False)]

    # ----- building requests -----------------------------------------------------------------------------

    def sectors(self) -> st.SearchStrategy[int]:
        cap = self.capacity
        return st.one_of(st.integers(0, max(0, cap - 1)), st.integers(max(0, cap - 4), cap + 4),
                         st.sampled_from([2**32, 2**63, 2**64 - 1]))

    def plan(self, data: st.DataObject) -> Planned:
        kind = data.draw(st.sampled_from(["in", "out", "out", "flush", "get_id", "discard", "write_zeroes"]),
                         label="request")
        if kind in ("in", "out"):
            sector, count = data.draw(self.sectors(), label="sector"), data.draw(st.integers(1, 8), label="count")
            if kind == "in":
                return Planned(kind, blk_in(sector, count), sector, count)
            # Pattern data for the sectors, recorded in the shadow only if the device is to store it.
            fake = b"".join(sector_pattern(s & 0xFFFF_FFFF, _REFUSED_GENERATION + self.refused_writes)
                            for s in range(sector, sector + count))
            return Planned(kind, blk_out(sector, fake), sector, count)
        if kind == "flush":
            return Planned(kind, blk_flush())
        if kind == "get_id":
            return Planned(kind, blk_get_id())
        segments = tuple(data.draw(st.lists(st.tuples(self.sectors(), st.integers(0, 16)), min_size=1, max_size=3),
                                   label="segments"))
        if kind == "discard":
            return Planned(kind, blk_discard(segments), segments=segments)
        unmap = data.draw(st.booleans(), label="unmap")
        return Planned(kind, blk_write_zeroes(segments, unmap=unmap), segments=segments)

    def predict(self, planned: Planned) -> tuple[Planned, BlkOutcome]:
        """The model's answer; an OUT it accepts gets real pattern data (and the shadow learns it)."""
        request = planned.request
        outcome = self.model.execute(b"".join(request.readable), request.writable, self.features)
        if planned.kind == "out" and outcome.status == B.VIRTIO_BLK_S_OK:
            data = self.shadow.write(planned.sector, planned.count)
            planned = replace(planned, request=blk_out(planned.sector, data))
            outcome = self.model.execute(b"".join(planned.request.readable), planned.request.writable,
                                         self.features)
        elif planned.kind == "out":
            self.refused_writes += 1
        # The requests of a batch commute (see batches()), so the model runs them in submission order.
        self.model = self.model.after(outcome)
        if outcome.status == B.VIRTIO_BLK_S_OK:
            for start, count in planned.segments:
                if planned.kind == "discard":
                    self.shadow.discard(start, count)
                elif planned.kind == "write_zeroes":
                    self.shadow.zero(start, count)
        return planned, outcome

    @staticmethod
    def batches(plans: list[Planned]) -> list[list[Planned]]:
        """Split into groups with no sector written by one request and touched by another (order is open)."""
        groups: list[list[Planned]] = [[]]
        written: set[int] = set()
        touched: set[int] = set()
        for plan in plans:
            sectors = plan.sectors()
            if sectors & written or (plan.mutates and sectors & touched):
                groups.append([])
                written, touched = set(), set()
            groups[-1].append(plan)
            touched |= sectors
            if plan.mutates:
                written |= sectors
        return [g for g in groups if g]

    # ----- checking answers --------------------------------------------------------------------------------

    def check(self, planned: Planned, outcome: BlkOutcome, done: BlkCompletion) -> None:
        self.count(outcome.rule)
        what = f"{planned.kind} (sector {planned.sector}, count {planned.count}, segments {list(planned.segments)})"
        if done.status != outcome.status:
            raise self.fail(outcome.rule, f"{what}: status {done.status}, the model says {outcome.status} "
                                          f"({outcome.rule}, {outcome.level})")
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
                self.serial = done.data
                self.model = replace(self.model, serial=done.data.rstrip(b"\0"))
            elif done.data != self.serial:
                raise self.fail(outcome.rule, f"GET_ID answered {done.data!r}, earlier {self.serial!r}")

    def check_read(self, planned: Planned, outcome: BlkOutcome, done: BlkCompletion) -> None:
        self.count(INTEGRITY)
        for i in range(planned.count):
            sector = planned.sector + i
            got = done.data[i * SECTOR:(i + 1) * SECTOR]
            if self.shadow.generation[sector] == UNKNOWN:  # discarded: any content will do
                continue
            if got != outcome.data_written[i * SECTOR:(i + 1) * SECTOR]:
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
                got = self.session.blk_complete(0, len(ids) - len(done), timeout=self.SETTLE)
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

    @precondition(lambda self: self.session is not None)
    @rule(data=st.data(), n=st.integers(1, 5), indirect=st.booleans())
    def requests(self, data: st.DataObject, n: int, indirect: bool) -> None:
        plans = [self.plan(data) for _ in range(n)]
        try:
            self.run_batch(plans, indirect=indirect)
        except (RingFull, MemoryError):
            self.bring_up(self.features)  # the harness ran out of room: start the queue over

    @precondition(lambda self: self.session is not None)
    @rule(short_header=st.booleans())
    def malformed_request(self, short_header: bool) -> None:
        """No status byte, or a header under 16 bytes: IOERR or DEVICE_NEEDS_RESET, and no disk write."""
        assert self.session is not None
        rule_id = "blk.request.outhdr_short" if short_header else "blk.request.no_status_byte"
        readable = (struct.pack("<II", B.VIRTIO_BLK_T_OUT, 0),) if short_header else (
            struct.pack("<IIQ", B.VIRTIO_BLK_T_OUT, 0, 0), sector_pattern(0, _REFUSED_GENERATION))
        writable = (1,) if short_header else ()
        ring = self.session.rings[0]
        chain = ring.add(list(readable), list(writable))
        self.session.kick(0)
        self.target.service()
        used = self.reap_all(0)
        self.count(rule_id)
        status = self.status()
        if not status & VIRTIO_CONFIG_S_NEEDS_RESET:
            answered = [u for u in used if u.id == chain.id]
            if not answered or (writable and answered[0].written[-1] not in BAD_INPUT_STATUSES):
                self.count(NEEDS_RESET_ON_ERROR)
                raise self.fail(rule_id, f"{rule_id}: neither DEVICE_NEEDS_RESET nor an IOERR answer "
                                         f"(used: {[(u.id, u.length) for u in used]})")
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
