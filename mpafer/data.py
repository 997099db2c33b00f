"""Datasets, label maps, transforms and a class-balanced sampler for facial expressions.

Every dataset maps its own label order onto the canonical class names below and exposes
`classnames` (in the dataset's label order), `targets` (list[int]), `class_counts()` and
`__getitem__ -> (transform(image), label)`, where the image is always an RGB PIL image.

Label files are parsed once, at construction; per item only the image is read. Paths are
kept in one numpy array rather than a list of Python strings, so forked DataLoader
workers do not slowly copy the dataset by touching reference counts.

Bad input never passes silently: a missing root or label file names the path and the
expected layout, a malformed label line names `file:line`, an unreadable image names its
path. `skip_bad_images=True` checks every image at construction and drops (and reports)
the unreadable ones instead.
"""
import csv
import logging
import math
import os
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import transforms as T
from tqdm import tqdm

from mpafer.clip.transform import CLIP_MEAN, CLIP_STD, clip_preprocess
from mpafer.synthetic import SYNTHETIC_CLASSES, SyntheticFaces

logger = logging.getLogger(__name__)

CANONICAL_CLASSES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust",
                     "fear", "contempt")
BASIC_CLASSES = CANONICAL_CLASSES[:7]  # 7-class sets drop contempt
assert SYNTHETIC_CLASSES == BASIC_CLASSES

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# ----------------------------------------------------------------------------- errors

def _missing(path, what, layout):
    return FileNotFoundError(f"{what} not found: {path}\nExpected layout:\n{layout.rstrip()}")


def _require_file(path, what, layout):
    if not os.path.isfile(path):
        raise _missing(path, what, layout)


def _require_dir(path, what, layout):
    if not os.path.isdir(path):
        raise _missing(path, what, layout)


def _check_split(split, valid, dataset_name):
    if split not in valid:
        raise ValueError(f"unknown split {split!r} for {dataset_name}; "
                         f"valid splits: {', '.join(valid)}")


def _read_csv(path, required_columns):
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


def _parse_int(text, path, line, what):
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{path}:{line}: {what} must be an integer, got {text!r}") from None


# ----------------------------------------------------------------------------- images

def load_image(path, box=None):
    """Read an image fully and return it as RGB, optionally cropped to box (x0, y0, x1, y1).

    Any unreadable, truncated or corrupt file raises OSError naming the path. (Truncated
    images are never padded: we rely on PIL's default LOAD_TRUNCATED_IMAGES = False.)
    """
    try:
        with Image.open(path) as image:
            image.load()
            if box is not None:
                image = image.crop(_clamp_box(box, image.size))
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise OSError(f"cannot read image {path}: {error}") from error


def _clamp_box(box, size):
    # Face boxes that stick out of the picture are cut at its border, not padded with black.
    x0, y0, x1, y1 = (int(v) for v in box)
    width, height = size
    x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    x1, y1 = min(max(x1, x0 + 1), width), min(max(y1, y0 + 1), height)
    return x0, y0, x1, y1


class FERDataset(Dataset):
    """Base class: images listed by path (relative to `root`) with integer labels.

    Subclasses parse their label files and call `_set_items`. Attributes: `classnames`,
    `targets`, `root`, `transform`, `skipped` (paths dropped by skip_bad_images).
    """

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
        """Store the parsed items; check that every image is there (and readable if asked).

        files: paths relative to self.root; boxes: optional [N, 4] crop boxes (x0, y0, x1, y1);
        source: the label file the items came from, for error messages.
        """
        paths = [os.path.join(self.root, f) for f in files]
        source = source or self.root
        if skip_bad_images:
            good = _readable_images(paths, boxes)
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
                raise FileNotFoundError(
                    f"{len(missing)} image(s) listed in {source} not found, first: "
                    f"{missing[0]}\nExpected layout:\n{layout.rstrip()}\n"
                    "(pass skip_bad_images=True to drop missing or unreadable images)")
        self._files = np.array([f.encode("utf-8") for f in files], dtype=bytes)
        self.targets = [int(t) for t in targets]
        self._boxes = None if boxes is None else np.asarray(boxes, dtype=np.int32).reshape(-1, 4)

    def __len__(self):
        return len(self.targets)

    def image_path(self, index):
        return os.path.join(self.root, self._files[index].decode("utf-8"))

    @property
    def paths(self):
        """All image paths, in item order (a fresh list: meant for inspection, not the hot loop)."""
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


