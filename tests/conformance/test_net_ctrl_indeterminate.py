"""A MAC_ADDR_SET the driver malformed leaves the mac open; a well-formed one still binds it exactly.

Linux 6.12's vdpa_sim_net pulls MAC_ADDR_SET's data straight into its config mac: fewer than 6 bytes
are copied over the start of the old address and answered ERR, more than 6 are answered OK with the
first 6 taken, and the feature (CTRL_MAC_ADDR) is not looked at. The spec binds only the driver there
(§5.1.6.5.2: the data is the 6-byte address; §5.1.3: only with CTRL_MAC_ADDR), so the net machine
must pass such a device: the OK acks are SHOULD warnings, the mac it then shows is adopted (a
resync). The parents below are the reference device with that one handler changed; the second
applies a *well-formed* MAC_ADDR_SET byte-swapped, which breaks the MUST (net.ctrl.MAC_ADDR_SET.ok
via the config mac) and must still be caught.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from vdpacert.conformance.machines.datapath import DatapathMachine, clause_of
from vdpacert.conformance.machines.datapath_net import NetDatapathMachine, net_machine
from vdpacert.impl.net_ctrl import MAX_ACK_AREA, MAX_COMMAND, apply_command
from vdpacert.impl.sim_net import SimNet
from vdpacert.uapi import virtio_net as N  # noqa: N812

RUN = settings(max_examples=12, stateful_step_count=20, deadline=None, phases=[Phase.generate],
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
MAC_ADDR_SET = bytes([N.VIRTIO_NET_CTRL_MAC, N.VIRTIO_NET_CTRL_MAC_ADDR_SET])


@pytest.fixture(autouse=True)
def _close_targets() -> Iterator[None]:
    yield
    DatapathMachine.close_targets()


class _OwnMacAddrSet(SimNet):
    """The reference device, with MAC_ADDR_SET handled by :meth:`mac_addr_set` (every other command as before)."""

    def mac_addr_set(self, data: bytes) -> int:
        raise NotImplementedError

    def _command(self, command: bytes) -> int:
        if command[:2] == MAC_ADDR_SET:
            return self.mac_addr_set(command[2:])
        ack, new = apply_command(self.ctrl, self.features, command)
        if new is not self.ctrl:
            self.ctrl.adopt(new)
        return ack

    def _process_ctrl(self, index: int) -> None:
        vq = self.vq(index)
        before_mac, before_pairs, handled = self.ctrl.mac, self.active_pairs, 0
        try:
            while (chain := vq.pop_chain()) is not None:
                handled += 1
                if not 0 < chain.writable_len <= MAX_ACK_AREA:
                    vq.push_chain(chain, 0)
                    continue
                ack = self._command(vq.read_chain(chain)) if chain.readable_len <= MAX_COMMAND else N.VIRTIO_NET_ERR
                reply = bytes(chain.writable_len - 1) + bytes([ack])
                vq.write_chain(chain, 0, reply)
                vq.push_chain(chain, len(reply))
        finally:
            if self.ctrl.mac != before_mac:
                self.update_config(N.VIRTIO_NET_CONFIG_MAC, self.ctrl.mac)
        if handled and vq.notify_needed():
            self.signal_callback(self.vq_config(index).cb)
        for pair in range(before_pairs, self.active_pairs):
            self._run_pair(pair)


class VdpaSimMacCopy(_OwnMacAddrSet):
    """vdpa_sim_net's handler: copy up to 6 bytes of data over the mac; OK only when 6 were copied."""

    def mac_addr_set(self, data: bytes) -> int:
        copied = data[:6]
        self.ctrl.mac = copied + self.ctrl.mac[len(copied):]
        return N.VIRTIO_NET_OK if len(copied) == 6 else N.VIRTIO_NET_ERR


class ByteSwapsMac(_OwnMacAddrSet):
    """A firmware bug: a well-formed address is stored byte-swapped (malformed ones are refused as they should)."""

    def mac_addr_set(self, data: bytes) -> int:
        if len(data) != 6 or not self.features >> N.VIRTIO_NET_F_CTRL_MAC_ADDR & 1:
            return N.VIRTIO_NET_ERR
        self.ctrl.mac = data[::-1]
        return N.VIRTIO_NET_OK


class _Watched(NetDatapathMachine):
    """The net machine, keeping every example's resyncs and warnings for the test to read."""

    resynced: ClassVar[Counter[str]] = Counter()
    warnings: ClassVar[Counter[str]] = Counter()

    def teardown(self) -> None:
        type(self).resynced.update(self.resyncs)
        type(self).warnings.update(clause for clause, _ in self.warned)
        super().teardown()


def _watched(target: str) -> type[_Watched]:
    """A :class:`_Watched` bound to ``target``, with counters of its own (like :func:`net_machine`)."""
    name = "Watched_" + "".join(c if c.isalnum() else "_" for c in target)
    return type(name, (_Watched,), {"TARGET": target, "clause_counts": Counter(), "resynced": Counter(),
                                    "warnings": Counter()})


def test_vdpa_sim_mac_handler_passes_with_the_mac_resynced() -> None:
    machine = _watched(f"python:{__name__}:VdpaSimMacCopy")
    run_state_machine_as_test(machine, settings=RUN)
    exercised = machine.clause_counts
    for clause in ("suite.lockstep.config", "net.ctrl.MAC_ADDR_SET.ok", "net.ctrl.MAC_ADDR_SET.payload_length",
                   "net.ctrl.driver.MAC_ADDR_SET.payload_length", "net.ctrl.MAC_ADDR_SET.not_negotiated"):
        assert exercised[clause] > 0, f"{clause} was never exercised"
    # A short payload changed part of the mac: the model took the device's mac, and said so.
    assert machine.resynced["mac left open by a malformed MAC_ADDR_SET"] > 0
    # A long payload (and one without CTRL_MAC_ADDR) acked OK: a SHOULD warning each, never a failure.
    assert machine.warnings["net.ctrl.MAC_ADDR_SET.payload_length"] > 0
    assert machine.warnings["net.ctrl.MAC_ADDR_SET.not_negotiated"] > 0
    assert set(machine.warnings) <= {"net.ctrl.MAC_ADDR_SET.payload_length", "net.ctrl.MAC_ADDR_SET.not_negotiated"}


def test_reference_device_needs_no_resync() -> None:
    machine = _watched("sim-net")
    run_state_machine_as_test(machine, settings=RUN)
    assert machine.clause_counts["net.ctrl.driver.MAC_ADDR_SET.payload_length"] > 0
    assert not machine.resynced and not machine.warnings


def test_a_well_formed_mac_stored_wrongly_is_caught() -> None:
    machine = net_machine(f"python:{__name__}:ByteSwapsMac")
    with pytest.raises(AssertionError) as caught:
        run_state_machine_as_test(machine, settings=RUN)
    assert clause_of(caught.value) == "suite.lockstep.config"
    assert "the model says" in str(caught.value)
