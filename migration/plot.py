"""A PNG of a migration (dirty pages per iteration, bytes sent, downtime), drawn without a plotting library.

The project takes no plotting dependency for one chart, so this module carries the three small things a
chart needs: a PNG encoder (:func:`encode_png`: signature, IHDR, one zlib IDAT of filter-0 RGB rows, IEND,
each chunk with its CRC32), a 5x7 bitmap font (:data:`FONT`: digits, capital letters, some punctuation;
lower case is drawn in capitals) and a :class:`Canvas` of RGB pixels that fills rectangles, draws lines and
writes text.

:func:`plot_migration` draws one migration: a bar per pre-copy iteration of the pages it found dirty, the
last bar (the stop-and-copy set) in another colour, the bytes each iteration sent as a line on a second
axis, ticks with numbers on both axes, a title, and a line saying the downtime against its target and
whether the migration converged. :func:`plot_many` stacks one such panel per scenario in one image.
Readable, not pretty.
"""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "FONT",
    "GLYPH_HEIGHT",
    "GLYPH_WIDTH",
    "PANEL_HEIGHT",
    "PANEL_WIDTH",
    "PRECOPY",
    "SENT",
    "STOP_AND_COPY",
    "WHITE",
    "Canvas",
    "PanelGeometry",
    "PlotRun",
    "encode_png",
    "glyph",
    "nice_ticks",
    "panel_geometry",
    "plot_many",
    "plot_migration",
    "render",
    "text_width",
]

Color = tuple[int, int, int]
WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)
GRID: Color = (225, 225, 225)
PRECOPY: Color = (52, 101, 164)
STOP_AND_COPY: Color = (214, 95, 0)
SENT: Color = (30, 150, 60)
BAD: Color = (190, 0, 0)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GLYPH_WIDTH, GLYPH_HEIGHT = 5, 7
PANEL_WIDTH, PANEL_HEIGHT = 800, 380
_MIB = 1 << 20

# ----- the font -------------------------------------------------------------------------------------------

# Seven rows of five columns per glyph, '#' for ink. Drawn for this module; 0 is slashed so it is not O.
_GLYPH_ROWS = {
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.", "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####", "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.", "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.", "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.", "9": ".###. #...# #...# .#### ....# ...#. .##..",
    "A": ".###. #...# #...# ##### #...# #...# #...#", "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.", "D": "###.. #..#. #...# #...# #...# #..#. ###..",
    "E": "##### #.... #.... ####. #.... #.... #####", "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####", "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.", "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#", "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#", "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.", "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#", "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.", "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.", "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.", "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..", "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    " ": "..... ..... ..... ..... ..... ..... .....", ".": "..... ..... ..... ..... ..... .##.. .##..",
    ",": "..... ..... ..... ..... .##.. ..#.. .#...", ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    ";": "..... .##.. .##.. ..... .##.. ..#.. .#...", "-": "..... ..... ..... ##### ..... ..... .....",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....", "/": "....# ...#. ...#. ..#.. .#... .#... #....",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.", ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "%": "##..# ##..# ...#. ..#.. .#... #..## #..##", "=": "..... ..... ##### ..... ##### ..... .....",
    "_": "..... ..... ..... ..... ..... ..... #####", "'": "..#.. ..#.. .#... ..... ..... ..... .....",
    "!": "..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#..", "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
    "<": "...#. ..#.. .#... #.... .#... ..#.. ...#.", ">": ".#... ..#.. ...#. ....# ...#. ..#.. .#...",
    "[": ".###. .#... .#... .#... .#... .#... .###.", "]": ".###. ...#. ...#. ...#. ...#. ...#. .###.",
    "#": ".#.#. .#.#. ##### .#.#. ##### .#.#. .#.#.", "*": "..... ..#.. #.#.# .###. #.#.# ..#.. .....",
    '"': ".#.#. .#.#. ..... ..... ..... ..... .....",
}
#: A hollow box: what a character the font lacks is drawn as, so nothing silently vanishes.
_MISSING_ROWS = "##### #...# #...# #...# #...# #...# #####"


def _bits(rows: str) -> tuple[int, ...]:
    """One int per row, bit 4 the leftmost column."""
    return tuple(int(row.replace("#", "1").replace(".", "0"), 2) for row in rows.split())


