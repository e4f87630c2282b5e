"""The migration plot: a valid PNG (decoded here on its own), bars where and as tall as the data says, inked text.

The decoder below reads what the encoder wrote the way any PNG reader would (signature, chunk
CRCs, IHDR fields, zlib IDAT, one filter byte per row), so a test passes only if the file is a PNG
and the pixels are where the chart says.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from vdpacert.migration.plot import (
    FONT,
    GLYPH_HEIGHT,
    GLYPH_WIDTH,
    PANEL_HEIGHT,
    PANEL_WIDTH,
    PRECOPY,
    SENT,
    STOP_AND_COPY,
    WHITE,
    Canvas,
    PlotRun,
    encode_png,
    glyph,
    nice_ticks,
    panel_geometry,
    plot_many,
    plot_migration,
)

Color = tuple[int, int, int]


@dataclass
class Image:
    width: int
    height: int
    rows: list[bytes]

    def pixel(self, x: int, y: int) -> Color:
        row = self.rows[y]
        return row[3 * x], row[3 * x + 1], row[3 * x + 2]


def decode_png(data: bytes) -> Image:
    """An 8-bit RGB, filter-0, non-interlaced PNG, every chunk's CRC checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, chunks = 8, []
    while at < len(data):
        (length,) = struct.unpack_from(">I", data, at)
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        (crc,) = struct.unpack_from(">I", data, at + 8 + length)
        assert zlib.crc32(kind + body) == crc, kind
        chunks.append((kind, body))
        at += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, color_type, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color_type, compression, filtering, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = 1 + 3 * width
    assert len(raw) == stride * height
    rows = [raw[y * stride:(y + 1) * stride] for y in range(height)]
    assert all(row[0] == 0 for row in rows)  # filter type 0 on every row
    return Image(width, height, [row[1:] for row in rows])


def test_encoder_round_trips_every_pixel() -> None:
    width, height = 7, 3
    rgb = b"".join(bytes([(x * 40 + y) % 256, y * 80, (x * y) % 256]) for y in range(height) for x in range(width))
    image = decode_png(encode_png(width, height, rgb))
    assert (image.width, image.height) == (width, height)
    assert image.pixel(6, 2) == ((6 * 40 + 2) % 256, 160, 12)
    with pytest.raises(ValueError):
        encode_png(width, height, rgb[:-1])
    with pytest.raises(ValueError):
        encode_png(0, 1, b"")


def ink(image: Image, x0: int, y0: int, width: int, height: int, color: Color) -> int:
    return sum(image.pixel(x, y) == color for y in range(y0, y0 + height) for x in range(x0, x0 + width))


def test_every_glyph_inks_its_own_cell_and_no_two_look_alike() -> None:
    chars = sorted(FONT)
    canvas = Canvas(len(chars) * (GLYPH_WIDTH + 1) * 2, GLYPH_HEIGHT * 2 + 2)
    drawn = canvas.text(0, 1, "".join(chars), (0, 0, 0), scale=2)
    assert drawn == (len(chars) * (GLYPH_WIDTH + 1) - 1) * 2
    image = decode_png(canvas.png())
    for i, char in enumerate(chars):
        cell = ink(image, i * (GLYPH_WIDTH + 1) * 2, 1, GLYPH_WIDTH * 2, GLYPH_HEIGHT * 2, (0, 0, 0))
        expected = 4 * sum(bin(row).count("1") for row in FONT[char])
        assert cell == expected, char
        assert (cell > 0) == (char != " "), char
    assert len({FONT[c] for c in chars}) == len(chars)  # 0 is not O, 1 is not I...
    assert all(len(rows) == GLYPH_HEIGHT and all(0 <= r < 1 << GLYPH_WIDTH for r in rows) for rows in FONT.values())


def test_lower_case_draws_as_capitals_and_unknown_characters_as_a_box() -> None:
    assert glyph("a") == FONT["A"] and glyph("z") == FONT["Z"]
    box = glyph("\u00b5")
    assert box not in FONT.values() and sum(bin(r).count("1") for r in box) > 0


def bar_spans(image: Image, panel: int, color: Color) -> list[tuple[int, int]]:
    """Column spans [x0, x1) that hold ``color`` inside the panel's plot area (legend swatches are above it)."""
    g = panel_geometry(1, panel)
    columns = [x for x in range(image.width) if any(image.pixel(x, y) == color for y in range(g.top, g.baseline))]
    spans: list[tuple[int, int]] = []
    for x in columns:
        if spans and spans[-1][1] == x:
            spans[-1] = (spans[-1][0], x + 1)
        else:
            spans.append((x, x + 1))
    return spans


def bar_height(image: Image, x: int, baseline: int, colors: tuple[Color, ...]) -> int:
    """Rows from the baseline up to the topmost bar pixel of column x (lines drawn over a bar do not shorten it)."""
    top = min((y for y in range(baseline) if image.pixel(x, y) in colors), default=baseline)
    return baseline - top


