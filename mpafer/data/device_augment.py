"""The per-batch half of the training augmentation, run on the device: DataLoader workers hand
over uint8 pixels `[B, 3, R, R]`; the normalisation (the float32 operations of ToTensor +
Normalize) and random erasing (torchvision's RandomErasing, one draw per image) run here."""
import math
from functools import lru_cache

import numpy as np
import torch

from ..clip.transform import CLIP_MEAN, CLIP_STD

RANDOM_ERASING_P = 0.25  # the training recipe's erasing probability
ERASE_SCALE = (0.02, 0.33)  # torchvision's RandomErasing defaults
ERASE_RATIO = (0.3, 3.3)
ERASE_ATTEMPTS = 10  # torchvision tries this many boxes before giving up on an image


@lru_cache(maxsize=None)
def _clip_stats(device: torch.device):
    """CLIP's mean and std `[1, 3, 1, 1]` on `device`, made once, not copied every step."""
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1).to(device)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1).to(device)
    return mean, std


def normalize_on_device(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [B, 3, H, W] -> float32 CLIP-normalised [B, 3, H, W], on their device."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"normalize_on_device expects uint8 images [B, 3, H, W], got "
                         f"{images.dtype} {list(images.shape)}")
    mean, std = _clip_stats(images.device)
    # ToTensor: float32 / 255; Normalize: (x - mean) / std. The same ops, so the same bits.
    return images.float().div_(255).sub_(mean).div_(std)


def as_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 batches get CLIP-normalised on their device; float batches pass unchanged."""
    return normalize_on_device(images) if images.dtype == torch.uint8 else images


def random_erasing_on_device(images: torch.Tensor, p: float = RANDOM_ERASING_P,
                             generator: torch.Generator = None, value: float = 0.0) -> torch.Tensor:
    """torchvision's RandomErasing(p, scale=(0.02, 0.33), ratio=(0.3, 3.3), value) on each image
    of `[B, C, H, W]` independently, batched (no host sync); returns a new tensor."""
    batch, _, height, width = images.shape
    device, attempts = images.device, ERASE_ATTEMPTS
    u = torch.rand(batch, 3 + 2 * attempts, generator=generator, device=device)  # [B, 3 + 2A]
    erase = u[:, 0] < p  # [B]
    area = height * width * (ERASE_SCALE[0] + (ERASE_SCALE[1] - ERASE_SCALE[0])
                             * u[:, 3:3 + attempts])  # [B, A]
    low, high = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    aspect = torch.exp(low + (high - low) * u[:, 3 + attempts:])  # [B, A]
    h = torch.round(torch.sqrt(area * aspect))  # [B, A], half to even like Python's round()
    w = torch.round(torch.sqrt(area / aspect))
    fits = (h < height) & (w < width)  # [B, A]
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # [B, 1] first box that fits
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)  # [B]
    erase &= fits.any(dim=1)
    top = torch.floor(u[:, 1] * (height - h + 1))  # [B] uniform in 0 .. height - h
    left = torch.floor(u[:, 2] * (width - w + 1))
    rows = torch.arange(height, device=device, dtype=h.dtype)  # [H]
    cols = torch.arange(width, device=device, dtype=w.dtype)  # [W]
    in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])  # [B, H]
    in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])  # [B, W]
    box = erase[:, None, None] & in_rows[:, :, None] & in_cols[:, None, :]  # [B, H, W]
    return images.masked_fill(box[:, None], value)  # [B, C, H, W]


class TrainBatchAugment:
    """`augment(images, epoch, step)`: uint8 -> normalised, erased (same for same arguments)."""

    def __init__(self, device: torch.device, seed: int, rank: int = 0,
                 erase_p: float = RANDOM_ERASING_P):
        self.generator = torch.Generator(device=device)
        self.seed, self.rank, self.erase_p = seed, rank, erase_p

    def __call__(self, images: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        words = [self.seed % 2 ** 63, epoch, step, self.rank]  # -> a 63-bit seed for this batch
        seed = np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1
        self.generator.manual_seed(int(seed))
        return random_erasing_on_device(normalize_on_device(images), self.erase_p, self.generator)
