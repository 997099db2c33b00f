"""Files written so that nothing is lost: a temporary file in the same folder, renamed, the
folder synced; a failed write is one `WriteError` and leaves the old file whole."""
import contextlib
import errno
import json
import os
import tempfile
from typing import Optional

import torch

# What a failed write tells the user, by errno; any other error is "cannot write".
WRITE_PROBLEMS = {errno.ENOSPC: "disk full", errno.EROFS: "read-only file system",
                  errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
if hasattr(errno, "EDQUOT"):  # not on Windows
    WRITE_PROBLEMS[errno.EDQUOT] = "disk quota exceeded"


class WriteError(OSError):
    """Writing (or removing) a file failed; the message names the file and the error in one
    line, e.g. "disk full while writing runs/x/last.pt ([Errno 28] No space left on device)"."""

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
    """Make a rename in `folder` durable (else a power loss can bring back the old file); skipped
    on Windows and on file systems that do not sync folders."""
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


def atomic_write(path: str, write):
    """Write `path` atomically through `write(binary file)` (see the module docstring)."""
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
        umask = os.umask(0)  # reading the umask means setting it; put it straight back
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # what open() gives; mkstemp's files are private (0600)
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
            with contextlib.suppress(OSError):  # already gone, or the folder went read-only
                os.remove(tmp)


def probe_write(path: str, size: int, note: str = ""):
    """`WriteError` (with `note`) now if `path` could not be written with `size` bytes."""
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
            with contextlib.suppress(OSError):
                os.remove(tmp)


def append_bytes(path: str, data: bytes, sync: bool = False):
    """Append `data` to `path`; a failed write raises `WriteError` and leaves no half line."""
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
    """JSON (indented, UTF-8, ending with a newline) written atomically."""
    text = json.dumps(obj, **{"indent": 2, **json_options}) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
