"""Live migration at arbitrary points of random driver histories, checked against an unmigrated twin.

A Hypothesis state machine builds one guest (sim-net or sim-blk, split or packed, a small ring
started just below the 16-bit index wrap or near the end of a packed ring, EVENT_IDX and INDIRECT
on or off) and an *unmigrated twin*: the same guest on a device of its own. Every rule is one
driver operation, applied to both guests and required to give both the same answer (frames
received, blk statuses and data): batches of frames or blk requests, receive buffers posted and
requests submitted without a kick, chains added to a ring but not yet published, frames sent with
no receive buffer to loop into, kicks with partial reaps, control commands, a driver reset, guest
CPU writes. The ``migrate`` rules move the guest (never the twin) to a fresh destination device
with :class:`~vdpacert.migration.precopy.LiveMigration`, whatever state the rings are in, while the
scenario runner's workload keeps both guests busy during pre-copy; some migrations are made to fail
(link drop, a corrupt RAM chunk or state blob, a source crash, a destination that refuses the state).

What is proved, for every migration: the switch-over checks ran and found nothing (destination
memory byte-equal to the source's, device state equal), or, after a fault, the source runs on with
its dirty tracking shown stopped; and afterwards both guests keep answering alike. At the end of
every example (and in the ``settle_and_verify`` rule) everything outstanding is completed on both:
every frame received exactly once and in order, every sector reading back as last written, and both
guests' digests equal.

Why the twin works as the oracle: the reference devices answer synchronously (a kick is processed
before ``kick`` returns), so the same operations give the same results on any device that keeps
its state across a migration. A device may also run chains nobody kicked (the reference devices do
at DRIVER_OK and RESUME, so a migrated guest's device runs them at switch-over and the twin's does
not), so every look at a ring follows a kick of it: only a kick brings both to the same point.
Two rules keep the expectations honest: blk requests outstanding together never overlap (the spec
gives them no order), and with two blk queues the workload writes nothing during pre-copy (its
random sectors could overlap a write left pending on the other queue).

The dirty-tracking mode is drawn once per example, not per migration: LiveMigration tracks with the
mode it is given and builds the destination's VMM in that same mode, and tracking in a mode other
than the source VMM's misses writes (shadow tracking of a device-log VMM sees no device write), so
every hop of a guest's life is in the mode its first VMM was made in.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TypeVar, cast

from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from vdpacert.conformance.driver.device import DriverSession, Ring
from vdpacert.conformance.driver.memory import PAGE
from vdpacert.conformance.driver.split import Chain, SplitRing
from vdpacert.conformance.driver.traffic import (
    RX_BUF,
    SECTOR,
    BlkRequest,
    NetStream,
    blk_flush,
    blk_get_id,
    blk_in,
    blk_out,
    net_hdr,
)
from vdpacert.conformance.targets.base import make_target
from vdpacert.migration.guest import Guest, GuestConfig
from vdpacert.migration.link import Link, SimClock
from vdpacert.migration.precopy import Endpoint, LiveMigration, MigrationResult, SourceCrashed
from vdpacert.migration.vmm import DirtyMode, Vmm
from vdpacert.migration.workload import Workload, WorkloadConfig
from vdpacert.uapi import virtio_blk as B  # noqa: N812

T = TypeVar("T")

MIB = 1 << 20
#: Sectors of every disk: small, so the final read-back is quick, and larger than any chain spanning a ring.
CAPACITY = 1024
MAX_WRITE_SECTORS = 8
FRAME_LENGTHS = (60, 64, 200, 1514)
FAULTS = ("link-drop", "corrupt-ram", "corrupt-state", "source-crash", "destination-refuses")


# ----- one example's device and guest -------------------------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    """What an example draws once: the device, the ring layout, the guest's rates and the dirty mode."""

    device: str
    packed: bool
    queue_size: int
    queues: int
    event_idx: bool
    indirect: bool
    start_index: int
    mode: DirtyMode
    memory_mib: int
    net_frames_per_s: float
    blk_writes_per_s: float
    cpu_pages_per_s: float
    seed: int

    @property
    def is_net(self) -> bool:
        return self.device == "sim-net"

    def target(self, *, disk: str | None, queue_size: int | None = None) -> str:
        """The target string: net with ``queues`` pairs, blk with ``queues`` queues on ``disk`` (None: its own)."""
        attrs = [f"max_vq_pairs={self.queues}"] if self.is_net else [f"capacity={CAPACITY}",
                                                                     f"num_queues={self.queues}"]
        if disk is not None:
            attrs.append(f"disk={disk}")
        if queue_size is not None:
            attrs.append(f"queue_size={queue_size}")
        return f"{self.device}:{','.join(attrs)}"

    def guest_config(self) -> GuestConfig:
        return GuestConfig(packed=self.packed, queue_size=self.queue_size, queues=self.queues,
                           event_idx=self.event_idx, indirect=self.indirect, start_index=self.start_index)

    def workload_config(self) -> WorkloadConfig:
        return WorkloadConfig(net_frames_per_s=self.net_frames_per_s, blk_writes_per_s=self.blk_writes_per_s,
                              cpu_pages_per_s=self.cpu_pages_per_s, cpu_working_set_mib=1, seed=self.seed)


