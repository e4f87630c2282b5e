"""The parent-driver protocol: what a vDPA device implements to sit under the vdpacert fronts.

A *parent* is the device side of vDPA. Linux calls the same thing a vDPA parent driver and
describes it with ``struct vdpa_config_ops`` (``include/linux/vdpa.h``); :class:`VdpaParent`
mirrors those ops one for one, with the same names and the same meaning, so a vendor who has
written a Linux parent recognises every method, and a front written against Linux's
``drivers/vhost/vdpa.c`` (:mod:`vdpacert.impl.vhost_vdpa`) or ``drivers/virtio/virtio_vdpa.c``
(:mod:`vdpacert.impl.virtio_front`) can drive any parent unchanged.

The contract in prose, with the errno each failure must carry, is ``docs/parent-driver.md``.
The points a reader of this module needs:

- **Mandatory ops** are abstract methods: a class that leaves one out cannot be instantiated.
- **Optional ops** (suspend, resume, get_vq_group, get_vq_size, get_vq_num_min, get_vq_desc_group,
  set_group_asid, get_iova_range, get_backend_features, get_generation, compat_reset,
  set_map / dma_map / dma_unmap / reset_map, bind_mm / unbind_mm, and the vdpacert logging
  extension) are plain methods here that raise :class:`NotImplementedError`. An optional op
  is *present* exactly when the parent's class overrides it and the instance does not withhold
  it (:attr:`VdpaParent.withheld_ops`, :func:`has_op`), the way Linux tests an op pointer of the
  device's own ``vdpa_config_ops`` table for NULL; the fronts then answer EOPNOTSUPP (or take
  the fallback Linux takes) for an absent op, never calling it.
- **Mapping** reaches a parent one way only (:func:`map_style`, the model's rule
  ``vdpa_device.map_op``): ``dma_map`` / ``dma_unmap`` range by range, or ``set_map`` of a
  whole address space. A class may implement both, as vdpa_sim does, as long as each instance
  withholds one pair (vdpa_sim picks its ops table by its ``batch_mapping`` parameter).
- **Errors** are ``OSError(errno, message)``. Ops Linux declares ``void`` (set_vq_num,
  set_vq_ready, set_status, set_config, set_vq_cb, set_config_cb, kick_vq) must not raise;
  a parent that does is non-conformant, and the front passes the error up rather than
  hiding it.
- **Memory**: a parent never dereferences a number it was given. IOVAs are translated with the
  :class:`~vdpacert.impl.iotlb.Iotlb` it received through ``set_map`` (or the ranges given to
  ``dma_map``), and the resulting user addresses are resolved through the
  :class:`~vdpacert.impl.guestmem.MemoryRegistry` it was bound to (``bind_mm``), or the
  process-wide default registry when no front bound one.
- **Threads**: a front serializes every call into one parent with one lock
  (:func:`bind_parent`); a parent that runs its own worker threads synchronizes those itself.
"""

from __future__ import annotations

import abc
import errno
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Union

if TYPE_CHECKING:
    from vdpacert.impl.guestmem import MemoryRegistry
    from vdpacert.impl.iotlb import Iotlb

#: ``compat_reset`` flag: the parent must also drop the mappings it holds (Linux's
#: VDPA_RESET_F_CLEAN_MAP, passed by vhost-vdpa unless userspace negotiated IOTLB_PERSIST).
VDPA_RESET_F_CLEAN_MAP = 1 << 0

_U16_MAX = 0xFFFF
_PACKED_IDX_MAX = 0x7FFF


@dataclass(frozen=True)
class VqStateSplit:
    """``struct vdpa_vq_state_split``: the index of the next avail ring entry the device reads."""

    avail_index: int

    def __post_init__(self) -> None:
        if not 0 <= self.avail_index <= _U16_MAX:
            raise ValueError(f"split avail_index {self.avail_index} is not a 16-bit index")


