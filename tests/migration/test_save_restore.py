"""Save a running reference device through its vhost interface, ship the blob, restore it on a fresh twin.

A guest (a conformance DriverSession over guest memory) drives a sim-net or sim-blk source, split
and packed, from a fresh ring or from just before the index wrap. The source is suspended and saved
with a small direct-mode SaveSource (vring bases from GET_VRING_BASE); the blob is loaded against the
destination; the guest memory is copied and the state restored through a small VMM written here
(its RestoreOps). Then the destination must answer what the source answered (a save from it equals
the source's state), and the guest's traffic must go on: no frame lost or duplicated, every sector
reads back what was written, chains in flight at the source completed exactly once.

A destination that cannot take the state (fewer queues, smaller rings, features it does not offer,
another device) is refused before any state-changing call; a failure after one (a config space that
differs, features refused) is a RestoreError and leaves the destination reset.
"""

from __future__ import annotations

import dataclasses
import errno
import struct
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from vdpacert.conformance.client import VhostClient
from vdpacert.conformance.driver.device import WANTED_BACKEND, DriverSession, net_queues
from vdpacert.conformance.driver.memory import GuestLayout
from vdpacert.conformance.driver.packed import PackedRing
from vdpacert.conformance.driver.split import SplitRing
from vdpacert.conformance.driver.traffic import BlkShadow, NetStream, blk_in, blk_out
from vdpacert.conformance.targets import Target, make_target
from vdpacert.impl.guestmem import GuestMemory
from vdpacert.migration import blob
from vdpacert.migration.restore import restore_device_state
from vdpacert.migration.save import save_device_state
from vdpacert.migration.state import (
    DestinationInfo,
    DeviceState,
    NetState,
    RestoreError,
    StateError,
    VringSetup,
    control_queue,
)
from vdpacert.model.ring_index import PackedVqState, decode_packed_base, encode_packed_base
from vdpacert.uapi import vhost_types as T  # noqa: N812
from vdpacert.uapi import virtio_blk as B  # noqa: N812
from vdpacert.uapi import virtio_net as N  # noqa: N812
from vdpacert.uapi.virtio_config import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1
from vdpacert.uapi.virtio_ids import VIRTIO_ID_NET
from vdpacert.uapi.virtio_ring import VIRTIO_RING_F_EVENT_IDX

GPA = 0x1_0000_0000
MEMORY = 2 << 20
SCRATCH_GPA = 0x3_0000_0000
SCRATCH_IOVA = 0x10_0000_0000  # the VMM's own memory, clear of the guest's IOVAs
NUM = 16
RUNNING = 0xF
#: Ring starts: fresh, or a few entries before the 16-bit index wrap (split) / the ring's end (packed).
STARTS = {"fresh": (0, 0x8000), "near-wrap": (65533, 0x8000 | (NUM - 2))}
NEW_MAC = bytes.fromhex("02aabbccddee")
#: NetState's RX-mode fields, in VIRTIO_NET_CTRL_RX command order (PROMISC 0 ... NOBCAST 5).
RX_MODES = ("promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast")


def bits(*numbers: int) -> int:
    return sum(1 << n for n in numbers)


def net_features(packed: bool, *, mq: bool = False) -> int:
    return (bits(VIRTIO_F_VERSION_1, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_RING_F_EVENT_IDX, N.VIRTIO_NET_F_MAC,
                 N.VIRTIO_NET_F_MTU, N.VIRTIO_NET_F_STATUS, N.VIRTIO_NET_F_CTRL_VQ, N.VIRTIO_NET_F_CTRL_RX,
                 N.VIRTIO_NET_F_CTRL_RX_EXTRA, N.VIRTIO_NET_F_CTRL_MAC_ADDR)
            | (bits(VIRTIO_F_RING_PACKED) if packed else 0) | (bits(N.VIRTIO_NET_F_MQ) if mq else 0))


def blk_features(offer: int, packed: bool) -> int:
    return offer & ~bits(VIRTIO_F_RING_PACKED, T.VHOST_F_LOG_ALL) | (bits(VIRTIO_F_RING_PACKED) if packed else 0)


# ----- the guest, its source device, and the VMMs on both sides ------------------------------------------

