"""MPA-FER: a frozen CLIP with learnable prompts and global-local alignment."""
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import losses
from .alignment import GlobalLocalAlignment
from .clip.model import CLIP
from .clip.tokenizer import tokenize
from .prompts import (TextPromptLearner, VisualPromptLearner, build_hard_prompts, crop_to_longest,
                      eot_positions, pooled_word_embeddings)


@dataclass
class MPAFERConfig:
    """Every MPA-FER setting. Values marked (choice) are ours where the paper is silent."""
    # Text soft prompts (CoOp).
    n_ctx: int = 10                      # M learnable context tokens
    ctx_init: str = ""                   # initialise from a phrase instead (M = its token count)
    class_specific_ctx: bool = False
    text_prompt_depth: int = 1           # (choice) 1 = input only; L > 1 adds deep text prompts
    # Visual deep prompts (VPT-deep).
    visual_prompt_tokens: int = 8        # N_p
    visual_prompt_depth: int = -1        # -1 = every layer, 0 = no visual prompts
    prompt_init_std: float = 0.02
    # Hard prompts: 1 "a photo of {c}.", 2 "... facial expression of {c}.", 3 "..., {description}".
    hard_prompt_template: int = 3
    # Cross-modal global-local alignment.
    global_local: bool = True
    top_k: int = 16
    local_weight: float = 1.0            # lambda_l
    attention_temperature: Optional[float] = None  # None = uniform top-k weights
    learnable_alignment: bool = False    # identity-initialised q/k/v projections
    # Losses: L = L_cls + beta * (L_ta + L_pa) + gamma * L_v.
    soft_hard_alignment: bool = True     # L_ta + L_pa
    prototype_alignment: bool = True     # L_v
    tau: float = 0.07                    # (choice) temperature of L_ta (and contrastive L_pa)
    pa_distance: str = "l1"              # (choice) "l1" | "contrastive"
    v_distance: str = "cosine"           # "cosine" (1 - cos) | "l1"
    beta: float = 1.0
    gamma: float = 1.0

    @classmethod
    def from_dict(cls, values: Dict) -> "MPAFERConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown MPAFERConfig fields {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> Dict:
        return asdict(self)


@dataclass
class MPAFEROutput:
    logits: torch.Tensor                  # [B, C] = s * (S_g + lambda_l * S_l)
    global_features: torch.Tensor         # [B, D] z_g, L2-normalised
    text_features: torch.Tensor           # [C, D] theta(t_c), L2-normalised
    local_features: Optional[torch.Tensor] = None   # [B, N, D] z_l, L2-normalised
    attention: Optional[torch.Tensor] = None        # [B, C, N] a_{c,n}: which patches drove class c
    soft_pooled: Optional[torch.Tensor] = None      # [C, W] pooled soft-prompt word embeddings


