"""virtio-blk coverage: every request type and every driver error reaches a comparison with the model.

The blk datapath machine must, on the reference device and with the quick profile's sizes, check
each request type (the zoned, lifetime and secure-erase types as not negotiated, an undefined
type) and each driver rule it can break (``blk.driver.*``) against :mod:`vdpacert.model.blk`; on
a read-only sim-blk the read-only answers. Parents defined here each get one thing wrong, and
the machine must name the clause: a refused write that stored the part that fits, a ZONE_APPEND
executed although ZONED was not negotiated, a read of a length that is not whole sectors
answered OK, a GET_ID answer whose used length claims bytes that were never written.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test

from vdpacert.conformance.machines.blk_requests import (
    BlkLimits,
    Planned,
    get_id_truncated_ok,
    id_string_problem,
    plan_driver_errors,
    plan_unsupported,
    raw_request,
)
from vdpacert.conformance.machines.datapath import DatapathMachine, clause_of
from vdpacert.conformance.machines.datapath_blk import blk_machine
from vdpacert.conformance.mutants.blk import PyLoopBlk
from vdpacert.conformance.mutants.guest import BlkRequest
from vdpacert.impl.sim_blk import DEFAULT_FEATURES
from vdpacert.model.blk import BlkDiskModel, build_request, discard_segment
from vdpacert.uapi import virtio_blk as B  # noqa: N812

QUICK = settings(max_examples=25, stateful_step_count=30, deadline=None, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck))
HUNT = settings(max_examples=40, stateful_step_count=30, deadline=None, database=None, derandomize=True,
                report_multiple_bugs=False, phases=[Phase.generate],
                suppress_health_check=list(HealthCheck))
RO_FEATURES = DEFAULT_FEATURES | 1 << B.VIRTIO_BLK_F_RO

#: What the brief of this coverage asked for on sim-blk: each must be compared with the model.
REACHED_ON_SIM_BLK = (
    *(f"blk.{t}.{case}" for t in ("DISCARD", "WRITE_ZEROES")
      for case in ("unknown_flag", "segment_length", "too_many_segments", "ok", "beyond_capacity")),
    "blk.DISCARD.unmap", "blk.FLUSH.ok_nonzero_sector", "blk.GET_ID.length", "blk.IN.unaligned_length",
    "blk.OUT.unaligned_length", "blk.GET_LIFETIME.not_negotiated", "blk.SECURE_ERASE.not_negotiated",
    *(f"blk.ZONE_{z}.not_negotiated" for z in ("APPEND", "REPORT", "OPEN", "CLOSE", "FINISH", "RESET", "RESET_ALL")),
    "blk.request.unknown_type", "blk.request.no_status_byte", "blk.request.outhdr_short",
    *(f"blk.driver.{d}" for d in ("no_status_byte", "outhdr_short", "data_length", "beyond_capacity", "flush_sector",
                                  "flush_data", "get_id_length", "segment_length", "too_many_segments")),
)


@pytest.fixture(autouse=True)
def _close_targets() -> Iterator[None]:
    yield
    DatapathMachine.close_targets()


# ----- the reference device -------------------------------------------------------------------------------

def test_quick_profile_reaches_every_blk_request_clause_on_sim_blk() -> None:
    machine = blk_machine("sim-blk")
    run_state_machine_as_test(machine, settings=QUICK)
    missing = [c for c in REACHED_ON_SIM_BLK if not machine.clause_counts[c]]
    assert not missing, f"never compared with the model: {missing}"


def test_read_only_sim_blk_is_refused_writes_and_keeps_the_flag_rule() -> None:
    machine = blk_machine(f"sim-blk:features={RO_FEATURES:#x}")
    run_state_machine_as_test(machine, settings=QUICK)
    counts = machine.clause_counts
    for clause in ("blk.OUT.read_only", "blk.DISCARD.read_only", "blk.WRITE_ZEROES.read_only",
                   "blk.DISCARD.unknown_flag", "blk.IN.ok", "blk.data.integrity"):
        assert counts[clause], f"{clause} never compared on a read-only disk"


def test_unknown_flag_outranks_read_only_in_the_model() -> None:
    """UNSUPP for an unknown flag is a MUST (§5.2.6.2); IOERR on a read-only disk only a SHOULD."""
    ro = BlkDiskModel(capacity=64, read_only=True)
    features = 1 << B.VIRTIO_BLK_F_DISCARD | 1 << B.VIRTIO_BLK_F_WRITE_ZEROES
    flagged = ro.execute(build_request(B.VIRTIO_BLK_T_DISCARD, 0, discard_segment(0, 1, 2)), [1], features)
    assert (flagged.status, flagged.rule) == (B.VIRTIO_BLK_S_UNSUPP, "blk.DISCARD.unknown_flag")
    plain = ro.execute(build_request(B.VIRTIO_BLK_T_WRITE_ZEROES, 0, discard_segment(0, 1)), [1], features)
    assert (plain.status, plain.rule) == (B.VIRTIO_BLK_S_IOERR, "blk.WRITE_ZEROES.read_only")


# ----- the request builders --------------------------------------------------------------------------------

ALL = DEFAULT_FEATURES
LIMITS = BlkLimits(256, ALL, max_discard_sectors=8, max_discard_seg=2, max_write_zeroes_sectors=8,
                   max_write_zeroes_seg=2)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_each_driver_error_breaks_the_rule_it_names(data: st.DataObject) -> None:
    model = BlkDiskModel(256, max_discard_sectors=8, max_discard_seg=2, max_write_zeroes_sectors=8,
                         max_write_zeroes_seg=2)
    fakes = iter(range(1 << 41, 1 << 42))
    plans = plan_driver_errors(data, LIMITS, st.integers(0, 300), lambda: next(fakes))
    breaks = sorted((p.kind, p.breaks) for p in plans)
    assert len(breaks) == 5 + 5 + 4  # IN, OUT, GET_ID, two FLUSH; discard 5 (unmap too); write zeroes 4
    expected = {"in_unaligned": "blk.IN.unaligned_length", "out_unaligned": "blk.OUT.unaligned_length",
                "get_id_length": "blk.GET_ID.length", "flush_sector": "blk.FLUSH.ok_nonzero_sector",
                "flush_data": "blk.FLUSH.ok"}
    for plan in plans:
        outcome = model.execute(b"".join(plan.request.readable), plan.request.writable, ALL)
        name = {"discard": "DISCARD", "write_zeroes": "WRITE_ZEROES"}.get(plan.kind)
        want = expected.get(plan.breaks) or f"blk.{name}.{plan.breaks}"
        assert outcome.rule == want, plan.describe()


@settings(max_examples=10, deadline=None)
@given(st.data())
def test_unsupported_requests_cover_every_type_left_out(data: st.DataObject) -> None:
    model = BlkDiskModel(256)
    plans = plan_unsupported(data, BlkLimits(256, 0), 7, lambda: 1 << 41)
    rules = [model.execute(b"".join(p.request.readable), p.request.writable, 0).rule for p in plans]
    assert rules[0] == "blk.request.unknown_type"
    assert sorted(rules[1:]) == sorted(
        f"blk.{t}.not_negotiated" for t in ("FLUSH", "GET_LIFETIME", "DISCARD", "WRITE_ZEROES", "SECURE_ERASE",
                                            "ZONE_APPEND", "ZONE_REPORT", "ZONE_OPEN", "ZONE_CLOSE", "ZONE_FINISH",
                                            "ZONE_RESET", "ZONE_RESET_ALL"))


def test_id_string_must_be_nul_padded_ascii() -> None:
    assert id_string_problem(b"disk-1".ljust(20, b"\0")) is None
    assert id_string_problem(b"x" * 20) is None
    assert "NUL-padded" in (id_string_problem(b"disk\0x".ljust(20, b"\0")) or "")
    assert "ASCII" in (id_string_problem(b"disk-1" + b"\xa5" * 14) or "")


def test_truncated_get_id_answer_is_judged_exactly() -> None:
    serial = b"disk-1".ljust(20, b"\0")
    short = get_id_truncated_ok(4, serial)
    assert short(B.VIRTIO_BLK_S_OK, b"disk", 5) is None  # the ID fills the area, then the status byte
    assert short(B.VIRTIO_BLK_S_OK, b"dis?", 5) is not None
    assert short(B.VIRTIO_BLK_S_OK, b"disk", 6) is not None
    long = get_id_truncated_ok(32, serial)
    assert long(B.VIRTIO_BLK_S_OK, serial + b"\xa5" * 12, 20) is None  # 20 bytes written, status far behind
    assert long(B.VIRTIO_BLK_S_OK, serial + b"\xa5" * 12, 33) is not None
    assert long(B.VIRTIO_BLK_S_IOERR, b"", 0) is not None


# ----- parents that get one thing wrong --------------------------------------------------------------------

class OneWrongAnswer(PyLoopBlk):
    """sim-blk answering in Python, with :meth:`special` consulted first (None: the honest answer)."""

    def special(self, request: BlkRequest) -> tuple[int, bytes, int | None] | None:
        """``(status, data, used length or None for the honest one)`` for requests this parent gets wrong."""
        return None

    def answer(self, request: BlkRequest) -> tuple[int, bytes, int | None] | None:
        return self.special(request) or super().answer(request)


class LeaksRefusedWrite(OneWrongAnswer):
    """Answers IOERR to an OUT running past the capacity, but stores the sectors that fit first."""

    def special(self, request: BlkRequest) -> tuple[int, bytes, int | None] | None:
        fits = (self.capacity - request.sector) * B.VIRTIO_BLK_SECTOR_SIZE
        if request.kind == B.VIRTIO_BLK_T_OUT and 0 < fits < len(request.data_out) and fits % 512 == 0:
            self.disk.write(request.sector, request.data_out[:fits])
            return B.VIRTIO_BLK_S_IOERR, b"", None
        return None


class ExecutesZoneAppend(OneWrongAnswer):
    """Answers UNSUPP to ZONE_APPEND without VIRTIO_BLK_F_ZONED, but writes its data at the zone's sector."""

    def special(self, request: BlkRequest) -> tuple[int, bytes, int | None] | None:
        if request.kind == 15 and request.data_out and request.sector < self.capacity:
            self.disk.write(request.sector, request.data_out[:B.VIRTIO_BLK_SECTOR_SIZE])
            return B.VIRTIO_BLK_S_UNSUPP, b"", None
        return None


