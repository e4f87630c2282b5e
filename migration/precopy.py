"""One pre-copy live migration of a running guest and its vDPA device: the mechanism.

:class:`LiveMigration` moves one :class:`~vdpacert.migration.guest.Guest` from a source
:class:`Endpoint` (a device and its guest memory) to a destination one, over a
:class:`~vdpacert.migration.link.Link` on a simulated clock:

1. **Pre-copy.** Dirty tracking starts: the guest CPU's writes (the VMM sees them, as KVM does), and
   the device's, by the device's own log (VHOST_F_LOG_ALL) or by the VMM's shadow virtqueues. The
   first iteration sends all of memory; each next one sends the pages dirtied during the previous
   one, while the guest keeps running for as long as the bytes take to cross the link. It stops
   when the rest would go within the downtime target (*converged*) or at ``max_iterations``.
2. **Stop-and-copy.** The guest pauses, the source device is SUSPENDed (its shadows drained), a final
   sync, the last pages, the device state (:mod:`.blob`: checksummed, loaded as untrusted against the
   destination), restore (:mod:`.restore`), and the guest resumes on the destination. *Downtime* is
   the simulated time from pause to resume; the real time the device operations took is added to
   the clock, since they are real.
3. **Switch-over checks**, before the destination runs: its memory equals the source's byte for
   byte (a page that differs is a write nobody marked dirty), and a state saved from the destination
   device equals the state restored onto it.

A failure (:data:`MIGRATION_FAILURES`: the link drops, the stream is corrupt, the destination
refuses the state, the source's migration code dies) is recovered from, not propagated: the
source resumes if it was suspended, dirty tracking stops (and is shown stopped: no source marks a
page while the guest runs on), the destination is released, and :attr:`MigrationResult.error`
says what happened. What the guest saw is for the caller to judge (the scenario runner does it
against an unmigrated twin, :mod:`.orchestrator`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from vdpacert.conformance.driver.memory import PAGE, GuestLayout
from vdpacert.conformance.targets.base import Target
from vdpacert.impl.guestmem import GuestMemory
from vdpacert.migration.bitmap import DirtyBitmap
from vdpacert.migration.blob import dump, load
from vdpacert.migration.dirty import CpuDirtyTracker, DeviceLogTracker, DirtySource, ShadowDirtySink
from vdpacert.migration.guest import Guest
from vdpacert.migration.link import Link, LinkDropped
from vdpacert.migration.restore import restore_device_state
from vdpacert.migration.save import save_device_state
from vdpacert.migration.state import DestinationInfo, DeviceState, RestoreError, StateError, VringState
from vdpacert.migration.stream import (
    StreamError,
    apply_chunk,
    decode_state,
    encode_pages,
    encode_state,
    ram_stream_size,
)
from vdpacert.migration.vmm import CtrlCommandFailed, DirtyMode, Vmm

__all__ = ["MIGRATION_FAILURES", "Endpoint", "Iteration", "LiveMigration", "MigrationResult", "SourceCrashed"]

#: Simulated time the guest runs in an iteration that found nothing to send.
_TICK = 0.001


class SourceCrashed(Exception):
    """The source's migration code died (a scenario fault): the migration fails, the guest runs on."""


#: What makes a migration fail without the source guest being at fault (the source then runs on).
MIGRATION_FAILURES = (LinkDropped, StreamError, StateError, RestoreError, SourceCrashed, CtrlCommandFailed)


@dataclass(frozen=True)
class Iteration:
    """One pass of pre-copy (``number`` 0 is the stop-and-copy): what was sent and what was dirty after."""

    number: int
    pages_sent: int
    bytes_sent: int
    dirty_after: int
    seconds: float


@dataclass
class MigrationResult:
    """The summary of one run; :meth:`to_json` has the fields of issue 5's JSON output first."""

    scenario: str
    converged: bool = False
    iterations: int = 0
    bytes_sent: int = 0
    total_s: float = 0.0
    downtime_s: float = 0.0
    verified: bool = False
    faults: list[str] = field(default_factory=list)
    error: str | None = None
    expect: str = "converged"
    migrated: bool = False
    history: list[Iteration] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        if not self.migrated:
            return "failed"
        return "converged" if self.converged else "not-converged"

    @property
    def passed(self) -> bool:
        """The scenario's expectation met and nothing lost."""
        return self.verified and self.outcome == self.expect

    def to_json(self) -> dict[str, Any]:
        out = {key: getattr(self, key) for key in ("scenario", "converged", "iterations", "bytes_sent", "total_s",
                                                    "downtime_s", "verified", "faults", "error")}
        out.update(expect=self.expect, outcome=self.outcome, passed=self.passed, checks=self.checks,
                   problems=self.problems, history=[asdict(i) for i in self.history])
        return out


