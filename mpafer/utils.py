"""Small helpers shared by the package and the scripts."""
import json
import os
import tempfile

import torch


def _atomic(path: str, write):
    """Write via a temporary file in the same folder, then rename: never a half-written file."""
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
    _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj, path: str):
    _atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode("utf-8")))


def run_cli(main):
    """Run a script's main(): expected failures (bad paths, arguments, files) print one clear
    line instead of a traceback; set MPAFER_TRACEBACK=1 to see the traceback."""
    import pickle
    import sys
    try:
        main()
    except (FileNotFoundError, ValueError, RuntimeError, pickle.UnpicklingError, NotImplementedError) as e:
        if os.environ.get("MPAFER_TRACEBACK"):
            raise
        sys.exit(f"error: {e}")
