"""Device-state snapshots as untrusted input: the ring arithmetic, the blob format, every validation rule.

The valid states here are built from what a real sim-net destination answers to GET ioctls, so they
load against it; every hostile variant (a flipped bit or byte anywhere in the blob, each JSON field
given a wrong type or an out-of-range value, each in-memory field broken) must be refused with
StateError, and the destination -- probed before and after -- must have seen no state-changing call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdpacert.conformance.client import VhostClient
from vdpacert.conformance.targets import Target, make_target
from vdpacert.migration import blob
from vdpacert.migration.restore import restore_device_state
from vdpacert.migration.state import (
    STATE_VERSION,
    DestinationInfo,
    DeviceState,
    NetState,
    StateError,
    VringState,
    in_flight_count,
    rewound_base,
    validate,
)
from vdpacert.model.ring_index import PackedVqState, encode_packed_base
from vdpacert.model.vring_packed import advance
from vdpacert.uapi import vhost_types as T  # noqa: N812
from vdpacert.uapi import virtio_net as N  # noqa: N812
from vdpacert.uapi.virtio_config import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1
from vdpacert.uapi.virtio_ids import VIRTIO_ID_BLOCK

IOVA = 0x4000_0000


def bits(*numbers: int) -> int:
    return sum(1 << n for n in numbers)


def make_state(info: DestinationInfo, config: bytes, *, packed: bool = False) -> DeviceState:
    """A valid sim-net state that fits ``info``: three queues, one with chains in flight."""
    features = bits(VIRTIO_F_VERSION_1, VIRTIO_F_ACCESS_PLATFORM, N.VIRTIO_NET_F_MAC, N.VIRTIO_NET_F_STATUS,
                    N.VIRTIO_NET_F_CTRL_VQ, N.VIRTIO_NET_F_CTRL_RX) | (bits(VIRTIO_F_RING_PACKED) if packed else 0)
    assert features & ~info.device_features == 0
    if packed:  # avail 3 slots past used, across the wrap of a 16-entry ring: two lists (1 + 2 descriptors)
        base0 = encode_packed_base(PackedVqState(1, 0, 14, 1))
        rx = VringState(0, 16, IOVA, IOVA + 0x1000, IOVA + 0x1004, True, 0, base0, base0 >> 16, (6, 2))
        fresh = encode_packed_base(PackedVqState(0, 1, 0, 1))
        tx = VringState(1, 16, IOVA + 0x2000, IOVA + 0x3000, IOVA + 0x3004, True, 0, fresh, fresh >> 16, ())
        ctrl = VringState(2, 5, IOVA + 0x4000, IOVA + 0x5000, IOVA + 0x5004, True, 1, fresh, fresh >> 16, ())
    else:  # used->idx 65534, last_avail_idx 1: three chains in flight across the 16-bit wrap
        rx = VringState(0, 16, IOVA, IOVA + 0x1000, IOVA + 0x2000, True, 0, 1, 0xFFFE, (14, 15, 0))
        tx = VringState(1, 16, IOVA + 0x3000, IOVA + 0x4000, IOVA + 0x5000, True, 0, 40, 40, ())
        ctrl = VringState(2, 8, IOVA + 0x6000, IOVA + 0x7000, IOVA + 0x8000, False, 1, 0, 0, ())
    return DeviceState(
        version=STATE_VERSION, device_id=info.device_id, device_features=info.device_features, features=features,
        backend_features=bits(T.VHOST_BACKEND_F_IOTLB_MSG_V2, T.VHOST_BACKEND_F_SUSPEND) & info.backend_features,
        status=0xF, config=config, vqs_count=info.vqs_count, vring_num_max=info.vring_num_max,
        group_asid=((0, 0), (1, 0)), packed=packed, vrings=(rx, tx, ctrl),
        net=NetState(mac=config[:6], queue_pairs=1, promisc=False, allmulti=True, alluni=False, nomulti=False,
                     nouni=False, nobcast=False))


class RecordingOps:
    """RestoreOps over a real destination that records every call; the GET probes go through ``client``."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.calls: list[str] = []

    @property
    def client(self) -> VhostClient:
        return self.target.client

    def _do(self, name: str, *args: Any) -> Any:
        self.calls.append(name)
        return getattr(self.target.client, name)(*args)

    def set_owner(self) -> None: self._do("set_owner")
    def set_status(self, status: int, /) -> None: self._do("set_status", status)
    def get_status(self) -> int: return int(self._do("get_status"))
    def get_backend_features(self) -> int: return int(self._do("get_backend_features"))
    def set_backend_features(self, features: int, /) -> None: self._do("set_backend_features", features)
    def get_features(self) -> int: return int(self._do("get_features"))
    def set_features(self, features: int, /) -> None: self._do("set_features", features)
    def set_vring_num(self, index: int, num: int, /) -> None: self._do("set_vring_num", index, num)
    def set_vring_base(self, index: int, num: int, /) -> None: self._do("set_vring_base", index, num)
    def set_vring_addr(self, index: int, desc: int, avail: int, used: int, /) -> None:
        self._do("set_vring_addr", index, desc, avail, used)
    def set_vring_kick(self, index: int, fd: int, /) -> None: self._do("set_vring_kick", index, fd)
    def set_vring_call(self, index: int, fd: int, /) -> None: self._do("set_vring_call", index, fd)
    def set_vring_enable(self, index: int, enable: bool, /) -> None: self._do("set_vring_enable", index, enable)
    def set_group_asid(self, group: int, asid: int, /) -> None: self._do("set_group_asid", group, asid)
    def resume(self) -> None: self._do("resume")
    def map_guest_memory(self) -> None: self.calls.append("map_guest_memory")
    def replay_net_state(self, net: NetState, /) -> None: self.calls.append("replay_net_state")


