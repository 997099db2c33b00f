"""Part 1 of `python -m mpafer.bench gpu`: the CUDA test tier, `python -m pytest -m cuda`, in a
subprocess within a time budget. Its output passes through line by line; each test's outcome,
the failures' summary lines and the figures the tests record (tests/cuda_checks.py) go to a
callback as they come, so a run cut short still reports what it had."""
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Callable, Dict, List, Optional

import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
SUMMARY = re.compile(r"^(FAILED|ERROR) \S+")


def tier_command(keyword: Optional[str] = None) -> List[str]:
    """pytest on the `cuda` marker. -vv: a line per test as it ends, and the failures' summary
    lines in full (-v cuts them to the terminal's width)."""
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-vv", "-rfE", "--color=no",
               "-p", "no:cacheprovider"]
    return command + (["-k", keyword] if keyword else [])


def read_figures(path: str) -> Dict[str, object]:
    """The figures the tests appended to $MPAFER_TEST_FIGURES (one JSON object a line)."""
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return {r["name"]: r["value"] for r in map(json.loads, filter(str.strip, f))}


class TierLog:
    """What the lines of pytest's output say so far: outcomes by test, failure summaries."""

    def __init__(self):
        self.outcomes: Dict[str, str] = {}
        self.failures: List[str] = []

    def read(self, line: str) -> bool:
        """Take in one line -> whether it said anything new."""
        found, summary = OUTCOME.match(line), SUMMARY.match(line)
        if found:
            self.outcomes[found.group(1)] = found.group(2).lower()
        elif summary:
            self.failures.append(line.strip())
        return bool(found or summary)

    def figures(self) -> Dict[str, object]:
        counts = {k: sum(v == k for v in self.outcomes.values())
                  for k in ("passed", "failed", "error", "skipped")}
        return {**counts, "outcomes": dict(self.outcomes), "failures": list(self.failures)}


def run_tier(device: torch.device, keyword: Optional[str], budget: float,
             report: Callable[..., None]) -> str:
    """Run the tier on `device` (another device than CUDA: MPAFER_CUDA_TESTS_DEVICE) for at most
    `budget` seconds, calling report(**figures) at every outcome -> "done", "done, pytest exit
    status N" or "timeout"."""
    if not os.path.isdir(os.path.join(REPO, "tests")):
        report(error=f"no tests folder in {REPO} (run from a clone of the repository)")
        return "skipped"
    log, command = TierLog(), tier_command(keyword)
    with tempfile.TemporaryDirectory(prefix="mpafer-tier-") as tmp:
        figures = os.path.join(tmp, "figures.jsonl")
        env = {**os.environ, "MPAFER_TEST_FIGURES": figures, "PYTHONUNBUFFERED": "1"}
        if device.type != "cuda":
            env["MPAFER_CUDA_TESTS_DEVICE"] = str(device)

        shown = set()

        def take(line: str):
            print(line, end="", flush=True)
            if log.read(line):
                measured = read_figures(figures)
                for name in sorted(measured.keys() - shown):  # pytest holds the tests' prints
                    print(f"    figure {name}: {measured[name]}", flush=True)
                shown.update(measured)
                report(**log.figures(), figures=measured)

        process = subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        reader = threading.Thread(target=lambda: [take(line) for line in process.stdout])
        reader.start()
        try:
            code = process.wait(timeout=budget)
            status = "done" if code == 0 else f"done, pytest exit status {code}"
        except subprocess.TimeoutExpired:
            stop_group(process)
            status = "timeout"
        reader.join()
        report(**log.figures(), figures=read_figures(figures), exit_status=process.returncode,
               command=shlex.join(["python", *command[1:]]))
    return status


def stop_group(process: subprocess.Popen, grace: float = 5.0):
    """Stop pytest and the runs it started (its process group: it was started in a session of
    its own): SIGTERM first, which torchrun passes on to its workers (they run in sessions of
    their own), then SIGKILL if the group is not gone after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
