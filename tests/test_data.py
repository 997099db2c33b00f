"""mpafer.data: dataset readers on tiny fixtures in each official layout, transforms, sampler,
synthetic faces."""
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mpafer.app.synthetic import SyntheticFaces
from mpafer.data import (
    AFFECTNET_CLASSES,
    CANONICAL_CLASSES,
    RAFDB,
    RAFDB_CLASSES,
    AffectNet,
    ClassBalancedSampler,
    FERPlus,
    FolderDataset,
    build_dataset,
    eval_transform,
    expclip_transform,
    ferplus_vote,
    format_class_counts,
    train_transform,
)
from tests.dataset_writers import (
    rafdb_colour,
    save_image,
    write_affectnet_csv,
    write_affectnet_per_image,
    write_corrupt_jpeg,
    write_ferplus_csvs,
    write_ferplus_folder,
    write_rafdb,
    write_synthetic_rafdb,
    write_truncated_jpeg,
)

NO_VOTES = [0] * 10


def votes(**counts):
    names = list(CANONICAL_CLASSES) + ["unknown", "NF"]
    out = [0] * 10
    for name, n in counts.items():
        out[names.index(name)] = n
    return out


def mean_colour(image):
    return np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(0)


# ----------------------------------------------------------------------------- RAF-DB

RAF_ENTRIES = [("train_00001.jpg", 1), ("train_00002.jpg", 4), ("train_00003.jpg", 4),
               ("train_00004.jpg", 7), ("train_00005.jpg", 2), ("test_0001.jpg", 5),
               ("test_0002.jpg", 6), ("test_0003.jpg", 3)]


@pytest.fixture
def rafdb_root(tmp_path):
    return write_rafdb(str(tmp_path / "raf"), RAF_ENTRIES, grey={"test_0003.jpg"})


def test_rafdb_paths_labels_splits(rafdb_root):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # small fixtures must not warn about official sizes
        train = RAFDB(rafdb_root, "train")
        test = RAFDB(rafdb_root, "test")
    assert train.classnames == ("surprise", "fear", "disgust", "happiness", "sadness", "anger",
                                "neutral")
    assert train.targets == [0, 3, 3, 6, 1] and test.targets == [4, 5, 2]
    assert train.class_counts() == [1, 1, 0, 2, 0, 0, 1]
    assert train.paths[3] == os.path.join(rafdb_root, "Image", "aligned",
                                          "train_00004_aligned.jpg")
    assert [train.classnames[t] for t in train.targets] == [
        "surprise", "happiness", "happiness", "neutral", "fear"]
    for i, (image, label) in enumerate(train):  # each item is its own file's picture
        assert image.mode == "RGB"
        assert np.abs(mean_colour(image) - rafdb_colour(i, label + 1)).max() < 3
    grey, _ = test[2]
    assert grey.mode == "RGB" and np.allclose(mean_colour(grey), 128, atol=2)


def test_rafdb_batches_through_dataloader_and_pickles(rafdb_root):
    dataset = RAFDB(rafdb_root, "train", transform=eval_transform(24))
    copy = pickle.loads(pickle.dumps(dataset))  # what spawn-started workers receive
    assert copy.targets == dataset.targets and torch.equal(copy[2][0], dataset[2][0])
    sampler = ClassBalancedSampler(dataset.targets, num_samples=8)
    x, y = next(iter(torch.utils.data.DataLoader(dataset, batch_size=8, sampler=sampler)))
    assert x.shape == (8, 3, 24, 24) and x.dtype == torch.float32
    assert set(y.tolist()) <= set(dataset.targets)


def _write_full_size_rafdb_labels(root, counts):
    # Only the label file (and an empty image folder): the size check runs before the images
    # are looked for, and writing 12k images would make this test slow.
    os.makedirs(os.path.join(root, "EmoLabel"))
    os.makedirs(os.path.join(root, "Image", "aligned"))
    with open(os.path.join(root, "EmoLabel", "list_patition_label.txt"), "w") as f:
        n = 0
        for label, count in enumerate(counts, start=1):
            for _ in range(count):
                n += 1
                f.write(f"train_{n:05d}.jpg {label}\n")


