"""What a device did with a ring the driver broke on purpose, each answer held against the model.

The datapath machines post hostile chains (:mod:`.hostile`) and hand the device ring layouts the
spec forbids. This module holds the checks around them, each naming the clause it compares:

- :func:`model_verdict`: the model's own walk (:class:`~vdpacert.model.vring_split.SplitDeviceModel`,
  :class:`~vdpacert.model.vring_packed.PackedDeviceModel`) of what was just published, through the IOTLB
  the session set up. It says which ``ring.bad_input.*`` row the chain breaks; the machine counts that
  row, never the class it meant to write.
- :func:`check_after_bad`: what the device did once it saw the bad input, before anything is reaped (a
  reaped or reset chain's buffers are freed and refilled with canaries, which erases the evidence). A
  byte changed in a device-readable buffer of any outstanding chain is
  ``ring.<layout>.device.no_write_readable``, in a hostile chain's writable buffer (canary bytes no
  window covers) ``suite.canary.no_write_outside_writable``; the hostile queue's used ring is held
  against the model's prediction that a bad chain stops the queue (``suite.lockstep.used_ring``, a len
  above 0 ``ring.device.bad_chain_not_used``), with the one latitude the model's obligations leave: the
  chain returned with len 0.
- :func:`check_ring_layout`: ring sizes and misaligned areas of §2.7 / §2.8 handed over with
  VHOST_SET_VRING_NUM / ADDR while the queues do not run, each answer compared with a
  :class:`~vdpacert.model.vhost_vdpa.VhostVdpaModel` brought to the same state.
"""

from __future__ import annotations

import errno as errno_names
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from vdpacert.conformance.client import VhostClient
from vdpacert.conformance.driver.device import ACK_DRIVER, FEATURES_OK, Ring
from vdpacert.conformance.driver.memory import PAGE, GuestLayout, Snapshot
from vdpacert.conformance.driver.packed import AVAIL, USED, PackedRing, avail_flags, used_flags
from vdpacert.conformance.driver.split import Chain, SplitRing
from vdpacert.conformance.lockstep import model_quirks
from vdpacert.conformance.targets import Target
from vdpacert.model import vring_packed, vring_split
from vdpacert.model.chains import Chain as ModelChain
from vdpacert.model.chains import ChainFault
from vdpacert.model.guest_memory import ModelMemory, Perm, RangeTranslator
from vdpacert.model.quirks import QUIRKS
from vdpacert.model.ring_index import PackedVqState
from vdpacert.model.spec import ModelErrno, Violation
from vdpacert.model.vdpa_device import VdpaDeviceSpec
from vdpacert.model.vhost_vdpa import MODELLED_QUIRKS, VhostVdpaModel

__all__ = [
    "Checker",
    "Finding",
    "LayoutMemory",
    "LayoutProbe",
    "ProbeResult",
    "check_after_bad",
    "check_ring_layout",
    "device_position",
    "device_spec",
    "layout_probes",
    "layout_translator",
    "memory_findings",
    "model_verdict",
    "run_layout_probes",
    "used_after_bad",
    "used_rules",
]

CANARY_SUITE = "suite.canary.no_write_outside_writable"
BAD_CHAIN = "ring.device.bad_chain_not_used"
LOCKSTEP_USED = "suite.lockstep.used_ring"
USED_RING = "ring.split.device.used_ring"
USED_DESCRIPTOR = "ring.packed.device.used_descriptor"
USED_LENGTH = "ring.packed.device.used_length"
NO_WRITE_READABLE = {False: "ring.split.device.no_write_readable", True: "ring.packed.device.no_write_readable"}
#: Ring sizes a probe hands over: 0, not a power of 2, past 32768 (each layout keeps those its rules forbid).
BAD_SIZES = (0, 3, 1 << 16)
#: (desc, driver area, device area) offsets of a probe: each misaligns one area below its §2.7 / §2.8.10.1
#: alignment by an amount Linux's vhost (and so the model) refuses. A packed driver area 2 bytes off is
#: left out: vhost checks only 2-byte alignment there, and a device that takes it anyway is not predicted.
MISALIGNED = ((8, 0, 0), (0, 1, 0), (0, 0, 2))