class Guest:
    """A guest driving a device: its memory, its driver session, and the net state its acked commands set."""

    def __init__(self, target: Target, features: int, *, queues: list[int], start: str = "fresh", num: int = NUM,
                 backend: int = WANTED_BACKEND) -> None:
        self.target = target
        self.memory = target.new_memory(MEMORY, gpa=GPA)
        self.layout = GuestLayout(self.memory)
        packed = bool(features >> VIRTIO_F_RING_PACKED & 1)
        first = STARTS[start][1 if packed else 0]
        self.session = DriverSession(target.client, self.layout, features, queues=queues, num=num,
                                     starts={index: first for index in queues}, backend_features=backend,
                                     service=target.service)
        self.session.bring_up()
        self.group_asid: dict[int, int] = {}
        self.net = (initial_net_state(target.client.get_config(0, 6))
                    if target.device_id == VIRTIO_ID_NET else None)

    def ctrl(self, command: bytes) -> int:
        """One control-queue command; an acked one updates the net state the VMM tracks (as QEMU snoops it)."""
        cvq = control_queue(self.session.features, self.target.client.get_config(0, 24), VIRTIO_ID_NET)
        assert cvq is not None and self.net is not None
        self.session.rings[cvq].add([command], [1])
        self.session.kick(cvq)
        ack = self.session.reap(cvq, 1)[0].written[-1]
        if ack == N.VIRTIO_NET_OK:
            cls, cmd, data = command[0], command[1], command[2:]
            if cls == N.VIRTIO_NET_CTRL_MAC:
                self.net = dataclasses.replace(self.net, mac=data)
            elif cls == N.VIRTIO_NET_CTRL_MQ:
                self.net = dataclasses.replace(self.net, queue_pairs=struct.unpack("<H", data)[0])
            else:
                mode: dict[str, Any] = {RX_MODES[cmd]: bool(data[0])}
                self.net = dataclasses.replace(self.net, **mode)
        return ack

    def move_to(self, target: Target, memory: GuestMemory) -> None:
        """The guest now runs on ``target`` with ``memory`` (a copy of its own): the rings go on where they were."""
        self.target, self.memory = target, memory
        self.layout.memory = memory
        self.session.client = target.client
        self.session.service = target.service


class DirectSource:
    """SaveSource in direct mode: bases from GET_VRING_BASE, the rest as the guest's bring-up set it.

    ``holding``: the device claims it took every chain the guest made available and used none (a
    device with requests in flight), so those chains are in flight in the state.
    """

    def __init__(self, guest: Guest, *, holding: bool = False) -> None:
        self.guest = guest
        self.holding = holding

    @property
    def client(self) -> VhostClient:
        return self.guest.target.client

    @property
    def features(self) -> int:
        return self.guest.session.features

    @property
    def backend_features(self) -> int:
        return self.guest.session.backend_features

    @property
    def group_asid(self) -> Mapping[int, int]:
        return self.guest.group_asid

    @property
    def vrings(self) -> Mapping[int, VringSetup]:
        return {index: VringSetup(index, ring.num, *ring.addresses, True)
                for index, ring in self.guest.session.rings.items()}

    def vring_base(self, index: int) -> int:
        base = self.client.get_vring_base(index)
        if not self.holding:
            return base
        ring = self.guest.session.rings[index]
        if isinstance(ring, SplitRing):
            return ring.avail_idx
        used = decode_packed_base(base)
        return encode_packed_base(PackedVqState(ring.next_avail, ring.avail_wrap, used.last_used_idx,
                                                used.last_used_counter))

    def read_guest(self, iova: int, length: int) -> bytes:
        return self.guest.layout.read(self.guest.layout.offset_of_iova(iova), length)

    def net_state(self) -> NetState | None:
        return self.guest.net


def initial_net_state(mac: bytes) -> NetState:
    """What this test's VMM assumes of a device just reset: promiscuous (QEMU's reset value), one pair."""
    return NetState(mac=bytes(mac), queue_pairs=1, promisc=True, allmulti=False, alluni=False, nomulti=False,
                    nouni=False, nobcast=False)


