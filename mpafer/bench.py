"""Benchmarks of the speed targets, printing ratios measured side by side in one run.

    python -m mpafer.bench                      # all: clip, train, eval, memory (ViT-B/16)
    python -m mpafer.bench clip                 # vendored CLIP towers vs the reference
    python -m mpafer.bench train eval --repeats 3
    python -m mpafer.bench --shape tiny --train-batch 4 --eval-batch 4 --repeats 2   # a quick check
    python -m mpafer.bench --json bench.json    # also write the figures as JSON
    python -m mpafer.bench epoch                # an epoch from image files vs its steps alone

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
          per-image CPU cost of preprocessing; see `mpafer.bench_epoch`

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
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from . import bench_epoch, measure
from .clip.model import CLIP
from .clip.reference import build_reference_model
from .clip.tokenizer import tokenize
from .engine import (
    autocast,
    build_mpafer,
    configure_cuda,
    grad_scaler,
    resolve_amp,
    train_step,
    trainable_parameters,
)
from .labels import BASIC_CLASSES
from .model import MPAFER
from .prompts import load_descriptions
from .utils import atomic_write_json

SHAPES = {
    "ViT-B/16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=16, context_length=77, vocab_size=49408,
                     transformer_width=512, transformer_heads=8, transformer_layers=12),
    "ViT-L/14": dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024,
                     vision_patch_size=14, context_length=77, vocab_size=49408,
                     transformer_width=768, transformer_heads=12, transformer_layers=12),
    "tiny": dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                 vision_patch_size=8, context_length=77, vocab_size=49408, transformer_width=64,
                 transformer_heads=1, transformer_layers=2),
}
CLASSES = list(BASIC_CLASSES)
TARGETS = {"clip_ratio": 1.0, "train_step_ratio": 1.15, "eval_ratio": 1.10}


# -- a CLIP with random weights -------------------------------------------------------------

def random_clip(shape: str, seed: int = 0) -> CLIP:
    """A frozen fp32 CLIP of a named shape with random weights (nothing downloaded).

    Built directly (not through a state dict) so that building it never holds two copies:
    the memory benchmark's peak RSS should be the training step's, not the construction's.
    """
    torch.manual_seed(seed)
    return CLIP(**SHAPES[shape]).requires_grad_(False).eval()


# -- the model and its steps ------------------------------------------------------------------

def build_model(args, device: torch.device) -> MPAFER:
    """MPA-FER as train.py builds it (default config, 7 classes) on a random CLIP, with
    prototypes set."""
    model = build_mpafer(random_clip(args.shape).to(device), CLASSES, load_descriptions(CLASSES),
                         grad_checkpointing=args.grad_checkpointing, compile=args.compile)
    prototypes = torch.randn(len(CLASSES), model.clip.embed_dim,
                             generator=torch.Generator().manual_seed(0))
    model.set_prototypes(prototypes)
    return model


def random_batch(model: MPAFER, batch: int, device: torch.device):
    res = model.clip.visual.input_resolution
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, res, res, generator=g).to(device)
    labels = (torch.arange(batch) % len(model.classnames)).to(device)
    return images, labels


def make_train_step(model: MPAFER, images, labels, amp) -> Callable[[], torch.Tensor]:
    """One full MPA-FER training step, train.py's own (`engine.train_step`): forward, all losses,
    backward, gradient clipping 1.0, SGD with momentum with the RAF-DB recipe's settings."""
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=0.032, momentum=0.9,
                                weight_decay=5e-4)
    scaler = grad_scaler(images.device, amp)
    model.train()
    return lambda: train_step(model, images, labels, optimizer, scaler, amp, grad_clip=1.0)[0]


def make_unavoidable_step(model: MPAFER, images, amp) -> Callable[[], torch.Tensor]:
    """The part of a step no prompt method can avoid: the prompted image tower and the C-prompt
    text tower, forward and backward to the same prompts, of a trivial scalar loss."""
    device = images.device
    model.train()

    def step():
        with autocast(device, amp):
            prompts = model.visual_prompts() if model.visual_prompts is not None else None
            image_features = model.clip.encode_image(images, prompts=prompts)
            text_features, _ = model.text_prompts(model.clip)
            loss = image_features.float().sum() + text_features.float().sum()
        model.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach()

    return step


# -- sub-benchmarks ---------------------------------------------------------------------------

