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