def replay_commands(net: NetState, features: int, mac: bytes) -> list[bytes]:
    """What differs from a device just reset, as control commands (QEMU's vhost_vdpa_net_load does the same)."""
    out = []
    if net.mac != mac and features >> N.VIRTIO_NET_F_CTRL_MAC_ADDR & 1:
        out.append(bytes([N.VIRTIO_NET_CTRL_MAC, N.VIRTIO_NET_CTRL_MAC_ADDR_SET]) + net.mac)
    initial = initial_net_state(mac)
    for cmd, name in enumerate(RX_MODES):
        needs = N.VIRTIO_NET_F_CTRL_RX if cmd < 2 else N.VIRTIO_NET_F_CTRL_RX_EXTRA
        if getattr(net, name) != getattr(initial, name) and features >> needs & 1:
            out.append(bytes([N.VIRTIO_NET_CTRL_RX, cmd, int(getattr(net, name))]))
    if net.queue_pairs != 1 and features >> N.VIRTIO_NET_F_MQ & 1:
        pairs = struct.pack("<H", net.queue_pairs)
        out.append(bytes([N.VIRTIO_NET_CTRL_MQ, N.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET]) + pairs)
    return out


class DestinationVmm:
    """RestoreOps: the destination's vhost calls, recorded with their arguments, and the two VMM jobs.

    The control replay runs on a ring of the VMM's own (in scratch memory mapped beside the guest's):
    the guest's control queue is swapped out while the device is suspended and swapped back after,
    so the guest's ring never sees a command the guest did not send.
    """

    def __init__(self, target: Target, guest_iova: int, guest_memory: GuestMemory) -> None:
        self.target = target
        self.guest_iova, self.guest_memory = guest_iova, guest_memory
        self.scratch = GuestLayout(target.new_memory(1 << 16, gpa=SCRATCH_GPA), iova_base=SCRATCH_IOVA)
        self.calls: list[tuple[Any, ...]] = []
        self.features = 0
        self.vring_addr: dict[int, tuple[int, int, int]] = {}
        self.vring_base: dict[int, int] = {}
        self.vring_call: dict[int, int] = {}

    @property
    def client(self) -> VhostClient:
        return self.target.client

    def _do(self, name: str, *args: Any) -> Any:
        self.calls.append((name, *args))
        return getattr(self.client, name)(*args)

    def set_owner(self) -> None: self._do("set_owner")
    def set_status(self, status: int, /) -> None: self._do("set_status", status)
    def get_status(self) -> int: return int(self._do("get_status"))
    def get_backend_features(self) -> int: return int(self._do("get_backend_features"))
    def set_backend_features(self, features: int, /) -> None: self._do("set_backend_features", features)
    def get_features(self) -> int: return int(self._do("get_features"))
    def set_vring_num(self, index: int, num: int, /) -> None: self._do("set_vring_num", index, num)
    def set_vring_kick(self, index: int, fd: int, /) -> None: self._do("set_vring_kick", index, fd)
    def set_vring_enable(self, index: int, enable: bool, /) -> None: self._do("set_vring_enable", index, enable)
    def set_group_asid(self, group: int, asid: int, /) -> None: self._do("set_group_asid", group, asid)
    def resume(self) -> None: self._do("resume")

    def set_features(self, features: int, /) -> None:
        self._do("set_features", features)
        self.features = features

    def set_vring_addr(self, index: int, desc: int, avail: int, used: int, /) -> None:
        self._do("set_vring_addr", index, desc, avail, used)
        self.vring_addr[index] = (desc, avail, used)

    def set_vring_base(self, index: int, num: int, /) -> None:
        self._do("set_vring_base", index, num)
        self.vring_base[index] = num

    def set_vring_call(self, index: int, fd: int, /) -> None:
        self._do("set_vring_call", index, fd)
        self.vring_call[index] = fd

    def map_guest_memory(self) -> None:
        self.calls.append(("map_guest_memory",))
        client = self.client
        client.iotlb_update(self.guest_iova, self.guest_memory.size, self.guest_memory.uaddr, T.VHOST_ACCESS_RW)
        client.iotlb_update(SCRATCH_IOVA, self.scratch.size, self.scratch.uaddr_base, T.VHOST_ACCESS_RW)

    def replay_net_state(self, net: NetState, /) -> None:
        self.calls.append(("replay_net_state", net))
        client = self.client
        config = client.get_config(0, client.get_config_size())
        cvq = control_queue(self.features, config, VIRTIO_ID_NET)
        commands = replay_commands(net, self.features, config[:6])
        if cvq is None or not commands:
            return
        packed = bool(self.features >> VIRTIO_F_RING_PACKED & 1)
        ring = PackedRing(self.scratch, 8) if packed else SplitRing(self.scratch, 8)
        client.suspend()
        client.set_vring_call(cvq, T.VHOST_FILE_UNBIND)  # the guest hears nothing of the VMM's commands
        client.set_vring_addr(cvq, *ring.addresses)
        client.set_vring_base(cvq, ring.base)
        client.resume()
        try:
            for command in commands:
                ring.add([command], [1])
                client.kick(cvq)
                used = ring.reap()
                if len(used) != 1 or used[0].written[-1] != N.VIRTIO_NET_OK:
                    raise OSError(errno.EIO, f"control command {command[:2].hex()} was not acknowledged")
        finally:
            client.suspend()
            client.set_vring_addr(cvq, *self.vring_addr[cvq])
            client.set_vring_base(cvq, self.vring_base[cvq])
            client.set_vring_call(cvq, self.vring_call[cvq])
            client.resume()
            ring.close()

    def mutating_calls(self) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if not call[0].startswith("get_")]


