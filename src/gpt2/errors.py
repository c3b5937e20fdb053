"""The exception types that the command-line tools turn into a one-line message, and the C++
libraries' lines that are noise to a user (`c_stderr_silenced`)."""
import contextlib
import os
import sys


class GPT2Error(Exception):
    """A problem the user can fix: bad flags, a missing or damaged model folder, a prompt too long.

    The message is one sentence that says what is wrong and what to do about it.
    """


class Interrupted(GPT2Error):
    """Ctrl-C, with what was done before it (the commands exit with status 130)."""


@contextlib.contextmanager
def c_stderr_silenced():
    """C++ code's lines to the standard error are dropped inside this (Python's errors still come as exceptions)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
