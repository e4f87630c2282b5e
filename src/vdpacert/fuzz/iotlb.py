"""Fuzzer "iotlb": IOTLB message streams written to the vhost-vdpa front, judged by the model.

Each input is a short script (at most :data:`MAX_OPS` steps) decoded with :class:`ByteReader`: a
backend-feature set and ownership to start from, then messages (UPDATE, INVALIDATE, BATCH_BEGIN,
BATCH_END, MISS, ACCESS_FAIL, unknown types) with fields drawn to hit the edges (asid valid or not;
iova/size/uaddr aligned, unaligned, 0, wrapping past 2^64, inside or outside the input's guest
memory, overlapping the earlier ones; perm RO/WO/RW/0/invalid) and framing drawn the same way
(v1 or v2 layout or an unknown version, the write cut short or carrying extra bytes), interleaved
with backend-feature changes, status writes (resets among them) and runs of UPDATEs that fill an
address space to the device's entry limit (kept small, :data:`IOTLB_LIMIT`, so inputs reach it).

Every message is the same bytes on both sides: the front's ``write()`` gets them, and the model gets
them through :func:`model_write`, which frames them as ``vhost_chr_write_iter`` does (the part the
model's ``write_msg`` leaves to its caller) and hands the fields to the model.

Invariants: ``iotlb.answer`` (each write's accepted length or errno is the model's, under the
reference profile's declared quirks, as the lockstep suite judges it); ``iotlb.limit`` (the same,
where the model's answer or the front's cause is the entry limit, ENOSPC); ``iotlb.typed_error``
(nothing but OSError with a Linux errno escapes); ``iotlb.state`` (after the stream the front's
mappings and the device's equal the model's, and a refused message changed neither).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Sequence

from vdpacert.fuzz.base import ByteReader, Fuzzer, InvariantBroken
from vdpacert.fuzz.front import MEMORY_SIZE, FrontSession, ParentFactory
from vdpacert.impl.vhost_vdpa import VhostVdpa
from vdpacert.model import sections
from vdpacert.model.iotlb import UPDATE_LIMIT
from vdpacert.model.spec import ErrnoRule
from vdpacert.model.vhost_vdpa import IotlbMessageError, VhostVdpaModel
from vdpacert.uapi import vhost_types as T  # noqa: N812 - read like the C names

__all__ = ["FUZZER", "INVARIANTS", "IOTLB_LIMIT", "MAX_OPS", "SHORT_MESSAGE", "IotlbHarness", "make_fuzzer",
           "model_write"]

INVARIANTS = ("iotlb.answer", "iotlb.limit", "iotlb.typed_error", "iotlb.state")
#: Steps decoded from one input at most (a step may be a run of UPDATEs up to the limit).
MAX_OPS = 30
#: Entries one address space holds in the fuzzed device (vdpa_sim: 2048; small so inputs reach it).
IOTLB_LIMIT = 12

_U64_MAX = (1 << 64) - 1
_U32_MAX = 0xFFFFFFFF
_PAGE = 0x1000
_MSG_SIZE = T.VHOST_MSG_V2.size  # 72
_HEADER = 8  # v2: type + asid; v1: type + the hole before the 8-aligned union
_BODY = struct.Struct("<QQQBB")  # struct vhost_iotlb_msg without its tail padding
_BODY_SIZE = 32  # sizeof(struct vhost_iotlb_msg)
#: Where most messages land, so they overlap each other.
_WINDOW = 0x10_0000
#: Where the runs of UPDATEs filling an address space go.
_FILL = 0x4000_0000
_ACK, _DRIVER, _FEATURES_OK, _FAILED = 1, 2, 8, 128

#: vhost_chr_write_iter: a write too short for its type word, its asid (v2 with IOTLB_ASID negotiated) or
#: the whole struct vhost_iotlb_msg is EINVAL before any field is looked at. The model's ``write_msg`` takes
#: the fields, not the bytes, so this rule lives with the one caller that writes bytes.
SHORT_MESSAGE = ErrnoRule("vhost_vdpa.msg.short", errno.EINVAL, sections.vhost_core("vhost_chr_write_iter"),
                          "a write must hold the type word, the asid word and the whole struct vhost_iotlb_msg")

_TYPE_NAMES = {T.VHOST_IOTLB_MISS: "MISS", T.VHOST_IOTLB_UPDATE: "UPDATE", T.VHOST_IOTLB_INVALIDATE: "INVALIDATE",
               T.VHOST_IOTLB_ACCESS_FAIL: "ACCESS_FAIL", T.VHOST_IOTLB_BATCH_BEGIN: "BATCH_BEGIN",
               T.VHOST_IOTLB_BATCH_END: "BATCH_END"}
_VERSION_NAMES = {T.VHOST_IOTLB_MSG: "v1", T.VHOST_IOTLB_MSG_V2: "v2", -1: "no version"}


def _length_class(length: int) -> str:
    if length < _HEADER + _BODY_SIZE:
        return "short"
    return "whole" if length == _MSG_SIZE else ("long" if length > _MSG_SIZE else "without padding")


_V2 = 1 << T.VHOST_BACKEND_F_IOTLB_MSG_V2
_BATCH = 1 << T.VHOST_BACKEND_F_IOTLB_BATCH
_ASID = 1 << T.VHOST_BACKEND_F_IOTLB_ASID
_PERSIST = 1 << T.VHOST_BACKEND_F_IOTLB_PERSIST


def model_write(model: VhostVdpaModel, data: bytes) -> int:
    """The model's answer to ``write(data)``: the framing of vhost_chr_write_iter, then ``write_msg``."""
    if len(data) < 4:
        raise SHORT_MESSAGE.fail(f"{len(data)} bytes")
    (version,) = struct.unpack_from("<I", data)
    if version not in (T.VHOST_IOTLB_MSG, T.VHOST_IOTLB_MSG_V2):
        return model.write_msg(0, version=version)  # refused for its version (vhost_vdpa.msg.type)
    reads_asid = version == T.VHOST_IOTLB_MSG_V2 and model.has_backend_feature(T.VHOST_BACKEND_F_IOTLB_ASID)
    if (reads_asid and len(data) < 8) or len(data) < _HEADER + _BODY_SIZE:
        raise SHORT_MESSAGE.fail(f"{len(data)} bytes of a version {version} message")
    (asid,) = struct.unpack_from("<I", data, 4)
    iova, size, uaddr, perm, msg_type = _BODY.unpack_from(data, _HEADER)
    return model.write_msg(msg_type, asid, iova, size, uaddr, perm, version=version)


