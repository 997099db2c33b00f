"""Runs survive what happens to them: a write that fails (disk full, at every point the run
saves; a real full tmpfs where one can be mounted), a kill at any moment, a dataset that moved,
a damaged checkpoint. Each ends in one line that names the file, and nothing saved before is
lost. (SIGTERM and Ctrl-C in the middle of an epoch, and their exact resume: test_scripts.py.)"""
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

from mpafer.app.cli import run_cli
from mpafer.app.faults import ignore_interrupts
from mpafer.app.runs import remove_temporaries
from mpafer.checkpoint import load_checkpoint
from mpafer.files import atomic_write
from tests.dataset_writers import write_synthetic_rafdb
from tests.helpers import REPO, quick_demo, read_jsonl, tiny_state_dict

LINUX = sys.platform.startswith("linux")  # /proc/self/fd names the file behind a descriptor


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.pt"
    torch.save(tiny_state_dict(seed=0), path)
    return str(path)


def demo_args(out, clip_file, *extra):
    return list(quick_demo(out, clip_file, "--epochs", "2", *extra)[1:])


def temporaries(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] if folder.exists() else []


def assert_nothing_half_written(folder):
    """Every checkpoint loads, every metrics line parses, the log ends with a whole line, and no
    temporary file is left."""
    assert temporaries(folder) == []
    for name in ("last.pt", "best.pt"):
        if (folder / name).exists():
            load_checkpoint(str(folder / name))
    if (folder / "metrics.jsonl").exists():
        read_jsonl(folder / "metrics.jsonl")
    if (folder / "log.txt").exists():
        assert (folder / "log.txt").read_bytes().endswith(b"\n")


# -- a write that fails ----------------------------------------------------------------------------

