"""Small functions shared by the package and the scripts: atomic writes with the user's normal
permissions (a failed write is one clear `WriteError`), one-line errors for the scripts
(arguments and failures), Ctrl-C and SIGTERM as clean exits, DataLoader workers that leave both
signals to the main process, seeding."""
import argparse
import errno
import json
import os
import pickle
import random
import signal
import sys
import tempfile
import threading
import time
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm


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


# What a failed write tells the user, by errno; any other error is "cannot write".
WRITE_PROBLEMS = {errno.ENOSPC: "disk full", errno.EROFS: "read-only file system",
                  errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
if hasattr(errno, "EDQUOT"):  # not on Windows
    WRITE_PROBLEMS[errno.EDQUOT] = "disk quota exceeded"


class WriteError(OSError):
    """Writing (or removing) a file failed: disk full, quota, read-only file system, permission.
    Its message names the file and the error in one line, e.g. "disk full while writing
    runs/x/last.pt ([Errno 28] No space left on device)"; `run_cli` prints it as such."""

    def __init__(self, path: str, error: OSError, action: str = "write", note: str = ""):
        problem = WRITE_PROBLEMS.get(error.errno)
        reason = (f"[Errno {error.errno}] {error.strerror}" if error.errno is not None
                  else str(error))
        doing = {"write": "writing", "remove": "removing"}[action]
        what = f"{problem} while {doing} {path}" if problem else f"cannot {action} {path}"
        self.message = f"{what} ({reason})" + (f"; {note}" if note else "")
        super().__init__(error.errno, self.message)
        self.filename = path

    def __str__(self):
        return self.message


def write_failure(error: BaseException) -> Optional[OSError]:
    """The OSError behind a failed write, or None: `error` itself, or for torch.save (which turns
    a failed write into a RuntimeError) the OSError it was handling."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def fsync_folder(folder: str):
    """Make a rename in `folder` durable: without this, a power loss soon after `os.replace` can
    bring back the old file (or none). Windows cannot open folders (nor needs this), and some
    file systems do not sync folders (EINVAL): both are skipped."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a folder one may write but not read: nothing to sync it through
        return
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def remove_quietly(path: str):
    try:
        os.remove(path)
    except OSError:  # already gone, or the folder went read-only: nothing more to do
        pass


def atomic_write(path: str, write):
    """Write `path` through `write(binary file)` into a temporary file in the same folder, then
    rename it over `path` and sync the folder: readers never see a half-written file, and a crash
    or a kill leaves the old one. The file gets the user's normal permissions (mkstemp's
    temporary files are private, 0600). A failed write (disk full, quota, read-only, permission)
    raises `WriteError` naming `path`; the old file stays as it was and no temporary file is
    left."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".",
                                   suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, user_file_mode())
        os.replace(tmp, path)
        tmp = None
        fsync_folder(folder)
    except (OSError, RuntimeError) as error:
        failure = write_failure(error)
        if failure is None or isinstance(error, WriteError):
            raise
        raise WriteError(path, failure) from error
    finally:
        if tmp is not None:
            remove_quietly(tmp)


def probe_write(path: str, size: int, note: str = ""):
    """Check now that `path` could be written with `size` bytes: write a temporary file of that
    size beside it, sync it and remove it (`path` itself is not touched). Raises `WriteError`
    naming `path`, with `note` appended, when it could not."""
    chunk = os.urandom(min(max(size, 1), 1 << 20))  # random: compressing file systems count it
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                                   prefix=os.path.basename(path) + ".", suffix=".tmp")
        try:
            left = size
            while left > 0:
                left -= os.write(fd, chunk[:left])
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as error:
        raise WriteError(path, error, note=note) from error
    finally:
        if tmp is not None:
            remove_quietly(tmp)


def append_bytes(path: str, data: bytes, sync: bool = False):
    """Append `data` to `path` (created if missing). A failed write raises `WriteError` naming
    `path` and cuts the file back to what it held, so no half line is left behind; `sync`:
    also fsync it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as error:
        raise WriteError(path, error) from error
    size = os.fstat(fd).st_size
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    except OSError as error:
        try:
            os.ftruncate(fd, size)
        except OSError:
            pass
        raise WriteError(path, error) from error
    finally:
        os.close(fd)


def atomic_save(obj, path: str):
    """`torch.save` atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj, path: str, **json_options):
    """JSON (indented, UTF-8, ending with a newline) written atomically; `json_options` go to
    `json.dumps` (e.g. ensure_ascii=False)."""
    text = json.dumps(obj, **{"indent": 2, **json_options}) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


class PlainProgress:
    """What a progress bar says, as a plain line now and then (every `every` seconds, and none
    for a loop shorter than that): for logs and schedulers, where tqdm's carriage-return frames
    would pile up in the file. Takes tqdm's calls that the package uses."""

    def __init__(self, iterable=None, desc: str = "", total=None, initial: int = 0,
                 every: float = 30.0, **_):
        self.iterable, self.desc, self.n, self.every = iterable, desc, initial, every
        self.total = total if total is not None else (
            len(iterable) if hasattr(iterable, "__len__") else None)
        self.postfix, self.start = "", time.monotonic()
        self.last = self.start

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: int = 1):
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            of = f"/{self.total}" if self.total else ""
            print(f"  {self.desc}: {self.n}{of} ({now - self.start:.0f}s){self.postfix}",
                  flush=True)

    def set_postfix(self, **values):
        self.postfix = "  " + " ".join(f"{k}={v}" for k, v in values.items())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def close(self):
        pass


