"""The virtio-net datapath machine: traffic, control commands, hostile chains, suspend/resume, reset, vs the model.

The model is :class:`vdpacert.model.net.LoopbackNet`: every frame transmitted on transmitqN comes
back on receiveqN in order, behind a rebuilt ``virtio_net_hdr_v1``, into the buffers posted there
(several with MRG_RXBUF), or is dropped for a named rule (too big for the next buffer, over the
MTU). The model is told everything the driver *publishes*, eagerly, and predicts the used entries
every receive queue must eventually show: buffer id, used length and the exact bytes. The device is
only held to the prediction it can have acted on: entries it returns are matched against the head
of the prediction as they come, and once both queues of a pair have been notified since their last
publish the whole prediction is due within ``SETTLE`` seconds. Transmit chains carry no writable
byte; each must be used once (len 0), and at the latest once the model has resolved its frame.

Control commands (MAC_ADDR_SET, VQ_PAIRS_SET, RX modes, an unknown class) are answered as
:func:`vdpacert.model.net.decide_ctrl` says, and a changed MAC shows in config space.

Deliberate difference, stated: the machine never transmits on a pair that is not active
(``net.driver.tx.inactive_pair`` is a MUST on the driver); the model drops such a frame
(``net.tx.inactive_pair``) while the reference device holds it in the TX ring until the pair is
enabled, and both are conforming answers to a driver that broke that rule.
"""

from __future__ import annotations

import struct
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import initialize, precondition, rule

from vdpacert.conformance.driver.device import net_queues
from vdpacert.conformance.driver.packed import PackedRing
from vdpacert.conformance.driver.split import RingFull, SplitRing, Used
from vdpacert.conformance.driver.traffic import ETH_HLEN, NET_HDR_LEN, NetStream, build_frame, net_hdr
from vdpacert.conformance.machines.datapath import KICK_NOT_LOST, DatapathMachine, Ring
from vdpacert.model.features import is_valid
from vdpacert.model.net import LoopbackNet, NetDeviceState, RxCompletion
from vdpacert.uapi import virtio_net as N  # noqa: N812
from vdpacert.uapi.virtio_config import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1
from vdpacert.uapi.virtio_ids import VIRTIO_ID_NET

__all__ = ["NetDatapathMachine", "net_machine"]

NO_LOSS = "net.loopback.no_loss"
NO_DUPLICATE = "net.loopback.no_duplicate"
ORDER = "net.loopback.order"
INTACT = "net.loopback.payload_intact"
USED_RING = "suite.lockstep.used_ring"
CONFIG = "suite.lockstep.config"
LOOPED_BACK = "net.tx.looped_back"

FRAME_SIZES = (64, 65, 200, 1514, 1600, 9014, 65535)
RX_SIZES = (64, 128, NET_HDR_LEN + 1514, 4096, NET_HDR_LEN + 9014, NET_HDR_LEN + 65535)
_OPTIONAL = (N.VIRTIO_NET_F_MAC, N.VIRTIO_NET_F_STATUS, N.VIRTIO_NET_F_MTU, N.VIRTIO_NET_F_MRG_RXBUF)
_CTRL_OPTIONAL = (N.VIRTIO_NET_F_CTRL_RX, N.VIRTIO_NET_F_CTRL_MAC_ADDR, N.VIRTIO_NET_F_MQ)


#: Control answers accepted besides the model's, each a stated difference where the spec binds only the driver.
#: RX-mode commands carry "0 (off) or 1 (on)" (§5.1.6.5.1); the model answers ERR to other values (SHOULD),
#: the reference device (like QEMU's virtio_net_handle_rx_mode) takes any non-zero byte as "on".
CTRL_ALSO_ACCEPTED: dict[str, tuple[int, str]] = {
    f"net.ctrl.RX_{name}.bad_value": (N.VIRTIO_NET_OK, "a non-zero byte is taken as on (QEMU)")
    for name in ("PROMISC", "ALLMULTI", "ALLUNI", "NOMULTI", "NOUNI", "NOBCAST")
}


def _seq_of(frame: bytes) -> int | None:
    """The sequence number a suite frame carries (None if the bytes are too short to say)."""
    if len(frame) < ETH_HLEN + 4:
        return None
    return int(struct.unpack_from("<I", frame, ETH_HLEN)[0])


@dataclass
class Expected:
    """One used entry the model predicts on a receive queue."""

    buffer_id: int
    used_len: int
    data: bytes
    seq: int


