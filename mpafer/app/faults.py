"""Every stop of a run, and how it goes on from there: Ctrl-C and SIGTERM (`StopRequest`,
`interrupted`, `Interrupted` for a stop at once, `ignore_interrupts` for DataLoader workers), a
loss that became NaN or inf (`NonFiniteLoss`, `stop_on_non_finite`), a run folder without room
(`check_room`) or a write that fails (`write_failed`), data that moved or changed since the run
began (`check_data`), a checkpoint that does not load (`other_checkpoints`). Each ends in one
line that says what is kept and how to continue; nothing saved before is lost (every write is
atomic, see `mpafer.files.atomic_write`).
"""
import dataclasses
import io
import os
import signal
import sys
import threading
import time
from typing import Any, Dict

import torch
import torch.distributed as dist

from ..checkpoint import load_checkpoint, make_checkpoint
from ..files import WriteError, probe_write
from .fingerprint import data_differences, data_record

# -- Ctrl-C and SIGTERM ---------------------------------------------------------------------------

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



class StopRequest:
    """Ctrl-C (SIGINT) and SIGTERM (what schedulers send before a kill) as a request to stop:
    while active (`with StopRequest() as stop:`), the first one only sets `requested` (and
    `name`, "Ctrl-C" or "SIGTERM", and `status`, the exit status: 130 or 143), and the training
    loop stops at the end of its step and saves. Another one (either signal) a second or more
    later quits at once (`Interrupted`, a KeyboardInterrupt); what is being written then
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


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite. Every process sees the same synced sums, so under DDP
    all of them raise it at the same step."""


def resume_command(run) -> str:
    """The command that continues `run` (a `runs.Run`) exactly where it stopped."""
    launcher = f"torchrun --nproc_per_node={run.world}" if run.world > 1 else "python"
    return f"{launcher} train.py --resume {run.path('last.pt')}"


def stop_on_non_finite(run, error: Exception):
    """A NaN or inf loss: say where, what is kept and what to try, and exit with status 1."""
    last = run.path("last.pt")
    kept = (f"the last good checkpoint is {last}" if os.path.isfile(last)
            else "no checkpoint was written")
    run.log(f"stopping: {error}. Nothing was saved for this epoch; {kept}. Try a lower --lr, "
            "--amp bf16/off, or --grad-clip.")
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(1)


def interrupted(run, stop: StopRequest) -> str:
    """Say how to continue a run that `stop` ended -> the signal's name ("Ctrl-C", "SIGTERM")."""
    run.log(f"interrupted ({stop.name}); continue exactly where it stopped with: "
            f"{resume_command(run)}")
    return stop.name


# -- room to write, and writes that fail -----------------------------------------------------------

def check_room(run, model, descriptions):
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


def write_failed(run, error: WriteError) -> WriteError:
    """A write of the run failed (disk full, ...): the error, saying what is kept and how to go
    on. Printed, not logged: log.txt may be the file that cannot be written."""
    last = run.path("last.pt")
    error.message += (f"; the files saved before are whole: make room, then continue with: "
                      f"{resume_command(run)}" if os.path.isfile(last)
                      else "; nothing was saved yet: make room and start the run again")
    return error


# -- the data, and the checkpoints, a run goes on from ---------------------------------------------

def check_data(run, dataset: str, splits: Dict[str, Any]):
    """Record the data the run trains on (`run.data`, kept in last.pt), and for a resumed run
    check that it is the data the run started with: the same files (relative to the data root),
    labels, crops and classes. So a dataset that moved resumes from its new root
    (--data-root NEW), and one that changed is refused in one line that says what differs.
    `splits`: the sets as read ({} for the demo, which reads nothing)."""
    run.data = data_record(dataset, splits) if splits else None
    if run.resume is None or run.data is None:
        return
    cfg = run.cfg
    recorded = run.resume["resume"]["data"]
    before = run.resume["train_config"]["data_root"]
    moved = os.path.abspath(before) != os.path.abspath(cfg.data_root)
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
    for other in (os.path.join(folder, "last.pt"), os.path.join(folder, "best.pt")):
        if not os.path.isfile(other) or os.path.abspath(other) == os.path.abspath(path):
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
