"""A conforming vDPA device, seen through the ``vdpa_config_ops`` a parent driver implements.

:class:`VdpaDeviceModel` has one method per config op (``set_vq_address``, ``get_vq_state``,
``set_status``, ``set_map`` ...) and answers what a conforming device must: a value, or a
:class:`~vdpacert.model.spec.ModelErrno`. It keeps the control state only: per-virtqueue
size, addresses, readiness and position (``vdpa_vq_state``), the negotiated features, the
status byte, the configuration space, one :class:`~vdpacert.model.iotlb.IotlbModel` per
address space, the group -> address space table and the suspended flag. It does not walk
rings; the datapath models do that, translating through :meth:`VdpaDeviceModel.iotlb_for_vq`.

Rules it encodes:

- status writes follow :func:`vdpacert.model.status.write_status`; FEATURES_OK sticks only for a
  feature set with no MUST violation (virtio v1.3 §2.1, §2.2.2);
- a reset returns every piece of device state to its initial value (§2.4.1): status and
  features 0, queues unconfigured, every group in address space 0, the configuration space
  as it was created, not suspended. Mappings are *not* device state in that sense: since
  Linux 6.7 a parent keeps them across ``reset`` and drops them only on ``compat_reset`` with
  ``VDPA_RESET_F_CLEAN_MAP`` or ``reset_map`` (``include/linux/vdpa.h``);
- ``vdpa_vq_state`` is ``avail_index`` for a split queue and both 15-bit indices with their
  wrap counters for a packed queue; packed counters start at 1 (§2.8.1);
- an optional op the parent lacks answers EOPNOTSUPP, as vhost-vdpa reports it.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Final, Literal

from vdpacert.uapi.vhost_types import VHOST_F_LOG_ALL
from vdpacert.uapi.virtio_config import VIRTIO_F_RING_PACKED, VIRTIO_F_SUSPEND

from . import features as feature_rules
from . import sections
from .iotlb import U64_MAX, IotlbMap, IotlbModel
from .ring_index import PackedVqState
from .spec import Citation, ErrnoRule, LinuxSource, Violation
from .status import StatusBit, StatusWrite, write_status

VDPA_H: Final = LinuxSource("include/linux/vdpa.h", "vdpa_config_ops")
MAX_QUEUE_SIZE: Final = 32768  # §2.7 / §2.8: queue sizes never exceed 32768
VDPA_RESET_F_CLEAN_MAP: Final = 1 << 0  # include/linux/vdpa.h

#: Config ops a parent may leave out; calling one it lacks answers EOPNOTSUPP.
OPTIONAL_OPS: Final = frozenset(
    {
        "get_vq_group",
        "get_vq_desc_group",
        "set_group_asid",
        "get_vq_size",
        "suspend",
        "resume",
        "compat_reset",
        "reset_map",
    }
)
#: The optional ops of vdpa_sim's net device in Linux 6.x (the Debian 6.12 build lacks get_vq_size).
VDPA_SIM_OPS: Final = frozenset(
    {"get_vq_group", "set_group_asid", "suspend", "resume", "compat_reset", "reset_map"}
)

MapOp = Literal["set_map", "dma_map", "platform"]
VqStateValue = int | PackedVqState

INITIAL_PACKED_STATE: Final = PackedVqState(
    last_avail_idx=0, last_avail_counter=1, last_used_idx=0, last_used_counter=1
)

# -- rules ------------------------------------------------------------------------------------
NO_SUCH_OP: Final = ErrnoRule(
    "vdpa_device.optional_op",
    errno.EOPNOTSUPP,
    VDPA_H,
    "the parent does not implement this optional config op",
)
VQ_INDEX: Final = ErrnoRule(
    "vdpa_device.vq_index",
    errno.EINVAL,
    sections.VIRTQUEUES,
    "the virtqueue index must be below the device's number of queues",
)
VQ_NUM: Final = ErrnoRule(
    "vdpa_device.vq_num",
    errno.EINVAL,
    sections.VIRTQUEUES,
    "the queue size must lie between get_vq_num_min and get_vq_num_max",
)
VQ_NUM_POW2: Final = ErrnoRule(
    "vdpa_device.vq_num.split_pow2",
    errno.EINVAL,
    sections.SPLIT_VIRTQUEUES,
    "a split queue's size is a power of 2",
)
VQ_STATE_LAYOUT: Final = ErrnoRule(
    "vdpa_device.vq_state.layout",
    errno.EINVAL,
    sections.PACKED_WRAP_COUNTERS,
    "the queue state must match the negotiated ring layout",
)
FEATURES_LOCKED: Final = ErrnoRule(
    "vdpa_device.set_driver_features.locked",
    errno.EBUSY,
    sections.DEVICE_INIT_DRIVER,
    "features cannot change once FEATURES_OK is set",
)
CONFIG_BOUNDS: Final = ErrnoRule(
    "vdpa_device.config.bounds",
    errno.EINVAL,
    sections.CONFIG_SPACE,
    "a configuration access must lie inside the configuration space",
)
ASID_RANGE: Final = ErrnoRule(
    "vdpa_device.asid",
    errno.EINVAL,
    VDPA_H,
    "the address space id must be below the device's number of address spaces",
)
GROUP_RANGE: Final = ErrnoRule(
    "vdpa_device.set_group_asid.group",
    errno.EINVAL,
    VDPA_H,
    "the group index must be below the device's number of groups",
)
WRONG_MAP_OP: Final = ErrnoRule(
    "vdpa_device.map_op",
    errno.EOPNOTSUPP,
    VDPA_H,
    "a parent implements either set_map or dma_map/dma_unmap, not both",
)

DEVICE_RULES: Final = (
    NO_SUCH_OP,
    VQ_INDEX,
    VQ_NUM,
    VQ_NUM_POW2,
    VQ_STATE_LAYOUT,
    FEATURES_LOCKED,
    CONFIG_BOUNDS,
    ASID_RANGE,
    GROUP_RANGE,
    WRONG_MAP_OP,
)


@dataclass(frozen=True)
class VdpaDeviceSpec:
    """What a parent reports about itself: identity, offer, geometry, groups and optional ops.

    ``vq_groups[i]`` is the group of queue ``i`` (all 0 when omitted), ``vq_desc_groups`` the
    group of its descriptor ring (needs the ``get_vq_desc_group`` op). ``backend_features`` is
    what the parent's ``get_backend_features`` adds (e.g. ENABLE_AFTER_DRIVER_OK). ``map_op``
    says how mappings reach it: one ``set_map`` of a whole address space, one ``dma_map`` per
    range, or the platform IOMMU. ``iotlb_limit`` bounds the mappings per address space.
    ``supports_dirty_log`` marks a device that honours VHOST_SET_LOG_BASE (vhost-vdpa itself
    never does).
    """

    device_id: int
    device_features: int
    nvqs: int
    vendor_id: int = 0
    vq_num_max: int = 256
    vq_num_min: int = 1
    vq_align: int = 4096
    config: bytes = b""
    ngroups: int = 1
    nas: int = 1
    vq_groups: tuple[int, ...] | None = None
    vq_desc_groups: tuple[int, ...] | None = None
    iova_range: tuple[int, int] = (0, U64_MAX)
    backend_features: int = 0
    optional_ops: frozenset[str] = field(default_factory=lambda: VDPA_SIM_OPS)
    map_op: MapOp = "set_map"
    iotlb_limit: int | None = None
    supports_dirty_log: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.device_features <= U64_MAX:
            raise ValueError("get_device_features returns a u64 feature word")
        if not 1 <= self.nvqs <= 0xFFFF:
            raise ValueError(f"nvqs must be 1..65535, got {self.nvqs}")
        if not 1 <= self.vq_num_min <= self.vq_num_max <= MAX_QUEUE_SIZE:
            raise ValueError(f"need 1 <= vq_num_min <= vq_num_max <= {MAX_QUEUE_SIZE}")
        if self.ngroups < 1 or self.nas < 1:
            raise ValueError("a device has at least one virtqueue group and one address space")
        for name in ("vq_groups", "vq_desc_groups"):
            groups = getattr(self, name)
            if groups is not None and (
                len(groups) != self.nvqs or any(not 0 <= g < self.ngroups for g in groups)
            ):
                raise ValueError(f"{name} needs one group below ngroups={self.ngroups} per queue")
        if self.vq_desc_groups is not None and "get_vq_desc_group" not in self.optional_ops:
            raise ValueError("vq_desc_groups needs the get_vq_desc_group op")
        unknown = self.optional_ops - OPTIONAL_OPS
        if unknown:
            raise ValueError(f"unknown optional ops {sorted(unknown)}; known: {sorted(OPTIONAL_OPS)}")
        if self.map_op not in ("set_map", "dma_map", "platform"):
            raise ValueError(f"map_op must be set_map, dma_map or platform, got {self.map_op!r}")
        if self.map_op == "platform" and (self.ngroups > 1 or self.nas > 1):
            raise ValueError("a platform-IOMMU parent has one group and one address space (vhost_vdpa_probe)")

    def group_of(self, idx: int) -> int:
        return 0 if self.vq_groups is None else self.vq_groups[idx]

    def offer_violations(self) -> list[Violation]:
        """Rules the offered feature word itself breaks (§2.2.2, §6.2)."""
        return feature_rules.offer_violations(self.device_id, self.device_features)


@dataclass(frozen=True)
class VqState:
    """One virtqueue's control state: size, ring addresses, readiness, callback and position."""

    num: int = 0
    desc_addr: int = 0
    driver_addr: int = 0
    device_addr: int = 0
    ready: bool = False
    cb: bool = False
    avail_index: int = 0  # split vdpa_vq_state
    packed: PackedVqState = INITIAL_PACKED_STATE


