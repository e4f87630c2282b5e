"""``--target`` strings: which device a run certifies, parsed and checked before anything is opened.

Grammar (every error is a ValueError that quotes the string and says what is wrong)::

    sim-net[:ATTRS]                    the reference virtio-net device (attributes: mac, mtu,
                                       max_vq_pairs or mq, queue_size, features)
    sim-blk[:ATTRS]                    the reference virtio-blk device (capacity, num_queues,
                                       queue_size, features)
    python:MODULE:FACTORY[:ATTRS]      a vendor parent: ``MODULE.FACTORY(**attrs)`` returns a VdpaParent
    vhost-vdpa:/dev/vhost-vdpa-N       a Linux vhost-vdpa character device (an absolute path)
    ATTRS = key=value[,key=value...]

Attribute names are those of ``vdpa dev add`` (the bus's), so a target string reads like the
command that would provision the device; ``mq`` is accepted for ``max_vq_pairs``. Numbers are
decimal or 0x-hex, except ``features``, which is always hex (``features=130000064``), the way
``vdpa mgmtdev show`` prints feature words. Ranges checked here are the bus's own; a device may
still refuse a value it cannot honour when the target is opened.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Union

__all__ = ["SIM_ATTRS", "TargetSpec", "parse_target"]

AttrValue = Union[int, str]  # noqa: UP007 - a runtime alias on Python 3.10

#: Which attributes each reference device takes (its management device's supported_attrs).
SIM_ATTRS: dict[str, frozenset[str]] = {
    "sim-net": frozenset({"mac", "mtu", "max_vq_pairs", "queue_size", "features", "batch_mapping",
                          "max_iotlb_entries"}),
    "sim-blk": frozenset({"capacity", "num_queues", "queue_size", "features", "disk", "batch_mapping",
                          "max_iotlb_entries"}),
}
_ALIASES = {"mq": "max_vq_pairs"}
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_DISK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_RANGES = {"mtu": (68, 65535), "max_vq_pairs": (1, 0x8000), "queue_size": (1, 32768),
           "capacity": (0, (1 << 64) - 1), "num_queues": (1, 0xFFFF), "batch_mapping": (0, 1),
           "max_iotlb_entries": (0, 0x7FFFFFFF)}


@dataclass(frozen=True)
class TargetSpec:
    """One parsed target. ``kind`` is sim-net, sim-blk, python or vhost-vdpa.

    ``module`` / ``factory`` are set for python targets, ``path`` for vhost-vdpa ones; ``attrs``
    are the device attributes (for python targets, the factory's keyword arguments).
    """

    kind: str
    attrs: dict[str, AttrValue] = field(default_factory=dict)
    module: str = ""
    factory: str = ""
    path: str = ""

    def __str__(self) -> str:
        """The canonical spelling (aliases resolved, attributes sorted): a stable target name."""
        attrs = ",".join(f"{key}={_show(key, value)}" for key, value in sorted(self.attrs.items()))
        if self.kind == "python":
            head = f"python:{self.module}:{self.factory}"
        elif self.kind == "vhost-vdpa":
            return f"vhost-vdpa:{self.path}"
        else:
            head = self.kind
        return f"{head}:{attrs}" if attrs else head


def _show(key: str, value: AttrValue) -> str:
    if key == "features" and isinstance(value, int):
        return f"{value:#x}"
    return str(value)


def parse_target(text: str) -> TargetSpec:
    """Parse one ``--target`` string (see the module docstring); ValueError names the problem."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("an empty target; use sim-net, sim-blk, python:MODULE:FACTORY or vhost-vdpa:/dev/vhost-vdpa-N")
    text = text.strip()
    kind, _, rest = text.partition(":")
    if kind in SIM_ATTRS:
        return TargetSpec(kind, _sim_attrs(text, kind, rest))
    if kind == "python":
        return _python(text, rest)
    if kind == "vhost-vdpa":
        if not rest.startswith("/"):
            raise ValueError(f"target {text!r}: vhost-vdpa needs the absolute path of a char device, "
                             "like vhost-vdpa:/dev/vhost-vdpa-0")
        return TargetSpec("vhost-vdpa", path=rest)
    raise ValueError(f"target {text!r}: unknown kind {kind!r}; "
                     "use sim-net, sim-blk, python:MODULE:FACTORY or vhost-vdpa:/dev/vhost-vdpa-N")


def _split_attrs(text: str, rest: str) -> dict[str, str]:
    """``k=v,k=v`` into raw strings; a missing ``=``, an empty key or value, or a repeated key is an error."""
    raw: dict[str, str] = {}
    if rest == "":
        return raw
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise ValueError(f"target {text!r}: attribute {item!r} is not key=value")
        if key in raw:
            raise ValueError(f"target {text!r}: attribute {key!r} is given twice")
        raw[key] = value
    return raw


def _sim_attrs(text: str, kind: str, rest: str) -> dict[str, AttrValue]:
    allowed = SIM_ATTRS[kind]
    attrs: dict[str, AttrValue] = {}
    for given, value in _split_attrs(text, rest).items():
        key = _ALIASES.get(given, given)
        if key not in allowed:
            names = sorted(allowed) + [alias for alias, name in _ALIASES.items() if name in allowed]
            raise ValueError(f"target {text!r}: {kind} has no attribute {given!r}; it takes {', '.join(names)}")
        if key in attrs:
            raise ValueError(f"target {text!r}: {given!r} repeats an attribute already given (mq is max_vq_pairs)")
        attrs[key] = _sim_value(text, key, value)
    return attrs


def _sim_value(text: str, key: str, value: str) -> AttrValue:
    if key == "disk":
        if not _DISK.match(value):
            raise ValueError(f"target {text!r}: disk {value!r} is not a plain name (letters, digits, _ . : -)")
        return value
    if key == "mac":
        if not _MAC.match(value):
            raise ValueError(f"target {text!r}: mac {value!r} is not like 02:00:00:00:00:01")
        if int(value[:2], 16) & 1:
            raise ValueError(f"target {text!r}: mac {value!r} is a multicast address")
        return value.lower()
    try:
        number = int(value, 16) if key == "features" else int(value, 0)
    except ValueError:
        form = "a hex bit mask" if key == "features" else "a number"
        raise ValueError(f"target {text!r}: {key}={value!r} is not {form}") from None
    if key == "features":
        if number < 0:
            raise ValueError(f"target {text!r}: features are a non-negative bit mask")
        return number
    low, high = _RANGES[key]
    if not low <= number <= high:
        raise ValueError(f"target {text!r}: {key}={number} is outside [{low}, {high}]")
    if key == "queue_size" and number & (number - 1):
        raise ValueError(f"target {text!r}: queue_size={number} is not a power of two")
    return number


def _python(text: str, rest: str) -> TargetSpec:
    module, _, rest = rest.partition(":")
    factory, _, attr_text = rest.partition(":")
    if not _MODULE.match(module):
        raise ValueError(f"target {text!r}: {module!r} is not a module name; use python:MODULE:FACTORY")
    if not factory or not all(_IDENTIFIER.match(part) for part in factory.split(".")):
        raise ValueError(f"target {text!r}: {factory!r} is not a factory name; use python:MODULE:FACTORY")
    attrs: dict[str, AttrValue] = {}
    for key, value in _split_attrs(text, attr_text).items():
        if not _IDENTIFIER.match(key):
            raise ValueError(f"target {text!r}: {key!r} is not a keyword argument name")
        attrs[key] = _python_value(value)
    return TargetSpec("python", attrs, module=module, factory=factory)


def _python_value(value: str) -> AttrValue:
    """A factory argument: an int when it reads as one (decimal or 0x-hex), else the string."""
    try:
        return int(value, 0)
    except ValueError:
        return value
