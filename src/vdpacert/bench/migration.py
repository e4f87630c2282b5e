"""``vdpacert bench migration``: what dirty tracking costs the datapath, and how fast a log sync scans.

Three figures of issue 5, each measured against a baseline taken in the same run:

1. **Dirty log on vs off.** One guest (:class:`~vdpacert.migration.guest.Guest`: guest memory, the
   conformance suite's driver, a :class:`~vdpacert.migration.workload.Workload`) on a DEVICE_LOG-mode
   :class:`~vdpacert.migration.vmm.Vmm`, whose rings carry VHOST_VRING_F_LOG. "On" is that guest with a
   :class:`~vdpacert.migration.dirty.DeviceLogTracker` started (SET_LOG_BASE, SET_LOG_FD, VHOST_F_LOG_ALL
   switched on the running device, the log covering :attr:`Vmm.log_span`); "off" ("direct") is the same
   guest with it stopped.
2. **Shadow vs direct.** The same workload on a second guest whose Vmm is in SHADOW mode (every queue
   through a :class:`~vdpacert.migration.svq.ShadowVirtqueue`, a
   :class:`~vdpacert.migration.dirty.ShadowDirtySink` active), against "direct" above.
3. **Log-sync scan rate** (:func:`scan_rate`): one sync of a 1 TiB guest's 32 MiB log at 1 % dirty.

Figures 1 and 2 run on sim-net (64-byte and 1500-byte frames, TX looped back to RX) and sim-blk (4 KiB
writes, each batch also reading back the previous batch's sectors), split and packed. The unit of work
is an *operation*: a frame, or a blk write. Work is done in slices of :data:`SYNC_EVERY` operations and
after every slice the mode's dirty source is synced into a bitmap, as a migration does once per
iteration: the device log really is being taken (and cleared), and the shadow sink drained. The syncs
run between the timed slices (a VMM syncs from its own thread; here there is one), so the rates are of
the datapath alone. The three modes take turns in :data:`BLOCKS` blocks, in a rotating order, so a
slow spell on this shared machine falls on all of them alike, after one untimed warm-up slice each and
with the cyclic garbage collector paused (:func:`_no_gc_pauses`).

The guest's driver is Python (the conformance :class:`~vdpacert.conformance.driver.device.DriverSession`,
which parses and checks every frame and sector), so absolute rates are bound by Python, not by the
device: the **ratios** are the figures that matter. Every row carries its evidence: the pages each
sync took (log on: some; log off: none; shadow: some), the queues that really ran shadowed, and whether
the device's GET_VRING_BASE is the guest ring's position (direct) or the shadow ring's (the guest
rings start at :data:`START_INDEX`, a shadow ring at 0, so the two tell apart). Every frame and sector
is verified after the run (no loss, no duplicate, the disk as written): a fast run that lost work
would be a lie.

Scan rate: one *sync* is what the pre-copy orchestrator does per iteration with a device log:
:meth:`~vdpacert.migration.bitmap.DirtyBitmap.merge_from_log` takes the log (atomically clearing it)
into the migration's bitmap, then :meth:`~vdpacert.migration.bitmap.DirtyBitmap.take` lists the dirty
pages and clears the bitmap for the next round. The log holds random pages drawn with a fixed seed,
rewritten before every timed round (untimed), and the best of ``rounds`` is kept: the machine is
shared, and the best round is the one least disturbed by other work. Its baseline, measured in the
same run, is ``memcpy`` of the same bytes in C: the time merely reading and writing that much memory
takes here, so ``memcpy_ratio`` says how many plain copies of the bitmap one sync costs, whatever the
machine.
"""

from __future__ import annotations

import contextlib
import gc
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from vdpacert.conformance.driver import DeviceViolation
from vdpacert.conformance.driver.packed import PackedRing
from vdpacert.conformance.driver.split import SplitRing
from vdpacert.conformance.targets.base import Target, make_target
from vdpacert.impl.guestmem import GuestMemory
from vdpacert.migration.bitmap import PAGE_SIZE, DirtyBitmap
from vdpacert.migration.dirty import DeviceLogTracker, ShadowDirtySink
from vdpacert.migration.guest import Guest, GuestConfig
from vdpacert.migration.vmm import DirtyMode, Vmm
from vdpacert.migration.workload import Workload, WorkloadConfig, WorkloadError
from vdpacert.model.ring_index import PackedVqState, encode_packed_base

