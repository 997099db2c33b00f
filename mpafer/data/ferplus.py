"""FERPlus (8 classes) by majority vote (`ferplus_vote`), from `fer2013.csv` with Microsoft's
`fer2013new.csv` or from the folders FERPlus's own script writes (`FERPLUS_LAYOUT`):
`--dataset ferplus`. Splits: train = Training, val = PublicTest, test = PrivateTest."""
import csv
import os

import numpy as np
from PIL import Image

from ..labels import CANONICAL_CLASSES
from .base import (
    FERDataset,
    check_split,
    missing_error,
    parse_int,
    read_csv_rows,
    require_dir,
    require_file,
)

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
    """FERPlus's majority vote over 10 counts in fer2013new.csv order -> a class index 0..7, or
    None (unknown, NF, no majority). Columns with at most one vote are zeroed first (outliers);
    the largest remaining count wins if it is more than half of the remaining total."""
    if len(votes) != len(FERPLUS_VOTE_COLUMNS):
        raise ValueError(f"expected {len(FERPLUS_VOTE_COLUMNS)} vote counts, got {len(votes)}")
    kept = [v if v > 1 else 0 for v in votes]
    best = max(kept)
    if best == 0 or best <= sum(kept) / 2:
        return None
    winner = kept.index(best)  # unique: it holds more than half of the votes
    return winner if winner < len(CANONICAL_CLASSES) else None


class FERPlus(FERDataset):
    """FERPlus from fer2013.csv + fer2013new.csv when both are present, else the folders."""

    classnames = CANONICAL_CLASSES

    def __init__(self, root, split, transform=None, skip_bad_images=False):
        super().__init__(root, transform)
        check_split(split, tuple(_FERPLUS_SPLITS), "FERPlus")
        self.split = split
        self._pixels = None  # uint8 [N, 48, 48] in CSV mode
        self.image_names = []
        require_dir(self.root, "FERPlus root", FERPLUS_LAYOUT)
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
            raise missing_error(f"{' and '.join(missing)} (or the folder {folder})",
                           f"FERPlus {split} data", FERPLUS_LAYOUT)

    def _read_csvs(self, fer_csv, new_csv, usage):
        # fer2013.csv (~300 MB) is streamed; fer2013new.csv is small enough to hold.
        new_rows = list(read_csv_rows(new_csv, ("Usage", "Image name") + FERPLUS_VOTE_COLUMNS))
        out_of_step = (f"{fer_csv} and {new_csv} must list the same images in the same order")
        names, targets, images = [], [], []
        fer_rows = 0
        for line, row in read_csv_rows(fer_csv, ("pixels", "Usage")):
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
            votes = [parse_int(new_row[c], new_csv, new_line, c) for c in FERPLUS_VOTE_COLUMNS]
            label = ferplus_vote(votes)
            if label is None:
                continue
            names.append(new_row["Image name"].strip())
            targets.append(label)
            try:  # np.fromstring in text mode: much faster than split() for 2304 numbers
                pixels = np.fromstring(row["pixels"], dtype=np.int32, sep=" ")
            except ValueError:
                pixels = np.array([])
            if pixels.size != 48 * 48 or pixels.min() < 0 or pixels.max() > 255:
                raise ValueError(f"{fer_csv}:{line}: expected 2304 space-separated pixel "
                                 "values 0..255")
            images.append(pixels.astype(np.uint8).reshape(48, 48))
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
        require_file(label_file, "FERPlus label file", FERPLUS_LAYOUT)
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
                votes = [parse_int(v, label_file, reader.line_num, "vote count")
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

    def source_files(self):
        if self._pixels is not None:  # CSV mode: every image comes from the two CSV files
            return [os.path.join(self.root, n) for n in ("fer2013.csv", "fer2013new.csv")]
        return super().source_files()

    def image_path(self, index):
        if self._pixels is not None:
            return None  # CSV mode: images live in fer2013.csv, not in files
        return super().image_path(index)

    def load(self, index):
        if self._pixels is not None:
            return Image.fromarray(self._pixels[index], "L").convert("RGB")
        return super().load(index)
