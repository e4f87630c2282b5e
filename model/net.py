"""virtio-net as the spec defines it, and the loopback the vdpacert reference device adds.

Four parts, each a small table or a pure function:

- the config layout (§5.1.4, 24 bytes up to ``supported_hash_types``) and the device-side
  rules on its values (:func:`config_violations`);
- the virtqueue index layout (§5.1.2): receiveq1, transmitq1, ..., receiveqN, transmitqN,
  controlq at 2N, where N is ``max_virtqueue_pairs`` once MQ or RSS is negotiated, else 1;
- ``struct virtio_net_hdr_v1`` (12 bytes) and the control virtqueue: :data:`CTRL_COMMANDS`
  is the command table, :func:`apply_ctrl` the pure transition
  ``(state, features, class, cmd, payload) -> (ack, new_state)``;
- :class:`LoopbackNet`: every frame the driver transmits on transmitqN comes back, in order,
  on receiveqN, behind a ``virtio_net_hdr_v1`` rebuilt as §5.1.6.4 requires.

How binding an answer is: an ack of OK for a command whose feature was negotiated and whose
payload is well formed is MUST (the device must support it). An ERR for a command the driver
was not allowed to send (feature not negotiated, short or long payload, out-of-range value,
unknown class or command) is the reference device's answer where the spec binds only the
driver; it is graded SHOULD, and the broken driver rule is listed with the decision. Such a
command changes nothing in the model, except where the spec leaves its effect open: after a
MAC_ADDR_SET the driver malformed, the device's mac is whatever it reports next
(``NetDeviceState.mac_determinate``, :class:`Unbound`); a well-formed one still sets exactly
the address it carries (MUST).

Every rule is a named constant or a table row: the config rules (``CONFIG_*``), the transmit
and receive decisions (``TX_*``, ``RX_*``) and the driver's transmit duties (``DRIVER_TX_*``),
and, per control command, the rows of :data:`CTRL_RULES` (``net.ctrl.<command>.<case>`` for
the device's answer, ``net.ctrl.driver.<command>.<case>`` for the driver's duty). :data:`RULES`
lists them all.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final, cast

from vdpacert.uapi import virtio_net as uapi
from vdpacert.uapi.virtio_ids import VIRTIO_ID_NET

from . import sections
from .config_space import ConfigField, ConfigLayout, ConfigWriteRules, Presence, build_layout
from .features import is_valid as features_valid
from .spec import Citation, Level, Rule, Section, SpecError, Violation

__all__ = [
    "CTRL_COMMANDS",
    "CTRL_RULES",
    "NET_CONFIG_LAYOUT",
    "RULES",
    "CtrlCase",
    "CtrlCommand",
    "CtrlDecision",
    "CtrlRule",
    "LoopbackNet",
    "NetDeviceState",
    "NetHdr",
    "NetModelError",
    "NotModelled",
    "RxCompletion",
    "RxDrop",
    "TxOutcome",
    "Unbound",
    "VqRole",
    "apply_ctrl",
    "complete_checksum",
    "config_violations",
    "controlq",
    "decide_ctrl",
    "queue_pairs",
    "receiveq",
    "transmitq",
    "virtqueue_count",
    "vq_role",
]

# Sections sections.py does not name (v1.3 numbering).
NET_VIRTQUEUES: Final = Section("5.1.2", "Network Device: Virtqueues")
NET_CONFIG_DRIVER: Final = Section(
    "5.1.4.2", "Network Device: Driver Requirements: Device configuration layout")
NET_TRANSMIT_DRIVER: Final = Section("5.1.6.2.1", "Network Device: Driver Requirements: Packet Transmission")
NET_TRANSMIT_DEVICE: Final = Section("5.1.6.2.2", "Network Device: Device Requirements: Packet Transmission")
NET_RX_BUFFERS: Final = Section("5.1.6.3", "Network Device: Setting Up Receive Buffers")
NET_RX_BUFFERS_DRIVER: Final = Section(
    "5.1.6.3.1", "Network Device: Driver Requirements: Setting Up Receive Buffers")
NET_RX_BUFFERS_DEVICE: Final = Section(
    "5.1.6.3.2", "Network Device: Device Requirements: Setting Up Receive Buffers")
NET_RECEIVE_DEVICE: Final = Section(
    "5.1.6.4.1", "Network Device: Device Requirements: Processing of Incoming Packets")
NET_CTRL_VLAN: Final = Section("5.1.6.5.3", "Network Device: VLAN Filtering")
NET_CTRL_ANNOUNCE: Final = Section("5.1.6.5.4", "Network Device: Gratuitous Packet Sending")
NET_CTRL_MQ_STEERING: Final = Section(
    "5.1.6.5.6", "Network Device: Automatic receive steering in multiqueue mode")

HDR_SIZE: Final = uapi.VIRTIO_NET_HDR_V1_SIZE
ETH_HLEN: Final = 14  # "plus low level ethernet header length" (§5.1.4.1)
MAC_LEN: Final = 6
VQ_PAIRS_MIN: Final = uapi.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN
VQ_PAIRS_MAX: Final = uapi.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX


class NetModelError(SpecError, ValueError):
    """Misuse of the net model: a queue that does not exist, a header too short to decode, ..."""


class NotModelled(NetModelError):
    """A negotiated feature whose behaviour the loopback model does not predict (HASH_REPORT)."""


def _has(features: int, bit: int) -> bool:
    return bool(features >> bit & 1)


# --------------------------------------------------------------------------------------------
# Configuration layout (§5.1.4).
# --------------------------------------------------------------------------------------------
#: §5.1.4.2: the driver must not write any config field. No field is writable, so there is no
#: rule for partial writes: any write that hits a field is a write to a read-only field.
CONFIG_WRITE_RULES: Final = ConfigWriteRules(
    unmapped=Rule("net.config.driver_write.unmapped", Level.MUST, NET_CONFIG_DRIVER,
                  "the driver must not write the device configuration, not even a write that hits no field"),
    read_only=Rule("net.config.driver_write.read_only", Level.MUST, NET_CONFIG_DRIVER,
                   "the driver must not write any device configuration field"),
)


def _f(name: str, offset: int, size: int, *exists: int, **extra: object) -> ConfigField:
    return ConfigField(name, offset, size, sections.NET_CONFIG, exists_if=tuple(exists),
                       **extra)  # type: ignore[arg-type]


NET_CONFIG_LAYOUT: Final[ConfigLayout] = build_layout(
    "net", uapi.VIRTIO_NET_CONFIG_SIZE, sections.NET_CONFIG, (
    _f("mac", uapi.VIRTIO_NET_CONFIG_MAC, MAC_LEN, is_bytes=True, valid_if=(uapi.VIRTIO_NET_F_MAC,),
       summary="always exists, only valid with VIRTIO_NET_F_MAC"),
    _f("status", uapi.VIRTIO_NET_CONFIG_STATUS, 2, uapi.VIRTIO_NET_F_STATUS),
    _f("max_virtqueue_pairs", uapi.VIRTIO_NET_CONFIG_MAX_VIRTQUEUE_PAIRS, 2, uapi.VIRTIO_NET_F_MQ,
       uapi.VIRTIO_NET_F_RSS),
    _f("mtu", uapi.VIRTIO_NET_CONFIG_MTU, 2, uapi.VIRTIO_NET_F_MTU),
    _f("speed", uapi.VIRTIO_NET_CONFIG_SPEED, 4, uapi.VIRTIO_NET_F_SPEED_DUPLEX),
    _f("duplex", uapi.VIRTIO_NET_CONFIG_DUPLEX, 1, uapi.VIRTIO_NET_F_SPEED_DUPLEX),
    _f("rss_max_key_size", 17, 1, uapi.VIRTIO_NET_F_RSS, uapi.VIRTIO_NET_F_HASH_REPORT),
    _f("rss_max_indirection_table_length", 18, 2, uapi.VIRTIO_NET_F_RSS),
    _f("supported_hash_types", 20, 4, uapi.VIRTIO_NET_F_RSS, uapi.VIRTIO_NET_F_HASH_REPORT),
), write_rules=CONFIG_WRITE_RULES)

SPEED_UNKNOWN: Final = 0xFFFFFFFF
SPEED_MAX: Final = 0x7FFFFFFF
DUPLEX_VALUES: Final = frozenset({0x00, 0x01, 0xFF})  # half, full, unknown

# The device's rules on its config values (§5.1.4.1), checked by :func:`config_violations`.
CONFIG_MTU_RANGE: Final = Rule(
    "net.config.mtu.range", Level.MUST, sections.NET_CONFIG_DEVICE,
    "with VIRTIO_NET_F_MTU offered, mtu is within 68..65535")
CONFIG_MTU_MIN_1280: Final = Rule(
    "net.config.mtu.min_1280", Level.SHOULD, sections.NET_CONFIG_DEVICE,
    "with VIRTIO_NET_F_MTU offered, mtu is at least 1280")
CONFIG_SPEED_RANGE: Final = Rule(
    "net.config.speed.range", Level.MUST, sections.NET_CONFIG_DEVICE,
    "speed is a count of Mbit/s within 0..0x7fffffff, or 0xffffffff for unknown")
CONFIG_DUPLEX_VALUE: Final = Rule(
    "net.config.duplex.value", Level.MUST, sections.NET_CONFIG_DEVICE,
    "duplex is 0x00 (half), 0x01 (full) or 0xff (unknown)")
CONFIG_VALUE_RULES: Final[tuple[Rule, ...]] = (CONFIG_MTU_RANGE, CONFIG_MTU_MIN_1280, CONFIG_SPEED_RANGE,
                                               CONFIG_DUPLEX_VALUE)


# --------------------------------------------------------------------------------------------
# Device state.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NetDeviceState:
    """What a virtio-net device remembers: config values and what the control queue set.

    ``permanent_mac`` is the address the device was created with; ``mac`` is the current
    default address (VIRTIO_NET_CTRL_MAC_ADDR_SET changes it). ``mac_determinate`` False means
    the spec no longer binds the device's mac: a MAC_ADDR_SET the driver malformed (wrong length,
    or sent without CTRL_MAC_ADDR) may have left any address there (a device may copy part of the
    data, as Linux's vdpa_sim does), so whatever the device reports next is the mac
    (:meth:`with_mac_seen`); ``mac`` then keeps the address before that command, which a device
    that changes nothing still shows. ``curr_queue_pairs`` starts at
    1: multiqueue is off until the driver enables it (§5.1.6.5.5). The RX mode flags mirror
    the VIRTIO_NET_CTRL_RX commands; the spec fixes no reset value for them, and the model
    starts with all of them off.
    """

    permanent_mac: bytes = bytes(MAC_LEN)
    mac: bytes | None = None
    status: int = uapi.VIRTIO_NET_S_LINK_UP
    max_virtqueue_pairs: int = 1
    mtu: int = 1500
    speed: int = SPEED_UNKNOWN
    duplex: int = 0xFF
    curr_queue_pairs: int = 1
    promisc: bool = False
    allmulti: bool = False
    alluni: bool = False
    nomulti: bool = False
    nouni: bool = False
    nobcast: bool = False
    mac_table_uni: tuple[bytes, ...] = ()
    mac_table_multi: tuple[bytes, ...] = ()
    vlans: frozenset[int] = field(default_factory=frozenset)
    mac_determinate: bool = True

    def __post_init__(self) -> None:
        if len(self.permanent_mac) != MAC_LEN:
            raise NetModelError("a MAC address is 6 bytes")
        if self.mac is None:
            object.__setattr__(self, "mac", bytes(self.permanent_mac))
        elif len(self.mac) != MAC_LEN:
            raise NetModelError("a MAC address is 6 bytes")
        if not 0 <= self.status <= 0xFFFF or not 0 <= self.mtu <= 0xFFFF or not 0 <= self.speed <= 0xFFFFFFFF:
            raise NetModelError("status, mtu and speed must fit their config fields")
        if not 1 <= self.max_virtqueue_pairs <= VQ_PAIRS_MAX:
            raise NetModelError(f"max_virtqueue_pairs must be within 1..{VQ_PAIRS_MAX:#x}")
        if not 1 <= self.curr_queue_pairs <= self.max_virtqueue_pairs:
            raise NetModelError("curr_queue_pairs must be within 1..max_virtqueue_pairs")

    @property
    def current_mac(self) -> bytes:
        assert self.mac is not None  # filled in by __post_init__
        return self.mac

    def mac_allows(self, seen: bytes) -> bool:
        """Whether a device in this state may report ``seen`` as its config mac."""
        return not self.mac_determinate or bytes(seen) == self.current_mac

    def with_mac_seen(self, seen: bytes) -> NetDeviceState:
        """The state once the device reported ``seen`` as its mac: determinate again, at that address.

        Only for an indeterminate mac (a determinate one is compared, never replaced): the model takes
        what the spec left open from the device, like a resync of any other open outcome.
        """
        if self.mac_determinate:
            raise NetModelError("the mac is determinate: compare it with the device's, do not adopt the device's")
        return replace(self, mac=bytes(seen), mac_determinate=True)

    def after_reset(self) -> NetDeviceState:
        """The state after a device reset: control-queue settings gone, empty MAC table (§5.1.6.5.2)."""
        return NetDeviceState(self.permanent_mac, None, self.status, self.max_virtqueue_pairs, self.mtu,
                              self.speed, self.duplex)

    def config_values(self) -> dict[str, int | bytes]:
        return {"mac": self.current_mac, "status": self.status,
                "max_virtqueue_pairs": self.max_virtqueue_pairs,
                "mtu": self.mtu, "speed": self.speed, "duplex": self.duplex}

    def render_config(self, offered: int) -> bytes:
        """The 24 config bytes a device offering ``offered`` exposes (absent fields read zero)."""
        values = {k: v for k, v in self.config_values().items()
                  if NET_CONFIG_LAYOUT.presence(k, offered) is not Presence.ABSENT}
        return NET_CONFIG_LAYOUT.render(values, offered=offered)


def config_violations(state: NetDeviceState, offered: int) -> list[Violation]:
    """The device-side config rules (§5.1.4.1) that ``state``'s values break under ``offered``."""
    found = []
    if _has(offered, uapi.VIRTIO_NET_F_MTU):
        if not 68 <= state.mtu <= 65535:
            found.append(CONFIG_MTU_RANGE.violation(f"mtu {state.mtu} outside 68..65535"))
        elif state.mtu < 1280:
            found.append(CONFIG_MTU_MIN_1280.violation(f"mtu {state.mtu} below 1280"))
    if _has(offered, uapi.VIRTIO_NET_F_SPEED_DUPLEX):
        if state.speed > SPEED_MAX and state.speed != SPEED_UNKNOWN:
            found.append(CONFIG_SPEED_RANGE.violation(
                f"speed {state.speed:#x} is neither 0..0x7fffffff nor 0xffffffff"))
        if state.duplex not in DUPLEX_VALUES:
            found.append(CONFIG_DUPLEX_VALUE.violation(f"duplex {state.duplex:#x} is not 0x00, 0x01 or 0xff"))
    return found


# --------------------------------------------------------------------------------------------
# Virtqueue layout (§5.1.2).
# --------------------------------------------------------------------------------------------
def queue_pairs(features: int, max_virtqueue_pairs: int) -> int:
    """N, the number of receive/transmit pairs that exist: max_virtqueue_pairs with MQ or RSS, else 1."""
    if not 1 <= max_virtqueue_pairs <= VQ_PAIRS_MAX:
        raise NetModelError(f"max_virtqueue_pairs must be within 1..{VQ_PAIRS_MAX:#x}")
    if _has(features, uapi.VIRTIO_NET_F_MQ) or _has(features, uapi.VIRTIO_NET_F_RSS):
        return max_virtqueue_pairs
    return 1


def receiveq(n: int) -> int:
    """The virtqueue index of receiveq\\ *n* (1-based, as the spec names them)."""
    if n < 1:
        raise NetModelError("queue pairs are numbered from 1")
    return 2 * (n - 1)


def transmitq(n: int) -> int:
    """The virtqueue index of transmitq\\ *n* (1-based)."""
    return receiveq(n) + 1


def controlq(features: int, max_virtqueue_pairs: int) -> int | None:
    """The control virtqueue's index, 2N, or None when VIRTIO_NET_F_CTRL_VQ is not negotiated."""
    n = queue_pairs(features, max_virtqueue_pairs)
    return 2 * n if _has(features, uapi.VIRTIO_NET_F_CTRL_VQ) else None


def virtqueue_count(features: int, max_virtqueue_pairs: int) -> int:
    """All virtqueues that exist: 2N data queues plus the controlq when CTRL_VQ is negotiated."""
    ctrl = 1 if _has(features, uapi.VIRTIO_NET_F_CTRL_VQ) else 0
    return 2 * queue_pairs(features, max_virtqueue_pairs) + ctrl


@dataclass(frozen=True)
class VqRole:
    """What a virtqueue index is: ``kind`` "rx", "tx" or "ctrl", and its pair (None for ctrl)."""

    kind: str
    pair: int | None


def vq_role(index: int, features: int, max_virtqueue_pairs: int) -> VqRole:
    n = queue_pairs(features, max_virtqueue_pairs)
    if 0 <= index < 2 * n:
        return VqRole("rx" if index % 2 == 0 else "tx", index // 2 + 1)
    if index == controlq(features, max_virtqueue_pairs):
        return VqRole("ctrl", None)
    raise NetModelError(f"virtqueue {index} does not exist with {n} pair(s) under these features")


# --------------------------------------------------------------------------------------------
# struct virtio_net_hdr_v1 (§5.1.6).
# --------------------------------------------------------------------------------------------
_HDR: Final = struct.Struct("<BBHHHHH")


@dataclass(frozen=True)
class NetHdr:
    """``struct virtio_net_hdr_v1``: the 12 bytes in front of every frame (without HASH_REPORT)."""

    flags: int = 0
    gso_type: int = uapi.VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    def encode(self) -> bytes:
        try:
            return _HDR.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start,
                             self.csum_offset, self.num_buffers)
        except struct.error as exc:
            raise NetModelError(f"header field out of range: {exc}") from None

    @classmethod
    def decode(cls, raw: bytes) -> NetHdr:
        if len(raw) < HDR_SIZE:
            raise NetModelError(f"virtio_net_hdr_v1 is {HDR_SIZE} bytes, got {len(raw)}")
        return cls(*_HDR.unpack_from(raw))


def complete_checksum(frame: bytes, csum_start: int, csum_offset: int) -> bytes:
    """Finish a partial checksum as a device does for VIRTIO_NET_HDR_F_NEEDS_CSUM (§5.1.6.2).

    The 16-bit ones' complement sum runs from ``csum_start`` to the end of the frame (the
    checksum field already holds the pseudo-header sum) and its complement is stored,
    big-endian, at ``csum_start + csum_offset``.
    """
    at = csum_start + csum_offset
    if at + 2 > len(frame):
        raise NetModelError("checksum field lies outside the frame")
    body = frame[csum_start:]
    if len(body) % 2:
        body += b"\0"
    total = sum(int.from_bytes(body[i:i + 2], "big") for i in range(0, len(body), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return frame[:at] + ((~total) & 0xFFFF).to_bytes(2, "big") + frame[at + 2:]


# --------------------------------------------------------------------------------------------
# Control virtqueue (§5.1.6.5).
# --------------------------------------------------------------------------------------------
Effect = Callable[[NetDeviceState, bytes], NetDeviceState | str]


@dataclass(frozen=True)
class CtrlCommand:
    """One control command: class, command, the feature it needs, its payload and its effect.

    ``payload_len`` is the exact command-specific-data length (None: variable, checked by the
    effect). ``effect`` returns the new state, or a string saying why the device answers ERR;
    ``refuses_values`` says whether it ever does (so the command has a ``bad_value`` rule).
    ``driver_section`` is where the driver is forbidden to send it without ``feature``.
    ``breach`` (None for most commands) is what the command leaves open once the driver broke
    one of its MUST rules (not negotiated, wrong length) and the spec gives the device no duty
    beyond the SHOULD ERR: the model's state marks that part indeterminate (see :class:`Unbound`).
    """

    name: str
    cls: int
    cmd: int
    feature: int
    payload_len: int | None
    effect: Effect
    section: Section
    driver_section: Section
    refuses_values: bool
    breach: Unbound | None = None

    def cases(self) -> tuple[CtrlCase, ...]:
        """The cases this command can end in, so the rows of :data:`CTRL_RULES` it has."""
        return tuple(case for case, applies in (
            (CtrlCase.OK, True),
            (CtrlCase.NOT_NEGOTIATED, True),
            (CtrlCase.PAYLOAD_LENGTH, self.payload_len is not None),
            (CtrlCase.BAD_VALUE, self.refuses_values),
        ) if applies)

    def answer(self, case: CtrlCase) -> CtrlRule:
        """The device's answer in ``case`` (a row of :data:`CTRL_RULES`)."""
        return CTRL_RULES[self.name, case, False]

    def duty(self, case: CtrlCase) -> CtrlRule:
        """The driver rule broken in the error ``case`` (a row of :data:`CTRL_RULES`)."""
        return CTRL_RULES[self.name, case, True]


@dataclass(frozen=True)
class Unbound:
    """What a command the driver malformed leaves open: ``what`` it may have changed, and ``loosen``,
    the model's state with that part indeterminate.

    MAC_ADDR_SET is the case: §5.1.6.5.2 binds the device only to update mac before it consumes a
    (well-formed) MAC_ADDR_SET, and no clause keeps an ERR'd or malformed command from touching it;
    the driver, which had to send exactly the 6-byte address with CTRL_MAC_ADDR negotiated, broke a
    MUST. Linux's vdpa_sim_net copies the data straight into its config mac (part of it when short,
    the first 6 bytes when long) and does not look at the feature.
    """

    what: str
    loosen: Callable[[NetDeviceState], NetDeviceState]


class CtrlCase(enum.Enum):
    """How a known control command ends; the value is the last part of its rule ids."""

    OK = "ok"
    NOT_NEGOTIATED = "not_negotiated"
    PAYLOAD_LENGTH = "payload_length"
    BAD_VALUE = "bad_value"


@dataclass(frozen=True)
class CtrlRule:
    """One rule of one control command: the device's answer in a case (``driver`` False: OK
    is MUST, ERR for a command the driver should not have sent is SHOULD), or the driver
    rule that case breaks (``driver`` True, MUST). Ids: ``net.ctrl[.driver].<command>.<case>``."""

    command: str
    case: CtrlCase
    driver: bool
    level: Level
    citation: Citation
    summary: str

    @property
    def rule(self) -> str:
        side = "driver." if self.driver else ""
        return f"net.ctrl.{side}{self.command}.{self.case.value}"

    def violation(self, detail: str) -> Violation:
        return Violation(self.rule, self.level, self.citation, f"{self.summary}: {detail}")


def _rx_flag(attr: str) -> Effect:
    def effect(state: NetDeviceState, payload: bytes) -> NetDeviceState | str:
        if payload[0] not in (0, 1):
            return f"{attr} takes 0 (off) or 1 (on), got {payload[0]}"
        return replace(state, **cast(dict[str, Any], {attr: bool(payload[0])}))
    return effect


def _mac_table_set(state: NetDeviceState, payload: bytes) -> NetDeviceState | str:
    tables: list[tuple[bytes, ...]] = []
    at = 0
    for _ in range(2):
        if at + 4 > len(payload):
            return "MAC table truncated before its entry count"
        (entries,) = struct.unpack_from("<I", payload, at)
        at += 4
        end = at + entries * MAC_LEN
        if end > len(payload):
            return f"MAC table announces {entries} entries but the payload is shorter"
        tables.append(tuple(payload[i:i + MAC_LEN] for i in range(at, end, MAC_LEN)))
        at = end
    if at != len(payload):
        return "trailing bytes after the two MAC tables"
    return replace(state, mac_table_uni=tables[0], mac_table_multi=tables[1])


def _mac_addr_set(state: NetDeviceState, payload: bytes) -> NetDeviceState | str:
    return replace(state, mac=bytes(payload), mac_determinate=True)


def _mac_unbound(state: NetDeviceState) -> NetDeviceState:
    return replace(state, mac_determinate=False)


def _vlan(add: bool) -> Effect:
    def effect(state: NetDeviceState, payload: bytes) -> NetDeviceState | str:
        (vid,) = struct.unpack("<H", payload)
        if vid > 4095:
            return f"VLAN id {vid} is not a 12-bit id"
        return replace(state, vlans=state.vlans | {vid} if add else state.vlans - {vid})
    return effect


def _announce_ack(state: NetDeviceState, payload: bytes) -> NetDeviceState | str:
    return replace(state, status=state.status & ~uapi.VIRTIO_NET_S_ANNOUNCE)


def _vq_pairs_set(state: NetDeviceState, payload: bytes) -> NetDeviceState | str:
    (pairs,) = struct.unpack("<H", payload)
    if not VQ_PAIRS_MIN <= pairs <= state.max_virtqueue_pairs:
        return f"virtqueue_pairs {pairs} outside 1..max_virtqueue_pairs ({state.max_virtqueue_pairs})"
    return replace(state, curr_queue_pairs=pairs)


def _cmd(name: str, cls: int, cmd: int, feature: int, payload_len: int | None, effect: Effect,
         section: Section, driver_section: Section | None = None, *, refuses_values: bool = True,
         breach: Unbound | None = None) -> CtrlCommand:
    return CtrlCommand(name, cls, cmd, feature, payload_len, effect, section, driver_section or section,
                       refuses_values, breach)


_RX, _MAC, _MQ = uapi.VIRTIO_NET_CTRL_RX, uapi.VIRTIO_NET_CTRL_MAC, uapi.VIRTIO_NET_CTRL_MQ
_F_RX, _F_RX_EXTRA = uapi.VIRTIO_NET_F_CTRL_RX, uapi.VIRTIO_NET_F_CTRL_RX_EXTRA

#: The control commands the model knows, keyed by (class, command).
CTRL_COMMANDS: Final[Mapping[tuple[int, int], CtrlCommand]] = MappingProxyType({(c.cls, c.cmd): c for c in (
    _cmd("RX_PROMISC", _RX, uapi.VIRTIO_NET_CTRL_RX_PROMISC, _F_RX, 1, _rx_flag("promisc"),
         sections.NET_CTRL_RX),
    _cmd("RX_ALLMULTI", _RX, uapi.VIRTIO_NET_CTRL_RX_ALLMULTI, _F_RX, 1, _rx_flag("allmulti"),
         sections.NET_CTRL_RX),
    _cmd("RX_ALLUNI", _RX, uapi.VIRTIO_NET_CTRL_RX_ALLUNI, _F_RX_EXTRA, 1, _rx_flag("alluni"),
         sections.NET_CTRL_RX),
    _cmd("RX_NOMULTI", _RX, uapi.VIRTIO_NET_CTRL_RX_NOMULTI, _F_RX_EXTRA, 1, _rx_flag("nomulti"),
         sections.NET_CTRL_RX),
    _cmd("RX_NOUNI", _RX, uapi.VIRTIO_NET_CTRL_RX_NOUNI, _F_RX_EXTRA, 1, _rx_flag("nouni"),
         sections.NET_CTRL_RX),
    _cmd("RX_NOBCAST", _RX, uapi.VIRTIO_NET_CTRL_RX_NOBCAST, _F_RX_EXTRA, 1, _rx_flag("nobcast"),
         sections.NET_CTRL_RX),
    _cmd("MAC_TABLE_SET", _MAC, uapi.VIRTIO_NET_CTRL_MAC_TABLE_SET, _F_RX, None, _mac_table_set,
         sections.NET_CTRL_MAC),
    # CTRL_MAC_ADDR is the feature "set MAC address through control channel" (§5.1.3).
    _cmd("MAC_ADDR_SET", _MAC, uapi.VIRTIO_NET_CTRL_MAC_ADDR_SET, uapi.VIRTIO_NET_F_CTRL_MAC_ADDR, MAC_LEN,
         _mac_addr_set, sections.NET_CTRL_MAC, sections.NET_FEATURE_BITS, refuses_values=False,
         breach=Unbound("mac", _mac_unbound)),
    _cmd("VLAN_ADD", uapi.VIRTIO_NET_CTRL_VLAN, uapi.VIRTIO_NET_CTRL_VLAN_ADD, uapi.VIRTIO_NET_F_CTRL_VLAN, 2,
         _vlan(True), NET_CTRL_VLAN),
    _cmd("VLAN_DEL", uapi.VIRTIO_NET_CTRL_VLAN, uapi.VIRTIO_NET_CTRL_VLAN_DEL, uapi.VIRTIO_NET_F_CTRL_VLAN, 2,
         _vlan(False), NET_CTRL_VLAN),
    _cmd("ANNOUNCE_ACK", uapi.VIRTIO_NET_CTRL_ANNOUNCE, uapi.VIRTIO_NET_CTRL_ANNOUNCE_ACK,
         uapi.VIRTIO_NET_F_GUEST_ANNOUNCE, 0, _announce_ack, NET_CTRL_ANNOUNCE, refuses_values=False),
    _cmd("MQ_VQ_PAIRS_SET", _MQ, uapi.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, uapi.VIRTIO_NET_F_MQ, 2, _vq_pairs_set,
         NET_CTRL_MQ_STEERING),
)})


def _ctrl_rules(row: CtrlCommand) -> tuple[CtrlRule, ...]:
    """The rows of one command: each case's answer and, for the error cases, the driver's duty."""
    size = f"{row.payload_len} byte{'' if row.payload_len == 1 else 's'}"
    errors = {  # case: (the driver's duty, where it is written, what breaking it means)
        CtrlCase.NOT_NEGOTIATED: (f"{row.name} is sent only with feature bit {row.feature} negotiated",
                                  row.driver_section, "sent without its feature negotiated"),
        CtrlCase.PAYLOAD_LENGTH: (f"{row.name} carries exactly {size} of data", row.section,
                                  f"with other than {size} of data"),
        CtrlCase.BAD_VALUE: (f"{row.name} carries well-formed data with values the spec defines", row.section,
                             "with malformed data or a value the spec does not define"),
    }
    found = []
    for case in row.cases():
        if case is CtrlCase.OK:
            found.append(CtrlRule(row.name, case, False, Level.MUST, row.section,
                                  f"{row.name}, negotiated and well formed, is applied and acked OK"))
            continue
        duty, driver_citation, breach = errors[case]
        effect = ("changes nothing" if row.breach is None else
                  f"changes nothing but the {row.breach.what}, which the spec then leaves open")
        found.append(CtrlRule(row.name, case, False, Level.SHOULD, row.section,
                              f"{row.name} {breach} is acked ERR and {effect}"))
        found.append(CtrlRule(row.name, case, True, Level.MUST, driver_citation, duty))
    return tuple(found)


_CTRL_RULE_ROWS: Final[tuple[CtrlRule, ...]] = tuple(r for row in CTRL_COMMANDS.values() for r in _ctrl_rules(row))

#: Every rule of every known control command, keyed by (command name, case, is the driver's).
CTRL_RULES: Final[Mapping[tuple[str, CtrlCase, bool], CtrlRule]] = MappingProxyType(
    {(r.command, r.case, r.driver): r for r in _CTRL_RULE_ROWS})

CTRL_UNKNOWN: Final = Rule(
    "net.ctrl.unknown", Level.SHOULD, sections.NET_CONTROL_VQ,
    "a class or command the device does not know is acked ERR and changes nothing")


@dataclass(frozen=True)
class CtrlDecision:
    """The device's answer to one control command and the rule that fixes it."""

    ack: int
    state: NetDeviceState
    rule: str
    level: Level
    citation: Citation
    driver_violations: tuple[Violation, ...] = ()
    #: The driver broke a MUST of a command whose effect the spec then leaves open (:class:`Unbound`):
    #: ``state`` marks that part indeterminate, so a device that acted on the command anyway (acked
    #: OK, or changed it while acking ERR) is still in step with the model. Its ack is still held to
    #: the SHOULD answer (``level``).
    unbound: bool = False


def decide_ctrl(state: NetDeviceState, features: int, cls: int, cmd: int, payload: bytes) -> CtrlDecision:
    """Judge one command ``class``/``cmd`` with its command-specific-data ``payload``.

    ERR leaves the state untouched (a refused command has no effect), except for what a command the
    driver malformed leaves open (:attr:`CtrlCommand.breach`): that part becomes indeterminate.
    """
    if not _has(features, uapi.VIRTIO_NET_F_CTRL_VQ):
        raise NetModelError("no control virtqueue exists without VIRTIO_NET_F_CTRL_VQ (§5.1.2)")
    if not (0 <= cls <= 0xFF and 0 <= cmd <= 0xFF):
        raise NetModelError("class and command are single bytes")
    payload = bytes(payload)
    row = CTRL_COMMANDS.get((cls, cmd))

    if row is None:
        # No driver rule forbids an unknown command outright; the device just cannot honour it.
        return CtrlDecision(uapi.VIRTIO_NET_ERR, state, CTRL_UNKNOWN.rule, CTRL_UNKNOWN.level, CTRL_UNKNOWN.citation)
    command = row

    def err(case: CtrlCase, message: str) -> CtrlDecision:
        answer = command.answer(case)
        found = (command.duty(case).violation(message),)
        after = state if command.breach is None else command.breach.loosen(state)
        return CtrlDecision(uapi.VIRTIO_NET_ERR, after, answer.rule, answer.level, answer.citation, found,
                            unbound=command.breach is not None)

    if not _has(features, row.feature):
        return err(CtrlCase.NOT_NEGOTIATED, f"{row.name} sent without feature bit {row.feature}")
    if row.payload_len is not None and len(payload) != row.payload_len:
        return err(CtrlCase.PAYLOAD_LENGTH, f"{row.name} takes {row.payload_len} bytes of data, got {len(payload)}")
    outcome = row.effect(state, payload)
    if isinstance(outcome, str):
        return err(CtrlCase.BAD_VALUE, outcome)
    ok = row.answer(CtrlCase.OK)
    return CtrlDecision(uapi.VIRTIO_NET_OK, outcome, ok.rule, ok.level, ok.citation)


def apply_ctrl(state: NetDeviceState, features: int, cls: int, cmd: int,
               payload: bytes) -> tuple[int, NetDeviceState]:
    """``(ack, new_state)`` for one control command; see :func:`decide_ctrl` for the why."""
    decision = decide_ctrl(state, features, cls, cmd, payload)
    return decision.ack, decision.state


# --------------------------------------------------------------------------------------------
# The loopback (the reference device's data path).
# --------------------------------------------------------------------------------------------
_F = uapi
_NEEDS_CSUM: Final = uapi.VIRTIO_NET_HDR_F_NEEDS_CSUM
_ECN: Final = uapi.VIRTIO_NET_HDR_GSO_ECN

#: For each gso_type: the features of which one lets the driver send it (HOST_*, §5.1.6.2.1)
#: and of which one lets the device deliver it (GUEST_*, §5.1.6.4.1).
GSO_FEATURES: Final[Mapping[int, tuple[tuple[int, ...], tuple[int, ...]]]] = MappingProxyType({
    _F.VIRTIO_NET_HDR_GSO_TCPV4: ((_F.VIRTIO_NET_F_HOST_TSO4,), (_F.VIRTIO_NET_F_GUEST_TSO4,)),
    _F.VIRTIO_NET_HDR_GSO_TCPV6: ((_F.VIRTIO_NET_F_HOST_TSO6,), (_F.VIRTIO_NET_F_GUEST_TSO6,)),
    _F.VIRTIO_NET_HDR_GSO_UDP: ((_F.VIRTIO_NET_F_HOST_UFO,), (_F.VIRTIO_NET_F_GUEST_UFO,)),
    _F.VIRTIO_NET_HDR_GSO_UDP_L4: ((_F.VIRTIO_NET_F_HOST_USO,),
                                   (_F.VIRTIO_NET_F_GUEST_USO4, _F.VIRTIO_NET_F_GUEST_USO6)),
})


# What the device does with a transmitted packet, and with a frame it cannot deliver.
TX_SHORT_HEADER: Final = Rule(
    "net.tx.short_header", Level.MUST, sections.NET_OPERATION,
    "a transmit buffer too short for virtio_net_hdr_v1 is dropped")
TX_INACTIVE_PAIR: Final = Rule(
    "net.tx.inactive_pair", Level.MUST, NET_CTRL_MQ_STEERING,
    "a packet on a transmitq beyond the enabled pairs is not transmitted")
TX_GSO_NOT_NEGOTIATED: Final = Rule(
    "net.tx.gso_not_negotiated", Level.SHOULD, NET_TRANSMIT_DRIVER,
    "a GSO packet without its HOST_* feature or without NEEDS_CSUM is dropped")
TX_GSO_NOT_RECEIVABLE: Final = Rule(
    "net.tx.gso_not_receivable", Level.MUST, NET_RECEIVE_DEVICE,
    "a GSO packet the receiving side did not negotiate (GUEST_*, GUEST_ECN) is not delivered as GSO: dropped")
TX_OVER_MTU: Final = Rule(
    "net.tx.over_mtu", Level.MUST, sections.NET_CONFIG_DEVICE,
    "with MTU negotiated, a non-GSO frame longer than mtu plus the Ethernet header is not passed")
TX_OVER_LINK_MTU: Final = Rule(
    "net.tx.over_link_mtu", Level.SHOULD, NET_RX_BUFFERS_DRIVER,
    "without MTU negotiated, a non-GSO frame longer than the device's link mtu plus the Ethernet header is "
    "dropped: receivers size their buffers for 1514-byte frames (1526 with the header)")
TX_BAD_CSUM_OFFSETS: Final = Rule(
    "net.tx.bad_csum_offsets", Level.SHOULD, NET_TRANSMIT_DEVICE,
    "a NEEDS_CSUM packet whose checksum field lies outside the frame is dropped")
TX_LOOPED_BACK: Final = Rule(
    "net.tx.looped_back", Level.MUST, NET_TRANSMIT_DEVICE,
    "a well-formed packet is transmitted: the loopback queues it for the receiveq of its pair")
RX_INACTIVE_PAIR: Final = Rule(
    "net.rx.inactive_pair", Level.MUST, NET_CTRL_MQ_STEERING,
    "nothing is delivered on a receiveq beyond the enabled pairs")
# SHOULD: the device clauses only bind it to one descriptor per packet without MRG_RXBUF (§5.1.6.3.2) and
# the receive description has the whole packet in that buffer (§5.1.6.4), so a truncated delivery breaks
# the description, not a MUST. Writing past the buffer is another matter: the memory check fails it.
RX_TOO_BIG_FOR_BUFFER: Final = Rule(
    "net.rx.too_big_for_buffer", Level.SHOULD, NET_RX_BUFFERS_DEVICE,
    "without MRG_RXBUF a frame that does not fit the next buffer is dropped, not delivered truncated")

# What the driver must do on transmit (§5.1.6, §5.1.6.2.1).
DRIVER_TX_SHORT_HEADER: Final = Rule(
    "net.driver.tx.short_header", Level.MUST, sections.NET_OPERATION,
    "every transmitted packet starts with virtio_net_hdr_v1")
DRIVER_TX_NUM_BUFFERS: Final = Rule(
    "net.driver.tx.num_buffers", Level.MUST, NET_TRANSMIT_DRIVER, "num_buffers is zero on transmit")
DRIVER_TX_FLAGS: Final = Rule(
    "net.driver.tx.flags", Level.MUST, NET_TRANSMIT_DRIVER, "only NEEDS_CSUM may be set in flags on transmit")
DRIVER_TX_FLAGS_WITHOUT_CSUM: Final = Rule(
    "net.driver.tx.flags_without_csum", Level.MUST, NET_TRANSMIT_DRIVER,
    "NEEDS_CSUM is set only with VIRTIO_NET_F_CSUM negotiated")
DRIVER_TX_INACTIVE_PAIR: Final = Rule(
    "net.driver.tx.inactive_pair", Level.MUST, NET_TRANSMIT_DRIVER,
    "the driver transmits only on the queue pairs it enabled")
DRIVER_TX_GSO: Final = Rule(
    "net.driver.tx.gso", Level.MUST, NET_TRANSMIT_DRIVER,
    "a gso_type is set only with its HOST_* feature negotiated, and with NEEDS_CSUM")
DRIVER_TX_MTU: Final = Rule(
    "net.driver.tx.mtu", Level.MUST, NET_TRANSMIT_DRIVER,
    "with MTU negotiated, a non-GSO frame is at most mtu plus the Ethernet header")
DRIVER_TX_CSUM_OFFSETS: Final = Rule(
    "net.driver.tx.csum_offsets", Level.MUST, NET_TRANSMIT_DRIVER,
    "csum_start + csum_offset points at a checksum field inside the frame")

TX_RULES: Final[tuple[Rule, ...]] = (TX_SHORT_HEADER, TX_INACTIVE_PAIR, TX_GSO_NOT_NEGOTIATED, TX_GSO_NOT_RECEIVABLE,
                                     TX_OVER_MTU, TX_OVER_LINK_MTU, TX_BAD_CSUM_OFFSETS, TX_LOOPED_BACK)
RX_RULES: Final[tuple[Rule, ...]] = (RX_INACTIVE_PAIR, RX_TOO_BIG_FOR_BUFFER)
DRIVER_TX_RULES: Final[tuple[Rule, ...]] = (
    DRIVER_TX_SHORT_HEADER, DRIVER_TX_NUM_BUFFERS, DRIVER_TX_FLAGS, DRIVER_TX_FLAGS_WITHOUT_CSUM,
    DRIVER_TX_INACTIVE_PAIR, DRIVER_TX_GSO, DRIVER_TX_MTU, DRIVER_TX_CSUM_OFFSETS)

#: Every rule of this module.
RULES: Final[tuple[Rule | CtrlRule, ...]] = (
    *NET_CONFIG_LAYOUT.rules, *CONFIG_VALUE_RULES, *_CTRL_RULE_ROWS, CTRL_UNKNOWN, *TX_RULES, *RX_RULES,
    *DRIVER_TX_RULES)


@dataclass(frozen=True)
class TxOutcome:
    """What happens to one transmitted packet: queued for loopback, or dropped, and why."""

    accepted: bool
    rule: str
    level: Level
    citation: Citation
    driver_violations: tuple[Violation, ...] = ()
    used_len: int = 0  # the device writes nothing into a transmit buffer


@dataclass(frozen=True)
class RxCompletion:
    """One frame delivered on receiveq ``pair``: the buffers it used and what went in each."""

    pair: int
    buffer_ids: tuple[int, ...]
    used_lens: tuple[int, ...]
    chunks: tuple[bytes, ...]
    header: NetHdr
    frame: bytes


@dataclass(frozen=True)
class RxDrop:
    """A frame the device drops on the receive side, and the rule that makes it drop."""

    pair: int
    frame: bytes
    rule: str
    level: Level
    citation: Citation


@dataclass
class _Pending:
    header: NetHdr
    frame: bytes


class LoopbackNet:
    """The reference device's loopback: transmitq\\ *i* feeds receiveq\\ *i*, in order.

    No I/O: ``transmit`` takes a packet (header + frame, as the driver wrote it), ``post_rx``
    makes a receive buffer available, ``deliver`` says what the device puts into the posted
    buffers. Decisions, each with its rule:

    - The receive header is rebuilt, not copied: ``num_buffers`` is 1 without MRG_RXBUF and
      the number of buffers used with it (§5.1.6.4.1); NEEDS_CSUM passes through only when
      GUEST_CSUM is negotiated, otherwise the device completes the checksum and sends
      ``flags`` 0 (MUST set flags to zero, SHOULD supply a checksummed packet); a GSO packet
      keeps its gso fields only when a matching GUEST_* feature is negotiated, otherwise it is
      dropped (the device may not set that gso_type and the model does not segment).
    - A frame that does not fit the next posted buffer without MRG_RXBUF is dropped and the
      buffer stays posted: the device must use a single buffer (§5.1.6.3.2) and must not write
      beyond it. With MRG_RXBUF it spreads over as many buffers as needed, filling all but the
      last completely (§5.1.6.4.1); until enough buffers are posted, the frame waits.
    - The loopback applies no receive filter: filtering is best-effort and SHOULD-level
      (§5.1.6.5.1, §5.1.6.5.2), and a loopback that keeps every frame stays conforming.
    - Frames longer than ``mtu`` plus the Ethernet header with gso_type NONE are dropped once
      MTU is negotiated: the device must not pass them (§5.1.4.1). Without MTU negotiated they
      are dropped too (SHOULD): ``mtu`` is still the device's link MTU, and receivers size their
      buffers for 1514-byte frames (§5.1.6.3.1).
    """

    def __init__(self, features: int, state: NetDeviceState | None = None) -> None:
        if _has(features, uapi.VIRTIO_NET_F_HASH_REPORT):
            raise NotModelled("HASH_REPORT lengthens the header to 20 bytes; the loopback model does not")
        if not features_valid(VIRTIO_ID_NET, features):
            raise NetModelError("the negotiated feature set breaks a MUST rule (see features.violations)")
        self.features = features
        self.state = state or NetDeviceState()
        self.pairs = queue_pairs(features, self.state.max_virtqueue_pairs)
        self._pending: dict[int, deque[_Pending]] = {p: deque() for p in range(1, self.pairs + 1)}
        self._rx: dict[int, deque[tuple[int, int]]] = {p: deque() for p in range(1, self.pairs + 1)}

    # -- queues ----------------------------------------------------------------------------
    def _check_pair(self, pair: int) -> None:
        if not 1 <= pair <= self.pairs:
            raise NetModelError(f"queue pair {pair} does not exist (1..{self.pairs})")

    @property
    def active_pairs(self) -> int:
        """Pairs the device may use now: the VQ_PAIRS_SET value with MQ, else 1 (§5.1.6.5.6)."""
        return self.state.curr_queue_pairs if _has(self.features, uapi.VIRTIO_NET_F_MQ) else 1

    def pending(self, pair: int) -> int:
        self._check_pair(pair)
        return len(self._pending[pair])

    def control(self, cls: int, cmd: int, payload: bytes) -> CtrlDecision:
        decision = decide_ctrl(self.state, self.features, cls, cmd, payload)
        self.state = decision.state
        return decision

    # -- transmit --------------------------------------------------------------------------
    def _drop_tx(self, rule: Rule, found: list[Violation]) -> TxOutcome:
        return TxOutcome(False, rule.rule, rule.level, rule.citation, tuple(found))

    def transmit(self, pair: int, packet: bytes) -> TxOutcome:
        """The driver places ``packet`` (virtio_net_hdr_v1 + frame) on transmitq ``pair``."""
        self._check_pair(pair)
        feats = self.features
        if len(packet) < HDR_SIZE:
            return self._drop_tx(TX_SHORT_HEADER, [DRIVER_TX_SHORT_HEADER.violation(
                f"transmit buffer of {len(packet)} bytes cannot hold the {HDR_SIZE}-byte header")])
        hdr = NetHdr.decode(packet)
        frame = bytes(packet[HDR_SIZE:])
        found: list[Violation] = []

        def driver(rule: Rule, message: str) -> None:
            found.append(rule.violation(message))

        if hdr.num_buffers:
            driver(DRIVER_TX_NUM_BUFFERS, "num_buffers must be zero on transmit")
        if hdr.flags & ~_NEEDS_CSUM:
            driver(DRIVER_TX_FLAGS, "DATA_VALID / RSC_INFO set on transmit")
        needs_csum = bool(hdr.flags & _NEEDS_CSUM)
        if needs_csum and not _has(feats, uapi.VIRTIO_NET_F_CSUM):
            driver(DRIVER_TX_FLAGS_WITHOUT_CSUM, "NEEDS_CSUM set without VIRTIO_NET_F_CSUM")
            needs_csum = False  # the device treats the packet as fully checksummed
        if pair > self.active_pairs:
            driver(DRIVER_TX_INACTIVE_PAIR, f"transmitq{pair} used with only {self.active_pairs} pair(s) enabled")
            return self._drop_tx(TX_INACTIVE_PAIR, found)
        gso = hdr.gso_type & ~_ECN
        if gso != uapi.VIRTIO_NET_HDR_GSO_NONE:
            host, guest = GSO_FEATURES.get(gso, ((), ()))
            if not any(_has(feats, b) for b in host) or not needs_csum:
                driver(DRIVER_TX_GSO, f"gso_type {hdr.gso_type:#x} without its HOST_* feature or without NEEDS_CSUM")
                return self._drop_tx(TX_GSO_NOT_NEGOTIATED, found)
            ecn_ok = not hdr.gso_type & _ECN or _has(feats, uapi.VIRTIO_NET_F_GUEST_ECN)
            if not any(_has(feats, b) for b in guest) or not ecn_ok:
                return self._drop_tx(TX_GSO_NOT_RECEIVABLE, found)
        elif (_has(feats, uapi.VIRTIO_NET_F_MTU) and len(frame) > self.state.mtu + ETH_HLEN):
            driver(DRIVER_TX_MTU, f"frame of {len(frame)} bytes exceeds mtu {self.state.mtu} + {ETH_HLEN}")
            return self._drop_tx(TX_OVER_MTU, found)
        elif len(frame) > self.state.mtu + ETH_HLEN:
            # The device still has a link MTU (its config value; 1500 by default): a non-GSO frame above it
            # cannot go over the link, and §5.1.6.3.1 has receivers post 1526-byte buffers for 1514 bytes.
            return self._drop_tx(TX_OVER_LINK_MTU, found)
        if needs_csum and hdr.csum_start + hdr.csum_offset + 2 > len(frame):
            driver(DRIVER_TX_CSUM_OFFSETS, "csum_start + csum_offset points outside the frame")
            return self._drop_tx(TX_BAD_CSUM_OFFSETS, found)
        if needs_csum and _has(feats, uapi.VIRTIO_NET_F_GUEST_CSUM):
            rx_hdr = NetHdr(_NEEDS_CSUM, hdr.gso_type, hdr.hdr_len if gso else 0, hdr.gso_size if gso else 0,
                            hdr.csum_start, hdr.csum_offset)
        else:
            if needs_csum:
                frame = complete_checksum(frame, hdr.csum_start, hdr.csum_offset)
            rx_hdr = NetHdr()
        self._pending[pair].append(_Pending(rx_hdr, frame))
        return TxOutcome(True, TX_LOOPED_BACK.rule, TX_LOOPED_BACK.level, TX_LOOPED_BACK.citation, tuple(found))

    # -- receive ---------------------------------------------------------------------------
    def post_rx(self, pair: int, buffer_id: int, length: int) -> None:
        """The driver makes a device-writable buffer of ``length`` bytes available on receiveq ``pair``."""
        self._check_pair(pair)
        if length < 0:
            raise NetModelError("a buffer length is never negative")
        if _has(self.features, uapi.VIRTIO_NET_F_MRG_RXBUF) and length < HDR_SIZE:
            raise NetModelError(f"with MRG_RXBUF each receive buffer MUST hold at least {HDR_SIZE} bytes "
                                f"({NET_RX_BUFFERS_DRIVER}); the device's answer is not modelled")
        self._rx[pair].append((buffer_id, length))

    def deliver(self, pair: int) -> tuple[RxCompletion | RxDrop, ...]:
        """Everything the device can do on receiveq ``pair`` now, in order."""
        self._check_pair(pair)
        events: list[RxCompletion | RxDrop] = []
        pending, posted = self._pending[pair], self._rx[pair]
        if pair > self.active_pairs:
            while pending:
                events.append(RxDrop(pair, pending.popleft().frame, RX_INACTIVE_PAIR.rule, RX_INACTIVE_PAIR.level,
                                     RX_INACTIVE_PAIR.citation))
            return tuple(events)
        mrg = _has(self.features, uapi.VIRTIO_NET_F_MRG_RXBUF)
        while pending and posted:
            item = pending[0]
            total = HDR_SIZE + len(item.frame)
            if not mrg:
                buffer_id, length = posted[0]
                pending.popleft()
                if length < total:
                    events.append(RxDrop(pair, item.frame, RX_TOO_BIG_FOR_BUFFER.rule, RX_TOO_BIG_FOR_BUFFER.level,
                                         RX_TOO_BIG_FOR_BUFFER.citation))
                    continue
                posted.popleft()
                data = replace(item.header, num_buffers=1).encode() + item.frame
                events.append(RxCompletion(pair, (buffer_id,), (total,), (data,),
                                           replace(item.header, num_buffers=1), item.frame))
                continue
            need, count = total, 0
            for _bid, length in posted:
                count += 1
                need -= length
                if need <= 0:
                    break
            if need > 0:
                break  # not enough buffers yet: the frame waits, in order
            pending.popleft()
            used = [posted.popleft() for _ in range(count)]
            header = replace(item.header, num_buffers=count)
            data = header.encode() + item.frame
            chunks, at = [], 0
            for _bid, length in used:
                chunks.append(data[at:at + length])
                at += length
            events.append(RxCompletion(pair, tuple(b for b, _ in used), tuple(len(c) for c in chunks),
                                       tuple(chunks), header, item.frame))
        return tuple(events)