@dataclass(frozen=True)
class DeviceSnapshot:
    """Everything observable about the device, as one comparable value."""

    status: int
    driver_features: int
    vqs: tuple[VqState, ...]
    config: bytes
    group_asid: tuple[int, ...]
    maps: tuple[tuple[IotlbMap, ...], ...]
    suspended: bool
    needs_reset: bool
    generation: int

    def without_maps(self) -> DeviceSnapshot:
        """The snapshot with mappings and generation blanked: what a reset must restore."""
        return replace(self, maps=(), generation=0)


class VdpaDeviceModel:
    """The answers of a conforming vDPA device to each config op."""

    def __init__(self, spec: VdpaDeviceSpec) -> None:
        self.spec = spec
        self._iotlbs = [self._fresh_iotlb() for _ in range(spec.nas)]
        self.generation = 0
        self._reset_state()

    # -- internals ----------------------------------------------------------------------------
    def _fresh_iotlb(self) -> IotlbModel:
        return IotlbModel(limit=self.spec.iotlb_limit, iova_range=self.spec.iova_range)

    def _reset_state(self) -> None:
        self.status = 0
        self.driver_features = 0
        self.vqs: list[VqState] = [VqState() for _ in range(self.spec.nvqs)]
        self.config = bytearray(self.spec.config)
        self.group_asid = [0] * self.spec.ngroups
        self.suspended = False
        self.needs_reset = False

    def _require(self, op: str) -> None:
        if op not in self.spec.optional_ops:
            raise NO_SUCH_OP.fail(op)

    def _vq(self, idx: int) -> VqState:
        if not 0 <= idx < self.spec.nvqs:
            raise VQ_INDEX.fail(f"queue {idx} of {self.spec.nvqs}")
        return self.vqs[idx]

    def _asid(self, asid: int) -> IotlbModel:
        if not 0 <= asid < self.spec.nas:
            raise ASID_RANGE.fail(f"asid {asid} of {self.spec.nas}")
        return self._iotlbs[asid]

    @property
    def packed(self) -> bool:
        """Whether the driver's features select the packed ring layout."""
        return bool(self.driver_features >> VIRTIO_F_RING_PACKED & 1)

    def snapshot(self) -> DeviceSnapshot:
        return DeviceSnapshot(
            status=self.status,
            driver_features=self.driver_features,
            vqs=tuple(self.vqs),
            config=bytes(self.config),
            group_asid=tuple(self.group_asid),
            maps=tuple(t.snapshot() for t in self._iotlbs),
            suspended=self.suspended,
            needs_reset=self.needs_reset,
            generation=self.generation,
        )

    def iotlb(self, asid: int) -> IotlbModel:
        """The mappings the device translates with in address space ``asid``."""
        return self._asid(asid)

    def iotlb_for_vq(self, idx: int) -> IotlbModel:
        """The address space queue ``idx`` translates through (its group's ASID)."""
        self._vq(idx)
        return self._iotlbs[self.group_asid[self.spec.group_of(idx)]]

    # -- virtqueue ops --------------------------------------------------------------------------
    def set_vq_address(self, idx: int, desc_area: int, driver_area: int, device_area: int) -> None:
        vq = self._vq(idx)
        for value in (desc_area, driver_area, device_area):
            if not 0 <= value <= U64_MAX:
                raise ValueError(f"ring addresses are u64, got {value}")
        self.vqs[idx] = replace(vq, desc_addr=desc_area, driver_addr=driver_area, device_addr=device_area)

    def set_vq_num(self, idx: int, num: int) -> None:
        vq = self._vq(idx)
        if not self.spec.vq_num_min <= num <= self.spec.vq_num_max:
            raise VQ_NUM.fail(f"{num} outside [{self.spec.vq_num_min}, {self.spec.vq_num_max}]")
        if not self.packed and num & (num - 1):
            raise VQ_NUM_POW2.fail(str(num))
        self.vqs[idx] = replace(vq, num=num)

    def kick_vq(self, idx: int) -> bool:
        """Whether the kick makes the device look at the queue (ready, DRIVER_OK, not suspended)."""
        vq = self._vq(idx)
        return vq.ready and bool(self.status & StatusBit.DRIVER_OK) and not self.suspended

    def set_vq_cb(self, idx: int, cb: bool) -> None:
        self.vqs[idx] = replace(self._vq(idx), cb=cb)

    def set_vq_ready(self, idx: int, ready: bool) -> None:
        self.vqs[idx] = replace(self._vq(idx), ready=bool(ready))

    def get_vq_ready(self, idx: int) -> bool:
        return self._vq(idx).ready

    def set_vq_state(self, idx: int, state: VqStateValue) -> None:
        """Set where the device resumes: ``avail_index`` (split) or a PackedVqState (packed)."""
        vq = self._vq(idx)
        if self.packed:
            if not isinstance(state, PackedVqState):
                raise VQ_STATE_LAYOUT.fail("packed ring needs a PackedVqState")
            self.vqs[idx] = replace(vq, packed=state)
        else:
            if isinstance(state, PackedVqState) or not 0 <= state <= 0xFFFF:
                raise VQ_STATE_LAYOUT.fail(f"split ring needs a 16-bit avail_index, got {state!r}")
            self.vqs[idx] = replace(vq, avail_index=state)

    def get_vq_state(self, idx: int) -> VqStateValue:
        vq = self._vq(idx)
        return vq.packed if self.packed else vq.avail_index

    def get_vq_align(self) -> int:
        return self.spec.vq_align

    def get_vq_group(self, idx: int) -> int:
        self._require("get_vq_group")
        self._vq(idx)
        return self.spec.group_of(idx)

    def get_vq_desc_group(self, idx: int) -> int:
        self._require("get_vq_desc_group")
        self._vq(idx)
        groups = self.spec.vq_desc_groups
        return self.spec.group_of(idx) if groups is None else groups[idx]

    def get_vq_num_max(self) -> int:
        return self.spec.vq_num_max

    def get_vq_num_min(self) -> int:
        return self.spec.vq_num_min

    def get_vq_size(self, idx: int) -> int:
        """The queue's current size: the driver's choice once set, else the maximum (like PCI queue_size)."""
        self._require("get_vq_size")
        return self._vq(idx).num or self.spec.vq_num_max

    # -- features and status ---------------------------------------------------------------------
    def get_device_features(self) -> int:
        return self.spec.device_features

    def get_backend_features(self) -> int:
        return self.spec.backend_features

    def set_driver_features(self, features: int) -> None:
        if not 0 <= features <= U64_MAX:
            raise ValueError(f"set_driver_features takes a u64, got {features}")
        if self.status & StatusBit.FEATURES_OK:
            raise FEATURES_LOCKED.fail(f"status {self.status:#x}")
        self.driver_features = features

    def get_driver_features(self) -> int:
        return self.driver_features

    def set_log_all(self, enabled: bool) -> None:
        """VHOST_F_LOG_ALL switched on a live device (the one feature vhost lets change while active)."""
        bit = 1 << VHOST_F_LOG_ALL
        self.driver_features = self.driver_features | bit if enabled else self.driver_features & ~bit

    def features_valid(self) -> bool:
        """Whether the driver's features may be accepted at FEATURES_OK (no MUST violation, §2.2.2)."""
        return feature_rules.is_valid(
            self.spec.device_id, self.driver_features, offered=self.spec.device_features
        )

    def get_device_id(self) -> int:
        return self.spec.device_id

    def get_vendor_id(self) -> int:
        return self.spec.vendor_id

    def get_status(self) -> int:
        return self.status

    def set_status(self, status: int, *, accept_any_features: bool = False) -> StatusWrite:
        """Apply a status write (0 resets); what the device then reports is ``result.status``.

        ``accept_any_features``: FEATURES_OK is kept whatever the features (a declared quirk of a parent
        that never refuses them; the spec's device must refuse an invalid set).
        """
        suspend_ok = bool((self.driver_features & self.spec.device_features) >> VIRTIO_F_SUSPEND & 1)
        result = write_status(
            self.status,
            status,
            features_valid=accept_any_features or self.features_valid(),
            suspend_negotiated=suspend_ok,
            needs_reset=self.needs_reset,
        )
        if result.reset:
            self.reset()
        else:
            self.status = result.status
        return result

    def enter_error_state(self) -> None:
        """The device met an error it cannot recover from: DEVICE_NEEDS_RESET until reset (§2.1.2)."""
        self.needs_reset = True
        self.status |= StatusBit.DEVICE_NEEDS_RESET

    def reset(self) -> None:
        """Back to the initial state (§2.4.1); mappings are kept, the config generation moves on."""
        self._reset_state()
        self.generation += 1

    def compat_reset(self, flags: int) -> None:
        """A reset that, with VDPA_RESET_F_CLEAN_MAP, also drops every mapping (pre-6.7 behaviour)."""
        self._require("compat_reset")
        self.reset()
        if flags & VDPA_RESET_F_CLEAN_MAP:
            for t in self._iotlbs:
                t.clear()

    def suspend(self) -> None:
        self._require("suspend")
        self.suspended = True

    def resume(self) -> None:
        self._require("resume")
        self.suspended = False

    # -- configuration space ----------------------------------------------------------------------
    def get_config_size(self) -> int:
        return len(self.config)

    def _config_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > len(self.config):
            raise CONFIG_BOUNDS.fail(f"[{offset}, {offset + length}) of {len(self.config)} bytes")

    def get_config(self, offset: int, length: int) -> bytes:
        self._config_range(offset, length)
        return bytes(self.config[offset : offset + length])

    def set_config(self, offset: int, data: bytes) -> None:
        """Store ``data``; which fields a driver may write is the device type's business (§2.5)."""
        self._config_range(offset, len(data))
        self.config[offset : offset + len(data)] = data

    def get_generation(self) -> int:
        return self.generation

    # -- DMA mappings ------------------------------------------------------------------------------
    def get_iova_range(self) -> tuple[int, int]:
        return self.spec.iova_range

    def set_map(self, asid: int, maps: Iterable[IotlbMap]) -> None:
        """Replace address space ``asid`` with ``maps`` (all-or-nothing)."""
        if self.spec.map_op != "set_map":
            raise WRONG_MAP_OP.fail(f"parent uses {self.spec.map_op}")
        self._asid(asid).replace(maps)

    def dma_map(self, asid: int, iova: int, size: int, uaddr: int, perm: int, *, check_perm: bool = True) -> IotlbMap:
        if self.spec.map_op == "set_map":
            raise WRONG_MAP_OP.fail("parent uses set_map")
        return self._asid(asid).update(iova, size, uaddr, perm, check_perm=check_perm)

    def dma_unmap(self, asid: int, iova: int, size: int) -> tuple[IotlbMap, ...]:
        if self.spec.map_op == "set_map":
            raise WRONG_MAP_OP.fail("parent uses set_map")
        return self._asid(asid).invalidate(iova, size)

    def reset_map(self, asid: int) -> None:
        """Return address space ``asid`` to its initial (empty) mapping."""
        self._require("reset_map")
        self._asid(asid).clear()

    def set_group_asid(self, group: int, asid: int) -> None:
        self._require("set_group_asid")
        if not 0 <= group < self.spec.ngroups:
            raise GROUP_RANGE.fail(f"group {group} of {self.spec.ngroups}")
        self._asid(asid)
        self.group_asid[group] = asid