def _readable_images(paths, boxes=None):
    """For each path, whether the image opens and decodes fully."""
    ok = []
    for i, path in enumerate(tqdm(paths, desc="checking images", leave=False,
                                  disable=len(paths) < 2000)):
        try:
            load_image(path, None if boxes is None else boxes[i])
            ok.append(True)
        except OSError:
            ok.append(False)
    return ok


# ----------------------------------------------------------------------------- RAF-DB

RAFDB_LAYOUT = """\
<root>/
  EmoLabel/list_patition_label.txt   lines "<name>.jpg <label>", label 1..7 =
                                     surprise, fear, disgust, happiness, sadness, anger, neutral
  Image/aligned/<stem>_aligned.jpg   e.g. train_00001_aligned.jpg, test_0001_aligned.jpg
"""
# RAF-DB's labels 1..7 in order (label - 1 indexes this tuple).
RAFDB_CLASSES = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")
RAFDB_LABEL_FILE = os.path.join("EmoLabel", "list_patition_label.txt")
# Official basic-expression split sizes and per-label counts (labels 1..7).
RAFDB_EXPECTED_COUNTS = {
    "train": [1290, 281, 717, 4772, 1982, 705, 2524],  # 12,271 images
    "test": [329, 74, 160, 1185, 478, 162, 680],       # 3,068 images
}


class RAFDB(FERDataset):
    """RAF-DB basic expressions (7 classes), split "train" or "test" by file-name prefix.

    classnames follow RAF-DB's label order (surprise, fear, disgust, happiness, sadness,
    anger, neutral); target = label - 1. Warns if a split that looks like the full official
    one (within 10% of its size) differs from the official counts.
    """

    classnames = RAFDB_CLASSES

    def __init__(self, root, split, transform=None, skip_bad_images=False):
        super().__init__(root, transform)
        _check_split(split, ("train", "test"), "RAF-DB")
        self.split = split
        _require_dir(self.root, "RAF-DB root", RAFDB_LAYOUT)
        label_file = os.path.join(self.root, RAFDB_LABEL_FILE)
        _require_file(label_file, "RAF-DB label file", RAFDB_LAYOUT)
        _require_dir(os.path.join(self.root, "Image", "aligned"), "RAF-DB image folder",
                     RAFDB_LAYOUT)

        files, targets = [], []
        for name, label in _parse_rafdb_labels(label_file):
            if name.startswith(split + "_"):
                stem = name[:-len(".jpg")]
                files.append(os.path.join("Image", "aligned", f"{stem}_aligned.jpg"))
                targets.append(label - 1)
        if not files:
            raise ValueError(f"{label_file}: no {split}_* images listed\n"
                             f"Expected layout:\n{RAFDB_LAYOUT}")
        _warn_if_unofficial(split, np.bincount(targets, minlength=7).tolist(), label_file)
        self._set_items(files, targets, skip_bad_images=skip_bad_images, source=label_file,
                        layout=RAFDB_LAYOUT)


def _parse_rafdb_labels(path):
    """Yield (name, label 1..7) from list_patition_label.txt, failing on any odd line."""
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            ok = (len(fields) == 2 and fields[0].endswith(".jpg")
                  and fields[0].startswith(("train_", "test_")) and fields[1].isdigit()
                  and 1 <= int(fields[1]) <= 7)
            if not ok:
                raise ValueError(f"{path}:{line_number}: expected '<train_|test_name>.jpg "
                                 f"<label 1-7>', got {line.rstrip()!r}")
            yield fields[0], int(fields[1])


def _warn_if_unofficial(split, counts, label_file):
    expected = RAFDB_EXPECTED_COUNTS[split]
    total, expected_total = sum(counts), sum(expected)
    # Only a split that looks like the full release is compared; small subsets are fine.
    if abs(total - expected_total) <= 0.1 * expected_total and counts != expected:
        warnings.warn(f"{label_file}: RAF-DB {split} split has {total} images, per label "
                      f"{counts}; the official split has {expected_total}, per label "
                      f"{expected}", stacklevel=3)


