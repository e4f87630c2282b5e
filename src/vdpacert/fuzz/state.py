"""The migration state-blob fuzzer: real snapshots, mutated bit by bit and field by field, loaded and restored.

``setup`` brings real devices up through the vhost interface (a VMM, :class:`~vdpacert.migration.vmm.Vmm`,
under a guest driver), runs traffic and control commands, suspends them and saves their state:
sim-net split and packed with two queue pairs (multiqueue, a new MAC, RX modes), sim-net packed
with one pair, sim-blk split and packed, and sim-blk split with chains in flight. Each snapshot
gets a destination of the same kind, with a copy of the guest's memory and a VMM of its own, that
every input reuses (it is reset between inputs).

An input picks a snapshot and says how to mutate its blob (:func:`mutate_blob`): flip bits anywhere
(with the checksum left stale or recomputed), edit payload bytes (JSON punctuation, UTF-8 lead
bytes, digits), edit the header (magic, version, length), or decode the JSON and change fields --
set a value of another type or an extreme (int limits, negative, non-canonical hex, str, list,
null, float), nudge it (one bit, +-3), delete the key, add an unknown key, wrap it in a list, edit a
list's elements, repeat a key -- and seal it again with a correct or a wrong checksum.

What must hold (:data:`INVARIANTS`; each check is a function taking the loader or the restore
function as an argument, so a test can point it at a deliberately broken one):

- ``state.typed_errors``: ``load`` returns a DeviceState or raises StateError, nothing else;
- ``state.refused_applies_nothing``: a refused blob, or a state the destination refuses, changes
  nothing (no state-changing vhost call recorded, every GET observable as before);
- ``state.round_trip``: an accepted blob's state dumps to a blob that loads to the same state, and a
  canonically encoded blob is byte-equal to that dump;
- ``state.fit_agrees``: ``load(blob, destination)`` refuses exactly the states restore refuses;
- ``state.restore_typed_errors``: restore succeeds or raises StateError / RestoreError;
- ``state.restore_error_resets``: after a RestoreError the destination's status is 0;
- ``state.restored_running``: after a restore the destination runs (status FEATURES_OK | DRIVER_OK).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from vdpacert.conformance.client import VhostClient
from vdpacert.conformance.targets import Target, make_target
from vdpacert.fuzz.base import ByteReader, Fuzzer, InvariantBroken
from vdpacert.migration import blob
from vdpacert.migration.restore import restore_device_state
from vdpacert.migration.state import DestinationInfo, DeviceState, NetState, RestoreError, StateError
from vdpacert.migration.vmm import DirtyMode, Vmm

__all__ = [
    "FUZZER", "INVARIANTS", "SOURCES", "Destination", "Loader", "Mutant", "Restorer", "SourceSpec", "StateHarness",
    "check_load", "check_nothing_applied", "check_restore", "check_round_trip", "mutate_blob", "program", "setup",
    "teardown",
]

INVARIANTS: Final = ("state.typed_errors", "state.refused_applies_nothing", "state.round_trip", "state.fit_agrees",
                     "state.restore_typed_errors", "state.restore_error_resets", "state.restored_running")
#: What a destination reads back after a successful restore: ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK.
RUNNING: Final = 0xF
GUEST_MEMORY: Final = 1 << 20
QUEUE_SIZE: Final = 16


@dataclass(frozen=True)
class SourceSpec:
    """One snapshot the fuzzer starts from: a device kind, its ring layout, and what the guest did."""

    name: str
    target: str
    packed: bool
    queues: int
    inflight: bool = False  # blk: claim two chains in flight (a device holding requests at save)


#: The snapshots, in the order an input's first byte picks them (seeds and corpus files rely on it).
SOURCES: Final = (
    SourceSpec("net-split-mq", "sim-net:max_vq_pairs=2", packed=False, queues=2),
    SourceSpec("net-packed-mq", "sim-net:max_vq_pairs=2", packed=True, queues=2),
    SourceSpec("net-packed", "sim-net", packed=True, queues=1),
    SourceSpec("blk-split", "sim-blk", packed=False, queues=1),
    SourceSpec("blk-split-inflight", "sim-blk", packed=False, queues=1, inflight=True),
    SourceSpec("blk-packed", "sim-blk", packed=True, queues=1),
)

Loader = Callable[[bytes, DestinationInfo | None], DeviceState]


class Restorer(Protocol):
    """:func:`~vdpacert.migration.restore.restore_device_state`'s signature."""

    def __call__(self, ops: Any, state: DeviceState, *, kick_fds: Mapping[int, int], call_fds: Mapping[int, int],
                 rewind_inflight: bool = True, bases: Mapping[int, int] | None = None) -> None: ...


