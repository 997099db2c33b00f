"""Parts of a training set: K images per class (few-shot) and a stratified validation part,
seeded, independent draws of indices into the full training set (so a run records its files)."""
import copy
import hashlib
import json
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset

_FEW_SHOT_STREAM, _HELD_OUT_STREAM = 1, 2  # numpy seed-sequence tags: independent draws


def _by_class(targets: Sequence[int],
              pool: Optional[Sequence[int]] = None) -> Dict[int, np.ndarray]:
    """{class: indices of that class (in pool, ascending)}, classes in ascending order."""
    pool = np.arange(len(targets)) if pool is None else np.sort(np.asarray(pool, dtype=np.int64))
    labels = np.asarray(targets, dtype=np.int64)[pool]
    return {int(c): pool[labels == c] for c in np.unique(labels)}


def few_shot_indices(targets: Sequence[int], shots: int, seed: int,
                     pool: Optional[Sequence[int]] = None) -> List[int]:
    """min(shots, available) indices per class from `pool` (default: all), sorted."""
    if shots < 1:
        raise ValueError(f"--shots must be >= 1 (0 = the full training set), got {shots}")
    rng = np.random.default_rng([seed, _FEW_SHOT_STREAM])
    chosen = [rng.permutation(members)[:shots] for members in _by_class(targets, pool).values()]
    return sorted(int(i) for part in chosen for i in part)


def held_out_count(class_size: int, fraction: float) -> int:
    """round(fraction * size) of a class held out, at least 1 and leaving at least 1."""
    if class_size < 2:
        return 0
    return min(max(round(fraction * class_size), 1), class_size - 1)


def stratified_split(targets: Sequence[int], fraction: float,
                     seed: int) -> Tuple[List[int], List[int]]:
    """`fraction` of each class held out -> (kept, held out), sorted indices into `targets`."""
    if not 0 < fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1) (0 = off), got {fraction}")
    rng = np.random.default_rng([seed, _HELD_OUT_STREAM])
    kept, held = [], []
    for members in _by_class(targets).values():
        order = rng.permutation(members)
        count = held_out_count(len(members), fraction)
        held.extend(order[:count].tolist())
        kept.extend(order[count:].tolist())
    return sorted(kept), sorted(held)


class Subset(Dataset):
    """Items `indices` of `dataset` (of the original, `base`, for a subset of a subset), with a
    transform and optionally `classnames` of their own (labels follow them)."""

    def __init__(self, dataset, indices: Sequence[int], transform=None,
                 classnames: Optional[Sequence[str]] = None):
        self.classnames = tuple(classnames if classnames is not None else dataset.classnames)
        if isinstance(dataset, Subset):  # compose: indices into the original dataset
            indices, dataset = [dataset.indices[int(i)] for i in indices], dataset.base
        self.base = copy.copy(dataset)  # the same images, untransformed
        self.base.transform = None
        self.indices = [int(i) for i in indices]
        self.transform = transform
        # The original label of each class -> its label here (-1: not a class of the subset).
        self.label_map = [self.classnames.index(c) if c in self.classnames else -1
                          for c in dataset.classnames]
        self.targets = [self.label_map[int(dataset.targets[i])] for i in self.indices]
        if any(t < 0 for t in self.targets):
            raise ValueError("a subset with classes of its own must hold images of those only")

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        image, label = self.base[self.indices[index]]
        image = self.transform(image) if self.transform is not None else image
        return image, self.label_map[label]

    @property
    def load(self):
        """`load(index)`: the untransformed image of item `index`, read from its file; None when
        the dataset has no files (so the checks that decode every image reach a subset's)."""
        load = getattr(self.base, "load", None)
        return None if load is None else (lambda index: load(self.indices[index]))

    def class_counts(self) -> List[int]:
        return np.bincount(np.asarray(self.targets, dtype=np.int64),
                           minlength=len(self.classnames)).tolist()

    def fingerprint(self) -> str:
        """SHA-256 of the chosen indices (and classes): tells apart two subsets of one size."""
        classes = [] if self.classnames == tuple(self.base.classnames) else list(self.classnames)
        return hashlib.sha256(json.dumps(self.indices if not classes else [self.indices, classes])
                              .encode()).hexdigest()

    def describe(self) -> List[Dict]:
        """One entry per item: its index in the full set, its label, its file if it has one."""
        has_path = hasattr(self.base, "image_path")
        items = []
        for index, target in zip(self.indices, self.targets):
            item = {"index": index, "label": self.classnames[target]}
            if has_path:
                item["path"] = self.base.image_path(index)
            items.append(item)
        return items


def subset_record(subset: Subset, **info) -> Dict:
    """What a run writes down about a subset: `info` (protocol, seed, ...), counts, items."""
    return {**info, "num_images": len(subset),
            "class_counts": dict(zip(subset.classnames, subset.class_counts())),
            "items": subset.describe()}


def class_subset(dataset, classnames: Sequence[str]) -> Subset:
    """The images of `classnames` only, labelled in that order (e.g. base-to-novel's base)."""
    unknown = [c for c in classnames if c not in dataset.classnames]
    if unknown:
        raise ValueError(f"{unknown} are not classes of the data (its classes: "
                         f"{', '.join(dataset.classnames)})")
    wanted = {dataset.classnames.index(c) for c in classnames}
    return Subset(dataset, [i for i, t in enumerate(dataset.targets) if t in wanted],
                  getattr(dataset, "transform", None), classnames)
