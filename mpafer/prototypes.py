"""Class prototypes for L_v: mean normalised frozen CLIP image features, cached on disk."""
import copy
import hashlib
import json
import os
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

from .clip.loading import safe_load
from .clip.transform import CLIP_MEAN, CLIP_STD
from .data.base import dataset_fingerprint, files_stat_fingerprint
from .data.device_augment import as_model_input
from .data.loader import each_batch
from .data.subsets import Subset as DataSubset
from .data.transforms import describe_transform, eval_transform
from .synthetic import RENDERER_VERSION
from .utils import atomic_save, progress_bar


@torch.no_grad()
def compute_prototypes(model, dataloader, num_classes: Optional[int] = None,
                       per_class: Optional[int] = None, progress: bool = True, *, seed: int = 0,
                       amp_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Prototype p_c = mean of the L2-normalised *unprompted* CLIP image features of class c.

    Streams `dataloader` (use the eval transform; uint8 pixel batches are normalised on the
    device) through the frozen image tower, with no gradients. `model` is an MPAFER or a bare
    CLIP. With `per_class`, each class contributes a random subset of min(per_class, its size)
    images drawn with `seed` (`prototype_subset`; the loader's dataset must have `targets`), and
    only those images are loaded. The subset depends on `seed`: a cache of the prototypes must
    include it in its key, beside `per_class`. `amp_dtype` (e.g. torch.bfloat16) runs the tower
    under autocast; None = fp32. Returns `[C, D]`, re-normalised.
    """
    clip_model = getattr(model, "clip", model)
    num_classes = num_classes or len(getattr(model, "classnames", [])
                                     or dataloader.dataset.classnames)
    if per_class is not None:
        dataloader = _subset_loader(dataloader, prototype_subset(_targets(dataloader.dataset),
                                                                 per_class, seed))
    device = clip_model.logit_scale.device
    sums = torch.zeros(num_classes, clip_model.embed_dim, dtype=torch.float64, device=device)
    counts = torch.zeros(num_classes, dtype=torch.long, device=device)
    for images, labels in progress_bar(each_batch(dataloader), desc="prototypes",
                                       total=len(dataloader), disable=not progress,
                                       leave=False):
        images = as_model_input(images.to(device, non_blocking=True))
        labels = labels.to(device)
        with (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
              else nullcontext()):
            features = clip_model.encode_image(images)
        sums.index_add_(0, labels, F.normalize(features.float(), dim=-1).double())
        counts += torch.bincount(labels, minlength=num_classes)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        names = getattr(model, "classnames", None) or list(range(num_classes))
        raise ValueError(f"no training images for classes {[names[i] for i in empty]}; "
                         "cannot build prototypes")
    return F.normalize((sums / counts[:, None]).float(), dim=-1)


def prototype_subset(targets: Sequence[int], per_class: int, seed: int = 0) -> List[int]:
    """Indices (sorted) of a seeded random subset: min(per_class, count) images of each class."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    targets = torch.as_tensor(list(targets), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in targets.unique().tolist():  # ascending class order, so the draw is reproducible
        members = (targets == c).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return sorted(torch.cat(chosen).tolist()) if chosen else []


def _targets(dataset) -> Sequence[int]:
    if hasattr(dataset, "targets"):
        return dataset.targets
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[-1].tolist()
    raise ValueError(f"per_class prototypes need the dataset's labels without loading its images: "
                     f"{type(dataset).__name__} has no `targets`")


def _subset_loader(loader: DataLoader, indices: List[int]) -> DataLoader:
    """The same loader settings over only `indices` of its dataset, in order."""
    return DataLoader(Subset(loader.dataset, indices), batch_size=loader.batch_size or 1,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory)


def prototype_cache_key(**fields) -> str:
    """A stable hash of what determines the prototypes (CLIP hash, dataset, split,
    transform, ...)."""
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
    atomic_save({"prototypes": prototypes.cpu(),
                 "key": json.loads(json.dumps(key_fields, default=str))}, path)
    log(f"prototypes: computed and cached in {path}")
    return prototypes


def training_prototypes(model, train_set, resolution: int, cache_dir: str, key_fields: Dict,
                        per_class: Optional[int] = None, seed: int = 0, workers: int = 0,
                        amp_dtype: Optional[torch.dtype] = None,
                        log: Callable[[str], None] = print) -> torch.Tensor:
    """The prototypes of a training set, from the cache in `cache_dir` if they were computed
    before under the same `key_fields` (see `prototype_key_fields`), else computed now from
    the training images with CLIP's evaluation preprocessing and cached."""
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
    """Everything the prototypes of a training set depend on, as stable values (hashes, sizes,
    parameter values; never object reprs), so that a later run, in another process, finds them:
    the CLIP and its activation, the preprocessing's parameters, the images (names and labels;
    the size and modification time of their files, or the version of the demo's face
    renderer), the subset drawn, the precision."""
    base = train_set.base if isinstance(train_set, DataSubset) else train_set
    key = {"clip_sha256": model.clip.checkpoint_sha256, "clip_activation": model.clip.activation,
           "resolution": resolution,
           "transform": describe_transform(eval_transform(resolution, uint8=True)),
           "normalize": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)},  # on the device
           "dataset": dataset, "root": root, "split": "train", "images": len(train_set),
           "items_sha256": dataset_fingerprint(base), "files_sha256": files_stat_fingerprint(base),
           "classes": list(train_set.classnames), "per_class": per_class or 0,
           "seed": seed if per_class else None,  # the seed draws the per-class subset
           "amp": str(amp_dtype)}
    if dataset == "synthetic-demo":
        key["renderer"] = RENDERER_VERSION
    if isinstance(train_set, DataSubset):  # --shots / --val-fraction: which images, not how many
        key["subset"] = train_set.fingerprint()
    return key
