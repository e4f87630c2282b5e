"""Fuzzer "ioctls": ioctl sequences with arbitrary arguments through ``VhostVdpa.ioctl``, judged by the model.

Each input is a short script (at most :data:`MAX_OPS` requests). A request number is one of the real
vhost requests of :mod:`vdpacert.uapi.vhost` (every one, get and set), one of them mutated (direction,
size, type or nr bits changed) or any 32-bit number; its argument is a buffer packed for the request's
layout with values drawn at the edges (a vring index at and past the queue count, sizes 0 / odd / huge,
bases above 16 bits, features with unknown bits, status writes breaking the driver's rules, config
windows overflowing, eventfds and non-files), or that buffer cut short, lengthened, or an int (a
pointer nothing can be copied through). A macro step brings the device up (owner, backend features,
mappings, vrings, features, FEATURES_OK, DRIVER_OK) so the requests also meet a live device.

How each request is judged (``ioctls.answer``):

- compared with the model, value or errno, through :class:`~vdpacert.conformance.lockstep.Lockstep`
  (its latitude included: status, features, config and vring-base writes go through its own
  operations): every request :data:`~vdpacert.model.vhost_vdpa.IOCTLS` names, when its argument holds
  the whole structure (extra bytes are ignored, as ``copy_from_user`` of ``sizeof`` does) and its values
  are in the model's domain: an eventfd field that is the input's eventfd, -1 or below -1, a log base in
  the input's memory; SET_OWNER, SUSPEND and RESUME with any argument;
- refused, any typed errno: a known request whose argument is an int or shorter than its structure
  (GET/SET_CONFIG: shorter than the header and ``len`` bytes);
- refused with an errno of the path an unknown request takes (EPERM, EFAULT, ENOBUFS, ENOTTY): a number
  that is no vhost request;
- only the typed-error rule: VHOST_RESET_OWNER, VHOST_SET_MEM_TABLE (the model has no rule for them),
  eventfd fields naming another file, log bases outside the memory.

While the device is live (DRIVER_OK) every observable is compared after each step
(:meth:`Lockstep.check_observables`, which follows a device that ran its queues).

Other invariants: ``ioctls.typed_error`` (only OSError with a Linux errno escapes);
``ioctls.unchanged_on_refusal`` (a refused request leaves status, features, backend features, config,
ownership, suspension, each vring's size, addresses, readiness, position and group, and the mappings as
they were); ``ioctls.alive`` (after the script a reset and a full bring-up are answered as the model
predicts and leave the device running).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Sequence
from functools import partial

from vdpacert.conformance.observe import Value
from vdpacert.fuzz.base import ByteReader, Fuzzer, InvariantBroken
from vdpacert.fuzz.front import MEMORY_SIZE, FrontSession, ParentFactory
from vdpacert.impl.vhost_vdpa import VhostVdpa
from vdpacert.model.status import StatusBit
from vdpacert.model.vhost_vdpa import IOCTLS
from vdpacert.uapi import vhost as V  # noqa: N812 - read like the C names
from vdpacert.uapi import vhost_types as T  # noqa: N812

__all__ = ["FUZZER", "INVARIANTS", "KNOWN_REQUESTS", "MAX_OPS", "UNKNOWN_REQUEST_ERRNOS", "IoctlsHarness",
           "make_fuzzer", "seeds"]

INVARIANTS = ("ioctls.answer", "ioctls.typed_error", "ioctls.unchanged_on_refusal", "ioctls.alive")
MAX_OPS = 30
#: Every vhost request number of the UAPI, by number.
KNOWN_REQUESTS: dict[int, str] = {value: name for name, value in sorted(vars(V).items())
                                  if name.startswith("VHOST_") and name != "VHOST_VIRTIO" and isinstance(value, int)}
_REQUESTS = tuple(sorted(KNOWN_REQUESTS))
#: What a number that is no request meets on its way (owner check, the vring index's copy and range, then
#: vhost_vring_ioctl's ENOIOCTLCMD, which the VFS reports as ENOTTY).
UNKNOWN_REQUEST_ERRNOS = frozenset({errno.EPERM, errno.EFAULT, errno.ENOBUFS, errno.ENOTTY})

_U8, _U16, _U32, _I32, _U64 = (struct.Struct(f"<{c}") for c in "BHIiQ")
_STATE, _FILE, _ADDR, _CONFIG, _RANGE = (T.VHOST_VRING_STATE, T.VHOST_VRING_FILE, T.VHOST_VRING_ADDR,
                                         T.VHOST_VDPA_CONFIG, T.VHOST_VDPA_IOVA_RANGE)
_MEMORY = struct.Struct("<II")  # struct vhost_memory's header
_LAYOUT: dict[str, struct.Struct | None] = {
    "VHOST_GET_FEATURES": _U64, "VHOST_SET_FEATURES": _U64, "VHOST_SET_BACKEND_FEATURES": _U64,
    "VHOST_GET_BACKEND_FEATURES": _U64, "VHOST_SET_LOG_BASE": _U64, "VHOST_SET_LOG_FD": _I32,
    "VHOST_VDPA_SET_CONFIG_CALL": _I32, "VHOST_VDPA_GET_DEVICE_ID": _U32, "VHOST_VDPA_GET_CONFIG_SIZE": _U32,
    "VHOST_VDPA_GET_AS_NUM": _U32, "VHOST_VDPA_GET_VQS_COUNT": _U32, "VHOST_VDPA_GET_GROUP_NUM": _U32,
    "VHOST_VDPA_GET_STATUS": _U8, "VHOST_VDPA_SET_STATUS": _U8, "VHOST_VDPA_GET_VRING_NUM": _U16,
    "VHOST_SET_VRING_NUM": _STATE, "VHOST_SET_VRING_BASE": _STATE, "VHOST_GET_VRING_BASE": _STATE,
    "VHOST_VDPA_SET_VRING_ENABLE": _STATE, "VHOST_VDPA_GET_VRING_GROUP": _STATE, "VHOST_VDPA_SET_GROUP_ASID": _STATE,
    "VHOST_VDPA_GET_VRING_DESC_GROUP": _STATE, "VHOST_VDPA_GET_VRING_SIZE": _STATE,
    "VHOST_SET_VRING_KICK": _FILE, "VHOST_SET_VRING_CALL": _FILE, "VHOST_SET_VRING_ERR": _FILE,
    "VHOST_SET_VRING_ADDR": _ADDR, "VHOST_VDPA_GET_CONFIG": _CONFIG, "VHOST_VDPA_SET_CONFIG": _CONFIG,
    "VHOST_VDPA_GET_IOVA_RANGE": _RANGE, "VHOST_SET_MEM_TABLE": _MEMORY,
    "VHOST_SET_OWNER": None, "VHOST_RESET_OWNER": None, "VHOST_VDPA_SUSPEND": None, "VHOST_VDPA_RESUME": None,
}
#: Requests with no argument: whatever is passed, the model is asked.
_NO_ARG = frozenset({"VHOST_SET_OWNER", "VHOST_VDPA_SUSPEND", "VHOST_VDPA_RESUME"})
#: Requests the model has no rule for: the typed-error and unchanged-on-refusal rules only.
_UNMODELLED = frozenset(KNOWN_REQUESTS.values()) - IOCTLS.keys()
_FD_FIELD = {"VHOST_SET_VRING_KICK", "VHOST_SET_VRING_CALL", "VHOST_SET_VRING_ERR", "VHOST_SET_LOG_FD",
             "VHOST_VDPA_SET_CONFIG_CALL"}
_ACK, _DRIVER, _FEATURES_OK, _DRIVER_OK = 1, 2, 8, 4
_LIVE = _ACK | _DRIVER | _FEATURES_OK | _DRIVER_OK
_U32_MAX, _U64_MAX, _PAGE = 0xFFFFFFFF, (1 << 64) - 1, 0x1000
_AVAIL, _USED = 0x4000, 0x8000  # where each vring's areas start in the input's memory (queue i at +i pages)
_VERSION_1, _ACCESS_PLATFORM = 32, 33


class IoctlsHarness:
    """The "ioctls" fuzzer's state: one :class:`FrontSession` per process, built by :meth:`setup`.

    ``parent_factory`` / ``front_class`` put a device or a front with a seeded bug under the fuzzer;
    ``reached`` counts the request kinds and answers the inputs reached.
    """

    def __init__(self, *, kind: str = "sim-net", parent_factory: ParentFactory | None = None,
                 front_class: type[VhostVdpa] = VhostVdpa) -> None:
        self._kind = kind
        self._parent_factory = parent_factory
        self._front_class = front_class
        self._session: FrontSession | None = None

    def setup(self) -> None:
        if self._session is None:
            self._session = FrontSession(self._kind, parent_factory=self._parent_factory,
                                         front_class=self._front_class)

    @property
    def session(self) -> FrontSession:
        self.setup()
        assert self._session is not None
        return self._session

    def fuzzer(self) -> Fuzzer:
        return Fuzzer("ioctls", "vhost-vdpa ioctl sequences with arbitrary arguments, compared with the model",
                      self.one_input, seeds, INVARIANTS, self.setup)

    def one_input(self, data: bytes) -> None:
        s = self.session
        s.fresh()
        _Run(s, ByteReader(data)).run()


class _Run:
    """One input's script, decoded and applied request by request."""

    def __init__(self, session: FrontSession, reader: ByteReader) -> None:
        self.s = session
        self.r = reader
        spec = session.ls.spec
        self.nvqs, self.nas, self.ngroups = spec.nvqs, spec.nas, spec.ngroups
        self.config_size = len(spec.config)
        self.minimal = spec.device_features & (1 << _VERSION_1 | 1 << _ACCESS_PLATFORM)

    def run(self) -> None:
        r = self.r
        for _ in range(MAX_OPS):
            if not r.remaining:
                break
            kind = r.u8() % 32  # a bring-up in 32 steps: it is twenty requests
            if kind == 31:
                self._bring_up(driver_ok=bool(r.u8() & 1), invariant="ioctls.answer")
                continue
            self._request(kind % 16)
        self._alive()

    # ----- drawing a request -----------------------------------------------------------------------

    def _request(self, kind: int) -> None:
        r = self.r
        base = _REQUESTS[r.u8() % len(_REQUESTS)]
        number, how = base, "known"
        if kind == 13:
            mutation, value = r.u8() % 4, r.u8()
            number = (base ^ (value % 3 + 1) << 30, (base & ~(0x3FFF << 16)) | value << 16,
                      (base & ~0xFF00) | value << 8, (base & ~0xFF) | value)[mutation]
            how = "mutated"
        elif kind == 14:
            number, how = r.u32(), "random"
        arg = self._argument(KNOWN_REQUESTS[base])
        name = KNOWN_REQUESTS.get(number)
        if name is None:
            self.s.reached[f"{how} number (no request)"] += 1
            self._unknown(number, arg)
            return
        self.s.reached[f"{how} {name}"] += 1
        self._known(number, name, arg)

    def _argument(self, name: str) -> bytes | int:
        """A buffer packed for ``name``'s layout (most often), cut short, lengthened, or an int."""
        r = self.r
        shape = r.u8() % 8
        if shape == 7:
            return (0, 1, 0xDEADBEEF)[r.u8() % 3]
        buf = self._packed(name)
        if shape == 5:
            return buf[:r.u8() % len(buf)] if buf else 0
        if shape == 6:
            return buf + r.take(1 + r.u8() % 16)
        return buf

    def _packed(self, name: str) -> bytes:
        r, s = self.r, self.s
        layout = _LAYOUT[name]
        if layout is None:
            return b""
        if layout is _STATE:
            index = self._index() if name != "VHOST_VDPA_SET_GROUP_ASID" else self._group()
            return _STATE.pack(index, self._state_num(name))
        if layout is _FILE:
            return _FILE.pack(self._index(), self._fd())
        if layout is _I32:
            return _I32.pack(self._fd())
        if layout is _ADDR:
            base = (r.u8() % 16) * 0x100
            misalign = (0, 0, 0, 1, 2, 8)[r.u8() % 6]
            return _ADDR.pack(self._index(), (0, 0, 1, 2)[r.u8() % 4], base + (misalign if misalign == 8 else 0),
                              _USED + base + (misalign if misalign == 2 else 0),
                              _AVAIL + base + (misalign if misalign == 1 else 0), (0, 0x100, 0x102)[r.u8() % 3])
        if layout is _CONFIG:
            size = self.config_size
            pick = r.u8() % 7
            offset = (0, 6, size - 1, size, size + 1, _U32_MAX)[pick] if pick < 6 else r.u8()
            pick = r.u8() % 7
            length = (1, 2, 6, size, 0, _U32_MAX)[pick] if pick < 6 else r.u8()
            data = r.take(min(length, 64)) if name == "VHOST_VDPA_SET_CONFIG" else bytes(min(length, 64))
            return _CONFIG.pack(offset & _U32_MAX, length) + data
        if layout is _MEMORY:
            return _MEMORY.pack((0, 1, 64, 65)[r.u8() % 4], r.u8() & 1) + r.take(32)
        if name == "VHOST_SET_LOG_BASE":
            mem = s.mem.uaddr
            pick = r.u8() % 4
            return _U64.pack((mem, mem + 0x100, 0)[pick] if pick < 3 else r.u64())
        if name in ("VHOST_SET_FEATURES",):
            return _U64.pack(self._features())
        if name == "VHOST_SET_BACKEND_FEATURES":
            offer = s.ls.model.VHOST_GET_BACKEND_FEATURES()
            pick = r.u8() % 6
            return _U64.pack((offer, offer, 0, offer | 1 << 20, 1 << T.VHOST_BACKEND_F_DESC_ASID)[pick] if pick < 5
                             else r.u64())
        if name == "VHOST_VDPA_SET_STATUS":
            return _U8.pack(self._status())
        return bytes(layout.size)  # a getter: the kernel overwrites it

    def _index(self) -> int:
        pick = self.r.u8() % 8
        return (0, 0, 1, self.nvqs - 1, self.nvqs, _U32_MAX, 0x8000)[pick] if pick < 7 else self.r.u32()

    def _group(self) -> int:
        pick = self.r.u8() % 6
        return (0, 1, self.ngroups, self.nvqs, _U32_MAX)[pick] if pick < 5 else self.r.u32()

    def _state_num(self, name: str) -> int:
        r = self.r
        pick = r.u8() % 8
        if pick == 7:
            return r.u32()
        if name == "VHOST_SET_VRING_NUM":
            return (256, 64, 1, 0, 3, 0x8000, 0x10000)[pick]
        if name == "VHOST_SET_VRING_BASE":
            return (0, 0, 1, 0xFFFF, 0x10000, 0x8000_8000, 0x7FFF_7FFF)[pick]
        if name == "VHOST_VDPA_SET_GROUP_ASID":
            return (0, 0, 1, 1, self.nas, _U32_MAX, 2)[pick]
        return (0, 1, 1, 2, 0, 1, _U32_MAX)[pick]  # enable, and the ignored num of the getters

    def _fd(self) -> int:
        pick = self.r.u8() % 8
        if pick == 7:
            return self.r.uint(4) - (1 << 31)
        return (self.s.efd, self.s.efd, -1, -2, 0, 0x7FFF_0000, -0x8000_0000)[pick]  # 0: open, no eventfd

    def _features(self) -> int:
        r = self.r
        offered = self.s.ls.spec.device_features & _U64_MAX
        pick = r.u8() % 8
        if pick == 7:
            return r.u64()
        return (self.minimal, self.minimal, offered, offered | 1 << 63, 0, _U64_MAX, self.minimal | 1 << 26)[pick]

    def _status(self) -> int:
        r = self.r
        current = self.s.ls.model.device.status
        pick = r.u8() % 10
        if pick == 9:
            return r.u8()
        lowest = current & -current
        return (0, current | _ACK, current | _DRIVER, current | _FEATURES_OK, current | _DRIVER_OK,
                current & ~lowest, current | int(StatusBit.FAILED), current | int(StatusBit.DEVICE_NEEDS_RESET),
                current | 0x20)[pick] & 0xFF

    # ----- judging a request ------------------------------------------------------------------------------

    def _unknown(self, number: int, arg: bytes | int) -> None:
        error = self._typed_only(number, arg, "no request")
        if error is None:
            raise InvariantBroken("ioctls.answer", f"ioctl {number:#x} is no vhost request, yet it was accepted")
        if error.errno not in UNKNOWN_REQUEST_ERRNOS:
            raise InvariantBroken("ioctls.answer", f"ioctl {number:#x} (no request) answered {error!r}, not one of "
                                                   f"{sorted(errno.errorcode[e] for e in UNKNOWN_REQUEST_ERRNOS)}")

    def _typed_only(self, number: int, arg: bytes | int, what: str) -> OSError | None:
        """Issue the request outside the model: typed errors only, nothing changed when refused."""
        s = self.s
        before = s.observables()
        try:
            s.front.ioctl(number, arg)
        except OSError as error:
            code = errno.errorcode.get(error.errno or 0)
            if code is None:
                raise InvariantBroken("ioctls.typed_error", f"ioctl {number:#x}: {error!r} has no errno") from error
            s.reached[f"{what} -> {code}"] += 1
            self._unchanged(before, f"ioctl {number:#x} ({what}) refused with {code}")
            return error
        except Exception as error:
            raise InvariantBroken("ioctls.typed_error", f"ioctl {number:#x}: {type(error).__name__} escaped: "
                                                        f"{error}") from error
        s.reached[f"{what} -> ok"] += 1
        return None

    def _unchanged(self, before: tuple[object, ...], what: str) -> None:
        after = self.s.observables()
        if after != before:
            changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
            raise InvariantBroken("ioctls.unchanged_on_refusal",
                                  f"{what}, yet observables {changed} changed: {before} -> {after}")

    def _known(self, number: int, name: str, arg: bytes | int) -> None:
        layout = _LAYOUT[name]
        if name in _UNMODELLED:
            self._typed_only(number, arg, f"{name} (unmodelled)")
            return
        if name not in _NO_ARG:
            assert layout is not None
            short = isinstance(arg, int) or len(arg) < layout.size
            if not short and layout is _CONFIG:
                assert isinstance(arg, bytes)
                short = len(arg) < _CONFIG.size + _CONFIG.unpack_from(arg)[1]
            if short:
                if self._typed_only(number, arg, f"{name} (short argument)") is None:
                    raise InvariantBroken("ioctls.answer", f"{name} accepted an argument shorter than its structure")
                return
            assert isinstance(arg, bytes)
            if not self._in_model_domain(name, arg):
                self._typed_only(number, arg, f"{name} (outside the model's domain)")
                return
        self._compared(number, name, arg)

    def _in_model_domain(self, name: str, arg: bytes) -> bool:
        s = self.s
        if name in _FD_FIELD:
            fd = int(_FILE.unpack_from(arg)[1] if _LAYOUT[name] is _FILE else _I32.unpack_from(arg)[0])
            return fd == s.efd or fd <= -1
        if name == "VHOST_SET_LOG_BASE":
            return 0 <= int(_U64.unpack_from(arg)[0]) - s.mem.uaddr < MEMORY_SIZE
        return True

    def _compared(self, number: int, name: str, arg: bytes | int) -> None:
        s = self.s
        ls, model, front = s.ls, s.ls.model, s.front
        live = model.device.status & _DRIVER_OK
        before = s.observables()
        latitude = self._latitude(name, arg)
        if latitude is not None:
            s.lockstep("ioctls.answer", latitude, typed="ioctls.typed_error")
            refused = ls.last_refusal is not None
            s.reached[f"{name} -> {'refused' if refused else 'ok'}"] += 1
        else:
            model_call, parse = self._model_call(name, arg)
            outcome = s.compare("ioctls.answer", name, model_call, lambda: parse(front.ioctl(number, arg)),
                                typed="ioctls.typed_error")
            s.note(name, outcome)
            refused = not outcome.ok
        if refused:
            self._unchanged(before, f"{name} was refused")
        if live or model.device.status & _DRIVER_OK:
            s.lockstep("ioctls.answer", ls.check_observables, typed="ioctls.typed_error")

    def _latitude(self, name: str, arg: bytes | int) -> Callable[[], None] | None:
        """The Lockstep operation judging ``name`` with the spec's latitude, or None (compared exactly)."""
        ls = self.s.ls
        if not isinstance(arg, bytes):
            return None
        if name == "VHOST_VDPA_SET_STATUS":
            return lambda: ls.set_status(arg[0])
        if name == "VHOST_SET_FEATURES":
            return lambda: ls.set_features(_U64.unpack_from(arg)[0])
        if name == "VHOST_SET_VRING_BASE":
            return lambda: ls.set_vring_base(*_STATE.unpack_from(arg))
        if name in ("VHOST_VDPA_GET_CONFIG", "VHOST_VDPA_SET_CONFIG"):
            offset, length = _CONFIG.unpack_from(arg)
            if name == "VHOST_VDPA_GET_CONFIG":
                return lambda: ls.get_config(offset, length)
            return lambda: ls.set_config(offset, arg[_CONFIG.size:_CONFIG.size + length])
        return None

    def _model_call(self, name: str, arg: bytes | int) -> tuple[Callable[[], object], Callable[[bytes | int], Value]]:
        """(the model's call, how to read the target's answer) for a request compared exactly."""
        model = self.s.ls.model
        method = getattr(model, name)
        layout = _LAYOUT[name]
        if name in _NO_ARG:
            return method, _nothing
        assert isinstance(arg, bytes) and layout is not None
        fields = layout.unpack_from(arg)
        if name.startswith(("VHOST_GET_", "VHOST_VDPA_GET_")):
            if layout is _STATE:
                return lambda: method(fields[0]), lambda out: _STATE.unpack_from(_bytes(out))[1]
            if layout is _RANGE:
                return method, lambda out: _RANGE.unpack_from(_bytes(out))
            return method, lambda out: layout.unpack_from(_bytes(out))[0]
        if name == "VHOST_SET_VRING_ADDR":
            index, flags, desc, used, avail, log = fields
            return (lambda: method(index, desc, avail, used, flags=flags, log_guest_addr=log)), _nothing
        if layout in (_STATE, _FILE):
            return (lambda: method(*fields)), _nothing
        return (lambda: method(fields[0])), _nothing

    # ----- bring-up and the liveness check ---------------------------------------------------------------

    def _bring_up(self, *, driver_ok: bool, invariant: str) -> None:
        """Reset, then owner, backend features as offered, every address space mapped onto the memory, every
        vring set up over zeroed rings, minimal features, FEATURES_OK (and DRIVER_OK): each step compared."""
        s = self.s
        ls, model, front = s.ls, s.ls.model, s.front
        typed = "ioctls.typed_error"

        def op(name: str, model_call: Callable[[], object], target_call: Callable[[], Value]) -> None:
            s.compare(invariant, name, model_call, target_call, typed=typed)

        s.lockstep(invariant, partial(ls.set_status, 0), typed=typed)
        if not model.snapshot().owner:
            op("VHOST_SET_OWNER", model.VHOST_SET_OWNER, front.set_owner)
        offer = model.VHOST_GET_BACKEND_FEATURES()
        op("VHOST_SET_BACKEND_FEATURES", partial(model.VHOST_SET_BACKEND_FEATURES, offer),
           partial(front.set_backend_features, offer))
        uaddr = s.mem.uaddr
        for asid in range(self.nas):
            if model.address_space(asid) is not None:  # size 0 at iova 0 drops every entry (a declared quirk)
                op("VHOST_IOTLB_INVALIDATE", partial(model.write_msg, T.VHOST_IOTLB_INVALIDATE, asid, 0, 0),
                   partial(front.iotlb_invalidate, 0, 0, asid=asid))
            op("VHOST_IOTLB_UPDATE",
               partial(model.write_msg, T.VHOST_IOTLB_UPDATE, asid, 0, MEMORY_SIZE, uaddr, T.VHOST_ACCESS_RW),
               partial(front.iotlb_update, 0, MEMORY_SIZE, uaddr, asid=asid))
        for status in (_ACK, _ACK | _DRIVER):
            s.lockstep(invariant, partial(ls.set_status, status), typed=typed)
        s.lockstep(invariant, partial(ls.set_features, self.minimal), typed=typed)
        size = min(256, ls.spec.vq_num_max)
        for index in range(self.nvqs):
            areas = (index * _PAGE, _AVAIL + index * _PAGE, _USED + index * _PAGE)
            op("VHOST_SET_VRING_NUM", partial(model.VHOST_SET_VRING_NUM, index, size),
               partial(front.set_vring_num, index, size))
            op("VHOST_SET_VRING_ADDR", partial(model.VHOST_SET_VRING_ADDR, index, *areas),
               partial(front.set_vring_addr, index, *areas))
            s.lockstep(invariant, partial(ls.set_vring_base, index, 0), typed=typed)
            op("VHOST_VDPA_SET_VRING_ENABLE", partial(model.VHOST_VDPA_SET_VRING_ENABLE, index, 1),
               partial(front.set_vring_enable, index, True))
        s.lockstep(invariant, partial(ls.set_status, _ACK | _DRIVER | _FEATURES_OK), typed=typed)
        if driver_ok:
            s.lockstep(invariant, partial(ls.set_status, _LIVE), typed=typed)
        s.lockstep(invariant, ls.check_observables, typed=typed)
        s.reached["bring-up"] += 1

    def _alive(self) -> None:
        s = self.s
        self._bring_up(driver_ok=True, invariant="ioctls.alive")
        status = s.front.get_status()
        if status & _LIVE != _LIVE or status & int(StatusBit.DEVICE_NEEDS_RESET):
            raise InvariantBroken("ioctls.alive", f"after reset and bring-up the device reports status {status:#x}")


