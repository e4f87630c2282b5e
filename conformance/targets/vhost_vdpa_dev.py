"""``vhost-vdpa:/dev/vhost-vdpa-N``: a Linux vhost-vdpa character device as a target.

The channel is plain system calls on the open file: ``fcntl.ioctl`` with the request number and
a mutable buffer the kernel reads and updates in place (so a config read of any length works,
unlike fcntl's 1024-byte copy of an immutable argument), ``os.write`` of IOTLB messages and a
non-blocking ``os.read`` of the MISS / ACCESS_FAIL messages the kernel queues. Guest memory is
an ordinary anonymous mapping: the kernel pins pages by user address.

A vhost device has no doorbell of its own: userspace notifies a queue by writing the eventfd it
installed with VHOST_SET_VRING_KICK. The channel therefore remembers, per queue, the eventfd of
the last SET_VRING_KICK the device accepted (a duplicate, the way the kernel holds a reference),
and :meth:`DevChannel.kick` writes it.

A second open of a device is EBUSY: that is the device's own answer, passed on with a hint.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import stat

from vdpacert.conformance.targets.base import Target
from vdpacert.impl.guestmem import GuestMemory
from vdpacert.uapi import vhost as V  # noqa: N812
from vdpacert.uapi import vhost_types as T  # noqa: N812

__all__ = ["DevChannel", "VhostVdpaDevTarget"]

_IOC_SIZEMASK = 0x3FFF
_HINTS = {
    errno.ENOENT: "no such device node; load vhost_vdpa and create a device with `vdpa dev add`",
    errno.EBUSY: "the device is already open (a vhost-vdpa device has one opener at a time)",
    errno.EACCES: "permission denied; the node must be readable and writable by this user",
    errno.EPERM: "permission denied; the node must be readable and writable by this user",
    errno.ENXIO: "no device behind this node (was it deleted?)",
}


class DevChannel:
    """One open of a vhost-vdpa char device (see the module docstring)."""

    def __init__(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            hint = _HINTS.get(error.errno or 0, error.strerror or "cannot open")
            raise OSError(error.errno, f"cannot open vhost-vdpa device: {hint}", path) from error
        try:
            if not stat.S_ISCHR(os.fstat(fd).st_mode):
                raise OSError(errno.ENODEV, "not a character device, so not a vhost-vdpa device", path)
        except BaseException:
            os.close(fd)
            raise
        self.path = path
        self._fd: int | None = fd
        self._kick_fds: dict[int, int] = {}

    def _checked_fd(self) -> int:
        if self._fd is None:
            raise OSError(errno.EBADF, "the vhost-vdpa file is closed", self.path)
        return self._fd

    def ioctl(self, request: int, arg: bytes | int) -> bytes | int:
        fd = self._checked_fd()
        if isinstance(arg, int):
            return fcntl.ioctl(fd, request, arg)
        # At least the struct size the request number encodes: a short hostile argument must not
        # let the kernel read or write past the end of a Python buffer.
        buf = bytearray(arg)
        buf.extend(bytes(max(0, ((request >> 16) & _IOC_SIZEMASK) - len(buf))))
        fcntl.ioctl(fd, request, buf, True)
        if request == V.VHOST_SET_VRING_KICK:
            index, kick_fd = T.VHOST_VRING_FILE.unpack_from(buf)
            self._remember_kick(index, kick_fd)
        return bytes(buf)

    def _remember_kick(self, index: int, kick_fd: int) -> None:
        old = self._kick_fds.pop(index, None)
        if old is not None:
            os.close(old)
        if kick_fd != T.VHOST_FILE_UNBIND:
            self._kick_fds[index] = os.dup(kick_fd)

    def write(self, data: bytes) -> int:
        return os.write(self._checked_fd(), data)

    def read(self) -> bytes | None:
        fd = self._checked_fd()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(0):
            return None
        try:
            data = os.read(fd, T.VHOST_MSG_V2.size)
        except BlockingIOError:
            return None
        return data or None

    def kick(self, index: int) -> None:
        self._checked_fd()
        kick_fd = self._kick_fds.get(index)
        if kick_fd is None:
            raise OSError(errno.ENXIO, f"queue {index} has no kick eventfd: a vhost-vdpa device is notified "
                          "only through the eventfd set with VHOST_SET_VRING_KICK")
        os.eventfd_write(kick_fd, 1)

    def close(self) -> None:
        """Close the file (the kernel resets the device) and the kick eventfd references (idempotent)."""
        fd, self._fd = self._fd, None
        for kick_fd in self._kick_fds.values():
            os.close(kick_fd)
        self._kick_fds.clear()
        if fd is not None:
            os.close(fd)


class VhostVdpaDevTarget(Target):
    """A ``/dev/vhost-vdpa-N`` node; opening checks that it answers VHOST_VDPA_GET_DEVICE_ID."""

    def __init__(self, path: str) -> None:
        super().__init__(f"vhost-vdpa:{path}", "vhost-vdpa")
        self.path = path
        self._open()

    def _open_channel(self) -> DevChannel:
        channel = DevChannel(self.path)
        try:
            channel.ioctl(V.VHOST_VDPA_GET_DEVICE_ID, bytes(4))
        except OSError as error:
            channel.close()
            if error.errno == errno.ENOTTY:
                raise OSError(errno.ENOTTY, "not a vhost-vdpa device: it does not answer VHOST_VDPA_GET_DEVICE_ID",
                              self.path) from error
            raise
        return channel

    def open_again(self) -> None:
        """A second ``open()`` of the node while this one holds it (vhost_vdpa_open answers EBUSY)."""
        os.close(os.open(self.path, os.O_RDWR | os.O_CLOEXEC))

    def _make_memory(self, size: int, gpa: int) -> GuestMemory:
        # Shared: a parent working on virtual addresses (vdpa_sim's use_va) gets only shared mappings from
        # vhost-vdpa; private memory is skipped without an error (quirk vhost_vdpa.va_map_skips_private_memory).
        return GuestMemory(size, gpa, register=False, shared=True)
