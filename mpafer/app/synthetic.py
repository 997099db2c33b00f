"""Procedurally drawn cartoon faces, so the whole pipeline runs with nothing downloaded. The
expression is in the brows, eyes and mouth; all else is random and carries no label. Each image
comes from (seed, split, index) through its own numpy Generator (no global random state)."""
import math

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ..labels import BASIC_CLASSES

# The 7 basic expressions in canonical order (mpafer.data.CANONICAL_CLASSES without contempt).
SYNTHETIC_CLASSES = BASIC_CLASSES
# The version of the face drawing below: bump it whenever a change alters the pixels, since
# caches of what was computed from the faces (prototypes) are keyed by it.
RENDERER_VERSION = 2

# Separate seed streams per split, so train and test never share an image.
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

# How each expression moves the face, in face units: u runs -1..1 from the face's left to
# right edge, v runs -1..1 from top to bottom (positive v is *down*).
#   brow: (inner end v, outer end v, arch height, thickness)
#   eyes: ("open", openness) -- white eye with pupil, openness = height / width
#         ("smile",)         -- closed, upward-curved eyes
#   mouth: a shape name drawn by _draw_mouth
_NEUTRAL_BROW = (-0.40, -0.40, 0.03, 0.09)
_EXPRESSIONS = {
    "neutral":   dict(brow=_NEUTRAL_BROW,              eyes=("open", 0.75), mouth="line"),
    "happiness": dict(brow=(-0.46, -0.44, 0.07, 0.09), eyes=("smile",),     mouth="smile"),
    "surprise":  dict(brow=(-0.68, -0.62, 0.12, 0.09), eyes=("open", 1.30), mouth="tall_o"),
    "sadness":   dict(brow=(-0.60, -0.32, 0.00, 0.09), eyes=("open", 0.55), mouth="frown"),
    "anger":     dict(brow=(-0.22, -0.52, 0.00, 0.13), eyes=("open", 0.40), mouth="teeth"),
    "disgust":   dict(brow=(-0.28, -0.34, -0.02, 0.11), eyes=("open", 0.30), mouth="snarl"),
    "fear":      dict(brow=(-0.66, -0.52, 0.00, 0.09), eyes=("open", 1.30), mouth="wide_open"),
}
assert tuple(_EXPRESSIONS) == SYNTHETIC_CLASSES

# How a captioner might describe each expression: a mood word and a phrase each for the brows,
# the eyes and the mouth; the class names never appear ("a happy face", never "happiness").
CAPTION_WORDS = {
    "neutral": ("calm", "level relaxed brows", "eyes open", "lips closed and level"),
    "happiness": ("happy", "relaxed brows", "eyes narrowed and crinkled",
                  "lip corners pulled up into a smile with teeth showing"),
    "surprise": ("surprised", "brows raised high and curved", "wide round eyes",
                 "jaw dropped into an open oval mouth"),
    "sadness": ("sad", "inner brow ends drawn up", "upper lids drooping",
                "lip corners pulled down"),
    "anger": ("angry", "brows lowered and pulled together", "a hard glaring stare",
              "a squared mouth with the jaw clenched"),
    "disgust": ("disgusted", "brows lowered", "eyes narrowed",
                "nose wrinkled and upper lip raised"),
    "fear": ("scared", "brows raised and drawn together", "wide staring eyes",
             "mouth open with the lips stretched sideways"),
}
assert tuple(CAPTION_WORDS) == SYNTHETIC_CLASSES
CAPTION_TEMPLATES = ("{a_mood} face.", "a face with {brows}, {eyes} and {mouth}.",
                     "{mood}, {mouth}.", "a drawing of {eyes} and {mouth}.",
                     "{a_mood} person with {brows}.")

_SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased shapes even at 32 px

# Two drawing styles (sizes in image units, tilt in degrees): "web", colour faces in clutter (the
# demo CLIP pre-trains on these); "portrait", aligned grey-scale crops like a FER dataset's.
STYLES = {
    "web": dict(shift=0.07, radius=(0.29, 0.37), tilt=10, clutter=True, grey=False,
                noise=(2.0, 9.0)),
    "portrait": dict(shift=0.02, radius=(0.38, 0.42), tilt=4, clutter=False, grey=True,
                     noise=(1.0, 4.0)),
}


