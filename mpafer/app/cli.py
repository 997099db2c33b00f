"""The commands' shared front: an argparse whose errors are one line, and `run_cli`, which turns
expected failures into one line and a stop signal into its exit status."""
import argparse
import difflib
import multiprocessing
import os
import pickle
import signal
import sys
import threading

from ..files import WriteError
from .faults import EXIT_STATUS, interrupt_at_once


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors and no abbreviated flags (a typo is no guess, but the flag
    it most resembles is named)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        if message.startswith("unrecognized arguments: "):
            flags = list(self._option_string_actions)
            close = [(given, difflib.get_close_matches(given.split("=", 1)[0], flags, 1, 0.75))
                     for given in message.split(": ", 1)[1].split() if given.startswith("--")]
            message += "".join(f"; {given.split('=', 1)[0]}: did you mean {found[0]}?"
                               for given, found in close if found)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def run_cli(main):
    """Run a script's main(): an expected failure prints one line instead of a traceback
    (MPAFER_TRACEBACK=1 shows it); Ctrl-C and SIGTERM end it quietly with 130 and 143."""
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # (signal handlers can only be set there)
        previous = signal.signal(signal.SIGTERM, interrupt_at_once)
    try:
        try:
            main()
        except BaseException:
            # Kill the DataLoader workers still running: they ignore the SIGTERM that
            # multiprocessing's exit handler sends them, and it would wait forever.
            for child in multiprocessing.active_children():
                child.kill()
                child.join(5.0)
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