@dataclasses.dataclass
class Destination:
    target: Target
    info: DestinationInfo
    config: bytes

    def observe(self) -> tuple[object, ...]:
        """Everything a GET can see: if nothing was applied, this never changes."""
        client = self.target.client
        return (DestinationInfo.probe(client), client.get_status(), client.get_config(0, self.info.config_size))


@pytest.fixture(scope="module")
def destination() -> Iterator[Destination]:
    with make_target("sim-net") as target:
        info = DestinationInfo.probe(target.client)
        yield Destination(target, info, target.client.get_config(0, info.config_size))
        # Nobody took the device over: the first SET_OWNER of this open still succeeds.
        target.client.set_owner()


@pytest.fixture(scope="module")
def good(destination: Destination) -> DeviceState:
    return make_state(destination.info, destination.config)


@pytest.fixture(scope="module")
def good_packed(destination: Destination) -> DeviceState:
    return make_state(destination.info, destination.config, packed=True)


# ----- ring arithmetic -----------------------------------------------------------------------------------

def test_split_in_flight_and_rewind_across_the_16_bit_wrap(good: DeviceState) -> None:
    rx = good.vring(0)
    assert in_flight_count(rx, False) == 3
    assert rewound_base(rx, False) == 0xFFFE
    assert in_flight_count(dataclasses.replace(rx, base=rewound_base(rx, False), inflight=()), False) == 0


def test_packed_in_flight_counts_slots_across_the_ring_wrap(good_packed: DeviceState) -> None:
    rx = good_packed.vring(0)
    assert in_flight_count(rx, True) == 3
    rewound = rewound_base(rx, True)
    assert rewound == (rx.base >> 16) * 0x10001  # both halves at the used position
    assert in_flight_count(dataclasses.replace(rx, base=rewound), True) == 0


@given(num=st.integers(1, 32768), data=st.data())
def test_packed_in_flight_is_the_distance_walked(num: int, data: st.DataObject) -> None:
    """From any used position, walking d <= num slots gives a base whose in-flight count is d (a full ring: num)."""
    slot, wrap = data.draw(st.integers(0, num - 1)), data.draw(st.integers(0, 1))
    distance = data.draw(st.integers(0, num))
    avail_slot, avail_wrap = advance(slot, wrap, distance, num)
    base = encode_packed_base(PackedVqState(avail_slot, avail_wrap, slot, wrap))
    vring = VringState(0, num, IOVA, IOVA + 16, IOVA + 32, True, 0, base, base >> 16, ())
    assert in_flight_count(vring, True) == distance
    assert in_flight_count(dataclasses.replace(vring, base=rewound_base(vring, True)), True) == 0


# ----- the blob format --------------------------------------------------------------------------------