def progress_bar(iterable=None, desc: str = "", disable: bool = False, **options):
    """A tqdm progress bar on a terminal; elsewhere (stderr redirected to a file, CI, a
    scheduler's log) a `PlainProgress` line now and then; nothing when `disable`."""
    if disable:
        return PlainProgress(iterable, desc, every=float("inf"), **options)
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, **options)
    return PlainProgress(iterable, desc, **options)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `prog: error: message`, with a pointer to --help
    instead of the whole usage text, and which takes no abbreviated flags (a typo such as
    `--repeat` for `--repeats` is an error, not a guess)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# The stop signals a run handles, by the name its messages use, and the exit status of a
# program they ended (128 + the signal's number, as shells report it).
SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
EXIT_STATUS = {name: 128 + int(signum) for signum, name in SIGNAL_NAMES.items()}


class Interrupted(KeyboardInterrupt):
    """A stop signal that ends the program at once: Ctrl-C (exit status 130) or SIGTERM (143).
    A KeyboardInterrupt, so that everything that cleans up after Ctrl-C does so after SIGTERM."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(SIGNAL_NAMES[signum])
        self.name, self.status = SIGNAL_NAMES[signum], 128 + int(signum)


def interrupt_at_once(signum, frame):
    """A signal handler: SIGTERM (or Ctrl-C) ends the program now, as `Interrupted`."""
    raise Interrupted(signum)


def ignore_interrupts(worker_id: int = 0):
    """DataLoader `worker_init_fn`: Ctrl-C goes to the whole process group, and schedulers
    (SLURM) send SIGTERM to every process of a job; the workers ignore both, so the main process
    alone decides how to stop (train.py saves a resumable last.pt, then shuts them down)."""
    for signum in SIGNAL_NAMES:
        signal.signal(signum, signal.SIG_IGN)


def end_worker_processes(timeout: float = 5.0):
    """Kill this process's multiprocessing children (DataLoader workers) that still run. A run
    that fails with a loader alive would otherwise hang at exit: multiprocessing's exit handler
    sends its workers SIGTERM, which they ignore (`ignore_interrupts`), and waits for them."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout)


def run_cli(main):
    """Run a script's main(): expected failures (bad paths, arguments, files, a write that failed)
    print one clear line instead of a traceback; set MPAFER_TRACEBACK=1 to see the traceback.
    Ctrl-C and SIGTERM outside the places that handle them end the script quietly, with exit
    status 130 and 143 (128 + the signal, as shells expect). However main() fails, the worker
    processes it left are ended first (`end_worker_processes`), so the script never hangs."""
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # (signal handlers can only be set there)
        previous = signal.signal(signal.SIGTERM, interrupt_at_once)
    try:
        try:
            main()
        except BaseException:
            end_worker_processes()
            raise
    except KeyboardInterrupt as interrupt:
        if os.environ.get("MPAFER_TRACEBACK"):
            raise
        name = getattr(interrupt, "name", "Ctrl-C")
        print(f"interrupted ({name})", file=sys.stderr)
        sys.exit(EXIT_STATUS[name])
    except (FileNotFoundError, ValueError, RuntimeError, pickle.UnpicklingError,
            NotImplementedError, WriteError) as e:
        if os.environ.get("MPAFER_TRACEBACK"):
            raise
        sys.exit(f"error: {e}")
    finally:
        if main_thread:  # None: a handler set outside Python, which cannot be put back
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
