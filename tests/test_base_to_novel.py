"""Generalisation protocols: base-to-novel training (CoCoOp's base / novel / HM) and cross-dataset
evaluation of a checkpoint on other classes (`eval.py --class-set shared|open`)."""
import json
import shlex

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from mpafer.app.engine import evaluate_base_novel
from mpafer.checkpoint import load_checkpoint
from mpafer.clip.tokenizer import tokenize
from mpafer.metrics import harmonic_mean
from mpafer.model import MPAFER, MPAFERConfig
from tests.helpers import (
    load_script,
    quick_demo,
    read_jsonl,
    run,
    tiny_clip,
    tiny_state_dict,
    untrained_checkpoint,
)

CLASSES = ["happiness", "sadness", "anger", "fear"]


class Scored(Dataset):
    """Items whose "image" is its index: a logits function can look up the scores it wants."""

    classnames = CLASSES

    def __init__(self, targets):
        self.targets = targets
        self.transform = None

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.full((1,), float(i)), self.targets[i]


def test_base_novel_and_hm_by_hand():
    # Base: happiness, sadness. Each row: an image's scores over the 4 classes.
    scores = torch.tensor([[5., 4., 9., 0.],   # happiness: all -> anger; among base -> happiness
                           [1., 2., 0., 0.],   # happiness: -> sadness (wrong either way)
                           [0., 3., 1., 7.],   # sadness: all -> fear; among base -> sadness
                           [0., 0., 2., 1.],   # anger: -> anger (novel, right)
                           [9., 0., 1., 3.],   # fear: all -> happiness; among novel -> fear
                           [0., 0., 5., 1.]])  # fear: -> anger (wrong)
    targets = [0, 0, 1, 2, 3, 3]
    result = evaluate_base_novel(lambda x: scores[x[:, 0].long()], Scored(targets),
                                 ["happiness", "sadness"], torch.device("cpu"), progress=False)
    assert result["base"]["war"] == pytest.approx(2 / 3)  # images 0, 2 right among base
    assert result["base"]["classnames"] == ["happiness", "sadness"]
    assert result["base"]["uar"] == pytest.approx((1 / 2 + 1) / 2)
    assert result["novel"]["war"] == pytest.approx(2 / 3)  # images 3, 4 right among novel
    assert result["all"]["war"] == pytest.approx(1 / 6)  # image 3 only
    assert result["hm"] == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert harmonic_mean(0.8, 0.4) == pytest.approx(2 * 0.8 * 0.4 / 1.2)
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_novel_class_features_are_the_learned_context_before_the_new_name():
    torch.manual_seed(0)
    model = MPAFER(tiny_clip(), ["happiness", "sadness"], None,
                   MPAFERConfig(soft_hard_alignment=False, prototype_alignment=False))
    with torch.no_grad():
        model.text_prompts.ctx.normal_(0, 0.3)  # as if trained
    novel = model.with_classes(["anger", "contempt"])
    assert novel.visual_prompts is model.visual_prompts and novel.text_prompts.ctx is model.text_prompts.ctx
    # By hand: "X X ... X anger." embedded, the context vectors in the X positions.
    clip_model, n_ctx = model.clip, model.text_prompts.n_ctx
    tokens = tokenize([" ".join(["X"] * n_ctx) + f" {c}." for c in ("anger", "contempt")])
    with torch.no_grad():
        embedded = clip_model.token_embedding(tokens)
        embedded[:, 1:1 + n_ctx] = model.text_prompts.ctx
        expected = F.normalize(clip_model.encode_text_embeddings(embedded, tokens.argmax(-1)), dim=-1)
        got, _ = novel.eval().text_features()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert model.with_classes(["happiness", "sadness"]) is model
    specific = MPAFER(tiny_clip(), ["happiness"], None, MPAFERConfig(
        soft_hard_alignment=False, prototype_alignment=False, class_specific_ctx=True))
    with pytest.raises(ValueError, match="class-specific context"):
        specific.with_classes(["anger"])


