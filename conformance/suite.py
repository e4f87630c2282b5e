"""The suite registry: which state machines a run executes, and on which devices.

A :class:`SuiteEntry` names one Hypothesis state machine and how to bind it to a target. The
contract every machine module follows:

* ``build(target, run_profile)`` returns a ``RuleBasedStateMachine`` *class* bound to that open
  target (Hypothesis makes a fresh instance per example and passes no constructor arguments, so
  the target travels in the closure or a class attribute);
* an instance exposes ``exercised: collections.Counter[str]``, how often *this example* checked
  each clause id (a fresh Counter per instance: the runner adds every instance's counts to the
  recorder after the example, so a counter shared between instances would be counted again and again);
* an instance may also expose ``quirks: collections.Counter[tuple[str, str]]``: (clause id, quirk
  name) -> how often this example saw the target answer as a quirk its profile declares predicts
  (the lockstep machines predict the declared quirks' answers, so a quirk never shows as a failure);
* and ``warned: list[tuple[str, str]]``: (clause id, message) of each SHOULD deviation this example
  noted without stopping (a warning that stops the example is raised like a failure instead);
* a clause failure is an exception carrying ``.clause`` (or ``.clause_id``: a clause id or a
  :class:`~vdpacert.conformance.clauses.Clause`) and a message. Any other exception is a crash of
  the machine, not a verdict (a dying target is ``TargetDied``, which the runner files under
  ``suite.target.alive``).

Suite modules register their entries when imported (:func:`register`). A run imports the
built-in suite (:data:`BUILTIN_MODULES`) unless it names its own modules (``--vdpa-suite``,
``vdpacert certify --suite``): that is how a vendor adds machines of their own, and how the
project's tests run a small suite. The registry is per process; every pytest-xdist worker
imports the same modules, so every worker sees the same entries in the same order.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from hypothesis.stateful import RuleBasedStateMachine

    from vdpacert.conformance.profiles import RunProfile
    from vdpacert.conformance.targets import Target

__all__ = ["BUILTIN_MODULES", "SuiteEntry", "entries", "entries_for", "entry", "load", "register", "unregister"]

#: The modules of the built-in suite; each registers its entries when imported.
BUILTIN_MODULES: Final[tuple[str, ...]] = ("vdpacert.conformance.machines.entries",)

MachineBuilder = Callable[["Target", "RunProfile"], "type[RuleBasedStateMachine]"]


@dataclass(frozen=True)
class SuiteEntry:
    """One machine of the suite. ``device_ids`` None: it runs on every device type.

    ``name`` is stable: it is the pytest parameter id, the Hypothesis database key and what a
    replay file names to rebuild the machine, so renaming an entry forgets its saved examples.
    """

    name: str
    device_ids: frozenset[int] | None
    build: MachineBuilder

    def __post_init__(self) -> None:
        if not self.name or not all(part.isidentifier() for part in self.name.replace("-", "_").split(".")):
            raise ValueError(f"suite entry name {self.name!r} must be dotted identifiers (dashes allowed)")

    def runs_on(self, device_id: int) -> bool:
        return self.device_ids is None or device_id in self.device_ids


_REGISTRY: dict[str, SuiteEntry] = {}
_LOADED: set[str] = set()


def register(suite_entry: SuiteEntry) -> SuiteEntry:
    """Add an entry (idempotent for the same entry; a different one under a taken name is an error)."""
    present = _REGISTRY.get(suite_entry.name)
    if present is not None and present != suite_entry:
        raise ValueError(f"suite entry {suite_entry.name!r} is already registered by {present.build!r}")
    _REGISTRY[suite_entry.name] = suite_entry
    return suite_entry


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def load(modules: Iterable[str] | None = None) -> tuple[SuiteEntry, ...]:
    """Import the suite modules (None: :data:`BUILTIN_MODULES`) and return every registered entry.

    ImportError names the module that could not be imported, so a typo in ``--vdpa-suite`` is
    reported as such rather than as an empty suite.
    """
    for module in BUILTIN_MODULES if modules is None else modules:
        if module in _LOADED:
            continue
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ImportError(f"cannot import suite module {module!r}: {error}") from error
        _LOADED.add(module)
    return entries()


def entries() -> tuple[SuiteEntry, ...]:
    """Every registered entry, by name (a stable order for parametrising and sharding)."""
    return tuple(_REGISTRY[name] for name in sorted(_REGISTRY))


def entries_for(device_id: int) -> tuple[SuiteEntry, ...]:
    """The registered entries that run on a device of type ``device_id``."""
    return tuple(e for e in entries() if e.runs_on(device_id))


def entry(name: str) -> SuiteEntry:
    """The entry ``name``; KeyError listing the registered names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no suite entry {name!r}; registered: {', '.join(sorted(_REGISTRY)) or 'none'}") from None