# ----------------------------------------------------------------------------- AffectNet

AFFECTNET_LAYOUT = """\
either the official CSV release:
<root>/
  training.csv                       columns subDirectory_filePath, face_x, face_y,
  validation.csv                     face_width, face_height, facial_landmarks,
                                     expression, valence, arousal
  Manually_Annotated_Images/<subDirectory_filePath>
or the per-image release:
<root>/
  train_set/images/<id>.jpg          val_set/images/<id>.jpg
  train_set/annotations/<id>_exp.npy val_set/annotations/<id>_exp.npy
"""
# AffectNet expression codes 0..7; codes 8+ (none, uncertain, no face) are dropped.
AFFECTNET_CLASSES = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger",
                     "contempt")
AFFECTNET_CSV_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width",
                         "face_height", "expression")
_AFFECTNET_SPLITS = {"train": ("training.csv", "train_set"),
                     "test": ("validation.csv", "val_set"),
                     "val": ("validation.csv", "val_set")}


class AffectNet(FERDataset):
    """AffectNet with 7 (no contempt) or 8 classes; the layout is detected automatically.

    Splits: "train"; "test" = the official validation set (500 images per class), which
    is what papers report as AffectNet test accuracy; "val" is accepted as an alias of
    "test". classnames follow AffectNet's code order (neutral, happiness, sadness, surprise,
    fear, disgust, anger[, contempt]); target = expression code. With the CSV release each
    image is cropped to its face box at load time.
    """

    def __init__(self, root, split, num_classes=7, transform=None, skip_bad_images=False):
        super().__init__(root, transform)
        _check_split(split, tuple(_AFFECTNET_SPLITS), "AffectNet")
        if num_classes not in (7, 8):
            raise ValueError(f"AffectNet num_classes must be 7 or 8, got {num_classes}")
        self.split, self.num_classes = split, num_classes
        self.classnames = AFFECTNET_CLASSES[:num_classes]
        _require_dir(self.root, "AffectNet root", AFFECTNET_LAYOUT)

        csv_name, folder_name = _AFFECTNET_SPLITS[split]
        csv_path = os.path.join(self.root, csv_name)
        folder = os.path.join(self.root, folder_name)
        if os.path.isfile(csv_path):
            files, targets, boxes = self._parse_csv(csv_path)
            source = csv_path
        elif os.path.isdir(folder):
            files, targets = self._scan_per_image(folder)
            boxes, source = None, folder
        else:
            raise _missing(f"{csv_path} or {folder}", f"AffectNet {split} split", AFFECTNET_LAYOUT)
        if not files:
            raise ValueError(f"{source}: no AffectNet images with expression codes "
                             f"0..{num_classes - 1}")
        self._set_items(files, targets, boxes, skip_bad_images, source, AFFECTNET_LAYOUT)

    def _parse_csv(self, path):
        files, targets, boxes = [], [], []
        for line, row in _read_csv(path, AFFECTNET_CSV_COLUMNS):
            code = _parse_int(row["expression"], path, line, "expression")
            if code < 0:
                raise ValueError(f"{path}:{line}: negative expression code {code}")
            if code >= self.num_classes:
                continue
            x, y, w, h = (_parse_int(row[c], path, line, c)
                          for c in ("face_x", "face_y", "face_width", "face_height"))
            if w <= 0 or h <= 0:
                raise ValueError(f"{path}:{line}: empty face box {w}x{h}")
            files.append(os.path.join("Manually_Annotated_Images",
                                      row["subDirectory_filePath"].strip()))
            targets.append(code)
            boxes.append((x, y, x + w, y + h))
        return files, targets, boxes

    def _scan_per_image(self, folder):
        images = os.path.join(folder, "images")
        annotations = os.path.join(folder, "annotations")
        _require_dir(images, "AffectNet image folder", AFFECTNET_LAYOUT)
        _require_dir(annotations, "AffectNet annotation folder", AFFECTNET_LAYOUT)
        files, targets = [], []
        for name in sorted(os.listdir(images)):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            code = _read_expression_npy(os.path.join(annotations, f"{stem}_exp.npy"))
            if code < self.num_classes:
                files.append(os.path.join(os.path.basename(folder), "images", name))
                targets.append(code)
        return files, targets


