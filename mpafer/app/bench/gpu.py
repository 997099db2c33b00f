"""`python -m mpafer.bench gpu`: every GPU check of the project in one command, in one process
(the tests in a pytest subprocess), each part within its own time budget.

    python -m mpafer.bench gpu --json gpu.json     # a CUDA machine: about 5 min, at most 7.4
    python -m mpafer.bench gpu speed mfu           # some parts only
    python -m mpafer.bench gpu --dry-run --json dry.json   # the command itself, in about a
                                                   # minute, on a CPU too; its figures mean nothing

Parts, in this order (default budgets in seconds; --budget PART=SECONDS changes one):
  tests  (220)  the CUDA test tier, `python -m pytest -m cuda` in a subprocess: passed, failed,
                skipped, the failures' summary lines, and the figures the tests measure (peak
                memory of a training step, ViT-B/16 and ViT-L/14)
  speed  (100)  `python -m mpafer.bench` clip, train, eval and memory for each shape (ViT-B/16,
                ViT-L/14), in bf16 autocast (fp16 on a GPU without bf16)
  mfu     (20)  the distance to the hardware limit: the FLOP/s of a large bf16 matmul on this
                GPU, measured here (the reachable peak, no vendor tables), and per shape
                step_mfu = step FLOPs per image (`mpafer.bench.flops`, analytic) x images/s of
                the training step (from `speed`) / that peak
  epoch   (90)  `python -m mpafer.bench epoch` on synthetic RAF-DB-like JPEGs with one
                DataLoader worker per core: epoch_ratio, images/s, and the modelled time of the
                paper's 120-epoch RAF-DB recipe (ViT-B/16)

Each figure is printed as soon as it is measured, and the JSON rewritten (atomically) after
each, so a part that runs out of time, or a command that is killed, leaves what was measured.
A part out of time is stopped (the tests' subprocess is killed; the in-process parts get a
SIGALRM), recorded as "timeout", and the next part starts: the whole command takes at most the
sum of the budgets plus start-up. Without CUDA (and without --dry-run) it exits at once with one
line saying so.
"""
import argparse
import contextlib
import datetime
import os
import re
import shlex
import signal
import sys
import threading
import time
import warnings
from typing import List, Optional

import torch

from ...clip.model import SHAPES
from ...files import atomic_write_json
from ...labels import BASIC_CLASSES
from ...prompts import load_descriptions
from ..cli import ArgumentParser
from . import main as bench_main
from . import measure
from .flops import mpafer_step_flops
from .tier import run_tier

PARTS = ("tests", "speed", "mfu", "epoch")
BUDGETS = {"tests": 220.0, "speed": 100.0, "mfu": 20.0, "epoch": 90.0}
TARGETS = {"step_mfu": 0.35, "epoch_ratio": 0.9, "rafdb_120_epochs_seconds": 600.0}
# --dry-run: the smallest sizes, and the quickest in-process tests of the tier.
DRY_TESTS = ("clip_load or injected_overflow or no_host_device_sync or no_sync_per_batch")
SPEED_FIGURES = ("clip_ratio", "clip_image_ratio", "clip_text_ratio", "train_step_ratio",
                 "train_step_seconds", "train_unavoidable_seconds", "train_step_host_syncs",
                 "eval_ratio", "eval_seconds_per_image", "peak_memory_bytes",
                 "trainable_params", "amp_dtype")
EPOCH_FIGURES = ("epoch_ratio", "epoch_images_per_second", "step_images_per_second",
                 "loader_images_per_second", "eval_images_per_second", "outside_step_share",
                 "epoch_step_host_syncs", "full_run_model", "epoch_settings")


class OutOfTime(BaseException):
    """A part's budget ran out (a BaseException: no `except Exception` in a part swallows it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise OutOfTime in this (main) thread once `seconds` have passed."""
    def expire(signum, frame):
        raise OutOfTime()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Report:
    """The command's figures; every update rewrites --json (atomically)."""

    def __init__(self, path: Optional[str], **header):
        self.path, self.data, self.lock = path, dict(header), threading.Lock()
        self.write()

    def update(self, section: Optional[str] = None, **figures):
        with self.lock:
            target = self.data.setdefault(section, {}) if section else self.data
            target.update(figures)
            self.write()

    def write(self):
        if self.path:
            atomic_write_json(self.data, self.path)


# -- parts 2 and 3: speed ratios and the distance to the hardware limit ------------------------

def bench_flags(args) -> List[str]:
    """What every `python -m mpafer.bench` call of this command shares."""
    flags = ["--device", str(args.device)]
    if args.dry_run:
        flags += ["--batch", "2", "--train-batch", "4", "--eval-batch", "4", "--repeats", "2",
                  "--warmup", "1"]
    return flags


