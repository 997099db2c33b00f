"""MPA-FER losses, one plain function each. Inputs are features, never models.

Notation: C classes, H hard prompts (several per class), B images, D joint width, W token width.
Every loss computes in fp32 with autocast switched off, whatever precision the towers ran in.
"""
from typing import Dict, Iterable

import torch
import torch.nn.functional as F

PA_DISTANCES = ("l1-mean", "l1-sum", "contrastive")
V_DISTANCES = ("cosine", "l1-mean", "l1-sum")


def fp32(tensor: torch.Tensor):
    """A context with autocast off on `tensor`'s device: matmuls stay fp32 inside autocast."""
    return torch.autocast(tensor.device.type, enabled=False)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_cls = CE(logits, y), logits `[B, C]` = s * S(x, c)."""
    with fp32(logits):
        return F.cross_entropy(logits.float(), labels)


def token_alignment_loss(soft_pooled: torch.Tensor, hard_pooled: torch.Tensor,
                         hard_labels: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """Token-level soft-hard alignment L_ta.

    P(d) = exp(sim(t_d, t*_d) / tau) / sum_c exp(sim(t_c, t*_d) / tau), L_ta = -log P(d)
    averaged over the hard prompts, each an anchor of its class d. sim is the cosine between
    pooled word-token embeddings: soft `[C, W]`, hard `[H, W]` with labels `[H]`.
    """
    with fp32(soft_pooled):
        soft = F.normalize(soft_pooled.float(), dim=-1)
        hard = F.normalize(hard_pooled.float(), dim=-1)
        return F.cross_entropy(hard @ soft.t() / tau, hard_labels)  # [H, C] logits


def prompt_alignment_loss(text_features: torch.Tensor, hard_features: torch.Tensor,
                          hard_labels: torch.Tensor, distance: str = "l1-mean",
                          tau: float = 0.07) -> torch.Tensor:
    """Prompt-level soft-hard alignment L_pa between theta(t_c) `[C, D]` and theta(t*) `[H, D]`.

    Both are L2-normalised; each hard prompt h is compared with its class's soft prompt and the
    result is averaged over the hard prompts.
    - "l1-mean" (default): the mean over D of |theta(t_c) - theta(t*_c)|, an L1 loss as in
      `F.l1_loss` and PromptSRC (the code MPA-FER builds on).
    - "l1-sum": the L1 norm ||theta(t_c) - theta(t*_c)||_1, the literal notation (D times
      "l1-mean"; its sign gradient does not shrink as the distance falls).
    - "contrastive": -log softmax over classes of cos(theta(t_c), theta(t*_h)) / tau.
    """
    _check(distance, PA_DISTANCES, "pa_distance")
    with fp32(text_features):
        soft = F.normalize(text_features.float(), dim=-1)
        hard = F.normalize(hard_features.float(), dim=-1)
        if distance == "contrastive":
            return F.cross_entropy(hard @ soft.t() / tau, hard_labels)  # [H, C] logits
        return _l1(soft[hard_labels], hard, distance)


def prototype_alignment_loss(global_features: torch.Tensor, prototypes: torch.Tensor,
                             labels: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """Prototype-guided visual alignment L_v = mean_i M(z_g,i, p_{y_i}).

    z_g `[B, D]` prompted global image features, p `[C, D]` class prototypes (mean normalised
    frozen CLIP features), both L2-normalised. M is "cosine" (default, 1 - cos), "l1-mean" (the
    mean over D of |z - p|, an L1 loss) or "l1-sum" (the L1 norm ||z - p||_1, D x "l1-mean").
    """
    _check(distance, V_DISTANCES, "v_distance")
    with fp32(global_features):
        z = F.normalize(global_features.float(), dim=-1)
        p = F.normalize(prototypes.float(), dim=-1)[labels]  # [B, D]
        if distance == "cosine":
            return (1 - (z * p).sum(-1)).mean()
        return _l1(z, p, distance)


def _l1(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    """Row-wise L1 distance of `[R, D]` pairs ("l1-mean" or "l1-sum" over D), mean over rows."""
    per_row = (a - b).abs().sum(-1) if distance == "l1-sum" else (a - b).abs().mean(-1)  # [R]
    return per_row.mean()


def _check(distance: str, allowed, name: str):
    if distance not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {distance!r}")


def gradient_norms(terms: Dict[str, torch.Tensor], params: Iterable[torch.Tensor],
                   scale: float = 1.0) -> Dict[str, float]:
    """L2 norm of each undetached scalar term's gradient w.r.t. `params`, one backward each
    (graph kept; 0 for a term without `params`). Under fp16 pass the GradScaler's scale, so small
    gradients do not underflow; the norms are divided by it again."""
    params = list(params)
    norms = {}
    for name, term in terms.items():
        if not term.requires_grad:
            norms[name] = 0.0
            continue
        grads = torch.autograd.grad(term * scale, params, retain_graph=True, allow_unused=True)
        squares = [g.float().pow(2).sum() for g in grads if g is not None]
        norms[name] = torch.stack(squares).sum().sqrt().item() / scale if squares else 0.0
    return norms