@pytest.fixture(scope="module")
def demo_b2n(tmp_path_factory):
    """A base-to-novel demo run on a tiny CLIP: 4 base classes of 7, in-process."""
    root = tmp_path_factory.mktemp("b2n")
    clip_file = str(root / "clip.pt")
    torch.save(tiny_state_dict(seed=0), clip_file)
    out = root / "run"
    args = list(quick_demo(out, clip_file, "--epochs", "3", "--top-k", "4", per_class=12)[1:])
    load_script("train").main([*args, "--base-classes", "neutral,happiness,surprise,sadness"])
    return out


def test_base_to_novel_trains_on_base_and_reports_base_novel_hm_and_zero_shot(demo_b2n, capsys):
    out = demo_b2n
    best = load_checkpoint(str(out / "best.pt"))
    assert best["classnames"] == ["neutral", "happiness", "surprise", "sadness"]
    test = json.loads((out / "test.json").read_text())
    assert set(test) >= {"base", "novel", "all", "hm", "war", "uar"}
    assert test["hm"] == pytest.approx(harmonic_mean(test["base"]["war"], test["novel"]["war"]))
    assert test["war"] == test["all"]["war"] and test["num_samples"] == 7 * 4
    assert test["base"]["num_samples"] == 16 and test["novel"]["num_samples"] == 12
    baseline = json.loads((out / "baseline.json").read_text())
    assert set(baseline["zero_shot_hard_prompts"]) >= {"base", "novel", "all", "hm"}
    records = read_jsonl(out / "metrics.jsonl")
    assert all(set(r["base_to_novel"]) == {"base", "novel", "all", "hm"} for r in records)
    log = (out / "log.txt").read_text()
    assert "zero-shot CLIP, hard prompts" in log and "MPA-FER, trained on base" in log
    assert "base-to-novel" in log and "novel" in log and "HM" in log


def test_best_pt_is_chosen_on_base_classes_only(demo_b2n):
    """Every epoch's selection WAR is that of the base classes among the base classes, and
    best.pt is the epoch where it peaked, whatever the novel classes did."""
    records = read_jsonl(demo_b2n / "metrics.jsonl")
    for r in records:  # the selection set is the test split's base images
        assert r["war"] == pytest.approx(r["base_to_novel"]["base"]["war"])
        assert set(r["per_class_recall"]) == {"neutral", "happiness", "surprise", "sadness"}
    chosen = max(records, key=lambda r: r["war"])  # the first epoch with the best base WAR
    assert load_checkpoint(str(demo_b2n / "best.pt"))["epoch"] == chosen["epoch"]
    test = json.loads((demo_b2n / "test.json").read_text())
    assert test["epoch"] == chosen["epoch"] and test["chosen_on"] == "test base"


def test_the_printed_evaluation_command_works_as_printed(demo_b2n):
    """The command the run prints to evaluate best.pt, run as printed: the base classes are the
    seen ones, the novel ones are scored through the learned context."""
    log = (demo_b2n / "log.txt").read_text()
    (command,) = [line.split("evaluate it with: ", 1)[1] for line in log.splitlines()
                  if "evaluate it with: " in line]
    python, script, *args = shlex.split(command)
    assert (python, script) == ("python", "eval.py")
    out = demo_b2n.parent / "printed.json"
    run(script, *args, "--json", str(out))
    result = json.loads(out.read_text())
    assert result["seen"]["classes"] == ["neutral", "happiness", "surprise", "sadness"]
    assert result["unseen"]["classes"] == ["anger", "disgust", "fear"]
    assert result["num_samples"] == 7 * 4


