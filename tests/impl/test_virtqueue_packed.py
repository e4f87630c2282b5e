"""The compiled virtqueue on hand-built packed rings: wrap counters, chains across the end, events, resume."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdpacert.impl.virtqueue import VirtQueueError

try:
    from .ring_driver import AVAIL, CANARY, USED, WRITE, Guest, PackedDriver, device_queue, features
except ImportError:
    from ring_driver import AVAIL, CANARY, USED, WRITE, Guest, PackedDriver, device_queue, features

PACKED = features(packed=True)


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


def test_direct_chain_and_used_descriptor(guest: Guest) -> None:
    driver = PackedDriver(guest, 8)
    vq = device_queue(guest, driver, PACKED)
    buffer_id = driver.add([b"ping", b"!"], [3, 9])
    chain = vq.pop_chain()
    assert (chain.head, chain.ndesc, chain.readable_len, chain.writable_len) == (buffer_id, 4, 5, 12)
    assert vq.read_chain(chain) == b"ping!"
    assert vq.write_chain(chain, 1, b"pong") == 4
    vq.push_chain(chain, 5)
    # the used descriptor overwrites slot 0: id, len, AVAIL == USED == wrap counter, WRITE (bytes written)
    _, length, used_id, flags = driver.read_desc(0)
    assert (length, used_id, flags) == (5, buffer_id, AVAIL | USED | WRITE)
    assert driver.get_used() == [(buffer_id, 5)]
    assert driver.written(buffer_id) == bytes([CANARY]) + b"pong" + bytes([CANARY]) * 7
    assert vq.get_state() == {"last_avail_idx": 4, "last_avail_counter": 1,
                              "last_used_idx": 4, "last_used_counter": 1}
    assert vq.pop_chain() is None


def test_indirect_chain_takes_one_slot(guest: Guest) -> None:
    driver = PackedDriver(guest, 4)
    vq = device_queue(guest, driver, features(packed=True, indirect=True))
    buffer_id = driver.add([b"ab", b"cd"], [2, 2], indirect=True)
    chain = vq.pop_chain()
    assert (chain.head, chain.ndesc, chain.readable_len, chain.writable_len) == (buffer_id, 1, 4, 4)
    assert vq.read_chain(chain) == b"abcd"
    vq.write_chain(chain, 0, b"wxyz")
    vq.push_chain(chain, 4)
    assert driver.get_used() == [(buffer_id, 4)]
    assert driver.written(buffer_id) == b"wxyz"
    assert vq.get_state()["last_used_idx"] == 1


def test_buffer_id_comes_from_the_last_descriptor(guest: Guest) -> None:
    driver = PackedDriver(guest, 4)
    vq = device_queue(guest, driver, PACKED)
    driver.add([b"a", b"b"], buffer_id=7)
    addr, length, _, flags = driver.read_desc(0)
    driver.write_desc(0, addr, length, 99, flags)            # a different id in the head
    assert vq.pop_chain().head == 7


def test_an_unpublished_head_is_not_taken(guest: Guest) -> None:
    driver = PackedDriver(guest, 4)
    vq = device_queue(guest, driver, PACKED)
    driver.add([b"a", b"b"], publish=False)
    assert vq.pop_chain() is None
    driver.publish()
    assert vq.pop_chain().ndesc == 2


def test_wrap_counters_flip_at_the_queue_size(guest: Guest) -> None:
    driver = PackedDriver(guest, 3)                          # packed sizes need not be powers of 2
    vq = device_queue(guest, driver, PACKED)
    for round_ in range(7):
        buffer_id = driver.add([bytes([round_])], [1])
        chain = vq.pop_chain()
        assert (chain.head, vq.read_chain(chain)) == (buffer_id, bytes([round_]))
        vq.write_chain(chain, 0, b"R")
        vq.push_chain(chain, 1)
        assert driver.get_used() == [(buffer_id, 1)]
        assert driver.written(buffer_id) == b"R"
    # 7 chains of 2 descriptors: 14 slots on a ring of 3 is slot 2 after four flips (back to 1)
    assert vq.get_state() == {"last_avail_idx": 2, "last_avail_counter": 1,
                              "last_used_idx": 2, "last_used_counter": 1}
    driver.add([b"x"])
    vq.push_chain(vq.pop_chain(), 0)
    driver.add([b"y"])
    vq.pop_chain()
    assert vq.get_state() == {"last_avail_idx": 1, "last_avail_counter": 0,     # 16 slots: fifth flip
                              "last_used_idx": 0, "last_used_counter": 0}


def test_a_chain_spanning_the_end_of_the_ring(guest: Guest) -> None:
    driver = PackedDriver(guest, 4)
    vq = device_queue(guest, driver, PACKED)
    for _ in range(3):
        driver.add([b"."])
        vq.push_chain(vq.pop_chain(), 0)
    driver.get_used()
    buffer_id = driver.add([b"one", b"two"], [4])             # slots 3, 0, 1: across the end
    chain = vq.pop_chain()
    assert (chain.head, chain.ndesc, vq.read_chain(chain)) == (buffer_id, 3, b"onetwo")
    assert vq.get_state()["last_avail_idx"] == 2 and vq.get_state()["last_avail_counter"] == 0
    vq.write_chain(chain, 0, b"DONE")
    vq.push_chain(chain, 4)
    assert driver.get_used() == [(buffer_id, 4)]
    assert vq.get_state()["last_used_idx"] == 2 and vq.get_state()["last_used_counter"] == 0
    assert driver.written(buffer_id) == b"DONE"


def test_chain_covering_the_whole_ring(guest: Guest) -> None:
    driver = PackedDriver(guest, 4)
    vq = device_queue(guest, driver, PACKED)
    driver.add([b"a"])
    vq.push_chain(vq.pop_chain(), 0)
    driver.get_used()
    buffer_id = driver.add([b"1", b"2", b"3", b"4"])          # all four slots, from slot 1
    chain = vq.pop_chain()
    assert (chain.ndesc, vq.read_chain(chain)) == (4, b"1234")
    vq.push_chain(chain, 0)
    assert driver.get_used() == [(buffer_id, 0)]
    assert vq.get_state() == {"last_avail_idx": 1, "last_avail_counter": 0,
                              "last_used_idx": 1, "last_used_counter": 0}


def test_batch_of_used_descriptors(guest: Guest) -> None:
    driver = PackedDriver(guest, 16)
    vq = device_queue(guest, driver, PACKED)
    ids = [driver.add([bytes([i])] * (i % 2 + 1), [2]) for i in range(4)]
    chains = [vq.pop_chain() for _ in ids]
    vq.push_chains([(c, 2) for c in chains])
    assert driver.get_used() == [(i, 2) for i in ids]
    assert vq.get_state()["last_used_idx"] == sum(c.ndesc for c in chains)


def test_driver_event_suppression_decides_notifications(guest: Guest) -> None:
    driver = PackedDriver(guest, 4)
    vq = device_queue(guest, driver, features(packed=True, event_idx=True))
    for _ in range(3):
        driver.add([b"x"])
    driver.set_driver_event(0, 1)                             # DISABLE
    vq.push_chain(vq.pop_chain(), 0)
    assert vq.notify_needed() is False
    driver.set_driver_event(0, 0)                             # ENABLE
    vq.push_chain(vq.pop_chain(), 0)
    assert vq.notify_needed() is True
    driver.set_driver_event(3 | 1 << 15, 2)                   # DESC: when slot 3 of lap 1 is used
    vq.push_chain(vq.pop_chain(), 0)                          # used 2 -> 3: not past 3 yet
    assert vq.notify_needed() is False
    driver.add([b"y"])
    vq.push_chain(vq.pop_chain(), 0)                          # used 3 -> 0 (lap 0): past slot 3
    assert vq.notify_needed() is True
    assert vq.notify_needed() is False                        # nothing new


def test_driver_event_from_the_next_lap(guest: Guest) -> None:
    driver = PackedDriver(guest, 4)
    vq = device_queue(guest, driver, features(packed=True, event_idx=True))
    for _ in range(3):
        driver.add([b"x"])
        vq.push_chain(vq.pop_chain(), 0)
    driver.get_used()
    driver.set_driver_event(1 | 0 << 15, 2)                   # slot 1 of the next lap (counter 0)
    assert vq.notify_needed() is False                        # used 0 -> 3 on lap 1
    driver.add([b"y"])
    driver.add([b"z"])
    vq.push_chains([(vq.pop_chain(), 0), (vq.pop_chain(), 0)])    # 3 -> 1 on lap 0: passes slot 0 only
    assert vq.notify_needed() is False
    driver.add([b"w"])
    vq.push_chain(vq.pop_chain(), 0)                          # 1 -> 2: passes slot 1 of lap 0
    assert vq.notify_needed() is True


def test_device_event_suppression(guest: Guest) -> None:
    driver = PackedDriver(guest, 4)
    vq = device_queue(guest, driver, features(packed=True, event_idx=True))
    driver.add([b"a"])
    vq.pop_chain()
    assert vq.pop_chain() is None
    assert driver.device_event_state() == (1 | 1 << 15, 2)    # DESC: kick at slot 1, counter 1
    vq.disable_notifications()
    assert driver.device_event_state()[1] == 1                # DISABLE
    driver.add([b"b"])
    assert vq.enable_notifications() is True                  # the buffer is already there
    assert driver.device_event_state() == (1 | 1 << 15, 2)
    plain = PackedDriver(guest, 4)
    flags_only = device_queue(guest, plain, PACKED)
    flags_only.disable_notifications()
    assert plain.device_event_state()[1] == 1
    assert flags_only.enable_notifications() is False
    assert plain.device_event_state()[1] == 0                 # ENABLE


def test_resume_exactly_at_the_saved_indices_and_counters(guest: Guest) -> None:
    driver = PackedDriver(guest, 4)
    source = device_queue(guest, driver, PACKED)
    for _ in range(3):
        driver.add([b"."])
        source.push_chain(source.pop_chain(), 0)
    driver.get_used()
    ids = [driver.add([bytes([i])]) for i in range(3)]       # slots 3, 0, 1 (the second lap)
    taken = [source.pop_chain() for _ in range(2)]
    source.push_chain(taken[0], 0)
    state = source.get_state()
    assert state == {"last_avail_idx": 1, "last_avail_counter": 0, "last_used_idx": 0, "last_used_counter": 0}
    dest = device_queue(guest, driver, PACKED, ready=False)
    dest.set_state(**state)
    dest.set_ready(True)
    assert dest.get_state() == state
    assert dest.inflight() == 1                                # slot 0: taken, not returned
    assert dest.rewind_inflight() == 1
    again = [dest.pop_chain(), dest.pop_chain()]
    assert [c.head for c in again] == ids[1:]
    assert dest.pop_chain() is None
    dest.push_chains([(c, 0) for c in again])
    assert [i for i, _ in driver.get_used()] == ids


@pytest.mark.parametrize("state", [
    {"last_avail_idx": 0x8000}, {"last_avail_idx": 0, "last_avail_counter": 2},
    {"last_avail_idx": 4}, {"last_avail_idx": 0, "last_used_idx": 4},
])
def test_packed_state_out_of_range_is_einval(guest: Guest, state: dict) -> None:
    driver = PackedDriver(guest, 4)
    vq = device_queue(guest, driver, PACKED, ready=False)
    with pytest.raises(OSError) as bad:
        vq.set_state(**state)
    assert bad.value.errno == errno.EINVAL
    assert vq.get_state()["last_avail_idx"] == 0


def test_pop_after_broken_keeps_failing(guest: Guest) -> None:
    driver = PackedDriver(guest, 2)
    vq = device_queue(guest, driver, PACKED)
    driver.write_desc(0, guest.iova(0), 1, 0, AVAIL | 1)     # NEXT ...
    driver.write_desc(1, guest.iova(0), 1, 0, AVAIL | 1)     # ... NEXT again: 3 slots on a ring of 2
    with pytest.raises(VirtQueueError) as first:
        vq.pop_chain()
    with pytest.raises(VirtQueueError) as second:
        vq.pop_chain()
    assert first.value.code == second.value.code == vq.broken < 0


@settings(max_examples=40)
@given(num=st.integers(1, 9),
       chains=st.lists(st.tuples(st.lists(st.binary(max_size=24), max_size=2),
                                 st.lists(st.integers(0, 24), max_size=2), st.booleans()),
                       min_size=1, max_size=20),
       batch=st.integers(1, 3))
def test_any_sequence_of_chains_round_trips(num: int, chains: list, batch: int) -> None:
    guest = Guest(1 << 18)
    try:
        driver = PackedDriver(guest, num)
        vq = device_queue(guest, driver, features(packed=True, indirect=True))
        pending = []
        for r, w, ind in chains:
            r = (r or ([] if w else [b"z"]))[:num]          # at most num descriptors per chain
            pending.append((r, w[:num - len(r)], ind))
        while pending:
            group, room = [], num
            while pending and len(group) < batch:
                r, w, ind = pending[0]
                slots = 1 if ind else len(r) + len(w)
                if slots > room:
                    break
                group.append(pending.pop(0))
                room -= slots
            ids = [driver.add(r, w, indirect=ind) for r, w, ind in group]
            done = []
            for buffer_id, (readable, writable, _) in zip(ids, group, strict=True):
                chain = vq.pop_chain()
                assert chain.head == buffer_id
                assert vq.read_chain(chain) == b"".join(readable)
                reply = bytes((buffer_id * 7 + i) & 0xFF for i in range(sum(writable)))
                assert vq.write_chain(chain, 0, reply) == len(reply)
                done.append((chain, len(reply)))
            assert vq.pop_chain() is None
            vq.push_chains(done)
            used = driver.get_used()
            assert used == [(c.head, n) for c, n in done]
            for chain, n in done:
                assert driver.written(chain.head)[:n] == bytes((chain.head * 7 + i) & 0xFF for i in range(n))
        state = vq.get_state()
        assert (state["last_avail_idx"], state["last_avail_counter"]) == (driver.next_avail, driver.avail_wrap)
        assert (state["last_used_idx"], state["last_used_counter"]) == (driver.next_used, driver.used_wrap)
    finally:
        guest.close()
