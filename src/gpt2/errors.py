"""The exception types that the command-line tools turn into a one-line message."""


class GPT2Error(Exception):
    """A problem the user can fix: bad flags, a missing or damaged model folder, a prompt too long.

    The message is one sentence that says what is wrong and what to do about it.
    """


class Interrupted(GPT2Error):
    """Ctrl-C, with what was done before it (the commands exit with status 130)."""