@dataclass
class PairBook:
    """What the machine expects of one queue pair (0-based), beyond what the model holds."""

    expected: deque[Expected] = field(default_factory=deque)
    seq_of_tx: dict[int, int] = field(default_factory=dict)  # outstanding TX chain id -> seq
    resolved: set[int] = field(default_factory=set)  # seqs the model resolved whose TX chain is not yet used
    dropped: dict[int, str] = field(default_factory=dict)  # seq -> the rule that dropped it
    delivered: set[int] = field(default_factory=set)
    unkicked_rx: bool = False
    unkicked_tx: bool = False


class NetDatapathMachine(DatapathMachine):
    """See the module docstring. ``TARGET`` is a sim-net (or compatible) target string."""

    TARGET: ClassVar[str] = "sim-net:mq=2"
    MEMORY: ClassVar[int] = 8 << 20

    def __init__(self) -> None:
        super().__init__()
        config = self.client.client.get_config(0, N.VIRTIO_NET_CONFIG_MTU + 2)
        self.permanent_mac = config[:6]
        self.max_pairs = max(1, struct.unpack_from("<H", config, N.VIRTIO_NET_CONFIG_MAX_VIRTQUEUE_PAIRS)[0])
        self.mtu = struct.unpack_from("<H", config, N.VIRTIO_NET_CONFIG_MTU)[0] or 1500
        self.model = LoopbackNet(1 << VIRTIO_F_VERSION_1)  # replaced at bring-up
        self.books: list[PairBook] = []
        self.stream = NetStream()
        #: Answers taken under CTRL_ALSO_ACCEPTED, by rule: reported, never silent.
        self.tolerated: Counter[str] = Counter()

    # ----- features, queues, model ---------------------------------------------------------------------

    def device_features(self, data: st.DataObject) -> int:
        offered = self.offered
        features = (1 << VIRTIO_F_VERSION_1) | (offered & 1 << VIRTIO_F_ACCESS_PLATFORM)
        for bit in _OPTIONAL:
            if offered >> bit & 1 and data.draw(st.booleans(), label=f"net feature {bit}"):
                features |= 1 << bit
        if offered >> N.VIRTIO_NET_F_CTRL_VQ & 1 and data.draw(st.booleans(), label="CTRL_VQ"):
            features |= 1 << N.VIRTIO_NET_F_CTRL_VQ
            for bit in _CTRL_OPTIONAL:
                if offered >> bit & 1 and data.draw(st.booleans(), label=f"ctrl feature {bit}"):
                    features |= 1 << bit
        assert is_valid(VIRTIO_ID_NET, features), f"drew an invalid net feature set {features:#x}"
        return features

    def queues(self, features: int) -> list[int]:
        return net_queues(features, self.max_pairs)

    @property
    def pairs(self) -> int:
        return len(self.books)

    @property
    def ctrl_queue(self) -> int | None:
        return 2 * self.pairs if self.features >> N.VIRTIO_NET_F_CTRL_VQ & 1 else None

    def after_bring_up(self) -> None:
        state = NetDeviceState(permanent_mac=self.permanent_mac, max_virtqueue_pairs=self.max_pairs, mtu=self.mtu)
        self.model = LoopbackNet(self.features, state)
        self.books = [PairBook() for _ in range(self.model.pairs)]
        self.stream = NetStream()
        config_mac = self.client.client.get_config(N.VIRTIO_NET_CONFIG_MAC, 6)
        self.count(CONFIG)
        if config_mac != self.model.state.current_mac:
            raise self.fail(CONFIG, f"after reset the config mac is {config_mac.hex(':')}, "
                                    f"not the device's own {self.model.state.current_mac.hex(':')}")

    def active(self) -> list[int]:
        return list(range(min(self.model.active_pairs, self.pairs)))

    def hostile_targets(self) -> list[tuple[int, bool]]:
        targets = [(0, True), (1, False)]
        ctrl = self.ctrl_queue
        return targets + ([(ctrl, False)] if ctrl is not None else [])

    def provoke(self, queue: int) -> None:
        assert self.session is not None
        try:
            if queue == 0:  # a receive buffer is only walked when a frame needs it
                self.session.send_frames(0, [build_frame(0xFFFF_0000)])
            elif queue == 1:
                self.session.post_rx(0, 1, kick=False)
        except (RingFull, MemoryError):
            pass
        self.session.kick(queue)

    # ----- driver actions (model told at publish time) -----------------------------------------------------

    @staticmethod
    def _room(ring: Ring) -> int:
        if isinstance(ring, SplitRing):
            return len(ring.free)
        assert isinstance(ring, PackedRing)
        return min(ring.num - ring.slots_in_use, len(ring.free_ids))

    def _deliver(self, pair: int) -> None:
        book = self.books[pair]
        for event in self.model.deliver(pair + 1):
            seq = _seq_of(event.frame)
            assert seq is not None
            if isinstance(event, RxCompletion):
                for buffer_id, used_len, chunk in zip(event.buffer_ids, event.used_lens, event.chunks, strict=True):
                    book.expected.append(Expected(buffer_id, used_len, chunk, seq))
            else:
                book.dropped[seq] = event.rule
                self.count(event.rule)
            if seq in book.seq_of_tx.values():
                book.resolved.add(seq)

    def _post_rx(self, pair: int, count: int, size: int, indirect: bool, kick: bool) -> None:
        assert self.session is not None
        ring = self.ring(2 * pair)
        count = min(count, self._room(ring))
        if count <= 0:
            return
        try:
            chains = self.session.post_rx(pair, count, size, indirect=indirect and self.indirect, kick=kick)
        except MemoryError:
            return
        for chain in chains:
            self.model.post_rx(pair + 1, chain.id, size)
        self.books[pair].unkicked_rx = not kick
        self._deliver(pair)

    def _send(self, pair: int, sizes: list[int], indirect: bool, kick: bool) -> None:
        assert self.session is not None
        use_indirect = indirect and self.indirect
        room = self._room(self.ring(2 * pair + 1)) // (1 if use_indirect else 2)
        sizes = sizes[:room]
        if not sizes:
            return
        frames = self.stream.frames(len(sizes), sizes)
        try:
            chains = self.session.send_frames(pair, frames, indirect=use_indirect, kick=kick)
        except MemoryError:
            return
        book = self.books[pair]
        for chain, frame in zip(chains, frames, strict=True):
            seq = _seq_of(frame)
            assert seq is not None
            book.seq_of_tx[chain.id] = seq
            outcome = self.model.transmit(pair + 1, net_hdr() + frame)
            if not outcome.accepted:
                book.dropped[seq] = outcome.rule
                book.resolved.add(seq)
                self.count(outcome.rule)
        book.unkicked_tx = not kick
        self._deliver(pair)

    # ----- checking what came back -----------------------------------------------------------------------

    def _classify(self, book: PairBook, got: Used, want: Expected | None) -> tuple[str, str]:
        seq = _seq_of(got.data[NET_HDR_LEN:]) if len(got.data) > NET_HDR_LEN else None
        where = f"buffer {got.id} (len {got.length})"
        if want is None:
            if seq in book.dropped:
                return book.dropped[seq], f"{where} carries seq {seq}, which the model drops ({book.dropped[seq]})"
            if seq in book.delivered:
                return NO_DUPLICATE, f"{where} carries seq {seq} a second time"
            return INTACT, f"{where} was used although no frame was due"
        expect = f"the model expects buffer {want.buffer_id} len {want.used_len} carrying seq {want.seq}"
        if seq == want.seq or seq is None:
            if got.data[:NET_HDR_LEN] != want.data[:NET_HDR_LEN] or got.id != want.buffer_id \
                    or got.length != want.used_len:
                return USED_RING, (f"{where} header {got.data[:NET_HDR_LEN].hex()}: {expect}, header "
                                   f"{want.data[:NET_HDR_LEN].hex()}")
            return INTACT, f"{where}: payload differs from what was sent ({expect})"
        if seq in book.dropped:
            return book.dropped[seq], f"{where} carries seq {seq}, which the model drops; {expect}"
        if seq in book.delivered:
            return NO_DUPLICATE, f"{where} carries seq {seq} a second time; {expect}"
        if seq > want.seq:
            return NO_LOSS, f"{where} carries seq {seq}: seq {want.seq} never arrived; {expect}"
        return ORDER, f"{where} carries seq {seq} out of order; {expect}"

    def _match(self, pair: int, used: list[Used]) -> None:
        book = self.books[pair]
        for got in used:
            want = book.expected.popleft() if book.expected else None
            self.count(USED_RING)
            if want is None or (got.id, got.length, got.data) != (want.buffer_id, want.used_len, want.data):
                clause, message = self._classify(book, got, want)
                raise self.fail(clause, f"receiveq{pair + 1}: {message}")
            book.delivered.add(want.seq)
            self.count(INTACT)

    def _reap_tx(self, pair: int, used: list[Used]) -> None:
        book = self.books[pair]
        for got in used:
            seq = book.seq_of_tx.pop(got.id, None)
            if seq is not None:
                book.resolved.discard(seq)

    def _look(self, pair: int) -> None:
        """Take whatever both queues of the pair returned so far and hold it against the prediction."""
        self._match(pair, self.reap_all(2 * pair))
        self._reap_tx(pair, self.reap_all(2 * pair + 1))

    def _settle(self, pair: int, clause: str = NO_LOSS) -> None:
        """Both queues notified since their last publish: every predicted entry is due now."""
        book = self.books[pair]
        self._look(pair)
        if book.unkicked_rx or book.unkicked_tx:
            return
        self.count(NO_LOSS)
        self.count(LOOPED_BACK)
        if book.expected:
            seqs = sorted({e.seq for e in book.expected})
            self._match(pair, self.wait_used(2 * pair, len(book.expected), clause,
                                             f"receiveq{pair + 1}: frames {seqs[:8]} not delivered"))
        if book.expected:
            raise self.fail(clause, f"receiveq{pair + 1}: {len(book.expected)} predicted entries still missing")
        due = self._tx_due(book)
        if due:
            self._reap_tx(pair, self.wait_used(2 * pair + 1, due, LOOPED_BACK,
                                               f"transmitq{pair + 1}: chains of seqs {sorted(book.resolved)[:8]} "
                                               "never used although their frames were handled"))
        if self._tx_due(book):
            raise self.fail(LOOPED_BACK, f"transmitq{pair + 1}: seqs {sorted(book.resolved)[:8]} never used")

    @staticmethod
    def _tx_due(book: PairBook) -> int:
        """TX chains that must be used by now: the ring is consumed in order, so the resolved prefix."""
        due = 0
        for seq in book.seq_of_tx.values():  # insertion order is publish order
            if seq not in book.resolved:
                break
            due += 1
        return due

    def _kick(self, pair: int, rx: bool, tx: bool) -> None:
        assert self.session is not None
        book = self.books[pair]
        if rx:
            self.session.kick(2 * pair)
            book.unkicked_rx = False
        if tx:
            self.session.kick(2 * pair + 1)
            book.unkicked_tx = False

    # ----- rules -------------------------------------------------------------------------------------------

    @initialize(data=st.data())
    def bring_up_device(self, data: st.DataObject) -> None:
        self.bring_up(self.draw_features(data))

    @precondition(lambda self: self.session is not None)
    @rule(data=st.data(), count=st.integers(1, 8), size=st.sampled_from(RX_SIZES), indirect=st.booleans(),
          kick=st.booleans())
    def post_receive_buffers(self, data: st.DataObject, count: int, size: int, indirect: bool, kick: bool) -> None:
        pair = data.draw(st.sampled_from(self.active()), label="pair")
        self._post_rx(pair, count, size, indirect, kick)
        self._settle(pair)

    @precondition(lambda self: self.session is not None)
    @rule(data=st.data(), sizes=st.lists(st.sampled_from(FRAME_SIZES), min_size=1, max_size=6),
          indirect=st.booleans(), kick=st.booleans())
    def send_frames(self, data: st.DataObject, sizes: list[int], indirect: bool, kick: bool) -> None:
        pair = data.draw(st.sampled_from(self.active()), label="pair")
        self._send(pair, sizes, indirect, kick)
        self._settle(pair)

    @precondition(lambda self: self.session is not None)
    @rule(data=st.data(), rx_first=st.booleans(), both=st.booleans())
    def kick_queues(self, data: st.DataObject, rx_first: bool, both: bool) -> None:
        """Notify RX and/or TX of a pair, in either order."""
        pair = data.draw(st.sampled_from(self.active()), label="pair")
        first_rx = rx_first
        self._kick(pair, rx=first_rx, tx=not first_rx)
        self._look(pair)
        if both:
            self._kick(pair, rx=not first_rx, tx=first_rx)
        self._settle(pair)

    @precondition(lambda self: self.ctrl_queue is not None)
    @rule(data=st.data())
    def control_command(self, data: st.DataObject) -> None:
        """One command on the controlq; ack and config as the model decides."""
        assert self.session is not None
        ctrl = self.ctrl_queue
        assert ctrl is not None
        kind = data.draw(st.sampled_from(["mac", "pairs", "rx", "unknown"]), label="command")
        short = data.draw(st.integers(0, 9), label="malformed") == 0  # a wrong payload length, now and then
        if kind == "mac":
            cls, cmd = N.VIRTIO_NET_CTRL_MAC, N.VIRTIO_NET_CTRL_MAC_ADDR_SET
            mac = bytes([data.draw(st.sampled_from([0x02, 0x06, 0x03]), label="mac[0]")]) + data.draw(
                st.binary(min_size=5, max_size=5), label="mac[1:]")
            payload = mac[:5] if short else mac
        elif kind == "pairs":
            cls, cmd = N.VIRTIO_NET_CTRL_MQ, N.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET
            value = data.draw(st.sampled_from([0, 1, 2, self.max_pairs, self.max_pairs + 1]), label="pairs")
            if self._would_strand(value):
                return
            payload = struct.pack("<H", value)[:1 if short else 2]
        elif kind == "rx":
            cls = N.VIRTIO_NET_CTRL_RX
            cmd = data.draw(st.integers(N.VIRTIO_NET_CTRL_RX_PROMISC, N.VIRTIO_NET_CTRL_RX_NOBCAST), label="rx cmd")
            payload = bytes([data.draw(st.sampled_from([0, 1, 2]), label="on")]) * (2 if short else 1)
        else:
            cls, cmd, payload = 0x7F, 0, b""
        ring = self.ring(ctrl)
        if self._room(ring) < 2:
            return
        before = self.model.active_pairs
        decision = self.model.control(cls, cmd, payload)
        self.session.rings[ctrl].add([bytes([cls, cmd]) + payload], [1])
        self.session.kick(ctrl)
        (used,) = self.wait_used(ctrl, 1, decision.rule, f"controlq: command {cls}/{cmd} never answered")
        self.count(decision.rule)
        ack = used.written[0]
        also = CTRL_ALSO_ACCEPTED.get(decision.rule)
        if ack != decision.ack and also is not None and ack == also[0]:
            self.tolerated[decision.rule] += 1
        elif ack != decision.ack:
            raise self.fail(decision.rule, f"command class {cls} cmd {cmd} payload {payload.hex()}: ack {ack}, "
                                           f"the model says {decision.ack} ({decision.rule}, {decision.level})")
        if kind == "mac":
            mac_now = self.client.client.get_config(N.VIRTIO_NET_CONFIG_MAC, 6)
            self.count(CONFIG)
            if mac_now != self.model.state.current_mac:
                raise self.fail(CONFIG, f"config mac {mac_now.hex(':')} after MAC_ADDR_SET, the model says "
                                        f"{self.model.state.current_mac.hex(':')}")
        for pair in range(before, min(self.model.active_pairs, self.pairs)):
            self._settle(pair)

    def _would_strand(self, value: int) -> bool:
        """Would VQ_PAIRS_SET(value) disable a pair that still has traffic in flight? (then skip it)"""
        for pair in range(max(value, 1), self.pairs):
            book = self.books[pair]
            if book.expected or book.seq_of_tx or self.model.pending(pair + 1):
                return True
        return False

    @precondition(lambda self: self.session is not None and self.can_suspend)
    @rule(data=st.data(), count=st.integers(0, 4), sizes=st.lists(st.sampled_from(FRAME_SIZES[:4]), max_size=4))
    def suspend_mid_traffic(self, data: st.DataObject, count: int, sizes: list[int]) -> None:
        """Suspend; publish and kick: nothing moves; GET_VRING_BASE is consistent; resume: nothing lost."""
        assert self.session is not None
        for pair in self.active():
            self._kick(pair, rx=True, tx=True)
            self._settle(pair)
        self.client.client.suspend()
        pair = data.draw(st.sampled_from(self.active()), label="pair")
        size = data.draw(st.sampled_from(RX_SIZES[2:]), label="rx size")
        def publish_and_kick() -> None:
            self._post_rx(pair, count, size, False, True)
            self._send(pair, sizes, False, True)

        self.expect_no_progress("kicks while suspended", publish_and_kick)
        for index in self.session.rings:
            self.check_vring_base(index)
        self.client.client.resume()
        self.target.service()
        self.count(KICK_NOT_LOST)
        for each in self.active():
            self._settle(each, KICK_NOT_LOST)


def net_machine(target: str) -> type[NetDatapathMachine]:
    """A NetDatapathMachine class bound to ``target`` (its own clause counter)."""
    name = "NetDatapath_" + "".join(c if c.isalnum() else "_" for c in target)
    return type(name, (NetDatapathMachine,), {"TARGET": target, "clause_counts": Counter()})
