"""The speed and memory benchmarks of one CLIP shape: vendored towers vs a reference, a
training step vs its unavoidable part, evaluation vs zero-shot CLIP, peak memory. Each ratio
compares two timings taken back to back in one run (see `mpafer.bench`).

What the ratios should be, from what the code does:
- training step: besides the prompted tower passes, a step adds only the alignment block,
  four small losses, clipping and SGD on the prompts (78,848 parameters for ViT-B/16), so about
  1.0; the unavoidable part is the prompted image tower and the C-prompt text tower, forward
  and backward to the prompts, of a trivial loss;
- evaluation: by token count about 1.04x zero-shot CLIP, since the 8 visual prompt tokens make
  each ViT-B/16 layer 205 tokens long instead of 197, and the soft-prompt text features are
  computed once per model state, as zero-shot CLIP's are;
- towers: the same weights and arithmetic as `reference.py`, on `scaled_dot_product_attention`
  batch-first without transposes, so at most 1.0.
ViT-L/14 at batch 32 with `--grad-checkpointing` peaked at 9.1 GiB in fp32 on CPU, so it should
fit a 24 GB GPU (the CUDA tier checks this on a GPU). At the tiny shape fixed per-operation
costs dominate, so its ratios say nothing about the targets.
"""
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

from ...clip.model import CLIP, SHAPES
from ...clip.tokenizer import tokenize
from ...labels import BASIC_CLASSES
from ...model import MPAFER
from ...precision import autocast
from ...prompts import load_descriptions
from ..config import TrainConfig
from ..engine import build_mpafer, make_optimizer, train_step, trainable_parameters
from . import measure
from .reference import build_reference_model

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

def benchmark_model(args, device: torch.device) -> MPAFER:
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
    """One full MPA-FER training step, train.py's own: `engine.train_step` (forward, all
    losses, backward, gradient clipping) with the recipe's optimiser, then its schedule step."""
    recipe = TrainConfig()
    optimization = make_optimizer(trainable_parameters(model), recipe.lr, recipe.momentum,
                                  recipe.weight_decay, 0, recipe.epochs, images.device, amp)
    model.train()

    def step():
        loss, _ = train_step(model, images, labels, optimization.optimizer, optimization.scaler,
                             amp, grad_clip=recipe.grad_clip)
        optimization.scheduler.step()
        return loss

    return step


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
    model = benchmark_model(args, device)
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
    model = benchmark_model(args, device).eval()
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
    model = benchmark_model(args, device)
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
    here = os.path.abspath(__file__)  # .../mpafer/app/bench/speed.py
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(here))))
    python_path = [repo_root, os.environ.get("PYTHONPATH")]
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
