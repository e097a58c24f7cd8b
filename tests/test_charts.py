"""The Pillow charts (mnist_pipeline.stages.charts): deterministic files, and no crash on the data
a run can give (a NaN loss, an empty history, a constant curve, one epoch)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from mnist_pipeline.stages import charts
from mnist_pipeline.stages.charts import COLOURS, BarPanel, HBarPanel, LinePanel, Series


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def where(image: Image.Image, colour: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the pixels of exactly ``colour``."""
    return np.nonzero((pixels(image) == colour).all(axis=2))


def line_panel(*series: Series, **kwargs) -> Image.Image:
    return charts.render([LinePanel("title", "epoch", "accuracy", series, **kwargs)], (400, 300))


def test_same_data_same_bytes(tmp_path):
    """DVC tracks the PNGs by hash: drawing the same data again must give the same file
    (no time or other varying metadata)."""
    panels = [
        LinePanel("a", "epoch", "loss", [Series("train", [1, 2, 3], [0.3, 0.2, 0.1])]),
        BarPanel("b", "", "accuracy", ["x=1", "x=2"], [("train", [0.9, 0.95])]),
    ]
    for name in ("one.png", "two.png"):
        charts.save(charts.render(panels, (800, 300)), tmp_path / name)
    data = (tmp_path / "one.png").read_bytes()
    assert data == (tmp_path / "two.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"tIME" not in data and b"tEXt" not in data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "two.png"]  # no temp files


@pytest.mark.parametrize(
    "ys", [[0.9, math.nan, 0.95, 0.97], [math.inf, 0.9, 0.95, None]], ids=["nan", "inf-none"]
)
def test_points_that_are_not_numbers_are_left_out(ys):
    """A diverged epoch (NaN loss) leaves a gap; the other points are drawn."""
    image = line_panel(Series("train", [1, 2, 3, 4], ys), Series("empty", [], []))
    rows, _ = where(image, COLOURS[0])
    assert len(rows) > 50


def test_an_empty_panel_is_drawn():
    image = line_panel(Series("nothing", [], []))
    assert image.size == (400, 300) and pixels(image).min() < 100  # axes and text


def test_a_constant_series_is_drawn_mid_height():
    """All values equal (a loss stuck at 2.3026): no division by a zero range, and the line
    is drawn across the plot's middle."""
    image = line_panel(Series("train", [1, 2, 3], [0.5, 0.5, 0.5]), integer_x=True)
    rows, cols = where(image, COLOURS[0])
    assert len(rows) > 100 and cols.max() - cols.min() > 200
    assert 0.3 * 300 < rows.mean() < 0.7 * 300


def test_a_single_point_is_drawn():
    image = line_panel(Series("train", [1], [0.97]), integer_x=True)
    rows, cols = where(image, COLOURS[0])
    middle = (abs(cols - 225) < 40) & (abs(rows - 150) < 40)  # the plot's, not the legend's
    assert middle.sum() > 20


def test_ticks_are_round_values():
    assert [label for _, label in charts._ticks(0.8, 5.2, integer=True)] == list("12345")
    assert [label for _, label in charts._ticks(0.8965, 0.9735)] == [
        "0.90",
        "0.92",
        "0.94",
        "0.96",
    ]
    assert [label for _, label in charts._ticks(-0.95, 19.95, integer=True)] == [
        "0",
        "5",
        "10",
        "15",
    ]


def test_integer_ticks_for_epochs():
    """One epoch: ticks 0, 1, 2, never 0.5 or 1.5."""
    assert [label for _, label in charts._ticks(0.0, 2.0, integer=True)] == ["0", "1", "2"]


def test_tiny_values_are_written_in_scientific_notation():
    labels = [label for _, label in charts._ticks(0.0, 1e-4)]
    assert labels[0] == "0" and labels[-1] == "1e-04"


def test_heatmap_rows_from_the_top_columns_from_the_left_counts_readable():
    matrix = np.zeros((10, 10), int)
    matrix[9, 0] = 1000  # actual 9, predicted 0: bottom left
    matrix[0, 0] = 3
    image = pixels(charts.heatmap(matrix, "t", "predicted", "actual", (650, 550)))
    rows, cols = np.nonzero(image[..., 2] - image[..., 0] > 90)
    assert rows.min() > 550 * 0.6 and cols.max() < 650 * 0.4
    dark = image[rows.min() : rows.max(), cols.min() : cols.max()]
    assert (dark.min(axis=2) > 230).any()  # white digits on the dark cell


def test_legend_avoids_the_data():
    """A curve that rises to the upper right: the legend goes elsewhere (Matplotlib's
    "best"), not over the points."""
    taken = np.zeros((201, 301), bool)
    taken[:100, 150:] = True  # the upper right half
    spot, hidden = charts._legend_spot(taken, (0, 0, 300, 200), (80, 40))
    assert hidden == 0 and spot == (6, 6)  # upper left


def test_horizontal_bars_first_on_top():
    image = charts.render(
        [HBarPanel("imp", "importance", ["big", "small"], [1.0, 0.1])], (400, 300)
    )
    rows, cols = where(image, COLOURS[0])
    widths = {r: (cols[rows == r].max() - cols[rows == r].min()) for r in np.unique(rows)}
    widest_row = max(widths, key=widths.get)
    narrowest_row = min(widths, key=widths.get)
    assert widest_row < narrowest_row


def test_bar_names_are_wrapped_or_drawn_upright_below_the_bars():
    """Names that fit their slot in lines are wrapped at their commas; names too long for
    that (many runs) read upwards. Either way they are drawn below the bars, in full height."""
    for count, height in ((4, (30, 70)), (12, (100, 200))):
        names = [f"units={u}, lr=0.001, dropout=0.2, batch=32" for u in range(count)]
        panel = BarPanel("b", "", "accuracy", names, [("train", [0.9] * count)], (0.8, 1.0))
        image = charts.render([panel], (600, 450))
        rows, _ = where(image, COLOURS[0])
        below = pixels(image)[rows.max() + 8 : 450 - 30]  # between the bars and the x label
        text_rows = np.nonzero((below.max(axis=2) < 120).any(axis=1))[0]
        assert height[0] < text_rows.max() - text_rows.min() < height[1], count


def test_a_sweep_of_many_runs_keeps_its_curves_and_shortens_the_legend():
    """40 trials in one learning-curves panel: the legend is cut to what fits ("+N more"),
    and the plot keeps its height, so the curves are still drawn."""
    label = "units={}, lr=0.001, dropout=0.2"
    many = [Series(label.format(64 + i), [1, 2, 3], [0.9, 0.95, 0.97]) for i in range(40)]
    image = charts.render([LinePanel("curves", "epoch", "accuracy", many)], (600, 450))
    rows, columns = where(image, COLOURS[39 % len(COLOURS)])  # the last curve, drawn on top
    start, middle = rows[columns < 150], rows[(columns > 300) & (columns < 400)]
    assert len(start) and len(middle)
    assert start.mean() - middle.mean() > 100  # it rises over the plot's height


def test_hundreds_of_bars_and_a_negative_one_are_drawn():
    """compare --plot over a whole experiment: bars narrower than a pixel; and a bar below
    zero (x1 < x0 for Pillow unless ordered)."""
    names = [f"run {i}" for i in range(300)]
    values = [0.97 + (i % 7) / 1000 for i in range(300)]
    bars = BarPanel("runs", "", "accuracy", names, [("train", values), ("test", values)])
    assert charts.render([bars], (1200, 450)).size == (1200, 450)
    signed = HBarPanel("importances", "importance", ["a", "b"], [0.5, -0.2])
    assert charts.render([signed], (600, 300)).size == (600, 300)


@pytest.mark.parametrize("ys", [[1.0, 1.0 + 1e-15], [1e-13, 1e-13]], ids=["one-ulp", "tiny"])
def test_a_range_too_small_to_tick_is_drawn_as_one_value(ys):
    image = line_panel(Series("train", [1, 2], ys))
    assert len(where(image, COLOURS[0])[0]) > 20
