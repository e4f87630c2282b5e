"""Apply a :class:`~vdpacert.migration.state.DeviceState` to a destination device: every check first.

The destination is probed with GET ioctls (:meth:`DestinationInfo.probe`) and the state validated
against it before anything is sent, so a state the destination cannot take is a
:class:`~vdpacert.migration.state.StateError` with nothing applied. Then, in order:

1. SET_OWNER; status 0 (a reset, so nothing a previous user left survives); SET_BACKEND_FEATURES;
   the VMM maps guest memory (after the reset: without IOTLB_PERSIST a reset drops the maps);
2. ACKNOWLEDGE|DRIVER, SET_FEATURES, FEATURES_OK, read back (a refusal is a RestoreError);
   every queue's group read back and compared with the source's (a queue in another group would
   translate through another address space); SET_GROUP_ASID per saved pair when the destination
   has more than one address space;
3. per queue NUM, ADDR, BASE (rewound to the used position when ``rewind_inflight``, so chains the
   source took and never used are taken again; or as the caller's ``bases`` says), KICK, CALL, and
   ENABLE -- except that with VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK the data queues wait (QEMU's
   order: the controlq runs first, so replayed commands land before any traffic);
4. DRIVER_OK, read back; the net control replay (the VMM's control-queue commands); GET_CONFIG
   compared byte for byte with the saved config; the deferred enables; RESUME when it was acked
   (a no-op on a device that was never suspended, and on one that was it restarts processing).

Any failure after SET_OWNER is a :class:`~vdpacert.migration.state.RestoreError` naming the step,
and the destination is reset (status 0) before it is raised, so it is left clean for a retry or
for the source to carry on alone.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from typing import Final, Protocol

from vdpacert.conformance.client import TargetDied, VhostClient
from vdpacert.migration.state import (
    DestinationInfo,
    DeviceState,
    NetState,
    RestoreError,
    VringState,
    control_queue,
    in_flight_count,
    rewound_base,
    validate,
)
from vdpacert.migration.svq import SvqError
from vdpacert.uapi import vhost_types as T  # noqa: N812
from vdpacert.uapi.virtio_config import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
)

__all__ = ["RestoreOps", "restore_base", "restore_device_state"]

ACK_DRIVER: Final = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
FEATURES_OK: Final = ACK_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK
DRIVER_OK: Final = FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK


class RestoreOps(Protocol):
    """The destination VMM (migration/vmm.py): named vhost calls with positional arguments, plus two VMM jobs.

    ``client`` serves the GET probes. :meth:`map_guest_memory` sends the IOTLB updates of the VMM's
    guest memory; :meth:`replay_net_state` sends control-queue commands that rebuild ``net`` on the
    running destination.
    """

    @property
    def client(self) -> VhostClient: ...
    def set_owner(self) -> None: ...
    def set_status(self, status: int, /) -> None: ...
    def get_status(self) -> int: ...
    def get_backend_features(self) -> int: ...
    def set_backend_features(self, features: int, /) -> None: ...
    def get_features(self) -> int: ...
    def set_features(self, features: int, /) -> None: ...
    def set_vring_num(self, index: int, num: int, /) -> None: ...
    def set_vring_base(self, index: int, num: int, /) -> None: ...
    def set_vring_addr(self, index: int, desc: int, avail: int, used: int, /) -> None: ...
    def set_vring_kick(self, index: int, fd: int, /) -> None: ...
    def set_vring_call(self, index: int, fd: int, /) -> None: ...
    def set_vring_enable(self, index: int, enable: bool, /) -> None: ...
    def set_group_asid(self, group: int, asid: int, /) -> None: ...
    def resume(self) -> None: ...
    def map_guest_memory(self) -> None: ...
    def replay_net_state(self, net: NetState, /) -> None: ...


def restore_base(vring: VringState, packed: bool, rewind_inflight: bool) -> int:
    """The SET_VRING_BASE value a destination gets: rewound over in-flight chains when asked to, else as saved."""
    if rewind_inflight and in_flight_count(vring, packed):
        return rewound_base(vring, packed)
    return vring.base


def restore_device_state(ops: RestoreOps, state: DeviceState, *, kick_fds: Mapping[int, int],
                         call_fds: Mapping[int, int], rewind_inflight: bool = True,
                         bases: Mapping[int, int] | None = None) -> None:
    """Apply ``state`` to the device behind ``ops`` (see the module docstring).

    ``bases`` overrides the SET_VRING_BASE of some queues (a shadowed queue whose VMM resubmits the
    in-flight chains itself resumes from the saved base, a direct one from the rewound base); each
    must be one of those two values, so no override can lose or repeat a chain. Queues not in it
    follow ``rewind_inflight``.

    StateError (the state does not fit) and ValueError (an eventfd missing for a saved queue, a bad
    override) come before any state change; RestoreError after one, with the destination reset.
    """
    try:
        destination = DestinationInfo.probe(ops.client)
    except OSError as error:
        raise RestoreError("probe", error.errno, f"a GET ioctl was refused ({error}); nothing was changed") from error
    validate(state, destination)
    for vring in state.vrings:
        for name, fds in (("kick_fds", kick_fds), ("call_fds", call_fds)):
            if vring.index not in fds:
                raise ValueError(f"{name} has no eventfd for queue {vring.index}")
    chosen = {vring.index: restore_base(vring, state.packed, rewind_inflight) for vring in state.vrings}
    for index, base in (bases or {}).items():
        if index not in chosen:
            raise ValueError(f"bases names queue {index}, which is not in the state")
        vring = state.vring(index)
        allowed = {vring.base, rewound_base(vring, state.packed)}
        if base not in allowed:
            raise ValueError(f"bases[{index}] = {base:#x} is neither the saved base nor the rewound one "
                             f"({', '.join(hex(b) for b in sorted(allowed))})")
        chosen[index] = base
    _Restore(ops, state, destination, kick_fds, call_fds, chosen).run()


def _step(step: str, action: Callable[[], object]) -> None:
    """Run one step; the destination refusing it (an errno, or its VMM finding the state unusable) is a RestoreError.

    ValueError / LookupError / SvqError are how the VMM layer refuses what it cannot apply (a ring outside guest
    memory, a saved index the guest's ring contradicts); an AssertionError is a bug of ours and stays one.
    """
    try:
        action()
    except OSError as error:
        raise RestoreError(step, error.errno, error.strerror or str(error)) from error
    except (ValueError, LookupError, SvqError) as error:
        raise RestoreError(step, None, f"{type(error).__name__}: {error}") from error


class _Restore:
    """One restore run: the steps in order, with the reset on failure."""

    def __init__(self, ops: RestoreOps, state: DeviceState, destination: DestinationInfo,
                 kick_fds: Mapping[int, int], call_fds: Mapping[int, int], bases: Mapping[int, int]) -> None:
        self.ops, self.state, self.destination = ops, state, destination
        self.kick_fds, self.call_fds = kick_fds, call_fds
        self.bases = bases

    def run(self) -> None:
        _step("VHOST_SET_OWNER", self.ops.set_owner)  # refused: we own nothing, so there is nothing to undo
        try:
            self._apply()
        except BaseException:
            self._reset()
            raise

    def _reset(self) -> None:
        # Best effort: the error being raised is the one that matters, and a dead device needs no reset.
        with contextlib.suppress(OSError, TargetDied):
            self.ops.set_status(0)

    def _apply(self) -> None:
        ops, state = self.ops, self.state
        self._set_status(0)
        _step("VHOST_SET_BACKEND_FEATURES", lambda: ops.set_backend_features(state.backend_features))
        _step("map_guest_memory", ops.map_guest_memory)
        self._set_status(ACK_DRIVER)
        _step("VHOST_SET_FEATURES", lambda: ops.set_features(state.features))
        self._set_status(FEATURES_OK)
        self._check_groups()
        if self.destination.nas > 1:
            for group, asid in state.group_asid:
                _step(f"VHOST_VDPA_SET_GROUP_ASID group {group}", functools.partial(ops.set_group_asid, group, asid))
        deferred = self._setup_vrings()
        self._set_status(DRIVER_OK)
        if state.net is not None:
            _step("replay_net_state", functools.partial(ops.replay_net_state, state.net))
        self._check_config()
        for index in deferred:
            _step(f"VHOST_VDPA_SET_VRING_ENABLE {index}", functools.partial(ops.set_vring_enable, index, True))
        if state.backend_features >> T.VHOST_BACKEND_F_RESUME & 1:
            _step("VHOST_VDPA_RESUME", ops.resume)
        self._check_running()

    def _check_running(self) -> None:
        """The restored device runs: a device that found the state unusable (a saved ring it cannot walk, an
        index its ring contradicts) says so with DEVICE_NEEDS_RESET (§2.1.2), and a restore is not done then."""
        try:
            got = self.ops.get_status()
        except OSError as error:
            raise RestoreError("VHOST_VDPA_GET_STATUS", error.errno, error.strerror or str(error)) from error
        if got != DRIVER_OK:
            raise RestoreError("VHOST_VDPA_GET_STATUS", None, f"status reads {got:#x} once restored, not "
                                                             f"{DRIVER_OK:#x}: the device cannot run this state")

    def _set_status(self, status: int) -> None:
        step = f"VHOST_VDPA_SET_STATUS {status:#x}"
        _step(step, lambda: self.ops.set_status(status))
        try:
            got = self.ops.get_status()
        except OSError as error:
            raise RestoreError("VHOST_VDPA_GET_STATUS", error.errno, error.strerror or str(error)) from error
        if got != status:
            why = (f"the destination refused features {self.state.features:#x}" if status == FEATURES_OK
                   else "the destination did not take it")
            raise RestoreError(step, None, f"status reads back {got:#x}: {why}")

    def _check_groups(self) -> None:
        client = self.ops.client
        for vring in self.state.vrings:
            step = f"VHOST_VDPA_GET_VRING_GROUP {vring.index}"
            try:
                group = client.get_vring_group(vring.index)
            except OSError as error:
                raise RestoreError(step, error.errno, error.strerror or str(error)) from error
            if group != vring.group:
                raise RestoreError(step, None, f"queue {vring.index} is in group {group} on the destination, "
                                               f"in group {vring.group} at the source")

    def _setup_vrings(self) -> list[int]:
        """Set every saved queue up; enable it now, or return it among those to enable after DRIVER_OK."""
        ops, state = self.ops, self.state
        later = bool(state.backend_features >> T.VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK & 1)
        cvq = control_queue(state.features, state.config, state.device_id)
        deferred = []
        for vring in state.vrings:
            index = vring.index
            base = self.bases[index]
            for step, call in (
                    ("VHOST_SET_VRING_NUM", functools.partial(ops.set_vring_num, index, vring.num)),
                    ("VHOST_SET_VRING_ADDR", functools.partial(ops.set_vring_addr, index, vring.desc, vring.avail,
                                                               vring.used)),
                    ("VHOST_SET_VRING_BASE", functools.partial(ops.set_vring_base, index, base)),
                    ("VHOST_SET_VRING_KICK", functools.partial(ops.set_vring_kick, index, self.kick_fds[index])),
                    ("VHOST_SET_VRING_CALL", functools.partial(ops.set_vring_call, index, self.call_fds[index]))):
                _step(f"{step} {index}", call)
            if not vring.enabled:
                continue
            if later and index != cvq:
                deferred.append(index)
            else:
                _step(f"VHOST_VDPA_SET_VRING_ENABLE {index}", functools.partial(ops.set_vring_enable, index, True))
        return deferred

    def _check_config(self) -> None:
        saved = self.state.config
        if not saved:
            return
        try:
            got = self.ops.client.get_config(0, len(saved))
        except OSError as error:
            raise RestoreError("VHOST_VDPA_GET_CONFIG", error.errno, error.strerror or str(error)) from error
        differ = [offset for offset in range(len(saved)) if offset >= len(got) or got[offset] != saved[offset]]
        if differ:
            raise RestoreError("VHOST_VDPA_GET_CONFIG", None, f"config space differs from the source's at byte "
                                                              f"offsets {_ranges(differ)}")


def _ranges(offsets: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``0-2, 5``."""
    runs: list[list[int]] = []
    for offset in offsets:
        if runs and runs[-1][1] == offset - 1:
            runs[-1][1] = offset
        else:
            runs.append([offset, offset])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)