def test_bars_stand_where_the_iterations_are_and_as_tall_as_the_counts(tmp_path: Path) -> None:
    dirty = [4000, 2000, 1000, 500, 250]
    sent = [d * 4104 for d in dirty]
    path = tmp_path / "run.png"
    plot_migration(path, title="net split device-log", dirty_pages=dirty, sent_bytes=sent, downtime_s=0.012,
                   downtime_target_s=0.03, converged=True)
    image = decode_png(path.read_bytes())
    assert (image.width, image.height) == (PANEL_WIDTH, PANEL_HEIGHT)
    g = panel_geometry(len(dirty))
    blue, orange = bar_spans(image, 0, PRECOPY), bar_spans(image, 0, STOP_AND_COPY)
    assert blue == list(g.bars[:-1]) and orange == [g.bars[-1]]  # the last bar, stop-and-copy, in its own colour
    top = nice_ticks(max(dirty))[-1]
    for i, count in enumerate(dirty):
        height = bar_height(image, g.bar_center(i) - 3, g.baseline, (PRECOPY, STOP_AND_COPY))
        assert abs(height - count / top * (g.baseline - g.top)) <= 1, (i, height)
    assert any(image.pixel(x, y) == SENT for x in range(g.left, g.right) for y in range(g.top, g.baseline))


def test_axis_ticks_and_text_are_inked(tmp_path: Path) -> None:
    path = tmp_path / "run.png"
    plot_migration(path, title="ticks", dirty_pages=[100, 10], sent_bytes=[1 << 20, 1 << 18], downtime_s=0.05,
                   downtime_target_s=0.03, converged=False)
    image = decode_png(path.read_bytes())
    g = panel_geometry(2)
    black = (0, 0, 0)
    assert ink(image, 0, g.top - 5, g.left - 6, g.baseline - g.top + 10, black) > 50  # left tick labels
    assert ink(image, g.right + 6, g.top - 5, 80, g.baseline - g.top + 10, SENT) > 50  # right tick labels
    assert ink(image, g.left, 0, PANEL_WIDTH - g.left, 40, black) > 50  # the title
    assert ink(image, g.left, PANEL_HEIGHT - 30, 600, 20, (190, 0, 0)) > 100  # downtime past target: in red


def test_a_failed_run_without_stop_and_copy_has_no_orange_bar(tmp_path: Path) -> None:
    path = tmp_path / "failed.png"
    plot_migration(path, title="link drop", dirty_pages=[300, 200], sent_bytes=[10, 20], downtime_s=0,
                   downtime_target_s=0.03, converged=False, error="link dropped in iteration 2" * 10,
                   stop_and_copy=False)
    image = decode_png(path.read_bytes())
    assert bar_spans(image, 0, STOP_AND_COPY) == [] and len(bar_spans(image, 0, PRECOPY)) == 2


def test_plot_many_stacks_one_panel_per_run(tmp_path: Path) -> None:
    runs = [PlotRun(f"scenario {n}", list(range(n, 0, -1)), [1000] * n, 0.01, 0.03, True) for n in (3, 30, 1)]
    path = tmp_path / "many.png"
    last = runs[-1]
    plot_many(path, [*runs[:-1], {"title": last.title, "dirty_pages": last.dirty_pages, "sent_bytes": last.sent_bytes,
                                  "downtime_s": 0.01, "downtime_target_s": 0.03, "converged": True}])
    image = decode_png(path.read_bytes())
    assert (image.width, image.height) == (PANEL_WIDTH, 3 * PANEL_HEIGHT)
    for panel, run in enumerate(runs):
        assert len(bar_spans(image, panel, PRECOPY)) == len(run.dirty_pages) - 1
        assert bar_spans(image, panel, STOP_AND_COPY) == [panel_geometry(len(run.dirty_pages), panel).bars[-1]]
    with pytest.raises(ValueError):
        plot_many(path, [])


def test_an_empty_run_still_draws_axes(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    plot_migration(path, title="nothing", dirty_pages=[], sent_bytes=[], downtime_s=0, downtime_target_s=0.03,
                   converged=False, error="failed before the first iteration")
    image = decode_png(path.read_bytes())
    g = panel_geometry(0)
    assert image.pixel(g.left, g.baseline) == (0, 0, 0) and image.pixel(g.left + 50, g.baseline - 50) != PRECOPY
    assert image.pixel(1, 1) == WHITE


@pytest.mark.parametrize(("dirty", "sent", "downtime"), [([1, 2], [1], 0.0), ([-1], [0], 0.0), ([1], [1], -1.0),
                                                          ([1], [1], float("nan"))])
def test_inconsistent_data_is_refused(dirty: list[int], sent: list[int], downtime: float) -> None:
    with pytest.raises(ValueError):
        PlotRun("bad", dirty, sent, downtime, 0.03, True)


def test_nice_ticks() -> None:
    assert nice_ticks(0) == [0.0, 1.0]
    assert nice_ticks(100) == [0, 20, 40, 60, 80, 100]
    assert nice_ticks(101)[-1] >= 101 and len(nice_ticks(101)) <= 7
    assert nice_ticks(0.3) == pytest.approx([0, 0.1, 0.2, 0.3])
