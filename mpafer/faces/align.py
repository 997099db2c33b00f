"""Cutting a detected face out of a photo the way a dataset's training crops were made.

Landmark conventions map the face's 5 landmarks onto a template with the least-squares
similarity transform (rotation, uniform scale, translation; Umeyama, 1991) and warp the photo
with it. The box convention cuts a square around the detector's box instead.

Coordinates are pixel centres: pixel (i, j) covers [i - 0.5, i + 0.5] x [j - 0.5, j + 0.5], as
the detector's landmarks and the templates below use them.

    faces = detect_and_align(photo, MTCNN(), "rafdb")   # [AlignedFace(crop, box, landmarks,
                                                        #              score), ...]
"""
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from PIL import Image

Point = Tuple[float, float]

# The widely used 5-point template of 112 x 112 face crops (ArcFace / InsightFace): left eye,
# right eye, nose tip, left and right mouth corner, in pixels of the crop.
TEMPLATE_112 = ((38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366),
                (41.5493, 92.3655), (70.7299, 92.2041))


# Where FER2013's 48 x 48 crops hold the same 5 landmarks: their median over the training crops
# (`python -m mpafer.bench template`; the README has the measurement).
TEMPLATE_FER2013_48 = ((14.41, 19.09), (32.59, 18.89), (23.62, 29.15),
                       (15.93, 38.00), (31.29, 37.87))


def scaled_template(side: int, template: Sequence[Point] = TEMPLATE_112,
                    template_side: int = 112) -> Tuple[Point, ...]:
    """The template for a side x side crop with the same proportions: scaled about the crop's
    top-left corner, pixel centres kept on pixel centres."""
    factor = side / template_side
    return tuple(((x + 0.5) * factor - 0.5, (y + 0.5) * factor - 0.5) for x, y in template)


class Convention(NamedTuple):
    """How one dataset's face crops look. `template` None means a box crop: a square of
    (1 + 2 * margin) times the detector box's longer side, about its centre, at the photo's own
    resolution (the model's input transform resizes it)."""
    name: str
    size: Optional[Tuple[int, int]]  # output width, height (None: the box's own size)
    template: Optional[Tuple[Point, ...]]  # 5 landmarks in output pixels
    grey: bool  # the dataset's faces are grey (returned as RGB with equal channels)
    margin: float
    derivation: str  # how the entry was derived, and which of its values are our choices


CONVENTIONS: Dict[str, Convention] = {
    "rafdb": Convention(
        "rafdb", (100, 100), scaled_template(100), False, 0.0,
        "RAF-DB's aligned faces are 100 x 100 RGB crops, made by a similarity transform of "
        "5 landmarks onto fixed places. The size and the method are the dataset's; the places "
        "are our choice: RAF-DB does not publish its template, so we use the common 112 x 112 "
        "5-point template (ArcFace's) scaled to 100 x 100."),
    "ferplus": Convention(
        "ferplus", (48, 48), TEMPLATE_FER2013_48, True, 0.0,
        "FER2013 / FERPlus faces are 48 x 48 grey, tightly cropped, roughly upright. Size and "
        "grey are the dataset's. Its crops were not made from landmarks, so the places are "
        "measured: the median landmarks of FER2013's training crops, whose faces are larger "
        "and higher in the crop than the common 5-point template scaled to 48 x 48 puts them."),
    "affectnet": Convention(
        "affectnet", None, None, False, 0.1,
        "AffectNet's training images are cut to the annotated face box (no landmark "
        "alignment), so a box crop: a square about the detector's box. The margin (10% of the "
        "box's longer side on each side) is our choice: the detector's boxes run from the "
        "brows to the chin, AffectNet's include the forehead."),
    "folder": Convention(
        "folder", (224, 224), scaled_template(224), False, 0.0,
        "Our default for image folders (any data): landmark alignment with the common "
        "112 x 112 5-point template, scaled to 224 x 224 so that a large face keeps its detail "
        "at CLIP's usual input size."),
}

# The convention of each dataset a checkpoint may have been trained on (mpafer's dataset names;
# the synthetic demo faces are drawn upright and centred, like an aligned folder).
DATASET_CONVENTIONS = {"rafdb": "rafdb", "ferplus": "ferplus", "affectnet7": "affectnet",
                       "affectnet8": "affectnet", "folder": "folder", "synthetic": "folder"}


def get_convention(convention: Union[str, Convention]) -> Convention:
    if isinstance(convention, Convention):
        return convention
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown face crop convention {convention!r}; known: "
                         f"{', '.join(CONVENTIONS)}")
    return CONVENTIONS[convention]


