"""Real folders, real files: what a user's folder tree holds beyond tidy JPEGs.

A tree written here holds nested folders, TIFF/GIF/BMP/WebP, 16-bit and 32-bit grey, palette
images with a transparent colour, alpha, CMYK, EXIF-rotated photos, hidden folders, macOS's
`._` files, an empty class folder and a broken symbolic link. Reading it must give exactly the
expected counts, and every image its 8-bit, upright original (computed here with numpy, from
the pixels written) within 1/255. Then: an unreadable image never hangs a run, and the messages
name the fix in the user's terms.
"""
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image

import mpafer.data.base as mpafer_data_base
from mpafer import clip
from mpafer.app.faults import ignore_interrupts
from mpafer.app.protocol import read_splits, require_readable_once
from mpafer.app.runs import run_config
from mpafer.data import FolderDataset, load_image
from mpafer.data.batches import LoadError, batches
from mpafer.data.subsets import Subset
from tests.dataset_writers import save_image, write_truncated_jpeg
from tests.helpers import REPO, tiny_state_dict, write_safetensors

ORIENTATION = 0x0112  # the EXIF tag
RNG = np.random.default_rng(31)


def pixels(height=12, width=16):
    return RNG.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def grey_pixels(height=12, width=16):
    return RNG.integers(0, 256, size=(height, width), dtype=np.uint8)


def as_rgb_reference(grey):
    return np.repeat(grey[:, :, None], 3, axis=2)


def exif_orientation(value):
    exif = Image.Exif()
    exif[ORIENTATION] = value
    return exif.tobytes()


def stored_for_orientation(upright, value):
    """The pixels a camera stores so that a viewer applying Orientation `value` shows
    `upright` (the EXIF definitions, written out with numpy)."""
    if value == 3:  # shown rotated by 180
        return np.rot90(upright, 2)
    if value == 6:  # shown rotated 90 degrees clockwise: stored 90 counter-clockwise
        return np.rot90(upright, 1)
    if value == 8:  # shown rotated 90 degrees counter-clockwise
        return np.rot90(upright, -1)
    raise ValueError(value)


def composite_on_white(rgb, alpha):
    a = alpha[:, :, None].astype(np.float64) / 255
    return np.rint(rgb * a + 255 * (1 - a)).astype(np.uint8)


def write(path, image, **options):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, **options)


