"""Where a migration's dirty pages come from: the device's own log, the guest CPU, the shadow virtqueues.

Pre-copy copies guest memory while the guest runs, so every page written after its copy must be
copied again. Three kinds of writer exist, and each has a :class:`DirtySource` that reports its
pages into the orchestrator's :class:`~vdpacert.migration.bitmap.DirtyBitmap`:

- :class:`DeviceLogTracker` (mode 1 of issue 5): the device logs its own writes. The tracker owns
  the log bitmap, in memory the device reaches by user address, and installs it with
  VHOST_SET_LOG_BASE / VHOST_SET_LOG_FD; VHOST_F_LOG_ALL turns the device's logging on and off.
- :class:`CpuDirtyTracker`: the guest's CPU. A real VMM reads these pages from KVM's dirty log; here
  the workload that plays the guest CPU says what it wrote.
- :class:`ShadowDirtySink` (mode 2): the shadow virtqueues, which see every used buffer the device
  returns and note the guest pages it wrote, for devices that cannot log (brief §5).

Every source follows one life cycle: :meth:`~DirtySource.start` (from now on no write is missed),
:meth:`~DirtySource.sync` (move what was dirtied since the last sync into a bitmap, atomically with
respect to new writes) and :meth:`~DirtySource.stop` (idempotent, and called after a failed migration
too: "dirty logging not stopped after a failed migration" is a bug seen in the field, brief §5).

The device is reached only through its vhost interface (:class:`~vdpacert.conformance.targets.Target`
and its :class:`~vdpacert.conformance.client.VhostClient`), as a VMM reaches ``/dev/vhost-vdpa-N``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from typing import Protocol

from vdpacert.conformance.client import TargetDied
from vdpacert.conformance.targets.base import Target
from vdpacert.migration.bitmap import PAGE_SHIFT, PAGE_SIZE, DirtyBitmap, PageRangeError
from vdpacert.model.dirty_log import log_size_for
from vdpacert.uapi import vhost_types as T  # noqa: N812 - read like the C names

__all__ = ["LOG_ALL", "LOG_GPA", "CpuDirtyTracker", "DeviceLogTracker", "DirtySource", "NotedDirtyTracker",
           "ShadowDirtySink", "pages_for"]

#: VHOST_F_LOG_ALL as a feature-word bit.
LOG_ALL = 1 << T.VHOST_F_LOG_ALL
#: Default guest-physical address of the log memory: above any guest this suite runs and above the
#: VMM's memory (just above the guest), so the region can never be mistaken for a guest page.
LOG_GPA = 1 << 47
_GIB = 1 << 30


def pages_for(size: int) -> int:
    """4 KiB pages covering ``size`` bytes of guest-physical memory from gpa 0."""
    return (size + PAGE_SIZE - 1) >> PAGE_SHIFT


class DirtySource(Protocol):
    """One kind of writer's dirty pages, as the pre-copy orchestrator consumes them."""

    name: str

    @property
    def active(self) -> bool:
        """True between a successful :meth:`start` and :meth:`stop`."""

    def start(self) -> None:
        """Begin tracking: from now on every page this source writes is reported by a later sync."""

    def sync(self, into: DirtyBitmap) -> int:
        """Move the pages dirtied since the last sync into ``into``; how many were newly set there."""

    def stop(self) -> None:
        """Stop tracking (after success or failure); idempotent. No further marks land anywhere."""


def _check_guest_size(guest_size: int) -> None:
    if isinstance(guest_size, bool) or not isinstance(guest_size, int) or guest_size <= 0:
        raise ValueError(f"guest_size must be a positive number of bytes, got {guest_size!r}")