@st.composite
def setups(draw: st.DrawFn) -> Setup:
    device = draw(st.sampled_from(["sim-net", "sim-blk"]))
    packed = draw(st.booleans())
    # Small rings wrap fast. Packed rings too are powers of 2: VHOST_SET_VRING_NUM takes nothing else (as in Linux).
    num = draw(st.sampled_from([8, 16, 32, 64]))
    if packed:  # the start slot (wrap counter 1): the ring's end is where its wrap counters flip
        start = draw(st.one_of(st.just(0), st.integers(num - 3, num - 1), st.integers(0, num - 1)))
    else:  # the first avail index: just below 65536 the 16-bit indexes wrap within a few batches
        start = draw(st.one_of(st.just(0), st.integers(0x10000 - 2 * num, 0xFFFF), st.integers(0, 0xFFFF)))
    queues = draw(st.integers(1, 3) if device == "sim-net" else st.integers(1, 2))
    net = device == "sim-net"
    return Setup(
        device=device, packed=packed, queue_size=num, queues=queues, event_idx=draw(st.booleans()),
        indirect=draw(st.booleans()), start_index=start, mode=draw(st.sampled_from(list(DirtyMode))),
        memory_mib=draw(st.sampled_from([4, 6, 8])),
        net_frames_per_s=draw(st.sampled_from([0.0, 4000.0, 20000.0])) if net else 0.0,
        # Two blk queues: the workload writes nothing while migrating (module docstring).
        blk_writes_per_s=draw(st.sampled_from([0.0, 2000.0, 8000.0])) if not net and queues == 1 else 0.0,
        cpu_pages_per_s=draw(st.sampled_from([1000.0, 20000.0, 100000.0])),
        seed=draw(st.integers(0, 2**16)))


def room(ring: Ring) -> int:
    """Descriptors still free on the driver's ring (used-but-unreaped chains still hold theirs)."""
    return len(ring.free) if isinstance(ring, SplitRing) else ring.num - ring.slots_in_use


def ring_view(ring: Ring) -> tuple[object, ...]:
    """The driver's whole view of one ring: what must be equal on the guest and on its twin."""
    if isinstance(ring, SplitRing):
        return ("split", ring.avail_idx, ring.last_used, sorted(ring.outstanding), list(ring.order),
                list(ring.pending), len(ring.free))
    return ("packed", ring.next_avail, ring.avail_wrap, ring.next_used, ring.used_wrap, sorted(ring.outstanding),
            list(ring.order), [p[0] for p in ring.pending], ring.slots_in_use)


def wrapped(ring: Ring) -> bool:
    """Has the ring's avail index wrapped (split: past 65535; packed: its avail wrap counter flipped)?"""
    if isinstance(ring, SplitRing):
        return ring.avail_idx < ring.start
    return ring.avail_wrap != ring.start_wrap


F = TypeVar("F", bound=Callable[..., None])


def step(method: F) -> F:
    """Mark the machine unhealthy while a step runs: a step that raised leaves it so, and teardown then
    only releases (verifying a half-done step would hide the first failure behind a second)."""

    @functools.wraps(method)
    def run(self: MigrateAnywhere, *args: object, **kwargs: object) -> None:
        self.healthy = False
        method(self, *args, **kwargs)
        self.healthy = True

    return cast(F, run)


@dataclass
class Pending:
    """A blk write submitted by a rule and not known to be reaped: its sectors must not be touched meanwhile."""

    queue: int
    chain: Chain
    first: int
    count: int


