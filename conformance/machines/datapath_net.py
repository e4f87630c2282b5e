"""The virtio-net datapath machine: traffic, control commands, hostile chains, suspend/resume, reset, vs the model.

The model is :class:`vdpacert.model.net.LoopbackNet`: every frame transmitted on transmitqN comes
back on receiveqN in order, behind a rebuilt ``virtio_net_hdr_v1``, into the buffers posted there
(several with MRG_RXBUF), or is dropped for a named rule (too big for the next buffer, over the
MTU, a header the driver should not have written). The model is told everything the driver
*publishes*, eagerly, and predicts the used entries every receive queue must eventually show: buffer
id, used length and the exact bytes. The device is only held to the prediction it can have acted on:
entries it returns are matched against the head of the prediction as they come (so a duplicate or a
frame overtaking another is caught the moment it shows), and once both queues of a pair have been
notified since their last publish the whole prediction is due within ``SETTLE`` seconds. Transmit
chains carry no writable byte; each must be used once (len 0), and at the latest once the model has
resolved its frame.

Transmit headers (:mod:`.net_tx`): besides plain frames the machine sends packets that break one
driver rule of §5.1.6.2 on purpose (num_buffers set, receive-only flags, NEEDS_CSUM without CSUM or
pointing outside the frame, GSO without its feature, longer than the MTU, fewer bytes than a header)
and checksum requests; the model says whether each is looped back (and with which header and bytes)
or dropped, and the device is held to it like any frame.

Control commands (:mod:`.net_ctrl`): commands of the model's table, each aimed at one case (OK, not
negotiated, wrong length, bad value) or unknown, taken in turn from a plan the machine walks, and
every ack is held against :func:`vdpacert.model.net.decide_ctrl`, applied in ring order; a changed
MAC shows in config space. A MUST disagreement fails at once; a SHOULD one (an ERR the model expects
for a command the driver should not have sent) is reported after the batch's MUST checks, before
anything that depends on the device's state, which no longer follows the model's. Where the model
leaves a malformed command's effect open (``CtrlDecision.unbound``: a MAC_ADDR_SET of the wrong length
or without CTRL_MAC_ADDR), a different ack is a SHOULD warning and the example goes on, and the config
mac read after the batch is taken as the device's mac (a resync, counted in ``resyncs``); a well-formed
MAC_ADDR_SET must still leave exactly its address there.

Reaching every case, whatever Hypothesis draws: drawn feature sets cluster (its simplest draws come
back often, and swarm testing turns rules off per example), so the machine keeps cursors instead of
hoping. ``renegotiate_and_configure`` brings the device up with the next of three feature sets
(everything offered; then two complementary sets with some features left out), configures it with
the whole plan and sends one packet of every kind those features allow; ``control_commands`` walks
on through the plan between traffic steps.

Inactive pairs (multiqueue): the machine strands frames on a pair and switches it off, then breaks
``net.driver.tx.inactive_pair`` on purpose (buffers and frames on the switched-off pair): nothing may
come back on a receiveq beyond the enabled pairs (the model drops what waited there and what is sent
there). The spec leaves open what becomes of such frames once the pair is enabled again (the
reference device holds them in the transmit ring, another may drop them), so the machine resets the
device after each such episode instead of asking.
"""

from __future__ import annotations

import struct
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import initialize, precondition, rule

