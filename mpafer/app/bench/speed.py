"""The ratios of one CLIP shape, and the memory of its training step (`python -m mpafer.bench`).

Expected from the code: a step adds to the tower passes only the alignment block, small losses,
clipping and SGD on the prompts (about 1); evaluation adds the visual prompt tokens, a few per
cent more tokens, and caches its text features as zero-shot CLIP does; the towers do the
reference's arithmetic on `scaled_dot_product_attention` (at most 1). At the tiny shape fixed
per-operation costs dominate, so its ratios say nothing about the targets.
"""
import io
import multiprocessing
import statistics
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


def random_clip(shape: str, seed: int = 0) -> CLIP:
    """A frozen fp32 CLIP of a named shape with random weights, built directly (not through a
    state dict) so that the peak memory is the training step's, not the construction's."""
    torch.manual_seed(seed)
    return CLIP(**SHAPES[shape]).requires_grad_(False).eval()


def benchmark_model(args, device: torch.device) -> MPAFER:
    """MPA-FER as train.py builds it (default config, 7 classes) on a random CLIP."""
    model = build_mpafer(random_clip(args.shape).to(device), CLASSES, load_descriptions(CLASSES),
                         grad_checkpointing=args.grad_checkpointing)
    model.set_prototypes(torch.randn(len(CLASSES), model.clip.embed_dim,
                                     generator=torch.Generator().manual_seed(0)))
    return model


def random_batch(model: MPAFER, batch: int, device: torch.device):
    res = model.clip.visual.input_resolution
    images = torch.randn(batch, 3, res, res, generator=torch.Generator().manual_seed(0))
    return images.to(device), (torch.arange(batch) % len(model.classnames)).to(device)


def make_train_step(model: MPAFER, images, labels, amp) -> Callable[[], torch.Tensor]:
    """train.py's training step: `engine.train_step` (forward, all losses, backward, gradient
    clipping) with the recipe's optimiser, then its schedule step."""
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
    """What no prompt method can avoid: the prompted image tower and the C-prompt text tower,
    forward and backward to the same prompts, of a trivial scalar loss."""
    model.train()

    def step():
        with autocast(images.device, amp):
            prompts = model.visual_prompts() if model.visual_prompts is not None else None
            image_features = model.clip.encode_image(images, prompts=prompts)
            text_features, _ = model.text_prompts(model.clip)
            loss = image_features.float().sum() + text_features.float().sum()
        model.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach()

    return step


def print_ratio(label: str, ratio: float, note: str = "", key: str = ""):
    if key:  # a `TARGETS` key
        verdict = "ok" if ratio <= TARGETS[key] else "MISSED"
        note = f"target <= {TARGETS[key]:.2f}  {verdict}  {note}"
    print(f"  {label:<58}{ratio:>12.3f}   {note}".rstrip(), flush=True)


def side_by_side(label: str, fns: Dict[str, Callable], args, device, key: str = "", per: int = 1):
    """Ours and the baseline (in this order in `fns`) timed in turns, and printed -> (the times,
    the median seconds of each divided by `per`, the paired ratio)."""
    times = measure.compare(fns, device, args.repeats, args.warmup)
    ours, baseline = (statistics.median(t) / per for t in times.values())
    ratio = measure.paired_ratio(*times.values())
    print_ratio(label, ratio, f"({ours * 1e3:.4g} ms vs {baseline * 1e3:.4g} ms)", key)
    return times, ours, baseline, ratio


def bench_clip(args, device: torch.device) -> Dict[str, object]:
    """The vendored towers vs the `nn.MultiheadAttention` reference with the same weights."""
    model = random_clip(args.shape).to(device)
    reference = build_reference_model(model.state_dict()).to(device)
    res = model.visual.input_resolution
    texts = torch.randint(1, 49406, (args.batch, model.context_length), device=device)
    texts[:, -1] = 49407  # EOT last, so both models read the same position
    towers = {"image": (model.encode_image, reference.visual,
                        torch.randn(args.batch, 3, res, res, device=device)),
              "text": (model.encode_text, reference.encode_text, texts)}
    out = {"times": {}}
    with torch.no_grad(), autocast(device, args.amp_dtype):
        for tower, (vendored, baseline, x) in towers.items():
            times, ours, ref, ratio = side_by_side(
                f"CLIP {tower} tower, vendored / reference",
                {"ours": lambda: vendored(x), "ref": lambda: baseline(x)}, args, device)
            out["times"][f"clip_{tower}"] = times
            out.update({f"clip_{tower}_seconds": ours, f"clip_{tower}_reference_seconds": ref,
                        f"clip_{tower}_ratio": ratio})
    # Both towers together: per round, (image + text) / (reference image + reference text).
    image, text = out["times"]["clip_image"], out["times"]["clip_text"]
    out["clip_ratio"] = measure.paired_ratio(
        *([a + b for a, b in zip(image[side], text[side])] for side in ("ours", "ref")))
    print_ratio(f"CLIP towers, vendored / reference (batch {args.batch})", out["clip_ratio"],
                key="clip_ratio")
    return out


