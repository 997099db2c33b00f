"""The soft-prompt diagnostics of metrics.jsonl and the curves: the mean cosine between the
classes' pooled soft prompts (pooled as L_ta pools them) and the text context's norm, checked
against a computation by hand on a tiny model, per epoch in a run, and drawn."""
import math

import numpy as np
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from mpafer import clip
from mpafer.app import figures
from mpafer.checkpoint import load_checkpoint, model_from_checkpoint
from mpafer.model import MPAFER, MPAFERConfig
from tests.helpers import load_script, quick_demo, read_jsonl, tiny_clip, tiny_state_dict

CLASSES = ["neutral", "happiness", "surprise"]


def by_hand(token_table, context, classes):
    """Each prompt's word tokens are the M context vectors (the class's own, for a
    class-specific context), then the class name's and the period's embeddings (open_clip's
    tokenizer, not the package's); their mean is the pooled prompt. -> (mean cosine over the
    ordered pairs of different classes, mean L2 norm of the context vectors), in plain Python."""
    encode = SimpleTokenizer().encode
    pooled = []
    for i, name in enumerate(classes):
        own = context[i] if context.dim() == 3 else context
        words = [row.tolist() for row in own] + [token_table[t].tolist()
                                                 for t in encode(name + ".")]
        pooled.append([sum(column) / len(words) for column in zip(*words)])

    def cos(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    pairs = [cos(pooled[i], pooled[j]) for i in range(len(classes))
             for j in range(len(classes)) if i != j]
    rows = context.reshape(-1, context.shape[-1]).tolist()
    norms = [math.sqrt(sum(x * x for x in row)) for row in rows]
    return sum(pairs) / len(pairs), sum(norms) / len(norms)


@pytest.mark.parametrize("class_specific", [False, True])
def test_diagnostics_match_a_hand_computation(class_specific):
    torch.manual_seed(0)
    config = MPAFERConfig(n_ctx=4, class_specific_ctx=class_specific, soft_hard_alignment=False,
                          prototype_alignment=False, prompt_init_std=0.5)
    model = MPAFER(tiny_clip(), CLASSES, None, config)
    with torch.no_grad():  # a context unlike the initial one: the values must follow it
        model.text_prompts.ctx.mul_(torch.linspace(0.2, 3.0, model.text_prompts.ctx.numel())
                                    .reshape(model.text_prompts.ctx.shape))
    expected_cos, expected_norm = by_hand(model.clip.token_embedding.weight.detach(),
                                          model.text_prompts.ctx.detach(), CLASSES)
    got = model.prompt_diagnostics()
    assert set(got) == {"soft_pooled_cos", "ctx_norm"}
    assert got["soft_pooled_cos"] == pytest.approx(expected_cos, abs=1e-5)
    assert got["ctx_norm"] == pytest.approx(expected_norm, rel=1e-5)
    # The pooled prompts are the ones L_ta sees in training.
    model.train()
    with torch.no_grad():
        pooled = model.text_features()[1]
    unit = torch.nn.functional.normalize(pooled, dim=-1)
    off_diagonal = (unit @ unit.t())[~torch.eye(len(CLASSES), dtype=torch.bool)]
    assert got["soft_pooled_cos"] == pytest.approx(off_diagonal.mean().item(), abs=1e-5)


def test_a_larger_shared_context_makes_the_pooled_prompts_alike():
    """The mechanism the diagnostic watches: scaling a shared context up drives the cosine
    between the classes' pooled prompts towards 1."""
    torch.manual_seed(0)
    model = MPAFER(tiny_clip(), CLASSES, None,
                   MPAFERConfig(soft_hard_alignment=False, prototype_alignment=False))
    word_norm = model.clip.token_embedding.weight.norm(dim=-1).mean().item()
    direction = torch.nn.functional.normalize(torch.randn_like(model.text_prompts.ctx), dim=-1)
    values = []
    for scale in (0.01, 1.0, 100.0):  # context vectors' norm, in units of a word embedding's
        with torch.no_grad():
            model.text_prompts.ctx.copy_(direction * scale * word_norm)
        values.append(model.prompt_diagnostics()["soft_pooled_cos"])
    assert values[0] < values[1] < values[2] and values[2] > 0.999


def test_every_epoch_records_them_and_the_curves_draw_them(tmp_path):
    clip_file = tmp_path / "clip.pt"
    torch.save(tiny_state_dict(seed=0), clip_file)
    out = tmp_path / "run"
    load_script("train").main(list(quick_demo(out, str(clip_file), "--epochs", "2")[1:]))
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(-1 <= r["soft_pooled_cos"] <= 1 and r["ctx_norm"] > 0 for r in records)
    assert records[0]["ctx_norm"] != records[1]["ctx_norm"]  # the context trained
    # The last line describes the state last.pt saved after the last epoch.
    checkpoint = load_checkpoint(str(out / "last.pt"))
    clip_model, _ = clip.load(str(clip_file), device="cpu", activation="quick_gelu")
    model = model_from_checkpoint(checkpoint, clip_model)
    assert model.prompt_diagnostics() == pytest.approx(
        {k: records[-1][k] for k in ("soft_pooled_cos", "ctx_norm")}, rel=1e-5)
    # The two bottom-right panels follow the values; the rest of the figure does not move.
    changed = [{**r, "soft_pooled_cos": r["soft_pooled_cos"] / 2, "ctx_norm": 2 * r["ctx_norm"]}
               for r in records]
    first, second = (np.asarray(figures.training_curves(r)) for r in (records, changed))
    differs = (first != second).any(-1)  # [H, W]
    assert differs[550:, 1200:1800].any() and differs[550:, 1800:].any()
    assert not differs[:550].any() and not differs[550:, :1200].any()
