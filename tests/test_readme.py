"""The README cannot rot: every shell command in its code blocks is checked, and the Python of
"Use as a library" runs on a tiny CLIP.

- The demo commands run for real, shortened (one epoch, a few faces, one seed, a tiny random
  CLIP instead of the pre-trained demo CLIP).
- eval.py commands on a checkpoint, and `python -m mpafer.report`, run for real on a run trained
  here on a fixture RAF-DB.
- Every other train.py / eval.py / `python -m` command parses its flags with the script's own
  parser (every flag exists, every value validates), and a train.py command reads its data, with
  the README's dataset paths swapped for fixture datasets in the official layouts.
- Installing (pip) and this very test command (pytest) are the only commands not checked.
"""
import os
import re
import shlex

import pytest
import torch

from mpafer.app import bench, expclip_command, interpret, predict, report
from mpafer.app.bench import faces as faces_bench
from mpafer.app.bench import gpu
from mpafer.app.protocol import read_splits
from tests.dataset_writers import (
    write_affectnet_csv,
    write_ferplus_csvs,
    write_synthetic_rafdb,
)
from tests.helpers import REPO, load_script, tiny_state_dict

README = os.path.join(REPO, "README.md")
CANONICAL = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt"]
SHORT_DEMO = ["--epochs", "1", "--demo-train-per-class", "6", "--demo-test-per-class", "2",
              "--batch-size", "14"]


def code_blocks(text: str, language: str):
    """The contents of the README's ```language blocks, with the heading each stands under."""
    blocks, heading = [], ""
    for part in re.split(r"(^```[a-z]*\n.*?^```$)", text, flags=re.S | re.M):
        if part.startswith("```"):
            if part.startswith(f"```{language}\n"):
                blocks.append((heading, part[len(language) + 4:-3]))
        else:
            headings = re.findall(r"^#+ (.+)$", part, flags=re.M)
            heading = headings[-1] if headings else heading
    return blocks