class Checker(Protocol):
    """What the checks need of a machine: count a clause checked, build the failure of one."""

    def count(self, clause: str) -> None: ...

    def fail(self, clause: str, message: str) -> Exception: ...


@dataclass(frozen=True)
class Finding:
    """A clause the device broke and what it did."""

    clause: str
    message: str


# ----- the model's view of the ring -------------------------------------------------------------------------

class LayoutMemory(ModelMemory):
    """The guest layout as the model reads memory: model address = the layout's IOVA, read live, never written."""

    def __init__(self, layout: GuestLayout) -> None:
        super().__init__()
        self.layout = layout

    def read(self, address: int, length: int) -> bytes:
        offset = address - self.layout.iova_base
        if 0 <= offset and offset + length <= self.layout.size:
            return self.layout.read(offset, length)
        return super().read(address, length)

    def write(self, address: int, data: bytes) -> None:
        raise TypeError(f"the model's verdict only reads guest memory (write of {len(data)} at {address:#x})")


def layout_translator(layout: GuestLayout, aliases: Sequence[tuple[int, int, int]] = ()) -> RangeTranslator:
    """The IOTLB as the session mapped it: the whole layout read-write at its IOVA base, and each alias
    ``(iova, layout offset, VHOST_ACCESS_*)`` a page long."""
    translator = RangeTranslator()
    translator.map(layout.iova_base, layout.size, layout.iova_base, Perm.RW)
    for iova, offset, perm in aliases:
        translator.map(iova, PAGE, layout.iova(offset), Perm(perm))
    return translator


def device_position(ring: Ring) -> int | PackedVqState:
    """Where the device takes the next chain, for a ring with nothing in flight: split, the avail idx the
    driver published; packed, its next slot and wrap counter (the used side is there too)."""
    if isinstance(ring, SplitRing):
        return ring.avail_idx
    return PackedVqState(ring.next_avail, ring.avail_wrap, ring.next_used, ring.used_wrap)


def model_verdict(ring: Ring, position: int | PackedVqState, features: int,
                  translator: RangeTranslator) -> ModelChain | ChainFault | None:
    """What the model's device makes of the next chain from ``position``: a chain, the bad input it is, or None."""
    memory = LayoutMemory(ring.layout)
    desc, driver, device = ring.addresses
    if isinstance(ring, SplitRing):
        assert isinstance(position, int)
        split = vring_split.SplitDeviceModel(memory, vring_split.SplitRing(ring.num, desc, driver, device),
                                             features=features, translator=translator, last_avail_idx=position,
                                             used_idx=ring.last_used)
        return split.peek()
    assert isinstance(position, PackedVqState)
    packed = vring_packed.PackedDeviceModel(memory, vring_packed.PackedRing(ring.num, desc, driver, device),
                                            features=features, translator=translator, state=position)
    return packed.peek()


# ----- what the device wrote ----------------------------------------------------------------------------------

def _changed(layout: GuestLayout, snapshot: Snapshot, offset: int, length: int) -> str | None:
    """How ``length`` bytes at ``offset`` differ from the snapshot (None: they do not)."""
    now, before = layout.read(offset, length), bytes(snapshot.data[offset:offset + length])
    if now == before:
        return None
    first = next(i for i in range(length) if now[i] != before[i])
    return (f"offset {offset + first:#x} (iova {layout.iova(offset + first):#x}): "
            f"{before[first:first + 8].hex()} -> {now[first:first + 8].hex()}")


