"""The ring fuzzer: clean on the reference devices, and each invariant caught on a device that breaks it.

The negative controls are seeded-bug parents built like ``conformance/mutants``: sim-net writing one
byte past the used length of an RX buffer, sim-blk reporting a used length above the writable
bytes, sim-blk flagging packed used descriptors with a wrap counter it never flips, sim-blk
crashing in its request loop, and sim-blk wedged for good once a queue broke.
"""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from collections.abc import Iterator

import pytest

from vdpacert.conformance.mutants.guest import BadChain, DmaFault, SplitView
from vdpacert.conformance.mutants.rings import PackedWrapCounterNotFlipped, UsedLenCountsReadable
from vdpacert.fuzz import rings
from vdpacert.fuzz.base import Fuzzer, InvariantBroken
from vdpacert.fuzz.rings_decode import decode
from vdpacert.impl.parent import VdpaParent
from vdpacert.impl.sim_blk import SimBlk
from vdpacert.impl.sim_net import SimNet, rx_index


class RxWritesPastUsedLen(SimNet):
    """Bug: after a pair runs, one more byte is written just past the used length of each new RX buffer."""

    def _process_pair(self, pair: int, kicked: int) -> None:
        rx = rx_index(pair)
        vq = self.vq(rx)
        before = None if vq.packed or not vq.ready else SplitView(self, rx).used_idx()
        super()._process_pair(pair, kicked)
        if before is None or vq.broken:
            return
        view = SplitView(self, rx)
        for k in range((view.used_idx() - before) & 0xFFFF):
            with contextlib.suppress(BadChain, DmaFault):
                head, length = view.used_elem(before + k)
                writable = [(a, n) for a, n, w in view.walk(head).segments if w]
                at = length
                for addr, size in writable:
                    if at < size:
                        view.dma.write(addr + at, b"\x00")
                        break
                    at -= size


class CrashingBlk(SimBlk):
    """Bug: an untyped exception escapes the request loop whenever a chain is available."""

    def process(self, index: int) -> None:
        if self.vq(index).ready:
            raise RuntimeError("firmware assertion")
        super().process(index)


class WedgedBlk(SimBlk):
    """Bug: once a queue broke, the device answers nothing ever again, reset or not."""

    wedged = False

    def finish_queue(self, index: int) -> None:
        if self.vq(index).broken:
            self.wedged = True
        super().finish_queue(index)

    def process(self, index: int) -> None:
        if not self.wedged:
            super().process(index)


def only(kind: str, cls: type[VdpaParent]) -> rings.DeviceFactory:
    def factory(target_kind: str) -> VdpaParent:
        return cls("vdpa0") if target_kind == kind else rings.reference_device(target_kind)  # type: ignore[call-arg]
    return factory


@pytest.fixture(scope="module")
def fuzzer() -> Iterator[tuple[Fuzzer, Counter[str]]]:
    stats: Counter[str] = Counter()
    made = rings.make_fuzzer(stats=stats)
    assert made.setup is not None
    made.setup()
    yield made, stats


def test_the_module_fuzzer_is_named_and_lists_its_invariants() -> None:
    assert rings.FUZZER.name == "rings"
    assert set(rings.FUZZER.invariants) == {"rings.write_outside", "rings.used_entry", "rings.error_typed",
                                            "rings.device_alive"}


def test_seeds_run_clean_and_cover_every_queue_and_format(fuzzer: tuple[Fuzzer, Counter[str]]) -> None:
    made, stats = fuzzer
    seeds = made.seeds()
    assert len(seeds) == len(rings.SEED_TAGS)
    for seed in seeds:
        made.one_input(seed)
    tags = set().union(*(decode(seed).tags for seed in seeds))
    assert {"device:sim-net", "device:sim-blk", "queue:rx", "queue:tx", "queue:ctrl", "queue:blk",
            "format:split", "format:packed", "indirect_chain"} <= tags
    assert stats["used_entries"] >= len(seeds)  # the seeds are traffic, not refusals


