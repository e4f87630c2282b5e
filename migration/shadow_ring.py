"""The shadow ring: the driver-side virtqueue a shadow virtqueue writes toward the device, in VMM memory.

A shadow virtqueue (:mod:`vdpacert.migration.svq`) stands between the guest's ring and a device
that cannot log dirty pages. The device is given this ring instead of the guest's: it lives in
VMM memory (never guest memory, so nothing here is ever marked dirty), has the guest ring's size
and layout (the device negotiated the guest's features, RING_PACKED included) and carries the
guest's buffer addresses unchanged, since guest buffers stay where they are and are mapped in the
device's IOTLB at the guest's IOVAs.

The rings themselves are the model's conforming drivers (:class:`~vdpacert.model.vring_split.SplitDriver`,
:class:`~vdpacert.model.vring_packed.PackedDriver`) over a VMM :class:`GuestLayout`, so the descriptor
writes, the publish order and the kick decision are the spec's as the model states them, not a
second copy of them. :class:`LayoutMemory` and :class:`LayoutTranslator` present a layout to the
model (model addresses are IOVAs, translation is the identity over the layout's IOVA range); the
shadow virtqueue reads the guest's ring through the same pair.

Indirect chains are forwarded as indirect chains, their tables copied into VMM memory (see
:meth:`ShadowRing.add` for why). The device's notification suppression is honoured: the device is
kicked only when the model says it asked to be (QEMU's shadow virtqueue does the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar

from vdpacert.conformance.driver.memory import GuestLayout
from vdpacert.model.chains import Segment
from vdpacert.model.guest_memory import AccessFault, FaultReason, ModelMemory
from vdpacert.model.notify import Decision, NotifyRule
from vdpacert.model.ring_index import PackedVqState, encode_packed_base
from vdpacert.model.vring_packed import PackedDriver
from vdpacert.model.vring_packed import PackedRing as ModelPackedRing
from vdpacert.model.vring_split import SplitDriver
from vdpacert.model.vring_split import SplitRing as ModelSplitRing
from vdpacert.uapi.virtio_config import VIRTIO_F_RING_PACKED
from vdpacert.uapi.virtio_ring import VIRTIO_RING_F_EVENT_IDX, VRING_DESC_SIZE, VRING_USED_ELEM_SIZE

__all__ = ["LayoutMemory", "LayoutTranslator", "PackedShadowRing", "ShadowRing", "SplitShadowRing",
           "make_shadow_ring"]

#: Where a fresh packed ring starts, as a vring base: both halves at slot 0 with wrap counter 1.
FRESH_PACKED_BASE = encode_packed_base(PackedVqState(0, 1, 0, 1))


class LayoutMemory(ModelMemory):
    """A :class:`GuestLayout`'s memory as the model's memory, addressed by IOVA.

    The model's walkers and drivers take a :class:`ModelMemory`, a concrete class rather than a
    protocol, so this adapter subclasses it and replaces the byte store with the layout's
    GuestMemory (every typed read and write of the base class goes through :meth:`read` /
    :meth:`write`). An address outside the layout is a ValueError, as in the base class: callers
    reach memory only through :class:`LayoutTranslator`, which refuses such ranges first.
    """

    def __init__(self, layout: GuestLayout) -> None:
        super().__init__()
        self.layout = layout

    def read(self, address: int, length: int) -> bytes:
        return self.layout.memory.read(self.layout.offset_of_iova(address), length)

    def write(self, address: int, data: bytes) -> None:
        # Straight to memory, not GuestLayout.write: these are device-side writes, which a layout's
        # snapshots must see as changes.
        self.layout.memory.write(self.layout.offset_of_iova(address), data)


class LayoutTranslator:
    """The identity translation over one layout's IOVA range, with every permission.

    The shadow virtqueue is not the device's IOMMU: it only needs to refuse addresses outside the
    memory it can read (a guest chain pointing anywhere else is bad input, ADDRESS_UNMAPPED).
    """

    def __init__(self, layout: GuestLayout) -> None:
        self.start = layout.iova_base
        self.end = layout.iova_base + layout.size

    def translate(self, iova: int, length: int, write: bool) -> int | AccessFault:
        if length < 0 or iova < self.start or iova + length > self.end:
            return AccessFault(iova, length, write, FaultReason.UNMAPPED)
        return iova


def _kick_allowed(rule: NotifyRule) -> bool:
    # MUST and MAY both kick: a spurious kick costs the device one look, a missing one stalls it.
    return rule.decision is not Decision.SHOULD_NOT_NOTIFY


class ShadowRing(Protocol):
    """What the shadow virtqueue needs of a shadow ring, whatever its layout."""

    @property
    def addresses(self) -> tuple[int, int, int]:
        """(desc, avail / driver event, used / device event) IOVAs, for VHOST_SET_VRING_ADDR."""
        ...

    @property
    def base(self) -> int:
        """The VHOST_SET_VRING_BASE value of the ring as laid out (fresh)."""
        ...

    def room(self, descriptors: int) -> bool:
        """Whether a chain taking ``descriptors`` ring entries fits now."""
        ...

    def add(self, segments: Sequence[Segment], *, indirect: bool) -> int:
        """Write a chain (not yet published to the device); its shadow id (split head / Buffer ID)."""
        ...

    def publish(self) -> bool:
        """Expose what was added; whether the device's suppression lets it be kicked."""
        ...

    def reap(self) -> list[tuple[int, int]]:
        """``(shadow id, len)`` of every chain the device used since the last call, in used-ring order."""
        ...

    @property
    def in_flight(self) -> int:
        """Chains added and not yet reaped."""
        ...

    def close(self) -> None:
        """Give the ring's VMM memory back (idempotent)."""
        ...