class SyntheticFaces(Dataset):
    """`num_per_class` faces of each basic expression, labels interleaved (index % 7); split
    "train", "val" or "test" (disjoint seeds). Items: (transform(RGB PIL image), label)."""

    def __init__(self, split, num_per_class=200, image_size=64, seed=0, transform=None,
                 style="portrait"):
        if split not in _SPLIT_CODES:
            raise ValueError(f"unknown split {split!r} for synthetic faces; "
                             f"valid splits: {', '.join(_SPLIT_CODES)}")
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r} for synthetic faces; "
                             f"valid styles: {', '.join(STYLES)}")
        if num_per_class < 1 or image_size < 16:
            raise ValueError(f"need num_per_class >= 1 and image_size >= 16, "
                             f"got {num_per_class} and {image_size}")
        self.split = split
        self.num_per_class = int(num_per_class)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.transform = transform
        self.style = style
        self.classnames = SYNTHETIC_CLASSES
        self.targets = [i % len(SYNTHETIC_CLASSES) for i in range(len(self))]
        self.skipped = []  # same attribute as the file-backed datasets; nothing is ever skipped

    def __len__(self):
        return self.num_per_class * len(SYNTHETIC_CLASSES)

    def class_counts(self):
        return [self.num_per_class] * len(SYNTHETIC_CLASSES)

    def load(self, index):
        """The untransformed RGB PIL image at `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} synthetic faces")
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], index])
        return draw_face(SYNTHETIC_CLASSES[self.targets[index]], self.image_size, rng, self.style)

    def __getitem__(self, index):
        image = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def draw_face(expression, image_size, rng, style="portrait"):
    """One face showing `expression` as an RGB PIL image; all randomness comes from `rng`."""
    shape, look = _EXPRESSIONS[expression], STYLES[style]
    size = image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (size, size), _random_colour(rng))
    draw = ImageDraw.Draw(canvas)
    if look["clutter"]:
        _draw_background(draw, size, rng)

    face = _FaceFrame(
        cx=size * (0.5 + rng.uniform(-look["shift"], look["shift"])),
        cy=size * (0.52 + rng.uniform(-look["shift"], look["shift"])),
        rx=size * rng.uniform(*look["radius"]),
        aspect=rng.uniform(1.1, 1.25),
        tilt=math.radians(rng.uniform(-look["tilt"], look["tilt"])),
    )
    skin = _skin_tone(rng)
    ink = tuple(int(c) for c in rng.integers(5, 55, size=3))  # dark features on any skin

    _draw_head(draw, face, skin, rng)
    intensity = rng.uniform(0.75, 1.15)  # how strongly this face makes its expression
    _draw_brows(draw, face, shape["brow"], intensity, ink, rng)
    _draw_eyes(draw, face, shape["eyes"], intensity, ink, rng)
    _draw_nose(draw, face, expression == "disgust", ink)
    _draw_mouth(draw, face, shape["mouth"], intensity, ink, rng)

    image = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    if look["grey"]:
        image = image.convert("L").convert("RGB")
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, rng.uniform(*look["noise"]), size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def face_captions(expression):
    """The captions of a face showing `expression`, one per CAPTION_TEMPLATES entry."""
    mood, brows, eyes, mouth = CAPTION_WORDS[expression]
    a_mood = ("an " if mood[0] in "aeiou" else "a ") + mood
    return [t.format(mood=mood, a_mood=a_mood, brows=brows, eyes=eyes, mouth=mouth)
            for t in CAPTION_TEMPLATES]


class _FaceFrame:
    """Maps face units (u, v) in [-1, 1] to canvas pixels, with the face's tilt."""

    def __init__(self, cx, cy, rx, aspect, tilt):
        self.cx, self.cy, self.rx, self.ry = cx, cy, rx, rx * aspect
        self.cos, self.sin = math.cos(tilt), math.sin(tilt)

    def point(self, u, v):
        x, y = u * self.rx, v * self.ry
        return (self.cx + x * self.cos - y * self.sin, self.cy + x * self.sin + y * self.cos)

    def points(self, us, vs):
        return [self.point(u, v) for u, v in zip(us, vs)]

    def ellipse(self, u0, v0, a, b, n=28):
        """Polygon of an ellipse centred at (u0, v0) with radii a (along u) and b (along v)."""
        t = np.linspace(0, 2 * math.pi, n, endpoint=False)
        return self.points(u0 + a * np.cos(t), v0 + b * np.sin(t))

    def width(self, thickness):
        return max(1, round(thickness * self.rx))


def _random_colour(rng, low=0, high=256):
    return tuple(int(c) for c in rng.integers(low, high, size=3))


def _skin_tone(rng):
    # Blend between a light and a dark skin colour, with a little per-channel jitter.
    light, dark = np.array([250, 220, 195]), np.array([115, 75, 50])
    t = rng.uniform()
    tone = light * (1 - t) + dark * t + rng.uniform(-12, 12, size=3)
    return tuple(int(c) for c in np.clip(tone, 0, 255))


def _draw_background(draw, size, rng):
    # A few random blobs and bars: clutter that a model must learn to ignore.
    for _ in range(rng.integers(0, 5)):
        x0, y0 = rng.uniform(-0.2, 1.0, size=2) * size
        w, h = rng.uniform(0.1, 0.6, size=2) * size
        box = [x0, y0, x0 + w, y0 + h]
        if rng.uniform() < 0.5:
            draw.ellipse(box, fill=_random_colour(rng))
        else:
            draw.rectangle(box, fill=_random_colour(rng))


def _draw_head(draw, face, skin, rng):
    if rng.uniform() < 0.75:  # hair: a cap behind the top of the head
        hair = _random_colour(rng, 10, 140)
        draw.polygon(face.ellipse(0, -0.12, rng.uniform(1.04, 1.15), rng.uniform(0.92, 1.02)),
                     fill=hair)
    for side in (-1, 1):  # ears
        draw.polygon(face.ellipse(side * 0.98, -0.02, 0.14, 0.22), fill=skin)
    draw.polygon(face.ellipse(0, 0, 1, 1, n=48), fill=skin)


