"""sim-net end to end: bring-up through the vhost-vdpa front, rings built by ring_driver, real guest memory.

Every test opens the device as userspace would (SET_OWNER, IOTLB UPDATE messages, SET_FEATURES,
SET_VRING_*, kick and call eventfds, status writes) and talks to it only through rings in guest
memory. Frames carry a sequence number and a CRC of their payload, so a frame that comes back
corrupted, twice, or out of order is caught. The cross-device scenarios (suspend, migration to a
second device, reset) live in test_e2e_vhost.py, which reuses :class:`NetRig`.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from collections.abc import Iterator, Sequence

import pytest

from vdpacert.impl.bus import VdpaBus, load_mgmtdevs
from vdpacert.impl.guestmem import GuestMemory
from vdpacert.impl.sim_net import DEFAULT_FEATURES, SUPPORTED_FEATURES, SimNet, default_mac, net_config
from vdpacert.impl.vhost_vdpa import VhostVdpa, unpack_iotlb_msg
from vdpacert.uapi import vhost_types as T  # noqa: N812
from vdpacert.uapi import virtio_net as N  # noqa: N812
from vdpacert.uapi.virtio_config import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
)
from vdpacert.uapi.virtio_ids import VIRTIO_ID_NET
from vdpacert.uapi.virtio_ring import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC

try:
    from .ring_driver import NEXT, PAGE, WRITE, Buffers, Guest, PackedDriver, SplitDriver
except ImportError:
    from ring_driver import NEXT, PAGE, WRITE, Buffers, Guest, PackedDriver, SplitDriver

ACK_DRIVER = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
FEATURES_OK = ACK_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK
DRIVER_OK = FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK
BACKEND = (1 << T.VHOST_BACKEND_F_IOTLB_MSG_V2) | (1 << T.VHOST_BACKEND_F_SUSPEND) | (1 << T.VHOST_BACKEND_F_RESUME)
HDR = struct.Struct("<BBHHHHH")  # virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start/offset, num_buffers
HDR_LEN = HDR.size
RX_BUF = HDR_LEN + 1514  # what a driver posts per RX buffer without MRG_RXBUF for MTU 1500
ETHERTYPE = 0x88B5  # IEEE local experimental
FRAME_META = 14 + 8  # Ethernet header, then seq and CRC
SRC_MAC = bytes.fromhex("020000aabbcc")


def bits(*numbers: int) -> int:
    return sum(1 << n for n in numbers)


def net_features(packed: bool = False, *, mq: bool = False, mrg: bool = False, guest_csum: bool = False,
                 event_idx: bool = False, indirect: bool = False, log: bool = False, ctrl: bool = True,
                 mac_addr: bool = True) -> int:
    """A driver's feature choice (what the test wants), always a valid subset of the default offer."""
    chosen = bits(VIRTIO_F_VERSION_1, VIRTIO_F_ACCESS_PLATFORM, N.VIRTIO_NET_F_MAC, N.VIRTIO_NET_F_MTU,
                  N.VIRTIO_NET_F_STATUS, N.VIRTIO_NET_F_CSUM)
    if ctrl:
        chosen |= bits(N.VIRTIO_NET_F_CTRL_VQ, N.VIRTIO_NET_F_CTRL_RX, N.VIRTIO_NET_F_CTRL_RX_EXTRA)
        chosen |= bits(N.VIRTIO_NET_F_CTRL_MAC_ADDR) if mac_addr else 0
        chosen |= bits(N.VIRTIO_NET_F_MQ) if mq else 0
    for wanted, bit in ((packed, VIRTIO_F_RING_PACKED), (mrg, N.VIRTIO_NET_F_MRG_RXBUF),
                        (guest_csum, N.VIRTIO_NET_F_GUEST_CSUM), (event_idx, VIRTIO_RING_F_EVENT_IDX),
                        (indirect, VIRTIO_RING_F_INDIRECT_DESC), (log, T.VHOST_F_LOG_ALL)):
        chosen |= (1 << bit) if wanted else 0
    return chosen