def test_rafdb_full_split_checked_against_official_counts(tmp_path):
    official = [1290, 281, 717, 4772, 1982, 705, 2524]
    _write_full_size_rafdb_labels(str(tmp_path / "ok"), official)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning, only the missing images
        with pytest.raises(FileNotFoundError, match="12271 image"):
            RAFDB(str(tmp_path / "ok"), "train")
    damaged = list(official)
    damaged[1] -= 50
    _write_full_size_rafdb_labels(str(tmp_path / "bad"), damaged)
    with pytest.warns(UserWarning, match="12271") as record, pytest.raises(FileNotFoundError):
        RAFDB(str(tmp_path / "bad"), "train")
    message = str(record[0].message)
    assert "12221 images" in message and "231" in message and "281" in message


def test_rafdb_errors(tmp_path, rafdb_root):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere") as error:
        RAFDB(missing, "train")
    assert "list_patition_label.txt" in str(error.value)  # the expected layout is shown

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as error:
        RAFDB(str(empty), "train")
    message = str(error.value)
    assert os.path.join(str(empty), "EmoLabel", "list_patition_label.txt") in message
    assert "Image/aligned/<stem>_aligned.jpg" in message

    with pytest.raises(ValueError, match="train, test"):
        RAFDB(rafdb_root, "val")

    label_file = os.path.join(rafdb_root, "EmoLabel", "list_patition_label.txt")
    with open(label_file, "a") as f:
        f.write("\ntrain_00009.jpg nine\n")
    with pytest.raises(ValueError, match=f"{label_file}:10"):
        RAFDB(rafdb_root, "train")
    with open(label_file, "w") as f:
        f.write("train_00001.jpg 1\ntrain_00002.jpg 8\n")
    with pytest.raises(ValueError, match=f"{label_file}:2"):
        RAFDB(rafdb_root, "train")

    with open(label_file, "w") as f:
        f.write("train_00001.jpg 1\ntrain_00099.jpg 2\n")
    with pytest.raises(FileNotFoundError, match="train_00099_aligned.jpg"):
        RAFDB(rafdb_root, "train")


# ----------------------------------------------------------------------------- bad images

def test_corrupt_and_truncated_images_raise_or_are_skipped(rafdb_root):
    aligned = os.path.join(rafdb_root, "Image", "aligned")
    corrupt = write_corrupt_jpeg(os.path.join(aligned, "train_00002_aligned.jpg"))
    truncated = write_truncated_jpeg(os.path.join(aligned, "train_00004_aligned.jpg"))

    strict = RAFDB(rafdb_root, "train")
    assert len(strict) == 5
    strict[0]  # good images still load
    for index, path in ((1, corrupt), (3, truncated)):
        with pytest.raises(OSError, match=path):
            strict[index]

    with pytest.warns(UserWarning, match="skipped 2 unreadable image"):
        lenient = RAFDB(rafdb_root, "train", skip_bad_images=True)
    assert sorted(lenient.skipped) == sorted([corrupt, truncated])
    assert len(lenient) == 3 and lenient.targets == [0, 3, 1]
    assert all(image.mode == "RGB" for image, _ in lenient)

    label_file = os.path.join(rafdb_root, "EmoLabel", "list_patition_label.txt")
    with open(label_file, "w") as f:
        f.write("train_00002.jpg 4\ntrain_00004.jpg 7\n")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="none of the 2 images"):
        RAFDB(rafdb_root, "train", skip_bad_images=True)


# ----------------------------------------------------------------------------- AffectNet

AFFECTNET_TRAIN = [  # (path, (x, y, w, h), code, colour inside the box)
    ("101/a.jpg", (10, 20, 50, 40), 0, (250, 0, 0)),
    ("101/b.jpg", (60, 5, 40, 60), 1, (0, 250, 0)),
    ("102/c.jpg", (0, 0, 30, 30), 7, (0, 0, 250)),
    ("102/d.jpg", (5, 5, 20, 20), 8, (250, 250, 0)),
    ("103/e.jpg", (5, 5, 20, 20), 10, (250, 0, 250)),
    ("103/f.jpg", (30, 30, 40, 40), 6, (0, 250, 250)),
]
AFFECTNET_VAL = [("201/g.jpg", (10, 10, 40, 40), 3, (250, 120, 0)),
                 ("201/h.jpg", (10, 10, 40, 40), 7, (120, 0, 250))]


