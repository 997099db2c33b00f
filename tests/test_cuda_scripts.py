"""The CUDA tier, end to end: train.py and eval.py as a user runs them on the device. See
tests/cuda_checks.py for how they are selected (-m cuda), skipped without CUDA, and checked on a
CPU. Runs that do not depend on each other run at the same time (the tier has minutes).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from mpafer import clip
from mpafer.app.demo import demo_clip_path
from mpafer.checkpoint import load_checkpoint
from tests.cuda_checks import DEVICE, TIER, record_figure, relative_error
from tests.helpers import REPO, quick_demo, read_jsonl, run, tiny_state_dict

pytestmark = TIER
TORCHRUN = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
            "--nproc_per_node=1"]


def start(log, *args, threads: int = 1, launcher=(sys.executable,), env=None) -> subprocess.Popen:
    """Start `python *args` in the repository, its output going to the file `log` (a file, not
    a pipe: runs going on at once never wait for their output to be read); `env`: more
    environment variables."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads), **(env or {})}
    with open(log, "w") as out:
        process = subprocess.Popen([*launcher, *map(str, args)], cwd=REPO, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, text=True)
    process.log = log
    return process


def finish(*processes, timeout: float = 600) -> None:
    """Wait for every process; fail with the end of the output of any that failed."""
    for process in processes:
        process.wait(timeout=timeout)
    for process in processes:
        if process.returncode != 0:
            with open(process.log) as f:
                output = f.read()
            raise AssertionError(f"{process.args} exited {process.returncode}:\n"
                                 f"{output[-3000:]}")


def best_war(run_folder) -> float:
    return max(r["war"] for r in read_jsonl(run_folder / "metrics.jsonl") if r["war"] is not None)


# -- the demo: device bf16 against CPU fp32 ------------------------------------------------------

