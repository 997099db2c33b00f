"""The training batches of a run: fixed-size, drawn from (seed, epoch), and able to skip the
batches an interrupted run did, so a resumed run repeats an uninterrupted one exactly. Workers
are not persistent, which would carry a stale epoch."""
import random
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from ..data.sampler import ClassBalancedSampler, ResumableSampler
from ..data.transforms import SeededAugmentation
from .faults import ignore_interrupts


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TrainLoader:
    """Batches of one shape (no partial one); call `start_epoch(epoch)` each epoch."""

    def __init__(self, dataset, batch_size: int, seed: int, workers: int = 0, rank: int = 0,
                 world: int = 1, balanced: bool = False, samples_per_epoch: int = 0,
                 pin_memory: bool = False, prefetch_factor: Optional[int] = None):
        if balanced:
            sampler = ClassBalancedSampler(dataset.targets, samples_per_epoch or None, seed, rank,
                                           world)
        elif world > 1:
            sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=seed,
                                         drop_last=True)
        else:
            sampler = RandomSampler(dataset, generator=torch.Generator())
        self.seed, self.batch_size, self.generator = seed, batch_size, torch.Generator()
        self.loader = DataLoader(SeededAugmentation(dataset, seed), batch_size=batch_size,
                                 sampler=ResumableSampler(sampler), num_workers=workers,
                                 pin_memory=pin_memory, drop_last=True, generator=self.generator,
                                 worker_init_fn=ignore_interrupts,
                                 prefetch_factor=prefetch_factor if workers else None)

    def __len__(self) -> int:
        return len(self.loader.sampler.sampler) // self.batch_size

    def start_epoch(self, epoch: int, skip_batches: int = 0) -> DataLoader:
        """The epoch's loader, seeded from (seed, epoch), less its first `skip_batches`."""
        seed = self.seed * 1000 + epoch
        seed_everything(seed)
        self.generator.manual_seed(seed)
        self.loader.dataset.set_epoch(epoch)
        sampler = self.loader.sampler  # a ResumableSampler around the epoch's sampler
        sampler.skip = skip_batches * self.batch_size
        sampler.set_epoch(epoch)
        if isinstance(sampler.sampler, RandomSampler):
            sampler.sampler.generator.manual_seed(seed)
        return self.loader