class DeviceLogTracker:
    """The device's own dirty log (VHOST_F_LOG_ALL + VHOST_SET_LOG_BASE), brief §5.

    The log covers guest-physical ``[0, guest_size)``; it is allocated at construction with
    ``target.new_memory`` at ``log_gpa`` (default :data:`LOG_GPA`), which must not overlap the guest,
    and lives as long as the target's open. ``acked_features``: the features the guest driver
    negotiated, without VHOST_F_LOG_ALL (the bit is ignored if present). Given, :meth:`start` and
    :meth:`stop` switch logging on a running device with SET_FEATURES(acked | LOG_ALL) and
    SET_FEATURES(acked), the way a VMM does; None leaves the features to the caller (who then
    negotiates LOG_ALL at bring-up and must clear it to stop the device logging).

    Used-ring writes are logged only for vrings set up with VHOST_VRING_F_LOG and a
    ``log_guest_addr``; that is the VMM's SET_VRING_ADDR, not the tracker's.
    """

    def __init__(self, target: Target, guest_size: int, *, log_gpa: int | None = None,
                 acked_features: int | None = None, name: str = "device-log") -> None:
        _check_guest_size(guest_size)
        if acked_features is not None and (isinstance(acked_features, bool) or not isinstance(acked_features, int)
                                           or acked_features < 0):
            raise ValueError(f"acked_features must be a feature word or None, got {acked_features!r}")
        self.name = name
        self.target = target
        self.guest_size = guest_size
        self.npages = pages_for(guest_size)
        # Whole pages of log, as a VMM would mmap it; the bits past the guest's last page stay 0.
        self.log_bytes = (log_size_for(guest_size) + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
        if log_gpa is None:
            log_gpa = max(LOG_GPA, (guest_size + _GIB - 1) // _GIB * _GIB)
        if log_gpa < guest_size:
            raise ValueError(f"the log at gpa {log_gpa:#x} would lie inside the guest's [0, {guest_size:#x}): "
                             "the device's log writes must never look like guest pages")
        self.acked_features = None if acked_features is None else acked_features & ~LOG_ALL
        self.log = target.new_memory(self.log_bytes, gpa=log_gpa)
        self.log_fd = target.eventfd()
        #: Log-eventfd signals seen by :meth:`sync` since construction (the device signals after logging).
        self.signals = 0
        self._active = False

    @property
    def log_uaddr(self) -> int:
        """The user address VHOST_SET_LOG_BASE is given."""
        return self.log.uaddr

    @property
    def active(self) -> bool:
        return self._active

    def _log_view(self) -> memoryview:
        # GuestMemory exports no buffer; its uaddr is a real address in this process (guestmem.pyx), so
        # the view is made from it, and only while the memory is known to be mapped.
        if self.log.is_closed:
            raise TargetDied("dirty log sync", "the log memory was released with the target's open")
        return memoryview((ctypes.c_char * self.log_bytes).from_address(self.log.uaddr)).cast("B")

    def start(self) -> None:
        """SET_LOG_BASE, SET_LOG_FD, then (with ``acked_features``) SET_FEATURES with LOG_ALL.

        The log is zeroed first: bits left from an earlier round of tracking are not this round's.
        A refused step (OSError, e.g. ENOTTY from a device that cannot log) is raised after the
        steps already taken are undone, and the tracker stays inactive.
        """
        if self._active:
            return
        client = self.target.client
        self.log.fill(0, self.log_bytes, 0)
        self._drain_signals()
        try:
            client.set_log_base(self.log_uaddr)
            client.set_log_fd(self.log_fd)
            if self.acked_features is not None:
                client.set_features(self.acked_features | LOG_ALL)
        except BaseException:
            with contextlib.suppress(OSError, TargetDied):
                client.set_log_fd(T.VHOST_FILE_UNBIND)
            raise
        self._active = True

    def sync(self, into: DirtyBitmap) -> int:
        """Take every bit of the log (atomically, so the device may keep logging) into ``into``.

        Allowed after :meth:`stop` too, to drain what was logged before it. The count is of pages
        newly set in ``into``. A log may cover more than ``into`` does: the VMM's own memory sits
        above the guest's in guest-physical space (its shadow rings, which a logging device logs
        like any page it writes) and is never sent. Those bits are taken and dropped here, whole
        bytes of them, so they do not pile up in the log.
        """
        self._drain_signals()
        view = self._log_view()
        added = into.merge_from_log(view, clear=True)
        beyond = (into.npages + 7) // 8
        if beyond < len(view):
            view[beyond:] = bytes(len(view) - beyond)
        return added

    def _drain_signals(self) -> None:
        # Read before the log is taken: a signal raised after this read is for bits this sync may take
        # too, which only costs the orchestrator one empty wake-up.
        with contextlib.suppress(BlockingIOError, OSError):
            self.signals += os.eventfd_read(self.log_fd)

    def stop(self) -> None:
        """SET_FEATURES without LOG_ALL (with ``acked_features``), then unbind the log eventfd.

        Every step is tried even if one fails; the tracker is inactive afterwards either way, and the
        first failure is raised so the caller knows the device may still be logging. A target already
        closed has nothing left to stop. The log memory keeps its bits for a last :meth:`sync`.
        """
        if not self._active:
            return
        self._active = False
        if self.target.closed:
            return
        client = self.target.client
        failure: OSError | TargetDied | None = None
        if self.acked_features is not None:
            try:
                client.set_features(self.acked_features)
            except (OSError, TargetDied) as error:
                failure = error
        try:
            client.set_log_fd(T.VHOST_FILE_UNBIND)
        except (OSError, TargetDied) as error:
            failure = failure or error
        if failure is not None:
            raise failure

    def __repr__(self) -> str:
        return (f"<DeviceLogTracker {self.name} {self.npages} pages, log {self.log_bytes} B at uaddr "
                f"{self.log_uaddr:#x}, {'active' if self._active else 'inactive'}>")


class NotedDirtyTracker:
    """Pages a writer *says* it wrote (:meth:`note`), kept in a bitmap of its own until a sync moves them.

    The base of :class:`CpuDirtyTracker` and :class:`ShadowDirtySink`. A note while tracking is off is
    checked and dropped: nobody is migrating, so nothing needs the page. The lock makes a sync's
    "merge then clear" atomic with respect to notes from another thread: a note between the two
    would otherwise be cleared without ever being reported.
    """

    def __init__(self, guest_size: int, *, name: str) -> None:
        _check_guest_size(guest_size)
        self.name = name
        self.guest_size = guest_size
        self.npages = pages_for(guest_size)
        self._pages = DirtyBitmap(self.npages)
        self._lock = threading.Lock()
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    def start(self) -> None:
        """Tracking on; pages left from an earlier round of tracking are dropped (they are not this round's)."""
        with self._lock:
            self._pages.clear()
            self._active = True

    def note(self, gpa: int, length: int) -> None:
        """The writer wrote ``length`` bytes at guest-physical ``gpa``. PageRangeError past the guest."""
        if gpa < 0 or length < 0 or (length and gpa + length > self.npages << PAGE_SHIFT):
            raise PageRangeError(f"{length} bytes at gpa {gpa:#x} are not inside the guest's {self.npages} pages")
        with self._lock:
            if self._active:
                self._pages.mark(gpa, length)

    def sync(self, into: DirtyBitmap) -> int:
        with self._lock:
            added = into.merge(self._pages)
            self._pages.clear()
        return added

    def stop(self) -> None:
        """Tracking off. Pages noted before it stay for a last :meth:`sync`, as a device log's bits do."""
        with self._lock:
            self._active = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.npages} pages, {'active' if self._active else 'inactive'}>"


class CpuDirtyTracker(NotedDirtyTracker):
    """The guest CPU's writes: what KVM's dirty log would report for a real VM (the workload notes them)."""

    def __init__(self, guest_size: int, *, name: str = "cpu") -> None:
        super().__init__(guest_size, name=name)


class ShadowDirtySink(NotedDirtyTracker):
    """What the shadow virtqueues note (mode 2): the guest pages of every buffer the device returned used."""

    def __init__(self, guest_size: int, *, name: str = "shadow-vq") -> None:
        super().__init__(guest_size, name=name)
