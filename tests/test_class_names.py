"""Class names map through the usual synonyms and ignore case everywhere: --classnames,
--base-classes, the descriptions, and a checkpoint evaluated on data that spells its classes
otherwise (`eval.py`, with and without --class-set)."""
import json
import os

import pytest

from mpafer.app.protocol import base_classes
from mpafer.data import FolderDataset
from mpafer.labels import canonical_name, match_classes
from mpafer.prompts import load_descriptions
from tests.dataset_writers import save_image
from tests.helpers import load_script, untrained_checkpoint

# The widely shared FER2013 image folders, in the order a user lists them.
FER2013_FOLDERS = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
CANONICAL = ["anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral"]


def test_names_map_to_canonical_classes_in_any_case():
    assert [canonical_name(n) for n in FER2013_FOLDERS] == CANONICAL
    assert [canonical_name(n) for n in ("Happy", " SAD ", "Happiness", "Fearful")] == [
        "happiness", "sadness", "happiness", "fear"]
    assert canonical_name("Excited") == "Excited"  # not a canonical class: kept as given
    assert match_classes(["Happy", "ANGRY", "calm", "excited"],
                         ["happiness", "anger", "Calm"]) == (["happiness", "anger", "Calm"],
                                                             ["excited"])


def test_classnames_with_fer2013_folder_names_give_canonical_classes_with_descriptions(tmp_path):
    """--classnames angry,disgust,...: the folders are read in that label order, reported under
    the canonical names, and the shipped descriptions cover every one."""
    for i, folder in enumerate(FER2013_FOLDERS):
        save_image(os.path.join(tmp_path, "train", folder, f"{i}.png"), (30 * i, 2, 3))
    data = FolderDataset(str(tmp_path), "train", classnames=FER2013_FOLDERS)
    assert list(data.classnames) == CANONICAL and data.targets == list(range(7))
    assert [os.path.basename(os.path.dirname(p)) for p in data.paths] == FER2013_FOLDERS
    descriptions = load_descriptions(list(data.classnames))
    assert set(descriptions) == set(CANONICAL) and all(descriptions.values())
    with pytest.raises(ValueError, match="name one class twice"):
        FolderDataset(str(tmp_path), "train", classnames=[*FER2013_FOLDERS, "Happiness"])


def test_base_classes_match_by_synonym_and_case():
    classes = ("neutral", "happiness", "surprise", "sadness", "anger")
    assert base_classes("Happy, sad,NEUTRAL", classes) == ["happiness", "sadness", "neutral"]
    with pytest.raises(ValueError, match="--base-classes: calm not a class of the data"):
        base_classes("happy,calm", classes)
    with pytest.raises(ValueError, match="--base-classes names one class twice"):
        base_classes("happy,happiness", classes)


@pytest.fixture(scope="module")
def capitalised_checkpoint(tmp_path_factory):
    """A checkpoint whose classes are spelled Happy, Sad, Angry (as --classnames gave them before
    names were mapped), and folders named happy, sad, angry, fear."""
    root = tmp_path_factory.mktemp("spelling")
    clip_file, _, path = untrained_checkpoint(root, ["Happy", "Sad", "Angry"])
    for folders, name in ((["happy", "sad", "angry"], "same"),
                          (["happy", "sad", "angry", "fear"], "more")):
        for i, folder in enumerate(folders):
            for j in range(2):
                save_image(os.path.join(root, name, "test", folder, f"{j}.png"),
                           (60 * i, 40 + 80 * j, 30))
    return root, path


def evaluate(root, checkpoint, data, *extra):
    out = root / f"{data}{'-'.join(extra)}.json"
    load_script("eval").main(["--checkpoint", checkpoint, "--dataset", "folder", "--data-root",
                              str(root / data), "--workers", "0", "--json", str(out), *extra])
    return json.loads(out.read_text())


def test_a_checkpoint_evaluates_on_folders_that_spell_its_classes_otherwise(
        capitalised_checkpoint):
    root, checkpoint = capitalised_checkpoint
    result = evaluate(root, checkpoint, "same")
    assert sorted(result["classnames"]) == ["Angry", "Happy", "Sad"]
    assert result["num_samples"] == 6


def test_class_sets_match_classes_by_synonym_and_case(capitalised_checkpoint, capsys):
    root, checkpoint = capitalised_checkpoint
    shared = evaluate(root, checkpoint, "more", "--class-set", "shared")
    assert sorted(shared["classnames"]) == ["Angry", "Happy", "Sad"]
    assert shared["num_samples"] == 6
    assert "left out: 2 images of fear" in capsys.readouterr().out
    opened = evaluate(root, checkpoint, "more", "--class-set", "open")
    assert sorted(opened["seen"]["classes"]) == ["Angry", "Happy", "Sad"]
    assert opened["unseen"]["classes"] == ["fear"] and opened["num_samples"] == 8
