"""Kicks from several threads while another thread issues ioctls: nothing crashes, hangs or leaks a write.

The reference devices run their datapath inside parent calls, under the binding's lock, and sim-blk's
loop releases the GIL (``with nogil`` in blk_datapath.pyx). This stress test drives one device (sim-net
loopback frames with sequence numbers and CRCs, or sim-blk writes with a per-request sector pattern)
from three threads at once:

- the *driver* posts buffers and kicks through the kick eventfds (serviced by the front's kick thread);
- the *kicker* rings the doorbell directly (``VhostVdpa.kick``) as fast as it can;
- the *controller* runs a fixed script of ioctls: SUSPEND / GET_VRING_BASE / RESUME, an IOTLB
  INVALIDATE and re-UPDATE of the buffer area, GET_VRING_BASE while running, and a reset (SET_STATUS 0)
  with a full bring-up again (also whenever the device asked for one, e.g. after a kick met the
  buffer area unmapped).

What must hold: every thread ends (a join that times out fails, naming the thread that hung, with its
stack); the front's kick thread met no error; every completion is exact (frame CRC and order, disk
sector pattern and status); buffers never completed are untouched; every byte of guest memory outside
what the driver allocated is still the canary; and the device serves traffic normally afterwards.
The run is bounded by operation counts, never by time.
"""

from __future__ import annotations

import errno
import inspect
import os
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from vdpacert.impl.parent import parent_lock
from vdpacert.impl.sim_blk import SimBlk
from vdpacert.impl.sim_device import SimDevice
from vdpacert.impl.sim_net import SimNet
from vdpacert.impl.vhost_vdpa import VhostVdpa
from vdpacert.uapi import vhost_types as T  # noqa: N812
from vdpacert.uapi import virtio_blk as B  # noqa: N812
from vdpacert.uapi.virtio_config import VIRTIO_CONFIG_S_NEEDS_RESET

try:
    from .ring_driver import CANARY, Guest, PackedDriver, SplitDriver
    from .test_sim_blk import ring_features, sectors
    from .test_sim_net import ACK_DRIVER, DRIVER_OK, FEATURES_OK, HDR_LEN, RX_BUF, frame_seq, make_frame, net_features
except ImportError:
    from ring_driver import CANARY, Guest, PackedDriver, SplitDriver
    from test_sim_blk import ring_features, sectors
    from test_sim_net import ACK_DRIVER, DRIVER_OK, FEATURES_OK, HDR_LEN, RX_BUF, frame_seq, make_frame, net_features

Driver = SplitDriver | PackedDriver

RING_AREA = 64 << 10          # rings live here, mapped by their own IOTLB entry
GUEST_SIZE = 16 << 20
GUARD = 32                    # canary bytes left between two allocations
NUM = 32
CYCLES = 24                   # controller script repetitions
MAX_WORK = 1200               # frames / requests the driver submits at most
CAPACITY = 2048               # blk sectors: one per request, never reused
JOIN_TIMEOUT = 120.0          # a thread still alive after this has hung (never reached by a healthy run)
BACKEND = ((1 << T.VHOST_BACKEND_F_IOTLB_MSG_V2) | (1 << T.VHOST_BACKEND_F_SUSPEND)
           | (1 << T.VHOST_BACKEND_F_RESUME) | (1 << T.VHOST_BACKEND_F_IOTLB_PERSIST))


class GuardedGuest(Guest):
    """A Guest that records what the driver allocated and leaves canary guards between allocations."""

    def __init__(self) -> None:
        self.allocated: list[tuple[int, int]] = []
        super().__init__(GUEST_SIZE)

    def alloc(self, size: int, align: int = 16, *, zero: bool = True) -> int:
        super().alloc(GUARD, 1, zero=False)  # not recorded: must stay canary
        offset = super().alloc(size, align, zero=zero)
        self.allocated.append((offset, size))
        return offset

    def stray_writes(self) -> list[int]:
        """Offsets outside every allocation whose byte is no longer the canary."""
        data = self.snapshot()
        spans = sorted(self.allocated)
        bad, cursor = [], 0
        for offset, size in [*spans, (len(data), 0)]:
            gap = data[cursor:offset]
            if gap.count(CANARY) != len(gap):
                bad.extend(cursor + i for i, byte in enumerate(gap) if byte != CANARY)
            cursor = max(cursor, offset + size)
        return bad


