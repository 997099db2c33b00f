"""Cross-modal global-local alignment: class text features attend to an image's patches."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

LEARNABLE_NEEDS_TEMPERATURE = (
    "learnable_alignment=True (--learnable-alignment) needs softmax attention weights: set "
    "attention_temperature (--attention-temperature) to a positive value; with uniform top-k "
    "weights (attention_temperature=None) the query and key projections get no gradient")


class GlobalLocalAlignment(nn.Module):
    """Local score `S_l(x, c) = sum_n a_{c,n} cos(z_l,n, t_c)` by top-k cross-attention.

    Queries are the class text features t_c `[C, D]`, keys and values the patch features z_l
    `[B, N, D]`. Only the k patches most similar to t_c get attention: weights 1/k by default
    (S_l is the mean of the top-k cosines), or a softmax at `temperature`. With `learnable=True`,
    identity-initialised projections give selection and weights by cos(W_k z, W_q t) and the
    score by cos(W_v z, t_c); they need softmax weights, or W_q and W_k get no gradient. fp32 with
    autocast off: under bf16, cosines near 1 are quantised to 1/256 and the top-k order ties.
    """

    def __init__(self, embed_dim: int, top_k: int = 16, temperature: Optional[float] = None,
                 learnable: bool = False):
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if temperature is not None and temperature <= 0:
            raise ValueError("attention_temperature must be > 0 or None (uniform weights), "
                             f"got {temperature}")
        if learnable and temperature is None:
            raise ValueError(LEARNABLE_NEEDS_TEMPERATURE)
        self.top_k, self.temperature = top_k, temperature
        if learnable:  # the identity: training starts from the plain attention
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(embed_dim, embed_dim, bias=False)
                                                     for _ in range(3))
            for layer in (self.q_proj, self.k_proj, self.v_proj):
                nn.init.eye_(layer.weight)
        else:
            self.q_proj = self.k_proj = self.v_proj = None

    def forward(self, patches: torch.Tensor,
                text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """patches `[B, N, D]`, text `[C, D]` (both L2-normalised) -> (S_l `[B, C]`,
        attention `[B, C, N]`)."""
        with torch.autocast(patches.device.type, enabled=False):
            patches, text = patches.float(), text.float()
            k = min(self.top_k, patches.shape[1])
            if self.q_proj is not None:
                keys = F.normalize(self.k_proj(patches), dim=-1)  # [B, N, D]
                queries = F.normalize(self.q_proj(text), dim=-1)  # [C, D]
                values = F.normalize(self.v_proj(patches), dim=-1)  # [B, N, D]
            else:
                keys = values = patches
                queries = text
            similarity = torch.einsum("bnd,cd->bcn", keys, queries)  # [B, C, N]
            top_sim, top_idx = similarity.topk(k, dim=-1)  # [B, C, k]
            if self.temperature is None:
                weights = torch.full_like(top_sim, 1.0 / k)
            else:
                weights = torch.softmax(top_sim / self.temperature, dim=-1)
            attention = torch.zeros_like(similarity).scatter(-1, top_idx, weights)  # [B, C, N]
            value_cos = (similarity if values is keys
                         else torch.einsum("bnd,cd->bcn", values, text))  # [B, C, N]
            return (attention * value_cos).sum(-1), attention
