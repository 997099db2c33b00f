"""Progress: a tqdm bar on a terminal, a plain line now and then in logs (no carriage returns)."""
import sys
import time
from typing import Optional

from tqdm import tqdm


class PlainProgress:
    """A plain line every `every` seconds; takes the tqdm calls the package uses."""

    def __init__(self, iterable=None, desc: str = "", total=None, initial: int = 0,
                 every: float = 30.0, **_):
        self.iterable, self.desc, self.n, self.every = iterable, desc, initial, every
        self.total = total if total is not None else (
            len(iterable) if hasattr(iterable, "__len__") else None)
        self.postfix, self.start = "", time.monotonic()
        self.last = self.start

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: int = 1):
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            of = f"/{self.total}" if self.total else ""
            print(f"  {self.desc}: {self.n}{of} ({now - self.start:.0f}s){self.postfix}",
                  flush=True)

    def set_postfix(self, **values):
        self.postfix = "  " + " ".join(f"{k}={v}" for k, v in values.items())


def progress_bar(iterable=None, desc: str = "", disable: bool = False, **options):
    """tqdm on a terminal, else a `PlainProgress`; nothing when `disable`."""
    if disable:
        return PlainProgress(iterable, desc, every=float("inf"), **options)
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, **options)
    return PlainProgress(iterable, desc, **options)


def counted(n: int, noun: str, plural: Optional[str] = None) -> str:
    """`n` and the noun in the number it takes, for what a run prints: "1 image", "2 images",
    "3 classes" (`plural` where adding -s or -es does not make it)."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {plural or noun + ('es' if noun.endswith(('s', 'x', 'sh')) else 's')}"
