"""The "ioctls" fuzzer: its seeds and random inputs run clean on the reference front, and fronts with seeded
bugs make it raise InvariantBroken (negative controls), each naming the invariant the bug breaks."""

from __future__ import annotations

import errno
import random
import struct
import time

import pytest

from vdpacert.fuzz.base import InvariantBroken
from vdpacert.fuzz.ioctls import FUZZER, INVARIANTS, IoctlsHarness, seeds
from vdpacert.impl.vhost_vdpa import VhostVdpa
from vdpacert.uapi import vhost as V  # noqa: N812

_REQUESTS = sorted(value for name, value in vars(V).items()
                   if name.startswith("VHOST_") and name != "VHOST_VIRTIO" and isinstance(value, int))


def _req(name: str, *fields: int) -> bytes:
    """A known-request step of the decoder: kind 0, the request's index, shape 0 (a whole buffer), its fields."""
    return bytes([0, _REQUESTS.index(getattr(V, name)), 0, *fields])


def test_the_fuzzer_is_registered_as_ioctls() -> None:
    assert FUZZER.name == "ioctls"
    assert FUZZER.invariants == INVARIANTS
    assert len(_REQUESTS) >= 35  # every request of the UAPI, get and set


def test_seeds_run_clean() -> None:
    harness = IoctlsHarness()
    for seed in seeds():
        harness.one_input(seed)
    assert harness.session.reached["bring-up"] >= len(seeds())


def test_random_inputs_run_clean_and_reach_every_request_kind() -> None:
    harness = IoctlsHarness()
    harness.setup()
    rng = random.Random(11)
    inputs = [rng.randbytes(rng.randrange(0, 160)) for _ in range(2000)]
    start = time.perf_counter()
    for data in inputs:
        harness.one_input(data)
    elapsed = time.perf_counter() - start
    reached = harness.session.reached
    print(f"ioctls: {len(inputs) / elapsed:.0f} exec/s; {dict(sorted(reached.items()))}")
    for name, value in vars(V).items():
        if name.startswith("VHOST_") and name != "VHOST_VIRTIO" and isinstance(value, int):
            assert reached[f"known {name}"], name
    assert reached["mutated number (no request)"] and reached["random number (no request)"]
    for answer in ("no request -> ENOTTY", "no request -> EPERM", "VHOST_SET_VRING_NUM -> EINVAL",
                   "VHOST_SET_VRING_NUM -> ENOBUFS", "VHOST_SET_VRING_NUM -> ok", "VHOST_VDPA_SET_STATUS -> refused",
                   "VHOST_GET_FEATURES (short argument) -> EFAULT", "VHOST_VDPA_GET_CONFIG -> refused",
                   "VHOST_SET_VRING_CALL (outside the model's domain) -> EINVAL", "VHOST_SET_VRING_BASE -> refused"):
        assert reached[answer], answer


def _broken(harness: IoctlsHarness, data: bytes) -> InvariantBroken:
    with pytest.raises(InvariantBroken) as caught:
        harness.one_input(data)
    return caught.value


class _SizeAppliedThenRefused(VhostVdpa):
    """Bug: SET_VRING_NUM hands the size to the device before checking it, then refuses it (EINVAL)."""

    def ioctl(self, request: int, arg: bytes | bytearray | memoryview | int = 0) -> bytes | int:
        if request == V.VHOST_SET_VRING_NUM and isinstance(arg, bytes) and len(arg) >= 8:
            index, num = struct.unpack_from("<II", arg)
            if index < self.nvqs:
                self.parent.set_vq_num(index, num)
        return super().ioctl(request, arg)


def test_a_refused_request_that_changed_the_device_breaks_unchanged_on_refusal() -> None:
    data = _req("VHOST_SET_OWNER") + _req("VHOST_SET_VRING_NUM", 0, 4)  # queue 0, num 3: EINVAL on both sides
    assert _broken(IoctlsHarness(front_class=_SizeAppliedThenRefused), data).invariant \
        == "ioctls.unchanged_on_refusal"


class _SizeZeroAccepted(VhostVdpa):
    """Bug: SET_VRING_NUM of 0 is accepted (and ignored) instead of EINVAL. (A bug in what the front reports
    about itself, GET_VRING_NUM say, would not do here: the model's spec is probed through the front.)"""

    def ioctl(self, request: int, arg: bytes | bytearray | memoryview | int = 0) -> bytes | int:
        if request == V.VHOST_SET_VRING_NUM and isinstance(arg, bytes) and len(arg) >= 8 \
                and struct.unpack_from("<I", arg, 4)[0] == 0:
            return bytes(arg)
        return super().ioctl(request, arg)


def test_a_wrong_answer_breaks_answer() -> None:
    data = _req("VHOST_SET_OWNER") + _req("VHOST_SET_VRING_NUM", 0, 3)  # queue 0, num 0
    assert _broken(IoctlsHarness(front_class=_SizeZeroAccepted), data).invariant == "ioctls.answer"


class _ValueErrorOnHugeNum(VhostVdpa):
    """Bug: a queue size above 16 bits escapes as struct.error instead of OSError(EINVAL)."""

    def ioctl(self, request: int, arg: bytes | bytearray | memoryview | int = 0) -> bytes | int:
        if request == V.VHOST_SET_VRING_NUM and isinstance(arg, bytes) and struct.unpack_from("<I", arg, 4)[0] > 0xFFFF:
            struct.pack("<H", struct.unpack_from("<I", arg, 4)[0])
        return super().ioctl(request, arg)


def test_an_untyped_error_breaks_typed_error() -> None:
    data = _req("VHOST_SET_OWNER") + _req("VHOST_SET_VRING_NUM", 0, 6)  # queue 0, num 0x10000
    assert _broken(IoctlsHarness(front_class=_ValueErrorOnHugeNum), data).invariant == "ioctls.typed_error"


class _WedgedByUnknownRequest(VhostVdpa):
    """Bug: after a request it does not know, the front answers EIO to everything (a wedged device)."""

    wedged = False

    def ioctl(self, request: int, arg: bytes | bytearray | memoryview | int = 0) -> bytes | int:
        if self.wedged:
            raise OSError(errno.EIO, "wedged")
        try:
            return super().ioctl(request, arg)
        except OSError as error:
            if error.errno == errno.ENOTTY:
                self.wedged = True
            raise


def test_a_front_wedged_by_the_sequence_breaks_alive() -> None:
    data = _req("VHOST_SET_OWNER") + bytes([14, 0x33, 0x33, 0x33, 0x33]) + bytes([7])  # a random number, int arg
    assert _broken(IoctlsHarness(front_class=_WedgedByUnknownRequest), data).invariant == "ioctls.alive"
