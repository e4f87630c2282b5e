"""The built-in suite: the machines every certification run executes, registered on import.

``control`` runs on every device; ``datapath.net`` and ``datapath.blk`` on their device type.

Each entry binds a machine to the open target. The lockstep machines keep their clause counts
on a :class:`~vdpacert.conformance.lockstep.Lockstep` shared by every example of a run (it also
carries the probed device spec), so the per-example ``exercised``, ``quirks`` and ``warned`` the runner
reads are the differences since the example began, never the running totals.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from vdpacert.conformance.machines.control import ControlMachine, control_machine
from vdpacert.conformance.machines.datapath_blk import blk_machine
from vdpacert.conformance.machines.datapath_net import net_machine
from vdpacert.conformance.suite import SuiteEntry, register
from vdpacert.uapi.virtio_ids import VIRTIO_ID_BLOCK, VIRTIO_ID_NET

if TYPE_CHECKING:
    from hypothesis.stateful import RuleBasedStateMachine

    from vdpacert.conformance.profiles import RunProfile
    from vdpacert.conformance.targets import Target


def _per_example(machine: type[ControlMachine]) -> type[RuleBasedStateMachine]:
    class PerExample(machine):  # type: ignore[valid-type, misc]
        def __init__(self) -> None:
            super().__init__()
            self._counted_before = Counter(self.lockstep.exercised)
            self._quirks_before = Counter(self.lockstep.quirk_hits)
            self._warnings_before = len(self.lockstep.warnings)

        @property
        def exercised(self) -> Counter[str]:
            total: Counter[str] = self.lockstep.exercised
            return total - self._counted_before

        @property
        def quirks(self) -> Counter[tuple[str, str]]:
            total: Counter[tuple[str, str]] = self.lockstep.quirk_hits
            return total - self._quirks_before

        @property
        def warned(self) -> list[tuple[str, str]]:
            warnings: list[tuple[str, str]] = self.lockstep.warnings
            return warnings[self._warnings_before:]

    PerExample.__name__ = PerExample.__qualname__ = machine.__name__
    return PerExample


def build_control(target: Target, run_profile: RunProfile) -> type[RuleBasedStateMachine]:
    """The control path: every vhost-vdpa operation applied to the model and the target in lockstep."""
    del run_profile  # example counts come from the runner's settings
    return _per_example(control_machine(target))


def build_datapath_net(target: Target, run_profile: RunProfile) -> type[RuleBasedStateMachine]:
    """virtio-net traffic against the model's loopback: order, headers, drops, control commands."""
    del run_profile
    return net_machine(target.name)  # the machine opens its own target from the same spec


def build_datapath_blk(target: Target, run_profile: RunProfile) -> type[RuleBasedStateMachine]:
    """virtio-blk requests against the model's disk: status, data, capacity, discard and write zeroes."""
    del run_profile
    return blk_machine(target.name)


CONTROL = register(SuiteEntry("control", None, build_control))
DATAPATH_NET = register(SuiteEntry("datapath.net", frozenset({VIRTIO_ID_NET}), build_datapath_net))
DATAPATH_BLK = register(SuiteEntry("datapath.blk", frozenset({VIRTIO_ID_BLOCK}), build_datapath_blk))
