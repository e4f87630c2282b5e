"""Pre-copy live migration of one guest and its vDPA device, proven byte for byte.

One :class:`Migration` runs one :class:`~vdpacert.migration.scenario.Scenario`:

1. **Set-up.** A source guest (memory, driver, workload) on a source device, and an *unmigrated twin*:
   the same guest on a device of its own, given exactly the same operations. The guest runs
   ``run_before_ms`` of simulated time, after the control commands the scenario asks for.
2. **Pre-copy.** Dirty tracking starts: the guest CPU's writes (the VMM sees them, as KVM does), and
   the device's, by the device's own log (VHOST_F_LOG_ALL) or by the VMM's shadow virtqueues. The
   first iteration sends all of memory; each next one sends the pages dirtied during the previous
   one, over a :class:`~vdpacert.migration.link.Link` whose bandwidth sets the simulated time a send
   takes, during which the workload keeps running. It stops when the rest would go within the
   downtime target (*converged*) or at ``max_iterations``.
3. **Stop-and-copy.** The guest pauses, the source device is SUSPENDed, a final sync, the last
   pages, the device state (:mod:`.blob`: checksummed, loaded as untrusted), restore on the
   destination (:mod:`.restore`), and the guest resumes there. *Downtime* is the simulated time
   from pause to resume (the real time the device operations took is added to the clock).
4. **Verification.** At switch-over the destination's memory must equal the source's byte for byte,
   and the destination device's state the saved one; then the migrated guest and its twin run the
   same ``run_after_ms`` and everything is drained: every frame received exactly once and in order,
   every sector reading back as last written, and both guests observing the same (one digest).

A fault (:class:`~vdpacert.migration.scenario.FaultSpec`) makes the migration fail; then the source
resumes, its dirty tracking is stopped (and shown to be stopped: a device log stays empty under
traffic), the destination is released, and the same verification runs on the source against its
twin: a failed migration must lose nothing either.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

from vdpacert.conformance.driver import DeviceFailure
from vdpacert.conformance.driver.memory import PAGE, GuestLayout
from vdpacert.conformance.driver.split import RingFull
from vdpacert.conformance.targets.base import Target, make_target
from vdpacert.conformance.targets.spec import parse_target
from vdpacert.impl.guestmem import GuestMemory
from vdpacert.migration.bitmap import DirtyBitmap
from vdpacert.migration.blob import dump, load
from vdpacert.migration.dirty import CpuDirtyTracker, DeviceLogTracker, DirtySource, ShadowDirtySink
from vdpacert.migration.guest import Guest, GuestConfig
from vdpacert.migration.link import Link, LinkDropped, SimClock
from vdpacert.migration.restore import restore_device_state
from vdpacert.migration.save import save_device_state
from vdpacert.migration.scenario import Scenario
from vdpacert.migration.state import DestinationInfo, DeviceState, RestoreError, StateError
from vdpacert.migration.stream import (
    StreamError,
    apply_chunk,
    decode_state,
    encode_pages,
    encode_state,
    ram_stream_size,
)
from vdpacert.migration.vmm import CtrlCommandFailed, DirtyMode, Vmm
from vdpacert.migration.workload import Workload, WorkloadConfig, WorkloadError

__all__ = ["Iteration", "Migration", "MigrationResult", "SourceCrashed"]

#: Simulated time the workload runs between two looks at the clock when nothing else paces it.
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
class _Endpoint:
    """One device, its guest memory and its VMM."""

    target: Target
    memory: GuestMemory


def _targets(scenario: Scenario) -> tuple[str, str, str]:
    """Source, destination and twin target strings. blk: source and destination share one disk (storage
    is shared between hosts, not migrated); the twin has its own."""
    source = scenario.device.target
    destination = scenario.device.destination or source
    if any(f.kind == "destination-refuses" for f in scenario.faults):
        # A destination whose queues are smaller than the guest's: the state must be refused on load.
        destination = _with_attr(_without_attr(destination, "queue_size"), "queue_size",
                                 str(max(1, scenario.device.queue_size // 2)))
    if parse_target(source).kind == "sim-blk":
        disk = f"mig-{uuid.uuid4().hex[:12]}"
        if "disk" not in parse_target(source).attrs:
            source = _with_attr(source, "disk", disk)
        if "disk" not in parse_target(destination).attrs:
            destination = _with_attr(destination, "disk", disk)
    return source, destination, scenario.device.target


def _with_attr(target: str, key: str, value: str) -> str:
    return f"{target}{',' if ':' in target else ':'}{key}={value}"


def _without_attr(target: str, key: str) -> str:
    head, _, attrs = target.partition(":")
    kept = [item for item in attrs.split(",") if item and item.partition("=")[0].strip() != key]
    return f"{head}:{','.join(kept)}" if kept else head


class Migration:
    """One scenario, run once (see the module docstring). ``progress`` hears one line per stage."""

    def __init__(self, scenario: Scenario, *, progress: Callable[[str], None] | None = None) -> None:
        self.scenario = scenario
        self.progress = progress or (lambda line: None)
        migration = scenario.migration
        self.mode = DirtyMode(migration.mode)
        self.clock = SimClock()
        self.link = Link(self.clock, migration.bandwidth_mib_s * (1 << 20), migration.latency_ms / 1000)
        self.result = MigrationResult(scenario.name, expect=migration.expect,
                                      faults=[f"{f.kind}@{f.iteration}" for f in scenario.faults])
        self.guest_config = GuestConfig(packed=scenario.device.ring == "packed",
                                        queue_size=scenario.device.queue_size, queues=scenario.device.queues,
                                        event_idx=scenario.device.event_idx, indirect=scenario.device.indirect,
                                        start_index=scenario.device.start_index)
        w = scenario.workload
        self.workload_config = WorkloadConfig(
            net_frames_per_s=w.net_frames_per_s, frame_bytes=w.frame_bytes, blk_writes_per_s=w.blk_writes_per_s,
            blk_write_sectors=w.blk_write_sectors, cpu_pages_per_s=w.cpu_pages_per_s,
            cpu_working_set_mib=w.cpu_working_set_mib, inflight=w.inflight, chain_spans_ring=w.chain_spans_ring,
            seed=w.seed)
        self.memory_size = scenario.memory.size_mib << 20

    # ----- building blocks --------------------------------------------------------------------------------

    def _endpoint(self, stack: ExitStack, spec: str) -> _Endpoint:
        target = stack.enter_context(make_target(spec))
        return _Endpoint(target, target.new_memory(self.memory_size, gpa=0))

    def _guest(self, endpoint: _Endpoint) -> tuple[Guest, Workload]:
        guest = Guest(endpoint.memory, lambda layout: Vmm(endpoint.target, layout, mode=self.mode), self.guest_config)
        guest.bring_up()
        return guest, Workload(guest, self.workload_config)

    def _both(self, workloads: list[Workload], action: Callable[[Workload], object]) -> None:
        for workload in workloads:
            action(workload)

    def _run(self, workloads: list[Workload], seconds: float) -> None:
        """The guests run ``seconds`` of simulated time (the clock is advanced by whoever paces them)."""
        for workload in workloads:
            workload.run(seconds)

    def _prepare(self, workloads: list[Workload]) -> None:
        """The guest's life before migration: control commands, an optional reset, ``run_before_ms``."""
        w, before = self.scenario.workload, self.scenario.migration.run_before_ms / 1000
        if w.reset_before:
            self._run(workloads, before / 2)
            self._both(workloads, lambda wl: wl.guest.reset_and_reinit())
            self._both(workloads, lambda wl: setattr(wl, "pairs", 1))
        if w.mac:
            mac = bytes.fromhex(w.mac.replace(":", ""))
            self._both(workloads, lambda wl: wl.set_mac(mac))
        if w.promisc:
            self._both(workloads, lambda wl: wl.set_promisc(True))
        if w.mq_pairs:
            self._both(workloads, lambda wl: wl.set_pairs(w.mq_pairs))
        self._run(workloads, before / 2 if w.reset_before else before)
        self.clock.advance(before)

    # ----- the run ----------------------------------------------------------------------------------------

    def run(self) -> MigrationResult:
        started = time.perf_counter()
        try:
            with ExitStack() as stack:
                self._run_in(stack)
        except (WorkloadError, DeviceFailure, RingFull, OSError, ValueError) as error:
            self.result.error = self.result.error or f"{type(error).__name__}: {error}"
            self.result.verified = False
            self.result.problems.append(str(error))
        self.result.total_s = self.clock.now
        self.progress(f"{self.scenario.name}: done in {time.perf_counter() - started:.1f} s of real time")
        return self.result

    def _run_in(self, stack: ExitStack) -> None:
        source_spec, destination_spec, twin_spec = _targets(self.scenario)
        source, twin = self._endpoint(stack, source_spec), self._endpoint(stack, twin_spec)
        destination = self._endpoint(stack, destination_spec)  # opened now so it closes after the guests
        guest, workload = self._guest(source)
        twin_guest, twin_workload = self._guest(twin)
        stack.callback(guest.close)
        stack.callback(twin_guest.close)
        workloads = [workload, twin_workload]
        self._prepare(workloads)
        self.progress(f"{self.scenario.name}: guest up ({self.mode.value}), migrating")
        tracking = _Tracking(guest, source.target, self.mode, self.memory_size)
        try:
            tracking.start()
            self._precopy(source, destination, tracking, workloads)
            self._stop_and_copy(source, destination, tracking, guest, workloads)
        except MIGRATION_FAILURES as error:
            self.result.error = f"{type(error).__name__}: {error}"
            self.progress(f"{self.scenario.name}: migration failed: {self.result.error}")
            self._recover(source, destination, tracking, guest, workloads)
            return
        finally:
            tracking.stop()
        self._after(workloads, self.result.checks)

    def _faults_at(self, iteration: int) -> list[str]:
        return [f.kind if f.kind != "corrupt-stream" else f"corrupt-{f.target}"
                for f in self.scenario.faults if f.iteration == iteration]

    def _strike(self, iteration: int, stage: str) -> None:
        """Inject the faults the scenario puts at ``iteration`` that belong to ``stage`` (ram or state)."""
        for fault in self._faults_at(iteration):
            if fault == "link-drop" and stage == "ram":
                self.link.drop()
            elif fault == "source-crash" and stage == "ram":
                raise SourceCrashed(f"the source's migration thread died in iteration {iteration}")
            elif fault == f"corrupt-{stage}":
                self.link.corrupt_next()

    def _send_pages(self, pages: list[int], source: _Endpoint, destination: _Endpoint,
                    workloads: list[Workload] | None) -> int:
        """Send ``pages`` over the link; the guests run while the bytes travel (None: they are paused)."""
        sent = 0
        for chunk in encode_pages(source.memory, pages):
            before = self.clock.now
            delivered = self.link.send(chunk)
            apply_chunk(destination.memory, delivered)
            sent += len(chunk)
            if workloads is not None:
                self._run(workloads, self.clock.now - before)
        return sent

    def _precopy(self, source: _Endpoint, destination: _Endpoint, tracking: _Tracking,
                 workloads: list[Workload]) -> None:
        migration = self.scenario.migration
        target_s = migration.downtime_ms / 1000
        dirty = tracking.bitmap
        dirty.mark(0, self.memory_size)  # the first pass sends everything
        for number in range(1, migration.max_iterations + 1):
            self._strike(number, "ram")
            began = self.clock.now
            pages = list(dirty.take())
            if not pages:  # an idle guest: advance time a little so the workload can dirty something
                self._run(workloads, _TICK)
                self.clock.advance(_TICK)
            sent = self._send_pages(pages, source, destination, workloads)
            tracking.sync()
            remaining = dirty.count()
            self.result.history.append(Iteration(number, len(pages), sent, remaining, self.clock.now - began))
            self.result.iterations = number
            self.result.bytes_sent = self.link.bytes_sent
            self.progress(f"{self.scenario.name}: iteration {number}: sent {len(pages)} pages "
                          f"({sent / (1 << 20):.1f} MiB) in {1000 * (self.clock.now - began):.1f} ms, "
                          f"{remaining} dirty")
            if self.link.transfer_time(*ram_stream_size(remaining)) <= target_s:
                self.result.converged = True
                return

    def _stop_and_copy(self, source: _Endpoint, destination: _Endpoint, tracking: _Tracking, guest: Guest,
                       workloads: list[Workload]) -> None:
        w = self.scenario.workload
        if w.chain_spans_ring:
            self._both(workloads, lambda wl: wl.chain_spanning_ring())
        self._both(workloads, lambda wl: wl.leave_inflight(w.inflight))
        paused = self.clock.now
        real = time.perf_counter()
        source_vmm = guest.vmm
        self._strike(0, "ram")
        source_vmm.suspend()
        tracking.suspended = True
        tracking.sync()
        pages = list(tracking.bitmap.take())
        sent = self._send_pages(pages, source, destination, None)
        state = save_device_state(source_vmm)
        self._strike(0, "state")
        blob = decode_state(self.link.send(encode_state(dump(state))))
        destination_vmm, fds = self._restore(destination, blob, guest.layout)
        self.result.history.append(Iteration(0, len(pages), sent, 0, self.clock.now - paused))
        self.result.bytes_sent = self.link.bytes_sent
        self.clock.advance(time.perf_counter() - real)
        self.result.downtime_s = self.clock.now - paused
        self.result.migrated = True
        self._check_switch_over(source, destination, state, destination_vmm)
        tracking.stop()
        guest.move_to(destination_vmm, destination.memory, fds)
        source_vmm.close()
        source.target.close()
        self.progress(f"{self.scenario.name}: switched over: {len(pages)} last pages, downtime "
                      f"{1000 * self.result.downtime_s:.1f} ms (target {self.scenario.migration.downtime_ms} ms)")

    def _restore(self, destination: _Endpoint, blob: bytes,
                 guest_layout: GuestLayout) -> tuple[Vmm, dict[int, tuple[int, int]]]:
        """Load the blob against the destination and restore it; the destination VMM and the guest's new fds."""
        view = GuestLayout(destination.memory, iova_base=guest_layout.iova_base, fill=False)
        vmm = Vmm(destination.target, view, mode=self.mode)
        vmm.set_owner()
        state = load(blob, DestinationInfo.probe(vmm.client))
        fds: dict[int, tuple[int, int]] = {}
        try:
            for vring in state.vrings:
                fds[vring.index] = (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),
                                    os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
            bases = vmm.expect_inflight(state.vrings, state.packed)
            restore_device_state(vmm, state, kick_fds={i: k for i, (k, _) in fds.items()},
                                 call_fds={i: c for i, (_, c) in fds.items()}, bases=bases)
        except BaseException:
            for kick, call in fds.values():
                os.close(kick)
                os.close(call)
            vmm.close()
            raise
        return vmm, fds

    def _check_switch_over(self, source: _Endpoint, destination: _Endpoint, state: DeviceState,
                           destination_vmm: Vmm) -> None:
        """Memory byte-equal, device state equal: at the switch-over, before the destination runs."""
        checks, problems = self.result.checks, self.result.problems
        differing = _differing_pages(source.memory, destination.memory)
        if differing:
            problems.append(f"destination memory differs from the source's in {len(differing)} page(s), first "
                            f"{[hex(p * PAGE) for p in differing[:8]]}: writes that were never marked dirty")
        else:
            checks.append(f"memory: {self.memory_size >> 20} MiB byte-equal at switch-over")
        restored = save_device_state(destination_vmm)
        diff = state.diff(restored)
        if diff:
            problems.append("destination device state differs: " + "; ".join(diff[:8]))
        else:
            checks.append(f"device state equal ({len(state.vrings)} vrings, features {state.features:#x})")

    def _recover(self, source: _Endpoint, destination: _Endpoint, tracking: _Tracking, guest: Guest,
                 workloads: list[Workload]) -> None:
        """After a failed migration: the source resumes, tracking stops (and is shown stopped), nothing lost."""
        checks, problems = self.result.checks, self.result.problems
        if tracking.suspended:
            guest.vmm.resume()
            checks.append("source resumed (VHOST_VDPA_RESUME)")
        tracking.stop()
        destination.target.close()
        self._run(workloads, self.scenario.migration.run_after_ms / 1000 / 2)
        leaked = tracking.marks_after_stop()
        if leaked:
            problems.append(f"dirty tracking still marks pages after the failed migration: {leaked}")
        else:
            checks.append("dirty tracking stopped: no page marked under traffic after the failure")
        self._after(workloads, checks, half=True)

    def _after(self, workloads: list[Workload], checks: list[str], *, half: bool = False) -> None:
        """The differential run: the same work on the (migrated or not) guest and its twin, then drained."""
        seconds = self.scenario.migration.run_after_ms / 1000 / (2 if half else 1)
        self._run(workloads, seconds)
        self.clock.advance(seconds)
        problems = self.result.problems
        for name, workload in zip(("guest", "twin"), workloads, strict=True):
            try:
                workload.drain()
                workload.verify()
            except WorkloadError as error:
                problems.append(f"{name}: {error}")
        digests = [w.digest() for w in workloads]
        if digests[0] != digests[1]:
            problems.append("the migrated guest and its unmigrated twin observed different results")
        else:
            stats = workloads[0].stats
            checks.append(f"differential run: {stats.frames} frames, {stats.blk_writes} blk writes, "
                          f"{stats.cpu_pages} CPU page writes; guest and twin agree (digest {digests[0][:12]})")
        self.result.verified = not problems


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

