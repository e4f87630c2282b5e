"""``python:MODULE:FACTORY``: a vendor's parent driver, written in Python, as a target.

The factory is any importable callable returning a
:class:`~vdpacert.impl.parent.VdpaParent`; the target string's attributes are its keyword
arguments (``python:acme.vdpa:make_parent:queues=4``). The parent is mounted behind the
reference vhost-vdpa front (:class:`~vdpacert.conformance.targets.embedded.FrontTarget`), so the
suite checks it through the same ioctls as a kernel device. The factory is called for every
open, so each example starts from a new instance; a factory that fronts hardware may return the
same instance each time and rely on the reset every open performs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from vdpacert.conformance.targets.embedded import FrontTarget

if TYPE_CHECKING:
    from vdpacert.conformance.targets.spec import TargetSpec
    from vdpacert.impl.guestmem import MemoryRegistry

__all__ = ["PythonParentTarget", "resolve_factory"]


def resolve_factory(spec: TargetSpec) -> Callable[..., object]:
    """Import ``spec.module`` and look up ``spec.factory`` (dotted: ``Class.create``); ValueError if absent."""
    try:
        found: object = importlib.import_module(spec.module)
    except ImportError as error:
        raise ValueError(f"target {spec}: cannot import module {spec.module!r}: {error}") from error
    for part in spec.factory.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise ValueError(f"target {spec}: {spec.module} has no {spec.factory!r}") from None
    if not callable(found):
        raise ValueError(f"target {spec}: {spec.module}.{spec.factory} is a {type(found).__name__}, not a factory")
    return found


class PythonParentTarget(FrontTarget):
    """A vendor parent from ``MODULE.FACTORY(**attrs)`` behind a fresh vhost-vdpa front per open."""

    def __init__(self, spec: TargetSpec, *, registry: MemoryRegistry | None = None) -> None:
        super().__init__(str(spec), "python", registry=registry)
        self._factory = resolve_factory(spec)
        self._attrs = dict(spec.attrs)
        self._open()

    def _new_parent(self) -> object:
        try:
            return self._factory(**self._attrs)
        except (TypeError, ValueError) as error:
            raise ValueError(f"target {self.name}: the factory refused {self._attrs}: {error}") from error