def shell_commands(text: str):
    """Every command of the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for _, block in code_blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append(argv)
    return commands


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """Fixture datasets in the official layouts, a tiny CLIP, and a run trained on them."""
    root = tmp_path_factory.mktemp("readme")
    clip_file = str(root / "tiny-clip.pt")
    torch.save(tiny_state_dict(seed=0), clip_file)
    rafdb = write_synthetic_rafdb(root / "RAF-DB", 3, 2)
    ferplus = root / "FERPlus"
    ferplus.mkdir()
    write_ferplus_csvs(str(ferplus), [
        (usage, f"fer{i:07d}.png", [10 if j == c else 0 for j in range(10)])
        for i, (usage, c) in enumerate((u, c) for u in ("Training", "PublicTest", "PrivateTest")
                                       for c in range(8) for _ in range(2))])
    affectnet = root / "AffectNet"
    affectnet.mkdir()
    for csv_name in ("training.csv", "validation.csv"):
        write_affectnet_csv(str(affectnet), csv_name, [
            (f"{code}/{csv_name[0]}{k}.jpg", (30, 20, 50, 50), code, (20 * code, 90, 40 + k))
            for code in range(8) for k in range(2)])
    run = root / "rafdb-run"
    load_script("train").main(["--dataset", "rafdb", "--data-root", rafdb, "--clip", clip_file,
                               "--epochs", "1", "--batch-size", "7", "--workers", "0",
                               "--top-k", "4", "--out", str(run), "--cache-dir",
                               str(root / "cache")])
    return {"root": root, "clip": clip_file, "data/RAF-DB": rafdb, "data/FERPlus": str(ferplus),
            "data/AffectNet": str(affectnet), "run": str(run),
            "face": os.path.join(rafdb, "Image", "aligned", "test_00001_aligned.jpg")}


def swapped(argv, fixtures):
    """The README's paths replaced by the fixtures'."""
    out = []
    for arg in argv:
        for placeholder in ("data/RAF-DB", "data/FERPlus", "data/AffectNet"):
            arg = arg.replace(placeholder, fixtures[placeholder])
        arg = re.sub(r"runs/rafdb/(<run>|\*)", fixtures["run"], arg)
        out.append(fixtures["face"] if arg == "face.jpg" else arg)
    return out


def check(argv, fixtures, tmp_path) -> str:
    """Check one README command (see the module doc) -> how it was checked. A command that
    does not work raises (SystemExit for a flag its parser refuses, or the script's error)."""
    if argv[0] == "torchrun":  # the script and its flags are those of `python train.py`
        argv = ["python", *argv[argv.index("train.py"):]]
    if argv[:3] in (["python", "-m", "pip"], ["python", "-m", "pytest"]):
        return "not checked: installing, or this test command"
    args = swapped(argv[2:], fixtures)
    if argv[:2] == ["python", "train.py"]:
        train = load_script("train")
        if "--demo" in args:
            extra = ["--seeds", "1"] if "--ablation" in args else []
            out = tmp_path / f"demo-{len(os.listdir(tmp_path))}"  # a run folder of its own
            train.main([*args, *SHORT_DEMO, *extra, "--clip", fixtures["clip"], "--top-k", "4",
                        "--out", str(out), "--cache-dir", str(fixtures["root"] / "cache")])
            return "ran (shortened demo)"
        cfg, _, _ = train.run_config(args)
        if not cfg.resume:
            read_splits(cfg)  # the data flags against the fixture dataset
        return "parsed, data read"
    if argv[:2] == ["python", "eval.py"]:
        evaluate = load_script("eval")
        parsed = evaluate.parse_eval_flags(args)
        if parsed.checkpoint and not parsed.zero_shot and parsed.method == "mpafer":
            evaluate.main([*args, "--workers", "0"])
            return "ran"
        return "parsed"
    module = argv[2] if argv[1] == "-m" else None
    if module == "mpafer.report":
        report.main(args[1:])
        return "ran"
    if module == "mpafer.bench":
        if args[1:2] == ["faces"]:
            faces_bench.parse_args(args[2:])
        else:
            (gpu.parse_args(args[2:]) if args[1:2] == ["gpu"] else bench.parse_args(args[1:]))
        return "parsed"
    if module == "mpafer.predict":
        predict.parse_args(args[1:])
        return "parsed"
    if module == "mpafer.expclip":
        expclip_command.parse_args(args[1:])
        return "parsed"
    if module == "mpafer.interpret":
        interpret.main([*args[1:], "--cache-dir", str(fixtures["root"] / "cache")])
        return "ran"
    raise AssertionError(f"the README shows a command this test does not know: {shlex.join(argv)}")


def test_every_readme_command_works(fixtures, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outputs such as rafdb.json land here, not in the repository
    commands = shell_commands(open(README, encoding="utf-8").read())
    assert ["python", "train.py", "--demo"] in commands and ["python", "-m", "pytest", "-q"] in commands
    checked = {}
    for argv in commands:
        try:
            checked[shlex.join(argv)] = check(argv, fixtures, tmp_path)
        except SystemExit as error:
            raise AssertionError(f"README command {shlex.join(argv)!r} exited with "
                                 f"{error.code}") from None
    assert sum(how.startswith("ran") for how in checked.values()) >= 8, checked
    assert sum(how == "parsed, data read" for how in checked.values()) >= 4, checked


@pytest.mark.parametrize("broken", [
    "python train.py --dataset rafdb --data-root data/RAF-DB --epohcs 3",
    "python train.py --dataset rafdb --data-root data/RAF-DB --base-classes neutral,joy",
    "python eval.py --checkpoint runs/rafdb/<run>/best.pt --class-set partial",
    "python -m mpafer.bench --repeat 3",
    "python -m mpafer.report runs/rafdb/* --csv out.csv",
    "python -m mpafer.reports runs/rafdb/*",
])
def test_the_check_fails_on_a_broken_command(broken, fixtures, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((SystemExit, AssertionError, ValueError)):
        check(shlex.split(broken), fixtures, tmp_path)


def test_the_library_snippets_run_on_a_tiny_clip(fixtures, monkeypatch, capsys):
    monkeypatch.setenv("MPAFER_WEIGHTS", str(fixtures["root"] / "cache"))
    snippets = [code for heading, code in code_blocks(open(README, encoding="utf-8").read(),
                                                      "python")
                if heading == "Use as a library"]
    assert len(snippets) == 2
    for code in snippets:
        code = code.replace('"ViT-B/16"', repr(fixtures["clip"]))
        code = code.replace('"data/RAF-DB"', repr(fixtures["data/RAF-DB"]))
        namespace = {}
        exec(compile(code, "README.md", "exec"), namespace)
    model = None
    for code in snippets[:1]:  # what the first snippet promises
        namespace = {}
        exec(compile(code.replace('"ViT-B/16"', repr(fixtures["clip"])).replace(
            '"data/RAF-DB"', repr(fixtures["data/RAF-DB"])), "README.md", "exec"), namespace)
        model, parts = namespace["model"], namespace["parts"]
    assert set(parts) == {"cls", "ta", "pa", "v"}
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.clip.parameters())
