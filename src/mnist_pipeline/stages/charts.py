"""The project's figures, drawn with Pillow and NumPy alone.

Matplotlib is not installed where the stages run: Keras imports it whenever it can, which
adds most of a second to every ``import tensorflow``. The few charts the project draws (line
panels, grouped and horizontal bars, one heatmap) need little of it, so they are drawn here.

    image = charts.render([LinePanel("Loss", "epoch", "loss", [Series("train", xs, ys)])],
                          size=(500, 400))
    charts.save(image, "loss.png")

Everything is drawn at ``SCALE`` times its size and shrunk at the end: Pillow draws lines
and markers with jagged edges, and the shrinking smooths them. Coordinates in this module
are pixels of the final picture. The PNG has no timestamp: the same data gives the same
bytes (DVC tracks these files by hash).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mnist_pipeline.core.atomic import atomic_path

Colour = tuple[int, int, int]
Point = tuple[float, float]
Box = tuple[float, float, float, float]  # left, top, right, bottom

#: Matplotlib's "tab10": the series keep the colours they had when Matplotlib drew them.
COLOURS: list[Colour] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]
#: Matplotlib's "Blues", white to dark blue: the heatmap's colour scale.
BLUES: list[Colour] = [
    (247, 251, 255),
    (198, 219, 239),
    (107, 174, 214),
    (33, 113, 181),
    (8, 48, 107),
]
WHITE: Colour = (255, 255, 255)
TEXT: Colour = (34, 34, 34)
AXIS: Colour = (90, 90, 90)
GRID: Colour = (228, 228, 228)
TITLE_SIZE, LABEL_SIZE, TICK_SIZE = 15, 13, 11
PAD = 10
SCALE = 2


@dataclass(frozen=True)
class Series:
    """One curve, ``ys[i]`` at ``xs[i]``. A point that is not finite is left out, and the
    line breaks there. ``line=False`` draws the points alone, ``marker=None`` the line alone."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    marker: str | None = "o"  # "o" a circle, "s" a square
    line: bool = True


@dataclass(frozen=True)
class LinePanel:
    """Curves against a numeric x; ``integer_x`` for epochs and trials (no epoch 2.5)."""

    title: str
    xlabel: str
    ylabel: str
    series: Sequence[Series]
    integer_x: bool = False
    ylim: tuple[float, float] | None = None


@dataclass(frozen=True)
class BarPanel:
    """Grouped bars: for each category, one bar per group; ``groups`` are (label, values).
    A long category name is cut into lines at its commas, and shortened."""

    title: str
    xlabel: str
    ylabel: str
    categories: Sequence[str]
    groups: Sequence[tuple[str, Sequence[float]]]
    ylim: tuple[float, float] | None = None


@dataclass(frozen=True)
class HBarPanel:
    """Horizontal bars from zero, the first at the top, each with its value at its end."""

    title: str
    xlabel: str
    labels: Sequence[str]
    values: Sequence[float]
    value_format: str = ".2f"
    ylabel: str = ""


Panel = LinePanel | BarPanel | HBarPanel


def render(panels: Sequence[Panel], size: tuple[int, int]) -> Image.Image:
    """``panels`` side by side, in equal widths, on one white picture of ``size`` pixels."""
    canvas = _Canvas(size)
    width = size[0] / len(panels)
    for i, panel in enumerate(panels):
        _Frame(canvas, (i * width, 0, (i + 1) * width, size[1]), panel).draw()
    return canvas.finish()


