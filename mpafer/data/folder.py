"""Images in root/<split>/<class folder>/ (`--dataset folder`), at any depth, in any format PIL
reads; hidden files and folders are ignored. The val split may be a folder named validation/ or
valid/ instead. Class folders are the canonical names or their
usual synonyms, in any case; any other names are given with `--classnames a,b,c`."""
import os
import warnings
from dataclasses import dataclass, field
from typing import List

from ..labels import CANONICAL_CLASSES, SYNONYMS, canonical_name
from .base import IMAGE_EXTENSIONS, FERDataset, missing_error, require_dir

# The usual folder names of the canonical classes, in any case (`labels.canonical_name`).
FOLDER_SYNONYMS = SYNONYMS

# The folder names a split is read from, first match wins (other exports spell val out).
SPLIT_FOLDERS = {"val": ("val", "validation", "valid")}

FOLDER_LAYOUT = """\
<root>/
  <split>/<class folder>/**/*.jpg|png|tif|...   e.g. train/happiness/0001.jpg
  splits: train, val (or validation, valid), test
  class folders: neutral, happiness, surprise, sadness, anger, disgust, fear, contempt, any case,
  or the usual synonyms (happy, sad, angry, surprised, fearful, disgusted, contemptuous);
  any other names are given explicitly (--classnames a,b,c; classnames=[...] in Python)
"""


def is_hidden(name):
    return name.startswith(".") or name == "__MACOSX"  # macOS's zip leftovers have no dot


@dataclass
class ClassFolderReading:
    """What reading one class folder found: images read (`nested` in subfolders), hidden files
    and `other` non-image files left out (`examples`: a few of their names)."""
    folder: str
    images: int = 0
    nested: int = 0
    hidden: int = 0
    other: int = 0
    examples: List[str] = field(default_factory=list)

    def line(self, classname):
        text = f"{self.folder}/ -> {classname}: {self.images} image{'s' * (self.images != 1)}"
        if self.nested:
            text += f" ({self.nested} in subfolders)"
        left_out = []
        if self.hidden:
            left_out.append(f"{self.hidden} hidden")
        if self.other:
            left_out.append(f"{self.other} not image{'s' * (self.other != 1)} "
                            f"({', '.join(self.examples)})")
        return text + (f"; left out {', '.join(left_out)}" if left_out else "")


def split_folder(root, split):
    """The folder under `root` that holds `split` (see SPLIT_FOLDERS), or None."""
    return next((name for name in SPLIT_FOLDERS.get(split, (split,))
                 if os.path.isdir(os.path.join(root, name))), None)


def canonical_class(folder_name):
    """The canonical class a folder name stands for ('Happy' -> 'happiness'), or None."""
    name = canonical_name(folder_name)
    return name if name in CANONICAL_CLASSES else None


