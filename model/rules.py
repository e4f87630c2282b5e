"""One catalog of every rule the model encodes, gathered from the tables of each module.

Each module keeps its rules where they are used (the feature dependency rows in
:mod:`.features`, the status rules in :mod:`.status`, the bad-input table in :mod:`.chains`,
the ``RULES`` of the ring, config and device-type modules, ...);
this module only reads those tables, so the catalog can never list a rule the model does
not check, nor miss one it does. Rule ids are stable, dotted and lower-case after the area
prefix (``net.MQ.requires`` keeps the spec's feature name); reports and target quirks refer to them.
"""

from __future__ import annotations

import re
import types
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Protocol

from . import (
    blk,
    chains,
    config_space,
    features,
    iotlb,
    net,
    notify,
    status,
    vdpa_device,
    vhost_vdpa,
    vring_packed,
    vring_split,
)
from .spec import Citation, ErrnoRule, Level, Rule

RULE_ID: Final = re.compile(r"^[a-z0-9_]+(\.[A-Za-z0-9_]+)+$")


class _RuleRow(Protocol):
    @property
    def rule(self) -> str: ...

    @property
    def citation(self) -> Citation: ...


@dataclass(frozen=True)
class CatalogEntry:
    """One rule: its id, how binding it is (None for a MAY row), where it is written, what it says."""

    rule: str
    level: Level | None
    citation: Citation
    summary: str
    source: str  # the model module whose table holds the rule

    def __str__(self) -> str:
        level = "MAY" if self.level is None else str(self.level)
        return f"{self.rule} [{level}] {self.summary} ({self.citation})"


def _summary(row: object) -> str:
    for attribute in ("summary", "describe"):
        value = getattr(row, attribute, None)
        if callable(value):
            value = value()
        if isinstance(value, str):
            return value
    return ""


def _entries(source: str, rows: Iterable[_RuleRow]) -> list[CatalogEntry]:
    return [CatalogEntry(row.rule, getattr(row, "level", None), row.citation, _summary(row), source)
            for row in rows]


def _module_rules(module: types.ModuleType) -> list[ErrnoRule | Rule]:
    """The rule rows a module defines as module-level constants (ErrnoRule and Rule objects)."""
    return [value for value in vars(module).values() if isinstance(value, ErrnoRule | Rule)]


def catalog() -> tuple[CatalogEntry, ...]:
    """Every rule, in module order; ids are unique."""
    entries = [
        *_entries("features", features.RULES),
        *_entries("status", status.RULES),
        *_entries("chains", chains.DEVICE_OBLIGATIONS),
        *_entries("chains", chains.BAD_INPUTS.values()),
        *_entries("notify", notify.NOTIFY_RULES),
        *_entries("vring_split", vring_split.RULES),
        *_entries("vring_packed", vring_packed.RULES),
        *_entries("config_space", config_space.RULES),
        *_entries("net", net.RULES),
        *_entries("blk", blk.RULES),
    ]
    for module in (iotlb, vdpa_device, vhost_vdpa):
        entries += _entries(module.__name__.rsplit(".", 1)[-1], _module_rules(module))
    seen: set[str] = set()
    unique = []
    for entry in entries:
        if entry.rule not in seen:  # a module may re-export a rule another module defines
            seen.add(entry.rule)
            unique.append(entry)
    return tuple(unique)


def by_id() -> dict[str, CatalogEntry]:
    return {entry.rule: entry for entry in catalog()}
