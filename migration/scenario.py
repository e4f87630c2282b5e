"""Migration scenarios: one TOML file says what to migrate, under which load, over which link, and what must happen.

A scenario is read with :func:`load_scenario` (a file) or :func:`load_scenario_text` (a string) into
frozen dataclasses, one per TOML table: :class:`DeviceSpec`, :class:`MemorySpec`, :class:`WorkloadSpec`,
:class:`MigrationSpec` and a tuple of :class:`FaultSpec` (``[[faults]]``), held by a :class:`Scenario`.
``docs/scenarios.md`` documents every key.

A scenario file is input written by hand, so everything is checked before anything runs: unknown keys,
wrong types, values out of range and combinations that cannot mean anything (a net workload on a blk
device, a fault with ``expect = "converged"``, a packed start index past the ring) raise
:class:`ScenarioError`, whose message names the file, the key path (``workload.net_frames_per_s``) and
the rule broken. The value rules live on the dataclass fields themselves (``metadata``) and the
cross-field rules in :meth:`Scenario.__post_init__`, so a scenario built or ``dataclasses.replace``-d in
code is held to exactly the rules a file is.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from vdpacert.conformance.targets.spec import TargetSpec, parse_target
from vdpacert.uapi import vhost_types as T  # noqa: N812
from vdpacert.uapi import virtio_config as C  # noqa: N812
from vdpacert.uapi import virtio_net as N  # noqa: N812
from vdpacert.uapi import virtio_ring as R  # noqa: N812

__all__ = [
    "DEVICE_LOG",
    "EXPECTS",
    "FAULT_KINDS",
    "MODES",
    "SHADOW",
    "DeviceSpec",
    "FaultSpec",
    "MemorySpec",
    "MigrationSpec",
    "Scenario",
    "ScenarioError",
    "WorkloadSpec",
    "load_scenario",
    "load_scenario_text",
    "shipped_scenarios",
]

MIB = 1 << 20
DEVICE_LOG = "device-log"
SHADOW = "shadow"
MODES = (DEVICE_LOG, SHADOW)
EXPECTS = ("converged", "not-converged", "failed")
FAULT_KINDS = ("source-crash", "destination-refuses", "corrupt-stream", "link-drop")
CORRUPT_TARGETS = ("ram", "state")
RINGS = ("split", "packed")
#: Workload keys that only mean something for one device kind.
NET_KEYS = frozenset({"net_frames_per_s", "frame_bytes", "mq_pairs", "mac", "promisc"})
BLK_KEYS = frozenset({"blk_writes_per_s", "blk_write_sectors"})
#: ``parse_target`` kinds whose device type the string itself says; other targets are known once opened.
_KIND_OF_TARGET = {"sim-net": "net", "sim-blk": "blk"}
#: The reference devices' defaults for attributes a scenario's ring needs (impl/sim_net.py, impl/sim_blk.py).
_SIM_QUEUE_SIZE = 256
_SIM_QUEUES_ATTR = {"sim-net": "max_vq_pairs", "sim-blk": "num_queues"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_SCENARIO_DIR = "scenarios"

Check = Callable[[Any], bool]


class ScenarioError(ValueError):
    """A scenario that cannot run: ``source`` (its file), ``key`` (dotted key path, "" for the whole file), ``rule``."""

    def __init__(self, source: str, key: str, rule: str) -> None:
        self.source = source
        self.key = key
        self.rule = rule
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {rule}" if where else rule)

    def from_source(self, source: str) -> ScenarioError:
        """The same error told about the file it came from (the dataclasses do not know their file)."""
        return ScenarioError(source, self.key, self.rule)


def _rule(default: Any, rule: str, check: Check | None = None) -> Any:
    """A field with a default and the rule its value must meet (``rule`` is what an error message says)."""
    return field(default=default, metadata={"rule": rule, "check": check})


def _required(rule: str, check: Check | None = None) -> Any:
    return field(metadata={"rule": rule, "check": check})


def _finite(low: float, *, above: bool = False) -> Check:
    return lambda v: math.isfinite(v) and (v > low if above else v >= low)


def _between(low: int, high: int) -> Check:
    return lambda v: low <= v <= high


def _one_of(choices: Iterable[str]) -> tuple[str, Check]:
    options = tuple(choices)
    return "one of " + ", ".join(f'"{c}"' for c in options), lambda v: v in options


def _target_check(text: str) -> bool:
    parse_target(text)  # raises ValueError with its own explanation; _check_fields reports it
    return True


def _check_fields(obj: object, section: str) -> None:
    """Every field's own rule (metadata); ScenarioError names ``section.key`` and the rule."""
    for f in fields(obj):  # type: ignore[arg-type]
        check = f.metadata.get("check")
        if check is None:
            continue
        value = getattr(obj, f.name)
        try:
            ok = check(value)
        except ValueError as exc:
            raise ScenarioError("", _key(section, f.name), str(exc)) from None
        if not ok:
            raise ScenarioError("", _key(section, f.name), f"{value!r} is not allowed: must be {f.metadata['rule']}")


