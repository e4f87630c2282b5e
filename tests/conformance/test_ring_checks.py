"""Hostile chains and ring layouts: every class is what the model says, the reference devices pass, bugs show.

Each hostile class of :mod:`vdpacert.conformance.machines.hostile` is posted on a real device (the
embedded sim-blk and sim-net behind the reference vhost-vdpa front), on split and packed rings,
with and without INDIRECT_DESC, on queues the device writes and queues it only reads: the model's
walk must name exactly that class, and the reference devices must leave every buffer alone and
use nothing. Then parents from the seeded-bug zoo (and one here, which takes a misaligned
descriptor area) show that :mod:`vdpacert.conformance.machines.ring_checks` names their bug with
a MUST clause.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vdpacert.conformance import clauses
from vdpacert.conformance.machines import ring_checks
from vdpacert.conformance.machines.datapath import DatapathMachine
from vdpacert.conformance.machines.datapath_blk import BlkDatapathMachine, blk_machine
from vdpacert.conformance.machines.datapath_net import net_machine
from vdpacert.conformance.machines.hostile import hostile_classes, hostile_menu, post_hostile, with_ring_choice
from vdpacert.conformance.mutants.registry import target_string
from vdpacert.impl.sim_blk import SimBlk
from vdpacert.model.chains import BAD_INPUTS, BadInput, ChainFault
from vdpacert.model.vring_packed import packed_ring_violations
from vdpacert.model.vring_split import split_ring_violations
from vdpacert.uapi import vhost_types as T  # noqa: N812
from vdpacert.uapi.virtio_config import VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1

BASE = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_ACCESS_PLATFORM
CHOICES = [(packed, indirect) for packed in (False, True) for indirect in (False, True)]
MUST = {c.id for c in clauses.catalog() if c.is_must}


@pytest.fixture(autouse=True)
def _close_targets() -> Iterator[None]:
    yield
    DatapathMachine.close_targets()


class Recorder:
    """A checker that keeps what it is told (the machines' count/fail, without a machine)."""

    def __init__(self) -> None:
        self.counted: set[str] = set()

    def count(self, clause: str) -> None:
        self.counted.add(clause)

    def fail(self, clause: str, message: str) -> Exception:
        self.counted.add(clause)
        return Broken(clause, message)


class Broken(Exception):
    def __init__(self, clause: str, message: str) -> None:
        super().__init__(f"{clause}: {message}")
        self.clause = clause


def machine_for(target: str, packed: bool, indirect: bool) -> DatapathMachine:
    """A datapath machine on ``target`` (a net one for sim-net, else a blk one), brought up with that ring choice."""
    machine = net_machine(target)() if target.startswith("sim-net") else blk_machine(target)()
    machine.bring_up(with_ring_choice(BASE, packed, indirect))
    return machine


def post_and_check(machine: DatapathMachine, queue: int, writable: bool, bad: BadInput,
                   checker: Recorder) -> ChainFault:
    """One hostile step as the machine takes it, up to the used ring: post, the model's verdict, provoke, check."""
    assert machine.session is not None
    ring = machine.ring(queue)
    snapshot = machine.layout.snapshot()
    position = ring_checks.device_position(ring)
    chain = post_hostile(ring, bad, writable=writable, unmapped_iova=machine.unmapped_iova,
                         ro_alias=machine.ro_alias, wo_alias=machine.wo_alias)
    aliases = [(machine.ro_alias, machine.scratch, T.VHOST_ACCESS_RO),
               (machine.wo_alias, machine.scratch, T.VHOST_ACCESS_WO)]
    fault = ring_checks.model_verdict(ring, position, machine.features,
                                      ring_checks.layout_translator(machine.layout, aliases))
    assert isinstance(fault, ChainFault), f"{bad}: the model takes the chain as {fault}"
    machine.provoke(queue)
    machine.target.service()
    ring_checks.check_after_bad(checker, machine.layout, snapshot, machine.session.rings.values(), ring, chain,
                                fault, packed=machine.packed)
    return fault


# ----- the menu and the probes, as the model decides them ------------------------------------------------------

def test_the_menu_holds_every_class_once_with_features_that_allow_it() -> None:
    offered = BASE | with_ring_choice(0, True, True)
    for packed, indirect in CHOICES:
        features = with_ring_choice(BASE, packed, indirect)
        menu = hostile_menu(features, offered, aliases=True)
        assert [bad for bad, _ in menu] == list(BAD_INPUTS), "table order, whatever the features"
        for bad, chosen in menu:
            allowed = hostile_classes(bool(chosen >> 34 & 1), bool(chosen >> 28 & 1), True)
            assert bad in allowed
            if bad in hostile_classes(packed, indirect, True):
                assert chosen == features, f"{bad} is written under the current features when they allow it"
    split_only = hostile_menu(BASE, BASE | with_ring_choice(0, False, True), aliases=False)
    assert {bad for bad, _ in split_only} == set(BAD_INPUTS) - {BadInput.DESC_NOT_AVAILABLE,
                                                                 BadInput.ADDRESS_PERMISSION}


@pytest.mark.parametrize("packed", [False, True])
def test_each_layout_probe_breaks_exactly_the_rule_it_counts(packed: bool) -> None:
    desc, driver, device = 0x10000, 0x11000, 0x12000
    probes = ring_checks.layout_probes(packed, 0, 16, desc, driver, device)
    layout = "packed" if packed else "split"
    rules = [probe.rule for probe in probes]
    areas = (["descriptor_ring", "driver_event_suppression", "device_event_suppression"] if packed
             else ["descriptor_table", "available_ring", "used_ring"])
    sizes = 2 if packed else 3  # a packed ring may have 3 entries; 0 and 65536 break both layouts
    assert rules == [f"ring.{layout}.queue_size"] * sizes + [f"ring.{layout}.{area}.alignment" for area in areas]
    violations = packed_ring_violations if packed else split_ring_violations
    assert not violations(16, desc, driver, device), "the ring the probes start from breaks nothing"


# ----- the reference devices --------------------------------------------------------------------------------

@pytest.mark.parametrize(("target", "queues"), [("sim-blk:capacity=256", [(0, True), (0, False)]),
                                                ("sim-net:mq=2", [(0, True), (1, False)])])
@pytest.mark.parametrize(("packed", "indirect"), CHOICES)
def test_every_class_is_what_the_model_says_and_the_reference_device_refuses_it(
        target: str, queues: list[tuple[int, bool]], packed: bool, indirect: bool) -> None:
    machine = machine_for(target, packed, indirect)
    checker = Recorder()
    for queue, writable in queues:
        for bad in hostile_classes(packed, indirect, machine.aliases):
            fault = post_and_check(machine, queue, writable, bad, checker)
            assert fault.bad is bad, f"{bad.value} on queue {queue}: the model says {fault}"
            if bad is not BadInput.DESC_NOT_AVAILABLE:
                assert machine.status() & VIRTIO_CONFIG_S_NEEDS_RESET, f"{bad.value}: no DEVICE_NEEDS_RESET"
            machine.bring_up(machine.features)
    layout = "packed" if packed else "split"
    assert {"suite.lockstep.used_ring", "ring.device.bad_chain_not_used",
            f"ring.{layout}.device.no_write_readable"} <= checker.counted
    assert "suite.canary.no_write_outside_writable" in checker.counted
    machine.teardown()


@pytest.mark.parametrize("target", ["sim-blk:capacity=256", "sim-net:mq=2"])
@pytest.mark.parametrize("packed", [False, True])
def test_the_reference_devices_answer_every_layout_probe_as_the_model(target: str, packed: bool) -> None:
    machine = machine_for(target, packed, False)
    assert machine.session is not None
    ring = machine.ring(0)
    checker = Recorder()
    ring_checks.check_ring_layout(checker, machine.target, backend_features=machine.session.backend_features,
                                  features=machine.features, packed=packed, index=0, num=ring.num,
                                  addresses=ring.addresses)
    layout = "packed" if packed else "split"
    wanted = {f"ring.{layout}.queue_size", "vhost_vdpa.vring_num.invalid", "vhost_vdpa.vring_addr.align",
              "vhost_vdpa.vring_addr.desc_align"}
    assert wanted <= checker.counted
    assert sum(rule.endswith(".alignment") and rule.startswith(f"ring.{layout}.") for rule in checker.counted) == 3
    machine.bring_up(machine.features)  # the probes left the device at FEATURES_OK: it comes up again
    machine.teardown()


# ----- devices that break the rules -------------------------------------------------------------------------

def test_following_a_nested_indirect_table_is_a_must_failure() -> None:
    """The zoo's nested_indirect_followed serves the request in the nested table: a used len and canary writes."""
    machine = machine_for(target_string("nested_indirect_followed"), packed=False, indirect=True)
    with pytest.raises(Broken) as caught:
        post_and_check(machine, 0, True, BadInput.NESTED_INDIRECT, Recorder())
    assert caught.value.clause == "ring.device.bad_chain_not_used"
    assert caught.value.clause in MUST
    machine.teardown()


def test_the_nested_table_writes_show_as_canary_writes() -> None:
    machine = machine_for(target_string("nested_indirect_followed"), packed=False, indirect=True)
    assert machine.session is not None
    ring = machine.ring(0)
    snapshot = machine.layout.snapshot()
    post_hostile(ring, BadInput.NESTED_INDIRECT, writable=True, unmapped_iova=machine.unmapped_iova,
                 ro_alias=machine.ro_alias, wo_alias=machine.wo_alias)
    machine.provoke(0)
    machine.target.service()
    findings = ring_checks.memory_findings(machine.layout, snapshot, ring.outstanding.values(), packed=False)
    assert [f.clause for f in findings] == ["suite.canary.no_write_outside_writable"]
    machine.teardown()


def test_a_status_byte_written_into_a_readable_buffer_is_named() -> None:
    """write_into_readable answers a chain with no writable part by writing over its last readable byte."""
    machine = machine_for(target_string("write_into_readable"), packed=False, indirect=True)
    with pytest.raises(Broken) as caught:
        post_and_check(machine, 0, False, BadInput.CHAIN_TOO_LONG, Recorder())
    assert caught.value.clause == "ring.split.device.no_write_readable"
    machine.teardown()


def test_a_looping_chain_served_after_a_watchdog_is_a_must_failure() -> None:
    """descriptor_cycle_unbounded walks the loop 10 x num deep and then serves what it gathered: the loop's
    writable buffer is not a buffer the driver made available, so its write is a MUST failure."""
    machine = machine_for(target_string("descriptor_cycle_unbounded"), packed=False, indirect=False)
    with pytest.raises(Broken) as caught:
        post_and_check(machine, 0, True, BadInput.DESCRIPTOR_LOOP, Recorder())
    assert caught.value.clause in MUST
    machine.teardown()


class DescAlignUnchecked(SimBlk):
    """sim-blk whose set_vq_address takes any descriptor area, as Linux's vdpa_sim does."""

    def __init__(self, name: str = "desc-align-unchecked") -> None:
        super().__init__(name, capacity=256)

    def set_vq_address(self, index: int, desc_area: int, driver_area: int, device_area: int) -> None:
        super().set_vq_address(index, desc_area & ~15, driver_area, device_area)
        self.vq_config(index).desc_area = desc_area


def test_a_misaligned_descriptor_area_accepted_is_named_unless_declared() -> None:
    machine = machine_for(f"python:{__name__}:DescAlignUnchecked", packed=False, indirect=False)
    assert isinstance(machine, BlkDatapathMachine) and machine.session is not None
    ring = machine.ring(0)

    def probe() -> Recorder:
        assert machine.session is not None
        checker = Recorder()
        ring_checks.check_ring_layout(checker, machine.target, backend_features=machine.session.backend_features,
                                      features=machine.features, packed=False, index=0, num=ring.num,
                                      addresses=ring.addresses)
        return checker

    with pytest.raises(Broken) as caught:
        probe()
    assert caught.value.clause == "vhost_vdpa.vring_addr.desc_align"
    machine.target.declared_quirks = frozenset({"vhost_vdpa.desc_alignment_unchecked"})
    try:
        checker = probe()  # declared: the probe the quirk decides is left to the lockstep's quirk report
    finally:
        machine.target.declared_quirks = None
    assert "ring.split.descriptor_table.alignment" not in checker.counted
    assert "ring.split.available_ring.alignment" in checker.counted
    machine.bring_up(machine.features)
    machine.teardown()
