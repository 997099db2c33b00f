"""MPA-FER losses, one plain function each. Inputs are features, never models.

Notation: C classes, H hard prompts (several per class), B images, D joint width, W token width.
"""
from typing import Dict

import torch
import torch.nn.functional as F


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_cls = CE(logits, y), logits `[B, C]` = s * S(x, c)."""
    return F.cross_entropy(logits.float(), labels)


def token_alignment_loss(soft_pooled: torch.Tensor, hard_pooled: torch.Tensor,
                         hard_labels: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """Token-level soft-hard alignment L_ta.

    P(d) = exp(sim(t_d, t*_d) / tau) / sum_c exp(sim(t_c, t*_d) / tau), L_ta = -log P(d)
    averaged over the hard prompts, each an anchor of its class d. sim is the cosine between
    pooled word-token embeddings: soft `[C, W]`, hard `[H, W]` with labels `[H]`.
    """
    sim = F.normalize(hard_pooled.float(), dim=-1) @ F.normalize(soft_pooled.float(), dim=-1).t()  # [H, C]
    return F.cross_entropy(sim / tau, hard_labels)


def prompt_alignment_loss(text_features: torch.Tensor, hard_features: torch.Tensor,
                          hard_labels: torch.Tensor, distance: str = "l1", tau: float = 0.07) -> torch.Tensor:
    """Prompt-level soft-hard alignment L_pa between theta(t_c) `[C, D]` and theta(t*) `[H, D]`.

    Both are L2-normalised. "l1" (default, our choice): mean absolute difference over the D
    dimensions between each hard prompt's feature and its class's soft-prompt feature, averaged
    over hard prompts. "contrastive": -log softmax over classes of cos(theta(t_c), theta(t*_h)) / tau.
    """
    soft = F.normalize(text_features.float(), dim=-1)
    hard = F.normalize(hard_features.float(), dim=-1)
    if distance == "l1":
        return (soft[hard_labels] - hard).abs().mean()
    if distance == "contrastive":
        return F.cross_entropy(hard @ soft.t() / tau, hard_labels)
    raise ValueError(f"prompt-alignment distance must be 'l1' or 'contrastive', got {distance!r}")


def prototype_alignment_loss(global_features: torch.Tensor, prototypes: torch.Tensor,
                             labels: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """Prototype-guided visual alignment L_v = mean_i M(z_g,i, p_{y_i}).

    z_g `[B, D]` prompted global image features, p `[C, D]` class prototypes (mean normalised
    frozen CLIP features). M = 1 - cos (default) or "l1": mean absolute difference of the
    L2-normalised vectors.
    """
    z = F.normalize(global_features.float(), dim=-1)
    p = F.normalize(prototypes.float(), dim=-1)[labels]  # [B, D]
    if distance == "cosine":
        return (1 - (z * p).sum(-1)).mean()
    if distance == "l1":
        return (z - p).abs().mean()
    raise ValueError(f"visual-alignment distance must be 'cosine' or 'l1', got {distance!r}")


def total_loss(parts: Dict[str, torch.Tensor], beta: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
    """L = L_cls + beta * L_t + gamma * L_v with L_t = L_ta + L_pa."""
    return parts["cls"] + beta * (parts["ta"] + parts["pa"]) + gamma * parts["v"]
