"""The virtio-blk datapath machine: clean on the reference device, and it catches a disk that is bigger than it says.

The machine drives sim-blk (256 sectors, so the capacity boundary is hit often) with every request
type, malformed requests, hostile chains, suspend/resume and resets, comparing every answer with
:class:`vdpacert.model.blk.BlkDiskModel`. A parent defined here reports a capacity 16 sectors short
of its ramdisk, so it accepts writes past the capacity it advertises: the machine must name
``blk.OUT.beyond_capacity`` (or the read twin).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from vdpacert.conformance.machines.datapath import DatapathMachine, clause_of
from vdpacert.conformance.machines.datapath_blk import blk_machine
from vdpacert.impl.sim_blk import SimBlk
from vdpacert.uapi import virtio_blk as B  # noqa: N812

CLEAN = settings(max_examples=25, stateful_step_count=25, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
HUNT = settings(max_examples=60, stateful_step_count=25, deadline=None, phases=[Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
ADVERTISED = 64


@pytest.fixture(autouse=True)
def _close_targets() -> Iterator[None]:
    yield
    DatapathMachine.close_targets()


class WritesPastCapacity(SimBlk):
    """Advertises ADVERTISED sectors over a larger ramdisk: requests past the capacity succeed."""

    def __init__(self, name: str = "past-capacity") -> None:
        super().__init__(name, capacity=ADVERTISED + 16)
        self._advertise()

    def _advertise(self) -> None:
        self.update_config(B.VIRTIO_BLK_CONFIG_CAPACITY, struct.pack("<Q", ADVERTISED), notify=False)

    def reset_device(self) -> None:
        super().reset_device()
        self._advertise()


def test_blk_machine_runs_clean_on_sim_blk() -> None:
    machine = blk_machine("sim-blk:capacity=256")
    run_state_machine_as_test(machine, settings=CLEAN)
    exercised = machine.clause_counts
    for clause in ("blk.IN.ok", "blk.OUT.ok", "blk.OUT.beyond_capacity", "blk.GET_ID.ok", "blk.data.integrity",
                   "ring.device.writes_only_given_memory", "ring.device.needs_reset_on_error",
                   "suite.dirty_log.covers_writes", "suite.suspend.kick_not_lost", "suite.lockstep.vq_state"):
        assert exercised[clause] > 0, f"{clause} was never exercised"


def test_a_disk_that_writes_past_capacity_is_caught() -> None:
    machine = blk_machine(f"python:{__name__}:WritesPastCapacity")
    with pytest.raises(AssertionError) as caught:
        run_state_machine_as_test(machine, settings=HUNT)
    assert clause_of(caught.value) in {"blk.OUT.beyond_capacity", "blk.IN.beyond_capacity",
                                       "blk.WRITE_ZEROES.beyond_capacity", "blk.DISCARD.beyond_capacity"}