def run_speed(args, report: Report) -> str:
    """clip, train, eval, memory per shape, one sub-benchmark at a time (each figure in the
    report as soon as its sub-benchmark ends)."""
    for shape in args.shapes:
        for which in ("clip", "train", "eval", "memory"):
            results = bench_main([which, "--shape", shape, *bench_flags(args)])
            figures = {k: results[k] for k in SPEED_FIGURES if k in results}
            figures["train_batch"] = results["settings"]["train_batch"]
            report.update("shapes", **{shape: {**report.data.get("shapes", {}).get(shape, {}),
                                               **figures}})
            print(flush=True)
    return "done"


def matmul_flops_per_second(device: torch.device, size: int, seconds: float = 0.5) -> float:
    """The best bf16 FLOP/s (2 n^3 per product) over a few timed runs of n x n products."""
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty_like(a)
    torch.matmul(a, b, out=out)  # warm-up: cuBLAS picks its kernel
    measure.synchronize(device)
    start = time.perf_counter()
    torch.matmul(a, b, out=out)
    measure.synchronize(device)
    calls = max(1, int(seconds / 5 / (time.perf_counter() - start)))  # about seconds / 5 a run
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            torch.matmul(a, b, out=out)
        measure.synchronize(device)
        best = max(best, 2 * size ** 3 * calls / (time.perf_counter() - start))
    return best


def run_mfu(args, report: Report) -> str:
    """The matmul peak, then step_mfu for every shape whose training step `speed` timed."""
    peak = matmul_flops_per_second(args.device, args.matmul_size)
    report.update(matmul_bf16_flops_per_second=peak, matmul_size=args.matmul_size)
    print(f"mfu: bf16 matmul {args.matmul_size}^3: {peak / 1e12:.1f} TFLOP/s")
    classes = list(BASIC_CLASSES)  # the benchmark's model: 7 classes, shipped descriptions
    for shape, figures in list(report.data.get("shapes", {}).items()):
        if "train_step_seconds" not in figures:
            continue
        batch = figures["train_batch"]
        flops = mpafer_step_flops(SHAPES[shape], batch, classes, load_descriptions(classes))
        images_per_second = batch / figures["train_step_seconds"]
        achieved = flops["step_per_image"] * images_per_second
        mfu = {"step_flops": flops["step"], "step_flops_per_image": flops["step_per_image"],
               "step_images_per_second": images_per_second,
               "step_flops_per_second": achieved, "step_mfu": achieved / peak}
        report.update("shapes", **{shape: {**figures, **mfu}})
        if shape == args.shapes[0]:  # the headline figure: ViT-B/16 unless --shapes says
            report.update(step_mfu=achieved / peak, step_mfu_shape=shape,
                          step_mfu_batch=batch)
        print(f"  {shape}: {flops['step_per_image'] / 1e9:.1f} GFLOP a training image x "
              f"{images_per_second:.0f} img/s = {achieved / 1e12:.1f} TFLOP/s, step_mfu "
              f"{achieved / peak:.3f}   (target >= {TARGETS['step_mfu']} for ViT-B/16)",
              flush=True)
    return "done"


# -- part 4: epochs from files -----------------------------------------------------------------

def run_epoch(args, report: Report) -> str:
    shape = "tiny" if args.dry_run else "ViT-B/16"  # the paper's RAF-DB recipe is ViT-B/16
    flags = ["--shape", shape, "--workers", str(args.workers), *bench_flags(args)]
    if args.dry_run:
        flags += ["--epoch-steps", "2", "--loader-batches", "4", "--eval-images", "8",
                  "--path-seconds", "0.05"]
    else:
        flags += ["--repeats", "3", "--warmup", "1", "--path-seconds", "0.5"]
    results = bench_main(["epoch", *flags])
    report.update("epoch", shape=shape, **{k: results[k] for k in EPOCH_FIGURES if k in results})
    report.update(epoch_ratio=results["epoch_ratio"],
                  epoch_images_per_second=results["epoch_images_per_second"],
                  rafdb_120_epochs_modelled_seconds=results["full_run_model"]["total"])
    return "done"


# -- the command -------------------------------------------------------------------------------