class ReadsPartialSectors(OneWrongAnswer):
    """Answers a read of a length that is not whole sectors with OK and the bytes it asked for."""

    def special(self, request: BlkRequest) -> tuple[int, bytes, int | None] | None:
        size = request.data_in_len
        if request.kind == B.VIRTIO_BLK_T_IN and size % 512 and request.sector + -(-size // 512) <= self.capacity:
            return B.VIRTIO_BLK_S_OK, self.disk.read(request.sector, size), None
        return None


class ClaimsWholeIdArea(OneWrongAnswer):
    """Answers a GET_ID area over 20 bytes with the 20-byte ID and OK, but a used length covering the whole area."""

    def special(self, request: BlkRequest) -> tuple[int, bytes, int | None] | None:
        room = request.data_in_len
        if request.kind == B.VIRTIO_BLK_T_GET_ID and room > B.VIRTIO_BLK_ID_BYTES:
            return B.VIRTIO_BLK_S_OK, self.backend.serial_bytes, room + 1
        return None


def _caught(parent: type[OneWrongAnswer]) -> str | None:
    machine = blk_machine(f"python:{__name__}:{parent.__name__}")
    with pytest.raises(AssertionError) as caught:
        run_state_machine_as_test(machine, settings=HUNT)
    return clause_of(caught.value)


def test_a_refused_write_that_stored_what_fits_is_caught() -> None:
    assert _caught(LeaksRefusedWrite) == "blk.OUT.beyond_capacity"


def test_a_zone_append_executed_without_zoned_is_caught() -> None:
    assert _caught(ExecutesZoneAppend) == "blk.ZONE_APPEND.not_negotiated"


def test_a_read_of_partial_sectors_answered_ok_is_caught() -> None:
    assert _caught(ReadsPartialSectors) == "blk.IN.unaligned_length"


def test_a_truncated_id_with_a_used_length_past_it_is_caught() -> None:
    assert _caught(ClaimsWholeIdArea) in {"ring.split.device.used_ring", "ring.packed.device.used_length"}


def test_the_reference_answers_get_id_length_as_vdpa_sim_blk_does() -> None:
    """sim-blk copies the ID truncated to the area and answers OK: accepted besides the model's IOERR."""
    machine = blk_machine("sim-blk:capacity=64")()
    try:
        machine.bring_up(1 << 32 | machine.offered & 1 << 33)  # VERSION_1, ACCESS_PLATFORM if offered
        machine.identify()  # learn the ID
        for room in (0, 8, 32):
            machine.run_plans([Planned("get_id", raw_request(B.VIRTIO_BLK_T_GET_ID, data_in=room))], indirect=False)
        assert machine.tolerated["blk.GET_ID.length"] == 3
        assert machine.exercised["blk.driver.get_id_length"] == 3
    finally:
        machine.teardown()
