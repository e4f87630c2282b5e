"""The vdpa bus: management devices that create named vDPA devices, as iproute2's ``vdpa`` shows them.

Linux models a vDPA-capable function as a *management device* (``vdpa mgmtdev show``) that
creates devices on request (``vdpa dev add name vdpa0 mgmtdev vdpasim_net mac ... mtu ...``).
:class:`VdpaBus` does the same for parents of :mod:`vdpacert.impl.parent`: a
:class:`MgmtDev` names a factory and the attributes it accepts; ``dev_add`` validates the
attributes and calls the factory; a device is then opened as a vhost-vdpa file
(:meth:`VdpaBus.open_vhost`) or as a virtio device (:meth:`VdpaBus.open_virtio`), one at a
time, like a device bound either to vhost_vdpa or to virtio_vdpa.

Errors follow the kernel's vdpa netlink handlers: an unknown management device or device is
ENODEV, a name in use EEXIST, an attribute the management device does not support
EOPNOTSUPP, an unknown attribute or a bad value EINVAL, and deleting an open device EBUSY
(Linux would wait for the file to close; a test harness must not hang).

Device modules register themselves: a module listed in :data:`BUILTIN_MGMTDEV_MODULES` (the
reference sim-net and sim-blk) exposes ``MGMTDEV``, a :class:`MgmtDev`; a third-party package
declares one under the ``vdpacert.mgmtdevs`` entry-point group. :func:`default_bus` loads both.
"""

from __future__ import annotations

import errno
import importlib
import importlib.util
import re
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vdpacert.impl.guestmem import MemoryRegistry
from vdpacert.impl.parent import VdpaParent, bound_driver, check_parent, parent_lock
from vdpacert.impl.vhost_vdpa import VhostVdpa
from vdpacert.impl.virtio_front import VirtioVdpa
from vdpacert.uapi import virtio_blk as blk
from vdpacert.uapi import virtio_net as net
from vdpacert.uapi.virtio_ids import VIRTIO_ID_BLOCK, VIRTIO_ID_NET

