"""FLOPs of an MPA-FER training step, counted analytically: the numerator of `step_mfu`.

Matrix products only, 2 FLOPs a multiply-add (element-wise work is memory-bound and small), over
the sequence lengths the model runs: image tokens plus visual prompt tokens in the layers that
have them, class prompts cropped to the longest, the text tower once a step. Causal attention
counts in full, as `torch.utils.flop_counter` counts it (tests/test_flops.py compares the two).
A step is its forward pass and the backward pass needed to reach the prompts. CLIP is frozen,
so a product with a frozen operand has one backward product, one of two activations that need
gradients (attention, image-text scores) two, the patch embedding none. Recomputation is not
counted: the ratio to the hardware peak is model-FLOPs utilisation.
"""
from typing import Dict, List, Optional, Sequence

from ...clip.tokenizer import get_tokenizer
from ...model import MPAFERConfig
from ...prompts import build_hard_prompts, soft_prompt_tokens


def step_flops(shape: Dict, batch: int, classes: int, text_length: int, hard_prompts: int = 0,
               prompt_tokens: int = 8, prompt_depth: Optional[int] = None,
               global_local: bool = True) -> Dict[str, float]:
    """FLOPs of one training step on `batch` images, with `classes` class prompts of
    `text_length` tokens, `hard_prompts` hard prompts compared in L_ta (0 without soft-hard
    alignment) and `prompt_tokens` visual prompt tokens in the first `prompt_depth` image layers
    (default all) -> forward, backward, the step (their sum) and the step per image."""
    width, text_width, embed = shape["vision_width"], shape["transformer_width"], shape["embed_dim"]
    patch = shape["vision_patch_size"]
    patches = (shape["image_resolution"] // patch) ** 2
    depth = shape["vision_layers"] if prompt_depth is None else prompt_depth
    # Multiply-adds by operands: one frozen; both needing gradients; neither (the patch embedding).
    no_gradient = batch * patches * width * 3 * patch ** 2
    # Projections: the CLS token (and every patch token, for the local score), each EOT token,
    # and L_ta's pooled hard prompts (a buffer) against the soft ones.
    frozen = (batch * (1 + patches if global_local else 1) * width * embed
              + classes * text_width * embed + hard_prompts * classes * text_width)
    both = batch * classes * embed * (1 + (patches if global_local else 0))  # image-text scores
    blocks = [(batch, 1 + patches + (prompt_tokens if layer < depth else 0), width)
              for layer in range(shape["vision_layers"])]
    blocks += [(classes, text_length, text_width)] * shape["transformer_layers"]
    for sequences, length, w in blocks:  # CLIP's pre-LN block
        frozen += sequences * 12 * length * w ** 2  # q, k, v, out: 4 L W^2; MLP (4 W): 8 L W^2
        both += sequences * 2 * length ** 2 * w  # attention scores and weighted sum
    forward, backward = 2 * (frozen + both + no_gradient), 2 * (frozen + 2 * both)
    return {"forward": forward, "backward": backward, "step": forward + backward,
            "step_per_image": (forward + backward) / batch}


def mpafer_step_flops(shape: Dict, batch: int, classnames: Sequence[str],
                      descriptions: Optional[Dict[str, List[str]]] = None,
                      config: Optional[MPAFERConfig] = None) -> Dict[str, float]:
    """`step_flops` of MPA-FER as `MPAFER(CLIP(**shape), classnames, descriptions, config)` builds
    it (nothing is built). Learnable alignment projections and the contrastive L_pa are not
    counted (a ValueError)."""
    cfg = config or MPAFERConfig()
    if cfg.learnable_alignment or (cfg.soft_hard_alignment and cfg.pa_distance == "contrastive"):
        raise ValueError("mpafer_step_flops counts the default products only: not "
                         "--learnable-alignment or --pa-distance contrastive")
    depth = shape["vision_layers"] if cfg.visual_prompt_depth < 0 else cfg.visual_prompt_depth
    tokens = cfg.visual_prompt_tokens if depth > 0 else 0
    n_ctx = len(get_tokenizer().encode(cfg.ctx_init)) if cfg.ctx_init else cfg.n_ctx
    text_length = soft_prompt_tokens(classnames, n_ctx).shape[1]
    hard = (len(build_hard_prompts(classnames, descriptions, cfg.hard_prompt_template)[0])
            if cfg.soft_hard_alignment else 0)
    return step_flops(shape, batch, len(classnames), text_length, hard, tokens,
                      depth if tokens else 0, cfg.global_local)
