"""Benchmarks that print ratios measured side by side in one run.

    python -m mpafer.bench clip             # vendored CLIP towers vs nn.MultiheadAttention reference
    python -m mpafer.bench clip --shape tiny --batch 4 --repeats 3   # a quick check

Timings are medians over repeats after warm-up; ratios compare two timings from the same run.
"""
import argparse
import json
import platform
import statistics
import time
from typing import Callable, Dict

import torch

from .clip.model import CLIP
from .clip.reference import build_reference_model
from .clip.model import build_model

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


def random_clip(shape: str, seed: int = 0) -> CLIP:
    """A frozen CLIP of a named shape with random weights (nothing downloaded)."""
    torch.manual_seed(seed)
    return build_model(CLIP(**SHAPES[shape]).state_dict())


def measure(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of `fn()` in seconds, synchronising CUDA around each call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def autocast_for(device: torch.device, amp: bool):
    dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=amp)


def bench_clip(args, device: torch.device) -> Dict[str, float]:
    """Vendored towers vs the `nn.MultiheadAttention` reference with the same weights."""
    model = random_clip(args.shape).to(device)
    reference = build_reference_model(model.state_dict()).to(device)
    res = model.visual.input_resolution
    images = torch.randn(args.batch, 3, res, res, device=device)
    texts = torch.randint(1, 49406, (args.batch, model.context_length), device=device)
    texts[:, -1] = 49407  # EOT last, so both models read the same position
    out = {}
    with torch.no_grad(), autocast_for(device, args.amp):
        for tower, inputs in (("image", images), ("text", texts)):
            ours = measure(lambda: getattr(model, f"encode_{tower}")(inputs), device, args.repeats)
            ref = measure(lambda: getattr(reference, f"encode_{tower}")(inputs), device, args.repeats)
            out[f"clip_{tower}_seconds"], out[f"clip_{tower}_reference_seconds"] = ours, ref
            out[f"clip_{tower}_ratio"] = ours / ref
    out["clip_ratio"] = ((out["clip_image_seconds"] + out["clip_text_seconds"])
                         / (out["clip_image_reference_seconds"] + out["clip_text_reference_seconds"]))
    print(f"CLIP {args.shape}, batch {args.batch}, {device.type}{' AMP' if args.amp else ' fp32'}")
    print(f"  {'tower':<8}{'vendored':>12}{'reference':>12}{'ratio':>8}  (target <= 1.0)")
    for tower in ("image", "text"):
        print(f"  {tower:<8}{out[f'clip_{tower}_seconds'] * 1e3:>10.1f}ms"
              f"{out[f'clip_{tower}_reference_seconds'] * 1e3:>10.1f}ms{out[f'clip_{tower}_ratio']:>8.2f}")
    print(f"  {'both':<32}{out['clip_ratio']:>8.2f}")
    return out


BENCHMARKS = {"clip": bench_clip}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="*", default=list(BENCHMARKS), choices=list(BENCHMARKS),
                        help="sub-benchmarks to run (default: all)")
    parser.add_argument("--shape", default="ViT-B/16", choices=list(SHAPES), help="CLIP shape (random weights)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="autocast (default: on for CUDA, off on CPU)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.amp = device.type == "cuda" if args.amp is None else args.amp
    results = {"settings": {k: v for k, v in vars(args).items() if k != "json"},
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    for name in args.which:
        results.update(BENCHMARKS[name](args, device))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
