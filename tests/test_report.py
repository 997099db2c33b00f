"""The run summarizer on hand-made run folders: grouping by configuration, mean ± std by hand."""
import dataclasses
import json
import math
import re

import pytest
import torch
from PIL import Image

from mpafer.app import report
from mpafer.app.config import RESULT_NEUTRAL, RESUME_MAY_CHANGE, TrainConfig


def data_record(files, dataset="rafdb", classes=("happiness", "fear")):
    """last.pt's record of the data a run read (as `data.fingerprint.data_record` writes it),
    by hand: one split per {name: item hash}."""
    return {"dataset": dataset, "classes": list(classes),
            "splits": {name: {"images": 2, "class_counts": [1, 1], "sha256": sha,
                              "items": torch.zeros(2, dtype=torch.int32)}
                       for name, sha in files.items()}}


RAFDB = data_record({"train": "a" * 64, "test": "b" * 64})


def make_run(folder, seed, shots, wars, reported=None, source="test.json", top_k=16,
             data=RAFDB, **train):
    """A run folder as train.py leaves it: config.json, metrics.jsonl (one epoch not evaluated),
    the reported result in test.json or in best.pt's metrics, and last.pt with the record of the
    data it read (`data`; None: no last.pt)."""
    folder.mkdir(parents=True)
    if data is not None:
        torch.save({"format": "mpafer-checkpoint/2", "resume": {"data": data}},
                   folder / "last.pt")
    config = {"train": {"dataset": "rafdb", "method": "mpafer", "seed": seed, "shots": shots,
                        "out": str(folder), "data_root": "data/RAF-DB", "workers": 4,
                        "eval_split": "heldout" if source == "test.json" else "test", **train},
              "model": {"top_k": top_k, "n_ctx": 10}}
    (folder / "config.json").write_text(json.dumps(config))
    records = [{"epoch": e + 1, "loss": 2.0 - e, "cls": 1.0, "ta": 0.5, "pa": 0.4, "v": 0.1,
                "lr": 0.01, "war": w, "uar": None if w is None else w - 0.05,
                "per_class_recall": None if w is None else {"happiness": w, "fear": w / 2}}
               for e, w in enumerate(wars)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if reported is not None and source == "test.json":
        (folder / "test.json").write_text(json.dumps({"war": reported[0], "uar": reported[1]}))
    elif reported is not None:
        torch.save({"format": "mpafer-checkpoint/2", "descriptions_sha256": None,
                    "metrics": {"war": reported[0], "uar": reported[1]}}, folder / "best.pt")
    return str(folder)


@pytest.fixture
def runs(tmp_path):
    folders = [
        make_run(tmp_path / "a1", 1, 4, [0.3, None, 0.4], (0.50, 0.40)),
        make_run(tmp_path / "a2", 2, 4, [0.3, 0.5], (0.60, 0.45), data_root="/elsewhere"),
        make_run(tmp_path / "a3", 3, 4, [0.6], (0.70, 0.50), workers=8),
        make_run(tmp_path / "b1", 1, 8, [0.8], (0.80, 0.70), source="best.pt"),
        make_run(tmp_path / "b2", 2, 8, [0.7], (0.90, 0.80), source="best.pt"),
        make_run(tmp_path / "c1", 1, 8, [0.7], (0.75, 0.65), source="best.pt", top_k=8),
    ]
    (tmp_path / "not-a-run").mkdir()
    return folders + [str(tmp_path / "not-a-run")]


def test_groups_ignore_seed_and_paths_and_give_mean_and_sample_std(runs, tmp_path, capsys):
    summaries = report.main([*runs, "--json", str(tmp_path / "summary.json")])
    out, err = capsys.readouterr()
    assert "skipping" in err and "not-a-run" in err
    a, b, c = summaries
    assert (a["n"], b["n"], c["n"]) == (3, 2, 1) and a["seeds"] == [1, 2, 3]
    # By hand: WAR 0.5, 0.6, 0.7 -> mean 0.6, sample std sqrt((0.01 + 0 + 0.01) / 2) = 0.1.
    assert a["war"]["mean"] == pytest.approx(0.6) and a["war"]["std"] == pytest.approx(0.1)
    assert a["uar"]["mean"] == pytest.approx(0.45) and a["uar"]["std"] == pytest.approx(0.05)
    # best.pt's metrics when there is no test.json: 0.8, 0.9 -> 0.85 ± sqrt(2 * 0.05^2) = 0.0707.
    assert b["war"]["mean"] == pytest.approx(0.85)
    assert b["war"]["std"] == pytest.approx(math.sqrt(0.005))
    # The last evaluated epoch of each run: 0.4 (the None epoch is skipped), 0.5, 0.6.
    assert a["last_war"]["values"] == pytest.approx([0.4, 0.5, 0.6])
    assert c["war"]["std"] is None
    assert a["reported"] == ["best.pt on test (chosen on heldout)"]
    assert b["reported"] == ["best.pt on test (chosen on test)"]
    # Each group is named by the fields that differ between groups.
    assert [s["label"] for s in summaries] == ["eval_split=heldout shots=4 top_k=16",
                                               "eval_split=test shots=8 top_k=16",
                                               "eval_split=test shots=8 top_k=8"]
    assert "| eval_split=heldout shots=4 top_k=16 | 3 | 1, 2, 3 | 60.00 ± 10.00 | 45.00 ± 5.00 |" in out
    assert "| eval_split=test shots=8 top_k=16 | 2 | 1, 2 | 85.00 ± 7.07 | 75.00 ± 7.07 |" in out
    assert "| eval_split=test shots=8 top_k=8 | 1 | 1 | 75.00 | 65.00 |" in out
    assert json.load(open(tmp_path / "summary.json"))[0]["runs"] == runs[:3]


def test_curves_are_redrawn_for_every_run(runs):
    report.main([*runs[:2], "--curves"])
    with Image.open(runs[0] + "/curves.png") as first, Image.open(runs[1] + "/curves.png") as second:
        assert first.size == second.size == (2400, 1100)
        assert first.tobytes() != second.tobytes()  # different histories, different pictures


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run folders"):
        report.main([str(tmp_path / "nothing-*")])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"epoch": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        report.main([str(tmp_path / "bad")])


def test_seeds_named_by_name_and_cache_folder_form_one_group(tmp_path):
    """Seeds run as `--name s1` / `--name s2`, with another cache folder or --overwrite, are the
    same configuration: one group, with a mean and a spread."""
    folders = [make_run(tmp_path / f"s{seed}", seed, 4, [0.5], (0.5 + seed / 10, 0.4),
                        name=f"s{seed}", cache_dir=f"/cache/{seed}", overwrite=seed == 2)
               for seed in (1, 2)]
    (group,) = report.main(folders)
    assert group["n"] == 2 and group["war"]["mean"] == pytest.approx(0.65)
    assert group["war"]["std"] == pytest.approx(math.sqrt(0.005))


def test_settings_that_do_not_change_a_result_are_one_list():
    """The fields report.py ignores are the TrainConfig fields marked as not changing a result,
    and the seed: the same marks decide what a resume may change."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert report.IGNORED == RESULT_NEUTRAL | {"seed"} and report.IGNORED <= names | {"seed"}
    assert {"name", "cache_dir", "overwrite", "out", "workers", "device"} <= report.IGNORED
    assert {"workers", "device", "cache_dir", "log_interval"} <= RESUME_MAY_CHANGE
    assert not {"lr", "batch_size", "seed", "dataset"} & RESUME_MAY_CHANGE
    assert "data_root" in RESUME_MAY_CHANGE  # for data that moved: checked by its record


def test_base_to_novel_runs_get_base_novel_and_hm_columns(tmp_path, capsys):
    folders = []
    for seed, (base, novel) in ((1, (0.8, 0.4)), (2, (0.6, 0.6))):
        folder = make_run(tmp_path / f"b{seed}", seed, 0, [0.7], (0.5, 0.45))
        hm = 2 * base * novel / (base + novel)
        (tmp_path / f"b{seed}" / "test.json").write_text(json.dumps({
            "war": 0.5, "uar": 0.45, "base": {"war": base, "uar": base},
            "novel": {"war": novel, "uar": novel}, "hm": hm}))
        folders.append(folder)
    (group,) = report.main(folders)
    assert group["base_war"]["mean"] == pytest.approx(0.7)
    assert group["novel_war"]["mean"] == pytest.approx(0.5)
    assert group["hm"]["values"] == pytest.approx([2 * 0.8 * 0.4 / 1.2, 0.6])
    out = capsys.readouterr().out
    assert "| base WAR (%) | novel WAR (%) | HM (%) |" in out
    assert "| 70.00 ± 14.14 | 50.00 ± 14.14 |" in out


def test_runs_on_different_data_of_one_dataset_are_different_rows(tmp_path, capsys):
    """Two folder datasets (another root, other files) are two rows, each named by its root
    folder; the same data at another root (moved) is the same row. No label holds a 64-character
    hash."""
    fer = data_record({"train": "1" * 64, "test": "2" * 64}, dataset="folder")
    other = data_record({"train": "3" * 64, "test": "4" * 64}, dataset="folder")
    folders = [make_run(tmp_path / "fer-1", 1, 0, [0.5], (0.50, 0.4), data=fer,
                        dataset="folder", data_root="/data/FER2013"),
               make_run(tmp_path / "fer-2", 2, 0, [0.5], (0.60, 0.4), data=fer,
                        dataset="folder", data_root="/moved/FER2013"),
               make_run(tmp_path / "other-1", 1, 0, [0.5], (0.30, 0.2), data=other,
                        dataset="folder", data_root="/data/jaffe")]
    fer_group, other_group = report.main(folders)
    assert fer_group["n"] == 2 and fer_group["war"]["mean"] == pytest.approx(0.55)
    assert other_group["n"] == 1 and other_group["war"]["mean"] == pytest.approx(0.30)
    assert fer_group["label"] == "data=folder:FER2013"
    assert other_group["label"] == "data=folder:jaffe"
    out = capsys.readouterr().out
    assert "| data=folder:FER2013 | 2 | 1, 2 | 55.00 ± 7.07 |" in out
    assert not re.search(r"[0-9a-f]{64}", out)
    (alone,) = report.main(folders[:2])  # one group: named by its data and method
    assert alone["label"] == "data=folder:FER2013 method=mpafer"


def test_different_data_under_one_folder_name_gets_a_short_hash(tmp_path):
    """Two datasets whose roots have the same name are told apart by 8 characters of their
    identity; runs without a data record (no last.pt) by their root."""
    first = data_record({"train": "5" * 64, "test": "6" * 64}, dataset="folder")
    second = data_record({"train": "7" * 64, "test": "8" * 64}, dataset="folder")
    folders = [make_run(tmp_path / "a", 1, 0, [0.5], (0.5, 0.4), data=first, dataset="folder",
                        data_root="/x/faces"),
               make_run(tmp_path / "b", 1, 0, [0.5], (0.6, 0.4), data=second, dataset="folder",
                        data_root="/y/faces"),
               make_run(tmp_path / "c", 1, 0, [0.5], (0.7, 0.4), data=None, dataset="folder",
                        data_root="/z/faces")]
    labels = [s["label"] for s in report.main(folders)]
    assert len(labels) == 3 and len(set(labels)) == 3
    assert all(re.fullmatch(r"data=folder:faces#[0-9a-f]{8}", label) for label in labels)


def test_a_hash_in_a_label_is_shortened(tmp_path):
    """Runs that differ only in their descriptions (identified by SHA-256) are labelled by its
    first 8 characters."""
    folders = []
    for i, sha in enumerate(("c" * 64, "d" * 64)):
        folder = make_run(tmp_path / f"r{i}", 1, 0, [0.5], (0.5, 0.4), source="best.pt")
        torch.save({"format": "mpafer-checkpoint/2", "descriptions_sha256": sha,
                    "metrics": {"war": 0.5, "uar": 0.4}}, tmp_path / f"r{i}" / "best.pt")
        folders.append(folder)
    labels = [s["label"] for s in report.main(folders)]
    assert labels == ["descriptions=cccccccc", "descriptions=dddddddd"]