def test_round_trip_is_exact_and_canonical(good: DeviceState, good_packed: DeviceState,
                                           destination: Destination) -> None:
    for state in (good, good_packed):
        data = blob.dump(state)
        assert data[:8] == b"VDPASTAT"
        loaded = blob.load(data, destination.info)
        assert loaded == state and loaded.diff(state) == []
        assert blob.dump(loaded) == data
        payload = json.loads(blob.payload_of(data))
        assert payload["features"] == f"{state.features:#x}" and payload["config"] == state.config.hex()


def test_diff_names_each_field_that_differs(good: DeviceState) -> None:
    other = dataclasses.replace(good, status=0x1F, vrings=(dataclasses.replace(good.vrings[0], base=2),
                                                           *good.vrings[1:]))
    assert good.diff(other) == ["status: 15 != 31", "vrings[0].base: 1 != 2"]


def test_dump_refuses_an_invalid_state(good: DeviceState) -> None:
    with pytest.raises(StateError, match=r"^status"):
        blob.dump(dataclasses.replace(good, status=0x3))


@pytest.mark.parametrize(("mangle", "field"), [
    (lambda b: b"VDPASTAX" + b[8:], "magic"),
    (lambda b: b[:8] + b"\x02\x00" + b[10:], "format_version"),
    (lambda b: b[:-1], "length"),
    (lambda b: b + b"\x00", "length"),
    (lambda b: b[:10] + (0xFFFFFFFF).to_bytes(4, "little") + b[14:], "length"),
    (lambda b: b[:20] + bytes([b[20] ^ 1]) + b[21:], "checksum"),
    (lambda b: b[:12], "blob"),
], ids=["magic", "version", "short", "long", "huge-length", "checksum", "truncated"])
def test_framing_errors_name_their_field(good: DeviceState, mangle: Callable[[bytes], bytes], field: str) -> None:
    with pytest.raises(StateError) as caught:
        blob.load(mangle(blob.dump(good)))
    assert caught.value.field == field and str(caught.value).startswith(field)


def test_a_correct_checksum_does_not_make_a_payload_trusted(good: DeviceState) -> None:
    """The checksum is recomputable by anyone: a resealed lie is still refused by validation."""
    payload = json.loads(blob.payload_of(blob.dump(good)))
    payload["vrings"][0]["base"] = 100  # 102 chains ahead of used->idx on a 16-entry ring
    with pytest.raises(StateError, match=r"^vrings\[0\]\.base"):
        blob.load(blob.seal(json.dumps(payload).encode()))


@pytest.mark.parametrize(("text", "why"), [
    (b"\xff\xfe", "not UTF-8"), (b"[1", "not valid JSON"), (b'{"a":1,"a":2}', "appears twice"),
    (b'{"version":1.0}', "float"), (b'{"version":NaN}', "constant"), (b"[" * 100000 + b"]" * 100000, "JSON"),
    (b"9" * 5000, "JSON"), (b"[]", "must be an object"),
])
def test_malformed_payloads_are_refused(text: bytes, why: str) -> None:
    with pytest.raises(StateError, match=why):
        blob.load(blob.seal(text))


# ----- every JSON field, mutated --------------------------------------------------------------------------

Path = tuple[str | int, ...]


def leaves(value: object, path: Path = ()) -> Iterator[tuple[Path, object]]:
    """Every value of the payload with its path, containers included (they can be mutated too)."""
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, (*path, key))
    elif isinstance(value, list):
        for position, item in enumerate(value):
            yield from leaves(item, (*path, position))


def bad_values(path: Path, value: object) -> list[object]:
    """Values of the wrong type or out of range for this field; each must be refused."""
    wrong_types: list[object] = [None, "1", [], {}]
    if isinstance(value, bool):
        return [*wrong_types, 0, 1]
    if isinstance(value, int):
        return [*wrong_types, -1, 1 << 64, True]
    if isinstance(value, str) and value.startswith("0x"):
        return [None, 16, "0x", "0X10", "10", "0x-1", "0x01", "0x" + "f" * 33, "0xG"]
    if isinstance(value, str):
        return [None, 5, "z", value[:-1] if value else "a", value.upper() if value.upper() != value else "0G", "00"]
    if isinstance(value, list):
        junk: object = {} if path and path[-1] in ("vrings",) else [0] if path[-1:] == ("group_asid",) else 99
        return [None, {}, "x", 5, [*value, junk]]
    if isinstance(value, dict):
        missing = {k: v for k, v in list(value.items())[1:]}
        return [[], "x", 5, missing, {**value, "extra": 0}] + ([None] if path == ("net",) else [])
    raise AssertionError(f"unexpected payload value {value!r} at {path}")


