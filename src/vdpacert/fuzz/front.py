"""The vhost-vdpa front both control-path fuzzers drive, and the model that judges it.

A :class:`FrontSession` is one reference device behind :class:`~vdpacert.impl.vhost_vdpa.VhostVdpa`,
held by a :class:`~vdpacert.conformance.lockstep.Lockstep` so every answer is compared with
:class:`~vdpacert.model.vhost_vdpa.VhostVdpaModel` by the suite's own comparison code (no second
oracle to drift from the first). It is built once per process (:meth:`FrontSession.__init__`
probes the device and builds the model's spec); :meth:`FrontSession.fresh` starts each input
from a new open of a new device, so an input's outcome never depends on the inputs before it
(a fuzzer that cannot replay a crash is of little use) at about 70 us per input.

Two facts the ioctl interface cannot report are filled in from the parent the session built,
because the model must know them to predict the answers: which map op the front uses (it
prefers ``dma_map``, as Linux does, so an UPDATE inside a batch reaches the device at once) and
how many entries an address space holds (the device's ``max_iotlb_entries``, ENOSPC past it).

Memory: the session resolves user addresses in a registry of its own, holding only the memory
it made, so any other address is unbacked on both sides whatever else the process has mapped.
"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

from vdpacert.conformance.lockstep import ClauseViolation, Lockstep
from vdpacert.conformance.observe import Outcome, Value, probe_spec
from vdpacert.conformance.profiles import REFERENCE_FRONT_QUIRKS
from vdpacert.conformance.targets.base import Target
from vdpacert.fuzz.base import InvariantBroken
from vdpacert.impl.guestmem import GuestMemory, MemoryRegistry
from vdpacert.impl.parent import VdpaParent, has_op
from vdpacert.impl.sim_blk import SimBlk
from vdpacert.impl.sim_device import SimDevice
from vdpacert.impl.sim_net import SimNet
from vdpacert.impl.vhost_vdpa import VhostVdpa

if TYPE_CHECKING:
    from vdpacert.conformance.client import Channel
    from vdpacert.impl.iotlb import Iotlb

__all__ = ["MEMORY_SIZE", "FrontSession", "FuzzTarget", "ParentFactory", "default_factory", "dma_map_only",
           "with_iotlb_limit"]

#: Guest memory each input maps from (the only user addresses that are backed).
MEMORY_SIZE = 0x10000

ParentFactory = Callable[[], VdpaParent]
#: An entry of an address space as the front and the parent list it: (start, last, uaddr, perm).
Entry = tuple[int, int, int, int]
Mappings = tuple[tuple[int, tuple[Entry, ...]], ...]


def with_iotlb_limit(cls: type[SimDevice], entries: int) -> type[SimDevice]:
    """``cls`` whose address spaces hold at most ``entries`` mappings.

    SimDevice takes ``max_iotlb_entries`` but SimNet and SimBlk do not pass it on; a class placed
    between them and SimDevice in the method resolution order supplies it, so a short fuzz input can
    reach the limit (2048 by default) without a subclass per device type.
    """

    class _Limit(SimDevice):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("max_iotlb_entries", entries)
            super().__init__(*args, **kwargs)

    return cast("type[SimDevice]", type(f"{cls.__name__}Iotlb{entries}", (cls, _Limit), {}))


def dma_map_only(cls: type[SimDevice]) -> type[SimDevice]:
    """``cls`` without its ``set_map``: a parent with one map op, as vdpa.h asks (``vdpa_device.map_op``).

    SimDevice implements both ``dma_map`` and ``set_map``, and the front then mixes them as Linux's
    vhost-vdpa would (UPDATE through dma_map, the whole map again through set_map after an
    INVALIDATE and at BATCH_END), which no single map op of the model predicts: after a reset that
    cleaned the device's maps, an INVALIDATE hands the device every stale entry of the front's own
    record again. Until the device keeps to one op, the fuzzers drive it with dma_map alone.
    """
    return cast("type[SimDevice]", type(f"{cls.__name__}DmaMap", (cls,), {"set_map": VdpaParent.set_map}))


def default_factory(kind: str, iotlb_limit: int | None) -> ParentFactory:
    """The reference device of ``kind`` (sim-net / sim-blk) with one map op (:func:`dma_map_only`), with
    ``iotlb_limit`` entries per address space."""
    classes: dict[str, type[SimDevice]] = {"sim-net": SimNet, "sim-blk": SimBlk}
    cls = classes[kind]
    if iotlb_limit is not None:
        cls = with_iotlb_limit(cls, iotlb_limit)
    make: Callable[[str], VdpaParent] = dma_map_only(cls)
    return lambda: make("vdpa0")


class FuzzTarget(Target):
    """A parent from ``parent_factory`` behind a fresh ``front_class`` per open, over a private registry.

    ``kind`` names the reference profile the model applies (the declared quirks are those of the
    reference front, as for sim-net and sim-blk); ``front_class`` lets a test seed a bug in the front.
    """

    def __init__(self, kind: str, parent_factory: ParentFactory, *,
                 front_class: type[VhostVdpa] = VhostVdpa) -> None:
        super().__init__(f"fuzz:{kind}", kind)
        self.declared_quirks = frozenset(REFERENCE_FRONT_QUIRKS)
        self._factory = parent_factory
        self._front_class = front_class
        self.registry = MemoryRegistry()
        self.front: VhostVdpa | None = None
        self._open()

    def _open_channel(self) -> Channel:
        self.front = self._front_class(self._factory(), self.registry)
        return self.front

    def _make_memory(self, size: int, gpa: int) -> GuestMemory:
        memory = GuestMemory(size, gpa, register=False)
        self.registry.add(memory)
        return memory


def _typed(invariant: str, call: Callable[[], Value]) -> Callable[[], Value]:
    """``call`` with every escape but an OSError carrying a Linux errno turned into InvariantBroken."""

    def run() -> Value:
        try:
            return call()
        except OSError as error:
            if error.errno not in errno.errorcode:
                raise InvariantBroken(invariant, f"OSError without a Linux errno: {error!r}") from error
            raise
        except InvariantBroken:
            raise
        except Exception as error:
            raise InvariantBroken(invariant, f"{type(error).__name__} escaped the front: {error}") from error

    return run


class FrontSession:
    """One device kind behind the front, with its lockstep model (see the module docstring)."""

    def __init__(self, kind: str = "sim-net", *, parent_factory: ParentFactory | None = None,
                 front_class: type[VhostVdpa] = VhostVdpa, iotlb_limit: int | None = None) -> None:
        factory = parent_factory if parent_factory is not None else default_factory(kind, iotlb_limit)
        self.target = FuzzTarget(kind, factory, front_class=front_class)
        spec = probe_spec(self.target)
        parent = self.front.parent
        if has_op(parent, "dma_map") and has_op(parent, "set_map"):
            raise ValueError(f"{type(parent).__name__} implements both dma_map and set_map; give it one "
                             "(dma_map_only) so the model can predict what the device maps")
        if isinstance(parent, SimDevice):
            spec = replace(spec, iotlb_limit=parent.max_iotlb_entries,
                           map_op="dma_map" if has_op(parent, "dma_map") else spec.map_op)
        self.ls = Lockstep(self.target, spec=spec)
        #: What inputs reached: message types, request kinds, answers (errno names), per invariant family.
        self.reached: Counter[str] = Counter()
        self.inputs = 0
        self.memory: GuestMemory | None = None
        self.efd = -1

    @property
    def front(self) -> VhostVdpa:
        front = self.target.front
        assert front is not None
        return front

    @property
    def mem(self) -> GuestMemory:
        assert self.memory is not None
        return self.memory

    def fresh(self) -> None:
        """A new open of a new device, a fresh model, new memory and an eventfd: the start of every input."""
        self.ls.reopen()
        self.memory = self.ls.new_memory(MEMORY_SIZE)
        self.efd = self.ls.eventfd()
        self.inputs += 1

    def close(self) -> None:
        self.target.close()

    # ----- compared operations ------------------------------------------------------------------

    def compare(self, invariant: str, name: str, model_call: Callable[[], object],
                target_call: Callable[[], Value], *, typed: str) -> Outcome:
        """One operation on both sides through :meth:`Lockstep.op`; a disagreement is ``invariant`` broken,
        an untyped escape from the front ``typed`` broken."""
        try:
            return self.ls.op(name, model_call, _typed(typed, target_call))[1]
        except ClauseViolation as violation:
            raise InvariantBroken(invariant, str(violation)) from violation

    def lockstep(self, invariant: str, step: Callable[[], None], *, typed: str) -> None:
        """A Lockstep operation with latitude (set_status, set_features ...): disagreement is ``invariant``,
        an exception other than the compared OSError escaping the front (through the client) is ``typed``."""
        try:
            step()
        except ClauseViolation as violation:
            raise InvariantBroken(invariant, str(violation)) from violation
        except InvariantBroken:
            raise
        except Exception as error:
            raise InvariantBroken(typed, f"{type(error).__name__} escaped the front: {error}") from error

    def note(self, what: str, outcome: Outcome) -> None:
        self.reached[what] += 1
        self.reached[f"{what} -> {'ok' if outcome.ok else errno.errorcode.get(outcome.errno or 0, '?')}"] += 1

    # ----- what the front and the device hold ----------------------------------------------------

    def front_mappings(self) -> Mappings:
        """The front's address spaces with at least one entry (an empty record is allocation, not mapping)."""
        return tuple((asid, tuple(entries)) for asid, entries in self.front.address_spaces().items() if entries)

    def device_mappings(self) -> Mappings | None:
        """What the device translates with, where the parent lets it be read (SimDevice.address_space)."""
        parent = self.front.parent
        if not isinstance(parent, SimDevice):
            return None
        spaces: list[Iotlb] = [parent.address_space(asid) for asid in range(parent.nas)]
        return tuple((asid, tuple(space.entries())) for asid, space in enumerate(spaces))

    def model_mappings(self) -> tuple[Mappings, Mappings]:
        """(the model's vhost-vdpa record with entries, the model's device maps), in the front's shapes."""
        model = self.ls.model
        books = ((asid, model.address_space(asid)) for asid in range(self.ls.spec.nas))
        front = tuple((asid, tuple((m.start, m.last, m.uaddr, m.perm) for m in book.maps))
                      for asid, book in books if book is not None and len(book))
        device = tuple((asid, tuple((m.start, m.last, m.uaddr, m.perm) for m in model.device.iotlb(asid).maps))
                       for asid in range(self.ls.spec.nas))
        return front, device

    def observables(self) -> tuple[object, ...]:
        """Everything a refused request must leave alone, read from the front and through the parent's ops:
        status, driver and backend features, config, ownership, suspension, each vring's size, addresses,
        readiness, position and group, the front's mappings and the device's."""
        front = self.front
        parent = front.parent
        vqs: list[object] = []
        for index in range(parent.nvqs):
            state: object = parent.get_vq_state(index)
            group = parent.get_vq_group(index) if has_op(parent, "get_vq_group") else None
            if isinstance(parent, SimDevice):
                cfg = parent.vq_config(index)
                config: tuple[object, ...] = (cfg.num, cfg.desc_area, cfg.driver_area, cfg.device_area, cfg.ready,
                                              cfg.log_used, cfg.log_guest_addr)
            else:
                config = (parent.get_vq_ready(index),)
            vqs.append((state, group, config))  # frozen dataclasses: compared by value
        config_space = bytes(parent.get_config(0, parent.get_config_size()))
        return (parent.get_status(), parent.get_driver_features(), config_space, front.owner,
                front.acked_backend_features, front.suspended, front.in_batch, tuple(vqs),
                self.front_mappings(), self.device_mappings())
