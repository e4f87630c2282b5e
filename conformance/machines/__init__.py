"""Hypothesis state machines that drive the model and a target in lockstep."""

from vdpacert.conformance.machines.control import ControlMachine, control_machine

__all__ = ["ControlMachine", "control_machine"]