def bench_clip(args, device: torch.device) -> Dict[str, float]:
    """Vendored towers vs the `nn.MultiheadAttention` reference with the same weights."""
    model = random_clip(args.shape).to(device)
    reference = build_reference_model(model.state_dict()).to(device)
    res = model.visual.input_resolution
    images = torch.randn(args.batch, 3, res, res, device=device)
    texts = torch.randint(1, 49406, (args.batch, model.context_length), device=device)
    texts[:, -1] = 49407  # EOT last, so both models read the same position
    out, times = {}, {}
    with torch.no_grad(), autocast(device, args.amp_dtype):
        for tower, inputs in (("image", images), ("text", texts)):
            t = measure.compare({"ours": lambda: getattr(model, f"encode_{tower}")(inputs),
                         "ref": lambda: getattr(reference, f"encode_{tower}")(inputs)},
                        device, args.repeats, args.warmup)
            times[tower] = t
            out.setdefault("times", {})[f"clip_{tower}"] = t
            out[f"clip_{tower}_seconds"] = statistics.median(t["ours"])
            out[f"clip_{tower}_reference_seconds"] = statistics.median(t["ref"])
            out[f"clip_{tower}_ratio"] = measure.paired_ratio(t["ours"], t["ref"])
    # Both towers together: per round, (image + text) / (reference image + reference text).
    both = {side: [a + b for a, b in zip(times["image"][side], times["text"][side])]
            for side in ("ours", "ref")}
    out["clip_ratio"] = measure.paired_ratio(both["ours"], both["ref"])
    print(f"clip: towers, batch {args.batch}")
    print(f"  {'tower':<8}{'vendored':>12}{'reference':>12}{'ratio':>8}")
    for tower in ("image", "text"):
        print(f"  {tower:<8}{out[f'clip_{tower}_seconds'] * 1e3:>10.1f}ms"
              f"{out[f'clip_{tower}_reference_seconds'] * 1e3:>10.1f}ms"
              f"{out[f'clip_{tower}_ratio']:>8.3f}")
    print(f"  {'both':<32}{out['clip_ratio']:>8.3f}   (target <= {TARGETS['clip_ratio']})",
          flush=True)
    return out


def bench_train(args, device: torch.device) -> Dict[str, float]:
    """A full MPA-FER training step vs the unavoidable tower passes, same prompts, same batch."""
    model = build_model(args, device)
    images, labels = random_batch(model, args.train_batch, device)
    full = make_train_step(model, images, labels, args.amp_dtype)
    unavoidable = make_unavoidable_step(model, images, args.amp_dtype)
    t = measure.compare({"full": full, "unavoidable": unavoidable}, device, args.repeats,
                        args.warmup)
    out = {"train_step_seconds": statistics.median(t["full"]),
           "train_unavoidable_seconds": statistics.median(t["unavoidable"]),
           "train_step_ratio": measure.paired_ratio(t["full"], t["unavoidable"]),
           "times": {"train": t}}
    if device.type == "cuda":
        out["train_step_host_syncs"] = measure.count_host_syncs(full, device)
    print(f"train: step, batch {args.train_batch}")
    print(f"  MPA-FER step {out['train_step_seconds'] * 1e3:.1f}ms, "
          f"unavoidable {out['train_unavoidable_seconds'] * 1e3:.1f}ms, "
          f"ratio {out['train_step_ratio']:.3f}   (target <= {TARGETS['train_step_ratio']})",
          flush=True)
    if "train_step_host_syncs" in out:
        print(f"  host-device synchronisations in a step: {out['train_step_host_syncs']}")
    return out


def bench_eval(args, device: torch.device) -> Dict[str, float]:
    """MPA-FER prediction vs zero-shot CLIP per image, both with text features computed once."""
    model = build_model(args, device).eval()
    images, _ = random_batch(model, args.eval_batch, device)
    clip_model = model.clip
    with torch.no_grad(), autocast(device, args.amp_dtype):
        model.text_features()  # fills the cache
        tokens = tokenize([f"a photo of a person making a facial expression of {c}."
                           for c in CLASSES]).to(device)
        zero_shot_text = F.normalize(clip_model.encode_text(tokens).float(), dim=-1)  # [C, D]

    @torch.no_grad()
    def mpafer_predict():
        with autocast(device, args.amp_dtype):
            return model(images).logits.argmax(dim=-1)

    @torch.no_grad()
    def zero_shot_predict():
        with autocast(device, args.amp_dtype):
            features = F.normalize(clip_model.encode_image(images).float(), dim=-1)  # [B, D]
            return (clip_model.logit_scale.exp() * features @ zero_shot_text.t()).argmax(dim=-1)

    t = measure.compare({"mpafer": mpafer_predict, "zero_shot": zero_shot_predict}, device,
                        args.repeats, args.warmup)
    out = {"eval_seconds_per_image": statistics.median(t["mpafer"]) / args.eval_batch,
           "eval_zero_shot_seconds_per_image": statistics.median(t["zero_shot"]) / args.eval_batch,
           "eval_ratio": measure.paired_ratio(t["mpafer"], t["zero_shot"]), "times": {"eval": t}}
    print(f"eval: per image, batch {args.eval_batch}")
    print(f"  MPA-FER {out['eval_seconds_per_image'] * 1e3:.2f}ms, zero-shot CLIP "
          f"{out['eval_zero_shot_seconds_per_image'] * 1e3:.2f}ms, ratio {out['eval_ratio']:.3f}"
          f"   (target <= {TARGETS['eval_ratio']})", flush=True)
    return out


