"""`python -m mpafer.bench gpu [PART ...]`: every GPU check of the project in one command.

Parts, in order, each within its time budget (--budget PART=SECONDS):
  tests  the CUDA test tier (`python -m pytest -m cuda`): outcomes, failures and the figures the
         tests record (peak memory of a training step)
  speed  `python -m mpafer.bench` clip, train, eval, memory for ViT-B/16 and ViT-L/14 in bf16
  mfu    the FLOP/s of a large bf16 matmul measured here (the reachable peak, no vendor table);
         per shape step_mfu = step FLOPs per image (`flops`) x the step's images/s / that peak
  epoch  `python -m mpafer.bench epoch` (ViT-B/16, synthetic RAF-DB-like JPEGs, a DataLoader
         worker per core): epoch_ratio and the modelled 120-epoch RAF-DB recipe
Each figure is printed as measured and the JSON rewritten (atomically) after it, so a part out
of time (stopped by SIGALRM, the tests' process group killed, recorded as "timeout") or a killed
command leaves what was measured. --dry-run checks the command itself on the tiny shape with the
smallest sizes and a few tests, on the CPU without CUDA; otherwise no CUDA is one line and out.
"""
import argparse
import contextlib
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import warnings

import torch

from ...clip.model import SHAPES
from ...files import atomic_write_json
from ...prompts import load_descriptions
from ..cli import ArgumentParser
from . import main as bench_main
from . import measure
from .flops import mpafer_step_flops
from .speed import CLASSES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))  # the clone this package runs from, whose tests/ the tests part runs
BUDGETS = {"tests": 220.0, "speed": 100.0, "mfu": 20.0, "epoch": 90.0}  # seconds, in run order
TARGETS = {"step_mfu": 0.35, "epoch_ratio": 0.9, "rafdb_120_epochs_modelled_seconds": 600.0}
DRY_TESTS = "clip_load or injected_overflow or no_host_device_sync or no_sync_per_batch"
SPEED_FIGURES = ("clip_", "train_", "eval_", "peak_memory_bytes", "trainable_params", "amp_dtype")
EPOCH_FIGURES = ("epoch_ratio", "epoch_images_per_second", "step_images_per_second",
                 "loader_images_per_second", "eval_images_per_second", "outside_step_share",
                 "full_run_model", "epoch_settings")
OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
SUMMARY = re.compile(r"^(FAILED|ERROR) \S+")
OUTCOMES = ("passed", "failed", "error", "skipped")


class OutOfTime(BaseException):
    """A part's budget ran out (a BaseException: no `except Exception` in a part swallows it)."""


class Report:
    """The command's figures; every update rewrites --json (atomically)."""

    def __init__(self, path, **header):
        self.path, self.data = path, {}
        self.update(**header)

    def update(self, section=None, **figures):
        (self.data.setdefault(section, {}) if section else self.data).update(figures)
        if self.path:
            atomic_write_json(self.data, self.path)


def run_tests(args, report: Report) -> str:
    """pytest on the `cuda` marker, in a process group of its own (killed if the part runs out
    of time); its output passes through, and each outcome goes to the report."""
    if not os.path.isdir(os.path.join(REPO, "tests")):
        return f"skipped: no tests folder in {REPO} (run from a clone of the repository)"
    # -vv: a line per test as it ends, and the failures' summary lines in full.
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-vv", "-rfE", "--color=no",
               "-p", "no:cacheprovider"] + (["-k", args.tests_k] if args.tests_k else [])
    outcomes, failures = {}, []
    with tempfile.TemporaryDirectory(prefix="mpafer-tier-") as tmp:
        figures_file = os.path.join(tmp, "figures.jsonl")  # tests/cuda_checks.py appends to it
        env = {**os.environ, "MPAFER_TEST_FIGURES": figures_file, "PYTHONUNBUFFERED": "1"}
        if args.device.type != "cuda":
            env["MPAFER_CUDA_TESTS_DEVICE"] = str(args.device)

        def record(**more):
            figures = {}
            if os.path.isfile(figures_file):
                with open(figures_file, encoding="utf-8") as f:
                    figures = {r["name"]: r["value"] for r in map(json.loads, filter(str.strip, f))}
            for name in sorted(figures.keys() - report.data.get("tests", {}).get("figures", {})):
                print(f"    figure {name}: {figures[name]}", flush=True)  # pytest holds prints
            counts = {k: sum(v == k for v in outcomes.values()) for k in OUTCOMES}
            report.update("tests", **counts, outcomes=dict(outcomes), failures=list(failures),
                          figures=figures, **more)

        process = subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            for line in process.stdout:
                print(line, end="", flush=True)
                found, summary = OUTCOME.match(line), SUMMARY.match(line)
                if found:
                    outcomes[found.group(1)] = found.group(2).lower()
                elif summary:
                    failures.append(line.strip())
                if found or summary:
                    record()
            code = process.wait()
        finally:  # out of time: SIGTERM first, which torchrun passes on to its workers
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, sig)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(timeout=5)
            record(exit_status=process.returncode, command=shlex.join(["python", *command[1:]]))
    return "done" if code == 0 else f"done, pytest exit status {code}"


