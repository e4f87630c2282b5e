"""The guest of a migration: its memory, its virtio driver, and the writes its CPU makes.

A migration moves a running guest, so the guest here is a whole one: guest-physical memory
(one :class:`~vdpacert.impl.guestmem.GuestMemory` at gpa 0), a virtio driver for one net or blk
device (the conformance suite's :class:`~vdpacert.conformance.driver.device.DriverSession`, whose
rings and buffers live in that memory), and a CPU whose every write to guest memory is seen, as
KVM's dirty log sees a real vCPU's. The driver talks to a :class:`~vdpacert.migration.vmm.Vmm`,
never to the device.

:meth:`Guest.move_to` is the switch-over from the guest's side: the same driver state (ring
positions, outstanding chains, sequence numbers) continues on the destination's memory and VMM,
with new eventfds, exactly like a migrated vCPU resuming from the copied RAM.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from vdpacert.conformance.driver.device import DriverSession, net_queues
from vdpacert.conformance.driver.memory import GuestLayout
from vdpacert.conformance.driver.split import Used
from vdpacert.impl.guestmem import GuestMemory
from vdpacert.migration.vmm import DirtySink, Vmm
from vdpacert.uapi import virtio_blk as B  # noqa: N812
from vdpacert.uapi import virtio_net as N  # noqa: N812
from vdpacert.uapi.virtio_config import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1
from vdpacert.uapi.virtio_ids import VIRTIO_ID_NET
from vdpacert.uapi.virtio_ring import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC

__all__ = ["Guest", "GuestConfig", "TrackedLayout"]


class TrackedLayout(GuestLayout):
    """A :class:`GuestLayout` whose writes are the guest CPU's: each is noted in :attr:`cpu_dirty` when set."""

    def __init__(self, memory: GuestMemory) -> None:
        self.cpu_dirty: DirtySink | None = None
        super().__init__(memory, refill=False)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        super().write(offset, data)
        if self.cpu_dirty is not None:
            self.cpu_dirty.note(self.gpa(offset), len(data))

    def fill(self, offset: int, length: int, value: int) -> None:
        super().fill(offset, length, value)
        if self.cpu_dirty is not None:
            self.cpu_dirty.note(self.gpa(offset), length)

    def rebind(self, memory: GuestMemory) -> None:
        """Continue on ``memory`` (the destination's copy): same size, same guest-physical base."""
        if memory.size != self.size or memory.gpa != self.memory.gpa:
            raise ValueError(f"the destination memory ({memory.size:#x} at gpa {memory.gpa:#x}) is not the "
                             f"guest's ({self.size:#x} at gpa {self.memory.gpa:#x})")
        self.memory = memory


@dataclass(frozen=True)
class GuestConfig:
    """What the guest's driver negotiates and lays out (from a scenario's ``[device]`` table)."""

    packed: bool = False
    queue_size: int = 256
    queues: int = 1  # net: queue pairs; blk: request queues
    event_idx: bool = True
    indirect: bool = False
    start_index: int = 0

    def features(self, device_id: int, offered: int) -> int:
        """The features the driver acks: transport bits, then the device type's (only what is offered)."""
        wanted = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_ACCESS_PLATFORM
        wanted |= self.packed << VIRTIO_F_RING_PACKED | self.event_idx << VIRTIO_RING_F_EVENT_IDX
        wanted |= self.indirect << VIRTIO_RING_F_INDIRECT_DESC
        if device_id == VIRTIO_ID_NET:
            for bit in (N.VIRTIO_NET_F_MAC, N.VIRTIO_NET_F_CTRL_VQ, N.VIRTIO_NET_F_CTRL_RX,
                        N.VIRTIO_NET_F_CTRL_MAC_ADDR):
                wanted |= 1 << bit
            if self.queues > 1:
                wanted |= 1 << N.VIRTIO_NET_F_MQ
        else:
            wanted |= 1 << B.VIRTIO_BLK_F_FLUSH
            if self.queues > 1:
                wanted |= 1 << B.VIRTIO_BLK_F_MQ
        required = 1 << VIRTIO_F_VERSION_1 | self.packed << VIRTIO_F_RING_PACKED
        missing = required & ~offered
        if missing:
            raise ValueError(f"the device does not offer {missing:#x}, which the guest needs")
        return wanted & offered

    def starts(self, queues: list[int]) -> dict[int, int]:
        """Where every ring starts: split, the first avail index; packed, slot ``start_index`` with wrap 1."""
        if self.packed:
            return dict.fromkeys(queues, 0x8000 | (self.start_index % self.queue_size))
        return dict.fromkeys(queues, self.start_index & 0xFFFF)


class Guest:
    """One guest with one device (see the module docstring). ``vmm`` is the VMM it runs on now."""

    def __init__(self, memory: GuestMemory, vmm_factory: Callable[[GuestLayout], Vmm], config: GuestConfig) -> None:
        self.layout = TrackedLayout(memory)
        self.vmm = vmm_factory(self.layout)
        self.config = config
        self.device_id = self.vmm.device_id
        self.vmm.set_owner()  # the VMM opens the device for the guest; the driver's own SET_OWNER is then a no-op
        self.features = config.features(self.device_id, self.vmm.get_features())
        self.queues = self._queue_indexes()
        self.session = self._new_session()

    def _new_session(self) -> DriverSession:
        return DriverSession(self.vmm, self.layout, self.features, queues=self.queues, num=self.config.queue_size,
                             starts=self.config.starts(self.queues), service=self.vmm.service)

    def _queue_indexes(self) -> list[int]:
        if self.device_id == VIRTIO_ID_NET:
            # The data queues of the pairs the guest uses, then the controlq, which follows the device's pairs.
            data = net_queues(self.features & ~(1 << N.VIRTIO_NET_F_CTRL_VQ), self.config.queues)
            ctrl = self.vmm.ctrl_queue(self.features)
            return data + ([] if ctrl is None else [ctrl])
        return list(range(self.config.queues))

    @property
    def memory(self) -> GuestMemory:
        return self.layout.memory

    @property
    def ctrl_queue(self) -> int | None:
        return self.vmm.ctrl_queue() if self.device_id == VIRTIO_ID_NET else None

    def bring_up(self) -> None:
        self.session.bring_up()

    def reset_and_reinit(self) -> None:
        """The guest's driver resets the device and initialises it again (a reboot of the driver): fresh rings."""
        self.session.close()
        self.session = self._new_session()
        self.session.bring_up()

    def ctrl(self, cls: int, cmd: int, data: bytes) -> int:
        """One control command on the controlq; the ack byte the device wrote."""
        index = self.ctrl_queue
        if index is None:
            raise ValueError("this device has no control queue")
        ring = self.session.rings[index]
        ring.add([bytes([cls, cmd]) + data], [1])
        self.session.kick(index)
        used: list[Used] = self.session.reap(index, 1)
        return used[0].data[0] if used[0].length else used[0].written[0]

    def move_to(self, vmm: Vmm, memory: GuestMemory, fds: Mapping[int, tuple[int, int]]) -> None:
        """Continue on the destination: its memory, its VMM, the (kick, call) eventfds it was restored with."""
        self.layout.rebind(memory)
        self.vmm = vmm
        self.session.move(vmm, vmm.service, fds)

    def close(self) -> None:
        self.session.close()
        self.vmm.close()
