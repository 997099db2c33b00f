"""Face detection and alignment (mpafer.faces).

The detector is checked against facenet-pytorch's MTCNN (a test-only package; its wheel carries
the same weight files, so nothing is downloaded) on scikit-image's `astronaut` photograph and
on pictures composed from it. Alignment is checked by construction: landmarks moved by a known
similarity transform, and dots drawn at them, come back onto the template.
"""
import math
import os

import facenet_pytorch
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import data as skdata
from skimage.transform import estimate_transform

from mpafer.clip.loading import sha256_of
from mpafer.faces import CONVENTIONS, MTCNN, align_face, detect_and_align, similarity_transform
from mpafer.faces.align import apply_transform, box_crop
from mpafer.faces.weights import WEIGHT_FILES
from tests.cuda_checks import DEVICE as TESTS_DEVICE
from tests.cuda_checks import TIER as CUDA_TIER

REFERENCE_WEIGHTS = os.path.join(os.path.dirname(facenet_pytorch.__file__), "data")
FACE_BOX_IN_ASTRONAUT = (150, 30, 300, 200)  # a loose crop around the face, x0, y0, x1, y1


@pytest.fixture(scope="module")
def detector():
    return MTCNN(weights_dir=REFERENCE_WEIGHTS)


@pytest.fixture(scope="module")
def reference():
    return facenet_pytorch.MTCNN(keep_all=True, device="cpu")


@pytest.fixture(scope="module")
def astronaut():
    return Image.fromarray(skdata.astronaut())


def reference_faces(reference, image):
    """facenet-pytorch's boxes [N, 4], scores [N], landmarks [N, 5, 2], best score first."""
    boxes, scores, landmarks = reference.detect(image, landmarks=True)
    if boxes is None:
        return np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))
    order = np.argsort(-np.asarray(scores, dtype=np.float64))
    return (np.asarray(boxes, dtype=np.float64)[order], np.asarray(scores, np.float64)[order],
            np.asarray(landmarks, dtype=np.float64)[order])


def assert_same_faces(ours, theirs):
    boxes, scores, landmarks = theirs
    assert len(ours.boxes) == len(boxes) > 0
    np.testing.assert_allclose(ours.boxes.numpy(), boxes, atol=1.0, rtol=0)
    np.testing.assert_allclose(ours.landmarks.numpy(), landmarks, atol=1.0, rtol=0)
    np.testing.assert_allclose(ours.scores.numpy(), scores, atol=1e-4, rtol=0)


