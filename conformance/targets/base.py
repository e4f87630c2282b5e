"""What the suite holds for one device under test, whatever kind of device it is.

A :class:`Target` gives the suite exactly what a userspace driver of ``/dev/vhost-vdpa-N`` has:
a :class:`~vdpacert.conformance.client.VhostClient` over the open file, guest memory whose user
addresses the device can reach, eventfds, and a bounded wait for a call. The subclasses differ
only in how the file is opened (:meth:`Target._open_channel`) and where memory lives, so a test
written against this class runs unchanged on every target.

Everything a target hands out (memory, eventfds) is owned by the open it was made for:
:meth:`Target.reopen` and :meth:`Target.close` release it, device first, so a device never
touches memory after it was unmapped and each open starts like a new process.
"""

from __future__ import annotations

import abc
import contextlib
import os
import select
import time
from typing import TYPE_CHECKING

from vdpacert.conformance.client import Channel, VhostClient
from vdpacert.conformance.targets.spec import parse_target

if TYPE_CHECKING:
    from vdpacert.impl.guestmem import GuestMemory

__all__ = ["Target", "close_shared_targets", "make_target", "shared_target"]

#: How often wait_call services an embedded device while it waits (seconds).
_WAIT_SLICE = 0.01


class Target(abc.ABC):
    """One device under test (see the module docstring). Subclasses call :meth:`_open` in ``__init__``."""

    def __init__(self, name: str, kind: str) -> None:
        self.name = name
        self.kind = kind
        #: The quirk names the run's target profile declares (None: not told; the lockstep then takes its kind's).
        self.declared_quirks: frozenset[str] | None = None
        self._client: VhostClient | None = None
        self._eventfds: list[int] = []
        self._memories: list[GuestMemory] = []

    # ----- what subclasses provide ----------------------------------------------------------------

    @abc.abstractmethod
    def _open_channel(self) -> Channel:
        """Open the device afresh (the device is reset by the open, as vhost_vdpa_open does)."""

    def _after_close(self) -> None:  # noqa: B027 - optional hook, most targets have nothing to release
        """Release what the open made besides the file (an embedded device is deleted here)."""

    @abc.abstractmethod
    def _make_memory(self, size: int, gpa: int) -> GuestMemory:
        """Memory the device can reach by the region's ``uaddr``."""

    # ----- the suite's view ---------------------------------------------------------------------

    def _open(self) -> None:
        self._client = VhostClient(self._open_channel())

    @property
    def client(self) -> VhostClient:
        """The client of the current open; its calls are TargetDied once the target is closed."""
        if self._client is None:
            raise RuntimeError(f"target {self.name} was never opened")
        return self._client

    @property
    def closed(self) -> bool:
        return self._client is None or self._client.closed

    @property
    def device_id(self) -> int:
        """VHOST_VDPA_GET_DEVICE_ID, asked now (virtio_ids: 1 net, 2 block)."""
        return self.client.get_device_id()

    def new_memory(self, size: int, *, gpa: int = 0) -> GuestMemory:
        """``size`` bytes of zeroed guest memory at guest-physical ``gpa``, released with this open."""
        memory = self._make_memory(size, gpa)
        self._memories.append(memory)
        return memory

    def eventfd(self) -> int:
        """A non-blocking eventfd (counter 0), closed with this open."""
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._eventfds.append(fd)
        return fd

    def service(self) -> int:
        """Let the device act on pending kick eventfds now; how many queues were kicked (0: nothing to do)."""
        return 0

    def wait_call(self, fd: int, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for eventfd ``fd`` to be signalled; True (and the counter
        read back to 0) when it was. Services the device while waiting, so an embedded target's
        kicks are processed; never blocks past the timeout, so a silent device cannot hang a run."""
        deadline = time.monotonic() + max(0.0, timeout)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            self.service()
            remaining = deadline - time.monotonic()
            if poller.poll(max(0, int(min(remaining, _WAIT_SLICE) * 1000))):
                with contextlib.suppress(BlockingIOError):  # another reader took it first: still signalled
                    os.read(fd, 8)
                return True
            if remaining <= 0:
                return False

    def reopen(self) -> None:
        """Close the device and open it fresh, as a new process opening the char device would."""
        self._release()
        self._open()

    def close(self) -> None:
        """Close the device, then free its memory and eventfds (idempotent)."""
        self._release()

    def _release(self) -> None:
        client = self._client  # kept once closed: its calls then say TargetDied
        try:
            if client is not None and not client.closed:
                try:
                    client.close()
                finally:
                    self._after_close()
        finally:
            for memory in self._memories:
                memory.close()
            self._memories.clear()
            for fd in self._eventfds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._eventfds.clear()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {'closed' if self.closed else 'open'}>"


def make_target(spec: str) -> Target:
    """Open the target a ``--target`` string names (ValueError for a bad string or refused attributes,
    OSError for a device that cannot be opened)."""
    parsed = parse_target(spec)
    if parsed.kind == "vhost-vdpa":
        from vdpacert.conformance.targets.vhost_vdpa_dev import VhostVdpaDevTarget

        return VhostVdpaDevTarget(parsed.path)
    if parsed.kind == "python":
        from vdpacert.conformance.targets.python_parent import PythonParentTarget

        return PythonParentTarget(parsed)
    from vdpacert.conformance.targets.embedded import SimTarget

    return SimTarget(parsed)


#: The targets of this process that everything in a run shares, by target string.
_SHARED: dict[str, Target] = {}


def shared_target(spec: str) -> Target:
    """The one open target for ``spec`` in this process, opened on first use (and again once closed).

    Every machine of a run goes through it: a real ``/dev/vhost-vdpa-N`` has one opener at a time
    (a second open is EBUSY), so a run cannot open its device once per machine; and the target
    carries what the run knows of it (the declared quirks of its profile) to every machine.
    """
    target = _SHARED.get(spec)
    if target is None or target.closed:
        target = _SHARED[spec] = make_target(spec)
    return target


def close_shared_targets() -> None:
    """Close every shared target (the end of a run)."""
    for target in _SHARED.values():
        target.close()
    _SHARED.clear()
