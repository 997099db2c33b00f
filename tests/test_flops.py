"""The analytic FLOP count of a training step (`mpafer.app.bench.flops`): by hand for small numbers,
and against torch's own FLOP counter on a tiny MPA-FER, forward and backward."""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mpafer.app.bench.flops import mpafer_step_flops, step_flops
from mpafer.labels import BASIC_CLASSES
from mpafer.model import MPAFER, MPAFERConfig
from mpafer.prompts import load_descriptions
from tests.helpers import TINY, tiny_clip

CLASSES = list(BASIC_CLASSES)


def test_step_flops_by_hand_for_the_tiny_shape():
    # tiny: images 32 px in 8 px patches -> 16 patches, width 64, 2 layers, embed 32;
    # text width 64, 2 layers. 2 images, 8 prompt tokens in both layers, 7 prompts of 20
    # tokens, 38 hard prompts.
    batch, s, w, d = 2, 1 + 16 + 8, 64, 32
    image_frozen = batch * (2 * 12 * s * w * w + 17 * w * d)  # blocks; CLS and patch projection
    image_both = batch * 2 * 2 * s * s * w
    conv = batch * 16 * w * 3 * 8 * 8
    text_frozen, text_both = 7 * (2 * 12 * 20 * w * w + w * d), 7 * 2 * 2 * 20 * 20 * w
    head_both, head_frozen = batch * 7 * d * (1 + 16), 38 * 7 * w
    frozen = image_frozen + text_frozen + head_frozen
    both = image_both + text_both + head_both
    flops = step_flops(TINY, batch, classes=7, text_length=20, hard_prompts=38)
    assert flops["forward"] == 2 * (frozen + both + conv)
    assert flops["backward"] == 2 * (frozen + 2 * both)  # no weight gradients; no conv backward
    assert flops["step"] == flops["forward"] + flops["backward"]
    assert flops["step_per_image"] == flops["step"] / batch


def counted_flops(fn) -> int:
    """torch's FLOP count of fn(); attention on the math backend, whose products it sees (it
    does not count the CPU's fused attention kernel)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_step_flops_match_torchs_flop_counter_forward_and_backward():
    descriptions = load_descriptions(CLASSES)
    for config in (MPAFERConfig(), MPAFERConfig(global_local=False, soft_hard_alignment=False,
                                                visual_prompt_depth=1)):
        model = MPAFER(tiny_clip(), CLASSES, descriptions, config).train()
        model.set_prototypes(torch.randn(len(CLASSES), model.clip.embed_dim))
        images, labels = torch.randn(3, 3, 32, 32), torch.arange(3)
        loss = []
        forward = counted_flops(lambda: loss.append(model.loss(model(images), labels)[0]))
        backward = counted_flops(lambda: loss[0].backward())
        expected = mpafer_step_flops(TINY, 3, CLASSES, descriptions, config)
        assert (forward, backward) == (expected["forward"], expected["backward"]), config
