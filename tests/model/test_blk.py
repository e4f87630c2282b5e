"""virtio-blk requests over the ramdisk model: every type, the capacity boundary, the error rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdpacert.model import sections
from vdpacert.model.blk import (
    BLK_REQUEST_TYPES,
    BlkDiskModel,
    BlkModelError,
    NotModelled,
    SparseDisk,
    build_request,
    discard_segment,
)
from vdpacert.model.spec import Level
from vdpacert.uapi import virtio_blk as vb

OK, IOERR, UNSUPP = vb.VIRTIO_BLK_S_OK, vb.VIRTIO_BLK_S_IOERR, vb.VIRTIO_BLK_S_UNSUPP
ALL = sum(1 << b for b in (vb.VIRTIO_BLK_F_FLUSH, vb.VIRTIO_BLK_F_DISCARD, vb.VIRTIO_BLK_F_WRITE_ZEROES))
CAP = 16  # sectors


def sectors(n: int, fill: int) -> bytes:
    return bytes([fill]) * (512 * n)


def disk() -> BlkDiskModel:
    return BlkDiskModel(capacity=CAP, serial=b"vdpacert-blk0")


def write(model: BlkDiskModel, sector: int, data: bytes, features: int = ALL) -> BlkDiskModel:
    out = model.execute(build_request(vb.VIRTIO_BLK_T_OUT, sector, data), [1], features)
    assert out.status == OK
    return model.after(out)


def read(model: BlkDiskModel, sector: int, count: int) -> bytes:
    out = model.execute(build_request(vb.VIRTIO_BLK_T_IN, sector), [512 * count, 1], ALL)
    assert out.status == OK
    return out.data_written


# -- IN / OUT -------------------------------------------------------------------------------------
def test_fresh_disk_reads_zero() -> None:
    out = disk().execute(build_request(vb.VIRTIO_BLK_T_IN, 3), [1024, 1], 0)
    assert (out.status, out.data_written, out.level) == (OK, bytes(1024), Level.MUST)
    assert out.written_prefix == 1025


def test_out_then_in_round_trip() -> None:
    model = write(disk(), 2, sectors(1, 0xAB) + sectors(1, 0xCD))
    assert read(model, 2, 2) == sectors(1, 0xAB) + sectors(1, 0xCD)
    assert read(model, 1, 1) == bytes(512) and read(model, 4, 1) == bytes(512)


def test_in_spread_over_buffers_uses_total_writable_length() -> None:
    model = write(disk(), 0, sectors(2, 7))
    out = model.execute(build_request(vb.VIRTIO_BLK_T_IN, 0), [100, 924, 1], ALL)
    assert out.status == OK and out.data_written == sectors(2, 7)


def test_last_sector_is_ok_and_one_past_is_ioerr() -> None:
    model = disk()
    last = model.execute(build_request(vb.VIRTIO_BLK_T_OUT, CAP - 1, sectors(1, 9)), [1], ALL)
    assert last.status == OK
    model = model.after(last)
    past = model.execute(build_request(vb.VIRTIO_BLK_T_OUT, CAP - 1, sectors(2, 5)), [1], ALL)
    # Nothing written, not even the in-range sector CAP-1.
    assert past.status == IOERR and past.disk_after == model.contents
    assert past.rule == "blk.OUT.beyond_capacity" and past.level is Level.SHOULD
    assert [v.citation for v in past.driver_violations] == [sections.BLK_OPERATION_DRIVER]
    assert model.execute(build_request(vb.VIRTIO_BLK_T_OUT, CAP, sectors(1, 5)), [1], ALL).status == IOERR
    rd = model.execute(build_request(vb.VIRTIO_BLK_T_IN, CAP), [513], ALL)
    assert rd.status == IOERR and rd.data_written == b"" and rd.written_prefix == 0
    assert read(model, CAP - 1, 1) == sectors(1, 9)
    huge = model.execute(build_request(vb.VIRTIO_BLK_T_IN, 2**64 - 1), [513], ALL)
    assert huge.status == IOERR


def test_zero_length_in_at_capacity_is_ok() -> None:
    out = disk().execute(build_request(vb.VIRTIO_BLK_T_IN, CAP), [1], ALL)
    assert out.status == OK and out.data_written == b"" and out.written_prefix == 1


def test_unaligned_data_length_is_ioerr() -> None:
    out = disk().execute(build_request(vb.VIRTIO_BLK_T_OUT, 0, b"x" * 100), [1], ALL)
    assert out.status == IOERR and out.rule == "blk.OUT.unaligned_length"
    assert out.disk_after == disk().contents
    assert disk().execute(build_request(vb.VIRTIO_BLK_T_IN, 0), [101], ALL).status == IOERR


def test_read_only_device_refuses_writes_but_reads() -> None:
    ro = BlkDiskModel(capacity=CAP, read_only=True)
    out = ro.execute(build_request(vb.VIRTIO_BLK_T_OUT, 0, sectors(1, 1)), [1], ALL)
    assert (out.status, out.level, out.citation) == (IOERR, Level.MUST, sections.BLK_OPERATION_DEVICE)
    assert out.disk_after == ro.contents
    wz = ro.execute(build_request(vb.VIRTIO_BLK_T_WRITE_ZEROES, 0, discard_segment(0, 1)), [1], ALL)
    assert wz.status == IOERR and wz.level is Level.SHOULD
    assert ro.execute(build_request(vb.VIRTIO_BLK_T_IN, 0), [513], ALL).status == OK


# -- FLUSH, GET_ID ----------------------------------------------------------------------------------
def test_flush_ok_when_negotiated_unsupp_otherwise() -> None:
    flush = build_request(vb.VIRTIO_BLK_T_FLUSH)
    out = disk().execute(flush, [1], ALL)
    assert (out.status, out.level, out.driver_violations) == (OK, Level.MUST, ())
    no = disk().execute(flush, [1], 0)
    assert no.status == UNSUPP and no.rule == "blk.FLUSH.not_negotiated"


def test_flush_with_sector_flags_driver() -> None:
    out = disk().execute(build_request(vb.VIRTIO_BLK_T_FLUSH, 5), [1], ALL)
    assert out.status == OK and out.level is Level.SHOULD and out.rule == "blk.FLUSH.ok_nonzero_sector"
    assert [v.rule for v in out.driver_violations] == ["blk.driver.flush_sector"]


def test_get_id_returns_nul_padded_serial() -> None:
    out = disk().execute(build_request(vb.VIRTIO_BLK_T_GET_ID), [20, 1], 0)
    assert out.status == OK and out.data_written == b"vdpacert-blk0" + bytes(7)
    full = BlkDiskModel(capacity=1, serial=b"S" * 20).execute(build_request(vb.VIRTIO_BLK_T_GET_ID), [21], 0)
    assert full.data_written == b"S" * 20  # 20 bytes: no terminator
    short = disk().execute(build_request(vb.VIRTIO_BLK_T_GET_ID), [10, 1], 0)
    assert short.status == IOERR and short.rule == "blk.GET_ID.length"
    with pytest.raises(BlkModelError):
        BlkDiskModel(capacity=1, serial=b"x" * 21)


# -- DISCARD / WRITE_ZEROES ------------------------------------------------------------------------
def test_write_zeroes_zeroes_exactly_its_ranges() -> None:
    model = write(disk(), 0, sectors(CAP, 0xFF))
    req = build_request(vb.VIRTIO_BLK_T_WRITE_ZEROES, 0, discard_segment(2, 3) + discard_segment(10, 1, 1))
    out = model.execute(req, [1], ALL)
    assert (out.status, out.level, out.citation) == (OK, Level.MUST, sections.BLK_OPERATION_DEVICE)
    model = model.after(out)
    assert read(model, 0, CAP) == (sectors(2, 0xFF) + bytes(1536) + sectors(5, 0xFF) + bytes(512)
                                   + sectors(5, 0xFF))


def test_discard_ranges_become_undefined() -> None:
    model = write(disk(), 0, sectors(4, 1))
    out = model.execute(build_request(vb.VIRTIO_BLK_T_DISCARD, 0, discard_segment(1, 2)), [1], ALL)
    assert out.status == OK and out.undefined_ranges == ((512, 1024),)
    assert read(model.after(out), 0, 1) == sectors(1, 1) and read(model.after(out), 3, 1) == sectors(1, 1)


@pytest.mark.parametrize(("type_", "flags", "rule"), [
    (vb.VIRTIO_BLK_T_DISCARD, 1, "blk.DISCARD.unmap"),
    (vb.VIRTIO_BLK_T_DISCARD, 2, "blk.DISCARD.unknown_flag"),
    (vb.VIRTIO_BLK_T_WRITE_ZEROES, 0x80000000, "blk.WRITE_ZEROES.unknown_flag"),
])
def test_bad_flags_are_unsupp_must(type_: int, flags: int, rule: str) -> None:
    model = write(disk(), 0, sectors(1, 3))
    out = model.execute(build_request(type_, 0, discard_segment(0, 1, flags)), [1], ALL)
    assert (out.status, out.rule, out.level) == (UNSUPP, rule, Level.MUST)
    assert out.disk_after == model.contents


def test_segment_past_capacity_is_ioerr_and_atomic_here() -> None:
    model = write(disk(), 0, sectors(CAP, 0xEE))
    req = build_request(vb.VIRTIO_BLK_T_WRITE_ZEROES, 0, discard_segment(0, 2) + discard_segment(CAP - 1, 2))
    out = model.execute(req, [1], ALL)
    assert out.status == IOERR and out.segments_indeterminate and out.disk_after == model.contents
    edge_req = build_request(vb.VIRTIO_BLK_T_WRITE_ZEROES, 0, discard_segment(CAP - 1, 1))
    edge = model.execute(edge_req, [1], ALL)
    assert edge.status == OK


def test_segment_limits_and_shapes() -> None:
    limited = BlkDiskModel(capacity=CAP, max_discard_seg=1, max_discard_sectors=4)
    two = build_request(vb.VIRTIO_BLK_T_DISCARD, 0, discard_segment(0, 1) * 2)
    assert limited.execute(two, [1], ALL).rule == "blk.DISCARD.too_many_segments"
    big = build_request(vb.VIRTIO_BLK_T_DISCARD, 0, discard_segment(0, 5))
    assert limited.execute(big, [1], ALL).rule == "blk.DISCARD.too_many_sectors"
    ragged = build_request(vb.VIRTIO_BLK_T_DISCARD, 0, discard_segment(0, 1)[:10])
    assert disk().execute(ragged, [1], ALL).rule == "blk.DISCARD.segment_length"
    empty = build_request(vb.VIRTIO_BLK_T_WRITE_ZEROES, 0)
    assert disk().execute(empty, [1], ALL).status == IOERR


def test_discard_and_write_zeroes_need_their_features() -> None:
    for t in (vb.VIRTIO_BLK_T_DISCARD, vb.VIRTIO_BLK_T_WRITE_ZEROES):
        out = disk().execute(build_request(t, 0, discard_segment(0, 1)), [1], 0)
        assert out.status == UNSUPP and out.level is Level.SHOULD


# -- unknown, zoned, not modelled, malformed --------------------------------------------------------
def test_unknown_type_is_unsupp() -> None:
    for t in (2, 3, 5, 99, 0x80000000):
        out = disk().execute(build_request(t), [1], ALL)
        assert out.status == UNSUPP and out.rule == "blk.request.unknown_type"


def test_zoned_requests_without_zoned_are_unsupp_must() -> None:
    for t in (15, 16, 18, 20, 22, 24, 26):
        out = disk().execute(build_request(t), [1], ALL)
        assert (out.status, out.level) == (UNSUPP, Level.MUST), BLK_REQUEST_TYPES[t].name


def test_unmodelled_features_raise() -> None:
    with pytest.raises(NotModelled):
        disk().execute(build_request(vb.VIRTIO_BLK_T_IN), [1], 1 << vb.VIRTIO_BLK_F_ZONED)


def test_missing_status_byte_is_bad_input() -> None:
    out = disk().execute(build_request(vb.VIRTIO_BLK_T_OUT, 0, sectors(1, 1)), [], ALL)
    assert out.bad_input and out.status is None and out.disk_after == disk().contents
    assert out.written_prefix == 0
    zero = disk().execute(build_request(vb.VIRTIO_BLK_T_IN), [0, 0], ALL)
    assert zero.bad_input


def test_short_header_is_bad_input() -> None:
    out = disk().execute(build_request(vb.VIRTIO_BLK_T_OUT, 0)[:15], [1], ALL)
    assert out.bad_input and out.status is None and out.rule == "blk.request.outhdr_short"


def test_model_misuse_raises() -> None:
    with pytest.raises(BlkModelError):
        disk().execute(build_request(vb.VIRTIO_BLK_T_IN), [-1], 0)
    with pytest.raises(BlkModelError):
        disk().execute(build_request(vb.VIRTIO_BLK_T_IN), [1], -1)
    with pytest.raises(BlkModelError):
        BlkDiskModel(capacity=2, disk=SparseDisk(3))
    with pytest.raises(BlkModelError):
        SparseDisk.from_bytes(2, bytes(100))


def test_sparse_disk_equality_ignores_zero_sectors() -> None:
    assert SparseDisk(4, {1: bytes(512)}) == SparseDisk(4)
    assert SparseDisk.from_bytes(2, bytes(512) + b"\1" * 512).read(1, 1) == b"\1" * 512


# -- properties --------------------------------------------------------------------------------------
requests = st.builds(
    lambda t, sector, data, w: (build_request(t, sector, data), w),
    st.sampled_from([0, 1, 4, 8, 11, 13, 2, 99]),
    st.integers(0, CAP + 2),
    st.one_of(st.binary(max_size=64), st.integers(0, 3).map(lambda n: sectors(n, 0x5A)),
              st.lists(st.builds(discard_segment, st.integers(0, CAP + 1), st.integers(0, 4),
                                 st.sampled_from([0, 1, 2])), max_size=3).map(b"".join)),
    st.lists(st.sampled_from([0, 1, 20, 21, 512, 513, 1024]), max_size=3),
)


@settings(max_examples=200)
@given(requests, st.integers(0, 0x7FFF))  # bits 0-14: every feature the model predicts
def test_an_error_never_changes_the_disk(request: tuple[bytes, list[int]], features: int) -> None:
    model = write(disk(), 0, sectors(CAP, 0x11))
    req, writable = request
    out = model.execute(req, writable, features)
    if out.status != OK:
        assert out.disk_after == model.contents
        assert out.data_written == b""
    if out.status is not None:
        assert out.status in (OK, IOERR, UNSUPP) and sum(writable) >= 1
        assert len(out.data_written) <= sum(writable) - 1  # never beyond the device-writable area
    assert out.rule.startswith("blk.") and out.citation is not None


@settings(max_examples=100)
@given(st.integers(0, CAP - 1), st.data())
def test_out_then_in_round_trips(sector: int, data: st.DataObject) -> None:
    count = data.draw(st.integers(1, CAP - sector))
    payload = data.draw(st.binary(min_size=512 * count, max_size=512 * count))
    model = write(disk(), sector, payload)
    assert read(model, sector, count) == payload
    # Sectors outside the written range are untouched.
    if sector:
        assert read(model, 0, sector) == bytes(512 * sector)
