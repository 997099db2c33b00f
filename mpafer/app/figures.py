"""Figures drawn with PIL alone (it ships with torchvision): training curves, the confusion
matrix, attention overlays. Text uses Pillow's scalable default font where there is one, else
its bitmap font, and the layout follows the font's measured size."""
import functools
import io
import math
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..files import atomic_write

# Matplotlib's "tab10": ten colours that stay apart for lines and legends.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
# A "turbo"-like rainbow for heat maps (dark blue = low, dark red = high), 11 anchors.
HEAT_ANCHORS = ((48, 18, 59), (70, 100, 223), (40, 170, 250), (26, 228, 182), (100, 253, 106),
                (164, 252, 60), (225, 221, 55), (253, 170, 51), (247, 107, 26), (204, 51, 5),
                (122, 4, 3))
# White to dark blue for the confusion matrix.
BLUE_ANCHORS = ((247, 251, 255), (198, 219, 239), (107, 174, 214), (33, 113, 181), (8, 48, 107))
GRID, AXIS, TEXT = (225, 225, 225), (60, 60, 60), (20, 20, 20)


def save_png(image: Image.Image, path: str):
    """Write `image` as PNG atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


# -- text -------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def font(size: int):
    """Pillow's scalable default font at `size` pixels; its bitmap font where that is missing."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1, or no FreeType
        return ImageFont.load_default()


def text_size(text: str, size: int) -> Tuple[int, int]:
    """(width, height) of `text`; the height is the font's, so different lines line up."""
    box = font(size).getbbox(text)
    tall = font(size).getbbox("Hg")
    return box[2] - min(box[0], 0), tall[3] - min(tall[1], 0)


def draw_text(draw: ImageDraw.ImageDraw, xy, text: str, size: int, align: str = "left",
              valign: str = "top", fill=TEXT):
    """Text placed by its box: align left/center/right of x, valign top/middle/bottom of y."""
    face = font(size)
    width = text_size(text, size)[0]
    x = xy[0] - {"left": 0, "center": width / 2, "right": width}[align]
    tall, capital = face.getbbox("Hg"), face.getbbox("H")
    # Middle means the middle of the capitals, so labels sit centred on their tick marks.
    offset = {"top": tall[1], "middle": (capital[1] + capital[3]) / 2, "bottom": tall[3]}[valign]
    draw.text((round(x), round(xy[1] - offset)), text, font=face, fill=fill)


def paste_vertical(canvas: Image.Image, center, text: str, size: int):
    """`text` reading bottom to top, centred on `center` (axis titles)."""
    width, height = text_size(text, size)
    label = Image.new("RGBA", (width + 4, height + 6), (255, 255, 255, 0))
    draw_text(ImageDraw.Draw(label), (2, 3), text, size)
    label = label.rotate(90, expand=True)
    canvas.paste(label, (round(center[0] - label.width / 2), round(center[1] - label.height / 2)),
                 label)


# -- colours ----------------------------------------------------------------------------------

def colormap(values: np.ndarray, anchors=HEAT_ANCHORS) -> np.ndarray:
    """Values in [0, 1] `[...]` -> uint8 RGB `[..., 3]`, linear between evenly spaced anchors."""
    values = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0, 1)
    stops = np.linspace(0, 1, len(anchors))
    channels = [np.interp(values, stops, [a[k] for a in anchors]) for k in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)  # [..., 3]


def colour_of(value: float, anchors) -> Tuple[int, int, int]:
    return tuple(int(v) for v in colormap(np.array([value]), anchors)[0])


def ink_on(background) -> Tuple[int, int, int]:
    """Black or white, whichever reads better on `background`."""
    luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return TEXT if luminance > 140 else (255, 255, 255)


# -- line charts ------------------------------------------------------------------------------

