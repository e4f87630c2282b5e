"""The seeded-bug zoo: every mutant's bug is real, and visible to a userspace driver.

For each mutant a small hand-written scenario runs through the vhost-vdpa front
(:class:`~vdpacert.impl.vhost_vdpa.VhostVdpa`: ioctls, IOTLB messages, rings in guest memory,
call eventfds) twice: on the honest reference device and on the mutant built on it. The test
pins both answers, so each bug is shown to change something a driver can observe; the automated
kill table (``vdpacert mutants``) is only meaningful if that holds. The rings are built here by a
compact driver of our own (virtio v1.3 §2.7 split, §2.8 packed).
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest

from vdpacert.conformance import clauses
from vdpacert.conformance.mutants.registry import MUTANTS, make, reference, target_string, uncatalogued_hints
from vdpacert.conformance.targets import make_target
from vdpacert.impl.guestmem import GuestMemory, MemoryRegistry
from vdpacert.impl.sim_blk import SimBlk
from vdpacert.impl.sim_device import SimDevice
from vdpacert.impl.sim_net import SimNet
from vdpacert.impl.vhost_vdpa import VhostVdpa
from vdpacert.uapi import vhost_types as T  # noqa: N812
from vdpacert.uapi import virtio_blk as B  # noqa: N812
from vdpacert.uapi import virtio_net as N  # noqa: N812
from vdpacert.uapi.virtio_config import VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET

IOVA = 0x1000_0000
MEM_SIZE = 1 << 20
PAGE = 4096
CANARY = 0xA5
NEXT, WRITE, INDIRECT = 1, 2, 4
AVAIL, USED = 1 << 7, 1 << 15
ACK_DRIVER, FEATURES_OK, DRIVER_OK = 0x03, 0x0B, 0x0F
SECTOR = 512


def bits(*numbers: int) -> int:
    return sum(1 << n for n in numbers)


VERSION_1, ACCESS_PLATFORM, RING_PACKED, EVENT_IDX, INDIRECT_DESC = bits(32), bits(33), bits(34), bits(29), bits(28)
LOG_ALL = bits(T.VHOST_F_LOG_ALL)
BLK = VERSION_1 | ACCESS_PLATFORM | bits(B.VIRTIO_BLK_F_FLUSH)
NET = VERSION_1 | ACCESS_PLATFORM | bits(N.VIRTIO_NET_F_MAC)
BACKEND = bits(T.VHOST_BACKEND_F_IOTLB_MSG_V2, T.VHOST_BACKEND_F_SUSPEND, T.VHOST_BACKEND_F_RESUME,
               T.VHOST_BACKEND_F_IOTLB_ASID)


# ----- a compact driver ------------------------------------------------------------------------------------


class Guest:
    """One region of guest memory (gpa 0, filled with canaries), its registry, and a bump allocator."""

    def __init__(self) -> None:
        self.mem = GuestMemory(MEM_SIZE, gpa=0, register=False)
        self.mem.fill(0, MEM_SIZE, CANARY)
        self.registry = MemoryRegistry()
        self.registry.add(self.mem)
        self.top = 0

    def alloc(self, size: int, align: int = 16, *, zero: bool = True) -> int:
        offset = (self.top + align - 1) // align * align
        self.top = offset + size
        if zero and size:
            self.mem.fill(offset, size, 0)
        return offset

    def place(self, data: bytes) -> int:
        offset = self.alloc(len(data), 8)
        self.mem.write(offset, data)
        return offset

    def close(self) -> None:
        self.mem.close()


def iova(offset: int) -> int:
    return IOVA + offset


class Split:
    """The driver half of a split ring."""

    packed = False

    def __init__(self, guest: Guest, num: int) -> None:
        self.g, self.num = guest, num
        self.desc = guest.alloc(16 * num, PAGE)
        self.avail = guest.alloc(6 + 2 * num, 2)
        self.used = guest.alloc(6 + 8 * num, PAGE)
        self.avail_idx = 0
        self.last_used = 0
        self.next_desc = 0

    @property
    def addresses(self) -> tuple[int, int, int]:
        return iova(self.desc), iova(self.avail), iova(self.used)

    def start_at(self, index: int) -> None:
        self.avail_idx = self.last_used = index
        self.g.mem.write_u16(self.avail + 2, index)
        self.g.mem.write_u16(self.used + 2, index)

    def write_desc(self, table: int, index: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.g.mem.write(table + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def post(self, descs: Sequence[tuple[int, int, int]]) -> int:
        """Chain ``(addr, len, flags)`` descriptors (NEXT added) into the table and publish the head."""
        head = self.next_desc
        for k, (addr, length, flags) in enumerate(descs):
            index = (head + k) % self.num
            more = k + 1 < len(descs)
            self.write_desc(self.desc, index, addr, length, flags | (NEXT if more else 0), (index + 1) % self.num)
        self.next_desc = (head + len(descs)) % self.num
        self.publish(head)
        return head

    def post_raw(self, descs: Sequence[tuple[int, int, int, int]]) -> None:
        """Descriptors ``(addr, len, flags, next)`` at table entries 0.., head 0 published."""
        for index, (addr, length, flags, nxt) in enumerate(descs):
            self.write_desc(self.desc, index, addr, length, flags, nxt)
        self.publish(0)

    def publish(self, head: int) -> None:
        self.g.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.num), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.g.mem.write_u16(self.avail + 2, self.avail_idx)

    def set_used_event(self, value: int) -> None:
        self.g.mem.write_u16(self.avail + 4 + 2 * self.num, value)

    def used_idx(self) -> int:
        return self.g.mem.read_u16(self.used + 2)

    def used_elem(self, slot: int) -> tuple[int, int]:
        head, length = struct.unpack("<II", self.g.mem.read(self.used + 4 + 8 * (slot % self.num), 8))
        return int(head), int(length)

    def reap(self) -> list[tuple[int, int]]:
        out = []
        while self.last_used != self.used_idx():
            out.append(self.used_elem(self.last_used))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


class Packed:
    """The driver half of a packed ring (wrap counters start at 1)."""

    packed = True

    def __init__(self, guest: Guest, num: int) -> None:
        self.g, self.num = guest, num
        self.desc = guest.alloc(16 * num, PAGE)
        self.driver_event = guest.alloc(4, 4)
        self.device_event = guest.alloc(4, 4)
        self.next_avail, self.avail_wrap, self.next_used, self.used_wrap = 0, 1, 0, 1
        self.slots: dict[int, int] = {}
        self.next_id = 0

    @property
    def addresses(self) -> tuple[int, int, int]:
        return iova(self.desc), iova(self.driver_event), iova(self.device_event)

    def post(self, descs: Sequence[tuple[int, int, int]]) -> int:
        buffer_id, self.next_id = self.next_id, self.next_id + 1
        head_slot, head_flags = self.next_avail, 0
        for k, (addr, length, flags) in enumerate(descs):
            flags |= (NEXT if k + 1 < len(descs) else 0) | (AVAIL if self.avail_wrap else USED)
            if k == 0:
                head_flags = flags
                flags = USED if self.avail_wrap else AVAIL  # not yet available
            self.g.mem.write(self.desc + 16 * self.next_avail, struct.pack("<QIHH", addr, length, buffer_id, flags))
            self.next_avail += 1
            if self.next_avail == self.num:
                self.next_avail, self.avail_wrap = 0, self.avail_wrap ^ 1
        self.g.mem.write_u16(self.desc + 16 * head_slot + 14, head_flags)
        self.slots[buffer_id] = len(descs)
        return buffer_id

    def reap(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        while True:
            _, length, buffer_id, flags = struct.unpack("<QIHH", self.g.mem.read(self.desc + 16 * self.next_used, 16))
            if bool(flags & AVAIL) != bool(flags & USED) or bool(flags & USED) != bool(self.used_wrap):
                return out
            out.append((buffer_id, length))
            self.next_used += self.slots.pop(buffer_id, 1)
            if self.next_used >= self.num:
                self.next_used -= self.num
                self.used_wrap ^= 1


class Rig:
    """A device opened through the vhost-vdpa front and brought up the way QEMU does it."""

    def __init__(self, dev: SimDevice, *, features: int, queues: Sequence[int] = (0,), num: int = 8,
                 packed: bool = False, base: int = 0, start: bool = True, log: bool = False) -> None:
        self.g = Guest()
        self.dev = dev
        self.fds: list[int] = []
        self.front = front = VhostVdpa(dev, self.g.registry)
        front.set_owner()
        front.set_backend_features(front.get_backend_features() & BACKEND)
        front.iotlb_update(IOVA, MEM_SIZE, self.g.mem.uaddr, T.VHOST_ACCESS_RW)
        if log:
            self.log_mem = GuestMemory(PAGE, gpa=0x4000_0000, register=False)
            self.g.registry.add(self.log_mem)
            front.set_log_base(self.log_mem.uaddr)
        front.set_status(ACK_DRIVER)
        front.set_features(features | (RING_PACKED if packed else 0) | (LOG_ALL if log else 0))
        front.set_status(FEATURES_OK)
        self.rings: dict[int, Split | Packed] = {}
        self.calls: dict[int, int] = {}
        for index in queues:
            ring: Split | Packed = Packed(self.g, num) if packed else Split(self.g, num)
            self.rings[index] = ring
            if base and isinstance(ring, Split):
                ring.start_at(base)
            front.set_vring_num(index, num)
            front.set_vring_base(index, 0x8000_8000 if packed else base)
            front.set_vring_addr(index, *ring.addresses, flags=bits(T.VHOST_VRING_F_LOG) if log else 0,
                                 log_guest_addr=ring.addresses[2] - IOVA if log else 0)
            self.calls[index] = self.efd()
            front.set_vring_call(index, self.calls[index])
            front.set_vring_enable(index, True)
        self.g.alloc(0, PAGE)  # buffers start on a page of their own (the dirty-log scenarios tell them apart)
        if start:
            front.set_status(DRIVER_OK)

    def efd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        self.front.close()
        for fd in self.fds:
            os.close(fd)
        self.g.close()

    def called(self, index: int = 0) -> int:
        try:
            return os.eventfd_read(self.calls[index])
        except BlockingIOError:
            return 0

    def needs_reset(self) -> bool:
        return bool(self.front.get_status() & VIRTIO_CONFIG_S_NEEDS_RESET)

    def ring(self, index: int = 0) -> Split:
        ring = self.rings[index]
        assert isinstance(ring, Split)
        return ring

    def blk(self, kind: int, sector: int = 0, out: bytes = b"", in_len: int = 0, *,
            queue: int = 0) -> tuple[int, int]:
        """Post a blk request (not kicked): the guest offsets of its data-in area and its status byte."""
        header = self.g.place(struct.pack("<IIQ", kind, 0, sector) + out)
        data = self.g.alloc(in_len, 8, zero=False) if in_len else 0
        status = self.g.alloc(1, 8, zero=False)
        descs = [(iova(header), 16 + len(out), 0)] + ([(iova(data), in_len, WRITE)] if in_len else [])
        self.rings[queue].post([*descs, (iova(status), 1, WRITE)])
        return data, status


@contextmanager
def rig(dev: SimDevice, **kwargs: Any) -> Iterator[Rig]:
    r = Rig(dev, **kwargs)
    try:
        yield r
    finally:
        r.close()


# ----- one scenario per mutant: the observable it changes -----------------------------------------------------


def features_ok_with(features: int) -> Callable[[SimDevice], object]:
    def scenario(dev: SimDevice) -> object:
        with rig(dev, features=features, queues=(), start=False) as r:
            return r.front.get_status() & VIRTIO_CONFIG_S_FEATURES_OK
    return scenario


def offer_ctrl_bits(dev: SimDevice) -> object:
    with rig(dev, features=NET, queues=(), start=False) as r:
        offered = r.front.get_features()
        return bool(offered >> N.VIRTIO_NET_F_CTRL_RX & 1), bool(offered >> N.VIRTIO_NET_F_CTRL_VQ & 1)


def base_after_reset(dev: SimDevice) -> object:
    with rig(dev, features=BLK) as r:
        for _ in range(3):
            r.blk(B.VIRTIO_BLK_T_FLUSH)
        r.front.kick(0)
        assert r.ring().used_idx() == 3
        r.front.set_status(0)
        return r.front.get_vring_base(0)


def used_before_driver_ok(dev: SimDevice) -> object:
    with rig(dev, features=BLK, start=False) as r:
        r.blk(B.VIRTIO_BLK_T_FLUSH)
        r.front.kick(0)
        return r.ring().used_idx()


def needs_reset_after_echo(dev: SimDevice) -> object:
    with rig(dev, features=BLK) as r:
        r.ring().post([(iova(r.g.place(bytes(16))), 16, 0)])  # no status byte: bad input
        r.front.kick(0)
        status = r.front.get_status()
        assert status & VIRTIO_CONFIG_S_NEEDS_RESET
        r.front.set_status(status)  # Linux's virtio_add_status: read, or in a bit, write back
        return r.front.get_status() & VIRTIO_CONFIG_S_NEEDS_RESET


def calls_with_used_event(used_event: int, requests: int) -> Callable[[SimDevice], object]:
    def scenario(dev: SimDevice) -> object:
        with rig(dev, features=BLK | EVENT_IDX) as r:
            r.called()
            r.ring().set_used_event(used_event)
            for _ in range(requests):
                r.blk(B.VIRTIO_BLK_T_FLUSH)
            r.front.kick(0)
            assert r.ring().used_idx() == requests
            return r.called()
    return scenario


def used_idx_at_wrap(dev: SimDevice) -> object:
    with rig(dev, features=BLK, base=0xFFFE) as r:
        r.blk(B.VIRTIO_BLK_T_FLUSH)
        r.front.kick(0)
        return r.ring().used_idx()


def packed_laps(dev: SimDevice) -> object:
    with rig(dev, features=BLK, packed=True, num=4) as r:
        ring = r.rings[0]
        assert isinstance(ring, Packed)
        r.blk(B.VIRTIO_BLK_T_FLUSH)
        r.blk(B.VIRTIO_BLK_T_FLUSH)  # fills the ring: the used position wraps
        r.front.kick(0)
        first = len(ring.reap())
        r.blk(B.VIRTIO_BLK_T_FLUSH)
        r.front.kick(0)
        return first, len(ring.reap())


def byte_after_status(dev: SimDevice) -> object:
    with rig(dev, features=BLK) as r:
        _, status = r.blk(B.VIRTIO_BLK_T_IN, 0, in_len=SECTOR)
        r.front.kick(0)
        assert r.g.mem.read(status, 1) == b"\x00"
        return r.g.mem.read(status + 1, 1)[0]


def status_into_readable(dev: SimDevice) -> object:
    with rig(dev, features=BLK) as r:
        header = r.g.place(struct.pack("<IIQ", B.VIRTIO_BLK_T_FLUSH, 0, 0x1122334455667788))
        r.ring().post([(iova(header), 16, 0)])
        r.front.kick(0)
        return r.g.mem.read(header + 15, 1)[0], r.ring().used_idx(), r.needs_reset()


def nested_indirect(dev: SimDevice) -> object:
    with rig(dev, features=BLK | INDIRECT_DESC) as r:
        ring = r.ring()
        header = r.g.place(struct.pack("<IIQ", B.VIRTIO_BLK_T_FLUSH, 0, 0))
        status = r.g.alloc(1, 8, zero=False)
        inner = r.g.alloc(32, 16)
        ring.write_desc(inner, 0, iova(header), 16, NEXT, 1)
        ring.write_desc(inner, 1, iova(status), 1, WRITE)
        outer = r.g.alloc(16, 16)
        ring.write_desc(outer, 0, iova(inner), 32, INDIRECT)
        ring.post_raw([(iova(outer), 16, INDIRECT, 0)])
        r.front.kick(0)
        return ring.used_idx(), r.g.mem.read(status, 1)[0], r.needs_reset()


def descriptor_loop(dev: SimDevice) -> object:
    """A FLUSH whose writable status descriptor chains back to itself: the loop never ends."""
    with rig(dev, features=BLK) as r:
        header = r.g.place(struct.pack("<IIQ", B.VIRTIO_BLK_T_FLUSH, 0, 0))
        status = r.g.alloc(1, 8, zero=False)
        r.ring().post_raw([(iova(header), 16, NEXT, 1), (iova(status), 1, NEXT | WRITE, 1)])
        r.front.kick(0)
        return r.ring().used_idx(), r.g.mem.read(status, 1)[0], r.needs_reset()


def used_len_of_read(dev: SimDevice) -> object:
    with rig(dev, features=BLK) as r:
        r.blk(B.VIRTIO_BLK_T_IN, 0, in_len=SECTOR)
        r.front.kick(0)
        return r.ring().used_elem(0)[1]


def base_while_suspended(dev: SimDevice) -> object:
    with rig(dev, features=BLK) as r:
        r.blk(B.VIRTIO_BLK_T_FLUSH)
        r.blk(B.VIRTIO_BLK_T_FLUSH)  # made available, never kicked
        r.front.suspend()
        return r.front.get_vring_base(0)


def base_after_set(dev: SimDevice) -> object:
    with rig(dev, features=BLK, start=False) as r:
        r.front.set_vring_base(0, 5)
        return r.front.get_vring_base(0)


def used_while_suspended(dev: SimDevice) -> object:
    with rig(dev, features=BLK) as r:
        r.front.suspend()
        r.blk(B.VIRTIO_BLK_T_FLUSH)
        r.front.kick(0)
        return r.ring().used_idx()


def used_after_resume(dev: SimDevice) -> object:
    with rig(dev, features=BLK) as r:
        r.front.suspend()
        r.blk(B.VIRTIO_BLK_T_FLUSH)
        r.front.kick(0)
        r.front.resume()
        return r.ring().used_idx()


def packed_base_after_lap(dev: SimDevice) -> object:
    with rig(dev, features=BLK, packed=True, num=4) as r:
        r.blk(B.VIRTIO_BLK_T_FLUSH)
        r.blk(B.VIRTIO_BLK_T_FLUSH)
        r.front.kick(0)
        r.front.suspend()
        return hex(r.front.get_vring_base(0))


def config_past_end(dev: SimDevice) -> object:
    with rig(dev, features=NET, queues=(), start=False) as r:
        size = r.front.get_config_size()
        try:
            r.front.set_config(N.VIRTIO_NET_CONFIG_SIZE, bytes(4))
        except OSError as error:
            return size, error.errno
        return size, 0


def mac_after_one_byte_write(dev: SimDevice) -> object:
    """Write one byte in the middle of the MAC; the other five must stay what they were."""
    with rig(dev, features=NET, queues=(), start=False) as r:
        before = r.front.get_config(N.VIRTIO_NET_CONFIG_MAC, 6)
        r.front.set_config(N.VIRTIO_NET_CONFIG_MAC + 1, b"\x5a")
        after = r.front.get_config(N.VIRTIO_NET_CONFIG_MAC, 6)
        return after[:1] + after[2:] == before[:1] + before[2:]


def request_after_invalidate(dev: SimDevice) -> object:
    with rig(dev, features=BLK) as r:
        r.front.iotlb_invalidate(IOVA, MEM_SIZE)
        r.blk(B.VIRTIO_BLK_T_FLUSH)
        r.front.kick(0)
        return r.needs_reset(), r.ring().used_idx()


def read_into_unmapped_user_address(dev: SimDevice) -> object:
    with rig(dev, features=BLK) as r:
        header = r.g.place(struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, 0))
        data = r.g.alloc(SECTOR, 8, zero=False)
        status = r.g.alloc(1, 8, zero=False)
        # The data buffer's "IOVA" is its user address: userspace never mapped it.
        r.ring().post([(iova(header), 16, 0), (r.g.mem.uaddr_of(data), SECTOR, WRITE), (iova(status), 1, WRITE)])
        r.front.kick(0)
        return r.needs_reset(), r.ring().used_idx(), r.g.mem.read(data, 1)[0]


def read_into_read_only_mapping(dev: SimDevice) -> object:
    with rig(dev, features=BLK) as r:
        header = r.g.place(struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, 0))
        data = r.g.alloc(SECTOR, PAGE, zero=False)
        status = r.g.alloc(1, 8, zero=False)
        alias = 0x2000_0000
        r.front.iotlb_update(alias, SECTOR, r.g.mem.uaddr_of(data), T.VHOST_ACCESS_RO)
        r.ring().post([(iova(header), 16, 0), (alias, SECTOR, WRITE), (iova(status), 1, WRITE)])
        r.front.kick(0)
        return r.needs_reset(), r.ring().used_idx(), r.g.mem.read(data, 1)[0]


def frame_with_data_group_in_asid_1(dev: SimDevice) -> object:
    with rig(dev, features=NET, queues=(0, 1), start=False) as r:
        r.front.set_group_asid(0, 1)  # data queues to an address space userspace never mapped
        r.front.set_status(DRIVER_OK)
        rx = r.g.alloc(2048, 8, zero=False)
        r.ring(0).post([(iova(rx), 2048, WRITE)])
        frame = bytes(N.VIRTIO_NET_HDR_V1_SIZE) + b"\xff" * 6 + b"\x02" * 6 + b"\x08\x00" + bytes(50)
        r.ring(1).post([(iova(r.g.place(frame)), len(frame), 0)])
        r.front.kick(1)
        return r.needs_reset(), r.ring(0).used_idx()


def dirty_pages_of_read(dev: SimDevice) -> object:
    with rig(dev, features=BLK, log=True) as r:
        data, _ = r.blk(B.VIRTIO_BLK_T_IN, 0, in_len=SECTOR)
        r.front.kick(0)
        assert r.ring().used_idx() == 1
        bitmap = r.log_mem.read(0, 64)

        def dirty(offset: int) -> int:
            page = offset // PAGE
            return bitmap[page // 8] >> (page % 8) & 1

        return dirty(r.ring().used), dirty(data)


def pairs_set_above_max(dev: SimDevice) -> object:
    with rig(dev, features=NET | bits(N.VIRTIO_NET_F_CTRL_VQ, N.VIRTIO_NET_F_MQ), queues=(4,)) as r:
        command = r.g.place(struct.pack("<BBH", N.VIRTIO_NET_CTRL_MQ, N.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, 3))
        ack = r.g.alloc(1, 8, zero=False)
        r.ring(4).post([(iova(command), 4, 0), (iova(ack), 1, WRITE)])
        r.front.kick(4)
        assert r.ring(4).used_idx() == 1
        return r.g.mem.read(ack, 1)[0]


def write_across_capacity(dev: SimDevice) -> object:
    with rig(dev, features=BLK) as r:
        _, status = r.blk(B.VIRTIO_BLK_T_OUT, 63, out=b"\x5a" * (2 * SECTOR))
        r.front.kick(0)
        return r.g.mem.read(status, 1)[0]


def get_id_area(dev: SimDevice) -> object:
    with rig(dev, features=BLK) as r:
        data, _ = r.blk(B.VIRTIO_BLK_T_GET_ID, in_len=B.VIRTIO_BLK_ID_BYTES)
        r.front.kick(0)
        return r.g.mem.read(data, B.VIRTIO_BLK_ID_BYTES)


SERIAL = b"vdpacert-vdpa0"
DIRTY_BOTH = (1, 1)

#: mutant -> (scenario, device attributes, what the reference answers, what the mutant answers)
SCENARIOS: dict[str, tuple[Callable[[SimDevice], object], dict[str, Any], object, object]] = {
    "features_ok_broken_dependency": (features_ok_with(NET | bits(N.VIRTIO_NET_F_CTRL_RX)), {}, 0,
                                      VIRTIO_CONFIG_S_FEATURES_OK),
    "features_ok_without_version_1": (features_ok_with(ACCESS_PLATFORM | bits(N.VIRTIO_NET_F_MAC)), {}, 0,
                                      VIRTIO_CONFIG_S_FEATURES_OK),
    "offer_missing_dependency": (offer_ctrl_bits, {}, (True, True), (True, False)),
    "reset_keeps_vq_state": (base_after_reset, {}, 0, 3),
    "consume_before_driver_ok": (used_before_driver_ok, {}, 0, 1),
    "needs_reset_not_sticky": (needs_reset_after_echo, {}, VIRTIO_CONFIG_S_NEEDS_RESET, 0),
    "event_idx_always_notify": (calls_with_used_event(100, 1), {}, 0, 1),
    "event_idx_missed_notify": (calls_with_used_event(0, 2), {}, 1, 0),
    "used_idx_wrap_off_by_one": (used_idx_at_wrap, {}, 0xFFFF, 0),
    "packed_wrap_counter_not_flipped": (packed_laps, {}, (2, 1), (2, 0)),
    "write_past_writable_len": (byte_after_status, {}, CANARY, 0),
    "write_into_readable": (status_into_readable, {}, (0x11, 0, True), (0, 1, False)),
    "nested_indirect_followed": (nested_indirect, {}, (0, CANARY, True), (1, 0, False)),
    "descriptor_cycle_unbounded": (descriptor_loop, {}, (0, CANARY, True), (1, B.VIRTIO_BLK_S_OK, False)),
    "used_len_counts_readable": (used_len_of_read, {}, SECTOR + 1, SECTOR + 1 + 16),
    "vring_base_from_avail_idx": (base_while_suspended, {}, 0, 2),
    "set_vring_base_ignored": (base_after_set, {}, 5, 0),
    "suspend_keeps_processing": (used_while_suspended, {}, 0, 1),
    "resume_loses_kick": (used_after_resume, {}, 1, 0),
    "vring_base_drops_wrap_counters": (packed_base_after_lap, {}, "0x0", "0x80008000"),
    "config_size_overreported": (config_past_end, {}, (N.VIRTIO_NET_CONFIG_SIZE, errno.EINVAL),
                                 (N.VIRTIO_NET_CONFIG_SIZE + 8, 0)),
    "config_write_spills": (mac_after_one_byte_write, {}, True, False),
    "iotlb_invalidate_ignored": (request_after_invalidate, {}, (True, 0), (False, 1)),
    "identity_map_kept": (read_into_unmapped_user_address, {}, (True, 0, CANARY), (False, 1, 0)),
    "iotlb_perm_ignored": (read_into_read_only_mapping, {}, (True, 0, CANARY), (False, 1, 0)),
    "asid_ignored": (frame_with_data_group_in_asid_1, {}, (True, 0), (False, 1)),
    "dirty_log_misses_used_ring": (dirty_pages_of_read, {}, DIRTY_BOTH, (0, 1)),
    "dirty_log_misses_buffers": (dirty_pages_of_read, {}, DIRTY_BOTH, (1, 0)),
    "mq_pairs_above_max": (pairs_set_above_max, {"max_vq_pairs": 2}, N.VIRTIO_NET_ERR, N.VIRTIO_NET_OK),
    "blk_write_past_capacity": (write_across_capacity, {"capacity": 64}, B.VIRTIO_BLK_S_IOERR, B.VIRTIO_BLK_S_OK),
    "get_id_not_nul_padded": (get_id_area, {}, SERIAL + bytes(6), SERIAL + bytes([CANARY]) * 6),
}


# ----- the tests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_bug_is_observable_through_vhost_vdpa(name: str) -> None:
    scenario, attrs, honest, buggy = SCENARIOS[name]
    assert honest != buggy
    assert scenario(reference(name, **attrs)) == honest, "the reference device answers differently than pinned"
    assert scenario(make(name, **attrs)) == buggy, "the mutant does not show its bug"


def reaped(ring: Split | Packed) -> int:
    """Used entries that arrived since the last look (the driver keeps count of split ones itself)."""
    return len(ring.reap())


def honest_traffic(dev: SimDevice, packed: bool) -> int:
    """Ordinary traffic (what every profile starts with); the used entries the driver got back."""
    if isinstance(dev, SimNet):
        with rig(dev, features=NET, queues=(0, 1), packed=packed) as r:
            frame = bytes(N.VIRTIO_NET_HDR_V1_SIZE) + b"\xff" * 6 + b"\x02" * 6 + b"\x08\x00" + bytes(50)
            got = 0
            for _ in range(3):
                r.rings[0].post([(iova(r.g.alloc(2048, 8)), 2048, WRITE)])
                r.rings[1].post([(iova(r.g.place(frame)), len(frame), 0)])
                r.front.kick(1)
                got += reaped(r.rings[0])
            assert not r.needs_reset()
            return got
    with rig(dev, features=BLK | EVENT_IDX | INDIRECT_DESC, packed=packed) as r:
        got = 0
        for _ in range(3):
            r.blk(B.VIRTIO_BLK_T_OUT, 1, out=b"\x5a" * SECTOR)
            r.blk(B.VIRTIO_BLK_T_IN, 1, in_len=SECTOR)
            r.front.kick(0)
            got += reaped(r.rings[0])
        assert not r.needs_reset()
        return got


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_survives_ordinary_traffic(name: str, packed: bool) -> None:
    """A mutant has one bug, not a crash: ordinary traffic runs through it without an exception or a reset."""
    attrs = SCENARIOS[name][1]
    assert honest_traffic(reference(name, **attrs), packed) == (3 if MUTANTS[name].base_target == "sim-net" else 6)
    honest_traffic(make(name, **attrs), packed)


def test_zoo_covers_issue_4() -> None:
    assert len(MUTANTS) >= 25
    assert set(SCENARIOS) == set(MUTANTS)
    assert len({mutant.factory for mutant in MUTANTS.values()}) == len(MUTANTS), "two names, one mutant"
    for name, mutant in MUTANTS.items():
        assert mutant.name == name and mutant.bug and "\n" not in mutant.bug
        assert mutant.base_target in ("sim-net", "sim-blk")
        base = SimNet if mutant.base_target == "sim-net" else SimBlk
        device = make(name)
        assert isinstance(device, base) and type(device) is not base
        assert type(reference(name)) is base


def test_clause_hints_are_clause_ids() -> None:
    assert uncatalogued_hints() == {}
    assert all(clauses.is_clause(mutant.clause_hint) for mutant in MUTANTS.values())


def test_unknown_mutant_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="no mutant"):
        make("no_such_bug")
    with pytest.raises(ValueError, match="no mutant"):
        target_string("no_such_bug")


@pytest.mark.parametrize("name", ["reset_keeps_vq_state", "mq_pairs_above_max", "identity_map_kept"])
def test_mutant_opens_as_a_python_target(name: str) -> None:
    text = target_string(name, **({"max_vq_pairs": 2} if name == "mq_pairs_above_max" else {}))
    assert text.startswith("python:vdpacert.conformance.mutants.registry:make:name=")
    with make_target(text) as target:
        assert target.kind == "python"


def test_mac_attribute_is_parsed_like_the_bus_does() -> None:
    device = make("config_write_spills", mac="02:00:00:00:00:07")
    assert isinstance(device, SimNet) and device.mac == bytes([2, 0, 0, 0, 0, 7])