def needs_cuda_message(device: torch.device) -> Optional[str]:
    """Why this command cannot run on `device`, in one line, or None."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings():  # a CUDA build without a driver warns: the line says it all
        warnings.simplefilter("ignore")
        available = torch.cuda.is_available()
    if not available:
        build = ("a CPU-only build" if torch.version.cuda is None
                 else f"built for CUDA {torch.version.cuda}")
        return (f"mpafer.bench gpu needs CUDA: no CUDA device is visible (torch "
                f"{torch.__version__}, {build}); --dry-run checks the command on this machine")
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"mpafer.bench gpu: {device} does not exist ({torch.cuda.device_count()} GPUs)"
    return None


def parse_args(argv):
    parser = ArgumentParser(prog="python -m mpafer.bench gpu", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", metavar="PART",
                        help=f"parts to run, of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--json", help="write the figures to this file (after every figure)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", nargs="+", default=["ViT-B/16", "ViT-L/14"],
                        choices=list(SHAPES), help="shapes of the speed part")
    parser.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS",
                        help=f"a part's time budget (default {BUDGETS})")
    parser.add_argument("--tests-k", metavar="EXPR", help="pytest -k: some of the tests only")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="DataLoader workers of the epoch part (default: one per core)")
    parser.add_argument("--matmul-size", type=int, default=None,
                        help="n of the n x n bf16 matmul (default 8192; 256 with --dry-run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the command itself: the tiny shape, the smallest sizes, a "
                             "few tests, on the CPU when there is no CUDA")
    args = parser.parse_args(argv)
    args.parts = args.parts or list(PARTS)
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    args.budgets = dict(BUDGETS)
    for item in args.budget:
        part, _, seconds = item.partition("=")
        if part not in PARTS or not re.fullmatch(r"\d+(\.\d*)?", seconds) or float(seconds) <= 0:
            parser.error(f"--budget {item}: expected PART=SECONDS with PART one of {PARTS}")
        args.budgets[part] = float(seconds)
    if args.dry_run:
        if args.device == "cuda" and not torch.cuda.is_available():
            args.device = "cpu"
        args.shapes = ["tiny"]
        args.tests_k = args.tests_k or DRY_TESTS
        args.workers = min(args.workers, 2)
    args.device = torch.device(args.device)
    args.matmul_size = args.matmul_size or (256 if args.dry_run else 8192)
    return args


RUNNERS = {"speed": run_speed, "mfu": run_mfu, "epoch": run_epoch}


def run_part(name: str, args, report: Report):
    """One part within its budget; a failure is recorded and the next part still runs."""
    budget, start = args.budgets[name], time.perf_counter()
    print(f"\n=== {name} (budget {budget:.0f}s)", flush=True)
    try:
        if name == "tests":  # a subprocess, stopped by its own timeout
            status = run_tier(args.device, args.tests_k, budget,
                              lambda **figures: report.update("tests", **figures))
        else:
            with time_limit(budget):
                status = RUNNERS[name](args, report)
    except OutOfTime:
        status = "timeout"
    except Exception as e:  # noqa: BLE001 - one part's failure must not cost the others
        status = f"failed: {type(e).__name__}: {e}"
    seconds = time.perf_counter() - start
    report.update("parts", **{name: {"status": status, "seconds": round(seconds, 1),
                                     "budget": budget}})
    print(f"\n=== {name}: {status} after {seconds:.0f}s", flush=True)


def print_summary(report: Report):
    d = report.data
    print("\nmpafer.bench gpu: " + ", ".join(f"{k} {v['status']} ({v['seconds']:.0f}s)"
                                             for k, v in d.get("parts", {}).items()))
    tests = d.get("tests", {})
    if "passed" in tests:
        print(f"  CUDA tests: {tests['passed']} passed, {tests['failed']} failed, "
              f"{tests['error']} errors, {tests['skipped']} skipped")
        for line in tests["failures"]:
            print(f"    {line}")
    rows = [("step_mfu", ">=", f"step_mfu ({d.get('step_mfu_shape')}, batch "
                               f"{d.get('step_mfu_batch')})"),
            ("epoch_ratio", ">=", f"epoch_ratio ({d.get('epoch', {}).get('shape')})"),
            ("rafdb_120_epochs_modelled_seconds", "<=", "120-epoch RAF-DB recipe, modelled (s)")]
    for key, sense, label in rows:
        if key in d:
            target = TARGETS[key.replace("_modelled", "")]
            ok = d[key] >= target if sense == ">=" else d[key] <= target
            print(f"  {label:<44}{d[key]:>9.3f}   target {sense} {target}  "
                  f"{'ok' if ok else 'MISSED'}")
    print(f"  total {d['total_seconds']:.0f}s" + (f"; figures in {report.path}" if report.path
                                                   else ""))


def main(argv: Optional[List[str]] = None):
    """`python -m mpafer.bench gpu ARGS` is main(ARGS) -> the report's figures."""
    argv = sys.argv[2:] if argv is None else list(argv)  # after `-m mpafer.bench gpu`
    args = parse_args(argv)
    message = needs_cuda_message(args.device)
    if message:
        sys.exit(message)  # one line on stderr, exit status 1
    start = time.perf_counter()
    report = Report(args.json, command=shlex.join(["python", "-m", "mpafer.bench", "gpu", *argv]),
                    device=measure.device_name(args.device), device_type=args.device.type,
                    torch=torch.__version__, cuda=torch.version.cuda, cpu_count=os.cpu_count(),
                    dry_run=args.dry_run, budgets={p: args.budgets[p] for p in args.parts},
                    targets=TARGETS,
                    date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    print(f"mpafer.bench gpu on {report.data['device']}: parts {', '.join(args.parts)}, at most "
          f"{sum(args.budgets[p] for p in args.parts):.0f}s", flush=True)
    for name in PARTS:
        if name in args.parts:
            run_part(name, args, report)
    report.update(total_seconds=round(time.perf_counter() - start, 1))
    print_summary(report)
    return report.data