#: Each glyph as GLYPH_HEIGHT row bit masks (bit GLYPH_WIDTH-1 is the leftmost column).
FONT: dict[str, tuple[int, ...]] = {char: _bits(rows) for char, rows in _GLYPH_ROWS.items()}
MISSING_GLYPH = _bits(_MISSING_ROWS)


def glyph(char: str) -> tuple[int, ...]:
    """The bitmap drawn for ``char`` (lower case as upper case; the hollow box for a character the font lacks)."""
    return FONT.get(char.upper(), MISSING_GLYPH)


# ----- the canvas and the PNG encoder ----------------------------------------------------------------------


def encode_png(width: int, height: int, rgb: bytes | bytearray | memoryview) -> bytes:
    """A PNG of ``width`` x ``height`` 8-bit RGB pixels (row by row, no padding), every row with filter 0."""
    if width < 1 or height < 1 or width >= 1 << 31 or height >= 1 << 31:
        raise ValueError(f"a PNG is 1..2^31-1 pixels each way, not {width}x{height}")
    stride = width * 3
    pixels = memoryview(rgb).cast("B")
    if len(pixels) != stride * height:
        raise ValueError(f"{width}x{height} RGB is {stride * height} bytes, not {len(pixels)}")
    rows = b"".join(b"\x00" + pixels[y * stride:(y + 1) * stride] for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, truecolour, deflate, filter 0, no interlace
    return PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows, 6)) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


class Canvas:
    """RGB pixels, white to start; drawing outside the canvas is clipped, never an error."""

    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        if width < 1 or height < 1:
            raise ValueError(f"a canvas is at least 1x1, not {width}x{height}")
        self.width = width
        self.height = height
        self.pixels = bytearray(bytes(background) * (width * height))

    def pixel(self, x: int, y: int) -> Color:
        at = (y * self.width + x) * 3
        return self.pixels[at], self.pixels[at + 1], self.pixels[at + 2]

    def set(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            at = (y * self.width + x) * 3
            self.pixels[at:at + 3] = bytes(color)

    def fill_rect(self, x: int, y: int, width: int, height: int, color: Color) -> None:
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, self.width), min(y + height, self.height)
        if x0 >= x1 or y0 >= y1:
            return
        row = bytes(color) * (x1 - x0)
        for yy in range(y0, y1):
            at = (yy * self.width + x0) * 3
            self.pixels[at:at + len(row)] = row

    def line(self, x0: int, y0: int, x1: int, y1: int, color: Color, thickness: int = 1) -> None:
        """A straight line (Bresenham), ``thickness`` pixels square at every step."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.fill_rect(x0 - thickness // 2, y0 - thickness // 2, thickness, thickness, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, text: str, color: Color = BLACK, scale: int = 1) -> int:
        """Draw ``text`` with its top-left corner at (x, y); returns the width drawn (see :func:`text_width`)."""
        for i, char in enumerate(text):
            left = x + i * (GLYPH_WIDTH + 1) * scale
            for row, bits in enumerate(glyph(char)):
                for col in range(GLYPH_WIDTH):
                    if bits >> (GLYPH_WIDTH - 1 - col) & 1:
                        self.fill_rect(left + col * scale, y + row * scale, scale, scale, color)
        return text_width(text, scale)

    def png(self) -> bytes:
        return encode_png(self.width, self.height, self.pixels)


def text_width(text: str, scale: int = 1) -> int:
    """Pixels ``text`` takes across: each glyph and a one-column gap, no gap after the last."""
    return max(0, len(text) * (GLYPH_WIDTH + 1) - 1) * scale


# ----- the chart -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlotRun:
    """One migration to draw; ``stop_and_copy`` says the last entry is the stop-and-copy set (a failed run may
    have stopped before it), ``error`` is shown instead of the verdict when the migration failed."""

    title: str
    dirty_pages: Sequence[int]
    sent_bytes: Sequence[int]
    downtime_s: float
    downtime_target_s: float
    converged: bool
    error: str = ""
    stop_and_copy: bool = True

    def __post_init__(self) -> None:
        if len(self.sent_bytes) != len(self.dirty_pages):
            raise ValueError(f"{len(self.dirty_pages)} iterations of dirty pages but {len(self.sent_bytes)} of "
                             "bytes sent")
        if any(v < 0 for v in self.dirty_pages) or any(v < 0 for v in self.sent_bytes):
            raise ValueError("dirty page and byte counts are >= 0")
        for name in ("downtime_s", "downtime_target_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number of seconds >= 0, not {value!r}")


@dataclass(frozen=True)
class PanelGeometry:
    """Where a panel puts things: the plot area ``[left, right) x [top, baseline)`` and each bar's columns."""

    top: int
    baseline: int
    left: int
    right: int
    bars: tuple[tuple[int, int], ...]  # [x0, x1) per bar

    def bar_center(self, i: int) -> int:
        x0, x1 = self.bars[i]
        return (x0 + x1 - 1) // 2


