"""A :class:`~vdpacert.migration.state.DeviceState` as bytes on the wire, and loading such bytes as untrusted input.

Format (all integers little-endian)::

    offset  size  field
    0       8     magic b"VDPASTAT"
    8       2     format version (u16), FORMAT_VERSION = 1
    10      4     payload length (u32), at most MAX_PAYLOAD
    14      n     payload: UTF-8 JSON, one object (below)
    14 + n  32    SHA-256 of bytes [0, 14 + n)

The payload is JSON so anyone can read what a blob holds (``tail -c +15 blob | head -c -32``). It
is written canonically (sorted keys, no spaces), so equal states give byte-equal blobs. Its object
has exactly these keys (no more, no fewer, none repeated)::

    version          int   DeviceState version (STATE_VERSION)
    device_id        int
    device_features  hex   offered features, e.g. "0x308830028"
    features         hex   acked features
    backend_features hex   acked backend features
    status           int   device status at save
    config           bytes config space
    vqs_count        int
    vring_num_max    int
    group_asid       [[group, asid], ...] sorted by group
    packed           bool
    vrings           [{index, num, desc: hex, avail: hex, used: hex, enabled: bool, group, base, used_idx,
                       inflight: [int, ...]}, ...] sorted by index
    net              null | {mac: bytes, queue_pairs, promisc, allmulti, alluni, nomulti, nouni, nobcast}

``hex`` is a canonical lowercase ``0x`` string (no leading zeros: ``"0x0"``), used for feature
words and ring addresses because both exceed 2^53, past which many JSON readers round numbers;
``bytes`` is a lowercase hex string without prefix. Floats, NaN and Infinity are not part of the
format.

Why SHA-256 and not CRC32: the checksum guards against corruption in transit (a migration stream
is exactly where the scenarios inject it), and a 32-bit CRC lets one random multi-burst corruption
in 2^32 through; SHA-256 makes that negligible for every corruption pattern, and hashing a few KiB
costs microseconds. It is no authentication: anyone can recompute it, so :func:`load` trusts
nothing the checksum covers and validates every field (:func:`~vdpacert.migration.state.validate`).

:func:`load` refuses a blob with :class:`~vdpacert.migration.state.StateError` naming the field and
the rule: bad magic, unknown format version, a length that does not match, a checksum mismatch,
malformed JSON, missing/extra/repeated keys, wrong types, out-of-range values, an inconsistent state,
or (given a :class:`~vdpacert.migration.state.DestinationInfo`) a state the destination cannot take.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Callable
from typing import Final, NoReturn, TypeVar

from vdpacert.migration.state import (
    DestinationInfo,
    DeviceState,
    NetState,
    StateError,
    VringState,
    validate,
)

__all__ = ["FORMAT_VERSION", "MAGIC", "MAX_PAYLOAD", "dump", "load", "payload_of", "seal", "to_payload", "validate"]

MAGIC: Final = b"VDPASTAT"
FORMAT_VERSION: Final = 1
#: Largest payload accepted: far above any real state (a full 32768-entry in-flight list is ~200 KiB),
#: small enough that a hostile length cannot make a reader allocate without bound.
MAX_PAYLOAD: Final = 16 << 20
_HEADER: Final = struct.Struct("<8sHI")
_DIGEST_SIZE: Final = hashlib.sha256().digest_size

_TOP_KEYS: Final = frozenset({"version", "device_id", "device_features", "features", "backend_features", "status",
                              "config", "vqs_count", "vring_num_max", "group_asid", "packed", "vrings", "net"})
_VRING_KEYS: Final = frozenset({"index", "num", "desc", "avail", "used", "enabled", "group", "base", "used_idx",
                                "inflight"})
_NET_KEYS: Final = frozenset({"mac", "queue_pairs", "promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast"})
_HEX_INT = re.compile(r"0x(?:0|[1-9a-f][0-9a-f]{0,31})")  # 128 bits at most, canonical
_HEX_BYTES = re.compile(r"(?:[0-9a-f]{2})*")

_T = TypeVar("_T")
Json = dict[str, object]


# ----- writing ---------------------------------------------------------------------------------------

def _hex(value: int) -> str:
    return f"{value:#x}"


def to_payload(state: DeviceState) -> Json:
    """The JSON object of the payload (see the module docstring), before encoding."""
    return {
        "version": state.version, "device_id": state.device_id,
        "device_features": _hex(state.device_features), "features": _hex(state.features),
        "backend_features": _hex(state.backend_features), "status": state.status, "config": state.config.hex(),
        "vqs_count": state.vqs_count, "vring_num_max": state.vring_num_max,
        "group_asid": [[group, asid] for group, asid in state.group_asid], "packed": state.packed,
        "vrings": [{"index": v.index, "num": v.num, "desc": _hex(v.desc), "avail": _hex(v.avail), "used": _hex(v.used),
                    "enabled": v.enabled, "group": v.group, "base": v.base, "used_idx": v.used_idx,
                    "inflight": list(v.inflight)} for v in state.vrings],
        "net": None if state.net is None else {
            "mac": state.net.mac.hex(), "queue_pairs": state.net.queue_pairs, "promisc": state.net.promisc,
            "allmulti": state.net.allmulti, "alluni": state.net.alluni, "nomulti": state.net.nomulti,
            "nouni": state.net.nouni, "nobcast": state.net.nobcast},
    }


def seal(payload: bytes, *, version: int = FORMAT_VERSION) -> bytes:
    """Frame ``payload`` bytes as a blob: header, payload, SHA-256 (any payload: tests build hostile ones)."""
    head = _HEADER.pack(MAGIC, version, len(payload)) + payload
    return head + hashlib.sha256(head).digest()


def dump(state: DeviceState) -> bytes:
    """The blob of ``state``. The state is validated first: a source never ships what every destination refuses."""
    validate(state)
    text = json.dumps(to_payload(state), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return seal(text.encode())


# ----- reading ---------------------------------------------------------------------------------------

def payload_of(blob: bytes | bytearray | memoryview) -> bytes:
    """The payload of a blob whose framing is intact (magic, version, length, checksum), else StateError."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise StateError("blob", f"must be bytes, not {type(blob).__name__}")
    data = bytes(blob)
    if len(data) < _HEADER.size + _DIGEST_SIZE:
        raise StateError("blob", f"{len(data)} bytes is shorter than header and checksum "
                                 f"({_HEADER.size + _DIGEST_SIZE})")
    magic, version, length = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise StateError("magic", f"{magic!r} is not {MAGIC!r}: not a vdpacert device state")
    if version != FORMAT_VERSION:
        raise StateError("format_version", f"format version {version} is unknown (this reader knows "
                                           f"{FORMAT_VERSION})")
    if length > MAX_PAYLOAD:
        raise StateError("length", f"payload length {length} is above the {MAX_PAYLOAD}-byte limit")
    if _HEADER.size + length + _DIGEST_SIZE != len(data):
        raise StateError("length", f"the header says {length} payload bytes, the blob holds "
                                   f"{len(data) - _HEADER.size - _DIGEST_SIZE}")
    end = _HEADER.size + length
    if hashlib.sha256(data[:end]).digest() != data[end:]:
        raise StateError("checksum", "SHA-256 mismatch: the blob was corrupted")
    return data[_HEADER.size:end]