def _draw_brows(draw, face, brow, intensity, ink, rng):
    inner, outer, arch, thickness = brow
    base_inner, base_outer, base_arch, _ = _NEUTRAL_BROW
    # Scale the expression's deviation from the neutral brow by the intensity.
    inner = base_inner + intensity * (inner - base_inner) + rng.uniform(-0.03, 0.03)
    outer = base_outer + intensity * (outer - base_outer) + rng.uniform(-0.03, 0.03)
    arch = base_arch + intensity * (arch - base_arch)
    t = np.linspace(0, 1, 9)
    for side in (-1, 1):
        us = side * (0.13 + 0.47 * t)
        vs = inner + (outer - inner) * t - arch * np.sin(math.pi * t)
        draw.line(face.points(us, vs), fill=ink, width=face.width(thickness), joint="curve")


def _draw_eyes(draw, face, eyes, intensity, ink, rng):
    v0, a = -0.12 + rng.uniform(-0.02, 0.02), 0.17
    for side in (-1, 1):
        u0 = side * 0.36
        if eyes[0] == "smile":  # closed eyes curved upwards, as in a broad smile
            t = np.linspace(-1, 1, 9)
            draw.line(face.points(u0 + a * t, v0 + 0.03 - 0.09 * (1 - t ** 2)),
                      fill=ink, width=face.width(0.08), joint="curve")
            continue
        openness = 0.75 + intensity * (eyes[1] - 0.75)
        b = a * openness
        sclera = tuple(int(c) for c in rng.integers(225, 256, size=3))
        draw.polygon(face.ellipse(u0, v0, a, b), fill=sclera, outline=ink,
                     width=face.width(0.04))
        pupil = min(b, a) * 0.65
        draw.polygon(face.ellipse(u0, v0, pupil, pupil), fill=ink)


def _draw_nose(draw, face, wrinkled, ink):
    draw.line(face.points([0.0, -0.07, 0.04], [-0.02, 0.22, 0.24]), fill=ink,
              width=face.width(0.05), joint="curve")
    if wrinkled:  # disgust wrinkles the nose
        for side in (-1, 1):
            for dv in (0.0, 0.08):
                draw.line(face.points([side * 0.10, side * 0.22], [0.02 + dv, -0.04 + dv]),
                          fill=ink, width=face.width(0.05))


def _draw_mouth(draw, face, kind, intensity, ink, rng):
    v0 = 0.52 + rng.uniform(-0.03, 0.03)
    line = face.width(0.10)
    t = np.linspace(-1, 1, 13)
    if kind == "line":
        w = 0.32
        draw.line(face.points(w * t, v0 + 0 * t), fill=ink, width=line)
    elif kind == "frown":
        w, depth = 0.34, 0.20 * intensity
        draw.line(face.points(w * t, v0 + 0.08 - depth * (1 - t ** 2)), fill=ink, width=line,
                  joint="curve")
    elif kind == "smile":  # a wide open grin: dark crescent with a band of teeth
        w, depth = 0.46, 0.30 * intensity
        upper = v0 - 0.06 + 0.05 * (1 - t ** 2)
        lower = v0 - 0.06 + depth * (1 - t ** 2)
        draw.polygon(face.points(w * t, upper) + face.points(w * t[::-1], lower[::-1]), fill=ink)
        teeth = upper + 0.35 * (lower - upper)
        draw.polygon(face.points(0.8 * w * t, upper + 0.02) +
                     face.points(0.8 * w * t[::-1], teeth[::-1]), fill=(245, 245, 240))
    elif kind == "tall_o":
        draw.polygon(face.ellipse(0, v0 + 0.06, 0.15, 0.17 + 0.08 * intensity), fill=ink)
    elif kind == "wide_open":
        draw.polygon(face.ellipse(0, v0 + 0.02, 0.44, 0.07 + 0.05 * intensity), fill=ink)
    elif kind == "teeth":  # bared, clenched teeth
        w, h = 0.33, 0.06 + 0.04 * intensity
        box = face.points([-w, w, w, -w], [v0 - h, v0 - h, v0 + h, v0 + h])
        draw.polygon(box, fill=(245, 245, 240), outline=ink, width=face.width(0.06))
        draw.line(face.points([-w, w], [v0, v0]), fill=ink, width=face.width(0.04))
        for u in (-w / 2, 0, w / 2):
            draw.line(face.points([u, u], [v0 - h, v0 + h]), fill=ink, width=face.width(0.04))
    elif kind == "snarl":  # one-sided raised upper lip, a wavy line
        w, side = 0.34, rng.choice([-1, 1])
        wave = 0.06 * np.sin(1.5 * math.pi * (t + 1)) - 0.12 * intensity * side * t
        draw.line(face.points(w * t, v0 + wave), fill=ink, width=line, joint="curve")
    else:
        raise ValueError(f"unknown mouth shape {kind!r}")