# ----- mutating a blob, as the input bytes say -----------------------------------------------------------

MODE_AS_IS, MODE_BITS, MODE_BYTES, MODE_FIELDS, MODE_FRAME = range(5)
#: Field names an input can aim at (the format's keys); a name a snapshot lacks is added to its top object.
FIELD_NAMES: Final = (
    "version", "device_id", "device_features", "features", "backend_features", "status", "config", "vqs_count",
    "vring_num_max", "group_asid", "packed", "vrings", "net", "index", "num", "desc", "avail", "used", "enabled",
    "group", "base", "used_idx", "inflight", "mac", "queue_pairs", "promisc", "allmulti", "alluni", "nomulti",
    "nouni", "nobcast",
)
FIELD_ACTIONS: Final = ("value", "near", "delete", "extra", "wrap", "element", "repeat")
#: Payload bytes worth planting: JSON punctuation and digits, escapes, and bytes that are not UTF-8 on their own.
PAYLOAD_BYTES: Final = b'"{}[],:-0129eE.\\n tf\x00\x7f\x80\xc3\xed\xff'
_DIGEST: Final = hashlib.sha256().digest_size
_HEADER: Final = struct.Struct("<8sHI")


@dataclass(frozen=True)
class Mutant:
    """A mutated blob; ``canonical`` when it is a correctly sealed canonical JSON encoding (dump's own form)."""

    data: bytes
    canonical: bool
    description: str


def _value(reader: ByteReader) -> Any:
    """A JSON value of a type or size the format does not expect (or, by chance, one it does)."""
    kind = reader.below(28)
    table: tuple[Callable[[], Any], ...] = (
        lambda: 0, lambda: -1, lambda: 1, reader.u8, reader.u16, reader.u32, reader.u64,
        lambda: 1 << 16, lambda: 1 << 32, lambda: 1 << 64, lambda: 1 << 128, lambda: -(1 << 63), lambda: 10 ** 40,
        lambda: f"{reader.u64():#x}", lambda: "0x" + "f" * 33, lambda: "0x0", lambda: "0X1", lambda: "0x01",
        lambda: "", lambda: "zz", lambda: reader.take(reader.below(16)).hex(), lambda: "ABCDEF", lambda: "\u00e9",
        lambda: [], lambda: [reader.u8()], lambda: {}, lambda: None, lambda: 1.5)
    if kind == 26:  # null shares its slot with the two booleans: bool-for-int mixups are worth trying often
        return (None, True, False)[reader.below(3)]
    return table[kind]()


def _near(value: Any, reader: ByteReader) -> Any:
    """A value close to ``value``: the same type, one bit or a few units off (boundaries hide there)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value ^ 1 << reader.below(64) if reader.flag() else value + reader.between(-3, 3)
    if isinstance(value, str) and value.startswith("0x"):
        number = int(value, 16)
        return f"{number ^ 1 << reader.below(130) if reader.flag() else max(0, number + reader.between(-3, 3)):#x}"
    if isinstance(value, str):
        raw = bytearray.fromhex(value) if len(value) % 2 == 0 and all(c in "0123456789abcdef" for c in value) \
            else bytearray(value.encode())
        choice = reader.below(3)
        if choice == 0 and raw:
            raw[reader.below(len(raw))] ^= 1 << reader.below(8)
        elif choice == 1 and raw:
            raw.pop()
        else:
            raw.append(reader.u8())
        return raw.hex()
    if isinstance(value, list):
        return [*value, value[-1]] if value and reader.flag() else value[:-1]
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k != min(value, default=None)}
    return {}


def _locations(node: Any, name: str, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key) whose key is ``name``, depth first in document order."""
    if isinstance(node, dict):
        for key in sorted(node):
            if key == name:
                out.append((node, key))
            _locations(node[key], name, out)
    elif isinstance(node, list):
        for item in node:
            _locations(item, name, out)
    return out