def _read_expression_npy(path):
    """The expression code in an AffectNet <id>_exp.npy (a numpy string or integer scalar)."""
    if not os.path.isfile(path):
        raise _missing(path, "AffectNet annotation", AFFECTNET_LAYOUT)
    try:
        value = np.load(path, allow_pickle=False)
        code = int(value.item())
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"{path}: expected an integer expression code, got error: {error}") from error
    if code < 0:
        raise ValueError(f"{path}: negative expression code {code}")
    return code


# ----------------------------------------------------------------------------- FERPlus

FERPLUS_LAYOUT = """\
either the CSV files:
<root>/
  fer2013.csv          columns emotion, pixels, Usage (48x48 grey, pixels space-separated)
  fer2013new.csv       columns Usage, Image name, neutral, happiness, surprise, sadness,
                       anger, disgust, fear, contempt, unknown, NF (same row order)
or the folders written by FERPlus's generate_training_data.py:
<root>/
  FER2013Train/label.csv, FER2013Train/fer*.png
  FER2013Valid/label.csv, FER2013Valid/fer*.png
  FER2013Test/label.csv,  FER2013Test/fer*.png
"""
FERPLUS_VOTE_COLUMNS = CANONICAL_CLASSES + ("unknown", "NF")  # fer2013new.csv column order
_FERPLUS_SPLITS = {"train": ("Training", "FER2013Train"),
                   "val": ("PublicTest", "FER2013Valid"),
                   "test": ("PrivateTest", "FER2013Test")}


def ferplus_vote(votes):
    """FERPlus majority vote over the ten vote columns; returns a class index 0..7 or None.

    votes: 10 counts in fer2013new.csv order (8 emotions, unknown, NF). Every column with
    at most one vote is zeroed (outlier removal); if the largest remaining count is more
    than half of the remaining total, its column wins, otherwise the face is 'unknown'.
    Returns None for unknown, NF and no-majority faces (those rows are dropped).
    """
    if len(votes) != len(FERPLUS_VOTE_COLUMNS):
        raise ValueError(f"expected {len(FERPLUS_VOTE_COLUMNS)} vote counts, got {len(votes)}")
    kept = [v if v > 1 else 0 for v in votes]
    best = max(kept)
    if best == 0 or best <= sum(kept) / 2:
        return None
    winner = kept.index(best)  # unique: it holds more than half of the votes
    return winner if winner < len(CANONICAL_CLASSES) else None


