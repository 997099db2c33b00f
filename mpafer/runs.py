"""Runs are never lost: where a run writes, which flags a resume may change, Ctrl-C as a
request to stop and save, and the list of what a run left behind.

train.py uses these; they know nothing of models or data.
"""
import os
import signal
import threading
import time
from typing import Dict, Iterable, List, Optional

# What a run writes into its folder; the first three are the results a rerun must not lose.
CHECKPOINTS = ("last.pt", "best.pt", "expclip_head.pth")
RUN_FILES = (*CHECKPOINTS, "expclip_head.pth.json", "config.json", "log.txt", "metrics.jsonl")

# Flags a resumed run may change: they do not change what the run computes (or, --epochs,
# only extend it; --clip must still be the same file, which its SHA-256 checks). Any other
# flag that differs from the recorded run is refused.
HONOURED_ON_RESUME = ("resume", "epochs", "stop_after", "workers", "log_interval", "eval_every",
                      "device", "cache_dir", "clip", "grad_checkpointing", "compile")
# Fields renamed since older checkpoints were written: old name -> new name.
RENAMED_FIELDS = {"weights": "cache_dir"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def new_run_folder(base: str, name: str = "", root: str = "runs") -> str:
    """root/base/name, or root/base/<yyyymmdd-hhmmss> (with -2, -3, ... if that is taken)."""
    if name:
        return os.path.join(root, base, name)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = os.path.join(root, base, stamp), 2
    while os.path.exists(folder):
        folder, n = os.path.join(root, base, f"{stamp}-{n}"), n + 1
    return folder


def existing(folder: str, names: Iterable[str]) -> List[str]:
    """The paths of those `names` that exist in `folder`."""
    return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]


def folder_conflict(folder: str) -> Optional[str]:
    """Why a new run may not use `folder` (it holds another run's checkpoints), or None."""
    found = existing(folder, CHECKPOINTS)
    if not found:
        return None
    names = ", ".join(os.path.basename(p) for p in found)
    last = os.path.join(folder, "last.pt")
    resume = f"continue it with --resume {last}, " if os.path.isfile(last) else ""
    return (f"{folder} already holds a run ({names}): {resume}replace it with --overwrite, or "
            "start a new one elsewhere with --name NAME or --out DIR")


def clear_run_files(folder: str):
    """Remove what an earlier run wrote into `folder` (only its own files), so that a new run
    there never reports a file it did not write."""
    for path in existing(folder, RUN_FILES):
        os.remove(path)


def recorded_settings(train_config: Dict) -> Dict:
    """A checkpoint's `train_config` under today's field names."""
    return {RENAMED_FIELDS.get(k, k): v for k, v in train_config.items()}


def resume_refusals(given: Dict, recorded: Dict, honoured: Iterable[str] = ()) -> List[str]:
    """The flags in `given` that would change the recorded run: not honoured on resume, and
    different from the value `recorded` (a field missing there counts as differing)."""
    return [f"{flag(k)} {v!r} (the run has {recorded[k]!r})" if k in recorded
            else f"{flag(k)} {v!r}" for k, v in given.items()
            if k not in honoured and (k not in recorded or recorded[k] != v)]


def resume_changes(recorded: Dict, current: Dict) -> Dict[str, list]:
    """{field: [recorded value, value now]} of the honoured fields a resume changed."""
    recorded = recorded_settings(recorded)
    return {k: [recorded.get(k), current[k]] for k in HONOURED_ON_RESUME
            if k in current and recorded.get(k) != current[k] and k != "resume"}


class StopRequest:
    """Ctrl-C (SIGINT) as a request to stop: while active (`with StopRequest() as stop:`),
    the first one only sets `requested`, and the training loop stops at the end of its step
    and saves; another one a second or more later interrupts at once (KeyboardInterrupt).
    (torchrun passes the terminal's Ctrl-C on to its workers, which then see it twice at
    once: that is still one request.) Nothing is printed from the handler, which may interrupt
    a print; the loop says what it does."""

    def __init__(self):
        self.requested = False
        self._first = 0.0
        self._previous = None

    def _handle(self, signum, frame):
        if not self.requested:
            self.requested, self._first = True, time.monotonic()
        elif time.monotonic() - self._first >= 1.0:
            raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False