#: Where each op's answer is defined, for reports.
OP_CITATIONS: Final[Mapping[str, Citation]] = MappingProxyType(
    {
        "set_status": sections.DEVICE_STATUS,
        "reset": sections.DEVICE_RESET_DEVICE,
        "set_driver_features": sections.FEATURE_BITS,
        "get_config": sections.CONFIG_SPACE,
        "set_config": sections.CONFIG_SPACE,
        "set_vq_num": sections.VIRTQUEUES,
        "set_vq_state": sections.PACKED_WRAP_COUNTERS,
    }
)


#: vdpa_sim's net device as measured under Linux 6.12 (design brief §6): 3 queues (rx, tx, cvq),
#: the control queue alone in group 1, two address spaces, queue size 256, 24 config bytes
#: (mac 02:00:00:00:00:01, status LINK_UP, one queue pair, mtu 1500).
VDPA_SIM_NET: Final = VdpaDeviceSpec(
    device_id=1,
    device_features=0x308830028,
    nvqs=3,
    vq_num_max=256,
    config=bytes.fromhex("02000000000101000100dc05") + bytes(12),
    ngroups=2,
    nas=2,
    vq_groups=(0, 0, 1),
    backend_features=1 << 6,  # VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK
    optional_ops=VDPA_SIM_OPS,
    map_op="set_map",
)