@pytest.fixture
def affectnet_csv_root(tmp_path):
    root = str(tmp_path / "affectnet")
    os.makedirs(root)
    write_affectnet_csv(root, "training.csv", AFFECTNET_TRAIN)
    write_affectnet_csv(root, "validation.csv", AFFECTNET_VAL)
    return root


def test_affectnet_csv_classes_and_face_box_crop(affectnet_csv_root):
    seven = AffectNet(affectnet_csv_root, "train", num_classes=7)
    eight = AffectNet(affectnet_csv_root, "train", num_classes=8)
    assert seven.classnames == ("neutral", "happiness", "sadness", "surprise", "fear", "disgust",
                                "anger")
    assert eight.classnames == AFFECTNET_CLASSES and eight.classnames[7] == "contempt"
    assert seven.targets == [0, 1, 6]  # contempt (7) and codes 8, 10 dropped
    assert eight.targets == [0, 1, 7, 6]  # codes >= 8 dropped
    assert eight.paths[2] == os.path.join(affectnet_csv_root, "Manually_Annotated_Images",
                                          "102", "c.jpg")
    assert eight.class_counts() == [1, 1, 0, 0, 0, 0, 1, 1]

    rows = [r for r in AFFECTNET_TRAIN if r[2] < 8]
    for i, (image, label) in enumerate(eight):
        _, (x, y, w, h), code, colour = rows[i]
        assert label == code and image.size == (w, h)
        pixels = np.asarray(image, dtype=np.int64).reshape(-1, 3)
        # Only the box's colour: not one grey background pixel made it into the crop.
        assert np.abs(pixels - colour).max() < 40, (i, pixels.min(0), pixels.max(0))


def test_affectnet_splits_and_val_alias(affectnet_csv_root):
    test = AffectNet(affectnet_csv_root, "test", num_classes=8)
    val = AffectNet(affectnet_csv_root, "val", num_classes=8)
    assert test.targets == val.targets == [3, 7]
    assert test.paths == val.paths
    assert AffectNet(affectnet_csv_root, "test", num_classes=7).targets == [3]
    with pytest.raises(ValueError, match="train, test, val"):
        AffectNet(affectnet_csv_root, "training")
    with pytest.raises(ValueError, match="7 or 8"):
        AffectNet(affectnet_csv_root, "train", num_classes=6)


def test_affectnet_box_outside_image_is_clamped(tmp_path):
    root = str(tmp_path)
    write_affectnet_csv(root, "training.csv", [("1/a.jpg", (100, 80, 40, 40), 2, (0, 0, 250))],
                        image_size=(120, 100))
    image, label = AffectNet(root, "train")[0]
    assert label == 2 and image.size == (20, 20)  # the part of the box inside the picture


def test_affectnet_csv_errors(affectnet_csv_root, tmp_path):
    path = os.path.join(affectnet_csv_root, "training.csv")
    lines = open(path).read().splitlines()
    header = lines[0].replace(",face_height", "").replace(",expression", "")
    with open(path, "w") as f:
        f.write("\n".join([header] + lines[1:]) + "\n")
    with pytest.raises(ValueError) as error:
        AffectNet(affectnet_csv_root, "train")
    assert path in str(error.value)
    assert "face_height" in str(error.value) and "expression" in str(error.value)

    fields = lines[3].split(",")
    fields[-3] = "happy"
    with open(path, "w") as f:
        f.write("\n".join(lines[:3] + [",".join(fields)] + lines[4:]) + "\n")
    with pytest.raises(ValueError, match=f"{path}:4"):
        AffectNet(affectnet_csv_root, "train")

    with pytest.raises(FileNotFoundError) as error:
        AffectNet(str(tmp_path / "none"), "train")
    assert str(tmp_path / "none") in str(error.value)
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(FileNotFoundError) as error:
        AffectNet(str(bare), "test")
    message = str(error.value)
    assert os.path.join(str(bare), "validation.csv") in message and "val_set" in message
    assert "Manually_Annotated_Images" in message and "_exp.npy" in message


