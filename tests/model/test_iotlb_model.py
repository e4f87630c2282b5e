"""IotlbModel: vhost-vdpa's update / invalidate rules and translation through one address space."""

from __future__ import annotations

import errno
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdpacert.model import iotlb
from vdpacert.model.iotlb import U64_MAX, AccessFault, IotlbMap, IotlbModel
from vdpacert.model.spec import LinuxSource, ModelErrno
from vdpacert.uapi.vhost_types import VHOST_ACCESS_RO, VHOST_ACCESS_RW, VHOST_ACCESS_WO

RO, WO, RW = VHOST_ACCESS_RO, VHOST_ACCESS_WO, VHOST_ACCESS_RW


def fails(exc: pytest.ExceptionInfo[ModelErrno], code: int, rule: str) -> None:
    assert exc.value.errno == code
    assert exc.value.rule == rule


def test_update_then_translate_offsets_into_the_mapping() -> None:
    t = IotlbModel()
    assert t.update(0x1000, 0x2000, 0x7F000000, RW) == IotlbMap(0x1000, 0x2FFF, 0x7F000000, RW)
    assert t.translate(0x1800, 0x10, write=False) == ((0x7F000800, 0x10),)
    assert t.translate(0x2FFF, 1, write=True) == ((0x7F001FFF, 1),)
    assert len(t) == 1


def test_translation_spans_adjacent_mappings_as_separate_segments() -> None:
    t = IotlbModel()
    t.update(0x0, 0x1000, 0xA000, RO)
    t.update(0x1000, 0x1000, 0xF000, RO)
    assert t.translate(0xFF0, 0x20, write=False) == ((0xAFF0, 0x10), (0xF000, 0x10))


def test_translation_stops_at_a_hole_and_reports_the_first_unmapped_byte() -> None:
    t = IotlbModel()
    t.update(0x0, 0x1000, 0xA000, RW)
    t.update(0x2000, 0x1000, 0xB000, RW)
    assert t.translate(0xF00, 0x1200, write=False) == AccessFault(0x1000, "miss")
    assert t.translate(0x5000, 1, write=False) == AccessFault(0x5000, "miss")
    assert t.translate(0x5000, 0, write=True) == ()


@pytest.mark.parametrize(
    ("perm", "read_ok", "write_ok"), [(RO, True, False), (WO, False, True), (RW, True, True)]
)
def test_permission_is_checked_per_direction(perm: int, read_ok: bool, write_ok: bool) -> None:
    t = IotlbModel()
    t.update(0x1000, 0x1000, 0x9000, perm)
    read = t.translate(0x1000, 8, write=False)
    write = t.translate(0x1000, 8, write=True)
    assert (read == ((0x9000, 8),)) is read_ok
    assert (write == ((0x9000, 8),)) is write_ok
    if not read_ok:
        assert read == AccessFault(0x1000, "perm")
    if not write_ok:
        assert write == AccessFault(0x1000, "perm")


def test_permission_fault_after_a_good_segment_names_the_faulting_byte() -> None:
    t = IotlbModel()
    t.update(0x0, 0x1000, 0xA000, RW)
    t.update(0x1000, 0x1000, 0xB000, RO)
    assert t.translate(0x800, 0x1000, write=True) == AccessFault(0x1000, "perm")


@pytest.mark.parametrize(
    ("iova", "size"),
    [
        (0x1000, 0x1000),  # identical
        (0x1800, 0x100),  # inside
        (0x0, 0x1001),  # overlaps the first byte
        (0x1FFF, 0x10),  # overlaps the last byte
        (0x0, 0x10000),  # contains it
    ],
)
def test_overlapping_update_is_eexist_and_changes_nothing(iova: int, size: int) -> None:
    t = IotlbModel()
    t.update(0x1000, 0x1000, 0x5000, RW)
    before = t.snapshot()
    with pytest.raises(ModelErrno) as exc:
        t.update(iova, size, 0x9000, RW)
    fails(exc, errno.EEXIST, "iotlb.update.overlap")
    assert isinstance(exc.value.citation, LinuxSource)
    assert exc.value.citation.symbol == "vhost_vdpa_process_iotlb_update"
    assert t.snapshot() == before


def test_adjacent_ranges_do_not_overlap() -> None:
    t = IotlbModel()
    t.update(0x1000, 0x1000, 0x5000, RW)
    t.update(0x0, 0x1000, 0x4000, RW)
    t.update(0x2000, 0x1000, 0x6000, RW)
    assert [m.start for m in t.maps] == [0x0, 0x1000, 0x2000]


@pytest.mark.parametrize(
    ("iova", "size", "perm", "rule"),
    [
        (0x1000, 0, RW, "iotlb.update.size_zero"),
        (2, U64_MAX, RW, "iotlb.update.wraps"),
        (U64_MAX, 2, RW, "iotlb.update.wraps"),
        (0x1000, 0x1000, 0, "iotlb.update.perm"),
        (0x1000, 0x1000, 4, "iotlb.update.perm"),
    ],
)
def test_malformed_updates_are_einval(iova: int, size: int, perm: int, rule: str) -> None:
    t = IotlbModel()
    with pytest.raises(ModelErrno) as exc:
        t.update(iova, size, 0, perm)
    fails(exc, errno.EINVAL, rule)
    assert len(t) == 0


def test_largest_possible_ranges_are_accepted() -> None:
    t = IotlbModel()
    t.update(0, U64_MAX, 0, RW)  # [0, 2^64 - 2]
    assert t.maps == (IotlbMap(0, U64_MAX - 1, 0, RW),)
    t.update(U64_MAX, 1, 0x1000, RO)
    assert t.translate(U64_MAX, 1, write=False) == ((0x1000, 1),)
    assert t.translate(U64_MAX, 2, write=False) == AccessFault(U64_MAX, "miss")


