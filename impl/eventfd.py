"""Eventfds as vhost takes them: validated, held by reference, signalled and drained.

vhost resolves the fd userspace passes (SET_VRING_KICK/CALL, SET_CONFIG_CALL, SET_LOG_FD) to the
eventfd object behind it and keeps a reference (``eventfd_fget`` / ``eventfd_ctx_fdget``), so
userspace may close its own fd afterwards. The Python equivalent of that reference is a
duplicate descriptor of the same open file, which is what :func:`take` returns.
"""

from __future__ import annotations

import contextlib
import errno
import os

_EVENTFD_LINK = "anon_inode:[eventfd]"


def is_eventfd(fd: int) -> bool:
    """Whether ``fd`` is an open eventfd of this process."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == _EVENTFD_LINK
    except OSError:
        return False


def take(fd: int) -> int:
    """A private duplicate of eventfd ``fd``: EBADF when ``fd`` is not open, EINVAL when it is not an eventfd.

    Those are the errnos of Linux's eventfd_fget for the same two mistakes.
    """
    if not isinstance(fd, int) or fd < 0:
        raise OSError(errno.EBADF, f"{fd!r} is not an open file descriptor")
    try:
        os.fstat(fd)
    except OSError:
        raise OSError(errno.EBADF, f"fd {fd} is not open") from None
    if not is_eventfd(fd):
        raise OSError(errno.EINVAL, f"fd {fd} is not an eventfd")
    return os.dup(fd)


def release(fd: int | None) -> None:
    """Close a duplicate made by :func:`take` (None is a no-op)."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def signal(fd: int) -> None:
    """Add 1 to the eventfd counter (``eventfd_signal``)."""
    os.eventfd_write(fd, 1)


def drain(fd: int) -> int:
    """Read and reset the counter of a non-blocking eventfd; 0 when nothing was pending."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
