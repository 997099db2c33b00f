"""Iterating a DataLoader so that a failure can never hang the process: `batches(loader)` (a
context manager) and `each_batch(loader)` (a generator) shut the workers down however the
iteration ends (workers that ignore SIGTERM would otherwise keep multiprocessing's exit handler
waiting forever), and a worker's error becomes one line (`LoadError`)."""
from contextlib import contextmanager
from typing import Optional


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