@dataclass(frozen=True)
class VqStatePacked:
    """``struct vdpa_vq_state_packed``: 15-bit ring positions plus their wrap counters."""

    last_avail_idx: int
    last_avail_counter: int
    last_used_idx: int
    last_used_counter: int

    def __post_init__(self) -> None:
        for name in ("last_avail_idx", "last_used_idx"):
            if not 0 <= getattr(self, name) <= _PACKED_IDX_MAX:
                raise ValueError(f"packed {name} {getattr(self, name)} does not fit 15 bits")
        for name in ("last_avail_counter", "last_used_counter"):
            if getattr(self, name) not in (0, 1):
                raise ValueError(f"packed {name} must be 0 or 1, got {getattr(self, name)}")


#: What get_vq_state returns and set_vq_state receives; which one depends on RING_PACKED.
VqState = Union[VqStateSplit, VqStatePacked]  # noqa: UP007 - also used at runtime


@dataclass(frozen=True)
class VdpaCallback:
    """``struct vdpa_callback``: how a parent signals a used buffer or a config change.

    Call it like a plain function. ``trigger`` is the eventfd behind the callback, when there
    is one (Linux's ``cb.trigger``): a parent whose datapath runs without the GIL may write 1
    to that fd directly instead of calling back into Python. A callback with neither does
    nothing (the driver unbound its interrupt).
    """

    callback: Callable[[], None] | None = None
    trigger: int | None = None

    def __call__(self) -> None:
        if self.callback is not None:
            self.callback()

    @property
    def bound(self) -> bool:
        return self.callback is not None or self.trigger is not None


#: The unbound callback (SET_VRING_CALL with fd -1).
NO_CALLBACK = VdpaCallback()

#: Called by a parent when a device access faults: ``(asid, iova, perm, miss)``; ``miss`` is
#: True for an unmapped IOVA (vhost MISS) and False for a permission failure (ACCESS_FAIL).
FaultCallback = Callable[[int, int, int, bool], None]