def composed_picture(astronaut, placements, size=(960, 720), seed=0):
    """The astronaut's face pasted at (x, y, width) on a cluttered background (the coffee photo
    under coarse colour noise). -> (picture, the pasted rectangles)."""
    rng = np.random.default_rng(seed)
    background = Image.fromarray(skdata.coffee()).resize(size)
    noise = rng.integers(0, 256, (size[1] // 4, size[0] // 4, 3), dtype=np.uint8)
    picture = Image.blend(background, Image.fromarray(noise).resize(size, Image.NEAREST), 0.35)
    face = astronaut.crop(FACE_BOX_IN_ASTRONAUT)
    aspect = face.height / face.width
    pasted = []
    for x, y, width in placements:
        height = round(width * aspect)
        picture.paste(face.resize((width, height)), (x, y))
        pasted.append((x, y, x + width, y + height))
    return picture, pasted


# --- weights -------------------------------------------------------------------------------

def test_pinned_hashes_are_those_of_the_reference_files():
    for name, sha256 in WEIGHT_FILES.items():
        assert sha256_of(os.path.join(REFERENCE_WEIGHTS, name)) == sha256


def test_weight_files_load_as_plain_state_dicts_into_our_networks():
    detector = MTCNN(weights_dir=REFERENCE_WEIGHTS)
    for name, network in (("pnet", detector.pnet), ("rnet", detector.rnet),
                          ("onet", detector.onet)):
        state = torch.load(os.path.join(REFERENCE_WEIGHTS, f"{name}.pt"), weights_only=True)
        assert set(state) == set(network.state_dict())
        for key, value in state.items():
            assert torch.equal(network.state_dict()[key], value), key


def test_a_missing_weight_file_names_it_and_where_to_get_it(tmp_path):
    for name in ("pnet.pt", "onet.pt"):
        (tmp_path / name).write_bytes((open(os.path.join(REFERENCE_WEIGHTS, name), "rb").read()))
    with pytest.raises(FileNotFoundError) as error:
        MTCNN(weights_dir=str(tmp_path))
    message = str(error.value)
    assert str(tmp_path / "rnet.pt") in message and "facenet-pytorch" in message
    assert "raw.githubusercontent.com" in message and "\n" not in message


def test_a_wrong_weight_file_names_it(tmp_path):
    for name in WEIGHT_FILES:
        source = "pnet.pt" if name == "rnet.pt" else name  # P-Net's weights under R-Net's name
        (tmp_path / name).write_bytes(open(os.path.join(REFERENCE_WEIGHTS, source), "rb").read())
    with pytest.raises(ValueError, match=r"rnet\.pt is not MTCNN's rnet\.pt .*get https://"):
        MTCNN(weights_dir=str(tmp_path))
    (tmp_path / "rnet.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"rnet\.pt is not MTCNN's rnet\.pt"):
        MTCNN(weights_dir=str(tmp_path))


# --- detection against the reference -------------------------------------------------------

def test_astronaut_matches_the_reference(detector, reference, astronaut):
    ours = detector.detect(astronaut)
    assert_same_faces(ours, reference_faces(reference, astronaut))
    assert len(ours.boxes) == 1
    (x0, y0, x1, y1), landmarks = ours.boxes[0].tolist(), ours.landmarks[0]
    # Eyes above the nose, nose above the mouth, image-left before image-right, all in the box.
    left_eye, right_eye, nose, mouth_left, mouth_right = landmarks.tolist()
    assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
    assert all(x0 <= x <= x1 and y0 <= y <= y1 for x, y in landmarks.tolist())


def test_every_pasted_copy_is_found_and_matches_the_reference(detector, reference, astronaut):
    placements = [(20, 20, 60), (150, 400, 110), (400, 60, 180), (700, 350, 240), (620, 40, 40)]
    picture, pasted = composed_picture(astronaut, placements)
    ours = detector.detect(picture)
    assert_same_faces(ours, reference_faces(reference, picture))
    assert len(ours.boxes) == len(pasted)
    for rectangle in pasted:  # each copy holds exactly one detected face
        inside = [b for b in ours.boxes.tolist()
                  if rectangle[0] <= (b[0] + b[2]) / 2 <= rectangle[2]
                  and rectangle[1] <= (b[1] + b[3]) / 2 <= rectangle[3]]
        assert len(inside) == 1, rectangle


def test_a_batch_gives_what_each_picture_gives_alone(detector, astronaut):
    mirrored = astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1)
                          for im in (astronaut, mirrored)])  # [2, 3, H, W]
    batch = detector.detect_batch(pixels)
    for found, image in zip(batch, (astronaut, mirrored)):
        alone = detector.detect(image)
        torch.testing.assert_close(found.boxes, alone.boxes)
        torch.testing.assert_close(found.landmarks, alone.landmarks)


def test_no_face_in_a_picture_without_one(detector):
    empty = detector.detect(Image.fromarray(skdata.coffee()))
    assert empty.boxes.shape == (0, 4) and empty.landmarks.shape == (0, 5, 2)
    tiny = detector.detect(Image.new("RGB", (15, 15)))  # smaller than the smallest face
    assert tiny.boxes.shape == (0, 4) and tiny.scores.shape == (0,)


