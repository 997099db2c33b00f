"""Runs are never lost: every run has a folder of its own that nothing overwrites, a resume
continues the recorded run (or refuses), values and data are checked before anything is loaded
or written, errors are one line, caches are found by later processes, files get the user's
normal permissions. (Ctrl-C and an exact resume from the middle of an epoch: test_scripts.py.)"""
import hashlib
import json
import os
import shutil
import signal
import stat

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler

from mpafer.app.cli import run_cli
from mpafer.app.engine import build_mpafer
from mpafer.app.faults import StopRequest
from mpafer.app.protocol import read_splits
from mpafer.checkpoint import load_checkpoint
from mpafer.clip.loading import download
from mpafer.data import ResumableSampler, SeededAugmentation
from mpafer.files import atomic_write_json
from mpafer.labels import BASIC_CLASSES
from mpafer.prompts import load_descriptions
from tests.helpers import quick_demo, read_jsonl, run, tiny_clip, tiny_state_dict


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One quick demo run of 2 epochs; tests copy its folder before changing anything in it."""
    root = tmp_path_factory.mktemp("runs")
    clip_file = str(root / "tiny-clip.pt")
    torch.save(tiny_state_dict(seed=0), clip_file)
    result = run(*quick_demo(root / "run", clip_file, "--epochs", "2"))
    return {"clip": clip_file, "out": root / "run", "cache": str(root / "run") + "-cache",
            "best": str(root / "run" / "best.pt"), "last": str(root / "run" / "last.pt"),
            "stdout": result.stdout}


def user_mode():
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# -- run folders -------------------------------------------------------------------------------

def test_a_rerun_is_refused_and_overwrite_starts_afresh_with_the_cached_prototypes(
        train, first_run, tmp_path, capsys):
    out = first_run["out"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"best.pt", "last.pt", "config.json", "log.txt", "metrics.jsonl",
                           "curves.png", "baseline.json"}
    assert all(stat.S_IMODE(p.stat().st_mode) == user_mode() for p in out.iterdir())  # not 0600

    with pytest.raises(SystemExit) as error:
        train.main(list(quick_demo(out, first_run["clip"], "--epochs", "1")[1:]))
    message = capsys.readouterr().err
    assert error.value.code == 2 and len(message.strip().splitlines()) == 1
    assert f"{out} already holds a run (last.pt, best.pt)" in message
    assert all(f in message for f in ("--resume", "--overwrite", "--name"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched

    # --overwrite, in a copy, in another process: the first run's prototype cache is found.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    result = run(*quick_demo(copy, first_run["clip"], "--epochs", "1", "--overwrite",
                             "--cache-dir", first_run["cache"]))
    assert "prototypes: computed and cached" in first_run["stdout"]
    assert f"prototypes: loaded from {first_run['cache']}" in result.stdout
    assert [r["epoch"] for r in read_jsonl(copy / "metrics.jsonl")] == [1]
    assert json.load(open(copy / "config.json"))["train"]["epochs"] == 1
    assert load_checkpoint(str(copy / "last.pt"))["epoch"] == 1
    assert "epoch   2/2" not in (copy / "log.txt").read_text()  # the old run's log is gone


# -- resume ------------------------------------------------------------------------------------

def test_last_pt_holds_what_resume_reads_and_nothing_else(first_run):
    """last.pt's resume record is exactly what a resume needs: optimiser, schedule and scaler
    states, the best evaluation, where the run stands, the resumes so far, the data it trained
    on (None for the demo, which reads none). No RNG states: every epoch re-seeds from (seed,
    epoch)."""
    state = load_checkpoint(first_run["last"])["resume"]
    assert set(state) == {"optimizer", "scheduler", "scaler", "best", "step", "sums",
                          "processes", "history", "data"}
    assert state["data"] is None
    assert state["step"] == 0 and state["sums"] is None and state["best"]["epoch"] >= 1


def test_resume_honours_some_flags_and_refuses_the_rest(train, first_run, capsys):
    last = first_run["last"]
    cfg, model_cfg, _ = train.run_config([
        "--resume", last, "--epochs", "4", "--workers", "0", "--log-interval", "3",
        "--stop-after", "3", "--eval-every", "2", "--device", "cpu", "--batch-size", "16"])
    assert (cfg.epochs, cfg.workers, cfg.log_interval, cfg.stop_after, cfg.eval_every,
            cfg.device) == (4, 0, 3, 3, 2, "cpu")
    assert cfg.out == str(first_run["out"])  # the run's own folder
    assert (cfg.lr, cfg.batch_size, cfg.demo, model_cfg.top_k) == (0.032, 16, True, 8)  # recorded

    for extra in (["--lr", "0.1"], ["--dataset", "rafdb"], ["--data-root", "elsewhere"],
                  ["--batch-size", "8"], ["--seed", "2"], ["--amp", "bf16"], ["--top-k", "4"]):
        with pytest.raises(SystemExit) as error:
            train.run_config(["--resume", last, *extra])
        message = capsys.readouterr().err
        assert error.value.code == 2 and "would change it" in message, extra
        assert f"{extra[0]} " in message and "Start a new run" in message, extra
    refusals = [(["--epochs", "1"], "already trained 2 epoch(s); --epochs can only extend it"),
                (["--overwrite"], "give one of them"),
                (["--out", "elsewhere"], "a resumed run stays in its folder"),
                (["--resume", first_run["best"]], "has no training state")]
    for extra, expected in refusals:
        with pytest.raises(SystemExit):
            train.run_config(["--resume", last, *extra])
        assert expected in capsys.readouterr().err, extra


def test_resume_extends_a_finished_run_and_records_the_change(train, first_run, tmp_path,
                                                              capsys):
    copy = tmp_path / "run"
    shutil.copytree(first_run["out"], copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    train.main(["--resume", str(copy / "last.pt")])  # finished: nothing to do, nothing written
    printed = capsys.readouterr().out
    assert "has finished its 2 epochs; nothing to do" in printed
    assert f"best checkpoint: {copy / 'best.pt'}" in printed
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before

    train.main(["--resume", str(copy / "last.pt"), "--epochs", "3"])
    records = read_jsonl(copy / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[:2] == read_jsonl(first_run["out"] / "metrics.jsonl")
    config = json.load(open(copy / "config.json"))
    assert config["train"]["epochs"] == 3 and config["train"]["out"] == str(copy)
    assert config["resumed"] == [{"from": str(copy / "last.pt"), "epoch": 2, "step": 0,
                                  "changed": {"epochs": [2, 3]}}]
    assert load_checkpoint(str(copy / "last.pt"))["epoch"] == 3


# -- checked before anything expensive -----------------------------------------------------------

@pytest.mark.parametrize("flags, named", [
    (["--epochs", "0"], "--epochs"), (["--batch-size", "0"], "--batch-size"),
    (["--lr", "nan"], "--lr"), (["--lr", "-1"], "--lr"), (["--workers", "-1"], "--workers"),
    (["--momentum", "1"], "--momentum"), (["--weight-decay", "-1e-4"], "--weight-decay"),
    (["--grad-clip", "-1"], "--grad-clip"), (["--eval-every", "0"], "--eval-every"),
    (["--log-interval", "0"], "--log-interval"), (["--top-k", "0"], "--top-k"),
    (["--tau", "0"], "--tau"), (["--amp", "fp8"], "--amp"), (["--epochs", "ten"], "--epochs"),
    (["--classnames", "a,b"], "--classnames"), (["--name", "a", "--out", "b"], "--name"),
    (["--clip-activation", "relu"], "--clip-activation"),
])
def test_bad_values_are_one_line_argument_errors(train, capsys, flags, named):
    with pytest.raises(SystemExit) as error:
        train.run_config(["--demo", *flags])
    message = capsys.readouterr().err.strip()
    assert error.value.code == 2 and len(message.splitlines()) == 1
    assert "error: " in message and named in message and "usage:" not in message


def test_unknown_dataset_is_one_line(train, capsys):
    with pytest.raises(SystemExit):
        train.run_config(["--dataset", "imagenet"])
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "--dataset must be one of" in message


@pytest.mark.parametrize("flags, named", [(["--batch-size", "0"], "--batch-size"),
                                          (["--workers", "-2"], "--workers"),
                                          (["--amp", "fp8"], "--amp"),
                                          (["--dataset", "imagenet"], "--dataset"),
                                          (["--clip-activation", "relu"], "--clip-activation")])
def test_eval_bad_values_are_one_line_argument_errors(evaluate, capsys, flags, named):
    with pytest.raises(SystemExit) as error:
        evaluate.main(["--checkpoint", "best.pt", *flags])
    message = capsys.readouterr().err.strip()
    assert error.value.code == 2 and len(message.splitlines()) == 1 and named in message


def write_faces(root, folders):
    for split in ("train", "test"):
        for i, folder in enumerate(folders):
            for j in range(2):
                path = root / split / folder / f"{j}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (40, 40), (40 * i, 100, 30 * j)).save(path)


def test_a_corrupt_test_image_is_reported_before_clip_is_loaded_or_a_file_written(
        train, evaluate, tmp_path):
    root = tmp_path / "faces"
    write_faces(root, ["happy", "Sad"])  # synonyms of happiness and sadness
    bad = root / "test" / "Sad" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    out, no_clip = tmp_path / "out", str(tmp_path / "no-such-clip.pt")
    args = ["--dataset", "folder", "--data-root", str(root), "--clip", no_clip, "--out", str(out),
            "--workers", "0"]
    with pytest.raises(ValueError, match=f"test split cannot be read, first: .*{bad}.*"
                                         "--skip-bad-images"):
        train.main(args)
    with pytest.raises(ValueError, match="--skip-bad-images"):
        evaluate.main(["--zero-shot", "--dataset", "folder", "--data-root", str(root), "--clip",
                       no_clip, "--workers", "0"])
    # With --skip-bad-images the data passes, and CLIP is next.
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        with pytest.raises(RuntimeError, match="no-such-clip.pt"):
            train.main([*args, "--skip-bad-images"])
    assert not out.exists()


def test_classnames_name_other_folders(train, tmp_path):
    root = tmp_path / "faces"
    write_faces(root, ["calm", "excited"])
    args = ["--dataset", "folder", "--data-root", str(root), "--clip", "none.pt", "--workers", "0"]
    with pytest.raises(ValueError, match="'calm' is not a class name.*--classnames a,b,c"):
        train.main(args)
    cfg, _, _ = train.run_config([*args, "--classnames", "excited, calm", "--name", "x"])
    splits = read_splits(cfg)
    assert splits.train.classnames == splits.selection.classnames == ("excited", "calm")


@pytest.mark.parametrize("content", [b"<!DOCTYPE html><html><body>404</body></html>",
                                     b"just some text\n", bytes(range(256)) * 4, b""])
def test_a_clip_file_that_is_not_a_checkpoint_is_one_line(train, tmp_path, content):
    fake = tmp_path / "ViT-B-16.pt"
    fake.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as error:
        run_cli(lambda: train.main(["--demo", "--clip", str(fake), "--out", str(out),
                                    "--cache-dir", str(tmp_path / "cache")]))
    message = str(error.value.code)
    assert message.startswith(f"error: {fake} is not a CLIP checkpoint")
    assert "\n" not in message and "weights_only" not in message
    assert not out.exists()


# -- eval.py ------------------------------------------------------------------------------------

def test_eval_defaults_to_the_data_the_checkpoint_was_trained_on(evaluate, first_run, tmp_path):
    report = tmp_path / "eval.json"
    evaluate.main(["--checkpoint", first_run["best"], "--json", str(report)])  # no --demo
    metrics = json.load(open(report))
    assert (metrics["dataset"], metrics["split"], metrics["num_samples"]) == (
        "synthetic-demo", "test", 7 * 4)
    assert metrics["war"] == pytest.approx(load_checkpoint(first_run["best"])["metrics"]["war"])


# -- what makes a resume exact and a demo reproducible ----------------------------------------

class Noisy(Dataset):
    """A stand-in for random augmentation: every item draws from torch's global RNG."""

    def __len__(self):
        return 12

    def __getitem__(self, index):
        return torch.rand(3) + index


