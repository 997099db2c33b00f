"""The training batches of a run: fixed-size, reproducible per (seed, epoch), resumable in the
middle of an epoch.

Every image's augmentation draws from (seed, epoch, index) (`SeededAugmentation`), the order of
an epoch from (seed, epoch), and the sampler can skip the batches an interrupted run already
did, so a resumed run repeats an uninterrupted one exactly. Workers are not persistent: each
epoch starts them afresh from (seed, epoch); persistent workers would carry a stale epoch.

`batches(loader)` (a context manager) and `each_batch(loader)` (a generator) iterate any
DataLoader so that a failure can never hang the process: the workers (which ignore SIGTERM, see
`utils.ignore_interrupts`) are shut down however the iteration ends, and a worker's error
becomes one line (`LoadError`).
"""
from contextlib import contextmanager
from typing import Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from ..utils import ignore_interrupts, seed_everything
from .sampler import ClassBalancedSampler, ResumableSampler
from .transforms import SeededAugmentation


class TrainLoader:
    """Batches of `batch_size` (the last partial one dropped, so every step has one shape),
    class-balanced (`balanced`, with `samples_per_epoch`), distributed over `world` processes
    or plainly shuffled. Call `start_epoch(epoch)` before iterating an epoch."""

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
        """Steps in a full epoch."""
        return len(self.loader.sampler.sampler) // self.batch_size

    def start_epoch(self, epoch: int, skip_batches: int = 0) -> DataLoader:
        """Seed everything random in epoch `epoch` from (seed, epoch) and return its loader,
        without the first `skip_batches` batches (done before a resume)."""
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


class LoadError(RuntimeError):
    """A batch could not be loaded (an image that does not decode, a worker that failed): one
    line naming the file and the fix, the worker's traceback chained to it."""


@contextmanager
def batches(loader):
    """`with batches(loader) as items: for batch in items: ...`: iterate `loader`, and however
    the iteration ends (finished, left early, an error in a worker or in the loop's body), shut
    its workers down at once. Left to the garbage collector, a failed iterator lives on in the
    traceback, and at exit multiprocessing waits for workers that ignore the SIGTERM it sends:
    the process hangs. An error raised in a worker becomes a `LoadError` of one line."""
    iterator = iter(loader)
    try:
        yield iterator
    except Exception as error:
        message = _one_line(error)
        if message is None:
            raise
        raise LoadError(message) from error
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # (workers=0: no workers)
        if shutdown is not None:
            shutdown()


def each_batch(loader):
    """The batches of `loader`, through `batches`: for a loop whose body may leave it early
    (an error there, a return) the workers are shut down when the generator is closed."""
    with batches(loader) as items:
        yield from items


def _one_line(error) -> Optional[str]:
    """The message of an image that does not decode, or of a worker's error, in one line with
    what to do; None for other errors (bugs keep their traceback)."""
    first, _, traceback = str(error).partition("\n")
    from_worker = first.startswith("Caught ") and "DataLoader worker" in first
    message = str(error)
    if from_worker:  # "Caught OSError in DataLoader worker process 0.\nOriginal Traceback ..."
        lines = traceback.strip().splitlines()
        message = lines[-1].partition(": ")[2] or lines[-1] if lines else first  # -> its message
    if isinstance(error, OSError) and "cannot read image" in message:
        return (f"{message}; replace it, or leave unreadable images out with --skip-bad-images "
                "(skip_bad_images=True in Python)")
    if from_worker:
        return f"a data loading worker failed: {message} ({first.rstrip('.')})"
    return None