@dataclasses.dataclass
class Migration:
    state: DeviceState
    destination: Target
    ops: DestinationVmm


class World:
    """Every target a test opens, closed (sessions first) at the end."""

    def __init__(self) -> None:
        self.targets: list[Target] = []
        self.guests: list[Guest] = []

    def target(self, spec: str) -> Target:
        target = make_target(spec)
        self.targets.append(target)
        return target

    def guest(self, spec: str, features: int | None = None, **kwargs: Any) -> Guest:
        target = self.target(spec)
        if features is None:
            features = blk_features(target.client.get_features(), kwargs.pop("packed", False))
        guest = Guest(target, features, **kwargs)
        self.guests.append(guest)
        return guest

    def migrate(self, guest: Guest, spec: str, *, holding: bool = False, rewind: bool = True) -> Migration:
        """Suspend, save, ship the blob, copy memory, restore; the guest then runs on the destination."""
        source = guest.target
        source.client.suspend()
        state = save_device_state(DirectSource(guest, holding=holding))
        data = blob.dump(state)
        destination = self.target(spec)
        memory = destination.new_memory(MEMORY, gpa=GPA)
        memory.write(0, guest.memory.read(0, MEMORY))
        loaded = blob.load(data, DestinationInfo.probe(destination.client))
        assert loaded == state
        ops = DestinationVmm(destination, guest.layout.iova_base, memory)
        session = guest.session
        restore_device_state(ops, loaded, kick_fds=session.kicks, call_fds=session.calls, rewind_inflight=rewind)
        guest.move_to(destination, memory)
        source.close()
        return Migration(state, destination, ops)


@pytest.fixture
def world() -> Iterator[World]:
    world = World()
    yield world
    for guest in world.guests:
        guest.session.close()
    for target in world.targets:
        target.close()


def exchange(guest: Guest, stream: NetStream, count: int, pair: int = 0) -> None:
    session = guest.session
    session.post_rx(pair, count)
    session.send_frames(pair, stream.frames(count, [64, 301, 1514]))
    for frame in session.receive_frames(pair, count):
        stream.receive(frame)
    session.tx_done(pair, count)


def shared_disk() -> str:
    """A sim-blk target string on a disk of its own that source and destination share (storage is not migrated)."""
    return f"sim-blk:disk=s3a-{uuid.uuid4().hex[:12]}"


def blk_capacity(target: Target) -> int:
    capacity: int = struct.unpack("<Q", target.client.get_config(B.VIRTIO_BLK_CONFIG_CAPACITY, 8))[0]
    return capacity


BATCH = 4  # requests in flight at once: 3 descriptors each on a 16-entry ring


