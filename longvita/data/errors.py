"""The one exception type the data layer raises for bad user input."""

from longvita.common import LongVITAError


class InputError(LongVITAError, ValueError):
    """A user-supplied input (image, video, tokenizer file, prompt segment, manifest) is
    missing, unreadable or malformed. The message names the input and the problem, so the
    CLI can print it as one line. Subclasses ValueError so generic ``except ValueError`` works."""
