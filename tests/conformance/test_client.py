"""VhostClient against the embedded targets: exact answers, exact bytes, errnos and dead targets.

The bring-up tests drive a device the way a userspace driver drives /dev/vhost-vdpa-N and
check every answer by value. A small split ring built here by hand (a virtio-blk request is
three descriptors) proves kicks, calls, service() and wait_call() end to end. The packing
tests record what the client hands the channel and compare it with hex worked out by hand
from the UAPI headers, request numbers included.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Callable, Iterator

import pytest
import vendor_parent

from vdpacert.conformance.client import Channel, IotlbMessage, TargetDied, VhostClient, pack_iotlb_msg
from vdpacert.conformance.targets import Target, make_target
from vdpacert.impl.guestmem import GuestMemory

ACK_DRIVER = 0x03
FEATURES_OK = 0x0B
DRIVER_OK = 0x0F
VERSION_1, ACCESS_PLATFORM = 1 << 32, 1 << 33
NET_MAC = 1 << 5
BACKEND = (1 << 1) | (1 << 4) | (1 << 5)  # IOTLB_MSG_V2, SUSPEND, RESUME
RW = 3
IOVA = 0x10_0000
MEM_SIZE = 0x1_0000
NUM = 8
DESC, AVAIL, USED = 0x0, 0x100, 0x200  # ring offsets in guest memory
BLK_T_IN, BLK_T_OUT, BLK_T_GET_ID = 0, 1, 8
DESC_F_NEXT, DESC_F_WRITE = 1, 2


@pytest.fixture
def net() -> Iterator[Target]:
    with make_target("sim-net") as target:
        yield target


@pytest.fixture
def blk() -> Iterator[Target]:
    with make_target("sim-blk:capacity=64") as target:
        yield target


def bring_up(target: Target, features: int, queues: int, *, base: int = 0) -> GuestMemory:
    """Owner, backend features, one IOTLB mapping, status to FEATURES_OK and ``queues`` rings of NUM
    entries at the same addresses (enough for these tests: only queue 0 ever carries requests)."""
    client = target.client
    client.set_owner()
    client.set_backend_features(BACKEND)
    memory = target.new_memory(MEM_SIZE)
    client.iotlb_update(IOVA, MEM_SIZE, memory.uaddr, RW)
    client.set_status(ACK_DRIVER)
    assert client.get_status() == ACK_DRIVER
    client.set_features(features)
    client.set_status(FEATURES_OK)
    assert client.get_status() == FEATURES_OK
    for index in range(queues):
        client.set_vring_num(index, NUM)
        client.set_vring_base(index, base)
        client.set_vring_addr(index, IOVA + DESC, IOVA + AVAIL, IOVA + USED)
        client.set_vring_enable(index, True)
    return memory


class BlkQueue:
    """Queue 0 of a sim-blk, one request at a time in descriptors 0-2 (header, data, status)."""

    HEADER, DATA, STATUS = 0x1000, 0x2000, 0x3000

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.avail_idx = 0

    def submit(self, req_type: int, sector: int, data: bytes = b"", data_in: int = 0) -> None:
        mem = self.memory
        mem.write(self.HEADER, struct.pack("<IIQ", req_type, 0, sector))
        mem.write(self.DATA, data)
        mem.write(self.STATUS, b"\xff")
        length, flags = (len(data), DESC_F_NEXT) if data else (data_in, DESC_F_NEXT | DESC_F_WRITE)
        descriptors = [(IOVA + self.HEADER, 16, DESC_F_NEXT, 1), (IOVA + self.DATA, length, flags, 2),
                       (IOVA + self.STATUS, 1, DESC_F_WRITE, 0)]
        for index, desc in enumerate(descriptors):
            mem.write(DESC + 16 * index, struct.pack("<QIHH", *desc))
        mem.write_u16(AVAIL + 4 + 2 * (self.avail_idx % NUM), 0)
        self.avail_idx += 1
        mem.write_u16(AVAIL + 2, self.avail_idx)

    @property
    def used_idx(self) -> int:
        return self.memory.read_u16(USED + 2)

    def status(self) -> int:
        return self.memory.read(self.STATUS, 1)[0]

    def data(self, length: int) -> bytes:
        return self.memory.read(self.DATA, length)


def blk_start(target: Target) -> tuple[BlkQueue, int, int]:
    """sim-blk up to DRIVER_OK with kick and call eventfds on queue 0: (queue, kick fd, call fd)."""
    memory = bring_up(target, VERSION_1 | ACCESS_PLATFORM, 1)
    kick, call = target.eventfd(), target.eventfd()
    target.client.set_vring_kick(0, kick)
    target.client.set_vring_call(0, call)
    target.client.set_status(DRIVER_OK)
    assert target.client.get_status() == DRIVER_OK
    return BlkQueue(memory), kick, call


# ----- bring-up -----------------------------------------------------------------------------------

def test_net_bring_up_answers_exact_values(net: Target) -> None:
    client = net.client
    assert net.device_id == 1
    assert client.get_features() == 0x7_3497_802B
    assert client.get_backend_features() == 0x17E
    assert (client.get_vqs_count(), client.get_group_num(), client.get_as_num()) == (3, 2, 2)
    assert (client.get_vring_num(), client.get_config_size()) == (256, 24)
    assert client.get_iova_range() == (0, (1 << 64) - 1)
    # mac 02:00:ff:58:66:6c (derived from the device name vdpa0), status LINK_UP, 1 pair, mtu 1500,
    # speed unknown, duplex unknown, RSS fields 0.
    assert client.get_config(0, 24).hex() == "0200ff58666c01000100dc05ffffffffff00000000000000"
    assert client.get_config(6, 2) == b"\x01\x00"

    memory = bring_up(net, VERSION_1 | ACCESS_PLATFORM | NET_MAC, 2, base=5)
    assert [client.get_vring_group(i) for i in range(3)] == [0, 0, 1]  # without MQ the controlq is 2
    memory.write_u16(AVAIL + 2, 5)  # a ring restored at index 5: avail and used agree with the base
    memory.write_u16(USED + 2, 5)
    assert [client.get_vring_base(i) for i in range(2)] == [5, 5]
    client.set_status(DRIVER_OK)
    assert client.get_status() == DRIVER_OK
    client.suspend()
    assert [client.get_vring_base(i) for i in range(2)] == [5, 5]
    client.resume()
    assert client.get_status() == DRIVER_OK
    assert client.read_fault() is None

    client.set_status(0)  # reset
    assert client.get_status() == 0
    assert [client.get_vring_base(i) for i in range(2)] == [0, 0]
    assert client.get_features() == 0x7_3497_802B


def test_blk_request_through_kick_eventfd_service_and_call(blk: Target) -> None:
    client = blk.client
    assert blk.device_id == 2
    assert client.get_features() == 0x7_3400_6246
    assert (client.get_vqs_count(), client.get_config_size()) == (1, 96)
    assert struct.unpack("<Q", client.get_config(0, 8))[0] == 64  # capacity in sectors
    queue, kick, call = blk_start(blk)

    queue.submit(BLK_T_GET_ID, 0, data_in=20)
    os.eventfd_write(kick, 1)
    assert queue.used_idx == 0  # an eventfd kick waits for the target to service it
    assert blk.service() == 1
    assert blk.wait_call(call, 1.0)
    assert queue.used_idx == 1 and queue.status() == 0
    assert queue.data(20) == b"vdpacert-vdpa0".ljust(20, b"\0")
    assert not blk.wait_call(call, 0.0)  # the call was consumed

    queue.submit(BLK_T_OUT, 3, data=b"\xa5" * 512)
    client.kick(0)  # the direct doorbell: processed synchronously
    assert blk.wait_call(call, 1.0)
    assert queue.used_idx == 2 and queue.status() == 0
    assert queue.memory.read_u32(USED + 4 + 8 * 1 + 4) == 1  # used length: the status byte only

    client.suspend()
    assert client.get_vring_base(0) == 2
    client.resume()
    client.set_status(0)
    assert client.get_status() == 0


def test_wait_call_comes_back_after_its_timeout(blk: Target) -> None:
    _, kick, call = blk_start(blk)
    os.eventfd_write(kick, 1)  # a kick with nothing in the ring: no call
    assert not blk.wait_call(call, 0.05)


def test_reopen_gives_a_fresh_disk_and_device(blk: Target) -> None:
    queue, _, call = blk_start(blk)
    queue.submit(BLK_T_OUT, 1, data=b"\x5a" * 512)
    blk.client.kick(0)
    assert blk.wait_call(call, 1.0) and queue.status() == 0

    blk.reopen()
    assert blk.client.get_status() == 0
    queue, _, call = blk_start(blk)  # SET_OWNER again: the old owner went with the old file
    queue.submit(BLK_T_IN, 1, data_in=512)
    blk.client.kick(0)
    assert blk.wait_call(call, 1.0) and queue.status() == 0
    assert queue.data(512) == bytes(512)


# ----- errnos and dead targets ----------------------------------------------------------------------

def errno_of(call: Callable[..., object], *args: object) -> int | None:
    with pytest.raises(OSError) as caught:
        call(*args)
    return caught.value.errno


def test_refusals_surface_as_oserror_with_the_targets_errno(net: Target) -> None:
    client = net.client
    assert errno_of(client.set_vring_num, 0, 8) == errno.EPERM  # no owner yet
    client.set_owner()
    assert errno_of(client.set_owner) == errno.EBUSY
    assert errno_of(client.set_vring_num, 0, 3) == errno.EINVAL  # not a power of two
    assert errno_of(client.get_vring_base, 99) == errno.ENOBUFS
    assert errno_of(client.get_config, 20, 8) == errno.EINVAL  # past the 24 config bytes
    assert errno_of(client.set_backend_features, 1 << 40) == errno.EOPNOTSUPP
    assert errno_of(client.iotlb_update, IOVA, 0x1000, 0x1000, RW) == errno.EFAULT  # not this process's memory
    read_end, write_end = os.pipe()
    try:
        assert errno_of(client.set_vring_kick, 0, read_end) == errno.EINVAL  # not an eventfd
    finally:
        os.close(read_end)
        os.close(write_end)
    # EBADF for a bad eventfd is an answer of a live device, not a dead target.
    assert errno_of(client.set_vring_call, 0, 0x7FFF_FFFF) == errno.EBADF
    assert errno_of(client.write, b"\x07\x00\x00\x00") == errno.EINVAL  # unknown message version
    with pytest.raises(ValueError, match="does not fit"):
        client.set_vring_num(1 << 32, 8)  # refused before anything reaches the target


def test_a_closed_target_is_reported_dead(net: Target) -> None:
    other = VhostClient(net.client.channel)  # a second user of the file the target is about to close
    net.close()
    with pytest.raises(TargetDied, match="VHOST_VDPA_GET_STATUS") as caught:
        other.get_status()
    assert caught.value.errno == errno.EBADF
    assert isinstance(caught.value.__cause__, OSError)
    with pytest.raises(TargetDied):
        net.client.kick(0)


def test_a_closed_client_is_dead_and_the_old_client_dies_on_reopen(net: Target) -> None:
    old = net.client
    net.reopen()
    with pytest.raises(TargetDied):
        old.get_device_id()
    assert net.client is not old and net.client.get_device_id() == 1
    net.client.close()
    with pytest.raises(TargetDied, match="closed"):
        net.client.get_features()


def test_a_crashing_parent_is_a_dead_target_not_an_errno() -> None:
    with make_target(f"python:{vendor_parent.__name__}:make_parent:crash_on_config=1") as target:
        with pytest.raises(TargetDied, match="RuntimeError") as caught:
            target.client.get_config(0, 4)
        assert isinstance(caught.value.__cause__, RuntimeError)


def test_a_fault_comes_back_as_a_miss_message(blk: Target) -> None:
    client = blk.client
    bring_up(blk, VERSION_1 | ACCESS_PLATFORM, 1)
    client.set_vring_addr(0, 0x9000_0000, 0x9000_1000, 0x9000_2000)  # nothing mapped there
    call = blk.eventfd()
    client.set_vring_call(0, call)
    client.set_status(DRIVER_OK)
    client.kick(0)
    message = client.read_fault()
    assert message is not None
    assert (message.type, message.asid, message.perm) == (1, 0, 1)  # MISS, asid 0, a read
    assert 0x9000_0000 <= message.iova < 0x9000_3000
    assert client.read_fault() is None


# ----- the exact bytes -------------------------------------------------------------------------------

class Recorder:
    """A Channel that passes every call to the target's channel and keeps what it was given."""

    def __init__(self, inner: Channel) -> None:
        self.inner = inner
        self.calls: list[tuple[str, int, bytes | int]] = []

    def ioctl(self, request: int, arg: bytes | int) -> bytes | int:
        self.calls.append(("ioctl", request, arg))
        return self.inner.ioctl(request, arg)

    def write(self, data: bytes) -> int:
        self.calls.append(("write", 0, data))
        return self.inner.write(data)

    def read(self) -> bytes | None:
        return self.inner.read()

    def kick(self, index: int) -> None:
        self.calls.append(("kick", index, 0))
        self.inner.kick(index)

    def close(self) -> None:
        self.inner.close()


