"""A class-balanced sampler for imbalanced training sets (AffectNet), DDP-aware."""
import itertools
import math

import torch
from torch.utils.data import Sampler


class ClassBalancedSampler(Sampler):
    """Indices drawn with replacement, with probability 1 / count of their class, from (seed,
    epoch); under DDP rank r takes draw[r::world_size]. num_samples counts all ranks."""

    def __init__(self, targets, num_samples=None, seed=0, rank=0, world_size=1):
        targets = torch.as_tensor(list(targets), dtype=torch.long)
        if targets.numel() == 0:
            raise ValueError("ClassBalancedSampler needs at least one target")
        if targets.min() < 0:
            raise ValueError("targets must be non-negative class indices")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        counts = torch.bincount(targets).double()
        self.weights = 1.0 / counts[targets]
        total = len(targets) if num_samples is None else int(num_samples)
        if total < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples = math.ceil(total / world_size)  # per rank
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draw = torch.multinomial(self.weights, self.num_samples * self.world_size,
                                 replacement=True, generator=generator)
        return iter(draw[self.rank::self.world_size].tolist())

    def __len__(self):
        return self.num_samples


class ResumableSampler(Sampler):
    """Another sampler's order without its first `skip` indices (a resumed epoch goes on)."""

    def __init__(self, sampler):
        self.sampler, self.skip = sampler, 0

    def set_epoch(self, epoch):
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self):
        return max(0, len(self.sampler) - self.skip)
