"""virtio-net coverage: every control command in each of its cases, transmit headers that break a driver rule,
inactive pairs and loopback order, each a comparison with the model that a broken device fails.

The builders (:mod:`vdpacert.conformance.machines.net_ctrl`, :mod:`~vdpacert.conformance.machines.net_tx`)
are checked against the model directly: each command lands in the case it aims at, each packet breaks the
driver rule it names. The datapath machine then runs the quick profile's size, derandomized as CI runs
it, on sim-net with four pairs and must reach every net clause sim-net can show; and devices with one bug
each (defined here, or from the mutant zoo) must fail it naming the clause.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test

from vdpacert.conformance import clauses
from vdpacert.conformance.machines.datapath import DatapathMachine, clause_of
from vdpacert.conformance.machines.datapath_net import net_machine
from vdpacert.conformance.machines.net_ctrl import (
    PLAN,
    ROWS,
    CtrlRequest,
    draw_request,
    keeps_broadcast,
    preview,
    promisc_on,
)
from vdpacert.conformance.machines.net_tx import CSUM_OFFSETS, CSUM_START, TxKind, build_packet, fixed_point_frame
from vdpacert.conformance.mutants.registry import target_string
from vdpacert.impl.sim_net import SimNet
from vdpacert.model.net import (
    CTRL_COMMANDS,
    CtrlCase,
    LoopbackNet,
    NetDeviceState,
    complete_checksum,
    decide_ctrl,
)
from vdpacert.uapi import virtio_net as N  # noqa: N812
from vdpacert.uapi.virtio_config import VIRTIO_F_VERSION_1

#: The quick profile's size, derandomized as CI runs it (CI=true).
QUICK_CI = settings(max_examples=25, stateful_step_count=30, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))
HUNT = settings(max_examples=40, stateful_step_count=30, deadline=None, database=None, phases=[Phase.generate],
                suppress_health_check=list(HealthCheck))
EVERY_CTRL_FEATURE = (1 << VIRTIO_F_VERSION_1 | 1 << N.VIRTIO_NET_F_CTRL_VQ
                      | sum(1 << bit for bit in {row.feature for row in CTRL_COMMANDS.values()}))
#: Net clauses sim-net cannot show: features it does not offer (see the report's N/A proposals).
NOT_ON_SIM_NET = ("net.ctrl.VLAN_", "net.ctrl.driver.VLAN_", "net.ctrl.ANNOUNCE_ACK.ok",
                  "net.ctrl.ANNOUNCE_ACK.payload_length", "net.ctrl.driver.ANNOUNCE_ACK.payload_length",
                  "net.tx.gso_not_receivable")


@pytest.fixture(autouse=True)
def _close_targets() -> Iterator[None]:
    yield
    DatapathMachine.close_targets()


# ----- the builders against the model ------------------------------------------------------------------------

def test_the_plan_holds_every_case_of_every_command() -> None:
    planned = {(row.name if row else "unknown", aim) for row, aim in PLAN}
    wanted = {(row.name, case) for row in ROWS for case in row.cases() if case is not CtrlCase.NOT_NEGOTIATED}
    assert planned == wanted | {("unknown", CtrlCase.OK)}


@settings(max_examples=30, deadline=None, database=None)
@given(st.data())
def test_each_command_lands_in_the_case_it_aims_at(data: st.DataObject) -> None:
    for row, aim in PLAN:
        request = draw_request(data, row, aim, EVERY_CTRL_FEATURE, 4)
        decision = decide_ctrl(NetDeviceState(max_virtqueue_pairs=4), EVERY_CTRL_FEATURE, request.cls, request.cmd,
                               request.payload)
        if row is None:
            assert decision.rule == "net.ctrl.unknown"
            continue
        assert decision.rule == f"net.ctrl.{row.name}.{aim.value}", str(request)
        assert [v.rule for v in decision.driver_violations] == (
            [] if aim is CtrlCase.OK else [f"net.ctrl.driver.{row.name}.{aim.value}"])
        without = EVERY_CTRL_FEATURE & ~(1 << row.feature)
        other = draw_request(data, row, aim, without, 4)
        assert other.aim == "not_negotiated"
        assert decide_ctrl(NetDeviceState(max_virtqueue_pairs=4), without, other.cls, other.cmd,
                           other.payload).rule == f"net.ctrl.{row.name}.not_negotiated"


def test_broadcast_stays_deliverable_behind_promiscuous_mode() -> None:
    nobcast = CtrlRequest("RX_NOBCAST", N.VIRTIO_NET_CTRL_RX, N.VIRTIO_NET_CTRL_RX_NOBCAST, b"\x01", "ok")
    state = NetDeviceState()
    assert not all(keeps_broadcast(s) for s in preview(state, EVERY_CTRL_FEATURE, nobcast))
    on = preview(state, EVERY_CTRL_FEATURE, promisc_on())[0]
    assert all(keeps_broadcast(s) for s in preview(on, EVERY_CTRL_FEATURE, nobcast))


@pytest.mark.parametrize("offset", CSUM_OFFSETS)
@pytest.mark.parametrize("length", [64, 65, 200, 1514])
def test_a_fixed_point_frame_reads_the_same_checksummed_or_not(length: int, offset: int) -> None:
    for seq in range(40):
        frame = fixed_point_frame(seq, length, offset)
        assert complete_checksum(frame, CSUM_START, offset) == frame


PACKET_RULES = {
    TxKind.NUM_BUFFERS: ("net.driver.tx.num_buffers", True),
    TxKind.RX_FLAGS: ("net.driver.tx.flags", True),
    TxKind.CSUM_NOT_NEGOTIATED: ("net.driver.tx.flags_without_csum", True),
    TxKind.CSUM_BAD_OFFSETS: ("net.driver.tx.csum_offsets", False),
    TxKind.GSO: ("net.driver.tx.gso", False),
    TxKind.SHORT_HEADER: ("net.driver.tx.short_header", False),
    TxKind.OVER_MTU: ("net.driver.tx.mtu", False),
}


@settings(max_examples=20, deadline=None, database=None)
@given(st.data())
def test_each_packet_breaks_the_driver_rule_it_names(data: st.DataObject) -> None:
    base = 1 << VIRTIO_F_VERSION_1 | 1 << N.VIRTIO_NET_F_MTU
    csum = base | 1 << N.VIRTIO_NET_F_CSUM
    for kind, (rule, delivered) in PACKET_RULES.items():
        features = base if kind is TxKind.CSUM_NOT_NEGOTIATED else csum
        packet = build_packet(data, kind, 7, 200, features)
        outcome = LoopbackNet(features).transmit(1, packet.data)
        assert rule in [v.rule for v in outcome.driver_violations], kind
        assert outcome.accepted is delivered, kind
    plain = build_packet(data, TxKind.CSUM, 8, 200, csum)
    assert LoopbackNet(csum).transmit(1, plain.data).driver_violations == ()


# ----- the machine on sim-net ----------------------------------------------------------------------------------

def _net_clauses() -> list[str]:
    return [c.id for c in clauses.catalog() if c.id.startswith(("net.ctrl.", "net.tx.", "net.rx.", "net.driver.",
                                                                 "net.loopback."))]


def test_the_quick_profile_reaches_every_net_clause_sim_net_can_show() -> None:
    machine = net_machine("sim-net:mq=4")
    run_state_machine_as_test(machine, settings=QUICK_CI)
    counts = machine.clause_counts
    missing = [c for c in _net_clauses() if not counts[c] and not c.startswith(NOT_ON_SIM_NET)]
    assert missing == []


# ----- devices with one bug each ----------------------------------------------------------------------------

class ServesSwitchedOffPairs(SimNet):
    """Bug: VQ_PAIRS_SET is acked and remembered, but every pair keeps running (frames flow on switched-off pairs)."""

    @property
    def active_pairs(self) -> int:
        return self.max_vq_pairs if self.features >> N.VIRTIO_NET_F_MQ & 1 else 1


class ExtraModesRefused(SimNet):
    """Bug: CTRL_RX_EXTRA is offered, but the control queue answers its commands as if it were not negotiated."""

    def _process_ctrl(self, index: int) -> None:
        negotiated = self._features
        self._features = negotiated & ~(1 << N.VIRTIO_NET_F_CTRL_RX_EXTRA)
        try:
            super()._process_ctrl(index)
        finally:
            self._features = negotiated


def _caught(target: str) -> str | None:
    with pytest.raises(AssertionError) as caught:  # the lockstep's ClauseViolation
        run_state_machine_as_test(net_machine(target), settings=HUNT)
    return clause_of(caught.value)


def test_a_device_serving_switched_off_pairs_is_caught() -> None:
    assert _caught(f"python:{__name__}:ServesSwitchedOffPairs:max_vq_pairs=4") in {
        "net.tx.inactive_pair", "net.rx.inactive_pair"}


def test_a_device_refusing_the_extra_receive_modes_is_caught() -> None:
    caught = _caught(f"python:{__name__}:ExtraModesRefused")
    assert caught is not None and caught.startswith("net.ctrl.RX_") and caught.endswith(".ok")


def test_vq_pairs_above_the_maximum_acked_ok_is_reported() -> None:
    """The mutant zoo's mq_pairs_above_max (with two pairs, so MQ is offered): the ack the model refuses."""
    assert _caught(target_string("mq_pairs_above_max", max_vq_pairs=2)) == "net.ctrl.MQ_VQ_PAIRS_SET.bad_value"