def load(blob: bytes | bytearray | memoryview, destination: DestinationInfo | None = None) -> DeviceState:
    """Parse and validate an untrusted blob (see the module docstring); StateError names what is wrong."""
    state = _parse(_decode(payload_of(blob)))
    validate(state, destination)
    return state


def _refuse(what: str) -> Callable[[str], NoReturn]:
    def hook(text: str) -> NoReturn:
        raise StateError("payload", f"{what} {text!r} is not part of the format")
    return hook


def _unique_keys(pairs: list[tuple[str, object]]) -> Json:
    out: Json = {}
    for key, value in pairs:
        if key in out:
            raise StateError("payload", f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def _decode(payload: bytes) -> object:
    try:
        return json.loads(payload.decode("utf-8"), object_pairs_hook=_unique_keys,
                          parse_float=_refuse("the float"), parse_constant=_refuse("the constant"))
    except StateError:
        raise
    except UnicodeDecodeError as error:
        raise StateError("payload", f"not UTF-8: {error.reason} at byte {error.start}") from None
    except (ValueError, RecursionError) as error:  # JSONDecodeError, int digit limits, hostile nesting
        raise StateError("payload", f"not valid JSON: {error}") from None


def _object(field: str, value: object, keys: frozenset[str]) -> Json:
    if not isinstance(value, dict):
        raise StateError(field or "payload", f"must be an object, not {_kind(value)}")
    missing, extra = keys - value.keys(), value.keys() - keys
    if missing:
        raise StateError(f"{field}.{min(missing)}" if field else min(missing), "is missing")
    if extra:
        raise StateError(f"{field}.{min(extra)}" if field else min(extra), "is not a field of the format")
    return value


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _list(field: str, value: object) -> list[object]:
    if not isinstance(value, list):
        raise StateError(field, f"must be a list, not {_kind(value)}")
    return value


def _typed(field: str, value: object, kind: type[_T]) -> _T:
    # The range checks are validate()'s; here only what JSON can get wrong: the type (bool is no int).
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise StateError(field, f"must be {kind.__name__}, not {_kind(value)}")
    return value


def _hex_int(field: str, value: object) -> int:
    if not isinstance(value, str) or not _HEX_INT.fullmatch(value):
        raise StateError(field, f"must be a canonical 0x hex string of at most 128 bits, not {value!r:.40}")
    return int(value, 16)


def _hex_bytes(field: str, value: object) -> bytes:
    if not isinstance(value, str) or not _HEX_BYTES.fullmatch(value):
        raise StateError(field, f"must be a lowercase hex string of whole bytes, not {value!r:.40}")
    return bytes.fromhex(value)


def _parse(obj: object) -> DeviceState:
    top = _object("", obj, _TOP_KEYS)
    pairs = []
    for position, item in enumerate(_list("group_asid", top["group_asid"])):
        pair = _list(f"group_asid[{position}]", item)
        if len(pair) != 2:
            raise StateError(f"group_asid[{position}]", "must be a [group, asid] pair")
        pairs.append((_typed(f"group_asid[{position}].group", pair[0], int),
                      _typed(f"group_asid[{position}].asid", pair[1], int)))
    return DeviceState(
        version=_typed("version", top["version"], int), device_id=_typed("device_id", top["device_id"], int),
        device_features=_hex_int("device_features", top["device_features"]),
        features=_hex_int("features", top["features"]),
        backend_features=_hex_int("backend_features", top["backend_features"]),
        status=_typed("status", top["status"], int), config=_hex_bytes("config", top["config"]),
        vqs_count=_typed("vqs_count", top["vqs_count"], int),
        vring_num_max=_typed("vring_num_max", top["vring_num_max"], int),
        group_asid=tuple(pairs), packed=_typed("packed", top["packed"], bool),
        vrings=tuple(_parse_vring(f"vrings[{position}]", item)
                     for position, item in enumerate(_list("vrings", top["vrings"]))),
        net=None if top["net"] is None else _parse_net(top["net"]))


def _parse_vring(field: str, value: object) -> VringState:
    obj = _object(field, value, _VRING_KEYS)
    inflight = _list(f"{field}.inflight", obj["inflight"])
    return VringState(
        index=_typed(f"{field}.index", obj["index"], int), num=_typed(f"{field}.num", obj["num"], int),
        desc=_hex_int(f"{field}.desc", obj["desc"]), avail=_hex_int(f"{field}.avail", obj["avail"]),
        used=_hex_int(f"{field}.used", obj["used"]), enabled=_typed(f"{field}.enabled", obj["enabled"], bool),
        group=_typed(f"{field}.group", obj["group"], int), base=_typed(f"{field}.base", obj["base"], int),
        used_idx=_typed(f"{field}.used_idx", obj["used_idx"], int),
        inflight=tuple(_typed(f"{field}.inflight[{i}]", item, int) for i, item in enumerate(inflight)))


def _parse_net(value: object) -> NetState:
    obj = _object("net", value, _NET_KEYS)
    return NetState(
        mac=_hex_bytes("net.mac", obj["mac"]), queue_pairs=_typed("net.queue_pairs", obj["queue_pairs"], int),
        promisc=_typed("net.promisc", obj["promisc"], bool), allmulti=_typed("net.allmulti", obj["allmulti"], bool),
        alluni=_typed("net.alluni", obj["alluni"], bool), nomulti=_typed("net.nomulti", obj["nomulti"], bool),
        nouni=_typed("net.nouni", obj["nouni"], bool), nobcast=_typed("net.nobcast", obj["nobcast"], bool))
