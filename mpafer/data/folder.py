"""Images in root/<split>/<class folder>/, for any dataset without a dedicated reader:
`--dataset folder`.

Class folders are the canonical names in any case, or their usual synonyms (`FOLDER_SYNONYMS`:
the widely shared FER2013 image folders use angry, disgust, fear, happy, neutral, sad,
surprise); they are reported under the canonical names, in the canonical order. Numbered
folders (0/, 1/, ...) and other names are an error asking for the names: `--classnames a,b,c`
(the folder names, in label order; `classnames=[...]` in Python) names any classes (a name
that stands for a canonical class, e.g. happy, is that class), including ones the shipped LLM
descriptions do not cover (then train without template-3 hard prompts,
e.g. `--hard-prompt-template 2`, or give `--descriptions FILE`).
"""
import os
import warnings

from ..labels import CANONICAL_CLASSES, SYNONYMS, canonical_name
from .base import IMAGE_EXTENSIONS, FERDataset, missing_error, require_dir

# The usual folder names for the canonical classes, any case: the synonyms every class name
# maps through (`labels.canonical_name`: --classnames, --base-classes, the class sets).
FOLDER_SYNONYMS = SYNONYMS
EXPLICIT_HINT = ("rename the folder, or name the classes explicitly: --classnames a,b,c in the "
                 "scripts (the folder names, in label order), classnames=[...] in Python")

FOLDER_LAYOUT = """\
<root>/
  <split>/<class folder>/*.jpg|jpeg|png|bmp|webp   e.g. train/happiness/0001.jpg
  class folders: neutral, happiness, surprise, sadness, anger, disgust, fear, contempt, any case,
  or the usual synonyms (happy, sad, angry, surprised, fearful, disgusted, contemptuous);
  any other names are given explicitly (--classnames a,b,c; classnames=[...] in Python)
"""


def canonical_class(folder_name):
    """The canonical class a folder name stands for ('Happy' -> 'happiness'), or None."""
    name = canonical_name(folder_name)
    return name if name in CANONICAL_CLASSES else None


class FolderDataset(FERDataset):
    """Images in root/<split>/<class folder>/, for any dataset without a dedicated reader.

    Without `classnames`, every folder must name a canonical class, in any case or by a usual
    synonym (`FOLDER_SYNONYMS`); the classes are those found under any of the train/val/test
    folders (so every split gets the same label indices), in canonical order, under their
    canonical names. With `classnames`, exactly those folder names, in that order.
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
            splits = {split} | {s for s in ("train", "val", "test")
                                if os.path.isdir(os.path.join(self.root, s))}
            found = set()
            for name in sorted(splits):
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

        files, targets = [], []
        for label, name in enumerate(classnames):
            if name not in folders:
                continue
            for file in sorted(os.listdir(os.path.join(split_dir, folders[name]))):
                if os.path.splitext(file)[1].lower() in IMAGE_EXTENSIONS:
                    files.append(os.path.join(split, folders[name], file))
                    targets.append(label)
        if not files:
            raise ValueError(f"{split_dir}: no images found\nExpected layout:\n{FOLDER_LAYOUT}")
        self._set_items(files, targets, skip_bad_images=skip_bad_images, source=split_dir,
                        layout=FOLDER_LAYOUT)
        empty = [c for c, n in zip(classnames, self.class_counts()) if n == 0]
        if empty:
            warnings.warn(f"{split_dir}: no images for class(es) {', '.join(empty)}", stacklevel=2)

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
                                 f"such as happy, sad, angry); {EXPLICIT_HINT}")
            if canonical in folders:
                raise ValueError(f"{split_dir}: folders {folders[canonical]!r} and {name!r} both "
                                 f"mean {canonical!r}; merge them")
            folders[canonical] = name
        return folders


def _subfolders(path):
    return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
