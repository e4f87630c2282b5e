"""virtio-net: virtqueue layout, the header, control commands and the reference loopback."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdpacert.model import sections
from vdpacert.model.net import (
    CTRL_COMMANDS,
    LoopbackNet,
    NetDeviceState,
    NetHdr,
    NetModelError,
    NotModelled,
    RxCompletion,
    RxDrop,
    apply_ctrl,
    complete_checksum,
    config_violations,
    controlq,
    decide_ctrl,
    queue_pairs,
    receiveq,
    transmitq,
    virtqueue_count,
    vq_role,
)
from vdpacert.model.spec import Level
from vdpacert.uapi import virtio_net as vn
from vdpacert.uapi.virtio_config import VIRTIO_F_VERSION_1

OK, ERR = vn.VIRTIO_NET_OK, vn.VIRTIO_NET_ERR


def bit(*bits: int) -> int:
    return sum(1 << b for b in bits)


V1 = 1 << VIRTIO_F_VERSION_1
CTRL = bit(vn.VIRTIO_NET_F_CTRL_VQ)
ALL_CTRL = CTRL | bit(vn.VIRTIO_NET_F_CTRL_RX, vn.VIRTIO_NET_F_CTRL_RX_EXTRA, vn.VIRTIO_NET_F_CTRL_MAC_ADDR,
                      vn.VIRTIO_NET_F_MQ, vn.VIRTIO_NET_F_CTRL_VLAN, vn.VIRTIO_NET_F_GUEST_ANNOUNCE,
                      vn.VIRTIO_NET_F_MAC)


# -- virtqueue layout (§5.1.2) -----------------------------------------------------------------------
def test_single_pair_layout() -> None:
    assert queue_pairs(0, 8) == 1
    assert (receiveq(1), transmitq(1)) == (0, 1)
    assert controlq(CTRL, 8) == 2 and controlq(0, 8) is None
    assert virtqueue_count(CTRL, 8) == 3 and virtqueue_count(0, 8) == 2


def test_mq_layout_puts_controlq_after_all_pairs() -> None:
    f = CTRL | bit(vn.VIRTIO_NET_F_MQ)
    assert queue_pairs(f, 4) == 4
    assert [receiveq(n) for n in range(1, 5)] == [0, 2, 4, 6]
    assert [transmitq(n) for n in range(1, 5)] == [1, 3, 5, 7]
    assert controlq(f, 4) == 8 and virtqueue_count(f, 4) == 9
    assert vq_role(5, f, 4).kind == "tx" and vq_role(5, f, 4).pair == 3
    assert vq_role(6, f, 4).kind == "rx" and vq_role(6, f, 4).pair == 4
    assert vq_role(8, f, 4).kind == "ctrl" and vq_role(8, f, 4).pair is None
    with pytest.raises(NetModelError):
        vq_role(9, f, 4)
    # RSS alone also makes max_virtqueue_pairs pairs exist.
    assert queue_pairs(CTRL | bit(vn.VIRTIO_NET_F_RSS), 4) == 4
    with pytest.raises(NetModelError):
        queue_pairs(f, 0)
    with pytest.raises(NetModelError):
        receiveq(0)


@given(st.integers(1, 0x8000), st.booleans(), st.booleans())
def test_every_index_has_exactly_one_role(pairs: int, mq: bool, ctrl: bool) -> None:
    f = (bit(vn.VIRTIO_NET_F_MQ) if mq else 0) | (CTRL if ctrl else 0)
    count = virtqueue_count(f, pairs)
    idx = min(count - 1, pairs)  # probe an index in range
    role = vq_role(idx, f, pairs)
    if role.kind == "rx":
        assert receiveq(role.pair or 0) == idx
    elif role.kind == "tx":
        assert transmitq(role.pair or 0) == idx
    else:
        assert idx == controlq(f, pairs)
    with pytest.raises(NetModelError):
        vq_role(count, f, pairs)


# -- header ---------------------------------------------------------------------------------------
def test_header_is_12_little_endian_bytes() -> None:
    hdr = NetHdr(flags=1, gso_type=vn.VIRTIO_NET_HDR_GSO_TCPV4, hdr_len=54, gso_size=1448, csum_start=34,
                 csum_offset=16, num_buffers=3)
    raw = hdr.encode()
    assert raw == bytes([1, 1]) + struct.pack("<HHHHH", 54, 1448, 34, 16, 3)
    assert len(raw) == vn.VIRTIO_NET_HDR_V1_SIZE and NetHdr.decode(raw) == hdr
    with pytest.raises(NetModelError):
        NetHdr.decode(raw[:11])
    with pytest.raises(NetModelError):
        NetHdr(num_buffers=1 << 16).encode()


@given(st.binary(min_size=12, max_size=12))
def test_header_decode_encode_round_trip(raw: bytes) -> None:
    assert NetHdr.decode(raw).encode() == raw


def test_complete_checksum_matches_rfc1071() -> None:
    # Sum of 0x0001 + 0xf203 + 0xf4f5 + 0xf6f7 = 0x2ddf0 -> fold 0xddf2 -> complement 0x220d.
    frame = bytes.fromhex("0001f203f4f5f6f7") + b"\0\0"
    assert complete_checksum(frame, 0, 8)[8:] == bytes.fromhex("220d")
    with pytest.raises(NetModelError):
        complete_checksum(frame, 0, 9)


# -- config ---------------------------------------------------------------------------------------
def test_config_value_rules() -> None:
    offered = bit(vn.VIRTIO_NET_F_MTU, vn.VIRTIO_NET_F_SPEED_DUPLEX)
    assert config_violations(NetDeviceState(mtu=1500), offered) == []
    assert [v.level for v in config_violations(NetDeviceState(mtu=576), offered)] == [Level.SHOULD]
    assert [v.rule for v in config_violations(NetDeviceState(mtu=60), offered)] == ["net.config.mtu.range"]
    bad = config_violations(NetDeviceState(speed=0x80000000, duplex=2), offered)
    assert {v.rule for v in bad} == {"net.config.speed.range", "net.config.duplex.value"}
    assert config_violations(NetDeviceState(mtu=60), 0) == []
    with pytest.raises(NetModelError):
        NetDeviceState(max_virtqueue_pairs=0x8001)


# -- control virtqueue: each accepted case -------------------------------------------------------------
@pytest.mark.parametrize(("name", "attr", "feature"), [
    ("RX_PROMISC", "promisc", vn.VIRTIO_NET_F_CTRL_RX),
    ("RX_ALLMULTI", "allmulti", vn.VIRTIO_NET_F_CTRL_RX),
    ("RX_ALLUNI", "alluni", vn.VIRTIO_NET_F_CTRL_RX_EXTRA),
    ("RX_NOMULTI", "nomulti", vn.VIRTIO_NET_F_CTRL_RX_EXTRA),
    ("RX_NOUNI", "nouni", vn.VIRTIO_NET_F_CTRL_RX_EXTRA),
    ("RX_NOBCAST", "nobcast", vn.VIRTIO_NET_F_CTRL_RX_EXTRA),
])
def test_rx_mode_commands(name: str, attr: str, feature: int) -> None:
    row = next(c for c in CTRL_COMMANDS.values() if c.name == name)
    f = CTRL | bit(feature)
    ack, on = apply_ctrl(NetDeviceState(), f, row.cls, row.cmd, b"\x01")
    assert ack == OK and getattr(on, attr) is True
    ack, off = apply_ctrl(on, f, row.cls, row.cmd, b"\x00")
    assert ack == OK and getattr(off, attr) is False
    # Refused: feature not negotiated, wrong length, value other than 0 / 1.
    for feats, payload in ((CTRL, b"\x01"), (f, b""), (f, b"\x01\x00"), (f, b"\x02")):
        d = decide_ctrl(on, feats, row.cls, row.cmd, payload)
        assert d.ack == ERR and d.state == on and d.level is Level.SHOULD and d.driver_violations


def test_mac_addr_set() -> None:
    f = CTRL | bit(vn.VIRTIO_NET_F_CTRL_MAC_ADDR, vn.VIRTIO_NET_F_MAC)
    state = NetDeviceState(permanent_mac=b"\x02" * 6)
    new = bytes.fromhex("52540012ab34")
    d = decide_ctrl(state, f, vn.VIRTIO_NET_CTRL_MAC, vn.VIRTIO_NET_CTRL_MAC_ADDR_SET, new)
    assert d.ack == OK and d.state.current_mac == new and d.level is Level.MUST
    assert d.state.render_config(f)[:6] == new  # config mac follows before the command is used
    assert d.state.after_reset().current_mac == b"\x02" * 6
    assert d.state.mac_determinate and not d.unbound
    assert d.state.mac_allows(new) and not d.state.mac_allows(new[::-1])  # exactly the address it carries


@pytest.mark.parametrize(("features", "payload", "rule"), [
    (CTRL | bit(vn.VIRTIO_NET_F_CTRL_RX), bytes.fromhex("52540012ab34"), "not_negotiated"),
    (CTRL | bit(vn.VIRTIO_NET_F_CTRL_MAC_ADDR), bytes.fromhex("5254001234"), "payload_length"),
    (CTRL | bit(vn.VIRTIO_NET_F_CTRL_MAC_ADDR), bytes.fromhex("52540012ab3499"), "payload_length"),
    (CTRL | bit(vn.VIRTIO_NET_F_CTRL_MAC_ADDR), b"", "payload_length"),
])
def test_malformed_mac_addr_set_leaves_the_mac_open(features: int, payload: bytes, rule: str) -> None:
    """The driver broke a MUST (§5.1.6.5.2, §5.1.3) and no device clause covers the mac then: ERR is
    still the SHOULD answer, but any mac the device shows afterwards is accepted, and adopted."""
    state = NetDeviceState(permanent_mac=bytes.fromhex("021122334455"))
    d = decide_ctrl(state, features, vn.VIRTIO_NET_CTRL_MAC, vn.VIRTIO_NET_CTRL_MAC_ADDR_SET, payload)
    assert d.ack == ERR and d.level is Level.SHOULD and d.unbound
    assert d.rule == f"net.ctrl.MAC_ADDR_SET.{rule}"
    assert [v.rule for v in d.driver_violations] == [f"net.ctrl.driver.MAC_ADDR_SET.{rule}"]
    assert not d.state.mac_determinate and d.state.current_mac == state.current_mac
    partial = payload[:6] + state.current_mac[len(payload[:6]):]  # what vdpa_sim_net leaves there
    assert d.state.mac_allows(state.current_mac) and d.state.mac_allows(partial)
    seen = d.state.with_mac_seen(partial)
    assert seen.mac_determinate and seen.current_mac == partial and not seen.mac_allows(partial[::-1])
    assert replace(d.state, mac_determinate=True) == state  # nothing else changed
    with pytest.raises(NetModelError):
        seen.with_mac_seen(state.current_mac)  # a determinate mac is compared, never adopted
    assert d.state.after_reset().mac_determinate


def test_well_formed_mac_addr_set_binds_the_mac_again() -> None:
    f = CTRL | bit(vn.VIRTIO_NET_F_CTRL_MAC_ADDR)
    new = bytes.fromhex("52540012ab34")
    loose = decide_ctrl(NetDeviceState(), f, vn.VIRTIO_NET_CTRL_MAC, vn.VIRTIO_NET_CTRL_MAC_ADDR_SET, b"\1").state
    d = decide_ctrl(loose, f, vn.VIRTIO_NET_CTRL_MAC, vn.VIRTIO_NET_CTRL_MAC_ADDR_SET, new)
    assert d.ack == OK and d.state.mac_determinate and d.state.current_mac == new
    other = decide_ctrl(loose, f | bit(vn.VIRTIO_NET_F_CTRL_RX), vn.VIRTIO_NET_CTRL_RX,
                        vn.VIRTIO_NET_CTRL_RX_PROMISC, b"\1").state
    assert not other.mac_determinate  # another command does not bind it


def test_only_mac_addr_set_leaves_anything_open() -> None:
    for row in CTRL_COMMANDS.values():
        assert (row.breach is not None) == (row.name == "MAC_ADDR_SET")
        for case in row.cases()[1:]:
            summary = row.answer(case).summary
            assert summary.endswith("changes nothing" if row.breach is None else "which the spec then leaves open")


def test_mac_table_set() -> None:
    f = CTRL | bit(vn.VIRTIO_NET_F_CTRL_RX)
    uni, multi = bytes.fromhex("020000000001"), bytes.fromhex("01005e000001")
    payload = struct.pack("<I", 1) + uni + struct.pack("<I", 1) + multi
    ack, st8 = apply_ctrl(NetDeviceState(), f, vn.VIRTIO_NET_CTRL_MAC, vn.VIRTIO_NET_CTRL_MAC_TABLE_SET,
                          payload)
    assert ack == OK and st8.mac_table_uni == (uni,) and st8.mac_table_multi == (multi,)
    empty = struct.pack("<II", 0, 0)
    assert apply_ctrl(st8, f, vn.VIRTIO_NET_CTRL_MAC, 0, empty)[1].mac_table_uni == ()
    for bad in (payload[:-1], payload + b"\0", struct.pack("<I", 2) + uni, b""):
        ack, after = apply_ctrl(st8, f, vn.VIRTIO_NET_CTRL_MAC, 0, bad)
        assert ack == ERR and after == st8
    assert st8.after_reset().mac_table_uni == ()  # empty MAC table on reset (§5.1.6.5.2)


def test_vq_pairs_set_bounds() -> None:
    f = CTRL | bit(vn.VIRTIO_NET_F_MQ)
    state = NetDeviceState(max_virtqueue_pairs=4)
    for pairs in (1, 2, 4):
        ack, after = apply_ctrl(state, f, vn.VIRTIO_NET_CTRL_MQ, vn.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                                struct.pack("<H", pairs))
        assert ack == OK and after.curr_queue_pairs == pairs
    for pairs in (0, 5, 0x8000, 0xFFFF):
        d = decide_ctrl(state, f, vn.VIRTIO_NET_CTRL_MQ, 0, struct.pack("<H", pairs))
        assert d.ack == ERR and d.state == state and d.rule == "net.ctrl.MQ_VQ_PAIRS_SET.bad_value"
    assert apply_ctrl(state, CTRL, vn.VIRTIO_NET_CTRL_MQ, 0, struct.pack("<H", 2))[0] == ERR
    assert apply_ctrl(state, f, vn.VIRTIO_NET_CTRL_MQ, 0, b"\x02")[0] == ERR


def test_vlan_and_announce() -> None:
    f = CTRL | bit(vn.VIRTIO_NET_F_CTRL_VLAN, vn.VIRTIO_NET_F_GUEST_ANNOUNCE)
    ack, s1 = apply_ctrl(NetDeviceState(), f, vn.VIRTIO_NET_CTRL_VLAN, vn.VIRTIO_NET_CTRL_VLAN_ADD,
                         b"\x0a\x00")
    assert ack == OK and s1.vlans == {10}
    ack, s2 = apply_ctrl(s1, f, vn.VIRTIO_NET_CTRL_VLAN, vn.VIRTIO_NET_CTRL_VLAN_DEL, b"\x0a\x00")
    assert ack == OK and s2.vlans == frozenset()
    assert apply_ctrl(s1, f, vn.VIRTIO_NET_CTRL_VLAN, 0, struct.pack("<H", 4096))[0] == ERR
    announcing = NetDeviceState(status=vn.VIRTIO_NET_S_LINK_UP | vn.VIRTIO_NET_S_ANNOUNCE)
    ack, quiet = apply_ctrl(announcing, f, vn.VIRTIO_NET_CTRL_ANNOUNCE, vn.VIRTIO_NET_CTRL_ANNOUNCE_ACK, b"")
    assert ack == OK and quiet.status == vn.VIRTIO_NET_S_LINK_UP


def test_unknown_commands_and_missing_ctrl_vq() -> None:
    for cls, cmd in ((vn.VIRTIO_NET_CTRL_RX, 6), (vn.VIRTIO_NET_CTRL_MQ, vn.VIRTIO_NET_CTRL_MQ_RSS_CONFIG),
                     (vn.VIRTIO_NET_CTRL_GUEST_OFFLOADS, 0), (200, 0)):
        d = decide_ctrl(NetDeviceState(), ALL_CTRL, cls, cmd, b"\x01")
        assert d.ack == ERR and d.rule == "net.ctrl.unknown" and d.citation == sections.NET_CONTROL_VQ
    with pytest.raises(NetModelError):
        apply_ctrl(NetDeviceState(), 0, vn.VIRTIO_NET_CTRL_RX, 0, b"\x01")
    with pytest.raises(NetModelError):
        apply_ctrl(NetDeviceState(), CTRL, 256, 0, b"")


@settings(max_examples=300)
@given(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=20),
       st.integers(0, 2**24 - 1).map(lambda f: f | CTRL))
def test_err_never_changes_state(cls: int, cmd: int, payload: bytes, features: int) -> None:
    state = NetDeviceState(max_virtqueue_pairs=3, status=3)
    d = decide_ctrl(state, features, cls, cmd, payload)
    assert d.ack in (OK, ERR)
    if d.ack == ERR:
        assert d.level is Level.SHOULD
        assert d.state == (replace(state, mac_determinate=False) if d.unbound else state)
        assert d.unbound == ((cls, cmd) == (vn.VIRTIO_NET_CTRL_MAC, vn.VIRTIO_NET_CTRL_MAC_ADDR_SET))
    else:
        row = CTRL_COMMANDS[(cls, cmd)]
        assert features >> row.feature & 1 and d.level is Level.MUST and d.citation == row.section


# -- loopback -------------------------------------------------------------------------------------
def packet(frame: bytes, hdr: NetHdr | None = None) -> bytes:
    return (hdr or NetHdr()).encode() + frame


def frame_of(n: int, tag: int = 0) -> bytes:
    return bytes([tag]) * n


def test_loopback_in_order_with_header() -> None:
    lo = LoopbackNet(V1)
    frames = [frame_of(60, i) for i in range(3)]
    for fr in frames:
        assert lo.transmit(1, packet(fr)).accepted
    for i in range(3):
        lo.post_rx(1, 100 + i, 1526)
    events = lo.deliver(1)
    assert [e.frame for e in events] == frames
    for i, e in enumerate(events):
        assert isinstance(e, RxCompletion)
        assert e.buffer_ids == (100 + i,) and e.used_lens == (72,)
        assert e.header == NetHdr(num_buffers=1)
        assert e.chunks[0] == NetHdr(num_buffers=1).encode() + frames[i]
    assert lo.pending(1) == 0


def test_frames_wait_for_receive_buffers() -> None:
    lo = LoopbackNet(V1)
    lo.transmit(1, packet(frame_of(10)))
    assert lo.deliver(1) == () and lo.pending(1) == 1
    lo.post_rx(1, 7, 100)
    [e] = lo.deliver(1)
    assert isinstance(e, RxCompletion) and e.buffer_ids == (7,)


def test_too_big_without_mrg_is_dropped_and_buffer_kept() -> None:
    lo = LoopbackNet(V1)
    lo.transmit(1, packet(frame_of(200, 1)))
    lo.transmit(1, packet(frame_of(20, 2)))
    lo.post_rx(1, 1, 100)
    drop, done = lo.deliver(1)
    assert isinstance(drop, RxDrop) and drop.rule == "net.rx.too_big_for_buffer" and drop.level is Level.SHOULD
    assert isinstance(done, RxCompletion) and done.buffer_ids == (1,) and done.frame == frame_of(20, 2)


def test_mrg_rxbuf_spreads_over_buffers() -> None:
    lo = LoopbackNet(V1 | bit(vn.VIRTIO_NET_F_MRG_RXBUF))
    fr = bytes(range(256)) * 2  # 512 bytes, 524 with the header
    lo.transmit(1, packet(fr))
    lo.post_rx(1, 1, 200)
    lo.post_rx(1, 2, 200)
    assert lo.deliver(1) == ()  # 400 bytes posted: the frame waits
    lo.post_rx(1, 3, 200)
    lo.post_rx(1, 4, 200)
    [e] = lo.deliver(1)
    assert isinstance(e, RxCompletion)
    assert e.buffer_ids == (1, 2, 3) and e.used_lens == (200, 200, 124)
    assert e.header.num_buffers == 3
    assert b"".join(e.chunks) == NetHdr(num_buffers=3).encode() + fr
    lo.transmit(1, packet(b"x"))
    [small] = lo.deliver(1)
    assert isinstance(small, RxCompletion) and small.buffer_ids == (4,) and small.header.num_buffers == 1
    with pytest.raises(NetModelError):
        lo.post_rx(1, 9, 11)  # with MRG_RXBUF every buffer holds at least a header


def test_checksum_offload_handling() -> None:
    tcp = bytes(34) + bytes(16) + b"\x12\x34" + bytes(6) + b"payload!"
    hdr = NetHdr(flags=vn.VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=16)
    # GUEST_CSUM negotiated: the partial checksum passes through untouched.
    lo = LoopbackNet(V1 | bit(vn.VIRTIO_NET_F_CSUM, vn.VIRTIO_NET_F_GUEST_CSUM))
    lo.transmit(1, packet(tcp, hdr))
    lo.post_rx(1, 1, 2000)
    [e] = lo.deliver(1)
    assert isinstance(e, RxCompletion) and e.frame == tcp
    assert e.header == NetHdr(flags=vn.VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=16,
                              num_buffers=1)
    # Without GUEST_CSUM the device finishes the checksum and sends flags 0.
    lo = LoopbackNet(V1 | bit(vn.VIRTIO_NET_F_CSUM))
    lo.transmit(1, packet(tcp, hdr))
    lo.post_rx(1, 1, 2000)
    [e] = lo.deliver(1)
    assert isinstance(e, RxCompletion) and e.header == NetHdr(num_buffers=1)
    assert e.frame == complete_checksum(tcp, 34, 16) != tcp
    # NEEDS_CSUM without VIRTIO_NET_F_CSUM: a driver error, the frame passes as is.
    lo = LoopbackNet(V1)
    out = lo.transmit(1, packet(tcp, hdr))
    assert out.accepted and [v.rule for v in out.driver_violations] == ["net.driver.tx.flags_without_csum"]


def test_gso_passes_only_to_a_receiver_that_negotiated_it() -> None:
    gso = NetHdr(flags=vn.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=vn.VIRTIO_NET_HDR_GSO_TCPV4, hdr_len=54,
                 gso_size=1448, csum_start=34, csum_offset=16)
    big = bytes(3000)
    host = V1 | bit(vn.VIRTIO_NET_F_CSUM, vn.VIRTIO_NET_F_HOST_TSO4)
    out = LoopbackNet(host).transmit(1, packet(big, gso))
    assert not out.accepted and out.rule == "net.tx.gso_not_receivable"
    both = LoopbackNet(host | bit(vn.VIRTIO_NET_F_GUEST_CSUM, vn.VIRTIO_NET_F_GUEST_TSO4))
    assert both.transmit(1, packet(big, gso)).accepted
    both.post_rx(1, 1, 4000)
    [e] = both.deliver(1)
    assert isinstance(e, RxCompletion)
    assert (e.header.gso_type, e.header.gso_size, e.header.hdr_len) == (vn.VIRTIO_NET_HDR_GSO_TCPV4, 1448, 54)
    rogue = LoopbackNet(V1).transmit(1, packet(big, gso))
    assert not rogue.accepted and rogue.driver_violations


def test_mtu_limit_and_bad_packets() -> None:
    lo = LoopbackNet(V1 | bit(vn.VIRTIO_NET_F_MTU), NetDeviceState(mtu=1500))
    assert lo.transmit(1, packet(bytes(1514))).accepted
    over = lo.transmit(1, packet(bytes(1515)))
    assert not over.accepted and over.citation == sections.NET_CONFIG_DEVICE
    short = lo.transmit(1, b"\0" * 11)
    assert not short.accepted and short.rule == "net.tx.short_header"
    odd = lo.transmit(1, packet(b"x", NetHdr(num_buffers=2)))
    assert odd.accepted and odd.driver_violations[0].citation.number == "5.1.6.2.1"  # type: ignore[union-attr]


def test_link_mtu_applies_without_mtu_negotiated() -> None:
    # Found by the datapath machine: the device keeps its link MTU when the driver did not negotiate
    # VIRTIO_NET_F_MTU; a jumbo non-GSO frame is dropped (SHOULD), never a silent MUST-level loss.
    lo = LoopbackNet(V1 | bit(vn.VIRTIO_NET_F_MRG_RXBUF), NetDeviceState(mtu=1500))
    assert lo.transmit(1, packet(bytes(1514))).accepted
    jumbo = lo.transmit(1, packet(bytes(1600)))
    assert not jumbo.accepted and jumbo.rule == "net.tx.over_link_mtu" and jumbo.level is Level.SHOULD
    assert not jumbo.driver_violations
    assert LoopbackNet(V1, NetDeviceState(mtu=9000)).transmit(1, packet(bytes(9014))).accepted


def test_multiqueue_pairs_are_independent_and_gated() -> None:
    f = V1 | CTRL | bit(vn.VIRTIO_NET_F_MQ)
    lo = LoopbackNet(f, NetDeviceState(max_virtqueue_pairs=2))
    assert lo.pairs == 2 and lo.active_pairs == 1
    gated = lo.transmit(2, packet(b"early"))
    assert not gated.accepted and gated.rule == "net.tx.inactive_pair"
    assert lo.control(vn.VIRTIO_NET_CTRL_MQ, 0, struct.pack("<H", 2)).ack == OK
    lo.transmit(1, packet(b"one"))
    lo.transmit(2, packet(b"two"))
    lo.post_rx(2, 20, 100)
    lo.post_rx(1, 10, 100)
    assert [e.frame for e in lo.deliver(2)] == [b"two"]
    assert [e.frame for e in lo.deliver(1)] == [b"one"]
    lo.transmit(2, packet(b"late"))
    assert lo.control(vn.VIRTIO_NET_CTRL_MQ, 0, struct.pack("<H", 1)).ack == OK
    [dropped] = lo.deliver(2)
    assert isinstance(dropped, RxDrop) and dropped.rule == "net.rx.inactive_pair"
    with pytest.raises(NetModelError):
        lo.transmit(3, packet(b""))


def test_loopback_refuses_what_it_cannot_model() -> None:
    with pytest.raises(NotModelled):
        LoopbackNet(V1 | CTRL | bit(vn.VIRTIO_NET_F_HASH_REPORT))
    with pytest.raises(NetModelError):
        LoopbackNet(V1 | bit(vn.VIRTIO_NET_F_MQ))  # MQ without CTRL_VQ breaks a MUST dependency


@settings(max_examples=100)
@given(st.lists(st.binary(max_size=300), max_size=8), st.booleans(),
       st.lists(st.integers(12, 400), min_size=1, max_size=30))
def test_loopback_preserves_order_and_accounts_every_frame(frames: list[bytes], mrg: bool,
                                                           buffers: list[int]) -> None:
    lo = LoopbackNet(V1 | (bit(vn.VIRTIO_NET_F_MRG_RXBUF) if mrg else 0))
    for fr in frames:
        assert lo.transmit(1, packet(fr)).accepted
    for i, length in enumerate(buffers):
        lo.post_rx(1, i, length)
    events = lo.deliver(1)
    delivered = [e for e in events if isinstance(e, RxCompletion)]
    # Order: every event is the next frame in transmit order; what is left is still pending.
    assert [e.frame for e in events] == frames[:len(events)]
    assert lo.pending(1) == len(frames) - len(events)
    used = [b for e in delivered for b in e.buffer_ids]
    assert used == list(range(len(used)))  # buffers are consumed in the order they were posted
    for e in delivered:
        assert e.header.num_buffers == len(e.buffer_ids)
        assert b"".join(e.chunks) == e.header.encode() + e.frame
        # Every buffer but the last is filled completely (§5.1.6.4.1).
        assert all(n == buffers[b] for n, b in zip(e.used_lens[:-1], e.buffer_ids[:-1], strict=True))
        assert all(n <= buffers[b] for n, b in zip(e.used_lens, e.buffer_ids, strict=True))
        if not mrg:
            assert e.header.num_buffers == 1
    if mrg:
        assert not any(isinstance(e, RxDrop) for e in events)
