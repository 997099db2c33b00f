"""A reference CLIP on `nn.MultiheadAttention`, laid out as OpenAI's original `model.py`.

Sequence-first activations `[L, B, W]`, an explicit causal mask tensor, QuickGELU, no prompt hooks.
It loads the same state dicts as `mpafer.clip.CLIP` and is the baseline of
`python -m mpafer.bench clip` (same weights, speed compared). The tests check outputs against
their own reference, which shares no code with the package.
"""
from collections import OrderedDict

import torch
from torch import nn

from ...clip.model import LayerNorm, QuickGELU, model_config


class ReferenceBlock(nn.Module):
    def __init__(self, width: int, heads: int, attn_mask: torch.Tensor = None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, width * 4), gelu=QuickGELU(), c_proj=nn.Linear(width * 4, width)))
        self.ln_2 = LayerNorm(width)
        self.attn_mask = attn_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [L, B, W]
        mask = None if self.attn_mask is None else self.attn_mask.to(x.dtype)
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class ReferenceTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, attn_mask: torch.Tensor = None):
        super().__init__()
        self.resblocks = nn.Sequential(*[ReferenceBlock(width, heads, attn_mask)
                                         for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class ReferenceVision(nn.Module):
    def __init__(self, resolution: int, patch: int, width: int, layers: int, heads: int,
                 out_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros((resolution // patch) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = ReferenceTransformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).permute(0, 2, 1)  # [B, N, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, W]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, 1 + N, W]
        x = self.ln_pre(x).permute(1, 0, 2)  # [1 + N, B, W]
        x = self.transformer(x).permute(1, 0, 2)  # [B, 1 + N, W]
        return self.ln_post(x[:, 0]) @ self.proj  # [B, D]


class ReferenceCLIP(nn.Module):
    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
                 context_length, vocab_size, transformer_width, transformer_heads,
                 transformer_layers, vision_heads=None):
        super().__init__()
        self.visual = ReferenceVision(image_resolution, vision_patch_size, vision_width,
                                      vision_layers, vision_heads or max(vision_width // 64, 1),
                                      embed_dim)
        causal = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.transformer = ReferenceTransformer(transformer_width, transformer_layers,
                                                transformer_heads, causal)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.zeros(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.zeros([]))

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(text) + self.positional_embedding  # [B, L, W]
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # [B, L, W]
        x = self.ln_final(x)
        return (x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]
                @ self.text_projection)  # [B, D]


def build_reference_model(state_dict: dict) -> ReferenceCLIP:
    model = ReferenceCLIP(**model_config(state_dict))
    model.load_state_dict(state_dict, strict=True)
    return model.requires_grad_(False).eval()
