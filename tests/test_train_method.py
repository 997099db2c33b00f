"""train.py's method-level duties: per-term gradient norms at the first step, and DDP with
learnable alignment and a validation split (2 gloo processes)."""
import json
import os
import subprocess
import sys

import torch

from mpafer.app.synthetic import SyntheticFaces
from mpafer.checkpoint import load_checkpoint
from tests.helpers import tiny_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def write_folder_dataset(root, per_class):
    """root/<split>/<class>/*.png with synthetic faces (the generic folder layout)."""
    for split in ("train", "val", "test"):
        faces = SyntheticFaces(split, per_class, image_size=32, seed=3)
        for i in range(len(faces)):
            image, label = faces[i]
            folder = os.path.join(root, split, faces.classnames[label])
            os.makedirs(folder, exist_ok=True)
            image.save(os.path.join(folder, f"{i:04d}.png"))
    return str(root)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_every_loss_term_moves_the_prompts_at_the_first_step_of_every_epoch(tmp_path):
    clip_file = tmp_path / "tiny.pt"
    torch.save(tiny_state_dict(seed=0), clip_file)
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "train.py", "--demo", "--clip", str(clip_file), "--out", str(out),
         "--cache-dir", str(tmp_path / "w"), "--demo-train-per-class", "6",
         "--demo-test-per-class", "2", "--batch-size", "14", "--epochs", "2"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for epoch, record in enumerate(read_jsonl(out / "metrics.jsonl"), 1):
        norms = record["grad_norms"]
        assert set(norms) == {"cls", "ta", "pa", "v"}
        assert all(v > 0 for v in norms.values()), norms
        assert f"gradient norms on the prompts at the first step of epoch {epoch}:" in result.stdout


def test_ddp_learnable_alignment_and_validation_split(tmp_path):
    root = write_folder_dataset(tmp_path / "faces", per_class=4)
    clip_file = tmp_path / "tiny.pt"
    torch.save(tiny_state_dict(seed=0), clip_file)
    out = tmp_path / "ddp"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "train.py", "--dataset", "folder",
         "--data-root", root, "--clip", str(clip_file), "--out", str(out),
         "--cache-dir", str(tmp_path / "w"), "--eval-split", "val", "--epochs", "2",
         "--batch-size", "7", "--workers", "0", "--top-k", "4", "--learnable-alignment",
         "--attention-temperature", "0.1"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checkpoint = load_checkpoint(str(out / "last.pt"))
    assert {"alignment.q_proj.weight", "alignment.k_proj.weight",
            "alignment.v_proj.weight"} <= set(checkpoint["state_dict"])
    eye = torch.eye(checkpoint["state_dict"]["alignment.q_proj.weight"].shape[0])
    for name in ("q_proj", "k_proj", "v_proj"):  # every projection trained (DDP would fail if not)
        assert not torch.equal(checkpoint["state_dict"][f"alignment.{name}.weight"], eye), name
    # The best checkpoint chosen on val was then reported on the test split, by every rank.
    assert "on the test split" in result.stdout
