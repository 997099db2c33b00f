"""Class prototypes for L_v: mean normalised frozen CLIP image features, cached on disk."""
import hashlib
import json
import os
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .clip.loading import safe_load
from .utils import atomic_save


@torch.no_grad()
def compute_prototypes(model, dataloader, num_classes: Optional[int] = None,
                       per_class: Optional[int] = None, progress: bool = True) -> torch.Tensor:
    """Prototype p_c = mean of the L2-normalised *unprompted* CLIP image features of class c.

    Streams `dataloader` (use the eval transform) through the frozen image tower, with no
    gradients and autocast on CUDA. `model` is an MPAFER or a bare CLIP. With `per_class`, only
    the first that many images of each class count. Returns `[C, D]`, re-normalised.
    """
    clip_model = getattr(model, "clip", model)
    num_classes = num_classes or len(getattr(model, "classnames", []) or dataloader.dataset.classnames)
    device = clip_model.logit_scale.device
    sums = torch.zeros(num_classes, clip_model.embed_dim, dtype=torch.float64, device=device)
    counts = torch.zeros(num_classes, dtype=torch.long, device=device)
    for images, labels in tqdm(dataloader, desc="prototypes", disable=not progress, leave=False):
        images, labels = images.to(device, non_blocking=True), labels.to(device)
        if per_class is not None:
            keep = _first_per_class(labels, counts, per_class)
            if not keep.any():
                continue
            images, labels = images[keep], labels[keep]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            features = clip_model.encode_image(images)
        sums.index_add_(0, labels, F.normalize(features.float(), dim=-1).double())
        counts += torch.bincount(labels, minlength=num_classes)
        if per_class is not None and bool((counts >= per_class).all()):
            break
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        names = getattr(model, "classnames", None) or list(range(num_classes))
        raise ValueError(f"no training images for classes {[names[i] for i in empty]}; cannot build prototypes")
    return F.normalize((sums / counts[:, None]).float(), dim=-1)


def _first_per_class(labels: torch.Tensor, counts: torch.Tensor, per_class: int) -> torch.Tensor:
    """Mask of the images that still fit under each class's quota (in batch order)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    seen = counts.clone()
    for i, y in enumerate(labels.tolist()):
        if seen[y] < per_class:
            keep[i] = True
            seen[y] += 1
    return keep


def prototype_cache_key(**fields) -> str:
    """A stable hash of what determines the prototypes (CLIP hash, dataset, split, transform, ...)."""
    blob = json.dumps(fields, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def cached_prototypes(cache_dir: str, key_fields: Dict, compute: Callable[[], torch.Tensor],
                      log: Callable[[str], None] = print) -> torch.Tensor:
    """Load prototypes from `cache_dir` if computed before with the same `key_fields`, else
    compute and save them (atomically, with the key fields beside the tensor)."""
    path = os.path.join(cache_dir, f"prototypes-{prototype_cache_key(**key_fields)}.pt")
    if os.path.isfile(path):
        cached = safe_load(path, "prototype cache")
        if cached.get("key") == json.loads(json.dumps(key_fields, default=str)):
            log(f"prototypes: loaded from {path}")
            return cached["prototypes"]
    prototypes = compute()
    atomic_save({"prototypes": prototypes.cpu(), "key": json.loads(json.dumps(key_fields, default=str))}, path)
    log(f"prototypes: computed and cached in {path}")
    return prototypes
