"""Control-virtqueue commands for the net datapath machine: each built for one case of the model's table.

:data:`vdpacert.model.net.CTRL_COMMANDS` lists every command the model knows and the cases it can
end in (``ok``, ``not_negotiated``, ``payload_length``, ``bad_value``). :func:`draw_request` builds
one command *aimed* at a case: a well-formed payload, one of the wrong length, or one with a value
the spec does not define. The aim only shapes the bytes; what the device must answer is decided by
:func:`vdpacert.model.net.decide_ctrl` on the bytes actually sent (a command whose feature was not
negotiated ends in ``not_negotiated`` whatever its payload). Breaking a driver rule on purpose is
how the ``net.ctrl.driver.*`` rules are exercised: the device's answer to the bad command is
compared with the model's.

Two things the machine must know besides the model's answer:

- :data:`ALSO_ACCEPTED`: answers accepted besides the model's, each a stated difference where the
  spec binds only the driver (the device then follows the other reading, and so does the model);
- :func:`keeps_broadcast`: the suite's frames are broadcast, and the model's loopback filters
  nothing; a device may filter (§5.1.6.5.1, best effort), so the machine never leaves the device
  in a receive mode where a filtering device could drop a broadcast frame: NOBCAST goes on only
  behind PROMISC (:func:`promisc_on`). Filtering is SHOULD-level and the model predicts none, so
  the suite cannot demand a drop either: it stays where every reading delivers.

What the model leaves open is not listed here: a MAC_ADDR_SET the driver malformed (wrong length, or
without CTRL_MAC_ADDR) is ``unbound`` in the model's decision, its state's mac indeterminate; the
machine then takes the mac the device shows (see :mod:`.datapath_net`).

The machine walks :data:`PLAN` with a cursor of its own (every command in each of its cases, then
an unknown one), so every case comes round within a few control steps whatever Hypothesis draws.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from hypothesis import strategies as st

from vdpacert.model.net import CTRL_COMMANDS, MAC_LEN, CtrlCase, CtrlCommand, NetDeviceState, decide_ctrl
from vdpacert.uapi import virtio_net as N  # noqa: N812 - read like the C names

__all__ = ["ALSO_ACCEPTED", "PLAN", "ROWS", "UNKNOWN_COMMANDS", "AlsoAccepted", "CtrlRequest", "draw_batch",
           "draw_request", "keeps_broadcast", "pairs_set", "preview", "promisc_on"]

#: Every command of the model's table, in table order.
ROWS: Final[tuple[CtrlCommand, ...]] = tuple(CTRL_COMMANDS.values())
#: (class, command) pairs the model does not know: an unknown class, and unknown commands of known classes.
UNKNOWN_COMMANDS: Final[tuple[tuple[int, int], ...]] = (
    (0x7F, 0), (N.VIRTIO_NET_CTRL_RX, 0x10), (N.VIRTIO_NET_CTRL_VLAN, 0x07))


@dataclass(frozen=True)
class CtrlRequest:
    """One command as the driver places it: ``struct virtio_net_ctrl_hdr`` then the command's data.

    ``name`` is the model's command name ("unknown" for a class/command it does not know) and ``aim``
    the case the data was built for (what :func:`draw_request` meant, not what the model decides).
    """

    name: str
    cls: int
    cmd: int
    payload: bytes
    aim: str

    @property
    def readable(self) -> bytes:
        return bytes([self.cls, self.cmd]) + self.payload

    def __str__(self) -> str:
        return f"{self.name} ({self.cls}/{self.cmd}) data {self.payload.hex() or '-'} aimed at {self.aim}"


@dataclass(frozen=True)
class AlsoAccepted:
    """An answer accepted besides the model's, why, and the data whose model answer the device then followed."""

    ack: int
    reason: str
    reading: Callable[[bytes], bytes]


def _nonzero_is_on(payload: bytes) -> bytes:
    return b"\x01"