def _key(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


_RING_RULE, _RING_CHECK = _one_of(RINGS)
_MODE_RULE, _MODE_CHECK = _one_of(MODES)
_EXPECT_RULE, _EXPECT_CHECK = _one_of(EXPECTS)
_FAULT_RULE, _FAULT_CHECK = _one_of(FAULT_KINDS)
_CORRUPT_RULE, _CORRUPT_CHECK = _one_of(CORRUPT_TARGETS)


@dataclass(frozen=True)
class DeviceSpec:
    """``[device]``: which device is migrated to which, and how its driver sets the rings up."""

    SECTION: ClassVar[str] = "device"
    target: str = _rule("sim-net", "a target string vdpacert accepts (sim-net, sim-blk, python:..., vhost-vdpa:...)",
                        _target_check)
    destination: str = _rule("", '"" (the same as target) or a target string', lambda v: v == "" or _target_check(v))
    ring: str = _rule("split", _RING_RULE, _RING_CHECK)
    queue_size: int = _rule(256, "1..32768", _between(1, 32768))
    queues: int = _rule(1, "1..32768", _between(1, 32768))
    event_idx: bool = _rule(True, "a boolean")
    indirect: bool = _rule(False, "a boolean")
    start_index: int = _rule(0, "0..65535", _between(0, 0xFFFF))
    twin: str = _rule("", '"" (the same as target) or a target string: the unmigrated twin\'s device',
                      lambda v: v == "" or _target_check(v))

    def __post_init__(self) -> None:
        _check_fields(self, self.SECTION)

    @property
    def destination_target(self) -> str:
        """The destination's target string (``destination``, or ``target`` when that is empty)."""
        return self.destination or self.target

    @property
    def twin_target(self) -> str:
        """The unmigrated twin's target string (``twin``, or ``target`` when that is empty)."""
        return self.twin or self.target

    @property
    def packed(self) -> bool:
        return self.ring == "packed"


@dataclass(frozen=True)
class MemorySpec:
    """``[memory]``: the guest's memory."""

    SECTION: ClassVar[str] = "memory"
    size_mib: int = _rule(64, "1..65536 (MiB)", _between(1, 65536))

    def __post_init__(self) -> None:
        _check_fields(self, self.SECTION)

    @property
    def size_bytes(self) -> int:
        return self.size_mib * MIB


_RATE_MAX = 10**8


@dataclass(frozen=True)
class WorkloadSpec:
    """``[workload]``: what the guest does on the source; rates are per second of simulated time."""

    SECTION: ClassVar[str] = "workload"
    net_frames_per_s: int = _rule(0, f"0..{_RATE_MAX}", _between(0, _RATE_MAX))
    frame_bytes: int = _rule(256, "60..1514 (an Ethernet frame without FCS)", _between(60, 1514))
    blk_writes_per_s: int = _rule(0, f"0..{_RATE_MAX}", _between(0, _RATE_MAX))
    # One OUT data segment of at most 64 KiB: the reference blk device's size_max.
    blk_write_sectors: int = _rule(8, "1..128 (512-byte sectors: one 64 KiB segment)", _between(1, 128))
    cpu_pages_per_s: int = _rule(0, f"0..{_RATE_MAX}", _between(0, _RATE_MAX))
    cpu_working_set_mib: int = _rule(0, "0..65536 (MiB; 0: all of memory)", _between(0, 65536))
    inflight: int = _rule(0, "0..32768", _between(0, 32768))
    chain_spans_ring: bool = _rule(False, "a boolean")
    mq_pairs: int = _rule(0, "0..32768 (0: leave the queue pairs alone)", _between(0, 0x8000))
    mac: str = _rule("", '"" or a unicast MAC like 02:00:00:00:00:01', lambda v: v == "" or _unicast_mac(v))
    promisc: bool = _rule(False, "a boolean")
    reset_before: bool = _rule(False, "a boolean")
    seed: int = _rule(0, "0..2^64-1", _between(0, (1 << 64) - 1))

    def __post_init__(self) -> None:
        _check_fields(self, self.SECTION)

    def non_default_keys(self) -> frozenset[str]:
        """The keys whose value is not the default (what a scenario built in code is judged by)."""
        return frozenset(f.name for f in fields(self) if getattr(self, f.name) != f.default)


def _unicast_mac(text: str) -> bool:
    return bool(_MAC.match(text)) and not int(text[:2], 16) & 1


@dataclass(frozen=True)
class MigrationSpec:
    """``[migration]``: the dirty-tracking mode, the link, the downtime target and the expected outcome."""

    SECTION: ClassVar[str] = "migration"
    mode: str = _rule(DEVICE_LOG, _MODE_RULE, _MODE_CHECK)
    bandwidth_mib_s: float = _rule(1000.0, "a finite number > 0 (MiB per simulated second)", _finite(0, above=True))
    latency_ms: float = _rule(1.0, "a finite number >= 0 (ms)", _finite(0))
    downtime_ms: float = _rule(30.0, "a finite number > 0 (ms)", _finite(0, above=True))
    max_iterations: int = _rule(30, "1..1000", _between(1, 1000))
    run_before_ms: float = _rule(20.0, "a finite number >= 0 (ms)", _finite(0))
    run_after_ms: float = _rule(20.0, "a finite number >= 0 (ms)", _finite(0))
    expect: str = _rule("converged", _EXPECT_RULE, _EXPECT_CHECK)

    def __post_init__(self) -> None:
        _check_fields(self, self.SECTION)

    @property
    def bandwidth_bytes_s(self) -> float:
        return self.bandwidth_mib_s * MIB

    @property
    def latency_s(self) -> float:
        return self.latency_ms / 1000

    @property
    def downtime_s(self) -> float:
        return self.downtime_ms / 1000

    @property
    def run_before_s(self) -> float:
        return self.run_before_ms / 1000

    @property
    def run_after_s(self) -> float:
        return self.run_after_ms / 1000


@dataclass(frozen=True)
class FaultSpec:
    """One ``[[faults]]`` entry: what goes wrong, and in which pre-copy iteration (0: the stop-and-copy phase)."""

    SECTION: ClassVar[str] = "faults"
    kind: str = _required(_FAULT_RULE, _FAULT_CHECK)
    iteration: int = _rule(0, "0..1000 (0: the stop-and-copy phase)", _between(0, 1000))
    target: str = _rule("ram", _CORRUPT_RULE + " (corrupt-stream only)", _CORRUPT_CHECK)

    def __post_init__(self) -> None:
        _check_fields(self, self.SECTION)
        # The device state crosses the link only in the stop-and-copy phase, so that is where it can go wrong.
        if self.iteration and (self.kind == "destination-refuses" or self.target == "state"):
            raise ScenarioError("", "faults.iteration",
                                f"{self.kind} of the device state can only strike in the stop-and-copy phase "
                                "(iteration = 0)")
        if self.kind != "corrupt-stream" and self.target != "ram":
            raise ScenarioError("", "faults.target", f"only corrupt-stream faults take a target, not {self.kind}")


@dataclass(frozen=True)
class Scenario:
    """One migration scenario (module docstring); ``path`` is the file it came from, None when made from text."""

    name: str
    description: str = ""
    regression: str = ""
    device: DeviceSpec = field(default_factory=DeviceSpec)
    memory: MemorySpec = field(default_factory=MemorySpec)
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    migration: MigrationSpec = field(default_factory=MigrationSpec)
    faults: tuple[FaultSpec, ...] = ()
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ScenarioError("", "name", f"{self.name!r} is not allowed: must be 1..64 letters, digits, '.', '_' "
                                "or '-', starting with a letter or digit")
        if "\n" in self.description:
            raise ScenarioError("", "description", "one line (no newline)")
        _check_cross(self, self.workload.non_default_keys())

    @property
    def device_kind(self) -> str | None:
        """The device type, "net" or "blk": from the target string, else the workload; None if only the device knows."""
        return _kind_of(self.device.target) or _workload_kind(self.workload.non_default_keys())

    @property
    def cpu_working_set_bytes(self) -> int:
        """Bytes of guest memory the CPU workload writes into (all of it when cpu_working_set_mib is 0)."""
        return (self.workload.cpu_working_set_mib or self.memory.size_mib) * MIB


def _kind_of(target: str) -> str | None:
    return _KIND_OF_TARGET.get(parse_target(target).kind)


def _workload_kind(keys: frozenset[str]) -> str | None:
    if keys & NET_KEYS:
        return "net"
    if keys & BLK_KEYS:
        return "blk"
    return None


def _check_cross(s: Scenario, workload_keys: frozenset[str]) -> None:
    """The rules between fields: ``workload_keys`` are the workload keys the scenario sets."""
    dev, work = s.device, s.workload
    kind = _kind_of(dev.target)
    net_keys, blk_keys = sorted(workload_keys & NET_KEYS), sorted(workload_keys & BLK_KEYS)
    if kind == "blk" and net_keys:
        raise ScenarioError("", f"workload.{net_keys[0]}", f"a net workload key on a blk device ({dev.target})")
    if kind == "net" and blk_keys:
        raise ScenarioError("", f"workload.{blk_keys[0]}", f"a blk workload key on a net device ({dev.target})")
    if net_keys and blk_keys:
        raise ScenarioError("", f"workload.{blk_keys[0]}", f"blk and net workload keys together ({net_keys[0]})")
    dest_kind = _kind_of(dev.destination_target)
    if kind and dest_kind and dest_kind != kind:
        raise ScenarioError("", "device.destination", f"a {dest_kind} device cannot take a {kind} device's state")
    if dev.ring == "split" and dev.queue_size & (dev.queue_size - 1):
        raise ScenarioError("", "device.queue_size", f"{dev.queue_size} is not a power of 2 (a split ring's size)")
    if dev.packed and dev.start_index >= dev.queue_size:
        raise ScenarioError("", "device.start_index", f"{dev.start_index} is not a slot of a packed ring of "
                            f"{dev.queue_size} (start_index < queue_size)")
    if work.inflight > dev.queue_size:
        raise ScenarioError("", "workload.inflight", f"{work.inflight} chains do not fit a ring of {dev.queue_size}")
    if work.chain_spans_ring and not dev.packed:
        raise ScenarioError("", "workload.chain_spans_ring", 'needs ring = "packed" (the packed wrap-counter case)')
    if work.mq_pairs and (dev.queues < 2 or work.mq_pairs > dev.queues):
        raise ScenarioError("", "workload.mq_pairs", f"{work.mq_pairs} pairs need multiqueue (device.queues > 1) "
                            f"and at most device.queues = {dev.queues}")
    if work.cpu_working_set_mib > s.memory.size_mib:
        raise ScenarioError("", "workload.cpu_working_set_mib",
                            f"{work.cpu_working_set_mib} MiB is more than memory.size_mib = {s.memory.size_mib}")
    twin_kind = _kind_of(dev.twin_target)
    if kind and twin_kind and twin_kind != kind:
        raise ScenarioError("", "device.twin", f"a {twin_kind} device cannot be the twin of a {kind} device")
    _check_char_devices(s)
    _check_mode(s)
    _check_faults(s)
    for key, target in (("device.target", dev.target), ("device.destination", dev.destination_target),
                        ("device.twin", dev.twin_target)):
        _check_sim_attrs(s, key, parse_target(target))


def _check_char_devices(s: Scenario) -> None:
    """A vhost-vdpa char device is opened by one owner at a time (a second open is EBUSY): source, destination
    and twin must then be three different devices (every open of a sim-* target is a new device)."""
    dev = s.device
    opened = {"device.target": dev.target, "device.destination": dev.destination_target,
              "device.twin": dev.twin_target}
    seen: dict[str, str] = {}
    for key, target in opened.items():
        spec = parse_target(target)
        if spec.kind != "vhost-vdpa":
            continue
        if spec.path in seen:
            raise ScenarioError("", key, f"{spec.path} is {seen[spec.path]} already: a vhost-vdpa device has one "
                                "owner at a time, so source, destination and twin must be different devices")
        seen[spec.path] = key


def _check_mode(s: Scenario) -> None:
    # Linux's vhost-vdpa answers ENOTTY to VHOST_SET_LOG_BASE: such a device can only be tracked by shadowing.
    if s.migration.mode == DEVICE_LOG and parse_target(s.device.target).kind == "vhost-vdpa":
        raise ScenarioError("", "migration.mode", 'Linux vhost-vdpa devices cannot log dirty pages; use "shadow"')


def _check_faults(s: Scenario) -> None:
    expect = s.migration.expect
    if s.faults and expect != "failed":
        raise ScenarioError("", "migration.expect", f'a scenario with faults expects "failed", not "{expect}"')
    if not s.faults and expect == "failed":
        raise ScenarioError("", "migration.expect", '"failed" needs a [[faults]] entry that makes it fail')
    for i, fault in enumerate(s.faults):
        if fault.iteration > s.migration.max_iterations:
            raise ScenarioError("", f"faults[{i}].iteration", f"{fault.iteration} is past "
                                f"migration.max_iterations = {s.migration.max_iterations}")


def _needed_features(s: Scenario) -> list[tuple[str, int]]:
    """What the scenario asks of the device's feature offer: (the key that asks, the feature bit it needs)."""
    dev, work = s.device, s.workload
    needs = [("device.ring", C.VIRTIO_F_RING_PACKED)] if dev.packed else []
    needs += [("device.event_idx", R.VIRTIO_RING_F_EVENT_IDX)] if dev.event_idx else []
    needs += [("device.indirect", R.VIRTIO_RING_F_INDIRECT_DESC)] if dev.indirect else []
    needs += [("migration.mode", T.VHOST_F_LOG_ALL)] if s.migration.mode == DEVICE_LOG else []
    needs += [("workload.mq_pairs", N.VIRTIO_NET_F_MQ)] if work.mq_pairs else []
    needs += [("workload.mac", N.VIRTIO_NET_F_CTRL_MAC_ADDR)] if work.mac else []
    needs += [("workload.promisc", N.VIRTIO_NET_F_CTRL_RX)] if work.promisc else []
    return needs


def _check_sim_attrs(s: Scenario, key: str, spec: TargetSpec) -> None:
    """A reference device made from ``spec`` must have the queues, sizes and features the scenario uses."""
    if spec.kind not in _SIM_QUEUES_ATTR:
        return  # other targets say what they have only once opened
    attr = _SIM_QUEUES_ATTR[spec.kind]
    have = int(spec.attrs.get(attr, 1))
    if s.device.queues > have:
        raise ScenarioError("", "device.queues", f"{s.device.queues} queues, but {key} = {str(spec)!r} has "
                            f"{attr} = {have}")
    size_max = int(spec.attrs.get("queue_size", _SIM_QUEUE_SIZE))
    if s.device.queue_size > size_max:
        raise ScenarioError("", "device.queue_size", f"{s.device.queue_size} is more than {key} = {str(spec)!r} "
                            f"allows ({size_max})")
    offered = spec.attrs.get("features")
    if offered is None:
        return
    for asked_by, bit in _needed_features(s):
        if not int(offered) >> bit & 1:
            raise ScenarioError("", asked_by, f"needs feature bit {bit}, which {key} = {str(spec)!r} does not offer")


# ----- loading ------------------------------------------------------------------------------------------------

_TOP_KEYS = ("name", "description", "regression", "device", "memory", "workload", "migration", "faults")
_SECTIONS: dict[str, type[DeviceSpec] | type[MemorySpec] | type[WorkloadSpec] | type[MigrationSpec]] = {
    "device": DeviceSpec, "memory": MemorySpec, "workload": WorkloadSpec, "migration": MigrationSpec}
_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "a boolean (true/false)", "str": "a string"}