def set_path(obj: Any, path: Path, value: object) -> Any:
    if not path:
        return value
    copy = json.loads(json.dumps(obj))
    target = copy
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return copy


def mutations(state: DeviceState) -> list[tuple[Path, object]]:
    payload = blob.to_payload(state)
    return [(path, bad) for path, value in leaves(payload) if path for bad in bad_values(path, value)]


def test_every_field_with_a_wrong_type_or_out_of_range_value_is_refused(good: DeviceState, good_packed: DeviceState,
                                                                        destination: Destination) -> None:
    tried = 0
    for state in (good, good_packed):
        payload = blob.to_payload(state)
        for path, bad in mutations(state):
            hostile = blob.seal(json.dumps(set_path(payload, path, bad)).encode())
            with pytest.raises(StateError):
                blob.load(hostile, destination.info)
            tried += 1
        for key in payload:  # each top-level field missing
            with pytest.raises(StateError, match=f"^{key}: is missing"):
                blob.load(blob.seal(json.dumps({k: v for k, v in payload.items() if k != key}).encode()))
    assert tried > 400


@settings(max_examples=300)
@given(data=st.data())
def test_any_flipped_bit_or_byte_is_refused_and_nothing_is_applied(good: DeviceState, good_packed: DeviceState,
                                                                   destination: Destination,
                                                                   data: st.DataObject) -> None:
    state = data.draw(st.sampled_from([good, good_packed]))
    original = blob.dump(state)
    position = data.draw(st.integers(0, len(original) - 1))
    flip = data.draw(st.one_of(st.sampled_from([1 << bit for bit in range(8)]), st.integers(1, 255)))
    hostile = original[:position] + bytes([original[position] ^ flip]) + original[position + 1:]
    before = destination.observe()
    ops = RecordingOps(destination.target)
    with pytest.raises(StateError):
        loaded = blob.load(hostile, DestinationInfo.probe(ops.client))
        restore_device_state(ops, loaded, kick_fds={}, call_fds={})  # never reached: the load refuses
    assert ops.calls == [] and destination.observe() == before


# ----- the rules, on in-memory states, through restore: refused before any call ------------------------