def restart(driver: Driver) -> None:
    """Zero the driver's rings and forget every chain: the state a freshly reset device expects."""
    mem, num = driver.guest.mem, driver.num
    if isinstance(driver, SplitDriver):
        mem.fill(driver.desc, 16 * num, 0)
        mem.fill(driver.avail, 6 + 2 * num, 0)
        mem.fill(driver.used, 6 + 8 * num, 0)
        driver.free, driver.avail_idx, driver.last_used = list(range(num)), 0, 0
        driver.chains.clear()
    else:
        mem.fill(driver.desc, 16 * num, 0)
        mem.fill(driver.driver_event, 4, 0)
        mem.fill(driver.device_event, 4, 0)
        driver.next_avail = driver.next_used = driver.next_id = 0
        driver.avail_wrap = driver.used_wrap = 1
        driver.slots.clear()
        driver.pending_head = None
    driver.buffers.clear()


@dataclass
class Counts:
    submitted: int = 0
    completed: int = 0
    eventfd_kicks: int = 0
    direct_kicks: int = 0
    ioctls: dict[str, int] = field(default_factory=dict)

    def op(self, name: str) -> None:
        self.ioctls[name] = self.ioctls.get(name, 0) + 1


class Session:
    """One device behind a VhostVdpa, its rings, and the driver-side bookkeeping of work in flight.

    ``ring_lock`` guards the driver's ring state (the driver thread adds and reaps under it; the
    controller holds it across a reset and bring-up, which rewrite the rings).
    """

    def __init__(self, kind: str, packed: bool) -> None:
        self.kind, self.packed = kind, packed
        self.guest = GuardedGuest()
        self.dev: SimDevice = SimNet("stress-net") if kind == "net" else SimBlk("stress-blk", capacity=CAPACITY)
        self.front = VhostVdpa(self.dev, self.guest.registry)
        self.features = net_features(packed, ctrl=False) if kind == "net" else ring_features(packed)
        self.nq = 2 if kind == "net" else 1
        self.per_chain = [1, 2] if kind == "net" else [3]      # descriptors per chain, by queue
        self.drivers: list[Driver] = [PackedDriver(self.guest, NUM) if packed else SplitDriver(self.guest, NUM)
                                      for _ in range(self.nq)]
        assert self.guest._next <= RING_AREA
        self.guest._next = RING_AREA
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2 * self.nq)]
        self.kicks, self.calls = self.fds[:self.nq], self.fds[self.nq:]
        self.ring_lock = threading.Lock()
        self.counts = Counts()
        self.inflight: list[dict[int, int]] = [{} for _ in range(self.nq)]  # chain id -> seq (or -1: RX)
        self.last_seq = -1
        self.seq = 0
        self.max_work = MAX_WORK
        self.done: list[int] = []
        self.epoch_bases: dict[int, int] = {}
        front = self.front
        front.set_owner()
        front.set_backend_features(BACKEND)
        front.iotlb_update(self.guest.iova_base, RING_AREA, self.guest.mem.uaddr)
        self.map_buffers()
        self.bring_up()
        front.start_kick_thread()

    # ----- control path ------------------------------------------------------------------------

    def map_buffers(self) -> None:
        g = self.guest
        self.front.iotlb_update(g.iova(RING_AREA), g.size - RING_AREA, g.mem.uaddr + RING_AREA)

    def bring_up(self) -> None:
        front = self.front
        front.set_status(ACK_DRIVER)
        front.set_features(self.features)
        front.set_status(FEATURES_OK)
        for index, driver in enumerate(self.drivers):
            front.set_vring_num(index, NUM)
            front.set_vring_base(index, 0x8000_8000 if self.packed else 0)
            front.set_vring_addr(index, *driver.addresses)
            front.set_vring_call(index, self.calls[index])
            front.set_vring_kick(index, self.kicks[index])
            front.set_vring_enable(index, True)
        front.set_status(DRIVER_OK)
        assert front.get_status() == DRIVER_OK, self.dev.last_error

    def reset_and_bring_up(self) -> None:
        """SET_STATUS 0, settle what completed before it, forget the rest, bring the device up again."""
        with self.ring_lock:
            self.front.set_status(0)
            self.reap()
            for index, driver in enumerate(self.drivers):
                self.forget_inflight(index, driver)
                restart(driver)
            self.epoch_bases.clear()
            self.bring_up()

    def check_bases(self) -> None:
        """GET_VRING_BASE of every queue: within one device lifetime a split base only moves forward
        and never passes what the driver made available."""
        with self.ring_lock:
            for index, driver in enumerate(self.drivers):
                base = self.front.get_vring_base(index)
                if isinstance(driver, SplitDriver):
                    assert base <= driver.avail_idx, (index, base, driver.avail_idx)
                    assert base >= self.epoch_bases.get(index, 0), (index, base, self.epoch_bases)
                    self.epoch_bases[index] = base
                else:
                    assert 0 <= base <= 0xFFFF_FFFF

    # ----- driver side ---------------------------------------------------------------------------

    def room(self, index: int) -> int:
        return NUM // self.per_chain[index] - len(self.inflight[index])

    def submit(self) -> bool:
        """Post up to four pieces of work (under ring_lock); False once ``max_work`` were submitted."""
        if self.seq >= self.max_work:
            return False
        for _ in range(4):
            if self.seq >= self.max_work:
                break
            if self.kind == "net":
                if self.room(0) < 1 or self.room(1) < 1:
                    break
                self.inflight[0][self.drivers[0].add([], [RX_BUF])] = -1
                frame = make_frame(self.seq, 64 + 37 * (self.seq % 20))
                self.inflight[1][self.drivers[1].add([bytes(HDR_LEN), frame], [])] = self.seq
            else:
                if self.room(0) < 1:
                    break
                out = struct.pack("<IIQ", B.VIRTIO_BLK_T_OUT, 0, self.seq)
                self.inflight[0][self.drivers[0].add([out, sectors(1, self.seq)], [1])] = self.seq
            self.seq += 1
            self.counts.submitted += 1
        return True

    def reap(self) -> None:
        """Check every completion the device published (under ring_lock)."""
        if self.kind == "net":
            rx, tx = self.drivers
            for head, length in rx.get_used():
                data = rx.written(head)
                assert data[length:].count(CANARY) == len(data) - length, "RX bytes written past the used length"
                frame = data[HDR_LEN:length]
                seq = frame_seq(frame)
                assert frame == make_frame(seq, len(frame)) and seq > self.last_seq, (seq, self.last_seq)
                self.last_seq = seq
                self.done.append(seq)
                del self.inflight[0][head]
                rx.buffers.pop(head, None)
                self.counts.completed += 1
            for head, length in tx.get_used():
                assert length == 0
                del self.inflight[1][head]
                tx.buffers.pop(head, None)
        else:
            driver = self.drivers[0]
            disk = self.dev.disk  # type: ignore[attr-defined]
            for head, length in driver.get_used():
                seq = self.inflight[0].pop(head)
                assert (length, driver.written(head)) == (1, bytes([B.VIRTIO_BLK_S_OK])), seq
                assert disk.read(seq, 512) == sectors(1, seq), seq
                driver.buffers.pop(head, None)
                self.done.append(seq)
                self.counts.completed += 1

    def forget_inflight(self, index: int, driver: Driver) -> None:
        """Work lost to a reset: its device-writable bytes must be untouched."""
        for chain_id in self.inflight[index]:
            for offset, length in driver.buffers[chain_id].writable:
                assert self.guest.mem.read(offset, length) == bytes([CANARY]) * length, "write into unused buffer"
        self.inflight[index].clear()

    def close(self) -> None:
        self.front.close()
        for fd in self.fds:
            os.close(fd)
        self.guest.close()


