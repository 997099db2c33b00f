"""The research protocols' subsets: K shots per class, a stratified held-out validation part, and
train.py running both on the RAF-DB layout with the final test report of best.pt."""
import collections
import copy
import json
import os

import pytest
import torch
from PIL import Image

from mpafer.app import report
from mpafer.app.protocol import selection_split_name
from mpafer.data import RAFDB
from mpafer.data.subsets import (
    Subset,
    few_shot_indices,
    held_out_count,
    stratified_split,
)
from tests.dataset_writers import write_synthetic_rafdb
from tests.helpers import load_script, tiny_state_dict
from tests.test_scripts import read_jsonl, run

HELD_OUT = "heldout"  # the name of the set --val-fraction holds out (heldout.json)

# Class sizes 1, 2, 5, 9 and 20, shuffled so classes are interleaved.
TARGETS = [c for c, n in enumerate((1, 2, 5, 9, 20)) for _ in range(n)]
TARGETS = [TARGETS[i] for i in torch.randperm(len(TARGETS), generator=torch.Generator().manual_seed(0))]


def per_class(indices, targets=TARGETS):
    return collections.Counter(targets[i] for i in indices)


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
def test_few_shot_draws_k_per_class_or_all_available(shots):
    chosen = few_shot_indices(TARGETS, shots, seed=3)
    sizes = collections.Counter(TARGETS)
    assert per_class(chosen) == {c: min(shots, n) for c, n in sizes.items()}
    assert chosen == sorted(set(chosen))  # no repeats


def test_few_shot_is_reproducible_by_seed_and_differs_across_seeds():
    assert few_shot_indices(TARGETS, 4, seed=1) == few_shot_indices(TARGETS, 4, seed=1)
    draws = {tuple(few_shot_indices(TARGETS, 4, seed=s)) for s in range(5)}
    assert len(draws) == 5


def test_few_shot_draws_only_from_the_pool():
    pool = [i for i in range(len(TARGETS)) if i % 2 == 0]
    chosen = few_shot_indices(TARGETS, 3, seed=0, pool=pool)
    assert set(chosen) <= set(pool)
    available = per_class(pool)
    assert per_class(chosen) == {c: min(3, n) for c, n in available.items()}
    with pytest.raises(ValueError, match="--shots"):
        few_shot_indices(TARGETS, 0, seed=0)


def test_held_out_part_is_stratified_disjoint_and_seeded():
    kept, held = stratified_split(TARGETS, 0.2, seed=7)
    assert set(kept).isdisjoint(held) and sorted(kept + held) == list(range(len(TARGETS)))
    # By hand: round(0.2 * n), at least 1, leaving at least 1; a class of one stays in training.
    assert per_class(held) == {1: 1, 2: 1, 3: 2, 4: 4}
    assert [held_out_count(n, 0.2) for n in (1, 2, 5, 9, 20)] == [0, 1, 1, 2, 4]
    assert stratified_split(TARGETS, 0.2, seed=7) == (kept, held)
    assert stratified_split(TARGETS, 0.2, seed=8)[1] != held
    with pytest.raises(ValueError, match="--val-fraction"):
        stratified_split(TARGETS, 1.0, seed=0)


def test_subset_has_its_own_transform_and_lists_its_files(tmp_path):
    root = write_synthetic_rafdb(tmp_path / "raf", 3, 1, image_size=24)
    data = RAFDB(root, "train", transform=lambda image: "train-view")
    subset = Subset(data, [4, 0, 9], data.transform)
    assert subset.targets == [data.targets[i] for i in (4, 0, 9)] and len(subset) == 3
    assert subset[0] == ("train-view", data.targets[4])
    view = copy.copy(subset)
    view.transform = None  # as the prototype step does with the eval transform
    assert isinstance(view[0][0], Image.Image) and subset[0][0] == "train-view"
    assert data[0][0] == "train-view"  # the full set is untouched
    items = subset.describe()
    assert [i["index"] for i in items] == [4, 0, 9]
    assert items[0]["path"] == data.image_path(4) and items[0]["label"] == data.classnames[data.targets[4]]
    assert subset.fingerprint() != Subset(data, [4, 0, 8]).fingerprint()


@pytest.fixture(scope="module")
def train_script():
    return load_script("train.py")