def test_a_6000_by_4000_photo_is_searched_scaled_down_and_reported_in_its_pixels(
        detector, astronaut):
    photo, pasted = composed_picture(astronaut, [(1000, 800, 900), (4200, 2200, 600)],
                                     size=(6000, 4000))
    found = detector.detect(photo, max_side=1500)
    assert len(found.boxes) == 2
    # The same as detecting on a copy scaled by hand (4x smaller: the 20-pixel smallest face
    # would be 5 pixels there, so the search starts at 12, P-Net's window), mapped back.
    small = photo.resize((1500, 1000), Image.Resampling.BOX)
    by_hand = detector.detect(small, min_face=12)
    np.testing.assert_allclose(found.boxes.numpy(), by_hand.boxes.numpy() * 4, atol=4 * 1.0)
    np.testing.assert_allclose(found.landmarks.numpy(), by_hand.landmarks.numpy() * 4,
                               atol=4 * 1.0)
    for box, rectangle in zip(sorted(found.boxes.tolist()), sorted(pasted)):
        assert rectangle[0] < (box[0] + box[2]) / 2 < rectangle[2]
        assert rectangle[1] < (box[1] + box[3]) / 2 < rectangle[3]
        assert box[2] - box[0] > 0.4 * (rectangle[2] - rectangle[0])  # the face, not a part


# --- alignment -----------------------------------------------------------------------------

def random_similarity(rng):
    angle = rng.uniform(-math.pi / 3, math.pi / 3)
    scale = rng.uniform(0.4, 5.0)
    cos, sin = scale * math.cos(angle), scale * math.sin(angle)
    return np.array([[cos, -sin, rng.uniform(-50, 400)], [sin, cos, rng.uniform(-50, 400)]])


def test_similarity_transform_recovers_a_known_one_and_agrees_with_scikit_image():
    rng = np.random.default_rng(1)
    template = np.array(CONVENTIONS["rafdb"].template)
    for _ in range(20):
        moved = template @ random_similarity(rng)[:, :2].T + random_similarity(rng)[:, 2]
        matrix = similarity_transform(moved, template)
        back = apply_transform(matrix, moved).numpy()
        assert np.abs(back - template).max() < 0.5
        assert np.abs(back - template).max() < 1e-6  # exact, up to rounding
        noisy = moved + rng.normal(0, 2.0, moved.shape)  # least squares: same as scikit-image
        expected = estimate_transform("similarity", noisy, template)
        np.testing.assert_allclose(similarity_transform(noisy, template).numpy(),
                                   expected.params[:2], atol=1e-9)


def dot_centres(crop: Image.Image, count: int) -> np.ndarray:
    """Centres (x, y) of the `count` brightest blobs of a crop, by intensity-weighted mean."""
    pixels = np.asarray(crop.convert("L"), dtype=np.float64)
    labels, found = ndimage.label(pixels > 40)
    assert found == count, found
    return np.array([ndimage.center_of_mass(pixels, labels, i + 1)[::-1]
                     for i in range(count)])


@pytest.mark.parametrize("convention", ["rafdb", "ferplus", "folder"])
def test_warped_dots_land_on_the_template(convention):
    """Dots drawn at landmarks moved by a known similarity come out of the warp at the
    template's places (pixel-centre conventions included)."""
    rng = np.random.default_rng(2)
    template = np.array(CONVENTIONS[convention].template)
    size = CONVENTIONS[convention].size
    for _ in range(3):
        forward = random_similarity(rng)
        forward[:, :2] *= 4 / np.sqrt(abs(np.linalg.det(forward[:, :2])))  # 4x the crop's size
        moved = template @ forward[:, :2].T + forward[:, 2]
        moved += 600 - moved.mean(0)  # well inside the picture
        picture = Image.new("L", (1200, 1200))
        draw = ImageDraw.Draw(picture)
        for x, y in moved:  # a disc of radius 6 about the landmark's pixel centre
            draw.ellipse((x - 6 + 0.5, y - 6 + 0.5, x + 6 - 0.5, y + 6 - 0.5), fill=255)
        crop = align_face(picture.convert("RGB"), moved, (0, 0, 1, 1), convention)
        assert crop.size == size and crop.mode == "RGB"
        found = dot_centres(crop, 5)
        nearest = np.abs(found[:, None] - template[None]).sum(-1).argmin(0)
        assert np.abs(found[nearest] - template).max() < 0.5


