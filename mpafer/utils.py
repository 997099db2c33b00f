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