@pytest.fixture(scope="module")
def demo_weights() -> str:
    """The weights folder train.py --demo uses ($MPAFER_WEIGHTS, else the repository's
    weights/), with the pre-trained demo CLIP in it: pre-trained here with every core if it is
    not there yet (about half a minute), so that both demo runs find it."""
    folder = clip.default_weights_dir()
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        demo_clip_path(folder)
    finally:
        torch.set_num_threads(threads)
    return folder


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory, demo_weights):
    """`train.py --demo` with the same seed twice, at the same time: on the device in bf16 and
    on the CPU in fp32 -> (device run folder, CPU run folder)."""
    out = tmp_path_factory.mktemp("demo")
    common = ("train.py", "--demo", "--cache-dir", demo_weights, "--seed", "1")
    on_device = start(out / "device.log", *common, "--device", DEVICE, "--amp", "bf16",
                      "--out", out / "device")
    on_cpu = start(out / "cpu.log", *common, "--device", "cpu", "--amp", "off", "--out",
                   out / "cpu", threads=max(1, (os.cpu_count() or 2) // 2))
    finish(on_device, on_cpu)
    return out / "device", out / "cpu"


def test_demo_bf16_on_the_device_reaches_the_war_of_the_cpu_run(demo_runs):
    device_run, cpu_run = demo_runs
    config = json.load(open(device_run / "config.json"))
    assert config["precision"] == "bfloat16" and config["train"]["device"] == str(DEVICE)
    # Same seed, same faces; only the arithmetic differs (bf16 on the device, fp32 on the CPU).
    # The demo's test WAR moves by 2-3 points from one epoch to the next, so two correct runs
    # can differ by that much; a broken device path lands far off (chance is 14%).
    device_war, cpu_war = best_war(device_run), best_war(cpu_run)
    record_figure("demo_best_war_device_bf16", device_war)
    record_figure("demo_best_war_cpu_fp32", cpu_war)
    assert abs(device_war - cpu_war) <= 0.05, (device_war, cpu_war)
    zero_shot = json.load(open(device_run / "baseline.json"))["zero_shot_hard_prompts"]["war"]
    assert device_war >= zero_shot + 0.10, (device_war, zero_shot)  # the prompts learned


def test_eval_py_scores_the_device_checkpoint_as_training_did(demo_runs, demo_weights, tmp_path):
    device_run, _ = demo_runs
    checkpoint, report = device_run / "best.pt", tmp_path / "eval.json"
    run("eval.py", "--demo", "--checkpoint", str(checkpoint), "--cache-dir", demo_weights,
        "--device", str(DEVICE), "--amp", "bf16", "--json", str(report))
    metrics = json.load(open(report))
    assert metrics["num_samples"] == 7 * 60
    # The same model, faces and precision as the evaluation during training; another process
    # may autotune other cuDNN kernels, whose bf16 rounding can flip a near-tie: a few faces.
    trained = load_checkpoint(str(checkpoint))["metrics"]["war"]
    assert metrics["war"] == pytest.approx(trained, abs=4.5 / 420)


# -- resume -----------------------------------------------------------------------------------

# train.py turns TF32 on for fp32 products on CUDA (`engine.configure_cuda`); the fp32 pair
# runs without it (NVIDIA_TF32_OVERRIDE=0, honoured by cuBLAS and cuDNN), so that a kernel that
# another process autotunes differently cannot differ by TF32's 1e-3 but only by fp32 rounding.
PRECISION_ENV = {"off": {"NVIDIA_TF32_OVERRIDE": "0"}, "bf16": {}}


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    """Per precision (fp32 = --amp off, bf16), a 3-epoch run on the device straight through,
    and one stopped after epoch 1 then resumed -> the folder holding <amp>/straight, <amp>/split.
    """
    out = tmp_path_factory.mktemp("resume")
    clip_file = out / "tiny-clip.pt"
    torch.save(tiny_state_dict(seed=0), clip_file)
    settings = ("--epochs", "3", "--log-interval", "1", "--device", str(DEVICE))
    runs = []
    for amp in ("off", "bf16"):
        for name, extra in (("straight", ()), ("split", ("--stop-after", "1"))):
            args = quick_demo(out / amp / name, str(clip_file), *settings, "--amp", amp, *extra,
                              per_class=24)
            runs.append(start(out / f"{amp}-{name}.log", *args, env=PRECISION_ENV[amp]))
    finish(*runs)
    finish(*(start(out / f"{amp}-resume.log", "train.py", "--resume",
                   out / amp / "split" / "last.pt", env=PRECISION_ENV[amp])
             for amp in ("off", "bf16")))
    return out


# Tolerances: relative L2 error of each trained tensor after 3 epochs (30 steps). Both runs use
# the same kernels in the same order, but another process may autotune cuDNN's convolution
# differently and attention's backward may add in another order: fp32 repeats to rounding
# (1e-4 leaves room for 30 steps of it), while bf16 can turn a rounding difference into a step
# of one bf16 ulp (1/128 relative) that SGD carries on. A resume that restored the wrong state
# differs by the size of the updates themselves, about as large as the prompts (0.1 to 1).
@pytest.mark.parametrize("amp, tolerance", [("off", 1e-4), ("bf16", 2e-2)])
def test_resume_on_the_device_repeats_the_uninterrupted_run(resume_runs, amp, tolerance):
    straight = load_checkpoint(str(resume_runs / amp / "straight" / "last.pt"))
    resumed = load_checkpoint(str(resume_runs / amp / "split" / "last.pt"))
    assert resumed["epoch"] == straight["epoch"] == 3 and resumed["resume"]["step"] == 0
    errors = {key: relative_error(resumed["state_dict"][key], expected)
              for key, expected in straight["state_dict"].items()}
    record_figure(f"resume_relative_error_{'fp32' if amp == 'off' else amp}", max(errors.values()))
    assert max(errors.values()) <= tolerance, errors
    records = [read_jsonl(resume_runs / amp / name / "metrics.jsonl")
               for name in ("straight", "split")]
    assert [r["epoch"] for r in records[1]] == [1, 2, 3]
    for a, b in zip(*records):
        assert b["loss"] == pytest.approx(a["loss"], rel=tolerance)
        assert b["war"] == pytest.approx(a["war"], abs=1.5 / 28)  # one test face either way


# -- torchrun -----------------------------------------------------------------------------------

def test_torchrun_one_process_trains_a_one_epoch_demo(tmp_path):
    """torchrun with one process: on CUDA train.py joins an NCCL process group
    (`engine.setup_distributed`); on a CPU, gloo."""
    clip_file = tmp_path / "tiny-clip.pt"
    torch.save(tiny_state_dict(seed=0), clip_file)
    args = quick_demo(tmp_path / "ddp", str(clip_file), "--epochs", "1", "--device", str(DEVICE))
    finish(start(tmp_path / "torchrun.log", *args, launcher=TORCHRUN))
    assert [r["epoch"] for r in read_jsonl(tmp_path / "ddp" / "metrics.jsonl")] == [1]
    assert json.load(open(tmp_path / "ddp" / "config.json"))["processes"] == 1
    checkpoint = load_checkpoint(str(tmp_path / "ddp" / "last.pt"))
    assert checkpoint["epoch"] == 1 and sum(map(sum, checkpoint["metrics"]["confusion"])) == 7 * 4