def write_tree(root):
    """The tree; -> {path: expected upright 8-bit RGB pixels} of every image to be read, and
    what reading must count per class folder."""
    expected = {}

    def image_file(relative, upright, image, **options):
        path = os.path.join(root, relative)
        write(path, image, **options)
        expected[path] = upright

    # happy/: plain formats, nested folders, EXIF orientation on lossless formats.
    rgb = pixels()
    image_file("train/happy/plain.png", rgb, Image.fromarray(rgb))
    rgb = pixels()
    image_file("train/happy/2019/a.tif", rgb, Image.fromarray(rgb))
    rgb = pixels()
    image_file("train/happy/2019/summer/b.bmp", rgb, Image.fromarray(rgb))
    rgb = pixels()
    image_file("train/happy/c.webp", rgb, Image.fromarray(rgb), lossless=True)
    for value, name, options in ((6, "phone.png", {}), (8, "scan.tiff", {}),
                                 (3, "upside.webp", {"lossless": True})):
        rgb = pixels()
        stored = np.ascontiguousarray(stored_for_orientation(rgb, value))
        image_file(f"train/happy/{name}", rgb, Image.fromarray(stored),
                   exif=exif_orientation(value), **options)
    # Hidden things: macOS's AppleDouble file and .DS_Store, a notebook's checkpoint folder.
    for junk in ("train/happy/._plain.png", "train/happy/2019/._a.tif", "train/happy/.DS_Store"):
        with open(os.path.join(root, junk), "wb") as f:
            f.write(b"\x00\x05\x16\x07" + b"\x00" * 60)  # AppleDouble's magic, then nothing
    write(os.path.join(root, "train/happy/.ipynb_checkpoints/plain-checkpoint.png"),
          Image.fromarray(pixels()))
    with open(os.path.join(root, "train/happy/notes.txt"), "w") as f:
        f.write("where these came from\n")

    # sad/: grey in every depth, palette with transparency, alpha, CMYK.
    grey = grey_pixels()
    image_file("train/sad/grey.png", as_rgb_reference(grey), Image.fromarray(grey))
    grey = grey_pixels()
    image_file("train/sad/grey16.png", as_rgb_reference(grey),
               Image.fromarray(grey.astype(np.uint16) * 257))  # 16-bit PNG: mode I;16
    grey = grey_pixels()
    big_endian = (grey.astype(np.uint16) * 257).astype(">u2")
    image_file("train/sad/grey16be.tif", as_rgb_reference(grey),
               Image.frombytes("I;16B", grey.shape[::-1], big_endian.tobytes()))
    grey = grey_pixels()
    image_file("train/sad/grey32.tif", as_rgb_reference(grey),
               Image.fromarray(grey.astype(np.int32) * 257))  # 32-bit integer: mode I
    palette = RNG.integers(0, 256, size=(4, 3), dtype=np.uint8)
    index = RNG.integers(0, 4, size=(12, 16), dtype=np.uint8)
    indexed = Image.fromarray(index, "P")
    indexed.putpalette(palette.flatten().tolist())
    with_white = palette[index].copy()
    with_white[index == 2] = 255  # the transparent colour, shown on white
    image_file("train/sad/palette.png", with_white, indexed, transparency=2)
    image_file("train/sad/palette.gif", with_white, indexed, transparency=2)
    rgb, alpha = pixels(), RNG.integers(0, 256, size=(12, 16), dtype=np.uint8)
    image_file("train/sad/cutout.png", composite_on_white(rgb, alpha),
               Image.fromarray(np.dstack([rgb, alpha]), "RGBA"))
    grey, alpha = grey_pixels(), RNG.integers(0, 256, size=(12, 16), dtype=np.uint8)
    image_file("train/sad/grey-alpha.png", composite_on_white(as_rgb_reference(grey), alpha),
               Image.fromarray(np.dstack([grey, alpha]), "LA"))
    rgb = pixels()
    cmyk = np.dstack([255 - rgb, np.zeros(rgb.shape[:2], np.uint8)])  # C, M, Y, K = 0
    image_file("train/sad/print.tif", rgb, Image.fromarray(cmyk, "CMYK"))
    os.symlink(os.path.join(root, "gone", "moved.png"), os.path.join(root, "train/sad/link.png"))

    # surprise/: an empty class folder (macOS left its .DS_Store).
    os.makedirs(os.path.join(root, "train/surprise"))
    with open(os.path.join(root, "train/surprise/.DS_Store"), "wb") as f:
        f.write(b"\x00\x00\x00\x01Bud1")
    # A hidden folder beside the class folders is no class; nor is macOS's zip leftover.
    write(os.path.join(root, "train/.ipynb_checkpoints/x.png"), Image.fromarray(pixels()))
    write(os.path.join(root, "train/__MACOSX/happy/._plain.png"), Image.fromarray(pixels()))

    palette = RNG.integers(0, 256, size=(16, 3), dtype=np.uint8)  # GIF: a palette of colours
    index = RNG.integers(0, 16, size=(12, 16), dtype=np.uint8)
    indexed = Image.fromarray(index, "P")
    indexed.putpalette(palette.flatten().tolist())
    image_file("test/happy/t.gif", palette[index], indexed)
    rgb = pixels()
    image_file("test/sad/t.png", rgb, Image.fromarray(rgb))
    return expected


