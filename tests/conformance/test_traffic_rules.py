"""Control operations checked with traffic: honest reference devices pass every scenario, each seeded bug is named.

The scenarios of :mod:`vdpacert.conformance.machines.traffic_rules` run here one at a time on a real
machine (the net or blk datapath machine over an embedded target), called directly rather than drawn
by the state machine, so every scenario is shown on split and packed rings. On sim-net and sim-blk
each one passes and counts its clauses; on the mutant built to break it, it fails naming the clause.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from vdpacert.conformance.machines import traffic_rules as tr
from vdpacert.conformance.machines.datapath import DatapathMachine, clause_of
from vdpacert.conformance.machines.datapath_blk import blk_machine
from vdpacert.conformance.machines.datapath_net import net_machine
from vdpacert.conformance.mutants.registry import MUTANTS, target_string
from vdpacert.uapi.virtio_config import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1

FEW = settings(max_examples=4, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FIRST_FAILURE = settings(FEW, phases=[Phase.generate])
Scenario = Callable[[DatapathMachine, st.DataObject], None]


@pytest.fixture(autouse=True)
def _close_targets() -> Iterator[None]:
    yield
    DatapathMachine.close_targets()


def machine_class(target: str) -> type[DatapathMachine]:
    """The datapath machine of ``target``'s device type (a mutant's base device decides for a mutant)."""
    name = target.split("name=", 1)[1] if "name=" in target else ""
    kind = MUTANTS[name].base_target if name else target.split(":", 1)[0]
    return net_machine(target) if kind == "sim-net" else blk_machine(target)


def brought_up(cls: type[DatapathMachine], *, packed: bool) -> DatapathMachine:
    """A new machine (a new device), brought up with the plainest features on the chosen ring layout."""
    machine = cls()
    features = 1 << VIRTIO_F_VERSION_1 | machine.offered & 1 << VIRTIO_F_ACCESS_PLATFORM
    machine.bring_up(features | (1 << VIRTIO_F_RING_PACKED if packed else 0))
    machine.snapshot = machine.layout.snapshot()
    return machine


def probe(machine: DatapathMachine, *, writes: bool = True) -> tr.Probe:
    return next(p for p in machine.probes() if p.writes == writes)


def translation(name: str, *, writes: bool = True) -> Scenario:
    def run(machine: DatapathMachine, data: st.DataObject) -> None:
        machine.translation_scenario(data, name, probe(machine, writes=writes))
    return run


def asid(*, mapped: bool) -> Scenario:
    def run(machine: DatapathMachine, data: st.DataObject) -> None:
        del data
        machine.group_asid_scenario(probe(machine), mapped=mapped)
    return run


def suspended(machine: DatapathMachine, data: st.DataObject) -> None:
    machine.suspended_base_scenario(data, probe(machine))


def restored(machine: DatapathMachine, data: st.DataObject) -> None:
    machine.restored_base_scenario(data, probe(machine))


def traffic(machine: DatapathMachine, data: st.DataObject) -> None:
    chosen = probe(machine)
    for _ in range(data.draw(st.integers(1, 3))):
        machine.complete_probe(chosen, tr.USED_RING, "a request before the reset")


def nothing(machine: DatapathMachine, data: st.DataObject) -> None:
    del machine, data


def run_scenario(cls: type[DatapathMachine], scenario: Scenario, data: st.DataObject, *, packed: bool) -> None:
    """As a rule runs a scenario: a new device, quiet rings, the scenario, the restart, the per-step memory check."""
    machine = brought_up(cls, packed=packed)
    try:
        machine.quiesce()
        scenario(machine, data)
        machine.restart()
        machine.device_wrote_only_where_allowed()
    finally:
        machine.teardown()


#: Every scenario, and the clauses it exercises besides the restart's (status.device.reset_clears and
#: suite.status.no_use_before_driver_ok, checked for every scenario).
HONEST: dict[str, tuple[Scenario, tuple[str, ...]]] = {
    "invalidated": (translation("invalidated"), (tr.MAPS_RANGE, tr.NO_ACCESS, tr.TRANSLATE_MISS, tr.BAD_UNMAPPED)),
    "read_only": (translation("read_only"), (tr.NO_ACCESS, tr.BAD_PERMISSION)),
    "user_address": (translation("user_address"), (tr.NO_ACCESS, tr.TRANSLATE_MISS)),
    "traffic": (traffic, ()),
    "suspended_base": (suspended, (tr.VQ_STATE, tr.NO_PROGRESS, tr.KICK_NOT_LOST)),
    "restored_base": (restored, (tr.VQ_STATE, tr.NO_PROGRESS)),
}


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("target", ["sim-net", "sim-blk"])
@pytest.mark.parametrize("name", sorted(HONEST))
def test_reference_device_passes(name: str, target: str, packed: bool) -> None:
    scenario, clauses = HONEST[name]
    cls = machine_class(target)

    @FEW
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        run_scenario(cls, scenario, data, packed=packed)

    check()
    for clause in (*clauses, tr.RESET_CLEARS, tr.NO_USE_BEFORE_DRIVER_OK):
        assert cls.clause_counts[clause] > 0, f"{name} on {target}: {clause} never exercised"
    if name == "restored_base":
        assert cls.clause_counts[tr.RESTORED_PACKED if packed else tr.RESTORED_SPLIT] > 0
    assert (cls.clause_counts[tr.BASE_LAYOUT_AFTER_RESET] > 0) is packed


def test_write_only_mapping_under_a_buffer_the_device_reads() -> None:
    """blk only (a net probe's moved buffer is always written): the header behind a write-only mapping faults."""
    cls = machine_class("sim-blk")

    @FEW
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        run_scenario(cls, translation("write_only", writes=False), data, packed=False)

    check()
    assert cls.clause_counts[tr.BAD_PERMISSION] > 0
    assert cls.clause_counts[tr.NO_ACCESS] > 0


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "elsewhere"])
def test_group_bound_to_address_space_1_on_sim_net(mapped: bool, packed: bool) -> None:
    cls = machine_class("sim-net")

    @FEW
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        run_scenario(cls, asid(mapped=mapped), data, packed=packed)

    check()
    assert cls.clause_counts[tr.ASID_ISOLATION] > 0
    assert cls.clause_counts[tr.MAPS_RANGE if mapped else tr.TRANSLATE_MISS] > 0