def blk_write(guest: Guest, shadow: BlkShadow, sectors: range) -> None:
    for first in range(sectors.start, sectors.stop, BATCH):
        batch = range(first, min(first + BATCH, sectors.stop))
        done = guest.session.blk_run(0, [blk_out(s, shadow.write(s)) for s in batch])
        assert [c.status for c in done] == [B.VIRTIO_BLK_S_OK] * len(batch)


def blk_check(guest: Guest, shadow: BlkShadow, sectors: range) -> None:
    for first in range(sectors.start, sectors.stop, BATCH):
        batch = range(first, min(first + BATCH, sectors.stop))
        for completion in guest.session.blk_run(0, [blk_in(s) for s in batch]):
            assert completion.status == B.VIRTIO_BLK_S_OK
            shadow.check_read(completion.request.sector, completion.data)


def assert_same_device(migration: Migration, guest: Guest) -> None:
    """The destination answers what the source answered: a save from it is the source's state."""
    restored = save_device_state(DirectSource(guest))
    assert migration.state.diff(restored) == []
    client = migration.destination.client
    assert client.get_status() == RUNNING
    assert client.get_config(0, len(migration.state.config)) == migration.state.config


# ----- round trips ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("start", sorted(STARTS))
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_net_migrates_with_its_control_state_and_loses_no_frame(world: World, packed: bool, start: str) -> None:
    features = net_features(packed)
    backend = WANTED_BACKEND | bits(T.VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK)
    guest = world.guest("sim-net", features, queues=net_queues(features), start=start, backend=backend)
    guest.group_asid = {0: 0, 1: 0}
    stream = NetStream()
    exchange(guest, stream, 5)
    for command in (bytes([N.VIRTIO_NET_CTRL_MAC, N.VIRTIO_NET_CTRL_MAC_ADDR_SET]) + NEW_MAC,
                    bytes([N.VIRTIO_NET_CTRL_RX, N.VIRTIO_NET_CTRL_RX_PROMISC, 0]),
                    bytes([N.VIRTIO_NET_CTRL_RX, N.VIRTIO_NET_CTRL_RX_NOBCAST, 1])):
        assert guest.ctrl(command) == N.VIRTIO_NET_OK
    guest.session.post_rx(0, 4)  # available to the device, not taken yet: they must survive the move
    migration = world.migrate(guest, "sim-net")
    state = migration.state
    assert state.net == NetState(NEW_MAC, 1, False, False, False, False, False, True)
    assert [v.inflight for v in state.vrings] == [(), (), ()]
    assert_same_device(migration, guest)
    assert migration.destination.client.get_config(0, 6) == NEW_MAC  # replayed, never written to config
    # ENABLE_AFTER_DRIVER_OK: the controlq before DRIVER_OK, the data queues after it and after the replay.
    names = [call[:2] if call[0] in ("set_vring_enable", "set_status") else call[:1]
             for call in migration.ops.mutating_calls()]
    assert names.index(("set_vring_enable", 2)) < names.index(("set_status", RUNNING)) \
        < names.index(("replay_net_state",)) < names.index(("set_vring_enable", 0))
    assert names[-3:] == [("set_vring_enable", 0), ("set_vring_enable", 1), ("resume",)]
    guest.session.send_frames(0, stream.frames(4))
    for frame in guest.session.receive_frames(0, 4):
        stream.receive(frame)
    guest.session.tx_done(0, 4)
    exchange(guest, stream, 3)
    stream.check()
    assert len(stream.received) == 12


@pytest.mark.parametrize("start", sorted(STARTS))
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_blk_migrates_and_every_sector_reads_back(world: World, packed: bool, start: str) -> None:
    disk = shared_disk()
    guest = world.guest(disk, queues=[0], start=start, packed=packed)
    shadow = BlkShadow(blk_capacity(guest.target))
    blk_write(guest, shadow, range(0, 6))
    blk_check(guest, shadow, range(0, 6))
    migration = world.migrate(guest, disk)
    assert migration.state.net is None and migration.state.packed == packed
    assert_same_device(migration, guest)
    calls = [call[0] for call in migration.ops.mutating_calls()]
    assert calls[:7] == ["set_owner", "set_status", "set_backend_features", "map_guest_memory", "set_status",
                         "set_features", "set_status"]
    assert calls[7:13] == ["set_vring_num", "set_vring_addr", "set_vring_base", "set_vring_kick", "set_vring_call",
                           "set_vring_enable"]  # no ENABLE_AFTER_DRIVER_OK: enabled before DRIVER_OK
    blk_check(guest, shadow, range(0, 6))
    blk_write(guest, shadow, range(3, 12))
    blk_check(guest, shadow, range(0, 12))