def sent(recorder: Recorder) -> tuple[int, str | int]:
    """The last call: (request, argument as hex, or the int argument); 0 for a write."""
    _, request, arg = recorder.calls.pop()
    return request, arg.hex() if isinstance(arg, bytes) else arg


def test_every_request_is_packed_as_the_uapi_lays_it_out(net: Target) -> None:
    recorder = Recorder(net.client.channel)
    client = VhostClient(recorder)
    client.set_owner()
    assert sent(recorder) == (0xAF01, 0)
    client.get_features()
    assert sent(recorder) == (0x8008AF00, "00" * 8)
    client.set_features(0x3_0000_0020)
    assert sent(recorder) == (0x4008AF00, "2000000003000000")
    client.set_backend_features(0x32)
    assert sent(recorder) == (0x4008AF25, "3200000000000000")
    client.get_device_id()
    assert sent(recorder) == (0x8004AF70, "00000000")
    client.set_status(0x0B)
    assert sent(recorder) == (0x4001AF72, "0b")
    client.get_vring_num()
    assert sent(recorder) == (0x8002AF76, "0000")
    client.get_config(4, 2)
    assert sent(recorder) == (0x8008AF73, "04000000" "02000000" "0000")
    with contextlib.suppress(OSError):  # whatever sim-net makes of it, the bytes went out as laid out
        client.set_config(0, b"\x02")
    assert sent(recorder) == (0x4008AF74, "00000000" "01000000" "02")
    client.get_iova_range()
    assert sent(recorder) == (0x8010AF78, "00" * 16)
    client.set_vring_num(2, 256)
    assert sent(recorder) == (0x4008AF10, "02000000" "00010000")
    client.set_vring_base(1, 0x8000_8000 & 0xFFFF)
    assert sent(recorder) == (0x4008AF12, "01000000" "00800000")
    client.get_vring_base(1)
    assert sent(recorder) == (0xC008AF12, "01000000" "00000000")
    # struct vhost_vring_addr { index, flags, desc, used, avail, log_guest_addr }: used before avail.
    client.set_vring_addr(1, 0x1000, 0x2000, 0x3000, flags=1, log_guest_addr=0x4000)
    assert sent(recorder) == (0x4028AF11, "01000000" "01000000" "0010000000000000" "0030000000000000"
                              "0020000000000000" "0040000000000000")
    fd = net.eventfd()
    client.set_vring_kick(0, fd)
    assert sent(recorder) == (0x4008AF20, "00000000" + struct.pack("<i", fd).hex())
    client.set_vring_call(2, -1)
    assert sent(recorder) == (0x4008AF21, "02000000" "ffffffff")
    client.set_vring_enable(1, True)
    assert sent(recorder) == (0x4008AF75, "01000000" "01000000")
    client.get_vring_group(2)
    assert sent(recorder) == (0xC008AF7B, "02000000" "00000000")
    client.set_group_asid(1, 1)
    assert sent(recorder) == (0x4008AF7C, "01000000" "01000000")
    client.set_config_call(-1)
    assert sent(recorder) == (0x4004AF77, "ffffffff")
    client.suspend()
    assert sent(recorder) == (0xAF7D, 0)
    client.resume()
    assert sent(recorder) == (0xAF7E, 0)

    memory = net.new_memory(0x2000)
    client.iotlb_update(0x1000, 0x2000, memory.uaddr, RW, asid=1)
    uaddr = struct.pack("<Q", memory.uaddr).hex()
    assert sent(recorder) == (0, "02000000" "01000000" "0010000000000000" "0020000000000000" + uaddr
                              + "03" "02" + "00" * 38)
    client.iotlb_invalidate(0x1000, 0x2000, asid=1)
    assert sent(recorder) == (0, "02000000" "01000000" "0010000000000000" "0020000000000000" + "00" * 8
                              + "00" "03" + "00" * 38)
    client.iotlb_batch_begin()
    assert sent(recorder) == (0, "02000000" "00000000" + "00" * 24 + "00" "05" + "00" * 38)
    client.kick(1)
    assert recorder.calls.pop() == ("kick", 1, 0)
    assert recorder.calls == []