class MPAFER(nn.Module):
    """Frozen CLIP + text soft prompts + deep visual prompts + global-local alignment.

    Only the prompts (and the alignment projections, if enabled) train. Hard-prompt features
    are computed once here; prototypes are set with `set_prototypes` before training with L_v;
    in eval mode the soft-prompt text features are computed once and reused until the model
    trains again.
    """

    def __init__(self, clip_model: CLIP, classnames: Sequence[str],
                 descriptions: Optional[Dict[str, List[str]]] = None, config: Optional[MPAFERConfig] = None):
        super().__init__()
        self.config = config = config or MPAFERConfig()
        self.classnames = list(classnames)
        self.clip = clip_model.requires_grad_(False).eval()
        self.text_prompts = TextPromptLearner(clip_model, classnames, config.n_ctx, config.ctx_init,
                                              config.class_specific_ctx, config.text_prompt_depth,
                                              config.prompt_init_std)
        layers = clip_model.visual.transformer.layers
        depth = layers if config.visual_prompt_depth < 0 else config.visual_prompt_depth
        if depth > layers:
            raise ValueError(f"visual_prompt_depth {depth} exceeds the image tower's {layers} layers")
        self.visual_prompts = (VisualPromptLearner(clip_model.visual.transformer.width,
                                                   config.visual_prompt_tokens, depth, config.prompt_init_std)
                               if depth > 0 and config.visual_prompt_tokens > 0 else None)
        self.alignment = (GlobalLocalAlignment(clip_model.embed_dim, config.top_k, config.attention_temperature,
                                               config.learnable_alignment) if config.global_local else None)
        self.register_buffer("prototypes", None, persistent=False)  # [C, D], see set_prototypes
        if config.soft_hard_alignment:
            self._init_hard_prompts(descriptions)
        self._text_cache = None
        self.to(clip_model.logit_scale.device)  # prompts live where the CLIP does

    @torch.no_grad()
    def _init_hard_prompts(self, descriptions):
        """Frozen hard-prompt features theta(t*) `[H, D]` and pooled word embeddings `[H, W]`."""
        texts, labels = build_hard_prompts(self.classnames, descriptions, self.config.hard_prompt_template)
        device = self.clip.token_embedding.weight.device
        tokens = crop_to_longest(tokenize(texts)).to(device)  # [H, L]
        embeddings = self.clip.token_embedding(tokens)  # [H, L, W]
        eot = eot_positions(tokens)
        self.hard_texts = texts
        self.register_buffer("hard_labels", torch.tensor(labels, device=device), persistent=False)
        self.register_buffer("hard_features", F.normalize(
            self.clip.encode_text_embeddings(embeddings, eot), dim=-1), persistent=False)
        self.register_buffer("hard_pooled", pooled_word_embeddings(embeddings, eot), persistent=False)

    # -- state ------------------------------------------------------------------------------

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # frozen: CLIP has no dropout or batch norm, but keep it honest
        self._text_cache = None
        return self

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state_dict: Dict[str, torch.Tensor]):
        params = {k: p for k, p in self.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(set(params) - set(state_dict)), sorted(set(state_dict) - set(params))
        wrong = [f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(p.shape)}"
                 for k, p in params.items() if k in state_dict and state_dict[k].shape != p.shape]
        if missing or unexpected or wrong:
            raise ValueError("trainable state does not match this MPA-FER configuration: "
                             f"missing {missing}, unexpected {unexpected}, shape mismatches {wrong}")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state_dict[k])
        self._text_cache = None

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def set_prototypes(self, prototypes: torch.Tensor):
        """Class prototypes `[C, D]` for L_v (see `mpafer.compute_prototypes`)."""
        expected = (len(self.classnames), self.clip.embed_dim)
        if tuple(prototypes.shape) != expected:
            raise ValueError(f"prototypes must have shape {expected}, got {tuple(prototypes.shape)}")
        self.prototypes = F.normalize(prototypes.float(), dim=-1).to(self.clip.logit_scale.device)

    # -- forward ----------------------------------------------------------------------------

    def text_features(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Soft-prompt text features `[C, D]` (normalised) and pooled word embeddings `[C, W]`.

        In eval mode without autograd they are computed once and cached.
        """
        cacheable = not self.training and not torch.is_grad_enabled()
        device = self.text_prompts.ctx.device
        if cacheable and self._text_cache is not None and self._text_cache[0].device == device:
            return self._text_cache
        features, pooled = self.text_prompts(self.clip)
        result = (F.normalize(features.float(), dim=-1), pooled)
        if cacheable:
            self._text_cache = result
        return result

    def forward(self, images: torch.Tensor) -> MPAFEROutput:
        text, pooled = self.text_features()
        prompts = self.visual_prompts() if self.visual_prompts is not None else None
        if self.alignment is None:
            z_g, z_l = self.clip.encode_image(images, prompts=prompts), None
        else:
            z_g, z_l = self.clip.encode_image(images, prompts=prompts, return_tokens=True)
            z_l = F.normalize(z_l.float(), dim=-1)  # [B, N, D]
        z_g = F.normalize(z_g.float(), dim=-1)  # [B, D]
        scores = z_g @ text.t()  # [B, C] S_g
        attention = None
        if self.alignment is not None:
            local, attention = self.alignment(z_l, text)
            scores = scores + self.config.local_weight * local
        logits = self.clip.logit_scale.exp() * scores
        return MPAFEROutput(logits, z_g, text, z_l, attention, pooled if self.training else None)

    def loss(self, output: MPAFEROutput, labels: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """-> (total, parts) with parts `cls, ta, pa, v` (zero when switched off), detached."""
        cfg = self.config
        zero = output.logits.new_zeros(())
        parts = {"cls": losses.classification_loss(output.logits, labels), "ta": zero, "pa": zero, "v": zero}
        if cfg.soft_hard_alignment:
            pooled = output.soft_pooled if output.soft_pooled is not None else self.text_features()[1]
            parts["ta"] = losses.token_alignment_loss(pooled, self.hard_pooled, self.hard_labels, cfg.tau)
            parts["pa"] = losses.prompt_alignment_loss(output.text_features, self.hard_features,
                                                       self.hard_labels, cfg.pa_distance, cfg.tau)
        if cfg.prototype_alignment:
            if self.prototypes is None:
                raise RuntimeError("prototype alignment (L_v) needs class prototypes: call "
                                   "model.set_prototypes(mpafer.compute_prototypes(model, loader)) first, "
                                   "or set config.prototype_alignment = False")
            parts["v"] = losses.prototype_alignment_loss(output.global_features, self.prototypes,
                                                         labels, cfg.v_distance)
        total = losses.total_loss(parts, cfg.beta, cfg.gamma)
        return total, {k: v.detach() for k, v in parts.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class indices `argmax_c S(x, c)` `[B]`."""
        return self(images).logits.argmax(dim=-1)