def _edit_field(top: dict[str, Any], reader: ByteReader, repeats: list[str]) -> str:
    name = reader.pick(FIELD_NAMES)
    places = _locations(top, name, [])
    action = reader.pick(FIELD_ACTIONS)
    if not places:
        top[name] = _value(reader)
        return f"add {name}"
    container, key = places[reader.below(len(places))]
    current = container[key]
    if action == "value":
        container[key] = _value(reader)
    elif action == "near":
        container[key] = _near(current, reader)
    elif action == "delete":
        del container[key]
    elif action == "extra":
        container[reader.pick(("extra", *FIELD_NAMES))] = _value(reader)
    elif action == "wrap":
        container[key] = [current]
    elif action == "element":
        if not isinstance(current, list):
            container[key] = _value(reader)
        elif current and reader.flag():
            at = reader.below(len(current))
            if reader.flag():
                del current[at]
            else:
                current[at] = _near(current[at], reader) if reader.flag() else _value(reader)
        else:  # one choice read first, then only what it needs: a seed can say exactly what it wants
            choice = reader.below(3)
            current.append((current[-1] if current else 0) if choice == 0 else reader.u16() if choice == 1
                           else _value(reader))
    elif container is top:
        repeats.append(key)  # "repeat": the key appears twice in the object, which JSON itself allows
    else:
        container[key] = _near(current, reader)
    return f"{action} {name}"


def _seal(payload: bytes, framing: int) -> bytes:
    """0-2: sealed correctly (most inputs should reach the parser); 3: one bit of the checksum wrong."""
    data = bytearray(blob.seal(payload))
    if framing == 3:
        data[-1] ^= 1
    return bytes(data)


def _reseal_digest(data: bytearray) -> None:
    if len(data) >= _DIGEST:
        data[-_DIGEST:] = hashlib.sha256(data[:-_DIGEST]).digest()


def mutate_blob(original: bytes, reader: ByteReader) -> Mutant:
    """The blob ``original`` mutated as ``reader``'s bytes direct (see the module docstring)."""
    mode = reader.below(5)
    payload = original[_HEADER.size:-_DIGEST]
    if mode == MODE_AS_IS:
        return Mutant(original, True, "as is")
    if mode == MODE_BITS:
        data = bytearray(original)
        count = 1 + reader.below(8)
        for _ in range(count):
            at = reader.below(len(data) * 8)
            data[at >> 3] ^= 1 << (at & 7)
        resealed = reader.flag()
        if resealed:
            _reseal_digest(data)
        return Mutant(bytes(data), False, f"{count} bit(s) flipped{', digest recomputed' if resealed else ''}")
    if mode == MODE_BYTES:
        text = bytearray(payload)
        count = 1 + reader.below(4)
        for _ in range(count):
            at, value, how = reader.below(len(text) + 1), reader.pick(PAYLOAD_BYTES), reader.below(3)
            if how == 0 and at < len(text):
                text[at] = value
            elif how == 1 or at >= len(text):
                text[at:at] = bytes([value])
            else:
                del text[at]
        framing = reader.below(4)  # 2: the old header and digest kept (a stale length and checksum)
        framed = _seal(bytes(text), framing) if framing != 2 else original[:_HEADER.size] + text + original[-_DIGEST:]
        return Mutant(bytes(framed), False, f"{count} payload byte edit(s), framing {framing}")
    if mode == MODE_FIELDS:
        top = json.loads(payload)
        repeats: list[str] = []
        edits = [_edit_field(top, reader, repeats) for _ in range(1 + reader.below(3))]
        encoded = json.dumps(top, sort_keys=True, separators=(",", ":"))
        for key in repeats:
            pair = json.dumps(key) + ":" + json.dumps(top.get(key))
            encoded = "{" + pair + ("," if len(encoded) > 2 else "") + encoded[1:]
        framing = reader.below(4)
        return Mutant(_seal(encoded.encode(), framing), framing != 3 and not repeats,
                      f"fields: {'; '.join(edits)}, framing {framing}")
    data = bytearray(original)  # MODE_FRAME
    which = reader.below(4)
    if which == 0:
        data[reader.below(8)] ^= 1 << reader.below(8)
    elif which == 1:
        choice = reader.below(4)
        data[8:10] = struct.pack("<H", (0, 2, 0xFFFF)[choice] if choice < 3 else reader.u16())
    elif which == 2:
        size, choice = len(payload), reader.below(7)
        lengths = (0, size - 1, size + 1, blob.MAX_PAYLOAD, blob.MAX_PAYLOAD + 1, 0xFFFFFFFF)
        data[10:14] = struct.pack("<I", lengths[choice] if choice < 6 else reader.u32())
    else:
        cut = reader.below(len(data) + 64)
        data = data[:cut] if cut < len(data) else data + reader.take(cut - len(data))
    resealed = reader.flag()
    if resealed:
        _reseal_digest(data)
    return Mutant(bytes(data), False, f"frame edit {which}{', digest recomputed' if resealed else ''}")