class VdpaParent(abc.ABC):
    """A vDPA device as its front sees it: Linux's ``struct vdpa_config_ops`` in Python.

    Indices are virtqueue indices ``0 <= index < nvqs`` unless said otherwise; the fronts
    check them before calling (vhost-vdpa answers ENOBUFS for an index past nvqs), so a
    parent may assert them. See ``docs/parent-driver.md`` for each op's contract.
    """

    #: Number of virtqueues (``vdpa_device.nvqs``).
    nvqs: int = 0
    #: Number of virtqueue groups (``vdpa_device.ngroups``); groups share an address space.
    ngroups: int = 1
    #: Number of address spaces (``vdpa_device.nas``).
    nas: int = 1
    #: Parents address memory by user virtual address (``vdpa_device.use_va``); vdpacert parents always do.
    use_va: ClassVar[bool] = True
    #: Optional ops this instance leaves out although its class implements them. Linux registers one
    #: ``vdpa_config_ops`` table per device, so one driver may give its devices different ops (vdpa_sim:
    #: set_map, or dma_map / dma_unmap, by its ``batch_mapping`` parameter); a class here implements the
    #: union and each instance withholds the rest. Set it in ``__init__``: a front reads it when it binds.
    withheld_ops: frozenset[str] = frozenset()

    # ----- virtqueue ops (mandatory) -------------------------------------------------------

    @abc.abstractmethod
    def set_vq_address(self, index: int, desc_area: int, driver_area: int, device_area: int) -> None:
        """Record the IOVAs of the descriptor, driver (avail) and device (used) areas.

        Raise OSError(EINVAL) to refuse (misaligned, or the queue is live); vhost-vdpa reports EINVAL.
        """

    @abc.abstractmethod
    def set_vq_num(self, index: int, num: int) -> None:
        """Set the queue size. ``void`` in Linux: record it; refuse an unusable size at DRIVER_OK."""

    @abc.abstractmethod
    def kick_vq(self, index: int) -> None:
        """The driver made buffers available on ``index``: process them (or note it while suspended)."""

    @abc.abstractmethod
    def set_vq_cb(self, index: int, cb: VdpaCallback) -> None:
        """Install the used-buffer callback of ``index`` (NO_CALLBACK unbinds)."""

    @abc.abstractmethod
    def set_vq_ready(self, index: int, ready: bool) -> None:
        """Enable or disable the queue (``queue_enable``). Disabling stops it from being processed."""

    @abc.abstractmethod
    def get_vq_ready(self, index: int) -> bool:
        """Whether the queue is enabled."""

    @abc.abstractmethod
    def set_vq_state(self, index: int, state: VqState) -> None:
        """Set where the device resumes: VqStateSplit or VqStatePacked, per the negotiated ring.

        Raise OSError(EBUSY) while the queue is being processed (DRIVER_OK and not suspended),
        OSError(EINVAL) for a state of the wrong ring type.
        """

    @abc.abstractmethod
    def get_vq_state(self, index: int) -> VqState:
        """Where the device would resume: the ring positions after the last buffer it consumed."""

    @abc.abstractmethod
    def get_vq_align(self) -> int:
        """Required alignment of the virtqueue areas, in bytes (a power of two)."""

    @abc.abstractmethod
    def get_vq_num_max(self) -> int:
        """Largest queue size the device supports (at most 32768)."""

    # ----- features --------------------------------------------------------------------------

    @abc.abstractmethod
    def get_device_features(self) -> int:
        """Offered features, an unbounded bit set (virtio feature bits reach past 63)."""

    @abc.abstractmethod
    def set_driver_features(self, features: int) -> None:
        """Store the driver's accepted features. Raise OSError(EINVAL) to refuse the set."""

    @abc.abstractmethod
    def get_driver_features(self) -> int:
        """The features in effect (what set_driver_features stored, possibly masked)."""

    # ----- device and config ----------------------------------------------------------------

    @abc.abstractmethod
    def get_device_id(self) -> int:
        """Virtio device ID (1 net, 2 block, ...)."""

    @abc.abstractmethod
    def get_vendor_id(self) -> int:
        """Virtio subsystem vendor ID."""

    @abc.abstractmethod
    def get_status(self) -> int:
        """The device status byte."""

    @abc.abstractmethod
    def set_status(self, status: int) -> None:
        """Write a non-zero status. The front has already refused any clearing of bits; the
        parent clears FEATURES_OK from what get_status reports when it refuses the features,
        and brings the queues up when DRIVER_OK is set. Reset arrives as reset(), never as 0 here."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Return to the initial state: status 0, queues disabled and forgotten, features 0."""

    @abc.abstractmethod
    def get_config_size(self) -> int:
        """Size of the device-specific configuration space, in bytes."""

    @abc.abstractmethod
    def get_config(self, offset: int, length: int) -> bytes:
        """``length`` bytes of config space at ``offset`` (the front checked the bounds)."""

    @abc.abstractmethod
    def set_config(self, offset: int, data: bytes) -> None:
        """Driver write to config space (the front checked the bounds); ignore read-only fields."""

    @abc.abstractmethod
    def set_config_cb(self, cb: VdpaCallback) -> None:
        """Install the config-change callback."""

    # ----- optional ops: absent unless the class overrides them --------------------------------

    def get_vq_group(self, index: int) -> int:
        """The group of queue ``index`` (``< ngroups``); absent, GET_VRING_GROUP is EOPNOTSUPP."""
        raise NotImplementedError

    def get_vq_num_min(self) -> int:
        """Smallest queue size the device supports."""
        raise NotImplementedError

    def get_vq_size(self, index: int) -> int:
        """Current size of queue ``index`` (VHOST_VDPA_GET_VRING_SIZE)."""
        raise NotImplementedError

    def get_vq_desc_group(self, index: int) -> int:
        """Group of the descriptor table of ``index``, when it can be isolated (DESC_ASID)."""
        raise NotImplementedError

    def get_backend_features(self) -> int:
        """Extra VHOST_BACKEND_F_* bits the parent supports (e.g. ENABLE_AFTER_DRIVER_OK)."""
        raise NotImplementedError

    def get_generation(self) -> int:
        """Config generation counter: changes whenever a multi-field read could tear."""
        raise NotImplementedError

    def compat_reset(self, flags: int) -> None:
        """reset() with flags; VDPA_RESET_F_CLEAN_MAP also drops every mapping (reset_map state)."""
        raise NotImplementedError

    def suspend(self) -> None:
        """Stop processing buffers; keep ring state so get_vq_state is exact and final."""
        raise NotImplementedError

    def resume(self) -> None:
        """Process buffers again after suspend(), including kicks that arrived meanwhile."""
        raise NotImplementedError

    def get_iova_range(self) -> tuple[int, int]:
        """``(first, last)`` IOVA the device can use, inclusive. Absent: the whole 64-bit space."""
        raise NotImplementedError

    def set_group_asid(self, group: int, asid: int) -> None:
        """Put virtqueue group ``group`` in address space ``asid``. OSError(EINVAL) for a bad group."""
        raise NotImplementedError

    def set_map(self, asid: int, iotlb: Iotlb) -> None:
        """Replace the whole map of ``asid`` with ``iotlb`` (the parent may keep the object)."""
        raise NotImplementedError

    def dma_map(self, asid: int, iova: int, size: int, uaddr: int, perm: int) -> None:
        """Add one mapping to ``asid``. Used instead of set_map when present."""
        raise NotImplementedError

    def dma_unmap(self, asid: int, iova: int, size: int) -> None:
        """Remove one mapping added by dma_map (whole, as it was added)."""
        raise NotImplementedError

    def reset_map(self, asid: int) -> None:
        """Return ``asid`` to the parent's initial mapping (called when the front drops the space)."""
        raise NotImplementedError

    def bind_mm(self, registry: MemoryRegistry) -> None:
        """Resolve user addresses through ``registry`` from now on (vhost SET_OWNER)."""
        raise NotImplementedError

    def unbind_mm(self) -> None:
        """Forget the registry given to bind_mm (the owner went away)."""
        raise NotImplementedError

    # ----- vdpacert extensions -------------------------------------------------------------

    def set_fault_cb(self, cb: FaultCallback | None) -> None:
        """Where to report an access the IOTLB refused (vhost MISS / ACCESS_FAIL messages)."""
        raise NotImplementedError

    def set_log_base(self, uaddr: int, size: int) -> None:
        """Dirty log: one bit per 4 KiB guest page at ``uaddr`` (``size`` bytes are writable there).

        Only for parents that offer VHOST_F_LOG_ALL; absent, vhost-vdpa refuses SET_LOG_BASE as Linux does.
        """
        raise NotImplementedError

    def set_log_fd(self, fd: int | None) -> None:
        """Eventfd to signal after logging writes (None: stop signalling). The front keeps it open."""
        raise NotImplementedError

    def set_vq_log(self, index: int, log_used: bool, log_guest_addr: int) -> None:
        """VHOST_VRING_F_LOG of SET_VRING_ADDR: log used-ring writes of ``index`` at this guest address."""
        raise NotImplementedError

    def set_log_all(self, enabled: bool) -> None:
        """Turn VHOST_F_LOG_ALL on or off in the driver features of a running device.

        vhost.h says of VHOST_F_LOG_ALL that it "can be changed while device is active": it is how a
        VMM starts and stops dirty logging for a migration. It is a vhost feature, not a virtio one,
        so the FEATURES_OK freeze does not cover it. OSError(EINVAL) when the device does not offer it.
        """
        raise NotImplementedError