def similarity_transform(source, target) -> torch.Tensor:
    """The least-squares similarity transform taking points `source` [N, 2] onto `target`
    [N, 2] (Umeyama, 1991; no reflection): a [2, 3] matrix M, target ~ M @ [x, y, 1]."""
    src = torch.as_tensor(source, dtype=torch.float64).reshape(-1, 2)
    dst = torch.as_tensor(target, dtype=torch.float64).reshape(-1, 2)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    covariance = dst_c.T @ src_c / len(src)  # [2, 2]
    u, singular, vt = torch.linalg.svd(covariance)
    # Flip the last axis if the best orthogonal map would be a reflection.
    flip = torch.ones(2, dtype=torch.float64)
    if torch.det(u) * torch.det(vt) < 0:
        flip[1] = -1
    rotation = u @ torch.diag(flip) @ vt
    scale = (singular * flip).sum() / src_c.pow(2).sum(1).mean()
    translation = dst_mean - scale * rotation @ src_mean
    return torch.cat([scale * rotation, translation[:, None]], dim=1)


def apply_transform(matrix: torch.Tensor, points) -> torch.Tensor:
    """[2, 3] matrix applied to points [N, 2] -> [N, 2]."""
    pts = torch.as_tensor(points, dtype=torch.float64).reshape(-1, 2)
    return pts @ matrix[:, :2].T + matrix[:, 2]


def warp(image: Image.Image, matrix: torch.Tensor, size: Tuple[int, int]) -> Image.Image:
    """The picture seen through `matrix` (photo pixels -> output pixels) on a size (width,
    height) canvas, bilinear; black where the photo does not reach."""
    inverse = torch.linalg.inv(torch.cat([matrix, matrix.new_tensor([[0, 0, 1]])]))[:2]
    # PIL maps output to input in continuous coordinates, where pixel i's centre is at i + 0.5.
    (a, b, c), (d, e, f) = inverse.tolist()
    coefficients = (a, b, c + 0.5 - 0.5 * (a + b), d, e, f + 0.5 - 0.5 * (d + e))
    return image.convert("RGB").transform(size, Image.Transform.AFFINE, coefficients,
                                          resample=Image.Resampling.BILINEAR)


def box_crop(image: Image.Image, box: Sequence[float], margin: float) -> Image.Image:
    """A square of (1 + 2 * margin) times the box's longer side about its centre, cut at the
    picture's border (not padded), as the datasets' box crops are."""
    x0, y0, x1, y1 = box
    half = max(x1 - x0, y1 - y0) * (0.5 + margin)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    width, height = image.size
    left, top = max(0, round(cx - half)), max(0, round(cy - half))
    right, bottom = min(width, round(cx + half)), min(height, round(cy + half))
    return image.crop((left, top, max(right, left + 1), max(bottom, top + 1))).convert("RGB")


def align_face(image: Image.Image, landmarks, box: Sequence[float],
               convention: Union[str, Convention]) -> Image.Image:
    """One face cut out of `image` by the convention: landmarks [5, 2] (x, y) in the picture's
    pixels, box [x0, y0, x1, y1] likewise. -> an RGB PIL image."""
    convention = get_convention(convention)
    if convention.template is None:
        crop = box_crop(image, box, convention.margin)
    else:
        matrix = similarity_transform(landmarks, convention.template)
        crop = warp(image, matrix, convention.size)
    return crop.convert("L").convert("RGB") if convention.grey else crop


class AlignedFace(NamedTuple):
    crop: Image.Image  # the face as the convention cuts it
    box: Tuple[float, float, float, float]  # x0, y0, x1, y1 in the picture's pixels
    landmarks: Tuple[Point, ...]  # left eye, right eye, nose, left and right mouth corner
    score: float  # the detector's face probability


def detect_and_align(image: Image.Image, detector, convention: Union[str, Convention],
                     max_side: Optional[int] = None, min_face: Optional[float] = None
                     ) -> List[AlignedFace]:
    """Every face `detector` (an `MTCNN`) finds in `image`, best score first, each cut out by
    `convention`. `max_side` and `min_face` as in `MTCNN.detect`."""
    image = image.convert("RGB")
    found = detector.detect(image, max_side=max_side, min_face=min_face)
    faces = []
    for box, score, landmarks in zip(found.boxes.tolist(), found.scores.tolist(),
                                     found.landmarks.tolist()):
        faces.append(AlignedFace(align_face(image, landmarks, box, convention), tuple(box),
                                 tuple(tuple(p) for p in landmarks), score))
    return faces