def heatmap(
    matrix: np.ndarray,
    title: str,
    xlabel: str,
    ylabel: str,
    size: tuple[int, int],
) -> Image.Image:
    """Counts as square cells, row ``i`` of ``matrix`` the ``i``-th from the top, each cell
    white to dark blue by its count and the count written in it (white on dark cells)."""
    matrix = np.asarray(matrix)
    rows, cols = matrix.shape
    c = _Canvas(size)
    title_h = c.line_height(TITLE_SIZE)
    label_h = c.line_height(LABEL_SIZE)
    tick_h = c.line_height(TICK_SIZE)
    tick_w = c.text_width(str(rows - 1), TICK_SIZE)
    labels_w = label_h + 8 + tick_w + 8  # the y label and the row numbers
    top = PAD + title_h + 10
    bottom_room = 8 + tick_h + 8 + label_h + PAD
    cell = min((size[0] - 2 * PAD - labels_w) / cols, (size[1] - top - bottom_room) / rows)
    edge = (size[0] - labels_w - cell * cols) / 2  # labels and cells centred together
    left = edge + labels_w
    right, bottom = left + cell * cols, top + cell * rows
    peak = float(matrix.max()) if matrix.size and matrix.max() > 0 else 1.0
    count_size = max(6, min(TICK_SIZE, int(cell / 4)))
    for (i, j), count in np.ndenumerate(matrix):
        share = float(count) / peak
        x, y = left + j * cell, top + i * cell
        c.rect((x, y, x + cell, y + cell), fill=_blue(share))
        c.text(
            (x + cell / 2, y + cell / 2),
            str(count),
            count_size,
            "mm",
            WHITE if share > 0.5 else TEXT,
        )
    c.rect((left, top, right, bottom), outline=AXIS)
    for i in range(rows):
        c.text((left - 8, top + (i + 0.5) * cell), str(i), TICK_SIZE, "rm")
    for j in range(cols):
        c.text((left + (j + 0.5) * cell, bottom + 8), str(j), TICK_SIZE, "ma")
    c.text(((left + right) / 2, PAD), title, TITLE_SIZE, "ma")
    c.text(((left + right) / 2, size[1] - PAD), xlabel, LABEL_SIZE, "md")
    c.upright_text((edge + label_h / 2, (top + bottom) / 2), ylabel, LABEL_SIZE)
    return c.finish()


def save(image: Image.Image, path: str | Path) -> None:
    """Write ``image`` as PNG, atomically (a killed stage leaves the old picture or the new
    one). Pillow adds no time or other metadata, so the bytes depend on the pixels alone."""
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG")


def _blue(share: float) -> Colour:
    """The colour at ``share`` (0 to 1) along ``BLUES``."""
    at = min(max(share, 0.0), 1.0) * (len(BLUES) - 1)
    i = min(int(at), len(BLUES) - 2)
    a, b, t = BLUES[i], BLUES[i + 1], at - i
    return tuple(round(u + (v - u) * t) for u, v in zip(a, b, strict=True))  # type: ignore[return-value]


@cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size * SCALE)  # type: ignore[return-value]


def _up(values: Sequence[float]) -> tuple[int, ...]:
    return tuple(round(v * SCALE) for v in values)


