"""Zero-shot FER with Exp-CLIP (or plain CLIP): prompts per class, logits = 100 * cos.

Both classifiers of a side-by-side comparison must see the same images through the same
transform, or the comparison measures the preprocessing, not the head. `input_transform` gives
the two protocols: "released" (how the released Exp-CLIP heads were trained and evaluated:
`Resize((r, r))`, a squash without crop, + `ToTensor`, no mean/std normalisation) and "clip"
(CLIP's own preprocessing: bicubic short-side resize, centre crop, CLIP mean/std).
"""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..clip.tokenizer import tokenize
from ..data.transforms import describe_expclip_transform, eval_transform, expclip_transform
from .head import LOGIT_SCALE, ProjectionHead, check_head_fits
from .prompt_sets import PromptSet, build_prompts

INPUT_TRANSFORMS = ("released", "clip")


def input_transform(name: str, resolution: int):
    """-> (transform, description) of a zero-shot input protocol ("released" or "clip")."""
    if name == "released":
        return expclip_transform(resolution), "released: " + describe_expclip_transform(
            resolution)
    if name == "clip":
        return eval_transform(resolution), (f"clip: CLIP's preprocessing (bicubic resize of the "
                                            f"short side to {resolution}, centre crop, CLIP "
                                            "mean/std normalisation)")
    raise ValueError(f"unknown zero-shot input transform {name!r}; choose from "
                     f"{', '.join(INPUT_TRANSFORMS)}")


class ZeroShotClassifier(nn.Module):
    """Zero-shot FER with Exp-CLIP (or plain CLIP when `head=None`), same prompts either way.

    Text side (once, at construction, no grad): every prompt of every class ->
    `encode_text` -> head -> L2-normalise, cached as a buffer `[P, E]` (class-major order).
    Image side: `[B, 3, H, W]` (or video `[B, T, 3, H, W]`: the *projected* frame features are
    averaged before normalising) -> `encode_image` -> head -> L2-normalise. Logits per prompt
    are `scale * cos` (scale = 100); a class's logit is the mean of its prompts' logits.
    Returns `[B, C]` in the order of `classnames`.

    The head and the cosine run in fp32 even under `torch.autocast` (only the CLIP towers are
    autocast). The cached text features are frozen: build a new classifier after changing
    the head. The head is moved to the CLIP model's device.
    """

    def __init__(self, clip_model, classnames: Sequence[str], prompt_set: PromptSet,
                 head: Optional[ProjectionHead] = None, scale: float = LOGIT_SCALE):
        super().__init__()
        device = clip_model.logit_scale.device
        if head is not None:
            check_head_fits(head, clip_model)
            head = head.to(device)
        self.clip_model, self.head, self.scale = clip_model, head, float(scale)
        self.classnames = list(classnames)
        self.prompts = build_prompts(prompt_set, self.classnames)
        texts = [p for c in self.classnames for p in self.prompts[c]]
        counts = torch.tensor([len(self.prompts[c]) for c in self.classnames])
        owner = torch.repeat_interleave(torch.arange(len(self.classnames)), counts)  # [P]
        # Logit averaging as one matrix: weights[p, c] = 1 / n_c if prompt p belongs to class c.
        weights = F.one_hot(owner, len(self.classnames)).float() / counts[owner, None]  # [P, C]
        self.register_buffer("prompt_weights", weights.to(device), persistent=False)
        self.register_buffer("text_features", self._encode_texts(texts, device), persistent=False)

    @torch.no_grad()
    def _encode_texts(self, texts: List[str], device, batch_size: int = 256) -> torch.Tensor:
        tokens = tokenize(texts, context_length=self.clip_model.context_length)  # [P, L]
        chunks = [self.clip_model.encode_text(tokens[i:i + batch_size].to(device)).float()
                  for i in range(0, len(texts), batch_size)]
        return self._project(torch.cat(chunks))  # [P, E]

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        """CLIP features `[..., D]` -> head (if any), in fp32 -> L2-normalised `[..., E]`."""
        with torch.autocast(features.device.type, enabled=False):
            features = features.float()
            if self.head is not None:
                features = self.head(features)
            return F.normalize(features, dim=-1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` or video `[B, T, 3, H, W]` -> normalised (projected) features `[B, E]`."""
        if images.dim() == 5:
            B, T = images.shape[:2]
            feats = self.clip_model.encode_image(images.flatten(0, 1)).float()  # [B*T, D]
            with torch.autocast(feats.device.type, enabled=False):
                if self.head is not None:
                    feats = self.head(feats)  # [B*T, E]
                feats = feats.view(B, T, -1).mean(dim=1)  # [B, E]: average projected frames
            return F.normalize(feats, dim=-1)
        if images.dim() != 4:
            raise ValueError(f"expected images [B, 3, H, W] or video [B, T, 3, H, W], "
                             f"got shape {tuple(images.shape)}")
        return self._project(self.clip_model.encode_image(images).float())  # [B, E]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image_features = self.encode_images(images)  # [B, E]
        with torch.autocast(image_features.device.type, enabled=False):
            per_prompt = self.scale * image_features @ self.text_features.t()  # [B, P]
            return per_prompt @ self.prompt_weights  # [B, C]: mean logit over each class's prompts