def make_frame(seq: int, length: int, dst: bytes = b"\xff" * 6) -> bytes:
    """An Ethernet frame of ``length`` bytes: header, seq, CRC32 of the payload, payload."""
    assert length >= FRAME_META
    pattern = bytes((seq * 13 + i) & 0xFF for i in range(256))
    payload = (pattern * ((length - FRAME_META) // 256 + 1))[:length - FRAME_META]
    return dst + SRC_MAC + struct.pack(">H", ETHERTYPE) + struct.pack("<II", seq, zlib.crc32(payload)) + payload


def frame_seq(frame: bytes) -> int:
    """The sequence number of an intact frame (AssertionError for a corrupted one)."""
    seq, crc = struct.unpack_from("<II", frame, 14)
    assert frame[12:14] == struct.pack(">H", ETHERTYPE) and zlib.crc32(frame[FRAME_META:]) == crc, "corrupted frame"
    return int(seq)


def rx_hdr(num_buffers: int = 1) -> bytes:
    """The receive header of a plain frame: no offload, num_buffers as given."""
    return HDR.pack(0, 0, 0, 0, 0, 0, num_buffers)


def signalled(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


Driver = SplitDriver | PackedDriver


class NetRig:
    """One sim-net opened through vhost-vdpa: guest memory mapped by an IOTLB UPDATE message, every
    queue the driver's features make exist set up with its own kick and call eventfd.

    ``bases`` (queue index -> vring base) and ``drivers`` (queue index -> existing ring) serve a
    migration destination; ``start=False`` stops before DRIVER_OK.
    """

    def __init__(self, guest: Guest, dev: SimNet, *, packed: bool = False, features: int | None = None,
                 num: int = 16, bases: dict[int, int] | None = None, drivers: dict[int, Driver] | None = None,
                 start: bool = True, log_used: bool = False) -> None:
        self.guest, self.dev, self.packed = guest, dev, packed
        self.features = net_features(packed) if features is None else features
        self._fds: list[int] = []
        self.front = front = VhostVdpa(dev, guest.registry)
        front.set_owner()
        front.set_backend_features(BACKEND)
        front.iotlb_update(guest.iova_base, guest.size, guest.mem.uaddr, T.VHOST_ACCESS_RW)
        self.config_fd = self.efd()
        front.set_config_call(self.config_fd)
        front.set_status(ACK_DRIVER)
        front.set_features(self.features)
        front.set_status(FEATURES_OK)
        assert front.get_status() == FEATURES_OK, dev.last_error
        # §5.1.2: N pairs with MQ (max_virtqueue_pairs from config), else 1; the controlq follows them.
        max_pairs = struct.unpack("<H", front.get_config(N.VIRTIO_NET_CONFIG_MAX_VIRTQUEUE_PAIRS, 2))[0]
        self.pairs = max_pairs if self.features >> N.VIRTIO_NET_F_MQ & 1 else 1
        self.ctrl_index = 2 * self.pairs if self.features >> N.VIRTIO_NET_F_CTRL_VQ & 1 else None
        indexes = list(range(2 * self.pairs)) + ([] if self.ctrl_index is None else [self.ctrl_index])
        self.drivers: dict[int, Driver] = {}
        self.calls: dict[int, int] = {}
        self.kicks: dict[int, int] = {}
        for index in indexes:
            if drivers is not None:
                driver = drivers[index]
            else:
                driver = PackedDriver(guest, num) if packed else SplitDriver(guest, num)
            self.drivers[index] = driver
            front.set_vring_num(index, driver.num)
            base = (bases or {}).get(index, 0x8000_8000 if packed else 0)
            front.set_vring_base(index, base)
            desc, driver_area, device_area = driver.addresses
            front.set_vring_addr(index, desc, driver_area, device_area,
                                 flags=(1 << T.VHOST_VRING_F_LOG) if log_used else 0,
                                 log_guest_addr=guest.gpa(guest.offset_of_iova(device_area)) if log_used else 0)
            self.calls[index] = self.efd()
            front.set_vring_call(index, self.calls[index])
            self.kicks[index] = self.efd()
            front.set_vring_kick(index, self.kicks[index])
            front.set_vring_enable(index, True)
        if start:
            self.start()

    def efd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._fds.append(fd)
        return fd

    def start(self) -> None:
        self.front.set_status(DRIVER_OK)

    def close(self) -> None:
        self.front.close()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    # ----- queues ------------------------------------------------------------------------------------

    def rx(self, pair: int = 0) -> Driver:
        return self.drivers[2 * pair]

    def tx(self, pair: int = 0) -> Driver:
        return self.drivers[2 * pair + 1]

    def kick(self, index: int) -> None:
        """The driver's doorbell through the queue's kick eventfd, serviced like vhost's worker."""
        os.eventfd_write(self.kicks[index], 1)
        assert self.front.poll_kicks(timeout=1.0) == 1

    def post_rx(self, count: int = 1, size: int = RX_BUF, *, pair: int = 0, kick: bool = False) -> list[int]:
        heads = [self.rx(pair).add([], [size]) for _ in range(count)]
        if kick:
            self.kick(2 * pair)
        return heads

    def send(self, frames: Sequence[bytes], *, pair: int = 0, hdr: bytes = bytes(HDR_LEN), kick: bool = True,
             indirect: bool = False) -> list[int]:
        heads = [self.tx(pair).add([hdr, frame], [], indirect=indirect) for frame in frames]
        if kick:
            self.kick(2 * pair + 1)
        return heads

    def tx_used(self, pair: int = 0) -> list[int]:
        used = self.tx(pair).get_used()
        assert all(length == 0 for _, length in used), "the device wrote into a TX chain"
        return [head for head, _ in used]

    def receive(self, pair: int = 0) -> list[tuple[bytes, bytes]]:
        """(receive header, frame) of every frame the device delivered since the last call.

        With MRG_RXBUF a frame spans ``num_buffers`` used buffers, every one but the last full.
        """
        driver = self.rx(pair)
        chunks = [driver.written(head)[:length] for head, length in driver.get_used()]
        out = []
        while chunks:
            first = chunks.pop(0)
            count = HDR.unpack_from(first)[6]
            assert 1 <= count <= len(chunks) + 1, f"num_buffers {count} with {len(chunks) + 1} buffers used"
            data = first + b"".join(chunks[:count - 1])
            del chunks[:count - 1]
            out.append((data[:HDR_LEN], data[HDR_LEN:]))
        return out

    def command(self, cls: int, cmd: int, data: bytes = b"") -> int:
        """Send one control command and return its ack byte."""
        assert self.ctrl_index is not None
        driver = self.drivers[self.ctrl_index]
        head = driver.add([bytes([cls, cmd]), data] if data else [bytes([cls, cmd])], [1])
        self.kick(self.ctrl_index)
        used = dict(driver.get_used())
        assert used.get(head) == 1, f"command {cls}/{cmd} was not acked: {used}"
        return driver.written(head)[0]

    def set_pairs(self, pairs: int) -> int:
        """VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET; the ack."""
        return self.command(N.VIRTIO_NET_CTRL_MQ, N.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", pairs))

    def needs_reset(self) -> bool:
        return bool(self.front.get_status() & VIRTIO_CONFIG_S_NEEDS_RESET)


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest(4 << 20)
    yield g
    g.close()


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def packed(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def rig(guest: Guest, packed: bool) -> Iterator[NetRig]:
    r = NetRig(guest, SimNet("net0"), packed=packed)
    yield r
    r.close()


# ----- identity, config, negotiation --------------------------------------------------------------------

def test_bring_up_reports_the_exact_device(rig: NetRig) -> None:
    front, mac = rig.front, default_mac("net0")
    assert front.get_device_id() == VIRTIO_ID_NET
    assert front.get_features() == DEFAULT_FEATURES
    assert front.get_status() == DRIVER_OK
    assert (front.get_vqs_count(), front.get_group_num(), front.get_as_num()) == (3, 2, 2)
    assert [front.get_vring_group(i) for i in range(3)] == [0, 0, 1]  # the controlq alone in group 1
    assert front.get_vring_num() == 256 and front.get_vring_size(0) == 16
    assert front.get_config_size() == 24
    expected = mac + struct.pack("<HHHIB", N.VIRTIO_NET_S_LINK_UP, 1, 1500, 0xFFFFFFFF, 0xFF) + bytes(7)
    assert front.get_config(0, 24) == expected == net_config(mac=mac, max_virtqueue_pairs=1, mtu=1500)
    for index in range(3):
        assert front.get_vring_base(index) == (0x8000_8000 if rig.packed else 0)
    front.set_config(0, b"\x02" * 6)  # read-only to a VERSION_1 driver
    assert front.get_config(0, 6) == mac


def test_offer_is_valid_and_default_mac_is_local_unicast() -> None:
    dev = SimNet("n", max_vq_pairs=4)
    offered = dev.get_device_features()
    assert offered == DEFAULT_FEATURES | bits(N.VIRTIO_NET_F_MQ)
    for bit in (N.VIRTIO_NET_F_MAC, N.VIRTIO_NET_F_MRG_RXBUF, N.VIRTIO_NET_F_CTRL_VQ, T.VHOST_F_LOG_ALL,
                VIRTIO_F_RING_PACKED, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_F_ACCESS_PLATFORM):
        assert offered >> bit & 1, bit
    assert not SimNet("one").get_device_features() >> N.VIRTIO_NET_F_MQ & 1
    assert default_mac("a") != default_mac("b") and default_mac("a") == default_mac("a")
    assert default_mac("a")[0] & 0x03 == 0x02  # locally administered, unicast
    with pytest.raises(ValueError):
        SimNet("bad", features=DEFAULT_FEATURES & ~(1 << N.VIRTIO_NET_F_CTRL_VQ))  # CTRL_RX without CTRL_VQ
    with pytest.raises(ValueError):
        SimNet("bad", max_vq_pairs=2, features=DEFAULT_FEATURES)  # two pairs need MQ
    with pytest.raises(ValueError):
        SimNet("bad", mac=b"\x01" * 6)  # multicast


def test_features_ok_refused_for_an_invalid_set(guest: Guest) -> None:
    front = VhostVdpa(SimNet("n"), guest.registry)
    try:
        front.set_owner()
        front.set_status(ACK_DRIVER)
        for bad in (net_features() & ~(1 << VIRTIO_F_VERSION_1),
                    net_features(ctrl=False) | (1 << N.VIRTIO_NET_F_CTRL_RX),  # needs CTRL_VQ
                    net_features() | (1 << N.VIRTIO_NET_F_MQ)):  # not offered by a one-pair device
            front.set_features(bad)
            front.set_status(FEATURES_OK)
            assert front.get_status() == ACK_DRIVER
        front.set_features(net_features())
        front.set_status(FEATURES_OK)
        assert front.get_status() == FEATURES_OK
    finally:
        front.close()


def test_multiqueue_layout_follows_the_negotiated_features(guest: Guest) -> None:
    dev = SimNet("mq", max_vq_pairs=2)
    front = VhostVdpa(dev, guest.registry)
    try:
        front.set_owner()
        assert front.get_vqs_count() == 5
        # Without MQ (nothing negotiated yet) the controlq is queue 2 (§5.1.2).
        assert [front.get_vring_group(i) for i in range(5)] == [0, 0, 1, 0, 0]
        front.set_status(ACK_DRIVER)
        front.set_features(net_features(mq=True))
        assert [front.get_vring_group(i) for i in range(5)] == [0, 0, 0, 0, 1]
        assert struct.unpack("<H", front.get_config(N.VIRTIO_NET_CONFIG_MAX_VIRTQUEUE_PAIRS, 2))[0] == 2
        front.set_status(0)
        assert [front.get_vring_group(i) for i in range(5)] == [0, 0, 1, 0, 0]
    finally:
        front.close()


# ----- traffic ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [64, 1500 + 14])
def test_frames_come_back_in_order_with_their_header(rig: NetRig, length: int) -> None:
    rig.post_rx(4)
    frames = [make_frame(seq, length) for seq in range(4)]
    heads = rig.send(frames)
    assert rig.tx_used() == heads
    got = rig.receive()
    assert [f for _, f in got] == frames and [frame_seq(f) for _, f in got] == [0, 1, 2, 3]
    assert all(h == rx_hdr(1) for h, _ in got)
    assert rig.dev.loopback_stats()["frames"] == 4
    assert signalled(rig.calls[0]) >= 1 and signalled(rig.calls[1]) >= 1


def test_64k_frame_spans_merged_rx_buffers(guest: Guest, packed: bool) -> None:
    dev = SimNet("big", mtu=65535)
    r = NetRig(guest, dev, packed=packed, features=net_features(packed, mrg=True), num=32)
    try:
        r.post_rx(20, 4096)
        frame = make_frame(7, 64 * 1024)
        r.send([frame])
        assert len(r.tx_used()) == 1
        ((hdr, got),) = r.receive()
        assert got == frame and frame_seq(got) == 7
        assert hdr == rx_hdr(-(-(HDR_LEN + len(frame)) // 4096))  # 17 buffers
        r.post_rx(2)
        small = make_frame(8, 64)
        r.send([small])
        # 3 RX buffers were left over from the big frame: the small one takes exactly one
        assert r.receive() == [(rx_hdr(1), small)]
    finally:
        r.close()


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_traffic_across_index_wraps(guest: Guest, packed: bool, indirect: bool) -> None:
    """Split: last_avail_idx crosses 2^16; both layouts wrap the ring (size 8) several times."""
    start = 0xFFF6
    drivers: dict[int, Driver] = {}
    for index in range(3):
        drivers[index] = PackedDriver(guest, 8) if packed else SplitDriver(guest, 8)
        if not packed:
            drivers[index].start_at(start)  # type: ignore[union-attr]
    bases = None if packed else dict.fromkeys(range(3), start)
    r = NetRig(guest, SimNet("wrap"), packed=packed, drivers=drivers, features=net_features(packed, indirect=indirect),
               bases=bases)
    try:
        received: list[int] = []
        for batch in range(8):
            r.post_rx(3)
            frames = [make_frame(3 * batch + i, 64 + 100 * i) for i in range(3)]
            r.send(frames, indirect=indirect)
            assert len(r.tx_used()) == 3
            got = r.receive()
            assert [f for _, f in got] == frames
            received += [frame_seq(f) for _, f in got]
        assert received == list(range(24))
        if not packed:
            assert r.front.get_vring_base(1) == (start + 24) & 0xFFFF
        assert not r.needs_reset()
    finally:
        r.close()


def test_no_tx_is_consumed_while_rx_is_empty(rig: NetRig) -> None:
    frames = [make_frame(seq, 100) for seq in range(3)]
    heads = rig.send(frames)
    assert rig.tx_used() == [] and rig.receive() == []
    assert rig.front.get_vring_base(1) == (0x8000_8000 if rig.packed else 0)  # nothing taken
    rig.post_rx(2, kick=True)  # the RX kick moves what fits
    assert rig.tx_used() == heads[:2]
    assert [frame_seq(f) for _, f in rig.receive()] == [0, 1]
    rig.kick(1)  # another TX kick with RX full changes nothing
    assert rig.tx_used() == [] and rig.receive() == []
    rig.post_rx(1, kick=True)
    assert rig.tx_used() == heads[2:]
    assert [frame_seq(f) for _, f in rig.receive()] == [2]


def test_checksum_offload_header_passes_with_guest_csum(guest: Guest, packed: bool) -> None:
    r = NetRig(guest, SimNet("csum"), packed=packed, features=net_features(packed, guest_csum=True))
    try:
        r.post_rx(1)
        frame = make_frame(1, 200)
        tx = HDR.pack(N.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16, 0)
        r.send([frame], hdr=tx)
        ((hdr, got),) = r.receive()
        assert got == frame and hdr == HDR.pack(N.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16, 1)
    finally:
        r.close()


def test_notifications_follow_the_drivers_suppression(guest: Guest) -> None:
    r = NetRig(guest, SimNet("n"))
    try:
        tx = r.tx()
        assert isinstance(tx, SplitDriver)
        tx.set_avail_flags(1)  # VRING_AVAIL_F_NO_INTERRUPT on TX only
        r.post_rx(1)
        r.send([make_frame(0, 64)])
        assert len(r.receive()) == 1
        assert signalled(r.calls[0]) >= 1 and signalled(r.calls[1]) == 0
    finally:
        r.close()


# ----- multiqueue and the control queue -------------------------------------------------------------------

def test_vq_pairs_set_activates_the_second_pair(guest: Guest, packed: bool) -> None:
    r = NetRig(guest, SimNet("mq", max_vq_pairs=2), packed=packed, features=net_features(packed, mq=True))
    try:
        assert r.ctrl_index == 4 and r.front.get_vring_group(4) == 1
        r.post_rx(2, pair=1)
        early = [make_frame(100 + i, 80) for i in range(2)]
        r.send(early, pair=1)
        assert r.tx_used(1) == []  # only pair 1 (index 0/1) carries traffic before VQ_PAIRS_SET
        for pairs in (0, 3):
            assert r.set_pairs(pairs) == N.VIRTIO_NET_ERR
        assert r.tx_used(1) == []
        assert r.set_pairs(2) == N.VIRTIO_NET_OK
        assert len(r.tx_used(1)) == 2 and [f for _, f in r.receive(1)] == early  # moved by the activation
        r.post_rx(1, pair=0)
        r.send([make_frame(1, 64)], pair=0)
        assert [frame_seq(f) for _, f in r.receive(0)] == [1] and r.receive(1) == []
        assert r.set_pairs(1) == N.VIRTIO_NET_OK
        r.post_rx(1, pair=1)
        r.send([make_frame(200, 64)], pair=1)
        assert r.tx_used(1) == []  # pair 2 is off again
    finally:
        r.close()


def test_without_mq_the_controlq_is_queue_2(guest: Guest) -> None:
    r = NetRig(guest, SimNet("mq", max_vq_pairs=2), features=net_features())
    try:
        assert r.ctrl_index == 2 and r.front.get_vring_group(2) == 1 and r.front.get_vring_group(4) == 0
        assert r.set_pairs(2) == N.VIRTIO_NET_ERR
        r.post_rx(1)
        r.send([make_frame(5, 64)])
        assert [frame_seq(f) for _, f in r.receive()] == [5]
    finally:
        r.close()


def test_mac_addr_set_updates_config_and_interrupts(rig: NetRig) -> None:
    new = bytes.fromhex("02aabbccddee")
    signalled(rig.config_fd)
    assert rig.command(N.VIRTIO_NET_CTRL_MAC, N.VIRTIO_NET_CTRL_MAC_ADDR_SET, new) == N.VIRTIO_NET_OK
    assert rig.front.get_config(N.VIRTIO_NET_CONFIG_MAC, 6) == new
    assert signalled(rig.config_fd) >= 1 and signalled(rig.calls[2]) >= 1
    assert rig.command(N.VIRTIO_NET_CTRL_MAC, N.VIRTIO_NET_CTRL_MAC_ADDR_SET, new[:5]) == N.VIRTIO_NET_ERR
    assert rig.front.get_config(N.VIRTIO_NET_CONFIG_MAC, 6) == new
    rig.front.set_status(0)  # reset: the configured MAC is back
    assert rig.front.get_config(N.VIRTIO_NET_CONFIG_MAC, 6) == default_mac("net0")


def test_mac_addr_set_needs_its_feature(guest: Guest) -> None:
    r = NetRig(guest, SimNet("n"), features=net_features(mac_addr=False))
    try:
        assert r.command(N.VIRTIO_NET_CTRL_MAC, N.VIRTIO_NET_CTRL_MAC_ADDR_SET, b"\x02" * 6) == N.VIRTIO_NET_ERR
        assert r.front.get_config(0, 6) == default_mac("n")
    finally:
        r.close()


def test_rx_mode_commands(rig: NetRig) -> None:
    ctrl = rig.dev.ctrl
    assert ctrl.promisc and not ctrl.allmulti and not ctrl.alluni
    assert rig.command(N.VIRTIO_NET_CTRL_RX, N.VIRTIO_NET_CTRL_RX_PROMISC, b"\x00") == N.VIRTIO_NET_OK
    assert rig.command(N.VIRTIO_NET_CTRL_RX, N.VIRTIO_NET_CTRL_RX_ALLMULTI, b"\x01") == N.VIRTIO_NET_OK
    assert rig.command(N.VIRTIO_NET_CTRL_RX, N.VIRTIO_NET_CTRL_RX_ALLUNI, b"\x01") == N.VIRTIO_NET_OK
    assert rig.command(N.VIRTIO_NET_CTRL_RX, N.VIRTIO_NET_CTRL_RX_PROMISC, b"\x00\x00") == N.VIRTIO_NET_ERR
    assert rig.command(N.VIRTIO_NET_CTRL_RX, 0x77, b"\x01") == N.VIRTIO_NET_ERR
    assert (ctrl.promisc, ctrl.allmulti, ctrl.alluni) == (False, True, True)
    rig.front.set_status(0)
    assert (ctrl.promisc, ctrl.allmulti, ctrl.alluni) == (True, False, False)


# ----- dirty log --------------------------------------------------------------------------------------------

def pages(gpa: int, length: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1)) if length else set()


@pytest.fixture
def log_memory(guest: Guest) -> Iterator[GuestMemory]:
    size = (guest.gpa(guest.size) // PAGE) // 8 + 1  # a bit per page of guest-physical space
    mem = GuestMemory(size, gpa=0x9_0000_0000, register=False)
    guest.registry.add(mem)
    yield mem
    mem.close()


def post_split_rx_at(driver: SplitDriver, offset: int, length: int) -> int:
    """One device-writable buffer at a chosen guest offset (so its pages are known)."""
    index = driver.free.pop(0)
    driver.write_desc(index, driver.guest.iova(offset), length, WRITE, 0)
    driver.chains[index] = [index]
    driver.buffers[index] = Buffers([], [(offset, length)])
    driver.publish(index)
    return index


def test_dirty_log_marks_exactly_the_pages_the_device_wrote(guest: Guest, log_memory: GuestMemory) -> None:
    drivers: dict[int, Driver] = {}
    for index in range(3):
        guest.alloc(PAGE, PAGE)  # a page between rings: each used ring has pages of its own
        drivers[index] = SplitDriver(guest, 8)
    dev = SimNet("log")
    r = NetRig(guest, dev, features=net_features(log=True), drivers=drivers, log_used=True)
    try:
        log_fd = r.efd()
        r.front.set_log_base(log_memory.uaddr)
        r.front.set_log_fd(log_fd)
        rx, tx = r.rx(), r.tx()
        assert isinstance(rx, SplitDriver) and isinstance(tx, SplitDriver)
        buf_off = 200 * PAGE - 6  # the header straddles a page boundary; the frame ends in the next page
        post_split_rx_at(rx, buf_off, 3 * PAGE)
        frame = make_frame(1, 64)
        r.send([frame])
        assert r.receive() == [(rx_hdr(1), frame)]
        rx_used, tx_used = guest.gpa(rx.used), guest.gpa(tx.used)
        expected = (pages(guest.gpa(buf_off), HDR_LEN + len(frame))  # what was written, not the whole buffer
                    | pages(rx_used + 2, 2) | pages(rx_used + 4, 8) | pages(tx_used + 2, 2) | pages(tx_used + 4, 8))
        assert len(pages(guest.gpa(buf_off), HDR_LEN + len(frame))) == 2
        assert set(dev.dirty_log.dirty_pages()) == expected
        assert signalled(log_fd) >= 1
        # a control command dirties its ack byte and the controlq's used ring
        log_memory.fill(0, log_memory.size, 0)
        assert r.command(N.VIRTIO_NET_CTRL_RX, N.VIRTIO_NET_CTRL_RX_PROMISC, b"\x00") == N.VIRTIO_NET_OK
        ctrl = r.drivers[2]
        assert isinstance(ctrl, SplitDriver)
        ((ack_off, _),) = ctrl.buffers[0].writable
        ctrl_used = guest.gpa(ctrl.used)
        assert set(dev.dirty_log.dirty_pages()) == (pages(guest.gpa(ack_off), 1) | pages(ctrl_used + 2, 2)
                                                    | pages(ctrl_used + 4, 8))
    finally:
        r.close()


def test_dirty_log_on_packed_rings(guest: Guest, log_memory: GuestMemory) -> None:
    dev = SimNet("log")
    r = NetRig(guest, dev, packed=True, features=net_features(True, log=True), log_used=True)
    try:
        r.front.set_log_base(log_memory.uaddr)
        rx, tx = r.rx(), r.tx()
        assert isinstance(rx, PackedDriver) and isinstance(tx, PackedDriver)
        (rx_id,) = r.post_rx(1, 2 * PAGE)
        frame = make_frame(2, 1000)
        r.send([frame])
        assert r.receive() == [(rx_hdr(1), frame)]
        ((buf_off, _),) = rx.buffers[rx_id].writable
        expected = (pages(guest.gpa(buf_off), HDR_LEN + len(frame))
                    | pages(guest.gpa(rx.desc) + 8, 8) | pages(guest.gpa(tx.desc) + 8, 8))  # used descriptors
        assert set(dev.dirty_log.dirty_pages()) == expected
    finally:
        r.close()


# ----- hostile input --------------------------------------------------------------------------------------

def hostile_tx_loop(r: NetRig) -> None:
    """A TX chain that never ends: a split descriptor chained to itself, or a packed ring all NEXT."""
    tx, iova = r.tx(), r.guest.iova(r.guest.alloc(64))
    if isinstance(tx, SplitDriver):
        index = tx.free.pop(0)
        tx.write_desc(index, iova, 64, NEXT, index)
        tx.publish(index)
    else:
        for slot in range(tx.num):
            tx.write_desc(slot, iova, 64, 0, NEXT | tx.avail_flags(1))


def test_a_hostile_tx_chain_needs_reset_and_writes_nothing(rig: NetRig) -> None:
    rig.post_rx(2)
    hostile_tx_loop(rig)
    before = rig.guest.snapshot()
    signalled(rig.config_fd)
    rig.kick(1)
    assert rig.needs_reset()
    assert signalled(rig.config_fd) >= 1
    assert rig.guest.snapshot() == before  # not one byte, not even a used entry
    rig.kick(0)
    assert rig.guest.snapshot() == before  # the pair stays stopped


def hostile_tx_unmapped(r: NetRig) -> None:
    """A TX chain whose frame descriptor points at an IOVA nothing maps."""
    tx, hdr = r.tx(), r.guest.iova(r.guest.alloc(HDR_LEN))
    if isinstance(tx, SplitDriver):
        first, second = tx.free.pop(0), tx.free.pop(0)
        tx.write_desc(second, 0x9000_0000, 64, 0, 0)
        tx.write_desc(first, hdr, HDR_LEN, NEXT, second)
        tx.publish(first)
    else:
        tx.write_desc(1, 0x9000_0000, 64, 0, tx.avail_flags(1))
        tx.write_desc(0, hdr, HDR_LEN, 0, NEXT | tx.avail_flags(1))


@pytest.mark.parametrize("attack", [hostile_tx_loop, hostile_tx_unmapped])
def test_a_hostile_tx_chain_found_by_an_rx_kick(rig: NetRig, attack: object) -> None:
    """The broken queue is the partner of the kicked one: still NEEDS_RESET, a fault report, no write."""
    attack(rig)  # type: ignore[operator]
    rig.post_rx(1)
    before = rig.guest.snapshot()
    signalled(rig.config_fd)
    rig.kick(0)
    assert rig.needs_reset()
    assert signalled(rig.config_fd) >= 1
    assert rig.guest.snapshot() == before
    message = rig.front.read()
    if attack is hostile_tx_unmapped:
        assert message is not None
        _, asid, iova, _, _, perm, msg_type = unpack_iotlb_msg(message)
        assert (msg_type, asid, iova, perm) == (T.VHOST_IOTLB_MISS, 0, 0x9000_0000, T.VHOST_ACCESS_RO)
    else:
        assert message is None


def changed_ranges(before: bytes, after: bytes) -> list[int]:
    return [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]


def test_frames_before_a_hostile_chain_are_delivered_and_nothing_else_is_written(guest: Guest) -> None:
    r = NetRig(guest, SimNet("h"))
    try:
        (rx_head,) = r.post_rx(1)
        rx, tx = r.rx(), r.tx()
        assert isinstance(rx, SplitDriver) and isinstance(tx, SplitDriver)
        frame = make_frame(9, 300)
        r.send([frame], kick=False)
        hostile_tx_loop(r)
        before = guest.snapshot()
        r.kick(1)
        assert r.needs_reset()
        assert r.receive() == [(rx_hdr(1), frame)]
        ((buf_off, _),) = rx.buffers[rx_head].writable
        allowed = [(buf_off, HDR_LEN + len(frame)), (rx.used, 4 + 8 * rx.num), (tx.used, 4 + 8 * tx.num)]
        for offset in changed_ranges(before, guest.snapshot()):
            assert any(start <= offset < start + n for start, n in allowed), f"device wrote guest offset {offset:#x}"
    finally:
        r.close()


# ----- the management device ------------------------------------------------------------------------------

def test_sim_net_management_device() -> None:
    bus = VdpaBus()
    assert "sim-net" in load_mgmtdevs(bus)
    shown = bus.mgmtdev_show("sim-net")[0]
    assert shown["supported_classes"] == ["net"] and shown["dev_features"] == SUPPORTED_FEATURES
    assert shown["supported_attrs"] == ["batch_mapping", "features", "mac", "max_iotlb_entries", "max_vq_pairs", "mtu",
                                        "queue_size"]
    device = bus.dev_add("net7", "sim-net", mac="02:11:22:33:44:55", mtu=9000, max_vq_pairs=4, queue_size=64)
    assert isinstance(device.parent, SimNet) and device.parent.nvqs == 9
    config = bus.dev_config_show("net7")
    shown_config = (config["mac"], config["mtu"], config["max_vq_pairs"], config["link"])
    assert shown_config == ("02:11:22:33:44:55", 9000, 4, "up")
    assert bus.dev_show("net7")[0]["max_vq_size"] == 64
    default = bus.dev_add("net8", "sim-net")
    assert default.parent.get_config(0, 6) == default_mac("net8")
    for attrs in ({"features": 1 << 50}, {"max_vq_pairs": 2, "features": DEFAULT_FEATURES},
                  {"mac": "01:00:00:00:00:01"}, {"mtu": 10}, {"max_vq_pairs": 0}):
        with pytest.raises(OSError) as refused:
            bus.dev_add("bad", "sim-net", **attrs)
        assert refused.value.errno == errno.EINVAL, attrs
    with pytest.raises(OSError) as refused:
        bus.dev_add("bad", "sim-net", capacity=8)
    assert refused.value.errno == errno.EOPNOTSUPP
    bus.dev_del("net7")
    bus.dev_del("net8")
