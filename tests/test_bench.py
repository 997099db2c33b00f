"""The benchmark runs in a tiny setting and writes well-formed figures (no timing asserted)."""
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from mpafer.app import bench
from mpafer.app.bench.epoch import write_rafdb_like
from mpafer.app.synthetic import SyntheticFaces
from mpafer.data import RAFDB
from tests.dataset_writers import write_synthetic_rafdb

REQUIRED = ("clip_ratio", "train_step_ratio", "eval_ratio", "peak_memory_bytes", "trainable_params",
            "checkpoint_bytes")


def test_bench_tiny_writes_json_with_the_required_figures(tmp_path, capsys):
    path = tmp_path / "bench.json"
    bench.main(["--shape", "tiny", "--batch", "2", "--train-batch", "4", "--eval-batch", "4",
                "--repeats", "2", "--warmup", "1", "--device", "cpu", "--no-keep-freed-memory",
                "--json", str(path)])
    printed = capsys.readouterr().out
    for label in ("CLIP towers", "training step", "evaluation", "peak memory", "trainable parameters"):
        assert label in printed
    results = json.loads(path.read_text())
    for key in REQUIRED:
        value = results[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, key
    assert isinstance(results["trainable_params"], int) and isinstance(results["checkpoint_bytes"], int)
    settings = results["settings"]
    assert settings["shape"] == "tiny" and settings["train_batch"] == 4 and settings["eval_batch"] == 4
    assert settings["which"] == ["clip", "train", "eval", "memory"]
    for key in ("device", "torch", "threads", "date"):
        assert results[key], key
    assert results["malloc_keeps_freed_memory"] is False  # the test process's allocator is left alone
    assert len(results["times"]["train"]["full"]) == 2 and all(t > 0 for t in results["times"]["eval"]["mpafer"])


def test_bench_with_grad_checkpointing_in_process():
    results = bench.main(["train", "memory", "--shape", "tiny", "--train-batch", "2", "--repeats", "1",
                          "--warmup", "0", "--device", "cpu", "--no-keep-freed-memory", "--grad-checkpointing",
                          "--in-process"])
    assert results["settings"]["grad_checkpointing"] is True
    assert results["train_step_ratio"] > 0 and results["peak_memory_bytes"] > 0
    assert "clip_ratio" not in results


EPOCH_KEYS = ("epoch_ratio", "loader_images_per_second_per_worker", "step_images_per_second", "outside_step_share",
              "epoch_images_per_second", "loader_images_per_second", "eval_images_per_second",
              "prototype_images_per_second")
TINY_EPOCH = ["epoch", "--shape", "tiny", "--train-batch", "4", "--eval-batch", "4", "--epoch-steps", "2",
              "--loader-batches", "4", "--eval-images", "6", "--repeats", "2", "--warmup", "1", "--workers", "1",
              "--device", "cpu", "--no-keep-freed-memory"]


def test_epoch_benchmark_tiny_reports_rates_ratios_and_a_full_run(tmp_path, capsys):
    path = tmp_path / "epoch.json"
    bench.main([*TINY_EPOCH, "--json", str(path)])
    printed = capsys.readouterr().out
    for label in ("step only", "epoch from files", "DataLoader alone", "evaluation from files", "outside_step_share"):
        assert label in printed
    results = json.loads(path.read_text())
    for key in EPOCH_KEYS:
        assert isinstance(results[key], float) and math.isfinite(results[key]) and results[key] > 0, key
    assert 0 < results["outside_step_share"] < 1 and 0 < results["epoch_ratio"] < 10
    # With one worker, the per-worker rate is the loader's rate.
    assert results["loader_images_per_second_per_worker"] == results["loader_images_per_second"]
    run = results["full_run_model"]  # RAF-DB's recipe unless a dataset is given
    assert (run["epochs"], run["train_images"], run["eval_images"], run["evaluations"]) == (120, 12271, 3068, 120)
    assert run["steps_per_epoch"] == 12271 // 4
    parts = run["loader"] + run["evaluation"] + run["prototypes"]
    assert run["total"] == pytest.approx(parts + run["steps"])
    assert results["outside_step_share"] == pytest.approx(parts / run["total"])
    assert run["steps"] == pytest.approx(120 * (12271 // 4) * 4 / results["step_images_per_second"])
    settings = results["epoch_settings"]
    assert (settings["epoch_steps"], settings["eval_images"], settings["workers"]) == (2, 6, 1)
    assert len(results["times"]["epoch"]["epoch"]) == 2 and len(results["times"]["epoch"]["loader"][0]) == 4


def test_epoch_benchmark_reads_a_dataset_root(tmp_path):
    root = write_synthetic_rafdb(tmp_path / "raf", 3, 1)  # 21 train, 7 test faces, 100 px
    results = bench.main([*TINY_EPOCH, "--data-root", str(root), "--eval-every", "5", "--run-epochs", "10"])
    run = results["full_run_model"]
    assert (run["train_images"], run["eval_images"], run["evaluations"]) == (21, 7, 2)
    assert results["epoch_settings"]["data"] == str(root) and results["epoch_settings"]["eval_images"] == 6
    with pytest.raises(ValueError, match="fewer than"):
        bench.main([*TINY_EPOCH, "--data-root", str(root), "--loader-batches", "9"])


def test_rafdb_like_writer_is_read_with_the_faces_labels(tmp_path):
    root = write_rafdb_like(str(tmp_path), 10, 3)
    train, test = RAFDB(root, "train"), RAFDB(root, "test")
    faces = SyntheticFaces("train", 2, 100)
    assert [train.classnames[t] for t in train.targets] == [faces.classnames[t] for t in faces.targets[:10]]
    assert len(test) == 3 and train.load(0).size == (100, 100)


def test_faces_benchmark_times_both_detectors_and_prints_the_ratio(tmp_path, capsys):
    from mpafer.app.bench import faces
    path = tmp_path / "faces.json"
    results = faces.main(["--size", "640x480", "--repeats", "2", "--warmup", "0",
                          "--json", str(path)])
    assert json.load(open(path))["detect_ratio"] == results["detect_ratio"] > 0
    assert (results["width"], results["height"]) == (640, 480)
    # The composed photo's faces (the smallest, 20 pixels wide, may be missed), found alike by
    # both detectors.
    assert results["faces_ours"] == results["faces_reference"] >= 3
    assert [len(results["times"][k]) for k in ("ours", "reference")] == [2, 2]
    assert "MTCNN, ours / facenet-pytorch" in capsys.readouterr().out


def test_template_benchmark_brings_the_landmarks_back_to_the_crops_pixels(tmp_path):
    # Four copies of one crop: their median is that crop's own landmarks, which the test finds
    # by hand (the detector on a 3x enlarged copy, pixel centres mapped back), and cutting each
    # crop again by its own landmarks gives the crop back, up to resampling.
    import facenet_pytorch
    from skimage import data as skdata

    from mpafer.app.bench import template
    from mpafer.faces import MTCNN
    weights = os.path.join(os.path.dirname(facenet_pytorch.__file__), "data")
    crop = Image.fromarray(skdata.astronaut()).crop((130, 20, 330, 220)).resize(
        (100, 100), Image.Resampling.BICUBIC)
    folder = tmp_path / "crops"
    folder.mkdir()
    for i in range(4):
        crop.save(folder / f"{i}.png")
    out = tmp_path / "template.json"
    results = template.main(["--images", str(folder), "--held-out", str(folder), "--upscale",
                             "3", "--convention", "rafdb", "--detector-weights", weights,
                             "--json", str(out)])
    found = MTCNN(weights).detect(crop.resize((300, 300), Image.Resampling.BICUBIC),
                                  min_face=120)
    expected = (found.landmarks[int(found.scores.argmax())].numpy() + 0.5) / 3 - 0.5
    assert results["faces"] == 4 and results["crop_size"] == [100, 100]
    assert np.allclose(results["median"], expected, atol=0.01)
    held_out = results["held_out"]
    assert held_out["faces"] == 4
    assert held_out["difference_median"] < 3 and held_out["difference_median"] < held_out[
        "difference_convention"]
    assert json.loads(out.read_text())["median"] == results["median"]
    crop.resize((64, 64)).save(folder / "9-smaller.png")  # the median of mixed sizes means nothing
    with pytest.raises(ValueError) as error:
        template.main(["--images", str(folder), "--detector-weights", weights])
    message = str(error.value)  # names the file that differs from those read before it
    assert ".png is " in message and "64 x 64" in message and "100 x 100" in message
    other = tmp_path / "other"  # held-out crops of another size than the measured ones
    other.mkdir()
    crop.resize((64, 64)).save(other / "small.png")
    (folder / "9-smaller.png").unlink()
    with pytest.raises(ValueError, match="small.png is 64 x 64.*100 x 100"):
        template.main(["--images", str(folder), "--held-out", str(other),
                       "--detector-weights", weights])