def test_multiqueue_pairs_are_replayed_so_the_second_pair_carries_traffic(world: World) -> None:
    features = net_features(False, mq=True)
    guest = world.guest("sim-net:max_vq_pairs=2", features, queues=net_queues(features, 2))
    assert guest.ctrl(bytes([N.VIRTIO_NET_CTRL_MQ, N.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET]) + struct.pack("<H", 2)) == 0
    stream = NetStream()
    exchange(guest, stream, 3, pair=1)
    migration = world.migrate(guest, "sim-net:max_vq_pairs=2")
    assert migration.state.net is not None and migration.state.net.queue_pairs == 2
    assert migration.state.vqs_count == 5 and [v.index for v in migration.state.vrings] == [0, 1, 2, 3, 4]
    exchange(guest, stream, 3, pair=1)  # pair 2 is active only if VQ_PAIRS_SET was replayed
    stream.check()


# ----- chains in flight at the source ----------------------------------------------------------------------

@pytest.mark.parametrize("rewind", [True, False], ids=["rewound", "device-rewinds"])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_chains_in_flight_at_the_source_complete_exactly_once(world: World, packed: bool, rewind: bool) -> None:
    """The source took four writes and answered none; the destination answers each once, at the right place.

    ``rewound``: restore gives the used position as the base. ``device-rewinds``: restore gives the saved
    base and the reference device takes the chains back itself (from the used position it reads).
    """
    disk = shared_disk()
    guest = world.guest(disk, queues=[0], start="near-wrap", packed=packed)
    shadow = BlkShadow(blk_capacity(guest.target))
    blk_write(guest, shadow, range(0, 3))
    chains = [guest.session.blk_submit(0, blk_out(s, shadow.write(s)), kick=False) for s in range(10, 14)]
    migration = world.migrate(guest, disk, holding=True, rewind=rewind)
    vring = migration.state.vring(0)
    assert vring.inflight == tuple(chain.id for chain in chains)
    bases = {call[2] for call in migration.ops.calls if call[0] == "set_vring_base"}
    assert bases == {vring.used_idx * (0x10001 if packed else 1) if rewind else vring.base}
    done = guest.session.blk_complete(0, 4)
    assert sorted(c.id for c in done) == sorted(vring.inflight)
    assert all(c.status == B.VIRTIO_BLK_S_OK for c in done)
    guest.session.pump()
    assert guest.session.reap(0, 0) == []  # nothing answered twice
    blk_check(guest, shadow, range(0, 14))


# ----- refusals ---------------------------------------------------------------------------------------------

def sim_net_offer() -> int:
    with make_target("sim-net") as target:
        return target.client.get_features()


@pytest.mark.parametrize(("source", "destination", "field"), [
    ("sim-net:max_vq_pairs=2", "sim-net", "vqs_count"),
    ("sim-blk", "sim-blk:queue_size=64", "vrings[0].num"),
    ("sim-net", f"sim-net:features={sim_net_offer() & ~bits(N.VIRTIO_NET_F_CTRL_RX_EXTRA):x}", "features"),
    ("sim-blk", "sim-net", "device_id"),
], ids=["fewer-queues", "smaller-rings", "missing-feature", "other-device"])
def test_a_destination_that_cannot_take_the_state_is_refused_with_nothing_applied(
        world: World, source: str, destination: str, field: str) -> None:
    if source.startswith("sim-net"):
        features = net_features(False)  # no MQ: the queue count alone differs
        guest = world.guest(source, features, queues=net_queues(features))
    else:
        guest = world.guest(source, queues=[0], num=128)
    guest.target.client.suspend()
    data = blob.dump(save_device_state(DirectSource(guest)))
    target = world.target(destination)
    with pytest.raises(StateError) as caught:
        blob.load(data, DestinationInfo.probe(target.client))
    assert caught.value.field == field
    ops = DestinationVmm(target, guest.layout.iova_base, guest.memory)
    with pytest.raises(StateError) as caught:
        restore_device_state(ops, blob.load(data), kick_fds=guest.session.kicks, call_fds=guest.session.calls)
    assert caught.value.field == field
    assert ops.mutating_calls() == [] and target.client.get_status() == 0
    target.client.set_owner()  # nobody took the device: the first owner is still to come