def memory_findings(layout: GuestLayout, snapshot: Snapshot, chains: Iterable[Chain], *,
                    packed: bool) -> list[Finding]:
    """The buffers of ``chains`` the device changed since ``snapshot``: a device-readable one is
    ``ring.<layout>.device.no_write_readable``; a writable one of a hostile chain (canary bytes no window
    covers) ``suite.canary.no_write_outside_writable``. Readable findings first.

    Compared buffer by buffer, not by a diff of the whole layout: cheap, and done before anything is
    reaped or reset, because a chain's buffers are freed (and refilled with canaries) when it goes.
    """
    readable, canaries = [], []
    for chain in chains:
        kind = "hostile chain" if chain.bad else "chain"
        for region in chain.readable:
            change = _changed(layout, snapshot, region.offset, region.length)
            if change is not None:
                readable.append(Finding(NO_WRITE_READABLE[packed], f"the device wrote into the {region.what} of "
                                                                   f"{kind} {chain.id}, device-readable: {change}"))
        for region in chain.writable if chain.bad else ():
            change = _changed(layout, snapshot, region.offset, region.length)
            if change is not None:
                canaries.append(Finding(CANARY_SUITE, f"the device wrote into the {region.what} of hostile chain "
                                                      f"{chain.id}, which no window covers: {change}"))
    return readable + canaries


# ----- what the device's used ring says -------------------------------------------------------------------

def _length(name: str, chain: Chain, length: int, fault: ChainFault, length_rule: str) -> Finding | None:
    if chain.bad and length:
        return Finding(BAD_CHAIN, f"{name}: chain {chain.id} used with len {length}, but the model finds it bad "
                                  f"({fault})")
    if length > chain.writable_len:
        return Finding(length_rule, f"{name}: chain {chain.id} used with len {length}, above its "
                                    f"{chain.writable_len} writable bytes")
    return None


def used_after_bad(ring: Ring, chain: Chain | None, fault: ChainFault) -> Finding | None:
    """The used ring of the queue ``chain`` (None: bad ring state, no chain) was posted on, read before reaping.

    The model's device stops the queue at the bad input: nothing is used. The model's obligations leave
    one other answer: the chain returned with len 0 (``ring.device.bad_chain_not_used`` forbids a used entry
    that claims bytes). A chain that is not ``bad`` (one a device may read as valid) may be used with up to
    its writable bytes.
    """
    if isinstance(ring, SplitRing):
        fresh = (ring.used_idx() - ring.last_used) & 0xFFFF
        allowed = 0 if chain is None else 1
        if fresh > allowed:
            return Finding(LOCKSTEP_USED, f"{ring.name}: used idx moved from {ring.last_used} by {fresh}; the model "
                                          f"uses {'nothing' if chain is None else f'at most chain {chain.id}'} "
                                          f"({fault})")
        if not fresh or chain is None:
            return None
        head, length = ring.read_used_elem(ring.last_used)
        if head != chain.id:
            return Finding(USED_RING, f"{ring.name}: used entry names id {head}; the only chain posted is {chain.id}")
        return _length(ring.name, chain, length, fault, USED_RING)
    assert isinstance(ring, PackedRing) and chain is not None
    _, length, buffer_id, flags = ring.read_desc(ring.next_used)
    state = flags & (AVAIL | USED)
    where = f"{ring.name}: slot {ring.next_used} (used wrap counter {ring.used_wrap})"
    if state == avail_flags(ring.used_wrap):
        return None
    if state != used_flags(ring.used_wrap):
        return Finding(USED_DESCRIPTOR, f"{where}: flags {flags:#x} are neither available nor used")
    if buffer_id != chain.id:
        return Finding(USED_DESCRIPTOR, f"{where}: used descriptor names buffer id {buffer_id}; the only list "
                                        f"posted is {chain.id}")
    return _length(where, chain, length, fault, USED_LENGTH)


