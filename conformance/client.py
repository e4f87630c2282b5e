"""The one place the suite turns operations into vhost-vdpa ioctls and IOTLB messages.

:class:`VhostClient` speaks to a target only through a :class:`Channel`: ``ioctl(request, arg)``
with the real request numbers of :mod:`vdpacert.uapi.vhost` and the argument packed exactly as
``fcntl.ioctl`` takes it on ``/dev/vhost-vdpa-N``, ``write()`` / ``read()`` of 72-byte
``struct vhost_msg_v2``, and ``kick(index)``. Every struct is packed here, from the layouts of
:mod:`vdpacert.uapi.vhost_types`, never borrowed from a target, so a packing bug cannot hide
behind the same bug in the device under test.

Errors: a refusal is ``OSError`` with the target's errno, untouched, because that errno is what
the model predicts. A target that can no longer answer at all is :class:`TargetDied`, a
different exception on purpose, so a step comparing errnos never mistakes a dead target for a
refusal. EIO, EBADF and ENODEV are ambiguous (a live device answers EBADF for a bad eventfd and
EIO for a broken group number), so on those the client asks the target the one question every
open vhost-vdpa file answers, VHOST_VDPA_GET_DEVICE_ID: if that fails too, the target is dead.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from typing import NamedTuple, Protocol, TypeVar

from vdpacert.uapi import vhost as V  # noqa: N812 - read like the C names: V.VHOST_SET_OWNER
from vdpacert.uapi import vhost_types as T  # noqa: N812

__all__ = ["Channel", "IotlbMessage", "TargetDied", "VhostClient", "pack_iotlb_msg"]

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")  # int fds (SET_CONFIG_CALL, SET_LOG_FD)
_U64 = struct.Struct("<Q")

#: errnos that may mean "the file is gone" rather than "the device said no".
_AMBIGUOUS = frozenset({errno.EIO, errno.EBADF, errno.ENODEV})

_R = TypeVar("_R")

#: Request numbers to their UAPI names, for messages.
_REQUEST_NAMES = {value: name for name, value in vars(V).items()
                  if name.startswith("VHOST_") and name != "VHOST_VIRTIO"}


class Channel(Protocol):
    """What a target hands the client: the system calls of one open vhost-vdpa file, nothing else."""

    def ioctl(self, request: int, arg: bytes | int) -> bytes | int:
        """``fcntl.ioctl(fd, request, arg)``: bytes in, the updated bytes out; an int for ``_IO`` requests."""
        ...

    def write(self, data: bytes) -> int:
        """``os.write`` of one IOTLB message."""
        ...

    def read(self) -> bytes | None:
        """A pending MISS / ACCESS_FAIL message (72 bytes), or None when there is none (never blocks)."""
        ...

    def kick(self, index: int) -> None:
        """Notify queue ``index`` (a doorbell, or a write to the queue's kick eventfd)."""
        ...

    def close(self) -> None:
        """``close(fd)``: the device is reset and released."""
        ...


class TargetDied(Exception):
    """The target stopped answering: its file is closed or gone, or its implementation crashed.

    Not an OSError, so ``except OSError`` around an operation whose errno is being compared
    never swallows it. ``errno`` is the failing call's errno when there was one.
    """

    def __init__(self, operation: str, reason: str, errno_: int | None = None) -> None:
        super().__init__(f"the target died during {operation}: {reason}")
        self.operation = operation
        self.reason = reason
        self.errno = errno_


class IotlbMessage(NamedTuple):
    """A message read from the device: ``type`` is VHOST_IOTLB_MISS or VHOST_IOTLB_ACCESS_FAIL."""

    type: int
    asid: int
    iova: int
    size: int
    perm: int


def pack_iotlb_msg(msg_type: int, iova: int = 0, size: int = 0, uaddr: int = 0, perm: int = 0, *,
                   asid: int = 0, version: int = T.VHOST_IOTLB_MSG_V2) -> bytes:
    """``struct vhost_msg_v2 { u32 type; u32 asid; struct vhost_iotlb_msg iotlb; }`` padded to 72 bytes.

    ``version`` VHOST_IOTLB_MSG (1) gives the v1 ``struct vhost_msg``, whose asid word is the
    hole before the 8-aligned union, so the same layout with asid 0.
    """
    return _pack("IOTLB message", T.VHOST_MSG_V2, version, asid, iova, size, uaddr, perm, msg_type)


def _name(request: int) -> str:
    return _REQUEST_NAMES.get(request, f"ioctl {request:#x}")


def _pack(what: str, layout: struct.Struct, *values: int) -> bytes:
    try:
        return layout.pack(*values)
    except struct.error as error:
        raise ValueError(f"{what}: a value does not fit its UAPI field ({error})") from None


class VhostClient:
    """Named vhost-vdpa requests over one :class:`Channel` (see the module docstring).

    Method names and argument orders mirror the UAPI; getters return the unpacked value,
    setters return None. Once :meth:`close` ran, every call is :class:`TargetDied`.
    """

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._closed = False

    @property
    def channel(self) -> Channel:
        return self._channel

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the channel (idempotent)."""
        if not self._closed:
            self._closed = True
            self._channel.close()

    # ----- the raw system calls, with the error mapping ---------------------------------------

    def _call(self, operation: str, call: Callable[[], _R]) -> _R:
        if self._closed:
            raise TargetDied(operation, "the client was closed", errno.EBADF)
        try:
            return call()
        except OSError as error:
            if error.errno in _AMBIGUOUS and not self._alive():
                raise TargetDied(operation, f"{error} (and the file answers nothing)", error.errno) from error
            raise
        except Exception as error:  # not an answer a file can give: the implementation behind it crashed
            raise TargetDied(operation, f"{type(error).__name__}: {error}") from error

    def _alive(self) -> bool:
        """Whether the file still answers VHOST_VDPA_GET_DEVICE_ID (no owner needed, no side effect)."""
        try:
            self._channel.ioctl(V.VHOST_VDPA_GET_DEVICE_ID, bytes(_U32.size))
        except Exception:
            return False
        return True

    def ioctl(self, request: int, arg: bytes | int = 0) -> bytes | int:
        """Any request with any argument (hostile sizes, unknown numbers), mapped like the named ones."""
        return self._call(_name(request), lambda: self._channel.ioctl(request, arg))

    def write(self, data: bytes) -> int:
        """Any ``write()`` (a malformed IOTLB message too); returns what the target reports written."""
        return self._call("write", lambda: self._channel.write(bytes(data)))

    def _in(self, request: int, layout: struct.Struct, *prefix: int) -> tuple[int, ...]:
        """An _IOR/_IOWR request: ``prefix`` fills the leading fields (the queue index), zeros the rest."""
        fields = len(layout.unpack(bytes(layout.size)))
        arg = _pack(_name(request), layout, *prefix, *([0] * (fields - len(prefix))))
        out = self.ioctl(request, arg)
        if not isinstance(out, bytes) or len(out) < layout.size:
            raise TargetDied(_name(request), f"the channel returned {out!r} for a {layout.size}-byte struct")
        return layout.unpack_from(out)

    def _out(self, request: int, layout: struct.Struct, *values: int) -> None:
        self.ioctl(request, _pack(_name(request), layout, *values))

    # ----- device-level requests ----------------------------------------------------------------

    def set_owner(self) -> None:
        self.ioctl(V.VHOST_SET_OWNER, 0)

    def get_features(self) -> int:
        return self._in(V.VHOST_GET_FEATURES, _U64)[0]

    def set_features(self, features: int) -> None:
        self._out(V.VHOST_SET_FEATURES, _U64, features)

    def get_backend_features(self) -> int:
        return self._in(V.VHOST_GET_BACKEND_FEATURES, _U64)[0]

    def set_backend_features(self, features: int) -> None:
        self._out(V.VHOST_SET_BACKEND_FEATURES, _U64, features)

    def get_device_id(self) -> int:
        return self._in(V.VHOST_VDPA_GET_DEVICE_ID, _U32)[0]

    def get_status(self) -> int:
        return self._in(V.VHOST_VDPA_GET_STATUS, _U8)[0]

    def set_status(self, status: int) -> None:
        self._out(V.VHOST_VDPA_SET_STATUS, _U8, status)

    def get_config(self, offset: int, length: int) -> bytes:
        """``struct vhost_vdpa_config { u32 off; u32 len; u8 buf[len]; }``: the ``len`` bytes read."""
        header = _pack("VHOST_VDPA_GET_CONFIG", T.VHOST_VDPA_CONFIG, offset, length)
        out = self.ioctl(V.VHOST_VDPA_GET_CONFIG, header + bytes(length))
        if not isinstance(out, bytes):
            raise TargetDied("VHOST_VDPA_GET_CONFIG", f"the channel returned {out!r}")
        return out[T.VHOST_VDPA_CONFIG.size:T.VHOST_VDPA_CONFIG.size + length]

    def set_config(self, offset: int, data: bytes) -> None:
        header = _pack("VHOST_VDPA_SET_CONFIG", T.VHOST_VDPA_CONFIG, offset, len(data))
        self.ioctl(V.VHOST_VDPA_SET_CONFIG, header + bytes(data))

    def get_config_size(self) -> int:
        return self._in(V.VHOST_VDPA_GET_CONFIG_SIZE, _U32)[0]

    def get_vring_num(self) -> int:
        """VHOST_VDPA_GET_VRING_NUM: the largest queue size the device takes (a u16)."""
        return self._in(V.VHOST_VDPA_GET_VRING_NUM, _U16)[0]

    def get_vqs_count(self) -> int:
        return self._in(V.VHOST_VDPA_GET_VQS_COUNT, _U32)[0]

    def get_group_num(self) -> int:
        return self._in(V.VHOST_VDPA_GET_GROUP_NUM, _U32)[0]

    def get_as_num(self) -> int:
        return self._in(V.VHOST_VDPA_GET_AS_NUM, _U32)[0]

    def get_iova_range(self) -> tuple[int, int]:
        """``struct vhost_vdpa_iova_range { u64 first; u64 last; }``."""
        first, last = self._in(V.VHOST_VDPA_GET_IOVA_RANGE, T.VHOST_VDPA_IOVA_RANGE)
        return first, last

    def set_config_call(self, fd: int) -> None:
        self._out(V.VHOST_VDPA_SET_CONFIG_CALL, _I32, fd)

    def suspend(self) -> None:
        self.ioctl(V.VHOST_VDPA_SUSPEND, 0)

    def resume(self) -> None:
        self.ioctl(V.VHOST_VDPA_RESUME, 0)

    def set_log_base(self, uaddr: int) -> None:
        self._out(V.VHOST_SET_LOG_BASE, _U64, uaddr)

    def set_log_fd(self, fd: int) -> None:
        self._out(V.VHOST_SET_LOG_FD, _I32, fd)

    # ----- vring requests -----------------------------------------------------------------------

    def set_vring_num(self, index: int, num: int) -> None:
        self._out(V.VHOST_SET_VRING_NUM, T.VHOST_VRING_STATE, index, num)

    def set_vring_addr(self, index: int, desc: int, avail: int, used: int, *, flags: int = 0,
                       log_guest_addr: int = 0) -> None:
        """``struct vhost_vring_addr``: note the UAPI field order is desc, used, avail."""
        self._out(V.VHOST_SET_VRING_ADDR, T.VHOST_VRING_ADDR, index, flags, desc, used, avail, log_guest_addr)

    def set_vring_base(self, index: int, num: int) -> None:
        self._out(V.VHOST_SET_VRING_BASE, T.VHOST_VRING_STATE, index, num)

    def get_vring_base(self, index: int) -> int:
        return self._in(V.VHOST_GET_VRING_BASE, T.VHOST_VRING_STATE, index)[1]

    def set_vring_kick(self, index: int, fd: int) -> None:
        self._out(V.VHOST_SET_VRING_KICK, T.VHOST_VRING_FILE, index, fd)

    def set_vring_call(self, index: int, fd: int) -> None:
        self._out(V.VHOST_SET_VRING_CALL, T.VHOST_VRING_FILE, index, fd)

    def set_vring_err(self, index: int, fd: int) -> None:
        self._out(V.VHOST_SET_VRING_ERR, T.VHOST_VRING_FILE, index, fd)

    def set_vring_enable(self, index: int, enable: bool | int) -> None:
        """``num`` is the enable word as sent (any int, to probe what a device makes of 2)."""
        self._out(V.VHOST_VDPA_SET_VRING_ENABLE, T.VHOST_VRING_STATE, index, int(enable))

    def get_vring_group(self, index: int) -> int:
        return self._in(V.VHOST_VDPA_GET_VRING_GROUP, T.VHOST_VRING_STATE, index)[1]

    def get_vring_desc_group(self, index: int) -> int:
        return self._in(V.VHOST_VDPA_GET_VRING_DESC_GROUP, T.VHOST_VRING_STATE, index)[1]

    def get_vring_size(self, index: int) -> int:
        return self._in(V.VHOST_VDPA_GET_VRING_SIZE, T.VHOST_VRING_STATE, index)[1]

    def set_group_asid(self, group: int, asid: int) -> None:
        """The ``index`` field of ``struct vhost_vring_state`` carries the group here."""
        self._out(V.VHOST_VDPA_SET_GROUP_ASID, T.VHOST_VRING_STATE, group, asid)

    # ----- IOTLB messages -----------------------------------------------------------------------

    def send_iotlb(self, msg_type: int, iova: int = 0, size: int = 0, uaddr: int = 0, perm: int = 0, *,
                   asid: int = 0, version: int = T.VHOST_IOTLB_MSG_V2) -> int:
        """Write one message of any type (MISS, ACCESS_FAIL, 0 ... for the hostile cases)."""
        return self.write(pack_iotlb_msg(msg_type, iova, size, uaddr, perm, asid=asid, version=version))

    def iotlb_update(self, iova: int, size: int, uaddr: int, perm: int, *, asid: int = 0) -> None:
        self.send_iotlb(T.VHOST_IOTLB_UPDATE, iova, size, uaddr, perm, asid=asid)

    def iotlb_invalidate(self, iova: int, size: int, *, asid: int = 0) -> None:
        self.send_iotlb(T.VHOST_IOTLB_INVALIDATE, iova, size, asid=asid)

    def iotlb_batch_begin(self, *, asid: int = 0) -> None:
        self.send_iotlb(T.VHOST_IOTLB_BATCH_BEGIN, asid=asid)

    def iotlb_batch_end(self, *, asid: int = 0) -> None:
        self.send_iotlb(T.VHOST_IOTLB_BATCH_END, asid=asid)

    def read_fault(self) -> IotlbMessage | None:
        """The next MISS / ACCESS_FAIL message the device queued, or None."""
        data = self._call("read", self._channel.read)
        if data is None:
            return None
        if len(data) < T.VHOST_MSG_V2.size:
            raise TargetDied("read", f"a {len(data)}-byte message; vhost messages are {T.VHOST_MSG_V2.size}")
        _, asid, iova, size, _, perm, msg_type = T.VHOST_MSG_V2.unpack_from(data)
        return IotlbMessage(msg_type, asid, iova, size, perm)

    # ----- notifications ------------------------------------------------------------------------

    def kick(self, index: int) -> None:
        """Notify queue ``index``: the target's doorbell, or a write to the kick eventfd set for it."""
        self._call(f"kick {index}", lambda: self._channel.kick(index))