@dataclass
class Endpoint:
    """One side of a migration: a device and the guest memory it reaches."""

    target: Target
    memory: GuestMemory


class LiveMigration:
    """One migration of ``guest`` from ``source`` to ``destination`` (see the module docstring).

    ``run_guest(seconds)`` lets the guest (and whatever must stay in step with it) run for that much
    simulated time; ``before_pause`` runs just before the guest pauses; ``strike(iteration, stage)``
    may inject a fault (``stage`` "ram" before RAM of that iteration is sent, "state" before the
    device state; iteration 0 is the stop-and-copy). ``probe_s``: how long the guest runs after a
    failure to show that dirty tracking stopped. Dirty pages are found the way the source's VMM was
    set up for (``guest.vmm.mode``); ``destination_mode`` sets up the destination's VMM (default: the same).
    """

    def __init__(self, guest: Guest, source: Endpoint, destination: Endpoint, *, link: Link,
                 downtime_s: float, max_iterations: int, run_guest: Callable[[float], None],
                 result: MigrationResult, before_pause: Callable[[], None] = lambda: None,
                 strike: Callable[[int, str], None] = lambda iteration, stage: None, probe_s: float = 0.005,
                 destination_mode: DirtyMode | None = None, progress: Callable[[str], None] | None = None) -> None:
        self.guest, self.source, self.destination = guest, source, destination
        # How dirty pages are found is the source VMM's (it set its queues up for it); the destination's
        # VMM may be set up another way for the next migration.
        self.mode = guest.vmm.mode
        self.destination_mode = self.mode if destination_mode is None else destination_mode
        self.link, self.clock = link, link.clock
        self.downtime_s, self.max_iterations = downtime_s, max_iterations
        self.run_guest, self.before_pause, self.strike = run_guest, before_pause, strike
        self.result, self.probe_s = result, probe_s
        self.name = result.scenario
        self.progress = progress or (lambda line: None)
        self.tracking = _Tracking(guest, source.target, self.mode, source.memory.size)

    def run(self) -> bool:
        """Migrate; True when the guest now runs on the destination, False after a recovered failure."""
        try:
            self.tracking.start()
            self._precopy()
            self._stop_and_copy()
        except MIGRATION_FAILURES as error:
            self.result.error = f"{type(error).__name__}: {error}"
            self.result.bytes_sent = self.link.bytes_sent
            self.progress(f"{self.name}: migration failed: {self.result.error}")
            self._recover()
            return False
        finally:
            self.tracking.stop()
        return True

    def _send_pages(self, pages: list[int], *, running: bool) -> int:
        """Send ``pages`` over the link; the guest runs while the bytes travel (unless it is paused)."""
        sent = 0
        for chunk in encode_pages(self.source.memory, pages):
            before = self.clock.now
            delivered = self.link.send(chunk)
            apply_chunk(self.destination.memory, delivered)
            sent += len(chunk)
            if running:
                self.run_guest(self.clock.now - before)
        return sent

    def _precopy(self) -> None:
        dirty = self.tracking.bitmap
        dirty.mark(0, self.source.memory.size)  # the first pass sends everything
        for number in range(1, self.max_iterations + 1):
            self.strike(number, "ram")
            began = self.clock.now
            pages = list(dirty.take())
            if not pages:  # an idle guest: advance time a little so the workload can dirty something
                self.run_guest(_TICK)
                self.clock.advance(_TICK)
            sent = self._send_pages(pages, running=True)
            self.tracking.sync()
            remaining = dirty.count()
            self.result.history.append(Iteration(number, len(pages), sent, remaining, self.clock.now - began))
            self.result.iterations = number
            self.result.bytes_sent = self.link.bytes_sent
            self.progress(f"{self.name}: iteration {number}: sent {len(pages)} pages "
                          f"({sent / (1 << 20):.1f} MiB) in {1000 * (self.clock.now - began):.1f} ms, "
                          f"{remaining} dirty")
            if self.link.transfer_time(*ram_stream_size(remaining)) <= self.downtime_s:
                self.result.converged = True
                return

    def _stop_and_copy(self) -> None:
        self.before_pause()
        guest, tracking = self.guest, self.tracking
        paused = self.clock.now
        real = time.perf_counter()
        source_vmm = guest.vmm
        self.strike(0, "ram")
        source_vmm.suspend()
        tracking.suspended = True
        tracking.sync()
        pages = list(tracking.bitmap.take())
        sent = self._send_pages(pages, running=False)
        checking = time.perf_counter()
        # At switch-over: every page is across and the destination device has not run yet.
        differing = _differing_pages(self.source.memory, self.destination.memory)
        real += time.perf_counter() - checking  # the check is the test's, not part of the downtime
        state = save_device_state(source_vmm)
        self.strike(0, "state")
        blob = decode_state(self.link.send(encode_state(dump(state))))
        destination_vmm, fds, bases = self._restore(blob)
        self.result.history.append(Iteration(0, len(pages), sent, 0, self.clock.now - paused))
        self.result.bytes_sent = self.link.bytes_sent
        self.clock.advance(time.perf_counter() - real)
        self.result.downtime_s = self.clock.now - paused
        self.result.migrated = True
        self._check_switch_over(state, differing, destination_vmm, bases)
        tracking.stop()
        guest.move_to(destination_vmm, self.destination.memory, fds)
        source_vmm.close()
        self.source.target.close()
        self.progress(f"{self.name}: switched over: {len(pages)} last pages, downtime "
                      f"{1000 * self.result.downtime_s:.1f} ms (target {1000 * self.downtime_s:g} ms)")

    def _restore(self, blob: bytes) -> tuple[Vmm, dict[int, tuple[int, int]], dict[int, int]]:
        """Load the blob against the destination and restore it: the destination VMM, the guest's new fds,
        and the vring base each queue was given."""
        view = GuestLayout(self.destination.memory, iova_base=self.guest.layout.iova_base, fill=False)
        vmm = Vmm(self.destination.target, view, mode=self.destination_mode)
        vmm.set_owner()
        state = load(blob, DestinationInfo.probe(vmm.client))
        fds: dict[int, tuple[int, int]] = {}
        try:
            for vring in state.vrings:
                fds[vring.index] = (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),
                                    os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
            bases = vmm.expect_inflight(state)
            restore_device_state(vmm, state, kick_fds={i: k for i, (k, _) in fds.items()},
                                 call_fds={i: c for i, (_, c) in fds.items()}, bases=bases)
        except BaseException:
            for kick, call in fds.values():
                os.close(kick)
                os.close(call)
            vmm.close()
            raise
        return vmm, fds, bases

    def _check_switch_over(self, state: DeviceState, differing: list[int], destination_vmm: Vmm,
                           bases: dict[int, int]) -> None:
        """Memory byte-equal at switch-over (``differing``: pages that are not); the device state restored.

        The destination may already have used chains the guest had made available (a device may
        process any available buffer once DRIVER_OK is set, kicked or not), so a queue's position
        may be ahead of the one restored, as long as it moved as one: see :func:`_moved_as_one`.
        """
        checks, problems = self.result.checks, self.result.problems
        if differing:
            problems.append(f"destination memory differs from the source's in {len(differing)} page(s), first "
                            f"{[hex(p * PAGE) for p in differing[:8]]}: writes that were never marked dirty")
        else:
            checks.append(f"memory: {self.source.memory.size >> 20} MiB byte-equal at switch-over")
        now = save_device_state(destination_vmm)
        vrings = []
        for saved, restored in zip(state.vrings, now.vrings, strict=False):
            resubmitted = len(saved.inflight) if destination_vmm.shadowed(saved.index) else 0
            # A rewound base makes the in-flight chains available again; the used position is unchanged.
            given = replace(saved, base=bases.get(saved.index, saved.base))
            if _moved_as_one(given, restored, state.packed, resubmitted):
                restored = replace(restored, base=saved.base, used_idx=saved.used_idx, inflight=saved.inflight)
            vrings.append(restored)
        diff = state.diff(replace(now, vrings=tuple(vrings)))
        if diff:
            problems.append("destination device state differs: " + "; ".join(diff[:8]))
        else:
            checks.append(f"device state equal ({len(state.vrings)} vrings, features {state.features:#x})")

    def _recover(self) -> None:
        """After a failed migration: the source resumes, tracking stops (and is shown stopped under traffic)."""
        checks, problems, tracking = self.result.checks, self.result.problems, self.tracking
        if tracking.suspended:
            self.guest.vmm.resume()
            checks.append("source resumed (VHOST_VDPA_RESUME)")
        tracking.stop()
        tracking.sync()  # what was marked before the stop is no leak: only marks from now on are
        self.destination.target.close()
        self.run_guest(self.probe_s)
        leaked = tracking.marks_after_stop()
        if leaked:
            problems.append(f"dirty tracking still marks pages after the failed migration: {leaked}")
        else:
            checks.append("dirty tracking stopped: no page marked under traffic after the failure")