def test_box_convention_is_a_square_about_the_box_cut_at_the_border():
    picture = Image.fromarray(np.arange(300 * 400 * 3, dtype=np.uint32).reshape(300, 400, 3)
                              .astype(np.uint8))
    crop = box_crop(picture, (100, 50, 180, 150), 0.1)  # 80 x 100 box -> 120 square
    assert crop.size == (120, 120)
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(picture)[40:160, 80:200])
    edge = box_crop(picture, (350, 250, 400, 300), 0.1)  # sticks out right and bottom
    np.testing.assert_array_equal(np.asarray(edge), np.asarray(picture)[245:300, 345:400])


def test_detect_and_align_gives_each_face_in_its_convention(detector, astronaut):
    picture, _ = composed_picture(astronaut, [(40, 40, 200), (500, 300, 300)])
    for name, convention in CONVENTIONS.items():
        faces = detect_and_align(picture, detector, name)
        assert len(faces) == 2
        assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
        for crop, box, landmarks, score in faces:
            assert len(box) == 4 and len(landmarks) == 5 and 0.7 < score <= 1
            if convention.size is not None:
                assert crop.size == convention.size
            if convention.grey:
                channels = np.asarray(crop).astype(int)
                assert (channels[..., 0] == channels[..., 1]).all()
            # The aligned crop's eyes are where the template puts them: detect on the crop.
            if name in ("folder", "rafdb"):
                again = detector.detect(crop, min_face=12)
                assert len(again.boxes) >= 1
                eyes = again.landmarks[0, :2].numpy()
                assert np.abs(eyes - np.array(convention.template[:2])).max() < 0.08 * crop.width


@CUDA_TIER[0]
@CUDA_TIER[1]
def test_the_detector_on_the_device_matches_the_cpu(astronaut):
    device_detector = MTCNN(weights_dir=REFERENCE_WEIGHTS).to(TESTS_DEVICE)
    on_device = device_detector.detect(astronaut)
    on_cpu = MTCNN(weights_dir=REFERENCE_WEIGHTS).detect(astronaut)
    np.testing.assert_allclose(on_device.boxes.numpy(), on_cpu.boxes.numpy(), atol=1.0)
    np.testing.assert_allclose(on_device.landmarks.numpy(), on_cpu.landmarks.numpy(), atol=1.0)
    np.testing.assert_allclose(on_device.scores.numpy(), on_cpu.scores.numpy(), atol=1e-4)


def test_weights_download_once_checked_with_sha256(tmp_path, monkeypatch):
    """The download path, with the pinned URL pointed at the reference's files (file://)."""
    from mpafer.faces import weights
    monkeypatch.setattr(weights, "_RAW_URL", "file://" + REFERENCE_WEIGHTS + "/")
    root = tmp_path / "weights"
    paths = weights.weight_paths(download_root=str(root))
    assert sorted(os.listdir(root)) == sorted(WEIGHT_FILES)  # no temporary file left behind
    assert all(sha256_of(paths[name]) == sha for name, sha in WEIGHT_FILES.items())
    detector = MTCNN(download_root=str(root))
    assert len(detector.detect(Image.fromarray(skdata.astronaut())).boxes) == 1
    # A file whose hash is wrong is not kept.
    monkeypatch.setitem(weights.WEIGHT_FILES, "pnet.pt", "0" * 64)
    with pytest.raises(RuntimeError, match="SHA-256 mismatch"):
        weights.weight_paths(download_root=str(tmp_path / "other"))
    assert not os.path.exists(tmp_path / "other" / "pnet.pt")
