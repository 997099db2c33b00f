"""train.py and eval.py as a user runs them: subprocesses on CPU with tiny CLIPs and synthetic faces."""
import json
import os
import pickle
import re
import signal
import subprocess
import sys

import pytest
import torch

from mpafer.checkpoint import load_checkpoint
from tests.helpers import REPO, quick_demo, read_jsonl, run, tiny_state_dict, write_safetensors


@pytest.fixture(scope="module")
def tiny_clip_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.pt"
    torch.save(tiny_state_dict(seed=0), path)
    return str(path)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's quick start, `python train.py --demo`, run once in full (about 1.5 min on 2 cores)."""
    out = tmp_path_factory.mktemp("demo")
    result = run("train.py", "--demo", "--out", str(out / "run"), "--cache-dir", str(out / "weights"))
    return out, result.stdout + result.stderr


def test_demo_trains_end_to_end_and_learns(demo_run):
    out, log = demo_run
    assert "DEMO" in log and "synthetic" in log and "pre-training a tiny CLIP" in log
    # Written to a file (not a terminal): no progress-bar frames, and every line readable.
    assert "\r" not in log and max(len(line) for line in log.splitlines()) <= 200
    records = read_jsonl(out / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in records] == list(range(1, 11))
    for key in ("loss", "cls", "ta", "pa", "v", "lr", "war", "uar", "images_per_second", "seconds", "eval_seconds"):
        assert all(isinstance(r[key], float) for r in records), key
    assert all(r["eval_seconds"] > 0 for r in records) and "+ eval" in log  # evaluated every epoch
    best = max(r["war"] for r in records)
    # The method's lift, measured in the same run on the same test faces: trained prompts beat
    # zero-shot CLIP with MPA-FER's hard prompts by at least 10 points of WAR.
    zero_shot = json.load(open(out / "run" / "baseline.json"))["zero_shot_hard_prompts"]["war"]
    assert best >= zero_shot + 0.10, f"trained {best:.3f} vs zero-shot {zero_shot:.3f}"
    assert "zero-shot CLIP with the hard prompts" in log
    assert (out / "weights" / "demo-tiny-clip-v2.pt").is_file()  # cached for later runs
    checkpoint = load_checkpoint(str(out / "run" / "best.pt"))
    assert checkpoint["metrics"]["war"] == best and "resume" not in checkpoint
    assert os.path.getsize(out / "run" / "best.pt") < 200_000  # prompts only, not the CLIP
    assert str(out / "run" / "best.pt") in log


def test_eval_json_matches_training_and_its_own_confusion_matrix(demo_run):
    out, _ = demo_run
    report = out / "eval.json"
    result = run("eval.py", "--demo", "--checkpoint", str(out / "run" / "best.pt"), "--cache-dir", str(out / "weights"),
                 "--json", str(report), "--confusion-png", str(out / "cm.png"))
    metrics = json.load(open(report))
    confusion = torch.tensor(metrics["confusion"])
    assert confusion.sum() == metrics["num_samples"] == 7 * 60
    assert metrics["war"] == pytest.approx(confusion.trace().item() / confusion.sum().item())
    recalls = confusion.diagonal() / confusion.sum(1)
    assert metrics["uar"] == pytest.approx(recalls.mean().item())
    for i, name in enumerate(metrics["classnames"]):
        assert metrics["per_class_recall"][name] == pytest.approx(recalls[i].item())
    assert metrics["war"] == pytest.approx(load_checkpoint(str(out / "run" / "best.pt"))["metrics"]["war"])
    assert "per-class recall" in result.stdout and (out / "cm.png").stat().st_size > 0


