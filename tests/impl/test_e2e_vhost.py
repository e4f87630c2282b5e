"""End to end through the vhost-vdpa front, for both reference devices (issue 3, "Done when").

Each scenario runs on sim-net and on sim-blk, split and packed: bring-up with the exact GET_*
answers, traffic through kick and call eventfds, suspend with GET_VRING_BASE of every queue and
resume, the vring bases saved on one device and restored onto a second one over the same guest
memory (the work in flight moves exactly once), and reset from the middle of traffic. Rings
are built by ring_driver in real guest memory, mapped with IOTLB UPDATE messages. A small
adapter per device type (:class:`NetCase`, :class:`BlkCase`) says what "work" is: a frame sent
and looped back, or a sector written.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from vdpacert.impl.sim_blk import SimBlk, blk_config
from vdpacert.impl.sim_device import SimDevice
from vdpacert.impl.sim_net import DEFAULT_FEATURES as NET_OFFER
from vdpacert.impl.sim_net import SimNet, default_mac, net_config
from vdpacert.impl.vhost_vdpa import VhostVdpa
from vdpacert.uapi import virtio_blk as B  # noqa: N812
from vdpacert.uapi import virtio_net as N  # noqa: N812
from vdpacert.uapi.virtio_ids import VIRTIO_ID_BLOCK, VIRTIO_ID_NET

try:
    from .ring_driver import Guest, PackedDriver, SplitDriver
    from .test_sim_blk import DEFAULT_FEATURES as BLK_OFFER
    from .test_sim_blk import Rig, expected_base, sectors
    from .test_sim_net import DRIVER_OK, NetRig, frame_seq, make_frame, net_features, signalled
except ImportError:
    from ring_driver import Guest, PackedDriver, SplitDriver
    from test_sim_blk import DEFAULT_FEATURES as BLK_OFFER
    from test_sim_blk import Rig, expected_base, sectors
    from test_sim_net import DRIVER_OK, NetRig, frame_seq, make_frame, net_features, signalled

CAPACITY = 64
SECTOR = 512
Driver = SplitDriver | PackedDriver


def everything(front: VhostVdpa, *, bases: bool = True) -> dict[str, Any]:
    """Every GET_* answer of the front, per queue where the ioctl takes an index.

    ``bases=False`` leaves GET_VRING_BASE out (see test_reset_mid_traffic_restores_every_get).
    """
    count = front.get_vqs_count()
    return {
        "device_id": front.get_device_id(), "features": front.get_features(),
        "backend_features": front.get_backend_features(), "status": front.get_status(),
        "config_size": front.get_config_size(), "config": front.get_config(0, front.get_config_size()),
        "vring_num": front.get_vring_num(), "vqs_count": count, "group_num": front.get_group_num(),
        "as_num": front.get_as_num(), "iova_range": front.get_iova_range(),
        "vrings": [(front.get_vring_group(i), front.get_vring_size(i), front.get_vring_base(i) if bases else None)
                   for i in range(count)],
    }


def everything_but_bases(answers: dict[str, Any]) -> dict[str, Any]:
    return {**answers, "vrings": [(group, size, None) for group, size, _ in answers["vrings"]]}


class NetCase:
    """Work is a frame: an RX buffer posted, the frame sent on TX (eventfd kick), looped back."""

    kind = "net"

    def device(self, name: str) -> SimNet:
        return SimNet(name, max_vq_pairs=2)

    def identity(self, name: str) -> dict[str, Any]:
        return {"device_id": VIRTIO_ID_NET, "features": NET_OFFER | (1 << N.VIRTIO_NET_F_MQ), "vqs_count": 5,
                "group_num": 2, "as_num": 2, "vring_num": 256, "config_size": 24,
                "config": net_config(mac=default_mac(name), max_virtqueue_pairs=2, mtu=1500),
                "groups": [0, 0, 0, 0, 1]}

    def open(self, guest: Guest, dev: SimDevice, packed: bool, *, bases: dict[int, int] | None = None,
             drivers: dict[int, Driver] | None = None, start: bool = True) -> NetRig:
        assert isinstance(dev, SimNet)
        return NetRig(guest, dev, packed=packed, features=net_features(packed, mq=True), bases=bases,
                      drivers=drivers, start=start)

    def queues(self, rig: NetRig) -> dict[int, Driver]:
        return dict(rig.drivers)

    def submit(self, rig: NetRig, seqs: list[int]) -> None:
        rig.post_rx(len(seqs))
        rig.send([make_frame(seq, 64 + 37 * (seq % 20)) for seq in seqs])

    def completed(self, rig: NetRig) -> list[int]:
        """Work finished since the last call, in completion order (checking every frame)."""
        got = rig.receive()
        assert len(rig.tx_used()) == len(got)
        return [frame_seq(frame) for _, frame in got]

    def called(self, rig: NetRig) -> bool:
        return signalled(rig.calls[0]) > 0 and signalled(rig.calls[1]) > 0

    def mid_traffic(self, rig: NetRig) -> None:
        """Leave the device busy: a changed MAC, two active pairs, frames waiting for RX buffers."""
        assert rig.command(N.VIRTIO_NET_CTRL_MAC, N.VIRTIO_NET_CTRL_MAC_ADDR_SET, b"\x02" * 6) == N.VIRTIO_NET_OK
        assert rig.set_pairs(2) == N.VIRTIO_NET_OK
        rig.send([make_frame(900 + i, 64) for i in range(3)])  # no RX buffer: they wait in TX


class BlkCase:
    """Work is a sector: an OUT request writing sector ``seq`` (eventfd kick), checked on the disk."""

    kind = "blk"

    def __init__(self) -> None:
        self.heads: dict[int, int] = {}

    def device(self, name: str) -> SimBlk:
        return SimBlk(name, capacity=CAPACITY)

    def identity(self, name: str) -> dict[str, Any]:
        return {"device_id": VIRTIO_ID_BLOCK, "features": BLK_OFFER, "vqs_count": 1, "group_num": 1, "as_num": 1,
                "vring_num": 256, "config_size": B.VIRTIO_BLK_CONFIG_SIZE,
                "config": blk_config(capacity=CAPACITY, size_max=0x10000, seg_max=254, num_queues=1,
                                     max_discard_sectors=0xFFFFFFFF, max_discard_seg=16,
                                     max_write_zeroes_sectors=0xFFFFFFFF, max_write_zeroes_seg=16),
                "groups": [0]}

    def open(self, guest: Guest, dev: SimDevice, packed: bool, *, bases: dict[int, int] | None = None,
             drivers: dict[int, Driver] | None = None, start: bool = True) -> Rig:
        assert isinstance(dev, SimBlk)
        rig = Rig(guest, dev, packed=packed, base=None if bases is None else bases[0], start=False,
                  drivers=None if drivers is None else [drivers[0]])
        rig.kick_fd = rig._efd()  # type: ignore[attr-defined]
        rig.front.set_vring_kick(0, rig.kick_fd)  # type: ignore[attr-defined]
        if start:
            rig.start()
        return rig

    def queues(self, rig: Rig) -> dict[int, Driver]:
        return dict(enumerate(rig.drivers))

    def submit(self, rig: Rig, seqs: list[int]) -> None:
        for seq in seqs:
            self.heads[rig.add(B.VIRTIO_BLK_T_OUT, seq % CAPACITY, out=sectors(1, seq))] = seq
        os.eventfd_write(rig.kick_fd, 1)  # type: ignore[attr-defined]
        assert rig.front.poll_kicks(timeout=1.0) == 1

    def completed(self, rig: Rig) -> list[int]:
        done = []
        for head, length in rig.driver.get_used():
            seq = self.heads.pop(head)
            assert length == 1 and rig.driver.written(head) == bytes([B.VIRTIO_BLK_S_OK])
            assert rig.dev.disk.read(seq % CAPACITY, SECTOR) == sectors(1, seq)
            done.append(seq)
        return done

    def called(self, rig: Rig) -> bool:
        return signalled(rig.calls[0]) > 0

    def mid_traffic(self, rig: Rig) -> None:
        rig.front.suspend()
        self.submit(rig, [900, 901])  # kicked while suspended: remembered, not processed


@pytest.fixture(params=[NetCase, BlkCase], ids=["net", "blk"])
def case(request: pytest.FixtureRequest) -> NetCase | BlkCase:
    return request.param()  # type: ignore[no-any-return]


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def packed(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest(4 << 20)
    yield g
    g.close()


def test_bring_up_answers_every_get_exactly(guest: Guest, case: NetCase | BlkCase, packed: bool) -> None:
    rig = case.open(guest, case.device("dev0"), packed)
    try:
        got = everything(rig.front)
        identity = case.identity("dev0")
        groups = identity.pop("groups")
        for key, value in identity.items():
            assert got[key] == value, key
        assert got["status"] == DRIVER_OK
        assert got["iova_range"] == (0, (1 << 64) - 1)
        assert [group for group, _, _ in got["vrings"]] == groups
        ring_size = 16
        for index, driver in case.queues(rig).items():
            assert got["vrings"][index][1:] == (ring_size, 0x8000_8000 if packed else 0)
            assert driver.num == ring_size
    finally:
        rig.close()


def test_traffic_through_eventfds(guest: Guest, case: NetCase | BlkCase, packed: bool) -> None:
    rig = case.open(guest, case.device("dev0"), packed)
    try:
        done: list[int] = []
        for batch in range(9):  # 36 units through rings of 16: every index wraps twice
            seqs = list(range(4 * batch, 4 * batch + 4))
            case.submit(rig, seqs)
            done += case.completed(rig)
            assert case.called(rig)
        assert done == list(range(36))
    finally:
        rig.close()


def test_suspend_get_vring_base_of_every_queue_resume(guest: Guest, case: NetCase | BlkCase, packed: bool) -> None:
    rig = case.open(guest, case.device("dev0"), packed)
    try:
        case.submit(rig, [0, 1, 2])
        assert case.completed(rig) == [0, 1, 2]
        queues = case.queues(rig)
        bases = {index: expected_base(driver) for index, driver in queues.items()}
        rig.front.suspend()
        case.submit(rig, [3, 4])  # kicks while suspended are remembered, nothing is processed
        assert case.completed(rig) == []
        for index in queues:
            assert rig.front.get_vring_base(index) == bases[index], index
            assert rig.front.get_vring_base(index) == bases[index]  # reading changes nothing
        rig.front.resume()
        assert case.completed(rig) == [3, 4]
        case.submit(rig, [5])
        assert case.completed(rig) == [5]
    finally:
        rig.close()


def test_vring_bases_restored_on_a_second_device(guest: Guest, case: NetCase | BlkCase, packed: bool) -> None:
    """Migration: suspend the source with work queued, restore its bases on a new device, continue."""
    source = case.open(guest, case.device("src"), packed)
    dest = None
    try:
        case.submit(source, [0, 1, 2, 3])
        done = case.completed(source)
        source.front.suspend()
        case.submit(source, [4, 5, 6])  # queued on the source, never processed there
        assert case.completed(source) == []
        queues = case.queues(source)
        bases = {index: source.front.get_vring_base(index) for index in queues}
        dest = case.open(guest, case.device("dst"), packed, bases=bases, drivers=queues, start=False)
        for index, base in bases.items():
            assert dest.front.get_vring_base(index) == base
        dest.start()
        done += case.completed(dest)  # the source's queued work, taken exactly once
        case.submit(dest, [7, 8])
        done += case.completed(dest)
        assert done == list(range(9))
        assert case.completed(source) == []  # the suspended source wrote nothing more
    finally:
        source.close()
        if dest is not None:
            dest.close()


def test_reset_mid_traffic_restores_every_get(guest: Guest, case: NetCase | BlkCase, packed: bool) -> None:
    dev = case.device("dev0")
    pristine = case.device("dev0").state_snapshot()
    probe = VhostVdpa(dev, guest.registry)
    probe.set_owner()
    initial = everything(probe)
    probe.close()
    rig = case.open(guest, dev, packed)
    try:
        case.submit(rig, [0, 1])
        assert case.completed(rig) == [0, 1]
        case.mid_traffic(rig)
        assert everything(rig.front) != initial
        negotiated = dev.get_driver_features()
        rig.front.set_status(0)
        assert dev.state_snapshot() == pristine
        # The front keeps the features userspace acked (vq->acked_features survives a reset on
        # Linux too), so GET_VRING_BASE still reads in the ring layout negotiated before; with a
        # packed layout the device's post-reset split state is refused (EIO) until SET_FEATURES.
        assert everything(rig.front, bases=not packed) == (initial if not packed else everything_but_bases(initial))
        rig.front.set_features(negotiated)
        for index in range(initial["vqs_count"]):
            assert rig.front.get_vring_base(index) == (0x8000_8000 if packed else 0)
    finally:
        rig.close()
    # and the device comes back up from there, on the same guest memory
    again = case.open(guest, dev, not packed)
    try:
        case.submit(again, [10, 11])
        assert case.completed(again) == [10, 11]
    finally:
        again.close()


def test_net_inflight_chains_after_set_vring_base(guest: Guest, packed: bool) -> None:
    """The source had taken two TX chains without answering: the destination delivers all three, in order."""
    rig = NetRig(guest, SimNet("dst"), packed=packed, start=False)
    try:
        rig.post_rx(3)
        frames = [make_frame(seq, 100) for seq in range(3)]
        rig.send(frames, kick=False)
        taken = 2 * 2 if packed else 2  # a TX chain is two descriptors (header, frame)
        rig.front.set_vring_base(1, (taken | 0x8000 | 0x8000 << 16) if packed else taken)
        rig.start()
        assert [frame for _, frame in rig.receive()] == frames
        assert len(rig.tx_used()) == 3 and not rig.needs_reset()
        assert rig.front.get_vring_base(1) == expected_base(rig.tx())
    finally:
        rig.close()


def test_net_multiqueue_state_is_replayed_after_migration(guest: Guest, packed: bool) -> None:
    """The destination starts with one pair; pair 2's queued frames move once VQ_PAIRS_SET is replayed."""
    features = net_features(packed, mq=True)
    source = NetRig(guest, SimNet("src", max_vq_pairs=2), packed=packed, features=features)
    dest = None
    try:
        assert source.set_pairs(2) == N.VIRTIO_NET_OK
        source.front.suspend()
        source.post_rx(2, pair=1)
        source.send([make_frame(seq, 64) for seq in (50, 51)], pair=1)
        bases = {index: source.front.get_vring_base(index) for index in source.drivers}
        dest = NetRig(guest, SimNet("dst", max_vq_pairs=2), packed=packed, features=features, bases=bases,
                      drivers=dict(source.drivers))
        assert dest.receive(1) == []  # pair 2 is not active on a fresh device
        assert dest.set_pairs(2) == N.VIRTIO_NET_OK
        assert [frame_seq(frame) for _, frame in dest.receive(1)] == [50, 51]
        assert dest.receive(0) == []
    finally:
        source.close()
        if dest is not None:
            dest.close()