def test_isolation_scenarios_need_two_address_spaces() -> None:
    """sim-net has two address spaces (the control queue's own group may get the second); sim-blk has one."""
    for target, capable in (("sim-net", True), ("sim-blk", False)):
        machine = brought_up(machine_class(target), packed=False)
        try:
            assert machine.asid_capable() is capable
        finally:
            machine.teardown()


CAUGHT: list[tuple[str, Scenario, bool, str]] = [
    ("iotlb_invalidate_ignored", translation("invalidated"), False, tr.NO_ACCESS),
    ("iotlb_invalidate_ignored", translation("invalidated", writes=False), True, tr.NO_ACCESS),
    ("identity_map_kept", translation("user_address"), False, tr.NO_ACCESS),
    ("iotlb_perm_ignored", translation("read_only"), True, tr.NO_ACCESS),
    ("iotlb_perm_ignored", translation("write_only", writes=False), False, tr.NO_ACCESS),
    ("asid_ignored", asid(mapped=True), False, tr.ASID_ISOLATION),
    ("asid_ignored", asid(mapped=False), True, tr.ASID_ISOLATION),
    ("consume_before_driver_ok", nothing, False, tr.NO_USE_BEFORE_DRIVER_OK),
    ("consume_before_driver_ok", nothing, True, tr.NO_USE_BEFORE_DRIVER_OK),
    ("reset_keeps_vq_state", traffic, True, tr.RESET_CLEARS),
    ("reset_keeps_vq_state", traffic, False, tr.RESET_CLEARS),
    ("vring_base_from_avail_idx", suspended, False, tr.VQ_STATE),
    ("vring_base_from_avail_idx", restored, False, tr.VQ_STATE),
    ("set_vring_base_ignored", restored, False, tr.VQ_STATE),
    ("set_vring_base_ignored", restored, True, tr.VQ_STATE),
]


@pytest.mark.parametrize(("mutant", "scenario", "packed", "clause"), CAUGHT,
                         ids=[f"{m}-{i}" for i, (m, _, _, _) in enumerate(CAUGHT)])
def test_mutant_is_caught(mutant: str, scenario: Scenario, packed: bool, clause: str) -> None:
    cls = machine_class(target_string(mutant))

    @FIRST_FAILURE
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        run_scenario(cls, scenario, data, packed=packed)

    # ClauseViolation (an AssertionError) when the lockstep module is there, DatapathViolation otherwise
    with pytest.raises(Exception) as caught:
        check()
    assert clause_of(caught.value) == clause, str(caught.value)
