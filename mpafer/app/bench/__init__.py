"""Benchmarks of the speed targets, printing ratios measured side by side in one run.

    python -m mpafer.bench                      # all: clip, train, eval, memory (ViT-B/16)
    python -m mpafer.bench clip                 # vendored CLIP towers vs the reference
    python -m mpafer.bench train eval --repeats 3
    python -m mpafer.bench --shape tiny --train-batch 4 --eval-batch 4 --repeats 2   # a quick check
    python -m mpafer.bench --json bench.json    # also write the figures as JSON
    python -m mpafer.bench epoch                # an epoch from image files vs its steps alone
    python -m mpafer.bench gpu --json gpu.json  # every GPU check in one command: see bench.gpu

Sub-benchmarks (each ratio compares two timings taken interleaved in one run):
  clip    vendored image/text towers vs the `nn.MultiheadAttention` reference
                                                                        (clip_ratio <= 1.0)
  train   a full MPA-FER training step (all losses, SGD with momentum, gradient clipping) vs the
          unavoidable part: prompted image tower + C-prompt text tower, forward and backward to
          the prompts of a trivial scalar loss                    (train_step_ratio <= 1.15)
  eval    MPA-FER prediction per image vs zero-shot CLIP per image, both with cached text
          features                                                (eval_ratio <= 1.10)
  memory  peak memory of a training step (CUDA: max_memory_allocated; CPU: peak RSS of a fresh
          process), trainable parameter count, checkpoint size
  epoch   (only when named) train.py's loop from image files vs the step alone (epoch_ratio),
          the DataLoader alone, evaluation, the share of a run outside training steps, and the
          per-image CPU cost of preprocessing; see `mpafer.bench.epoch`

Timings are medians over repeats after warm-up; each ratio is the median over rounds of the
ratio of two timings taken back to back (order alternating), which keeps it fair on a shared
machine. On CUDA, autocast (bf16 where supported, else fp16 with a GradScaler), TF32 matmuls and
cuDNN benchmark are on, and the training step's host-device synchronisations are counted; the
inputs already sit on the device (data loading is not measured). Weights are random: speed does
not depend on them. Large backbones: --grad-checkpointing (activation checkpointing in both
towers) and --compile (torch.compile of the image tower, meant for CUDA) apply to both sides of
the train and eval ratios and to the memory figure.
"""

import argparse
import datetime
from typing import Dict

import torch

from ...clip.model import SHAPES
from ...files import atomic_write_json
from ...precision import configure_cuda, resolve_amp
from ..cli import ArgumentParser
from . import epoch, measure
from .speed import TARGETS, bench_clip, bench_eval, bench_memory, bench_train, benchmark_model


def bench_epoch_from_files(args, device: torch.device) -> Dict[str, object]:
    return epoch.run_epoch_benchmark(args, device, benchmark_model(args, device))


BENCHMARKS = {"clip": bench_clip, "train": bench_train, "eval": bench_eval, "memory": bench_memory,
              "epoch": bench_epoch_from_files}
DEFAULT = ("clip", "train", "eval", "memory")  # `epoch` reads files and runs longer: when named


def print_summary(results: Dict[str, object]):
    s = results["settings"]
    extras = [name for name, on in (("glibc keeps freed memory",
                                     results["malloc_keeps_freed_memory"]),
                                    ("grad checkpointing", s["grad_checkpointing"]),
                                    ("torch.compile", s["compile"])) if on]
    print(f"\nMPA-FER benchmark: {s['shape']} (random weights), {results['device']}, "
          f"{'AMP ' + results['amp_dtype'] if s['amp'] else 'fp32'}, {results['threads']} threads, "
          f"torch {results['torch']}" + "".join(", " + e for e in extras))
    rows = [("clip_ratio", f"CLIP towers, vendored / reference (batch {s['batch']})"),
            ("train_step_ratio", f"training step / unavoidable part (batch {s['train_batch']})"),
            ("eval_ratio", f"evaluation / zero-shot CLIP, per image (batch {s['eval_batch']})")]
    for key, label in rows:
        if key in results:
            ok = "ok" if results[key] <= TARGETS[key] else "MISSED"
            print(f"  {label:<58}{results[key]:>7.3f}   target <= {TARGETS[key]:.2f}  {ok}")
    if s["shape"] == "tiny" and any(key in results for key, _ in rows):
        print("  (tiny shape: per-operation overhead dominates; the targets are meant for real "
              "shapes)")
    if "peak_memory_bytes" in results:
        print(f"  {'peak memory of a training step (batch ' + str(s['train_batch']) + ')':<58}"
              f"{measure.mib(results['peak_memory_bytes']):>12}")
        print(f"  {'trainable parameters':<58}{results['trainable_params']:>12,}")
        print(f"  {'checkpoint size (trainable state dict)':<58}"
              f"{results['checkpoint_bytes']:>12,} bytes")


def parse_args(argv=None):
    """The benchmark's options, checked (nothing runs)."""
    parser = ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="*", metavar="BENCHMARK",
                        help=f"sub-benchmarks to run, of {', '.join(BENCHMARKS)} (default: "
                             f"{' '.join(DEFAULT)})")
    parser.add_argument("--shape", default="ViT-B/16", choices=list(SHAPES),
                        help="CLIP shape (random weights)")
    parser.add_argument("--batch", type=int, default=8, help="batch of the CLIP tower comparison")
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up calls (default: 1 on CPU, 3 on CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="autocast (default: on for CUDA, off on CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="activation checkpointing in both CLIP towers (train and memory)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the image tower (train, eval, memory; meant for CUDA)")
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=None,
                        help="CPU/glibc: keep freed memory in the process, as CUDA's caching "
                             "allocator does, so timings measure compute, not page faults "
                             "(default: on for CPU)")
    parser.add_argument("--in-process", action="store_true",
                        help="memory: measure in this process, not a fresh one (CPU peak RSS then "
                             "includes whatever ran before)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    epoch.add_arguments(parser)
    args = parser.parse_args(argv)
    args.which = args.which or list(DEFAULT)
    unknown = [name for name in args.which if name not in BENCHMARKS]
    if unknown:  # (checked here: argparse rejects an empty list when `choices` is given)
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    args.amp = device.type == "cuda" if args.amp is None else args.amp
    # The package's precision policy: train.py's `--amp auto` on CUDA, bf16 when asked on CPU.
    args.amp_dtype = resolve_amp(("auto" if device.type == "cuda" else "bf16") if args.amp
                                 else "off", device)
    args.warmup = (3 if device.type == "cuda" else 1) if args.warmup is None else args.warmup
    if args.keep_freed_memory is None:
        args.keep_freed_memory = device.type == "cpu"
    kept = measure.keep_freed_memory() if args.keep_freed_memory else False
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        configure_cuda()  # TF32 and cuDNN autotuning, as train.py sets them
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "in_process", "amp_dtype")}
    results = {"settings": settings, "device": measure.device_name(device),
               "device_type": device.type,
               "amp_dtype": str(args.amp_dtype).replace("torch.", "") if args.amp else None,
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "malloc_keeps_freed_memory": kept,
               "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "targets": TARGETS}
    results["times"] = {}  # every timing in seconds, per round, for who wants more than medians
    for name in args.which:
        out = BENCHMARKS[name](args, device)
        results["times"].update(out.pop("times", {}))
        results.update(out)
    print_summary(results)
    if args.json:
        atomic_write_json(results, args.json)
    return results

