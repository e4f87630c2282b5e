"""The driver side of the conformance suite: guest memory, rings, traffic and bring-up, written from the spec.

The suite is a virtio *driver* facing a device it does not trust. The modules here build what a
driver builds (a guest-memory layout with canaries, split and packed rings, net frames and blk
requests, the vhost bring-up sequence) and check everything the device hands back. Anything the
device gets wrong surfaces as one of the exceptions below, so a test fails naming what broke
instead of hanging or reading garbage:

- :class:`DeviceViolation`: the device broke a rule of the model's catalog (``clause`` is its id);
- :class:`DeviceTimeout`: the device did not answer within the wait's deadline;
- :class:`BringUpError`: the standard initialisation sequence did not complete.

Submodules: :mod:`.memory`, :mod:`.split`, :mod:`.packed`, :mod:`.traffic`, :mod:`.device`.
This package imports nothing from them, so each may import these exceptions freely.
"""

from __future__ import annotations

import functools

from vdpacert.model import rules


@functools.cache
def _rule_ids() -> frozenset[str]:
    return frozenset(rules.by_id())


class DeviceFailure(Exception):
    """Something the device under test did (or failed to do) that a conforming device would not."""


class DeviceViolation(DeviceFailure):
    """The device broke the model rule ``clause`` (an id of :func:`vdpacert.model.rules.catalog`).

    An unknown id is a bug of the harness, not of the device: ValueError at construction.
    """

    def __init__(self, clause: str, message: str) -> None:
        if clause not in _rule_ids():
            raise ValueError(f"{clause!r} is not a rule id of the model's catalog")
        super().__init__(f"[{clause}] {message}")
        self.clause = clause
        self.message = message


class DeviceTimeout(DeviceFailure):
    """A wait for the device ran out: ``what`` was still missing after ``timeout`` seconds."""

    def __init__(self, what: str, timeout: float) -> None:
        super().__init__(f"device did not answer within {timeout:g} s: {what}")
        self.what = what
        self.timeout = timeout


class BringUpError(DeviceFailure):
    """The initialisation sequence stopped at ``step`` (an ioctl error, or a status the device refused)."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"bring-up failed at {step}: {message}")
        self.step = step
        self.message = message


__all__ = ["BringUpError", "DeviceFailure", "DeviceTimeout", "DeviceViolation"]
