"""What every layer of longvita shares and nothing else: the project's own error type and
the label convention of its losses. Imports nothing (not even torch), so the command line
can check its arguments before torch loads.

``LongVITAError`` marks a problem with what the user gave (a flag, a file, a checkpoint,
a prompt) or a run that cannot go on (a diverged loss): the command line prints such an
error as one line and exits non-zero. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["IGNORE_INDEX", "LongVITAError"]

# The label that contributes nothing to a cross-entropy (``F.cross_entropy``'s default,
# flash-attn's and transformers' convention); the only place the number is written.
IGNORE_INDEX = -100


class LongVITAError(Exception):
    """A user-facing error: the message names the flag, file or value and what was expected."""