def test_predict_labels_an_aligned_crop_with_attention(demo_run):
    from mpafer.app.synthetic import SyntheticFaces
    out, _ = demo_run
    face = SyntheticFaces("test", 1, image_size=100, seed=5).load(1)  # a happy face
    face.save(out / "face.jpg")
    result = run("-m", "mpafer.predict", "--checkpoint", str(out / "run" / "best.pt"), "--cache-dir",
                 str(out / "weights"), "--clip", str(out / "weights" / "demo-tiny-clip-v2.pt"),
                 "--align", "none", str(out / "face.jpg"), "--attention", str(out / "attention"),
                 "--json", str(out / "pred.json"))
    face = json.load(open(out / "pred.json"))["images"][0]["faces"][0]
    probabilities = face["probabilities"]
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4) and len(probabilities) == 7
    assert face["label"] == max(probabilities, key=probabilities.get) and face["box"] == [0, 0, 100, 100]
    assert face["label"] in result.stdout and os.listdir(out / "attention")


def signal_after_first_epoch(args, signum):
    """Start train.py, send `signum` (Ctrl-C: SIGINT; a scheduler's SIGTERM) as soon as epoch 1
    is logged -> the run's exit status, output and error output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("epoch   1/"):
            process.send_signal(signum)
            break
    stdout, stderr = process.communicate(timeout=600)
    return process.returncode, "".join(lines) + stdout, stderr


# 10 steps an epoch: a signal sent once epoch 1 is logged lands in the middle of epoch 2 or 3.
SETTINGS = ("--epochs", "3", "--log-interval", "1")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_clip_file):
    """A quick demo run of 3 epochs, never stopped: what every resumed run must equal."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run(*quick_demo(out, tiny_clip_file, *SETTINGS, per_class=24))
    return out


def assert_same_run(straight, resumed):
    """The resumed run's last.pt and metrics equal the uninterrupted run's."""
    expected, found = load_checkpoint(str(straight / "last.pt")), load_checkpoint(str(resumed / "last.pt"))
    assert found["epoch"] == 3 and found["resume"]["step"] == 0
    for key in expected["state_dict"]:
        torch.testing.assert_close(expected["state_dict"][key], found["state_dict"][key],
                                   rtol=1e-6, atol=1e-7)
    records = read_jsonl(resumed / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for r, s in zip(read_jsonl(straight / "metrics.jsonl"), records):
        # The loss sums of the interrupted epoch carried over: the same epoch means.
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-6) and r["war"] == s["war"]


def test_resume_after_stop_after_repeats_an_uninterrupted_run(tmp_path, tiny_clip_file,
                                                              uninterrupted):
    run(*quick_demo(tmp_path / "split", tiny_clip_file, *SETTINGS, "--stop-after", "1",
                    per_class=24))
    assert load_checkpoint(str(tmp_path / "split" / "last.pt"))["epoch"] == 1
    run("train.py", "--resume", str(tmp_path / "split" / "last.pt"))  # the run's own settings come back
    assert_same_run(uninterrupted, tmp_path / "split")


@pytest.mark.parametrize("signum, name, status", [(signal.SIGINT, "Ctrl-C", 130),
                                                   (signal.SIGTERM, "SIGTERM", 143)])
def test_resume_after_ctrl_c_or_sigterm_repeats_an_uninterrupted_run(
        tmp_path, tiny_clip_file, uninterrupted, signum, name, status):
    code, stdout, stderr = signal_after_first_epoch(
        quick_demo(tmp_path / "stopped", tiny_clip_file, *SETTINGS, per_class=24), signum)
    assert code == status and "Traceback" not in stderr
    stopped = load_checkpoint(str(tmp_path / "stopped" / "last.pt"))
    # Usually step 1 of epoch 2; a slow machine may deliver the signal later, even at the end
    # of an epoch (then last.pt is that epoch's own).
    assert stopped["epoch"] in (1, 2) and 0 <= stopped["resume"]["step"] < 10
    if stopped["resume"]["step"]:
        assert (f"stopped by {name} after step {stopped['resume']['step']} of epoch "
                f"{stopped['epoch'] + 1}") in stdout
    resume = re.search(rf"interrupted \({name}\); continue exactly where it stopped with: "
                       r"python (train.py --resume \S+)", stdout)
    assert resume and resume.group(1) == f"train.py --resume {tmp_path / 'stopped' / 'last.pt'}"
    run(*resume.group(1).split())

    assert_same_run(uninterrupted, tmp_path / "stopped")
    history = json.load(open(tmp_path / "stopped" / "config.json"))["resumed"]
    assert [(h["epoch"], h["step"]) for h in history] == [(stopped["epoch"],
                                                           stopped["resume"]["step"])]