def broken_states(state: DeviceState, backend_offer: int) -> list[tuple[str, DeviceState]]:
    """(field the refusal must name, a state breaking one rule)."""
    replace = dataclasses.replace
    packed = state.packed
    v0, v1 = state.vrings[0], state.vrings[1]
    assert state.net is not None
    net = state.net

    def vring(**changes: Any) -> DeviceState:
        return replace(state, vrings=(replace(v0, **changes), *state.vrings[1:]))

    out: list[tuple[str, DeviceState]] = [
        ("version", replace(state, version=2)),
        ("device_id", replace(state, device_id=VIRTIO_ID_BLOCK, net=None)),  # the destination is a net device
        ("features", replace(state, features=state.features | 1 << 63)),  # acked, never offered
        ("features", replace(state, features=state.features & ~(1 << VIRTIO_F_VERSION_1))),
        ("backend_features", replace(state, backend_features=1 << 9)),
        ("status", replace(state, status=0xB)),  # no DRIVER_OK
        ("status", replace(state, status=0x4F)),  # NEEDS_RESET
        ("config", replace(state, config=state.config[:-1])),
        ("vqs_count", replace(state, vqs_count=5)),
        ("packed", replace(state, packed=not packed)),
        ("group_asid[1]", replace(state, group_asid=((1, 0), (0, 0)))),
        ("group_asid[0].group", replace(state, group_asid=((2, 0),))),  # the destination has 2 groups
        ("group_asid[0].asid", replace(state, group_asid=((0, 2),))),  # ... and 2 address spaces
        ("vrings[1].index", replace(state, vrings=(v1, v0, *state.vrings[2:]))),
        ("vrings[0].index", replace(state, vrings=(replace(v0, index=3),))),
        ("vrings[0].num", vring(num=state.vring_num_max * 2 if packed else 12)),
        ("vrings[0].num", vring(num=0)),
        ("vrings[0].desc", vring(desc=0)),
        ("vrings[0].desc", vring(desc=v0.desc + 8)),
        ("vrings[0].avail", vring(avail=v0.avail + (2 if packed else 1))),
        ("vrings[0].used", vring(used=v0.used + 2)),
        ("vrings[0].group", vring(group=2)),
        ("vrings[0].inflight", vring(inflight=() if packed else (*v0.inflight, 3))),
        ("vrings[0].inflight[1]", vring(inflight=(v0.inflight[0], v0.inflight[0], *v0.inflight[2:]))),
        ("vrings[0].inflight[0]", vring(inflight=(v0.num, *v0.inflight[1:]))),
        ("vrings[0].enabled", vring(enabled=1)),
        ("net", replace(state, net=None)),
        ("net.mac", replace(state, net=replace(net, mac=b"\x02" * 5))),
        ("net.queue_pairs", replace(state, net=replace(net, queue_pairs=2))),  # no MQ acked
        ("net.queue_pairs", replace(state, net=replace(net, queue_pairs=0))),
        ("net.promisc", replace(state, net=replace(net, promisc=None))),
    ]
    unoffered = [bit for bit in range(1, 9) if not backend_offer >> bit & 1]
    if unoffered:  # a known backend feature this destination does not offer
        out.append(("backend_features", replace(state, backend_features=state.backend_features | 1 << unoffered[0])))
    if packed:
        out += [("vrings[0].base", vring(base=(v0.base & ~0x7FFF) | 16)),  # avail index 16 of a 16-entry ring
                ("vrings[0].used_idx", vring(used_idx=v0.used_idx ^ 1)),
                ("vrings[0].base", vring(base=1 << 32))]
    else:
        out += [("vrings[0].base", vring(base=0x10001)),  # wrap bits on a split ring
                ("vrings[0].base", vring(base=(v0.used_idx + 17) & 0xFFFF, inflight=tuple(range(16)))),
                ("vrings[0].used_idx", vring(used_idx=-1))]
    return out


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_each_rule_is_refused_by_restore_before_any_call(destination: Destination, packed: bool) -> None:
    state = make_state(destination.info, destination.config, packed=packed)
    validate(state, destination.info)
    before = destination.observe()
    for field, broken in broken_states(state, destination.info.backend_features):
        ops = RecordingOps(destination.target)
        with pytest.raises(StateError) as caught:
            restore_device_state(ops, broken, kick_fds={0: 0, 1: 0, 2: 0}, call_fds={0: 0, 1: 0, 2: 0})
        assert caught.value.field == field, (field, str(caught.value))
        assert ops.calls == []
    assert destination.observe() == before


@settings(max_examples=200)
@given(data=st.data())
def test_any_field_given_a_value_of_the_wrong_type_is_refused_before_any_call(
        good: DeviceState, destination: Destination, data: st.DataObject) -> None:
    """In-memory states are checked as strictly as parsed ones: a VMM may build one from anything."""
    field = data.draw(st.sampled_from([f.name for f in dataclasses.fields(DeviceState)]))
    value = data.draw(st.one_of(st.none(), st.text(max_size=3), st.floats(), st.lists(st.integers(), max_size=2),
                                st.integers(max_value=-1)))
    changes: dict[str, Any] = {field: value}
    broken = dataclasses.replace(good, **changes)
    ops = RecordingOps(destination.target)
    before = destination.observe()
    with pytest.raises(StateError):
        restore_device_state(ops, broken, kick_fds={}, call_fds={})
    assert ops.calls == [] and destination.observe() == before


def test_a_blob_fitting_one_destination_is_refused_by_a_smaller_one(good: DeviceState) -> None:
    data = blob.dump(good)
    with make_target("sim-net:queue_size=8") as small:
        with pytest.raises(StateError, match=r"^vrings\[0\]\.num: queue size 16 is above the destination"):
            blob.load(data, DestinationInfo.probe(small.client))
        assert small.client.get_status() == 0


def test_the_checksum_is_sha256_of_everything_before_it(good: DeviceState) -> None:
    data = blob.dump(good)
    assert hashlib.sha256(data[:-32]).digest() == data[-32:]
    assert int.from_bytes(data[10:14], "little") == len(data) - 14 - 32