from vdpacert.conformance.driver.device import net_queues
from vdpacert.conformance.driver.packed import PackedRing
from vdpacert.conformance.driver.split import RingFull, SplitRing, Used
from vdpacert.conformance.driver.traffic import ETH_HLEN, NET_HDR_LEN, build_frame
from vdpacert.conformance.machines.datapath import KICK_NOT_LOST, DatapathMachine, Ring
from vdpacert.conformance.machines.net_ctrl import (
    ALSO_ACCEPTED,
    PLAN,
    CtrlRequest,
    draw_batch,
    keeps_broadcast,
    pairs_set,
    preview,
    promisc_on,
)
from vdpacert.conformance.machines.net_tx import TxKind, TxPacket, build_packet, kinds_for, plain_packet
from vdpacert.model.features import is_valid
from vdpacert.model.net import TX_SHORT_HEADER, LoopbackNet, NetDeviceState, RxCompletion, decide_ctrl
from vdpacert.model.spec import Level
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
_OPTIONAL = (N.VIRTIO_NET_F_MAC, N.VIRTIO_NET_F_STATUS, N.VIRTIO_NET_F_MTU, N.VIRTIO_NET_F_MRG_RXBUF,
             N.VIRTIO_NET_F_CSUM, N.VIRTIO_NET_F_GUEST_CSUM)
#: Drawn the other way round (left out by the simplest draw): each has clauses that need it off (the single-buffer
#: receive path, NEEDS_CSUM without CSUM) as much as others need it on (which renegotiate_and_configure provides).
_SIMPLEST_OFF = frozenset({N.VIRTIO_NET_F_MRG_RXBUF, N.VIRTIO_NET_F_CSUM, N.VIRTIO_NET_F_GUEST_CSUM})
_CTRL_OPTIONAL = (N.VIRTIO_NET_F_CTRL_RX, N.VIRTIO_NET_F_CTRL_RX_EXTRA, N.VIRTIO_NET_F_CTRL_MAC_ADDR,
                  N.VIRTIO_NET_F_MQ)
#: The net features device_features draws.
_DRAWN = sum(1 << bit for bit in (*_OPTIONAL, N.VIRTIO_NET_F_CTRL_VQ, *_CTRL_OPTIONAL))
#: What ``renegotiate_and_configure`` leaves out of everything offered, in turn (nothing, then each group): between
#: them, every feature a net clause needs off (with CTRL_VQ kept on) is off once.
_LEAVE_OUT: tuple[tuple[int, ...], ...] = (
    (),
    (N.VIRTIO_NET_F_CTRL_RX, N.VIRTIO_NET_F_MQ, N.VIRTIO_NET_F_MRG_RXBUF),
    (N.VIRTIO_NET_F_CTRL_RX_EXTRA, N.VIRTIO_NET_F_CTRL_MAC_ADDR, N.VIRTIO_NET_F_CSUM, N.VIRTIO_NET_F_GUEST_CSUM,
     N.VIRTIO_NET_F_MTU),
)


RX_NUM_BUFFERS = "net.rx.num_buffers"
#: Where virtio_net_hdr_v1 keeps num_buffers (the last of its six little-endian fields).
_NUM_BUFFERS_AT = NET_HDR_LEN - 2


def _num_buffers(data: bytes) -> int | None:
    return int.from_bytes(data[_NUM_BUFFERS_AT:NET_HDR_LEN], "little") if len(data) >= NET_HDR_LEN else None


