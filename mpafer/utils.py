"""Small functions shared by the package and the scripts: atomic writes, the same-CLIP check,
one-line errors for the scripts."""
import json
import os
import pickle
import sys
import tempfile

import torch


def atomic_write(path: str, write):
    """Write `path` through `write(binary file)` into a temporary file in the same folder, then
    rename it over `path`: readers never see a half-written file, and a crash leaves the old one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path: str):
    """`torch.save` atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj, path: str, **json_options):
    """JSON (indented, UTF-8, ending with a newline) written atomically; `json_options` go to
    `json.dumps` (e.g. ensure_ascii=False)."""
    text = json.dumps(obj, **{"indent": 2, **json_options}) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def check_same_clip(trained: dict, clip_model, source: str, hint: str):
    """A clear error when `clip_model` is not the CLIP that `source` was trained on.

    trained: `{"name": ..., "sha256": ...}` as recorded at training time. CLIPs are compared by
    the SHA-256 of their checkpoint file (`clip_model.checkpoint_sha256`, set by `clip.load`);
    nothing is checked when either side has none (a CLIP built in memory, a released head
    without metadata). `hint` ends the message: how to load the right CLIP or force another.
    """
    trained_sha = trained.get("sha256")
    given_sha = getattr(clip_model, "checkpoint_sha256", None)
    if trained_sha and given_sha and trained_sha != given_sha:
        given_name = getattr(clip_model, "checkpoint_name", None) or "?"
        raise ValueError(f"{source} was trained on CLIP {trained.get('name')} (SHA-256 "
                         f"{trained_sha[:12]}...), but the loaded CLIP {given_name} has SHA-256 "
                         f"{given_sha[:12]}...; {hint}")


def run_cli(main):
    """Run a script's main(): expected failures (bad paths, arguments, files) print one clear
    line instead of a traceback; set MPAFER_TRACEBACK=1 to see the traceback."""
    try:
        main()
    except (FileNotFoundError, ValueError, RuntimeError, pickle.UnpicklingError,
            NotImplementedError) as e:
        if os.environ.get("MPAFER_TRACEBACK"):
            raise
        sys.exit(f"error: {e}")
