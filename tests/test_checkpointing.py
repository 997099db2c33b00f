"""Activation checkpointing in the CLIP towers: same outputs, same prompt gradients."""
import pytest
import torch

from mpafer.clip import model as clip_model_module
from mpafer.labels import BASIC_CLASSES
from mpafer.model import MPAFER, MPAFERConfig
from mpafer.prompts import load_descriptions
from tests.helpers import tiny_clip

CLASSES = list(BASIC_CLASSES)


@pytest.fixture
def counted_checkpoint(monkeypatch):
    """Count the blocks run through `torch.utils.checkpoint.checkpoint`."""
    calls = []
    original = clip_model_module.checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return original(*args, **kwargs)

    monkeypatch.setattr(clip_model_module, "checkpoint", counting)
    return calls


def step(model, images, labels):
    """Outputs and trainable gradients of one training forward/backward."""
    model.zero_grad(set_to_none=True)
    output = model(images)
    total, _ = model.loss(output, labels)
    total.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return output, total.detach(), grads


def test_checkpointing_gives_identical_outputs_and_prompt_gradients(counted_checkpoint):
    # Deep text prompts (the "replaced" path) and deep visual prompts (the "appended" path).
    torch.manual_seed(0)
    model = MPAFER(tiny_clip(), CLASSES, load_descriptions(CLASSES),
                   MPAFERConfig(text_prompt_depth=2)).train()
    model.set_prototypes(torch.randn(len(CLASSES), model.clip.embed_dim))
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)

    plain_out, plain_loss, plain_grads = step(model, images, labels)
    assert counted_checkpoint == []
    model.clip.set_grad_checkpointing(True)
    ckpt_out, ckpt_loss, ckpt_grads = step(model, images, labels)

    layers = model.clip.visual.transformer.layers + model.clip.transformer.layers
    assert len(counted_checkpoint) == layers and all(r is False for r in counted_checkpoint)
    assert torch.equal(plain_loss, ckpt_loss)
    for field in ("logits", "global_features", "text_features", "local_features", "attention"):
        assert torch.equal(getattr(plain_out, field), getattr(ckpt_out, field)), field
    assert set(plain_grads) == {"text_prompts.ctx", "text_prompts.deep", "visual_prompts.prompts"}
    for name in plain_grads:
        assert plain_grads[name].abs().sum() > 0, name
        assert torch.equal(plain_grads[name], ckpt_grads[name]), name

    # Off again: the plain path.
    model.clip.set_grad_checkpointing(False)
    step(model, images, labels)
    assert len(counted_checkpoint) == layers


def test_checkpointing_is_skipped_without_autograd(counted_checkpoint):
    clip_model = tiny_clip().set_grad_checkpointing(True)
    assert clip_model.visual.transformer.grad_checkpointing and clip_model.transformer.grad_checkpointing
    images = torch.randn(2, 3, 32, 32)
    prompts = [torch.randn(3, clip_model.visual.transformer.width)] * clip_model.visual.transformer.layers
    with torch.no_grad():
        with_flag = clip_model.encode_image(images, prompts=prompts, return_tokens=True)
        clip_model.set_grad_checkpointing(False)
        plain = clip_model.encode_image(images, prompts=prompts, return_tokens=True)
    assert counted_checkpoint == []
    assert all(torch.equal(a, b) for a, b in zip(with_flag, plain))