def test_updates_outside_the_iova_range_are_einval() -> None:
    t = IotlbModel(iova_range=(0x1000, 0xFFFF))
    for iova, size in ((0x0, 0x1000), (0xF000, 0x1001), (0x10000, 1)):
        with pytest.raises(ModelErrno) as exc:
            t.update(iova, size, 0, RW)
        fails(exc, errno.EINVAL, "iotlb.update.outside_iova_range")
    t.update(0x1000, 0xF000, 0, RW)
    assert len(t) == 1


def test_partial_invalidation_drops_the_whole_mapping() -> None:
    t = IotlbModel()
    t.update(0x0, 0x4000, 0xA000, RW)
    t.update(0x8000, 0x1000, 0xB000, RW)
    gone = t.invalidate(0x3FFF, 1)
    assert gone == (IotlbMap(0x0, 0x3FFF, 0xA000, RW),)
    assert t.maps == (IotlbMap(0x8000, 0x8FFF, 0xB000, RW),)
    assert t.translate(0x0, 1, write=False) == AccessFault(0x0, "miss")


def test_invalidation_removes_every_intersecting_mapping_and_nothing_else() -> None:
    t = IotlbModel()
    for i in range(4):
        t.update(i * 0x1000, 0x1000, 0x10000 + i * 0x1000, RW)
    gone = t.invalidate(0x1800, 0x1000)
    assert [m.start for m in gone] == [0x1000, 0x2000]
    assert [m.start for m in t.maps] == [0x0, 0x3000]
    assert t.invalidate(0x8000, 0x1000) == ()  # nothing there: a no-op, not an error


@pytest.mark.parametrize(
    ("iova", "size", "rule"),
    [
        (0, 0, "iotlb.invalidate.size_zero"),
        (0x1000, 0, "iotlb.invalidate.size_zero"),
        (U64_MAX, 2, "iotlb.invalidate.wraps"),
    ],
)
def test_malformed_invalidations_are_einval_and_keep_the_maps(iova: int, size: int, rule: str) -> None:
    t = IotlbModel()
    t.update(0x0, 0x1000, 0, RW)
    with pytest.raises(ModelErrno) as exc:
        t.invalidate(iova, size)
    fails(exc, errno.EINVAL, rule)
    assert len(t) == 1


def test_entry_limit_is_enospc_until_something_is_invalidated() -> None:
    t = IotlbModel(limit=2)
    t.update(0x0, 0x1000, 0, RW)
    t.update(0x1000, 0x1000, 0, RW)
    with pytest.raises(ModelErrno) as exc:
        t.update(0x2000, 0x1000, 0, RW)
    fails(exc, errno.ENOSPC, "iotlb.update.limit")
    t.invalidate(0x0, 1)
    t.update(0x2000, 0x1000, 0, RW)
    assert len(t) == 2


def test_replace_is_all_or_nothing_on_the_limit() -> None:
    t = IotlbModel(limit=1)
    t.update(0x0, 0x1000, 0, RW)
    with pytest.raises(ModelErrno) as exc:
        t.replace([IotlbMap(0, 0xFFF, 0, RW), IotlbMap(0x1000, 0x1FFF, 0, RW)])
    fails(exc, errno.ENOSPC, "iotlb.update.limit")
    assert t.maps == (IotlbMap(0, 0xFFF, 0, RW),)


def test_bad_model_input_is_a_value_error() -> None:
    t = IotlbModel()
    with pytest.raises(ValueError):
        t.update(-1, 1, 0, RW)
    with pytest.raises(ValueError):
        t.update(0, 1 << 64, 0, RW)
    with pytest.raises(ValueError):
        t.translate(0, -1, write=False)
    with pytest.raises(ValueError):
        IotlbModel(limit=0)
    with pytest.raises(ValueError):
        IotlbModel(iova_range=(5, 4))


def test_every_rule_cites_linux() -> None:
    for rule in iotlb.RULES:
        assert isinstance(rule.citation, LinuxSource)
        assert rule.rule.startswith("iotlb.")


def test_copies_and_equality_compare_the_maps() -> None:
    t = IotlbModel()
    t.update(0x0, 0x1000, 0, RW)
    c = t.copy()
    assert c == t
    c.invalidate(0, 1)
    assert c != t


# -- properties --------------------------------------------------------------------------------
_ops = st.lists(
    st.tuples(
        st.sampled_from(["update", "invalidate"]),
        st.integers(0, 0x20),
        st.integers(0, 0x8),
        st.sampled_from([0, RO, WO, RW]),
    ),
    max_size=30,
)


@settings(max_examples=150, deadline=None)
@given(_ops)
def test_maps_stay_disjoint_and_failures_change_nothing(ops: list[tuple[str, int, int, int]]) -> None:
    t = IotlbModel(limit=6)
    for op, page, pages, perm in ops:
        before = t.snapshot()
        try:
            if op == "update":
                t.update(page * 0x1000, pages * 0x1000, 0x100000 + page * 0x1000, perm)
            else:
                t.invalidate(page * 0x1000, pages * 0x1000)
        except ModelErrno:
            assert t.snapshot() == before
        maps = t.maps
        assert list(maps) == sorted(maps)
        assert all(a.last < b.start for a, b in itertools.pairwise(maps))
        assert len(maps) <= 6
        for m in maps:  # every mapped byte translates into its own mapping
            seg = t.translate(m.start, m.size, write=bool(m.perm & WO))
            assert seg == ((m.uaddr, m.size),)