class _Program:
    """Writes the bytes that make a ByteReader return chosen values: how seeds and corpus files are built."""

    def __init__(self) -> None:
        self.out = bytearray()

    def below(self, value: int, bound: int) -> _Program:
        size = max(1, (bound - 1).bit_length() + 7 >> 3)
        self.out += (value % bound).to_bytes(size, "little")
        return self

    def raw(self, data: bytes) -> _Program:
        self.out += data
        return self


def program(source: str, mode: int) -> _Program:
    """The start of an input: the snapshot called ``source`` and a mutation mode (then the mode's own choices)."""
    return _Program().below([s.name for s in SOURCES].index(source), len(SOURCES)).below(mode, 5)


def _field(name: str, action: str, occurrence: int = 0) -> bytes:
    out = _Program().below(FIELD_NAMES.index(name), len(FIELD_NAMES)).below(FIELD_ACTIONS.index(action),
                                                                           len(FIELD_ACTIONS))
    return bytes(out.below(occurrence, 256).out)


def seeds() -> list[bytes]:
    """Every snapshot as it is (all restore), and a few mutations that reach each invariant's check."""
    out = [bytes(program(spec.name, MODE_AS_IS).out) for spec in SOURCES]
    out += [
        # one more queue than the destination has: valid alone, refused by restore before any call
        bytes(program("net-split-mq", MODE_FIELDS).below(0, 3).raw(_field("vqs_count", "near")).raw(b"\x00\x04").out),
        # RX mode flipped: accepted, restored, replayed over the control queue
        bytes(program("net-packed-mq", MODE_FIELDS).below(0, 3).raw(_field("promisc", "near")).raw(b"\x00").out),
        # queue disabled at save: restored without SET_VRING_ENABLE
        bytes(program("blk-packed", MODE_FIELDS).below(0, 3).raw(_field("enabled", "near")).raw(b"\x00").out),
        # a MAC that is not hex
        bytes(program("net-packed", MODE_FIELDS).below(0, 3).raw(_field("mac", "value")).below(19, 28)
              .raw(b"\x00").out),
        # an in-flight id removed: the list no longer matches the distance
        bytes(program("blk-split-inflight", MODE_FIELDS).below(0, 3).raw(_field("inflight", "element"))
              .raw(b"\x01\x00\x01\x00").out),
        # the header claims 4 GiB of payload, digest recomputed
        bytes(program("blk-split", MODE_FRAME).below(2, 4).below(5, 7).raw(b"\x01").out),
        # one bit flipped in the payload, digest recomputed: the JSON parser sees it
        bytes(program("blk-split", MODE_BITS).below(0, 8).raw(struct.pack("<H", 8 * 40 + 1)).raw(b"\x01").out),
    ]
    return out


# ----- the destination and the invariant checks ------------------------------------------------------------

