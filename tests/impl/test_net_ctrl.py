"""sim-net's control virtqueue: commands, acks and state on hand-built rings (virtio v1.3 §5.1.6.5)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vdpacert.impl.net_ctrl import MAX_COMMAND, NetCtrlState, apply_command, process_ctrl_queue
from vdpacert.impl.virtqueue import BAD_UNMAPPED, VirtQueue, VirtQueueError
from vdpacert.uapi.virtio_net import (
    VIRTIO_NET_CTRL_ANNOUNCE,
    VIRTIO_NET_CTRL_ANNOUNCE_ACK,
    VIRTIO_NET_CTRL_GUEST_OFFLOADS,
    VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET,
    VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET,
    VIRTIO_NET_CTRL_MAC_TABLE_SET,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_RSS_CONFIG,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_ALLMULTI,
    VIRTIO_NET_CTRL_RX_ALLUNI,
    VIRTIO_NET_CTRL_RX_NOBCAST,
    VIRTIO_NET_CTRL_RX_NOMULTI,
    VIRTIO_NET_CTRL_RX_NOUNI,
    VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_CTRL_VLAN,
    VIRTIO_NET_CTRL_VLAN_ADD,
    VIRTIO_NET_ERR,
    VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_RX_EXTRA,
    VIRTIO_NET_F_CTRL_VLAN,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_OK,
)

try:
    from .ring_driver import CANARY, Guest, PackedDriver, SplitDriver, device_queue, features
except ImportError:
    from ring_driver import CANARY, Guest, PackedDriver, SplitDriver, device_queue, features

CTRL = 1 << VIRTIO_NET_F_CTRL_VQ
ALL = CTRL | sum(1 << b for b in (VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_RX_EXTRA, VIRTIO_NET_F_CTRL_MAC_ADDR,
                                   VIRTIO_NET_F_MQ, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_CTRL_VLAN))
MAC0 = bytes([0x52, 0x54, 0, 0x12, 0x34, 0x56])
MAC1 = bytes([0x02, 0xAA, 0xBB, 0xCC, 0xDD, 0xEE])


def table(*macs: bytes) -> bytes:
    return struct.pack("<I", len(macs)) + b"".join(macs)


class Ctrl:
    """A control queue: driver half, device VirtQueue, the state sim-net would keep."""

    def __init__(self, guest: Guest, ring: str = "split", *, features_: int = ALL, max_pairs: int = 4) -> None:
        self.driver = PackedDriver(guest, 8) if ring == "packed" else SplitDriver(guest, 8)
        self.vq: VirtQueue = device_queue(guest, self.driver, features(packed=ring == "packed"))
        self.features = features_
        self.state = NetCtrlState(mac=MAC0, max_virtqueue_pairs=max_pairs)

    def submit(self, cls: int, cmd: int, data: bytes = b"", *, ack_area: int = 1, split: bool = True) -> int:
        readable = [bytes([cls, cmd]), data] if split and data else [bytes([cls, cmd]) + data]
        return self.driver.add(readable, [ack_area] if ack_area else [])

    def run(self, cls: int, cmd: int, data: bytes = b"") -> int:
        """One command through the ring: the ack byte the driver reads back."""
        head = self.submit(cls, cmd, data)
        result = process_ctrl_queue(self.vq, self.state, self.features)
        assert result.processed == 1
        ((used_head, length),) = self.driver.get_used()
        assert (used_head, length) == (head, 1)
        ack = self.driver.written(head)[0]
        assert result.acks == (ack,)
        return ack


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


@pytest.fixture(params=["split", "packed"])
def ctrl(guest: Guest, request: pytest.FixtureRequest) -> Ctrl:
    return Ctrl(guest, request.param)


# ---- MAC ----

def test_mac_addr_set_changes_the_mac(ctrl: Ctrl) -> None:
    assert ctrl.run(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, MAC1) == VIRTIO_NET_OK
    assert ctrl.state.mac == MAC1


@pytest.mark.parametrize(("features_", "data"), [
    (ALL & ~(1 << VIRTIO_NET_F_CTRL_MAC_ADDR), MAC1),    # not negotiated
    (ALL, MAC1[:5]),                                      # short
    (ALL, MAC1 + b"\0"),                                  # long
])
def test_mac_addr_set_refused(guest: Guest, features_: int, data: bytes) -> None:
    ctrl = Ctrl(guest, features_=features_)
    before = replace(ctrl.state)
    assert ctrl.run(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, data) == VIRTIO_NET_ERR
    assert ctrl.state == before


def test_mac_table_set(ctrl: Ctrl) -> None:
    data = table(MAC1, MAC0) + table(bytes([1, 0, 0x5E, 0, 0, 1]))
    assert ctrl.run(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, data) == VIRTIO_NET_OK
    assert ctrl.state.unicast_macs == (MAC1, MAC0)
    assert ctrl.state.multicast_macs == (bytes([1, 0, 0x5E, 0, 0, 1]),)
    assert ctrl.run(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, table() + table()) == VIRTIO_NET_OK
    assert ctrl.state.unicast_macs == () == ctrl.state.multicast_macs


@pytest.mark.parametrize(("features_", "data"), [
    (ALL & ~(1 << VIRTIO_NET_F_CTRL_RX), table(MAC1) + table()),      # needs CTRL_RX
    (ALL, table(MAC1) + table() + b"\0"),                              # trailing byte
    (ALL, table(MAC1)),                                                # multicast table missing
    (ALL, table(MAC1) + struct.pack("<I", 2) + MAC0),                  # multicast table truncated
    (ALL, struct.pack("<I", 0xFFFFFFFF) + MAC1 + table()),             # absurd entry count
    (ALL, b"\0\0\0"),
])
def test_mac_table_set_refused(guest: Guest, features_: int, data: bytes) -> None:
    ctrl = Ctrl(guest, features_=features_)
    ctrl.state.unicast_macs = (MAC0,)
    before = replace(ctrl.state)
    assert ctrl.run(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, data) == VIRTIO_NET_ERR
    assert ctrl.state == before


# ---- MQ ----

@pytest.mark.parametrize("pairs", [1, 2, 4])
def test_vq_pairs_set_accepted(ctrl: Ctrl, pairs: int) -> None:
    assert ctrl.run(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", pairs)) == VIRTIO_NET_OK
    assert ctrl.state.active_pairs == pairs


@pytest.mark.parametrize(("features_", "data"), [
    (ALL, struct.pack("<H", 0)),
    (ALL, struct.pack("<H", 5)),                      # above max_virtqueue_pairs (4)
    (ALL, struct.pack("<H", 0x8000)),
    (ALL, b"\x02"),                                   # short
    (ALL, struct.pack("<I", 2)),                      # long
    (ALL & ~(1 << VIRTIO_NET_F_MQ), struct.pack("<H", 2)),
])
def test_vq_pairs_set_refused(guest: Guest, features_: int, data: bytes) -> None:
    ctrl = Ctrl(guest, features_=features_)
    ctrl.state.active_pairs = 3
    assert ctrl.run(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, data) == VIRTIO_NET_ERR
    assert ctrl.state.active_pairs == 3


# ---- RX mode ----

RX_COMMANDS = [
    (VIRTIO_NET_CTRL_RX_PROMISC, "promisc", VIRTIO_NET_F_CTRL_RX),
    (VIRTIO_NET_CTRL_RX_ALLMULTI, "allmulti", VIRTIO_NET_F_CTRL_RX),
    (VIRTIO_NET_CTRL_RX_ALLUNI, "alluni", VIRTIO_NET_F_CTRL_RX_EXTRA),
    (VIRTIO_NET_CTRL_RX_NOMULTI, "nomulti", VIRTIO_NET_F_CTRL_RX_EXTRA),
    (VIRTIO_NET_CTRL_RX_NOUNI, "nouni", VIRTIO_NET_F_CTRL_RX_EXTRA),
    (VIRTIO_NET_CTRL_RX_NOBCAST, "nobcast", VIRTIO_NET_F_CTRL_RX_EXTRA),
]


@pytest.mark.parametrize(("cmd", "name", "bit"), RX_COMMANDS)
def test_rx_mode_commands_switch_their_flag(guest: Guest, cmd: int, name: str, bit: int) -> None:
    ctrl = Ctrl(guest, features_=CTRL | (1 << bit))
    start = getattr(ctrl.state, name)
    assert ctrl.run(VIRTIO_NET_CTRL_RX, cmd, bytes([0 if start else 1])) == VIRTIO_NET_OK
    assert getattr(ctrl.state, name) is (not start)
    assert ctrl.run(VIRTIO_NET_CTRL_RX, cmd, b"\x00") == VIRTIO_NET_OK
    assert getattr(ctrl.state, name) is False
    others = {n: getattr(ctrl.state, n) for _, n, _ in RX_COMMANDS if n != name}
    assert others == {n: getattr(NetCtrlState(), n) for n in others}


@pytest.mark.parametrize(("cmd", "name", "bit"), RX_COMMANDS)
def test_rx_mode_commands_refused_without_their_feature_or_with_bad_data(guest: Guest, cmd: int, name: str,
                                                                         bit: int) -> None:
    ctrl = Ctrl(guest, features_=ALL & ~(1 << bit))
    before = replace(ctrl.state)
    assert ctrl.run(VIRTIO_NET_CTRL_RX, cmd, b"\x01") == VIRTIO_NET_ERR
    ctrl.features = ALL
    assert ctrl.run(VIRTIO_NET_CTRL_RX, cmd, b"") == VIRTIO_NET_ERR
    assert ctrl.run(VIRTIO_NET_CTRL_RX, cmd, b"\x01\x01") == VIRTIO_NET_ERR
    assert ctrl.state == before


def test_rx_mode_reset_values() -> None:
    state = NetCtrlState(mac=MAC0)
    assert (state.promisc, state.allmulti, state.alluni, state.nomulti, state.nouni, state.nobcast) == (
        True, False, False, False, False, False)


# ---- the rest ----

def test_announce_ack_clears_the_pending_announcement(ctrl: Ctrl) -> None:
    ctrl.state.announce_pending = True
    assert ctrl.run(VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK) == VIRTIO_NET_OK
    assert not ctrl.state.announce_pending
    ctrl.features = ALL & ~(1 << VIRTIO_NET_F_GUEST_ANNOUNCE)
    ctrl.state.announce_pending = True
    assert ctrl.run(VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK) == VIRTIO_NET_ERR
    assert ctrl.state.announce_pending


@pytest.mark.parametrize(("cls", "cmd", "data"), [
    (VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD, b"\x01\x00"),
    (VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, bytes(8)),
    (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_RSS_CONFIG, bytes(16)),
    (VIRTIO_NET_CTRL_RX, 6, b"\x01"),
    (VIRTIO_NET_CTRL_MAC, 2, MAC1),
    (200, 0, b""),
])
def test_unsupported_commands_are_refused(guest: Guest, cls: int, cmd: int, data: bytes) -> None:
    ctrl = Ctrl(guest)
    before = replace(ctrl.state)
    assert ctrl.run(cls, cmd, data) == VIRTIO_NET_ERR
    assert ctrl.state == before


def test_everything_is_refused_without_ctrl_vq(guest: Guest) -> None:
    ctrl = Ctrl(guest, features_=ALL & ~CTRL)
    assert ctrl.run(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, MAC1) == VIRTIO_NET_ERR
    assert ctrl.state.mac == MAC0


def test_a_header_shorter_than_two_bytes_is_refused(guest: Guest) -> None:
    ctrl = Ctrl(guest)
    head = ctrl.driver.add([b"\x01"], [1])
    assert process_ctrl_queue(ctrl.vq, ctrl.state, ctrl.features).acks == (VIRTIO_NET_ERR,)
    assert ctrl.driver.written(head) == bytes([VIRTIO_NET_ERR])


def test_the_ack_goes_in_the_last_writable_byte(ctrl: Ctrl) -> None:
    head = ctrl.submit(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, MAC1, ack_area=4, split=False)
    process_ctrl_queue(ctrl.vq, ctrl.state, ctrl.features)
    assert ctrl.driver.get_used() == [(head, 4)]
    assert ctrl.driver.written(head) == bytes([0, 0, 0, VIRTIO_NET_OK])


def test_a_chain_without_a_writable_byte_is_returned_unexecuted(ctrl: Ctrl) -> None:
    head = ctrl.submit(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, MAC1, ack_area=0)
    result = process_ctrl_queue(ctrl.vq, ctrl.state, ctrl.features)
    assert result.acks == (-1,)
    assert ctrl.driver.get_used() == [(head, 0)]
    assert ctrl.state.mac == MAC0


def test_an_oversized_command_is_refused_unread(guest: Guest) -> None:
    ctrl = Ctrl(guest)
    ctrl.submit(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, table() + table() + bytes(MAX_COMMAND))
    assert process_ctrl_queue(ctrl.vq, ctrl.state, ctrl.features).acks == (VIRTIO_NET_ERR,)


def test_several_commands_in_one_pass_in_order_and_budget(ctrl: Ctrl) -> None:
    heads = [ctrl.submit(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, MAC1, split=False),
             ctrl.submit(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 9), split=False),
             ctrl.submit(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 2), split=False)]
    first = process_ctrl_queue(ctrl.vq, ctrl.state, ctrl.features, budget=2)
    assert (first.processed, first.acks, first.notify) == (2, (VIRTIO_NET_OK, VIRTIO_NET_ERR), True)
    rest = process_ctrl_queue(ctrl.vq, ctrl.state, ctrl.features)
    assert rest.acks == (VIRTIO_NET_OK,)
    assert [h for h, _ in ctrl.driver.get_used()] == heads
    assert (ctrl.state.mac, ctrl.state.active_pairs, ctrl.state.commands) == (MAC1, 2, 3)
    assert process_ctrl_queue(ctrl.vq, ctrl.state, ctrl.features) == (0, False, ())


def test_a_hostile_ctrl_chain_breaks_the_queue_and_changes_nothing(guest: Guest) -> None:
    ctrl = Ctrl(guest)
    desc = ctrl.driver.free.pop(0)
    ctrl.driver.write_desc(desc, 0xBAD0_0000_0000, 8, 0)
    ctrl.driver.publish(desc)
    before_mem, before_state = guest.snapshot(), replace(ctrl.state)
    with pytest.raises(VirtQueueError) as err:
        process_ctrl_queue(ctrl.vq, ctrl.state, ctrl.features)
    assert err.value.code == BAD_UNMAPPED
    assert ctrl.vq.broken == BAD_UNMAPPED
    assert guest.snapshot() == before_mem and ctrl.state == before_state


def test_state_validation_and_reset() -> None:
    with pytest.raises(ValueError):
        NetCtrlState(mac=b"\0" * 5)
    with pytest.raises(ValueError):
        NetCtrlState(max_virtqueue_pairs=0)
    with pytest.raises(ValueError):
        NetCtrlState(max_virtqueue_pairs=2, active_pairs=3)
    state = NetCtrlState(mac=MAC0, max_virtqueue_pairs=4, active_pairs=3, promisc=False, unicast_macs=(MAC1,))
    state.reset()
    assert state == NetCtrlState(mac=MAC0, max_virtqueue_pairs=4)
    state.reset(mac=MAC1)
    assert state.mac == MAC1


@given(command=st.binary(max_size=64), feature_bits=st.integers(0, (1 << 64) - 1))
def test_apply_command_never_raises_and_err_changes_nothing(command: bytes, feature_bits: int) -> None:
    state = NetCtrlState(mac=MAC0, max_virtqueue_pairs=4)
    before = replace(state)
    ack, new = apply_command(state, feature_bits, command)
    assert state == before                       # pure
    assert ack in (VIRTIO_NET_OK, VIRTIO_NET_ERR)
    if ack == VIRTIO_NET_ERR:
        assert new is state
    else:
        assert feature_bits >> VIRTIO_NET_F_CTRL_VQ & 1


def test_unused_canary_stays_outside_the_ack(guest: Guest) -> None:
    # the ack area is exactly what the device wrote; the bytes around it keep the driver's canary
    ctrl = Ctrl(guest)
    head = ctrl.submit(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\x00")
    (offset, _), = ctrl.driver.buffers[head].writable
    process_ctrl_queue(ctrl.vq, ctrl.state, ctrl.features)
    assert guest.mem.read(offset - 1, 3) == bytes([CANARY, VIRTIO_NET_OK, CANARY])
