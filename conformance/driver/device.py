"""Bring a device up through its vhost client and drive its queues, never waiting without a deadline.

:class:`DriverSession` is the suite's driver for one device: given a client that speaks the vhost
UAPI by name (``conformance/client.py``'s ``VhostClient``, or anything with the same named methods),
a :class:`~vdpacert.conformance.driver.memory.GuestLayout` and the features to negotiate, it

1. runs the standard initialisation (virtio v1.3 §3.1.1 through vhost): SET_OWNER, reset (status
   0, before the map: without IOTLB_PERSIST a reset drops it), backend features, one IOTLB UPDATE
   mapping the whole layout (IOVA -> uaddr, RW), ACKNOWLEDGE|DRIVER, SET_FEATURES, FEATURES_OK and
   its re-read, then per queue SET_VRING_NUM / BASE / ADDR / KICK / CALL / ENABLE, and DRIVER_OK
   (every status write is read back);
2. drives traffic (net frames, blk requests) through split or packed rings, kicking through
   the kick eventfds and calling ``service`` (an embedded target's hook that processes the kicks);
   each kick is read against the model's row for available buffer notifications, and a
   :class:`KickObserver` may have it sent late or not at all; the call eventfds are read per queue
   (:meth:`DriverSession.notified`);
3. waits for used entries against a deadline: a device that never answers is a
   :class:`~vdpacert.conformance.driver.DeviceTimeout`, never a hang.

A failed ioctl or a refused status during bring-up is a
:class:`~vdpacert.conformance.driver.BringUpError` naming the step.
"""

from __future__ import annotations

import enum
import os
import select
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from vdpacert.conformance.driver import BringUpError, DeviceTimeout
from vdpacert.conformance.driver.memory import GuestLayout
from vdpacert.conformance.driver.packed import PackedRing
from vdpacert.conformance.driver.split import Chain, SplitRing, Used
from vdpacert.conformance.driver.traffic import RX_BUF, BlkRequest, Frame, net_hdr, parse_frame
from vdpacert.model.notify import NotifyRule
from vdpacert.uapi import vhost_types as T  # noqa: N812
from vdpacert.uapi import virtio_net as N  # noqa: N812
from vdpacert.uapi.virtio_config import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_IN_ORDER,
    VIRTIO_F_RING_PACKED,
)
from vdpacert.uapi.virtio_ring import VIRTIO_RING_F_EVENT_IDX

ACK_DRIVER = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
FEATURES_OK = ACK_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK
DRIVER_OK = FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK
#: Backend features the session asks for (each only if offered); IOTLB_MSG_V2 is required.
WANTED_BACKEND = sum(1 << bit for bit in (T.VHOST_BACKEND_F_IOTLB_MSG_V2, T.VHOST_BACKEND_F_IOTLB_BATCH,
                                          T.VHOST_BACKEND_F_SUSPEND, T.VHOST_BACKEND_F_RESUME))
DEFAULT_TIMEOUT = 2.0
_POLL_SLICE = 0.005  # seconds to sleep on the call eventfds between looks at the ring

Ring = SplitRing | PackedRing


class VhostOps(Protocol):
    """The named vhost methods the session uses (positional parameters, so any spelling of them fits)."""

    def set_owner(self) -> None: ...
    def get_backend_features(self) -> int: ...
    def set_backend_features(self, features: int, /) -> None: ...
    def get_features(self) -> int: ...
    def set_features(self, features: int, /) -> None: ...
    def get_status(self) -> int: ...
    def set_status(self, status: int, /) -> None: ...
    def set_vring_num(self, index: int, num: int, /) -> None: ...
    def set_vring_base(self, index: int, num: int, /) -> None: ...
    def set_vring_addr(self, index: int, desc: int, avail: int, used: int, /, *, flags: int = 0,
                       log_guest_addr: int = 0) -> None: ...
    def set_vring_kick(self, index: int, fd: int, /) -> None: ...
    def set_vring_call(self, index: int, fd: int, /) -> None: ...
    def set_vring_enable(self, index: int, enable: bool, /) -> None: ...
    def iotlb_update(self, iova: int, size: int, uaddr: int, perm: int, /, *, asid: int = 0) -> None: ...


class KickChoice(enum.Enum):
    """What the driver does with one kick its caller asked for, given the model's row for it."""

    SEND = "notify now"
    LATE = "let the device run un-notified first, then notify"  # breaks a MUST-notify row on purpose
    SKIP = "do not notify"  # follows a SHOULD-NOT-notify row: the device asked not to be kicked


