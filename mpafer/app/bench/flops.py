"""FLOPs of an MPA-FER training step, counted analytically from the CLIP shape and the prompt
configuration: the numerator of `step_mfu` in `python -m mpafer.bench gpu`.

What is counted. Matrix products only, at 2 FLOPs per multiply-add: the patch embedding's
convolution, every linear layer of both towers, attention's two products (scores Q K^T and the
weighted sum of V), the output projections, and the few small products of the scores and
losses. Element-wise work (LayerNorm, GELU, softmax, residual adds, normalisation) is left out:
it is memory-bound and a few per cent of the work at these widths. Causal attention in the text
tower is counted in full, as `torch.utils.flop_counter` counts it.

Sequence lengths are the ones the model runs: 1 + (resolution / patch)^2 image tokens, plus the
N_p visual prompt tokens in each of the layers that have them (8 in every layer by default); the
C class prompts of the text tower cropped to the longest (`TextPromptLearner`): about 20 tokens,
not 77. The text tower runs once per step whatever the batch.

The training convention. A step is its forward pass and the backward pass autograd needs to
reach the prompts. CLIP is frozen, so no weight gradient is ever computed:
- a product with a frozen operand (a weight, a buffer) has one backward product, the gradient
  of its other operand: backward = 1 x forward (not the 2 x of training the weight too);
- a product of two activations that both need gradients (attention's scores and weighted sum,
  the image-text scores) has two: backward = 2 x forward;
- the patch embedding (frozen weights, images need no gradient) has no backward at all.
So a step costs about 2 x its forward pass, not the 3 x of full training. Recomputation
(activation checkpointing's second forward, FlashAttention's backward recomputing the scores)
is not counted: the ratio to the hardware peak is model-FLOPs utilisation (MFU), not hardware
utilisation. `tests/test_flops.py` checks these counts against `torch.utils.flop_counter` on a
tiny model, forward and backward.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from ...clip.tokenizer import get_tokenizer
from ...model import MPAFERConfig
from ...prompts import build_hard_prompts, soft_prompt_tokens


@dataclass(frozen=True)
class Macs:
    """Multiply-adds of a pass, by how many of each product's operands need a gradient."""
    frozen_operand: int = 0  # one operand is a frozen weight or buffer: one backward product
    both_operands: int = 0  # both are activations that need gradients: two backward products
    no_gradient: int = 0  # neither needs a gradient (the patch embedding): no backward

    def __add__(self, other: "Macs") -> "Macs":
        return Macs(self.frozen_operand + other.frozen_operand,
                    self.both_operands + other.both_operands, self.no_gradient + other.no_gradient)

    @property
    def forward_flops(self) -> int:
        return 2 * (self.frozen_operand + self.both_operands + self.no_gradient)

    @property
    def backward_flops(self) -> int:
        return 2 * (self.frozen_operand + 2 * self.both_operands)


def transformer_macs(sequences: int, length: int, width: int) -> Macs:
    """One pre-LN transformer block (CLIP's) on `sequences` sequences of `length` tokens:
    q, k, v and output projections 4 L W^2, MLP with a 4 W hidden layer 8 L W^2, attention
    scores and weighted sum 2 L^2 W (over all heads together)."""
    return Macs(frozen_operand=sequences * 12 * length * width ** 2,
                both_operands=sequences * 2 * length ** 2 * width)