def _without_num_buffers(data: bytes) -> bytes:
    """A received buffer with its header's num_buffers blanked, to tell that field's error from others."""
    return data[:_NUM_BUFFERS_AT] + data[NET_HDR_LEN:] if len(data) >= NET_HDR_LEN else data


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
    sent: set[int] = field(default_factory=set)  # every seq placed on this pair's transmitq
    short_headers: int = 0  # packets shorter than a header sent here (they carry no seq to trace)
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
        self.next_seq = 0
        self.ctrl_cursor = 0  # the next entry of net_ctrl.PLAN (drawn at bring-up)
        self.round_cursor = 0  # the next feature set of renegotiate_and_configure (drawn at bring-up)
        #: Answers taken under net_ctrl.ALSO_ACCEPTED, by rule: reported, never silent.
        self.tolerated: Counter[str] = Counter()
        #: Where the model took the device's word for what the spec left open (why -> times), as Lockstep's.
        self.resyncs: Counter[str] = Counter()

    # ----- features, queues, model ---------------------------------------------------------------------

    def device_features(self, data: st.DataObject) -> int:
        """A valid set with each offered optional feature drawn; "negotiate it" is the simplest draw.

        Most net clauses need a feature on (the control commands), and Hypothesis favours its simplest
        choices, so the simplest set is the richest one, except for :data:`_SIMPLEST_OFF`; each feature
        is still left out in some examples, and renegotiate_and_configure visits fixed sets in turn.
        """
        offered = self.offered
        features = (1 << VIRTIO_F_VERSION_1) | (offered & 1 << VIRTIO_F_ACCESS_PLATFORM)
        for bit in _OPTIONAL:
            if not offered >> bit & 1:
                continue
            if bit in _SIMPLEST_OFF:
                features |= data.draw(st.booleans(), label=f"net feature {bit}") << bit
            elif not data.draw(st.booleans(), label=f"leave out net feature {bit}"):
                features |= 1 << bit
        if offered >> N.VIRTIO_NET_F_CTRL_VQ & 1 and not data.draw(st.booleans(), label="leave out CTRL_VQ"):
            features |= 1 << N.VIRTIO_NET_F_CTRL_VQ
            for bit in _CTRL_OPTIONAL:
                if offered >> bit & 1 and not data.draw(st.booleans(), label=f"leave out ctrl feature {bit}"):
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

    @property
    def multiqueue(self) -> bool:
        """MQ negotiated with more than one pair: some pairs can be switched off."""
        return self.session is not None and bool(self.features >> N.VIRTIO_NET_F_MQ & 1) and self.pairs > 1

    def after_bring_up(self) -> None:
        state = NetDeviceState(permanent_mac=self.permanent_mac, max_virtqueue_pairs=self.max_pairs, mtu=self.mtu)
        self.model = LoopbackNet(self.features, state)
        self.books = [PairBook() for _ in range(self.model.pairs)]
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

    def _take_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq

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

    def _send(self, pair: int, sizes: Sequence[int], indirect: bool, kick: bool) -> None:
        self._send_packets(pair, [plain_packet(self._take_seq(), size) for size in sizes], indirect, kick)

    def _send_packets(self, pair: int, packets: Sequence[TxPacket], indirect: bool, kick: bool) -> None:
        """Place ``packets`` on transmitq ``pair`` (as many as fit), publish them together, tell the model."""
        assert self.session is not None
        use_indirect = indirect and self.indirect
        index = 2 * pair + 1
        ring = self.ring(index)
        room = self._room(ring)
        book = self.books[pair]
        placed: list[tuple[int, TxPacket]] = []
        for packet in packets:
            need = 1 if use_indirect else len(packet.buffers)
            if need > room:
                break
            try:
                chain = ring.add(list(packet.buffers), [], indirect=use_indirect, publish=False)
            except (RingFull, MemoryError):
                break
            room -= need
            placed.append((chain.id, packet))
        if not placed:
            return
        ring.publish()
        if kick:
            self.session.kick(index)
        for chain_id, packet in placed:
            book.seq_of_tx[chain_id] = packet.seq
            book.sent.add(packet.seq)
            outcome = self.model.transmit(pair + 1, packet.data)
            for broken in outcome.driver_violations:  # the driver rule this packet breaks on purpose
                self.count(broken.rule)
            if packet.kind is TxKind.SHORT_HEADER:
                book.short_headers += 1
            if not outcome.accepted:
                book.dropped[packet.seq] = outcome.rule
                book.resolved.add(packet.seq)
                self.count(outcome.rule)
        book.unkicked_tx = not kick
        self._deliver(pair)

    def _one_of_each_kind(self, data: st.DataObject, length: int) -> list[TxPacket]:
        """One packet of every kind :func:`~.net_tx.kinds_for` allows under the negotiated features."""
        return [build_packet(data, kind, self._take_seq(), length, self.features, mtu=self.model.state.mtu)
                for kind in kinds_for(self.features)]

    # ----- checking what came back -----------------------------------------------------------------------

    def _classify(self, book: PairBook, got: Used, want: Expected | None) -> tuple[str, str]:
        seq = _seq_of(got.data[NET_HDR_LEN:]) if len(got.data) > NET_HDR_LEN else None
        where = f"buffer {got.id} (len {got.length})"
        if book.short_headers and seq not in book.sent:
            return TX_SHORT_HEADER.rule, (f"{where} carries no frame this pair sent; {book.short_headers} transmit "
                                          "buffer(s) shorter than virtio_net_hdr_v1 were sent, which the model drops")
        if want is None:
            if seq in book.dropped:
                return book.dropped[seq], f"{where} carries seq {seq}, which the model drops ({book.dropped[seq]})"
            if seq in book.delivered:
                return NO_DUPLICATE, f"{where} carries seq {seq} a second time"
            if seq in book.sent:  # the model still holds it: not enough receive buffers yet (MRG_RXBUF)
                earlier = [s for s in book.sent if s < seq and s not in book.delivered and s not in book.dropped]
                if earlier:
                    return NO_LOSS, (f"{where} carries seq {seq} while seq {min(earlier)}, sent before it, still "
                                     "waits for receive buffers: that frame was lost")
                return USED_RING, f"{where} carries seq {seq}, which has not got the receive buffers it needs"
            return INTACT, f"{where} was used although no frame was due"
        expect = f"the model expects buffer {want.buffer_id} len {want.used_len} carrying seq {want.seq}"
        if seq == want.seq or seq is None:
            if (got.id, got.length) == (want.buffer_id, want.used_len) and _without_num_buffers(got.data) \
                    == _without_num_buffers(want.data) and got.data[:NET_HDR_LEN] != want.data[:NET_HDR_LEN]:
                return RX_NUM_BUFFERS, (f"{where}: header num_buffers is {_num_buffers(got.data)}, the model "
                                             f"says {_num_buffers(want.data)} ({expect})")
            if got.data[:NET_HDR_LEN] != want.data[:NET_HDR_LEN] or got.id != want.buffer_id \
                    or got.length != want.used_len:
                return USED_RING, (f"{where} header {got.data[:NET_HDR_LEN].hex()}: {expect}, header "
                                   f"{want.data[:NET_HDR_LEN].hex()}")
            return INTACT, f"{where}: payload differs from what was sent ({expect})"
        if seq > want.seq and seq not in book.delivered:  # the frame due here is missing, whatever came instead
            return NO_LOSS, f"{where} carries seq {seq}: seq {want.seq} never arrived; {expect}"
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
            if want is not None and len(got.data) >= NET_HDR_LEN:
                self.count(RX_NUM_BUFFERS)  # the header the model built is compared whole, num_buffers included
            if want is None or (got.id, got.length, got.data) != (want.buffer_id, want.used_len, want.data):
                clause, message = self._classify(book, got, want)
                raise self.fail(clause, f"receiveq{pair + 1}: {message}")
            if want.seq not in book.delivered:  # a frame's first entry: the frame as a whole came now
                if book.delivered:  # an earlier frame could have come again here
                    self.count(NO_DUPLICATE)
                if self.model.pending(pair + 1) or any(e.seq != want.seq for e in book.expected):
                    self.count(ORDER)  # a later frame was due too, and could have overtaken this one
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

    def _settle_all(self) -> None:
        """Notify both queues of every active pair and take everything the model says is due."""
        for pair in self.active():
            self._kick(pair, rx=True, tx=True)
            self._settle(pair)

    # ----- the control queue -------------------------------------------------------------------------------

    def _control(self, requests: Sequence[CtrlRequest]) -> None:
        """Place ``requests`` on the controlq, one kick, and hold every ack against the model, in ring order.

        A MUST disagreement fails at once. After a SHOULD one the device's state no longer follows the
        model's, so the remaining acks (which do not depend on that state) are still checked and the
        SHOULD failure is raised before the config and the pairs are looked at.
        """
        assert self.session is not None
        ctrl = self.ctrl_queue
        assert ctrl is not None
        ring = self.ring(ctrl)
        chains = [ring.add([request.readable], [1], publish=False) for request in requests]
        ring.publish()
        self.session.kick(ctrl)
        first = decide_ctrl(self.model.state, self.features, requests[0].cls, requests[0].cmd, requests[0].payload)
        answers = {used.id: used for used in self.wait_used(
            ctrl, len(chains), first.rule, f"controlq: {len(chains)} command(s) from {requests[0]} never answered")}
        before_pairs = min(self.model.active_pairs, self.pairs)
        deviation: Exception | None = None
        for chain, request in zip(chains, requests, strict=True):
            state = self.model.state
            decision = self.model.control(request.cls, request.cmd, request.payload)
            self.count(decision.rule)
            for broken in decision.driver_violations:  # the driver rule this command breaks on purpose
                self.count(broken.rule)
            answer = answers.get(chain.id)
            if answer is None:
                raise self.fail(decision.rule, f"controlq: {request} was never answered")
            ack = answer.written[-1]
            if ack == decision.ack:
                continue
            other = ALSO_ACCEPTED.get(decision.rule)
            if other is not None and ack == other.ack:  # the other reading: the model follows the device
                self.tolerated[decision.rule] += 1
                self.model.state = decide_ctrl(state, self.features, request.cls, request.cmd,
                                               other.reading(request.payload)).state
                continue
            message = f"{request}: ack {ack}, the model says {decision.ack} ({decision.rule}, {decision.level.value})"
            if decision.unbound and decision.level is not Level.MUST and ack in (N.VIRTIO_NET_OK, N.VIRTIO_NET_ERR):
                # The model's state already covers whatever the device did with it: a warning, not a desync.
                self.warn(decision.rule, message)
                continue
            error = self.fail(decision.rule, message)
            if decision.level is Level.MUST:
                raise error
            deviation = deviation or error
        if deviation is not None:
            raise deviation
        self._check_mac(len(requests))
        for pair in range(before_pairs, min(self.model.active_pairs, self.pairs)):  # newly enabled pairs
            self._settle(pair)

    def _check_mac(self, commands: int) -> None:
        """The config mac after a batch: the model's, or (left open by a malformed MAC_ADDR_SET) adopted."""
        mac_now = self.client.client.get_config(N.VIRTIO_NET_CONFIG_MAC, 6)
        self.count(CONFIG)
        state = self.model.state
        if not state.mac_allows(mac_now):
            raise self.fail(CONFIG, f"config mac {mac_now.hex(':')} after {commands} command(s), the model "
                                    f"says {state.current_mac.hex(':')}")
        if not state.mac_determinate:
            if mac_now != state.current_mac:
                self.resyncs["mac left open by a malformed MAC_ADDR_SET"] += 1
            self.model.state = state.with_mac_seen(mac_now)

    def _would_strand(self, value: int) -> bool:
        """Would VQ_PAIRS_SET(value) disable a pair that still has traffic in flight?"""
        for pair in range(max(value, 1), self.pairs):
            book = self.books[pair]
            if book.expected or book.seq_of_tx or self.model.pending(pair + 1):
                return True
        return False

    def _safe(self, requests: Sequence[CtrlRequest]) -> list[CtrlRequest]:
        """The batch made safe for the traffic checks, by the suite's own choices (each a command still checked).

        A command that could make broadcast filterable (NOBCAST on) goes behind PROMISC(1), or is left out
        when promiscuous mode cannot be had: the model predicts no receive filtering (see :mod:`.net_ctrl`).
        A VQ_PAIRS_SET that would switch off a pair with traffic in flight keeps the current count instead:
        stranded traffic is what ``inactive_pair_traffic`` checks, on its own terms.
        """
        state, kept = self.model.state, []
        for request in requests:
            after = preview(state, self.features, request)
            if not all(keeps_broadcast(each) for each in after):
                on = preview(state, self.features, promisc_on())[0]
                if not all(keeps_broadcast(each) for each in preview(on, self.features, request)):
                    continue
                kept.append(promisc_on())
                state = on
                after = preview(state, self.features, request)
            pairs = after[0].curr_queue_pairs
            if pairs < state.curr_queue_pairs and self._would_strand(pairs):
                request = pairs_set(state.curr_queue_pairs)
                after = preview(state, self.features, request)
            kept.append(request)
            state = after[0]
        return kept

    def _unbound_first(self, requests: Sequence[CtrlRequest]) -> list[list[CtrlRequest]]:
        """``requests`` cut so that each command whose effect the model leaves open starts a batch.

        The config mac is read once per batch: a malformed MAC_ADDR_SET after a well-formed one in the
        same batch would leave the mac open before the well-formed one's address was ever compared.
        """
        batches: list[list[CtrlRequest]] = []
        for request in requests:
            unbound = decide_ctrl(self.model.state, self.features, request.cls, request.cmd, request.payload).unbound
            if not batches or unbound:
                batches.append([])
            batches[-1].append(request)
        return batches

    def _configure(self, data: st.DataObject, *, whole: bool = False) -> None:
        """Commands of :data:`~.net_ctrl.PLAN` from the machine's cursor on, made safe, then checked.

        A run of a drawn length, or (``whole``) the whole plan, as many kicks as the ring's room takes.
        """
        ctrl = self.ctrl_queue
        assert ctrl is not None
        end = self.ctrl_cursor + len(PLAN)
        while True:
            room = self._room(self.ring(ctrl)) // 2
            drawn, self.ctrl_cursor = draw_batch(data, self.ctrl_cursor, self.features, self.max_pairs, room,
                                                 fill=whole)
            for batch in self._unbound_first(self._safe(drawn)[:room]):
                self._control(batch)
            if not whole or self.ctrl_cursor >= end or not drawn:
                return

    # ----- rules -------------------------------------------------------------------------------------------

    @initialize(data=st.data())
    def bring_up_device(self, data: st.DataObject) -> None:
        self.ctrl_cursor = data.draw(st.integers(0, len(PLAN) - 1), label="first control command")
        self.round_cursor = data.draw(st.integers(0, len(_LEAVE_OUT) - 1), label="first feature set of the round")
        self.bring_up(self.draw_features(data))

    @precondition(lambda self: self.session is not None)
    @rule(data=st.data(), count=st.integers(1, 8), size=st.sampled_from(RX_SIZES), indirect=st.booleans(),
          kick=st.booleans())
    def post_receive_buffers(self, data: st.DataObject, count: int, size: int, indirect: bool, kick: bool) -> None:
        pair = data.draw(st.sampled_from(self.active()), label="pair")
        self._post_rx(pair, count, size, indirect, kick)
        self._settle(pair)

    @precondition(lambda self: self.session is not None and not self.features >> N.VIRTIO_NET_F_MRG_RXBUF & 1)
    @rule(data=st.data(), sizes=st.lists(st.sampled_from(FRAME_SIZES[:4]), min_size=1, max_size=3))
    def frame_into_small_buffer(self, data: st.DataObject, sizes: list[int]) -> None:
        """Without MRG_RXBUF, a buffer too small for any frame, then frames: each is dropped there; then reset.

        The model keeps the small buffer posted (the device may use only that one buffer and must not write
        past it), so the pair receives nothing more until a reset: the machine resets right away.
        """
        pair = data.draw(st.sampled_from(self.active()), label="pair")
        self._post_rx(pair, 1, RX_SIZES[0], False, True)
        self._send(pair, sizes, False, True)
        self._settle(pair)
        self.bring_up(self.features)

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
    def control_commands(self, data: st.DataObject) -> None:
        """A run of commands of the model's table on the controlq, each aimed at one case; acks as the model says."""
        self._configure(data)

    @precondition(lambda self: self.session is not None)
    @rule(data=st.data())
    def renegotiate_and_configure(self, data: st.DataObject) -> None:
        """Reset, bring the device up with the next net feature set of a fixed round, configure it on the controlq,
        then send one packet of each kind those features allow (see :mod:`.net_tx`).

        The round is everything offered, then everything but one group of :data:`_LEAVE_OUT`, then the
        other (ring features kept). The ``not_negotiated`` cases need a feature off while CTRL_VQ stays on,
        the ``ok`` cases need it on, and drawn sets cluster (Hypothesis favours some draws): the round
        reaches all of them within a few examples. Configuring right after bring-up is what a driver does
        after probe (receive modes, MAC, queue pairs); here it is every command of the table, in each case.
        """
        group = _LEAVE_OUT[self.round_cursor % len(_LEAVE_OUT)]
        self.round_cursor += 1
        net = self.offered & _DRAWN & ~sum(1 << bit for bit in group)
        self.bring_up((self.features & ~_DRAWN) | net)
        if self.ctrl_queue is not None:
            self._configure(data, whole=True)
        # First traffic: buffers for every packet, then one packet of each kind these features allow.
        packets = self._one_of_each_kind(data, FRAME_SIZES[0])
        self._post_rx(0, len(packets), NET_HDR_LEN + FRAME_SIZES[0], False, True)
        self._send_packets(0, packets, False, True)
        self._settle(0)

    @precondition(lambda self: self.multiqueue)
    @rule(data=st.data(), frames=st.integers(1, 3), buffers=st.integers(1, 3))
    def inactive_pair_traffic(self, data: st.DataObject, frames: int, buffers: int) -> None:
        """Strand frames on a pair, switch it off, then use it anyway: nothing comes back there; then reset."""
        self._settle_all()
        pair = data.draw(st.integers(1, self.pairs - 1), label="pair to switch off")
        if pair >= self.model.active_pairs:
            self._control([pairs_set(pair + 1)])
        # More frames than posted receive buffers: the rest wait for buffers when the pair goes off.
        waiting_rx = self.ring(2 * pair).in_flight
        self._send(pair, [FRAME_SIZES[0]] * (waiting_rx + frames), False, True)
        self._kick(pair, rx=True, tx=True)
        self._settle(pair)
        self._control([pairs_set(pair)])
        for each in range(self.model.active_pairs, self.pairs):
            self._deliver(each)  # the model drops what waited on a pair that is now off (net.rx.inactive_pair)
        # The driver breaks net.driver.tx.inactive_pair on purpose: receive buffers and frames on the pair.
        self._post_rx(pair, buffers, RX_SIZES[2], False, True)
        self._send(pair, [FRAME_SIZES[0]] * frames, False, True)
        for each in range(self.model.active_pairs, self.pairs):
            self._kick(each, rx=True, tx=True)
        self.target.service()
        for each in range(self.model.active_pairs, self.pairs):
            # Nothing is predicted there: any receive entry fails with the rule that dropped its frame. The
            # transmit chains may come back (len 0, checked by the ring) or stay: the spec leaves that open.
            self._match(each, self.reap_all(2 * each))
            self._reap_tx(each, self.reap_all(2 * each + 1))
        for each in self.active():
            self._look(each)
        self.bring_up(self.features)

    @precondition(lambda self: self.session is not None and self.can_suspend)
    @rule(data=st.data(), count=st.integers(0, 4), sizes=st.lists(st.sampled_from(FRAME_SIZES[:4]), max_size=4))
    def suspend_mid_traffic(self, data: st.DataObject, count: int, sizes: list[int]) -> None:
        """Suspend; publish and kick: nothing moves; GET_VRING_BASE is consistent; resume: nothing lost."""
        assert self.session is not None
        self._settle_all()
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