class KickObserver(Protocol):
    """Told about every kick a session makes, and asked how to make it (see :meth:`DriverSession.kick`)."""

    def choose_kick(self, index: int, rule: NotifyRule) -> KickChoice: ...
    def before_late_kick(self, index: int, rule: NotifyRule) -> None: ...
    def after_kick(self, index: int, rule: NotifyRule, choice: KickChoice) -> None: ...


def net_queues(features: int, pairs: int = 1) -> list[int]:
    """Queue indexes of a net device (§5.1.2): ``pairs`` RX/TX pairs (1 without MQ), then the controlq."""
    pairs = pairs if features >> N.VIRTIO_NET_F_MQ & 1 else 1
    return list(range(2 * pairs)) + ([2 * pairs] if features >> N.VIRTIO_NET_F_CTRL_VQ & 1 else [])


@dataclass(frozen=True)
class BlkCompletion:
    """A blk request as answered: status byte, data-in bytes, the used length, and the request itself."""

    id: int
    status: int
    data: bytes
    length: int
    request: BlkRequest


class DriverSession:
    """The driver of one device: IOTLB map, bring-up, rings with kick/call eventfds, traffic with deadlines.

    ``queues``: the queue indexes to set up (see :func:`net_queues`). ``starts``: per queue, where its
    ring begins (split: the first avail index; packed: the slot in bits 0-14 and the wrap counter in
    bit 15, as in a vring base; a fresh packed ring is 0x8000). ``service``: called after each kick
    and while waiting (an embedded target's kick processing; None for a real kernel).
    """

    def __init__(self, client: VhostOps, layout: GuestLayout, features: int, *, queues: Sequence[int],
                 num: int = 16, starts: Mapping[int, int] | None = None, backend_features: int = WANTED_BACKEND,
                 service: Callable[[], object] | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.client, self.layout, self.features = client, layout, features
        self.queue_indexes = list(queues)
        self.num = num
        self.starts = dict(starts or {})
        self.wanted_backend = backend_features
        self.service = service
        self.timeout = timeout
        self.packed = bool(features >> VIRTIO_F_RING_PACKED & 1)
        self.event_idx = bool(features >> VIRTIO_RING_F_EVENT_IDX & 1)
        self.in_order = bool(features >> VIRTIO_F_IN_ORDER & 1)
        self.backend_features = 0
        self.rings: dict[int, Ring] = {}
        self.kicks: dict[int, int] = {}
        self.calls: dict[int, int] = {}
        self._blk: dict[tuple[int, int], BlkRequest] = {}
        self._fds: list[int] = []
        self.up = False
        #: Chooses how each kick is made and hears about it (None: every kick is sent at once).
        self.kick_observer: KickObserver | None = None

    # ----- bring-up ------------------------------------------------------------------------------------

    def _step(self, step: str, action: Callable[[], object]) -> object:
        try:
            return action()
        except OSError as error:
            raise BringUpError(step, f"{type(error).__name__}: {error}") from error

    def _set_and_check(self, status: int) -> None:
        self._step(f"SET_STATUS {status:#x}", lambda: self.client.set_status(status))
        got = self._step("GET_STATUS", self.client.get_status)
        if got != status:
            raise BringUpError(f"SET_STATUS {status:#x}", f"status reads back {got!r}")

    def _eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._fds.append(fd)
        return fd

    def make_ring(self, index: int) -> Ring:
        """The driver ring for queue ``index`` as this session lays it out (not yet given to the device)."""
        name = f"vq{index}"
        if self.packed:
            start = self.starts.get(index, 0x8000)
            return PackedRing(self.layout, self.num, start=start & 0x7FFF, wrap=start >> 15 & 1,
                              event_idx=self.event_idx, in_order=self.in_order, name=name)
        return SplitRing(self.layout, self.num, start=self.starts.get(index, 0), event_idx=self.event_idx,
                         in_order=self.in_order, name=name)

    def bring_up(self) -> DriverSession:
        """The standard sequence, up to DRIVER_OK; BringUpError at the first step that fails."""
        client = self.client
        self._step("SET_OWNER", client.set_owner)
        self._set_and_check(0)  # reset first: with no IOTLB_PERSIST a reset also drops the device's mappings
        offered = self._step("GET_BACKEND_FEATURES", client.get_backend_features)
        assert isinstance(offered, int)
        self.backend_features = offered & self.wanted_backend
        if not self.backend_features >> T.VHOST_BACKEND_F_IOTLB_MSG_V2 & 1:
            raise BringUpError("GET_BACKEND_FEATURES", f"IOTLB_MSG_V2 not offered (backend features {offered:#x})")
        self._step("SET_BACKEND_FEATURES", lambda: client.set_backend_features(self.backend_features))
        layout = self.layout
        self._step("IOTLB_UPDATE", lambda: client.iotlb_update(layout.iova_base, layout.size, layout.uaddr_base,
                                                               T.VHOST_ACCESS_RW))
        self._set_and_check(ACK_DRIVER)
        device_features = self._step("GET_FEATURES", client.get_features)
        assert isinstance(device_features, int)
        if self.features & ~device_features:
            raise BringUpError("GET_FEATURES", f"wanted features {self.features & ~device_features:#x} not offered")
        self._step("SET_FEATURES", lambda: client.set_features(self.features))
        self._set_and_check(FEATURES_OK)
        for index in self.queue_indexes:
            self.add_queue(index)
        self._set_and_check(DRIVER_OK)
        self.up = True
        return self

    def add_queue(self, index: int, ring: Ring | None = None) -> Ring:
        """Lay out (or take) a ring and hand it to the device: NUM, BASE, ADDR, KICK, CALL, ENABLE."""
        ring = self.make_ring(index) if ring is None else ring
        self.rings[index] = ring
        client = self.client
        desc, driver_area, device_area = ring.addresses
        self._step(f"SET_VRING_NUM {index}", lambda: client.set_vring_num(index, ring.num))
        self._step(f"SET_VRING_BASE {index}", lambda: client.set_vring_base(index, ring.base))
        self._step(f"SET_VRING_ADDR {index}", lambda: client.set_vring_addr(index, desc, driver_area, device_area))
        self.kicks[index], self.calls[index] = self._eventfd(), self._eventfd()
        self._step(f"SET_VRING_KICK {index}", lambda: client.set_vring_kick(index, self.kicks[index]))
        self._step(f"SET_VRING_CALL {index}", lambda: client.set_vring_call(index, self.calls[index]))
        self._step(f"SET_VRING_ENABLE {index}", lambda: client.set_vring_enable(index, True))
        return ring

    def move(self, client: VhostOps, service: Callable[[], object] | None, fds: Mapping[int, tuple[int, int]]) -> None:
        """Carry on with another device (a migration's destination), notified through ``fds``.

        The rings, outstanding chains and positions stay as they are: they live in guest memory and
        in this driver, which is what a migration moves. ``fds`` gives every queue its new (kick,
        call) eventfds, already handed to the new device; the session owns them from now on and
        closes the old ones.
        """
        if set(fds) != set(self.rings):
            raise ValueError(f"eventfds for queues {sorted(fds)}, the session has {sorted(self.rings)}")
        old, self._fds = self._fds, []
        self.client, self.service = client, service
        for index, (kick, call) in fds.items():
            self.kicks[index], self.calls[index] = kick, call
            self._fds += [kick, call]
        for fd in old:
            os.close(fd)

    def close(self) -> None:
        """Reset the device (so it lets go of the memory), free the rings, close our eventfds.

        A dead device (TargetDied from the reset) still gets everything of ours released, then
        the death is passed on: it is a verdict the caller reports.
        """
        try:
            if self.up:
                self.client.set_status(0)
        except OSError:
            pass
        finally:
            self.up = False
            for ring in self.rings.values():
                ring.close()
            self.rings.clear()
            for fd in self._fds:
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> DriverSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- notifications -------------------------------------------------------------------------------

    def kick(self, index: int) -> None:
        """The driver's notification: write the queue's kick eventfd, then let the target service it.

        The ring reads the model's row for this notification (what was published since the last
        decision, against the device's suppression) and the decision point moves here. A
        :attr:`kick_observer` may have the kick sent late (the device is serviced un-notified first)
        or not at all (the device asked not to be notified); without one it is always sent.
        """
        ring = self.rings[index]
        rule = ring.avail_notification()
        ring.notification_decided()
        observer = self.kick_observer
        choice = KickChoice.SEND if observer is None else observer.choose_kick(index, rule)
        if observer is not None and choice is KickChoice.LATE:
            self.pump()
            observer.before_late_kick(index, rule)
        if choice is not KickChoice.SKIP:
            os.eventfd_write(self.kicks[index], 1)
        self.pump()
        if observer is not None:
            observer.after_kick(index, rule, choice)

    def pump(self) -> None:
        if self.service is not None:
            self.service()

    def notified(self, index: int) -> int:
        """How many used-buffer notifications queue ``index`` signalled since the last call (drains the eventfd)."""
        try:
            return os.eventfd_read(self.calls[index])
        except BlockingIOError:
            return 0

    def wait_notified(self, index: int, seconds: float) -> int:
        """:meth:`notified`, waiting up to ``seconds`` (servicing the target) for a first signal."""
        deadline = time.monotonic() + seconds
        got = self.notified(index)
        while not got:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.pump()
            self._wait([index], min(_POLL_SLICE, remaining))
            got = self.notified(index)
        return got

    def _wait(self, indexes: Sequence[int], seconds: float) -> None:
        poller = select.poll()
        for index in indexes:
            poller.register(self.calls[index], select.POLLIN)
        poller.poll(max(0, int(seconds * 1000)))

    # ----- reaping -------------------------------------------------------------------------------------

    def reap(self, index: int, count: int = 1, *, timeout: float | None = None) -> list[Used]:
        """At least ``count`` used entries of queue ``index`` (everything there, if more), or DeviceTimeout.

        ``count=0`` looks once and returns what is there. Entries are validated as they are reaped.
        """
        ring = self.rings[index]
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        got = ring.reap()
        while len(got) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeviceTimeout(f"queue {index}: {len(got)} of {count} used entries "
                                    f"({ring.in_flight} chains outstanding)", limit)
            self.pump()
            got += ring.reap()
            if len(got) < count:
                self._wait([index], min(_POLL_SLICE, remaining))
                got += ring.reap()
        return got

    # ----- net ------------------------------------------------------------------------------------------

    @staticmethod
    def rx_queue(pair: int) -> int:
        return 2 * pair

    @staticmethod
    def tx_queue(pair: int) -> int:
        return 2 * pair + 1

    def send_frames(self, pair: int, frames: Sequence[bytes], *, hdr: bytes | None = None, indirect: bool = False,
                    kick: bool = True) -> list[Chain]:
        """Each frame as one TX chain (header buffer, frame buffer), published together, then one kick."""
        header = net_hdr() if hdr is None else hdr
        index = self.tx_queue(pair)
        ring = self.rings[index]
        chains = [ring.add([header, frame], [], indirect=indirect, publish=False) for frame in frames]
        ring.publish()
        if kick:
            self.kick(index)
        return chains

    def post_rx(self, pair: int, count: int, size: int = RX_BUF, *, indirect: bool = False,
                kick: bool = True) -> list[Chain]:
        """``count`` receive buffers of ``size`` device-writable bytes each."""
        index = self.rx_queue(pair)
        ring = self.rings[index]
        chains = [ring.add([], [size], indirect=indirect, publish=False) for _ in range(count)]
        ring.publish()
        if kick:
            self.kick(index)
        return chains

    def receive_frames(self, pair: int, count: int, *, timeout: float | None = None,
                       check_num_buffers: bool = True) -> list[Frame]:
        """Reap ``count`` RX buffers and parse each as header + frame (checked: CRC, header, EtherType)."""
        mrg = bool(self.features >> N.VIRTIO_NET_F_MRG_RXBUF & 1)
        return [parse_frame(used.data, mrg_rxbuf=mrg, check_num_buffers=check_num_buffers)
                for used in self.reap(self.rx_queue(pair), count, timeout=timeout)]

    def tx_done(self, pair: int, count: int, *, timeout: float | None = None) -> list[Used]:
        """Reap ``count`` completed TX chains (len above 0 is already a violation: TX chains have no writable bytes)."""
        return self.reap(self.tx_queue(pair), count, timeout=timeout)

    # ----- blk ------------------------------------------------------------------------------------------

    def blk_submit(self, queue: int, request: BlkRequest, *, indirect: bool = False, kick: bool = True) -> Chain:
        chain = self.rings[queue].add(list(request.readable), list(request.writable), indirect=indirect)
        self._blk[(queue, chain.id)] = request
        if kick:
            self.kick(queue)
        return chain

    def blk_complete(self, queue: int, count: int, *, timeout: float | None = None) -> list[BlkCompletion]:
        """Reap ``count`` answered requests: the status is the chain's last writable byte."""
        out = []
        for used in self.reap(queue, count, timeout=timeout):
            request = self._blk.pop((queue, used.id))
            out.append(BlkCompletion(used.id, used.written[-1], used.written[:request.data_in_len], used.length,
                                     request))
        return out

    def blk_run(self, queue: int, requests: Sequence[BlkRequest], *, indirect: bool = False,
                timeout: float | None = None) -> list[BlkCompletion]:
        """Submit every request, one kick, and return their completions in submission order."""
        chains = [self.blk_submit(queue, request, indirect=indirect, kick=False) for request in requests]
        self.kick(queue)
        done = {c.id: c for c in self.blk_complete(queue, len(chains), timeout=timeout)}
        return [done[chain.id] for chain in chains]
