"""`python -m mpafer.predict` as a user runs it: a checkpoint trained on a tiny CLIP, real
photographs (scikit-image's astronaut, a composed picture, a photo without faces) and a corrupt
file. The detector's weights come from facenet-pytorch's wheel (nothing is downloaded)."""
import json
import os

import facenet_pytorch
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from mpafer.faces import DATASET_CONVENTIONS
from tests.helpers import quick_demo, run, tiny_state_dict

DETECTOR_WEIGHTS = os.path.join(os.path.dirname(facenet_pytorch.__file__), "data")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """best.pt of a one-epoch demo run on a tiny random CLIP (seconds)."""
    root = tmp_path_factory.mktemp("predict")
    clip_file = root / "tiny-clip.pt"
    torch.save(tiny_state_dict(seed=0), clip_file)
    run(*quick_demo(root / "run", str(clip_file), "--epochs", "1"))
    return str(root / "run" / "best.pt")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """{name: path}: the astronaut, the astronaut's face pasted twice on the coffee photo, the
    coffee photo alone (no face), and a corrupt JPEG."""
    folder = tmp_path_factory.mktemp("photos")
    astronaut = Image.fromarray(skdata.astronaut())
    astronaut.save(folder / "astronaut.jpg", quality=95)
    coffee = Image.fromarray(skdata.coffee())
    coffee.save(folder / "coffee.png")
    two = coffee.copy()
    face = astronaut.crop((150, 30, 300, 200))
    two.paste(face.resize((90, 102)), (40, 60))
    two.paste(face.resize((180, 204)), (350, 150))
    two.save(folder / "two.png")
    (folder / "broken.jpg").write_bytes(open(folder / "astronaut.jpg", "rb").read()[:2000])
    return {p.stem: str(p) for p in folder.iterdir()}


def predict(checkpoint, *args, check=True):
    return run("-m", "mpafer.predict", "--checkpoint", checkpoint, "--detector-weights",
               DETECTOR_WEIGHTS, *args, check=check)


def test_every_face_labelled_in_the_json_and_drawn(checkpoint, photos, tmp_path):
    out = tmp_path / "faces.json"
    paths = [photos["astronaut"], photos["two"], photos["coffee"], photos["broken"]]
    result = predict(checkpoint, *paths, "--json", str(out), "--annotated",
                     str(tmp_path / "annotated"), check=False)
    # An unreadable file: one line naming it, exit status 1, the others reported.
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if photos["broken"] in line]
    assert errors and all(line.startswith("error:") for line in errors)
    assert f"{photos['coffee']} (600x400): no face found" in result.stdout

    report = json.load(open(out))
    assert report["checkpoint"] == checkpoint and len(report["classes"]) == 7
    images = {image["path"]: image for image in report["images"]}
    assert list(images) == paths
    assert images[photos["broken"]]["error"] and images[photos["broken"]]["faces"] == []
    assert images[photos["coffee"]]["error"] is None and images[photos["coffee"]]["faces"] == []
    assert (images[photos["astronaut"]]["width"], images[photos["astronaut"]]["height"]) == (
        512, 512)
    assert len(images[photos["astronaut"]]["faces"]) == 1
    assert len(images[photos["two"]]["faces"]) == 2

    reference = facenet_pytorch.MTCNN(keep_all=True, device="cpu")
    for path in (photos["astronaut"], photos["two"]):
        faces = images[path]["faces"]
        for face in faces:
            assert set(face) >= {"box", "score", "landmarks", "label", "probabilities"}
            assert len(face["box"]) == 4 and np.shape(face["landmarks"]) == (5, 2)
            assert list(face["probabilities"]) == report["classes"]
            assert sum(face["probabilities"].values()) == pytest.approx(1, abs=1e-4)
            assert face["label"] == max(face["probabilities"], key=face["probabilities"].get)
        # Boxes in the photo's pixels: where the reference detector puts them.
        boxes = reference.detect(Image.open(path).convert("RGB"))[0]
        ours = sorted(face["box"] for face in faces)
        np.testing.assert_allclose(ours, sorted(boxes.tolist()), atol=1.0)
        assert f"{path} ({images[path]['width']}x{images[path]['height']}): {len(faces)} face" \
            in result.stdout

    written = sorted(os.listdir(tmp_path / "annotated"))
    assert written == ["astronaut.png", "coffee.png", "two.png"]
    drawn = Image.open(tmp_path / "annotated" / "astronaut.png")
    assert drawn.size == (512, 512)
    original = np.asarray(Image.open(photos["astronaut"]).convert("RGB"), dtype=np.int16)
    changed = np.abs(np.asarray(drawn, dtype=np.int16) - original).sum(-1) > 60
    x0, y0, x1, y1 = (round(v) for v in images[photos["astronaut"]]["faces"][0]["box"])
    assert changed[y0 - 2:y0 + 3, x0:x1].mean() > 0.5  # the box's top edge is drawn
    assert changed[400:, :100].mean() < 0.01  # far from the face, the photo is untouched


