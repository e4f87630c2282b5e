"""Run profiles (how hard to search) and target profiles (which deviations a target declares).

A **run profile** sizes a run: ``quick`` is what CI and the mutant table run, ``full`` is what a
release certification runs. Both switch Hypothesis's per-example deadline off, because a step's
duration depends on the target (a real device under TCG is slow), not on the code under test.

A **target profile** is the honest part of a certification: it declares the target's known
deviations as named quirks, one per clause. A check that fails on a clause the profile declares is
reported as a *quirk* with the quirk's name, never as a pass and never silently skipped. The
built-in ``linux-vdpa-sim`` profile lists the Linux deviations the model documents
(:data:`vdpacert.model.quirks.QUIRKS`); a vendor writes a TOML file for their own::

    name = "acme-dpu"
    description = "ACME DPU firmware 4.2 behind Linux vhost-vdpa"
    base = "linux-vhost-vdpa"                          # optional: start from a built-in profile
    quirks = ["vhost_vdpa.iotlb_perm_unchecked"]       # known quirks, by name
    [[quirk]]                                          # the vendor's own, one table each
    name = "acme.event_idx_ignored"
    clause = "notify.split.used.event_idx.event_not_passed"
    description = "notifies on every used buffer whatever used_event says"
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from vdpacert.model.quirks import QUIRKS, Quirk

from . import clauses

__all__ = [
    "AUTO",
    "DEFAULT_TARGET_PROFILES",
    "REFERENCE_FRONT_QUIRKS",
    "RUN_PROFILES",
    "TARGET_PROFILES",
    "ProfileError",
    "RunProfile",
    "TargetProfile",
    "TargetQuirk",
    "load_target_profile",
    "run_profile",
    "target_profile",
]


class ProfileError(ValueError):
    """A profile that cannot be used: unknown name, bad TOML, unknown quirk or clause."""


# ----- run profiles ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunProfile:
    """How much searching a run does: Hypothesis sizes and a wall-clock budget for the whole run.

    ``time_budget_s`` is the budget of the whole run, for the runner to stop drawing new examples
    once it is spent; Hypothesis's own per-example ``deadline`` is always None (see the module doc).
    """

    name: str
    description: str
    max_examples: int
    stateful_step_count: int
    time_budget_s: float
    deadline: None = None

    def settings_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``hypothesis.settings`` (kept plain so this module needs no Hypothesis)."""
        return {"max_examples": self.max_examples, "stateful_step_count": self.stateful_step_count,
                "deadline": self.deadline}

    def with_examples(self, max_examples: int) -> RunProfile:
        """The same profile with ``--examples`` overriding the number of examples."""
        if max_examples < 1:
            raise ProfileError(f"max_examples must be at least 1, not {max_examples}")
        return RunProfile(self.name, self.description, max_examples, self.stateful_step_count, self.time_budget_s)


RUN_PROFILES: Final[Mapping[str, RunProfile]] = MappingProxyType({
    "quick": RunProfile("quick", "CI and the mutant table: a short search that still reaches every clause",
                        max_examples=25, stateful_step_count=30, time_budget_s=120.0),
    "full": RunProfile("full", "release certification: a long search with long operation sequences",
                       max_examples=500, stateful_step_count=100, time_budget_s=3600.0),
})


def run_profile(name: str) -> RunProfile:
    try:
        return RUN_PROFILES[name]
    except KeyError:
        raise ProfileError(f"no run profile {name!r}; choose one of {', '.join(RUN_PROFILES)}") from None


# ----- target profiles -------------------------------------------------------------------------

#: A quirk name: dotted, lower case, like the registry's ``vdpa_sim.used_idx_reset_on_ready``.
QUIRK_NAME: Final = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)+$")


@dataclass(frozen=True)
class TargetQuirk:
    """A deviation a target declares: its name, the clause it breaks, what it does instead, and who says so.

    ``origin`` is ``vdpacert.model.quirks`` for a quirk of the built-in registry, else the file the
    profile came from; ``reference`` is where the behaviour is defined (a Linux function), if known.
    """

    name: str
    clause: str
    description: str
    origin: str
    reference: str = ""

    @classmethod
    def from_registry(cls, quirk: Quirk) -> TargetQuirk:
        return cls(quirk.name, quirk.rule, quirk.linux_does, "vdpacert.model.quirks", str(quirk.linux_source))


