"""AffectNet (`AFFECTNET_LAYOUT`): `--dataset affectnet7 | affectnet8`. Codes 8 and above (none,
uncertain, no face) are dropped, and the 7-class set drops contempt too."""
import os

import numpy as np

from .base import (
    IMAGE_EXTENSIONS,
    FERDataset,
    check_split,
    missing_error,
    parse_int,
    read_csv_rows,
    require_dir,
)

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
    """AffectNet, either layout; "test" (alias "val") is the official validation set, as papers
    report. CSV-release images are cropped to their face box at load time."""

    def __init__(self, root, split, num_classes=7, transform=None, skip_bad_images=False):
        super().__init__(root, transform)
        check_split(split, tuple(_AFFECTNET_SPLITS), "AffectNet")
        if num_classes not in (7, 8):
            raise ValueError(f"AffectNet num_classes must be 7 or 8, got {num_classes}")
        self.split, self.num_classes = split, num_classes
        self.classnames = AFFECTNET_CLASSES[:num_classes]
        require_dir(self.root, "AffectNet root", AFFECTNET_LAYOUT)

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
            raise missing_error(f"{csv_path} or {folder}", f"AffectNet {split} split",
                                AFFECTNET_LAYOUT)
        if not files:
            raise ValueError(f"{source}: no AffectNet images with expression codes "
                             f"0..{num_classes - 1}")
        self._set_items(files, targets, boxes, skip_bad_images, source, AFFECTNET_LAYOUT)

    def _parse_csv(self, path):
        files, targets, boxes = [], [], []
        for line, row in read_csv_rows(path, AFFECTNET_CSV_COLUMNS):
            code = parse_int(row["expression"], path, line, "expression")
            if code < 0:
                raise ValueError(f"{path}:{line}: negative expression code {code}")
            if code >= self.num_classes:
                continue
            x, y, w, h = (parse_int(row[c], path, line, c)
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
        require_dir(images, "AffectNet image folder", AFFECTNET_LAYOUT)
        require_dir(annotations, "AffectNet annotation folder", AFFECTNET_LAYOUT)
        files, targets = [], []
        for name in sorted(os.listdir(images)):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(annotations, f"{stem}_exp.npy")  # a numpy string or integer
            if not os.path.isfile(path):
                raise missing_error(path, "AffectNet annotation", AFFECTNET_LAYOUT)
            try:
                code = int(np.load(path, allow_pickle=False).item())
            except (OSError, ValueError, TypeError) as error:
                raise ValueError(f"{path}: expected an integer expression code, got error: "
                                 f"{error}") from error
            if code < 0:
                raise ValueError(f"{path}: negative expression code {code}")
            if code < self.num_classes:
                files.append(os.path.join(os.path.basename(folder), "images", name))
                targets.append(code)
        return files, targets