#: Model rule -> the other answer a conforming device may give. RX-mode commands carry "0 (off) or 1 (on)"
#: (§5.1.6.5.1); the model answers ERR to other values (SHOULD), while a device may read the byte as a
#: boolean (QEMU's virtio_net_handle_rx_mode, the reference device): OK, and the mode is on.
ALSO_ACCEPTED: Final[dict[str, AlsoAccepted]] = {
    f"net.ctrl.RX_{name}.bad_value": AlsoAccepted(N.VIRTIO_NET_OK, "a non-zero byte is taken as on (QEMU)",
                                                  _nonzero_is_on)
    for name in ("PROMISC", "ALLMULTI", "ALLUNI", "NOMULTI", "NOUNI", "NOBCAST")
}


def keeps_broadcast(state: NetDeviceState) -> bool:
    """Would every receive filter honouring ``state`` still deliver a broadcast frame (§5.1.6.5.1)?"""
    return state.promisc or not state.nobcast


def preview(state: NetDeviceState, features: int, request: CtrlRequest) -> tuple[NetDeviceState, ...]:
    """Every state the device may be in after ``request``: the model's, and the one of an accepted other reading."""
    decision = decide_ctrl(state, features, request.cls, request.cmd, request.payload)
    states = [decision.state]
    other = ALSO_ACCEPTED.get(decision.rule)
    if other is not None:
        states.append(decide_ctrl(state, features, request.cls, request.cmd, other.reading(request.payload)).state)
    return tuple(states)


def promisc_on() -> CtrlRequest:
    """VIRTIO_NET_CTRL_RX_PROMISC(1), well formed: every frame is received."""
    return CtrlRequest("RX_PROMISC", N.VIRTIO_NET_CTRL_RX, N.VIRTIO_NET_CTRL_RX_PROMISC, b"\x01", CtrlCase.OK.value)


def pairs_set(pairs: int) -> CtrlRequest:
    """VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET(``pairs``), well formed."""
    return CtrlRequest("MQ_VQ_PAIRS_SET", N.VIRTIO_NET_CTRL_MQ, N.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                       struct.pack("<H", pairs), CtrlCase.OK.value)


# ----- data for each command and aim -----------------------------------------------------------------------
# Each command's data comes from one Hypothesis draw (a seed for ``random.Random``): a step places up to 16
# commands, and a draw per byte would cost more than the rest of the step. The bytes sent are in every
# failure message (CtrlRequest.__str__), so a shrunk sequence still says exactly what was sent.

def _mac(rng: random.Random, multicast: bool) -> bytes:
    first = rng.choice((0x02, 0x06, 0x52)) | (1 if multicast else 0)
    return bytes([first]) + rng.randbytes(5)


def _mac_table(rng: random.Random, aim: CtrlCase) -> bytes:
    uni = [_mac(rng, False) for _ in range(rng.randint(0, 2))]
    multi = [_mac(rng, True) for _ in range(rng.randint(0, 2))]
    table = (struct.pack("<I", len(uni)) + b"".join(uni) + struct.pack("<I", len(multi)) + b"".join(multi))
    if aim is not CtrlCase.BAD_VALUE:
        return table
    how = rng.choice(("truncated", "overcount", "trailing"))
    if how == "truncated":  # cut inside the second entry count
        return table[:4 + MAC_LEN * len(uni) + 2]
    if how == "overcount":  # the unicast count promises more entries than the data holds
        return struct.pack("<I", len(uni) + len(multi) + 3) + table[4:]
    return table + b"\x00"


def _wrong_length(rng: random.Random, good: bytes) -> bytes:
    """The command's data one byte short or long (or, for an empty payload, one byte)."""
    longer = not good or rng.random() < 0.5
    return good + b"\x00" if longer else good[:-1]


def _rx(rng: random.Random, aim: CtrlCase) -> bytes:
    if aim is CtrlCase.BAD_VALUE:
        return bytes([rng.choice((2, 0x80, 0xFF))])
    good = bytes([rng.choice((1, 1, 0))])
    return good if aim is CtrlCase.OK else _wrong_length(rng, good)


