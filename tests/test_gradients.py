"""No MPA-FER component is inert: every term and every trainable tensor gets a gradient."""
import itertools

import pytest
import torch

from mpafer.clip.model import CLIP, SHAPES
from mpafer.model import MPAFER, MPAFERConfig
from mpafer.prompts import load_descriptions
from tests.helpers import tiny_clip

CLASSES = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear"]


@pytest.fixture(scope="module")
def descriptions():
    return load_descriptions(CLASSES)


@pytest.fixture(scope="module")
def shared_tiny_clip():
    return tiny_clip()  # frozen by MPAFER; shared by the models below, which only add prompts


ALIGNMENT = {"off": dict(global_local=False), "uniform": dict(),
             "learnable": dict(learnable_alignment=True, attention_temperature=0.1)}
# visual prompts, L_v, L_ta + L_pa, global-local variant, class-specific context, text depth.
COMBINATIONS = list(itertools.product([-1, 0], [True, False], [True, False], list(ALIGNMENT),
                                      [False, True], [1, 2]))


@pytest.mark.parametrize("combination", COMBINATIONS, ids=str)
def test_every_trainable_tensor_gets_a_gradient_in_every_combination(descriptions, shared_tiny_clip, combination):
    visual_depth, prototypes, soft_hard, alignment, class_specific, text_depth = combination
    config = MPAFERConfig(visual_prompt_depth=visual_depth, prototype_alignment=prototypes,
                          soft_hard_alignment=soft_hard, class_specific_ctx=class_specific,
                          text_prompt_depth=text_depth, top_k=8, **ALIGNMENT[alignment])
    torch.manual_seed(0)
    model = MPAFER(shared_tiny_clip, CLASSES, descriptions if soft_hard else None, config).train()
    if prototypes:
        model.set_prototypes(torch.randn(len(CLASSES), shared_tiny_clip.embed_dim))
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 6])
    total, _ = model.loss(model(images), labels)
    total.backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert ("visual_prompts.prompts" in trainable) == (visual_depth != 0)
    assert ("alignment.q_proj.weight" in trainable) == (alignment == "learnable")
    for name, p in trainable.items():
        # Every slice along the first axis: each context token (or class context), each prompted
        # layer, each projection row.
        per_slice = p.grad.flatten(1).abs().sum(1) if p.dim() > 1 else p.grad.abs()
        assert bool((per_slice > 0).all()), f"{name}: no gradient in slices {(per_slice == 0).nonzero().flatten().tolist()}"


def test_every_loss_term_moves_the_prompts_of_a_vit_b16_shaped_model(descriptions):
    """Each weighted term (cls, beta L_ta, beta L_pa, gamma L_v) has a non-zero gradient at
    initialisation on a full-size (random-weight) model, and the total still backpropagates."""
    torch.manual_seed(0)
    clip_model = CLIP(**SHAPES["ViT-B/16"])
    model = MPAFER(clip_model, CLASSES, descriptions).train()
    model.set_prototypes(torch.randn(len(CLASSES), clip_model.embed_dim))
    images, labels = torch.randn(2, 3, 224, 224), torch.tensor([1, 4])
    norms = model.term_gradient_norms(images, labels)
    assert set(norms) == {"cls", "ta", "pa", "v"}
    assert all(value > 1e-4 for value in norms.values()), norms
    assert all(p.grad is None for p in model.parameters())
    # The default L_pa regularises: it moves the prompts, but less than L_cls does.
    assert 0.01 <= norms["pa"] / norms["cls"] <= 1, norms


def test_term_norms_match_ablated_backward_passes(descriptions, shared_tiny_clip):
    def build(**cfg):
        torch.manual_seed(0)
        model = MPAFER(shared_tiny_clip, CLASSES, descriptions, MPAFERConfig(**cfg)).train()
        model.set_prototypes(torch.randn(len(CLASSES), shared_tiny_clip.embed_dim))
        return model

    def total_grad_norm(model):
        total, _ = model.loss(model(images), labels)
        grads = torch.autograd.grad(total, [p for p in model.parameters() if p.requires_grad])
        return torch.cat([g.flatten() for g in grads]).norm().item()

    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 6])
    norms = build(beta=0.5, gamma=2.0).term_gradient_norms(images, labels)
    # cls alone is the total with the other terms switched off; L_v alone is gamma * L_v's gradient.
    cls_only = build(soft_hard_alignment=False, prototype_alignment=False)
    assert norms["cls"] == pytest.approx(total_grad_norm(cls_only), rel=1e-5)
    v_only = build(soft_hard_alignment=False, gamma=2.0).term_gradient_norms(images, labels)
    assert v_only["v"] == pytest.approx(norms["v"], rel=1e-5) and v_only["ta"] == v_only["pa"] == 0.0
    # The summed L1 norm (the literal notation) moves the prompts D times as much as the
    # default mean over the D dimensions.
    summed = build(beta=0.5, gamma=2.0, pa_distance="l1-sum").term_gradient_norms(images, labels)
    assert summed["pa"] == pytest.approx(norms["pa"] * shared_tiny_clip.embed_dim, rel=1e-4)
    assert summed["ta"] == pytest.approx(norms["ta"], rel=1e-5)
    half = build(beta=1.0, gamma=2.0).term_gradient_norms(images, labels)
    assert half["ta"] == pytest.approx(2 * norms["ta"], rel=1e-5)
