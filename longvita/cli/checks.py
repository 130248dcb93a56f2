"""One validation layer for every command's flags: each check raises ``UsageError`` naming
the flag and what it takes, before torch is imported or anything is loaded. Commands turn
their parsed arguments into frozen option objects through these checks (nothing mutates
the argparse namespace). Standard library only."""

from __future__ import annotations

import math
import os

from longvita.cli.errors import UsageError

__all__ = ["DEFAULT_TIMEOUT_S", "MAX_TILES", "check_device", "check_file", "check_int", "check_model", "check_number",
           "check_out_dir", "check_seed", "check_text", "check_timeout", "depth_list", "int_list", "token_count"]

# torch.distributed's own default is 30 minutes: a stalled rank would hold the others that long
DEFAULT_TIMEOUT_S = 600
# the most tiles one image may be cut into: 256 tiles of 448 px is a 7168 x 7168 picture
MAX_TILES = 256
SEED_LIMIT = 2**63  # what torch.Generator.manual_seed, numpy and random all take


def check_int(flag: str, value, minimum: int | None = None, maximum: int | None = None, *, unit: str = "") -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageError(f"{flag} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise UsageError(f"{flag} must be >= {minimum}{unit}, got {value}")
    if maximum is not None and value > maximum:
        raise UsageError(f"{flag} must be <= {maximum}{unit}, got {value}")
    return value


def check_number(flag: str, value, minimum: float | None = None, maximum: float | None = None, *,
                 open_min: bool = False, hint: str = "") -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number{hint}, got {value!r}")
    if minimum is not None and (value < minimum or (open_min and value == minimum)):
        raise UsageError(f"{flag} must be {'>' if open_min else '>='} {minimum}{hint}, got {value}")
    if maximum is not None and value > maximum:
        raise UsageError(f"{flag} must be <= {maximum}{hint}, got {value}")
    return float(value)


def check_seed(value, flag: str = "--seed") -> int:
    return check_int(flag, value, 0, SEED_LIMIT - 1)


def check_timeout(value) -> int:
    return check_int("--timeout", value, 1, 7 * 24 * 3600, unit=" seconds")


def check_device(value, flag: str = "--device") -> str:
    """cpu, cuda or cuda:N (the rest is checked when torch is imported: is CUDA there)."""
    if not isinstance(value, str) or not (value == "cpu" or value == "cuda" or
                                          (value.startswith("cuda:") and value[5:].isdigit())):
        raise UsageError(f"{flag} must be cpu, cuda or cuda:N, got {value!r}")
    return value


def check_file(flag: str, path) -> str:
    if not isinstance(path, str) or not path:
        raise UsageError(f"{flag} must be a file path, got {path!r}")
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path}: file does not exist")
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: not a file")
    return path


def check_model(value, tiny_name: str = "tiny") -> str | None:
    """--model: unset, the name of the random tiny preset, or a folder with a config.json."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise UsageError(f"--model must be a checkpoint folder, got {value!r}")
    if value == tiny_name and not os.path.isdir(value):  # the random tiny preset, by name
        return value
    if not os.path.isdir(value):
        raise UsageError(f"--model {value}: checkpoint folder does not exist")
    if not os.path.isfile(os.path.join(value, "config.json")):
        raise UsageError(f"--model {value}: no config.json in the folder")
    return value


def check_out_dir(flag: str, path) -> str:
    """An output folder: may not exist yet, but must not be a file (or under one)."""
    if not isinstance(path, str) or not path:
        raise UsageError(f"{flag} must be a folder path, got {path!r}")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError(f"{flag} {path}: {probe} is a file, not a folder")
    return path


def check_text(flag: str, text: str | None) -> str | None:
    """Text from the command line must be valid UTF-8: Python hands undecodable bytes of
    argv through as surrogates (a Latin-1 file read with ``$(cat book.txt)``)."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start].encode("utf-8", "surrogateescape")
        raise UsageError(f"{flag}: not valid UTF-8 text (byte 0x{bad.hex()} at character {exc.start}); "
                         "convert it first, e.g. iconv -f latin1 -t utf-8") from None
    return text


def int_list(flag: str, text: str, maximum: int | None = None) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{flag}: expected positive integers, got {text!r}")
    if maximum is not None and max(values) > maximum:
        raise UsageError(f"{flag}: {max(values)} is more than {maximum}")
    return values


def token_count(flag: str, text, maximum: int = 1 << 30) -> int:
    """A token count: an integer, or with a K (x1024) or M (x1048576) suffix: 131072, 128K, 1M."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"{flag} must be a token count such as 131072, 128K or 1M, got {text!r}")
    t = text.strip().upper()
    scale = {"K": 1024, "M": 1024 * 1024}.get(t[-1], 1)
    digits = t[:-1] if scale > 1 else t
    if not digits.isdigit():
        raise UsageError(f"{flag} must be a token count such as 131072, 128K or 1M, got {text!r}")
    return check_int(flag, int(digits) * scale, 1, maximum, unit=" tokens")


def depth_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--depths: expected comma-separated percentages, got {text!r}") from None
    if not values or any(not 0 <= v <= 100 for v in values):
        raise UsageError(f"--depths: expected percentages in [0, 100], got {text!r}")
    return values
