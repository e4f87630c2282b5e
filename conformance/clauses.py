"""The clause catalog: every check the suite makes cites one clause, and every verdict is per clause.

A clause is a stable id, the spec section (or Linux source) it enforces, how binding it is and a
one-line summary in our own words. The catalog is built from three sources, in this order:

* every rule of :func:`vdpacert.model.rules.catalog`: the clause id *is* the model's rule id, so a
  disagreement between the model's prediction and the target names the rule that decided it;
* the rules the model only states through a known Linux deviation
  (:data:`vdpacert.model.quirks.QUIRKS`): a quirk names a rule the model encodes in its state machine
  but not as a catalog row, and a target profile must be able to declare that quirk per clause;
* suite-level clauses, which observe a device as a whole (lockstep comparison, canaries in guest
  memory, the dirty log, loopback traffic, a target that dies), so no single model rule owns them.

Applicability is a property of the clause: a virtio-net clause does not apply to a block device,
and a packed-ring clause does not apply to a device that does not offer VIRTIO_F_RING_PACKED. A
clause that does not apply is reported as not applicable with the reason, never as exercised.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from vdpacert.model import feature_bits, rules, sections
from vdpacert.model import features as feature_rules
from vdpacert.model.net import NET_RECEIVE_DEVICE
from vdpacert.model.quirks import QUIRKS
from vdpacert.model.spec import Citation, Level, LinuxSource
from vdpacert.uapi import vhost_types as T  # noqa: N812
from vdpacert.uapi import virtio_blk as B  # noqa: N812 - read like the C names
from vdpacert.uapi import virtio_config as C  # noqa: N812
from vdpacert.uapi import virtio_ids
from vdpacert.uapi import virtio_net as N  # noqa: N812
from vdpacert.uapi import virtio_ring as R  # noqa: N812

__all__ = [
    "CLAUSE_ID",
    "DEVICE_NAMES",
    "Clause",
    "UnknownClause",
    "catalog",
    "clause",
    "clause_for_rule",
    "device_name",
    "for_device",
    "is_clause",
    "not_applicable",
]

#: A clause id: dotted, lower-case area first (the model's rule id pattern; feature names keep their case).
CLAUSE_ID: Final = rules.RULE_ID

#: virtio device ids (spec §5) to the names reports use.
DEVICE_NAMES: Final = {virtio_ids.VIRTIO_ID_NET: "virtio-net", virtio_ids.VIRTIO_ID_BLOCK: "virtio-blk"}

#: Where a suite clause comes from, as opposed to ``model:<module>``.
SUITE: Final = "suite"


def device_name(device_id: int) -> str:
    return DEVICE_NAMES.get(device_id, f"device id {device_id}")


@dataclass(frozen=True)
class Clause:
    """One clause: what a check enforces, where it is written, and on which devices it can be checked.

    ``level`` is the model's :class:`Level`, or None for a MAY row (a permission: it can be exercised
    but never fail). ``device_ids`` None means every device type. ``requires_features`` and
    ``requires_backend_features`` are bit masks the device must *offer* (GET_FEATURES /
    GET_BACKEND_FEATURES) for the clause to be checkable; a device that offers none of them is not
    broken, the clause just has nothing to say about it.
    """

    id: str
    citation: Citation
    level: Level | None
    summary: str
    origin: str
    device_ids: frozenset[int] | None = None
    requires_features: int = 0
    requires_backend_features: int = 0
    #: Why no check through the vhost-vdpa interface can reach the clause on a conforming target ("" when
    #: one can): unless a run records something for it, the clause is not applicable, with this reason.
    unreachable: str = ""
    #: The fewest address spaces (VHOST_VDPA_GET_AS_NUM) the device must have for the clause to be checkable.
    min_address_spaces: int = 0
    #: What the device must do for the clause to have anything to judge ("" when nothing): a rule for the
    #: driver's reaction to a device choice, or a refusal only a device without some ability gives. A
    #: clause with one that no check reached is not applicable, and the reason says what it waits for.
    precondition: str = ""

    def __post_init__(self) -> None:
        if not CLAUSE_ID.match(self.id):
            raise ValueError(f"clause id {self.id!r} is not a dotted lower-case id")
        if not self.summary:
            raise ValueError(f"clause {self.id} has no summary")

    @property
    def section(self) -> Citation:
        """The citation; named ``section`` because most clauses cite a spec section."""
        return self.citation

    @property
    def level_name(self) -> str:
        """"MUST", "SHOULD" or "MAY" (what reports print)."""
        return "MAY" if self.level is None else self.level.value

    @property
    def is_must(self) -> bool:
        return self.level is Level.MUST

    def not_applicable_reason(self, device_id: int, features: int | None = None,
                              backend_features: int | None = None, address_spaces: int | None = None, *,
                              for_listing: bool = False) -> str | None:
        """Why the clause cannot be checked on this device, or None when it applies.

        ``features`` / ``backend_features`` are what the device offers; None (not known yet) makes
        the feature conditions count as met, so a clause is never dropped on a guess. A
        ``precondition`` makes the clause not applicable unless ``for_listing`` (the question is then
        whether the device *can* be checked on it at all, as :func:`for_device` asks).
        """
        if self.unreachable:
            return self.unreachable
        if self.device_ids is not None and device_id not in self.device_ids:
            wanted = " or ".join(device_name(d) for d in sorted(self.device_ids))
            return f"a {wanted} clause; the target is {device_name(device_id)}"
        if features is not None and features & self.requires_features != self.requires_features:
            missing = self.requires_features & ~features
            names = dict(_COMMON_BITS)
            for device in self.device_ids or ():
                names.update(_DEVICE_BITS.get(device, {}))
            return f"the device does not offer {_bit_list(missing, names)}"
        if backend_features is not None and (
                backend_features & self.requires_backend_features != self.requires_backend_features):
            missing = self.requires_backend_features & ~backend_features
            return f"the device does not offer backend feature {_bit_list(missing, _BACKEND_BITS)}"
        if self.precondition and not for_listing:
            return f"only a device that {self.precondition} gives this clause something to judge; no check of it ran"
        if address_spaces is not None and address_spaces < self.min_address_spaces:
            return (f"the device has {address_spaces} address space{'s' if address_spaces != 1 else ''}; the clause "
                    f"needs at least {self.min_address_spaces}")
        return None

    def applies_to(self, device_id: int, features: int | None = None, backend_features: int | None = None,
                   address_spaces: int | None = None) -> bool:
        return self.not_applicable_reason(device_id, features, backend_features, address_spaces,
                                          for_listing=True) is None

    def __str__(self) -> str:
        return f"{self.id} [{self.level_name}] {self.summary} ({self.citation})"


def _names(module: object, prefix: str) -> dict[int, str]:
    return {value: name for name, value in vars(module).items() if name.startswith(prefix) and isinstance(value, int)}


#: Feature bit -> UAPI name: transport bits, then each device type's own bits (they overlap by design).
_COMMON_BITS: Final = {**_names(C, "VIRTIO_F_"), **_names(R, "VIRTIO_RING_F_"), T.VHOST_F_LOG_ALL: "VHOST_F_LOG_ALL"}
_DEVICE_BITS: Final = {virtio_ids.VIRTIO_ID_NET: _names(N, "VIRTIO_NET_F_"),
                       virtio_ids.VIRTIO_ID_BLOCK: _names(B, "VIRTIO_BLK_F_")}
_BACKEND_BITS: Final = _names(T, "VHOST_BACKEND_F_")


def _bit_list(mask: int, names: dict[int, str]) -> str:
    return ", ".join(names.get(bit, f"bit {bit}") for bit in range(mask.bit_length()) if mask >> bit & 1)


def _bit(*bits: int) -> int:
    mask = 0
    for bit in bits:
        mask |= 1 << bit
    return mask


NET: Final = frozenset({virtio_ids.VIRTIO_ID_NET})
BLK: Final = frozenset({virtio_ids.VIRTIO_ID_BLOCK})


def _command_gate(commands: str, feature: int) -> tuple[re.Pattern[str], int]:
    """A control command's own rules (its answer, payload, value) need its feature; its ``not_negotiated``
    rule (sending it without the feature) applies on every device with a control queue."""
    return re.compile(rf"^net\.ctrl\.(driver\.)?({commands})\.(?!not_negotiated$)"), _bit(feature)


#: Model rules that can only be checked on a device offering some features: (id pattern, mask).
#: Only clear-cut cases: a rule about the *absence* of a feature (``*.not_negotiated``) stays
#: applicable, because the driver can always leave an offered feature out.
_FEATURE_GATES: Final = (
    (re.compile(r"^(ring|notify)\.packed\."), _bit(C.VIRTIO_F_RING_PACKED)),
    (re.compile(r"^notify\.[a-z]+\.[a-z]+\.event_idx\."), _bit(R.VIRTIO_RING_F_EVENT_IDX)),
    (re.compile(r"^ring\.[a-z]+\.device\.in_order$"), _bit(C.VIRTIO_F_IN_ORDER)),
    (re.compile(r"^net\.ctrl\."), _bit(N.VIRTIO_NET_F_CTRL_VQ)),
    _command_gate("RX_PROMISC|RX_ALLMULTI|MAC_TABLE_SET", N.VIRTIO_NET_F_CTRL_RX),
    _command_gate("RX_ALLUNI|RX_NOMULTI|RX_NOUNI|RX_NOBCAST", N.VIRTIO_NET_F_CTRL_RX_EXTRA),
    _command_gate("MAC_ADDR_SET", N.VIRTIO_NET_F_CTRL_MAC_ADDR),
    _command_gate("VLAN_ADD|VLAN_DEL", N.VIRTIO_NET_F_CTRL_VLAN),
    _command_gate("ANNOUNCE_ACK", N.VIRTIO_NET_F_GUEST_ANNOUNCE),
    _command_gate("MQ_VQ_PAIRS_SET", N.VIRTIO_NET_F_MQ),
    (re.compile(r"^net\.(driver\.)?(tx|rx)\.inactive_pair$"), _bit(N.VIRTIO_NET_F_MQ)),
    (re.compile(r"^blk\.config\.writeback\."), _bit(B.VIRTIO_BLK_F_CONFIG_WCE)),
    (re.compile(r"^net\.config\.mtu\."), _bit(N.VIRTIO_NET_F_MTU)),
    (re.compile(r"^net\.config\.(speed|duplex)\."), _bit(N.VIRTIO_NET_F_SPEED_DUPLEX)),
    (re.compile(r"^blk\.FLUSH\.ok"), _bit(B.VIRTIO_BLK_F_FLUSH)),
    (re.compile(r"^blk\.DISCARD\.(?!not_negotiated$|read_only$)"), _bit(B.VIRTIO_BLK_F_DISCARD)),
    (re.compile(r"^blk\.WRITE_ZEROES\.(?!not_negotiated$|read_only$)"), _bit(B.VIRTIO_BLK_F_WRITE_ZEROES)),
    (re.compile(r"^blk\.[A-Z_]+\.read_only$"), _bit(B.VIRTIO_BLK_F_RO)),
)


def _dependency_gates() -> dict[str, int]:
    """Each feature dependency rule ("F requires G") -> the bit of F.

    The rule can only be checked on its own (a set breaking it and nothing else) when the device offers
    F: accepting an F that is not offered breaks ``features.subset_of_offered`` first, and an offer
    without F has nothing for the offer side of the rule to say.
    """
    gates: dict[str, int] = {}
    for device_id in DEVICE_NAMES:
        for dep in feature_rules.dependency_rules(device_id):
            gates[dep.rule] = gates.get(dep.rule, 0) | feature_bits.mask_of(device_id, dep.feature)
    return gates


_DEPENDENCY_GATES: Final = _dependency_gates()


def _device_ids_of(rule_id: str) -> frozenset[int] | None:
    area = rule_id.split(".", 1)[0]
    return {"net": NET, "blk": BLK}.get(area)


def _features_of(rule_id: str) -> int:
    mask = _DEPENDENCY_GATES.get(rule_id, 0)
    for pattern, bits in _FEATURE_GATES:
        if pattern.search(rule_id):
            mask |= bits
    return mask


def _decided_first(rule: str, why: str = "") -> str:
    return f"through vhost-vdpa, {rule} decides first{': ' + why if why else ''}"


#: Model rules no vhost-vdpa user can make decide, and why. Most are rules of the parent's config ops
#: that the vhost-vdpa front checks before it calls the op, so the front's own rule is the one a run
#: exercises; the rest describe what a parent does that no ioctl makes visible.
UNREACHABLE: Final[dict[str, str]] = {
    "vdpa_device.optional_op": _decided_first("vhost_vdpa.parent_op"),
    "vdpa_device.vq_index": _decided_first("vhost_vdpa.vring.index"),
    "vdpa_device.vq_num": _decided_first("vhost's size check", "set_vq_num cannot fail, so no errno reaches userspace"),
    "vdpa_device.vq_num.split_pow2": _decided_first("vhost's size check (non-zero, a power of 2, at most 0xffff)"),
    "vdpa_device.set_driver_features.locked": _decided_first("vhost_vdpa.set_features.after_features_ok"),
    "vdpa_device.asid": _decided_first("vhost_vdpa.set_group_asid.asid and the IOTLB message's asid check"),
    "vdpa_device.map_op": "vhost-vdpa calls whichever map op the parent has; which one is not visible to userspace",
    "iotlb.update.size_zero": _decided_first("vhost_vdpa.msg.update_size_zero"),
    "iotlb.update.limit": "no ioctl reports how many mappings an address space holds, so no ENOSPC can be predicted",
    "vhost_vdpa.set_features.refused": "only a parent whose set_driver_features fails reaches it; the run records "
                                       "it if one does",
    "vhost_vdpa.vring_group.range": "only a parent reporting a group past its group count reaches it; the run "
                                    "records it if one does",
    "vdpa_device.get_config.no_side_effect": "the only side effect known (Linux resets the driver features to 0) "
                                             "happens while they are 0 anyway: no ioctl can tell",
}


_ASKS_SUPPRESSION: Final = "asks the driver to suppress notifications"
_WRITES_BAD_SUPPRESSION: Final = "writes an invalid or reserved notification suppression value"

#: Model rules with something the device must do first (:attr:`Clause.precondition`).
PRECONDITIONS: Final[dict[str, str]] = {
    "notify.split.avail.flags.flags_set": f"{_ASKS_SUPPRESSION} (VRING_USED_F_NO_NOTIFY)",
    "notify.packed.avail.flags.packed_disable": f"{_ASKS_SUPPRESSION} (RING_EVENT_FLAGS_DISABLE)",
    "notify.packed.avail.event_idx.packed_disable": f"{_ASKS_SUPPRESSION} (RING_EVENT_FLAGS_DISABLE)",
    "notify.packed.avail.event_idx.packed_enable": "leaves its event suppression at ENABLE under EVENT_IDX",
    "notify.split.avail.flags.flags_invalid": _WRITES_BAD_SUPPRESSION,
    "notify.packed.avail.flags.packed_reserved": _WRITES_BAD_SUPPRESSION,
    "notify.packed.avail.event_idx.packed_reserved": _WRITES_BAD_SUPPRESSION,
    "notify.packed.avail.flags.packed_desc_without_event_idx": _WRITES_BAD_SUPPRESSION,
    "notify.split.avail.event_idx.event_not_passed": "lags behind the driver: its avail_event names an entry the "
                                                     "driver has not reached yet when the driver publishes more",
    "notify.packed.avail.event_idx.event_not_passed": "lags behind the driver: its event suppression names a "
                                                      "descriptor the driver has not reached when it publishes more",
    "net.config.driver_write.unmapped": "has configuration bytes that belong to no field",
    "blk.config.driver_write.unmapped": "has configuration bytes that belong to no field",
    "iotlb.update.outside_iova_range": "has an IOVA range (GET_IOVA_RANGE) narrower than the whole 64-bit space",
    "vhost_vdpa.log.unsupported": "has no device dirty log (VHOST_F_LOG_ALL not offered, as Linux vhost-vdpa)",
    "vdpa_device.set_group_asid.group": "has fewer virtqueue groups than virtqueues",
    "blk.DISCARD.too_many_sectors": "advertises a max_discard_sectors a 32-bit segment can exceed (not 0xffffffff)",
    "blk.WRITE_ZEROES.too_many_sectors": "advertises a max_write_zeroes_sectors a 32-bit segment can exceed "
                                         "(not 0xffffffff)",
    "blk.driver.too_many_sectors": "advertises a discard or write-zeroes sector limit a 32-bit segment can exceed",
    "net.tx.gso_not_receivable": "offers a GSO transmit feature (HOST_TSO4, HOST_TSO6, HOST_UFO or HOST_USO)",
}
#: Model rules that need more than one address space.
_MULTI_AS: Final = frozenset({"vhost_vdpa.msg.batch_asid"})


def _from_model() -> list[Clause]:
    return [Clause(entry.rule, entry.citation, entry.level, entry.summary, f"model:{entry.source}",
                   _device_ids_of(entry.rule), _features_of(entry.rule), unreachable=UNREACHABLE.get(entry.rule, ""),
                   min_address_spaces=2 if entry.rule in _MULTI_AS else 0,
                   precondition=PRECONDITIONS.get(entry.rule, ""))
            for entry in rules.catalog()]


def _from_quirks(known: set[str]) -> list[Clause]:
    """Rules the model states only through a Linux quirk: the quirk's ``spec_says`` is the clause."""
    found: dict[str, Clause] = {}
    for quirk in QUIRKS.values():
        if quirk.rule not in known and quirk.rule not in found:
            found[quirk.rule] = Clause(quirk.rule, quirk.citation, Level.MUST, quirk.spec_says, "model:quirks",
                                       _device_ids_of(quirk.rule), _features_of(quirk.rule),
                                       unreachable=UNREACHABLE.get(quirk.rule, ""))
    return list(found.values())


