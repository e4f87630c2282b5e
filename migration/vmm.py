"""The VMM's vhost front for one device: what QEMU's hw/virtio/vhost-vdpa.c is to a virtual machine.

A guest never speaks vhost. Its virtio driver writes rings in guest memory and sets status bits;
the VMM turns that into vhost-vdpa ioctls on ``/dev/vhost-vdpa-N``. :class:`Vmm` is that layer for
one device, and it is the only place migration talks to a device through:

- it offers the guest driver the named vhost methods (the ``VhostOps`` of
  :mod:`vdpacert.conformance.driver.device`), passes them on, and **records** what the guest set up
  (features, ring sizes and addresses, eventfds): vhost has no ioctl to read ring addresses back,
  so a VMM that migrates must remember them, as QEMU does;
- it **shadows** queues when asked (:mod:`.svq`): every queue in :attr:`DirtyMode.SHADOW`, and a
  virtio-net control queue always, because the VMM must see the guest's MAC, MQ and RX-mode
  commands to carry them to the destination (QEMU shadows the CVQ of a vhost-vdpa net device for
  the same reason). A shadowed queue's device ring lives in VMM memory, never in guest memory;
- in :attr:`DirtyMode.DEVICE_LOG` it asks the device to log: rings are set up with
  VHOST_VRING_F_LOG at the guest-physical address of their used area, and logging is switched on
  and off with VHOST_F_LOG_ALL by :class:`~vdpacert.migration.dirty.DeviceLogTracker`;
- it is the ``SaveSource`` of :mod:`.save` and the ``RestoreOps`` of :mod:`.restore`.

In-flight chains on the destination are the VMM's business too: a shadowed queue resubmits them
exactly (:class:`~vdpacert.migration.svq.ShadowVirtqueue` takes the list), a direct queue can
only resume from a vring base, so its base is rewound to the used position (exact for a device
that uses buffers in order).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from vdpacert.conformance.client import VhostClient
from vdpacert.conformance.driver.memory import GuestLayout
from vdpacert.conformance.targets.base import Target
from vdpacert.migration.state import DeviceState, NetState, VringSetup, rewound_base
from vdpacert.migration.svq import ShadowVirtqueue
from vdpacert.uapi import vhost_types as T  # noqa: N812 - read like the C names
from vdpacert.uapi import virtio_net as N  # noqa: N812
from vdpacert.uapi.virtio_ids import VIRTIO_ID_NET

__all__ = ["VMM_GPA_ALIGN", "CtrlCommandFailed", "DirtyMode", "DirtySink", "Vmm"]

#: VMM memory sits in guest-physical space just above the guest, on this alignment. It must have a
#: guest-physical address: a logging device logs every write it makes, shadow rings included, and a
#: write whose page the log does not cover is an error (as in vhost). The migration covers it in the
#: log (:attr:`Vmm.log_span`) and sends only the guest's own pages.
VMM_GPA_ALIGN = 2 << 20
#: VMM memory per device: shadow rings and the control commands the VMM sends itself.
VMM_MEMORY = 4 << 20
_NET_MAX_PAIRS_OFFSET = 8  # struct virtio_net_config.max_virtqueue_pairs
_U16 = struct.Struct("<H")
#: How many rounds :meth:`Vmm.service` makes at most: each moves chains one hop (guest -> device -> guest).
_SERVICE_ROUNDS = 8


class DirtyMode(enum.Enum):
    """How the guest pages a device writes are found during a migration (issue 5, brief §5)."""

    DEVICE_LOG = "device-log"  # the device logs them (VHOST_F_LOG_ALL + SET_LOG_BASE)
    SHADOW = "shadow"  # the VMM sees them in its shadow virtqueues


class DirtySink(Protocol):
    """Where VMM-side writes to guest memory are noted (the shadow virtqueues, the CVQ shadow)."""

    def note(self, gpa: int, length: int) -> None: ...


class CtrlCommandFailed(Exception):
    """A control command the VMM replayed was not acknowledged with VIRTIO_NET_OK."""


#: VIRTIO_NET_CTRL_RX commands by NetState field, in command order.
_RX_FLAGS: dict[str, int] = {"promisc": N.VIRTIO_NET_CTRL_RX_PROMISC, "allmulti": N.VIRTIO_NET_CTRL_RX_ALLMULTI,
             "alluni": N.VIRTIO_NET_CTRL_RX_ALLUNI, "nomulti": N.VIRTIO_NET_CTRL_RX_NOMULTI,
             "nouni": N.VIRTIO_NET_CTRL_RX_NOUNI, "nobcast": N.VIRTIO_NET_CTRL_RX_NOBCAST}


@dataclass
class _Vring:
    """One queue as the guest set it up (what SET_VRING_* carried), and its shadow if it has one."""

    index: int
    num: int = 0
    base: int = 0
    desc: int = 0
    avail: int = 0
    used: int = 0
    kick: int = -1
    call: int = -1
    enabled: bool = False
    shadow: ShadowVirtqueue | None = None


@dataclass
class _NetTracker:
    """The guest's virtio-net control state as its acknowledged commands left it (QEMU's VirtIONet fields)."""

    mac: bytes = bytes(6)
    queue_pairs: int = 1
    rx: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(_RX_FLAGS, False))

    def state(self) -> NetState:
        return NetState(mac=self.mac, queue_pairs=self.queue_pairs, **self.rx)


class Vmm:
    """The vhost layer of one device's VMM (see the module docstring).

    ``guest`` is the guest's memory as the guest lays it out; the VMM maps it for the device at the
    guest's IOVAs. VMM memory (shadow rings) is taken from the target just above the guest's
    guest-physical range (see :data:`VMM_GPA_ALIGN`) and mapped right after the guest's IOVA range.
    """

    def __init__(self, target: Target, guest: GuestLayout, *, mode: DirtyMode) -> None:
        self.target = target
        self.guest = guest
        self.mode = mode
        vmm_gpa = (guest.gpa_base + guest.size + VMM_GPA_ALIGN - 1) & -VMM_GPA_ALIGN
        memory = target.new_memory(VMM_MEMORY, gpa=vmm_gpa)
        #: Guest-physical bytes from 0 a device log must cover: the guest and the VMM memory above it.
        self.log_span = vmm_gpa + VMM_MEMORY
        iova = (guest.iova_base + guest.size + (1 << 21) - 1) & -(1 << 21)
        self.vmm = GuestLayout(memory, iova_base=iova, fill=False)
        self.features = 0
        self.backend_features = 0
        self.group_asid: dict[int, int] = {}
        self.device_id = target.device_id
        self._vrings: dict[int, _Vring] = {}
        self._maps: dict[tuple[int, int, int], tuple[int, int]] = {}  # (iova, size, asid) -> (uaddr, perm)
        self._vmm_mapped = False
        self._owner = False
        #: Chains a restored shadowed queue resubmits first (index -> heads / IDs), kept across the reset.
        self._pending_inflight: dict[int, tuple[int, ...]] = {}
        self._net = _NetTracker()
        #: Where VMM writes to guest memory (shadow used rings, buffers it fills) are noted; None: untracked.
        self.cpu_dirty: DirtySink | None = None
        #: Where shadowed data queues note the device's writes (SHADOW mode during a migration); None: untracked.
        self.shadow_dirty: DirtySink | None = None

    @property
    def client(self) -> VhostClient:
        return self.target.client

    # ----- VhostOps: what the guest driver's requests become ---------------------------------------------

    def set_owner(self) -> None:
        """VHOST_SET_OWNER once: the VMM owns the file for the guest's whole life (a driver reset keeps it)."""
        if not self._owner:
            self.client.set_owner()
            self._owner = True

    def get_status(self) -> int:
        return self.client.get_status()

    def set_status(self, status: int) -> None:
        if status == 0:
            self._forget_queues()
        self.client.set_status(status)
        if status == 0:
            self._vmm_mapped = False  # a reset may drop the device's mappings (no IOTLB_PERSIST): map again
            self._net = _NetTracker(mac=self._config_mac())

    def get_backend_features(self) -> int:
        return self.client.get_backend_features()

    def set_backend_features(self, features: int) -> None:
        self.client.set_backend_features(features)
        self.backend_features = features

    def get_features(self) -> int:
        return self.client.get_features()

    def set_features(self, features: int) -> None:
        self.client.set_features(features)
        self.features = features

    def iotlb_update(self, iova: int, size: int, uaddr: int, perm: int, *, asid: int = 0) -> None:
        self._map(iova, size, uaddr, perm, asid)
        self._map_vmm_memory()

    def _map(self, iova: int, size: int, uaddr: int, perm: int, asid: int = 0) -> None:
        """UPDATE, replacing an earlier mapping of the same range.

        vhost-vdpa keeps its own record of mappings across a device reset (Linux: ``v->iotlb``) and
        refuses an overlapping UPDATE with EEXIST, while the parent drops its mappings at the reset
        unless IOTLB_PERSIST was negotiated. A VMM that maps the same RAM again after a guest's
        driver reset therefore invalidates it first, so both views agree whatever was negotiated.
        """
        key = (iova, size, asid)
        if key in self._maps:
            self.client.iotlb_invalidate(iova, size, asid=asid)
        self.client.iotlb_update(iova, size, uaddr, perm, asid=asid)
        self._maps[key] = (uaddr, perm)

    def set_group_asid(self, group: int, asid: int) -> None:
        self.client.set_group_asid(group, asid)
        self.group_asid[group] = asid

    def resume(self) -> None:
        self.client.resume()

    def suspend(self) -> None:
        """VHOST_VDPA_SUSPEND, then take back what the device used before it stopped (shadowed queues)."""
        self.client.suspend()
        self._poll_shadows()

    def _vring(self, index: int) -> _Vring:
        return self._vrings.setdefault(index, _Vring(index))

    def set_vring_num(self, index: int, num: int) -> None:
        self.client.set_vring_num(index, num)
        self._vring(index).num = num

    def set_vring_base(self, index: int, num: int) -> None:
        self._vring(index).base = num
        if not self.shadowed(index):
            self.client.set_vring_base(index, num)

    def set_vring_addr(self, index: int, desc: int, avail: int, used: int, *, flags: int = 0,
                       log_guest_addr: int = 0) -> None:
        vring = self._vring(index)
        vring.desc, vring.avail, vring.used = desc, avail, used
        if self.shadowed(index):
            return
        if self.mode is DirtyMode.DEVICE_LOG:
            # Log used-ring writes at the ring's guest-physical address: harmless until LOG_ALL is on.
            flags |= 1 << T.VHOST_VRING_F_LOG
            log_guest_addr = self.guest.gpa(self.guest.offset_of_iova(used))
        self.client.set_vring_addr(index, desc, avail, used, flags=flags, log_guest_addr=log_guest_addr)

    def set_vring_kick(self, index: int, fd: int) -> None:
        self._vring(index).kick = fd
        if not self.shadowed(index):
            self.client.set_vring_kick(index, fd)

    def set_vring_call(self, index: int, fd: int) -> None:
        self._vring(index).call = fd
        if not self.shadowed(index):
            self.client.set_vring_call(index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        vring = self._vring(index)
        if enable and self.shadowed(index) and vring.shadow is None:
            self._start_shadow(vring)
        self.client.set_vring_enable(index, enable)
        vring.enabled = bool(enable)

    # ----- which queues are shadowed, and their shadows ---------------------------------------------------

    def shadowed(self, index: int, features: int | None = None) -> bool:
        """Whether queue ``index`` runs through a shadow virtqueue on this VMM (with ``features``, or the acked)."""
        return self.mode is DirtyMode.SHADOW or index == self.ctrl_queue(features)

    def ctrl_queue(self, features: int | None = None) -> int | None:
        """The virtio-net controlq index for ``features`` (default: the acked ones), §5.1.2; None: not net,
        or no CTRL_VQ."""
        features = self.features if features is None else features
        if self.device_id != VIRTIO_ID_NET or not features >> N.VIRTIO_NET_F_CTRL_VQ & 1:
            return None
        if not features >> N.VIRTIO_NET_F_MQ & 1:
            return 2
        max_pairs: int = _U16.unpack(self.client.get_config(_NET_MAX_PAIRS_OFFSET, 2))[0]
        return 2 * max_pairs

    def _start_shadow(self, vring: _Vring) -> None:
        self._map_vmm_memory()
        shadow = ShadowVirtqueue(
            vring.index, guest=self.guest, vmm=self.vmm, num=vring.num, desc=vring.desc, avail=vring.avail,
            used=vring.used, features=self.features, base=vring.base,
            inflight=self._pending_inflight.pop(vring.index, ()),
            dirty=self._dirty_sink(vring.index))
        if vring.index == self.ctrl_queue():
            shadow.observer = self._observe_ctrl
        client, index = self.client, vring.index
        client.set_vring_base(index, shadow.shadow_base)
        desc, avail, used = shadow.shadow_addresses
        client.set_vring_addr(index, desc, avail, used)
        client.set_vring_kick(index, shadow.device_kick_fd)
        client.set_vring_call(index, shadow.device_call_fd)
        shadow.attach_guest(vring.kick, vring.call)
        vring.shadow = shadow

    def shadows(self) -> list[ShadowVirtqueue]:
        return [v.shadow for v in self._vrings.values() if v.shadow is not None]

    def _dirty_sink(self, index: int) -> DirtySink | None:
        """Where queue ``index``'s shadow notes guest writes: a data queue's, where the device's writes are
        tracked (SHADOW mode); the controlq's, with the VMM's own writes (it is shadowed in both modes)."""
        return self.cpu_dirty if index == self.ctrl_queue() else self.shadow_dirty

    def _route_dirty(self) -> None:
        for vring in self._vrings.values():
            if vring.shadow is not None:
                vring.shadow.dirty = self._dirty_sink(vring.index)

    def set_shadow_dirty(self, sink: DirtySink | None) -> None:
        """Where shadowed data queues note device writes from now on (None: nowhere)."""
        self.shadow_dirty = sink
        self._route_dirty()

    def set_cpu_dirty(self, sink: DirtySink | None) -> None:
        """Where the VMM's own writes to guest memory (the CVQ shadow's) are noted from now on."""
        self.cpu_dirty = sink
        self._route_dirty()

    def _forget_queues(self) -> None:
        for vring in self._vrings.values():
            if vring.shadow is not None:
                vring.shadow.close()
        self._vrings.clear()

    def _poll_shadows(self) -> int:
        return sum(shadow.poll() for shadow in self.shadows())

    def service(self) -> int:
        """Move chains until nothing moves: shadows forward, the device processes, shadows return."""
        moved = 0
        for _ in range(_SERVICE_ROUNDS):
            step = self._poll_shadows() + self.target.service()
            step += self._poll_shadows()
            moved += step
            if not step:
                break
        return moved

    def _map_vmm_memory(self) -> None:
        if not self._vmm_mapped:
            self._map(self.vmm.iova_base, self.vmm.size, self.vmm.uaddr_base, T.VHOST_ACCESS_RW)
            self._vmm_mapped = True

    # ----- the control queue: what the guest asked for, and replaying it ------------------------------

    def _config_mac(self) -> bytes:
        if self.device_id != VIRTIO_ID_NET:
            return bytes(6)
        return self.client.get_config(0, 6)

    def _observe_ctrl(self, command: bytes, ack: int) -> None:
        """A guest control command came back acknowledged ``ack``: keep what an OK one changed."""
        if ack != N.VIRTIO_NET_OK or len(command) < 2:
            return
        cls, cmd, data = command[0], command[1], command[2:]
        if cls == N.VIRTIO_NET_CTRL_MAC and cmd == N.VIRTIO_NET_CTRL_MAC_ADDR_SET and len(data) >= 6:
            self._net.mac = bytes(data[:6])
        elif cls == N.VIRTIO_NET_CTRL_MQ and cmd == N.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET and len(data) >= 2:
            self._net.queue_pairs = _U16.unpack_from(data)[0]
        elif cls == N.VIRTIO_NET_CTRL_RX and data:
            for name, number in _RX_FLAGS.items():
                if number == cmd:
                    self._net.rx[name] = bool(data[0])

    def net_state(self) -> NetState | None:
        if self.device_id != VIRTIO_ID_NET:
            return None
        return self._net.state()

    def replay_net_state(self, net: NetState) -> None:
        """Send the destination what the guest had set (QEMU's vhost_vdpa_net_load): MAC, RX mode, pairs."""
        ctrl = self.ctrl_queue()
        if ctrl is None:
            return
        shadow = self._vrings[ctrl].shadow
        if shadow is None:  # shadowed whenever it is set up: the saved state never enabled it
            raise ValueError(f"queue {ctrl}, the control queue, is not enabled: the saved MAC, queue pairs and "
                             "RX mode cannot be replayed")
        commands: list[bytes] = []
        if net.mac != self._config_mac() and self.features >> N.VIRTIO_NET_F_CTRL_MAC_ADDR & 1:
            commands.append(bytes([N.VIRTIO_NET_CTRL_MAC, N.VIRTIO_NET_CTRL_MAC_ADDR_SET]) + net.mac)
        # Every RX-mode flag is sent as it was, on or off: what a device starts with after a reset is not
        # written in the spec (QEMU starts promiscuous), so "only what differs" would depend on the device.
        for name, number in _RX_FLAGS.items():
            needs = N.VIRTIO_NET_F_CTRL_RX if number <= N.VIRTIO_NET_CTRL_RX_ALLMULTI else N.VIRTIO_NET_F_CTRL_RX_EXTRA
            if self.features >> needs & 1:
                commands.append(bytes([N.VIRTIO_NET_CTRL_RX, number, int(getattr(net, name))]))
        if net.queue_pairs != 1 and self.features >> N.VIRTIO_NET_F_MQ & 1:
            commands.append(bytes([N.VIRTIO_NET_CTRL_MQ, N.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET])
                            + _U16.pack(net.queue_pairs))
        for command in commands:
            ack = shadow.inject(command, lambda: self.target.service())
            if ack != N.VIRTIO_NET_OK:
                raise CtrlCommandFailed(f"control command {command[:2].hex()} was answered {ack}")
            self._observe_ctrl(command, ack)

    # ----- SaveSource / RestoreOps ------------------------------------------------------------------------

    @property
    def vrings(self) -> Mapping[int, VringSetup]:
        return {i: VringSetup(i, v.num, v.desc, v.avail, v.used, v.enabled) for i, v in sorted(self._vrings.items())}

    def vring_base(self, index: int) -> int:
        vring = self._vrings[index]
        if vring.shadow is not None:
            return vring.shadow.guest_base()
        return self.client.get_vring_base(index)

    def vring_inflight(self, index: int) -> list[int] | None:
        """The exact in-flight list of a shadowed queue; None: derive it from the rings (direct queues)."""
        vring = self._vrings[index]
        return None if vring.shadow is None else vring.shadow.inflight()

    def read_guest(self, iova: int, length: int) -> bytes:
        return self.guest.read(self.guest.offset_of_iova(iova), length)

    def map_guest_memory(self) -> None:
        self._map(self.guest.iova_base, self.guest.size, self.guest.uaddr_base, T.VHOST_ACCESS_RW)
        self._vmm_mapped = False
        self._map_vmm_memory()

    def expect_inflight(self, state: DeviceState) -> dict[int, int]:
        """Before restoring ``state``: which chains each queue had in flight. Shadowed queues will resubmit
        them; direct ones resume from the rewound base. Returns index -> the base to give SET_VRING_BASE."""
        bases = {}
        for saved in state.vrings:
            if self.shadowed(saved.index, state.features):
                self._pending_inflight[saved.index] = tuple(saved.inflight)
                bases[saved.index] = saved.base
            else:
                bases[saved.index] = rewound_base(saved, state.packed) if saved.inflight else saved.base
        return bases

    def close(self) -> None:
        """Drop the shadows (the target's close releases the device and its memory)."""
        self._forget_queues()