def _u16(rng: random.Random, aim: CtrlCase, good: tuple[int, int], bad: tuple[int, ...]) -> bytes:
    value = rng.choice(bad) if aim is CtrlCase.BAD_VALUE else rng.randint(*good)
    payload = struct.pack("<H", value)
    return _wrong_length(rng, payload) if aim is CtrlCase.PAYLOAD_LENGTH else payload


def _payload(rng: random.Random, row: CtrlCommand, aim: CtrlCase, max_pairs: int) -> bytes:
    if row.cls == N.VIRTIO_NET_CTRL_RX:
        return _rx(rng, aim)
    if row.name == "MAC_TABLE_SET":
        return _mac_table(rng, aim)
    if row.name == "MAC_ADDR_SET":
        mac = _mac(rng, rng.random() < 0.25)
        return _wrong_length(rng, mac) if aim is CtrlCase.PAYLOAD_LENGTH else mac
    if row.cls == N.VIRTIO_NET_CTRL_VLAN:
        return _u16(rng, aim, (0, 4095), (4096, 0x8000, 0xFFFF))
    if row.name == "MQ_VQ_PAIRS_SET":
        return _u16(rng, aim, (1, max_pairs), (0, max_pairs + 1, N.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX + 1, 0xFFFF))
    if row.name == "ANNOUNCE_ACK":
        return b"" if aim is not CtrlCase.PAYLOAD_LENGTH else _wrong_length(rng, b"")
    raise ValueError(f"no data builder for control command {row.name}")


#: Every (command, aim) the machine works through, in order: each command with each of its aims (the table
#: from its end: multiqueue first, so a shrunk failing sequence there is short), then the unknown command
#: (None). A batch takes the next few, so every case comes round every few control steps.
PLAN: Final[tuple[tuple[CtrlCommand | None, CtrlCase], ...]] = (
    *((row, aim) for row in reversed(ROWS) for aim in (CtrlCase.OK, CtrlCase.PAYLOAD_LENGTH, CtrlCase.BAD_VALUE)
      if aim in row.cases()),
    (None, CtrlCase.OK),
)


def draw_request(data: st.DataObject, row: CtrlCommand | None, aim: CtrlCase, features: int,
                 max_pairs: int) -> CtrlRequest:
    """A command of ``row`` (None: one the model does not know) with data built for ``aim``.

    Without the command's feature negotiated the model answers ``not_negotiated`` whatever the data,
    and the request says so.
    """
    rng = random.Random(data.draw(st.integers(0, 2**32 - 1), label="command data seed"))
    if row is None:
        cls, cmd = rng.choice(UNKNOWN_COMMANDS)
        return CtrlRequest("unknown", cls, cmd, b"", "unknown")
    negotiated = bool(features >> row.feature & 1)
    payload = _payload(rng, row, aim, max_pairs)
    return CtrlRequest(row.name, row.cls, row.cmd, payload,
                       aim.value if negotiated else CtrlCase.NOT_NEGOTIATED.value)


def draw_batch(data: st.DataObject, cursor: int, features: int, max_pairs: int, room: int, *,
               fill: bool = False) -> tuple[list[CtrlRequest], int]:
    """Up to ``room`` commands: the entries of :data:`PLAN` from ``cursor`` on (wrapping), and the new cursor.

    The machine keeps the cursor, so the quick profile reaches every (command, case) often, whatever
    Hypothesis draws; Hypothesis draws how many commands a step places and the data of each. A command
    whose feature is not negotiated has one case whatever its data (``not_negotiated``), so only its
    first entry is taken: the batch spends its room on cases it can still reach. ``fill``: as many as fit.
    """
    if room <= 0:
        return [], cursor
    count = room if fill else data.draw(st.integers(min(room, 4), min(room, 12)), label="commands")
    requests: list[CtrlRequest] = []
    taken = 0
    while len(requests) < count and taken < len(PLAN):
        row, aim = PLAN[(cursor + taken) % len(PLAN)]
        taken += 1
        if row is not None and aim is not CtrlCase.OK and not features >> row.feature & 1:
            continue
        requests.append(draw_request(data, row, aim, features, max_pairs))
    return requests, cursor + taken
