"""What every software vDPA device shares: the parent half of a device, minus its request handling.

:class:`SimDevice` plays the role of Linux's ``drivers/vdpa/vdpa_sim/vdpa_sim.c``: it implements
every config op of :class:`~vdpacert.impl.parent.VdpaParent` over per-queue compiled
:class:`~vdpacert.impl.virtqueue.VirtQueue` objects, and leaves one thing to the device type:
``process(index)``, which takes requests off an enabled queue and answers them (sim-blk and
sim-net implement it in Cython). Where vdpa_sim departs from the virtio spec, this class follows
the spec instead:

- **Features.** ``set_driver_features`` stores the set as given. Setting FEATURES_OK runs the
  spec's acceptance test (:func:`vdpacert.impl.features.refusal_reason`: offered bits only,
  VERSION_1, every dependency rule); a refused set leaves FEATURES_OK clear in the status the
  driver reads back, as virtio v1.3 §3.1.1 requires. vdpa_sim instead masks the set silently.
- **Status.** The driver never clears a bit except by reset, so a write keeps every bit already
  set; the driver cannot set DEVICE_NEEDS_RESET either. DRIVER_OK (with FEATURES_OK) starts the
  datapath: enabled queues are brought up and processed once, since buffers may have been made
  available before. DRIVER_OK without accepted features, a queue that cannot be brought up, or
  a queue that breaks on bad input sets DEVICE_NEEDS_RESET and fires the config callback.
  FAILED stops all processing.
- **Queue state across migration.** ``set_vq_state`` restores the avail position; the used
  position of a split ring is then read from the ring itself, never assumed equal to
  last_avail_idx (vdpa_sim's shortcut, which loses every chain in flight at the source). When a
  restored queue next runs, the chains between the used position and the restored avail
  position are taken again (:meth:`VirtQueue.rewind_inflight`) and completed, so a chain in
  flight when the source stopped is answered exactly once. This relies on the reference devices
  completing chains in the order they take them, which they do. Packed rings carry the used
  position and both wrap counters in the state and are handled the same way.
- **Suspend.** While suspended nothing is processed; kicks are remembered. ``get_vq_state`` is
  exact because no chain is ever held between calls (requests are answered synchronously).
  ``resume`` processes every enabled queue.
- **Reset** (``reset`` and ``compat_reset``) returns every piece of device state to its initial
  value: status and features 0, queues disabled and forgotten (size, addresses, state, callback,
  log address), every group back in address space 0, config space as created. Mappings survive
  a plain reset and are dropped by ``compat_reset(VDPA_RESET_F_CLEAN_MAP)``. Unlike vdpa_sim,
  the initial mapping is *empty*, not an identity pass-through: a user that forgot to send IOTLB
  updates must see faults, not a device that happens to work. What belongs to the opener, not
  the device, is kept: the bound memory (bind_mm), the fault callback, the config callback, the
  dirty-log bitmap and its eventfd (logging itself stops, since VHOST_F_LOG_ALL is renegotiated).

Memory: each queue translates through the :class:`~vdpacert.impl.iotlb.Iotlb` of the address
space its group is in (``set_group_asid``), kept by the device as a private copy, and resolves
user addresses in the :class:`~vdpacert.impl.guestmem.MemoryRegistry` given to ``bind_mm`` (the
process-wide registry until then). Dirty logging (``set_log_base`` / ``set_log_fd`` / ``set_vq_log``) is offered with
VHOST_F_LOG_ALL and runs while that bit is negotiated and a bitmap is set; one
:class:`~vdpacert.impl.dirty_log.DirtyLog` is shared by all queues.

Mappings arrive one way per device, as vdpa.h asks of a parent (the model's ``vdpa_device.map_op``):
like vdpa_sim, which registers either its batch ops table (``set_map``) or its plain one
(``dma_map`` / ``dma_unmap``) by its ``batch_mapping`` module parameter, each device takes
``batch_mapping`` at construction (default: set_map, vdpa_sim's default) and withholds the other
ops (:attr:`~vdpacert.impl.parent.VdpaParent.withheld_ops`), so a front never sees them and a
direct call of one is OSError(EOPNOTSUPP). ``set_map`` replaces the private copy whole (all or
nothing); ``dma_map`` / ``dma_unmap`` edit it. A front offering both to one device would mix
them: a ``set_map`` after an invalidation hands back every entry a clean-map reset had dropped.

Writing a device on this base (sim-net is the second one):

1. call ``super().__init__(...)`` with the device ID, the offered features, the initial config
   bytes, the queue count and, for several groups, ``vq_groups``;
2. implement :meth:`SimDevice.process` (run on a kick or whenever the base restarts a queue; it
   must be harmless on an empty queue; a VirtQueueError it lets out of a queue that broke is
   handled by the base). It drives ``self.vq(index)`` through the compiled API,
   answers what it can, and returns; the base then sends the used-buffer notification when
   ``need_notify`` says so and turns a broken queue into DEVICE_NEEDS_RESET plus an ACCESS_FAIL
   report when the cause was a translation fault;
3. optionally override the hooks :meth:`features_ok` (the negotiated set is final),
   :meth:`driver_ok`, :meth:`reset_device` (forget device-specific state) and
   :meth:`write_config` (the driver wrote config space; default: read-only, ignored), and call
   :meth:`update_config` when the device changes its own config.

Thread safety: a front serializes every call into one parent (``bind_parent``'s lock), and the
base runs ``process`` only from inside those calls, so it needs no lock of its own.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

from vdpacert.impl.dirty_log import DirtyLog
from vdpacert.impl.features import offer_problems, refusal_reason
from vdpacert.impl.guestmem import MemoryRegistry, default_registry
from vdpacert.impl.iotlb import Iotlb
from vdpacert.impl.parent import (
    DMA_MAP_OPS,
    NO_CALLBACK,
    SET_MAP_OPS,
    VDPA_RESET_F_CLEAN_MAP,
    FaultCallback,
    VdpaCallback,
    VdpaParent,
    VqState,
    VqStatePacked,
    VqStateSplit,
    implements_op,
)
from vdpacert.impl.virtqueue import BAD_UNMAPPED, STATUS_NAMES, VirtQueue, VirtQueueError
from vdpacert.uapi.vhost_types import VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK, VHOST_F_LOG_ALL
from vdpacert.uapi.virtio_config import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
)
from vdpacert.uapi.virtio_ring import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC

#: Largest queue size virtio allows (split and packed).
VIRTQUEUE_MAX_SIZE = 32768
#: Required alignment of the virtqueue areas vdpacert's software devices report (one page, as vdpa_sim).
SIM_VQ_ALIGN = 4096
#: Default cap on the entries of one address space (vdpa_sim's max_iotlb_entries default).
DEFAULT_MAX_IOTLB_ENTRIES = 2048


class IotlbCap(TypedDict, total=False):
    """The keyword :func:`iotlb_cap` gives (typed, so ``**`` of it checks against SimDevice's signature)."""

    max_iotlb_entries: int


def iotlb_cap(max_iotlb_entries: int | None) -> IotlbCap:
    """``max_iotlb_entries`` as a keyword for SimDevice, or nothing for its default.

    A device type passes the cap on only when one was given, so a class placed between it and
    SimDevice in the method resolution order can still supply one (the fuzzers' ``with_iotlb_limit``).
    """
    return IotlbCap() if max_iotlb_entries is None else IotlbCap(max_iotlb_entries=max_iotlb_entries)


def feature_word(*bits: int) -> int:
    """The feature word with exactly these bit numbers set."""
    return sum(1 << bit for bit in set(bits))


#: What every software device offers whatever its type: virtio 1.x, DMA through the IOTLB, both ring
#: layouts, EVENT_IDX, indirect descriptors, and vhost dirty logging.
TRANSPORT_FEATURES = feature_word(
    VIRTIO_F_VERSION_1, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC, VHOST_F_LOG_ALL)

_U64_MAX = (1 << 64) - 1


@dataclass
class VqConfig:
    """What the driver configured for one queue; applied to its VirtQueue when the queue comes up."""

    num: int = 0
    desc_area: int = 0
    driver_area: int = 0
    device_area: int = 0
    ready: bool = False
    cb: VdpaCallback = NO_CALLBACK
    log_used: bool = False
    log_guest_addr: int = 0
    restored: bool = False  # set_vq_state was called: take in-flight chains again at the next run
    pending_kick: bool = False  # kicked while suspended
    broken_reported: bool = False  # NEEDS_RESET already raised for this queue's break
    extra: dict[str, Any] = field(default_factory=dict)  # room for a subclass's per-queue settings


class SimDevice(VdpaParent):
    """A software vDPA device: every config op, with ``process(index)`` left to the device type.

    ``vq_groups[i]`` is the group of queue ``i`` (default: all in group 0); ``queue_size`` is the
    largest queue size the device takes (get_vq_num_max); ``max_iotlb_entries`` caps each address
    space (0: no cap, as vdpa_sim's parameter of that name). ``batch_mapping`` picks how mappings
    arrive (vdpa_sim's parameter): True ``set_map``, False ``dma_map`` / ``dma_unmap``, None the
    default, set_map, unless the class has no set_map (a subclass that dropped it keeps dma_map).
    ValueError for an inconsistent shape, a mapping style the class does not implement, or an offer
    that breaks the spec (no VERSION_1, a feature offered without one it requires).
    """

    def __init__(self, name: str, *, device_id: int, offered: int, config: bytes, nvqs: int, ngroups: int = 1,
                 nas: int = 1, vq_groups: Sequence[int] | None = None, queue_size: int = 256, vendor_id: int = 0,
                 max_iotlb_entries: int = DEFAULT_MAX_IOTLB_ENTRIES, batch_mapping: bool | None = None) -> None:
        if max_iotlb_entries < 0:
            raise ValueError(f"max_iotlb_entries {max_iotlb_entries} is negative (0 means no cap)")
        #: True: mappings arrive through set_map; False: through dma_map / dma_unmap (never both).
        self.batch_mapping = self._choose_batch_mapping(batch_mapping)
        self.withheld_ops = DMA_MAP_OPS if self.batch_mapping else SET_MAP_OPS
        if nvqs < 1 or ngroups < 1 or nas < 1:
            raise ValueError(f"a device needs at least one queue, group and address space ({nvqs}, {ngroups}, {nas})")
        groups = list(vq_groups) if vq_groups is not None else [0] * nvqs
        if len(groups) != nvqs or any(not 0 <= g < ngroups for g in groups):
            raise ValueError(f"vq_groups {groups} must name a group in [0, {ngroups}) for each of {nvqs} queues")
        if not 1 <= queue_size <= VIRTQUEUE_MAX_SIZE:
            raise ValueError(f"queue_size {queue_size} is not in [1, {VIRTQUEUE_MAX_SIZE}]")
        problems = offer_problems(device_id, offered)
        if problems:
            raise ValueError("invalid feature offer: " + "; ".join(problems))
        self.name = name
        self.nvqs = nvqs
        self.ngroups = ngroups
        self.nas = nas
        self.device_id = device_id
        self.vendor_id = vendor_id
        self.queue_size = queue_size
        self.max_iotlb_entries = max_iotlb_entries
        self._offered = offered
        self._vq_groups = groups
        self._initial_config = bytes(config)
        self._config = bytearray(config)
        self._generation = 0
        self._as = [Iotlb(max_iotlb_entries) for _ in range(nas)]
        self._registry: MemoryRegistry = default_registry()
        self._log: DirtyLog | None = None
        self._log_fd: int | None = None
        self._config_cb: VdpaCallback = NO_CALLBACK
        self._fault_cb: FaultCallback | None = None
        self._vqs = [VirtQueue(i) for i in range(nvqs)]
        #: Why the device last refused something or set DEVICE_NEEDS_RESET (for reports).
        self.last_error = ""
        self._reset_state(clean_map=False)

    @classmethod
    def _choose_batch_mapping(cls, batch_mapping: bool | None) -> bool:
        has_set_map = implements_op(cls, "set_map")
        has_dma_map = implements_op(cls, "dma_map") and implements_op(cls, "dma_unmap")
        chosen = has_set_map if batch_mapping is None else bool(batch_mapping)
        if chosen and not has_set_map:
            raise ValueError(f"batch_mapping=1 needs set_map, which {cls.__name__} does not implement")
        if not chosen and not has_dma_map:
            raise ValueError(f"batch_mapping=0 needs dma_map and dma_unmap, which {cls.__name__} does not implement")
        return chosen

    # ----- the device type's part ------------------------------------------------------------

    @abc.abstractmethod
    def process(self, index: int) -> None:
        """Answer what is available on enabled queue ``index`` (see the module docstring)."""

    def features_ok(self, features: int) -> None:
        """Hook: FEATURES_OK was accepted for ``features`` (they cannot change until reset)."""

    def driver_ok(self) -> None:
        """Hook: DRIVER_OK was set and the enabled queues are up (called before they are processed)."""

    def reset_device(self) -> None:
        """Hook: forget device-specific state (the base already restored config space)."""

    def write_config(self, offset: int, data: bytes) -> None:
        """Hook: the driver wrote ``data`` at ``offset`` of config space. Default: read-only, ignored."""

    # ----- helpers for the device type -------------------------------------------------------

    def vq(self, index: int) -> VirtQueue:
        """The compiled queue ``index`` (for ``process``)."""
        return self._vqs[index]

    def vq_config(self, index: int) -> VqConfig:
        return self._vq_cfg[index]

    @property
    def features(self) -> int:
        """The driver's features (what set_driver_features stored)."""
        return self._features

    @property
    def suspended(self) -> bool:
        return self._suspended

    @property
    def config_space(self) -> bytes:
        return bytes(self._config)

    @property
    def registry(self) -> MemoryRegistry:
        return self._registry

    @property
    def dirty_log(self) -> DirtyLog | None:
        return self._log

    def group_asid(self, group: int) -> int:
        return self._group_asid[group]

    def address_space(self, asid: int) -> Iotlb:
        """The device's own map of ``asid`` (a copy of what it was given)."""
        return self._as[asid]

    def update_config(self, offset: int, data: bytes, *, notify: bool = True) -> None:
        """The device changed its own config: store, bump the generation, fire the config callback."""
        self._check_config_range(offset, len(data))
        self._config[offset:offset + len(data)] = data
        self._generation = (self._generation + 1) & 0xFFFFFFFF
        if notify:
            self.signal_callback(self._config_cb)

    def needs_reset(self, reason: str = "") -> None:
        """Set DEVICE_NEEDS_RESET and tell the driver through the config callback (idempotent)."""
        self.last_error = reason or self.last_error
        if not self._status & VIRTIO_CONFIG_S_NEEDS_RESET:
            self._status |= VIRTIO_CONFIG_S_NEEDS_RESET
            self.signal_callback(self._config_cb)

    def state_snapshot(self) -> dict[str, Any]:
        """Everything reset must restore, as plain values (for tests and reports)."""
        return {
            "status": self._status, "features": self._features, "config": bytes(self._config),
            "group_asid": list(self._group_asid), "suspended": self._suspended,
            "vqs": [{"ready": cfg.ready, "num": cfg.num, "addresses": (cfg.desc_area, cfg.driver_area, cfg.device_area),
                     "cb": cfg.cb.bound, "log": (cfg.log_used, cfg.log_guest_addr), "live": vq.ready,
                     "broken": vq.broken, "state": self._state_of(vq)}
                    for cfg, vq in zip(self._vq_cfg, self._vqs, strict=True)],
        }

    # ----- internal state ---------------------------------------------------------------------

    def _reset_state(self, *, clean_map: bool) -> None:
        self._status = 0
        self._features = 0
        self._suspended = False
        self._group_asid = [0] * self.ngroups
        self._vq_cfg = [VqConfig() for _ in range(self.nvqs)]
        #: Per queue, the position last set in the ring layout not negotiated now (see set_driver_features).
        self._other_layout_state: list[VqState | None] = [None] * self.nvqs
        for vq in self._vqs:
            vq.reset()
        if clean_map:
            for iotlb in self._as:
                iotlb.clear()
        self._config[:] = self._initial_config
        self._generation = (self._generation + 1) & 0xFFFFFFFF
        self.last_error = ""

    def _packed(self) -> bool:
        return bool(self._features >> VIRTIO_F_RING_PACKED & 1)

    def _running(self) -> bool:
        """DRIVER_OK with accepted features, not FAILED: queues may be processed (unless suspended)."""
        status = self._status
        return (status & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FEATURES_OK)
                == (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FEATURES_OK)
                and not status & VIRTIO_CONFIG_S_FAILED)

    def _queue_running(self, index: int) -> bool:
        """Queue ``index`` is live: armed at or after DRIVER_OK, not suspended, and the driver has not set
        FAILED (a device the driver gave up on processes nothing, so nothing of its queues is in use)."""
        return bool(self._vqs[index].ready) and not self._suspended and self._running()

    def _iotlb_of(self, index: int) -> Iotlb:
        return self._as[self._group_asid[self._vq_groups[index]]]

    def _logging(self) -> bool:
        return self._log is not None and bool(self._features >> VHOST_F_LOG_ALL & 1)

    def _apply_log(self, index: int) -> None:
        cfg = self._vq_cfg[index]
        self._vqs[index].set_log(self._log if self._logging() else None, cfg.log_guest_addr, cfg.log_used)

    def set_vq_groups(self, groups: list[int]) -> None:
        """Move queues between groups (a device whose layout depends on features, like virtio-net's
        control queue); every queue then translates through its new group's address space."""
        if len(groups) != self.nvqs or not all(0 <= g < self.ngroups for g in groups):
            raise ValueError(f"groups {groups} do not fit {self.nvqs} queues in {self.ngroups} groups")
        self._vq_groups = list(groups)
        self._rebind_iotlbs()

    def _rebind_iotlbs(self) -> None:
        for index, vq in enumerate(self._vqs):
            if vq.iotlb is not None:
                vq.set_iotlb(self._iotlb_of(index))

    @staticmethod
    def _state_of(vq: VirtQueue) -> VqState:
        state = vq.get_state()
        if vq.packed:
            return VqStatePacked(state["last_avail_idx"], state["last_avail_counter"], state["last_used_idx"],
                                 state["last_used_counter"])
        return VqStateSplit(state["last_avail_idx"])

    @staticmethod
    def signal_callback(cb: VdpaCallback) -> None:
        if cb.callback is not None:
            cb()
        elif cb.trigger is not None:
            # A saturated or closed eventfd loses the notification, as eventfd_signal would.
            with contextlib.suppress(OSError):
                os.eventfd_write(cb.trigger, 1)

    # ----- bringing queues up and running them ----------------------------------------------------

    def _arm(self, index: int) -> bool:
        """Apply the driver's configuration to queue ``index`` and enable it; NEEDS_RESET if it cannot be."""
        cfg, vq = self._vq_cfg[index], self._vqs[index]
        if vq.ready:
            return True
        packed = self._packed()
        try:
            if cfg.num > self.queue_size:
                raise OSError(errno.EINVAL, f"queue size {cfg.num} is above the maximum {self.queue_size}")
            if cfg.desc_area % 16 or cfg.driver_area % (4 if packed else 2) or cfg.device_area % 4:
                raise OSError(errno.EINVAL, "virtqueue areas are misaligned for this ring layout")
            vq.set_num(cfg.num)
            vq.set_address(cfg.desc_area, cfg.driver_area, cfg.device_area)
            vq.set_features(self._features)
            vq.set_iotlb(self._iotlb_of(index))
            vq.set_memory(self._registry)
            self._apply_log(index)
            vq.set_ready(True)
        except OSError as error:
            self.needs_reset(f"queue {index} cannot be enabled: {error.strerror or error}")
            return False
        return True

    def run_queue(self, index: int) -> None:
        """Process queue ``index`` now, or remember the kick while suspended."""
        cfg, vq = self._vq_cfg[index], self._vqs[index]
        if not self._running() or not cfg.ready or not vq.ready:
            return
        if self._suspended:
            cfg.pending_kick = True
            return
        cfg.pending_kick = False
        if cfg.restored and not vq.broken:
            cfg.restored = False
            with contextlib.suppress(VirtQueueError, OSError):  # a failure broke the queue: reported below
                vq.rewind_inflight()
        if not vq.broken:
            try:
                self.process(index)
            except VirtQueueError:
                if not vq.broken:  # a device bug, not bad input: let it surface
                    raise
        self.finish_queue(index)

    def finish_queue(self, index: int) -> None:
        cfg, vq = self._vq_cfg[index], self._vqs[index]
        if vq.broken:
            if not cfg.broken_reported:
                cfg.broken_reported = True
                self._report_fault(index)
                # Chains completed before the break may be waiting for their interrupt.
                self.signal_callback(cfg.cb)
                self.needs_reset(f"queue {index}: {STATUS_NAMES.get(vq.broken, vq.broken)}")
            return
        try:
            notify = vq.notify_needed()
        except VirtQueueError:
            # Reading the driver's suppression fields broke the queue. Read ``broken`` afresh: a type
            # checker keeps ``vq.broken`` narrowed to 0 from the check above, across the call.
            if self._vqs[index].broken:
                self.finish_queue(index)
            return
        if notify:
            self.signal_callback(cfg.cb)

    def _report_fault(self, index: int) -> None:
        vq = self._vqs[index]
        fault = vq.access_fail
        if fault is None:
            return
        vq.clear_access_fail()
        if self._fault_cb is not None:
            iova, perm = fault
            asid = self._group_asid[self._vq_groups[index]]
            self._fault_cb(asid, iova, perm, vq.broken == BAD_UNMAPPED)

    def _start(self) -> None:
        armed = [index for index, cfg in enumerate(self._vq_cfg) if cfg.ready and self._arm(index)]
        self.driver_ok()
        for index in armed:
            self.run_queue(index)

    # ----- virtqueue ops ---------------------------------------------------------------------

    def set_vq_address(self, index: int, desc_area: int, driver_area: int, device_area: int) -> None:
        vq = self._vqs[index]
        if self._queue_running(index):
            raise OSError(errno.EINVAL, f"queue {index} is running: its addresses cannot change until suspended")
        for area in (desc_area, driver_area, device_area):
            if not 0 <= area <= _U64_MAX:
                raise OSError(errno.EINVAL, f"area address {area:#x} is not a 64-bit IOVA")
        if desc_area % 16 or driver_area % 2 or device_area % 4:
            raise OSError(errno.EINVAL, "descriptors must be 16-aligned, driver area 2-aligned, device area 4-aligned")
        if vq.ready:  # suspended: the running queue resumes at the new addresses
            vq.set_address(desc_area, driver_area, device_area)
        cfg = self._vq_cfg[index]
        cfg.desc_area, cfg.driver_area, cfg.device_area = desc_area, driver_area, device_area

    def set_vq_num(self, index: int, num: int) -> None:
        # void in Linux: an unusable size is refused when the queue comes up (NEEDS_RESET).
        self._vq_cfg[index].num = num

    def kick_vq(self, index: int) -> None:
        self.run_queue(index)

    def set_vq_cb(self, index: int, cb: VdpaCallback) -> None:
        self._vq_cfg[index].cb = cb

    def set_vq_ready(self, index: int, ready: bool) -> None:
        cfg = self._vq_cfg[index]
        cfg.ready = bool(ready)
        if not ready:
            self._vqs[index].set_ready(False)
            cfg.pending_kick = False
        elif self._running() and self._arm(index):  # enabled after DRIVER_OK (ENABLE_AFTER_DRIVER_OK)
            self.run_queue(index)

    def get_vq_ready(self, index: int) -> bool:
        return self._vq_cfg[index].ready

    def set_vq_state(self, index: int, state: VqState) -> None:
        if self._queue_running(index):
            # EINVAL, per queue, like mlx5_vdpa ("can't modify available index" of a queue in the RDY state).
            raise OSError(errno.EINVAL, f"queue {index} is running: its state can only be set while suspended")
        packed = self._packed()
        if isinstance(state, VqStatePacked) != packed or not isinstance(state, (VqStatePacked, VqStateSplit)):
            raise OSError(errno.EINVAL, f"{type(state).__name__} does not fit a {'packed' if packed else 'split'} ring")
        vq = self._vqs[index]
        if not vq.ready:
            vq.set_features(self._features)  # the ring layout the state is read in
        self._put_state(vq, state)
        self._vq_cfg[index].restored = True

    def _initial_state(self) -> VqState:
        """Where a queue starts after reset: index 0; packed, both wrap counters 1 (§2.8.1)."""
        return VqStatePacked(0, 1, 0, 1) if self._packed() else VqStateSplit(0)

    @staticmethod
    def _put_state(vq: VirtQueue, state: VqState) -> None:
        if isinstance(state, VqStatePacked):
            vq.set_state(state.last_avail_idx, state.last_avail_counter, state.last_used_idx, state.last_used_counter)
        else:
            vq.set_state(state.avail_index)

    def get_vq_state(self, index: int) -> VqState:
        return self._state_of(self._vqs[index])

    def get_vq_align(self) -> int:
        return SIM_VQ_ALIGN

    def get_vq_num_max(self) -> int:
        return self.queue_size

    def get_vq_num_min(self) -> int:
        return 1

    def get_vq_size(self, index: int) -> int:
        num = self._vq_cfg[index].num
        return num if num else self.queue_size

    def get_vq_group(self, index: int) -> int:
        return self._vq_groups[index]

    # ----- features ----------------------------------------------------------------------------

    def get_device_features(self) -> int:
        return self._offered

    def get_backend_features(self) -> int:
        return 1 << VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK

    def set_driver_features(self, features: int) -> None:
        if features < 0:
            raise OSError(errno.EINVAL, "a feature set cannot be negative")
        if self._status & VIRTIO_CONFIG_S_FEATURES_OK:
            raise OSError(errno.EBUSY, "features are final once FEATURES_OK is set; reset first")
        # Stored as given: FEATURES_OK is where an invalid set is refused, as the spec has it.
        was_packed = self._packed()
        self._features = features
        for index, vq in enumerate(self._vqs):
            if was_packed == self._packed():
                vq.set_features(features)
                continue
            # vdpa_vq_state is a union: a position set in one ring layout means nothing in the other (a
            # 16-bit split index is no 15-bit packed slot), so each layout keeps its own, the one of the
            # layout left is put aside and the other's (or its initial position) comes back.
            left, self._other_layout_state[index] = self._other_layout_state[index], self._state_of(vq)
            vq.set_features(features)
            self._put_state(vq, left if left is not None else self._initial_state())

    def get_driver_features(self) -> int:
        return self._features

    # ----- device, status, config -------------------------------------------------------------

    def get_device_id(self) -> int:
        return self.device_id

    def get_vendor_id(self) -> int:
        return self.vendor_id

    def get_status(self) -> int:
        return self._status

    def set_status(self, status: int) -> None:
        if status == 0:
            self.reset()
            return
        old = self._status
        # No bit is cleared except by reset; DEVICE_NEEDS_RESET is the device's to set.
        status = (status | old) & ~VIRTIO_CONFIG_S_NEEDS_RESET | (old & VIRTIO_CONFIG_S_NEEDS_RESET)
        new = status & ~old
        if new & VIRTIO_CONFIG_S_FEATURES_OK:
            reason = refusal_reason(self.device_id, self._offered, self._features)
            if reason is not None:
                status &= ~VIRTIO_CONFIG_S_FEATURES_OK
                self.last_error = f"FEATURES_OK refused: {reason}"
        self._status = status
        if new & VIRTIO_CONFIG_S_FEATURES_OK and status & VIRTIO_CONFIG_S_FEATURES_OK:
            for index in range(self.nvqs):
                self._apply_log(index)
            self.features_ok(self._features)
        if new & VIRTIO_CONFIG_S_DRIVER_OK:
            if not status & VIRTIO_CONFIG_S_FEATURES_OK:
                self.needs_reset("DRIVER_OK without accepted features")
            elif self._running():
                self._start()

    def reset(self) -> None:
        self._reset(clean_map=False)

    def compat_reset(self, flags: int) -> None:
        self._reset(clean_map=bool(flags & VDPA_RESET_F_CLEAN_MAP))

    def _reset(self, *, clean_map: bool) -> None:
        self._reset_state(clean_map=clean_map)
        self.reset_device()

    def get_generation(self) -> int:
        return self._generation

    def get_config_size(self) -> int:
        return len(self._config)

    def _check_config_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > len(self._config):
            raise OSError(errno.EINVAL, f"config access of {length} bytes at {offset} is outside {len(self._config)}")

    def get_config(self, offset: int, length: int) -> bytes:
        self._check_config_range(offset, length)
        return bytes(self._config[offset:offset + length])

    def set_config(self, offset: int, data: bytes) -> None:
        self._check_config_range(offset, len(data))
        self.write_config(offset, bytes(data))

    def set_config_cb(self, cb: VdpaCallback) -> None:
        self._config_cb = cb

    # ----- suspend / resume ----------------------------------------------------------------------

    def suspend(self) -> None:
        self._suspended = True

    def resume(self) -> None:
        self._suspended = False
        for index, cfg in enumerate(self._vq_cfg):
            if cfg.ready:
                self.run_queue(index)

    # ----- memory ---------------------------------------------------------------------------------

    def get_iova_range(self) -> tuple[int, int]:
        return 0, _U64_MAX

    def _check_asid(self, asid: int) -> None:
        if not 0 <= asid < self.nas:
            raise OSError(errno.EINVAL, f"address space {asid} does not exist ({self.nas})")

    def set_group_asid(self, group: int, asid: int) -> None:
        if not 0 <= group < self.ngroups:
            raise OSError(errno.EINVAL, f"group {group} does not exist ({self.ngroups})")
        self._check_asid(asid)
        self._group_asid[group] = asid
        self._rebind_iotlbs()

    def _require_map_op(self, name: str) -> None:
        """Refuse an op of the mapping style this device withholds, as the model's vdpa_device.map_op does."""
        if name in self.withheld_ops:
            chosen = "set_map" if self.batch_mapping else "dma_map / dma_unmap"
            raise OSError(errno.EOPNOTSUPP, f"{self.name} maps through {chosen} (batch_mapping="
                                            f"{int(self.batch_mapping)}); {name} is not one of its ops")

    def set_map(self, asid: int, iotlb: Iotlb) -> None:
        self._require_map_op("set_map")
        self._check_asid(asid)
        private = Iotlb(self.max_iotlb_entries)
        for start, last, uaddr, perm in iotlb.entries():  # all or nothing: the old map stays on error
            private.update(start, last - start + 1, uaddr, perm)
        self._as[asid] = private
        self._rebind_iotlbs()

    def dma_map(self, asid: int, iova: int, size: int, uaddr: int, perm: int) -> None:
        self._require_map_op("dma_map")
        self._check_asid(asid)
        self._as[asid].update(iova, size, uaddr, perm)

    def dma_unmap(self, asid: int, iova: int, size: int) -> None:
        self._require_map_op("dma_unmap")
        self._check_asid(asid)
        if size and iova <= _U64_MAX - (size - 1):
            self._as[asid].del_range(iova, iova + size - 1)

    def reset_map(self, asid: int) -> None:
        self._check_asid(asid)
        self._as[asid].clear()

    def bind_mm(self, registry: MemoryRegistry) -> None:
        self._use_registry(registry)

    def unbind_mm(self) -> None:
        self._use_registry(default_registry())

    def _use_registry(self, registry: MemoryRegistry) -> None:
        self._registry = registry
        for vq in self._vqs:
            if vq.memory is not None:
                vq.set_memory(registry)
        if self._log is not None:
            self._set_log(self._log.log_base, self._log.size)

    def set_fault_cb(self, cb: FaultCallback | None) -> None:
        self._fault_cb = cb

    # ----- dirty logging ----------------------------------------------------------------------------

    def set_log_base(self, uaddr: int, size: int) -> None:
        self._set_log(uaddr, size)

    def _set_log(self, uaddr: int, size: int) -> None:
        self._log = DirtyLog(self._registry, uaddr, size, -1 if self._log_fd is None else self._log_fd)
        for index in range(self.nvqs):
            self._apply_log(index)

    def set_log_fd(self, fd: int | None) -> None:
        self._log_fd = fd
        if self._log is not None:
            self._log.set_fd(-1 if fd is None else fd)

    def set_vq_log(self, index: int, log_used: bool, log_guest_addr: int) -> None:
        cfg = self._vq_cfg[index]
        cfg.log_used, cfg.log_guest_addr = bool(log_used), log_guest_addr
        self._apply_log(index)

    def set_log_all(self, enabled: bool) -> None:
        bit = 1 << VHOST_F_LOG_ALL
        if not self._offered & bit:
            raise OSError(errno.EINVAL, "VHOST_F_LOG_ALL is not offered")
        self._features = self._features | bit if enabled else self._features & ~bit
        for index in range(self.nvqs):
            self._apply_log(index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.nvqs} vqs, status={self._status:#x})"
