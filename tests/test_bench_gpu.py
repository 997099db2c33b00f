"""`python -m mpafer.bench gpu` on a machine without CUDA: one line and out; and its dry run,
which runs the command's own machinery (parts, budgets, the tests' subprocess, the JSON) in
seconds."""
import json
import signal
import time

import pytest
import torch

from mpafer.app.bench import gpu
from tests.helpers import run


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_it_exits_at_once_with_one_line():
    start = time.perf_counter()
    result = run("-m", "mpafer.bench", "gpu", "--json", "never-written.json", check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("mpafer.bench gpu needs CUDA: no CUDA device is visible")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert time.perf_counter() - start < 30  # the time to import torch, nothing more


def test_a_part_out_of_time_is_recorded_and_the_next_part_runs(tmp_path):
    path = tmp_path / "gpu.json"
    handler = signal.getsignal(signal.SIGALRM)
    gpu.main(["--dry-run", "speed", "mfu", "--budget", "speed=0.01", "--json", str(path)])
    report = json.loads(path.read_text())
    assert report["parts"]["speed"]["status"] == "timeout"
    assert report["parts"]["mfu"]["status"] == "done" and report["matmul_bf16_flops_per_second"] > 0
    assert "step_mfu" not in report  # no training step was timed
    assert report["budgets"] == {"speed": 0.01, "mfu": gpu.BUDGETS["mfu"]} and report["total_seconds"] > 0
    assert signal.getsignal(signal.SIGALRM) == handler  # the alarm is gone with its part


def test_the_tests_part_records_each_outcome_and_the_figures(tmp_path):
    path = tmp_path / "gpu.json"
    gpu.main(["--dry-run", "tests", "--tests-k", "clip_load_onto", "--json", str(path)])
    report = json.loads(path.read_text())
    tests = report["tests"]
    assert report["parts"]["tests"]["status"] == "done" and tests["exit_status"] == 0
    assert tests["outcomes"] == {"tests/test_cuda.py::test_clip_load_onto_the_device": "passed"}
    assert (tests["passed"], tests["failed"], tests["error"], tests["failures"]) == (1, 0, 0, [])
    assert tests["figures"] == {} and "-m cuda" in tests["command"]


def test_budgets_are_checked():
    with pytest.raises(SystemExit):
        gpu.parse_args(["--budget", "speed=soon"])
    with pytest.raises(SystemExit):
        gpu.parse_args(["warp"])
    assert gpu.parse_args(["--budget", "epoch=30"]).budgets == {**gpu.BUDGETS, "epoch": 30.0}
    assert sum(gpu.BUDGETS.values()) <= 450  # 7.5 minutes, leaving start-up inside 8