class FERPlus(FERDataset):
    """FERPlus (8 classes) by majority vote; "train" = Training, "val" = PublicTest,
    "test" = PrivateTest.

    Reads fer2013.csv + fer2013new.csv when both are present (pixels are parsed once into
    a uint8 array), otherwise the exported FER2013Train/Valid/Test folders with label.csv.
    classnames = the 8 emotions in canonical (= fer2013new.csv column) order.
    """

    classnames = CANONICAL_CLASSES

    def __init__(self, root, split, transform=None, skip_bad_images=False):
        super().__init__(root, transform)
        _check_split(split, tuple(_FERPLUS_SPLITS), "FERPlus")
        self.split = split
        self._pixels = None  # uint8 [N, 48, 48] in CSV mode
        self.image_names = []
        _require_dir(self.root, "FERPlus root", FERPLUS_LAYOUT)
        usage, folder_name = _FERPLUS_SPLITS[split]
        fer_csv = os.path.join(self.root, "fer2013.csv")
        new_csv = os.path.join(self.root, "fer2013new.csv")
        folder = os.path.join(self.root, folder_name)
        if os.path.isfile(fer_csv) and os.path.isfile(new_csv):
            self._read_csvs(fer_csv, new_csv, usage)
        elif os.path.isdir(folder):
            self._read_folder(folder, skip_bad_images)
        else:
            missing = [p for p in (fer_csv, new_csv) if not os.path.isfile(p)]
            raise _missing(f"{' and '.join(missing)} (or the folder {folder})",
                           f"FERPlus {split} data", FERPLUS_LAYOUT)

    def _read_csvs(self, fer_csv, new_csv, usage):
        # fer2013.csv (~300 MB) is streamed; fer2013new.csv is small enough to hold.
        new_rows = list(_read_csv(new_csv, ("Usage", "Image name") + FERPLUS_VOTE_COLUMNS))
        out_of_step = (f"{fer_csv} and {new_csv} must list the same images in the same order")
        names, targets, images = [], [], []
        fer_rows = 0
        for line, row in _read_csv(fer_csv, ("pixels", "Usage")):
            if fer_rows >= len(new_rows):
                raise ValueError(f"{fer_csv}:{line}: more rows than in {new_csv}; {out_of_step}")
            new_line, new_row = new_rows[fer_rows]
            fer_rows += 1
            # The files are matched by row order only: a different Usage means they are out
            # of step (edited or re-sorted), which would otherwise mislabel silently.
            if row["Usage"].strip() != new_row["Usage"].strip():
                raise ValueError(f"{fer_csv}:{line} has Usage {row['Usage']!r} but "
                                 f"{new_csv}:{new_line} has {new_row['Usage']!r}; {out_of_step}")
            if row["Usage"].strip() != usage or not new_row["Image name"].strip():
                continue
            votes = [_parse_int(new_row[c], new_csv, new_line, c) for c in FERPLUS_VOTE_COLUMNS]
            label = ferplus_vote(votes)
            if label is None:
                continue
            names.append(new_row["Image name"].strip())
            targets.append(label)
            images.append(_parse_pixels(row["pixels"], fer_csv, line))
        if fer_rows != len(new_rows):
            raise ValueError(f"{fer_csv} has {fer_rows} rows but {new_csv} has {len(new_rows)}; "
                             f"{out_of_step}")
        if not targets:
            raise ValueError(f"{new_csv}: no labelled {usage} faces")
        self._pixels = np.stack(images)
        self.image_names = names
        self.targets = targets

    def _read_folder(self, folder, skip_bad_images):
        label_file = os.path.join(folder, "label.csv")
        _require_file(label_file, "FERPlus label file", FERPLUS_LAYOUT)
        files, targets = [], []
        with open(label_file, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            for row in reader:
                if not row:
                    continue
                # Rows are "<name>,<face box>,<10 votes>"; FERPlus's own script writes them
                # without the face box (always the full 48x48 image, so we ignore it).
                if len(row) not in (11, 12):
                    raise ValueError(f"{label_file}:{reader.line_num}: expected "
                                     f"'<image name>,[\"(x, y, w, h)\",]<10 vote counts>', "
                                     f"got {len(row)} fields")
                votes = [_parse_int(v, label_file, reader.line_num, "vote count")
                         for v in row[-10:]]
                label = ferplus_vote(votes)
                if label is not None and row[0].strip():
                    files.append(os.path.join(os.path.basename(folder), row[0].strip()))
                    targets.append(label)
        if not files:
            raise ValueError(f"{label_file}: no labelled faces")
        self.image_names = [os.path.basename(f) for f in files]
        self._set_items(files, targets, skip_bad_images=skip_bad_images, source=label_file,
                        layout=FERPLUS_LAYOUT)

    def image_path(self, index):
        if self._pixels is not None:
            return None  # CSV mode: images live in fer2013.csv, not in files
        return super().image_path(index)

    def load(self, index):
        if self._pixels is not None:
            return Image.fromarray(self._pixels[index], "L").convert("RGB")
        return super().load(index)


def _parse_pixels(text, path, line):
    # np.fromstring in text mode is ~5x faster than split() for the 2304 numbers per row.
    try:
        values = np.fromstring(text, dtype=np.int32, sep=" ")
    except ValueError:
        values = np.array([])
    if values.size != 48 * 48 or values.min() < 0 or values.max() > 255:
        raise ValueError(f"{path}:{line}: expected 2304 space-separated pixel values 0..255")
    return values.astype(np.uint8).reshape(48, 48)


# ----------------------------------------------------------------------------- folders

FOLDER_LAYOUT = """\
<root>/
  <split>/<class name>/*.jpg|jpeg|png|bmp|webp   e.g. train/happiness/0001.jpg
  class names: neutral, happiness, surprise, sadness, anger, disgust, fear, contempt
  (or any names, given explicitly with classnames=...)
"""


class FolderDataset(FERDataset):
    """Images in root/<split>/<class name>/, for any dataset without a dedicated reader.

    Without `classnames`, folder names must be canonical class names; the classes are those
    found under any of the train/val/test folders (so every split gets the same label
    indices), in canonical order. With `classnames`, those folder names in that order.
    """

    def __init__(self, root, split, transform=None, classnames=None, skip_bad_images=False):
        super().__init__(root, transform)
        self.split = split
        _require_dir(self.root, "dataset root", FOLDER_LAYOUT)
        split_dir = os.path.join(self.root, split)
        if not os.path.isdir(split_dir):
            found = sorted(d for d in os.listdir(self.root)
                           if os.path.isdir(os.path.join(self.root, d)))
            raise _missing(split_dir, f"split folder (found: {', '.join(found) or 'none'})",
                           FOLDER_LAYOUT)
        if classnames is None:
            classnames = self._canonical_classes_under(
                {split} | {s for s in ("train", "val", "test")
                           if os.path.isdir(os.path.join(self.root, s))})
        else:
            classnames = tuple(classnames)
            unknown = sorted(set(_subfolders(split_dir)) - set(classnames))
            if unknown:
                raise ValueError(f"{split_dir}: folder(s) {', '.join(unknown)} are not in "
                                 f"classnames {list(classnames)}")
        self.classnames = classnames

        files, targets = [], []
        for label, name in enumerate(classnames):
            class_dir = os.path.join(split_dir, name)
            if not os.path.isdir(class_dir):
                continue
            for file in sorted(os.listdir(class_dir)):
                if os.path.splitext(file)[1].lower() in IMAGE_EXTENSIONS:
                    files.append(os.path.join(split, name, file))
                    targets.append(label)
        if not files:
            raise ValueError(f"{split_dir}: no images found\nExpected layout:\n{FOLDER_LAYOUT}")
        self._set_items(files, targets, skip_bad_images=skip_bad_images, source=split_dir,
                        layout=FOLDER_LAYOUT)
        empty = [c for c, n in zip(classnames, self.class_counts()) if n == 0]
        if empty:
            warnings.warn(f"{split_dir}: no images for class(es) {', '.join(empty)}", stacklevel=2)

    def _canonical_classes_under(self, splits):
        found = set()
        for split in sorted(splits):
            split_dir = os.path.join(self.root, split)
            for name in _subfolders(split_dir):
                if name not in CANONICAL_CLASSES:
                    raise ValueError(
                        f"{os.path.join(split_dir, name)}: {name!r} is not a canonical class "
                        f"name ({', '.join(CANONICAL_CLASSES)}); rename the folder or pass "
                        "classnames=[...] explicitly")
                found.add(name)
        return tuple(c for c in CANONICAL_CLASSES if c in found)


def _subfolders(path):
    return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))


