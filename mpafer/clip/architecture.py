"""Which state dicts are CLIP ViTs of OpenAI's architecture (OpenAI's and open_clip's plain
ViTs), and a one-line reason for the rest, which are refused rather than loaded wrongly."""
import re
from typing import Dict, Iterable, List

# Parameters of architectures outside the family, as open_clip (and OpenAI's ResNets) name them.
FOREIGN_KEYS = (
    (r"^visual\.(layer\d|attnpool)\.", "a ResNet image tower (RN50, RN101, ...)"),
    (r"^visual\.trunk\.", "a timm image tower"),
    (r"^text\.", "a Hugging Face or timm text tower"),
    (r"^visual\.attn_pool\.", "attention pooling instead of the class token"),
    (r"\.ls_[12]\.", "LayerScale"),
    (r"\.attn\.ln_[qk]\.", "QK-norm"),
    (r"\.attn\.logit_scale$", "scaled cosine attention"),
    (r"\.attn\.head_scale$", "per-head scaling"),
    (r"\.(ln_attn|attn\.ln_inner|mlp\.ln)\.", "extra LayerNorms inside the blocks"),
    (r"^logit_bias$", "a sigmoid-loss logit bias (SigLIP)"),
    (r"^text_projection\.(weight|bias)$", "a text projection with a bias"),
)
# What every model of the family has beside its blocks; the reason when it is missing.
REQUIRED_KEYS = {
    "visual.conv1.weight": "no patch embedding",
    "visual.class_embedding": "no class token",
    "visual.positional_embedding": "no image position embedding",
    "visual.ln_pre.weight": "no LayerNorm before the image transformer",
    "visual.ln_post.weight": "no LayerNorm after the image transformer",
    "visual.proj": "no image projection",
    "token_embedding.weight": "no token embedding",
    "positional_embedding": "no text position embedding",
    "ln_final.weight": "no final text LayerNorm",
    "text_projection": "a text tower without text_projection",
}
VOCAB_SIZE = 49408  # OpenAI's BPE tokenizer, the only one mpafer has (clip.tokenize)
MLP_RATIO = 4


class NotViTFamily(NotImplementedError):
    """A CLIP outside OpenAI's ViT architecture (a one-line reason)."""


def collapse(keys: Iterable[str], limit: int = 3) -> str:
    """Keys with layer numbers as `*`, deduplicated: `a.resblocks.*.ls_1.gamma, ...`."""
    names = sorted({re.sub(r"\.\d+\.", ".*.", k) for k in keys})
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def refusal(reasons: List[str]) -> NotViTFamily:
    return NotViTFamily("not a CLIP ViT of OpenAI's architecture, the only kind mpafer loads: "
                        + "; ".join(reasons) + " (see the README, \"Other CLIP weights\")")


def check_vit_family(state_dict: Dict) -> None:
    """NotViTFamily naming the foreign (else missing) parameters; ValueError if not CLIP at all."""
    reasons = []
    for pattern, what in FOREIGN_KEYS:
        # A whole module (pattern `^prefix\.`) is shown as `prefix.*`, other keys one by one.
        found = [m.group(0) + "*" if pattern.endswith(r"\.") and pattern[0] == "^" else k
                 for k in state_dict for m in [re.search(pattern, k)] if m]
        if found:
            reasons.append(f"{what} ({collapse(found)})")
    missing = [k for k in REQUIRED_KEYS if k not in state_dict]
    if not reasons and len(missing) == len(REQUIRED_KEYS):
        raise ValueError("not an OpenAI CLIP state dict: no 'visual.proj' key "
                         f"(first keys: {sorted(state_dict)[:5]})")
    if not reasons:  # (a foreign tower explains what it lacks)
        reasons = [f"{REQUIRED_KEYS[k]} (no {k})" for k in missing]
    if reasons:
        raise refusal(reasons)


def check_shapes(state_dict: Dict, vision_width: int, text_width: int) -> None:
    """The shapes a state dict's keys do not show: the MLP width and the vocabulary."""
    reasons = []
    for tower, width in (("visual.transformer", vision_width), ("transformer", text_width)):
        hidden = [v.shape[0] for k, v in state_dict.items()
                  if k.startswith(tower + ".resblocks.") and k.endswith(".mlp.c_fc.weight")]
        if any(h != MLP_RATIO * width for h in hidden):
            reasons.append(f"{tower} has MLPs of width {hidden[0]} = {hidden[0] / width:.4g} x "
                           f"{width}, not {MLP_RATIO} x (e.g. ViT-g/14, ViT-bigG/14)")
    vocab = state_dict["token_embedding.weight"].shape[0]
    if vocab != VOCAB_SIZE:
        reasons.append(f"a vocabulary of {vocab} tokens, not the {VOCAB_SIZE} of OpenAI's "
                       "tokenizer (a text tower for another tokenizer)")
    if reasons:
        raise refusal(reasons)


def check_keys_match(expected: Dict, state_dict: Dict) -> None:
    """One line for what `load_state_dict(strict=True)` would list over many."""
    missing = [k for k in expected if k not in state_dict]
    extra = [k for k in state_dict if k not in expected]
    shapes = [f"{k} {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})"
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    reasons = ([f"missing keys {collapse(missing)}"] if missing else []) + \
              ([f"unexpected keys {collapse(extra)}"] if extra else []) + shapes[:2]
    if reasons:
        raise refusal(reasons)
