"""`python -m mpafer.bench template`: where a dataset's face crops hold the five landmarks, and how
closely a crop convention cuts crops like them.

    python -m mpafer.bench template --images FER2013/train --held-out FER2013/test \
        --convention ferplus --json fer2013-template.json

Every crop (a folder searched for images, all of one size) is enlarged --upscale times (MTCNN
finds no face under 12 pixels) and searched for one face at least 40% of its side; a face found
with probability >= 0.95 gives its landmarks in the crop's own pixels. Printed: their median over
--images (a template measured on the data) beside the convention's template. With --held-out,
each of those crops is cut again from its own enlarged copy by aligning its landmarks onto each
template, and compared with the crop as the dataset has it: the mean absolute difference in grey
levels, on the pixels that both templates' crops reach (lower: more like the dataset's crops).
"""
import argparse
import os
import random
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ...data.base import IMAGE_EXTENSIONS
from ...faces import MTCNN
from ...faces.align import CONVENTIONS, similarity_transform, warp
from ...files import atomic_write_json
from ...progress import progress_bar
from ..cli import ArgumentParser

LANDMARKS = ("left eye", "right eye", "nose", "left mouth corner", "right mouth corner")


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m mpafer.bench template", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="a folder of the dataset's face crops")
    p.add_argument("--held-out", help="another folder of them, to compare the templates on")
    p.add_argument("--convention", default="ferplus",
                   choices=[c for c, v in CONVENTIONS.items() if v.template is not None])
    p.add_argument("--limit", type=int, default=5000, help="crops read per folder, drawn at random")
    p.add_argument("--upscale", type=int, default=4)
    p.add_argument("--detector-weights", help="a folder holding pnet.pt, rnet.pt and onet.pt")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args(argv)
    if args.limit < 1 or args.upscale < 1:
        p.error("--limit and --upscale must be at least 1")
    for flag, folder in (("--images", args.images), ("--held-out", args.held_out)):
        if folder is not None and not os.path.isdir(folder):
            p.error(f"{flag}: no such folder: {folder}")
    return args


def image_files(folder: str, limit: int) -> List[str]:
    found = sorted(os.path.join(top, name) for top, _, names in os.walk(folder) for name in names
                   if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS)
    random.Random(0).shuffle(found)
    return found[:limit]


def landmarks_in_crops(detector: MTCNN, paths: Sequence[str], upscale: int,
                       size: Optional[Tuple[int, int]] = None):
    """Yields (crop as grey [H, W], its enlarged RGB copy, landmarks [5, 2] in the copy) for each
    crop with a face, one at a time (the copies are not kept); all crops must have one size
    (`size`, else the first crop's)."""
    for path in progress_bar(paths, desc="detecting", leave=False):
        with Image.open(path) as image:
            if size is not None and image.size != tuple(size):
                raise ValueError(f"{path} is {image.width} x {image.height}, the crops before it "
                                 f"{size[0]} x {size[1]}: the crops compared share a size")
            size = image.size
            grey = np.asarray(image.convert("L"), dtype=np.float64)
            big = image.convert("RGB").resize((image.width * upscale, image.height * upscale),
                                              Image.Resampling.BICUBIC)
        faces = detector.detect(big, min_face=0.4 * min(big.size))
        if len(faces.scores) and float(faces.scores.max()) >= 0.95:
            yield grey, big, faces.landmarks[int(faces.scores.argmax())].numpy()


def in_crop(landmarks: np.ndarray, upscale: int) -> np.ndarray:
    """Landmarks of the enlarged copy in the crop's pixels (pixel centres on pixel centres)."""
    return (landmarks.astype(np.float64) + 0.5) / upscale - 0.5


def crop_differences(faces, templates: Dict[str, np.ndarray]) -> Dict[str, List[float]]:
    """Per face and template: mean |crop cut by the template - the dataset's crop|."""
    differences = {name: [] for name in templates}
    for grey, big, landmarks in faces:
        size = grey.shape[::-1]  # (width, height)
        white = Image.new("RGB", big.size, (255, 255, 255))
        reached, cut = np.ones(grey.shape, bool), {}
        for name, template in templates.items():
            matrix = similarity_transform(landmarks, template)
            cut[name] = np.asarray(warp(big, matrix, size).convert("L"), dtype=np.float64)
            reached &= np.asarray(warp(white, matrix, size).convert("L")) == 255
        for name in templates:
            differences[name].append(float(np.abs(cut[name] - grey)[reached].mean()))
    return differences


def main(argv=None):
    args = parse_args(argv)
    detector = MTCNN(args.detector_weights)
    paths = image_files(args.images, args.limit)
    points, crop_size = [], None
    for grey, _, landmarks in landmarks_in_crops(detector, paths, args.upscale):
        points.append(in_crop(landmarks, args.upscale))
        crop_size = list(grey.shape[::-1])  # (width, height)
    if not points:
        raise ValueError(f"--images: no face found in {len(paths)} crops of {args.images}")
    median = np.median(np.stack(points), axis=0)  # [5, 2] over [N, 5, 2]
    current = np.asarray(CONVENTIONS[args.convention].template, dtype=np.float64)
    results = {"images": args.images, "crops": len(paths), "faces": len(points),
               "crop_size": crop_size, "median": median.round(2).tolist(),
               "convention": args.convention, "template": current.round(2).tolist()}
    print(f"{len(points)} faces in {len(paths)} crops of {args.images} "
          f"({results['crop_size'][0]} x {results['crop_size'][1]})")
    print(f"{'landmark':<20}{'median (x, y)':>18}{'--convention ' + args.convention:>26}")
    for name, m, t in zip(LANDMARKS, median, current):
        print(f"{name:<20}{f'({m[0]:.2f}, {m[1]:.2f})':>18}{f'({t[0]:.2f}, {t[1]:.2f})':>26}")
    if args.held_out:
        held_out = landmarks_in_crops(detector, image_files(args.held_out, args.limit),
                                      args.upscale, crop_size)
        differences = crop_differences(held_out, {"median": median, "convention": current})
        a, b = np.array(differences["convention"]), np.array(differences["median"])
        if not len(a):
            raise ValueError(f"--held-out: no face found in the crops of {args.held_out}")
        results["held_out"] = {
            "folder": args.held_out, "faces": len(a),
            "difference_convention": float(a.mean()), "difference_median": float(b.mean()),
            "median_closer": float((b < a).mean()),
            "gain": float((a - b).mean()), "gain_standard_error": float((a - b).std()
                                                                          / np.sqrt(len(a)))}
        h = results["held_out"]
        print(f"held out ({h['faces']} faces in {args.held_out}): mean |crop - dataset crop| "
              f"{h['difference_convention']:.1f} with --convention {args.convention}, "
              f"{h['difference_median']:.1f} with the median ({h['gain']:.1f} +- "
              f"{h['gain_standard_error']:.1f} grey levels less; closer on "
              f"{100 * h['median_closer']:.0f}% of faces)")
    if args.json:
        atomic_write_json(results, args.json)
    return results
