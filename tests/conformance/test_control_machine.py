"""The control-path state machine against the embedded reference devices, and against a buggy parent.

The machine drives the model and the target in lockstep (conformance/machines/control.py); a clean
run on sim-net and sim-blk means every answer and observable agreed with the model, modulo the quirks
the reference front declares (counted, not hidden). A parent that keeps FEATURES_OK for a set
breaking a MUST rule must be caught, naming the rule.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from vdpacert.conformance.lockstep import ClauseViolation
from vdpacert.conformance.machines import control_machine
from vdpacert.conformance.targets import Target, make_target
from vdpacert.impl.features import broken_dependencies
from vdpacert.impl.sim_net import SimNet
from vdpacert.uapi.virtio_config import VIRTIO_CONFIG_S_FEATURES_OK

SETTINGS = settings(max_examples=30, stateful_step_count=30, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.fixture(params=["sim-net", "sim-blk"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    with make_target(request.param) as opened:
        yield opened


def test_control_machine_runs_clean(target: Target) -> None:
    machine = control_machine(target)
    run_state_machine_as_test(machine, settings=SETTINGS)
    ls = machine.lockstep
    assert ls.steps > 100
    # Both sides of the main rules were reached.
    for clause in ("vhost_vdpa.owner.required", "status.device.reset_clears", "vhost_vdpa.vring.index",
                   "vhost_vdpa.msg.failed", "suite.lockstep.status", "suite.lockstep.vq_state"):
        assert ls.exercised[clause], clause
    unchecked = "vhost_vdpa.invalidate_range_unchecked"
    assert set(ls.quirk_hits) <= {("vhost_vdpa.vring_num.bounds", "vhost_vdpa.vring_num_bounds_unchecked"),
                                  ("iotlb.invalidate.size_zero", unchecked), ("iotlb.invalidate.wraps", unchecked)}


# ----- a seeded bug -------------------------------------------------------------------------------

class LaxFeaturesNet(SimNet):
    """A buggy parent: FEATURES_OK sticks although a negotiated feature lacks one it requires."""

    def set_status(self, status: int) -> None:
        super().set_status(status)
        if status & VIRTIO_CONFIG_S_FEATURES_OK and broken_dependencies(self.device_id, self.features):
            self._status |= VIRTIO_CONFIG_S_FEATURES_OK  # the bug: the dependency check is skipped


def test_a_parent_accepting_a_broken_dependency_is_caught() -> None:
    with make_target(f"python:{__name__}:LaxFeaturesNet") as target:
        machine = control_machine(target)
        with pytest.raises(ClauseViolation) as caught:
            run_state_machine_as_test(machine, settings=settings(SETTINGS, max_examples=200, derandomize=True,
                                                                  phases=[Phase.generate]))  # no shrinking: fast
    assert caught.value.clause_id == "status.device.refuse_invalid_features"
    assert "FEATURES_OK stuck" in caught.value.message
