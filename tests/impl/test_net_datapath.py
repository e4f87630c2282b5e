"""sim-net's loopback datapath on hand-built split and packed rings (virtio v1.3 §5.1.6)."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdpacert.impl.dirty_log import DirtyLog
from vdpacert.impl.guestmem import GuestMemory
from vdpacert.impl.iotlb import ACCESS_RO
from vdpacert.impl.net_datapath import (
    GSO_OK_ECN,
    GSO_OK_TCPV4,
    GSO_OK_USO4,
    GSO_OK_USO6,
    MAX_GSO_FRAME,
    NetLoopback,
    gso_ok_from_features,
    loopback,
)
from vdpacert.impl.virtqueue import BAD_DENIED, BAD_LOOP, BAD_UNMAPPED, VirtQueueError
from vdpacert.uapi.virtio_net import (
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_USO6,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_UDP_L4,
)

try:
    from .ring_driver import NEXT, PAGE, WRITE, Guest, PackedDriver, SplitDriver, device_queue, features
except ImportError:
    from ring_driver import NEXT, PAGE, WRITE, Guest, PackedDriver, SplitDriver, device_queue, features

HDR = struct.Struct("<BBHHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
RINGS = ["split", "packed"]


def hdr(flags: int = 0, gso_type: int = 0, hdr_len: int = 0, gso_size: int = 0, csum_start: int = 0,
        csum_offset: int = 0, num_buffers: int = 0) -> bytes:
    return HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers)


def frame(length: int, seed: int = 0) -> bytes:
    """An Ethernet frame of ``length`` bytes whose content identifies it."""
    pattern = bytes((seed * 7 + i) & 0xFF for i in range(256))
    return (pattern * (length // 256 + 1))[:length]


def ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


SRC_IP, DST_IP = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
ETH_IPV4 = bytes(6) + bytes([2, 0, 0, 0, 0, 1]) + b"\x08\x00"
ETH_IPV6 = bytes(6) + bytes([2, 0, 0, 0, 0, 1]) + b"\x86\xdd"


def ipv4(proto: int, l4: bytes) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0, SRC_IP, DST_IP)
    header = header[:10] + struct.pack("!H", ~ones_sum(header) & 0xFFFF) + header[12:]
    return header + l4


def udp_partial(payload: bytes) -> bytes:
    """Ethernet + IPv4 + UDP with only the pseudo-header sum in the checksum field (as a driver
    sending with NEEDS_CSUM leaves it). csum_start 34, csum_offset 6."""
    length = 8 + len(payload)
    pseudo = ones_sum(SRC_IP + DST_IP + struct.pack("!HH", 17, length))
    return ETH_IPV4 + ipv4(17, struct.pack("!HHHH", 1000, 2000, length, pseudo) + payload)


def udp_checksum_ok(eth_frame: bytes) -> bool:
    udp = eth_frame[34:]
    return ones_sum(SRC_IP + DST_IP + struct.pack("!HH", 17, len(udp)) + udp) == 0xFFFF


def tcp_frame(payload: bytes, data_offset_words: int = 8) -> bytes:
    options = bytes(4 * data_offset_words - 20)
    tcp = struct.pack("!HHIIBBHHH", 1000, 2000, 1, 0, data_offset_words << 4, 0x18, 65535, 0, 0) + options
    return ETH_IPV4 + ipv4(6, tcp + payload)


class Net:
    """One TX/RX queue pair: the driver halves (hand-built rings) and the device VirtQueues."""

    def __init__(self, guest: Guest, ring: str, *, num: int = 16, rx_num: int | None = None,
                 indirect: bool = False) -> None:
        driver = PackedDriver if ring == "packed" else SplitDriver
        self.guest = guest
        self.packed = ring == "packed"
        self.txd = driver(guest, num)
        self.rxd = driver(guest, rx_num or num)
        bits = features(packed=self.packed, indirect=indirect)
        self.tx = device_queue(guest, self.txd, bits)
        self.rx = device_queue(guest, self.rxd, bits)
        self.rx_used: list[tuple[int, int]] = []

    def send(self, data: bytes, *, header: bytes | None = None, pieces: Sequence[int] = ()) -> int:
        """Transmit header + data, the readable part cut at the ``pieces`` offsets."""
        blob = (hdr() if header is None else header) + data
        cuts = [0, *pieces, len(blob)]
        return self.txd.add([blob[a:b] for a, b in itertools.pairwise(cuts)])

    def post(self, *sizes: int) -> list[int]:
        return [self.rxd.add(writable=[size]) for size in sizes]

    def tx_done(self) -> list[tuple[int, int]]:
        return self.txd.get_used()

    def received(self, mrg: bool = False) -> list[tuple[tuple[int, ...], bytes]]:
        """(header fields, frame) of each received packet, joining MRG_RXBUF buffers."""
        self.rx_used += self.rxd.get_used()
        out = []
        while self.rx_used:
            head, length = self.rx_used[0]
            first = self.rxd.written(head)[:length]
            fields = HDR.unpack(first[:12])
            count = fields[6] if mrg else 1
            if len(self.rx_used) < count:
                break   # the rest of the packet is not used yet
            parts = [self.rxd.written(h)[:n] for h, n in self.rx_used[:count]]
            del self.rx_used[:count]
            out.append((fields, b"".join(parts)[12:]))
        return out


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest(4 << 20)
    yield g
    g.close()


# ---- delivery ----

@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("size", [64, 1500, 65536])
def test_frames_come_back_in_order_with_a_receive_header(guest: Guest, ring: str, size: int) -> None:
    net = Net(guest, ring, num=4)
    sent = [frame(size, seed) for seed in range(3)]
    tx_ids = [net.send(f) for f in sent]
    net.post(*[size + 12] * 3)
    frames, nbytes, notify_tx, notify_rx = loopback(net.tx, net.rx, mtu=65535)
    assert (frames, nbytes, notify_tx, notify_rx) == (3, 3 * size, True, True)
    assert net.tx_done() == [(i, 0) for i in tx_ids]            # TX buffers are read-only: 0 written
    got = net.received()
    assert [f for _, f in got] == sent
    assert all(fields == (0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0, 1) for fields, _ in got)
    assert [n for _, n in net.rx_used] == []
    assert loopback(net.tx, net.rx, mtu=65535) == (0, 0, False, False)


@pytest.mark.parametrize("ring", RINGS)
def test_used_length_is_header_plus_frame(guest: Guest, ring: str) -> None:
    net = Net(guest, ring)
    net.send(frame(100))
    (rx_id,) = net.post(2000)
    loopback(net.tx, net.rx)
    assert net.rxd.get_used() == [(rx_id, 112)]


@pytest.mark.parametrize("ring", RINGS)
def test_order_survives_many_frames_batches_and_ring_wraps(guest: Guest, ring: str) -> None:
    net = Net(guest, ring, num=5 if ring == "packed" else 8, rx_num=7 if ring == "packed" else 8)
    engine = NetLoopback()
    sent: list[bytes] = []
    got: list[bytes] = []
    for round_ in range(40):
        for _ in range(round_ % 4 + 1):
            if len(net.txd.slots if net.packed else net.txd.chains) < net.txd.num:
                sent.append(frame(60 + 37 * (len(sent) % 11), len(sent)))
                net.send(sent[-1])
        room = net.rxd.num - len(net.rxd.slots if net.packed else net.rxd.chains)
        net.post(*[1600] * min(room, round_ % 3 + 1))
        engine.run(net.tx, net.rx)
        net.tx_done()
        got += [f for _, f in net.received()]
    net.post(*[1600] * (net.rxd.num - len(net.rxd.slots if net.packed else net.rxd.chains)))
    engine.run(net.tx, net.rx)
    got += [f for _, f in net.received()]
    assert got == sent[:len(got)]
    assert len(got) == len(sent) > 60
    assert engine.stats["frames"] == len(sent)          # > 60 frames: many laps of both rings


def test_batches_larger_than_one_push_batch(guest: Guest) -> None:
    net = Net(guest, "split", num=256)
    sent = [frame(64, i) for i in range(200)]
    for f in sent:
        net.send(f)
    net.post(*[100] * 200)
    assert loopback(net.tx, net.rx)[:2] == (200, 200 * 64)
    assert [f for _, f in net.received()] == sent
    assert len(net.tx_done()) == 200


def test_split_indices_wrap_at_2_16(guest: Guest) -> None:
    net = Net(guest, "split", num=8)
    for driver, vq in ((net.txd, net.tx), (net.rxd, net.rx)):
        driver.start_at(0xFFFA)
        vq.set_ready(False)
        vq.set_state(0xFFFA)
        vq.set_ready(True)
    sent, got = [], []
    for round_ in range(4):
        batch = [frame(64 + round_, round_ * 10 + i) for i in range(4)]
        sent += batch
        for f in batch:
            net.send(f)
        net.post(*[200] * 4)
        assert loopback(net.tx, net.rx)[0] == 4
        net.tx_done()
        got += [f for _, f in net.received()]
    assert got == sent
    assert net.rxd.used_idx() == (0xFFFA + 16) & 0xFFFF


def test_tx_is_not_consumed_until_rx_buffers_arrive(guest: Guest) -> None:
    net = Net(guest, "split")
    engine = NetLoopback()
    sent = [frame(80, i) for i in range(3)]
    for f in sent:
        net.send(f)
    assert engine.run(net.tx, net.rx) == (0, 0, False, False)
    assert engine.rx_starved
    assert net.tx_done() == []
    assert net.tx.last_avail_idx == 0 and net.tx.outstanding == 0   # left available, not held
    net.post(200)                                                    # the RX kick
    assert engine.run(net.tx, net.rx)[0] == 1
    assert engine.rx_starved
    assert len(net.tx_done()) == 1
    net.post(200, 200)
    assert engine.run(net.tx, net.rx)[0] == 2
    assert not engine.rx_starved
    assert [f for _, f in net.received()] == sent


@pytest.mark.parametrize("ring", RINGS)
def test_rx_not_ready_consumes_nothing(guest: Guest, ring: str) -> None:
    net = Net(guest, ring)
    net.rx.set_ready(False)
    net.send(frame(64))
    net.post(100)
    assert loopback(net.tx, net.rx) == (0, 0, False, False)
    assert net.tx_done() == []
    net.rx.set_ready(True)
    assert loopback(net.tx, net.rx)[0] == 1


# ---- MRG_RXBUF ----

@pytest.mark.parametrize("ring", RINGS)
def test_mrg_rxbuf_spreads_a_frame_over_full_buffers(guest: Guest, ring: str) -> None:
    net = Net(guest, ring)
    sent = frame(2500)
    net.send(sent)
    ids = net.post(1000, 1000, 1000, 1000)
    assert loopback(net.tx, net.rx, mrg_rxbuf=True, mtu=9000)[:2] == (1, 2500)
    used = net.rxd.get_used()
    assert used == [(ids[0], 1000), (ids[1], 1000), (ids[2], 512)]   # all but the last filled
    net.rx_used = used
    ((fields, got),) = net.received(mrg=True)
    assert fields[6] == 3 and got == sent


@pytest.mark.parametrize("ring", RINGS)
def test_mrg_rxbuf_num_buffers_is_1_when_one_buffer_holds_the_frame(guest: Guest, ring: str) -> None:
    net = Net(guest, ring)
    net.send(frame(500))
    net.post(4096)
    loopback(net.tx, net.rx, mrg_rxbuf=True)
    ((fields, got),) = net.received(mrg=True)
    assert fields[6] == 1 and got == frame(500)


@pytest.mark.parametrize("ring", RINGS)
def test_mrg_frame_waits_until_enough_buffers_are_posted(guest: Guest, ring: str) -> None:
    net = Net(guest, ring)
    net.send(frame(2500))
    net.post(1000, 1000)
    engine = NetLoopback(mrg_rxbuf=True, mtu=9000)
    assert engine.run(net.tx, net.rx) == (0, 0, False, False)
    assert engine.rx_starved and net.tx_done() == [] and net.rxd.get_used() == []
    assert net.rx.outstanding == 0 and net.tx.outstanding == 0       # both given back
    net.post(1000)
    assert engine.run(net.tx, net.rx)[0] == 1
    ((fields, got),) = net.received(mrg=True)
    assert fields[6] == 3 and got == frame(2500)


def test_mrg_buffers_held_by_earlier_frames_are_returned_before_waiting(guest: Guest) -> None:
    # RX ring of 4: frame A takes 1 buffer, B the other 3; C finds the ring full of buffers
    # held for the batch, which are pushed, and then waits for new ones.
    net = Net(guest, "split", num=8, rx_num=4)
    a, b, c = frame(500, 1), frame(2500, 2), frame(100, 3)
    for f in (a, b, c):
        net.send(f)
    net.post(1000, 1000, 1000, 1000)
    engine = NetLoopback(mrg_rxbuf=True, mtu=9000)
    assert engine.run(net.tx, net.rx)[0] == 2
    assert engine.rx_starved
    assert [f for _, f in net.received(mrg=True)] == [a, b]
    assert len(net.tx_done()) == 2
    net.post(1000)
    assert engine.run(net.tx, net.rx)[0] == 1
    assert [f for _, f in net.received(mrg=True)] == [c]


@pytest.mark.parametrize("ring", RINGS)
def test_mrg_frame_larger_than_the_whole_rx_ring_is_dropped(guest: Guest, ring: str) -> None:
    net = Net(guest, ring, rx_num=2)
    net.send(frame(1500))
    net.send(frame(64))
    net.post(100, 100)
    engine = NetLoopback(mrg_rxbuf=True)
    assert engine.run(net.tx, net.rx)[0] == 1
    assert engine.stats["drop_rx_small"] == 1
    assert len(net.tx_done()) == 2
    ((fields, got),) = net.received(mrg=True)
    assert got == frame(64) and fields[6] == 1


@pytest.mark.parametrize("ring", RINGS)
def test_without_mrg_a_frame_larger_than_the_buffer_is_dropped_and_the_buffer_kept(guest: Guest, ring: str) -> None:
    net = Net(guest, ring)
    net.send(frame(200))
    net.send(frame(64))
    (rx_id,) = net.post(100)
    engine = NetLoopback()
    assert engine.run(net.tx, net.rx)[:2] == (1, 64)
    assert engine.stats["drop_rx_small"] == 1
    assert len(net.tx_done()) == 2
    assert net.rxd.get_used() == [(rx_id, 76)]                   # the same buffer took the next frame


def test_without_mrg_a_frame_that_fits_exactly_is_delivered(guest: Guest) -> None:
    net = Net(guest, "split")
    net.send(frame(88))
    net.post(100)
    assert loopback(net.tx, net.rx)[0] == 1


# ---- MTU and malformed frames ----

@pytest.mark.parametrize("ring", RINGS)
def test_frames_over_mtu_plus_ethernet_header_are_dropped(guest: Guest, ring: str) -> None:
    net = Net(guest, ring)
    for size in (1514, 1515, 200):
        net.send(frame(size, size))
    net.post(2000, 2000, 2000)
    engine = NetLoopback(mtu=1500)
    assert engine.run(net.tx, net.rx)[:2] == (2, 1714)
    assert engine.stats["drop_mtu"] == 1
    assert [f for _, f in net.received()] == [frame(1514, 1514), frame(200, 200)]
    assert len(net.tx_done()) == 3


@pytest.mark.parametrize("mtu", [0, 67, 65536, -1])
def test_mtu_out_of_range_is_einval(mtu: int) -> None:
    with pytest.raises(OSError) as bad:
        NetLoopback(mtu=mtu)
    assert bad.value.errno == 22


@pytest.mark.parametrize(("blob", "why"), [
    (hdr()[:8], "no complete header"),
    (hdr() + frame(13), "runt: shorter than an Ethernet header"),
    (hdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=60, csum_offset=6) + frame(64), "csum field past the end"),
    (hdr(gso_type=VIRTIO_NET_HDR_GSO_TCPV4, gso_size=1000, csum_start=34, csum_offset=16) + tcp_frame(b"x" * 3000),
     "GSO without NEEDS_CSUM"),
    (hdr(flags=1, gso_type=VIRTIO_NET_HDR_GSO_TCPV4, csum_start=34, csum_offset=16) + tcp_frame(b"x" * 3000),
     "GSO with gso_size 0"),
    (hdr(flags=1, gso_type=9, gso_size=100, csum_start=34, csum_offset=16) + tcp_frame(b"x"), "unknown gso type"),
    (hdr(gso_type=VIRTIO_NET_HDR_GSO_ECN) + frame(64), "ECN bit without a GSO type"),
])
def test_malformed_frames_are_dropped_and_the_queue_keeps_going(guest: Guest, blob: bytes, why: str) -> None:
    net = Net(guest, "split")
    net.txd.add([blob])
    net.send(frame(64, 9))
    net.post(5000, 5000)
    engine = NetLoopback(guest_csum=True, gso_ok=GSO_OK_TCPV4)
    assert engine.run(net.tx, net.rx)[0] == 1, why
    assert engine.stats["drop_malformed"] == 1
    assert [f for _, f in net.received()] == [frame(64, 9)]
    assert len(net.tx_done()) == 2


# ---- header handling ----

@pytest.mark.parametrize("ring", RINGS)
def test_needs_csum_passes_through_with_guest_csum(guest: Guest, ring: str) -> None:
    net = Net(guest, ring)
    packet = udp_partial(b"hello world")
    net.send(packet, header=hdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6))
    net.post(2000)
    loopback(net.tx, net.rx, guest_csum=True)
    ((fields, got),) = net.received()
    assert fields == (VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 6, 1)
    assert got == packet                                           # still partial: the receiver finishes it


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("pieces", [(), (13,), (12, 47, 48, 51), (45, 46, 47, 1000)])
@pytest.mark.parametrize("payload_len", [0, 1, 1001])
def test_checksum_is_completed_without_guest_csum(guest: Guest, ring: str, pieces: tuple[int, ...],
                                                  payload_len: int) -> None:
    net = Net(guest, ring)
    packet = udp_partial(frame(payload_len, 5))
    cuts = tuple(p for p in pieces if p < 12 + len(packet))
    net.send(packet, header=hdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6), pieces=cuts)
    net.post(4000)
    loopback(net.tx, net.rx, guest_csum=False)
    ((fields, got),) = net.received()
    assert fields == (0, 0, 0, 0, 0, 0, 1)                         # flags MUST be 0 without GUEST_CSUM
    assert udp_checksum_ok(got)
    assert got[:40] == packet[:40] and got[42:] == packet[42:]     # only the checksum field changed
    assert not udp_checksum_ok(packet)


def test_transmit_data_valid_is_ignored(guest: Guest) -> None:
    net = Net(guest, "split")
    net.send(frame(64), header=hdr(flags=VIRTIO_NET_HDR_F_DATA_VALID))
    net.post(100)
    loopback(net.tx, net.rx, guest_csum=True)
    ((fields, _),) = net.received()
    assert fields[0] == 0


@pytest.mark.parametrize("ring", RINGS)
def test_gso_frame_passes_through_when_the_receiver_negotiated_it(guest: Guest, ring: str) -> None:
    net = Net(guest, ring)
    packet = tcp_frame(frame(6000), data_offset_words=8)
    net.send(packet, header=hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16))
    net.post(8000)
    engine = NetLoopback.from_features((1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO4), mtu=1500)
    assert engine.run(net.tx, net.rx)[0] == 1                      # GSO frames are not held to the MTU
    ((fields, got),) = net.received()
    # hdr_len recomputed: csum_start + the TCP header's data offset (32), not the sender's 54
    assert fields == (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 66, 1448, 34, 16, 1)
    assert got == packet


@pytest.mark.parametrize(("feature_bits", "gso_type", "delivered"), [
    (0, VIRTIO_NET_HDR_GSO_TCPV4, False),                                          # no GUEST_CSUM, no TSO4
    (1 << VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, False),               # no GUEST_TSO4
    ((1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO4), VIRTIO_NET_HDR_GSO_TCPV4, True),
    ((1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO4),
     VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN, False),                     # ECN needs GUEST_ECN
    ((1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO4) | (1 << VIRTIO_NET_F_GUEST_ECN),
     VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN, True),
])
def test_gso_frames_the_receiver_cannot_take_are_dropped(guest: Guest, feature_bits: int, gso_type: int,
                                                          delivered: bool) -> None:
    net = Net(guest, "split")
    net.send(tcp_frame(frame(3000)), header=hdr(1, gso_type, 66, 1448, 34, 16))
    net.post(4000)
    engine = NetLoopback.from_features(feature_bits)
    assert engine.run(net.tx, net.rx)[0] == int(delivered)
    assert engine.stats["drop_gso"] == int(not delivered)
    assert len(net.tx_done()) == 1
    if delivered:
        assert net.received()[0][0][1] == gso_type


@pytest.mark.parametrize(("eth", "gso_ok", "delivered"), [
    (ETH_IPV4, GSO_OK_USO4, True), (ETH_IPV4, GSO_OK_USO6, False),
    (ETH_IPV6, GSO_OK_USO6, True), (ETH_IPV6, GSO_OK_USO4, False),
])
def test_udp_l4_gso_needs_uso_for_the_ip_version(guest: Guest, eth: bytes, gso_ok: int, delivered: bool) -> None:
    net = Net(guest, "split")
    body = bytes(40) + struct.pack("!HHHH", 1, 2, 2008, 0) + frame(2000)   # a 40-byte "IPv6" header either way
    net.send(eth + body, header=hdr(1, VIRTIO_NET_HDR_GSO_UDP_L4, 62, 1400, 54, 6))
    net.post(4000)
    engine = NetLoopback(guest_csum=True, gso_ok=gso_ok)
    assert engine.run(net.tx, net.rx)[0] == int(delivered)
    if delivered:
        assert net.received()[0][0][:4] == (1, VIRTIO_NET_HDR_GSO_UDP_L4, 62, 1400)


def test_gso_frames_are_bounded_by_a_64k_datagram(guest: Guest) -> None:
    net = Net(guest, "split")
    net.send(ETH_IPV4 + frame(MAX_GSO_FRAME + 1 - 14), header=hdr(1, VIRTIO_NET_HDR_GSO_TCPV4, 66, 1448, 34, 16))
    net.post(70000)
    engine = NetLoopback(guest_csum=True, gso_ok=GSO_OK_TCPV4)
    assert engine.run(net.tx, net.rx)[0] == 0
    assert engine.stats["drop_malformed"] == 1


def test_gso_mask_from_features() -> None:
    assert gso_ok_from_features((1 << VIRTIO_NET_F_GUEST_TSO4) | (1 << VIRTIO_NET_F_GUEST_USO6)
                                | (1 << VIRTIO_NET_F_GUEST_ECN)) == GSO_OK_TCPV4 | GSO_OK_USO6 | GSO_OK_ECN
    assert NetLoopback.from_features(1 << VIRTIO_NET_F_MRG_RXBUF, mtu=9000).config == {
        "mrg_rxbuf": True, "guest_csum": False, "gso_ok": 0, "mtu": 9000, "budget": 0}


# ---- budget, notifications, dirty log ----

def test_budget_bounds_one_call(guest: Guest) -> None:
    net = Net(guest, "split")
    for i in range(5):
        net.send(frame(64, i))
    net.post(*[100] * 5)
    engine = NetLoopback(budget=2)
    assert engine.run(net.tx, net.rx)[0] == 2 and engine.more
    assert engine.run(net.tx, net.rx)[0] == 2 and engine.more
    assert engine.run(net.tx, net.rx)[0] == 1 and not engine.more
    assert [f for _, f in net.received()] == [frame(64, i) for i in range(5)]


def test_notifications_follow_the_drivers_suppression_flags(guest: Guest) -> None:
    net = Net(guest, "split")
    net.rxd.set_avail_flags(1)                                     # VRING_AVAIL_F_NO_INTERRUPT on RX
    net.send(frame(64))
    net.post(100)
    assert loopback(net.tx, net.rx)[2:] == (True, False)


def test_every_byte_written_is_logged_and_nothing_else(guest: Guest) -> None:
    net = Net(guest, "split")
    log_mem = GuestMemory(1 << 18, gpa=0x7000_0000, register=False)
    try:
        guest.registry.add(log_mem)
        log = DirtyLog(guest.registry, log_mem.uaddr, 1 << 18)
        net.rx.set_log(log)                    # buffers only (no VHOST_VRING_F_LOG: ring writes unlogged)
        net.send(frame(6000))
        (rx_id,) = net.post(9000)
        loopback(net.tx, net.rx, mtu=9000)
        offset, _ = net.rxd.buffers[rx_id].writable[0]
        first, last = guest.gpa(offset) // PAGE, (guest.gpa(offset) + 6012 - 1) // PAGE
        assert sorted(log.dirty_pages()) == list(range(first, last + 1))
    finally:
        log_mem.close()


# ---- hostile input ----

def _changed(before: bytes, after: bytes) -> set[int]:
    return {i for i in range(len(before)) if before[i] != after[i]} if before != after else set()


def _ranges(*spans: tuple[int, int]) -> set[int]:
    return {i for start, length in spans for i in range(start, start + length)}


def test_hostile_tx_chain_breaks_tx_and_writes_only_rx_buffers(guest: Guest) -> None:
    net = Net(guest, "split", num=4)
    net.send(frame(64, 1))
    ids = net.post(200, 200)
    bad = net.txd.free.pop(0)
    net.txd.write_desc(bad, 0xDEAD_0000_0000, 100, 0)                # outside every mapping
    net.txd.publish(bad)
    net.send(frame(64, 2))
    before = guest.snapshot()
    with pytest.raises(VirtQueueError) as err:
        loopback(net.tx, net.rx)
    assert err.value.code == BAD_UNMAPPED and err.value.queue == "tx"
    assert err.value.fault == (0xDEAD_0000_0000, 1)
    assert net.tx.broken == BAD_UNMAPPED and net.rx.broken == 0
    # the good frame before it was completed; nothing was written but its RX buffer and the used rings
    allowed = _ranges(*net.rxd.buffers[ids[0]].writable, (net.rxd.used, 6 + 8 * 4), (net.txd.used, 6 + 8 * 4))
    assert _changed(before, guest.snapshot()) <= allowed
    assert [f for _, f in net.received()] == [frame(64, 1)]


def test_tx_descriptor_loop_is_reported(guest: Guest) -> None:
    net = Net(guest, "split", num=4)
    d0, d1 = net.txd.free.pop(0), net.txd.free.pop(0)
    net.txd.write_desc(d0, guest.iova(guest.alloc(16)), 16, NEXT, d1)
    net.txd.write_desc(d1, guest.iova(guest.alloc(16)), 16, NEXT, d0)
    net.txd.publish(d0)
    net.post(200)
    before = guest.snapshot()
    with pytest.raises(VirtQueueError) as err:
        loopback(net.tx, net.rx)
    assert err.value.code == BAD_LOOP and err.value.queue == "tx"
    assert guest.snapshot() == before


def test_rx_buffer_the_device_may_not_write_breaks_rx_without_writing(guest: Guest) -> None:
    net = Net(guest, "packed", num=4)
    net.send(frame(64))
    ro = guest.alloc(PAGE, PAGE)
    guest.iotlb.update(0x9000_0000, PAGE, guest.mem.uaddr_of(ro), ACCESS_RO)
    net.rxd.write_desc(0, 0x9000_0000, 200, 0, WRITE | (1 << 7))       # avail, device-writable, RO map
    before = guest.snapshot()
    with pytest.raises(VirtQueueError) as err:
        loopback(net.tx, net.rx)
    assert err.value.code == BAD_DENIED and err.value.queue == "rx"
    assert net.rx.broken == BAD_DENIED and net.tx.broken == 0
    assert guest.snapshot() == before
    assert net.tx_done() == []                                      # the TX chain was not returned


def test_rx_chain_with_a_readable_part_only_gets_its_writable_part(guest: Guest) -> None:
    net = Net(guest, "split")
    net.send(frame(64))
    rx_id = net.rxd.add([b"driver bytes"], [100])
    before = guest.snapshot()
    loopback(net.tx, net.rx)
    buffers = net.rxd.buffers[rx_id]
    allowed = _ranges(*buffers.writable, (net.rxd.used, 6 + 8 * 16), (net.txd.used, 6 + 8 * 16))
    assert _changed(before, guest.snapshot()) <= allowed
    assert net.rxd.written(rx_id)[12:76] == frame(64)


# ---- property: nothing lost, nothing duplicated, order kept ----

@settings(max_examples=30)
@given(ring=st.sampled_from(RINGS), mrg=st.booleans(), buffer=st.integers(256, 1600),
       steps=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4), st.lists(st.integers(14, 3000),
                                                                               min_size=1, max_size=3)),
                      min_size=1, max_size=12))
def test_loopback_delivers_every_frame_that_fits_in_order(ring: str, mrg: bool, buffer: int,
                                                          steps: list[tuple[int, int, list[int]]]) -> None:
    g = Guest(4 << 20)
    try:
        net = Net(g, ring, num=16)
        engine = NetLoopback(mrg_rxbuf=mrg, mtu=3000)
        sent: list[bytes] = []
        got: list[bytes] = []

        def free(driver: SplitDriver | PackedDriver) -> int:
            held = driver.slots if isinstance(driver, PackedDriver) else driver.chains
            return driver.num - len(held)

        for n_frames, n_buffers, sizes in steps:
            for size in sizes[:min(n_frames, free(net.txd))]:
                sent.append(frame(size, len(sent)))
                net.send(sent[-1])
            net.post(*[buffer] * min(n_buffers, free(net.rxd)))
            engine.run(net.tx, net.rx)
            net.tx_done()
            got += [f for _, f in net.received(mrg)]
        for _ in range(len(sent) + 1):          # drain: keep the RX ring full until TX is empty
            net.post(*[buffer] * free(net.rxd))
            engine.run(net.tx, net.rx)
            net.tx_done()
            got += [f for _, f in net.received(mrg)]
        expected = sent if mrg else [f for f in sent if len(f) + 12 <= buffer]
        assert got == expected
        assert engine.stats["drop_rx_small"] == len(sent) - len(expected)
        assert net.tx.outstanding == net.rx.outstanding == 0
    finally:
        g.close()