def bench_train(args, device: torch.device) -> Dict[str, object]:
    """A full MPA-FER training step vs the unavoidable tower passes, same prompts, same batch."""
    model = benchmark_model(args, device)
    images, labels = random_batch(model, args.train_batch, device)
    full = make_train_step(model, images, labels, args.amp_dtype)
    times, step, unavoidable, ratio = side_by_side(
        f"training step / unavoidable part (batch {args.train_batch})",
        {"full": full, "unavoidable": make_unavoidable_step(model, images, args.amp_dtype)},
        args, device, "train_step_ratio")
    out = {"train_step_seconds": step, "train_unavoidable_seconds": unavoidable,
           "train_step_ratio": ratio, "times": {"train": times}}
    if device.type == "cuda":
        out["train_step_host_syncs"] = measure.count_host_syncs(full, device)
        print(f"  host-device synchronisations in a training step: {out['train_step_host_syncs']}")
    return out


def bench_eval(args, device: torch.device) -> Dict[str, object]:
    """MPA-FER prediction vs zero-shot CLIP per image, both with text features computed once."""
    model = benchmark_model(args, device).eval()
    images, _ = random_batch(model, args.eval_batch, device)
    clip_model = model.clip
    with torch.no_grad(), autocast(device, args.amp_dtype):
        model.text_features()  # fills the cache
        tokens = tokenize([f"a photo of a person making a facial expression of {c}."
                           for c in CLASSES]).to(device)
        zero_shot_text = F.normalize(clip_model.encode_text(tokens).float(), dim=-1)  # [C, D]

        def zero_shot_predict():
            features = F.normalize(clip_model.encode_image(images).float(), dim=-1)  # [B, D]
            return (clip_model.logit_scale.exp() * features @ zero_shot_text.t()).argmax(dim=-1)

        times, ours, zero_shot, ratio = side_by_side(
            f"evaluation / zero-shot CLIP, per image (batch {args.eval_batch})",
            {"mpafer": lambda: model(images).logits.argmax(dim=-1), "zero_shot": zero_shot_predict},
            args, device, "eval_ratio", per=args.eval_batch)
    return {"eval_seconds_per_image": ours, "eval_zero_shot_seconds_per_image": zero_shot,
            "eval_ratio": ratio, "times": {"eval": times}}


def memory_in_process(args, device: torch.device) -> Dict[str, object]:
    """Peak memory of a training step in this process (CUDA: a second step, after a warm-up one;
    CPU: peak RSS over two steps, since RSS peaks cannot be reset)."""
    model = benchmark_model(args, device)
    step = make_train_step(model, *random_batch(model, args.train_batch, device), args.amp_dtype)
    buffer = io.BytesIO()
    torch.save(model.trainable_state_dict(), buffer)
    out = {"trainable_params": model.num_trainable_parameters(),
           "checkpoint_bytes": buffer.getbuffer().nbytes}
    if device.type == "cuda":
        step()  # warm-up: optimizer state, cuDNN autotuning, compilation
        measure.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        step()
        measure.synchronize(device)
        return {**out, "peak_memory_bytes": torch.cuda.max_memory_allocated(device),
                "peak_memory_kind": "max_memory_allocated of a step after a warm-up step"}
    for _ in range(2):
        step()
    return {**out, "peak_memory_bytes": measure.peak_rss(),
            "peak_memory_kind": "peak RSS of a process that built the model and ran two steps"}


def memory_in_fresh_process(args) -> Dict[str, object]:
    """`memory_in_process` on the CPU in a process that does nothing else: a process's peak RSS
    never goes down, so in this one it would include whatever ran before."""
    if args.keep_freed_memory:
        measure.keep_freed_memory()
    return memory_in_process(args, torch.device("cpu"))


def bench_memory(args, device: torch.device) -> Dict[str, object]:
    """Peak memory of a training step (on CPU in a fresh process unless --in-process),
    trainable parameters, checkpoint size."""
    if device.type == "cuda" or args.in_process:
        out = memory_in_process(args, device)
    else:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            out = pool.apply(memory_in_fresh_process, (args,))
    print(f"  {f'peak memory of a training step (batch {args.train_batch})':<58}"
          f"{out['peak_memory_bytes'] / 2 ** 20:>8,.1f} MiB   {out['peak_memory_kind']}\n"
          f"  {'trainable parameters':<58}{out['trainable_params']:>12,}\n"
          f"  {'checkpoint size (trainable state dict)':<58}{out['checkpoint_bytes']:>12,} bytes",
          flush=True)
    return out
