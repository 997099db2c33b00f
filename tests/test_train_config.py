"""train.py's configuration: one flag per field with the field's own help, and the precedence
defaults < dataset preset < --demo < flags given."""
import argparse
import dataclasses
import os
import re

import pytest

from mpafer.app import config as train_config
from mpafer.app.config import TrainConfig
from mpafer.model import MPAFERConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flags(train, cls):
    parser = argparse.ArgumentParser()
    train_config.add_fields(cls, parser)
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def test_every_field_is_a_flag_whose_help_is_the_fields_metadata(train):
    for cls in (TrainConfig, MPAFERConfig):
        actions = flags(train, cls)
        assert set(actions) == {f.name for f in dataclasses.fields(cls)}
        for f in dataclasses.fields(cls):
            text = actions[f.name].help
            assert f.metadata.get("help", "") in text, f.name
            assert "default" in text, f.name  # the default is always stated
    actions = flags(train, TrainConfig)
    assert actions["log_interval"].help == ("steps between loss syncs (progress bar, NaN check) "
                                            "(default 20)")
    assert actions["amp"].choices == ("auto", "bf16", "fp16", "off")
    assert isinstance(actions["demo"], argparse.BooleanOptionalAction)


def test_precedence_defaults_preset_demo_flags(train):
    cfg, _, _ = train.run_config(["--dataset", "ferplus"])
    assert (cfg.epochs, cfg.eval_split, cfg.lr) == (40, "val", 0.032)
    assert re.fullmatch(r"runs/ferplus/\d{8}-\d{6}(-\d+)?", cfg.out)  # a folder of its own
    cfg, model_cfg, given = train.run_config(["--demo", "--epochs", "3", "--top-k", "4"])
    assert (cfg.dataset, cfg.epochs, cfg.amp) == ("synthetic", 3, "off")
    assert re.fullmatch(r"runs/demo/\d{8}-\d{6}(-\d+)?", cfg.out)
    assert model_cfg.top_k == 4 and given == {"top_k": 4}
    assert train.run_config(["--demo"])[1].top_k == 8  # the demo's own model setting
    assert train.run_config(["--demo", "--name", "try1"])[0].out == "runs/demo/try1"
    with pytest.raises(SystemExit):  # Exp-CLIP trains with python -m mpafer.expclip train
        train.run_config(["--method", "expclip"])
    with pytest.raises(SystemExit):
        train.run_config(["--dataset", "imagenet"])


def test_a_mistyped_flag_is_refused_and_the_flag_it_resembles_is_named(train, capsys):
    with pytest.raises(SystemExit) as stopped:
        train.run_config(["--demo", "--epohcs", "3", "--lr=0.1", "--dmeo", "--zzz"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1  # one line, whatever was mistyped
    assert "unrecognized arguments: --epohcs 3 --dmeo --zzz" in error
    assert "--epohcs: did you mean --epochs?" in error and "--dmeo: did you mean --demo?" in error
    assert "--zzz:" not in error  # nothing like it: no guess
    assert train.run_config(["--demo", "--epochs", "3"])[0].epochs == 3  # no abbreviation taken


def test_every_setting_has_one_group_and_the_printed_settings_stay_short():
    from mpafer.app.config import SETTING_GROUPS, format_settings
    from mpafer.model import MPAFERConfig
    grouped = [name for names in SETTING_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    record = {"train": dataclasses.asdict(TrainConfig()), "model": MPAFERConfig().to_dict(),
              "precision": "float32", "processes": 1}
    text = format_settings(record)
    assert [line.strip() for line in text.splitlines() if line.endswith(":")] == [
        "data:", "model:", "optimisation:", "run:"]
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "lr = 0.032" in text and "pa_distance = 'l1-mean'" in text
