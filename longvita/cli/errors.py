"""The command line's error rule: the project's own errors (``LongVITAError``: bad input, a
bad checkpoint or output folder, a diverged run, a stalled rank) print as one line on
stderr and exit 1; anything else is a bug and keeps its traceback. Standard library only."""

from __future__ import annotations

import os

from longvita.common import LongVITAError

__all__ = ["EXIT_INPUT", "EXIT_INTERRUPTED", "UsageError", "is_user_error", "one_line", "rank"]

EXIT_INPUT = 1  # bad input (files, arguments, checkpoints); argparse's own errors exit 2
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


class UsageError(LongVITAError, ValueError):
    """A flag value that is not what the flag takes: the message names the flag."""


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, LongVITAError)


def one_line(exc: BaseException) -> str:
    """The error's first line (the message of every LongVITAError is one line already)."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def rank() -> int:
    """This process's rank under torchrun (0 alone): only rank 0 prints errors and warnings."""
    return int(os.environ.get("RANK", "0"))
