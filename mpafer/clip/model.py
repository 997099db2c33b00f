"""OpenAI's CLIP (ViT variant), rewritten around `scaled_dot_product_attention`.

Parameter names and shapes are OpenAI's, so a released state dict loads with `strict=True`.
Inside, paths run batch-first; weights stay fp32 (autocast gives mixed precision); prompt hooks
are optional arguments; the MLP activation is an argument (the state dict cannot tell).
"""
from collections import OrderedDict
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .architecture import check_keys_match, check_shapes, check_vit_family

# Per-layer prompt tokens: entry l is added before layer l (None: nothing for that layer).
LayerPrompts = Optional[Sequence[Optional[torch.Tensor]]]


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (as OpenAI's), cast back after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)
        return out.to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# The MLP activations, by the names `load(activation=...)` and the checkpoints use.
ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}
ACTIVATION_NAMES = {"quick_gelu": "QuickGELU", "gelu": "GELU"}


def check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    return activation


class Attention(nn.Module):
    """Self-attention with `nn.MultiheadAttention`'s parameter names, `[B, L, W]` in and out."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, L, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3W]
        qkv = (qkv.view(B, L, 3, self.heads, W // self.heads)
               .permute(2, 0, 3, 1, 4))  # [3, B, H, L, W/H]
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2],
                                             is_causal=causal)  # [B, H, L, W/H]
        out = out.transpose(1, 2).reshape(B, L, W)  # [B, L, W]
        return self.out_proj(out)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool = False,
                 activation: str = "quick_gelu"):
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width)
        act = ACTIVATIONS[check_activation(activation)]()  # no parameters: the keys stay OpenAI's
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, width * 4), gelu=act, c_proj=nn.Linear(width * 4, width)))
        self.ln_2 = LayerNorm(width)
        self.causal = causal  # the text tower's blocks mask future tokens, as OpenAI's attn_mask

    def forward(self, x: torch.Tensor, batch_first: bool = False) -> torch.Tensor:
        """`x` `[L, N, W]` as OpenAI's block, or `[B, L, W]` with `batch_first=True`."""
        if not batch_first:
            x = x.transpose(0, 1)  # [B, L, W]
        x = x + self.attn(self.ln_1(x), self.causal)
        x = x + self.mlp(self.ln_2(x))
        return x if batch_first else x.transpose(0, 1)  # [L, N, W]


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, causal: bool = False,
                 activation: str = "quick_gelu"):
        super().__init__()
        self.width, self.layers, self.causal = width, layers, causal
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, causal, activation)
                                         for _ in range(layers)])
        self.grad_checkpointing = False  # `CLIP.set_grad_checkpointing`

    def forward(self, x: torch.Tensor, *, batch_first: bool = False, appended: LayerPrompts = None,
                replaced: LayerPrompts = None, replace_start: int = 1) -> torch.Tensor:
        """x `[L, N, W]` (OpenAI's layout) or `[B, L, W]` with `batch_first=True`, returned so.
        appended[l] `[P, W]` or `[B, P, W]`: joined after the sequence before layer l and
            dropped after it (VPT-deep).
        replaced[l] `[P, W]` or `[B, P, W]`: overwrites tokens `replace_start : replace_start + P`
            before layer l (deep text prompts).
        """
        if not batch_first:
            x = x.transpose(0, 1)  # [B, L, W]
        B, L, _ = x.shape
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(self.resblocks):
            if replaced is not None and i < len(replaced) and replaced[i] is not None:
                p = _batched(replaced[i], B, x.dtype)
                x = torch.cat([x[:, :replace_start], p, x[:, replace_start + p.shape[1]:]],
                              dim=1)  # [B, L, W]
            append = appended is not None and i < len(appended) and appended[i] is not None
            if append:
                x = torch.cat([x, _batched(appended[i], B, x.dtype)], dim=1)  # [B, L + P, W]
            if checkpointing:
                x = checkpoint(block, x, batch_first=True, use_reentrant=False)
            else:
                x = block(x, batch_first=True)
            if append:
                x = x[:, :L]  # [B, L, W]: the prompt tokens' outputs are dropped
        return x if batch_first else x.transpose(0, 1)  # [L, N, W]


