"""Image transforms: training augmentation, CLIP's evaluation preprocessing, Exp-CLIP's input.
With `uint8=True` they stop at the pixels and the rest runs batched on the device."""
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from ..clip.transform import CLIP_MEAN, CLIP_STD, clip_preprocess
from .device_augment import RANDOM_ERASING_P


def to_rgb(image):
    """Convert a PIL image to RGB (a named function, so transforms pickle for spawn workers)."""
    return image.convert("RGB")


def train_transform(resolution, uint8=False):
    """RandomResizedCrop (0.8, 1) bicubic, flip, CLIP normalisation, RandomErasing (our choice
    where the papers are silent); uint8=True stops after the flip (`TrainBatchAugment`)."""
    crop = [to_rgb,
            T.RandomResizedCrop(resolution, scale=(0.8, 1.0),
                                interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip()]
    if uint8:
        return T.Compose([*crop, T.PILToTensor()])
    return T.Compose([*crop, T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD),
                      T.RandomErasing(p=RANDOM_ERASING_P)])


def eval_transform(resolution, uint8=False):
    """CLIP's own preprocessing; uint8=True stops at the pixels (`as_model_input`)."""
    if uint8:
        return T.Compose([T.Resize(resolution, interpolation=T.InterpolationMode.BICUBIC),
                          T.CenterCrop(resolution), to_rgb, T.PILToTensor()])
    return clip_preprocess(resolution)


def describe_transform(transform) -> list:
    """A transform's steps and parameters as plain values (never reprs), to key a cache by."""
    steps = transform.transforms if isinstance(transform, T.Compose) else [transform]
    described = []
    for step in steps:
        params = {}
        for key, value in sorted(vars(step).items()):
            if key.startswith("_") or key == "training":  # nn.Module's own state
                continue
            value = getattr(value, "value", value)  # enums such as InterpolationMode
            if isinstance(value, (int, float, str, bool, type(None))) or (
                    isinstance(value, (tuple, list))
                    and all(isinstance(v, (int, float, str, bool)) for v in value)):
                params[key] = list(value) if isinstance(value, tuple) else value
        described.append({"step": getattr(step, "__name__", type(step).__name__), **params})
    return described


def expclip_transform(resolution, normalize=False):
    """Exp-CLIP's input, as the released heads were trained: a squash and ToTensor."""
    steps = [to_rgb, T.Resize((resolution, resolution)), T.ToTensor()]
    if normalize:
        steps.append(T.Normalize(CLIP_MEAN, CLIP_STD))
    return T.Compose(steps)


def describe_expclip_transform(resolution, normalize=False):
    """`expclip_transform` in words, for feature files and reports."""
    return (f"Resize(({resolution}, {resolution})) squash (bilinear), ToTensor, "
            + ("CLIP mean/std normalisation" if normalize else "no normalisation"))


class SeededAugmentation(Dataset):
    """A dataset whose random transform draws from torch's RNG seeded by (seed, epoch, index), so
    a run stopped mid-epoch resumes exactly. Call `set_epoch` before iterating (workers copy the
    dataset when an epoch starts, so not with persistent_workers)."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        state = np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(state[0]) << 32 | int(state[1]))
            return self.dataset[index]
