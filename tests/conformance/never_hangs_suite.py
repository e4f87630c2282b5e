"""A one-machine suite (``--suite never_hangs_suite``): the built-in net datapath machine alone.

The datapath machine is where the suite waits on a device (used entries, call eventfds, kicks), so
it is what ``test_never_hangs`` runs against devices that never answer or die; the control machine
adds nothing to that and only lengthens the run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vdpacert.conformance.machines.datapath_net import net_machine
from vdpacert.conformance.suite import SuiteEntry, register
from vdpacert.uapi.virtio_ids import VIRTIO_ID_NET

if TYPE_CHECKING:
    from hypothesis.stateful import RuleBasedStateMachine

    from vdpacert.conformance.profiles import RunProfile
    from vdpacert.conformance.targets import Target


def build(target: Target, run_profile: RunProfile) -> type[RuleBasedStateMachine]:
    del run_profile
    return net_machine(target.name)


DATAPATH_NET = register(SuiteEntry("datapath.net", frozenset({VIRTIO_ID_NET}), build))