#: Optional ops, by name: present exactly when a parent's class overrides them.
OPTIONAL_OPS = frozenset({
    "get_vq_group", "get_vq_num_min", "get_vq_size", "get_vq_desc_group", "get_backend_features", "get_generation",
    "compat_reset", "suspend", "resume", "get_iova_range", "set_group_asid", "set_map", "dma_map",
    "dma_unmap", "reset_map", "bind_mm", "unbind_mm", "set_fault_cb", "set_log_base", "set_log_fd",
    "set_vq_log", "set_log_all",
})


#: The ops of each way of mapping (vdpa.h: a parent provides one of them, or neither for the platform IOMMU).
DMA_MAP_OPS = frozenset({"dma_map", "dma_unmap"})
SET_MAP_OPS = frozenset({"set_map"})

#: How mappings reach a parent; the same words as the model's ``VdpaDeviceSpec.map_op``.
MapStyle = Literal["dma_map", "set_map", "platform"]


def implements_op(cls: type[VdpaParent], name: str) -> bool:
    """Whether class ``cls`` overrides optional op ``name`` (whatever an instance of it withholds)."""
    if name not in OPTIONAL_OPS:
        raise ValueError(f"{name!r} is not an optional vDPA config op")
    own = getattr(cls, name, None)
    return own is not None and own is not getattr(VdpaParent, name)