def test_align_none_is_one_face_per_image_and_folders_are_searched(checkpoint, photos, tmp_path):
    folder = tmp_path / "crops" / "inner"
    folder.mkdir(parents=True)
    Image.open(photos["astronaut"]).crop((150, 30, 300, 200)).save(folder / "face.png")
    Image.open(photos["coffee"]).save(tmp_path / "crops" / "cup.jpg")
    (tmp_path / "crops" / "notes.txt").write_text("not an image")
    result = predict(checkpoint, str(tmp_path / "crops"), "--align", "none", "--json",
                     str(tmp_path / "none.json"), "--attention", str(tmp_path / "attention"))
    report = json.load(open(tmp_path / "none.json"))
    paths = [image["path"] for image in report["images"]]
    assert paths == [str(tmp_path / "crops" / "cup.jpg"), str(folder / "face.png")]
    for image in report["images"]:
        (face,) = image["faces"]  # the whole picture is one face, with or without a face in it
        assert face["score"] is None and face["landmarks"] is None
        side = min(image["width"], image["height"])  # centre square of a picture far from one
        x0, y0, x1, y1 = face["box"]
        assert (x1 - x0, y1 - y0) == (side, side)
        assert x0 == (image["width"] - side) // 2 and y0 == (image["height"] - side) // 2
    assert "note:" in result.stdout  # the coffee photo is not a face crop
    assert sorted(os.listdir(tmp_path / "attention")) == ["cup.png", "face.png"]


def test_missing_detector_weights_are_one_line(checkpoint, photos, tmp_path):
    result = run("-m", "mpafer.predict", "--checkpoint", checkpoint, photos["astronaut"],
                 "--detector-weights", str(tmp_path), check=False)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert str(tmp_path / "pnet.pt") in result.stderr and "facenet-pytorch" in result.stderr


def test_the_crop_convention_is_the_checkpoints_record_else_its_datasets():
    from mpafer.app.predict import face_convention
    from mpafer.data import DATASET_NAMES
    from mpafer.faces import CONVENTIONS

    assert set(DATASET_NAMES) <= set(DATASET_CONVENTIONS)  # no dataset falls back silently
    expected = {"rafdb": "rafdb", "ferplus": "ferplus", "affectnet7": "affectnet",
                "affectnet8": "affectnet", "folder": "folder", "synthetic": "folder"}
    for dataset, convention in expected.items():
        assert face_convention({"train_config": {"dataset": dataset}})[0] == convention
    assert face_convention({"train_config": {"dataset": "rafdb", "demo": True}})[0] == "folder"
    recorded = {"face_convention": "ferplus", "train_config": {"dataset": "rafdb"}}
    assert face_convention(recorded) == ("ferplus", "recorded in the checkpoint")
    assert all(face_convention({"face_convention": c})[0] == c for c in CONVENTIONS)


