"""Targets: the devices a run certifies, opened from a ``--target`` string behind one interface."""

from vdpacert.conformance.targets.base import Target, close_shared_targets, make_target, shared_target
from vdpacert.conformance.targets.spec import TargetSpec, parse_target

__all__ = ["Target", "TargetSpec", "close_shared_targets", "make_target", "parse_target", "shared_target"]