def test_base_classes_are_checked_in_one_line(tmp_path, capsys):
    train = load_script("train")
    clip_file = tmp_path / "clip.pt"
    torch.save(tiny_state_dict(seed=0), clip_file)
    args = list(quick_demo(tmp_path / "run", str(clip_file), "--epochs", "1")[1:])
    with pytest.raises(ValueError, match="--base-classes: contempt not a class of the data"):
        train.main([*args, "--base-classes", "neutral,contempt"])
    every = "neutral,happiness,surprise,sadness,anger,disgust,fear"
    with pytest.raises(ValueError, match="leave at least one class out as novel"):
        train.main([*args, "--base-classes", every])
    with pytest.raises(SystemExit):
        train.run_config([*args, "--base-classes", "neutral", "--class-specific-ctx"])
    assert "needs the shared context" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


# -- cross-dataset: eval.py --class-set ------------------------------------------------------------

def write_folder(root, classes):
    for i, name in enumerate(classes):
        for j in range(3):
            path = root / "test" / name / f"{j}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 40), (50 * i, 90 + 20 * j, 30)).save(path)


@pytest.fixture(scope="module")
def checkpoint_on_three(tmp_path_factory):
    """A checkpoint trained (as far as eval.py can tell) on happiness, sadness, anger."""
    root = tmp_path_factory.mktemp("cross")
    _, _, path = untrained_checkpoint(root, ["happiness", "sadness", "anger"])
    write_folder(root / "faces", ["happiness", "sadness", "fear", "anger"])
    return root, path


def test_other_classes_are_refused_naming_both_class_sets(checkpoint_on_three):
    root, checkpoint = checkpoint_on_three
    with pytest.raises(ValueError, match="--class-set shared evaluates .* --class-set open"):
        load_script("eval").main(["--checkpoint", checkpoint, "--dataset", "folder",
                                  "--data-root", str(root / "faces"), "--workers", "0"])


def test_class_set_shared_leaves_out_the_unknown_classes(checkpoint_on_three, tmp_path, capsys):
    root, checkpoint = checkpoint_on_three
    out = tmp_path / "shared.json"
    load_script("eval").main(["--checkpoint", checkpoint, "--dataset", "folder", "--data-root",
                              str(root / "faces"), "--workers", "0", "--class-set", "shared",
                              "--json", str(out)])
    printed = capsys.readouterr().out
    assert "the 3 classes both have (happiness, sadness, anger); left out: 3 images of fear" in printed
    result = json.loads(out.read_text())
    assert result["classnames"] == ["happiness", "sadness", "anger"] and result["num_samples"] == 9


def test_class_set_open_scores_unseen_classes_through_the_context(checkpoint_on_three, tmp_path,
                                                                  capsys):
    root, checkpoint = checkpoint_on_three
    out = tmp_path / "open.json"
    load_script("eval").main(["--checkpoint", checkpoint, "--dataset", "folder", "--data-root",
                              str(root / "faces"), "--workers", "0", "--class-set", "open",
                              "--json", str(out)])
    result = json.loads(out.read_text())
    names = result["classnames"]
    assert sorted(names) == ["anger", "fear", "happiness", "sadness"]
    assert result["num_samples"] == 12
    assert sorted(result["seen"]["classes"]) == ["anger", "happiness", "sadness"]
    assert result["unseen"]["classes"] == ["fear"] and result["unseen"]["num_samples"] == 3
    # By hand from the confusion matrix: the seen images classified right, over 9.
    confusion, seen = result["confusion"], [names.index(c) for c in ("happiness", "sadness", "anger")]
    assert result["seen"]["war"] == pytest.approx(sum(confusion[i][i] for i in seen) / 9)
    fear = names.index("fear")
    assert result["unseen"]["war"] == pytest.approx(confusion[fear][fear] / 3)
    assert "unseen classes (3 images)" in capsys.readouterr().out


def test_class_set_with_the_same_classes_is_a_note(checkpoint_on_three, tmp_path, capsys):
    root, checkpoint = checkpoint_on_three
    write_folder(tmp_path / "same", ["anger", "happiness", "sadness"])
    load_script("eval").main(["--checkpoint", checkpoint, "--dataset", "folder", "--data-root",
                              str(tmp_path / "same"), "--workers", "0", "--class-set", "open"])
    assert "note: --class-set open: the data has the checkpoint's classes" in capsys.readouterr().out