class DiskFull:
    """The disk fills up at the `nth` write of the file `name` in the run folder: an append to
    it (log.txt, metrics.jsonl) writes part of its data and fails; a file written whole (through a
    temporary file renamed over it) fails when synced. `marker`: count only appends holding it.
    `before` keeps what the file held when the write failed (None: it did not exist)."""

    def __init__(self, monkeypatch, folder, name, nth=1, marker=None):
        self.path, self.nth, self.marker, self.seen = os.path.join(folder, name), nth, marker, 0
        self.failed, self.before = False, None
        self.real_write, self.real_fsync = os.write, os.fsync
        monkeypatch.setattr(os, "write", self.write)
        monkeypatch.setattr(os, "fsync", self.fsync)

    def file_of(self, fd):
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return ""

    def fail_now(self) -> bool:
        self.seen += 1
        if self.failed or self.seen != self.nth:
            return False
        self.failed = True
        self.before = open(self.path, "rb").read() if os.path.exists(self.path) else None
        return True

    def write(self, fd, data):
        if (self.file_of(fd) == self.path and (self.marker is None or self.marker in bytes(data))
                and self.fail_now()):
            self.real_write(fd, bytes(data)[:len(data) // 2])  # part of it made it to disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real_write(fd, data)

    def fsync(self, fd):
        name = self.file_of(fd)
        if (name.startswith(self.path + ".") and name.endswith(".tmp") and self.fail_now()):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real_fsync(fd)


# (file, which write of it fails, the appends counted, extra flags, what was saved before)
SAVE_POINTS = {
    "config.json": ("config.json", 1, None, (), ""),
    "last.pt before training": ("last.pt", 1, None, (), "checked before training"),
    "last.pt": ("last.pt", 3, None, (), "the files saved before are whole"),
    "best.pt": ("best.pt", 1, None, (), "the files saved before are whole"),
    "log.txt": ("log.txt", 1, b"epoch   1/", (), "the files saved before are whole"),
    "metrics.jsonl": ("metrics.jsonl", 2, None, (), "the files saved before are whole"),
    "baseline.json": ("baseline.json", 1, None, (), ""),
    "curves.png": ("curves.png", 1, None, (), ""),
    "test.json": ("test.json", 1, None, ("--val-fraction", "0.25"), ""),
}


@pytest.mark.skipif(not LINUX, reason="finds the failing file through /proc/self/fd")
@pytest.mark.parametrize("point", SAVE_POINTS)
def test_a_full_disk_at_each_save_point_is_one_line_and_loses_nothing(
        train, clip_file, tmp_path, monkeypatch, point):
    name, nth, marker, extra, kept = SAVE_POINTS[point]
    out = tmp_path / "run"
    disk = DiskFull(monkeypatch, str(out), name, nth, marker)
    with pytest.raises(SystemExit) as error:
        run_cli(lambda: train.main(demo_args(out, clip_file, *extra)))
    monkeypatch.undo()
    message = str(error.value.code)
    assert disk.failed and "\n" not in message, message
    assert message.startswith(f"error: disk full while writing {out / name} ([Errno 28] "), message
    assert kept in message
    assert_nothing_half_written(out)
    if disk.before is not None:  # the file as it was before the write that failed
        assert (out / name).read_bytes() == disk.before
    if point == "last.pt":  # epoch 2 failed: epoch 1 is kept, and the run goes on from there
        assert load_checkpoint(str(out / "last.pt"))["epoch"] == 1
        assert f"continue with: python train.py --resume {out / 'last.pt'}" in message
        train.main(["--resume", str(out / "last.pt")])
        assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
        assert load_checkpoint(str(out / "last.pt"))["epoch"] == 2


def test_a_read_only_run_folder_fails_before_training(train, clip_file, tmp_path, monkeypatch,
                                                      capsys):
    out = tmp_path / "run"

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    with pytest.raises(SystemExit) as error:
        run_cli(lambda: train.main(demo_args(out, clip_file)))
    assert str(error.value.code).startswith(
        f"error: read-only file system while writing {out / 'config.json'} ([Errno 30] ")
    assert "epoch   1/" not in capsys.readouterr().out  # before training began


@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MB tmpfs at tmp_path/tmpfs, where the machine lets us mount one (as root)."""
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    if not LINUX or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs Linux")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder, leave):
    """Fill the file system of `folder` with a ballast file until `leave` bytes are free."""
    stats = os.statvfs(folder)
    with open(os.path.join(folder, "ballast"), "wb") as f:
        f.write(b"\0" * max(stats.f_bavail * stats.f_frsize - leave, 0))


def test_a_run_on_a_tmpfs_that_fills_up(train, clip_file, tmpfs, monkeypatch):
    """A real full disk: the checkpoint of epoch 2 does not fit; epoch 1's stays and loads, no
    temporary file is left. A resume on the still-full disk fails before training; once there
    is room, it finishes the run."""
    out = tmpfs / "run"
    save_checkpoints = train.save_checkpoints

    def then_fill(run, *args, **kwargs):
        save_checkpoints(run, *args, **kwargs)
        fill(tmpfs, os.path.getsize(out / "last.pt") // 2)

    monkeypatch.setattr(train, "save_checkpoints", then_fill)
    with pytest.raises(SystemExit) as error:
        run_cli(lambda: train.main(demo_args(out, clip_file)))
    monkeypatch.undo()
    message = str(error.value.code)
    assert message.startswith(f"error: disk full while writing {out / 'last.pt'} "
                              "([Errno 28] No space left on device); the files saved before "
                              "are whole"), message
    assert_nothing_half_written(out)
    assert load_checkpoint(str(out / "last.pt"))["epoch"] == 1

    with pytest.raises(SystemExit) as error:
        run_cli(lambda: train.main(["--resume", str(out / "last.pt")]))
    assert "checked before training" in str(error.value.code)
    assert_nothing_half_written(out)
    os.remove(tmpfs / "ballast")
    train.main(["--resume", str(out / "last.pt")])
    assert load_checkpoint(str(out / "last.pt"))["epoch"] == 2


# -- a kill at any moment --------------------------------------------------------------------------

SAVE_FOREVER = """
import sys, torch
from mpafer.files import atomic_save
for i in range(10**6):
    atomic_save({"i": i, "x": torch.full((250_000,), float(i))}, sys.argv[1])
    print(i, flush=True)
"""


@pytest.mark.parametrize("delay", [0.0, 0.017, 0.043])
def test_a_file_written_atomically_always_loads_after_sigkill(tmp_path, delay):
    path = tmp_path / "last.pt"
    process = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(path)], cwd=REPO,
                               stdout=subprocess.PIPE, text=True)
    for _ in range(3):  # a few saves done: the next one is under way
        process.stdout.readline()
    time.sleep(delay)
    process.kill()
    process.wait(timeout=60)
    saved = torch.load(path, weights_only=True)  # whole: the last save that was renamed
    assert saved["i"] >= 2 and bool((saved["x"] == saved["i"]).all())
    remove_temporaries(str(tmp_path))  # what a run does when it opens its folder
    assert temporaries(tmp_path) == []


def test_the_folder_is_synced_after_the_rename(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write(str(tmp_path / "config.json"), lambda f: f.write(b"{}\n"))
    assert synced == [False, True]  # the file's data, then (after the rename) its folder


# -- a dataset that moved --------------------------------------------------------------------------

def rafdb_args(root, out, clip_file, *extra):
    return ["--dataset", "rafdb", "--data-root", str(root), "--out", str(out), "--clip", clip_file,
            "--cache-dir", str(out) + "-cache", "--epochs", "2", "--batch-size", "8",
            "--workers", "0", "--amp", "off", *extra]


def test_a_moved_dataset_resumes_from_its_new_root_and_another_is_refused(
        train, clip_file, tmp_path):
    root = write_synthetic_rafdb(tmp_path / "RAF-DB", 3, 2, image_size=32)
    out = tmp_path / "run"
    train.main(rafdb_args(root, out, clip_file, "--stop-after", "1"))
    moved = tmp_path / "elsewhere" / "RAF-DB"
    shutil.move(root, moved)

    # Another dataset at the new root: fewer images, or other labels. Refused, saying what
    # differs, before anything is written.
    fewer = write_synthetic_rafdb(tmp_path / "fewer", 2, 2, image_size=32)
    relabelled = tmp_path / "relabelled"
    shutil.copytree(moved, relabelled)
    labels = relabelled / "EmoLabel" / "list_patition_label.txt"
    lines = labels.read_text().splitlines()
    (first, a), (last, b) = lines[0].split(), lines[20].split()  # two classes swap one image
    lines[0], lines[20] = f"{first} {b}", f"{last} {a}"
    labels.write_text("\n".join(lines) + "\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    refusals = [(fewer, "train: 14 images (the run's: 21), [2, 2, 2, 2, 2, 2, 2] per class "
                        "(the run's: [3, 3, 3, 3, 3, 3, 3])"),
                (relabelled, "train: 2 of its 21 images are not the run's (another file, label "
                             "or crop): Image/aligned/train_00001_aligned.jpg, "
                             "Image/aligned/train_00021_aligned.jpg")]
    for other, expected in refusals:
        with pytest.raises(ValueError) as error:
            train.main(["--resume", str(out / "last.pt"), "--data-root", str(other)])
        message = str(error.value)
        assert message.startswith(f"--data-root {other}: the data there is not the data "
                                  f"{out / 'last.pt'} trained on: "), message
        assert expected in message and "\n" not in message, message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # The same data, moved: accepted, and recorded in the run's history.
    train.main(["--resume", str(out / "last.pt"), "--data-root", str(moved)])
    assert "holds the data this run trained on" in (out / "log.txt").read_text()
    config = json.load(open(out / "config.json"))
    assert config["resumed"][-1]["changed"] == {"data_root": [str(root), str(moved)]}
    last = load_checkpoint(str(out / "last.pt"))
    assert last["epoch"] == 2 and last["train_config"]["data_root"] == str(moved)

    # The same as a run that never moved.
    straight = tmp_path / "straight"
    train.main(rafdb_args(moved, straight, clip_file))
    expected = load_checkpoint(str(straight / "last.pt"))["state_dict"]
    for key, value in expected.items():
        torch.testing.assert_close(last["state_dict"][key], value, rtol=1e-6, atol=1e-7)


# -- a damaged checkpoint --------------------------------------------------------------------------

def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_a_truncated_last_pt_is_refused_in_one_line_naming_what_loads(
        train, evaluate, clip_file, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(demo_args(out, clip_file))
    corrupt = tmp_path / "corrupt.pt"  # the central directory of its zip archive overwritten
    data = bytearray((out / "last.pt").read_bytes())
    data[-300:-200] = bytes(100)
    corrupt.write_bytes(bytes(data))
    truncate(out / "last.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as error:
        train.main(["--resume", str(out / "last.pt")])
    message = capsys.readouterr().err.strip()
    assert error.value.code == 2 and "\n" not in message
    assert f"--resume: checkpoint {out / 'last.pt'} is damaged (truncated or corrupt)" in message
    assert (f"{out / 'best.pt'} loads (epoch 2; it holds no training state to resume from): "
            f"evaluate it with python eval.py --checkpoint {out / 'best.pt'}, or start a new "
            "run") in message

    truncate(out / "best.pt")
    with pytest.raises(SystemExit):
        train.main(["--resume", str(out / "last.pt")])
    assert f"no other checkpoint in {out} loads: start a new run" in capsys.readouterr().err

    for path in (out / "last.pt", corrupt):  # eval.py: the same, in one line
        with pytest.raises(SystemExit) as error:
            run_cli(lambda: evaluate.main(["--checkpoint", str(path)]))
        assert str(error.value.code).startswith(f"error: checkpoint {path} is damaged "
                                                "(truncated or corrupt): "), error.value.code


class SignalsItself(torch.utils.data.Dataset):
    """Each item sends SIGTERM to the process that loads it, as SLURM signals every process."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        os.kill(os.getpid(), signal.SIGTERM)
        return index


def test_dataloader_workers_leave_sigterm_to_the_main_process():
    loader = torch.utils.data.DataLoader(SignalsItself(), num_workers=1,
                                         worker_init_fn=ignore_interrupts)
    assert [int(batch) for batch in loader] == [0, 1, 2, 3]  # the worker lived on
