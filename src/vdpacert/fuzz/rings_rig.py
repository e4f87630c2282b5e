"""One long-lived reference device for the ring fuzzer, behind the vhost-vdpa front, and its liveness check.

A :class:`Rig` opens the device once (as an in-process target: the parent behind
:class:`~vdpacert.impl.vhost_vdpa.VhostVdpa`, driven through
:class:`~vdpacert.conformance.client.VhostClient`), allocates the guest memory once (guard,
region, guard; see :mod:`.rings_layout`) and maps it once: IOTLB_PERSIST keeps the map across
the reset that starts every input (without it the map is sent again after each reset). Every
input then costs a reset and a bring-up, about a hundred microseconds, instead of a new device.

Linux's SET_VRING_NUM takes powers of two only, for both layouts; a packed ring of any other size
is what a driver of the vdpa bus itself (virtio_vdpa) may ask for, so such a size is given to the
parent's ``set_vq_num`` directly after SET_VRING_NUM.

:meth:`Rig.alive` is the ``rings.device_alive`` check: a reset and one well-formed exchange (a net
frame through the loopback, a blk write then read-back of a sector), verified byte for byte.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from vdpacert.conformance.client import TargetDied, VhostClient
from vdpacert.conformance.targets.embedded import FrontTarget
from vdpacert.fuzz.base import InvariantBroken
from vdpacert.fuzz.rings_decode import features_for
from vdpacert.fuzz.rings_layout import (
    ALLOCATION,
    BUF_AREA,
    BUF_SIZE,
    DESC,
    FILL,
    FUZZ_DESC,
    FUZZ_DEVICE,
    FUZZ_DRIVER,
    GUARD,
    IOVA_BASE,
    NET_HDR,
    NEXT,
    PARTNER_DESC,
    PARTNER_DEVICE,
    PARTNER_DRIVER,
    REGION,
    RING_END,
    RO_ALIAS,
    WO_ALIAS,
    WRITE,
    _net_frame,
    cell,
    iova,
)
from vdpacert.impl.parent import VdpaParent
from vdpacert.impl.sim_blk import SimBlk
from vdpacert.impl.sim_net import SimNet
from vdpacert.uapi import vhost_types as T  # noqa: N812
from vdpacert.uapi import virtio_blk as B  # noqa: N812
from vdpacert.uapi.virtio_config import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
)

__all__ = ["GUARD_FILL", "DeviceFactory", "QueueSetup", "Rig"]

ACK_DRIVER = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
FEATURES_OK = ACK_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK
DRIVER_OK = FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK
GUARD_FILL = 0xC3
_SECTORS = bytes(range(256)) * 3  # any 512-byte window is a sector pattern that differs per check
#: Given a target kind ("sim-net" / "sim-blk"), the parent to fuzz (a seeded-bug device in the negative tests).
DeviceFactory = Callable[[str], VdpaParent]
QueueSetup = tuple[int, int, int, int, int, int]  # index, num, desc, driver, device (region offsets), base


def reference_device(kind: str) -> VdpaParent:
    return SimNet("vdpa0") if kind == "sim-net" else SimBlk("vdpa0")


class _FactoryTarget(FrontTarget):
    """A parent from a factory behind a fresh vhost-vdpa front; it keeps the parent for set_vq_num."""

    def __init__(self, kind: str, factory: DeviceFactory) -> None:
        super().__init__(f"fuzz:{kind}", kind)
        self._factory = factory
        self.parent: VdpaParent | None = None
        self._open()

    def _new_parent(self) -> object:
        self.parent = self._factory(self.kind)
        return self.parent


class Rig:
    """One device of ``kind`` opened for the whole run, its guest memory and its mapping."""

    def __init__(self, kind: str, factory: DeviceFactory = reference_device) -> None:
        self.kind = kind
        self.target = _FactoryTarget(kind, factory)
        self.client: VhostClient = self.target.client
        parent = self.target.parent
        assert parent is not None
        self.parent = parent
        self.mem = self.target.new_memory(ALLOCATION)
        self.mem.fill(0, ALLOCATION, GUARD_FILL)
        self.mem.fill(GUARD, REGION, 0)
        self.checks = 0
        client = self.client
        client.set_owner()
        offered = client.get_backend_features()
        wanted = 1 << T.VHOST_BACKEND_F_IOTLB_MSG_V2 | 1 << T.VHOST_BACKEND_F_IOTLB_PERSIST
        client.set_backend_features(offered & wanted)
        self.persist = bool(offered >> T.VHOST_BACKEND_F_IOTLB_PERSIST & 1)
        self.map()

    def map(self) -> None:
        """The region read-write, and its buffer area again read-only and write-only."""
        uaddr = self.mem.uaddr + GUARD
        self.client.iotlb_update(IOVA_BASE, REGION, uaddr, T.VHOST_ACCESS_RW)
        self.client.iotlb_update(RO_ALIAS, BUF_SIZE, uaddr + BUF_AREA, T.VHOST_ACCESS_RO)
        self.client.iotlb_update(WO_ALIAS, BUF_SIZE, uaddr + BUF_AREA, T.VHOST_ACCESS_WO)

    def close(self) -> None:
        self.target.close()

    # ----- bring-up ---------------------------------------------------------------------------------

    def bring_up(self, features: int, queues: Sequence[QueueSetup]) -> None:
        """Reset, negotiate ``features`` and set the queues up, short of DRIVER_OK (OSError / TargetDied)."""
        client = self.client
        client.set_status(0)
        if not self.persist:
            self.map()
        client.set_status(ACK_DRIVER)
        client.set_features(features)
        client.set_status(FEATURES_OK)
        for index, num, desc, driver, device, base in queues:
            client.set_vring_num(index, 1 << (num - 1).bit_length())
            if num & (num - 1):
                self.parent.set_vq_num(index, num)
            client.set_vring_base(index, base)
            client.set_vring_addr(index, iova(desc), iova(driver), iova(device))
            client.set_vring_enable(index, True)

    def driver_ok(self) -> None:
        self.client.set_status(DRIVER_OK)

    def write(self, offset: int, data: bytes) -> None:
        self.mem.write(GUARD + offset, data)

    # ----- rings.device_alive -----------------------------------------------------------------------

    def alive(self) -> None:
        """A reset and one well-formed exchange complete correctly; InvariantBroken("rings.device_alive") if not."""
        self.checks += 1
        try:
            if self.kind == "sim-net":
                self._echo()
            else:
                self._write_read()
        except (OSError, TargetDied) as error:
            raise InvariantBroken("rings.device_alive", f"{self.kind}: {type(error).__name__}: {error}") from error

    def _fresh(self, queues: Sequence[QueueSetup]) -> None:
        self.mem.fill(GUARD, RING_END, 0)
        self.bring_up(features_for(self.kind, packed=False, event_idx=False, indirect=False, mrg_rxbuf=False),
                      queues)

    def _split_chain(self, desc: int, driver: int, slot: int, first: int,
                     segs: Sequence[tuple[int, int, int]]) -> None:
        for i, (offset, length, flags) in enumerate(segs):
            more = i + 1 < len(segs)
            self.write(desc + 16 * (first + i), DESC.pack(iova(offset), length, flags | (NEXT if more else 0),
                                                          first + i + 1 if more else 0))
        self.write(driver + 4 + 2 * slot, first.to_bytes(2, "little"))

    def _fail(self, what: str) -> InvariantBroken:
        return InvariantBroken("rings.device_alive", f"{self.kind} after reset: {what} (status "
                               f"{self.client.get_status():#x})")

    def _echo(self) -> None:
        rx_buf, tx_buf = cell(0), cell(8)
        frame = _net_frame(60, self.checks & 0xFF)
        self._fresh([(0, 4, FUZZ_DESC, FUZZ_DRIVER, FUZZ_DEVICE, 0), (1, 4, PARTNER_DESC, PARTNER_DRIVER,
                                                                      PARTNER_DEVICE, 0)])
        self.mem.fill(GUARD + rx_buf, 512, FILL)
        self.write(tx_buf, bytes(NET_HDR) + frame)
        self._split_chain(FUZZ_DESC, FUZZ_DRIVER, 0, 0, [(rx_buf, 512, WRITE)])
        self._split_chain(PARTNER_DESC, PARTNER_DRIVER, 0, 0, [(tx_buf, NET_HDR, 0), (tx_buf + NET_HDR, 60, 0)])
        self.write(FUZZ_DRIVER + 2, b"\x01\x00")
        self.write(PARTNER_DRIVER + 2, b"\x01\x00")
        self.driver_ok()
        self.client.kick(1)
        used = self.mem.read(GUARD + FUZZ_DEVICE, 12)
        idx, head, length = struct.unpack_from("<2xHII", used)
        if idx != 1 or head != 0 or length != NET_HDR + len(frame):
            raise self._fail(f"RX used idx {idx}, entry ({head}, {length}); wanted 1, (0, {NET_HDR + len(frame)})")
        if self.mem.read(GUARD + rx_buf + NET_HDR, len(frame)) != frame:
            raise self._fail("the frame came back changed")
        if self.mem.read_u16(GUARD + PARTNER_DEVICE + 2) != 1:
            raise self._fail("the TX chain was not used")

    def _write_read(self) -> None:
        sector = self.checks % 64
        data = _SECTORS[self.checks & 0xFF:(self.checks & 0xFF) + B.VIRTIO_BLK_SECTOR_SIZE]
        out, back = cell(0), cell(1)
        self._fresh([(0, 8, FUZZ_DESC, FUZZ_DRIVER, FUZZ_DEVICE, 0)])
        self.write(out, struct.pack("<IIQ", B.VIRTIO_BLK_T_OUT, 0, sector) + data + b"\xff")
        self.write(back, struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, sector))
        self.mem.fill(GUARD + back + 16, 513, FILL)
        self._split_chain(FUZZ_DESC, FUZZ_DRIVER, 0, 0, [(out, 16, 0), (out + 16, 512, 0), (out + 528, 1, WRITE)])
        self._split_chain(FUZZ_DESC, FUZZ_DRIVER, 1, 3, [(back, 16, 0), (back + 16, 512, WRITE),
                                                         (back + 528, 1, WRITE)])
        self.write(FUZZ_DRIVER + 2, b"\x02\x00")
        self.driver_ok()
        self.client.kick(0)
        if self.mem.read_u16(GUARD + FUZZ_DEVICE + 2) != 2:
            raise self._fail(f"used idx {self.mem.read_u16(GUARD + FUZZ_DEVICE + 2)}, wanted 2")
        status_out, status_in = self.mem.read(GUARD + out + 528, 1)[0], self.mem.read(GUARD + back + 528, 1)[0]
        if status_out or status_in:
            raise self._fail(f"write status {status_out}, read status {status_in}")
        if self.mem.read(GUARD + back + 16, 512) != data:
            raise self._fail(f"sector {sector} read back differs from what was written")
