"""The "iotlb" fuzzer: its seeds and random inputs run clean on the reference front, and seeded bugs in the
device or the front make it raise InvariantBroken (negative controls)."""

from __future__ import annotations

import errno
import random
import time

import pytest

from vdpacert.conformance.mutants.iotlb import InvalidateIgnored, PermIgnored
from vdpacert.fuzz.base import InvariantBroken
from vdpacert.fuzz.front import dma_map_only, with_iotlb_limit
from vdpacert.fuzz.iotlb import FUZZER, INVARIANTS, IOTLB_LIMIT, IotlbHarness, seeds
from vdpacert.impl.sim_device import SimDevice
from vdpacert.impl.vhost_vdpa import VhostVdpa


def test_the_fuzzer_is_registered_as_iotlb() -> None:
    assert FUZZER.name == "iotlb"
    assert FUZZER.invariants == INVARIANTS
    assert FUZZER.setup is not None


def test_seeds_run_clean() -> None:
    harness = IotlbHarness()
    for seed in seeds():
        harness.one_input(seed)
    reached = harness.session.reached
    assert reached["write UPDATE -> ok"] and reached["write UPDATE -> EFAULT"] and reached["write INVALIDATE -> ok"]
    assert reached["entry limit (ENOSPC) reached"]


def test_random_inputs_run_clean_and_reach_every_message_type() -> None:
    harness = IotlbHarness()
    harness.setup()
    rng = random.Random(7)
    inputs = [rng.randbytes(rng.randrange(0, 320)) for _ in range(2000)]
    start = time.perf_counter()
    for data in inputs:
        harness.one_input(data)
    elapsed = time.perf_counter() - start
    reached = harness.session.reached
    print(f"iotlb: {len(inputs) / elapsed:.0f} exec/s; {dict(sorted(reached.items()))}")
    for kind in ("UPDATE", "INVALIDATE", "BATCH_BEGIN", "BATCH_END", "MISS", "ACCESS_FAIL", "unknown type", "raw"):
        assert reached[f"write {kind}"], kind
    for answer in ("write UPDATE -> ok", "write UPDATE -> EFAULT", "write UPDATE -> EINVAL",
                   "write INVALIDATE -> ok", "write BATCH_END -> ok", "VHOST_SET_BACKEND_FEATURES -> ENOTSUP"):
        assert reached[answer], answer
    for framing in ("v1, whole", "v2, whole", "v2, short", "v2, long", "unknown version, whole"):
        assert reached[f"framing {framing}"], framing
    assert reached["entry limit (ENOSPC) reached"]
    assert reached["status 0x0"]


def _mutant(cls: type[SimDevice]) -> IotlbHarness:
    device = dma_map_only(with_iotlb_limit(cls, IOTLB_LIMIT))
    return IotlbHarness(kind="sim-blk", parent_factory=lambda: device("vdpa0"))


def _broken(harness: IotlbHarness, count: int = 400) -> InvariantBroken:
    """The first InvariantBroken the seeds, then random inputs, raise (fails the test when none does)."""
    rng = random.Random(3)
    for data in (*seeds(), *(rng.randbytes(rng.randrange(0, 320)) for _ in range(count))):
        try:
            harness.one_input(data)
        except InvariantBroken as broken:
            return broken
    pytest.fail("no input broke an invariant")


def test_a_device_that_ignores_invalidations_is_caught() -> None:
    # The stale entry shows in the device's map (iotlb.state) or, sooner, as an UPDATE of the same range the
    # device refuses (EEXIST inside, EFAULT out) where the model accepts it (iotlb.answer).
    assert _broken(_mutant(InvalidateIgnored)).invariant in ("iotlb.answer", "iotlb.state")


def test_a_device_that_maps_everything_read_write_breaks_iotlb_state() -> None:
    assert _broken(_mutant(PermIgnored)).invariant == "iotlb.state"


class _LongWriteAnswered(VhostVdpa):
    """Bug: write() answers the length written, not sizeof(struct vhost_msg_v2), for a message with extra bytes."""

    def write(self, data: bytes | bytearray | memoryview) -> int:
        super().write(data)
        return len(data)


def test_a_front_answering_the_wrong_length_breaks_iotlb_answer() -> None:
    assert _broken(IotlbHarness(front_class=_LongWriteAnswered)).invariant == "iotlb.answer"


class _UntypedOnUnknownType(VhostVdpa):
    """Bug: an unknown message type escapes as a KeyError instead of OSError(EINVAL)."""

    def write(self, data: bytes | bytearray | memoryview) -> int:
        try:
            return super().write(data)
        except OSError as error:
            if error.errno == errno.EINVAL and "message type" in str(error):
                raise KeyError("message type") from error
            raise


def test_an_untyped_error_breaks_iotlb_typed_error() -> None:
    assert _broken(IotlbHarness(front_class=_UntypedOnUnknownType)).invariant == "iotlb.typed_error"
