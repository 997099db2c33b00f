"""Image transforms: training augmentation, CLIP's evaluation preprocessing, Exp-CLIP's input."""
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from ..clip.transform import CLIP_MEAN, CLIP_STD, clip_preprocess


def to_rgb(image):
    """Convert a PIL image to RGB (a named function, so transforms pickle for spawn workers)."""
    return image.convert("RGB")


def train_transform(resolution):
    """Training augmentation (our choice where the papers are silent): RandomResizedCrop
    scale (0.8, 1) bicubic, horizontal flip, CLIP normalisation, RandomErasing p = 0.25."""
    return T.Compose([
        to_rgb,
        T.RandomResizedCrop(resolution, scale=(0.8, 1.0),
                            interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
        T.RandomErasing(p=0.25),
    ])


def eval_transform(resolution):
    """CLIP's own preprocessing: bicubic short-side resize, centre crop, normalisation."""
    return clip_preprocess(resolution)


def expclip_transform(resolution, normalize=False):
    """Exp-CLIP's input: squash to (resolution, resolution) and ToTensor, with no mean/std
    normalisation by default (the released Exp-CLIP heads were trained that way)."""
    steps = [to_rgb, T.Resize((resolution, resolution)), T.ToTensor()]
    if normalize:
        steps.append(T.Normalize(CLIP_MEAN, CLIP_STD))
    return T.Compose(steps)


def describe_expclip_transform(resolution, normalize=False):
    """`expclip_transform` in words, for feature files and reports."""
    return (f"Resize(({resolution}, {resolution})) squash (bilinear), ToTensor, "
            + ("CLIP mean/std normalisation" if normalize else "no normalisation"))


class SeededAugmentation(Dataset):
    """A dataset whose random transform draws from torch's RNG seeded by (seed, epoch, index).

    An item's augmentation then depends on nothing else: not on which DataLoader worker loads
    it, nor on what was loaded before. That is what lets a run stopped in the middle of an
    epoch resume exactly. Call `set_epoch` before iterating; workers copy the dataset when an
    epoch's iterator starts (so not with persistent_workers). The caller's RNG state is left
    untouched (`torch.random.fork_rng`).
    """

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