def nice_ticks(low: float, high: float, count: int = 5) -> List[float]:
    """Round ticks (1, 2, 2.5 or 5 times a power of ten) covering [low, high], at most
    `2 * count + 1` for any floats (non-finite ones ignored; none left: 0 and 1)."""
    count = max(count, 2)
    finite = [min(max(v, -1e300), 1e300) for v in (low, high) if math.isfinite(v)]
    if not finite:
        return [0.0, 1.0]
    low, high = min(finite), max(finite)
    if not high - low > max(1e-9 * max(abs(low), abs(high)), 1e-200):
        # One value: half of it either side, so a positive quantity keeps a positive axis.
        middle = (low + high) / 2
        half = abs(middle) * 0.5 if abs(middle) > 1e-100 else 0.5
        low, high = middle - half, middle + half
    raw = (high - low) / (count - 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next((m * power for m in (1, 2, 2.5, 5) if m * power >= raw), 10 * power)
    first = math.floor(low / step + 1e-9) * step
    # Ticks are first + i * step (never a running sum), as many as reach `high`.
    n = min(math.ceil((high - first) / step - 1e-9) + 1, 2 * count + 1)
    digits = 12 - math.floor(math.log10(step))  # drop float noise, keep the step's digits
    return [round(first + i * step, digits) for i in range(max(n, 2))]


def log_ticks(low: float, high: float, most: int = 12) -> List[float]:
    """Ticks at 1, 2 and 5 times powers of ten covering [low, high] > 0, about `most` at most
    (decades only when wide); values not positive and finite are ignored (none left: 1, 10)."""
    usable = [min(max(v, 1e-300), 1e300) for v in (low, high) if math.isfinite(v) and v > 0]
    if not usable:
        return [1.0, 10.0]
    first, last = math.floor(math.log10(min(usable))), math.ceil(math.log10(max(usable)))
    stride = max(1, math.ceil((last - first + 1) / most))
    steps = (1,) if last - first > 3 else (1, 2, 5)
    ticks = [m * 10.0 ** e for e in range(first, last + 1, stride) for m in steps]
    if ticks[-1] < max(usable):
        ticks.append(10.0 ** min(first + stride * math.ceil((last - first) / stride), 307))
    below = [t for t in ticks if t <= min(usable)]
    above = [t for t in ticks if t >= max(usable)]
    start, end = (below[-1] if below else ticks[0]), (above[0] if above else ticks[-1])
    return [t for t in ticks if start <= t <= end]


def legend(draw, x0, y0, width, entries, size) -> int:
    """Line-and-label entries, wrapped into rows of `width`; -> the height used."""
    x, y, row = x0, y0, text_size("Hg", size)[1] + 8
    for label, colour in entries:
        w = 30 + text_size(label, size)[0] + 18
        if x > x0 and x + w > x0 + width:
            x, y = x0, y + row
        draw.line([(x, y + row / 2 - 4), (x + 24, y + row / 2 - 4)], fill=colour, width=4)
        draw_text(draw, (x + 30, y + row / 2 - 4), label, size, valign="middle")
        x += w
    return y + row - y0 if entries else 0


def line_panel(canvas: Image.Image, box, series, title: str, ylabel: str, log: bool = False,
               percent: bool = False, note: str = "", first_colour: int = 0):
    """One chart in `box` (x0, y0, x1, y1): series = [(label, xs, ys)], None values skipped;
    series i is drawn in colour `first_colour + i` of the palette."""
    draw, size = ImageDraw.Draw(canvas), 20
    x0, y0, x1, y1 = box
    draw_text(draw, ((x0 + x1) / 2, y0 + 6), title, 24, align="center")
    points = [[(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)
               and (y > 0 or not log)] for _, xs, ys in series]
    # A series keeps its colour when another has nothing to draw.
    colours = [PALETTE[(first_colour + i) % len(PALETTE)] for i in range(len(series))]
    entries = [(s[0], c) for s, c, p in zip(series, colours, points) if p]
    series = [(s[0], p) for s, p in zip(series, points) if p]
    if not series:
        draw_text(draw, ((x0 + x1) / 2, (y0 + y1) / 2), note or "nothing recorded", size,
                  align="center", valign="middle")
        return
    top = y0 + 44 + legend(draw, x0 + 90, y0 + 44, x1 - x0 - 100, entries, 18) + 10
    xs = [x for _, p in series for x, _ in p]
    ys = [y for _, p in series for _, y in p]
    yticks = log_ticks(min(ys), max(ys)) if log else nice_ticks(min(ys), max(ys))
    xticks = [t for t in nice_ticks(min(xs), max(xs), 6) if t == int(t)] or [min(xs)]
    labels = [f"{t:g}%" if percent else f"{t:.3g}" if t == 0 or 1e-3 <= abs(t) < 1e4
              else f"{t:.0e}" for t in yticks]
    left = x0 + 40 + max(text_size(s, size)[0] for s in labels) + 12
    plot = (left, top, x1 - 36, y1 - 70)
    scale = math.log10 if log else (lambda v: v)
    lo_y, hi_y = scale(yticks[0]), scale(yticks[-1])
    lo_x, hi_x = min(xticks[0], min(xs)), max(xticks[-1], max(xs))
    if hi_x <= lo_x:  # one epoch: its point in the middle
        lo_x, hi_x = lo_x - 1, hi_x + 1

    def to_pixel(x, y):
        px = plot[0] + (x - lo_x) / (hi_x - lo_x) * (plot[2] - plot[0])
        py = plot[3] - (scale(y) - lo_y) / ((hi_y - lo_y) or 1) * (plot[3] - plot[1])
        return px, py

    for t, label in zip(yticks, labels):
        py = to_pixel(lo_x, t)[1]
        draw.line([(plot[0], py), (plot[2], py)], fill=GRID, width=1)
        draw_text(draw, (plot[0] - 8, py), label, size, align="right", valign="middle")
    for t in xticks:
        px = to_pixel(t, yticks[0])[0]
        draw.line([(px, plot[3]), (px, plot[3] + 6)], fill=AXIS, width=2)
        draw_text(draw, (px, plot[3] + 10), f"{t:g}", size, align="center")
    draw.rectangle(plot, outline=AXIS, width=2)
    for k, ((label, colour), (_, p)) in enumerate(zip(entries, series)):
        pixels = [to_pixel(x, y) for x, y in p]
        # Earlier series are drawn wider, so a line that a later one covers still shows.
        width = round(5 - 3 * k / (len(series) - 1)) if len(series) > 1 else 3
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=width, joint="curve")
        if len(pixels) <= 40:
            r = width / 2 + 2
            for px, py in pixels:
                draw.ellipse([px - r, py - r, px + r, py + r], fill=colour)
    draw_text(draw, ((plot[0] + plot[2]) / 2, y1 - 8), "epoch", size, align="center",
              valign="bottom")
    paste_vertical(canvas, (x0 + 16, (plot[1] + plot[3]) / 2), ylabel, size)


