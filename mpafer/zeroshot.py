"""Zero-shot classification with a frozen CLIP, which MPA-FER's baseline and Exp-CLIP share."""
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .clip.tokenizer import tokenize


class ZeroShotClassifier(nn.Module):
    """`prompts` {class: [prompt, ...]} -> logits `[B, C]` in `classnames` order, `scale * cos`
    averaged over each class's prompts. With `head` (e.g. Exp-CLIP's), both sides are projected
    before the cosine, in fp32 even under autocast. The text side is computed once, here."""

    def __init__(self, clip_model, classnames: Sequence[str], prompts: Dict[str, List[str]],
                 head: Optional[nn.Module] = None, scale: float = 100.0):
        super().__init__()
        device = clip_model.logit_scale.device
        self.clip_model, self.scale = clip_model, float(scale)
        self.head = head.to(device) if head is not None else None
        self.classnames = list(classnames)
        missing = [c for c in self.classnames if not prompts.get(c)]
        if missing:
            raise ValueError(f"no prompts for classes {missing}")
        self.prompts = {c: list(prompts[c]) for c in self.classnames}
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

    def _project(self, features: torch.Tensor, frames: int = 0) -> torch.Tensor:
        """CLIP features `[..., D]` -> head (if any), in fp32 -> L2-normalised `[..., E]`; with
        `frames`, rows `[B*T, D]` are video frames, averaged after the head -> `[B, E]`."""
        with torch.autocast(features.device.type, enabled=False):
            features = features.float()
            if self.head is not None:
                features = self.head(features)
            if frames:
                features = features.view(-1, frames, features.shape[-1]).mean(dim=1)  # [B, E]
            return F.normalize(features, dim=-1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` or video `[B, T, 3, H, W]` -> normalised (projected) features `[B, E]`."""
        if images.dim() not in (4, 5):
            raise ValueError(f"expected images [B, 3, H, W] or video [B, T, 3, H, W], "
                             f"got shape {tuple(images.shape)}")
        frames = images.shape[1] if images.dim() == 5 else 0
        features = self.clip_model.encode_image(images.flatten(0, 1) if frames else images)
        return self._project(features.float(), frames)  # [B, E]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image_features = self.encode_images(images)  # [B, E]
        with torch.autocast(image_features.device.type, enabled=False):
            per_prompt = self.scale * image_features @ self.text_features.t()  # [B, P]
            return per_prompt @ self.prompt_weights  # [B, C]: mean logit over each class's prompts
