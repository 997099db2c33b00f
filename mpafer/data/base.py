"""What every dataset reader shares: the `FERDataset` base class, image loading, and the
checks that turn bad input into clear errors (naming the path, `file:line` or the layout)."""
import csv
import hashlib
import json
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ..progress import progress_bar

logger = logging.getLogger(__name__)

Image.init()  # registers every plugin, not only the common ones
# Every file extension PIL opens, lower case (not those of formats it only writes, e.g. .pdf).
IMAGE_EXTENSIONS = tuple(sorted(ext for ext, format in Image.registered_extensions().items()
                                if format in Image.OPEN))


# ----------------------------------------------------------------------------- errors

def missing_error(path, what, layout):
    return FileNotFoundError(f"{what} not found: {path}\nExpected layout:\n{layout.rstrip()}")


def require_file(path, what, layout):
    if not os.path.isfile(path):
        raise missing_error(path, what, layout)


def require_dir(path, what, layout):
    if not os.path.isdir(path):
        raise missing_error(path, what, layout)


def check_split(split, valid, dataset_name):
    if split not in valid:
        raise ValueError(f"unknown split {split!r} for {dataset_name}; "
                         f"valid splits: {', '.join(valid)}")


def read_csv_rows(path, required_columns):
    """Yield (line number, row dict) from a CSV file, after checking its header."""
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: tolerate a BOM
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader, [])]
        missing = [c for c in required_columns if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)} "
                             f"(header is {','.join(header) or '<empty>'})")
        for row in reader:
            if not row:  # blank line
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{reader.line_num}: expected {len(header)} fields, "
                                 f"got {len(row)}")
            yield reader.line_num, dict(zip(header, row))


def parse_int(text, path, line, what):
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{path}:{line}: {what} must be an integer, got {text!r}") from None


# ----------------------------------------------------------------------------- images

def load_image(path, box=None):
    """An image read fully, turned upright by its EXIF orientation, as 8-bit RGB (`as_rgb`),
    optionally cropped to box (x0, y0, x1, y1); OSError naming the path if it does not decode."""
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            if box is not None:
                # Boxes that stick out of the picture are cut at its border, not padded.
                x0, y0, x1, y1 = (int(v) for v in box)
                width, height = image.size
                x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
                x1, y1 = min(max(x1, x0 + 1), width), min(max(y1, y0 + 1), height)
                image = image.crop((x0, y0, x1, y1))
            return as_rgb(image)
    except (OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError) as error:
        raise OSError(f"cannot read image {path}: {error}") from error