class IotlbHarness:
    """The "iotlb" fuzzer's state: one :class:`FrontSession` per process, built by :meth:`setup`.

    ``parent_factory`` / ``front_class`` put a device or a front with a seeded bug under the fuzzer
    (negative controls); ``reached`` counts the message types and answers the inputs reached.
    """

    def __init__(self, *, kind: str = "sim-net", parent_factory: ParentFactory | None = None,
                 front_class: type[VhostVdpa] = VhostVdpa, iotlb_limit: int | None = IOTLB_LIMIT) -> None:
        self._kind = kind
        self._parent_factory = parent_factory
        self._front_class = front_class
        self._iotlb_limit = iotlb_limit if parent_factory is None else None
        self._session: FrontSession | None = None

    def setup(self) -> None:
        if self._session is None:
            self._session = FrontSession(self._kind, parent_factory=self._parent_factory,
                                         front_class=self._front_class, iotlb_limit=self._iotlb_limit)

    @property
    def session(self) -> FrontSession:
        self.setup()
        assert self._session is not None
        return self._session

    def fuzzer(self) -> Fuzzer:
        return Fuzzer("iotlb", "IOTLB message streams written to the vhost-vdpa front, compared with the model",
                      self.one_input, seeds, INVARIANTS, self.setup)

    # ----- one input ----------------------------------------------------------------------------------

    def one_input(self, data: bytes) -> None:
        s = self.session
        s.fresh()
        reader = ByteReader(data)
        _Run(s, reader).run()


