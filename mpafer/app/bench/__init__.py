"""The speed targets, each ratio measured side by side in one run (random weights); `gpu`
runs every GPU check in one command (`python -m mpafer.bench gpu --help`); `faces` times face
detection against facenet-pytorch (`python -m mpafer.bench faces --help`); `template` measures
where a dataset's face crops hold the five landmarks (`python -m mpafer.bench template --help`).

  clip    the vendored image and text towers vs an `nn.MultiheadAttention` reference with the
          same weights                                                  (clip_ratio <= 1.0)
  train   a full MPA-FER training step (all losses, SGD, clipping) vs the unavoidable part:
          the prompted image tower and the C-prompt text tower, forward and backward to the
          prompts, of a trivial scalar loss                       (train_step_ratio <= 1.15)
  eval    MPA-FER prediction vs zero-shot CLIP per image, text features cached (eval_ratio <= 1.10)
  memory  peak memory of a training step (CUDA: max_memory_allocated; CPU: peak RSS of a fresh
          process), trainable parameters, checkpoint size
  epoch   (only when named) train.py's loop from image files: see `mpafer.app.bench.epoch`

A ratio is the median over rounds of two timings taken back to back, in alternating order (fair
on a shared machine). CUDA runs as train.py does (autocast, TF32, cuDNN autotuning).
"""
import argparse
import datetime

import torch

from ...clip.model import SHAPES
from ...files import atomic_write_json
from ...precision import configure_cuda, resolve_amp
from ..cli import ArgumentParser
from . import epoch, measure
from .speed import TARGETS, bench_clip, bench_eval, bench_memory, bench_train

BENCHMARKS = {"clip": bench_clip, "train": bench_train, "eval": bench_eval, "memory": bench_memory,
              "epoch": epoch.run_epoch_benchmark}
DEFAULT = ("clip", "train", "eval", "memory")  # `epoch` reads files and runs longer: when named


def parse_args(argv=None):
    """The benchmark's options, checked (nothing runs)."""
    parser = ArgumentParser(prog="python -m mpafer.bench", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="*", metavar="BENCHMARK", help=" ".join(BENCHMARKS))
    parser.add_argument("--shape", default="ViT-B/16", choices=list(SHAPES))
    parser.add_argument("--batch", type=int, default=8, help="batch of the CLIP tower comparison")
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, help="warm-up calls (default: 1 on CPU, 3 on CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="activation checkpointing in both CLIP towers of MPA-FER")
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction,
                        help="keep freed memory in the process (CPU, glibc; default: on for CPU)")
    parser.add_argument("--in-process", action="store_true",
                        help="memory: measure in this process (CPU: its peak RSS so far)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    epoch.add_arguments(parser)
    args = parser.parse_args(argv)
    args.which = args.which or list(DEFAULT)
    unknown = [name for name in args.which if name not in BENCHMARKS]
    if unknown:  # (checked here: argparse rejects an empty list when `choices` is given)
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    return args


def main(argv=None):
    """`python -m mpafer.bench ARGS` is main(ARGS) -> the figures."""
    args = parse_args(argv)
    device = torch.device(args.device)
    args.amp_dtype = resolve_amp("auto", device)  # train.py's policy: autocast on CUDA only
    args.warmup = (3 if device.type == "cuda" else 1) if args.warmup is None else args.warmup
    if args.keep_freed_memory is None:
        args.keep_freed_memory = device.type == "cpu"
    kept = args.keep_freed_memory and measure.keep_freed_memory()
    if device.type == "cuda":
        configure_cuda()
    amp = str(args.amp_dtype).replace("torch.", "") if args.amp_dtype else None
    results = {"settings": {k: v for k, v in vars(args).items()
                            if k not in ("json", "in_process", "amp_dtype")},
               "device": measure.device_name(device), "device_type": device.type,
               "amp_dtype": amp, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "malloc_keeps_freed_memory": kept, "targets": TARGETS, "times": {},
               "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    print(f"MPA-FER benchmark: {args.shape} (random weights), {results['device']}, "
          f"{'AMP ' + amp if amp else 'fp32'}, {results['threads']} threads, torch "
          f"{torch.__version__}" + ", glibc keeps freed memory" * kept
          + ", grad checkpointing" * args.grad_checkpointing, flush=True)
    if args.shape == "tiny":
        print("  (tiny shape: per-operation overhead dominates; targets are for real shapes)")
    for name in args.which:
        out = BENCHMARKS[name](args, device)
        results["times"].update(out.pop("times", {}))  # every timing in seconds, per round
        results.update(out)
    if args.json:
        atomic_write_json(results, args.json)
    return results