def training_curves(records: Sequence[Dict], loss_terms: Sequence[str] = ("cls", "ta", "pa", "v")
                    ) -> Image.Image:
    """Seven panels of metrics.jsonl records against the epoch: losses and first-step gradient
    norms (log scale), learning rate, WAR/UAR, per-class recall, soft-prompt diagnostics."""
    canvas = Image.new("RGB", (2400, 1100), "white")
    epochs = [r["epoch"] for r in records]
    series = [("loss", "total"), *((name, name) for name in loss_terms)]

    def column(key, factor=1.0):
        return [None if r.get(key) is None else factor * r[key] for r in records]

    # Switched-off terms are 0: nothing to draw (None keeps the others' colours).
    losses = [(label, epochs, column(key) if any(v for v in column(key)) else [None])
              for key, label in series]
    off = [label for key, label in series if not any(v for v in column(key))]
    title = "training losses (log scale)" + (f"; off: {', '.join(off)}" if off else "")
    line_panel(canvas, (0, 0, 800, 550), losses, title, "loss", log=True)
    norms = [(name, epochs, [(r.get("grad_norms") or {}).get(name) for r in records])
             for name in loss_terms]
    line_panel(canvas, (800, 0, 1600, 550), norms, "gradient norm per term, first step (log)",
               "gradient norm", log=True, note="no gradient norms recorded",
               first_colour=1)  # each term in its colour of the loss panel
    line_panel(canvas, (1600, 0, 2400, 550), [("lr", epochs, column("lr"))],
               "learning rate (end of epoch)", "learning rate")
    line_panel(canvas, (0, 550, 600, 1100),
               [("WAR", epochs, column("war", 100)), ("UAR", epochs, column("uar", 100))],
               "evaluation accuracy", "WAR / UAR (%)", percent=True)
    names = list(next((r["per_class_recall"] for r in records if r.get("per_class_recall")), {}))
    recall = [(name, epochs, [100 * r["per_class_recall"][name] if r.get("per_class_recall")
                              and name in r["per_class_recall"] else None for r in records])
              for name in names]
    line_panel(canvas, (600, 550, 1200, 1100), recall, "per-class recall", "recall (%)",
               percent=True, note="no per-class recall recorded")
    # Near 1, the shared context outweighs the class names, and L_ta can only move the context.
    line_panel(canvas, (1200, 550, 1800, 1100), [("cos", epochs, column("soft_pooled_cos"))],
               "soft prompts, pooled as L_ta: cos", "mean cosine between classes",
               note="not recorded")
    line_panel(canvas, (1800, 550, 2400, 1100), [("norm", epochs, column("ctx_norm"))],
               "text context: mean norm", "L2 norm per context vector", note="not recorded")
    return canvas