class FolderDataset(FERDataset):
    """Without `classnames`, the canonical classes found under any of train/val/test (so every
    split gets the same label indices), in canonical order; with it, exactly those folders."""

    def __init__(self, root, split, transform=None, classnames=None, skip_bad_images=False):
        super().__init__(root, transform)
        self.split = split
        require_dir(self.root, "dataset root", FOLDER_LAYOUT)
        self.split_folder = split_folder(self.root, split)
        if self.split_folder is None:
            found = sorted(d for d in os.listdir(self.root)
                           if os.path.isdir(os.path.join(self.root, d)))
            raise missing_error(os.path.join(self.root, split),
                                f"split folder (found: {', '.join(found) or 'none'})",
                                FOLDER_LAYOUT)
        split_dir = os.path.join(self.root, self.split_folder)
        if classnames is None:
            splits = {split_folder(self.root, s) for s in ("train", "val", "test")} - {None}
            found = set()
            for name in sorted(splits | {self.split_folder}):
                found.update(self._class_folders(os.path.join(self.root, name)))
            classnames = tuple(c for c in CANONICAL_CLASSES if c in found)
            folders = self._class_folders(split_dir)
        else:
            given = tuple(classnames)
            unknown = sorted(set(_subfolders(split_dir)) - set(given))
            if unknown:
                raise ValueError(f"{split_dir}: folder(s) {', '.join(unknown)} are not in "
                                 f"classnames {list(given)}")
            # A folder named for a canonical class (any case, or a synonym) is that class.
            classnames = tuple(canonical_name(c) for c in given)
            if len(set(classnames)) < len(given):
                raise ValueError(f"classnames {list(given)} name one class twice (as "
                                 f"{list(classnames)}); give each class once")
            folders = {c: folder for c, folder in zip(classnames, given)
                       if os.path.isdir(os.path.join(split_dir, folder))}
        self.classnames = classnames

        files, targets, self.reading = [], [], {}
        for label, name in enumerate(classnames):
            if name not in folders:
                continue
            found, self.reading[name] = _read_class_folder(split_dir, folders[name])
            files += [os.path.join(self.split_folder, folders[name], f) for f in found]
            targets += [label] * len(found)
        if not files:
            raise ValueError(f"{split_dir}: no images found\nExpected layout:\n{FOLDER_LAYOUT}")
        self._set_items(files, targets, skip_bad_images=skip_bad_images, source=split_dir,
                        layout=FOLDER_LAYOUT)
        empty = [c for c, n in zip(classnames, self.class_counts()) if n == 0]
        if empty:
            warnings.warn(f"{split_dir}: no images for class(es) {', '.join(empty)}", stacklevel=2)

    def class_folder(self, classname):
        """The folder of a class in this split (None: the split has no folder for it)."""
        reading = self.reading.get(classname)
        if reading is None:
            return None
        return os.path.join(self.root, self.split_folder, reading.folder)

    def format_reading(self):
        """One line per class folder: the images read, and the files left out."""
        return "\n".join(f"  {reading.line(name)}" for name, reading in self.reading.items())

    @staticmethod
    def _class_folders(split_dir):
        """{canonical class: folder name} of the class folders in `split_dir`."""
        names = _subfolders(split_dir)
        if names and all(n.isdigit() for n in names):
            raise ValueError(f"{split_dir}: the class folders are numbered ({', '.join(names)}), "
                             "not named; rename them to class names ("
                             f"{', '.join(CANONICAL_CLASSES)} or the usual synonyms such as "
                             "happy, sad, angry)")
        folders = {}
        for name in names:
            canonical = canonical_class(name)
            if canonical is None:
                raise ValueError(f"{os.path.join(split_dir, name)}: {name!r} is not a class name "
                                 f"({', '.join(CANONICAL_CLASSES)}, any case, or a usual synonym "
                                 "such as happy, sad, angry); rename the folder, or name the "
                                 "classes explicitly: --classnames a,b,c in the scripts (the "
                                 "folder names, in label order), classnames=[...] in Python")
            if canonical in folders:
                raise ValueError(f"{split_dir}: folders {folders[canonical]!r} and {name!r} both "
                                 f"mean {canonical!r}; merge them")
            folders[canonical] = name
        return folders


def _subfolders(path):
    """The folders in `path` that are not hidden (.ipynb_checkpoints is no class)."""
    return sorted(d for d in os.listdir(path)
                  if os.path.isdir(os.path.join(path, d)) and not is_hidden(d))


def _read_class_folder(split_dir, folder):
    """-> (a class folder's image files, sorted, relative to it; its `ClassFolderReading`)."""
    top = os.path.join(split_dir, folder)
    reading, files, seen = ClassFolderReading(folder), [], set()
    for where, subfolders, names in os.walk(top, followlinks=True):
        real = os.path.realpath(where)
        if real in seen:  # (a link back up the tree)
            subfolders[:] = []
            continue
        seen.add(real)
        hidden = [d for d in subfolders if is_hidden(d)]
        subfolders[:] = sorted(d for d in subfolders if not is_hidden(d))
        reading.hidden += sum(len(files_in) for d in hidden
                              for _, _, files_in in os.walk(os.path.join(where, d)))
        for name in names:
            path = os.path.relpath(os.path.join(where, name), top)
            if is_hidden(name):
                reading.hidden += 1
            elif os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                files.append(path)
            else:
                reading.other += 1
                if len(reading.examples) < 3:
                    reading.examples.append(path)
    files.sort()
    reading.images = len(files)
    reading.nested = sum(os.sep in f for f in files)
    return files, reading
