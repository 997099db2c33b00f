"""Measuring speed and memory fairly on a shared machine (used by `python -m mpafer.bench`).

Timings of two functions are taken interleaved, in alternating order, so a burst of load from
other jobs hits both sides of a round; ratios are medians of back-to-back pairs. CUDA is
synchronised around every timed call. Memory is the CUDA allocator's peak or the process's peak
resident set size.
"""
import ctypes
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List

import torch


def keep_freed_memory() -> bool:
    """CPU, glibc only: keep freed memory in the process instead of handing it back to the OS,
    as PyTorch's CUDA caching allocator does. By default glibc unmaps large freed blocks, so every
    training step page-faults its gigabytes of activations back in; on a 2-core CPU that was ~20%
    of a ViT-B/16 step and made the train ratio depend on allocation patterns, not on compute.
    Returns whether it took effect. (The same as MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=<huge>.)"""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    # mallopt takes an int; -1 becomes SIZE_MAX for the trim threshold: never trim the heap.
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(fns: Dict[str, Callable[[], object]], device: torch.device, repeats: int,
            warmup: int = 2) -> Dict[str, List[float]]:
    """Wall times in seconds of each `fn()` over `repeats` rounds, every function once a round.

    Interleaving (in alternating order) makes ratios fair on a shared machine: a burst of load
    hits both sides of a round. CUDA is synchronised before and after every call.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for r in range(repeats):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(ours: List[float], baseline: List[float]) -> float:
    """Median over rounds of ours / baseline, each pair measured back to back."""
    return statistics.median(a / b for a, b in zip(ours, baseline))


def count_host_syncs(fn: Callable[[], object], device: torch.device) -> int:
    """CUDA only: how many host-device synchronisations `fn()` makes (CUDA sync debug mode)."""
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux; else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss()


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (monotonic)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def mib(n: float) -> str:
    return f"{n / 2 ** 20:,.1f} MiB"