#: Modules defining the reference management devices (each exposes ``MGMTDEV``).
BUILTIN_MGMTDEV_MODULES = ("vdpacert.impl.sim_net", "vdpacert.impl.sim_blk")
#: Entry-point group for third-party management devices (each entry point loads a MgmtDev).
MGMTDEV_ENTRY_POINT_GROUP = "vdpacert.mgmtdevs"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def _int(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return int(value.strip(), 0)
    raise ValueError(f"{value!r} is not a number")


def _ranged(low: int, high: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        number = _int(value)
        if not low <= number <= high:
            raise ValueError(f"{number} is outside [{low}, {high}]")
        return number
    return parse


def _disk_name(value: object) -> str:
    if isinstance(value, str) and _NAME.match(value):
        return value
    raise ValueError(f"disk {value!r} is not a plain name (letters, digits, _ . : -)")


def _mac(value: object) -> bytes:
    if isinstance(value, (bytes, bytearray)) and len(value) == 6:
        return bytes(value)
    if isinstance(value, str) and _MAC.match(value.strip()):
        return bytes(int(part, 16) for part in value.strip().split(":"))
    raise ValueError(f"{value!r} is not a MAC address like 52:54:00:12:34:56")


def _queue_size(value: object) -> int:
    number = _ranged(1, 32768)(value)
    if number & (number - 1):
        raise ValueError(f"queue size {number} is not a power of two")
    return number


def _flag(value: object) -> bool:
    """0 or 1 (vdpa_sim's ``batch_mapping`` is an int module parameter); a bool is taken as it is."""
    if isinstance(value, bool):
        return value
    return bool(_ranged(0, 1)(value))


def _features(value: object) -> int:
    number = _int(value)
    if number < 0:
        raise ValueError("features are a non-negative bit set")
    return number


#: Every attribute a management device may accept, with its parser (ValueError -> EINVAL).
ATTRIBUTES: Mapping[str, Callable[[object], Any]] = {
    "mac": _mac,
    "mtu": _ranged(68, 65535),
    "max_vq_pairs": _ranged(1, 0x8000),
    "queue_size": _queue_size,
    "capacity": _ranged(0, (1 << 64) - 1),  # 512-byte sectors
    "num_queues": _ranged(1, 0xFFFF),
    "features": _features,
    "disk": _disk_name,  # sim-blk: the name of a shared ramdisk ("the same LUN" for two devices)
    # vdpa_sim's module parameters, per device here: 1 maps through set_map, 0 through dma_map / dma_unmap
    "batch_mapping": _flag,
    "max_iotlb_entries": _ranged(0, 0x7FFFFFFF),  # per address space; 0: no cap (an int module parameter)
}


@dataclass(frozen=True)
class MgmtDev:
    """A management device: ``factory(name, **attrs)`` builds a parent; only ``supported_attrs`` are accepted."""

    name: str
    factory: Callable[..., VdpaParent]
    supported_attrs: frozenset[str] = frozenset()
    device_class: str = "net"  # "net" or "block", as `vdpa mgmtdev show` prints supported_classes
    max_supported_vqs: int = 0
    supported_features: int = 0  # 0: the factory alone judges a "features" attribute

    def __post_init__(self) -> None:
        unknown = set(self.supported_attrs) - set(ATTRIBUTES)
        if unknown:
            raise ValueError(f"unknown attributes {sorted(unknown)}; known: {sorted(ATTRIBUTES)}")
        if not _NAME.match(self.name):
            raise ValueError(f"management device name {self.name!r} is not a plain word")


@dataclass
class VdpaDevice:
    name: str
    mgmtdev: MgmtDev
    parent: VdpaParent
    attrs: dict[str, Any] = field(default_factory=dict)


def _device_type(device_id: int) -> str:
    return {VIRTIO_ID_NET: "network", VIRTIO_ID_BLOCK: "block"}.get(device_id, f"id {device_id}")


def _u16(data: bytes, offset: int) -> int | None:
    return struct.unpack_from("<H", data, offset)[0] if len(data) >= offset + 2 else None


def _u32(data: bytes, offset: int) -> int | None:
    return struct.unpack_from("<I", data, offset)[0] if len(data) >= offset + 4 else None


def _decode_config(device_id: int, features: int, data: bytes) -> dict[str, Any]:
    """The fields ``vdpa dev config show`` prints for net and block devices."""
    out: dict[str, Any] = {}
    if device_id == VIRTIO_ID_NET:
        if features >> net.VIRTIO_NET_F_MAC & 1 and len(data) >= 6:
            out["mac"] = ":".join(f"{b:02x}" for b in data[net.VIRTIO_NET_CONFIG_MAC:net.VIRTIO_NET_CONFIG_MAC + 6])
        if features >> net.VIRTIO_NET_F_STATUS & 1:
            status = _u16(data, net.VIRTIO_NET_CONFIG_STATUS)
            if status is not None:
                out["link"] = "up" if status & net.VIRTIO_NET_S_LINK_UP else "down"
        if features >> net.VIRTIO_NET_F_MQ & 1:
            out["max_vq_pairs"] = _u16(data, net.VIRTIO_NET_CONFIG_MAX_VIRTQUEUE_PAIRS)
        if features >> net.VIRTIO_NET_F_MTU & 1:
            out["mtu"] = _u16(data, net.VIRTIO_NET_CONFIG_MTU)
    elif device_id == VIRTIO_ID_BLOCK:
        if len(data) >= 8:
            out["capacity"] = struct.unpack_from("<Q", data, blk.VIRTIO_BLK_CONFIG_CAPACITY)[0]
        for name, bit, offset in (("size_max", blk.VIRTIO_BLK_F_SIZE_MAX, blk.VIRTIO_BLK_CONFIG_SIZE_MAX),
                                  ("seg_max", blk.VIRTIO_BLK_F_SEG_MAX, blk.VIRTIO_BLK_CONFIG_SEG_MAX),
                                  ("blk_size", blk.VIRTIO_BLK_F_BLK_SIZE, blk.VIRTIO_BLK_CONFIG_BLK_SIZE)):
            if features >> bit & 1:
                out[name] = _u32(data, offset)
        if features >> blk.VIRTIO_BLK_F_MQ & 1:
            out["num_queues"] = _u16(data, blk.VIRTIO_BLK_CONFIG_NUM_QUEUES)
    return {key: value for key, value in out.items() if value is not None}


class VdpaBus:
    """Management devices and the devices they made (see the module docstring). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._mgmtdevs: dict[str, MgmtDev] = {}
        self._devices: dict[str, VdpaDevice] = {}

    # ----- management devices ----------------------------------------------------------------

    def register_mgmtdev(self, mgmtdev: MgmtDev) -> None:
        with self._lock:
            if mgmtdev.name in self._mgmtdevs:
                raise OSError(errno.EEXIST, f"management device {mgmtdev.name!r} is already registered")
            self._mgmtdevs[mgmtdev.name] = mgmtdev

    def unregister_mgmtdev(self, name: str) -> None:
        """Remove a management device; EBUSY while devices it made exist."""
        with self._lock:
            if name not in self._mgmtdevs:
                raise OSError(errno.ENODEV, f"no management device {name!r}")
            users = [dev.name for dev in self._devices.values() if dev.mgmtdev.name == name]
            if users:
                raise OSError(errno.EBUSY, f"management device {name!r} still has devices {users}")
            del self._mgmtdevs[name]

    def mgmtdev(self, name: str) -> MgmtDev:
        with self._lock:
            try:
                return self._mgmtdevs[name]
            except KeyError:
                raise OSError(errno.ENODEV, f"no management device {name!r}") from None

    def mgmtdev_show(self, name: str | None = None) -> list[dict[str, Any]]:
        """``vdpa mgmtdev show``: name, supported class, attributes, max vqs, features."""
        with self._lock:
            chosen = [self.mgmtdev(name)] if name is not None else list(self._mgmtdevs.values())
        return [{"name": m.name, "supported_classes": [m.device_class], "supported_attrs": sorted(m.supported_attrs),
                 "max_supported_vqs": m.max_supported_vqs, "dev_features": m.supported_features} for m in chosen]

    # ----- devices -----------------------------------------------------------------------------

    def dev_add(self, name: str, mgmtdev: str, **attrs: object) -> VdpaDevice:
        """``vdpa dev add name NAME mgmtdev MGMTDEV [attr value ...]``."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise OSError(errno.EINVAL, f"device name {name!r} must be 1-64 of [A-Za-z0-9_.:-]")
        with self._lock:
            manager = self.mgmtdev(mgmtdev)
            if name in self._devices:
                raise OSError(errno.EEXIST, f"device {name!r} already exists")
            parsed = self._parse_attrs(manager, attrs)
            try:
                parent = manager.factory(name, **parsed)
            except (TypeError, ValueError) as error:
                raise OSError(errno.EINVAL, f"{manager.name} refused the attributes: {error}") from error
            try:
                check_parent(parent)
            except (TypeError, ValueError) as error:
                raise OSError(errno.EINVAL, f"{manager.name} built an unusable parent: {error}") from error
            device = VdpaDevice(name, manager, parent, parsed)
            self._devices[name] = device
            return device

    @staticmethod
    def _parse_attrs(manager: MgmtDev, attrs: Mapping[str, object]) -> dict[str, Any]:
        unknown = sorted(set(attrs) - set(ATTRIBUTES))
        if unknown:
            raise OSError(errno.EINVAL, f"unknown attributes {unknown}; known: {sorted(ATTRIBUTES)}")
        unsupported = sorted(set(attrs) - manager.supported_attrs)
        if unsupported:
            raise OSError(errno.EOPNOTSUPP, f"{manager.name} does not support attributes {unsupported}")
        parsed = {}
        for key, value in attrs.items():
            try:
                parsed[key] = ATTRIBUTES[key](value)
            except ValueError as error:
                raise OSError(errno.EINVAL, f"attribute {key}: {error}") from error
        if "features" in parsed and manager.supported_features and parsed["features"] & ~manager.supported_features:
            extra = parsed["features"] & ~manager.supported_features
            raise OSError(errno.EINVAL, f"features {extra:#x} are not supported by {manager.name}")
        return parsed

    def get(self, name: str) -> VdpaDevice:
        with self._lock:
            try:
                return self._devices[name]
            except KeyError:
                raise OSError(errno.ENODEV, f"no vdpa device {name!r}") from None

    def dev_del(self, name: str) -> None:
        """``vdpa dev del NAME``; EBUSY while a front has it open."""
        with self._lock:
            device = self.get(name)
            driver = bound_driver(device.parent)
            if driver is not None:
                raise OSError(errno.EBUSY, f"device {name!r} is open through {driver}")
            del self._devices[name]

    def dev_show(self, name: str | None = None) -> list[dict[str, Any]]:
        """``vdpa dev show``: name, type, mgmtdev, vendor_id, max_vqs, max_vq_size."""
        with self._lock:
            chosen = [self.get(name)] if name is not None else list(self._devices.values())
        shown = []
        for device in chosen:
            parent = device.parent
            with parent_lock(parent):
                shown.append({"name": device.name, "type": _device_type(parent.get_device_id()),
                              "mgmtdev": device.mgmtdev.name, "vendor_id": parent.get_vendor_id(),
                              "max_vqs": parent.nvqs, "max_vq_size": parent.get_vq_num_max()})
        return shown

    def dev_config_show(self, name: str) -> dict[str, Any]:
        """``vdpa dev config show NAME``: decoded config plus offered and negotiated features.

        Reads the config directly, without negotiating anything (unlike a driver's first read).
        """
        parent = self.get(name).parent
        with parent_lock(parent):
            device_id = parent.get_device_id()
            offered = parent.get_device_features()
            data = bytes(parent.get_config(0, parent.get_config_size()))
            negotiated, status = parent.get_driver_features(), parent.get_status()
        return {"name": name, **_decode_config(device_id, offered, data), "dev_features": offered,
                "negotiated_features": negotiated, "status": status, "config": data.hex()}

    def open_vhost(self, name: str, registry: MemoryRegistry | None = None) -> VhostVdpa:
        """Open the device as ``/dev/vhost-vdpa-N`` (EBUSY if already open through any front)."""
        return VhostVdpa(self.get(name).parent, registry)

    def open_virtio(self, name: str, registry: MemoryRegistry | None = None) -> VirtioVdpa:
        """Bind the device to the virtio front (EBUSY if already open through any front)."""
        return VirtioVdpa(self.get(name).parent, registry)


_default: VdpaBus | None = None
_default_lock = threading.Lock()


def default_bus() -> VdpaBus:
    """The process-wide bus, with the built-in and entry-point management devices registered."""
    global _default
    with _default_lock:
        if _default is None:
            _default = VdpaBus()
            load_mgmtdevs(_default)
        return _default


def load_mgmtdevs(bus: VdpaBus) -> list[str]:
    """Register the built-in management devices that exist and the entry-point ones; their names."""
    from importlib.metadata import entry_points

    found: list[MgmtDev] = []
    for module_name in BUILTIN_MGMTDEV_MODULES:
        try:
            present = importlib.util.find_spec(module_name) is not None
        except ModuleNotFoundError:
            present = False
        if present:
            candidate = getattr(importlib.import_module(module_name), "MGMTDEV", None)
            if isinstance(candidate, MgmtDev):
                found.append(candidate)
    for entry in entry_points(group=MGMTDEV_ENTRY_POINT_GROUP):
        candidate = entry.load()
        if isinstance(candidate, MgmtDev):
            found.append(candidate)
    added = []
    for mgmtdev in found:
        try:
            bus.register_mgmtdev(mgmtdev)
        except OSError:
            continue  # already registered (a module imported twice, or two names colliding)
        added.append(mgmtdev.name)
    return added