class _Run:
    """One input's script, decoded and applied step by step."""

    def __init__(self, session: FrontSession, reader: ByteReader) -> None:
        self.s = session
        self.r = reader
        self.nas = session.ls.spec.nas

    def run(self) -> None:
        s, r = self.s, self.r
        m, front = s.ls.model, s.front
        if r.u8() % 8:  # mostly an owner: without one every message is EPERM (EFAULT)
            self._compare("VHOST_SET_OWNER", m.VHOST_SET_OWNER, front.set_owner)
        self._backend_features(r.u8())
        for _ in range(MAX_OPS):
            if not r.remaining:
                break
            self._step(r.u8() % 16)
        self._check_state()

    def _step(self, kind: int) -> None:
        r = self.r
        if kind <= 5:
            self._message(T.VHOST_IOTLB_UPDATE)
        elif kind <= 8:
            self._message(T.VHOST_IOTLB_INVALIDATE)
        elif kind == 9:
            self._message(T.VHOST_IOTLB_BATCH_BEGIN)
        elif kind == 10:
            self._message(T.VHOST_IOTLB_BATCH_END)
        elif kind == 11:
            choice = r.u8() % 6
            msg_type = (T.VHOST_IOTLB_MISS, T.VHOST_IOTLB_ACCESS_FAIL, 0, 7, 0xFF)[choice] if choice < 5 else r.u8()
            self._message(msg_type)
        elif kind == 12:
            self._raw()
        elif kind == 13:
            self._backend_features(r.u8())
        elif kind == 14:
            self._status(r.u8())
        else:
            self._fill(r.u8())

    # ----- fields ---------------------------------------------------------------------------------------

    def _asid(self) -> int:
        choice = self.r.u8() % 8
        return (0, 0, 0, 0, 1, self.nas, _U32_MAX)[choice] if choice < 7 else self.r.u32()

    def _iova(self) -> int:
        choice, arg = self.r.u8() % 8, self.r.u16()
        if choice <= 1:
            return _WINDOW + (arg % 16) * _PAGE
        if choice == 2:
            return _WINDOW + arg  # unaligned
        if choice == 3:
            return 0
        if choice == 4:
            return (1 << 64) - (arg % 4 + 1) * _PAGE  # the top pages
        if choice == 5:
            return _FILL + (arg % 32) * _PAGE
        if choice == 6:
            return arg * _PAGE
        return self.r.u64()

    def _size(self, iova: int) -> int:
        choice, arg = self.r.u8() % 8, self.r.u16()
        to_end = (1 << 64) - iova  # the size that ends exactly at 2^64 - 1
        if choice <= 1:
            return (arg % 4 + 1) * _PAGE
        if choice == 2:
            return 0
        if choice == 3:
            return 1 + arg  # odd, small
        if choice == 4:
            return min(_U64_MAX, to_end + 1 + arg)  # wraps past 2^64
        if choice == 5:
            return _U64_MAX
        if choice == 6:
            return min(_U64_MAX, to_end)
        return self.r.u64()

    def _uaddr(self) -> int:
        choice, arg = self.r.u8() % 6, self.r.u16()
        base = self.s.mem.uaddr
        if choice <= 1:
            return base + (arg % 16) * _PAGE
        if choice == 2:
            return base + arg % MEMORY_SIZE  # unaligned
        if choice == 3:
            return base + MEMORY_SIZE - arg % 0x2000  # at or near the end: runs past it
        if choice == 4:
            return (0, 0x1000, 0xFFFF_8000_0000_0000)[arg % 3]  # never memory of this process
        return self.r.u64()

    def _perm(self) -> int:
        choice = self.r.u8() % 8
        return (T.VHOST_ACCESS_RW, T.VHOST_ACCESS_RW, T.VHOST_ACCESS_RO, T.VHOST_ACCESS_WO, 0, 4, 7)[choice] \
            if choice < 7 else self.r.u8()

    def _frame(self, version: int, asid: int, body: bytes) -> bytes:
        """The message's bytes: v2 / v1 / unknown version, whole, cut short or with extra bytes."""
        r = self.r
        frame = r.u8()
        kind = frame >> 3 & 7
        if kind == 5:
            version = T.VHOST_IOTLB_MSG
        elif kind == 6:
            version = (0, 3)[frame >> 6 & 1]
        elif kind == 7:
            version = r.u32()
        message = struct.pack("<II", version, asid) + body + bytes(_MSG_SIZE - _HEADER - len(body))
        length = frame & 7
        if length == 6:
            return message[:r.u8() % _MSG_SIZE]
        if length == 7:
            return message + bytes([frame]) * (1 + r.u8() % 64)
        return message

    # ----- steps ----------------------------------------------------------------------------------------

    def _message(self, msg_type: int) -> None:
        asid = self._asid()
        iova = self._iova()
        size = self._size(iova)
        uaddr, perm = self._uaddr(), self._perm()
        self._write(self._frame(T.VHOST_IOTLB_MSG_V2, asid, _BODY.pack(iova, size, uaddr, perm, msg_type)),
                    _TYPE_NAMES.get(msg_type, "unknown type"))

    def _raw(self) -> None:
        """A write of raw input bytes under a plausible header (they read as whatever fields they make)."""
        r = self.r
        length = r.u8() % (_MSG_SIZE + 16)
        version = (T.VHOST_IOTLB_MSG_V2, T.VHOST_IOTLB_MSG)[r.u8() & 1]
        self._write((struct.pack("<I", version) + r.take(max(0, length - 4)))[:length], "raw")

    def _fill(self, arg: int) -> None:
        """UPDATEs of consecutive pages in one address space, up to just past the entry limit."""
        asid = (0, 0, 1)[arg % 3] if self.nas > 1 else 0
        limit = self.s.ls.spec.iotlb_limit or IOTLB_LIMIT
        uaddr = self.s.mem.uaddr
        for page in range(limit + 1 - arg % 4):
            body = _BODY.pack(_FILL + page * _PAGE, _PAGE, uaddr + page % 16 * _PAGE, T.VHOST_ACCESS_RW,
                              T.VHOST_IOTLB_UPDATE)
            self._write(struct.pack("<II", T.VHOST_IOTLB_MSG_V2, asid) + body + bytes(_MSG_SIZE - _HEADER - len(body)),
                        "fill")

    def _backend_features(self, choice: int) -> None:
        offer = self.s.ls.model.VHOST_GET_BACKEND_FEATURES()
        pick = choice % 8
        words = (0, _V2, _V2 | _BATCH, _V2 | _BATCH | _ASID, offer, offer, offer & ~_PERSIST)
        features = words[pick] if pick < 7 else self.r.u64()
        m, front = self.s.ls.model, self.s.front
        self._compare("VHOST_SET_BACKEND_FEATURES", lambda: m.VHOST_SET_BACKEND_FEATURES(features),
                      lambda: front.set_backend_features(features))

    def _status(self, choice: int) -> None:
        """A status write (a reset most often): the lockstep's judgement, with its latitude."""
        pick = choice % 6
        status = (0, 0, _ACK, _ACK | _DRIVER, _ACK | _DRIVER | _FEATURES_OK, _FAILED)[pick]
        self.s.reached[f"status {status:#x}"] += 1
        self._unchanged_if_refused(lambda: self.s.lockstep("iotlb.answer", lambda: self.s.ls.set_status(status),
                                                                  typed="iotlb.typed_error"))

    # ----- comparison -----------------------------------------------------------------------------------

    def _compare(self, name: str, model_call: Callable[[], object], target_call: Callable[[], None]) -> None:
        def step() -> None:
            outcome = self.s.compare("iotlb.answer", name, model_call, target_call, typed="iotlb.typed_error")
            self.s.note(name, outcome)

        self._unchanged_if_refused(step)

    def _write(self, data: bytes, what: str) -> None:
        s = self.s
        model, front = s.ls.model, s.front
        cause: list[BaseException | None] = [None]

        def target() -> int:
            try:
                return front.write(data)
            except OSError as error:
                cause[0] = error.__cause__
                raise

        def step() -> None:
            try:
                outcome = s.compare("iotlb.answer", f"write {what} ({len(data)} bytes)",
                                    lambda: model_write(model, data), target, typed="iotlb.typed_error")
            except InvariantBroken as broken:
                if broken.invariant == "iotlb.answer" and self._at_limit(cause[0]):
                    raise InvariantBroken("iotlb.limit", broken.detail) from broken
                raise
            s.note(f"write {what}", outcome)
            if self._at_limit(cause[0]):
                s.reached["entry limit (ENOSPC) reached"] += 1
            version = int.from_bytes(data[:4], "little") if len(data) >= 4 else -1
            s.reached[f"framing {_VERSION_NAMES.get(version, 'unknown version')}, {_length_class(len(data))}"] += 1

        self._unchanged_if_refused(step)

    def _at_limit(self, cause: BaseException | None) -> bool:
        refusal = self.s.ls.last_refusal
        if isinstance(refusal, IotlbMessageError) and refusal.cause.rule == UPDATE_LIMIT.rule:
            return True
        return isinstance(cause, OSError) and cause.errno == errno.ENOSPC

    def _unchanged_if_refused(self, step: Callable[[], None]) -> None:
        """Run ``step``; when the model refused it (and so, compared, the front did), nothing may have changed."""
        s = self.s
        before = (s.front_mappings(), s.device_mappings(), s.front.in_batch, s.front.acked_backend_features)
        step()
        if s.ls.last_refusal is None:
            return
        after = (s.front_mappings(), s.device_mappings(), s.front.in_batch, s.front.acked_backend_features)
        if after != before:
            raise InvariantBroken("iotlb.state", f"a refused step ({s.ls.last_refusal}) changed the front or the "
                                                 f"device: {before} -> {after}")

    def _check_state(self) -> None:
        s = self.s
        front_maps, device_maps = s.model_mappings()
        if s.front_mappings() != front_maps:
            raise InvariantBroken("iotlb.state", f"the front maps {s.front_mappings()}, the model {front_maps}")
        got = s.device_mappings()
        if got is not None and got != device_maps:
            raise InvariantBroken("iotlb.state", f"the device translates with {got}, the model {device_maps}")
        if s.front.in_batch != s.ls.model.snapshot().in_batch:
            raise InvariantBroken("iotlb.state", f"the front's batch is {s.front.in_batch}, the model's is not")


