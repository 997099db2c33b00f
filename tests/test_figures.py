"""Figures: valid PNGs of the expected size, whose pixels follow their inputs; the heat map is
smooth and hot where the attention is; the font falls back when Pillow cannot scale it."""
import numpy as np
import pytest
from PIL import Image, ImageFont

from mpafer.app import figures

NAMES = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear"]


def records(epochs, slope, with_recall=True):
    return [{"epoch": e, "loss": 3 - slope * e, "cls": 2 - slope * e, "ta": 0.5, "pa": 0.3,
             "v": 0.0, "lr": 0.03 / e, "war": None if e == 2 else 0.3 + slope * e,
             "uar": None if e == 2 else 0.25 + slope * e,
             "per_class_recall": ({n: 0.1 * i + slope * e for i, n in enumerate(NAMES)}
                                  if with_recall and e != 2 else None)}
            for e in range(1, epochs + 1)]


def test_training_curves_are_a_fixed_size_png_that_follows_the_records(tmp_path):
    first = figures.training_curves(records(6, 0.1))
    second = figures.training_curves(records(6, 0.2))
    assert first.size == second.size == (2400, 1100) and first.mode == "RGB"
    assert first.tobytes() != second.tobytes()
    figures.save_png(first, str(tmp_path / "curves.png"))
    with Image.open(tmp_path / "curves.png") as saved:
        assert saved.format == "PNG" and saved.tobytes() == first.tobytes()
    # Old logs without per-class recall, a single epoch: still drawn.
    assert figures.training_curves(records(1, 0.1, with_recall=False)).size == (2400, 1100)


def test_ticks_are_round_and_cover_the_data():
    assert figures.nice_ticks(0.13, 0.87) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert figures.nice_ticks(0, 120, 6) == [0, 25, 50, 75, 100, 125]
    assert figures.log_ticks(0.06, 23) == [0.01, 0.1, 1, 10, 100]
    assert figures.log_ticks(0.3, 4) == [0.2, 0.5, 1, 2, 5]


def test_one_value_keeps_its_sign_and_one_epoch_sits_in_the_middle():
    # A one-epoch run: a learning rate of 0.032 gets an axis of rates, not one from -0.5.
    for value in (0.032, 7.0, -3.0, 1e-7):
        ticks = figures.nice_ticks(value, value)
        assert ticks[0] <= value <= ticks[-1]
        assert all(t > 0 for t in ticks) if value > 0 else all(t < 0 for t in ticks)
        assert ticks[-1] - ticks[0] < 3 * abs(value)
    assert figures.nice_ticks(0, 0) == [-0.5, -0.25, 0.0, 0.25, 0.5]
    canvas = Image.new("RGB", (600, 400), "white")
    figures.line_panel(canvas, (0, 0, 600, 400), [("lr", [1], [0.032])], "rate", "lr")
    marker = np.all(np.asarray(canvas) == figures.PALETTE[0], axis=-1)  # [H, W]
    rows, columns = np.nonzero(marker[60:])  # below the legend's swatch
    assert len(columns) and 0.45 * 600 < columns.mean() < 0.6 * 600


def metrics(confusion):
    confusion = np.asarray(confusion)
    return {"classnames": NAMES[:len(confusion)], "confusion": confusion.tolist(),
            "war": np.trace(confusion) / confusion.sum(), "uar": 0.5}


def test_confusion_figure_follows_the_matrix_and_the_class_count():
    diagonal = figures.confusion_figure(metrics(10 * np.eye(7, dtype=int) + 1))
    uniform = figures.confusion_figure(metrics(np.full((7, 7), 3)))
    counts = figures.confusion_figure(metrics(np.full((7, 7), 3)), counts=True)
    assert diagonal.size == uniform.size == counts.size
    assert len({diagonal.tobytes(), uniform.tobytes(), counts.tobytes()}) == 3
    small = figures.confusion_figure(metrics(np.eye(3, dtype=int)))
    assert small.width < diagonal.width and small.height < diagonal.height
    # A matrix of 7 cells at least 84 pixels wide, with room for names and the colour scale.
    assert diagonal.width > 7 * 84 + 150 and diagonal.height > 7 * 84 + 120


def test_row_normalised_colours_darken_with_the_rate():
    light, dark = figures.colour_of(0.05, figures.BLUE_ANCHORS), figures.colour_of(0.95, figures.BLUE_ANCHORS)
    assert sum(light) > sum(dark) and figures.ink_on(light) != figures.ink_on(dark)