class _Canvas:
    """A white picture addressed in final pixels, drawn ``SCALE`` times larger."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.image = Image.new("RGB", _up(size), WHITE)  # type: ignore[arg-type]
        self.draw = ImageDraw.Draw(self.image)

    def text_width(self, text: str, size: int) -> float:
        return _font(size).getlength(text) / SCALE

    def line_height(self, size: int) -> float:
        """The font's height from its ascender to its descender, whatever the text."""
        ascent, descent = _font(size).getmetrics()
        return (ascent + descent) / SCALE

    def text(
        self, xy: Point, text: str, size: int, anchor: str = "la", fill: Colour = TEXT
    ) -> None:
        self.draw.text(_up(xy), text, font=_font(size), anchor=anchor, fill=fill)

    def upright_text(self, xy: Point, text: str, size: int, hang: bool = False) -> None:
        """``text`` read bottom to top: centred on ``xy`` (a y label), or hanging from it
        (``hang``: a tick label below an axis)."""
        mask = Image.new("L", _up((self.text_width(text, size), self.line_height(size))), 0)  # type: ignore[arg-type]
        ImageDraw.Draw(mask).text((0, 0), text, font=_font(size), fill=255)
        mask = mask.transpose(Image.Transpose.ROTATE_90)
        x, y = _up(xy)
        corner = (x - mask.width // 2, y if hang else y - mask.height // 2)
        self.image.paste(TEXT, (*corner, corner[0] + mask.width, corner[1] + mask.height), mask)

    def line(self, points: Sequence[Point], fill: Colour, width: float = 2) -> None:
        self.draw.line([_up(p) for p in points], fill=fill, width=round(width * SCALE))

    def rect(self, box: Box, fill: Colour | None = None, outline: Colour | None = None) -> None:
        self.draw.rectangle(_up(box), fill=fill, outline=outline, width=SCALE)

    def marker(self, xy: Point, shape: str, fill: Colour) -> None:
        r = 3.5 if shape == "o" else 3.0
        box = _up((xy[0] - r, xy[1] - r, xy[0] + r, xy[1] + r))
        if shape == "o":
            self.draw.ellipse(box, fill=fill)
        else:
            self.draw.rectangle(box, fill=fill)

    def finish(self) -> Image.Image:
        return self.image.reduce(SCALE)


# Axes: limits, round ticks, and where a value falls.


@dataclass(frozen=True)
class _Axis:
    """Data limits and the ticks (value, label) between them; a categorical axis has no grid."""

    lo: float
    hi: float
    ticks: list[tuple[float, str]]
    grid: bool = True

    def frac(self, value: float) -> float:
        return (value - self.lo) / (self.hi - self.lo)


def _finite(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _limits(values: Sequence[float], integer: bool = False) -> tuple[float, float]:
    """The data's range and 5% either side (a single value gets a range around it)."""
    finite = _finite(values)
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    if hi - lo <= max(abs(lo), abs(hi)) * 1e-9 or hi - lo < 1e-12:  # one value, or rounding
        half = 1.0 if integer else max(abs(lo) * 0.05, 1e-6) if lo else 0.5
        return lo - half, hi + half
    margin = (hi - lo) * 0.05
    return lo - margin, hi + margin


def _ticks(lo: float, hi: float, integer: bool = False) -> list[tuple[float, str]]:
    """About six ticks at round values: steps of 1, 2, 2.5 or 5 times a power of ten."""
    raw = (hi - lo) / 6
    power = 10.0 ** math.floor(math.log10(raw))
    steps = (1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)
    step = next(m * power for m in steps if m * power >= raw * (1 - 1e-9))
    if integer:
        step = float(max(1, round(step)))
    decimals = next((d for d in range(15) if abs(round(step, d) - step) < step * 1e-6), 14)
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    values = [round(k * step, decimals) + 0.0 for k in range(first, last + 1)]  # no "-0.00"
    if decimals > 4 or max(abs(lo), abs(hi)) >= 1e6:  # 2e-05, not 0.00002
        digits = len(f"{step:e}".split("e")[0].rstrip("0").rstrip(".").replace(".", "")) - 1
        return [(v, f"{v:.{digits}e}" if v else "0") for v in values]
    return [(v, f"{v:.{decimals}f}") for v in values]


def _numeric(
    values: Sequence[float], integer: bool = False, limits: tuple[float, float] | None = None
) -> _Axis:
    lo, hi = limits or _limits(values, integer)
    if not hi > lo:  # limits given as one value
        lo, hi = _limits([lo], integer)
    return _Axis(lo, hi, _ticks(lo, hi, integer))


def _categorical(labels: Sequence[str]) -> _Axis:
    return _Axis(-0.5, len(labels) - 0.5, list(enumerate(labels)), grid=False)


def _wrap(c: _Canvas, label: str, width: float, most: int = 4) -> list[str]:
    """``label`` ("units=64, lr=0.001") in lines of at most ``width`` pixels, cut at its
    commas; no lines (an empty list) when that takes more than ``most`` or a part is wider."""
    lines: list[str] = []
    for part in label.split(", "):
        if lines and c.text_width(f"{lines[-1]}, {part}", TICK_SIZE) <= width:
            lines[-1] += f", {part}"
        else:
            lines.append(part)
    fits = len(lines) <= most and all(c.text_width(t, TICK_SIZE) <= width for t in lines)
    return lines if fits else []


def _fit(c: _Canvas, text: str, width: float) -> str:
    """``text``, shortened with an ellipsis to at most ``width`` pixels."""
    while len(text) > 1 and c.text_width(text, TICK_SIZE) > width:
        text = text[:-2] + "…"
    return text


# What a panel draws inside its plot, as shapes: drawn once to learn where the legend can
# go without hiding data, then drawn for real.


@dataclass
class _Marks:
    segments: list[tuple[Point, Point, Colour]] = field(default_factory=list)
    markers: list[tuple[Point, str, Colour]] = field(default_factory=list)
    rects: list[tuple[Box, Colour]] = field(default_factory=list)
    labels: list[tuple[Point, str]] = field(default_factory=list)

    def paint(self, c: _Canvas) -> None:
        for box, colour in self.rects:
            c.rect(box, fill=colour)
        for a, b, colour in self.segments:
            c.line([a, b], colour)
        for xy, shape, colour in self.markers:
            c.marker(xy, shape, colour)
        for xy, text in self.labels:
            c.text(xy, text, TICK_SIZE, "lm")

    def occupied(self, plot: Box) -> np.ndarray:
        """Which pixels of ``plot`` the marks cover (with a few pixels to spare)."""
        left, top, right, bottom = plot
        taken = np.zeros((int(bottom - top) + 1, int(right - left) + 1), bool)

        def cover(x0: float, y0: float, x1: float, y1: float) -> None:
            x0, x1 = sorted((x0, x1))
            y0, y1 = sorted((y0, y1))
            i0, j0 = max(0, int(x0 - left) - 4), max(0, int(y0 - top) - 4)
            taken[j0 : int(y1 - top) + 5, i0 : int(x1 - left) + 5] = True

        for a, b, _ in self.segments:
            for t in np.linspace(0, 1, int(max(abs(b[0] - a[0]), abs(b[1] - a[1]))) + 2):
                x, y = a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t
                cover(x, y, x, y)
        for (x, y), _, _ in self.markers:
            cover(x, y, x, y)
        for box, _ in self.rects:
            cover(*box)
        return taken


@dataclass(frozen=True)
class _Legend:
    entries: list[tuple[str, Colour, str]]  # label, colour, "bar" or a style: "-o", "s", "-"

    def rows(self, c: _Canvas, width: float | None) -> list[list[tuple[int, float]]]:
        """Entry indexes and widths: one a row (``width`` None), or rows up to ``width``."""
        rows: list[list[tuple[int, float]]] = [[]]
        for i, (label, _, _) in enumerate(self.entries):
            w = 30 + c.text_width(label, TICK_SIZE) + (14 if width else 0)
            if rows[-1] and (width is None or sum(w for _, w in rows[-1]) + w > width - 12):
                rows.append([])
            rows[-1].append((i, w))
        return rows

    def fitting(self, c: _Canvas, width: float, height: float) -> _Legend:
        """This legend, or its first entries and "+N more" when in rows ``width`` wide it
        would be taller than ``height`` (a sweep of many runs in one panel)."""
        legend, n = self, len(self.entries)
        while n > 1 and legend.size(c, width)[1] > height:
            n -= 1
            more = (f"+{len(self.entries) - n} more", AXIS, "")
            legend = _Legend([*self.entries[:n], more])
        return legend

    def size(self, c: _Canvas, width: float | None = None) -> tuple[float, float]:
        rows = self.rows(c, width)
        line_h = c.line_height(TICK_SIZE)
        return max(sum(w for _, w in row) for row in rows) + 12, len(rows) * (line_h + 3) + 9

    def draw(self, c: _Canvas, corner: Point, width: float | None = None) -> None:
        w, h = self.size(c, width)
        x0, y0 = corner
        c.rect((x0, y0, x0 + w, y0 + h), fill=WHITE, outline=(204, 204, 204))
        line_h = c.line_height(TICK_SIZE)
        for r, row in enumerate(self.rows(c, width)):
            x, y = x0 + 6, y0 + 5 + r * (line_h + 3) + line_h / 2
            for i, entry_w in row:
                label, colour, kind = self.entries[i]
                if kind == "bar":
                    c.rect((x + 6, y - 5, x + 18, y + 5), fill=colour)
                elif kind.startswith("-"):
                    c.line([(x, y), (x + 24, y)], colour)
                if kind.strip("-") in ("o", "s"):
                    c.marker((x + 12, y), kind.strip("-"), colour)
                c.text((x + 30, y), label, TICK_SIZE, "lm")
                x += entry_w


def _legend_spot(
    taken: np.ndarray, plot: Box, size: tuple[float, float]
) -> tuple[Point | None, int]:
    """The corner of ``plot`` where a legend of ``size`` hides the least data (upper right
    first, as Matplotlib's "best"), and how many pixels of data it hides."""
    left, top, right, bottom = plot
    w, h = size
    if w > right - left - 12 or h > bottom - top - 12:
        return None, 0
    spots = [
        (right - 6 - w, top + 6),
        (left + 6, top + 6),
        (right - 6 - w, bottom - 6 - h),
        (left + 6, bottom - 6 - h),
        ((left + right - w) / 2, top + 6),
        ((left + right - w) / 2, bottom - 6 - h),
    ]

    def hidden(spot: Point) -> int:
        i, j = int(spot[0] - left), int(spot[1] - top)
        return int(taken[j : j + int(h) + 2, i : i + int(w) + 2].sum())

    best = min(spots, key=hidden)
    return best, hidden(best)


# One panel: its axes, its marks and its legend, laid out in its box.


class _Frame:
    """A panel in ``box``: title on top, y label and tick labels on the left, x tick labels
    and x label below, the plot in what is left."""

    def __init__(self, c: _Canvas, box: Box, panel: Panel) -> None:
        self.c, self.box, self.panel = c, box, panel
        self.x, self.y, self.legend = _axes(panel)
        self.upright = False  # bar names: in lines that fit their slot, else read upwards
        if isinstance(panel, BarPanel):
            slot = (box[2] - box[0] - 120) / max(1, len(panel.categories)) - 8
            wrapped = [_wrap(c, label, slot) for _, label in self.x.ticks]
            if all(wrapped):
                ticks = [
                    (v, "\n".join(lines))
                    for (v, _), lines in zip(self.x.ticks, wrapped, strict=True)
                ]
            else:
                self.upright = True
                tallest = (box[3] - box[1]) * 0.35
                ticks = [(v, _fit(c, label, tallest)) for v, label in self.x.ticks]
            self.x = replace(self.x, ticks=ticks)
        if isinstance(panel, HBarPanel):
            widest = (box[2] - box[0]) * 0.35
            self.y = replace(self.y, ticks=[(v, _fit(c, t, widest)) for v, t in self.y.ticks])

    def plot_box(self, legend_h: float = 0) -> Box:
        c, (left, top, right, bottom) = self.c, self.box
        tick_h = c.line_height(TICK_SIZE)
        label_h = c.line_height(LABEL_SIZE)
        title_h = c.line_height(TITLE_SIZE)
        tick_w = max((c.text_width(t, TICK_SIZE) for _, t in self.y.ticks), default=0)
        lines = max((t.count("\n") + 1 for _, t in self.x.ticks), default=1)
        x_ticks_h = lines * tick_h
        if self.upright:
            x_ticks_h = max(c.text_width(t, TICK_SIZE) for _, t in self.x.ticks)
        last = self.x.ticks[-1][1].split("\n") if self.x.ticks and self.x.grid else [""]
        last_w = max(c.text_width(t, TICK_SIZE) for t in last)
        return (
            left + PAD + (label_h + 6 if self.panel.ylabel else 0) + tick_w + 8,
            top + PAD + title_h + 8 + legend_h,
            right - PAD - max(6.0, last_w / 2),
            bottom - PAD - label_h - 6 - x_ticks_h - 8,
        )

    def px(self, x: float, y: float, plot: Box) -> Point:
        left, top, right, bottom = plot
        return left + self.x.frac(x) * (right - left), bottom - self.y.frac(y) * (bottom - top)

    def draw(self) -> None:
        c, plot = self.c, self.plot_box()
        spot = None
        if self.legend.entries:
            self.legend = self.legend.fitting(c, plot[2] - plot[0], (plot[3] - plot[1]) * 0.4)
            spot, hidden = _legend_spot(self.marks(plot).occupied(plot), plot, self.legend.size(c))
            above = self.legend.size(c, plot[2] - plot[0])[1] + 8
            if spot is None or (hidden and above < (plot[3] - plot[1]) * 0.3):
                spot = None  # above the plot, in rows as wide as the plot
                plot = self.plot_box(legend_h=above)
        self.axes(plot)
        self.marks(plot).paint(c)
        if spot is not None:
            self.legend.draw(c, spot)
        elif self.legend.entries:
            width = plot[2] - plot[0]
            self.legend.draw(c, (plot[0], plot[1] - self.legend.size(c, width)[1] - 8), width)

    def axes(self, plot: Box) -> None:
        c, (left, top, right, bottom) = self.c, plot
        tick_h = c.line_height(TICK_SIZE)
        for value, label in self.y.ticks:
            _, y = self.px(self.x.lo, value, plot)
            if self.y.grid:
                c.line([(left, y), (right, y)], GRID, 1)
            c.line([(left - 4, y), (left, y)], AXIS, 1)
            c.text((left - 7, y), label, TICK_SIZE, "rm")
        for value, label in self.x.ticks:
            x, _ = self.px(value, self.y.lo, plot)
            if self.x.grid:
                c.line([(x, top), (x, bottom)], GRID, 1)
            c.line([(x, bottom), (x, bottom + 4)], AXIS, 1)
            if self.upright:
                c.upright_text((x, bottom + 7), label, TICK_SIZE, hang=True)
                continue
            for n, line in enumerate(label.split("\n")):
                c.text((x, bottom + 7 + n * tick_h), line, TICK_SIZE, "ma")
        c.line([(left, top), (left, bottom), (right, bottom)], AXIS, 1)
        box_left, box_top, _, box_bottom = self.box
        middle = (left + right) / 2
        c.text((middle, box_top + PAD), self.panel.title, TITLE_SIZE, "ma")
        c.text((middle, box_bottom - PAD), self.panel.xlabel, LABEL_SIZE, "md")
        if self.panel.ylabel:
            label_h = c.line_height(LABEL_SIZE)
            xy = (box_left + PAD + label_h / 2, (top + bottom) / 2)
            c.upright_text(xy, self.panel.ylabel, LABEL_SIZE)

    def marks(self, plot: Box) -> _Marks:
        p, marks = self.panel, _Marks()
        if isinstance(p, LinePanel):
            for n, s in enumerate(p.series):
                colour = _colour(n)
                points = [
                    self.px(x, y, plot) if len(_finite([x, y])) == 2 else None
                    for x, y in zip(s.xs, s.ys, strict=True)
                ]
                points = [q if q and _inside(q, plot) else None for q in points]
                if s.line:
                    marks.segments += [
                        (a, b, colour) for a, b in itertools.pairwise(points) if a and b
                    ]
                if s.marker:
                    marks.markers += [(q, s.marker, colour) for q in points if q]
        elif isinstance(p, BarPanel):
            width = 0.8 / max(1, len(p.groups))
            base = min(max(0.0, self.y.lo), self.y.hi)
            for g, (_, values) in enumerate(p.groups):
                colour = _colour(g)
                for i, value in enumerate(_finite_or_nan(values)):
                    if math.isfinite(value):
                        x0 = i - 0.4 + g * width
                        top = min(max(value, self.y.lo), self.y.hi)
                        (a0, a1), (b0, b1) = self.px(x0, top, plot), self.px(x0 + width, base, plot)
                        left, right = a0 + 0.5, max(a0 + 0.5, b0 - 0.5)  # >= 1 px, many bars
                        marks.rects.append(((left, min(a1, b1), right, max(a1, b1)), colour))
        else:
            per_row = (plot[3] - plot[1]) / max(1, len(p.values))
            half = min(0.35 * per_row, 16.0)  # a lone bar is not a slab
            for i, value in enumerate(_finite_or_nan(p.values)):
                if math.isfinite(value):
                    (x0, y), (x1, _) = (
                        self.px(0.0, len(p.values) - 1 - i, plot),
                        self.px(value, 0, plot),
                    )
                    box = (min(x0, x1), y - half, max(x0, x1), y + half)
                    marks.rects.append((box, COLOURS[0]))
                    marks.labels.append(((x1 + 4, y), format(value, p.value_format)))
        return marks


def _inside(point: Point, plot: Box) -> bool:
    return plot[0] - 1 <= point[0] <= plot[2] + 1 and plot[1] - 1 <= point[1] <= plot[3] + 1


def _finite_or_nan(values: Sequence[float | None]) -> list[float]:
    return [float(v) if v is not None else math.nan for v in values]


def _colour(n: int) -> Colour:
    """The ``n``-th series' colour (they repeat after ten, as Matplotlib's do)."""
    return COLOURS[n % len(COLOURS)]


def _axes(panel: Panel) -> tuple[_Axis, _Axis, _Legend]:
    """A panel's x axis, y axis and legend."""
    if isinstance(panel, LinePanel):
        xs = [x for s in panel.series for x in s.xs]
        ys = [y for s in panel.series for y in s.ys]
        entries = [
            (s.label, _colour(n), ("-" if s.line else "") + (s.marker or ""))
            for n, s in enumerate(panel.series)
        ]
        x_axis = _numeric(xs, panel.integer_x)
        return x_axis, _numeric(ys, limits=panel.ylim), _Legend(entries)
    if isinstance(panel, BarPanel):
        values = [v for _, group in panel.groups for v in group]
        entries = [(label, _colour(n), "bar") for n, (label, _) in enumerate(panel.groups)]
        y_axis = _numeric([], limits=panel.ylim or _limits([0.0, *values]))
        return _categorical(panel.categories), y_axis, _Legend(entries)
    longest = max([0.0, *_finite(panel.values)])
    x_axis = _numeric([], limits=(0.0, longest * 1.18 or 1.0))  # room for the values
    return x_axis, _categorical(list(reversed(panel.labels))), _Legend([])