def _batched(p: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    p = p.to(dtype)
    return p.unsqueeze(0).expand(batch, -1, -1) if p.dim() == 2 else p  # [B, P, W]


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int,
                 heads: int, output_dim: int, activation: str = "quick_gelu"):
        super().__init__()
        self.input_resolution, self.patch_size, self.output_dim = (input_resolution, patch_size,
                                                                   output_dim)
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        grid = input_resolution // patch_size
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, activation=activation)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor, prompts: LayerPrompts = None, return_tokens: bool = False):
        """Images `[B, 3, H, W]` -> global feature `[B, D]` (with `return_tokens`, also patch
        features `[B, N, D]`); prompts: per-layer visual prompt tokens (`Transformer.appended`)."""
        x = self.conv1(x)  # [B, W, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, N, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, W]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, 1 + N, W]
        x = self.ln_pre(x)
        x = self.transformer(x, batch_first=True, appended=prompts)
        global_feature = self.ln_post(x[:, 0]) @ self.proj  # [B, D]
        if not return_tokens:
            return global_feature
        # Separate from the CLS token so the global feature is bit-identical to the plain path.
        return global_feature, self.ln_post(x[:, 1:]) @ self.proj  # [B, D], [B, N, D]


class CLIP(nn.Module):
    """OpenAI's CLIP (ViT), plus `vision_heads` (None: `vision_width // 64`) and `activation`
    ("quick_gelu", OpenAI's, or "gelu", as open_clip's models without `-quickgelu`)."""

    def __init__(self, embed_dim: int, image_resolution: int, vision_layers: int, vision_width: int,
                 vision_patch_size: int, context_length: int, vocab_size: int,
                 transformer_width: int, transformer_heads: int, transformer_layers: int,
                 vision_heads: Optional[int] = None, activation: str = "quick_gelu"):
        super().__init__()
        self.context_length = context_length
        check_activation(activation)
        self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width,
                                        vision_layers, vision_heads or vision_width // 64 or 1,
                                        embed_dim, activation)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads,
                                       causal=True, activation=activation)
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(2.6592600))  # log(1 / 0.07)
        # Set by `load`: trained prompts and heads record them to refuse another backbone.
        self.checkpoint_name: Optional[str] = None
        self.checkpoint_sha256: Optional[str] = None
        self.activation = activation
        self.initialize_parameters()

    def initialize_parameters(self):
        """OpenAI's initialisation (used only for randomly initialised models)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        t = self.transformer
        proj_std = (t.width ** -0.5) * ((2 * t.layers) ** -0.5)
        attn_std, fc_std = t.width ** -0.5, (2 * t.width) ** -0.5
        for block in t.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        for block in self.visual.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=self.visual.transformer.width ** -0.5)
        nn.init.normal_(self.text_projection, std=t.width ** -0.5)

    def set_grad_checkpointing(self, enabled: bool = True):
        """Recompute each block in the backward pass: less memory, the same gradients."""
        self.visual.transformer.grad_checkpointing = enabled
        self.transformer.grad_checkpointing = enabled
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def embed_dim(self) -> int:
        return self.text_projection.shape[1]

    def encode_image(self, image: torch.Tensor, prompts: LayerPrompts = None,
                     return_tokens: bool = False):
        return self.visual(image.to(self.dtype), prompts=prompts, return_tokens=return_tokens)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Token ids `[B, context_length]` -> text features `[B, D]` (read at the EOT token)."""
        x = self.token_embedding(text)  # [B, L, W]
        # The EOT token has the largest id in the vocabulary, so argmax finds its position.
        return self.encode_text_embeddings(x, text.argmax(dim=-1))

    def encode_text_embeddings(self, x: torch.Tensor, eot_positions: torch.Tensor,
                               deep_prompts: LayerPrompts = None, prompt_start: int = 1):
        """Token *embeddings* `[B, L, W]` (e.g. with soft prompts) -> text features `[B, D]`,
        read at `eot_positions` `[B]`; deep_prompts: `Transformer.replaced`, from `prompt_start`."""
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)  # [B, L, W]
        x = self.transformer(x, batch_first=True, replaced=deep_prompts, replace_start=prompt_start)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_positions]  # [B, W]
        return x @ self.text_projection  # [B, D]

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