class _Tables:
    """The VMM copies of indirect tables, by the shadow id of the chain they belong to.

    Why copy instead of pointing the device at the guest's table, which is mapped for it too: the
    device must use exactly the chain the shadow virtqueue parsed, or the dirty marks (computed from
    the parsed writable segments) could miss what the device writes after a guest rewrote its
    table. Why not flatten into direct descriptors: an indirect chain of n elements would then take
    n shadow entries for the guest's one, so a guest ring the guest filled legally could overflow
    the shadow ring of the same size; with copies the shadow ring uses exactly as many entries as
    the guest ring, and the device sees the chain in the shape the guest gave it.
    """

    def __init__(self, vmm: GuestLayout, name: str) -> None:
        self.vmm = vmm
        self.name = name
        self.by_id: dict[int, int] = {}

    def alloc(self, entries: int) -> int:
        """Offset of a zeroed table of ``entries`` descriptors (MemoryError when VMM memory is short)."""
        return self.vmm.alloc(VRING_DESC_SIZE * entries, VRING_DESC_SIZE, what=f"{self.name} indirect table",
                              fill=0)

    def release(self, shadow_id: int) -> None:
        offset = self.by_id.pop(shadow_id, None)
        if offset is not None:
            self.vmm.free(offset)

    def close(self) -> None:
        for offset in self.by_id.values():
            self.vmm.free(offset)
        self.by_id.clear()


def _alloc_areas(vmm: GuestLayout, sizes: Sequence[tuple[int, int, str]]) -> list[int]:
    """Allocate zeroed areas, all or nothing."""
    done: list[int] = []
    try:
        for size, align, what in sizes:
            done.append(vmm.alloc(size, align, what=what, fill=0))
    except BaseException:
        for offset in done:
            vmm.free(offset)
        raise
    return done


_Driver = TypeVar("_Driver", SplitDriver, PackedDriver)


class _ShadowRingBase(Generic[_Driver]):
    """What both layouts share: the ring's areas and indirect-table copies in VMM memory, chain counting."""

    def __init__(self, vmm: GuestLayout, num: int, name: str, areas: list[int], driver: _Driver) -> None:
        self.vmm = vmm
        self.num = num
        self._areas = areas
        self.driver: _Driver = driver
        self._tables = _Tables(vmm, name)
        self._chains = 0
        self._closed = False

    @property
    def in_flight(self) -> int:
        return self._chains

    def add(self, segments: Sequence[Segment], *, indirect: bool) -> int:
        elements = [(s.addr, s.len, s.writable) for s in segments]
        table = self._tables.alloc(len(elements)) if indirect else None
        try:
            shadow_id = self.driver.add(elements, indirect_table=None if table is None else self.vmm.iova(table))
        except BaseException:
            if table is not None:
                self.vmm.free(table)
            raise
        if table is not None:
            self._tables.by_id[shadow_id] = table
        self._chains += 1
        return shadow_id

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._tables.close()
        for offset in self._areas:
            self.vmm.free(offset)