class _Recorder:
    """RestoreOps over a VMM that records each state-changing call by name (the GETs go through untouched)."""

    def __init__(self, vmm: Vmm) -> None:
        self.vmm = vmm
        self.calls: list[str] = []

    @property
    def client(self) -> VhostClient:
        return self.vmm.client

    def _note(self, name: str) -> Vmm:
        self.calls.append(name)
        return self.vmm

    def set_owner(self) -> None: self._note("set_owner").set_owner()
    def set_status(self, status: int, /) -> None: self._note("set_status").set_status(status)
    def get_status(self) -> int: return self.vmm.get_status()
    def get_backend_features(self) -> int: return self.vmm.get_backend_features()
    def set_backend_features(self, features: int, /) -> None:
        self._note("set_backend_features").set_backend_features(features)
    def get_features(self) -> int: return self.vmm.get_features()
    def set_features(self, features: int, /) -> None: self._note("set_features").set_features(features)
    def set_vring_num(self, index: int, num: int, /) -> None: self._note("set_vring_num").set_vring_num(index, num)
    def set_vring_base(self, index: int, num: int, /) -> None: self._note("set_vring_base").set_vring_base(index, num)
    def set_vring_addr(self, index: int, desc: int, avail: int, used: int, /) -> None:
        self._note("set_vring_addr").set_vring_addr(index, desc, avail, used)
    def set_vring_kick(self, index: int, fd: int, /) -> None: self._note("set_vring_kick").set_vring_kick(index, fd)
    def set_vring_call(self, index: int, fd: int, /) -> None: self._note("set_vring_call").set_vring_call(index, fd)
    def set_vring_enable(self, index: int, enable: bool, /) -> None:
        self._note("set_vring_enable").set_vring_enable(index, enable)
    def set_group_asid(self, group: int, asid: int, /) -> None:
        self._note("set_group_asid").set_group_asid(group, asid)
    def resume(self) -> None: self._note("resume").resume()
    def map_guest_memory(self) -> None: self._note("map_guest_memory").map_guest_memory()
    def replay_net_state(self, net: NetState, /) -> None: self._note("replay_net_state").replay_net_state(net)


@dataclass
class Destination:
    """A device a snapshot is restored onto, with the guest's memory copied and a VMM that stays for every input."""

    target: Target
    vmm: Vmm
    info: DestinationInfo
    kick_fds: dict[int, int]
    call_fds: dict[int, int]

    def observe(self) -> tuple[object, ...]:
        """Everything a GET shows of the device: unchanged when nothing was applied."""
        client = self.target.client
        return DestinationInfo.probe(client), client.get_status(), client.get_config(0, self.info.config_size)

    def reset(self) -> None:
        """Back to status 0 (the VMM forgets its queues too) when an input left the device set up."""
        if self.target.client.get_status() != 0:
            self.vmm.set_status(0)


def check_load(load: Loader, data: bytes, destination: DestinationInfo | None = None) -> DeviceState | None:
    """``load(data)``'s state, or None when it refused with StateError; anything else breaks state.typed_errors."""
    try:
        state = load(data, destination)
    except StateError as error:
        if not isinstance(error.field, str) or not error.field:
            raise InvariantBroken("state.typed_errors", f"a StateError names no field: {error}") from error
        return None
    except Exception as error:
        raise InvariantBroken("state.typed_errors", f"load let {type(error).__name__} out: {error}") from error
    if not isinstance(state, DeviceState):
        raise InvariantBroken("state.typed_errors", f"load returned a {type(state).__name__}, not a DeviceState")
    return state


def check_nothing_applied(destination: Destination, before: tuple[object, ...], calls: Sequence[str],
                          what: str) -> None:
    """After a refusal: no state-changing call was made and every observable is as it was."""
    if calls:
        raise InvariantBroken("state.refused_applies_nothing", f"{what}, yet {', '.join(calls)} reached the device")
    after = destination.observe()
    if after != before:
        changed = [name for name, a, b in zip(("probe", "status", "config"), before, after, strict=True) if a != b]
        raise InvariantBroken("state.refused_applies_nothing", f"{what}, yet the device's {', '.join(changed)} "
                                                               f"changed: {before} -> {after}")


