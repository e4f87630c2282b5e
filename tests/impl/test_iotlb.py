"""The compiled IOTLB against a plain reference written here from the vhost-vdpa rules."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from vdpacert.impl.iotlb import ACCESS_RO, ACCESS_RW, ACCESS_WO, Iotlb, IotlbFault

U64 = 2**64


def test_update_and_translate_within_and_across_entries() -> None:
    iotlb = Iotlb()
    iotlb.update(0x1000, 0x1000, 0xA000, ACCESS_RW)
    iotlb.update(0x2000, 0x1000, 0xF000, ACCESS_RO)
    assert iotlb.translate(0x1800, 0x10, ACCESS_WO) == [(0xA800, 0x10)]
    assert iotlb.translate(0x1FF8, 0x10, ACCESS_RO) == [(0xAFF8, 8), (0xF000, 8)]
    with pytest.raises(IotlbFault) as denied:
        iotlb.translate(0x1FF8, 0x10, ACCESS_WO)  # the second entry is read-only
    assert (denied.value.iova, denied.value.reason) == (0x2000, "denied")
    with pytest.raises(IotlbFault) as miss:
        iotlb.translate(0x2FF0, 0x20, ACCESS_RO)
    assert (miss.value.iova, miss.value.reason) == (0x3000, "miss")


def test_a_map_may_end_at_the_top_of_the_address_space() -> None:
    iotlb = Iotlb()
    iotlb.update(U64 - 0x1000, 0x1000, 0x5000, ACCESS_RW)
    assert iotlb.translate(U64 - 8, 8, ACCESS_RW) == [(0x5FF8, 8)]
    with pytest.raises(IotlbFault):
        iotlb.translate(U64 - 8, 9, ACCESS_RW)  # would pass 2^64


@pytest.mark.parametrize(("iova", "size", "uaddr", "perm", "code"), [
    (0x1000, 0, 0, ACCESS_RW, errno.EINVAL),
    (U64 - 0x10, 0x20, 0, ACCESS_RW, errno.EINVAL),
    (0x1000, 0x10, U64 - 8, ACCESS_RW, errno.EINVAL),
    (0x1000, 0x10, 0, 0, errno.EINVAL),
    (0x1000, 0x10, 0, 4, errno.EINVAL),
    (0x1FFF, 0x10, 0, ACCESS_RW, errno.EEXIST),
    (0x0, 0x10000, 0, ACCESS_RW, errno.EEXIST),
])
def test_bad_updates_are_refused_and_change_nothing(iova: int, size: int, uaddr: int, perm: int, code: int) -> None:
    iotlb = Iotlb()
    iotlb.update(0x2000, 0x1000, 0x9000, ACCESS_RW)
    before = iotlb.entries()
    with pytest.raises(OSError) as refused:
        iotlb.update(iova, size, uaddr, perm)
    assert refused.value.errno == code
    assert iotlb.entries() == before


def test_limit_gives_enospc() -> None:
    iotlb = Iotlb(limit=2)
    iotlb.update(0, 1, 0, ACCESS_RO)
    iotlb.update(1, 1, 0, ACCESS_RO)
    with pytest.raises(OSError) as full:
        iotlb.update(2, 1, 0, ACCESS_RO)
    assert full.value.errno == errno.ENOSPC
    assert iotlb.invalidate(0, 1) == 1
    iotlb.update(2, 1, 0, ACCESS_RO)
    assert len(iotlb) == 2


def test_invalidation_drops_partly_covered_entries_whole() -> None:
    iotlb = Iotlb()
    for start in (0x1000, 0x3000, 0x5000):
        iotlb.update(start, 0x1000, start, ACCESS_RW)
    assert iotlb.invalidate(0x1FFF, 0x1002) == 2  # the last byte of one, the first of the next
    assert [e[0] for e in iotlb.entries()] == [0x5000]
    with pytest.raises(OSError):
        iotlb.invalidate(0, 0)
    assert iotlb.del_range(0, U64 - 1) == 1 and len(iotlb) == 0


def test_copy_is_independent() -> None:
    iotlb = Iotlb(limit=7)
    iotlb.update(0x1000, 0x1000, 0x1000, ACCESS_RW)
    twin = iotlb.copy()
    assert twin == iotlb and twin.limit == 7
    twin.clear()
    assert len(iotlb) == 1 and len(twin) == 0


class IotlbAgainstReference(RuleBasedStateMachine):
    """Random updates and invalidations: the compiled map equals a list-of-intervals reference."""

    def __init__(self) -> None:
        super().__init__()
        self.iotlb = Iotlb(limit=6)
        self.reference: list[tuple[int, int, int, int]] = []

    @rule(iova=st.integers(0, 64), size=st.integers(0, 16), uaddr=st.integers(0, 1000),
          perm=st.integers(0, 4))
    def update(self, iova: int, size: int, uaddr: int, perm: int) -> None:
        last = iova + size - 1
        if size == 0 or perm not in (1, 2, 3):
            expected = errno.EINVAL
        elif any(start <= last and iova <= end for start, end, _, _ in self.reference):
            expected = errno.EEXIST
        elif len(self.reference) >= 6:
            expected = errno.ENOSPC
        else:
            expected = 0
        try:
            self.iotlb.update(iova, size, uaddr, perm)
        except OSError as error:
            assert error.errno == expected
        else:
            assert expected == 0
            self.reference.append((iova, last, uaddr, perm))
            self.reference.sort()

    @rule(iova=st.integers(0, 80), size=st.integers(1, 20))
    def invalidate(self, iova: int, size: int) -> None:
        last = iova + size - 1
        keep = [e for e in self.reference if not (e[0] <= last and iova <= e[1])]
        assert self.iotlb.invalidate(iova, size) == len(self.reference) - len(keep)
        self.reference = keep

    @rule(iova=st.integers(0, 90), length=st.integers(1, 20), perm=st.sampled_from([1, 2, 3]))
    def translate(self, iova: int, length: int, perm: int) -> None:
        expected: list[tuple[int, int]] = []
        at, left, fault = iova, length, None
        while left:
            entry = next((e for e in self.reference if e[0] <= at <= e[1]), None)
            if entry is None or entry[3] & perm != perm:
                fault = (at, "miss" if entry is None else "denied")
                break
            take = min(left, entry[1] - at + 1)
            expected.append((entry[2] + at - entry[0], take))
            at, left = at + take, left - take
        if fault:
            with pytest.raises(IotlbFault) as raised:
                self.iotlb.translate(iova, length, perm)
            assert (raised.value.iova, raised.value.reason) == fault
        else:
            assert self.iotlb.translate(iova, length, perm) == expected

    @invariant()
    def same_entries(self) -> None:
        assert self.iotlb.entries() == self.reference


TestIotlbAgainstReference = IotlbAgainstReference.TestCase
TestIotlbAgainstReference.settings = settings(max_examples=60, stateful_step_count=30)


@given(st.integers(0, U64 - 1), st.integers(1, 2**20))
def test_translate_of_an_identity_map_is_identity(iova: int, length: int) -> None:
    iotlb = Iotlb()
    iotlb.update(0, U64 - 1, 0, ACCESS_RW)  # all but the last byte
    if iova + length > U64 - 1:
        with pytest.raises(IotlbFault):
            iotlb.translate(iova, length, ACCESS_RW)
    else:
        assert iotlb.translate(iova, length, ACCESS_RW) == [(iova, length)]
