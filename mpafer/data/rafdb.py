"""RAF-DB, basic expressions (7 classes; `RAFDB_LAYOUT`): `--dataset rafdb`. The split is the
file-name prefix; unofficial per-label counts are warned about (usually a partial download)."""
import os
import warnings

import numpy as np

from .base import FERDataset, check_split, require_dir, require_file

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
    """RAF-DB basic expressions, split "train" or "test"; target = label - 1."""

    classnames = RAFDB_CLASSES

    def __init__(self, root, split, transform=None, skip_bad_images=False):
        super().__init__(root, transform)
        check_split(split, ("train", "test"), "RAF-DB")
        self.split = split
        require_dir(self.root, "RAF-DB root", RAFDB_LAYOUT)
        label_file = os.path.join(self.root, RAFDB_LABEL_FILE)
        require_file(label_file, "RAF-DB label file", RAFDB_LAYOUT)
        require_dir(os.path.join(self.root, "Image", "aligned"), "RAF-DB image folder",
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
        counts, expected = np.bincount(targets, minlength=7).tolist(), RAFDB_EXPECTED_COUNTS[split]
        # Only a split that looks like the full release is compared; small subsets are fine.
        if abs(len(targets) - sum(expected)) <= 0.1 * sum(expected) and counts != expected:
            warnings.warn(f"{label_file}: RAF-DB {split} split has {len(targets)} images, per "
                          f"label {counts}; the official split has {sum(expected)}, per label "
                          f"{expected}", stacklevel=2)
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
