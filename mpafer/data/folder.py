"""Images in root/<split>/<class name>/, for any dataset without a dedicated reader."""
import os
import warnings

from ..labels import CANONICAL_CLASSES
from .base import IMAGE_EXTENSIONS, FERDataset, missing_error, require_dir

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
        require_dir(self.root, "dataset root", FOLDER_LAYOUT)
        split_dir = os.path.join(self.root, split)
        if not os.path.isdir(split_dir):
            found = sorted(d for d in os.listdir(self.root)
                           if os.path.isdir(os.path.join(self.root, d)))
            raise missing_error(split_dir, f"split folder (found: {', '.join(found) or 'none'})",
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
