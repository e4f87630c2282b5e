"""Run one migration scenario and prove nothing was lost: the scenario runner behind ``vdpacert migrate``.

A :class:`Migration` runs one :class:`~vdpacert.migration.scenario.Scenario`:

1. **Set-up.** A source guest (memory, driver, workload) on a source device, and an *unmigrated twin*:
   the same guest on a device of its own, given exactly the same operations. The guests run
   ``run_before_ms`` of simulated time, after the control commands the scenario asks for.
2. **The migration** (:class:`~vdpacert.migration.precopy.LiveMigration`): pre-copy while both
   guests keep running, stop-and-copy, restore, and the switch-over checks (memory byte-equal,
   device state equal). Faults of the scenario (:class:`~vdpacert.migration.scenario.FaultSpec`)
   are injected at their iteration; after one, the source must run on with its dirty tracking
   stopped.
3. **The differential run.** The migrated guest (or, after a failure, the source) and its twin do
   the same ``run_after_ms`` of work; then everything is drained: every frame received exactly once
   and in order, every sector reading back as last written, and both guests observing the same
   (one digest).

A scenario *passes* when its expectation (converged, not-converged or failed) is met and nothing
was lost.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack

from vdpacert.conformance.driver import DeviceFailure
from vdpacert.conformance.driver.split import RingFull
from vdpacert.conformance.targets.base import make_target
from vdpacert.conformance.targets.spec import parse_target
from vdpacert.migration.guest import Guest, GuestConfig
from vdpacert.migration.link import Link, SimClock
from vdpacert.migration.precopy import Endpoint, LiveMigration, MigrationResult, SourceCrashed
from vdpacert.migration.scenario import Scenario
from vdpacert.migration.vmm import DirtyMode, Vmm
from vdpacert.migration.workload import Workload, WorkloadConfig, WorkloadError

__all__ = ["Migration", "MigrationResult"]


def _targets(scenario: Scenario) -> tuple[str, str, str]:
    """Source, destination and twin target strings. sim-blk: source and destination share one disk (storage
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
    twin = scenario.device.twin_target
    if parse_target(twin).kind == "sim-blk":
        twin = _without_attr(twin, "disk")  # the twin's disk is its own
    return source, destination, twin


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

    def _endpoint(self, stack: ExitStack, spec: str) -> Endpoint:
        target = stack.enter_context(make_target(spec))
        return Endpoint(target, target.new_memory(self.memory_size, gpa=0))

    def _guest(self, endpoint: Endpoint) -> tuple[Guest, Workload]:
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
        w, migration = self.scenario.workload, self.scenario.migration

        def before_pause() -> None:
            if w.chain_spans_ring:
                self._both(workloads, lambda wl: wl.chain_spanning_ring())
            self._both(workloads, lambda wl: wl.leave_inflight(w.inflight))

        migrated = LiveMigration(
            guest, source, destination, link=self.link, downtime_s=migration.downtime_ms / 1000,
            max_iterations=migration.max_iterations, run_guest=lambda seconds: self._run(workloads, seconds),
            result=self.result, before_pause=before_pause, strike=self._strike,
            probe_s=migration.run_after_ms / 1000 / 2, progress=self.progress).run()
        self._after(workloads, self.result.checks, half=not migrated)

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

    def _after(self, workloads: list[Workload], checks: list[str], *, half: bool = False) -> None:
        """The differential run: the same work on the (migrated or not) guest and its twin, then drained."""
        seconds = self.scenario.migration.run_after_ms / 1000 / (2 if half else 1)
        self._run(workloads, seconds)
        self.clock.advance(seconds)
        problems = self.result.problems
        digests = []
        for name, workload in zip(("guest", "twin"), workloads, strict=True):
            try:
                workload.drain()
                digests.append(workload.verify())
            except WorkloadError as error:
                problems.append(f"{name}: {error}")
                digests.append(workload.digest())
        if digests[0] != digests[1]:
            problems.append("the migrated guest and its unmigrated twin observed different results")
        else:
            stats = workloads[0].stats
            checks.append(f"differential run: {stats.frames} frames, {stats.blk_writes} blk writes, "
                          f"{stats.cpu_pages} CPU page writes; guest and twin agree (digest {digests[0][:12]})")
        self.result.verified = not problems
