"""In-process targets: a parent in this process behind the reference vhost-vdpa front.

This is the only adapter that reaches into ``vdpacert.impl``: it builds the device (on a bus of
its own, or from a vendor factory) and opens it through :class:`~vdpacert.impl.vhost_vdpa.VhostVdpa`,
whose ``ioctl`` / ``write`` / ``read`` / ``kick`` take exactly the bytes a kernel char device
takes. From there on the suite sees a :class:`~vdpacert.conformance.client.Channel` like any other.

Every open builds the device anew (``vdpa dev add`` on the target's own bus, or a new factory
call), so each Hypothesis example starts from the same state, whatever the previous one left
behind (a changed MAC, disk contents, a parent that forgets to reset something). Each target has
its own bus and so its own device namespace: the device is always named ``vdpa0`` (its default MAC
and serial follow the name, so they are the same in every run), and any number of targets, in
any number of pytest-xdist workers, never collide.
"""

from __future__ import annotations

import abc
import errno
from typing import TYPE_CHECKING

from vdpacert.conformance.client import TargetDied
from vdpacert.conformance.targets.base import Target
from vdpacert.impl.bus import VdpaBus, default_bus
from vdpacert.impl.guestmem import GuestMemory, default_registry
from vdpacert.impl.parent import VdpaParent
from vdpacert.impl.vhost_vdpa import VhostVdpa

if TYPE_CHECKING:
    from vdpacert.conformance.client import Channel
    from vdpacert.conformance.targets.spec import TargetSpec
    from vdpacert.impl.guestmem import MemoryRegistry

__all__ = ["DEVICE_NAME", "FrontTarget", "SimTarget"]

#: The name every embedded reference device gets on its target's own bus.
DEVICE_NAME = "vdpa0"


class FrontTarget(Target):
    """A parent from :meth:`_new_parent` behind a fresh :class:`VhostVdpa` per open.

    ``registry`` is the process memory the device resolves user addresses in (its "mm"); the
    default is the process-wide one, like a kernel device reaching any mapping of its opener.
    """

    def __init__(self, name: str, kind: str, *, registry: MemoryRegistry | None = None) -> None:
        super().__init__(name, kind)
        self._registry = registry if registry is not None else default_registry()
        self._front: VhostVdpa | None = None

    @abc.abstractmethod
    def _new_parent(self) -> object:
        """A device for one open (ValueError when its attributes are refused)."""

    def _open_channel(self) -> Channel:
        parent = self._new_parent()
        try:
            if not isinstance(parent, VdpaParent):
                raise ValueError(f"target {self.name}: got a {type(parent).__name__}, not a VdpaParent")
            try:
                self._front = VhostVdpa(parent, self._registry)
            except (TypeError, ValueError) as error:
                raise ValueError(f"target {self.name}: the parent cannot be opened: {error}") from error
        except BaseException:
            self._after_close()
            raise
        return self._front

    def open_again(self) -> None:
        """A second open of the device while this one holds it (closed at once if it succeeds)."""
        if self._front is None or self._front.closed:
            raise OSError(errno.EBADF, f"target {self.name} is not open")
        VhostVdpa(self._front.parent, self._registry).close()

    def service(self) -> int:
        """Drain the kick eventfds and kick those queues now (VhostVdpa.poll_kicks, no waiting).

        A kick has no answer a driver could read (it is an eventfd write), so whatever goes wrong
        while the device processes one is the device dying: :class:`TargetDied`, never the parent's
        own exception, which would read as a crash of the suite. So is a front closed while the
        client still holds it (the file went away under the driver).
        """
        front = self._front
        if front is None:
            return 0
        if front.closed:
            if self._client is not None and not self._client.closed:
                raise TargetDied("kick processing", "the vhost-vdpa file was closed under the driver", errno.EBADF)
            return 0
        try:
            return front.poll_kicks(0)
        except Exception as error:  # the parent's kick_vq raised: nothing a live device does
            raise TargetDied("kick processing", f"{type(error).__name__}: {error}",
                             getattr(error, "errno", None)) from error

    def _make_memory(self, size: int, gpa: int) -> GuestMemory:
        memory = GuestMemory(size, gpa, register=False)
        self._registry.add(memory)
        return memory


class SimTarget(FrontTarget):
    """``sim-net`` / ``sim-blk``: the reference device made by its management device on a private bus."""

    def __init__(self, spec: TargetSpec, *, registry: MemoryRegistry | None = None) -> None:
        super().__init__(str(spec), spec.kind, registry=registry)
        self._bus = VdpaBus()
        self._bus.register_mgmtdev(default_bus().mgmtdev(spec.kind))
        self._attrs = dict(spec.attrs)
        self._open()

    def _new_parent(self) -> object:
        try:
            return self._bus.dev_add(DEVICE_NAME, self.kind, **self._attrs).parent
        except OSError as error:
            raise ValueError(f"target {self.name}: {self.kind} refused the attributes: {error.strerror}") from error

    def _after_close(self) -> None:
        try:
            self._bus.dev_del(DEVICE_NAME)
        except OSError as error:
            if error.errno != errno.ENODEV:  # never added: nothing to delete
                raise