@dataclass(frozen=True)
class TargetProfile:
    """What a target is known to do differently: at most one named quirk per clause."""

    name: str
    description: str
    quirks: tuple[TargetQuirk, ...] = ()
    _by_clause: Mapping[str, TargetQuirk] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_clause: dict[str, TargetQuirk] = {}
        names: set[str] = set()
        for quirk in self.quirks:
            if not QUIRK_NAME.match(quirk.name):
                raise ProfileError(f"profile {self.name}: quirk name {quirk.name!r} is not a dotted lower-case "
                                   "name such as 'vendor.what_it_does'")
            if quirk.name in names:
                raise ProfileError(f"profile {self.name}: quirk {quirk.name} is declared twice")
            names.add(quirk.name)
            try:
                clauses.clause(quirk.clause)
            except KeyError as error:
                raise ProfileError(f"profile {self.name}: quirk {quirk.name}: {error}") from None
            other = by_clause.get(quirk.clause)
            if other is not None:
                raise ProfileError(f"profile {self.name}: quirks {other.name} and {quirk.name} both excuse clause "
                                   f"{quirk.clause}; a clause takes one named quirk")
            by_clause[quirk.clause] = quirk
        object.__setattr__(self, "_by_clause", MappingProxyType(by_clause))

    def quirk_for(self, clause_id: str) -> TargetQuirk | None:
        """The declared quirk that excuses a failure of ``clause_id``, or None."""
        return self._by_clause.get(clause_id)

    def quirk_named(self, name: str) -> TargetQuirk:
        for quirk in self.quirks:
            if quirk.name == name:
                return quirk
        raise ProfileError(f"profile {self.name} declares no quirk {name!r}")


def _registry(names: Iterable[str]) -> tuple[TargetQuirk, ...]:
    return tuple(TargetQuirk.from_registry(QUIRKS[name]) for name in names)


def _registry_prefixed(*prefixes: str) -> tuple[TargetQuirk, ...]:
    return _registry(name for name in QUIRKS if name.startswith(prefixes))


#: The checks Linux's vhost-vdpa front leaves out and the reference front (``impl/vhost_vdpa.py``) leaves out too,
#: on purpose: a parent driver certified behind the reference front meets the front it will meet in Linux.
REFERENCE_FRONT_QUIRKS: Final = ("vhost_vdpa.vring_num_bounds_unchecked", "vhost_vdpa.invalidate_range_unchecked")

TARGET_PROFILES: Final[Mapping[str, TargetProfile]] = MappingProxyType({
    "strict": TargetProfile("strict", "no declared deviation: every failure is a failure"),
    "reference": TargetProfile(
        "reference", "the embedded reference front (sim-net, sim-blk, python: parents): Linux vhost-vdpa's checks "
        "and no more, so the two checks the Linux front leaves out are declared", _registry(REFERENCE_FRONT_QUIRKS)),
    "linux-vhost-vdpa": TargetProfile(
        "linux-vhost-vdpa", "a hardware parent behind Linux's vhost-vdpa char device: the front's own quirks",
        _registry_prefixed("vhost_vdpa.", "vdpa.")),
    "linux-vdpa-sim": TargetProfile(
        "linux-vdpa-sim", "Linux vdpa_sim behind vhost-vdpa: every deviation the model documents",
        _registry(QUIRKS)),
})