def load_scenario(path: str | Path) -> Scenario:
    """Read and check one scenario file; the default name is the file's stem. A missing file is an OSError."""
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScenarioError(str(path), "", f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return _load(text, str(path), path.stem, path)


def load_scenario_text(text: str, name: str) -> Scenario:
    """Check a scenario given as TOML text; ``name`` is its default name and what error messages call it."""
    return _load(text, name, name, None)


def packaged_scenario(name: str) -> Path | None:
    """The package's scenario called ``name`` (a stem, or ``linux/STEM`` for those that need a guest kernel with
    Linux's vdpa_sim, run by ``vdpacert kernel run``); None when there is none."""
    root = resources.files(__package__ or "vdpacert.migration") / _SCENARIO_DIR
    parts = name.split("/")
    if not all(part and part not in (".", "..") for part in parts):
        return None
    entry = root.joinpath(*parts[:-1], parts[-1] + ".toml")
    return Path(str(entry)) if entry.is_file() else None


def linux_scenarios() -> list[Path]:
    """The package's ``linux/`` scenarios: they migrate between Linux vdpa_sim devices inside a guest kernel."""
    root = resources.files(__package__ or "vdpacert.migration") / _SCENARIO_DIR / "linux"
    if not root.is_dir():
        return []
    return sorted((Path(str(entry)) for entry in root.iterdir() if entry.name.endswith(".toml")),
                  key=lambda p: p.name)


def shipped_scenarios() -> list[Path]:
    """The scenario files shipped in the package (``vdpacert/migration/scenarios/*.toml``), sorted by name."""
    root = resources.files(__package__ or "vdpacert.migration") / _SCENARIO_DIR
    if not root.is_dir():
        return []
    return sorted((Path(str(entry)) for entry in root.iterdir() if entry.name.endswith(".toml")),
                  key=lambda p: p.name)


def _load(text: str, source: str, default_name: str, path: Path | None) -> Scenario:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(source, "", f"not valid TOML: {exc}") from None
    try:
        return _build(raw, default_name, path)
    except ScenarioError as exc:
        raise exc.from_source(source) from None


def _build(raw: Mapping[str, Any], default_name: str, path: Path | None) -> Scenario:
    for key in raw:
        if key not in _TOP_KEYS:
            raise ScenarioError("", key, f"unknown key; a scenario takes {', '.join(_TOP_KEYS)}")
    top: dict[str, Any] = {}
    for key in ("name", "description", "regression"):
        if key in raw:
            top[key] = _typed(raw[key], "str", key)
    sections = {key: _section(cls, raw.get(key, {}), key) for key, cls in _SECTIONS.items()}
    faults_raw = raw.get("faults", [])
    if not isinstance(faults_raw, list):
        raise ScenarioError("", "faults", "must be an array of tables ([[faults]])")
    faults = tuple(_section(FaultSpec, item, f"faults[{i}]") for i, item in enumerate(faults_raw))
    for i, item in enumerate(faults_raw):
        if "target" in item and item.get("kind") != "corrupt-stream":
            raise ScenarioError("", f"faults[{i}].target",
                                f"only corrupt-stream faults take a target, not {item['kind']}")
    scenario = Scenario(name=top.pop("name", default_name), **top, **sections, faults=faults, path=path)
    # A file is also judged by the keys it writes, not only by values that differ from the defaults.
    _check_cross(scenario, frozenset(raw.get("workload", {})))
    return scenario


def _section(cls: type[Any], raw: object, section: str) -> Any:
    """One table: unknown keys, missing required keys and types checked here, value rules by the dataclass."""
    if not isinstance(raw, dict):
        raise ScenarioError("", section, f"must be a table, not {_toml_type(raw)}")
    known: dict[str, Field[Any]] = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise ScenarioError("", _key(section, key), f"unknown key; [{section}] takes {', '.join(known)}")
    values = {}
    for name, f in known.items():
        if name in raw:
            values[name] = _typed(raw[name], str(f.type), _key(section, name))
        elif f.default is MISSING:
            raise ScenarioError("", _key(section, name), f"required, and must be {f.metadata['rule']}")
    try:
        return cls(**values)
    except ScenarioError as exc:
        # FaultSpec's own checks say "faults.x"; the loader knows which entry it was.
        raise ScenarioError("", _key(section, exc.key.rpartition(".")[2]), exc.rule) from None


def _typed(value: object, type_name: str, key: str) -> Any:
    """``value`` as the field's type; TOML integers are fine where a number is asked, booleans never are."""
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, int | float) and not isinstance(value, bool),
          "bool": isinstance(value, bool),
          "str": isinstance(value, str)}[type_name]
    if not ok:
        raise ScenarioError("", key, f"must be {_TYPE_NAMES[type_name]}, not {_toml_type(value)} ({value!r})")
    return float(value) if type_name == "float" else value  # type: ignore[arg-type]


def _toml_type(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array",
             dict: "a table"}
    return names.get(type(value), type(value).__name__)
