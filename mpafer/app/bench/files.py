"""Image files for the epoch benchmark, and the per-sample CPU cost of the input pipeline.

The epoch benchmark reads real files: by default synthetic faces written as 100x100 JPEGs in
RAF-DB's layout (RAF-DB's aligned faces are 100x100 JPEGs), so the loader decodes, crops and
resizes what it would on RAF-DB. Cartoon faces are smoother than photographs, so they compress
better and may decode slightly faster than real faces.

`per_sample_rates` times one image at a time on one core, as a DataLoader worker runs it:
RAF-DB-size JPEGs and FERPlus-size 48x48 grey PNGs into training crops, in the uint8 form the
workers produce for train.py and in the float form (ToTensor, Normalize, RandomErasing in the
worker), plus evaluation preprocessing and bare decoding.
"""
import math
import os
import time
from typing import Dict, List

import torch

from ...data import RAFDB_CLASSES, RAFDB_LABEL_FILE, eval_transform, load_image, train_transform
from ..synthetic import SyntheticFaces

FACE_SIZE = 100  # RAF-DB's aligned faces
FERPLUS_SIZE = 48  # FERPlus faces are 48x48 grey


def write_rafdb_like(root: str, num_train: int, num_test: int, seed: int = 0) -> str:
    """Synthetic faces as `FACE_SIZE`-px JPEGs in RAF-DB's layout (its label file, its names, its
    label numbering), readable by `mpafer.data.RAFDB`. Returns root."""
    os.makedirs(os.path.join(root, "Image", "aligned"), exist_ok=True)
    lines = []
    for split, count in (("train", num_train), ("test", num_test)):
        if count == 0:
            continue
        faces = SyntheticFaces(split, math.ceil(count / len(RAFDB_CLASSES)), FACE_SIZE, seed)
        for index in range(count):
            image, label = faces[index]
            stem = f"{split}_{index + 1:05d}"
            image.save(os.path.join(root, "Image", "aligned", f"{stem}_aligned.jpg"), quality=95)
            lines.append(f"{stem}.jpg {RAFDB_CLASSES.index(faces.classnames[label]) + 1}\n")
    os.makedirs(os.path.dirname(os.path.join(root, RAFDB_LABEL_FILE)), exist_ok=True)
    with open(os.path.join(root, RAFDB_LABEL_FILE), "w", encoding="utf-8") as f:
        f.writelines(lines)
    return root


def write_grey_pngs(folder: str, count: int, seed: int = 0) -> List[str]:
    """FERPlus-like 48x48 greyscale PNGs; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    faces = SyntheticFaces("train", math.ceil(count / len(RAFDB_CLASSES)), FERPLUS_SIZE, seed)
    paths = []
    for index in range(count):
        paths.append(os.path.join(folder, f"{index:05d}.png"))
        faces.load(index).convert("L").save(paths[-1])
    return paths


def rafdb_like_jpegs(root: str) -> List[str]:
    folder = os.path.join(root, "Image", "aligned")
    return sorted(os.path.join(folder, name) for name in os.listdir(folder))


def per_sample_rates(jpegs: List[str], pngs: List[str], resolution: int = 224,
                     seconds: float = 1.0, rounds: int = 3) -> Dict[str, float]:
    """Images per second on one core, file to tensor, for each path of the input pipeline.

    Rates are per CPU-second of this process (`time.process_time`), so time the core spends on
    other jobs does not count against them (shared caches and memory bandwidth still do). Each
    path runs for `seconds` of CPU time in all, in `rounds` turns; the paths take turns in every
    round, and a path's figure is the median of its rounds. torch runs on one thread meanwhile,
    as it does in DataLoader workers.
    """
    train_u8, train_f = train_transform(resolution, uint8=True), train_transform(resolution)
    eval_u8, eval_f = eval_transform(resolution, uint8=True), eval_transform(resolution)
    paths = {
        "jpeg100_decode": (jpegs, None),
        "jpeg100_train_crop_uint8": (jpegs, train_u8),
        "jpeg100_train_crop_float": (jpegs, train_f),
        "png48_grey_train_crop_uint8": (pngs, train_u8),
        "png48_grey_train_crop_float": (pngs, train_f),
        "jpeg100_eval_uint8": (jpegs, eval_u8),
        "jpeg100_eval_float": (jpegs, eval_f),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rates = {name: [] for name in paths}
    try:
        for r in range(rounds):
            for name in (list(paths) if r % 2 == 0 else list(paths)[::-1]):
                files, transform = paths[name]
                rates[name].append(_rate(files, transform, seconds / rounds))
    finally:
        torch.set_num_threads(threads)
    return {name: sorted(r)[len(r) // 2] for name, r in rates.items()}


def _rate(files: List[str], transform, seconds: float) -> float:
    """Images per CPU-second of `transform(load_image(file))`, over about `seconds` of CPU."""
    done, start = 0, time.process_time()
    while True:
        image = load_image(files[done % len(files)])
        if transform is not None:
            transform(image)
        done += 1
        elapsed = time.process_time() - start
        if elapsed >= seconds:
            return done / elapsed
