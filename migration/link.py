"""The migration link: set bandwidth and latency over a simulated clock, with real bytes crossing it.

A migration's timing (how long an iteration takes, whether the rest fits the downtime target) is a
function of the link, not of how fast this machine copies, so time here is a :class:`SimClock` that
only moves when something says how long it took: :meth:`Link.send` advances it by the message's
serialization time (``len / bandwidth``) plus the one-way latency. Messages are sent one at a time and
each is delivered before the next leaves (a stop-and-wait link), so every message pays the latency
once; :meth:`Link.transfer_time` gives the same figure for planning without sending anything.

The bytes are real: ``send`` returns a new copy of the payload, which is what the receiver applies,
so a fault on the link (:meth:`Link.corrupt_next`, :meth:`Link.drop`) reaches the receiver exactly
as it would over a wire, and the sender's buffer is never the receiver's.
"""

from __future__ import annotations

import math

__all__ = ["Link", "LinkDropped", "SimClock"]


class SimClock:
    """Simulated time in seconds; it moves only by :meth:`advance`."""

    def __init__(self, now: float = 0.0) -> None:
        if not math.isfinite(now) or now < 0:
            raise ValueError(f"a clock starts at a finite time >= 0, not {now!r}")
        self.now = float(now)

    def advance(self, seconds: float) -> None:
        """Move time forward; time never runs backwards, so a negative or non-finite step is a ValueError."""
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"a clock advances by a finite time >= 0, not {seconds!r}")
        self.now += seconds

    def __repr__(self) -> str:
        return f"SimClock(now={self.now!r})"


class LinkDropped(Exception):
    """The link went down: nothing sent after :meth:`Link.drop` arrives (not an OSError: no device refused anything)."""


class Link:
    """A one-way link from the source to the destination (module docstring).

    ``bytes_sent`` and ``messages`` count what was delivered; ``corrupted`` counts messages a
    :meth:`corrupt_next` fault changed.
    """

    def __init__(self, clock: SimClock, bandwidth_bytes_s: float, latency_s: float) -> None:
        if not math.isfinite(bandwidth_bytes_s) or bandwidth_bytes_s <= 0:
            raise ValueError(f"bandwidth must be a finite number of bytes per second > 0, not {bandwidth_bytes_s!r}")
        if not math.isfinite(latency_s) or latency_s < 0:
            raise ValueError(f"latency must be a finite number of seconds >= 0, not {latency_s!r}")
        self.clock = clock
        self.bandwidth_bytes_s = float(bandwidth_bytes_s)
        self.latency_s = float(latency_s)
        self.bytes_sent = 0
        self.messages = 0
        self.corrupted = 0
        self.dropped = False
        self._corrupt_at: int | None = None
        self._corrupt_armed = False

    def transfer_time(self, nbytes: int, messages: int = 1) -> float:
        """Seconds that sending ``nbytes`` in ``messages`` messages would take (each message pays the latency)."""
        if nbytes < 0 or messages < 0:
            raise ValueError(f"cannot send {nbytes} bytes in {messages} messages")
        return nbytes / self.bandwidth_bytes_s + messages * self.latency_s

    def send(self, payload: bytes | bytearray | memoryview) -> bytes:
        """Deliver one message: the clock moves by its transfer time; returns the receiver's copy.

        Raises :class:`LinkDropped` (and takes no time: the sender learns at once) once the link is dropped.
        """
        if self.dropped:
            raise LinkDropped(f"the link is down ({self.messages} messages, {self.bytes_sent} bytes got through)")
        # tobytes() always makes a new object, where bytes(b) would hand back the sender's own buffer.
        delivered = memoryview(payload).cast("B").tobytes()
        if self._corrupt_armed and delivered:
            delivered = self._corrupt(delivered)
        self.clock.advance(self.transfer_time(len(delivered)))
        self.bytes_sent += len(delivered)
        self.messages += 1
        return delivered

    def drop(self) -> None:
        """Take the link down for good: every later :meth:`send` raises :class:`LinkDropped`."""
        self.dropped = True

    def corrupt_next(self, offset: int | None = None) -> None:
        """Invert one byte of the next non-empty message: at ``offset`` (modulo its length), else its middle one."""
        if offset is not None and offset < 0:
            raise ValueError(f"a byte offset is >= 0, not {offset}")
        self._corrupt_at = offset
        self._corrupt_armed = True

    def _corrupt(self, data: bytes) -> bytes:
        at = len(data) // 2 if self._corrupt_at is None else self._corrupt_at % len(data)
        changed = bytearray(data)
        changed[at] ^= 0xFF
        self._corrupt_armed = False
        self._corrupt_at = None
        self.corrupted += 1
        return bytes(changed)

    def __repr__(self) -> str:
        state = "dropped" if self.dropped else "up"
        return (f"Link({self.bandwidth_bytes_s:.0f} B/s, {self.latency_s * 1000:g} ms, {state}, "
                f"{self.messages} messages, {self.bytes_sent} bytes)")