# -- confusion matrix -------------------------------------------------------------------------

def confusion_figure(metrics: Dict, counts: bool = False, title: str = "") -> Image.Image:
    """Row-normalised confusion matrix (% of each true class, or the `counts`), colour scale."""
    names, matrix = metrics["classnames"], np.asarray(metrics["confusion"], dtype=np.float64)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)  # [C, C] rows sum to 1
    size, n = 20, len(names)
    cell = max(84, max(text_size(c, size)[0] for c in names) + 16)
    name_width = max(text_size(c, size)[0] for c in names)
    left, top = 50 + name_width + 14, 150 if title else 120
    width, height = left + n * cell + 150, top + n * cell + 90
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    heading = f"WAR {100 * metrics['war']:.2f}%   UAR {100 * metrics['uar']:.2f}%"
    draw_text(draw, (left + n * cell / 2, 12), title or heading, 24, align="center")
    if title:
        draw_text(draw, (left + n * cell / 2, 46), heading, size, align="center")
    for i in range(n):
        for j in range(n):
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell, top + (i + 1) * cell)
            colour = colour_of(rates[i, j], BLUE_ANCHORS)
            draw.rectangle(box, fill=colour, outline=(255, 255, 255), width=1)
            value = f"{int(matrix[i, j])}" if counts else f"{100 * rates[i, j]:.1f}"
            draw_text(draw, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), value, size,
                      align="center", valign="middle", fill=ink_on(colour))
        draw_text(draw, (left - 10, top + (i + 0.5) * cell), names[i], size, align="right",
                  valign="middle")
        draw_text(draw, (left + (i + 0.5) * cell, top - 10), names[i], size, align="center",
                  valign="bottom")
    draw.rectangle((left, top, left + n * cell, top + n * cell), outline=AXIS, width=2)
    draw_text(draw, (left + n * cell / 2, top - 44), "predicted", 22, align="center",
              valign="bottom")
    paste_vertical(canvas, (20, top + n * cell / 2), "true", 22)
    unit = ("numbers: counts; colour: % of the true class (each row sums to 100%)" if counts
            else "% of each true class (each row sums to 100%)")
    draw_text(draw, (left + n * cell / 2, top + n * cell + 16), unit, 18, align="center")
    # The colour scale: 0% (bottom) to 100% (top), ticks every 25%.
    x0, y0, x1, y1 = left + n * cell + 30, top, left + n * cell + 56, top + n * cell
    ramp = colormap(np.linspace(1, 0, y1 - y0)[:, None].repeat(x1 - x0, axis=1), BLUE_ANCHORS)
    canvas.paste(Image.fromarray(ramp, "RGB"), (x0, y0))
    draw.rectangle((x0, y0, x1, y1), outline=AXIS, width=1)
    for value in (0, 25, 50, 75, 100):
        y = y1 - value / 100 * (y1 - y0)
        draw.line([(x1, y), (x1 + 6, y)], fill=AXIS, width=2)
        draw_text(draw, (x1 + 10, y), f"{value}%", 18, valign="middle")
    return canvas