_VDPA_SIM_NET: Final = LinuxSource("drivers/vdpa/vdpa_sim/vdpa_sim_net.c", "vdpasim_net_work")
_LOG_ALL: Final = _bit(T.VHOST_F_LOG_ALL)


def _suite(clause_id: str, level: Level, citation: Citation, summary: str, *,
           devices: frozenset[int] | None = None, features: int = 0, backend: int = 0,
           min_address_spaces: int = 0) -> Clause:
    return Clause(clause_id, citation, level, summary, SUITE, devices, features, backend,
                  min_address_spaces=min_address_spaces)


MUST, SHOULD = Level.MUST, Level.SHOULD

#: Clauses about observing the device as a whole (ids outside the model's catalog).
SUITE_CLAUSES: Final = (
    # Lockstep: every observable equals the model's prediction after every step.
    _suite("suite.lockstep.errno", MUST, sections.VHOST_UAPI,
           "an operation's answer or errno equals the model's prediction (a failure names the operation's rule "
           "when the model knows it)"),
    _suite("suite.lockstep.status", MUST, sections.DEVICE_STATUS_DEVICE,
           "the status the device reports equals the model's after every step"),
    _suite("suite.lockstep.features", MUST, sections.FEATURE_BITS_DEVICE,
           "device, driver and backend features read back as the model predicts, unchanged until reset"),
    _suite("suite.lockstep.config", MUST, sections.CONFIG_SPACE_DEVICE,
           "configuration space reads return what the model predicts, in bounds and out"),
    _suite("suite.lockstep.vq_state", MUST, sections.vhost_vdpa("vhost_vdpa_vring_ioctl"),
           "GET_VRING_BASE and GET_VRING_NUM report the queue state the model predicts"),
    _suite("suite.lockstep.used_ring", MUST, sections.SPLIT_USED_RING_DEVICE,
           "used entries (id, len, order) and the used index are exactly the ones the model predicts"),
    # Memory the device must leave alone.
    _suite("suite.canary.no_write_outside_writable", MUST, sections.SPLIT_DESC_TABLE_DEVICE,
           "no byte outside device-writable buffers and the used area changes (canaries stay intact)"),
    _suite("suite.status.no_use_before_driver_ok", MUST, sections.DEVICE_STATUS_DEVICE,
           "before DRIVER_OK the device consumes no buffer and signals no used buffer notification"),
    _suite("suite.iotlb.no_access_unmapped", MUST, sections.vhost_vdpa("vhost_vdpa_process_iotlb_msg"),
           "the device reaches guest memory only through current IOTLB mappings with the right permission"),
    _suite("suite.iotlb.asid_isolation", MUST, sections.vhost_vdpa("vhost_vdpa_vring_ioctl"),
           "a virtqueue group translates through the address space it is bound to, and no other",
           backend=_bit(T.VHOST_BACKEND_F_IOTLB_ASID), min_address_spaces=2),
    # Notifications.
    _suite("suite.notify.call_signalled", MUST, sections.vhost_vdpa("vhost_vdpa_virtqueue_cb"),
           "a used buffer notification the model requires reaches the queue's call eventfd"),
    # Suspend / resume.
    _suite("suite.suspend.no_progress", MUST, sections.vhost_vdpa("vhost_vdpa_suspend"),
           "while suspended the device uses no buffer and writes no guest memory",
           backend=_bit(T.VHOST_BACKEND_F_SUSPEND)),
    _suite("suite.suspend.kick_not_lost", MUST, sections.vhost_vdpa("vhost_vdpa_resume"),
           "buffers made available (and kicked) while suspended are processed after resume",
           backend=_bit(T.VHOST_BACKEND_F_SUSPEND, T.VHOST_BACKEND_F_RESUME)),
    # Dirty page logging (brief §5).
    _suite("suite.dirty_log.covers_writes", MUST, sections.vhost_core("vhost_log_write"),
           "every page the device wrote into a writable buffer is marked in the dirty log",
           features=_LOG_ALL),
    _suite("suite.dirty_log.covers_used_ring", MUST, sections.vhost_core("vhost_add_used_n"),
           "used ring writes (entries, used idx, flags, avail_event) of a logged vring are marked",
           features=_LOG_ALL),
    _suite("suite.dirty_log.no_spurious", SHOULD, sections.vhost_core("vhost_log_write"),
           "the log marks no page the device did not write",
           features=_LOG_ALL),
    # The target itself.
    _suite("suite.target.alive", MUST, sections.vhost_vdpa("vhost_vdpa_fops"),
           "the target keeps answering: no crash, no EIO from a dead device, no closed fd, no hang"),
    # virtio-net loopback traffic (the simulator's TX to RX loopback).
    _suite("net.loopback.no_loss", MUST, sections.NET_RECEIVE,
           "a well-formed frame sent while receive buffers are available is received", devices=NET),
    _suite("net.rx.num_buffers", MUST, NET_RECEIVE_DEVICE,
           "a received packet's header says in num_buffers how many buffers it spans: 1 without MRG_RXBUF",
           devices=NET),
    _suite("net.loopback.no_duplicate", MUST, sections.NET_RECEIVE,
           "every transmitted frame is received at most once", devices=NET),
    _suite("net.loopback.order", MUST, _VDPA_SIM_NET,
           "frames of one queue pair are received in the order they were transmitted", devices=NET),
    _suite("net.loopback.payload_intact", MUST, sections.NET_TRANSMIT,
           "a received frame carries the transmitted bytes unchanged (sequence number and checksum)",
           devices=NET),
    # virtio-blk data.
    _suite("blk.data.integrity", MUST, sections.BLK_OPERATION_DEVICE,
           "a sector reads back the data most recently written, discarded or zeroed", devices=BLK),
)


