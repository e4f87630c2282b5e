"""Split virtqueue: layout rules, driver -> device round trips, wraps, what the device may write."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdpacert.model.chains import Chain, DeviceRuleBroken, DriverRuleBroken, RingLayoutError
from vdpacert.model.guest_memory import ModelMemory
from vdpacert.model.notify import Case, Decision
from vdpacert.model.spec import Level
from vdpacert.model.vring_split import SplitDeviceModel, SplitDriver, SplitRing, split_ring_violations
from vdpacert.uapi.virtio_config import VIRTIO_F_IN_ORDER
from vdpacert.uapi.virtio_ring import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC

INDIRECT = 1 << VIRTIO_RING_F_INDIRECT_DESC
EVENT_IDX = 1 << VIRTIO_RING_F_EVENT_IDX
IN_ORDER = 1 << VIRTIO_F_IN_ORDER
BUF = 0x100000


def _pair(num: int = 4, features: int = 0, start: int = 0) -> tuple[ModelMemory, SplitDriver, SplitDeviceModel]:
    mem = ModelMemory()
    ring = SplitRing(num, 0x1000, 0x2000, 0x3000)
    driver = SplitDriver(mem, ring, features=features, start_idx=start)
    device = SplitDeviceModel(mem, ring, features=features, last_avail_idx=start, used_idx=start)
    return mem, driver, device


@pytest.mark.parametrize(("num", "ok"), [(1, True), (256, True), (32768, True), (0, False), (3, False),
                                         (65536, False)])
def test_queue_size_is_a_power_of_two_up_to_32768(num: int, ok: bool) -> None:
    assert (not split_ring_violations(num, 0, 0, 0)) is ok


def test_alignment_rules_and_sizes() -> None:
    found = split_ring_violations(8, 0x1008, 0x2001, 0x3002)
    assert [v.rule for v in found] == ["ring.split.descriptor_table.alignment",
                                       "ring.split.available_ring.alignment", "ring.split.used_ring.alignment"]
    assert all(v.level is Level.MUST and v.citation.number == "2.7.1" for v in found)
    with pytest.raises(RingLayoutError):
        SplitRing(8, 0x1008, 0x2000, 0x3000)
    ring = SplitRing(8, 0x1000, 0x2000, 0x3000)
    assert (ring.desc_size, ring.avail_size, ring.used_size) == (128, 22, 70)
    assert ring.used_event == 0x2000 + 4 + 16 and ring.avail_event == 0x3000 + 4 + 64


def test_round_trip_direct_chain() -> None:
    mem, driver, device = _pair()
    head = driver.add([(BUF, 12, False), (BUF + 0x100, 1500, False), (BUF + 0x1000, 64, True)])
    driver.publish()
    assert device.expected_order() == [head]
    chain = device.consume()
    assert isinstance(chain, Chain) and chain.id == head and chain.descriptors == 3
    assert [(s.addr, s.len) for s in chain.readable] == [(BUF, 12), (BUF + 0x100, 1500)]
    assert [(s.addr, s.len) for s in chain.writable] == [(BUF + 0x1000, 64)]
    assert device.write_allowed(BUF + 0x1000, 64) and not device.write_allowed(BUF, 1)
    assert not device.write_allowed(BUF + 0x1000, 65)
    assert device.write_allowed(device.ring.used_entry(0), 8) and device.write_allowed(device.ring.used_idx, 2)
    assert not device.write_allowed(device.ring.avail_event, 2)  # no EVENT_IDX
    device.complete(head, 10)
    assert mem.read_u16(device.ring.used_idx) == 1
    assert [(e.id, e.len) for e in driver.reap()] == [(head, 10)]
    assert driver.num_free == 4 and not device.outstanding


def test_used_entry_reports_head_and_bytes_written() -> None:
    _, driver, device = _pair()
    heads = [driver.add([(BUF, 8, False), (BUF + 64 * i, 32, True)]) for i in range(2)]
    driver.publish()
    assert device.consume() is not None and device.consume() is not None
    device.complete_batch([(heads[1], 5), (heads[0], 32)])  # out of order is fine without IN_ORDER
    assert [(e.id, e.len) for e in driver.reap()] == [(heads[1], 5), (heads[0], 32)]
    assert driver.num_free == 4


@settings(max_examples=25, deadline=None)
@given(start=st.integers(65500, 65535), sizes=st.lists(st.integers(1, 4), min_size=20, max_size=60),
       indirect=st.lists(st.booleans(), min_size=60, max_size=60))
def test_round_trips_across_the_16_bit_index_wrap(start: int, sizes: list[int], indirect: list[bool]) -> None:
    mem, driver, device = _pair(features=INDIRECT, start=start)
    for n, size in enumerate(sizes):
        segs = [(BUF + 0x40 * i, 16, i == size - 1) for i in range(size)]
        head = driver.add(segs, indirect_table=0x8000 + 0x100 * (n % 4) if indirect[n] else None)
        driver.publish()
        chain = device.consume()
        assert isinstance(chain, Chain) and chain.id == head and chain.indirect == indirect[n]
        assert [(s.addr, s.len, s.writable) for s in chain.segments] == segs
        device.complete(head, 7)
        assert [(e.id, e.len) for e in driver.reap()] == [(head, 7)]
    assert device.last_avail_idx == device.used_idx == (start + len(sizes)) % 65536
    assert mem.read_u16(device.ring.avail_idx) == device.last_avail_idx


def test_device_rules_on_completion() -> None:
    _, driver, device = _pair(features=IN_ORDER)
    first = driver.add([(BUF, 8, True)])
    second = driver.add([(BUF + 8, 8, True)])
    driver.publish()
    device.consume()
    device.consume()
    with pytest.raises(DeviceRuleBroken) as info:
        device.complete(second, 8)
    assert info.value.violation.citation.number == "2.7.9"
    with pytest.raises(DeviceRuleBroken):
        device.complete(first, 9)  # more than the writable buffer holds
    with pytest.raises(DeviceRuleBroken):
        device.complete(3, 0)  # never consumed
    device.complete_batch([(first, 8), (second, 0)])
    assert not device.outstanding


def test_driver_refuses_to_build_bad_chains() -> None:
    _, driver, _ = _pair()
    with pytest.raises(DriverRuleBroken):
        driver.add([(BUF, 8, True), (BUF, 8, False)])
    with pytest.raises(DriverRuleBroken):
        driver.add([(BUF, 8, False)], indirect_table=0x8000)  # INDIRECT_DESC not negotiated
    with pytest.raises(DriverRuleBroken):
        driver.add([])


def test_used_notification_under_event_idx_and_flags() -> None:
    _, driver, device = _pair(features=EVENT_IDX)
    heads = [driver.add([(BUF, 8, True)]) for _ in range(3)]
    driver.publish()
    for _ in heads:
        device.consume()
    driver.set_used_event(1)  # notify when the entry at used index 1 is written
    first = device.complete(heads[0], 0)
    assert not isinstance(first, Exception) and first.case is Case.EVENT_NOT_PASSED  # type: ignore[union-attr]
    second = device.complete(heads[1], 0)
    assert second.decision is Decision.MUST_NOTIFY  # type: ignore[union-attr]
    with pytest.raises(DriverRuleBroken):
        driver.set_no_interrupt(True)

    _, driver, device = _pair()
    head = driver.add([(BUF, 8, True)])
    assert driver.publish().decision is Decision.MUST_NOTIFY  # used flags 0: the driver must kick
    device.set_no_notify(True)
    driver.add([(BUF, 8, True)])
    assert driver.publish().decision is Decision.SHOULD_NOT_NOTIFY
    driver.set_no_interrupt(True)
    device.consume()
    rule = device.complete(head, 0)
    assert rule.decision is Decision.SHOULD_NOT_NOTIFY and rule.level is Level.SHOULD  # type: ignore[union-attr]


def test_avail_event_is_writable_only_with_event_idx() -> None:
    _, _, device = _pair(features=EVENT_IDX)
    assert device.write_allowed(device.ring.avail_event, 2)
    assert device.set_avail_event(5) is None
    _, _, plain = _pair()
    with pytest.raises(DeviceRuleBroken):
        plain.set_avail_event(5)