def _position(base_half: int, num: int) -> int:
    """A packed ring position (15-bit index, wrap counter in bit 15) as a count modulo 2 * num.

    The wrap counter starts at 1 and flips at every lap, so lap 0 is wrap 1."""
    return ((base_half & 0x7FFF) + (0 if base_half >> 15 & 1 else num)) % (2 * num)


def _moved_as_one(given: VringState, now: VringState, packed: bool, resubmitted: int) -> bool:
    """Whether queue ``now`` is where ``given`` (what restore set) leads to after the device used some chains.

    ``a`` is how far the avail position moved, ``u`` the used one. Every chain the device took and
    used moves both alike; chains resubmitted by a shadow virtqueue (already past the avail position)
    move only ``u``. So: ``0 <= u - a <= resubmitted`` and ``0 <= a <= num``.
    """
    if packed:
        span = 2 * given.num
        a = (_position(now.base & 0xFFFF, given.num) - _position(given.base & 0xFFFF, given.num)) % span
        u = (_position(now.base >> 16, given.num) - _position(given.base >> 16, given.num)) % span
    else:
        a = (now.base - given.base) & 0xFFFF
        u = (now.used_idx - given.used_idx) & 0xFFFF
    return 0 <= u - a <= resubmitted and a <= given.num


def _differing_pages(a: GuestMemory, b: GuestMemory) -> list[int]:
    out = []
    step = 256 * PAGE
    for offset in range(0, a.size, step):
        length = min(step, a.size - offset)
        if a.read(offset, length) != b.read(offset, length):
            out += [(offset + p) // PAGE for p in range(0, length, PAGE)
                    if a.read(offset + p, PAGE) != b.read(offset + p, PAGE)]
    return out