def test_a_new_checkpoint_records_its_crop_convention(checkpoint):
    from mpafer.checkpoint import face_convention_of, load_checkpoint
    assert load_checkpoint(checkpoint)["face_convention"] == "folder"  # the demo's faces
    assert face_convention_of({"dataset": "affectnet8"}) == "affectnet"
    assert face_convention_of({"dataset": "ferplus", "demo": False}) == "ferplus"


def test_eval_detect_faces_scores_the_aligned_face_of_each_photo(checkpoint, photos, tmp_path):
    """eval.py --detect-faces: each image of the split becomes its best face, aligned by the
    checkpoint's convention, as predict does; an image without a face stays whole."""
    from mpafer.app.predict import DetectedFaces
    from mpafer.data import build_dataset
    from mpafer.faces import MTCNN
    root = tmp_path / "faces"
    for name, label in (("astronaut", "happiness"), ("two", "sadness"), ("coffee", "sadness")):
        (root / "test" / label).mkdir(parents=True, exist_ok=True)
        Image.open(photos[name]).convert("RGB").save(root / "test" / label / f"{name}.png")
    dataset = build_dataset("folder", str(root), "test")
    detected = DetectedFaces(dataset, MTCNN(DETECTOR_WEIGHTS), "folder")
    assert len(detected) == 3 and detected.missed == 1  # the coffee photo has no face
    whole = [i for i in range(3) if "coffee" in dataset.image_path(i)][0]
    assert detected.load(whole).size == dataset.load(whole).size
    faces = [i for i in range(3) if i != whole]
    assert all(detected.load(i).size == (224, 224) for i in faces)  # the folder convention
    out = tmp_path / "eval.json"
    result = run("eval.py", "--checkpoint", checkpoint, "--dataset", "folder", "--data-root",
                 str(root), "--classnames", "happiness,sadness", "--class-set", "shared",
                 "--detect-faces", "--detector-weights", DETECTOR_WEIGHTS, "--workers", "0",
                 "--json", str(out))
    assert "2 of 3 images had a face" in result.stdout
    assert json.load(open(out))["num_samples"] == 3


def test_phone_rotation_16_bit_and_cmyk_photos_give_the_upright_faces(checkpoint, photos, tmp_path):
    """The photo-only cases, through the command: a picture stored sideways with EXIF
    Orientation 6 (as phones write it), a 16-bit grey PNG and a CMYK TIFF give the faces of the
    upright 8-bit original, in the upright picture's pixels."""
    upright = Image.open(photos["astronaut"]).convert("RGB")
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: turn the stored pixels 90 degrees clockwise to view them
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.png", exif=exif)
    grey = np.asarray(upright.convert("L"), dtype=np.uint16) * 257  # the same levels, 16 bits
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    upright.convert("L").save(tmp_path / "grey8.png")
    upright.convert("CMYK").save(tmp_path / "cmyk.tif")
    upright.convert("CMYK").convert("RGB").save(tmp_path / "cmyk-as-rgb.png")
    out = tmp_path / "faces.json"
    names = ["upright", "phone", "grey8", "grey16", "cmyk-as-rgb", "cmyk"]
    files = [str(tmp_path / f"{n}.{'tif' if n == 'cmyk' else 'png'}") for n in names]
    predict(checkpoint, *files, "--json", str(out))
    images = dict(zip(names, json.load(open(out))["images"]))
    assert (images["phone"]["width"], images["phone"]["height"]) == upright.size
    for twin, original in (("phone", "upright"), ("grey16", "grey8"), ("cmyk", "cmyk-as-rgb")):
        got, expected = images[twin]["faces"], images[original]["faces"]
        assert len(got) == len(expected) == 1, twin
        assert got[0]["box"] == pytest.approx(expected[0]["box"], abs=1e-3), twin
        assert np.allclose(got[0]["landmarks"], expected[0]["landmarks"], atol=1e-3), twin
        assert got[0]["probabilities"] == pytest.approx(expected[0]["probabilities"], abs=1e-5)
