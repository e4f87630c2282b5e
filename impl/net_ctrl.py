"""sim-net's control virtqueue (virtio v1.3 §5.1.6.5): parse a command, apply it, ack it.

A control chain is ``struct virtio_net_ctrl_hdr { u8 class; u8 cmd; }`` and the command's data,
device-readable, then a device-writable ``u8 ack``. The device writes VIRTIO_NET_OK or
VIRTIO_NET_ERR into the *last* writable byte (zeroing any writable bytes before it, so the used
length can honestly cover the whole writable part: none of these commands returns data).

Commands and what they need (anything else, a malformed payload or a feature that was not
negotiated is VIRTIO_NET_ERR and leaves the state exactly as it was):

- RX class (§5.1.6.5.1), ``u8 on``: PROMISC, ALLMULTI need VIRTIO_NET_F_CTRL_RX; ALLUNI, NOMULTI,
  NOUNI, NOBCAST need VIRTIO_NET_F_CTRL_RX_EXTRA. Exactly one data byte; any non-zero is "on"
  (the spec calls it a boolean and QEMU reads it so).
- MAC class (§5.1.6.5.2): MAC_TABLE_SET needs CTRL_RX; its data is two ``{le32 entries;
  u8 macs[entries][6]}`` tables (unicast, then multicast) that must fill the data exactly.
  MAC_ADDR_SET needs CTRL_MAC_ADDR and exactly 6 bytes; it becomes the config-space mac.
- MQ class (§5.1.6.5.6): VQ_PAIRS_SET needs MQ; ``le16 virtqueue_pairs`` with
  1 <= pairs <= max_virtqueue_pairs. RSS_CONFIG / HASH_CONFIG are not offered: ERR.
- ANNOUNCE class (§5.1.6.5.4): ANNOUNCE_ACK needs GUEST_ANNOUNCE and no data; clears the
  pending announcement (VIRTIO_NET_S_ANNOUNCE in the config status).

Reset values follow QEMU's: promiscuous on (a device that filters nothing until the driver asks
for it), other modes off, empty MAC tables, one active pair. The loopback datapath does not
filter on these; the state is what config space and a conformance check observe.

A chain the command cannot be acked on (no writable byte) is returned with nothing written.
The ctrl vq is not hot: this is plain Python over the VirtQueue's Python API. Commands bigger
than :data:`MAX_COMMAND` are refused unread (a hostile 4 GiB chain is not copied).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from vdpacert.impl.virtqueue import VirtQueue
from vdpacert.uapi.virtio_net import (
    VIRTIO_NET_CTRL_ANNOUNCE,
    VIRTIO_NET_CTRL_ANNOUNCE_ACK,
    VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET,
    VIRTIO_NET_CTRL_MAC_TABLE_SET,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_ALLMULTI,
    VIRTIO_NET_CTRL_RX_ALLUNI,
    VIRTIO_NET_CTRL_RX_NOBCAST,
    VIRTIO_NET_CTRL_RX_NOMULTI,
    VIRTIO_NET_CTRL_RX_NOUNI,
    VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_ERR,
    VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_RX_EXTRA,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_OK,
)

ETH_ALEN = 6
#: Largest command (header + data) read from a chain: 2 + two tables of ~5000 MACs each.
MAX_COMMAND = 64 * 1024
#: Largest writable part acked (the prefix before the ack byte is zeroed).
MAX_ACK_AREA = 4096

#: RX-class command -> (NetCtrlState field, feature bit it needs).
RX_MODES: dict[int, tuple[str, int]] = {
    VIRTIO_NET_CTRL_RX_PROMISC: ("promisc", VIRTIO_NET_F_CTRL_RX),
    VIRTIO_NET_CTRL_RX_ALLMULTI: ("allmulti", VIRTIO_NET_F_CTRL_RX),
    VIRTIO_NET_CTRL_RX_ALLUNI: ("alluni", VIRTIO_NET_F_CTRL_RX_EXTRA),
    VIRTIO_NET_CTRL_RX_NOMULTI: ("nomulti", VIRTIO_NET_F_CTRL_RX_EXTRA),
    VIRTIO_NET_CTRL_RX_NOUNI: ("nouni", VIRTIO_NET_F_CTRL_RX_EXTRA),
    VIRTIO_NET_CTRL_RX_NOBCAST: ("nobcast", VIRTIO_NET_F_CTRL_RX_EXTRA),
}

#: The NetCtrlState fields commands change (and reset restores).
COMMAND_FIELDS = ("mac", "active_pairs", "promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast",
                  "unicast_macs", "multicast_macs", "announce_pending")


@dataclass
class NetCtrlState:
    """What the control vq changes; sim-net keeps one and reflects ``mac`` (and the announce
    bit) in config space and ``active_pairs`` in the queues it serves."""

    mac: bytes = bytes(ETH_ALEN)
    max_virtqueue_pairs: int = 1
    active_pairs: int = 1
    promisc: bool = True
    allmulti: bool = False
    alluni: bool = False
    nomulti: bool = False
    nouni: bool = False
    nobcast: bool = False
    unicast_macs: tuple[bytes, ...] = ()
    multicast_macs: tuple[bytes, ...] = ()
    announce_pending: bool = False
    commands: int = field(default=0, compare=False)   # commands processed (ok or not), for tests/stats

    def __post_init__(self) -> None:
        if len(self.mac) != ETH_ALEN:
            raise ValueError(f"mac must be {ETH_ALEN} bytes, got {len(self.mac)}")
        if not VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN <= self.max_virtqueue_pairs <= VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX:
            raise ValueError(f"max_virtqueue_pairs {self.max_virtqueue_pairs} out of range")
        if not 1 <= self.active_pairs <= self.max_virtqueue_pairs:
            raise ValueError(f"active_pairs {self.active_pairs} out of range")
        self.mac = bytes(self.mac)

    def reset(self, mac: bytes | None = None) -> None:
        """Device reset: back to the reset values (``mac``: the configured one, default unchanged)."""
        self.adopt(NetCtrlState(mac=self.mac if mac is None else mac, max_virtqueue_pairs=self.max_virtqueue_pairs))

    def adopt(self, other: NetCtrlState) -> None:
        """Take every command-controlled field of ``other`` (in place: sim-net holds this object)."""
        for name in COMMAND_FIELDS:
            setattr(self, name, getattr(other, name))


def _has(features: int, bit: int) -> bool:
    return bool(features >> bit & 1)


def _mac_table(data: bytes, offset: int) -> tuple[tuple[bytes, ...], int] | None:
    if offset + 4 > len(data):
        return None
    (entries,) = struct.unpack_from("<I", data, offset)
    offset += 4
    end = offset + ETH_ALEN * entries
    if end > len(data):
        return None
    return tuple(data[i:i + ETH_ALEN] for i in range(offset, end, ETH_ALEN)), end


def _rx_mode(state: NetCtrlState, features: int, cmd: int, data: bytes) -> NetCtrlState | None:
    if cmd not in RX_MODES:
        return None
    name, bit = RX_MODES[cmd]
    if not _has(features, bit) or len(data) != 1:
        return None
    # The field is chosen at run time (every RX_MODES field is a bool), so the keyword cannot be typed.
    changes: dict[str, Any] = {name: data[0] != 0}
    return replace(state, **changes)


def _mac(state: NetCtrlState, features: int, cmd: int, data: bytes) -> NetCtrlState | None:
    if cmd == VIRTIO_NET_CTRL_MAC_ADDR_SET:
        if not _has(features, VIRTIO_NET_F_CTRL_MAC_ADDR) or len(data) != ETH_ALEN:
            return None
        return replace(state, mac=data)
    if cmd != VIRTIO_NET_CTRL_MAC_TABLE_SET or not _has(features, VIRTIO_NET_F_CTRL_RX):
        return None
    unicast = _mac_table(data, 0)
    multicast = _mac_table(data, unicast[1]) if unicast else None
    if unicast is None or multicast is None or multicast[1] != len(data):
        return None
    return replace(state, unicast_macs=unicast[0], multicast_macs=multicast[0])


def _mq(state: NetCtrlState, features: int, cmd: int, data: bytes) -> NetCtrlState | None:
    if cmd != VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET or not _has(features, VIRTIO_NET_F_MQ) or len(data) != 2:
        return None
    (pairs,) = struct.unpack("<H", data)
    if not VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN <= pairs <= state.max_virtqueue_pairs:
        return None
    return replace(state, active_pairs=pairs)


def _announce(state: NetCtrlState, features: int, cmd: int, data: bytes) -> NetCtrlState | None:
    if cmd != VIRTIO_NET_CTRL_ANNOUNCE_ACK or not _has(features, VIRTIO_NET_F_GUEST_ANNOUNCE) or data:
        return None
    return replace(state, announce_pending=False)


#: Command class -> handler: the new state, or None for VIRTIO_NET_ERR.
_CLASSES: dict[int, Callable[[NetCtrlState, int, int, bytes], NetCtrlState | None]] = {
    VIRTIO_NET_CTRL_RX: _rx_mode,
    VIRTIO_NET_CTRL_MAC: _mac,
    VIRTIO_NET_CTRL_MQ: _mq,
    VIRTIO_NET_CTRL_ANNOUNCE: _announce,
}


def apply_command(state: NetCtrlState, features: int, command: bytes) -> tuple[int, NetCtrlState]:
    """The ack for ``command`` (header + data) and the state after it (``state`` itself on ERR).

    Pure: ``state`` is not modified; the caller adopts the returned state.
    """
    features = int(features)
    if not _has(features, VIRTIO_NET_F_CTRL_VQ) or len(command) < 2:
        return VIRTIO_NET_ERR, state
    handler = _CLASSES.get(command[0])
    new = handler(state, features, command[1], bytes(command[2:])) if handler else None
    if new is None:
        return VIRTIO_NET_ERR, state
    return VIRTIO_NET_OK, new


class CtrlResult(NamedTuple):
    processed: int        # chains returned to the driver
    notify: bool          # signal the ctrl vq's call eventfd
    acks: tuple[int, ...]  # the ack written for each chain (-1: no writable byte, nothing written)


def process_ctrl_queue(vq: VirtQueue, state: NetCtrlState, features: int, *, budget: int = 0) -> CtrlResult:
    """Handle every available control chain (at most ``budget`` when non-zero), updating ``state``.

    Ring violations raise :class:`~vdpacert.impl.virtqueue.VirtQueueError` (the queue is broken:
    the device sets DEVICE_NEEDS_RESET); the state keeps the commands completed before.
    """
    acks: list[int] = []
    while not budget or len(acks) < budget:
        chain = vq.pop_chain()
        if chain is None:
            break
        if chain.writable_len == 0 or chain.writable_len > MAX_ACK_AREA:
            # Nowhere to put the ack (or an absurd ack area): the command is not executed.
            vq.push_chain(chain, 0)
            acks.append(-1)
            continue
        if chain.readable_len > MAX_COMMAND:
            ack, new = VIRTIO_NET_ERR, state
        else:
            ack, new = apply_command(state, features, vq.read_chain(chain))
        reply = bytes(chain.writable_len - 1) + bytes([ack])
        vq.write_chain(chain, 0, reply)
        vq.push_chain(chain, len(reply))
        # Adopt the new state only once the ack is in the ring: a write that fails (queue
        # broken) leaves the state as it was.
        if new is not state:
            state.adopt(new)
        state.commands += 1
        acks.append(ack)
    notify = vq.notify_needed() if acks else False
    return CtrlResult(len(acks), notify, tuple(acks))