def test_a_config_space_that_differs_is_a_restore_error_and_the_destination_is_reset(world: World) -> None:
    features = net_features(False)
    guest = world.guest("sim-net", features, queues=net_queues(features))
    with pytest.raises(RestoreError) as caught:
        world.migrate(guest, "sim-net:mtu=9000")
    assert caught.value.step == "VHOST_VDPA_GET_CONFIG" and "offsets 10-11" in caught.value.message
    destination = world.targets[-1]
    assert destination.client.get_status() == 0


def test_features_the_destination_refuses_are_a_restore_error_and_the_destination_is_reset(world: World) -> None:
    features = net_features(False)
    guest = world.guest("sim-net", features, queues=net_queues(features))
    guest.target.client.suspend()
    state = save_device_state(DirectSource(guest))
    broken = dataclasses.replace(state, features=state.features & ~bits(N.VIRTIO_NET_F_CTRL_VQ))  # CTRL_RX needs it
    target = world.target("sim-net")
    ops = DestinationVmm(target, guest.layout.iova_base, guest.memory)
    with pytest.raises(RestoreError, match="refused features") as caught:
        restore_device_state(ops, broken, kick_fds=guest.session.kicks, call_fds=guest.session.calls)
    assert caught.value.step == "VHOST_VDPA_SET_STATUS 0xb" and caught.value.errno is None
    assert ops.mutating_calls()[-1] == ("set_status", 0) and target.client.get_status() == 0


def test_an_unknown_eventfd_or_base_override_is_refused_before_any_call(world: World) -> None:
    guest = world.guest("sim-blk", queues=[0])
    guest.target.client.suspend()
    state = save_device_state(DirectSource(guest))
    target = world.target("sim-blk")
    ops = DestinationVmm(target, guest.layout.iova_base, guest.memory)
    kicks, calls = guest.session.kicks, guest.session.calls
    with pytest.raises(ValueError, match="call_fds has no eventfd for queue 0"):
        restore_device_state(ops, state, kick_fds=kicks, call_fds={})
    with pytest.raises(ValueError, match=r"bases\[0\]"):
        restore_device_state(ops, state, kick_fds=kicks, call_fds=calls, bases={0: state.vrings[0].base + 1})
    assert ops.mutating_calls() == []


# ----- a device answering nonsense at save ---------------------------------------------------------------

class LyingSource(DirectSource):
    def __init__(self, guest: Guest, base: int) -> None:
        super().__init__(guest)
        self.base = base

    def vring_base(self, index: int) -> int:
        return self.base


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_a_device_answering_nonsense_is_refused_at_save(world: World, packed: bool) -> None:
    guest = world.guest("sim-blk", queues=[0], packed=packed)
    shadow = BlkShadow(blk_capacity(guest.target))
    blk_write(guest, shadow, range(0, 2))  # 2 chains of 3 descriptors: the device is at idx / slot 2 / 6
    guest.target.client.suspend()
    if packed:  # two slots past the device's position, where the guest made nothing available
        lie, field = encode_packed_base(PackedVqState(8, 1, 6, 1)), "vrings[0].inflight"
    else:  # further ahead of used->idx than the ring holds
        lie, field = 2 + NUM + 1, "vrings[0].base"
    with pytest.raises(StateError) as caught:
        save_device_state(LyingSource(guest, lie))
    assert caught.value.field == field


def test_a_device_that_is_not_running_is_refused_at_save(world: World) -> None:
    guest = world.guest("sim-blk", queues=[0])
    guest.target.client.set_status(0)  # the guest reset the device
    with pytest.raises(StateError, match=r"^status: 0x0 is not a running device"):
        save_device_state(DirectSource(guest))