def check_round_trip(load: Loader, state: DeviceState, data: bytes, canonical: bool) -> None:
    """An accepted state dumps to a blob that loads back equal; a canonical blob is that dump, byte for byte."""
    try:
        again = blob.dump(state)
    except StateError as error:
        raise InvariantBroken("state.round_trip", f"dump refuses a state load accepted: {error}") from error
    if canonical and again != data:
        raise InvariantBroken("state.round_trip", "the blob was canonical, but dump(load(blob)) differs from it")
    back = check_load(load, again)
    if back != state:
        diff = "; ".join(state.diff(back)[:4]) if back is not None else "refused"
        raise InvariantBroken("state.round_trip", f"load(dump(state)) is not the state: {diff}")


def check_restore(destination: Destination, state: DeviceState, restore: Restorer,
                  before: tuple[object, ...] | None = None) -> str:
    """Restore ``state``: ``refused`` (nothing applied), ``failed`` (RestoreError, device reset) or ``restored``."""
    before = destination.observe() if before is None else before
    ops = _Recorder(destination.vmm)
    try:
        bases = destination.vmm.expect_inflight(state)
        restore(ops, state, kick_fds=destination.kick_fds, call_fds=destination.call_fds, bases=bases)
    except StateError as error:
        check_nothing_applied(destination, before, ops.calls, f"restore refused the state ({error})")
        return "refused"
    except RestoreError as error:
        status = destination.target.client.get_status()
        if status != 0:
            raise InvariantBroken("state.restore_error_resets", f"{error}, and the device's status is {status:#x}, "
                                                                f"not 0") from error
        return "failed"
    except Exception as error:
        last = ", ".join(ops.calls[-3:]) or "none"
        raise InvariantBroken("state.restore_typed_errors", f"restore let {type(error).__name__} out: {error} "
                                                            f"({len(ops.calls)} calls made, the last: {last})"
                              ) from error
    status = destination.target.client.get_status()
    if status != RUNNING:
        raise InvariantBroken("state.restored_running", f"restore returned, but the status is {status:#x}")
    return "restored"


# ----- the snapshots and their destinations (built once per process) ----------------------------------------

@dataclass
class _Snapshot:
    spec: SourceSpec
    blob: bytes
    destination: Destination


_world: list[_Snapshot] = []
_targets: list[Target] = []