# ----------------------------------------------------------------------------- synthetic

def write_synthetic_rafdb(root, num_per_class_train, num_per_class_test, seed=0, image_size=100):
    """Write SyntheticFaces to disk in the RAF-DB layout, so the RAF-DB reader can be demoed.

    Writes root/EmoLabel/list_patition_label.txt (RAF-DB label numbering) and
    root/Image/aligned/<stem>_aligned.jpg (image_size pixels, like RAF-DB's 100x100).
    Returns root.
    """
    root = os.fspath(root)
    os.makedirs(os.path.join(root, "EmoLabel"), exist_ok=True)
    os.makedirs(os.path.join(root, "Image", "aligned"), exist_ok=True)
    lines = []
    for split, num_per_class in (("train", num_per_class_train), ("test", num_per_class_test)):
        faces = SyntheticFaces(split, num_per_class, image_size=image_size, seed=seed)
        for index in range(len(faces)):
            image, label = faces[index]
            stem = f"{split}_{index + 1:05d}"
            image.save(os.path.join(root, "Image", "aligned", f"{stem}_aligned.jpg"), quality=95)
            raf_label = RAFDB_CLASSES.index(faces.classnames[label]) + 1
            lines.append(f"{stem}.jpg {raf_label}\n")
    with open(os.path.join(root, RAFDB_LABEL_FILE), "w", encoding="utf-8") as f:
        f.writelines(lines)
    return root