from . import _memcpy, pyloop

__all__ = ["CASES", "DATAPATH_HEADER", "SCAN_HEADER", "Case", "DatapathRow", "ScanRate", "measure_case",
           "run_datapath", "scan_rate"]

GIB = 1 << 30
#: The issue's figure: a 1 TiB guest.
DEFAULT_GUEST = 1 << 40

#: Operations (frames or blk writes) per timed slice; the mode's dirty source is synced after each.
SYNC_EVERY = 256
#: Blocks the measuring time of each mode is split into; the modes take turns, block by block, in an order
#: rotated every block (a multiple of 3: each mode is first, second and third equally often).
BLOCKS = 6
#: Guest memory of each benchmark guest: room for every buffer of a batch, and a log of a few bytes.
GUEST_MEMORY = 16 << 20
QUEUE_SIZE = 256
#: Where every guest ring starts. A shadow ring always starts at 0, so a device whose GET_VRING_BASE
#: is not the guest ring's position is running a shadow ring: the evidence a shadow row carries.
START_INDEX = 100
#: The sim-blk disk: 16 MiB is plenty for random 4 KiB writes, and two devices per case stay small.
BLK_SECTORS = 1 << 15
MODES = ("direct", "log", "shadow")


# ---------------------------------------------------------------------------------------------
# Figures 1 and 2: the datapath with dirty tracking.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One workload: a device and what one operation on it is."""

    name: str
    target: str
    unit: str  # what an operation is: "frames" or "writes"
    frame_bytes: int = 0
    write_sectors: int = 0

    def workload(self) -> WorkloadConfig:
        # Rates are per simulated second (Workload.run): one run(1.0) is exactly one slice of SYNC_EVERY.
        if self.frame_bytes:
            return WorkloadConfig(net_frames_per_s=SYNC_EVERY, frame_bytes=self.frame_bytes)
        return WorkloadConfig(blk_writes_per_s=SYNC_EVERY, blk_write_sectors=self.write_sectors)


CASES = (
    Case("net-64B", "sim-net", "frames", frame_bytes=64),
    Case("net-1500B", "sim-net", "frames", frame_bytes=1500),
    Case("blk-4KiB", f"sim-blk:capacity={BLK_SECTORS}", "writes", write_sectors=4096 // 512),
)


@dataclass(frozen=True)
class DatapathRow:
    """One workload and ring layout: operations and timed seconds of each mode, and the evidence of each mode."""

    workload: str
    ring: str
    unit: str
    sync_every: int
    direct_ops: int
    direct_s: float
    log_ops: int
    log_s: float
    shadow_ops: int
    shadow_s: float
    direct_log_pages: int  # pages the device log held over all "off" syncs: 0 when logging is really off
    log_pages: int  # pages the device log syncs took with logging on
    shadow_pages: int  # pages the shadow sink syncs took
    data_queues: int
    direct_shadowed: int  # data queues running through a shadow virtqueue on the direct guest's Vmm
    shadow_shadowed: int  # ... and on the shadow guest's
    direct_device_base_is_guest: bool  # the device's GET_VRING_BASE is the guest ring's position, every data queue
    shadow_device_base_is_guest: bool

    @property
    def direct_per_s(self) -> float:
        return self.direct_ops / self.direct_s

    @property
    def log_per_s(self) -> float:
        return self.log_ops / self.log_s

    @property
    def shadow_per_s(self) -> float:
        return self.shadow_ops / self.shadow_s

    @property
    def log_ratio(self) -> float:
        """Log on over log off: 1 means logging costs the datapath nothing."""
        return self.log_per_s / self.direct_per_s

    @property
    def shadow_ratio(self) -> float:
        """Shadow virtqueues over direct: 1 means the VMM in the path costs nothing."""
        return self.shadow_per_s / self.direct_per_s

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "direct_per_s": self.direct_per_s, "log_per_s": self.log_per_s,
                "shadow_per_s": self.shadow_per_s, "log_ratio": self.log_ratio, "shadow_ratio": self.shadow_ratio}

    def row(self) -> str:
        """One line for a table (see :data:`DATAPATH_HEADER`)."""
        syncs = self.log_ops // self.sync_every, self.shadow_ops // self.sync_every
        return (f"{self.workload:<10} {self.ring:<6} {self.unit:<6} {self.direct_per_s:>10,.0f} "
                f"{self.log_per_s:>10,.0f} {self.log_ratio:>7.3f} {self.shadow_per_s:>10,.0f} "
                f"{self.shadow_ratio:>7.3f} {self.log_pages / syncs[0]:>11.1f} {self.shadow_pages / syncs[1]:>11.1f}")