def bench(args, which: str, shape: str, *flags: str) -> dict:
    """`python -m mpafer.bench WHICH --shape SHAPE FLAGS` here (--dry-run: the smallest sizes)."""
    small = ["--batch", "2", "--train-batch", "4", "--eval-batch", "4", "--repeats", "2",
             "--warmup", "1"]
    return bench_main([which, "--shape", shape, "--device", str(args.device),
                       *(small if args.dry_run else []), *flags])


def run_speed(args, report: Report) -> str:
    """Per shape, one sub-benchmark at a time, so each lands in the report as soon as it ends."""
    for shape in args.shapes:
        for which in ("clip", "train", "eval", "memory"):
            results = bench(args, which, shape)
            figures = {k: v for k, v in results.items() if k.startswith(SPEED_FIGURES)}
            report.update("shapes", **{shape: {**report.data.get("shapes", {}).get(shape, {}),
                                               **figures, "train_batch":
                                               results["settings"]["train_batch"]}})
    return "done"


def run_mfu(args, report: Report) -> str:
    """The best bf16 FLOP/s (2 n^3 a product) over 5 runs of about 0.1 s of n x n products, then
    step_mfu for every shape whose training step `speed` timed."""
    size = 256 if args.dry_run else 8192
    a, b = (torch.randn(size, size, device=args.device, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty_like(a)
    torch.matmul(a, b, out=out)  # warm-up: cuBLAS picks its kernel
    calls = max(1, int(0.1 / measure.timed(lambda: torch.matmul(a, b, out=out), args.device)))
    peak = max(2 * size ** 3 * calls / measure.timed(
        lambda: [torch.matmul(a, b, out=out) for _ in range(calls)], args.device)
        for _ in range(5))
    report.update(matmul_bf16_flops_per_second=peak, matmul_size=size)
    print(f"mfu: bf16 matmul {size}^3: {peak / 1e12:.1f} TFLOP/s")
    for shape, figures in list(report.data.get("shapes", {}).items()):
        if "train_step_seconds" not in figures:
            continue
        batch = figures["train_batch"]
        flops = mpafer_step_flops(SHAPES[shape], batch, CLASSES, load_descriptions(CLASSES))
        images_per_second = batch / figures["train_step_seconds"]
        achieved = flops["step_per_image"] * images_per_second
        report.update("shapes", **{shape: {
            **figures, "step_flops": flops["step"], "step_flops_per_image": flops["step_per_image"],
            "step_images_per_second": images_per_second, "step_flops_per_second": achieved,
            "step_mfu": achieved / peak}})
        if shape == args.shapes[0]:  # the headline figure: ViT-B/16
            report.update(step_mfu=achieved / peak, step_mfu_shape=shape, step_mfu_batch=batch)
        print(f"  {shape}: {flops['step_per_image'] / 1e9:.1f} GFLOP a training image x "
              f"{images_per_second:.0f} img/s = {achieved / 1e12:.1f} TFLOP/s, step_mfu "
              f"{achieved / peak:.3f}   (target >= {TARGETS['step_mfu']} for ViT-B/16)",
              flush=True)
    return "done"


def run_epoch(args, report: Report) -> str:
    shape = "tiny" if args.dry_run else "ViT-B/16"  # the paper's RAF-DB recipe is ViT-B/16
    results = bench(args, "epoch", shape, "--workers", str(args.workers), *(
        ["--epoch-steps", "2", "--loader-batches", "4", "--eval-images", "8"] if args.dry_run
        else ["--repeats", "3", "--warmup", "1"]))
    report.update("epoch", shape=shape, **{k: results[k] for k in EPOCH_FIGURES})
    report.update(epoch_ratio=results["epoch_ratio"],
                  epoch_images_per_second=results["epoch_images_per_second"],
                  rafdb_120_epochs_modelled_seconds=results["full_run_model"]["total"])
    return "done"


def parse_args(argv):
    parser = ArgumentParser(prog="python -m mpafer.bench gpu", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", metavar="PART", help=" ".join(BUDGETS))
    parser.add_argument("--json", help="write the figures to this file (after every figure)")
    parser.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS",
                        help=f"a part's time budget (default {BUDGETS})")
    parser.add_argument("--tests-k", metavar="EXPR", help="pytest -k: some of the tests only")
    parser.add_argument("--dry-run", action="store_true", help="check the command itself")
    args = parser.parse_args(argv)
    args.parts = args.parts or list(BUDGETS)
    unknown = [p for p in args.parts if p not in BUDGETS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(BUDGETS)}")
    args.budgets = dict(BUDGETS)
    for item in args.budget:
        part, _, seconds = item.partition("=")
        if part not in BUDGETS or not re.fullmatch(r"\d+(\.\d*)?", seconds) or float(seconds) <= 0:
            parser.error(f"--budget {item}: expected PART=SECONDS, PART one of "
                         f"{', '.join(BUDGETS)}")
        args.budgets[part] = float(seconds)
    with warnings.catch_warnings():  # a CUDA build without a driver warns: the exit line says it
        warnings.simplefilter("ignore")
        cuda = torch.cuda.is_available()
    # No device: no CUDA and no --dry-run (main says so and exits).
    args.device = torch.device("cuda") if cuda else torch.device("cpu") if args.dry_run else None
    args.shapes = ["tiny"] if args.dry_run else ["ViT-B/16", "ViT-L/14"]
    cores = os.cpu_count() or 1
    args.workers = min(cores, 2) if args.dry_run else cores  # one DataLoader worker per core
    args.tests_k = args.tests_k or (DRY_TESTS if args.dry_run else None)
    return args


def run_part(name: str, args, report: Report):
    """One part within its budget (SIGALRM); a failure is recorded and the next part runs."""
    budget, start = args.budgets[name], time.perf_counter()
    print(f"\n=== {name} (budget {budget:.0f}s)", flush=True)

    def expire(signum, frame):
        raise OutOfTime()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        runner = {"tests": run_tests, "speed": run_speed, "mfu": run_mfu, "epoch": run_epoch}
        status = runner[name](args, report)
    except OutOfTime:
        status = "timeout"
    except Exception as e:  # noqa: BLE001 - one part's failure must not cost the others
        status = f"failed: {type(e).__name__}: {e}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    seconds = time.perf_counter() - start
    report.update("parts", **{name: {"status": status, "seconds": round(seconds, 1),
                                     "budget": budget}})
    print(f"\n=== {name}: {status} after {seconds:.0f}s", flush=True)


def print_summary(d: dict, path):
    print("\nmpafer.bench gpu: " + ", ".join(f"{k} {v['status']} ({v['seconds']:.0f}s)"
                                             for k, v in d.get("parts", {}).items()))
    tests = d.get("tests", {})
    if "passed" in tests:  # and the failures' lines, in pytest's summary above
        print(f"  CUDA tests: {', '.join(f'{tests[k]} {k}' for k in OUTCOMES)}")
    for key, target in TARGETS.items():
        if key in d:
            at_most = key.endswith("seconds")
            ok = d[key] <= target if at_most else d[key] >= target
            print(f"  {key:<36}{d[key]:>12.3f}   target {'<=' if at_most else '>='} {target}  "
                  f"{'ok' if ok else 'MISSED'}")
    print(f"  total {d['total_seconds']:.0f}s" + (f"; figures in {path}" if path else ""))


def main(argv):
    """`python -m mpafer.bench gpu ARGS` is main(ARGS) -> the report's figures."""
    args = parse_args(argv)
    if args.device is None:
        build = ("a CPU-only build" if torch.version.cuda is None
                 else f"built for CUDA {torch.version.cuda}")
        sys.exit(f"mpafer.bench gpu needs CUDA: no CUDA device is visible (torch "
                 f"{torch.__version__}, {build}); --dry-run checks the command on this machine")
    start = time.perf_counter()
    report = Report(args.json, command=shlex.join(["python", "-m", "mpafer.bench", "gpu", *argv]),
                    device=measure.device_name(args.device), device_type=args.device.type,
                    torch=torch.__version__, cuda=torch.version.cuda, cpu_count=os.cpu_count(),
                    dry_run=args.dry_run, budgets={p: args.budgets[p] for p in args.parts},
                    targets=TARGETS,
                    date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    print(f"mpafer.bench gpu on {report.data['device']}: parts {', '.join(args.parts)}, at most "
          f"{sum(args.budgets[p] for p in args.parts):.0f}s", flush=True)
    for name in BUDGETS:
        if name in args.parts:
            run_part(name, args, report)
    report.update(total_seconds=round(time.perf_counter() - start, 1))
    print_summary(report.data, report.path)
    return report.data
