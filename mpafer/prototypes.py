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
