"""Every stop of a run and how it goes on: Ctrl-C and SIGTERM, a NaN or inf loss, a full disk or
a failed write, data that moved or changed, a checkpoint that does not load. Each ends in one
line saying what is kept and how to continue; every write is atomic, so nothing is lost."""
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

# The stop signals a run handles, by name, and the exit status they end a program with.
SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
EXIT_STATUS = {name: 128 + int(signum) for signum, name in SIGNAL_NAMES.items()}


class Interrupted(KeyboardInterrupt):
    """A stop at once; a KeyboardInterrupt, so SIGTERM cleans up as Ctrl-C does."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(SIGNAL_NAMES[signum])
        self.name, self.status = SIGNAL_NAMES[signum], 128 + int(signum)


def interrupt_at_once(signum, frame):
    raise Interrupted(signum)


def ignore_interrupts(worker_id: int = 0):
    """Workers ignore Ctrl-C and SIGTERM: the main process decides how to stop."""
    for signum in SIGNAL_NAMES:
        signal.signal(signum, signal.SIG_IGN)


class StopRequest:
    """Ctrl-C and SIGTERM as a request to stop at the end of the step (`with StopRequest() as
    stop:`); another a second later quits at once (within a second it is the same request:
    torchrun passes signals on). The handler prints nothing: it may interrupt a print."""

    def __init__(self):
        self.requested, self.name, self.status = False, "", 0
        self._first = 0.0
        self._previous = {}

    def agree(self, run) -> bool:
        """Whether any process was asked to stop (call it on every process); if so, all take
        its signal (SIGTERM over Ctrl-C), to say the same and exit alike."""
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
    """The loss became NaN or infinite (on every process at the same step: the sums are synced)."""


def resume_command(run) -> str:
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
    """Check the folder takes a file as large as last.pt: a full disk fails now."""
    if not run.master:
        return
    buffer = io.BytesIO()
    torch.save(make_checkpoint(model, descriptions, 0, {}, dataclasses.asdict(run.cfg),
                               {"data": run.data, "history": run.history}), buffer)
    momentum = sum(t.numel() * t.element_size() for t in model.trainable_state_dict().values())
    probe_write(run.path("last.pt"), buffer.tell() + momentum,
                note="checked before training, nothing was lost: make room and run it again")


def write_failed(run, error: WriteError) -> WriteError:
    """A failed write, saying what is kept and how to go on (log.txt may be the one)."""
    last = run.path("last.pt")
    error.message += (f"; the files saved before are whole: make room, then continue with: "
                      f"{resume_command(run)}" if os.path.isfile(last)
                      else "; nothing was saved yet: make room and start the run again")
    return error


# -- the data, and the checkpoints, a run goes on from ---------------------------------------------

def check_data(run, dataset: str, splits: Dict[str, Any]):
    """Record the data the run trains on (`run.data`, kept in last.pt); a resumed run's must be
    the same files, labels and classes, wherever they lie now. `splits`: the sets as read."""
    run.data = data_record(dataset, splits) if splits else None
    if run.resume is None or run.data is None:
        return
    cfg, before = run.cfg, run.resume["train_config"]["data_root"]
    moved = os.path.abspath(before) != os.path.abspath(cfg.data_root)
    differences = data_differences(run.resume["resume"]["data"], run.data, splits)
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
    """For a checkpoint that does not load: which other one of its folder does."""
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