class SplitShadowRing(_ShadowRingBase[SplitDriver]):
    """A split shadow ring of ``num`` entries, driven by the model's :class:`SplitDriver`."""

    def __init__(self, vmm: GuestLayout, num: int, features: int, *, name: str = "svq") -> None:
        self.event_idx = bool(features >> VIRTIO_RING_F_EVENT_IDX & 1)
        # Zeroed: used_event 0 asks for the first used entry, and no stale canary reads as an index.
        areas = _alloc_areas(vmm, [(VRING_DESC_SIZE * num, 16, f"{name} shadow descriptor table"),
                                         (6 + 2 * num, 2, f"{name} shadow avail ring"),
                                         (6 + VRING_USED_ELEM_SIZE * num, 4, f"{name} shadow used ring")])
        desc, avail, used = (vmm.iova(offset) for offset in areas)
        self.ring = ModelSplitRing(num, desc, avail, used)
        super().__init__(vmm, num, name, areas, SplitDriver(LayoutMemory(vmm), self.ring, features=features,
                                                            translator=LayoutTranslator(vmm)))

    @property
    def addresses(self) -> tuple[int, int, int]:
        return self.ring.desc, self.ring.avail, self.ring.used

    @property
    def base(self) -> int:
        return 0

    def room(self, descriptors: int) -> bool:
        return self._chains < self.num and self.driver.num_free >= descriptors

    def publish(self) -> bool:
        return _kick_allowed(self.driver.publish())

    def reap(self) -> list[tuple[int, int]]:
        used = self.driver.reap()
        for elem in used:
            self._tables.release(elem.id)
        self._chains -= len(used)
        if used and self.event_idx:
            # Ask for a call at the very next used entry: the shadow virtqueue wants every completion.
            self.driver.set_used_event(self.driver.last_used_idx)
        return [(elem.id, elem.len) for elem in used]


class PackedShadowRing(_ShadowRingBase[PackedDriver]):
    """A packed shadow ring of ``num`` entries, driven by the model's :class:`PackedDriver`.

    Its driver event suppression stays ENABLE (the model driver writes it so): the shadow
    virtqueue wants a call for every used descriptor and has no EVENT_IDX tricks of its own.
    """

    def __init__(self, vmm: GuestLayout, num: int, features: int, *, name: str = "svq") -> None:
        # Zeroed descriptors read as "not available" under the first wrap counter (1).
        areas = _alloc_areas(vmm, [(VRING_DESC_SIZE * num, 16, f"{name} shadow descriptor ring"),
                                         (4, 4, f"{name} shadow driver event suppression"),
                                         (4, 4, f"{name} shadow device event suppression")])
        desc, driver, device = (vmm.iova(offset) for offset in areas)
        self.ring = ModelPackedRing(num, desc, driver, device)
        super().__init__(vmm, num, name, areas, PackedDriver(LayoutMemory(vmm), self.ring, features=features,
                                                             translator=LayoutTranslator(vmm)))

    @property
    def addresses(self) -> tuple[int, int, int]:
        return self.ring.desc, self.ring.driver, self.ring.device

    @property
    def base(self) -> int:
        return FRESH_PACKED_BASE

    def room(self, descriptors: int) -> bool:
        return self.driver.in_flight + descriptors <= self.num

    def publish(self) -> bool:
        # PackedDriver.add exposes each list as it writes it; what is left is the kick decision.
        return _kick_allowed(self.driver.kick())

    def reap(self) -> list[tuple[int, int]]:
        used = self.driver.reap()
        for buffer_id, _ in used:
            self._tables.release(buffer_id)
        self._chains -= len(used)
        return used

def make_shadow_ring(vmm: GuestLayout, num: int, features: int, *, name: str = "svq") -> ShadowRing:
    """The shadow ring for a guest ring of ``num`` entries with these acked features (MemoryError if
    the VMM layout has no room for it)."""
    if features >> VIRTIO_F_RING_PACKED & 1:
        return PackedShadowRing(vmm, num, features, name=name)
    return SplitShadowRing(vmm, num, features, name=name)
