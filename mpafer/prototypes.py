"""Class prototypes for L_v: the mean L2-normalised frozen CLIP image feature of each class, of
every training image or of a seeded random subset per class. (A run caches them on disk:
`mpafer.app.prototype_cache`.)"""
from contextlib import nullcontext
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

from .data.batches import each_batch
from .data.device_augment import as_model_input
from .progress import progress_bar


@torch.no_grad()
def compute_prototypes(model, dataloader, num_classes: Optional[int] = None,
                       per_class: Optional[int] = None, progress: bool = True, *, seed: int = 0,
                       amp_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Prototype p_c = mean of the L2-normalised *unprompted* CLIP image features of class c,
    `[C, D]`, re-normalised. `model` is an MPAFER or a bare CLIP; with `per_class`, each class
    gives a subset drawn with `seed` (so a cache keys on both) and only those are loaded."""
    clip_model = getattr(model, "clip", model)
    num_classes = num_classes or len(getattr(model, "classnames", [])
                                     or dataloader.dataset.classnames)
    if per_class is not None:
        dataset = dataloader.dataset
        if hasattr(dataset, "targets"):
            targets = dataset.targets
        elif isinstance(dataset, TensorDataset):
            targets = dataset.tensors[-1].tolist()
        else:
            raise ValueError("per_class prototypes need the dataset's labels without loading its "
                             f"images: {type(dataset).__name__} has no `targets`")
        # The same loader settings over only the subset, in order.
        dataloader = DataLoader(Subset(dataset, prototype_subset(targets, per_class, seed)),
                                batch_size=dataloader.batch_size or 1,
                                num_workers=dataloader.num_workers,
                                collate_fn=dataloader.collate_fn,
                                pin_memory=dataloader.pin_memory)
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