def test_random_inputs_run_clean_and_reach_every_kind_of_input(fuzzer: tuple[Fuzzer, Counter[str]]) -> None:
    made, stats = fuzzer
    before = Counter(stats)
    for i in range(2000):
        rng = random.Random(i)
        made.one_input(rng.randbytes(rng.randrange(0, 400)))
    seen = stats - before
    for tag in ("device:sim-net", "device:sim-blk", "format:split", "format:packed", "queue:rx", "queue:tx",
                "queue:ctrl", "queue:blk", "indirect_chain", "indirect_table", "partner", "staged", "honest", "raw"):
        assert seen[tag] >= 20, (tag, seen)
    assert seen["needs_reset"] >= 100 and seen["no_reset"] >= 100  # bad input hit, and traffic got through
    assert seen["used_entries"] >= 500
    assert seen["alive_checked"] == 2000
    print(f"\nring fuzzer coverage over 2000 random inputs: {dict(sorted(seen.items()))}")


def test_empty_and_tiny_inputs_decode_and_run(fuzzer: tuple[Fuzzer, Counter[str]]) -> None:
    made, _ = fuzzer
    for data in (b"", b"\x00", b"\xff" * 3, bytes(range(256))):
        made.one_input(data)


def run_until_broken(made: Fuzzer, wanted: str, inputs: list[bytes]) -> InvariantBroken:
    assert made.setup is not None
    made.setup()
    for data in inputs:
        try:
            made.one_input(data)
        except InvariantBroken as broken:
            assert broken.invariant == wanted, broken
            return broken
    raise AssertionError(f"{wanted} was never broken")


def net_rx_inputs() -> list[bytes]:
    """Seeds and random inputs on sim-net's RX queue (the loopback writes RX buffers there)."""
    out = [seed for seed in rings.FUZZER.seeds() if "device:sim-net" in decode(seed).tags]
    for i in range(3000):
        rng = random.Random(i)
        data = rng.randbytes(rng.randrange(0, 400))
        tags = decode(data).tags
        if "queue:rx" in tags or "queue:tx" in tags:
            out.append(data)
    return out


def blk_inputs() -> list[bytes]:
    out = [seed for seed in rings.FUZZER.seeds() if "device:sim-blk" in decode(seed).tags]
    for i in range(3000):
        rng = random.Random(i)
        data = rng.randbytes(rng.randrange(0, 400))
        if "device:sim-blk" in decode(data).tags:
            out.append(data)
    return out


def test_a_write_past_the_used_length_is_write_outside() -> None:
    made = rings.make_fuzzer(only("sim-net", RxWritesPastUsedLen), stats=Counter())
    broken = run_until_broken(made, "rings.write_outside", net_rx_inputs())
    assert "outside every used writable buffer" in broken.detail


def test_a_used_length_above_the_writable_bytes_is_used_entry() -> None:
    made = rings.make_fuzzer(only("sim-blk", UsedLenCountsReadable), stats=Counter())
    broken = run_until_broken(made, "rings.used_entry", blk_inputs())
    assert "writable bytes" in broken.detail


def test_a_packed_used_wrap_counter_never_flipped_is_used_entry() -> None:
    # The checker follows every reading of a list to the device's used position; a used descriptor
    # flagged with the wrong lap still has no reading that explains it.
    made = rings.make_fuzzer(only("sim-blk", PackedWrapCounterNotFlipped), stats=Counter())
    broken = run_until_broken(made, "rings.used_entry", blk_inputs())
    assert "without a used descriptor there" in broken.detail or "is not reached" in broken.detail, broken


def test_an_untyped_exception_from_the_kick_path_is_error_typed() -> None:
    made = rings.make_fuzzer(only("sim-blk", CrashingBlk), stats=Counter())
    broken = run_until_broken(made, "rings.error_typed", blk_inputs())
    assert "RuntimeError" in broken.detail


def test_a_device_wedged_after_bad_input_is_not_alive() -> None:
    made = rings.make_fuzzer(only("sim-blk", WedgedBlk), stats=Counter())
    broken = run_until_broken(made, "rings.device_alive", blk_inputs())
    assert "after reset" in broken.detail
