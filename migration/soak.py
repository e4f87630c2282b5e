"""A soak: one guest on one device for minutes, random traffic and random disruptions, memory held flat.

:class:`Soak` runs a :class:`~vdpacert.migration.guest.Guest` (the conformance driver behind a
:class:`~vdpacert.migration.vmm.Vmm`) and, from one seeded RNG, picks operations until the time is up:

- ``traffic``: net frames looped back (each batch a fresh :class:`NetStream` numbered on from the last,
  so a stale or replayed frame is one it never sent), or blk writes of random sectors followed by
  reads checked against a :class:`BlkShadow`;
- ``reset``: chains are left in flight, the driver resets the device and brings it up again;
- ``suspend``: SUSPEND, a batch kicked that must not move, RESUME, the batch completes and is checked;
- ``iotlb-remap``: the guest area invalidated and mapped again in pieces (same IOVA), then traffic;
- ``iotlb-move``: the driver resets and comes back with its memory at another IOVA (the old one unmapped);
- ``migrate``: chains left in flight, pre-copy (:class:`~vdpacert.migration.precopy.LiveMigration`, the
  guest running traffic between iterations) to a fresh device of the same kind, which the guest then
  runs on; the in-flight chains are completed there, exactly once.

Every operation kind runs once early (in a seeded order) so even a short soak exercises all of them.

**What a reset may drop**: exactly the chains in flight at the reset (made available, not yet used):
their RX buffers are never filled, their TX frames may never arrive (their sequence numbers are retired,
so one arriving later is reported), their blk writes may or may not have reached the disk (those sectors'
contents are unknown until written again). Anything used before the reset stands. A migration drops
nothing.

**Memory**: RSS (``/proc/self/statm``) is sampled at the start, every ``sample_s`` and at the end. The
least-squares slope over the second half of the run, times that half's length, is the growth a leak
would show (the first half absorbs warm-up: imports, allocator pools); above ``leak_mib`` it is a leak.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vdpacert.conformance.client import TargetDied
from vdpacert.conformance.driver import DeviceFailure
from vdpacert.conformance.driver.device import BlkCompletion
from vdpacert.conformance.driver.memory import PAGE
from vdpacert.conformance.driver.split import Chain
from vdpacert.conformance.driver.traffic import BlkRequest, BlkShadow, NetStream, blk_in, blk_out
from vdpacert.conformance.targets.base import Target, make_target
from vdpacert.conformance.targets.spec import parse_target
from vdpacert.impl.guestmem import GuestMemory
from vdpacert.migration.guest import Guest, GuestConfig
from vdpacert.migration.link import Link, SimClock
from vdpacert.migration.precopy import Endpoint, LiveMigration, MigrationResult
from vdpacert.migration.vmm import DirtyMode, Vmm
from vdpacert.uapi import vhost_types as T  # noqa: N812
from vdpacert.uapi import virtio_blk as B  # noqa: N812
from vdpacert.uapi.virtio_ids import VIRTIO_ID_NET

__all__ = ["OPERATIONS", "RssStats", "Soak", "SoakConfig", "SoakError", "SoakResult", "rss_bytes"]

OPERATIONS = ("traffic", "reset", "suspend", "iotlb-remap", "iotlb-move", "migrate")
#: Relative weights once every kind ran once: mostly traffic, disruptions in between.
_WEIGHTS = (60, 8, 10, 8, 6, 3)
#: blk: writes and reads stay in the first sectors, so the ramdisk's footprint stops growing early on.
_BLK_REGION = 2048
_BLK_SECTORS = 8
#: How far apart the IOVA bases an ``iotlb-move`` picks from are (clear of the VMM's own window).
_IOVA_STRIDE = 1 << 32
_MiB = 1 << 20


class SoakError(Exception):
    """The device broke something the soak checks (loss, duplication, corruption, progress while suspended)."""


def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class SoakConfig:
    """``target`` to soak for ``minutes``; ``leak_mib`` is the second-half RSS growth that counts as a leak."""

    target: str
    minutes: float
    seed: int = 0
    leak_mib: float = 16.0
    sample_s: float = 5.0
    memory_mib: int = 8
    queue_size: int = 64
    mode: DirtyMode = DirtyMode.DEVICE_LOG

    def __post_init__(self) -> None:
        if not self.minutes > 0:
            raise ValueError(f"a soak runs for more than 0 minutes, not {self.minutes!r}")
        if not self.sample_s > 0 or not self.leak_mib >= 0:
            raise ValueError("sample_s must be > 0 and leak_mib >= 0")


@dataclass
class RssStats:
    """RSS samples (seconds since start, bytes) and what they say."""

    samples: list[tuple[float, int]] = field(default_factory=list)

    def add(self, t: float, rss: int) -> None:
        self.samples.append((t, rss))

    @property
    def start(self) -> int:
        return self.samples[0][1]

    @property
    def end(self) -> int:
        return self.samples[-1][1]

    @property
    def peak(self) -> int:
        return max(rss for _, rss in self.samples)

    def second_half(self) -> list[tuple[float, int]]:
        half = self.samples[-1][0] / 2
        return [s for s in self.samples if s[0] >= half]

    @property
    def slope(self) -> float:
        """Bytes per second over the second half (least squares; 0 with fewer than two samples)."""
        points = self.second_half()
        if len(points) < 2:
            return 0.0
        mean_t = sum(t for t, _ in points) / len(points)
        mean_r = sum(r for _, r in points) / len(points)
        var = sum((t - mean_t) ** 2 for t, _ in points)
        return 0.0 if var == 0 else sum((t - mean_t) * (r - mean_r) for t, r in points) / var

    @property
    def growth(self) -> float:
        """Bytes the fitted line grows by across the second half."""
        points = self.second_half()
        return self.slope * (points[-1][0] - points[0][0]) if len(points) >= 2 else 0.0


@dataclass
class SoakResult:
    target: str
    seed: int
    minutes: float
    leak_mib: float
    seconds: float = 0.0
    ops: Counter[str] = field(default_factory=Counter)
    frames_verified: int = 0
    requests_verified: int = 0
    sectors_verified: int = 0
    dropped_by_reset: int = 0
    migrations: int = 0
    rss: RssStats = field(default_factory=RssStats)
    problems: list[str] = field(default_factory=list)

    @property
    def leak(self) -> bool:
        return self.rss.growth > self.leak_mib * _MiB

    @property
    def passed(self) -> bool:
        return not self.problems and not self.leak

    def to_json(self) -> dict[str, Any]:
        rss = self.rss
        return {"target": self.target, "seed": self.seed, "minutes": self.minutes, "seconds": round(self.seconds, 3),
                "passed": self.passed, "ops": {op: self.ops[op] for op in OPERATIONS},
                "frames_verified": self.frames_verified, "requests_verified": self.requests_verified,
                "sectors_verified": self.sectors_verified, "dropped_by_reset": self.dropped_by_reset,
                "migrations": self.migrations,
                "rss": {"start": rss.start, "end": rss.end, "peak": rss.peak,
                        "slope_mib_per_min": rss.slope * 60 / _MiB, "second_half_growth_mib": rss.growth / _MiB,
                        "leak_mib": self.leak_mib, "leak": self.leak, "samples": len(rss.samples)},
                "problems": self.problems}

    def summary(self) -> str:
        rss = self.rss
        ops = ", ".join(f"{op} {self.ops[op]}" for op in OPERATIONS)
        lines = [f"soak {self.target} seed {self.seed}: {self.seconds:.1f} s",
                 f"  operations: {ops}",
                 f"  verified: {self.frames_verified} frames, {self.requests_verified} blk requests "
                 f"({self.sectors_verified} sectors read back), {self.migrations} migrations; "
                 f"{self.dropped_by_reset} in-flight chains dropped by resets",
                 f"  RSS: start {rss.start / _MiB:.1f} MiB, end {rss.end / _MiB:.1f} MiB, peak {rss.peak / _MiB:.1f} "
                 f"MiB; second half {rss.slope * 60 / _MiB:+.2f} MiB/min ({rss.growth / _MiB:+.2f} MiB, "
                 f"leak above {self.leak_mib:g} MiB){' LEAK' if self.leak else ''}"]
        lines += [f"  problem: {p}" for p in self.problems]
        lines.append("  PASS" if self.passed else "  FAIL")
        return "\n".join(lines)


class Soak:
    """One soak run (see the module docstring); :meth:`run` returns the :class:`SoakResult`."""

    def __init__(self, config: SoakConfig, *, progress: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.progress = progress or (lambda line: None)
        self.rng = random.Random(config.seed)
        self.result = SoakResult(config.target, config.seed, config.minutes, config.leak_mib)
        spec = parse_target(config.target)
        self.spec = config.target
        if spec.kind == "sim-blk" and "disk" not in spec.attrs:  # source and destination share storage
            self.spec += f"{',' if ':' in self.spec else ':'}disk=soak-{uuid.uuid4().hex[:12]}"
        self.seq = 0  # the next net sequence number: every batch numbers on from here
        self.shadow: BlkShadow | None = None
        self.iova_home = 0
        self.region = 0  # blk: sectors [0, region) are written and read

    # ----- the run -------------------------------------------------------------------------------------

    def run(self) -> SoakResult:
        result, config = self.result, self.config
        target, memory = self._endpoint()
        guest = self._guest(target, memory)
        began = time.monotonic()
        result.rss.add(0.0, rss_bytes())  # with the guest up: its memory is the baseline, not growth
        deadline = began + config.minutes * 60
        next_sample = began + config.sample_s
        first = list(OPERATIONS)
        self.rng.shuffle(first)
        try:
            while True:
                now = time.monotonic()
                if now >= next_sample:
                    result.rss.add(now - began, rss_bytes())
                    next_sample = now + config.sample_s
                if now >= deadline and not first:
                    break
                op = first.pop(0) if first else self.rng.choices(OPERATIONS, _WEIGHTS)[0]
                try:
                    guest, target = self._do(op, guest, target)
                except (DeviceFailure, SoakError, TargetDied, OSError, ValueError) as error:
                    result.problems.append(f"{op} #{result.ops[op] + 1}: {type(error).__name__}: {error}")
                    break
                result.ops[op] += 1
            if not result.problems:
                self._final_check(guest)
        finally:
            # The last sample is taken with the guest still up, like every other: its memory is no leak.
            result.seconds = time.monotonic() - began
            result.rss.add(result.seconds, rss_bytes())
            guest.close()
            target.close()
        return result

    def _do(self, op: str, guest: Guest, target: Target) -> tuple[Guest, Target]:
        if op == "traffic":
            self._traffic(guest)
        elif op == "reset":
            self._reset(guest)
        elif op == "suspend":
            self._suspend(guest)
        elif op == "iotlb-remap":
            self._iotlb_remap(guest)
        elif op == "iotlb-move":
            self._iotlb_move(guest)
        else:
            return self._migrate(guest, target)
        return guest, target

    # ----- set-up --------------------------------------------------------------------------------------

    def _endpoint(self) -> tuple[Target, GuestMemory]:
        target = make_target(self.spec)
        return target, target.new_memory(self.config.memory_mib * _MiB, gpa=0)

    def _guest(self, target: Target, memory: GuestMemory) -> Guest:
        mode = self.config.mode
        guest = Guest(memory, lambda layout: Vmm(target, layout, mode=mode),
                      GuestConfig(queue_size=self.config.queue_size, event_idx=self.rng.random() < 0.5))
        guest.bring_up()
        self.iova_home = guest.layout.iova_base
        if guest.device_id != VIRTIO_ID_NET:
            capacity = int.from_bytes(guest.vmm.client.get_config(0, 8), "little")
            self.region = min(capacity, _BLK_REGION) - _BLK_SECTORS
            self.shadow = BlkShadow(min(capacity, _BLK_REGION))
        return guest

    # ----- traffic -------------------------------------------------------------------------------------

    def _frames(self, count: int) -> tuple[NetStream, list[bytes]]:
        stream = NetStream(next_seq=self.seq)
        frames = stream.frames(count, [self.rng.randrange(64, 1515) for _ in range(count)])
        self.seq = stream.next_seq
        return stream, frames

    def _batch(self) -> int:
        return self.rng.randint(1, max(1, self.config.queue_size // 8))

    def _traffic(self, guest: Guest) -> None:
        if guest.device_id == VIRTIO_ID_NET:
            count = self._batch()
            guest.session.post_rx(0, count, kick=False)
            stream, frames = self._frames(count)
            guest.session.send_frames(0, frames)
            self._net_done(guest, stream, count)
        else:
            writes = self._blk_writes(self._batch())
            self._blk_done(guest.session.blk_run(0, writes))
            self._read_back(guest, [w.sector for w in writes] + [self.rng.randrange(self.region)])

    def _net_done(self, guest: Guest, stream: NetStream, count: int) -> None:
        """Reap ``count`` looped-back frames and their TX chains; every frame sent exactly once, in order, intact."""
        for frame in guest.session.receive_frames(0, count, check_num_buffers=False):
            stream.receive(frame)
        guest.session.tx_done(0, count)
        stream.check(in_order=True, complete=True)
        self.result.frames_verified += count

    def _blk_writes(self, count: int) -> list[BlkRequest]:
        assert self.shadow is not None
        writes = []
        for _ in range(count):
            sector = self.rng.randrange(self.region)
            writes.append(blk_out(sector, self.shadow.write(sector, _BLK_SECTORS)))
        return writes

    def _blk_done(self, done: list[BlkCompletion]) -> None:
        bad = [c.status for c in done if c.status != B.VIRTIO_BLK_S_OK]
        if bad:
            raise SoakError(f"{len(bad)} blk request(s) answered status {bad[:8]}")
        self.result.requests_verified += len(done)

    def _read_back(self, guest: Guest, sectors: list[int]) -> None:
        assert self.shadow is not None
        done = guest.session.blk_run(0, [blk_in(s, _BLK_SECTORS) for s in sectors])
        self._blk_done(done)
        for completion in done:
            problems = self.shadow.mismatches(completion.request.sector, completion.data)
            if problems:
                raise SoakError("read back: " + "; ".join(problems[:4]))
        self.result.sectors_verified += _BLK_SECTORS * len(sectors)

    def _leave_in_flight(self, guest: Guest) -> tuple[list[Chain], list[BlkRequest]]:
        """Chains made available and not waited for: RX buffers (net) or blk writes (and their requests), not kicked."""
        count = self._batch()
        if guest.device_id == VIRTIO_ID_NET:
            return guest.session.post_rx(0, count, kick=False), []
        writes = self._blk_writes(count)
        return [guest.session.blk_submit(0, w, kick=False) for w in writes], writes

    # ----- disruptions ---------------------------------------------------------------------------------

    def _reset(self, guest: Guest) -> None:
        """A reset drops what is in flight (module docstring): unkicked TX frames retired, blk sectors unknown."""
        chains, writes = self._leave_in_flight(guest)
        count = len(chains)
        if guest.device_id == VIRTIO_ID_NET:
            _, frames = self._frames(self._batch())  # their numbers are retired: arriving later is a replay
            guest.session.send_frames(0, frames, kick=False)
            count += len(frames)
        assert self.shadow is not None or not writes
        for write in writes:  # taken before the reset or not: the sectors are unknown until written again
            assert self.shadow is not None
            self.shadow.discard(write.sector, _BLK_SECTORS)
        self.result.dropped_by_reset += count
        guest.reset_and_reinit()
        self._traffic(guest)

    def _suspend(self, guest: Guest) -> None:
        """Kicks while suspended move nothing; after RESUME the batch completes, checked."""
        session = guest.session
        if not guest.vmm.backend_features >> T.VHOST_BACKEND_F_SUSPEND & 1:
            raise SoakError("the device does not offer VHOST_BACKEND_F_SUSPEND")
        guest.vmm.suspend()
        count = self._batch()
        if guest.device_id == VIRTIO_ID_NET:
            session.post_rx(0, count, kick=False)
            stream, frames = self._frames(count)
            session.send_frames(0, frames)
            moved = session.reap(0, 0) + session.reap(1, 0)
        else:
            writes = self._blk_writes(count)
            chains = [session.blk_submit(0, w, kick=False) for w in writes]
            session.kick(0)
            moved = session.reap(0, 0)
        if moved:
            raise SoakError(f"{len(moved)} chain(s) used while the device was suspended")
        guest.vmm.resume()
        if guest.device_id == VIRTIO_ID_NET:
            self._net_done(guest, stream, count)
        else:
            self._blk_done(session.blk_complete(0, len(chains)))
            self._read_back(guest, [w.sector for w in writes])

    def _iotlb_remap(self, guest: Guest) -> None:
        """The guest area unmapped and mapped again in 1-4 pieces at the same IOVAs, rings idle; then traffic."""
        layout, client = guest.layout, guest.vmm.client
        pages = layout.size // PAGE
        cuts = sorted(self.rng.sample(range(1, pages), self.rng.randint(0, 3)))
        client.iotlb_invalidate(layout.iova_base, layout.size)
        for start, end in zip([0, *cuts], [*cuts, pages], strict=True):
            client.iotlb_update(layout.iova(start * PAGE), (end - start) * PAGE, layout.uaddr_base + start * PAGE,
                                T.VHOST_ACCESS_RW)
        self._traffic(guest)

    def _iotlb_move(self, guest: Guest) -> None:
        """The driver resets and brings the device up with guest memory at another IOVA; the old one is unmapped."""
        layout = guest.layout
        old = layout.iova_base
        choices = [self.iova_home + i * _IOVA_STRIDE for i in range(4) if self.iova_home + i * _IOVA_STRIDE != old]
        guest.session.close()
        layout.iova_base = self.rng.choice(choices)
        if guest.vmm.guest is not layout:  # after a migration the VMM reads the guest through its own view
            guest.vmm.guest.iova_base = layout.iova_base
        guest.vmm.client.iotlb_invalidate(old, layout.size)
        guest.reset_and_reinit()
        self._traffic(guest)

    def _migrate(self, guest: Guest, source: Target) -> tuple[Guest, Target]:
        """Pre-copy to a fresh device of the same kind with chains in flight; they complete there, once."""
        chains, _ = self._leave_in_flight(guest)
        count = len(chains)
        destination, memory = self._endpoint()
        clock = SimClock()
        result = MigrationResult("soak")
        try:
            migrated = LiveMigration(
                guest, Endpoint(source, guest.memory), Endpoint(destination, memory),
                link=Link(clock, 10 << 30, 0.0001), downtime_s=0.05, max_iterations=4,
                run_guest=lambda seconds: self._traffic(guest) if self.rng.random() < 0.05 else None,
                result=result).run()
        except BaseException:
            destination.close()
            raise
        if not migrated or result.problems:
            destination.close()
            raise SoakError(f"migration: {result.error or '; '.join(result.problems[:4])}")
        self.result.migrations += 1
        if guest.device_id == VIRTIO_ID_NET:
            stream, frames = self._frames(count)
            guest.session.send_frames(0, frames)
            self._net_done(guest, stream, count)
        else:
            pending = [c for c in chains if guest.session.rings[0].outstanding.get(c.id) is c]
            if pending:
                guest.session.kick(0)
                self._blk_done(guest.session.blk_complete(0, len(pending)))
        self._traffic(guest)
        return guest, destination

    def _final_check(self, guest: Guest) -> None:
        """blk: every sector of the region read back as last written (net batches were checked as they went)."""
        if self.shadow is not None:
            for start in range(0, self.region, 64):
                self._read_back(guest, list(range(start, min(start + 64, self.region), _BLK_SECTORS)))
