"""The ring-contents fuzzer: split and packed rings, indirect tables included, fed to sim-net and sim-blk.

Each input (:func:`~vdpacert.fuzz.rings_decode.decode`) picks a device (sim-net: RX, TX or the
control queue; sim-blk: its request queue), a ring format, a queue size (a power of two for
split, any size up to 256 for packed), INDIRECT_DESC and EVENT_IDX, then descriptors whose
addresses, lengths, flags and links are drawn from the classes a walker must survive, indirect
tables, the available ring (or the available packed descriptors) in one or two publish stages,
and the kicks. The device is one long-lived instance per kind (:class:`~.rings_rig.Rig`), reset
and brought up again through the vhost-vdpa front for every input.

Invariants (raised as :class:`~vdpacert.fuzz.base.InvariantBroken`):

- ``rings.write_outside``: every guest byte that changed lies in a device-writable buffer of a
  chain the device used, within the used length (plus the blk status byte), or in the used ring /
  packed slots of used lists / device event area; the guard pages around the region never change.
- ``rings.used_entry``: every used entry names a chain made available and not used yet, that is
  not bad input, and its len does not exceed the chain's writable bytes.
- ``rings.error_typed``: nothing but OSError (an errno) leaves the kick path, and on the request
  queues (blk, control) the device either uses every valid chain ahead of the first bad one and
  then sets DEVICE_NEEDS_RESET or moves past the bad one, never stalls silently. (Net data queues
  wait for their partner, so there only the other invariants apply.)
- ``rings.device_alive``: after the input, a reset and one well-formed exchange (a frame echoed
  through the loopback, a sector written and read back) complete correctly, checked every
  ``alive_every`` inputs (every input by default: it costs one more bring-up).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

from vdpacert.conformance.client import TargetDied
from vdpacert.fuzz.base import Fuzzer, InvariantBroken
from vdpacert.fuzz.rings_check import Allowed, check_queue, check_writes
from vdpacert.fuzz.rings_decode import decode
from vdpacert.fuzz.rings_layout import BUF_AREA, BUF_SIZE, FILL, GUARD, RING_END, RingInput
from vdpacert.fuzz.rings_rig import DeviceFactory, Rig, reference_device
from vdpacert.uapi.virtio_config import VIRTIO_CONFIG_S_NEEDS_RESET

__all__ = ["FUZZER", "INVARIANTS", "DeviceFactory", "RingFuzzer", "coverage", "make_fuzzer", "reference_device"]

INVARIANTS = ("rings.write_outside", "rings.used_entry", "rings.error_typed", "rings.device_alive")
KINDS = ("sim-net", "sim-blk")
_PATTERN = bytes([FILL]) * BUF_SIZE
#: Tag sets the shipped seeds cover, one seed each: every queue, both formats, an indirect chain.
SEED_TAGS = (
    {"device:sim-net", "queue:tx", "format:split", "honest", "partner"},
    {"device:sim-net", "queue:rx", "format:packed", "honest", "partner"},
    {"device:sim-net", "queue:ctrl", "format:split", "honest"},
    {"device:sim-blk", "format:split", "honest", "indirect_chain"},
    {"device:sim-blk", "format:packed", "honest"},
)

#: What the module's :data:`FUZZER` decoded and saw, by tag (tests assert every kind of input was reached).
coverage: Counter[str] = Counter()


class RingFuzzer:
    """The state behind one ring :class:`Fuzzer`: a rig per device kind, built by :meth:`setup`."""

    def __init__(self, device_factory: DeviceFactory | None = None, *, alive_every: int = 1,
                 stats: Counter[str] | None = None) -> None:
        self.factory = device_factory or reference_device
        self.alive_every = max(1, alive_every)
        self.coverage = coverage if stats is None else stats
        self.rigs: dict[str, Rig] = {}
        self.inputs = 0

    def setup(self) -> None:
        if not self.rigs:
            self.rigs = {kind: Rig(kind, self.factory) for kind in KINDS}

    def close(self) -> None:
        for rig in self.rigs.values():
            rig.close()
        self.rigs.clear()

    def one_input(self, data: bytes) -> None:
        self.setup()
        ring = decode(data)
        self.coverage.update(ring.tags)
        self.inputs += 1
        rig = self.rigs[ring.device]
        self._run(rig, ring)
        if self.inputs % self.alive_every == 0:
            rig.alive()
            self.coverage["alive_checked"] += 1

    def _run(self, rig: Rig, ring: RingInput) -> None:
        rig.mem.fill(GUARD, RING_END, 0)
        rig.mem.write(GUARD + BUF_AREA, _PATTERN)
        queues = ring.queues
        try:
            rig.bring_up(ring.features, [(q.index, q.num, q.desc, q.driver, q.device, q.base) for q in queues])
        except (OSError, TargetDied) as error:
            raise InvariantBroken("rings.device_alive", f"{ring.device} refused a valid bring-up: {error}") from error
        for q in queues:
            for offset, data in q.setup:
                rig.write(offset, data)
        for offset, data in ring.patches:
            rig.write(offset, data)
        before = bytearray(rig.mem.read(0, rig.mem.size))

        def publish(writes: Sequence[tuple[int, bytes]]) -> None:
            for offset, data in writes:
                rig.write(offset, data)
                before[GUARD + offset:GUARD + offset + len(data)] = data

        order = list(reversed(queues)) if ring.partner_first else list(queues)
        seen: dict[int, list[tuple[int, bytes]]] = {q.index: [] for q in queues}  # (avail idx, view) per kick
        afters: list[bytes] = []  # memory after each kick
        positions: dict[int, list[int]] = {q.index: [] for q in queues if q.packed}  # packed used positions

        def snap() -> None:
            now = {index: rig.client.get_vring_base(index) >> 16 for index in positions}
            afters.append(rig.mem.read(0, rig.mem.size))
            for index, at in positions.items():
                at.append(now[index])
        try:
            if ring.early:
                for q in order:
                    for stage in q.stages:
                        publish(stage)
                for q in order:
                    seen[q.index].append((q.avail_idx, bytes(before)))
                rig.driver_ok()
                for q in order:
                    rig.client.kick(q.index)
                    snap()
            else:
                rig.driver_ok()
                for q in order:
                    for k, stage in enumerate(q.stages):
                        publish(stage)
                        seen[q.index].append((q.published[k] if q.published else 0, bytes(before)))
                        rig.client.kick(q.index)
                        snap()
            status = rig.client.get_status()
        except TargetDied as error:
            raise InvariantBroken("rings.error_typed", f"{ring.device}: {error}") from error
        except OSError as error:  # a typed refusal: allowed, the invariants below still hold
            self.coverage[f"oserror:{error.errno}"] += 1
            status = rig.client.get_status()
        final = bytes(before)
        for q in queues:
            seen[q.index].append((q.avail_idx, final))
        snap()
        after = afters[-1]
        needs_reset = bool(status & VIRTIO_CONFIG_S_NEEDS_RESET)
        self.coverage["needs_reset" if needs_reset else "no_reset"] += 1
        allowed = Allowed([])
        for q in queues:
            result = check_queue(q, ring.features, seen[q.index], afters, allowed, status_tail=q.kind == "blk",
                                 used_positions=positions.get(q.index, ()))
            self.coverage["used_entries"] += result.used
            self.coverage["own_rings_overwritten"] += result.clobbered
            if needs_reset:
                # A queue that broke may leave chains it had taken and written (answered, not yet
                # published) unused: their writable buffers were the device's to write all the same.
                for chain in result.taken:
                    allowed.add_chain(chain, chain.writable_len, status_tail=False)
            if q is queues[0] and q.kind in ("blk", "ctrl") and not needs_reset and not result.clobbered:
                stalled = result.used < result.available or (result.bad_reached and result.used == result.available)
                if stalled:
                    raise InvariantBroken("rings.error_typed", f"{ring.device} queue {q.index}: {result.used} of "
                                          f"{result.available} valid chains used, then a stop without "
                                          f"DEVICE_NEEDS_RESET (bad input next: {result.bad_reached})")
        check_writes(final, after, allowed)


def _seeds() -> list[bytes]:
    """Well-formed starting inputs: for each of :data:`SEED_TAGS`, the first seeded random input that
    decodes to it with honest chains only (deterministic, so the corpus is the same in every run)."""
    found: list[bytes] = []
    for wanted in SEED_TAGS:
        for k in range(20000):
            data = random.Random(k).randbytes(192)
            tags = decode(data).tags
            if wanted <= tags and "raw" not in tags and "stray" not in tags and not any("fuzzed" in t for t in tags):
                found.append(data)
                break
    return found


def make_fuzzer(device_factory: DeviceFactory | None = None, *, alive_every: int = 1,
                stats: Counter[str] | None = None) -> Fuzzer:
    """A ring fuzzer over the devices ``device_factory(kind)`` builds (default: the reference ones)."""
    state = RingFuzzer(device_factory, alive_every=alive_every, stats=stats)
    return Fuzzer(
        name="rings",
        description="split and packed ring contents (indirect tables too) fed to sim-net (RX, TX, control "
                    "queue) and sim-blk through the vhost-vdpa front",
        one_input=state.one_input,
        seeds=_seeds,
        invariants=INVARIANTS,
        setup=state.setup,
    )


FUZZER = make_fuzzer()
