"""Device configuration space: a layout as a table of fields, and the rules for accessing it.

A device type's configuration space is a packed little-endian structure (virtio v1.3 §2.5)
whose optional fields exist only when a feature bit says so. This module holds the generic
part: :class:`ConfigField` rows, a :class:`ConfigLayout` that renders field values to the
exact bytes a device must expose, decodes them back, and judges driver reads and writes.
The tables themselves live beside their device type (``net.NET_CONFIG_LAYOUT``,
``blk.BLK_CONFIG_LAYOUT``) so that each stays next to the section it mirrors.

Three states of a field, because the spec distinguishes them (§2.5.1, §2.5.2, §5.1.4):

- ``ABSENT``: the feature that makes it exist is not offered. The driver MUST NOT touch it
  (§2.5.1) and its bytes say nothing; a conformance check must not compare them.
- ``OFFERED``: the feature is offered but not (or not yet) negotiated. The device MUST let
  the driver read it, even before FEATURES_OK (§2.5.2), so its bytes are predictable; what
  they mean may still depend on negotiation (blk's discard limits are in 512-byte units
  only once DISCARD is negotiated, §5.2.4).
- ``NEGOTIATED``: the field exists and its value is in force.

Writes: a driver may only write a field its layout marks writable under a negotiated
feature (virtio-blk ``writeback`` with CONFIG_WCE, §5.2.5); virtio-net has no writable field
at all (§5.1.4.2). The reference device ignores every other write, so the model answers
"config unchanged" and names the driver rule that was broken.

Rules: reading an absent field breaks the same sentence for every device type (§2.5.1), so
:data:`READ_ABSENT_FIELD` is one device-independent rule. How binding "write only what is
writable" is differs per device type (net MUST, blk SHOULD), so each layout carries its own
:class:`ConfigWriteRules` (``net.config.driver_write.*``, ``blk.config.driver_write.*``), and a
field with rules of its own (blk ``writeback``) carries them on its row. ``ConfigLayout.rules``
lists a layout's rules; the device modules put them in their ``RULES``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from . import sections
from .spec import Citation, Level, LinuxSource, Rule, Section, SpecError, Violation

__all__ = [
    "READ_ABSENT_FIELD",
    "RULES",
    "VHOST_CONFIG_BOUNDS",
    "ConfigAccessError",
    "ConfigField",
    "ConfigLayout",
    "ConfigRead",
    "ConfigWrite",
    "ConfigWriteRules",
    "FieldValue",
    "Presence",
]

FieldValue = int | bytes

#: Where out-of-range config accesses are refused: the spec has no such rule, vhost-vdpa does.
VHOST_CONFIG_BOUNDS: Final = LinuxSource("drivers/vhost/vdpa.c", "vhost_vdpa_config_validate")

#: The one config rule that is the same for every device type (§2.5.1).
READ_ABSENT_FIELD: Final = Rule(
    "config.driver.read_absent_field", Level.MUST, sections.CONFIG_SPACE_DRIVER,
    "the driver must not access a field whose feature the device does not offer")

#: The device-independent config rules; each layout lists its own in ``ConfigLayout.rules``.
RULES: Final[tuple[Rule, ...]] = (READ_ABSENT_FIELD,)


class ConfigAccessError(SpecError, ValueError):
    """A config access or value the model cannot represent (outside the layout, wrong width)."""


class Presence(enum.Enum):
    """Whether a field exists for a given offered / negotiated feature pair (see module doc)."""

    ABSENT = "absent"
    OFFERED = "offered"
    NEGOTIATED = "negotiated"


@dataclass(frozen=True)
class ConfigField:
    """One field of a configuration layout.

    ``exists_if`` lists feature bits of which any one makes the field exist; empty means the
    field always exists. ``valid_if`` narrows when its *value* means something although the
    field exists (net ``mac`` always exists but is only valid with VIRTIO_NET_F_MAC, §5.1.4).
    ``writable_if`` is the feature bit under which the driver may write the field (None:
    read-only) and ``write_rule`` the device's duty to take such a write (set together).
    ``padding`` fields are reserved bytes the device must keep zero. ``allowed_writes``
    restricts the values a driver write may carry, and ``value_rule`` is the driver rule a
    write of another value breaks (set together). ``read_needs_features_ok`` is the driver
    rule a read before FEATURES_OK breaks, for the fields that have one (None: no such rule).
    """

    name: str
    offset: int
    size: int
    section: Section
    exists_if: tuple[int, ...] = ()
    valid_if: tuple[int, ...] = ()
    writable_if: int | None = None
    is_bytes: bool = False
    padding: bool = False
    allowed_writes: frozenset[int] | None = None
    read_needs_features_ok: Rule | None = None
    write_rule: Rule | None = None
    value_rule: Rule | None = None
    summary: str = ""

    def __post_init__(self) -> None:
        if (self.writable_if is None) != (self.write_rule is None):
            raise ConfigAccessError(f"{self.name}: a writable field names the rule its writes follow, "
                                    "a read-only one names none")
        if (self.allowed_writes is None) != (self.value_rule is None):
            raise ConfigAccessError(f"{self.name}: allowed_writes and value_rule go together")

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The rules of this field alone (most fields have none)."""
        return tuple(r for r in (self.read_needs_features_ok, self.value_rule, self.write_rule) if r is not None)

    @property
    def end(self) -> int:
        return self.offset + self.size

    def presence(self, offered: int, negotiated: int | None = None) -> Presence:
        """This field's state when the device offers ``offered`` and the driver accepted ``negotiated``."""
        if self.exists_if and not any(offered >> bit & 1 for bit in self.exists_if):
            return Presence.ABSENT
        if negotiated is None:
            return Presence.OFFERED
        wanted = self.valid_if or self.exists_if
        if wanted and not any(negotiated >> bit & 1 for bit in wanted):
            return Presence.OFFERED
        return Presence.NEGOTIATED

    def encode(self, value: FieldValue) -> bytes:
        """The little-endian bytes of ``value`` (§2.5: multi-byte fields are little-endian)."""
        if self.is_bytes:
            if not isinstance(value, (bytes, bytearray)) or len(value) != self.size:
                raise ConfigAccessError(f"{self.name} takes exactly {self.size} bytes, got {value!r}")
            return bytes(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigAccessError(f"{self.name} takes an integer, got {value!r}")
        if not 0 <= value < 1 << (8 * self.size):
            raise ConfigAccessError(f"{self.name} is {self.size} bytes wide; {value:#x} does not fit")
        if self.padding and value:
            raise ConfigAccessError(f"{self.name} is padding and must stay zero")
        return value.to_bytes(self.size, "little")

    def decode(self, raw: bytes) -> FieldValue:
        chunk = bytes(raw[self.offset:self.end])
        if len(chunk) != self.size:
            raise ConfigAccessError(f"{self.name} lies past the end of a {len(raw)}-byte config")
        return chunk if self.is_bytes else int.from_bytes(chunk, "little")


@dataclass(frozen=True)
class ConfigRead:
    """What a driver read returns: the bytes, the fields it touched, and the driver rules it broke."""

    data: bytes
    fields: tuple[str, ...]
    undefined_fields: tuple[str, ...]
    violations: tuple[Violation, ...]

    @property
    def fully_defined(self) -> bool:
        """True when every byte read is defined: a device must return exactly ``data``."""
        return not self.undefined_fields


@dataclass(frozen=True)
class ConfigWrite:
    """The device's answer to a driver write: whether it took effect and the config afterwards."""

    accepted: bool
    config_after: bytes
    violations: tuple[Violation, ...]
    rule: str
    citation: Citation


@dataclass(frozen=True)
class ConfigWriteRules:
    """The driver rules a refused config write breaks, for one device type.

    All three share a level and citation that depend on the device type: virtio-net forbids
    writing any field outright (MUST, §5.1.4.2); virtio-blk only defines ``writeback`` as
    writable (§5.2.5), so a write elsewhere is graded SHOULD.
    """

    unmapped: Rule  # the write hits no field at all
    read_only: Rule  # the field is read-only, or writable only under a feature not negotiated
    partial: Rule | None = None  # part of a writable field (None: no writable field is wider than a byte)

    def __iter__(self) -> Iterator[Rule]:
        return iter(r for r in (self.unmapped, self.read_only, self.partial) if r is not None)


@dataclass(frozen=True)
class ConfigLayout:
    """A device type's configuration structure: its fields, total size and rules for writes.

    ``write_rules`` are the driver rules a refused write breaks on this device type; their ids,
    like those of the fields' own rules, start with ``<device>.config.`` (checked here).
    """

    device: str
    size: int
    fields: tuple[ConfigField, ...]
    section: Section
    write_rules: ConfigWriteRules
    _by_name: Mapping[str, ConfigField] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name: dict[str, ConfigField] = {}
        cursor = 0
        for row in sorted(self.fields, key=lambda f: f.offset):
            if row.offset < cursor:
                raise ConfigAccessError(f"{self.device} layout: {row.name} overlaps the field before it")
            if row.name in by_name:
                raise ConfigAccessError(f"{self.device} layout: duplicate field {row.name}")
            by_name[row.name] = row
            cursor = row.end
        if cursor > self.size:
            raise ConfigAccessError(f"{self.device} layout: fields run to {cursor}, past size {self.size}")
        object.__setattr__(self, "_by_name", MappingProxyType(by_name))
        if self.write_rules.partial is None and any(f.writable_if is not None and f.size > 1 for f in self.fields):
            raise ConfigAccessError(f"{self.device} layout: a writable field wider than a byte needs a rule "
                                    "for partial writes")
        for rule in self.rules:
            if not rule.rule.startswith(f"{self.device}.config."):
                raise ConfigAccessError(f"{self.device} layout: rule {rule.rule} is not a {self.device}.config rule")

    @property
    def rules(self) -> tuple[Rule, ...]:
        """This device type's config rules: its write rules, then the fields' own, in offset order."""
        return (*self.write_rules, *(r for f in sorted(self.fields, key=lambda f: f.offset) for r in f.rules))

    # -- the table -------------------------------------------------------------------------
    def field(self, name: str) -> ConfigField:
        try:
            return self._by_name[name]
        except KeyError:
            raise ConfigAccessError(f"the {self.device} config has no field {name!r}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def fields_at(self, offset: int, length: int) -> tuple[ConfigField, ...]:
        """The fields overlapping bytes ``[offset, offset + length)``."""
        end = offset + length
        return tuple(f for f in self._by_name.values() if f.offset < end and offset < f.end)

    def presence(self, name: str, offered: int, negotiated: int | None = None) -> Presence:
        return self.field(name).presence(offered, negotiated)

    # -- rendering -------------------------------------------------------------------------
    def render(self, values: Mapping[str, FieldValue], *, offered: int | None = None) -> bytes:
        """The config bytes a device with these field values exposes (unnamed fields are zero).

        With ``offered`` given, values for fields that do not exist are refused: a device that
        does not offer a feature has no business advertising the field it governs.
        """
        raw = bytearray(self.size)
        for name, value in values.items():
            row = self.field(name)
            if offered is not None and row.presence(offered) is Presence.ABSENT and value:
                raise ConfigAccessError(f"{name} does not exist unless one of bits {row.exists_if} "
                                        "is offered")
            raw[row.offset:row.end] = row.encode(value)
        return bytes(raw)

    def decode(self, raw: bytes) -> dict[str, FieldValue]:
        """Every field that ``raw`` is long enough to hold, by name."""
        return {f.name: f.decode(raw) for f in self._by_name.values() if f.end <= len(raw)}

    # -- access rules ----------------------------------------------------------------------
    def _check_range(self, config: bytes, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > len(config):
            raise ConfigAccessError(
                f"access [{offset}, {offset + length}) outside the {len(config)}-byte {self.device} config "
                f"(refused before reaching the device: {VHOST_CONFIG_BOUNDS})"
            )

    def read(self, config: bytes, offset: int, length: int, *, offered: int,
             negotiated: int | None = None, features_ok: bool = True) -> ConfigRead:
        """A driver read of ``length`` bytes at ``offset`` from a device exposing ``config``.

        Reads inside the config always return its bytes (§2.5.2: the device must allow reading
        any field, even before FEATURES_OK). Bytes of absent fields are reported as
        undefined, and reading them is a driver MUST violation (§2.5.1).
        """
        self._check_range(config, offset, length)
        touched = self.fields_at(offset, length)
        undefined = []
        found = []
        for row in touched:
            if row.padding:
                continue
            if row.presence(offered, negotiated) is Presence.ABSENT:
                undefined.append(row.name)
                found.append(READ_ABSENT_FIELD.violation(
                    f"driver read {row.name}, which does not exist without one of feature bits "
                    f"{row.exists_if}"))
            if row.read_needs_features_ok is not None and not features_ok:
                found.append(row.read_needs_features_ok.violation(f"driver read {row.name} before setting FEATURES_OK"))
        return ConfigRead(bytes(config[offset:offset + length]), tuple(r.name for r in touched),
                          tuple(undefined), tuple(found))

    def write(self, config: bytes, offset: int, data: bytes, *, negotiated: int) -> ConfigWrite:
        """A driver write of ``data`` at ``offset``: accepted only onto writable fields, whole.

        The write must cover whole fields that are writable under ``negotiated`` and carry
        allowed values; otherwise the reference device ignores it (config unchanged) and the
        model names the driver rule that was broken.
        """
        self._check_range(config, offset, len(data))
        touched = self.fields_at(offset, len(data))
        problems: list[Violation] = []
        rules = self.write_rules
        if not touched:
            problems.append(rules.unmapped.violation(f"write to [{offset}, {offset + len(data)}) hits no field"))
        for row in touched:
            if row.writable_if is None or not negotiated >> row.writable_if & 1:
                why = "is read-only" if row.writable_if is None else f"needs feature bit {row.writable_if}"
                problems.append(rules.read_only.violation(f"driver wrote {row.name}, which {why}"))
            elif rules.partial is not None and (row.offset < offset or row.end > offset + len(data)):
                problems.append(rules.partial.violation(f"driver wrote part of {row.name}"))
            elif row.allowed_writes is not None and row.value_rule is not None:
                value = row.decode(bytes(config[:offset]) + bytes(data) + bytes(config[offset + len(data):]))
                if value not in row.allowed_writes:
                    problems.append(row.value_rule.violation(
                        f"driver wrote {value!r} to {row.name}; defined values are {sorted(row.allowed_writes)}"))
        if problems:
            return ConfigWrite(False, bytes(config), tuple(problems), problems[0].rule, problems[0].citation)
        after = bytes(config[:offset]) + bytes(data) + bytes(config[offset + len(data):])
        # Every touched field is writable here, so each has a write rule; the first one decides.
        accepted = touched[0].write_rule
        assert accepted is not None
        return ConfigWrite(True, after, (), accepted.rule, accepted.citation)


def build_layout(device: str, size: int, section: Section, rows: Iterable[ConfigField], *,
                 write_rules: ConfigWriteRules) -> ConfigLayout:
    """Build and self-check a layout (overlaps, overruns and misnamed rules are refused at import time)."""
    return ConfigLayout(device, size, tuple(rows), section, write_rules)
