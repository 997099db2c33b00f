"""The ablation ladder over seeds (`train.py --ablation --seeds ...`): one run folder per (row,
seed), summarised by mpafer.app.report into ablation.md and ablation.json; flags given reach every
row and win over a row's own switches."""
import json

import pytest
import torch

from mpafer.app import ablation
from tests.helpers import load_script, quick_demo, read_jsonl, tiny_state_dict


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.pt"
    torch.save(tiny_state_dict(seed=0), path)
    return str(path)


def test_two_rows_two_seeds_write_the_table(tmp_path, clip_file, monkeypatch, capsys):
    rows = (ablation.ABLATION_LADDER[0], ablation.ABLATION_LADDER[-1])  # CoOp and the full method
    monkeypatch.setattr(ablation, "ABLATION_LADDER", rows)
    out = tmp_path / "ladder"
    args = list(quick_demo(out, clip_file, "--epochs", "1")[1:])
    load_script("train").main([*args, "--ablation", "--seeds", "1,2", "--top-k", "4"])
    record = json.loads((out / "ablation.json").read_text())
    assert record["seeds"] == [1, 2] and [r["row"] for r in record["rows"]] == [
        "CoOp (text prompts only)", "+ global-local alignment (MPA-FER)"]
    for i, (folder, _, flags) in enumerate(rows, 1):
        for seed in (1, 2):
            run = out / f"{i}-{folder}" / f"seed-{seed}"
            config = json.loads((run / "config.json").read_text())
            assert config["train"]["seed"] == seed and config["model"]["top_k"] == 4  # flag given
            assert config["model"]["global_local"] == (not flags)
            assert len(read_jsonl(run / "metrics.jsonl")) == 1
    coop, full = record["rows"]
    # Each row's mean and sample std are those of its two runs' best WAR, by hand.
    wars = [json.loads((out / "1-coop" / f"seed-{s}" / "metrics.jsonl").read_text())["war"]
            for s in (1, 2)]
    assert coop["war"]["values"] == pytest.approx(wars)
    assert coop["war"]["mean"] == pytest.approx(sum(wars) / 2)
    assert coop["war"]["std"] == pytest.approx(abs(wars[0] - wars[1]) / 2 ** 0.5)
    assert coop["change"] is None
    assert full["change"]["war"] == pytest.approx(full["war"]["mean"] - coop["war"]["mean"])
    assert record["zero_shot_hard_prompts"]["war"]["n"] == 2
    table = (out / "ablation.md").read_text()
    assert table.splitlines()[2].startswith("| zero-shot CLIP, hard prompts | 2 |")
    assert "| CoOp (text prompts only) | 2 |" in table and table in capsys.readouterr().out


def test_a_flag_given_wins_over_a_rows_switch_and_says_so(tmp_path, clip_file, monkeypatch,
                                                          capsys):
    monkeypatch.setattr(ablation, "ABLATION_LADDER", ablation.ABLATION_LADDER[:1])
    out = tmp_path / "ladder"
    args = list(quick_demo(out, clip_file, "--epochs", "1")[1:])
    load_script("train").main([*args, "--demo-ablation", "--visual-prompt-depth", "1"])
    config = json.loads((out / "1-coop" / "seed-1" / "config.json").read_text())
    assert config["model"]["visual_prompt_depth"] == 1
    assert "--visual-prompt-depth (given) replaces the row's --visual-prompt-depth" in (
        capsys.readouterr().out)


def test_ablation_flags_are_checked(capsys):
    train = load_script("train")
    for flags, expected in ((["--seeds", "1,2", "--resume", "x/last.pt"],
                             "--seeds starts new runs"),
                            (["--ablation", "--seeds", "1,x"], "--seeds must be seeds"),
                            (["--ablation", "--resume", "x/last.pt"], "--ablation starts new runs")):
        with pytest.raises(SystemExit):
            train.run_config(["--demo", *flags])
        assert expected in capsys.readouterr().err, flags


def test_seeds_without_ablation_run_the_configuration_per_seed_then_report(tmp_path, clip_file,
                                                                           capsys):
    """`--shots 2 --seeds 1,2`: the given configuration once per seed, each in its own folder
    with its own draw of shots, then the report over both: one row, n = 2, mean of the two."""
    out = tmp_path / "fewshot"
    args = list(quick_demo(out, clip_file, "--epochs", "1")[1:])
    (summary,) = load_script("train").main([*args, "--shots", "2", "--seeds", "1,2",
                                            "--top-k", "4"])
    draws = []
    for seed in (1, 2):
        run = out / f"seed-{seed}"
        config = json.loads((run / "config.json").read_text())
        assert config["train"]["seed"] == seed and config["train"]["shots"] == 2
        shots = json.loads((run / "shots.json").read_text())
        assert shots["num_images"] == 2 * 7
        draws.append([item["index"] for item in shots["items"]])
    assert draws[0] != draws[1]  # each seed draws its own shots
    wars = [read_jsonl(out / f"seed-{s}" / "metrics.jsonl")[-1]["war"] for s in (1, 2)]
    assert summary["n"] == 2 and summary["seeds"] == [1, 2]
    assert summary["war"]["mean"] == pytest.approx(sum(wars) / 2)
    table = (out / "report.md").read_text()
    assert "| 2 | 1, 2 |" in table and table in capsys.readouterr().out