def test_the_fixture_tree_reads_exactly_and_every_image_is_its_upright_original(tmp_path):
    root = str(tmp_path / "faces")
    expected = write_tree(root)

    # The broken link is named, with the flag that leaves it out.
    with pytest.raises(FileNotFoundError) as error:
        FolderDataset(root, "train")
    message = str(error.value)
    link = os.path.join(root, "train", "sad", "link.png")
    assert f"{link} (a broken symbolic link" in message and "--skip-bad-images" in message

    with pytest.warns(UserWarning, match="no images for class.*surprise"):
        train = FolderDataset(root, "train", skip_bad_images=True)
    assert train.classnames == ("happiness", "surprise", "sadness")
    assert train.class_counts() == [7, 0, 9]
    assert train.skipped == [link]
    counts = {name: (r.images, r.nested, r.hidden, r.other) for name, r in train.reading.items()}
    assert counts == {"happiness": (7, 2, 4, 1),  # hidden: 2 ._ files, .DS_Store, checkpoint
                      "surprise": (0, 0, 1, 0),
                      "sadness": (10, 0, 0, 0)}  # the link is read too, then skipped
    lines = train.format_reading().splitlines()
    assert lines[0] == ("  happy/ -> happiness: 7 images (2 in subfolders); left out 4 hidden, "
                        "1 not image (notes.txt)")
    assert lines[1] == "  surprise/ -> surprise: 0 images; left out 1 hidden"
    assert train.class_folder("surprise") == os.path.join(root, "train", "surprise")

    test = FolderDataset(root, "test")
    assert test.classnames == train.classnames and test.class_counts() == [1, 0, 1]

    read = {path: np.asarray(dataset.load(i))
            for dataset in (train, test) for i, path in enumerate(dataset.paths)}
    assert sorted(read) == sorted(expected)
    for path, upright in expected.items():
        assert read[path].dtype == np.uint8 and read[path].shape == upright.shape, path
        difference = np.abs(read[path].astype(int) - upright.astype(int)).max()
        assert difference <= 1, f"{path}: off by {difference}/255"


def test_a_phone_jpeg_is_turned_upright(tmp_path):
    # JPEG is lossy: compare with the same file's pixels as stored (PIL's decoder leaves the
    # orientation alone), rotated as Orientation 6 says.
    path = str(tmp_path / "phone.jpg")
    Image.fromarray(pixels(24, 40)).save(path, quality=95, exif=exif_orientation(6))
    with Image.open(path) as stored:
        assert stored.getexif()[ORIENTATION] == 6
        decoded = np.asarray(stored.convert("RGB"))  # [24, 40, 3], as the sensor stored it
    upright = np.rot90(decoded, -1)  # shown rotated 90 degrees clockwise: [40, 24, 3]
    assert np.array_equal(np.asarray(load_image(path)), upright)


def test_a_32_bit_grey_tiff_of_8_bit_values_reads_as_8_bit(tmp_path):
    # Some tools store 8-bit grey in a 32-bit integer TIFF (mode I): values 0..255 are read as
    # they are. A 16-bit container (mode I;16) always holds 16-bit values: scaled by 1/257.
    grey = grey_pixels()
    grey[0, 0] = 255  # the brightest value an 8-bit picture has
    wide = str(tmp_path / "grey8-in-32.tif")
    Image.fromarray(grey.astype(np.int32)).save(wide)
    with Image.open(wide) as image:
        assert image.mode == "I"
    assert np.array_equal(np.asarray(load_image(wide)), as_rgb_reference(grey))
    sixteen = str(tmp_path / "grey8-in-16.png")
    Image.fromarray(grey.astype(np.uint16)).save(sixteen)
    dark = np.rint(grey.astype(np.float64) / 257).astype(np.uint8)
    assert np.array_equal(np.asarray(load_image(sixteen)), as_rgb_reference(dark))


def test_a_face_box_is_cut_from_the_upright_picture(tmp_path):
    rgb = pixels(20, 30)
    path = str(tmp_path / "rotated.png")
    Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1))).save(
        path, exif=exif_orientation(6))
    assert np.array_equal(np.asarray(load_image(path, box=(5, 2, 25, 12))), rgb[2:12, 5:25])


def test_hidden_folders_are_no_class_names(tmp_path):
    root = str(tmp_path)
    for split in ("train", "test"):
        save_image(os.path.join(root, split, "happy", "a.png"), (1, 2, 3))
        save_image(os.path.join(root, split, ".ipynb_checkpoints", "a.png"), (1, 2, 3))
    assert FolderDataset(root, "train").classnames == ("happiness",)
    explicit = FolderDataset(root, "train", classnames=["happy"])  # not "not in classnames"
    assert explicit.targets == [0]


# ----------------------------------------------------------------------------- the run


def folder_data(root, bad=None):
    """Three classes of small solid faces in train/ and test/; `bad`: a truncated JPEG."""
    for split in ("train", "test"):
        for c, colour in (("happy", (200, 60, 60)), ("sad", (60, 60, 200)),
                          ("angry", (60, 200, 60))):
            for i in range(4):
                save_image(os.path.join(root, split, c, f"{i}.jpg"),
                           tuple(v + 8 * i for v in colour), size=(24, 24))
    if bad:
        write_truncated_jpeg(os.path.join(root, bad))
    return root