# -- attention --------------------------------------------------------------------------------

def heat_overlay(image: Image.Image, attention: np.ndarray, size: int) -> Image.Image:
    """The face under its patch attention `[g, g]`, upsampled, blended more where it is high."""
    heat = np.asarray(attention, dtype=np.float32)
    heat = heat / heat.max() if heat.max() > 0 else np.zeros_like(heat)
    smooth = np.asarray(Image.fromarray(heat, mode="F").resize((size, size), Image.BILINEAR))
    face = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), np.float32)
    alpha = (0.2 + 0.45 * np.clip(smooth, 0, 1))[..., None]  # [size, size, 1]
    blended = (1 - alpha) * face + alpha * colormap(smooth).astype(np.float32)
    return Image.fromarray(blended.round().astype(np.uint8), "RGB")


def attention_grid(tiles: Sequence[Tuple[Image.Image, np.ndarray, Sequence[str]]],
                   columns: int = 4, size: int = 256) -> Image.Image:
    """Faces with their heat maps and caption lines under them; a heat scale at the bottom."""
    if not tiles:
        raise ValueError("attention_grid needs at least one image")
    columns = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    line = text_size("Hg", 20)[1] + 8
    caption = line * max(len(t[2]) for t in tiles) + 8
    pad = 16
    width = columns * (size + pad) + pad
    height = rows * (size + caption + pad) + pad + 60
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (image, attention, lines) in enumerate(tiles):
        x = pad + (k % columns) * (size + pad)
        y = pad + (k // columns) * (size + caption + pad)
        canvas.paste(heat_overlay(image, attention, size), (x, y))
        for i, text in enumerate(lines):
            text = shorten(text, size, 20 if i else 22)
            draw_text(draw, (x + size / 2, y + size + 6 + i * line), text, 20 if i else 22,
                      align="center")
    bar_y, bar_w = height - 44, min(300, width - 2 * pad - 160)
    bar_x = (width - bar_w) / 2
    ramp = colormap(np.linspace(0, 1, round(bar_w))[None, :].repeat(14, axis=0))
    canvas.paste(Image.fromarray(ramp, "RGB"), (round(bar_x), bar_y))
    draw_text(draw, (bar_x - 8, bar_y + 7), "attention: low", 18, align="right", valign="middle")
    draw_text(draw, (bar_x + bar_w + 8, bar_y + 7), "high", 18, valign="middle")
    return canvas


def shorten(text: str, width: int, size: int) -> str:
    """`text`, cut in the middle with an ellipsis until it fits `width` pixels."""
    if text_size(text, size)[0] <= width:
        return text
    keep = len(text)
    while keep > 4 and text_size(text[:keep // 2] + "…" + text[-(keep // 2):], size)[0] > width:
        keep -= 1
    return text[:keep // 2] + "…" + text[-(keep // 2):]