def check_after_bad(checker: Checker, layout: GuestLayout, snapshot: Snapshot, rings: Iterable[Ring], ring: Ring,
                    chain: Chain | None, fault: ChainFault, *, packed: bool) -> None:
    """What the device did once it saw the bad input on ``ring``, before anything is reaped: its writes into
    the buffers of every outstanding chain (:func:`memory_findings`) and the used ring of ``ring``
    (:func:`used_after_bad`). Raised in that order, readable buffers first."""
    chains = [c for each in rings for c in each.outstanding.values()]
    if any(c.readable for c in chains):
        checker.count(NO_WRITE_READABLE[packed])
    if any(c.bad and c.writable for c in chains):
        checker.count(CANARY_SUITE)
    checker.count(LOCKSTEP_USED)
    checker.count(BAD_CHAIN)
    findings = memory_findings(layout, snapshot, chains, packed=packed)
    used = used_after_bad(ring, chain, fault)
    first = [f for f in findings if f.clause == NO_WRITE_READABLE[packed]] + ([used] if used else []) + findings
    if first:
        raise checker.fail(first[0].clause, first[0].message)


def used_rules(ring: Ring, reaped: bool) -> tuple[str, ...]:
    """The rules a reap of ``ring`` checks: split, the used idx and each entry's id and len; packed, each
    descriptor's flags and Buffer ID, and (for the entries it returned) their len."""
    if isinstance(ring, SplitRing):
        return (USED_RING,)
    return (USED_DESCRIPTOR, USED_LENGTH) if reaped else (USED_DESCRIPTOR,)


# ----- ring layouts the driver may not hand over ----------------------------------------------------------

@dataclass(frozen=True)
class LayoutProbe:
    """One ring description breaking exactly one layout rule, as the ioctl that hands it over."""

    rule: str  # the layout rule broken, as the model's split_/packed_ring_violations names it
    what: str
    model_call: Callable[[VhostVdpaModel], object]
    target_call: Callable[[VhostClient], object]


@dataclass(frozen=True)
class ProbeResult:
    probe: LayoutProbe
    predicted: ModelErrno | None
    got: int | None  # the target's errno; None: it accepted

    @property
    def matches(self) -> bool:
        return (None if self.predicted is None else self.predicted.errno) == self.got

    @property
    def clause(self) -> str:
        """The model rule that decided the answer (the layout rule when the model accepts)."""
        return self.probe.rule if self.predicted is None else self.predicted.rule

    def describe(self) -> str:
        def answer(code: int | None) -> str:
            return "success" if code is None else f"errno {code} ({errno_names.errorcode.get(code, '?')})"

        predicted = answer(None if self.predicted is None else self.predicted.errno)
        why = f", {self.predicted.rule}" if self.predicted is not None else ""
        return (f"{self.probe.what} (breaks {self.probe.rule}): the target answered {answer(self.got)}, the model "
                f"{predicted}{why}")


def _one_rule(found: list[Violation]) -> str | None:
    return found[0].rule if len(found) == 1 else None


def _set_vring_num(rule: str, index: int, num: int) -> LayoutProbe:
    def model_call(model: VhostVdpaModel) -> object:
        model.VHOST_SET_VRING_NUM(index, num)
        return None

    def target_call(client: VhostClient) -> object:
        client.set_vring_num(index, num)
        return None

    return LayoutProbe(rule, f"VHOST_SET_VRING_NUM({index}, {num})", model_call, target_call)


def _set_vring_addr(rule: str, index: int, desc: int, driver: int, device: int) -> LayoutProbe:
    def model_call(model: VhostVdpaModel) -> object:
        model.VHOST_SET_VRING_ADDR(index, desc, driver, device)
        return None

    def target_call(client: VhostClient) -> object:
        client.set_vring_addr(index, desc, driver, device)
        return None

    return LayoutProbe(rule, f"VHOST_SET_VRING_ADDR({index}, {desc:#x}, {driver:#x}, {device:#x})", model_call,
                       target_call)