def test_requests_the_sims_refuse_are_still_packed_right(net: Target) -> None:
    recorder = Recorder(net.client.channel)
    client = VhostClient(recorder)
    client.set_owner()
    for call, request, arg in (
        (lambda: client.set_log_base(0x1234), 0x4008AF04, "3412000000000000"),
        (lambda: client.set_log_fd(-1), 0x4004AF07, "ffffffff"),
        (lambda: client.set_vring_err(0, -1), 0x4008AF22, "00000000" "ffffffff"),
        (lambda: client.get_vring_desc_group(0), 0xC008AF7F, "00000000" "00000000"),
        (lambda: client.get_vring_size(0), 0xC008AF82, "00000000" "00000000"),
    ):
        with contextlib.suppress(OSError):  # what the device answers is the suite's business; the bytes are ours
            call()
        assert sent(recorder) == (request, arg)


def test_iotlb_messages_pack_and_parse() -> None:
    message = pack_iotlb_msg(4, 0xABC000, 0, 0, 2, asid=3)
    assert len(message) == 72
    assert message[:8].hex() == "0200000003000000"
    assert message[32:34].hex() == "0204"  # perm WO, type ACCESS_FAIL
    v1 = pack_iotlb_msg(2, 0x1000, 0x1000, 0x2000, 1, version=1)
    assert v1[:8].hex() == "0100000000000000"
    assert IotlbMessage(1, 0, 0x1000, 0, 1)._asdict() == {"type": 1, "asid": 0, "iova": 0x1000, "size": 0,
                                                          "perm": 1}
