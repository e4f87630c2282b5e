"""The progress display of ``vdpacert certify``: one bar redrawn in place, or plain lines.

On a terminal the bar is one line rewritten with ``\\r`` (tests done of total, machine steps,
elapsed time, the test that finished last), redrawn at most :data:`REDRAW_S` apart so a fast
machine does not spend its time drawing. Anywhere else (CI logs, a pipe) it writes one plain line
per finished test and nothing per step, so a log stays readable.

Steps are only known where the machines run: in-process runs report every step; under
pytest-xdist the controller learns a test's step count when the test finishes.
"""

from __future__ import annotations

import sys
import time
from typing import Final, TextIO

__all__ = ["REDRAW_S", "Progress"]

#: Minimum time between two redraws of the bar (seconds).
REDRAW_S: Final = 0.1
_BAR: Final = 24


class Progress:
    """Progress of one certification run; call :meth:`start`, then steps and tests, then :meth:`finish`."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None, width: int = 100) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.stream.isatty() if tty is None else tty
        self.width = width
        self.total: int | None = None
        self.done = 0
        self.failed = 0
        self.steps = 0
        self.last = ""
        self._started = time.monotonic()
        self._drawn = 0.0

    def start(self, total: int) -> None:
        """The run has ``total`` tests (suite machines) to run."""
        self.total = total
        if not self.tty:
            self._line(f"vdpacert: running {total} suite machine{'s' if total != 1 else ''}")
        self._draw(force=True)

    def step(self, count: int = 1) -> None:
        """``count`` machine steps ran."""
        self.steps += count
        self._draw()

    def test_done(self, name: str, outcome: str, steps: int | None = None) -> None:
        """Test ``name`` finished with ``outcome`` (passed / failed / skipped); ``steps`` if not reported live."""
        self.done += 1
        self.failed += outcome == "failed"
        if steps is not None:
            self.steps += steps
        self.last = f"{name} {outcome}"
        if not self.tty:
            of = f"/{self.total}" if self.total is not None else ""
            extra = f", {steps} steps" if steps is not None else ""
            self._line(f"vdpacert: [{self.done}{of}] {name} {outcome} ({self._elapsed():.1f} s{extra})")
        self._draw(force=True)

    def finish(self) -> None:
        """End the bar's line (a terminal) or write the totals (plain)."""
        if self.tty:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
        else:
            self._line(f"vdpacert: {self.done} done, {self.failed} failed, {self.steps} steps, "
                       f"{self._elapsed():.1f} s")

    # ----- drawing -------------------------------------------------------------------------------

    def _elapsed(self) -> float:
        return time.monotonic() - self._started

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def render(self) -> str:
        """The bar as text (what the terminal shows, without the carriage return)."""
        total = self.total or 0
        filled = _BAR * self.done // total if total else 0
        bar = "#" * filled + "." * (_BAR - filled)
        count = f"{self.done}/{total}" if self.total is not None else f"{self.done}"
        failed = f", {self.failed} failed" if self.failed else ""
        text = f"[{bar}] {count} machines{failed}, {self.steps} steps, {self._elapsed():.1f} s"
        if self.last:
            text += f"  {self.last}"
        return text[: self.width - 1]

    def _draw(self, *, force: bool = False) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if not force and now - self._drawn < REDRAW_S:
            return
        self._drawn = now
        self.stream.write("\r" + self.render().ljust(self.width - 1))
        self.stream.flush()