def layout_probes(packed: bool, index: int, num: int, desc: int, driver: int, device: int) -> list[LayoutProbe]:
    """Probes for queue ``index`` whose ring (``num`` entries at desc/driver/device) is laid out correctly:
    each bad size of :data:`BAD_SIZES` and each misalignment of :data:`MISALIGNED` that breaks exactly one
    rule of the layout in use (the model's ``*_ring_violations`` decide)."""
    violations = vring_packed.packed_ring_violations if packed else vring_split.split_ring_violations
    assert not violations(num, desc, driver, device), "the probes start from a ring laid out correctly"
    probes = []
    for size in BAD_SIZES:
        rule = _one_rule(violations(size, desc, driver, device))
        if rule is not None:
            probes.append(_set_vring_num(rule, index, size))
    for d, a, u in MISALIGNED:
        where = (desc + d, driver + a, device + u)
        rule = _one_rule(violations(num, *where))
        if rule is not None:
            probes.append(_set_vring_addr(rule, index, *where))
    return probes


def device_spec(client: VhostClient) -> VdpaDeviceSpec:
    """The model's spec of an open device, from what it reports (GET ioctls only: the owner stays as it is)."""
    size = client.get_config_size()
    return VdpaDeviceSpec(device_id=client.get_device_id(), device_features=client.get_features(),
                          nvqs=client.get_vqs_count(), vq_num_max=max(1, client.get_vring_num()),
                          config=client.get_config(0, size) if size else b"", ngroups=client.get_group_num(),
                          nas=client.get_as_num())


def run_layout_probes(client: VhostClient, model: VhostVdpaModel, *, backend_features: int, features: int,
                      probes: Sequence[LayoutProbe]) -> list[ProbeResult] | None:
    """Reset both sides and bring them to FEATURES_OK with ``features`` (the ring layout is then known and no
    queue runs), then hand each probe to both. None when the two sides disagree before the first probe
    (that is the control machine's business, not a ring layout's)."""
    try:
        model.open()
        model.VHOST_SET_OWNER()
        model.VHOST_SET_BACKEND_FEATURES(backend_features)
        model.VHOST_VDPA_SET_STATUS(0)
        model.VHOST_VDPA_SET_STATUS(ACK_DRIVER)
        model.VHOST_SET_FEATURES(features)
        model.VHOST_VDPA_SET_STATUS(FEATURES_OK)
        status = model.VHOST_VDPA_GET_STATUS()
    except ModelErrno:
        return None
    try:
        client.set_status(0)
        client.set_status(ACK_DRIVER)
        client.set_features(features)
        client.set_status(FEATURES_OK)
        if client.get_status() != status:
            return None
    except OSError:
        return None
    results = []
    for probe in probes:
        try:
            probe.model_call(model)
            predicted = None
        except ModelErrno as refusal:
            predicted = refusal
        try:
            probe.target_call(client)
            got = None
        except OSError as error:
            got = error.errno
        results.append(ProbeResult(probe, predicted, got))
    return results


def check_ring_layout(checker: Checker, target: Target, *, backend_features: int, features: int, packed: bool,
                      index: int, num: int, addresses: tuple[int, int, int]) -> None:
    """Hand queue ``index`` the sizes and misaligned areas its layout forbids (the device is reset first: the
    caller brings it up again); every answer must be the model's. Counts the layout rule broken and the
    model rule that decided the answer."""
    client = target.client
    quirks = model_quirks(target)
    #: Rules a declared quirk departs from without the model predicting the quirk's answer: the lockstep
    #: reports those; here a probe they decide is not compared.
    unmodelled = {QUIRKS[name].rule for name in quirks - MODELLED_QUIRKS}
    probes = layout_probes(packed, index, num, *addresses)
    model = VhostVdpaModel(device_spec(client), quirks=quirks & MODELLED_QUIRKS)
    results = run_layout_probes(client, model, backend_features=backend_features, features=features, probes=probes)
    for result in results or ():
        if result.clause in unmodelled:
            continue
        checker.count(result.probe.rule)
        checker.count(result.clause)
        if not result.matches:
            raise checker.fail(result.clause, result.describe())
