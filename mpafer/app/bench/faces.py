"""`python -m mpafer.bench faces`: face detection (mpafer.faces' MTCNN) against facenet-pytorch's
MTCNN on the same photo, timed interleaved in one run, with the ratio (target <= 1.10).

    python -m mpafer.bench faces                         # a 1280x960 photo, CPU
    python -m mpafer.bench faces --image my.jpg --threads 2 --repeats 20 --json faces.json

The reference is a test-only package: install it with `pip install --no-deps facenet-pytorch`
(its metadata pins old torch versions). Both detectors load the weight files that package ships,
so nothing is downloaded. The default photo is composed from scikit-image's test photographs
(the astronaut's face pasted four times, 40 to 300 pixels wide, on the coffee photo), so that
every stage of the cascade has work to do.
"""
import argparse
import os
import statistics
from typing import Dict

import torch
from PIL import Image

from ...faces import MTCNN
from ...files import atomic_write_json
from ..cli import ArgumentParser
from . import measure

TARGET = 1.10  # ours / reference


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m mpafer.bench faces", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", help="a photo to detect faces in (default: the composed one)")
    p.add_argument("--size", default="1280x960", metavar="WxH",
                   help="size of the composed photo (default 1280x960)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args(argv)
    try:
        args.width, args.height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        p.error(f"--size must look like 1280x960, got {args.size!r}")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def import_reference():
    try:
        import facenet_pytorch
    except ImportError as error:
        raise RuntimeError("the faces benchmark compares with facenet-pytorch: install it with "
                           "`pip install --no-deps facenet-pytorch` (and `pip install requests`"
                           f" if missing) ({error})") from error
    return facenet_pytorch


def composed_photo(width: int, height: int) -> Image.Image:
    """The astronaut's face pasted four times on the coffee photo (scikit-image's test
    photographs, public domain)."""
    try:
        from skimage import data
    except ImportError as error:
        raise RuntimeError("the default photo comes from scikit-image: `pip install "
                           "scikit-image`, or give --image PATH") from error
    photo = Image.fromarray(data.coffee()).resize((width, height), Image.Resampling.BICUBIC)
    face = Image.fromarray(data.astronaut()).crop((130, 20, 330, 220))
    unit = min(width, height) / 960
    for x, y, side in ((0.04, 0.05, 200), (0.31, 0.31, 120), (0.70, 0.10, 300),
                       (0.55, 0.68, 40)):
        side = max(20, round(side * unit))
        photo.paste(face.resize((side, side)), (round(x * width), round(y * height)))
    return photo


def run_benchmark(args) -> Dict[str, object]:
    facenet_pytorch = import_reference()
    weights = os.path.join(os.path.dirname(facenet_pytorch.__file__), "data")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    photo = (Image.open(args.image).convert("RGB") if args.image
             else composed_photo(args.width, args.height))
    ours = MTCNN(weights_dir=weights).to(device)
    reference = facenet_pytorch.MTCNN(keep_all=True, device=device)
    found_ours = len(ours.detect(photo).boxes)
    reference_boxes = reference.detect(photo)[0]
    found_reference = 0 if reference_boxes is None else len(reference_boxes)
    times = measure.compare({"ours": lambda: ours.detect(photo),
                             "reference": lambda: reference.detect(photo)},
                            device, args.repeats, args.warmup)
    return {"photo": args.image or "composed", "width": photo.width, "height": photo.height,
            "device": measure.device_name(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "faces_ours": found_ours,
            "faces_reference": found_reference,
            "seconds_ours": statistics.median(times["ours"]),
            "seconds_reference": statistics.median(times["reference"]),
            "detect_ratio": measure.paired_ratio(times["ours"], times["reference"]),
            "target": TARGET, "times": times}


def main(argv=None):
    args = parse_args(argv)
    results = run_benchmark(args)
    ok = "ok" if results["detect_ratio"] <= TARGET else "MISSED"
    print(f"\nface detection on a {results['width']}x{results['height']} photo "
          f"({results['photo']}), {results['device']}, {results['threads']} threads, "
          f"torch {results['torch']}")
    print(f"  faces found: ours {results['faces_ours']}, facenet-pytorch "
          f"{results['faces_reference']}")
    print(f"  {'MTCNN, ours / facenet-pytorch':<40}{results['detect_ratio']:>7.3f}   "
          f"target <= {TARGET:.2f}  {ok}   (median {1000 * results['seconds_ours']:.0f} ms vs "
          f"{1000 * results['seconds_reference']:.0f} ms)")
    if args.json:
        atomic_write_json(results, args.json)
    return results