# ----- seeds ----------------------------------------------------------------------------------------------

def _msg(kind: int, asid: int = 0, iova: tuple[int, int] = (0, 0), size: tuple[int, int] = (0, 1),
         uaddr: tuple[int, int] = (0, 0), perm: int = 0, frame: int = 0) -> bytes:
    """One message step as the decoder reads it: each field a choice byte and a 16-bit argument."""
    return bytes([kind, asid]) + bytes([iova[0]]) + iova[1].to_bytes(2, "little") + bytes([size[0]]) \
        + size[1].to_bytes(2, "little") + bytes([uaddr[0]]) + uaddr[1].to_bytes(2, "little") + bytes([perm, frame])


_UPDATE, _INVALIDATE, _BEGIN, _END = 0, 6, 9, 10


def seeds() -> Sequence[bytes]:
    """Well-formed scripts: map, overlap, unmap, batch, every refusal family, framing variants, the limit."""
    owner_asid = bytes([1, 3])  # owner; backend features V2 | BATCH | ASID
    owner_all = bytes([1, 4])  # owner; everything offered (IOTLB_PERSIST too)
    page = (0, 1)  # window page 1
    two = (0, 1)  # two pages
    mem = (0, 1)  # memory page 1
    return (
        owner_asid + _msg(_UPDATE, iova=page, size=two, uaddr=mem, perm=2) + _msg(_UPDATE, iova=(0, 2), size=two,
                                                                                uaddr=mem, perm=3)
        + _msg(_INVALIDATE, iova=(0, 2), size=(0, 0)) + _msg(_UPDATE, iova=(0, 2), size=(0, 0), uaddr=mem),
        owner_asid + _msg(_BEGIN) + _msg(_UPDATE, iova=page, size=two, uaddr=mem) + _msg(_UPDATE, asid=4, iova=page,
                                                                                        size=two, uaddr=mem)
        + _msg(_END) + _msg(_INVALIDATE, iova=(3, 0), size=(2, 0)),
        owner_asid + _msg(_UPDATE, size=(2, 0)) + _msg(_UPDATE, iova=(4, 0), size=(0, 3)) + _msg(_UPDATE, perm=4)
        + _msg(_UPDATE, uaddr=(4, 1)) + _msg(_UPDATE, uaddr=(3, 0x800)) + _msg(_UPDATE, asid=5)
        + bytes([11, 0]) + _msg(0)[1:] + _msg(_INVALIDATE, iova=(4, 0), size=(4, 0)),
        bytes([1, 0]) + _msg(_UPDATE, frame=5 << 3) + _msg(_UPDATE, iova=(0, 5), frame=6) + bytes([50])
        + _msg(_UPDATE, iova=(0, 6), frame=7) + bytes([3]) + _msg(_UPDATE, iova=(0, 7), frame=6 << 3),
        owner_asid + bytes([15, 0]) + bytes([15, 1]) + _msg(_INVALIDATE, iova=(5, 0), size=(0, 0)),
        owner_all + _msg(_UPDATE, iova=page, uaddr=mem) + bytes([14, 0]) + _msg(_UPDATE, iova=page, uaddr=mem)
        + bytes([13, 0]) + _msg(_UPDATE, iova=(0, 3), uaddr=mem, frame=5 << 3) + bytes([14, 3]),
        bytes([0, 3]) + _msg(_UPDATE) + bytes([12, 72, 0]) + bytes(68),
    )


HARNESS = IotlbHarness()
FUZZER = HARNESS.fuzzer()


def make_fuzzer(**kwargs: object) -> Fuzzer:
    """A separate "iotlb" fuzzer (keyword arguments as :class:`IotlbHarness`), e.g. over a seeded-bug parent."""
    return IotlbHarness(**kwargs).fuzzer()  # type: ignore[arg-type]
