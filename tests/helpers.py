"""Tiny CLIP models in OpenAI's checkpoint format, built in the tests (nothing downloaded)."""
import torch

from mpafer.bench import SHAPES
from mpafer.clip.model import CLIP, build_model

# A few layers, width 64: the same code path as ViT-B/16, at a size the CPU runs in milliseconds.
TINY = SHAPES["tiny"]
# Width 128: two attention heads in both towers (heads = width // 64, as in OpenAI's models),
# so head splitting and merging are checked too.
MULTIHEAD = {**TINY, "vision_width": 128, "transformer_width": 128, "transformer_heads": 2}


def tiny_state_dict(seed: int = 0, **overrides) -> dict:
    """A randomly initialised CLIP's state dict (OpenAI key names), e.g. to write to disk."""
    torch.manual_seed(seed)
    model = CLIP(**{**TINY, **overrides})
    # Randomise what OpenAI's init leaves at constants, so tests see every parameter act.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln" in name or name.startswith("ln"):
                p.add_(0.05 * torch.randn_like(p))
    return model.state_dict()


def tiny_clip(seed: int = 0, **overrides) -> CLIP:
    return build_model(tiny_state_dict(seed, **overrides))
