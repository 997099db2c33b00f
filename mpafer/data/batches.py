"""DataLoader iteration that never hangs the process; a worker's error becomes one line."""
from contextlib import contextmanager


class LoadError(RuntimeError):
    """A batch could not be loaded: one line naming the file and the fix."""


@contextmanager
def batches(loader):
    """`with batches(loader) as items: ...`: shut the workers down however the iteration ends.
    Left to the garbage collector, a failed iterator lives on in the traceback, and at exit
    multiprocessing waits for workers that ignore its SIGTERM: the process hangs."""
    iterator = iter(loader)
    try:
        yield iterator
    except Exception as error:
        # An image that does not decode, or a worker's error, in one line; bugs keep theirs.
        first, _, traceback = str(error).partition("\n")
        from_worker = first.startswith("Caught ") and "DataLoader worker" in first
        message = str(error)
        if from_worker:  # "Caught OSError in DataLoader worker process 0.\nOriginal Traceback"
            lines = traceback.strip().splitlines()
            message = lines[-1].partition(": ")[2] or lines[-1] if lines else first
        if isinstance(error, OSError) and "cannot read image" in message:
            raise LoadError(f"{message}; replace it, or leave unreadable images out with "
                            "--skip-bad-images (skip_bad_images=True in Python)") from error
        if from_worker:
            raise LoadError(f"a data loading worker failed: {message} "
                            f"({first.rstrip('.')})") from error
        raise
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # (workers=0: no workers)
        if shutdown is not None:
            shutdown()


def each_batch(loader):
    """The batches of `loader` through `batches`; workers shut down when the generator closes."""
    with batches(loader) as items:
        yield from items
