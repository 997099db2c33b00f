"""Timing and memory, fair on a shared machine: the sides of a comparison take turns, in
alternating order, so a burst of load hits both; CUDA is synchronised around every timed call."""
import ctypes
import platform
import resource
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List

import torch


def keep_freed_memory() -> bool:
    """CPU, glibc: keep freed memory in the process, as CUDA's caching allocator does, so a step
    does not page-fault its activations back in (timings measure compute, not allocation); as
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge>. Returns whether it took effect."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl, Windows)
        return False
    # M_MMAP_MAX (-4) = 0: no mmap; M_TRIM_THRESHOLD (-1) = -1, i.e. SIZE_MAX: never trim.
    return bool(libc.mallopt(-4, 0)) and bool(libc.mallopt(-1, -1))


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of fn(), CUDA synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def take_turns(fns: Dict[str, Callable[[], object]], rounds: int) -> Dict[str, list]:
    """What each fn() returns in each round, every fn once a round, in alternating order."""
    out = {name: [] for name in fns}
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            out[name].append(fns[name]())
    return out


def compare(fns: Dict[str, Callable[[], object]], device: torch.device, repeats: int,
            warmup: int = 2) -> Dict[str, List[float]]:
    """Wall seconds of each fn() over `repeats` rounds, after `warmup` calls of each."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    return take_turns({name: lambda fn=fn: timed(fn, device) for name, fn in fns.items()},
                      repeats)


def paired_ratio(ours: List[float], baseline: List[float]) -> float:
    """Median over rounds of ours / baseline, each pair measured back to back."""
    return statistics.median(a / b for a, b in zip(ours, baseline))


def count_host_syncs(fn: Callable[[], object], device: torch.device) -> int:
    """CUDA only: how many host-device synchronisations fn() makes (CUDA sync debug mode)."""
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (it never goes down)."""
    kib = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # Linux names the CPU model, platform often only its architecture
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