def has_op(parent: VdpaParent, name: str) -> bool:
    """Whether ``parent`` has optional op ``name`` (Linux: the device's op pointer is not NULL): its class
    implements it and the instance does not withhold it."""
    return implements_op(type(parent), name) and name not in parent.withheld_ops


def map_style(parent: VdpaParent) -> MapStyle:
    """How a front hands mappings to ``parent``, in Linux's order (vhost_vdpa_map, vhost_vdpa_general_unmap):
    dma_map / dma_unmap when the parent has them, else set_map, else the platform IOMMU.

    One answer for every message, so a front never mixes two styles even for a parent that (against
    ``vdpa_device.map_op``) exposes both: such a parent gets dma_map / dma_unmap only.
    """
    if has_op(parent, "dma_map"):
        return "dma_map"
    if has_op(parent, "set_map"):
        return "set_map"
    return "platform"


def supports_logging(parent: VdpaParent) -> bool:
    """The vdpacert dirty-log extension is complete: set_log_base and set_log_fd both present."""
    return has_op(parent, "set_log_base") and has_op(parent, "set_log_fd")


def check_parent(parent: VdpaParent) -> None:
    """Refuse a parent whose shape no front can drive (ValueError): counts and map ops.

    Linux's vhost_vdpa_probe refuses more than one group or address space from a parent that
    has neither set_map nor dma_map (EOPNOTSUPP); vdpacert has no platform IOMMU to fall back
    to, so it needs one of them whenever memory is mapped at all.
    """
    if not isinstance(parent, VdpaParent):
        raise TypeError(f"{type(parent).__name__} is not a VdpaParent")
    for name in ("nvqs", "ngroups", "nas"):
        value = getattr(parent, name)
        if not isinstance(value, int) or value < (0 if name == "nvqs" else 1):
            raise ValueError(f"{type(parent).__name__}.{name} = {value!r} is not a valid count")
    withheld = parent.withheld_ops
    if not isinstance(withheld, frozenset) or not withheld <= OPTIONAL_OPS:
        raise ValueError(f"{type(parent).__name__}.withheld_ops = {withheld!r} is not a frozenset of optional ops")
    if has_op(parent, "dma_map") != has_op(parent, "dma_unmap"):
        raise ValueError(f"{type(parent).__name__} implements only one of dma_map / dma_unmap")
    if not (has_op(parent, "set_map") or has_op(parent, "dma_map")):
        raise ValueError(f"{type(parent).__name__} implements neither set_map nor dma_map")


# ----- exclusive binding and the per-parent lock -----------------------------------------------

