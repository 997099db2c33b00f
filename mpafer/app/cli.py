"""The commands' shared front: an argparse whose errors are one line, and `run_cli`, which turns
expected failures into one line and a stop signal into its exit status."""
import argparse
import os
import pickle
import signal
import sys
import threading

from ..files import WriteError
from .faults import EXIT_STATUS, interrupt_at_once


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `prog: error: message`, with a pointer to --help
    instead of the whole usage text, and which takes no abbreviated flags (a typo such as
    `--repeat` for `--repeats` is an error, not a guess)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def end_worker_processes(timeout: float = 5.0):
    """Kill this process's multiprocessing children (DataLoader workers) that still run. A run
    that fails with a loader alive would otherwise hang at exit: multiprocessing's exit handler
    sends its workers SIGTERM, which they ignore (`faults.ignore_interrupts`), and waits."""
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