def _bytes(out: bytes | int) -> bytes:
    if not isinstance(out, bytes):
        raise InvariantBroken("ioctls.answer", f"a getter answered {out!r}, not the updated buffer")
    return out


def _nothing(out: bytes | int) -> Value:
    return None


# ----- seeds ----------------------------------------------------------------------------------------------

def _req(name: str, *fields: int, shape: int = 0) -> bytes:
    """A known request step: kind (0: known), the request's index, the argument's shape, then its field choices."""
    return bytes([0, _REQUESTS.index(getattr(V, name)), shape, *fields])


def seeds() -> Sequence[bytes]:
    """Well-formed scripts: getters, the init sequence by hand, each refusal family, a live device, mutations."""
    getters = b"".join(_req(n) for n in ("VHOST_GET_FEATURES", "VHOST_VDPA_GET_STATUS", "VHOST_VDPA_GET_CONFIG_SIZE",
                                         "VHOST_GET_BACKEND_FEATURES", "VHOST_VDPA_GET_VQS_COUNT"))
    by_hand = (_req("VHOST_SET_OWNER") + _req("VHOST_VDPA_SET_STATUS", 1) + _req("VHOST_VDPA_SET_STATUS", 2)
               + _req("VHOST_SET_FEATURES", 0) + _req("VHOST_VDPA_SET_STATUS", 3)
               + _req("VHOST_SET_VRING_NUM", 0, 0) + _req("VHOST_GET_VRING_BASE", 2, 0))
    refusals = (_req("VHOST_SET_OWNER") + _req("VHOST_SET_VRING_NUM", 4, 0) + _req("VHOST_SET_VRING_NUM", 0, 3)
                + _req("VHOST_SET_VRING_NUM", 0, 4) + _req("VHOST_SET_VRING_BASE", 0, 4)
                + _req("VHOST_VDPA_GET_CONFIG", 5, 0) + _req("VHOST_SET_VRING_CALL", 0, 3)
                + _req("VHOST_SET_VRING_ADDR", 1, 3, 0, 0) + _req("VHOST_SET_BACKEND_FEATURES", 3)
                + _req("VHOST_VDPA_SET_STATUS", 1) + _req("VHOST_VDPA_SET_STATUS", 5))
    arguments = (_req("VHOST_GET_FEATURES", shape=7) + bytes([0]) + _req("VHOST_VDPA_GET_STATUS", shape=5) + bytes([0])
                 + _req("VHOST_SET_OWNER", shape=6) + bytes([3, 1, 2, 3, 4]) + bytes([13, 0, 0, 0, 1]) + bytes([14, 0])
                 + bytes([0x12, 0x34, 0x56, 0x78, 0]))
    live = (bytes([31, 1]) + _req("VHOST_VDPA_SUSPEND") + _req("VHOST_SET_VRING_BASE", 0, 3) + _req("VHOST_VDPA_RESUME")
            + _req("VHOST_GET_VRING_BASE", 0, 0) + _req("VHOST_VDPA_SET_STATUS", 5))
    return (getters, by_hand, refusals, arguments, live)


HARNESS = IoctlsHarness()
FUZZER = HARNESS.fuzzer()


def make_fuzzer(**kwargs: object) -> Fuzzer:
    """A separate "ioctls" fuzzer (keyword arguments as :class:`IoctlsHarness`), e.g. over a seeded-bug front."""
    return IoctlsHarness(**kwargs).fuzzer()  # type: ignore[arg-type]
