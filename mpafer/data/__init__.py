"""Datasets, transforms and samplers for facial expressions: one reader per on-disk layout,
each mapping its labels onto `mpafer.labels`' canonical names; `DATASETS` names them all."""
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Optional

from ..labels import BASIC_CLASSES, CANONICAL_CLASSES
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


@dataclass(frozen=True)
class DatasetSpec:
    """`reader(root, split, transform=..., **options)` and the training settings train.py
    starts from (`preset`; None: not a training preset)."""
    reader: Callable
    preset: Optional[Dict] = None


_AFFECTNET_PRESET = dict(data_root="data/AffectNet", epochs=20, balanced_sampler=True,
                         samples_per_epoch=64000, prototypes_per_class=2000)
# Every dataset by name. RAF-DB's preset is the paper's reported recipe; the others are ours.
DATASETS: Dict[str, DatasetSpec] = {
    "rafdb": DatasetSpec(RAFDB, dict(data_root="data/RAF-DB", epochs=120, batch_size=32,
                                     lr=0.032)),
    "affectnet7": DatasetSpec(partial(AffectNet, num_classes=7), _AFFECTNET_PRESET),
    "affectnet8": DatasetSpec(partial(AffectNet, num_classes=8), _AFFECTNET_PRESET),
    "ferplus": DatasetSpec(FERPlus, dict(data_root="data/FERPlus", epochs=40, eval_split="val")),
    "folder": DatasetSpec(FolderDataset, dict(data_root="data/faces", epochs=50)),
}
DATASET_NAMES = tuple(DATASETS)
TRAINING_DATASETS = tuple(name for name, spec in DATASETS.items() if spec.preset is not None)


def build_dataset(name, root, split, transform=None, **options):
    """Build a dataset by name (a key of `DATASETS`); `options` go to its reader."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return DATASETS[name].reader(root, split, transform=transform, **options)


def format_class_counts(dataset):
    """One line per class, e.g. '  happiness   4772  38.9%', for printing at start-up."""
    counts = dataset.class_counts()
    total = max(sum(counts), 1)
    width = max(len(c) for c in dataset.classnames)
    return "\n".join(f"  {name:<{width}} {count:>7d} {100 * count / total:5.1f}%"
                     for name, count in zip(dataset.classnames, counts))


__all__ = [
    "AFFECTNET_CLASSES", "AFFECTNET_LAYOUT", "BASIC_CLASSES", "CANONICAL_CLASSES", "DATASETS",
    "DATASET_NAMES", "TRAINING_DATASETS", "DatasetSpec",
    "FERPLUS_LAYOUT", "FERPLUS_VOTE_COLUMNS", "FOLDER_LAYOUT", "FOLDER_SYNONYMS",
    "IMAGE_EXTENSIONS", "RAFDB", "RAFDB_CLASSES", "RAFDB_EXPECTED_COUNTS", "RAFDB_LABEL_FILE",
    "RAFDB_LAYOUT", "AffectNet", "ClassBalancedSampler", "FERDataset", "FERPlus", "FolderDataset",
    "ResumableSampler", "SeededAugmentation", "TrainBatchAugment",
    "as_model_input", "build_dataset", "canonical_class", "dataset_fingerprint",
    "eval_transform", "expclip_transform", "ferplus_vote", "format_class_counts", "load_image",
    "normalize_on_device", "random_erasing_on_device", "require_readable", "to_rgb",
    "train_transform", "unreadable_images",
]
