"""What runs print and write: counts in the number they take ("1 image"), n/a (JSON null) where
there is nothing to score, help text for every evaluation flag, a zero-shot baseline for runs
whose hard prompts need no descriptions, and the demo CLIP's activation recorded beside it."""
import json
import shutil

import pytest
import torch
from PIL import Image

from mpafer import clip
from mpafer.app.demo import DEMO_CLIP_FILE, demo_clip_path
from mpafer.app.protocol import Splits, record_baselines
from mpafer.data import FolderDataset
from mpafer.metrics import format_report, over_classes
from mpafer.model import MPAFER, MPAFERConfig
from mpafer.progress import counted
from tests.helpers import load_script, run, tiny_state_dict, untrained_checkpoint


def test_counts_take_the_number_of_their_count():
    assert [counted(n, "image") for n in (0, 1, 2)] == ["0 images", "1 image", "2 images"]
    assert counted(1, "class") == "1 class" and counted(3, "class") == "3 classes"
    assert counted(2, "epoch") == "2 epochs" and counted(2, "batch", "batches") == "2 batches"
    one = {"war": 1.0, "uar": 1.0, "num_samples": 1, "classnames": ["fear"],
           "per_class_recall": {"fear": 1.0}, "support": {"fear": 1}, "confusion": [[1]]}
    assert "(1 image)" in format_report(one) and "1 images" not in format_report(one)


def test_classes_without_an_image_score_none_not_zero():
    # Two classes, 3 images of happiness (2 right), none of fear.
    metrics = {"classnames": ["happiness", "fear"], "confusion": [[2, 1], [0, 0]]}
    assert over_classes(metrics, ["fear"]) == {"war": None, "uar": None, "num_samples": 0,
                                               "classes": ["fear"]}
    assert over_classes(metrics, ["happiness"])["war"] == pytest.approx(2 / 3)


def write_faces(root, split, classes, per_class=2):
    for i, name in enumerate(classes):
        for j in range(per_class):
            path = root / split / name / f"{j}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 40), (60 * i, 40 + 80 * j, 30)).save(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny CLIP file and a checkpoint trained (as far as eval.py can tell) on three classes."""
    root = tmp_path_factory.mktemp("wording")
    return (root, *untrained_checkpoint(root, ["happiness", "sadness", "anger"]))


def test_class_set_open_without_an_unseen_image_prints_n_a_and_writes_null(tiny, tmp_path,
                                                                           capsys):
    """The data has a class the checkpoint never saw (fear, a folder of the train split), but the
    evaluated split has no image of it: its scores are n/a and null, not 0%."""
    _, _, _, checkpoint = tiny
    faces = tmp_path / "faces"
    write_faces(faces, "test", ["happiness", "sadness", "anger"])
    write_faces(faces, "train", ["fear"], per_class=1)
    out = tmp_path / "open.json"
    with pytest.warns(UserWarning, match="no images for class"):
        load_script("eval").main(["--checkpoint", checkpoint, "--dataset", "folder",
                                  "--data-root", str(faces), "--workers", "0", "--class-set",
                                  "open", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["unseen"] == {"war": None, "uar": None, "num_samples": 0, "classes": ["fear"]}
    assert result["seen"]["num_samples"] == 6
    printed = capsys.readouterr().out
    assert "unseen classes (0 images): WAR n/a  UAR n/a" in printed
    assert "WAR 0.00%" not in printed.split("unseen classes")[1]


def test_every_evaluation_flag_has_help():
    text = run("eval.py", "--help").stdout
    for flag, words in (("--device", "cuda if available"), ("--amp", "bf16"),
                        ("--batch-size", "images per evaluation batch"),
                        ("--workers", "DataLoader workers"), ("--method", "Exp-CLIP")):
        block = text.split(f"  {flag}", 1)[1].split("\n  -", 1)[0]
        assert words in " ".join(block.split()), (flag, block)


class Log(list):
    def __call__(self, line=""):
        self.append(line)


class FakeRun:
    """What `record_baselines` uses of a run: its settings, log, precision and folder."""

    def __init__(self, folder):
        self.cfg = type("Cfg", (), {"batch_size": 4, "workers": 0})()
        self.log, self.amp, self.folder = Log(), None, folder

    def write_json(self, name, payload):
        (self.folder / name).write_text(json.dumps(payload))


def test_a_run_whose_hard_prompts_need_no_descriptions_gets_a_zero_shot_baseline(tiny, tmp_path):
    """Classes the descriptions do not cover (calm, excited): with --hard-prompt-template 2 the
    zero-shot baseline is measured with those prompts, and no line says it is missing; with
    template 3 it is missing, and the line says why."""
    _, _, clip_model, _ = tiny
    write_faces(tmp_path / "moods", "test", ["calm", "excited"])
    test = FolderDataset(str(tmp_path / "moods"), "test", classnames=["calm", "excited"])
    test.transform = lambda image: torch.rand(3, 32, 32)
    splits = Splits(train=test, selection=test, test=None, selection_name="test")
    for template, expected in ((2, True), (3, False)):
        model = MPAFER(clip_model, ["calm", "excited"], None, MPAFERConfig(
            soft_hard_alignment=False, prototype_alignment=False, top_k=4,
            hard_prompt_template=template))
        run_ = FakeRun(tmp_path)
        measured = record_baselines(run_, model, splits)
        line = run_.log[-1]
        assert (measured["zero_shot_hard_prompts"] is not None) == expected, template
        assert ("no zero-shot baseline" in line) == (not expected), line
        if expected:
            assert measured["hard_prompt_template"] == 2
            assert "zero-shot CLIP with the hard prompts of template 2 WAR" in line
            assert measured["zero_shot_hard_prompts"]["num_samples"] == 4


def test_the_demo_clip_records_its_activation_so_loading_it_says_nothing(tmp_path, capsys):
    """A demo CLIP file cached before the record existed gets one beside it (the file itself is
    untouched: checkpoints name it by its SHA-256); loading the file by path then prints no
    activation note. A record beside any CLIP file is honoured, and a bad one named."""
    cache = tmp_path / "cache"
    cache.mkdir()
    path = str(cache / DEMO_CLIP_FILE)
    torch.save(tiny_state_dict(seed=2), path)  # stands in for the pre-trained demo CLIP
    before = open(path, "rb").read()
    clip.load(path, device="cpu")
    assert "does not say which activation" in capsys.readouterr().out  # no record yet
    assert demo_clip_path(str(cache)) == path
    assert open(path, "rb").read() == before
    assert json.loads(open(path + ".json").read()) == {"activation": "quick_gelu"}
    model, _ = clip.load(path, device="cpu")
    assert model.activation == "quick_gelu"
    assert "does not say which activation" not in capsys.readouterr().out
    other = str(tmp_path / "gelu.pt")
    shutil.copy(path, other)
    with open(other + ".json", "w") as f:
        json.dump({"activation": "gelu"}, f)
    assert clip.load(other, device="cpu")[0].activation == "gelu"
    with open(other + ".json", "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match=r"gelu\.pt\.json: not a readable activation record"):
        clip.load(other, device="cpu")