def test_augmentation_depends_only_on_seed_epoch_and_index():
    data = SeededAugmentation(Noisy(), seed=5)
    data.set_epoch(3)

    def items(workers, order):
        loader = DataLoader(data, batch_size=4, sampler=order, num_workers=workers)
        return torch.cat(list(loader))

    forward = items(0, range(12))
    assert torch.equal(items(2, range(12)), forward)  # whichever worker loads an item
    assert torch.equal(items(0, range(11, -1, -1)), forward.flip(0))  # whatever came before
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    data[0]
    assert torch.equal(torch.rand(2), expected)  # the caller's RNG is left alone
    data.set_epoch(4)
    assert not torch.equal(items(0, range(12)), forward)  # another epoch, other draws


def test_resumable_sampler_skips_the_part_already_done():
    generator = torch.Generator()
    sampler = ResumableSampler(RandomSampler(range(10), generator=generator))
    generator.manual_seed(1)
    full = list(sampler)
    assert sorted(full) == list(range(10))
    sampler.skip = 4
    generator.manual_seed(1)
    assert list(sampler) == full[4:] and len(sampler) == 6


@pytest.mark.parametrize("signum, name, status", [(signal.SIGINT, "Ctrl-C", 130),
                                                   (signal.SIGTERM, "SIGTERM", 143)])