@dataclass
class ParentBinding:
    """A front's claim on a parent: which driver holds it and the lock every call goes through."""

    parent: VdpaParent
    driver: str
    lock: threading.RLock


_bindings: dict[int, ParentBinding] = {}
_bindings_lock = threading.Lock()


def bind_parent(parent: VdpaParent, driver: str) -> ParentBinding:
    """Claim ``parent`` for one front (``driver`` is "vhost_vdpa" or "virtio_vdpa").

    A vDPA device is driven by one driver and, through vhost-vdpa, opened by one process at a
    time; a second claim is OSError(EBUSY), as a second open of /dev/vhost-vdpa-N is.
    """
    check_parent(parent)
    with _bindings_lock:
        held = _bindings.get(id(parent))
        if held is not None:
            raise OSError(errno.EBUSY, f"the device is already in use by {held.driver}")
        binding = ParentBinding(parent, driver, threading.RLock())
        _bindings[id(parent)] = binding  # the binding holds the parent, so its id stays unique
        return binding


def unbind_parent(binding: ParentBinding) -> None:
    """Release a claim made by bind_parent (idempotent)."""
    with _bindings_lock:
        if _bindings.get(id(binding.parent)) is binding:
            del _bindings[id(binding.parent)]


def bound_driver(parent: VdpaParent) -> str | None:
    """The driver holding ``parent``, or None when it is free."""
    with _bindings_lock:
        held = _bindings.get(id(parent))
        return None if held is None else held.driver


def parent_lock(parent: VdpaParent) -> threading.RLock:
    """The lock a bound front serializes ``parent`` with; a fresh one when the parent is free."""
    with _bindings_lock:
        held = _bindings.get(id(parent))
        return held.lock if held is not None else threading.RLock()


# ----- registry of parent classes ---------------------------------------------------------------

ParentFactory = Callable[..., VdpaParent]

_factories: dict[str, ParentFactory] = {}
_factories_lock = threading.Lock()
#: Entry-point group a vendor package uses to register its parents without vdpacert importing it.
ENTRY_POINT_GROUP = "vdpacert.parents"


def register_parent(name: str, factory: ParentFactory, *, replace: bool = False) -> None:
    """Make ``factory(**attrs) -> VdpaParent`` constructible by ``name``. EEXIST if taken."""
    if not name or not name.strip() or any(c.isspace() for c in name):
        raise OSError(errno.EINVAL, f"parent name {name!r} must be a non-empty word")
    if not callable(factory):
        raise TypeError("a parent factory must be callable")
    with _factories_lock:
        if name in _factories and not replace:
            raise OSError(errno.EEXIST, f"a parent named {name!r} is already registered")
        _factories[name] = factory


def unregister_parent(name: str) -> None:
    with _factories_lock:
        if _factories.pop(name, None) is None:
            raise OSError(errno.ENOENT, f"no parent named {name!r} is registered")


def parent_factory(name: str) -> ParentFactory:
    with _factories_lock:
        try:
            return _factories[name]
        except KeyError:
            raise OSError(errno.ENOENT, f"no parent named {name!r} is registered") from None


def registered_parents() -> dict[str, ParentFactory]:
    with _factories_lock:
        return dict(_factories)


def load_entry_point_parents() -> list[str]:
    """Register the factories third-party packages declare under ``vdpacert.parents``.

    Each entry point names a factory; its entry-point name becomes the parent name. Returns the
    names newly registered (one already registered is left as it is).
    """
    from importlib.metadata import entry_points

    added = []
    for entry in _iter_entry_points(entry_points):
        with _factories_lock:
            if entry.name in _factories:
                continue
        register_parent(entry.name, entry.load())
        added.append(entry.name)
    return added


def _iter_entry_points(entry_points: Any) -> Iterator[Any]:
    yield from entry_points(group=ENTRY_POINT_GROUP)