@dataclass
class Side:
    """One of the two guests: the migrated one (``guest``) or its unmigrated twin."""

    name: str
    endpoint: Endpoint
    guest: Guest
    workload: Workload
    pending: list[Pending] = field(default_factory=list)

    @property
    def session(self) -> DriverSession:
        return self.guest.session

    def ring(self, index: int) -> Ring:
        return self.session.rings[index]

    def stream(self, pair: int) -> NetStream:
        return self.workload.streams.setdefault(pair, NetStream())

    def outstanding_writes(self) -> list[Pending]:
        """Rule-made writes still outstanding on the driver's rings (drops those some reap already took)."""
        self.pending = [p for p in self.pending if self.ring(p.queue).outstanding.get(p.chain.id) is p.chain]
        return self.pending

    # ----- net --------------------------------------------------------------------------------------------

    def receive(self, pair: int, count: int) -> list[int]:
        """Reap at least ``count`` RX buffers (all there are) and record their frames; their sequence numbers."""
        frames = self.session.receive_frames(pair, count)
        stream = self.stream(pair)
        for frame in frames:
            stream.receive(frame)
        return [frame.seq for frame in frames]

    def add_frames(self, pair: int, lengths: list[int], *, indirect: bool, publish: bool, kick: bool) -> None:
        """TX chains for new frames; ``publish=False`` leaves them in the ring, not yet made available."""
        frames = self.stream(pair).frames(len(lengths), lengths)
        ring = self.ring(DriverSession.tx_queue(pair))
        for frame in frames:
            ring.add([net_hdr(), frame], [], indirect=indirect, publish=False)
        if publish:
            ring.publish()
            if kick:
                self.session.kick(DriverSession.tx_queue(pair))

    def add_rx(self, pair: int, count: int, *, indirect: bool, publish: bool, kick: bool) -> None:
        ring = self.ring(DriverSession.rx_queue(pair))
        for _ in range(count):
            ring.add([], [RX_BUF], indirect=indirect, publish=False)
        if publish:
            ring.publish()
            if kick:
                self.session.kick(DriverSession.rx_queue(pair))

    def settle_pair(self, pair: int, frame_bytes: int) -> list[int]:
        """Complete everything on ``pair``: publish what was added, loop every frame still owed (posting
        receive buffers for them), fill every buffer still posted with a new frame, reap both queues."""
        session = self.session
        rx, tx = self.ring(DriverSession.rx_queue(pair)), self.ring(DriverSession.tx_queue(pair))
        for ring in (rx, tx):
            if ring.pending:
                ring.publish()
        # A kick before the first look: chains nobody kicked may have run on one side only (module docstring).
        session.kick(DriverSession.rx_queue(pair))
        seqs = self.receive(pair, 0)
        session.tx_done(pair, 0)
        for _ in range(4 * rx.num):
            owed = len(self.stream(pair).lost)
            if not owed:
                break
            missing = owed - rx.in_flight  # every used buffer was reaped: in flight means empty
            if missing > 0:
                session.post_rx(pair, min(missing, room(rx)))
            else:
                session.kick(DriverSession.rx_queue(pair))
            seqs += self.receive(pair, min(owed, rx.in_flight))
        while rx.in_flight:
            session.tx_done(pair, 0)
            count = min(rx.in_flight, room(tx) // 2)
            assert count, f"{self.name}: pair {pair} has no TX room for the frames its receive buffers wait for"
            self.add_frames(pair, [frame_bytes] * count, indirect=False, publish=True, kick=True)
            seqs += self.receive(pair, count)
            session.tx_done(pair, count)
        session.tx_done(pair, 0)
        return seqs

    # ----- blk --------------------------------------------------------------------------------------------

    def blk_submit(self, queue: int, requests: list[BlkRequest], *, indirect: bool, kick: bool,
                   reap: bool) -> list[tuple[int, bytes]]:
        """Submit ``requests`` (writes are remembered as pending); with ``reap``, complete everything on the
        queue and return (status, data in) of these requests, the others' statuses checked OK."""
        session = self.session
        chains = [session.blk_submit(queue, request, indirect=indirect, kick=False) for request in requests]
        for chain, request in zip(chains, requests, strict=True):
            if request.type == B.VIRTIO_BLK_T_OUT:
                self.pending.append(Pending(queue, chain, request.sector, len(request.readable[1]) // SECTOR))
        if kick:
            session.kick(queue)
        if not reap:
            return []
        return self.blk_complete_all(queue, chains)

    def blk_complete_all(self, queue: int, chains: list[Chain]) -> list[tuple[int, bytes]]:
        """Kick the queue and reap every chain outstanding on it; (status, data) of ``chains``, in order."""
        ring = self.ring(queue)
        if ring.in_flight:
            self.session.kick(queue)
        done = {c.id: c for c in self.session.blk_complete(queue, ring.in_flight)}
        bad = [c.status for c in done.values() if c.status != B.VIRTIO_BLK_S_OK]
        assert not bad, f"{self.name}: blk requests failed with status {bad}"
        self.outstanding_writes()
        return [(done[c.id].status, done[c.id].data) for c in chains]


# ----- the machine --------------------------------------------------------------------------------------------

class MigrateAnywhere(RuleBasedStateMachine):
    """Random driver histories on a guest and its twin, with migrations of the guest at any point."""

    def __init__(self) -> None:
        super().__init__()
        self.stack = ExitStack()
        self.sides: list[Side] = []
        self.guests: list[Guest] = []  # closed before the targets: a guest's close resets its device
        self.setup: Setup | None = None
        self.clock = SimClock()
        self.disk: str | None = None
        self.migrations = 0
        self.healthy = True  # False once a step raised: teardown then only releases

    # ----- helpers ----------------------------------------------------------------------------------------

    @property
    def cfg(self) -> Setup:
        assert self.setup is not None
        return self.setup

    @property
    def guest_side(self) -> Side:
        return self.sides[0]

    def both(self, action: Callable[[Side], T]) -> T:
        """Do ``action`` on the guest, then on the twin; both must answer the same."""
        results = [action(side) for side in self.sides]
        assert results[0] == results[1], f"guest and twin answered differently: {results[0]!r} != {results[1]!r}"
        return results[0]

    def reserve(self, index: int) -> int:
        """Descriptors the workload needs free on queue ``index`` for a batch while the guest migrates."""
        workload, cfg = self.guest_side.workload, self.cfg
        if cfg.is_net:
            if not cfg.net_frames_per_s:
                return 0
            return workload.batch if index % 2 == 0 else 2 * workload.batch
        return 6 * workload.batch if cfg.blk_writes_per_s else 0

    def spare(self, index: int) -> int:
        """Descriptors a rule may take on queue ``index`` and still leave the workload its batch.

        Outstanding chains count at their direct size: chains waiting on a ring are used in order, so an
        indirect one (one slot) may give its place to one of the workload's direct ones (up to three).
        """
        ring = self.guest_side.ring(index)
        per_chain = 1 if self.cfg.is_net and index % 2 == 0 else 2 if self.cfg.is_net else 3
        free = min(room(ring), ring.num - per_chain * ring.in_flight)
        return max(0, free - self.reserve(index))

    def _endpoint(self, spec: str) -> Endpoint:
        target = self.stack.enter_context(make_target(spec))
        return Endpoint(target, target.new_memory(self.cfg.memory_mib * MIB, gpa=0))

    def _side(self, name: str, endpoint: Endpoint) -> Side:
        cfg = self.cfg
        guest = Guest(endpoint.memory, lambda layout: Vmm(endpoint.target, layout, mode=cfg.mode), cfg.guest_config())
        self.guests.append(guest)
        guest.bring_up()
        return Side(name, endpoint, guest, Workload(guest, cfg.workload_config()))

    # ----- set-up -----------------------------------------------------------------------------------------

    @initialize(setup=setups())
    @step
    def start(self, setup: Setup) -> None:
        self.setup = setup
        self.disk = None if setup.is_net else f"stateful-{uuid.uuid4().hex[:12]}"
        source = self._endpoint(setup.target(disk=self.disk))
        twin = self._endpoint(setup.target(disk=None))  # the twin's disk is its own
        self.sides = [self._side("guest", source), self._side("twin", twin)]
        event(f"{setup.device} {'packed' if setup.packed else 'split'} {setup.mode.value}")

    # ----- the rules: one driver operation each, net or blk as the example's device is ----------------------
    # (Rules are not split by device with preconditions: Hypothesis gives up on a step after a few rules
    # drawn and refused, which would end half the examples early.)

    @rule(data=st.data())
    @step
    def batch(self, data: st.DataObject) -> None:
        """A batch with one kick: net, receive buffers then frames; blk, writes then reads of other sectors."""
        (self._net_batch if self.cfg.is_net else self._blk_batch)(data)

    @rule(data=st.data())
    @step
    def available_without_kick(self, data: st.DataObject) -> None:
        """Chains left available and not kicked (or, net, added and not even published): mid-batch."""
        (self._post_rx_without_kick if self.cfg.is_net else self._blk_submit_without_kick)(data)

    @rule(data=st.data())
    @step
    def kick_and_reap(self, data: st.DataObject) -> None:
        """A kick, then all, some or none of the completions reaped."""
        (self._net_kick_and_reap if self.cfg.is_net else self._blk_kick_and_reap)(data)

    @rule(data=st.data())
    @step
    def odd_chains(self, data: st.DataObject) -> None:
        """net: frames with no receive buffer to loop into; blk: one chain as long as the ring."""
        (self._send_without_receive_buffers if self.cfg.is_net else self._chain_spanning_ring)(data)

    @rule(data=st.data())
    @step
    def control_command(self, data: st.DataObject) -> None:
        """net: a control-queue command (state the VMM must carry over); blk: FLUSH and GET_ID."""
        (self._net_control_command if self.cfg.is_net else self._blk_flush)(data)

    # ----- net operations ---------------------------------------------------------------------------------

    def _pair(self, data: st.DataObject) -> int:
        return data.draw(st.integers(0, self.guest_side.workload.pairs - 1), label="pair")

    def _indirect(self, data: st.DataObject) -> bool:
        return self.cfg.indirect and data.draw(st.booleans(), label="indirect")

    def _net_batch(self, data: st.DataObject) -> None:
        """Post receive buffers (no kick), send as many frames (one kick), reap all, some or none."""
        pair = self._pair(data)
        most = min(self.spare(2 * pair), self.spare(2 * pair + 1) // 2, 16)
        if most < 1:
            return
        n = data.draw(st.integers(1, most), label="frames")
        lengths = data.draw(st.lists(st.sampled_from(FRAME_LENGTHS), min_size=n, max_size=n), label="lengths")
        indirect = self._indirect(data)
        reap = data.draw(st.sampled_from(["both", "rx", "tx", "none"]), label="reap")

        def batch(side: Side) -> list[int]:
            side.add_rx(pair, n, indirect=indirect, publish=True, kick=False)
            side.add_frames(pair, lengths, indirect=indirect, publish=True, kick=True)
            seqs = side.receive(pair, n) if reap in ("both", "rx") else []
            if reap in ("both", "tx"):
                side.session.tx_done(pair, n)
            return seqs

        self.both(batch)

    def _post_rx_without_kick(self, data: st.DataObject) -> None:
        """Receive buffers made available and not kicked, or added to the ring and not even published."""
        pair = self._pair(data)
        most = min(self.spare(2 * pair), 8)
        if most < 1:
            return
        n = data.draw(st.integers(1, most), label="buffers")
        indirect, publish = self._indirect(data), data.draw(st.booleans(), label="publish")
        self.both(lambda side: side.add_rx(pair, n, indirect=indirect, publish=publish, kick=False))

    def _send_without_receive_buffers(self, data: st.DataObject) -> None:
        """Frames sent with whatever receive buffers there are (they wait in the TX ring when there are
        none), kicked, made available without a kick, or not yet published."""
        pair = self._pair(data)
        most = min(self.spare(2 * pair + 1) // 2, 8)
        if most < 1:
            return
        n = data.draw(st.integers(1, most), label="frames")
        lengths = data.draw(st.lists(st.sampled_from(FRAME_LENGTHS), min_size=n, max_size=n), label="lengths")
        indirect = self._indirect(data)
        how = data.draw(st.sampled_from(["kick", "publish", "added"]), label="how")
        self.both(lambda side: side.add_frames(pair, lengths, indirect=indirect, publish=how != "added",
                                               kick=how == "kick"))

    def _net_kick_and_reap(self, data: st.DataObject) -> None:
        """Publish what was added, kick one queue of a pair (the pair's loopback runs), reap RX, TX, both or none."""
        pair = self._pair(data)
        queue = data.draw(st.sampled_from([DriverSession.rx_queue(pair), DriverSession.tx_queue(pair)]), label="q")
        reap = data.draw(st.sampled_from(["both", "rx", "tx", "none"]), label="reap")

        def kick(side: Side) -> list[int]:
            side.ring(queue).publish()
            side.session.kick(queue)
            seqs = side.receive(pair, 0) if reap in ("both", "rx") else []
            if reap in ("both", "tx"):
                side.session.tx_done(pair, 0)
            return seqs

        self.both(kick)

    def _net_control_command(self, data: st.DataObject) -> None:
        """MAC_ADDR_SET, RX_PROMISC or (with MQ) VQ_PAIRS_SET on the control queue: the state the VMM carries."""
        kinds = ["mac", "promisc"] + (["pairs"] if self.cfg.queues > 1 else [])
        kind = data.draw(st.sampled_from(kinds), label="command")
        if kind == "mac":
            mac = bytes([0x02]) + data.draw(st.binary(min_size=5, max_size=5), label="mac")
            self.both(lambda side: side.workload.set_mac(mac))
        elif kind == "promisc":
            on = data.draw(st.booleans(), label="on")
            self.both(lambda side: side.workload.set_promisc(on))
        else:
            pairs = data.draw(st.integers(1, self.cfg.queues), label="pairs")
            # Pairs about to go idle are completed first: an inactive pair's frames would wait for ever.
            for pair in range(pairs, self.guest_side.workload.pairs):
                self.both(functools.partial(Side.settle_pair, pair=pair, frame_bytes=FRAME_LENGTHS[0]))
            self.both(lambda side: side.workload.set_pairs(pairs))

    # ----- blk operations ---------------------------------------------------------------------------------

    def _busy(self) -> list[tuple[int, int]]:
        """Sector ranges of the rule-made writes still outstanding, on every queue."""
        return [(p.first, p.first + p.count) for p in self.guest_side.outstanding_writes()]

    @staticmethod
    def _free_ranges(draws: list[tuple[int, int]], busy: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The drawn (sector, count) ranges that overlap neither ``busy`` nor each other (no order among them)."""
        kept: list[tuple[int, int]] = []
        taken = list(busy)
        for first, count in draws:
            if all(first + count <= a or b <= first for a, b in taken):
                kept.append((first, count))
                taken.append((first, first + count))
        return kept

    def _ranges(self, data: st.DataObject, most: int, label: str) -> list[tuple[int, int]]:
        count = st.integers(1, MAX_WRITE_SECTORS)
        drawn = data.draw(st.lists(st.tuples(st.integers(0, CAPACITY - MAX_WRITE_SECTORS), count), min_size=1,
                                   max_size=most), label=label)
        return drawn

    def _writes(self, side: Side, ranges: list[tuple[int, int]]) -> list[BlkRequest]:
        """Pattern writes of ``ranges``, recorded in the side's BlkShadow (what the disk must hold after)."""
        workload = side.workload
        assert workload.shadow is not None
        out = []
        for first, count in ranges:
            out.append(blk_out(first, workload.shadow.write(first, count)))
            workload.written.update(range(first, first + count))
        return out

    def _blk_batch(self, data: st.DataObject) -> None:
        """Writes, then reads of other sectors, one kick; reaped (reads checked against the shadow) or left used."""
        queue = data.draw(st.integers(0, self.cfg.queues - 1), label="queue")
        most = self.spare(queue) // 3
        if most < 1:
            return
        ranges = self._free_ranges(self._ranges(data, most, "writes"), self._busy())
        room_left = most - len(ranges)
        reads = self._free_ranges(self._ranges(data, room_left, "reads"), self._busy() + [
            (a, a + n) for a, n in ranges]) if room_left else []
        indirect = self._indirect(data)
        reap = bool(reads) or data.draw(st.booleans(), label="reap")

        def batch(side: Side) -> list[tuple[int, bytes]]:
            requests = self._writes(side, ranges) + [blk_in(first, count) for first, count in reads]
            done = side.blk_submit(queue, requests, indirect=indirect, kick=True, reap=reap)
            shadow = side.workload.shadow
            assert shadow is not None
            for (first, _), (_, got) in zip(reads, done[len(ranges):], strict=True):
                problems = shadow.mismatches(first, got)
                assert not problems, f"{side.name}: read back {problems[:4]}"
            return done

        self.both(batch)

    def _blk_submit_without_kick(self, data: st.DataObject) -> None:
        """Writes made available and not kicked: chains the device has not seen (or, shadowed, not used)."""
        queue = data.draw(st.integers(0, self.cfg.queues - 1), label="queue")
        most = min(self.spare(queue) // 3, 4)
        if most < 1:
            return
        ranges = self._free_ranges(self._ranges(data, most, "writes"), self._busy())
        indirect = self._indirect(data)
        self.both(lambda side: side.blk_submit(queue, self._writes(side, ranges), indirect=indirect, kick=False,
                                               reap=False))

    def _blk_kick_and_reap(self, data: st.DataObject) -> None:
        """Kick a queue; reap everything, or leave the completions in the used ring for later."""
        queue = data.draw(st.integers(0, self.cfg.queues - 1), label="queue")
        reap = data.draw(st.booleans(), label="reap")

        def kick(side: Side) -> int:
            if reap:
                return len(side.blk_complete_all(queue, []))
            side.session.kick(queue)
            return 0

        self.both(kick)

    def _blk_flush(self, data: st.DataObject) -> None:
        """FLUSH and GET_ID on one queue, kicked and reaped with everything else outstanding there."""
        queue = data.draw(st.integers(0, self.cfg.queues - 1), label="queue")
        if self.spare(queue) < 5:
            return
        requests = [blk_flush(), blk_get_id()]
        self.both(lambda side: side.blk_submit(queue, requests, indirect=False, kick=True, reap=True))

    def _chain_spanning_ring(self, data: st.DataObject) -> None:
        """One request with as many descriptors as the ring has slots (a packed ring's wrap flips inside it)."""
        if self._ring_free(0):  # it needs the whole ring, and its random sectors must meet no outstanding write
            self.both(lambda side: side.workload.chain_spanning_ring())

    def _ring_free(self, queue: int) -> bool:
        """Nothing outstanding on ``queue`` and no rule-made write outstanding anywhere."""
        busy = self._busy()
        return self.guest_side.ring(queue).in_flight == 0 and not busy

    # ----- rules for either device ------------------------------------------------------------------------

    @rule(data=st.data())
    @step
    def cpu_writes(self, data: st.DataObject) -> None:
        """The guest CPU writes some pages of its working set (the dirty log must see those made while migrating)."""
        workload = self.guest_side.workload
        pages = data.draw(st.lists(st.tuples(st.integers(0, workload.cpu_pages - 1), st.integers(0, PAGE - 64),
                                             st.binary(min_size=1, max_size=64)), min_size=1, max_size=8),
                          label="writes")
        for side in self.sides:
            for page, offset, payload in pages:
                side.guest.layout.write(side.workload.cpu_region + page * PAGE + offset, payload)

    @rule()
    @step
    def reset_driver(self) -> None:
        """The driver completes what it has outstanding, resets the device and brings it up again: rings
        start over at the configured start index (a stale base would show up at the next migration)."""
        self._settle()
        self.both(lambda side: side.guest.reset_and_reinit())
        for side in self.sides:
            side.workload.pairs = 1
            side.pending.clear()

    @rule()
    @step
    def settle_and_verify(self) -> None:
        """Complete everything on both guests and prove nothing was lost or duplicated, mid-history."""
        self._verify()

    # ----- migration --------------------------------------------------------------------------------------

    def _inflight(self, data: st.DataObject, most: int) -> int | list[tuple[int, int]]:
        """What to leave in flight at the pause: a count of RX buffers (net) or write ranges (blk)."""
        if self.cfg.is_net:
            return data.draw(st.integers(0, most), label="inflight")
        return self._ranges(data, most, "inflight writes") if most else []

    @rule(bandwidth_mib_s=st.sampled_from([256, 1024, 4096]), downtime_ms=st.sampled_from([0.5, 2.0, 20.0]),
          max_iterations=st.integers(1, 4), next_mode=st.sampled_from(list(DirtyMode)))
    @step
    def migrate(self, bandwidth_mib_s: int, downtime_ms: float, max_iterations: int, next_mode: DirtyMode) -> None:
        """Migrate the guest now, with its rings as the history left them."""
        self._migrate(bandwidth_mib_s, downtime_ms, max_iterations, fault=None, fault_at=0, inflight=0, spans=False,
                      next_mode=next_mode)

    @rule(data=st.data(), bandwidth_mib_s=st.sampled_from([256, 1024, 4096]),
          downtime_ms=st.sampled_from([0.5, 2.0, 20.0]), max_iterations=st.integers(1, 4),
          next_mode=st.sampled_from(list(DirtyMode)))
    @step
    def migrate_mid_batch(self, data: st.DataObject, bandwidth_mib_s: int, downtime_ms: float,
                          max_iterations: int, next_mode: DirtyMode) -> None:
        """Migrate with chains left in flight just before the pause (and, blk, a chain spanning the ring)."""
        spans = not self.cfg.is_net and data.draw(st.booleans(), label="spans")
        inflight = self._inflight(data, 8 if self.cfg.is_net else 3)
        self._migrate(bandwidth_mib_s, downtime_ms, max_iterations, fault=None, fault_at=0, inflight=inflight,
                      spans=spans, next_mode=next_mode)

    @rule(data=st.data(), fault=st.sampled_from(FAULTS), fault_at=st.integers(0, 3),
          bandwidth_mib_s=st.sampled_from([256, 4096]), downtime_ms=st.sampled_from([0.5, 20.0]),
          max_iterations=st.integers(1, 3))
    @step
    def migrate_with_fault(self, data: st.DataObject, fault: str, fault_at: int, bandwidth_mib_s: int,
                           downtime_ms: float, max_iterations: int) -> None:
        """A migration with a fault at an iteration (0: the stop-and-copy); it fails if the fault strikes."""
        inflight = self._inflight(data, 4 if self.cfg.is_net else 2)
        self._migrate(bandwidth_mib_s, downtime_ms, max_iterations, fault=fault, fault_at=fault_at,
                      inflight=inflight, spans=False)

    def _leave_inflight(self, inflight: int | list[tuple[int, int]]) -> None:
        """Chains made available and not kicked just before the pause: RX buffers (net), writes (blk); as many
        as fit beside the workload's batch (the guest runs on after a failed migration)."""
        if isinstance(inflight, int):
            count = min(inflight, self.spare(0))
            if count:
                self.both(lambda side: side.add_rx(0, count, indirect=False, publish=True, kick=False))
            return
        ranges = self._free_ranges(inflight[:self.spare(0) // 3], self._busy())
        if ranges:
            self.both(lambda side: side.blk_submit(0, self._writes(side, ranges), indirect=False, kick=False,
                                                   reap=False))

    def _migrate(self, bandwidth_mib_s: int, downtime_ms: float, max_iterations: int, *, fault: str | None,
                 fault_at: int, inflight: int | list[tuple[int, int]], spans: bool,
                 next_mode: DirtyMode | None = None) -> None:
        """One migration to a fresh destination, whose VMM finds dirty pages the ``next_mode`` way (the
        source's, by default) for the migration after this one."""
        cfg, side = self.cfg, self.guest_side
        self.migrations += 1
        refuse = fault == "destination-refuses"
        smaller = 1 << (cfg.queue_size - 1).bit_length() - 1  # the largest power of 2 below the guest's rings
        destination = self._endpoint(cfg.target(disk=self.disk, queue_size=smaller if refuse else None))
        link = Link(self.clock, bandwidth_mib_s * MIB, 0.0001)
        result = MigrationResult(f"stateful-{self.migrations}", faults=[f"{fault}@{fault_at}"] if fault else [])
        struck: list[str] = []
        shadow_inflight: list[int] = []

        def strike(iteration: int, stage: str) -> None:
            # At the state stage the source is suspended and its shadows drained.
            if stage == "state" and side.guest.vmm.mode is DirtyMode.SHADOW:
                shadow_inflight.extend(len(side.guest.vmm.vring_inflight(i) or []) for i in side.session.rings)
            if fault is None or refuse or iteration != fault_at:
                return
            if fault == "link-drop" and stage == "ram":
                struck.append(fault)
                link.drop()
            elif fault == "source-crash" and stage == "ram":
                struck.append(fault)
                raise SourceCrashed(f"the source's migration code died in iteration {iteration}")
            elif (fault == "corrupt-ram" and stage == "ram") or (fault == "corrupt-state" and stage == "state"):
                struck.append(fault)
                link.corrupt_next()

        def before_pause() -> None:
            if spans and self._ring_free(0):
                self.both(lambda each: each.workload.chain_spanning_ring())
            if inflight:
                self._leave_inflight(inflight)
            if any(wrapped(r) for r in side.session.rings.values()):
                event("migrated after an index wrap")
            if any(r.pending for r in side.session.rings.values()):
                event("migrated with chains added and not published")

        def run_guest(seconds: float) -> None:
            for each in self.sides:
                each.workload.run(seconds)

        migrated = LiveMigration(side.guest, side.endpoint, destination, link=link, downtime_s=downtime_ms / 1000,
                                 max_iterations=max_iterations, run_guest=run_guest, result=result,
                                 before_pause=before_pause, strike=strike, probe_s=0.002,
                                 destination_mode=next_mode).run()
        if refuse:
            struck.append(fault or "")
        assert not result.problems, (result.problems, result.error, result.checks)
        if struck:
            event(f"migration failed: {struck[0]}")
            assert not migrated and result.error is not None, (struck, result.checks)
            assert any("dirty tracking stopped" in line for line in result.checks), result.checks
            # Struck in the stop-and-copy, the failure comes after SUSPEND; a crash at any iteration comes before
            # it. (A link drop or corruption armed in pre-copy strikes at the next message, which may be later.)
            resumed = any("source resumed" in line for line in result.checks)
            if refuse or fault == "corrupt-state" or (fault_at == 0 and fault != "source-crash"):
                assert resumed, result.checks
            if fault == "source-crash":
                assert not resumed, result.checks
            return
        assert migrated and result.error is None, (result.error, result.checks)
        assert any("byte-equal at switch-over" in line for line in result.checks), result.checks
        assert any("device state equal" in line for line in result.checks), result.checks
        event("migrated")
        if any(shadow_inflight):
            event("migrated with chains in flight in the shadow virtqueues")
        side.endpoint = destination

    # ----- the end: nothing lost, both alike ---------------------------------------------------------------

    def _settle(self) -> None:
        """Complete everything outstanding on both guests, the same way on each."""
        if self.cfg.is_net:
            for pair in range(self.guest_side.workload.pairs):
                self.both(functools.partial(Side.settle_pair, pair=pair, frame_bytes=FRAME_LENGTHS[1]))
        else:
            for queue in range(self.cfg.queues):
                self.both(functools.partial(Side.blk_complete_all, queue=queue, chains=[]))
        for side in self.sides:
            for ring in side.session.rings.values():
                assert not ring.in_flight, f"{side.name}: {ring.name} still has {ring.in_flight} chains outstanding"

    def _verify(self) -> None:
        self._settle()
        for side in self.sides:
            side.workload.drain()
        self.both(lambda side: side.workload.verify())  # each verified, and both observed the same

    @invariant()
    def in_lockstep(self) -> None:
        """The guest's driver and its twin's see exactly the same rings, frames and counters."""
        if not self.sides:
            return
        self.healthy = False
        self.both(lambda side: {i: ring_view(r) for i, r in side.session.rings.items()})
        self.both(lambda side: {p: list(s.received) for p, s in side.workload.streams.items()})
        self.both(lambda side: (side.workload.stats.frames, side.workload.stats.blk_writes, side.workload.pairs))
        self.healthy = True

    def teardown(self) -> None:
        try:
            if self.sides and self.healthy:
                self.healthy = False
                self._verify()
        finally:
            with self.stack:
                for guest in self.guests:
                    self.stack.callback(guest.close)


MigrateAnywhere.TestCase.settings = settings(
    max_examples=25, stateful_step_count=15, deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],  # explain: minutes here
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
TestMigrateAnywhere = MigrateAnywhere.TestCase