def test_val_fraction_makes_the_held_out_part_choose_best(train_script):
    cfg, _, _ = train_script.run_config(["--val-fraction", "0.1", "--shots", "4"])
    assert (selection_split_name(cfg), cfg.val_fraction, cfg.shots) == (HELD_OUT, 0.1, 4)
    assert selection_split_name(train_script.run_config([])[0]) == "test"
    for bad in (["--val-fraction", "0.1", "--eval-split", "test"], ["--val-fraction", "1"],
                ["--shots", "-1"], ["--eval-split", HELD_OUT]):
        with pytest.raises(SystemExit):
            train_script.run_config(bad)


@pytest.fixture(scope="module")
def rafdb_runs(tmp_path_factory):
    """Two seeds of a 3-shot RAF-DB run with a quarter of each class held out (seconds)."""
    tmp = tmp_path_factory.mktemp("protocols")
    root = write_synthetic_rafdb(tmp / "raf", 6, 3, image_size=40)
    clip_file = tmp / "tiny.pt"
    torch.save(tiny_state_dict(seed=0), clip_file)
    outs = []
    for seed in (1, 2):
        out = tmp / "runs" / f"seed{seed}"
        run("train.py", "--dataset", "rafdb", "--data-root", str(root), "--clip", str(clip_file),
            "--cache-dir", str(tmp / "weights"), "--out", str(out), "--epochs", "2", "--batch-size", "7",
            "--workers", "0", "--amp", "off", "--shots", "3", "--val-fraction", "0.25", "--seed", str(seed))
        outs.append(out)
    return root, outs


def test_train_records_shots_and_held_out_files_and_reports_test_once(rafdb_runs):
    root, (out, other) = rafdb_runs
    full = RAFDB(root, "train")
    shots, held = (json.load(open(out / name)) for name in ("shots.json", "heldout.json"))
    assert shots["shots"] == 3 and shots["seed"] == 1 and shots["num_images"] == 21
    assert set(shots["class_counts"].values()) == {3}
    held_out = {item["index"] for item in held["items"]}
    assert len(held_out) == 7 * 2  # round(0.25 * 6) = 2 of each class's 6 images
    for item in shots["items"] + held["items"]:
        assert item["path"] == full.image_path(item["index"]) and os.path.isfile(item["path"])
        assert item["label"] == full.classnames[full.targets[item["index"]]]
    assert held_out.isdisjoint(item["index"] for item in shots["items"])
    other_shots = json.load(open(other / "shots.json"))
    assert [i["index"] for i in other_shots["items"]] != [i["index"] for i in shots["items"]]
    # Every epoch was evaluated on the held-out part; best.pt then once on the full test split.
    records = read_jsonl(out / "metrics.jsonl")
    assert all(sum(1 for _ in r["per_class_recall"]) == 7 for r in records)
    test = json.load(open(out / "test.json"))
    assert test["num_samples"] == 21 and test["chosen_on"] == HELD_OUT
    assert test["epoch"] == max(records, key=lambda r: r["war"])["epoch"]
    assert "on the test split" in open(out / "log.txt").read()
    with Image.open(out / "curves.png") as curves:
        assert curves.size == (2400, 1100)


def test_report_summarizes_the_seeds_of_real_runs(rafdb_runs, tmp_path, capsys):
    _, outs = rafdb_runs
    report.main([*map(str, outs), "--json", str(tmp_path / "summary.json")])
    (group,) = json.load(open(tmp_path / "summary.json"))
    assert group["n"] == 2 and group["seeds"] == [1, 2]
    tests = [json.load(open(out / "test.json")) for out in outs]
    assert group["war"]["values"] == [t["war"] for t in tests]
    assert group["war"]["mean"] == pytest.approx(sum(t["war"] for t in tests) / 2)
    assert group["reported"] == [f"best.pt on test (chosen on {HELD_OUT})"]
    # One group, named by its data (dataset:root folder).
    assert "| data=rafdb:raf | 2 | 1, 2 |" in capsys.readouterr().out


def test_few_shot_smaller_than_a_batch_trains_with_a_batch_that_fits(train_script, tmp_path,
                                                                     capsys):
    """`--demo --shots 1`: 7 images, fewer than the batch of 32: one batch of 7, said once."""
    clip_file = tmp_path / "clip.pt"
    torch.save(tiny_state_dict(seed=0), clip_file)
    out = tmp_path / "one-shot"
    train_script.main(["--demo", "--clip", str(clip_file), "--out", str(out), "--cache-dir",
                       str(tmp_path / "cache"), "--shots", "1", "--epochs", "2",
                       "--demo-test-per-class", "2"])
    printed = capsys.readouterr().out
    assert "fewer than --batch-size 32; training with batches of 7" in printed
    assert json.loads((out / "config.json").read_text())["train"]["batch_size"] == 7
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