def test_ddp_with_two_gloo_processes(tmp_path, tiny_clip_file):
    torchrun = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node=2"]
    args = quick_demo(tmp_path / "ddp", tiny_clip_file, "--epochs", "2")
    result = subprocess.run([*torchrun, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = read_jsonl(tmp_path / "ddp" / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]  # one line per epoch: only rank 0 logs
    assert set(records[0]) >= {"loss", "cls", "ta", "pa", "v", "lr", "war", "uar", "images_per_second", "seconds"}
    checkpoint = load_checkpoint(str(tmp_path / "ddp" / "last.pt"))
    assert checkpoint["epoch"] == 2 and set(checkpoint["state_dict"]) == {"text_prompts.ctx", "visual_prompts.prompts"}
    # The evaluation gathered every test image across both ranks exactly once.
    assert sum(sum(row) for row in checkpoint["metrics"]["confusion"]) == 7 * 4


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creating this file is the "attack"


def test_malicious_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"format": "mpafer-checkpoint/2", "x": _Payload(str(marker))}))
    result = run("eval.py", "--checkpoint", str(evil), "--demo", check=False)
    assert result.returncode != 0 and "refusing to load" in result.stderr
    assert not marker.exists()


def test_checkpoint_with_other_classes_or_clip_is_refused(tmp_path, tiny_clip_file):
    run(*quick_demo(tmp_path / "run", tiny_clip_file, "--epochs", "1"))
    checkpoint = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    checkpoint["classnames"] = [*checkpoint["classnames"][:-1], "contempt"]
    torch.save(checkpoint, tmp_path / "other-classes.pt")
    result = run("eval.py", "--demo", "--checkpoint", str(tmp_path / "other-classes.pt"), "--clip", tiny_clip_file,
                 check=False)
    assert result.returncode != 0 and "was trained on classes" in result.stderr
    other_clip = tmp_path / "other-clip.pt"
    torch.save(tiny_state_dict(seed=1), other_clip)
    result = run("eval.py", "--demo", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--clip", str(other_clip),
                 check=False)
    assert result.returncode != 0 and "was trained on CLIP" in result.stderr


def test_nan_loss_stops_clearly_and_saves_nothing_bad(tmp_path, tiny_clip_file):
    result = run(*quick_demo(tmp_path / "nan", tiny_clip_file, "--epochs", "2", "--lr", "1e30",
                             "--log-interval", "1"), check=False)
    assert result.returncode == 1
    assert "stopping: the loss became" in result.stdout
    assert not (tmp_path / "nan" / "last.pt").exists()
    # The message names no checkpoint that was never written.
    assert "no checkpoint was written" in result.stdout
    assert "last.pt" not in result.stdout and "best.pt" not in result.stdout


def test_bad_arguments_are_clear_errors(tmp_path):
    # The data is checked before CLIP is looked at, and nothing is written.
    result = run("train.py", "--dataset", "rafdb", "--data-root", str(tmp_path / "nowhere"), "--clip", "ViT-H/99",
                 "--out", str(tmp_path / "x"), check=False)
    assert result.returncode != 0 and "nowhere" in result.stderr and "ViT-H/99" not in result.stderr
    assert not (tmp_path / "x").exists()
    result = run("train.py", "--dataset", "imagenet", check=False)
    assert result.returncode == 2 and "--dataset must be one of" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # one line, not the whole usage
    result = run("eval.py", check=False)
    assert result.returncode != 0 and "--checkpoint" in result.stderr