def test_ctrl_c_and_sigterm_are_a_request_to_stop_and_a_later_second_one_quits(signum, name,
                                                                               status):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signum)
        assert stop.requested  # no KeyboardInterrupt: the loop decides when to stop
        assert (stop.name, stop.status) == (name, status)
        os.kill(os.getpid(), signum)  # at once again (torchrun passing it on): the same
        os.kill(os.getpid(), signal.SIGINT if signum == signal.SIGTERM else signal.SIGTERM)
        assert (stop.name, stop.status) == (name, status)  # the first signal says how it ends
        stop._first -= 1.5  # as if the first came 1.5 s ago
        with pytest.raises(KeyboardInterrupt) as quit_now:
            os.kill(os.getpid(), signum)
        assert (quit_now.value.name, quit_now.value.status) == (name, status)
    assert {s: signal.getsignal(s) for s in before} == before


def test_sigterm_outside_the_epoch_loop_quits_at_once_with_143(capsys):
    before = signal.getsignal(signal.SIGTERM)

    def main():
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop main()")

    with pytest.raises(SystemExit) as error:
        run_cli(main)
    assert error.value.code == 143 and capsys.readouterr().err == "interrupted (SIGTERM)\n"
    assert signal.getsignal(signal.SIGTERM) is before


def test_prompt_initialisation_does_not_depend_on_what_ran_before(train):
    cfg, model_cfg, _ = train.run_config(["--demo", "--name", "x"])
    states = []
    for seed in (0, 123):
        torch.manual_seed(seed)  # e.g. the demo CLIP's first pre-training drew from it
        model = build_mpafer(tiny_clip(), list(BASIC_CLASSES), load_descriptions(list(BASIC_CLASSES)),
                             model_cfg, seed=cfg.seed)
        states.append(model.trainable_state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


# -- permissions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_users_normal_permissions(tmp_path, umask):
    source = tmp_path / "source.pt"
    source.write_bytes(b"pretend weights")
    previous = os.umask(umask)
    try:
        atomic_write_json({"war": 0.5}, str(tmp_path / "eval.json"))
        downloaded = download(source.as_uri(), str(tmp_path / "weights"),
                              hashlib.sha256(b"pretend weights").hexdigest())
    finally:
        os.umask(previous)
    for path in (tmp_path / "eval.json", downloaded):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask, path