def memory_in_process(args, device: torch.device) -> Dict[str, object]:
    """Peak memory of a training step in this process (CUDA: a second step, after a warm-up one;
    CPU: peak RSS over two steps, since RSS peaks cannot be reset)."""
    model = build_model(args, device)
    images, labels = random_batch(model, args.train_batch, device)
    step = make_train_step(model, images, labels, args.amp_dtype)
    buffer = io.BytesIO()
    torch.save(model.trainable_state_dict(), buffer)
    out = {"trainable_params": model.num_trainable_parameters(),
           "checkpoint_bytes": buffer.getbuffer().nbytes}
    if device.type == "cuda":
        step()  # warm-up: optimizer state, cuDNN autotuning, compilation
        measure.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        measure.synchronize(device)
        out.update(peak_memory_bytes=torch.cuda.max_memory_allocated(device),
                   memory_before_step_bytes=before,
                   peak_memory_kind="torch.cuda.max_memory_allocated of a training step after a "
                                    "warm-up step")
    else:
        before = measure.current_rss()
        for _ in range(2):
            step()
        out.update(peak_memory_bytes=measure.peak_rss(), memory_before_step_bytes=before,
                   peak_memory_kind="peak RSS of a process that built the model and ran two "
                                    "training steps")
    return out


def bench_memory(args, device: torch.device) -> Dict[str, object]:
    """Peak memory of a training step, trainable parameters, checkpoint size.

    On CPU the peak RSS is process-wide and never goes down, so unless --in-process is given
    the step runs in a fresh process that does nothing else (this command, `memory --in-process`).
    """
    if device.type == "cuda" or args.in_process:
        out = memory_in_process(args, device)
    else:
        out = memory_in_subprocess(args)
    print(f"memory: training step, batch {args.train_batch}")
    print(f"  peak {measure.mib(out['peak_memory_bytes'])} ({out['peak_memory_kind']}); "
          f"{measure.mib(out['memory_before_step_bytes'])} before the first step")
    print(f"  trainable parameters {out['trainable_params']:,}, checkpoint "
          f"{out['checkpoint_bytes']:,} bytes", flush=True)
    return out


def memory_in_subprocess(args) -> Dict[str, object]:
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    python_path = [package_root, os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, python_path)))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "memory.json")
        command = [sys.executable, "-m", "mpafer.bench", "memory", "--in-process", "--json", path,
                   "--shape", args.shape, "--train-batch", str(args.train_batch), "--device", "cpu",
                   "--threads", str(torch.get_num_threads()), "--amp" if args.amp else "--no-amp",
                   "--keep-freed-memory" if args.keep_freed_memory else "--no-keep-freed-memory"]
        command += ["--grad-checkpointing"] * args.grad_checkpointing + ["--compile"] * args.compile
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the memory benchmark's process failed ({' '.join(command)}):\n"
                               f"{done.stderr}")
        with open(path) as f:
            results = json.load(f)
    keys = ("peak_memory_bytes", "memory_before_step_bytes", "peak_memory_kind",
            "trainable_params", "checkpoint_bytes")
    return {k: results[k] for k in keys}


def bench_epoch_from_files(args, device: torch.device) -> Dict[str, object]:
    return bench_epoch.run_epoch_benchmark(args, device, build_model(args, device))


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
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
    bench_epoch.add_arguments(parser)
    args = parser.parse_args(argv)
    args.which = args.which or list(DEFAULT)
    unknown = [name for name in args.which if name not in BENCHMARKS]
    if unknown:  # (checked here: argparse rejects an empty list when `choices` is given)
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
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


if __name__ == "__main__":
    main()