def test_affectnet_per_image_release(tmp_path):
    root = str(tmp_path)
    write_affectnet_per_image(root, "train_set", [("10", 3, True), ("11", 7, False),
                                                  ("12", 9, True), ("13", 0, False)])
    write_affectnet_per_image(root, "val_set", [("20", 6, True), ("21", 7, True)])
    train7 = AffectNet(root, "train", num_classes=7)
    train8 = AffectNet(root, "train", num_classes=8)
    assert train7.targets == [3, 0] and train8.targets == [3, 7, 0]
    assert train8.paths[1] == os.path.join(root, "train_set", "images", "11.jpg")
    assert AffectNet(root, "test", num_classes=8).targets == [6, 7]
    image, label = train8[1]
    assert label == 7 and image.mode == "RGB" and np.allclose(mean_colour(image), (70, 50, 50), atol=3)

    os.remove(os.path.join(root, "val_set", "annotations", "21_exp.npy"))
    with pytest.raises(FileNotFoundError, match="21_exp.npy"):
        AffectNet(root, "test")
    bad = os.path.join(root, "val_set", "annotations", "21_exp.npy")
    np.save(bad, np.array([{"code": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="21_exp.npy"):  # pickles are refused
        AffectNet(root, "test")


# ----------------------------------------------------------------------------- FERPlus

@pytest.mark.parametrize("row, expected", [
    (votes(neutral=10), 0),
    (votes(surprise=6, fear=4), 2),                       # 6 > 5
    (votes(neutral=5, happiness=5), None),                # a tie is no majority
    (votes(neutral=4, happiness=2, surprise=4), None),    # 4 is not more than half of 10
    # The four 1-vote outliers are zeroed first: 5 of the remaining 5 wins.
    (votes(neutral=5, happiness=1, surprise=1, sadness=1, unknown=1, NF=1), 0),
    (votes(neutral=4, sadness=1, anger=3, disgust=2), None),  # 4 of 9 after zeroing
    (votes(contempt=6, unknown=2, NF=2), 7),
    (votes(NF=10), None),                                 # not a face
    (votes(happiness=1, unknown=8, NF=1), None),          # unknown wins
    ([1] * 10, None),                                     # every vote is an outlier
    (NO_VOTES, None),
])
def test_ferplus_vote(row, expected):
    assert ferplus_vote(row) == expected


def test_ferplus_vote_rejects_wrong_length():
    with pytest.raises(ValueError, match="10"):
        ferplus_vote([1, 2, 3])


FERPLUS_ROWS = [  # (Usage, Image name, votes) -> expected label in canonical order
    ("Training", "fer0000000.png", votes(happiness=10)),                # 1
    ("Training", "fer0000001.png", votes(neutral=5, happiness=5)),      # tie: dropped
    ("Training", "", votes(anger=10)),                                  # no image name: dropped
    ("Training", "fer0000003.png", votes(fear=7, neutral=1, NF=2)),     # 6
    ("Training", "fer0000004.png", votes(NF=9, neutral=1)),             # not a face: dropped
    ("Training", "fer0000005.png", votes(unknown=6, sadness=4)),        # unknown: dropped
    ("Training", "fer0000006.png", votes(contempt=6, disgust=4)),       # 7
    ("PublicTest", "fer0000007.png", votes(sadness=9, anger=1)),        # 3
    ("PrivateTest", "fer0000008.png", votes(anger=6, disgust=3, fear=1)),  # 4
    ("PrivateTest", "fer0000009.png", votes(surprise=10)),              # 2
]


def test_ferplus_csv(tmp_path):
    root = write_ferplus_csvs(str(tmp_path), FERPLUS_ROWS)
    train = FERPlus(root, "train")
    assert train.classnames == CANONICAL_CLASSES
    assert train.targets == [1, 6, 7]
    assert train.image_names == ["fer0000000.png", "fer0000003.png", "fer0000006.png"]
    assert train.class_counts() == [0, 1, 0, 0, 0, 0, 1, 1]
    for (image, _), row in zip(train, (0, 3, 6)):
        assert image.mode == "RGB" and image.size == (48, 48)
        assert (np.asarray(image) == row).all()  # the pixels of the matching fer2013.csv row
    assert FERPlus(root, "val").targets == [3]
    test = FERPlus(root, "test", transform=train_transform(32))
    assert test.targets == [4, 2]
    x, y = test[0]
    assert x.shape == (3, 32, 32) and y == 4
    with pytest.raises(ValueError, match="train, val, test"):
        FERPlus(root, "PublicTest")


def _rewrite(path, edit):
    lines = open(path).read().splitlines()
    with open(path, "w") as f:
        f.write("\n".join(edit(lines)) + "\n")


def test_ferplus_csv_errors(tmp_path):
    root = write_ferplus_csvs(str(tmp_path), FERPLUS_ROWS)
    fer, new = os.path.join(root, "fer2013.csv"), os.path.join(root, "fer2013new.csv")

    _rewrite(fer, lambda lines: lines[:5] + [lines[5].replace("Training", "PublicTest")] + lines[6:])
    with pytest.raises(ValueError, match=f"{fer}:6 has Usage"):
        FERPlus(root, "train")
    write_ferplus_csvs(root, FERPLUS_ROWS)

    _rewrite(new, lambda lines: lines[:-1])
    with pytest.raises(ValueError, match="same order"):
        FERPlus(root, "train")
    write_ferplus_csvs(root, FERPLUS_ROWS)

    _rewrite(fer, lambda lines: lines[:4] + [lines[4].replace(" 3 3", " 3 x", 1)] + lines[5:])
    with pytest.raises(ValueError, match=f"{fer}:5"):
        FERPlus(root, "train")
    write_ferplus_csvs(root, FERPLUS_ROWS)

    _rewrite(new, lambda lines: [lines[0].replace(",contempt", "")] + lines[1:])
    with pytest.raises(ValueError) as error:
        FERPlus(root, "train")
    assert new in str(error.value) and "contempt" in str(error.value)

    os.remove(fer)
    with pytest.raises(FileNotFoundError) as error:
        FERPlus(root, "train")
    assert fer in str(error.value) and "FER2013Train/label.csv" in str(error.value)


def test_ferplus_exported_folders(tmp_path):
    root = str(tmp_path)
    rows = [("fer0000000.png", votes(happiness=10)), ("fer0000001.png", votes(neutral=5, sadness=5)),
            ("fer0000002.png", votes(disgust=8, NF=2)), ("fer0000003.png", votes(NF=10))]
    write_ferplus_folder(root, "FER2013Train", rows)
    write_ferplus_folder(root, "FER2013Test", rows[:1], with_box=False)
    train = FERPlus(root, "train")
    assert train.targets == [1, 5]
    assert train.paths == [os.path.join(root, "FER2013Train", "fer0000000.png"),
                           os.path.join(root, "FER2013Train", "fer0000002.png")]
    image, _ = train[1]
    assert image.mode == "RGB" and (np.asarray(image) == 20).all()
    assert FERPlus(root, "test").targets == [1]

    label_file = os.path.join(root, "FER2013Train", "label.csv")
    _rewrite(label_file, lambda lines: lines[:2] + ["fer0000009.png,1,2"] + lines[2:])
    with pytest.raises(ValueError, match=f"{label_file}:3"):
        FERPlus(root, "train")
    with pytest.raises(FileNotFoundError) as error:
        FERPlus(root, "val")
    assert "fer2013.csv" in str(error.value) and "FER2013Valid" in str(error.value)


# ----------------------------------------------------------------------------- folders

def test_folder_dataset(tmp_path):
    root = str(tmp_path)
    for split, cls, name in [("train", "happiness", "a.jpg"), ("train", "happiness", "b.PNG"),
                             ("train", "neutral", "c.jpg"), ("train", "fear", "d.webp"),
                             ("test", "fear", "e.bmp"), ("test", "neutral", "f.jpeg")]:
        save_image(os.path.join(root, split, cls, name), (1, 2, 3))
    with open(os.path.join(root, "train", "neutral", "notes.txt"), "w") as f:
        f.write("not an image")
    train = FolderDataset(root, "train")
    assert train.classnames == ("neutral", "happiness", "fear")  # canonical order
    assert train.targets == [0, 1, 1, 2]
    assert train.paths[2] == os.path.join(root, "train", "happiness", "b.PNG")
    # The test split has no happiness folder but keeps the same label indices.
    with pytest.warns(UserWarning, match="happiness"):
        test = FolderDataset(root, "test")
    assert test.classnames == train.classnames and test.targets == [0, 2]

    explicit = FolderDataset(root, "train", classnames=["fear", "happiness", "neutral"])
    assert explicit.targets == [0, 1, 1, 2]
    with pytest.raises(ValueError, match="neutral"):
        FolderDataset(root, "train", classnames=["fear", "happiness"])

    save_image(os.path.join(root, "train", "joyful", "x.jpg"), (1, 2, 3))
    with pytest.raises(ValueError, match="'joyful' is not a class name.*--classnames"):
        FolderDataset(root, "train")
    with pytest.raises(FileNotFoundError) as error:
        FolderDataset(root, "val")
    assert os.path.join(root, "val") in str(error.value) and "train" in str(error.value)


def test_val_split_may_be_a_validation_or_valid_folder(tmp_path):
    # Exports spell the val split out; the reader finds it under either name, paths included.
    for folder in ("validation", "valid"):
        root = str(tmp_path / folder)
        save_image(os.path.join(root, "train", "happiness", "a.png"), (1, 2, 3))
        save_image(os.path.join(root, "train", "neutral", "b.png"), (1, 2, 3))
        save_image(os.path.join(root, folder, "fear", "c.png"), (1, 2, 3))  # only here
        save_image(os.path.join(root, folder, "neutral", "d.png"), (1, 2, 3))
        with pytest.warns(UserWarning, match="happiness"):
            val = FolderDataset(root, "val")
        assert val.classnames == ("neutral", "happiness", "fear")  # fear found in val too
        assert val.paths == [os.path.join(root, folder, "neutral", "d.png"),
                             os.path.join(root, folder, "fear", "c.png")]
        assert val.targets == [0, 2]
        assert val.class_folder("fear") == os.path.join(root, folder, "fear")
        with pytest.warns(UserWarning, match="fear"):
            assert FolderDataset(root, "train").classnames == val.classnames
        assert np.asarray(val[0][0])[0, 0].tolist() == [1, 2, 3]
    with pytest.raises(FileNotFoundError, match="validation"):  # the error names what is there
        FolderDataset(str(tmp_path / "validation"), "test")


def test_folder_names_may_be_synonyms_in_any_case(tmp_path):
    # FER2013's folder names (adjectives, capitalised) map onto the canonical classes.
    root = str(tmp_path)
    layout = [("train", "Happy"), ("train", "sad"), ("train", "ANGRY"), ("train", "Surprised"),
              ("train", "fearful"), ("train", "Disgusted"), ("train", "contemptuous"),
              ("train", "Neutral"), ("test", "happiness"), ("test", "Sad")]
    for i, (split, folder) in enumerate(layout):
        save_image(os.path.join(root, split, folder, f"{i}.png"), (i, 2, 3))
    train = FolderDataset(root, "train")
    assert train.classnames == CANONICAL_CLASSES  # every class, in canonical order
    by_class = {train.classnames[t]: os.path.basename(os.path.dirname(p))
                for t, p in zip(train.targets, train.paths)}
    assert by_class == {"neutral": "Neutral", "happiness": "Happy", "surprise": "Surprised",
                        "sadness": "sad", "anger": "ANGRY", "disgust": "Disgusted",
                        "fear": "fearful", "contempt": "contemptuous"}
    with pytest.warns(UserWarning, match="no images for class"):
        test = FolderDataset(root, "test")  # other spellings in another split: same indices
    assert test.classnames == train.classnames
    assert [test.classnames[t] for t in test.targets] == ["happiness", "sadness"]

    save_image(os.path.join(root, "train", "happiness", "x.png"), (1, 2, 3))
    with pytest.raises(ValueError, match="'Happy' and 'happiness' both mean 'happiness'"):
        FolderDataset(root, "train")


def test_numbered_folders_ask_for_names_and_other_names_for_classnames(tmp_path):
    numbered = str(tmp_path / "numbered")
    for label in range(3):
        save_image(os.path.join(numbered, "train", str(label), "a.png"), (label, 2, 3))
    with pytest.raises(ValueError, match=r"numbered \(0, 1, 2\).*rename them to class names"):
        FolderDataset(numbered, "train")
    named = str(tmp_path / "named")
    for name in ("calm", "excited"):
        save_image(os.path.join(named, "train", name, "a.png"), (1, 2, 3))
    with pytest.raises(ValueError, match="'calm' is not a class name.*--classnames a,b,c"):
        FolderDataset(named, "train")
    explicit = FolderDataset(named, "train", classnames=["excited", "calm"])
    assert explicit.classnames == ("excited", "calm") and explicit.targets == [0, 1]


# ----------------------------------------------------------------------------- factory

def test_build_dataset(tmp_path, rafdb_root, affectnet_csv_root):
    assert isinstance(build_dataset("rafdb", rafdb_root, "train"), RAFDB)
    assert build_dataset("affectnet7", affectnet_csv_root, "train").classnames == AFFECTNET_CLASSES[:7]
    assert build_dataset("affectnet8", affectnet_csv_root, "train").classnames == AFFECTNET_CLASSES
    ferplus = write_ferplus_csvs(str(tmp_path), FERPLUS_ROWS)
    assert build_dataset("ferplus", ferplus, "val").targets == [3]
    save_image(os.path.join(str(tmp_path), "folder", "train", "anger", "a.png"), (0, 0, 0))
    assert build_dataset("folder", str(tmp_path / "folder"), "train").classnames == ("anger",)
    with pytest.raises(ValueError, match="rafdb, affectnet7, affectnet8, ferplus, folder"):
        build_dataset("raf-db", rafdb_root, "train")
    with pytest.raises(ValueError, match="train, test"):
        build_dataset("rafdb", rafdb_root, "validation")


def test_format_class_counts(rafdb_root):
    text = format_class_counts(RAFDB(rafdb_root, "train"))
    lines = text.splitlines()
    assert len(lines) == 7
    assert lines[3].split()[:2] == ["happiness", "2"] and lines[3].endswith("40.0%")
    assert lines[2].split()[:2] == ["disgust", "0"]


# ----------------------------------------------------------------------------- transforms

@pytest.mark.parametrize("make", [train_transform, eval_transform, expclip_transform])
def test_transforms_give_rgb_tensors_and_pickle(make):
    transform = pickle.loads(pickle.dumps(make(32)))  # spawn-started workers pickle them
    for image in (Image.new("RGB", (100, 80), (255, 0, 0)), Image.new("L", (48, 48), 77)):
        x = transform(image)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_expclip_transform_normalisation_is_optional():
    image = Image.new("RGB", (60, 40), (255, 255, 255))
    plain = expclip_transform(16)(image)
    normalised = expclip_transform(16, normalize=True)(image)
    assert torch.allclose(plain, torch.ones(3, 16, 16))
    assert normalised[0, 0, 0].item() == pytest.approx((1 - 0.48145466) / 0.26862954, rel=1e-5)


# ----------------------------------------------------------------------------- sampler

def test_class_balanced_sampler_balances_classes():
    targets = [0] * 900 + [1] * 90 + [2] * 10
    sampler = ClassBalancedSampler(targets, num_samples=30000, seed=1)
    drawn = np.array(targets)[list(sampler)]
    frequencies = np.bincount(drawn, minlength=3) / len(drawn)
    assert np.allclose(frequencies, 1 / 3, atol=0.02), frequencies
    assert len(sampler) == 30000 and len(list(ClassBalancedSampler(targets))) == 1000


def test_class_balanced_sampler_epochs_and_ranks():
    targets = [0] * 50 + [1] * 5 + [2] * 20
    sampler = ClassBalancedSampler(targets, num_samples=31, seed=3)
    first = list(sampler)
    assert list(sampler) == first  # deterministic within an epoch
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first

    # world_size 4: 31 -> 8 per rank (32 in all); the ranks partition one common draw.
    full = list(ClassBalancedSampler(targets, num_samples=32, seed=3))
    ranks = [ClassBalancedSampler(targets, num_samples=31, seed=3, rank=r, world_size=4)
             for r in range(4)]
    assert [len(r) for r in ranks] == [8] * 4
    for r, sampler in enumerate(ranks):
        assert list(sampler) == full[r::4]
    with pytest.raises(ValueError):
        ClassBalancedSampler(targets, rank=4, world_size=4)
    with pytest.raises(ValueError):
        ClassBalancedSampler([])
    with pytest.raises(ValueError):
        ClassBalancedSampler(targets, num_samples=0)


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_faces_are_deterministic():
    a = SyntheticFaces("train", num_per_class=3, image_size=48, seed=7)
    b = SyntheticFaces("train", num_per_class=3, image_size=48, seed=7)
    assert len(a) == 21 and a.class_counts() == [3] * 7
    assert a.classnames == CANONICAL_CLASSES[:7]
    assert a.targets[:8] == [0, 1, 2, 3, 4, 5, 6, 0]
    image, label = a[9]
    assert image.size == (48, 48) and image.mode == "RGB" and label == 2
    torch.manual_seed(0)
    np.random.seed(0)
    first = np.asarray(a[9][0])
    torch.manual_seed(1)  # global RNG state plays no part
    np.random.seed(1)
    assert np.array_equal(first, np.asarray(b[9][0]))
    assert np.array_equal(first, np.asarray(pickle.loads(pickle.dumps(a))[9][0]))
    assert not np.array_equal(first, np.asarray(a[16][0]))  # same class, another face
    test = SyntheticFaces("test", num_per_class=3, image_size=48, seed=7)
    other_seed = SyntheticFaces("train", num_per_class=3, image_size=48, seed=8)
    assert not np.array_equal(first, np.asarray(test[9][0]))
    assert not np.array_equal(first, np.asarray(other_seed[9][0]))
    x, _ = SyntheticFaces("val", 1, 48, transform=eval_transform(32))[0]
    assert x.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="train, val, test"):
        SyntheticFaces("dev")


def _as_tensors(dataset):
    images = np.stack([np.asarray(dataset[i][0], dtype=np.float32) for i in range(len(dataset))])
    x = torch.from_numpy(images).permute(0, 3, 1, 2) / 255
    return (x - 0.5) / 0.25, torch.tensor(dataset.targets)


def test_synthetic_faces_are_learnable():
    """A tiny CNN trained for a few seconds on 40 faces per class at 32x32 px must beat
    chance (14%) by far on held-out faces."""
    x_train, y_train = _as_tensors(SyntheticFaces("train", num_per_class=40, image_size=32))
    x_test, y_test = _as_tensors(SyntheticFaces("test", num_per_class=40, image_size=32))

    def block(cin, cout):
        return [torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False), torch.nn.BatchNorm2d(cout),
                torch.nn.ReLU()]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier than 2 threads on a shared 2-core machine
    try:
        torch.manual_seed(0)
        net = torch.nn.Sequential(*block(3, 16), torch.nn.MaxPool2d(2), *block(16, 32),
                                  torch.nn.MaxPool2d(2), *block(32, 64),
                                  torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(),
                                  torch.nn.Linear(64, 7))
        optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(0)
        for _ in range(10):
            order = torch.randperm(len(y_train), generator=generator)
            for batch in order.split(20):
                loss = torch.nn.functional.cross_entropy(net(x_train[batch]), y_train[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        net.eval()
        with torch.no_grad():
            accuracy = (net(x_test).argmax(1) == y_test).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    assert accuracy >= 0.6, accuracy


def test_write_synthetic_rafdb_is_read_by_rafdb_reader(tmp_path):
    root = write_synthetic_rafdb(str(tmp_path / "raf"), 2, 1, seed=3, image_size=40)
    train, test = RAFDB(root, "train"), RAFDB(root, "test")
    assert len(train) == 14 and len(test) == 7
    faces = SyntheticFaces("train", 2, image_size=40, seed=3)
    drawn = [np.asarray(image, dtype=np.float32) for image, _ in faces]
    for i in range(len(train)):  # same expression name, same picture (up to JPEG)
        assert RAFDB_CLASSES[train.targets[i]] == faces.classnames[faces.targets[i]]
        on_disk = np.asarray(train[i][0], dtype=np.float32)
        error = np.abs(on_disk - drawn[i]).mean()
        assert error < 12 and error < 0.5 * np.abs(on_disk - drawn[(i + 1) % 14]).mean()
    assert sorted(test.class_counts()) == [1] * 7
