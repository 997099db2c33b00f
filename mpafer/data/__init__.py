"""Datasets, label maps, transforms and a class-balanced sampler for facial expressions.

One module per concern: `base` (the `FERDataset` base class, image loading, clear errors),
`rafdb`, `affectnet`, `ferplus`, `folder` (one reader per on-disk layout), `transforms`,
`device_augment` (the batched half of the augmentation, run on the device) and `sampler`.
Every reader maps its dataset's labels onto the canonical class names of `mpafer.labels`;
`build_dataset` picks a reader by name.
"""
from ..labels import BASIC_CLASSES, CANONICAL_CLASSES
from ..synthetic import SyntheticFaces
from .affectnet import AFFECTNET_CLASSES, AFFECTNET_LAYOUT, AffectNet
from .base import (
    IMAGE_EXTENSIONS,
    FERDataset,
    dataset_fingerprint,
    load_image,
    require_readable,
    unreadable_images,
)
from .device_augment import (
    TrainBatchAugment,
    as_model_input,
    normalize_on_device,
    random_erasing_on_device,
)
from .ferplus import FERPLUS_LAYOUT, FERPLUS_VOTE_COLUMNS, FERPlus, ferplus_vote
from .folder import FOLDER_LAYOUT, FOLDER_SYNONYMS, FolderDataset, canonical_class
from .rafdb import RAFDB, RAFDB_CLASSES, RAFDB_EXPECTED_COUNTS, RAFDB_LABEL_FILE, RAFDB_LAYOUT
from .sampler import ClassBalancedSampler, ResumableSampler
from .transforms import (
    SeededAugmentation,
    eval_transform,
    expclip_transform,
    to_rgb,
    train_transform,
)

DATASET_NAMES = ("rafdb", "affectnet7", "affectnet8", "ferplus", "folder", "synthetic")


def build_dataset(name, root, split, transform=None, **options):
    """Build a dataset by name: rafdb, affectnet7, affectnet8, ferplus, folder, synthetic.

    `options` go to the dataset class (e.g. skip_bad_images=True, classnames=[...] (folder
    names) for folder, num_per_class/image_size/seed for synthetic, which ignores `root`).
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


__all__ = [
    "AFFECTNET_CLASSES", "AFFECTNET_LAYOUT", "BASIC_CLASSES", "CANONICAL_CLASSES", "DATASET_NAMES",
    "FERPLUS_LAYOUT", "FERPLUS_VOTE_COLUMNS", "FOLDER_LAYOUT", "FOLDER_SYNONYMS",
    "IMAGE_EXTENSIONS", "RAFDB", "RAFDB_CLASSES", "RAFDB_EXPECTED_COUNTS", "RAFDB_LABEL_FILE",
    "RAFDB_LAYOUT", "AffectNet", "ClassBalancedSampler", "FERDataset", "FERPlus", "FolderDataset",
    "ResumableSampler", "SeededAugmentation", "SyntheticFaces", "TrainBatchAugment",
    "as_model_input", "build_dataset", "canonical_class", "dataset_fingerprint",
    "eval_transform", "expclip_transform", "ferplus_vote", "format_class_counts", "load_image",
    "normalize_on_device", "random_erasing_on_device", "require_readable", "to_rgb",
    "train_transform", "unreadable_images",
]
