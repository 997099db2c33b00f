"""A run's class prototypes, cached on disk under everything they depend on, as stable values
(never object reprs), so that a later run in another process finds them."""
import copy
import hashlib
import json
import os
from typing import Callable, Dict, Optional

import torch
from torch.utils.data import DataLoader

from ..clip.loading import safe_load
from ..clip.transform import CLIP_MEAN, CLIP_STD
from ..data.transforms import describe_transform, eval_transform
from ..files import atomic_save
from ..prototypes import compute_prototypes
from .fingerprint import image_identity
from .synthetic import RENDERER_VERSION


def cached_prototypes(cache_dir: str, key_fields: Dict, compute: Callable[[], torch.Tensor],
                      log: Callable[[str], None] = print) -> torch.Tensor:
    """Prototypes cached in `cache_dir` under `key_fields`, else `compute()`d and saved."""
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True, default=str).encode("utf-8"))
    path = os.path.join(cache_dir, f"prototypes-{key.hexdigest()[:16]}.pt")
    stored_key = json.loads(json.dumps(key_fields, default=str))  # as it reads back
    if os.path.isfile(path):
        cached = safe_load(path, "prototype cache")
        if cached.get("key") == stored_key:
            log(f"prototypes: loaded from {path}")
            return cached["prototypes"]
    prototypes = compute()
    atomic_save({"prototypes": prototypes.cpu(), "key": stored_key}, path)
    log(f"prototypes: computed and cached in {path}")
    return prototypes


def training_prototypes(model, train_set, resolution: int, cache_dir: str, key_fields: Dict,
                        per_class: Optional[int] = None, seed: int = 0, workers: int = 0,
                        amp_dtype: Optional[torch.dtype] = None,
                        log: Callable[[str], None] = print) -> torch.Tensor:
    """A training set's prototypes (CLIP's eval preprocessing), cached under `key_fields`."""
    view = copy.copy(train_set)  # the same images with the eval transform; train_set untouched
    view.transform = eval_transform(resolution, uint8=True)
    device = model.clip.logit_scale.device
    loader = DataLoader(view, batch_size=128, num_workers=workers,
                        pin_memory=device.type == "cuda")
    return cached_prototypes(os.path.join(cache_dir, "prototypes"), key_fields, lambda: (
        compute_prototypes(model, loader, per_class=per_class, seed=seed, amp_dtype=amp_dtype)),
        log=log)


def prototype_key_fields(model, train_set, resolution: int, dataset: str, root: str,
                         per_class: Optional[int], seed: int,
                         amp_dtype: Optional[torch.dtype]) -> Dict:
    """Everything a training set's prototypes depend on: the CLIP, the preprocessing, the images
    (and their files' sizes and times, or the demo renderer's version), the subset, precision."""
    key = {"clip_sha256": model.clip.checkpoint_sha256, "clip_activation": model.clip.activation,
           "resolution": resolution,
           "transform": describe_transform(eval_transform(resolution, uint8=True)),
           "normalize": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)},  # on the device
           "dataset": dataset, "root": root, "split": "train", "images": len(train_set),
           **image_identity(train_set),
           "classes": list(train_set.classnames), "per_class": per_class or 0,
           "seed": seed if per_class else None,  # the seed draws the per-class subset
           "amp": str(amp_dtype)}
    if dataset == "synthetic-demo":
        key["renderer"] = RENDERER_VERSION
    return key