# ----------------------------------------------------------------------------- factory

DATASET_NAMES = ("rafdb", "affectnet7", "affectnet8", "ferplus", "folder", "synthetic")


def build_dataset(name, root, split, transform=None, **options):
    """Build a dataset by name: rafdb, affectnet7, affectnet8, ferplus, folder, synthetic.

    `options` go to the dataset class (e.g. skip_bad_images=True, classnames=[...] for
    folder, num_per_class/image_size/seed for synthetic, which ignores `root`).
    """
    if name == "rafdb":
        return RAFDB(root, split, transform, **options)
    if name in ("affectnet7", "affectnet8"):
        return AffectNet(root, split, num_classes=int(name[-1]), transform=transform, **options)
    if name == "ferplus":
        return FERPlus(root, split, transform, **options)
    if name == "folder":
        return FolderDataset(root, split, transform, **options)
    if name == "synthetic":
        return SyntheticFaces(split, transform=transform, **options)
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")


def format_class_counts(dataset):
    """One line per class, e.g. '  happiness   4772  38.9%', for printing at start-up."""
    counts = dataset.class_counts()
    total = max(sum(counts), 1)
    width = max(len(c) for c in dataset.classnames)
    return "\n".join(f"  {name:<{width}} {count:>7d} {100 * count / total:5.1f}%"
                     for name, count in zip(dataset.classnames, counts))


# ----------------------------------------------------------------------------- transforms

def to_rgb(image):
    """Convert a PIL image to RGB (a named function, so transforms pickle for spawn workers)."""
    return image.convert("RGB")


def train_transform(resolution):
    """Training augmentation (our choice where the papers are silent): RandomResizedCrop
    scale (0.8, 1) bicubic, horizontal flip, CLIP normalisation, RandomErasing p = 0.25."""
    return T.Compose([
        to_rgb,
        T.RandomResizedCrop(resolution, scale=(0.8, 1.0),
                            interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
        T.RandomErasing(p=0.25),
    ])


def eval_transform(resolution):
    """CLIP's own preprocessing: bicubic short-side resize, centre crop, normalisation."""
    return clip_preprocess(resolution)


def expclip_transform(resolution, normalize=False):
    """Exp-CLIP's input: squash to (resolution, resolution) and ToTensor, with no mean/std
    normalisation by default (the released Exp-CLIP heads were trained that way)."""
    steps = [to_rgb, T.Resize((resolution, resolution)), T.ToTensor()]
    if normalize:
        steps.append(T.Normalize(CLIP_MEAN, CLIP_STD))
    return T.Compose(steps)


# ----------------------------------------------------------------------------- sampler

class ClassBalancedSampler(Sampler):
    """Draws indices with replacement, each with probability proportional to 1 / count of
    its class, so every class is seen equally often (for imbalanced sets like AffectNet).

    The draw depends only on (seed, epoch): call set_epoch(epoch) every epoch. Under DDP
    every rank makes the same draw and takes the disjoint slice draw[rank::world_size], so
    it is a drop-in for DistributedSampler. num_samples is the total over all ranks
    (default len(targets)); len(sampler) is the per-rank count.
    """

    def __init__(self, targets, num_samples=None, seed=0, rank=0, world_size=1):
        targets = torch.as_tensor(list(targets), dtype=torch.long)
        if targets.numel() == 0:
            raise ValueError("ClassBalancedSampler needs at least one target")
        if targets.min() < 0:
            raise ValueError("targets must be non-negative class indices")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        counts = torch.bincount(targets).double()
        self.weights = 1.0 / counts[targets]
        total = len(targets) if num_samples is None else int(num_samples)
        if total < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples = math.ceil(total / world_size)  # per rank
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draw = torch.multinomial(self.weights, self.num_samples * self.world_size,
                                 replacement=True, generator=generator)
        return iter(draw[self.rank::self.world_size].tolist())

    def __len__(self):
        return self.num_samples