def _known_quirk(name: object, source: str) -> TargetQuirk:
    if not isinstance(name, str) or name not in QUIRKS:
        close = difflib.get_close_matches(str(name), QUIRKS, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"known quirks: {', '.join(sorted(QUIRKS))}"
        raise ProfileError(f"{source}: unknown quirk {name!r} in 'quirks' ({hint}); "
                           "declare a quirk of your own in a [[quirk]] table with name, clause and description")
    return TargetQuirk.from_registry(QUIRKS[name])


_TOP_KEYS: Final = frozenset({"name", "description", "base", "quirks", "quirk"})
_QUIRK_KEYS: Final = frozenset({"name", "clause", "description", "reference"})


def _string(table: Mapping[str, object], key: str, source: str, *, required: bool = True) -> str:
    value = table.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise ProfileError(f"{source}: {key!r} must be a non-empty string, not {value!r}")
    return value


def _own_quirk(table: object, source: str) -> TargetQuirk:
    if not isinstance(table, dict):
        raise ProfileError(f"{source}: each [[quirk]] must be a table")
    unknown = set(table) - _QUIRK_KEYS
    if unknown:
        raise ProfileError(f"{source}: [[quirk]] has unknown keys {sorted(unknown)}; allowed: {sorted(_QUIRK_KEYS)}")
    name = _string(table, "name", source)
    if name in QUIRKS:
        raise ProfileError(f"{source}: quirk {name!r} is a known quirk; list it in 'quirks' instead of redefining it")
    if not QUIRK_NAME.match(name):
        raise ProfileError(f"{source}: quirk name {name!r} is not a dotted lower-case name such as "
                           "'vendor.what_it_does'")
    clause_id = _string(table, "clause", source)
    try:
        clauses.clause(clause_id)
    except KeyError as error:
        raise ProfileError(f"{source}: quirk {name}: {error}") from None
    return TargetQuirk(name, clause_id, _string(table, "description", source), source,
                       _string(table, "reference", source, required=False))


def parse_target_profile(data: Mapping[str, Any], source: str) -> TargetProfile:
    """A profile from parsed TOML (``source`` names the file in every error)."""
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ProfileError(f"{source}: unknown keys {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    name = _string(data, "name", source)
    quirks: list[TargetQuirk] = []
    if "base" in data:
        quirks += target_profile(_string(data, "base", source)).quirks
    listed = data.get("quirks", [])
    if not isinstance(listed, list):
        raise ProfileError(f"{source}: 'quirks' must be a list of quirk names")
    quirks += [_known_quirk(item, source) for item in listed]
    own = data.get("quirk", [])
    if not isinstance(own, list):
        raise ProfileError(f"{source}: declare your own quirks as [[quirk]] tables")
    quirks += [_own_quirk(table, source) for table in own]
    unique: dict[str, TargetQuirk] = {}
    for quirk in quirks:  # a base profile and the list may name the same known quirk
        unique.setdefault(quirk.name, quirk)
    try:
        return TargetProfile(name, _string(data, "description", source, required=False), tuple(unique.values()))
    except ProfileError as error:
        raise ProfileError(f"{source}: {error}") from None


def load_target_profile(path: str | Path) -> TargetProfile:
    """Read a target profile from a TOML file; :class:`ProfileError` says what is wrong and where."""
    try:  # by name: Python 3.11+ has tomllib, and the package still declares 3.10 for everything else
        tomllib = importlib.import_module("tomllib")
    except ImportError:
        raise ProfileError(f"reading {path} needs Python 3.11 or later (tomllib)") from None
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ProfileError(f"cannot read target profile {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ProfileError(f"{path}: not valid TOML: {error}") from None
    return parse_target_profile(data, str(path))


#: The profile name that picks a target's profile from its kind (:data:`DEFAULT_TARGET_PROFILES`).
AUTO: Final = "auto"
#: What ``auto`` means for each kind of target: the deviations the front in front of the device is known to have.
DEFAULT_TARGET_PROFILES: Final[Mapping[str, str]] = MappingProxyType({
    "sim-net": "reference", "sim-blk": "reference", "python": "reference", "vhost-vdpa": "linux-vhost-vdpa",
})


def target_profile(name_or_path: str, *, kind: str | None = None) -> TargetProfile:
    """A built-in target profile by name, or one loaded from a ``.toml`` file.

    ``auto`` resolves by the target's ``kind`` (:data:`DEFAULT_TARGET_PROFILES`); without a kind it is an error.
    """
    if name_or_path == AUTO:
        if kind is None or kind not in DEFAULT_TARGET_PROFILES:
            raise ProfileError(f"target profile 'auto' needs a known target kind, not {kind!r}")
        return TARGET_PROFILES[DEFAULT_TARGET_PROFILES[kind]]
    if name_or_path in TARGET_PROFILES:
        return TARGET_PROFILES[name_or_path]
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        return load_target_profile(name_or_path)
    raise ProfileError(f"no target profile {name_or_path!r}; built in: {AUTO}, {', '.join(TARGET_PROFILES)}, "
                       "or give the path of a .toml file")