def _drive(target: Target, spec: SourceSpec) -> tuple[DeviceState, bytes, int]:
    """Bring a guest up on ``target``, run traffic, suspend and save: the state, the guest's memory, its IOVA base."""
    from vdpacert.conformance.driver.traffic import BlkShadow, NetStream, blk_out
    from vdpacert.migration.guest import Guest, GuestConfig
    from vdpacert.migration.save import save_device_state
    from vdpacert.uapi import virtio_net as N  # noqa: N812
    from vdpacert.uapi.virtio_ids import VIRTIO_ID_NET

    guest = Guest(target.new_memory(GUEST_MEMORY, gpa=0), lambda layout: Vmm(target, layout, mode=DirtyMode.DEVICE_LOG),
                  GuestConfig(packed=spec.packed, queue_size=QUEUE_SIZE, queues=spec.queues))
    guest.bring_up()
    session = guest.session
    if target.device_id == VIRTIO_ID_NET:
        stream = NetStream()
        session.post_rx(0, 3)
        session.send_frames(0, stream.frames(3, [64, 300, 1514]))
        session.receive_frames(0, 3)
        session.tx_done(0, 3)
        commands = [(N.VIRTIO_NET_CTRL_MAC, N.VIRTIO_NET_CTRL_MAC_ADDR_SET, bytes.fromhex("02aabbccddee")),
                    (N.VIRTIO_NET_CTRL_RX, N.VIRTIO_NET_CTRL_RX_PROMISC, b"\x00"),
                    (N.VIRTIO_NET_CTRL_RX, N.VIRTIO_NET_CTRL_RX_ALLMULTI, b"\x01")]
        if spec.queues > 1:
            commands.append((N.VIRTIO_NET_CTRL_MQ, N.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", spec.queues)))
        for cls, cmd, data in commands:
            if guest.ctrl(cls, cmd, data) != N.VIRTIO_NET_OK:
                raise RuntimeError(f"{spec.name}: control command {cls}/{cmd} was refused")
    else:
        shadow = BlkShadow(1 << 16)
        session.blk_run(0, [blk_out(sector, shadow.write(sector)) for sector in range(3)])
    guest.vmm.suspend()
    state = save_device_state(guest.vmm)
    if spec.inflight:  # two chains taken and not used (3-descriptor requests: heads 0 and 3)
        vring = state.vrings[0]
        held = dataclasses.replace(vring, base=(vring.used_idx + 2) & 0xFFFF, inflight=(0, 3))
        state = dataclasses.replace(state, vrings=(held, *state.vrings[1:]))
    memory = guest.memory.read(0, GUEST_MEMORY)
    iova_base = guest.layout.iova_base
    guest.close()
    return state, memory, iova_base


def _destination(spec: SourceSpec, memory: bytes, iova_base: int) -> Destination:
    from vdpacert.conformance.driver.memory import GuestLayout

    target = make_target(spec.target)
    _targets.append(target)
    copy = target.new_memory(GUEST_MEMORY, gpa=0)
    copy.write(0, memory)
    vmm = Vmm(target, GuestLayout(copy, iova_base=iova_base, fill=False), mode=DirtyMode.DEVICE_LOG)
    info = DestinationInfo.probe(target.client)
    return Destination(target, vmm, info, {i: target.eventfd() for i in range(info.vqs_count)},
                       {i: target.eventfd() for i in range(info.vqs_count)})


def setup() -> None:
    """Save every snapshot of :data:`SOURCES` and build its destination (once per process)."""
    if _world:
        return
    try:
        for spec in SOURCES:
            source = make_target(spec.target)
            _targets.append(source)
            state, memory, iova_base = _drive(source, spec)
            _world.append(_Snapshot(spec, blob.dump(state), _destination(spec, memory, iova_base)))
            source.close()
    except BaseException:
        teardown()
        raise


def teardown() -> None:
    """Close every device :func:`setup` opened (a later :func:`setup` builds them again)."""
    for snapshot in _world:
        snapshot.destination.vmm.close()
    _world.clear()
    while _targets:
        _targets.pop().close()


def snapshot_blob(name: str) -> bytes:
    """The valid blob saved for snapshot ``name`` (after :func:`setup`)."""
    setup()
    for snapshot in _world:
        if snapshot.spec.name == name:
            return snapshot.blob
    raise KeyError(name)


def _load(data: bytes, destination: DestinationInfo | None) -> DeviceState:
    return blob.load(data, destination)


class StateHarness:
    """The fuzzer's one-input function over a given loader and restore function (the real ones by default)."""

    def __init__(self, load: Loader = _load, restore: Restorer = restore_device_state) -> None:
        self.load = load
        self.restore = restore

    def __call__(self, data: bytes) -> None:
        setup()
        reader = ByteReader(data)
        snapshot = _world[reader.below(len(_world))]
        mutant = mutate_blob(snapshot.blob, reader)
        destination = snapshot.destination
        destination.reset()
        before = destination.observe()
        state = check_load(self.load, mutant.data)
        if state is None:
            check_nothing_applied(destination, before, (), "load refused the blob")
            return
        check_round_trip(self.load, state, mutant.data, mutant.canonical)
        fits = check_load(self.load, mutant.data, destination.info) is not None
        outcome = check_restore(destination, state, self.restore, before)
        if fits == (outcome == "refused"):
            verdict = "accepted" if fits else "refused"
            raise InvariantBroken("state.fit_agrees", f"load against the destination {verdict} a state restore "
                                                      f"{outcome} ({mutant.description})")
        destination.reset()


FUZZER: Final = Fuzzer(
    name="state",
    description="migration state blobs: real sim-net/sim-blk snapshots mutated bit by bit and field by field, "
                "loaded and restored onto a destination",
    one_input=StateHarness(),
    seeds=seeds,
    invariants=INVARIANTS,
    setup=setup,
)