DATAPATH_HEADER = (f"{'workload':<10} {'ring':<6} {'unit':<6} {'direct/s':>10} {'log on/s':>10} {'on/off':>7} "
                   f"{'shadow/s':>10} {'shd/dir':>7} {'log pg/sync':>11} {'svq pg/sync':>11}")


@dataclass
class _Tally:
    ops: int = 0
    seconds: float = 0.0
    pages: int = 0


def _driver_base(ring: SplitRing | PackedRing) -> int:
    """Where the guest's driver has got to in ``ring``, as a vring base (nothing is in flight after a slice)."""
    if isinstance(ring, PackedRing):
        return encode_packed_base(PackedVqState(ring.next_avail, ring.avail_wrap, ring.next_used, ring.used_wrap))
    return ring.avail_idx


class _Rig:
    """One guest, its device, its Vmm in ``mode``, and the dirty source a migration would sync in that mode."""

    def __init__(self, case: Case, packed: bool, mode: DirtyMode) -> None:
        self._stack = contextlib.ExitStack()
        try:
            target: Target = self._stack.enter_context(make_target(case.target))
            self.target = target
            memory = target.new_memory(GUEST_MEMORY, gpa=0)
            config = GuestConfig(packed=packed, queue_size=QUEUE_SIZE, start_index=START_INDEX)
            self.guest = Guest(memory, lambda layout: Vmm(target, layout, mode=mode), config)
            self._stack.callback(self.guest.close)
            self.guest.bring_up()
            self.workload = Workload(self.guest, case.workload())
            self.bitmap = DirtyBitmap(GUEST_MEMORY // PAGE_SIZE)
            vmm = self.guest.vmm
            self.log: DeviceLogTracker | None = None
            self.sink: ShadowDirtySink | None = None
            if mode is DirtyMode.DEVICE_LOG:
                self.log = DeviceLogTracker(target, vmm.log_span, acked_features=vmm.features)
                self._stack.callback(self.log.stop)
            else:
                self.sink = ShadowDirtySink(GUEST_MEMORY)
                self.sink.start()
                vmm.set_shadow_dirty(self.sink)
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> _Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _done(self) -> int:
        stats = self.workload.stats
        return stats.frames if self.workload.is_net else stats.blk_writes

    def timed_slice(self) -> float:
        """SYNC_EVERY operations through the guest's driver; the seconds they took."""
        before = self._done()
        start = time.perf_counter()
        self.workload.run(1.0)
        spent = time.perf_counter() - start
        if self._done() - before != SYNC_EVERY:
            raise RuntimeError(f"a slice did {self._done() - before} operations, not {SYNC_EVERY}")
        self._renew_streams()
        return spent

    def _renew_streams(self) -> None:
        """Check the slice's frames (each back once, in order), then start the streams afresh.

        A stream's cost per received frame grows with the frames it has seen (its reorder check looks at
        all of them), so a guest that had run longer would be slower per frame: the log-on/off guest runs
        twice as long as the shadow guest, and the ratio would lean on that. Nothing is in flight after a
        slice, so sequence numbers may start over.
        """
        for pair, stream in self.workload.streams.items():
            try:
                stream.check(in_order=True, complete=True)
            except DeviceViolation as error:
                raise WorkloadError(f"pair {pair}: {error.message}") from error
        self.workload.streams.clear()

    def logging(self, on: bool) -> None:
        assert self.log is not None
        if on:
            self.log.start()
        else:
            self.log.stop()

    def sync(self) -> int:
        """What a migration's iteration does with this mode's dirty source: take it; the pages it held."""
        source = self.log if self.log is not None else self.sink
        assert source is not None
        pages = source.sync(self.bitmap)
        self.bitmap.clear()
        return pages

    def data_queues(self) -> list[int]:
        return [q for q in self.guest.queues if q != self.guest.ctrl_queue]

    def shadowed(self) -> int:
        """Data queues that really run through a shadow virtqueue (the net controlq always does)."""
        return len({shadow.index for shadow in self.guest.vmm.shadows()} & set(self.data_queues()))

    def device_base_is_guest(self) -> bool:
        rings = self.guest.session.rings
        return all(self.target.client.get_vring_base(q) == _driver_base(rings[q]) for q in self.data_queues())

    def verify(self) -> None:
        """Every frame back exactly once and in order, the disk reads back as written (WorkloadError if not)."""
        self.workload.drain()
        self.workload.verify()


@contextlib.contextmanager
def _no_gc_pauses() -> Iterator[None]:
    """Collect now, then keep the cyclic garbage collector out of the timed slices (as :mod:`timeit` does).

    A collection lands on whichever slice is running and costs in proportion to everything alive: with
    it on, two runs of the *same* mode differed by up to 6 % here; with it paused, by about 1 %.
    """
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _take_turns(direct: _Rig, shadow: _Rig, seconds: float) -> dict[str, _Tally]:
    for rig in (direct, shadow):  # untimed: the first frames of a guest pay for its allocator's first growth
        rig.timed_slice()
        rig.sync()
    tally = {mode: _Tally() for mode in MODES}
    for block in range(BLOCKS):
        goal = seconds * (block + 1) / BLOCKS
        turn = block % len(MODES)
        for mode in MODES[turn:] + MODES[:turn]:
            rig = shadow if mode == "shadow" else direct
            if rig is direct:
                direct.logging(mode == "log")
            counts = tally[mode]
            while True:
                counts.seconds += rig.timed_slice()
                counts.ops += SYNC_EVERY
                counts.pages += rig.sync()
                if counts.seconds >= goal:
                    break
    direct.logging(False)
    return tally


def measure_case(case: Case, packed: bool, seconds: float) -> DatapathRow:
    """Figures 1 and 2 for one workload and ring layout, each mode timed for at least ``seconds``."""
    if not seconds > 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    with _Rig(case, packed, DirtyMode.DEVICE_LOG) as direct, _Rig(case, packed, DirtyMode.SHADOW) as shadow:
        with _no_gc_pauses():
            tally = _take_turns(direct, shadow, seconds)
        row = DatapathRow(
            case.name, "packed" if packed else "split", case.unit, SYNC_EVERY,
            tally["direct"].ops, tally["direct"].seconds, tally["log"].ops, tally["log"].seconds,
            tally["shadow"].ops, tally["shadow"].seconds,
            direct_log_pages=tally["direct"].pages, log_pages=tally["log"].pages, shadow_pages=tally["shadow"].pages,
            data_queues=len(direct.data_queues()), direct_shadowed=direct.shadowed(),
            shadow_shadowed=shadow.shadowed(), direct_device_base_is_guest=direct.device_base_is_guest(),
            shadow_device_base_is_guest=shadow.device_base_is_guest())
        direct.verify()
        shadow.verify()
    return row


def run_datapath(seconds: float = 0.5, *, cases: tuple[Case, ...] = CASES,
                 progress: Callable[[str], None] | None = None) -> Iterator[DatapathRow]:
    """:func:`measure_case` for every case, split then packed, one row as each is measured."""
    for case in cases:
        for packed in (False, True):
            if progress:
                progress(f"{case.name} {'packed' if packed else 'split'}: direct, log on, shadow")
            yield measure_case(case, packed, seconds)


# ---------------------------------------------------------------------------------------------
# Figure 3: the log-sync scan rate.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScanRate:
    """One log-sync measurement: the guest and log sizes, the dirty pages, and the best round's times."""

    guest_bytes: int
    log_bytes: int
    dirty_pages: int
    rounds: int
    merge_s: float  # merge_from_log of the whole log, best round
    take_s: float  # take() of the merged bitmap, same round
    memcpy_s: float  # memcpy of log_bytes, best of as many rounds

    @property
    def sync_s(self) -> float:
        return self.merge_s + self.take_s

    @property
    def sync_ms(self) -> float:
        return 1e3 * self.sync_s

    @property
    def dirty_fraction(self) -> float:
        return self.dirty_pages / (self.guest_bytes // PAGE_SIZE)

    @property
    def guest_gib_per_s(self) -> float:
        """GiB of guest memory whose dirty state one second of syncing covers."""
        return self.guest_bytes / GIB / self.sync_s if self.sync_s else float("inf")

    @property
    def memcpy_ratio(self) -> float:
        """Sync time over the time to memcpy the log once: 1 would mean a sync costs one plain copy."""
        return self.sync_s / self.memcpy_s if self.memcpy_s else float("inf")

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "sync_ms": self.sync_ms, "dirty_fraction": self.dirty_fraction,
                "guest_gib_per_s": self.guest_gib_per_s, "memcpy_ratio": self.memcpy_ratio}

    def row(self) -> str:
        """One line for a table (see :data:`SCAN_HEADER`)."""
        return (f"{self.guest_bytes / GIB:>10,.0f} {self.log_bytes >> 20:>8} {100 * self.dirty_fraction:>7.2f}% "
                f"{self.dirty_pages:>11,} {1e3 * self.merge_s:>9.1f} {1e3 * self.take_s:>8.1f} {self.sync_ms:>8.1f} "
                f"{self.guest_gib_per_s:>10,.0f} {1e3 * self.memcpy_s:>10.2f} {self.memcpy_ratio:>8.1f}")


SCAN_HEADER = (f"{'guest GiB':>10} {'log MiB':>8} {'dirty':>8} {'pages':>11} {'merge ms':>9} {'take ms':>8} "
          f"{'sync ms':>8} {'GiB/s':>10} {'memcpy ms':>10} {'x memcpy':>8}")


def _best_memcpy(size: int, rounds: int) -> float:
    src, dst = GuestMemory(size, register=False), GuestMemory(size, register=False)
    try:
        src.fill(0, size, 0x5A)
        dst.fill(0, size, 0)  # both touched first: page faults are not part of a copy
        return min(_memcpy.copy_pairs([(src.uaddr, dst.uaddr)], size, 1) for _ in range(rounds))
    finally:
        src.close()
        dst.close()


def scan_rate(guest_bytes: int = DEFAULT_GUEST, dirty_fraction: float = 0.01, *, rounds: int = 5, seed: int = 5,
              progress: Callable[[str], None] | None = None) -> ScanRate:
    """Measure one log sync (merge_from_log + take) of a ``guest_bytes`` guest at ``dirty_fraction``.

    ``dirty_fraction`` of the pages are drawn at random (``seed``; a page drawn twice counts once, so
    ``dirty_pages`` may fall a little short of the fraction). Best of ``rounds``.
    """
    if guest_bytes < PAGE_SIZE or guest_bytes % PAGE_SIZE:
        raise ValueError(f"guest_bytes must be a positive multiple of {PAGE_SIZE}, got {guest_bytes}")
    if not 0 <= dirty_fraction <= 1:
        raise ValueError(f"dirty_fraction must be in [0, 1], got {dirty_fraction}")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    npages = guest_bytes // PAGE_SIZE
    if progress:
        progress(f"drawing {dirty_fraction:.2%} of {npages:,} pages")
    rng = random.Random(seed)
    pattern = DirtyBitmap(npages)
    pattern.mark_pages(rng.randrange(npages) for _ in range(round(dirty_fraction * npages)))
    raw = pattern.view()
    log_memory = GuestMemory(max(1, raw.nbytes), register=False)  # page aligned, like a VMM's mmap'd log
    log = pyloop.guest_buffer(log_memory.uaddr, raw.nbytes)
    into = DirtyBitmap(npages)
    best: tuple[float, float] | None = None
    try:
        for index in range(rounds):
            if progress:
                progress(f"sync round {index + 1} of {rounds}")
            log[:] = raw
            start = time.perf_counter()
            merged = into.merge_from_log(log)
            middle = time.perf_counter()
            taken = into.take()
            end = time.perf_counter()
            if merged != pattern.count() or len(taken) != merged:
                raise AssertionError(f"a sync found {merged} pages ({len(taken)} taken) of {pattern.count()} logged")
            if best is None or end - start < sum(best):
                best = (middle - start, end - middle)
            del taken
    finally:
        log.release()
        log_memory.close()
    if progress:
        progress(f"memcpy of {raw.nbytes >> 20} MiB")
    memcpy_s = _best_memcpy(max(1, raw.nbytes), rounds)
    assert best is not None
    return ScanRate(guest_bytes, raw.nbytes, pattern.count(), rounds, best[0], best[1], memcpy_s)