def run_threads(targets: dict[str, Callable[[], None]], stop: threading.Event) -> None:
    """Run each target in a thread; re-raise the first failure; a thread that does not end has hung."""
    errors: list[tuple[str, BaseException]] = []

    def guarded(name: str, target: Callable[[], None]) -> Callable[[], None]:
        def body() -> None:
            try:
                target()
            except BaseException as error:  # reported below, with the thread's name
                errors.append((name, error))
                stop.set()
        return body

    threads = [threading.Thread(target=guarded(name, fn), name=f"stress-{name}", daemon=True)
               for name, fn in targets.items()]
    for thread in threads:
        thread.start()
    hung = []
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
        if thread.is_alive():
            stop.set()
            hung.append(thread)
    if hung:
        frames = sys._current_frames()
        stacks = {t.name: "".join(traceback.format_stack(frames[t.ident])) for t in hung if t.ident in frames}
        pytest.fail(f"hung threads (deadlock?): {[t.name for t in hung]}\n{stacks}")
    if errors:
        name, error = errors[0]
        raise AssertionError(f"thread {name} failed: {error!r}") from error


def stress(session: Session) -> None:
    stop = threading.Event()
    front, counts = session.front, session.counts

    def driver() -> None:
        while not stop.is_set():
            with session.ring_lock:
                session.reap()
                more = session.submit()
            for fd in session.kicks:
                os.eventfd_write(fd, 1)
                counts.eventfd_kicks += 1
            if not more and not any(session.inflight):
                return

    def kicker() -> None:
        index = 0
        while not stop.is_set():
            front.kick(index % session.nq)
            counts.direct_kicks += 1
            index += 1

    def controller() -> None:
        try:
            for cycle in range(CYCLES):
                front.suspend()
                counts.op("SUSPEND")
                session.check_bases()
                counts.op("GET_VRING_BASE(suspended)")
                front.resume()
                counts.op("RESUME")
                front.iotlb_invalidate(session.guest.iova(RING_AREA), session.guest.size - RING_AREA)
                session.map_buffers()
                counts.op("IOTLB INVALIDATE+UPDATE")
                session.check_bases()
                counts.op("GET_VRING_BASE(running)")
                needed = bool(front.get_status() & VIRTIO_CONFIG_S_NEEDS_RESET)
                if cycle % 4 == 3 or needed:
                    session.reset_and_bring_up()
                    counts.op("reset+bring-up (NEEDS_RESET)" if needed else "reset+bring-up (scheduled)")
        finally:
            stop.set()

    run_threads({"driver": driver, "kicker": kicker, "controller": controller}, stop)


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def packed(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture(params=["net", "blk"])
def session(request: pytest.FixtureRequest, packed: bool) -> Iterator[Session]:
    s = Session(str(request.param), packed)
    yield s
    s.close()


def test_kicks_race_ioctls_safely(session: Session) -> None:
    stress(session)
    front = session.front
    assert front.kick_errors == []
    # Settle: a last reset so nothing is in flight, then normal service must work.
    session.reset_and_bring_up()
    assert session.guest.stray_writes() == [], "the device wrote outside the driver's allocations"
    with session.ring_lock:
        before = session.counts.completed
        session.max_work = session.seq + 4
        session.submit()
    for index in range(session.nq):
        front.kick(index)
    with session.ring_lock:
        session.reap()
        assert session.counts.completed - before == 4 and not any(session.inflight)
    assert len(set(session.done)) == len(session.done)
    counts = session.counts
    print(f"\n{session.kind} {'packed' if session.packed else 'split'}: submitted {counts.submitted}, "
          f"completed {counts.completed}, eventfd kicks {counts.eventfd_kicks}, direct kicks {counts.direct_kicks}, "
          f"ioctl ops {counts.ioctls}")
    assert counts.completed > 0


class CountingBlk(SimBlk):
    """sim-blk that counts the doorbells it receives (a real device; only the count is added)."""

    kicks_after_close = 0
    closed = False

    def kick_vq(self, index: int) -> None:
        if self.closed:
            CountingBlk.kicks_after_close += 1
        super().kick_vq(index)


def test_a_kick_waiting_on_the_lock_does_not_reach_a_released_parent() -> None:
    """Regression (race found by this suite): VhostVdpa.kick checked ``closed`` only before taking the
    binding lock. A kick blocked on the lock while close() ran then called kick_vq on a parent already
    released (and possibly bound to a new front with a new lock). The kick must fail with EBADF instead."""
    guest = Guest(1 << 20)
    dev = CountingBlk("race-blk", capacity=8)
    front = VhostVdpa(dev, guest.registry)
    lock = parent_lock(dev)
    outcome: list[BaseException | None] = []

    def late_kick() -> None:
        try:
            front.kick(0)
            outcome.append(None)
        except OSError as error:
            outcome.append(error)

    thread = threading.Thread(target=late_kick, name="late-kick", daemon=True)
    try:
        with lock:
            thread.start()
            # Wait (bounded by iterations) until the thread is parked on the binding lock inside kick().
            lines, first = inspect.getsourcelines(VhostVdpa.kick)
            waiting_line = first + next(i for i, line in enumerate(lines) if "with self._lock" in line)
            for _ in range(1_000_000):
                frame = sys._current_frames().get(thread.ident or -1)
                if frame is not None and frame.f_code is VhostVdpa.kick.__code__ and frame.f_lineno == waiting_line:
                    break
                time.sleep(0)
            else:
                pytest.fail("the kicking thread never reached the binding lock")
            front.close()  # re-entrant: this thread holds the lock
            dev.closed = True
        thread.join(JOIN_TIMEOUT)
        assert not thread.is_alive(), "late-kick hung"
        assert CountingBlk.kicks_after_close == 0, "a kick reached the parent after close()"
        assert len(outcome) == 1 and isinstance(outcome[0], OSError) and outcome[0].errno == errno.EBADF
    finally:
        front.close()
        guest.close()
