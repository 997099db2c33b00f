"""What identifies the data a run trains on, wherever it lies: per split its size, class counts,
the SHA-256 of its items (file relative to the root, label, crop) in order, which decides, and a
32-bit digest per item, which only says which files differ."""
import hashlib
import json
from collections import Counter
from typing import Dict, List

import numpy as np
import torch

from ..data.base import dataset_fingerprint, files_stat_fingerprint
from ..data.subsets import Subset
from ..progress import counted

SHOWN = 3  # files named in a message, at most


def items(dataset) -> List[str]:
    """One line per item: its file or image name, its label and its crop box, if any."""
    files = getattr(dataset, "_files", None)
    names = ([f.decode("utf-8") for f in files] if files is not None and len(files)
             else list(getattr(dataset, "image_names", [])))
    names = names or [f"#{i}" for i in range(len(dataset.targets))]  # drawn, not read
    boxes = getattr(dataset, "_boxes", None)
    boxes = [None] * len(names) if boxes is None else np.asarray(boxes).tolist()
    return [f"{name}\t{int(label)}\t{box}" for name, label, box in
            zip(names, dataset.targets, boxes)]


def data_record(dataset: str, splits: Dict[str, object]) -> Dict:
    """The record of `splits` ({split name: dataset as read}) of dataset `dataset`."""
    def digests(d) -> torch.Tensor:
        return torch.tensor([int.from_bytes(hashlib.blake2b(line.encode("utf-8"), digest_size=4)
                                            .digest(), "little", signed=True) for line in items(d)],
                            dtype=torch.int32)

    first = next(iter(splits.values()))
    return {"dataset": dataset, "classes": list(first.classnames),
            "splits": {name: {"images": len(d.targets), "class_counts": list(d.class_counts()),
                              "sha256": dataset_fingerprint(d), "items": digests(d)}
                       for name, d in sorted(splits.items())}}


def data_differences(recorded: Dict, found: Dict, splits: Dict[str, object]) -> List[str]:
    """How `found` (the `data_record` of `splits`) differs from `recorded`, in short phrases."""
    differences = []
    if found["classes"] != recorded["classes"]:
        differences.append(f"classes {found['classes']} (the run's: {recorded['classes']})")
    for name in sorted(set(found["splits"]) | set(recorded["splits"])):
        if name not in found["splits"]:
            differences.append(f"no {name} split (the run had one)")
        elif name not in recorded["splits"]:
            differences.append(f"a {name} split, which the run did not read")
        elif found["splits"][name]["sha256"] != recorded["splits"][name]["sha256"]:
            differences.append(split_difference(name, recorded["splits"][name],
                                                found["splits"][name], items(splits[name])))
    return differences


def split_difference(name: str, recorded: Dict, found: Dict, lines: List[str]) -> str:
    """How split `name` differs: size, class counts, which files are not the run's, or order."""
    parts = []
    if found["images"] != recorded["images"]:
        parts.append(f"{counted(found['images'], 'image')} (the run's: {recorded['images']})")
    if found["class_counts"] != recorded["class_counts"]:
        parts.append(f"{found['class_counts']} per class (the run's: "
                     f"{recorded['class_counts']})")
    left = Counter(recorded["items"].tolist())
    new = []
    for line, digest in zip(lines, found["items"].tolist()):
        if left[digest] > 0:
            left[digest] -= 1
        else:
            new.append(line.split("\t")[0])
    if new:
        shown = ", ".join(new[:SHOWN]) + (", ..." if len(new) > SHOWN else "")
        parts.append(f"{len(new)} of its {counted(found['images'], 'image')} are not the run's "
                     f"(another file, label or crop): {shown}")
    if not parts:
        parts.append("the same images in another order")
    return f"{name}: " + ", ".join(parts)


def data_identity(record: Dict) -> str:
    """SHA-256 of what decides whether two `data_record`s are the same data, not where it lies."""
    splits = sorted(record["splits"].items())
    deciding = {"dataset": record["dataset"], "classes": list(record["classes"]),
                "splits": {name: split["sha256"] for name, split in splits}}
    return hashlib.sha256(json.dumps(deciding, sort_keys=True).encode("utf-8")).hexdigest()


def image_identity(dataset) -> Dict:
    """Which images exactly: the items (files, labels, crops) of the full set, its files' sizes
    and modification times, and for a subset (--shots, --val-fraction) which of them."""
    base = dataset.base if isinstance(dataset, Subset) else dataset
    identity = {"items_sha256": dataset_fingerprint(base),
                "files_sha256": files_stat_fingerprint(base)}
    if isinstance(dataset, Subset):  # which images, not how many
        identity["subset"] = dataset.fingerprint()
    return identity
