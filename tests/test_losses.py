"""MPA-FER losses vs hand computation (plain Python loops), reductions, fp32 under autocast."""
import math

import pytest
import torch

from mpafer import losses

C, H, W, D, B, TAU = 3, 5, 4, 6, 4, 0.07
HARD_LABELS = torch.tensor([0, 0, 1, 2, 2])
LABELS = torch.tensor([2, 0, 1, 2])


def unit(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def cos(a, b):
    return sum(x * y for x, y in zip(unit(a), unit(b)))


def l1(a, b):
    return sum(abs(x - y) for x, y in zip(unit(a), unit(b)))


def neg_log_softmax(logits, target):
    return -(logits[target] - math.log(sum(math.exp(x) for x in logits)))


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(*shape, generator=g) for name, shape in
            [("soft_pooled", (C, W)), ("hard_pooled", (H, W)), ("text", (C, D)), ("hard", (H, D)),
             ("z", (B, D)), ("protos", (C, D)), ("logits", (B, C))]}


def test_token_alignment_is_contrastive_over_classes_per_hard_prompt(inputs):
    soft, hard = inputs["soft_pooled"].tolist(), inputs["hard_pooled"].tolist()
    expected = sum(neg_log_softmax([cos(soft[c], hard[h]) / TAU for c in range(C)], HARD_LABELS[h])
                   for h in range(H)) / H
    got = losses.token_alignment_loss(inputs["soft_pooled"], inputs["hard_pooled"], HARD_LABELS, TAU)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_prompt_alignment_default_is_the_mean_reduced_l1_and_the_sum_is_an_option(inputs):
    text, hard = inputs["text"].tolist(), inputs["hard"].tolist()
    norm = sum(l1(text[HARD_LABELS[h]], hard[h]) for h in range(H)) / H  # ||.||_1 averaged over hard prompts
    default = losses.prompt_alignment_loss(inputs["text"], inputs["hard"], HARD_LABELS)
    # The mean over hard prompts and over the D dimensions, by hand and as F.l1_loss has it.
    assert default.item() == pytest.approx(norm / D, rel=1e-5)
    normalize = torch.nn.functional.normalize
    l1_loss = torch.nn.functional.l1_loss(normalize(inputs["text"], dim=-1)[HARD_LABELS],
                                          normalize(inputs["hard"], dim=-1))
    assert default.item() == pytest.approx(l1_loss.item(), rel=1e-6)
    summed = losses.prompt_alignment_loss(inputs["text"], inputs["hard"], HARD_LABELS, "l1-sum")
    assert summed.item() == pytest.approx(norm, rel=1e-5)
    expected_con = sum(neg_log_softmax([cos(text[c], hard[h]) / TAU for c in range(C)], HARD_LABELS[h])
                       for h in range(H)) / H
    con = losses.prompt_alignment_loss(inputs["text"], inputs["hard"], HARD_LABELS, "contrastive", TAU)
    assert con.item() == pytest.approx(expected_con, rel=1e-5)


def test_prototype_alignment_distances(inputs):
    z, protos, y = inputs["z"].tolist(), inputs["protos"].tolist(), LABELS.tolist()
    expected_cos = sum(1 - cos(z[i], protos[y[i]]) for i in range(B)) / B
    expected_l1 = sum(l1(z[i], protos[y[i]]) for i in range(B)) / B
    loss = lambda *distance: losses.prototype_alignment_loss(inputs["z"], inputs["protos"], LABELS, *distance).item()  # noqa: E731
    assert loss() == pytest.approx(expected_cos, rel=1e-5)
    assert loss("l1-sum") == pytest.approx(expected_l1, rel=1e-5)
    assert loss("l1-mean") == pytest.approx(expected_l1 / D, rel=1e-5)


def test_classification_loss(inputs):
    logits = inputs["logits"].tolist()
    expected = sum(neg_log_softmax(logits[i], LABELS[i]) for i in range(B)) / B
    assert losses.classification_loss(inputs["logits"], LABELS).item() == pytest.approx(expected, rel=1e-5)


def test_unknown_distances_are_named(inputs):
    with pytest.raises(ValueError, match=r"pa_distance must be one of \['l1-mean', 'l1-sum', 'contrastive'\], got 'l2'"):
        losses.prompt_alignment_loss(inputs["text"], inputs["hard"], HARD_LABELS, "l2")
    with pytest.raises(ValueError, match=r"v_distance must be one of .*got 'mean'"):
        losses.prototype_alignment_loss(inputs["z"], inputs["protos"], LABELS, "mean")


def test_losses_are_fp32_under_bf16_autocast(inputs):
    bf16 = {k: v.bfloat16() for k, v in inputs.items()}
    calls = {
        "ta": lambda t: losses.token_alignment_loss(t["soft_pooled"], t["hard_pooled"], HARD_LABELS, TAU),
        "pa": lambda t: losses.prompt_alignment_loss(t["text"], t["hard"], HARD_LABELS),
        "pa-con": lambda t: losses.prompt_alignment_loss(t["text"], t["hard"], HARD_LABELS, "contrastive"),
        "v": lambda t: losses.prototype_alignment_loss(t["z"], t["protos"], LABELS),
        "cls": lambda t: losses.classification_loss(t["logits"], LABELS),
    }
    for name, call in calls.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = call(bf16)
        # The same bf16 inputs, upcast and computed without autocast: identical to fp32 rounding.
        expected = call({k: v.float() for k, v in bf16.items()})
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, msg=name)


def test_gradient_norms_per_term():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, generator=g, requires_grad=True), torch.randn(2, generator=g, requires_grad=True)
    x, y = torch.randn(3, generator=g), torch.randn(2, generator=g)
    terms = {"first": (a * x).sum(), "both": 0.5 * ((a * a).sum() + (b * y).sum()), "off": torch.zeros(())}
    norms = losses.gradient_norms(terms, [a, b])
    assert norms["first"] == pytest.approx(x.norm().item(), rel=1e-6)  # d/da = x, d/db = 0
    both = torch.cat([a.detach(), 0.5 * y])  # d/da = a, d/db = y / 2
    assert norms["both"] == pytest.approx(both.norm().item(), rel=1e-6)
    assert norms["off"] == 0.0
    assert losses.gradient_norms(terms, [a, b], scale=1024.0)["both"] == pytest.approx(norms["both"], rel=1e-6)
    # The graph survives: the total still backpropagates, and no .grad was left behind before.
    assert a.grad is None and b.grad is None
    (terms["first"] + terms["both"]).backward()
    torch.testing.assert_close(a.grad, x + a.detach())
