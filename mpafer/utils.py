"""Small functions shared by the package and the scripts: atomic writes with the user's normal
permissions, one-line errors for the scripts (arguments and failures), DataLoader workers that
leave Ctrl-C to the main process, seeding."""
import argparse
import json
import os
import pickle
import random
import signal
import sys
import tempfile

import numpy as np
import torch


def seed_everything(seed: int):
    """Seed Python's, NumPy's and torch's global random number generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def user_file_mode() -> int:
    """The mode a new file gets from open(): 0o666 less the process's umask (e.g. 0o644)."""
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str, write):
    """Write `path` through `write(binary file)` into a temporary file in the same folder, then
    rename it over `path`: readers never see a half-written file, and a crash leaves the old one.
    The file gets the user's normal permissions (mkstemp's temporary files are private, 0600)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, user_file_mode())
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


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `prog: error: message`, with a pointer to --help
    instead of the whole usage text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def ignore_interrupts(worker_id: int = 0):
    """DataLoader `worker_init_fn`: Ctrl-C goes to the whole process group; the workers ignore
    it, so the main process alone decides how to stop (train.py saves a resumable last.pt)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_cli(main):
    """Run a script's main(): expected failures (bad paths, arguments, files) print one clear
    line instead of a traceback; set MPAFER_TRACEBACK=1 to see the traceback. Ctrl-C outside
    the places that handle it ends the script quietly (exit status 130, as shells expect)."""
    try:
        main()
    except KeyboardInterrupt:
        if os.environ.get("MPAFER_TRACEBACK"):
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (FileNotFoundError, ValueError, RuntimeError, pickle.UnpicklingError,
            NotImplementedError) as e:
        if os.environ.get("MPAFER_TRACEBACK"):
            raise
        sys.exit(f"error: {e}")