def image_tower_macs(shape: Dict, batch: int, prompt_tokens: int = 8,
                     prompt_depth: Optional[int] = None, return_tokens: bool = True) -> Macs:
    """The prompted image tower on `batch` images: patch embedding, the blocks (the first
    `prompt_depth` ones, default all, with `prompt_tokens` more tokens), and the projection of
    the CLS token (and, with `return_tokens`, of every patch token, for the local score)."""
    width, layers = shape["vision_width"], shape["vision_layers"]
    patch, embed = shape["vision_patch_size"], shape["embed_dim"]
    patches = (shape["image_resolution"] // patch) ** 2
    depth = layers if prompt_depth is None else prompt_depth
    total = Macs(no_gradient=batch * patches * width * 3 * patch ** 2)
    for layer in range(layers):
        length = 1 + patches + (prompt_tokens if layer < depth else 0)
        total += transformer_macs(batch, length, width)
    projected = 1 + patches if return_tokens else 1
    return total + Macs(frozen_operand=batch * projected * width * embed)


def text_tower_macs(shape: Dict, prompts: int, length: int) -> Macs:
    """The text tower on `prompts` prompts of `length` tokens, and the projection of each
    prompt's EOT token."""
    width = shape["transformer_width"]
    total = Macs()
    for _ in range(shape["transformer_layers"]):
        total += transformer_macs(prompts, length, width)
    return total + Macs(frozen_operand=prompts * width * shape["embed_dim"])


def head_macs(shape: Dict, batch: int, classes: int, hard_prompts: int = 0,
              global_local: bool = True) -> Macs:
    """The products after the towers: global scores z_g t^T, the local score's patch-class
    similarities, and L_ta's hard-soft similarities of pooled word embeddings (the hard
    prompts are a buffer: only the soft side gets a gradient)."""
    embed, patches = shape["embed_dim"], (shape["image_resolution"]
                                          // shape["vision_patch_size"]) ** 2
    scores = batch * classes * embed * (1 + (patches if global_local else 0))
    return Macs(both_operands=scores,
                frozen_operand=hard_prompts * classes * shape["transformer_width"])


def step_flops(shape: Dict, batch: int, classes: int, text_length: int, hard_prompts: int = 0,
               prompt_tokens: int = 8, prompt_depth: Optional[int] = None,
               global_local: bool = True) -> Dict[str, float]:
    """FLOPs of one training step on `batch` images with `classes` class prompts of
    `text_length` tokens -> forward, backward, the step (their sum) and the step per image.

    hard_prompts: the number of hard prompts compared in L_ta (0 without soft-hard alignment).
    """
    macs = (image_tower_macs(shape, batch, prompt_tokens, prompt_depth, global_local)
            + text_tower_macs(shape, classes, text_length)
            + head_macs(shape, batch, classes, hard_prompts, global_local))
    forward, backward = macs.forward_flops, macs.backward_flops
    return {"forward": forward, "backward": backward, "step": forward + backward,
            "step_per_image": (forward + backward) / batch}


def mpafer_step_flops(shape: Dict, batch: int, classnames: Sequence[str],
                      descriptions: Optional[Dict[str, List[str]]] = None,
                      config: Optional[MPAFERConfig] = None) -> Dict[str, float]:
    """`step_flops` of MPA-FER as `MPAFER(CLIP(**shape), classnames, descriptions, config)` builds
    it (nothing is built): its prompt tokens and depth, its cropped soft prompts, its hard
    prompts. The default configuration and its switches are covered; learnable alignment
    projections and the contrastive L_pa are not (a ValueError)."""
    cfg = config or MPAFERConfig()
    if cfg.learnable_alignment or (cfg.soft_hard_alignment and cfg.pa_distance == "contrastive"):
        raise ValueError("mpafer_step_flops counts the default products only: not "
                         "--learnable-alignment or --pa-distance contrastive")
    layers = shape["vision_layers"]
    depth = layers if cfg.visual_prompt_depth < 0 else cfg.visual_prompt_depth
    tokens = cfg.visual_prompt_tokens if depth > 0 else 0
    n_ctx = len(get_tokenizer().encode(cfg.ctx_init)) if cfg.ctx_init else cfg.n_ctx
    text_length = soft_prompt_tokens(classnames, n_ctx).shape[1]
    hard = (len(build_hard_prompts(classnames, descriptions, cfg.hard_prompt_template)[0])
            if cfg.soft_hard_alignment else 0)
    return step_flops(shape, batch, len(classnames), text_length, hard, tokens,
                      depth if tokens else 0, cfg.global_local)