# Named architectures, `CLIP(**SHAPES[name])`: OpenAI's ViT-B/16 and ViT-L/14, and a tiny one.
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


def clip_identity(x) -> Tuple[Optional[str], Optional[str]]:
    """(SHA-256, activation) of a CLIP model, a record `{"sha256", "activation"}` (no
    activation: QuickGELU) or a SHA-256 string (activation None: not stated)."""
    if isinstance(x, CLIP):
        return x.checkpoint_sha256, x.activation
    if isinstance(x, dict):
        return x.get("sha256"), x.get("activation") or "quick_gelu"
    return x, None


def same_clip(a, b) -> Optional[bool]:
    """Same checkpoint and activation? None when a SHA-256 is unknown: tests `is False` let an
    unknown identity through."""
    (sha_a, act_a), (sha_b, act_b) = clip_identity(a), clip_identity(b)
    if not sha_a or not sha_b:
        return None
    if sha_a.lower() != sha_b.lower():
        return False
    return act_a is None or act_b is None or act_a == act_b


def check_same_clip(trained: dict, clip_model: "CLIP", source: str, hint: str):
    """A clear error when `clip_model` is not the CLIP `source` was `trained` on."""
    if same_clip(trained, clip_model) is False:
        def describe(name: Optional[str], sha256: str, activation: Optional[str]) -> str:
            act = f", {ACTIVATION_NAMES.get(activation, activation)}" if activation else ""
            return f"{name or '?'} (SHA-256 {sha256[:12]}...{act})"
        was = describe(trained.get("name"), trained["sha256"], clip_identity(trained)[1])
        loaded = describe(clip_model.checkpoint_name, clip_model.checkpoint_sha256,
                          clip_model.activation)
        raise ValueError(f"{source} was trained on CLIP {was}, but the loaded CLIP is {loaded}; "
                         f"{hint}")


# Keys some checkpoints carry beside the parameters (TorchScript attributes, not weights).
NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")
# Image towers whose heads are not 64 wide, by width: open_clip's ViT-H has 16 heads of 80.
VISION_HEADS = {1280: 16}


def model_config(state_dict: dict) -> dict:
    """`CLIP`'s arguments read off an OpenAI-format state dict (others refused in one line)."""
    check_vit_family(state_dict)

    def count_layers(prefix: str) -> int:
        return sum(1 for k in state_dict
                   if k.startswith(prefix) and k.endswith(".attn.in_proj_weight"))

    vision_width, _, patch, _ = state_dict["visual.conv1.weight"].shape
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    transformer_width = state_dict["ln_final.weight"].shape[0]
    check_shapes(state_dict, vision_width, transformer_width)
    config = dict(
        embed_dim=state_dict["text_projection"].shape[1],
        image_resolution=patch * grid,
        vision_layers=count_layers("visual.transformer.resblocks."),
        vision_width=vision_width,
        vision_patch_size=patch,
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        transformer_width=transformer_width,
        transformer_heads=max(transformer_width // 64, 1),
        transformer_layers=count_layers("transformer.resblocks."),
    )
    if vision_width in VISION_HEADS:
        config["vision_heads"] = VISION_HEADS[vision_width]
    return config


def build_model(state_dict: dict, activation: str = "quick_gelu") -> CLIP:
    """A frozen fp32 CLIP in eval mode, architecture inferred, weights loaded strictly."""
    state_dict = {k: v for k, v in state_dict.items()
                  if k not in NON_PARAMETER_KEYS and not k.endswith("attn_mask")}
    if "logit_scale" in state_dict and state_dict["logit_scale"].numel() == 1:
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(())  # some store it [1]
    model = CLIP(**model_config(state_dict), activation=activation)
    check_keys_match(model.state_dict(), state_dict)
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    model.requires_grad_(False)
    return model.eval()
