"""Packed virtqueue: layout, wrap counters, lists across the end of the ring, indirect, used descriptors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdpacert.model.chains import BadInput, Chain, ChainFault, DeviceRuleBroken, RingLayoutError
from vdpacert.model.guest_memory import ModelMemory
from vdpacert.model.notify import Case, Decision
from vdpacert.model.ring_index import PackedVqState, decode_packed_base, encode_packed_base
from vdpacert.model.vring_packed import (
    DESC_F_AVAIL,
    DESC_F_USED,
    EventSuppress,
    PackedDeviceModel,
    PackedDriver,
    PackedRing,
    advance,
    is_available,
    is_used,
    packed_ring_violations,
)
from vdpacert.uapi.virtio_ring import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_WRITE

INDIRECT = 1 << VIRTIO_RING_F_INDIRECT_DESC
EVENT_IDX = 1 << VIRTIO_RING_F_EVENT_IDX
BUF = 0x100000


def _pair(num: int = 5, features: int = 0) -> tuple[ModelMemory, PackedDriver, PackedDeviceModel]:
    mem = ModelMemory()
    ring = PackedRing(num, 0x1000, 0x80000, 0x80010)
    return mem, PackedDriver(mem, ring, features=features), PackedDeviceModel(mem, ring, features=features)


@pytest.mark.parametrize(("num", "ok"), [(1, True), (3, True), (1000, True), (32768, True), (0, False),
                                         (32769, False)])
def test_queue_size_need_not_be_a_power_of_two_but_is_never_zero(num: int, ok: bool) -> None:
    assert (not packed_ring_violations(num, 0, 0, 0)) is ok


def test_alignment() -> None:
    assert len(packed_ring_violations(4, 0x1008, 0x2002, 0x2001)) == 3
    with pytest.raises(RingLayoutError):
        PackedRing(4, 0x1000, 0x2002, 0x3000)


def test_flag_encoding_and_counters() -> None:
    assert (DESC_F_AVAIL, DESC_F_USED) == (1 << 7, 1 << 15)
    assert is_available(DESC_F_AVAIL, 1) and not is_available(DESC_F_AVAIL, 0)
    assert is_available(DESC_F_USED, 0) and is_used(DESC_F_AVAIL | DESC_F_USED, 1) and is_used(0, 0)
    assert not is_available(0, 1)  # a zero-initialised ring holds nothing
    assert advance(3, 1, 2, 5) == (0, 0) and advance(3, 1, 7, 5) == (0, 1) and advance(0, 1, 4, 5) == (4, 1)


def test_list_spanning_the_end_of_the_ring_flips_both_counters() -> None:
    mem, driver, device = _pair(num=5)
    for _ in range(3):  # move both sides to slot 3
        bid = driver.add([(BUF, 4, False)])
        assert isinstance(device.consume(), Chain)
        device.complete(bid, 0)
        driver.reap()
    segs = [(BUF, 8, False), (BUF + 8, 8, False), (BUF + 16, 8, True)]
    bid = driver.add(segs)  # slots 3, 4, 0: slot 0 carries the flipped counter
    assert (driver.next_avail, driver.avail_wrap) == (1, 0)
    flags0 = mem.read_u16(device.ring.slot(0) + 14)
    assert is_available(flags0, 0) and not is_available(flags0, 1)
    chain = device.consume()
    assert isinstance(chain, Chain) and chain.id == bid and chain.descriptors == 3
    assert [(s.addr, s.len, s.writable) for s in chain.segments] == segs
    assert device.state == PackedVqState(1, 0, 3, 1)
    device.complete(bid, 6)
    assert device.state == PackedVqState(1, 0, 1, 0)
    slot = device.ring.slot(3)
    assert mem.read_u16(slot + 12) == bid and mem.read_u32(slot + 8) == 6
    assert mem.read_u16(slot + 14) == DESC_F_AVAIL | DESC_F_USED | VRING_DESC_F_WRITE  # old counter was 1
    assert driver.reap() == [(bid, 6)]
    assert decode_packed_base(encode_packed_base(device.state)) == device.state


@settings(max_examples=30, deadline=None)
@given(num=st.integers(1, 9), sizes=st.lists(st.integers(1, 9), min_size=1, max_size=40), data=st.data())
def test_round_trips_through_many_wraps(num: int, sizes: list[int], data: st.DataObject) -> None:
    _, driver, device = _pair(num=num, features=INDIRECT)
    total = 0
    for n, size in enumerate(sizes):
        size = min(size, num)
        use_indirect = data.draw(st.booleans())
        segs = [(BUF + 0x40 * i, 16, i >= size // 2) for i in range(size)]
        bid = driver.add(segs, indirect_table=0x9000 if use_indirect else None)
        chain = device.consume()
        assert isinstance(chain, Chain), chain
        assert chain.id == bid and [(s.addr, s.len, s.writable) for s in chain.segments] == segs
        assert chain.descriptors == (1 if use_indirect else size)
        written = data.draw(st.integers(0, chain.writable_len))
        device.complete(bid, written)
        assert driver.reap() == [(bid, written)], n
        total += chain.descriptors
    idx, wrap = advance(0, 1, total, num)
    assert device.state == PackedVqState(idx, wrap, idx, wrap)
    assert (driver.next_avail, driver.avail_wrap, driver.next_used, driver.used_wrap) == (idx, wrap, idx, wrap)


def test_may_write_is_the_writable_buffers_the_held_slots_and_the_device_area() -> None:
    _, driver, device = _pair(num=4)
    for _ in range(3):
        b = driver.add([(BUF, 4, False)])
        device.consume()
        device.complete(b, 0)
        driver.reap()
    driver.add([(BUF, 8, False), (BUF + 0x100, 32, True)])  # slots 3 and 0
    device.consume()
    assert device.write_allowed(BUF + 0x100, 32) and not device.write_allowed(BUF, 8)
    assert device.write_allowed(device.ring.slot(3), 16) and device.write_allowed(device.ring.slot(0), 16)
    assert not device.write_allowed(device.ring.slot(1), 16)
    assert device.write_allowed(device.ring.device, 4) and not device.write_allowed(device.ring.driver, 4)


def test_out_of_order_completion_and_device_rules() -> None:
    _, driver, device = _pair(num=6)
    a = driver.add([(BUF, 8, True), (BUF + 8, 8, True)])
    b = driver.add([(BUF + 16, 8, True)])
    device.consume()
    device.consume()
    device.complete(b, 8)  # used descriptor for b goes to slot 0, then the device skips 1
    assert device.state.last_used_idx == 1
    device.complete(a, 16)
    assert device.state.last_used_idx == 3
    assert driver.reap() == [(b, 8), (a, 16)]
    with pytest.raises(DeviceRuleBroken):
        device.complete(a, 0)


def test_second_descriptor_of_a_list_must_be_available() -> None:
    mem, driver, device = _pair(num=4)
    driver.add([(BUF, 8, False), (BUF + 8, 8, True)])
    mem.write_u16(device.ring.slot(1) + 14, 0)  # the driver "forgot" to mark the second one
    fault = device.consume()
    assert isinstance(fault, ChainFault) and fault.bad is BadInput.DESC_NOT_AVAILABLE
    assert device.consume() is fault  # the queue is stopped
    assert device.state.last_avail_idx == 0


def test_used_notification_with_desc_event() -> None:
    _, driver, device = _pair(num=4, features=EVENT_IDX)
    ids = [driver.add([(BUF, 8, True)]) for _ in range(3)]
    for _ in ids:
        device.consume()
    driver.set_driver_event(EventSuppress.at(off=1, wrap=1, flags=2))
    rule = device.complete(ids[0], 0)
    assert rule.case is Case.EVENT_NOT_PASSED  # type: ignore[union-attr]
    rule = device.complete(ids[1], 0)
    assert rule.decision is Decision.MUST_NOTIFY  # type: ignore[union-attr]
    driver.set_driver_event(EventSuppress(0, 1))
    assert device.complete(ids[2], 0).decision is Decision.SHOULD_NOT_NOTIFY  # type: ignore[union-attr]
    assert device.set_device_event(EventSuppress(0, 1)) is None
    driver.add([(BUF, 8, True)])
    assert driver.kick().decision is Decision.SHOULD_NOT_NOTIFY
    _, _, plain = _pair(num=4)
    with pytest.raises(DeviceRuleBroken):
        plain.set_device_event(EventSuppress.at(0, 1, 2))