def as_rgb(image):
    """8-bit RGB from any PIL mode, keeping what the picture shows: 16-bit grey scaled by 1/257
    (PIL's conversion clips it to white), 32-bit integer grey likewise unless every value lies in
    0..255 (8-bit values in a wider container), float grey as 0..1 (or 0..255 when a value
    exceeds 1), transparency composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        pixels = np.asarray(image).astype(np.float64)  # [H, W], any byte order
        if image.mode == "F":
            scale = 255.0 if pixels.size and np.nanmax(pixels) <= 1.0 else 1.0
        elif image.mode == "I" and pixels.size and 0 <= pixels.min() and pixels.max() <= 255:
            scale = 1.0
        else:
            scale = 255.0 / 65535.0  # = 1 / 257
        pixels = np.nan_to_num(pixels * scale, nan=0.0)
        grey = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")
        return grey.convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


class FERDataset(Dataset):
    """Images listed by path (relative to `root`) with integer labels; subclasses parse their
    label files and call `_set_items`. Paths sit in one numpy array so that forked workers do
    not copy the dataset by touching reference counts."""

    classnames = ()

    def __init__(self, root, transform=None):
        self.root = os.fspath(root)
        self.transform = transform
        self.targets = []
        self.skipped = []
        self._files = np.array([], dtype=bytes)
        self._boxes = None

    def _set_items(self, files, targets, boxes=None, skip_bad_images=False, source=None,
                   layout=""):
        """Store the parsed items (`boxes`: optional [N, 4] crops; `source`: the label file,
        for errors); check that every image is there, and readable if asked."""
        paths = [os.path.join(self.root, f) for f in files]
        source = source or self.root
        if skip_bad_images:
            good = []
            for i, path in enumerate(progress_bar(paths, desc="checking images", leave=False,
                                                  disable=len(paths) < 2000)):
                try:
                    load_image(path, None if boxes is None else boxes[i])
                    good.append(True)
                except OSError:
                    good.append(False)
            bad = [p for p, ok in zip(paths, good) if not ok]
            if bad:
                for path in bad:
                    logger.warning("skipping unreadable image %s", path)
                warnings.warn(f"skipped {len(bad)} unreadable image(s) of {len(paths)} listed in "
                              f"{source}; first: {', '.join(bad[:5])}", stacklevel=3)
            keep = [i for i, ok in enumerate(good) if ok]
            files = [files[i] for i in keep]
            targets = [targets[i] for i in keep]
            boxes = None if boxes is None else [boxes[i] for i in keep]
            self.skipped = bad
            if not files:
                raise ValueError(f"none of the {len(paths)} images listed in {source} is readable")
        else:
            # Cheap existence check now, rather than a crash in the middle of epoch 37.
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                first = missing[0]
                if os.path.islink(first):
                    first = f"{first} (a broken symbolic link, to {os.readlink(first)})"
                raise FileNotFoundError(
                    f"{len(missing)} image(s) listed in {source} not found, first: "
                    f"{first}; put them back, or leave missing or "
                    "unreadable images out with --skip-bad-images (skip_bad_images=True in "
                    f"Python)\nExpected layout:\n{layout.rstrip()}")
        self._files = np.array([f.encode("utf-8") for f in files], dtype=bytes)
        self.targets = [int(t) for t in targets]
        self._boxes = None if boxes is None else np.asarray(boxes, dtype=np.int32).reshape(-1, 4)

    def __len__(self):
        return len(self.targets)

    def image_path(self, index):
        return os.path.join(self.root, self._files[index].decode("utf-8"))

    def source_files(self):
        """The files the images are read from (see `files_stat_fingerprint`)."""
        return sorted(set(self.paths))

    @property
    def paths(self):
        """All image paths, in item order (a fresh list, not for the hot loop)."""
        return [self.image_path(i) for i in range(len(self))]

    def class_counts(self):
        return np.bincount(np.asarray(self.targets, dtype=np.int64),
                           minlength=len(self.classnames)).tolist()

    def load(self, index):
        """The untransformed RGB PIL image of item `index`."""
        box = None if self._boxes is None else self._boxes[index]
        return load_image(self.image_path(index), box)

    def __getitem__(self, index):
        image = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def dataset_fingerprint(dataset):
    """SHA-256 of the items' file (or image) names, labels and crop boxes, in order."""
    files = getattr(dataset, "_files", None)
    names = [f.decode("utf-8") for f in files] if files is not None and len(files) else []
    boxes = getattr(dataset, "_boxes", None)
    items = {"names": names or list(getattr(dataset, "image_names", [])),
             "targets": [int(t) for t in dataset.targets],
             "boxes": None if boxes is None else np.asarray(boxes).tolist()}
    return hashlib.sha256(json.dumps(items).encode("utf-8")).hexdigest()


def files_stat_fingerprint(dataset):
    """SHA-256 of the size and mtime of every `dataset.source_files()` (images re-saved under
    the same names change it); None for a dataset without files."""
    if not hasattr(dataset, "source_files"):
        return None
    stats = []
    for path in dataset.source_files():
        info = os.stat(path)
        stats.append([path, info.st_size, info.st_mtime_ns])
    return hashlib.sha256(json.dumps(stats).encode("utf-8")).hexdigest()


def unreadable_images(dataset, workers=4):
    """[(index, error message)] of the items whose image does not decode, read by `workers`
    threads (decoding releases the GIL). Datasets without `load` pass."""
    load = getattr(dataset, "load", None)
    if load is None:
        return []

    def problem(index):
        try:
            load(index)
        except OSError as error:
            return index, str(error)
        return None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        found = pool.map(problem, range(len(dataset)), chunksize=64)
        checked = progress_bar(found, total=len(dataset), desc="checking images", leave=False,
                               disable=len(dataset) < 2000)
        return [p for p in checked if p is not None]


def require_readable(dataset, split, workers=4):
    """ValueError naming the first image of `split` that does not decode (before epoch 1)."""
    bad = unreadable_images(dataset, workers)
    if bad:
        raise ValueError(f"{len(bad)} image(s) of the {split} split cannot be read, first: "
                         f"{bad[0][1]}; replace them, or leave unreadable images out with "
                         "--skip-bad-images (skip_bad_images=True in Python)")