CHECK_BYPASSED = textwrap.dedent("""\
    import sys
    import mpafer.app.protocol
    from mpafer.app.cli import run_cli
    from tests.helpers import load_script

    # As if the file broke after the check before training: the workers meet it.
    mpafer.app.protocol.require_all_readable = lambda *args: None
    sys.argv[0] = "train.py"
    run_cli(load_script("train").main)
""")


def train_command(root, out, *extra, bypass_check=False):
    clip_file = os.path.join(out + "-clip", "tiny.pt")
    if not os.path.isfile(clip_file):
        os.makedirs(os.path.dirname(clip_file), exist_ok=True)
        torch.save(tiny_state_dict(), clip_file)
    start = ["-c", CHECK_BYPASSED] if bypass_check else ["train.py"]
    return [sys.executable, *start, "--dataset", "folder", "--data-root", root, "--clip",
            clip_file, "--clip-activation", "quick_gelu", "--epochs", "1", "--batch-size", "4",
            "--workers", "2", "--out", out, "--cache-dir", out + "-cache", *extra]


def run_briefly(command):
    """Run `command` in its own process group; kill the group after 60 s -> (exit status,
    stdout + stderr, seconds). A run that hangs fails here instead of hanging the tests."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MPAFER_TRACEBACK", None)
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        stdout, stderr = process.communicate()
        pytest.fail(f"still running after 60 s:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    return process.returncode, stdout, stderr, time.monotonic() - start


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip() and "%|" not in line]


def test_an_unreadable_training_image_stops_the_run_before_the_clip_loads(tmp_path):
    bad = os.path.join("train", "sad", "zz.jpg")
    root = folder_data(str(tmp_path / "faces"), bad)
    status, stdout, stderr, _ = run_briefly(
        train_command(root, str(tmp_path / "run"), "--no-prototype-alignment"))
    assert status != 0
    assert error_lines(stderr) == [line for line in error_lines(stderr) if line.startswith(
        "error: ")] and len(error_lines(stderr)) == 1, stderr
    line = error_lines(stderr)[0]
    assert "train split" in line and os.path.join(root, bad) in line
    assert "--skip-bad-images" in line
    assert "MPA-FER on CLIP" not in stdout  # stopped before the CLIP was loaded


def test_a_run_chooses_best_pt_on_a_validation_folder_and_says_so(tmp_path):
    root = str(tmp_path / "faces")
    for name in ("train/happy/a.png", "train/sad/b.png", "validation/happy/c.png",
                 "validation/sad/d.png", "validation/sad/e.png", "test/sad/f.png"):
        save_image(os.path.join(root, name), (9, 9, 9))
    cfg, _, _ = run_config(["--dataset", "folder", "--data-root", root, "--eval-split", "val",
                            "--workers", "0", "--cache-dir", str(tmp_path / "cache")], "")
    with pytest.warns(UserWarning, match="happiness"):  # the test folder has no happy/
        splits = read_splits(cfg)
    assert splits.selection_name == "val" and len(splits.selection) == 3
    assert len(splits.test) == 1  # tested once at the end, as with a val/ folder
    assert f"read {os.path.join(root, 'validation')}:" in splits.describe()


def test_images_that_decoded_are_not_decoded_again_until_a_file_changes(tmp_path, monkeypatch):
    root, cache = str(tmp_path / "faces"), str(tmp_path / "cache")
    for name in ("happy/a.png", "happy/b.png", "sad/c.png"):
        save_image(os.path.join(root, "train", name), (9, 9, 9))
    decoded = []

    def counted_load(path, box=None):
        decoded.append(os.path.basename(path))
        return real_load(path, box)

    real_load = mpafer_data_base.load_image
    monkeypatch.setattr(mpafer_data_base, "load_image", counted_load)

    def check(dataset, cache_dir=cache):
        decoded.clear()
        require_readable_once(dataset, "train", 1, cache_dir)
        return sorted(decoded)

    train = FolderDataset(root, "train")
    assert check(train) == ["a.png", "b.png", "c.png"]
    assert len(os.listdir(os.path.join(cache, "checked-images"))) == 1
    assert check(FolderDataset(root, "train")) == []  # the same files, read again: no decoding
    assert check(train, cache_dir=None) == ["a.png", "b.png", "c.png"]  # no cache: every time
    few = Subset(train, [0, 2])  # other images of the same files: checked on their own
    assert check(few) == ["a.png", "c.png"] and check(few) == []
    # A cache that cannot be written costs the next run a check, never this one.
    blocked = str(tmp_path / "blocked")
    with open(blocked, "w") as f:
        f.write("a file where the cache folder would be")
    assert check(train, cache_dir=blocked) == ["a.png", "b.png", "c.png"]
    assert check(train, cache_dir=blocked) == ["a.png", "b.png", "c.png"]

    # A file re-saved under its name (new size and time) is decoded again, and a bad one fails.
    time.sleep(0.01)
    with open(os.path.join(root, "train", "sad", "c.png"), "wb") as f:
        f.write(b"not a png any more")
    with pytest.raises(ValueError, match="c.png.*--skip-bad-images"):
        check(FolderDataset(root, "train"))
    assert len(os.listdir(os.path.join(cache, "checked-images"))) == 2  # none for a failure


@pytest.mark.parametrize("alignment", ["--no-prototype-alignment", "--prototype-alignment"])
def test_a_worker_that_meets_an_unreadable_image_ends_the_run_in_one_line(tmp_path, alignment):
    bad = os.path.join("train", "sad", "zz.jpg")
    root = folder_data(str(tmp_path / "faces"), bad)
    status, stdout, stderr, seconds = run_briefly(
        train_command(root, str(tmp_path / "run"), alignment, bypass_check=True))
    assert status != 0, stdout[-2000:]
    assert "Traceback" not in stderr
    assert len(error_lines(stderr)) == 1, stderr
    line = error_lines(stderr)[0]
    assert line.startswith("error: cannot read image ") and os.path.join(root, bad) in line
    assert "--skip-bad-images" in line


class Unreadable(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        if index == 5:
            raise OSError("cannot read image /data/x.jpg: image file is truncated")
        return index


def test_a_worker_error_is_one_line_and_leaves_no_worker_behind():
    loader = torch.utils.data.DataLoader(Unreadable(), batch_size=2, num_workers=2,
                                         worker_init_fn=ignore_interrupts)
    seen = []
    with pytest.raises(LoadError) as error:
        with batches(loader) as items:
            for batch in items:
                seen += batch.tolist()
    assert str(error.value) == ("cannot read image /data/x.jpg: image file is truncated; "
                                "replace it, or leave unreadable images out with "
                                "--skip-bad-images (skip_bad_images=True in Python)")
    assert seen == [0, 1, 2, 3]
    assert multiprocessing.active_children() == []  # shut down now, not at exit


def test_an_empty_class_folder_is_named_before_the_clip_loads(tmp_path):
    root = folder_data(str(tmp_path / "faces"))
    os.makedirs(os.path.join(root, "train", "fear"))
    cfg, _, _ = run_config(["--dataset", "folder", "--data-root", root], "")
    with pytest.raises(ValueError) as error, pytest.warns(UserWarning):
        read_splits(cfg)
    assert str(error.value).startswith(f"{os.path.join(root, 'train', 'fear')} (class fear) "
                                       "holds no image")


def test_resuming_data_that_moved_says_how(tmp_path):
    cfg, _, _ = run_config(["--dataset", "folder", "--data-root", str(tmp_path / "gone")], "")
    cfg.resume = "runs/folder/x/last.pt"
    with pytest.raises(FileNotFoundError,
                       match="--resume runs/folder/x/last.pt --data-root NEW"):
        read_splits(cfg)


@pytest.mark.parametrize("weights", ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"])
@pytest.mark.parametrize("quick_gelu", [True, False])
def test_clip_loads_a_downloaded_open_clip_folder(tmp_path, weights, quick_gelu):
    state = tiny_state_dict()
    folder = tmp_path / "CLIP-ViT-tiny"
    folder.mkdir()
    if weights.endswith(".bin"):
        torch.save(state, folder / weights)
    else:
        write_safetensors(state, folder / weights)
    model_cfg = {"embed_dim": 32, **({"quick_gelu": True} if quick_gelu else {})}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    model, _ = clip.load(str(folder), device="cpu")
    assert model.activation == ("quick_gelu" if quick_gelu else "gelu")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k in loaded)
    assert model.checkpoint_sha256 and model.checkpoint_name == str(folder)
