"""The virtio-net datapath machine: clean on the reference device, and it catches a device that loses frames.

The machine drives sim-net (two queue pairs offered, so VQ_PAIRS_SET can succeed) with traffic,
control commands, hostile chains, suspend/resume and resets, comparing every step with the model
(:class:`vdpacert.model.net.LoopbackNet`) and checking canaries and the dirty log. A parent defined
here, the reference device with a loopback that drops every third frame it moves, must fail it
with a loopback clause.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from vdpacert.conformance.machines.datapath import DatapathMachine, clause_of
from vdpacert.conformance.machines.datapath_net import net_machine
from vdpacert.impl.net_datapath import NetLoopback
from vdpacert.impl.sim_net import SimNet
from vdpacert.impl.virtqueue import VirtQueue

CLEAN = settings(max_examples=25, stateful_step_count=25, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
HUNT = settings(max_examples=60, stateful_step_count=25, deadline=None, phases=[Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.fixture(autouse=True)
def _close_targets() -> Iterator[None]:
    yield
    DatapathMachine.close_targets()


class _DropEveryThird:
    """A loopback that moves one frame per run and, every third run, moves it through a 68-byte MTU."""

    def __init__(self, features: int, mtu: int) -> None:
        self.good = NetLoopback.from_features(features, mtu, budget=1)
        self.bad = NetLoopback.from_features(features, 68, budget=1)
        self.runs = 0
        self.last = self.good

    def run(self, tx: VirtQueue, rx: VirtQueue) -> tuple[int, int, bool, bool]:
        self.runs += 1
        self.last = self.bad if self.runs % 3 == 0 else self.good
        return self.last.run(tx, rx)

    @property
    def more(self) -> bool:
        return self.last.more


class DropsFrames(SimNet):
    """The reference device whose datapath silently loses frames (a classic DMA-ring bug)."""

    def _loopback(self, pair: int) -> NetLoopback | None:
        if self._loopbacks is None:
            return None
        loop = self._loopbacks.get(pair)
        if loop is None:
            loop = self._loopbacks[pair] = _DropEveryThird(self.features, self.mtu)  # type: ignore[assignment]
        return loop


def test_net_machine_runs_clean_on_sim_net() -> None:
    machine = net_machine("sim-net:mq=2")
    run_state_machine_as_test(machine, settings=CLEAN)
    exercised = machine.clause_counts
    for clause in ("net.loopback.no_loss", "net.loopback.payload_intact", "suite.lockstep.used_ring",
                   "ring.device.writes_only_given_memory", "ring.device.bad_chain_not_used",
                   "ring.device.needs_reset_on_error", "suite.dirty_log.covers_writes",
                   "suite.dirty_log.covers_used_ring", "suite.lockstep.vq_state", "suite.suspend.no_progress",
                   "suite.lockstep.config"):
        assert exercised[clause] > 0, f"{clause} was never exercised"
    assert sum(n for c, n in exercised.items() if c.startswith("ring.bad_input.")) > 0


def test_a_device_that_drops_frames_is_caught() -> None:
    machine = net_machine(f"python:{__name__}:DropsFrames")
    with pytest.raises(AssertionError) as caught:
        run_state_machine_as_test(machine, settings=HUNT)
    # The lost frame is reported by whichever check first waits for it: the loopback's, or the one after a
    # resume that expects every frame kicked before the suspend (a lost frame then looks like a lost kick).
    assert clause_of(caught.value) in {"net.loopback.no_loss", "suite.lockstep.used_ring", "net.tx.looped_back",
                                       "suite.suspend.kick_not_lost"}