def panel_geometry(nbars: int, panel: int = 0) -> PanelGeometry:
    """The layout of panel ``panel`` (0 at the top) of an image showing ``nbars`` bars in it."""
    y = panel * PANEL_HEIGHT
    left, right = 90, PANEL_WIDTH - 90
    slot = (right - left) / max(nbars, 1)
    width = max(1, int(slot * 0.7))
    bars = tuple((left + int(slot * i + (slot - width) / 2), left + int(slot * i + (slot - width) / 2) + width)
                 for i in range(nbars))
    return PanelGeometry(top=y + 50, baseline=y + PANEL_HEIGHT - 80, left=left, right=right, bars=bars)


def nice_ticks(vmax: float, count: int = 5) -> list[float]:
    """Tick values 0, step, 2*step... past ``vmax``, with step 1, 2 or 5 times a power of ten (about ``count``)."""
    if vmax <= 0:
        return [0.0, 1.0]
    raw = vmax / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    top = math.ceil(vmax / step - 1e-9)
    return [i * step for i in range(top + 1)]


def _label(value: float) -> str:
    """A short tick label: 950, 15K, 1.2M, 0.25."""
    if value and abs(value) < 1:
        return f"{value:.2g}"
    for at_least, divisor, suffix in ((1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e4, 1e3, "K")):
        if abs(value) >= at_least:
            return f"{value / divisor:.3g}{suffix}"
    return f"{value:.0f}" if value == int(value) else f"{value:.3g}"


def _scale_y(value: float, vmax: float, g: PanelGeometry) -> int:
    return g.baseline - round(value / vmax * (g.baseline - g.top)) if vmax else g.baseline


