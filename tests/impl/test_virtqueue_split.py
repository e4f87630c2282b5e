"""The compiled virtqueue on hand-built split rings: chains, wrap at 2^16, notifications, resume."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdpacert.impl.iotlb import ACCESS_RW
from vdpacert.impl.virtqueue import BAD_STATE, ERR_CHAIN, VirtQueue, VirtQueueError

try:
    from .ring_driver import CANARY, Guest, SplitDriver, device_queue, features
except ImportError:
    from ring_driver import CANARY, Guest, SplitDriver, device_queue, features


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


def test_direct_chain_read_write_and_used_element(guest: Guest) -> None:
    driver = SplitDriver(guest, 8)
    vq = device_queue(guest, driver, features())
    head = driver.add([b"hello ", b"world"], [8, 16])
    chain = vq.pop_chain()
    assert chain is not None
    assert (chain.head, chain.ndesc, chain.readable_len, chain.writable_len) == (head, 4, 11, 24)
    assert vq.read_chain(chain) == b"hello world"
    assert vq.read_chain(chain, 6, 3) == b"wor"
    buffers = driver.buffers[head]
    assert chain.readable == [(guest.gpa(o), n) for o, n in buffers.readable]
    assert chain.writable == [(guest.gpa(o), n) for o, n in buffers.writable]
    assert vq.write_chain(chain, 0, bytes(range(20))) == 20
    vq.push_chain(chain, 20)
    assert driver.get_used() == [(head, 20)]
    # the 20 bytes cross from the first writable buffer into the second; the rest is untouched
    assert driver.written(head) == bytes(range(20)) + bytes([CANARY]) * 4
    assert vq.pop_chain() is None


def test_indirect_chain(guest: Guest) -> None:
    driver = SplitDriver(guest, 8)
    vq = device_queue(guest, driver, features(indirect=True))
    head = driver.add([b"abc", b"defg"], [5, 5, 5], indirect=True)
    chain = vq.pop_chain()
    assert (chain.head, chain.readable_len, chain.writable_len) == (head, 7, 15)
    assert vq.read_chain(chain) == b"abcdefg"
    assert len(chain.writable) == 3
    assert vq.write_chain(chain, 3, b"xxxxxxxxxxxxxxxxxxxx") == 12   # clipped to the writable part
    vq.push_chain(chain, 15)
    assert driver.get_used() == [(head, 15)]
    assert driver.written(head) == bytes([CANARY]) * 3 + b"x" * 12


def test_empty_and_not_ready_queues_give_nothing(guest: Guest) -> None:
    driver = SplitDriver(guest, 4)
    vq = device_queue(guest, driver, features(), ready=False)
    driver.add([b"x"])
    assert vq.pop_chain() is None          # not ready: the device consumes nothing
    vq.set_ready(True)
    assert vq.pop_chain() is not None
    assert vq.pop_chain() is None


def test_batch_push_publishes_once_in_order(guest: Guest) -> None:
    driver = SplitDriver(guest, 16)
    vq = device_queue(guest, driver, features())
    heads = [driver.add([bytes([i])], [4]) for i in range(5)]
    chains = [vq.pop_chain() for _ in heads]
    assert [c.head for c in chains] == heads
    assert vq.outstanding == 5
    vq.push_chains([(c, i) for i, c in enumerate(chains)])
    assert driver.used_idx() == 5
    assert driver.get_used() == [(h, i) for i, h in enumerate(heads)]
    assert vq.outstanding == 0
    with pytest.raises(VirtQueueError) as twice:
        vq.push_chain(chains[0], 0)                 # already pushed
    assert twice.value.code == ERR_CHAIN


def test_written_length_is_clipped_to_the_writable_part(guest: Guest) -> None:
    driver = SplitDriver(guest, 4)
    vq = device_queue(guest, driver, features())
    head = driver.add([b"r"], [6])
    vq.push_chain(vq.pop_chain(), 1000)
    assert driver.get_used() == [(head, 6)]


@pytest.mark.parametrize("start", [65533, 65535, 0xFFF0])
def test_indices_wrap_at_2_16(guest: Guest, start: int) -> None:
    driver = SplitDriver(guest, 8)
    driver.start_at(start)
    vq = device_queue(guest, driver, features())
    vq.set_state(start)
    vq.set_ready(True)
    seen = []
    for round_ in range(5):
        heads = [driver.add([bytes([round_, i])], [2]) for i in range(3)]
        for head in heads:
            chain = vq.pop_chain()
            assert chain.head == head
            assert vq.read_chain(chain) == bytes([round_, heads.index(head)])
            vq.write_chain(chain, 0, b"ok")
            vq.push_chain(chain, 2)
        seen += driver.get_used()
        assert vq.pop_chain() is None
    assert len(seen) == 15
    assert vq.get_state() == {"last_avail_idx": (start + 15) & 0xFFFF}
    assert driver.used_idx() == (start + 15) & 0xFFFF


def test_a_descriptor_across_iotlb_entries_and_regions_becomes_segments(guest: Guest) -> None:
    from vdpacert.impl.guestmem import GuestMemory

    other = GuestMemory(0x2000, gpa=0x9_0000_0000, register=False)
    try:
        guest.registry.add(other)
        other.write(0, b"B" * 0x2000)
        # IOVA window: the last 0x10 bytes of `guest` then the start of `other`, as two entries
        tail = guest.alloc(0x10, 16)
        guest.mem.write(tail, b"A" * 0x10)
        window = 0x7000_0000
        guest.iotlb.update(window, 0x10, guest.mem.uaddr + tail, ACCESS_RW)
        guest.iotlb.update(window + 0x10, 0x2000, other.uaddr, ACCESS_RW)
        driver = SplitDriver(guest, 4)
        vq = device_queue(guest, driver, features())
        driver.write_desc(0, window, 0x30, 0)
        driver.publish(0)
        chain = vq.pop_chain()
        assert chain.readable == [(guest.gpa(tail), 0x10), (0x9_0000_0000, 0x20)]
        assert vq.read_chain(chain) == b"A" * 0x10 + b"B" * 0x20
    finally:
        other.close()


def test_unpop_makes_the_same_chain_come_again(guest: Guest) -> None:
    driver = SplitDriver(guest, 4)
    vq = device_queue(guest, driver, features())
    first = driver.add([b"1"])
    second = driver.add([b"2"])
    a = vq.pop_chain()
    b = vq.pop_chain()
    with pytest.raises(VirtQueueError):
        vq.unpop_chain(a)                    # only the most recent pop can be undone
    vq.unpop_chain(b)
    assert vq.get_state() == {"last_avail_idx": 1}
    again = vq.pop_chain()
    assert (a.head, again.head) == (first, second)


def test_no_space_while_chains_are_outstanding(guest: Guest) -> None:
    # Buffers behind 16-byte IOTLB entries: a 4 KiB descriptor is 256 segments; the arena of a
    # queue of 4 holds 2 * 4 + SEG_SLACK = 264, so the second such chain must wait.
    frag = 0x6000_0000
    data = guest.alloc(0x2000, 16)
    for i in range(0x2000 // 16):
        guest.iotlb.update(frag + 16 * i, 16, guest.mem.uaddr + data + 16 * i, ACCESS_RW)
    driver = SplitDriver(guest, 4)
    vq = device_queue(guest, driver, features())
    for i in range(2):
        driver.write_desc(i, frag + 0x1000 * i, 0x1000, 0)
    driver.publish(0, 1)
    first = vq.pop_chain()
    assert len(first.readable) == 256
    with pytest.raises(BufferError):
        vq.pop_chain()
    assert vq.broken == 0
    vq.push_chain(first, 0)
    assert vq.pop_chain().head == 1


def test_event_idx_used_event_decides_notifications(guest: Guest) -> None:
    driver = SplitDriver(guest, 8)
    vq = device_queue(guest, driver, features(event_idx=True))
    heads = [driver.add([b"x"]) for _ in range(6)]
    assert vq.notify_needed() is False            # nothing used yet
    driver.set_used_event(2)                       # "notify me when used idx passes 2"
    for expected in (False, False, True, False, False, False):
        vq.push_chain(vq.pop_chain(), 0)
        assert vq.notify_needed() is expected
    driver.set_used_event(6)
    assert vq.notify_needed() is False             # no new used entry
    driver.set_used_event(7)
    driver.add([b"y"])
    chains = [vq.pop_chain()]
    vq.push_chains([(c, 0) for c in chains])
    assert vq.notify_needed() is False             # used idx 7 has not passed event 7
    assert [h for h, _ in driver.get_used()][:6] == heads


def test_event_idx_batch_crossing_the_event_notifies_once(guest: Guest) -> None:
    driver = SplitDriver(guest, 8)
    vq = device_queue(guest, driver, features(event_idx=True))
    for _ in range(4):
        driver.add([b"x"])
    driver.set_used_event(1)
    vq.push_chains([(vq.pop_chain(), 0) for _ in range(4)])   # 0 -> 4 passes 1
    assert vq.notify_needed() is True


def test_event_idx_avail_event_is_published_when_the_ring_runs_empty(guest: Guest) -> None:
    driver = SplitDriver(guest, 8)
    vq = device_queue(guest, driver, features(event_idx=True))
    driver.add([b"a"])
    driver.add([b"b"])
    vq.pop_chain()
    vq.pop_chain()
    assert vq.pop_chain() is None
    assert driver.avail_event() == 2               # kick me when you publish entry 2
    vq.disable_notifications()
    driver.add([b"c"])
    vq.pop_chain()
    assert vq.pop_chain() is None
    assert driver.avail_event() == 2               # polling: no new request for a kick
    driver.add([b"d"])
    assert vq.enable_notifications() is True       # work arrived: keep popping
    assert driver.avail_event() == 3


def test_flag_suppression_without_event_idx(guest: Guest) -> None:
    driver = SplitDriver(guest, 4)
    vq = device_queue(guest, driver, features())
    driver.add([b"a"])
    driver.add([b"b"])
    vq.push_chain(vq.pop_chain(), 0)
    assert vq.notify_needed() is True
    driver.set_avail_flags(1)                      # VRING_AVAIL_F_NO_INTERRUPT
    vq.push_chain(vq.pop_chain(), 0)
    assert vq.notify_needed() is False
    vq.disable_notifications()
    assert driver.used_flags() == 1                # VRING_USED_F_NO_NOTIFY
    assert vq.enable_notifications() is False
    assert driver.used_flags() == 0


def test_resume_after_set_state_takes_the_inflight_chains_again(guest: Guest) -> None:
    driver = SplitDriver(guest, 16)
    source = device_queue(guest, driver, features())
    heads = [driver.add([bytes([i])], [1]) for i in range(5)]
    popped = [source.pop_chain() for _ in range(4)]
    source.push_chains([(popped[0], 1), (popped[1], 1)])
    state = source.get_state()
    assert state == {"last_avail_idx": 4}          # includes the two chains still in flight
    # the destination restores the base; its used index comes from the ring (2), not from 4
    dest = device_queue(guest, driver, features(), ready=False)
    dest.set_state(**state)
    dest.set_ready(True)
    assert dest.inflight() == 2
    assert dest.used_idx == 2
    assert dest.rewind_inflight() == 2
    again = []
    while (chain := dest.pop_chain()) is not None:
        again.append(chain)
    assert [c.head for c in again] == heads[2:]    # the two in flight, then the one never taken
    dest.push_chains([(c, 1) for c in again])
    assert [h for h, _ in driver.get_used()] == heads  # every chain returned exactly once


def test_set_state_with_an_inconsistent_used_index_is_bad_state(guest: Guest) -> None:
    driver = SplitDriver(guest, 4)
    vq = device_queue(guest, driver, features(), ready=False)
    vq.set_state(100)                              # used idx in the ring is 0: 100 ahead of it
    vq.set_ready(True)
    with pytest.raises(VirtQueueError) as bad:
        vq.pop_chain()
    assert bad.value.code == BAD_STATE


def test_rewind_refuses_while_chains_are_outstanding(guest: Guest) -> None:
    driver = SplitDriver(guest, 4)
    vq = device_queue(guest, driver, features())
    driver.add([b"x"])
    vq.pop_chain()
    with pytest.raises(OSError) as busy:
        vq.rewind_inflight()
    assert busy.value.errno == errno.EBUSY


@pytest.mark.parametrize(("call", "args"), [
    ("set_num", (0,)), ("set_num", (32769,)), ("set_num", (-1,)), ("set_state", (0x10000,)),
    ("set_state", (-1,)), ("set_features", (-1,)),
])
def test_bad_configuration_is_einval(call: str, args: tuple[int, ...]) -> None:
    vq = VirtQueue()
    with pytest.raises(OSError) as bad:
        getattr(vq, call)(*args)
    assert bad.value.errno == errno.EINVAL


def test_split_ready_needs_a_power_of_two_and_an_address_space(guest: Guest) -> None:
    vq = VirtQueue()
    vq.set_num(6)
    vq.set_iotlb(guest.iotlb)
    vq.set_memory(guest.registry)
    with pytest.raises(OSError) as odd:
        vq.set_ready(True)
    assert odd.value.errno == errno.EINVAL and not vq.ready
    bare = VirtQueue()
    bare.set_num(4)
    with pytest.raises(OSError):
        bare.set_ready(True)


def test_reset_forgets_everything(guest: Guest) -> None:
    driver = SplitDriver(guest, 4)
    vq = device_queue(guest, driver, features(event_idx=True))
    driver.add([b"x"])
    chain = vq.pop_chain()
    vq.reset()
    assert (vq.num, vq.ready, vq.event_idx, vq.broken, vq.iotlb) == (0, False, False, 0, None)
    assert vq.get_state() == {"last_avail_idx": 0}
    assert not chain.live


@settings(max_examples=40)
@given(start=st.integers(0, 0xFFFF),
       chains=st.lists(st.tuples(st.lists(st.binary(min_size=0, max_size=40), max_size=3),
                                 st.lists(st.integers(0, 40), max_size=3),
                                 st.booleans()),
                       min_size=1, max_size=12),
       batch=st.integers(1, 4))
def test_any_sequence_of_chains_round_trips(start: int, chains: list, batch: int) -> None:
    guest = Guest(1 << 18)
    try:
        driver = SplitDriver(guest, 32)
        driver.start_at(start)
        vq = device_queue(guest, driver, features(indirect=True), ready=False)
        vq.set_state(start)
        vq.set_ready(True)
        expected = []
        pending = list(chains)
        while pending:
            group, pending = pending[:batch], pending[batch:]
            group = [(r if (r or w) else [b"z"], w, ind) for r, w, ind in group]
            heads = [driver.add(r, w, indirect=ind) for r, w, ind in group]
            done = []
            for head, (readable, writable, _) in zip(heads, group, strict=True):
                chain = vq.pop_chain()
                assert chain.head == head
                assert vq.read_chain(chain) == b"".join(readable)
                reply = bytes((head + i) & 0xFF for i in range(sum(writable)))
                assert vq.write_chain(chain, 0, reply) == len(reply)
                done.append((chain, len(reply)))
                expected.append((head, len(reply), reply))
            vq.push_chains(done)
            for head, length in driver.get_used():
                want = expected.pop(0)
                assert (head, length) == want[:2]
                assert driver.written(head) == want[2]
        assert vq.pop_chain() is None
        assert vq.get_state() == {"last_avail_idx": (start + len(chains)) & 0xFFFF}
    finally:
        guest.close()