class _Tracking:
    """The dirty sources of one migration: the guest CPU's writes, and the device's (its log or the shadows)."""

    def __init__(self, guest: Guest, target: Target, mode: DirtyMode, memory_size: int) -> None:
        self.guest, self.vmm, self.mode = guest, guest.vmm, mode
        self.bitmap = DirtyBitmap(memory_size // PAGE)
        self.cpu = CpuDirtyTracker(memory_size)
        self.device: DirtySource
        if mode is DirtyMode.DEVICE_LOG:
            # The log covers the VMM's memory too (the device logs its shadow-ring writes); only the
            # guest's pages are ever sent: the bitmap stops at the guest's end.
            self.device = DeviceLogTracker(target, guest.vmm.log_span, acked_features=guest.vmm.features)
            self.shadow_sink: ShadowDirtySink | None = None
        else:
            self.shadow_sink = ShadowDirtySink(memory_size)
            self.device = self.shadow_sink
        self.suspended = False
        self.active = False

    def sources(self) -> Iterator[DirtySource]:
        yield self.cpu
        yield self.device

    def start(self) -> None:
        for source in self.sources():
            source.start()
        self.guest.layout.cpu_dirty = self.cpu
        self.vmm.set_cpu_dirty(self.cpu)
        if self.shadow_sink is not None:
            self.vmm.set_shadow_dirty(self.shadow_sink)
        self.active = True

    def sync(self) -> int:
        return sum(source.sync(self.bitmap) for source in self.sources())

    def stop(self) -> None:
        if not self.active:
            return
        self.active = False
        self.guest.layout.cpu_dirty = None
        self.vmm.set_cpu_dirty(None)
        self.vmm.set_shadow_dirty(None)
        for source in self.sources():
            source.stop()

    def marks_after_stop(self) -> int:
        """Pages any source reports after :meth:`stop` (must be 0)."""
        probe = DirtyBitmap(self.bitmap.npages)
        return sum(source.sync(probe) for source in self.sources())