def _draw_panel(canvas: Canvas, run: PlotRun, panel: int) -> None:
    g = panel_geometry(len(run.dirty_pages), panel)
    y0 = panel * PANEL_HEIGHT
    canvas.text(g.left, y0 + 12, run.title[: (PANEL_WIDTH - g.left) // 12], BLACK, scale=2)
    pages_ticks = nice_ticks(max(run.dirty_pages, default=0))
    sent_mib = [b / _MIB for b in run.sent_bytes]
    sent_ticks = nice_ticks(max(sent_mib, default=0))
    pages_max, sent_max = pages_ticks[-1], sent_ticks[-1]
    for value in pages_ticks:  # grid and left axis: dirty pages
        y = _scale_y(value, pages_max, g)
        canvas.fill_rect(g.left, y, g.right - g.left, 1, GRID)
        canvas.fill_rect(g.left - 5, y, 5, 1, BLACK)
        label = _label(value)
        canvas.text(g.left - 8 - text_width(label), y - 3, label)
    for value in sent_ticks:  # right axis: MiB sent
        y = _scale_y(value, sent_max, g)
        canvas.fill_rect(g.right, y, 5, 1, SENT)
        canvas.text(g.right + 8, y - 3, _label(value), SENT)
    canvas.text(8, g.top - 20, "DIRTY PAGES", PRECOPY)
    canvas.text(g.right - text_width("MIB SENT") + 40, g.top - 20, "MIB SENT", SENT)
    for i, (value, (x0, x1)) in enumerate(zip(run.dirty_pages, g.bars, strict=True)):
        height = g.baseline - _scale_y(value, pages_max, g)
        if value and not height:
            height = 1  # a non-zero count never looks like zero
        final = run.stop_and_copy and i == len(g.bars) - 1
        canvas.fill_rect(x0, g.baseline - height, x1 - x0, height, STOP_AND_COPY if final else PRECOPY)
    _x_labels(canvas, run, g)
    points = [(g.bar_center(i), _scale_y(v, sent_max, g)) for i, v in enumerate(sent_mib)]
    for (xa, ya), (xb, yb) in itertools.pairwise(points):
        canvas.line(xa, ya, xb, yb, SENT, thickness=2)
    for x, y in points:
        canvas.fill_rect(x - 2, y - 2, 5, 5, SENT)
    canvas.fill_rect(g.left, g.top, 1, g.baseline - g.top + 1, BLACK)  # axes last: nothing covers them
    canvas.fill_rect(g.right, g.top, 1, g.baseline - g.top + 1, SENT)
    canvas.fill_rect(g.left, g.baseline, g.right - g.left + 1, 1, BLACK)
    _legend(canvas, g, run.stop_and_copy)
    text, scale = _verdict(run)
    late = run.downtime_s > run.downtime_target_s
    canvas.text(g.left, y0 + PANEL_HEIGHT - 26, text, BAD if run.error or late else BLACK, scale)


def _x_labels(canvas: Canvas, run: PlotRun, g: PanelGeometry) -> None:
    n = len(g.bars)
    labels = [str(i + 1) for i in range(n)]
    if run.stop_and_copy and n:
        labels[-1] = "SC"
    slot = (g.right - g.left) / max(n, 1)
    every = max(1, math.ceil((text_width(max(labels, key=len, default="")) + 6) / slot))
    for i, label in enumerate(labels):
        if i % every == 0 or i == n - 1:
            x = g.bar_center(i) - text_width(label) // 2
            canvas.fill_rect(g.bar_center(i), g.baseline + 1, 1, 4, BLACK)
            canvas.text(x, g.baseline + 8, label)
    title = "PRE-COPY ITERATION" + (", SC = STOP-AND-COPY" if run.stop_and_copy else "")
    canvas.text((g.left + g.right - text_width(title)) // 2, g.baseline + 22, title)


def _legend(canvas: Canvas, g: PanelGeometry, stop_and_copy: bool) -> None:
    x = g.left + 10
    entries = [(PRECOPY, "PRE-COPY"), (STOP_AND_COPY, "STOP-AND-COPY"), (SENT, "SENT")]
    for color, name in entries if stop_and_copy else entries[::2]:
        canvas.fill_rect(x, g.top - 12, 8, 8, color)
        x += 12 + canvas.text(x + 12, g.top - 11, name) + 16


def _verdict(run: PlotRun) -> tuple[str, int]:
    """The bottom line and its scale: large, unless only the small font fits it (a long error message)."""
    times = f"DOWNTIME {run.downtime_s * 1000:.2f} MS, TARGET {run.downtime_target_s * 1000:.2f} MS"
    verdict = "CONVERGED" if run.converged else "NOT CONVERGED"
    text = f"FAILED: {run.error}" if run.error else f"{times}, {verdict}"
    room = PANEL_WIDTH - panel_geometry(0).left - 10
    for scale in (2, 1):
        if text_width(text, scale) <= room:
            return text, scale
    fits = room // (GLYPH_WIDTH + 1)
    return text[:fits - 3] + "...", 1


def render(runs: Sequence[PlotRun]) -> Canvas:
    """One panel per run, stacked top to bottom."""
    if not runs:
        raise ValueError("nothing to plot: no runs")
    canvas = Canvas(PANEL_WIDTH, PANEL_HEIGHT * len(runs))
    for panel, run in enumerate(runs):
        _draw_panel(canvas, run, panel)
        if panel:
            canvas.fill_rect(0, panel * PANEL_HEIGHT, PANEL_WIDTH, 2, BLACK)
    return canvas


def plot_many(path: str | Path, runs: Sequence[PlotRun | Mapping[str, Any]]) -> None:
    """Write one PNG with a panel per run, stacked; a run is a :class:`PlotRun` or a mapping of its fields
    (the keyword arguments of :func:`plot_migration`)."""
    Path(path).write_bytes(render([run if isinstance(run, PlotRun) else PlotRun(**run) for run in runs]).png())


def plot_migration(path: str | Path, *, title: str, dirty_pages: Sequence[int], sent_bytes: Sequence[int],
                   downtime_s: float, downtime_target_s: float, converged: bool, error: str = "",
                   stop_and_copy: bool = True) -> None:
    """Write a PNG of one migration (module docstring): ``dirty_pages`` per pre-copy iteration then the
    stop-and-copy set, ``sent_bytes`` per iteration (same length)."""
    plot_many(path, [PlotRun(title, dirty_pages, sent_bytes, downtime_s, downtime_target_s, converged, error,
                             stop_and_copy)])