def grey_face(size=64):
    return Image.new("RGB", (size, size), (128, 128, 128))


def test_heat_overlay_is_smooth_and_hot_where_the_attention_is():
    attention = np.zeros((4, 4))
    attention[0, 0] = 1.0  # top-left patch only
    tile = np.asarray(figures.heat_overlay(grey_face(), attention, 128)).astype(int)
    top_left, bottom_right = tile[8, 8], tile[120, 120]
    assert top_left[0] > top_left[2] + 40  # red where attended
    assert bottom_right[2] > bottom_right[0]  # blue elsewhere
    # Bilinear: many shades, and no jump between neighbouring pixels like a block edge.
    assert len(np.unique(tile.reshape(-1, 3), axis=0)) > 50
    assert np.abs(np.diff(tile, axis=1)).max() < 40


def test_attention_grid_puts_every_image_in_one_picture():
    tiles = [(grey_face(), np.random.default_rng(i).random((4, 4)), [f"class {i} 50.0%", f"f{i}.jpg"])
             for i in range(5)]
    grid = figures.attention_grid(tiles, columns=4, size=100)
    rows, line = 2, figures.text_size("Hg", 20)[1] + 8
    assert grid.size == (4 * (100 + 16) + 16, rows * (100 + 2 * line + 8 + 16) + 16 + 60)
    other = figures.attention_grid(tiles[:4] + [(grey_face(), np.eye(4), ["x 1%", "g.jpg"])],
                                   columns=4, size=100)
    assert other.size == grid.size and other.tobytes() != grid.tobytes()
    with pytest.raises(ValueError):
        figures.attention_grid([])


def test_figures_fall_back_to_the_bitmap_font(monkeypatch):
    # Pillow < 10.1 (or without FreeType): load_default() takes no size and gives a bitmap font.
    bitmap = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()

    def old_load_default(*args, **kwargs):
        if args or kwargs:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return bitmap

    monkeypatch.setattr(figures.ImageFont, "load_default", old_load_default)
    figures.font.cache_clear()
    try:
        assert figures.font(30) is bitmap
        image = figures.confusion_figure(metrics(np.eye(3, dtype=int) + 1))
        assert image.width > 3 * 84 and len(image.getcolors(1 << 16)) > 10
    finally:
        figures.font.cache_clear()


EDGE_VALUES = [0.0, 1.0, -1.0, 0.1 + 0.2, 0.3, 7.0, 7.0000000001, 0.6931471805599453,
               0.6931471805599454, 123456789.123, 123456789.12300001, 1e-20, 2e-20, 1e-300,
               -1e-300, 5e-324, 1e300, 1.7e308, -1.7e308, float("nan"), float("inf"),
               -float("inf")]


def test_tick_helpers_are_total_and_bounded_for_any_values():
    """Equal, float-noise-close, tiny, huge, negative and non-finite values: every call ends at
    once with a few finite ticks (a step below the values' rounding once looped forever)."""
    import itertools
    import math
    import time
    start = time.perf_counter()
    for low, high in itertools.product(EDGE_VALUES, repeat=2):
        for count in (2, 5, 6):
            ticks = figures.nice_ticks(low, high, count)
            assert 2 <= len(ticks) <= 2 * count + 1 and all(map(math.isfinite, ticks))
            assert ticks == sorted(set(ticks)), (low, high, ticks)
            finite = [v for v in (low, high) if math.isfinite(v) and abs(v) <= 1e300]
            span = max(finite) - min(finite) if finite else 0.0
            if finite and span > 1e-6 * max(map(abs, finite)):  # ticks drop float noise
                assert ticks[0] <= min(finite) + 1e-9 * span
                assert ticks[-1] >= max(finite) - 1e-9 * span
        ticks = figures.log_ticks(low, high)
        assert 1 <= len(ticks) <= 16 and all(t > 0 and math.isfinite(t) for t in ticks)
    assert time.perf_counter() - start < 5.0  # a bound on a hang, not a speed target


def test_curves_with_values_equal_up_to_float_noise_are_drawn():
    flat = [dict(r, ta=0.6931471805599453 + 1e-16 * r["epoch"], lr=0.01) for r in records(3, 0.1)]
    assert figures.training_curves(flat).size == (2400, 1100)
