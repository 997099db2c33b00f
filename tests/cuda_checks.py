"""What the CUDA test tier shares (tests/test_cuda.py, tests/test_cuda_scripts.py).

These tests are marked `cuda` and run with `python -m pytest -q -m cuda` (and as part 1 of
`python -m mpafer.bench gpu`). Without CUDA they are skipped at collection: nothing is built, so
a CPU run of the suite takes no longer for them.

Environment variables:
  MPAFER_CUDA_TESTS_DEVICE=cpu  run the same tests on the CPU, for checking these tests on a
      machine without CUDA. Only the calls that exist on CUDA alone are left out there: the
      synchronisation checks (`torch.cuda.set_sync_debug_mode`) run their code without the check,
      and the tests that measure CUDA memory skip. Any other device name works too ("cuda:1").
  MPAFER_TEST_FIGURES=FILE  tests append the figures they measure (peak memory) to FILE, one
      JSON object a line, as they measure them; `python -m mpafer.bench gpu` collects them.
"""
import contextlib
import json
import os
from typing import Optional

import pytest
import torch

from mpafer.app.bench import measure


def tests_device() -> Optional[torch.device]:
    """The device these tests run on: $MPAFER_CUDA_TESTS_DEVICE, else CUDA if there is one,
    else None (the tests skip)."""
    name = os.environ.get("MPAFER_CUDA_TESTS_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda") if torch.cuda.is_available() else None


DEVICE = tests_device()
ON_CUDA = DEVICE is not None and DEVICE.type == "cuda"
SKIP_REASON = ("needs CUDA (MPAFER_CUDA_TESTS_DEVICE=cpu runs these tests on the CPU to check "
               "them)")
# Every test of the tier: selected by -m cuda, skipped at collection without a device.
TIER = [pytest.mark.cuda, pytest.mark.skipif(DEVICE is None, reason=SKIP_REASON)]
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="measures CUDA itself")


def record_figure(name: str, value):
    """A measured figure: printed, and appended to $MPAFER_TEST_FIGURES if set (one JSON object
    a line, written at once so that a run stopped later still has it)."""
    print(f"{name}: {value}")
    path = os.environ.get("MPAFER_TEST_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"name": name, "value": value}) + "\n")


@contextlib.contextmanager
def no_host_syncs(device: torch.device):
    """On CUDA, any host-device synchronisation inside the block raises (sync debug mode
    "error"); elsewhere the block just runs."""
    if device.type != "cuda":
        yield
        return
    measure.synchronize(device)  # work queued before the block is not the block's
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def host_syncs(fn, device: torch.device) -> Optional[int]:
    """How many host-device synchronisations fn() makes on CUDA; elsewhere fn() runs and the
    count is None (there is nothing to count)."""
    if device.type != "cuda":
        fn()
        return None
    return measure.count_host_syncs(fn, device)


@contextlib.contextmanager
def exact_fp32():
    """fp32 matrix products in full fp32: TF32 off for cuBLAS and cuDNN (the convolution's
    default is TF32, about 1e-3 relative), restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected||, both on the CPU in fp32."""
    got, expected = got.detach().float().cpu(), expected.detach().float().cpu()
    return ((got - expected).norm() / expected.norm()).item()
