"""What may stop a run, and how it goes on from there: Ctrl-C and SIGTERM in the middle of an
epoch (`StopRequest`, `interrupted`), a run folder without room (`check_room`) or a write that
fails (`write_failed`), data that moved or changed since the run began (`check_data`), a
checkpoint that does not load (`other_checkpoints`). Each ends in one line that says what is
kept and how to continue; nothing saved before is lost (every write is atomic, see
`mpafer.utils.atomic_write`).
"""
import dataclasses
import io
import os
import signal
import threading
import time
from typing import Any, Dict

import torch

from .checkpoint import load_checkpoint, make_checkpoint
from .data.fingerprint import data_differences, data_record
from .runs import Run, existing, recorded_settings, resume_command
from .utils import SIGNAL_NAMES, Interrupted, WriteError, probe_write

# -- Ctrl-C and SIGTERM ---------------------------------------------------------------------------

class StopRequest:
    """Ctrl-C (SIGINT) and SIGTERM (what schedulers send before a kill) as a request to stop:
    while active (`with StopRequest() as stop:`), the first one only sets `requested` (and
    `name`, "Ctrl-C" or "SIGTERM", and `status`, the exit status: 130 or 143), and the training
    loop stops at the end of its step and saves. Another one (either signal) a second or more
    later quits at once (`utils.Interrupted`, a KeyboardInterrupt); what is being written then
    stays whole, as every write is atomic. torchrun passes Ctrl-C and SIGTERM on to its workers,
    which may then see the same signal twice at once: that is still one request. Nothing is
    printed from the handler, which may interrupt a print; the loop says what it does."""

    def __init__(self):
        self.requested, self.name, self.status = False, "", 0
        self._first = 0.0
        self._previous = {}

    def agree(self, run) -> bool:
        """Whether any process of `run` was asked to stop (one all-reduce: call it on every
        process); if one was, every process takes its signal (SIGTERM over Ctrl-C), so that all
        say the same and exit with the same status."""
        signum = run.max_over_ranks(self.status - 128 if self.requested else 0)
        if signum:
            self.requested, self.name, self.status = True, SIGNAL_NAMES[signum], 128 + signum
        return bool(signum)

    def _handle(self, signum, frame):
        if not self.requested:
            self.requested, self._first = True, time.monotonic()
            self.name, self.status = SIGNAL_NAMES[signum], 128 + int(signum)
        elif time.monotonic() - self._first >= 1.0:
            raise Interrupted(signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNAL_NAMES}
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        return False


def interrupted(run: Run, stop: StopRequest) -> str:
    """Say how to continue a run that `stop` ended -> the signal's name ("Ctrl-C", "SIGTERM")."""
    run.log(f"interrupted ({stop.name}); continue exactly where it stopped with: "
            f"{resume_command(run)}")
    return stop.name


# -- room to write, and writes that fail -----------------------------------------------------------

def check_room(run: Run, model, descriptions):
    """Before the long part of a run (prototypes, the first epoch): check that the run folder
    takes a file as large as last.pt will be (the trainable tensors, their momentum, the
    records), so a full disk or quota fails now, in one line, not after an epoch."""
    if not run.master:
        return
    buffer = io.BytesIO()
    torch.save(make_checkpoint(model, descriptions, 0, {}, dataclasses.asdict(run.cfg),
                               {"data": run.data, "history": run.history}), buffer)
    momentum = sum(t.numel() * t.element_size() for t in model.trainable_state_dict().values())
    probe_write(run.path("last.pt"), buffer.tell() + momentum,
                note="checked before training, nothing was lost: make room and run it again")


def write_failed(run: Run, error: WriteError) -> WriteError:
    """A write of the run failed (disk full, ...): the error, saying what is kept and how to go
    on. Printed, not logged: log.txt may be the file that cannot be written."""
    last = run.path("last.pt")
    error.message += (f"; the files saved before are whole: make room, then continue with: "
                      f"{resume_command(run)}" if os.path.isfile(last)
                      else "; nothing was saved yet: make room and start the run again")
    return error


# -- the data, and the checkpoints, a run goes on from ---------------------------------------------

def check_data(run: Run, dataset: str, splits: Dict[str, Any]):
    """Record the data the run trains on (`run.data`, kept in last.pt), and for a resumed run
    check that it is the data the run started with: the same files (relative to the data root),
    labels, crops and classes. So a dataset that moved resumes from its new root
    (--data-root NEW), and one that changed is refused in one line that says what differs.
    `splits`: the sets as read ({} for the demo, which reads nothing)."""
    run.data = data_record(dataset, splits) if splits else None
    if run.resume is None or run.data is None:
        return
    cfg = run.cfg
    recorded = run.resume["resume"].get("data")
    before = recorded_settings(run.resume["train_config"]).get("data_root")
    moved = os.path.abspath(before or "") != os.path.abspath(cfg.data_root)
    if recorded is None:  # written before runs recorded their data: only the old root is known
        if moved:
            raise ValueError(
                f"--data-root {cfg.data_root}: {cfg.resume} does not record the data it trained "
                "on (an older checkpoint), so the data there cannot be checked against it; "
                f"resume without --data-root (from {before}) once, or start a new run")
        return
    differences = data_differences(recorded, run.data, splits)
    if differences:
        where = (f"--data-root {cfg.data_root}: the data there" if moved
                 else f"the data at {cfg.data_root}")
        raise ValueError(f"{where} is not the data {cfg.resume} trained on: "
                         f"{'; '.join(differences)}. Resume with the run's data, or start a new "
                         "run")
    if moved:
        run.log(f"data: {cfg.data_root} holds the data this run trained on (the same files and "
                f"labels as at {before}); the run continues from there")


def other_checkpoints(path: str) -> str:
    """For a checkpoint that does not load: which other checkpoint of its folder does, and what
    to do with it (a sentence to append to the error)."""
    folder = os.path.dirname(path) or "."
    for other in existing(folder, ("last.pt", "best.pt")):
        if os.path.abspath(other) == os.path.abspath(path):
            continue
        try:
            checkpoint = load_checkpoint(other)
        except (ValueError, RuntimeError, OSError):
            continue
        if "resume" in checkpoint:
            return f"; {other} loads (epoch {checkpoint['epoch']}): resume from it"
        return (f"; {other} loads (epoch {checkpoint['epoch']}; it holds no training state to "
                f"resume from): evaluate it with python eval.py --checkpoint {other}, or start "
                "a new run")
    return f"; no other checkpoint in {folder} loads: start a new run"