@functools.lru_cache(maxsize=1)
def catalog() -> tuple[Clause, ...]:
    """Every clause: the model's rules, then rules known only through quirks, then the suite's; ids unique."""
    model = _from_model()
    known = {c.id for c in model}
    entries = [*model, *_from_quirks(known), *SUITE_CLAUSES]
    ids = [c.id for c in entries]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise RuntimeError(f"clause ids must be unique: {duplicates}")
    return tuple(entries)


@functools.lru_cache(maxsize=1)
def _by_id() -> dict[str, Clause]:
    return {c.id: c for c in catalog()}


class UnknownClause(KeyError):
    """A clause id the catalog does not hold; the message names the closest ids (likely typos)."""

    def __init__(self, clause_id: str, known: Iterable[str]) -> None:
        known = list(known)
        close = difflib.get_close_matches(clause_id, known, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        self.message = f"no clause {clause_id!r} in the catalog ({len(known)} clauses){hint}"
        super().__init__(self.message)
        self.clause_id = clause_id

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return self.message


def clause(clause_id: str) -> Clause:
    """The clause ``clause_id``; :class:`UnknownClause` (a KeyError) naming the closest ids otherwise."""
    try:
        return _by_id()[clause_id]
    except KeyError:
        raise UnknownClause(clause_id, _by_id()) from None


def is_clause(clause_id: str) -> bool:
    return clause_id in _by_id()


def clause_for_rule(rule: str | None, fallback: str = "suite.lockstep.errno") -> Clause:
    """The clause a lockstep mismatch cites: the model rule that decided the outcome, else ``fallback``."""
    if rule is not None and rule in _by_id():
        return _by_id()[rule]
    return clause(fallback)


def for_device(device_id: int, features: int | None = None, backend_features: int | None = None,
               clauses: Iterable[Clause] | None = None) -> tuple[Clause, ...]:
    """The clauses that apply to a device (see :meth:`Clause.not_applicable_reason`)."""
    return tuple(c for c in (catalog() if clauses is None else clauses)
                 if c.applies_to(device_id, features, backend_features))


def not_applicable(device_id: int, features: int | None = None, backend_features: int | None = None,
                   clauses: Iterable[Clause] | None = None) -> dict[str, str]:
    """Clause id -> why it does not apply to this device, in catalog order."""
    reasons: dict[str, str] = {}
    for c in catalog() if clauses is None else clauses:
        reason = c.not_applicable_reason(device_id, features, backend_features, for_listing=True)
        if reason is not None:
            reasons[c.id] = reason
    return reasons
