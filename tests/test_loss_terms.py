"""One place per loss term: a new term is one function and one entry in `LOSS_TERMS`, and then
it is in the total, in the per-term gradient norms, in metrics.jsonl, in the log and in the
training curves, with nothing else changed."""
import pytest
import torch

from mpafer import model as model_module
from mpafer.app import report
from mpafer.model import LOSS_TERMS, LossTerm
from tests.helpers import load_script, quick_demo, read_jsonl, tiny_state_dict


def logit_energy(model, output, labels):
    """A made-up term: the mean squared logit, small."""
    return 1e-4 * output.logits.float().pow(2).mean()


def test_a_new_term_reaches_the_total_the_logs_and_the_curves(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(model_module, "LOSS_TERMS",
                        [*LOSS_TERMS, LossTerm("energy", logit_energy, "gamma")])
    drawn = []
    real_curves = report.training_curves
    monkeypatch.setattr(report, "training_curves",
                        lambda records, terms: drawn.append(terms) or real_curves(records, terms))
    clip_file = tmp_path / "clip.pt"
    torch.save(tiny_state_dict(seed=0), clip_file)
    out = tmp_path / "run"
    load_script("train").main(list(quick_demo(out, str(clip_file), "--epochs", "1",
                                              "--gamma", "2")[1:]))
    (record,) = read_jsonl(out / "metrics.jsonl")
    assert record["energy"] > 0 and set(record["grad_norms"]) == {"cls", "ta", "pa", "v", "energy"}
    assert record["grad_norms"]["energy"] > 0
    weighted = record["cls"] + record["ta"] + record["pa"] + 2 * (record["v"] + record["energy"])
    assert record["loss"] == pytest.approx(weighted, rel=1e-5)  # gamma weighs the new term
    assert f"energy {record['energy']:.3f}" in capsys.readouterr().out  # the epoch's log line
    assert drawn == [("cls", "ta", "pa", "v", "energy")] and (out / "curves.png").is_file()


def test_ta_weight_weighs_l_ta_alone_inside_beta():
    """L = L_cls + beta * (ta_weight * L_ta + L_pa) + gamma * L_v: the total, the weighted terms
    and L_ta's gradient norm follow ta_weight, and nothing else does."""
    from mpafer.labels import BASIC_CLASSES
    from mpafer.model import MPAFER, MPAFERConfig
    from mpafer.prompts import load_descriptions
    from tests.helpers import tiny_clip

    classes = list(BASIC_CLASSES)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4)

    def measured(ta_weight):
        torch.manual_seed(0)
        config = MPAFERConfig(beta=0.5, gamma=2.0, ta_weight=ta_weight)
        model = MPAFER(tiny_clip(), classes, load_descriptions(classes), config).train()
        model.set_prototypes(torch.randn(len(classes), 32, generator=torch.Generator()
                                         .manual_seed(1)))
        total, parts = model.loss(model(images), labels)
        return total.item(), parts, model.term_gradient_norms(images, labels)

    total, parts, norms = measured(0.1)
    by_hand = parts["cls"] + 0.5 * (0.1 * parts["ta"] + parts["pa"]) + 2.0 * parts["v"]
    assert total == pytest.approx(by_hand.item(), rel=1e-6)
    total_one, parts_one, norms_one = measured(1.0)
    assert {k: v.item() for k, v in parts.items()} == pytest.approx(
        {k: v.item() for k, v in parts_one.items()}, rel=1e-6)  # the terms themselves unchanged
    assert total_one - total == pytest.approx(0.5 * 0.9 * parts["ta"].item(), rel=1e-5)
    assert norms["ta"] == pytest.approx(0.1 * norms_one["ta"], rel=1e-5)
    assert {k: norms[k] for k in ("cls", "pa", "v")} == pytest.approx(
        {k: norms_one[k] for k in ("cls", "pa", "v")}, rel=1e-6)