def test_expclip_train_and_side_by_side_eval(tmp_path, tiny_clip_file):
    from mpafer import clip
    from mpafer.app.synthetic import SyntheticFaces
    from mpafer.expclip import add_teacher_features, cache_image_features
    faces = SyntheticFaces("train", 3, image_size=48, seed=9)
    (tmp_path / "faces").mkdir()
    for i in range(len(faces)):
        faces.load(i).save(tmp_path / "faces" / f"{i:03d}.png")
    clip_model, _ = clip.load(tiny_clip_file)
    features = str(tmp_path / "feats.pt")
    data = cache_image_features(clip_model, str(tmp_path / "faces"), features, num_workers=0, progress=False)
    teacher = torch.nn.functional.normalize(data["clip_features"] @ torch.randn(32, 64), dim=-1)  # a planted teacher
    add_teacher_features(features, teacher, "planted", "none")
    result = run("-m", "mpafer.expclip", "train", "--features", features, "--out", str(tmp_path / "head"),
                 "--batch-size", "7", "--epochs", "3")
    history = read_jsonl(tmp_path / "head" / "metrics.jsonl")
    assert [h["epoch"] for h in history] == [1, 2, 3] and "wrote" in result.stdout
    head = str(tmp_path / "head" / "expclip_head.pth")
    assert set(torch.load(head, weights_only=True)) == {"mlp.weight"}
    result = run("eval.py", "--method", "expclip", "--head", head, "--prompts", "ensemble5", "--demo",
                 "--clip", tiny_clip_file, "--json", str(tmp_path / "side.json"))
    assert "side by side:" in result.stdout
    report = json.load(open(tmp_path / "side.json"))
    assert set(report["all"]) == {"zero-shot CLIP (ensemble5)", "Exp-CLIP (ensemble5)"}
    assert all(0 <= r["war"] <= 1 and 0 <= r["uar"] <= 1 for r in report["all"].values())


def test_a_gelu_safetensors_clip_trains_resumes_and_evaluates_with_its_activation(tmp_path):
    from mpafer.app.synthetic import SyntheticFaces
    clip_file = write_safetensors(tiny_state_dict(seed=2), tmp_path / "gelu-clip.safetensors")
    out, note = tmp_path / "run", "does not say which activation"
    result = run(*quick_demo(out, clip_file, "--epochs", "2", "--stop-after", "1",
                             "--clip-activation", "gelu"))
    assert note not in result.stdout
    assert load_checkpoint(str(out / "last.pt"))["clip"]["activation"] == "gelu"
    # A resumed run keeps its activation; asking for another would change the run.
    result = run("train.py", "--resume", str(out / "last.pt"), "--clip-activation", "quick_gelu",
                 check=False)
    assert result.returncode == 2 and "--clip-activation 'quick_gelu'" in result.stderr
    result = run("train.py", "--resume", str(out / "last.pt"))
    checkpoint = load_checkpoint(str(out / "last.pt"))
    assert note not in result.stdout and checkpoint["epoch"] == 2
    assert checkpoint["clip"] == {"name": clip_file, "sha256": checkpoint["clip"]["sha256"],
                                  "activation": "gelu"}

    # eval.py reuses the recorded activation: the same probabilities as with the flag.
    SyntheticFaces("test", 1, image_size=100, seed=5).load(1).save(tmp_path / "face.png")
    base = ("-m", "mpafer.predict", "--checkpoint", str(out / "last.pt"), "--align", "none",
            str(tmp_path / "face.png"), "--cache-dir", str(out) + "-cache")

    def probabilities(name, *extra):
        result = run(*base, "--json", str(tmp_path / f"{name}.json"), *extra)
        assert note not in result.stdout
        return json.load(open(tmp_path / f"{name}.json"))["images"][0]["faces"][0]["probabilities"]

    recorded = probabilities("recorded")
    assert recorded == probabilities("flag", "--clip-activation", "gelu")
    # QuickGELU on the same file is another CLIP: refused, or (forced) other probabilities.
    result = run(*base, "--clip-activation", "quick_gelu", check=False)
    assert result.returncode == 1 and "was trained on CLIP" in result.stderr
    assert "GELU), but the loaded CLIP is" in result.stderr and "QuickGELU" in result.stderr
    forced = probabilities("forced", "--clip-activation", "quick_gelu", "--allow-other-clip")
    assert max(abs(forced[c] - recorded[c]) for c in recorded) > 1e-6
