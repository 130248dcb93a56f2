"""Files written whole or not at all, by every layer that writes (checkpoints, results,
caches, a saved model): the bytes go to a temporary file beside the target, are flushed to
disk, and the temporary file is renamed over the target, so a reader (or a crash) never
sees half a file. The file gets the permissions a plainly created file gets (0666 minus
the umask): temporary-file helpers create 0600 files, which the rename would keep.

A folder that cannot take the file (read-only, full, not a folder) raises ``OutputError``
naming it and the operating system's reason; the temporary file is removed and the target,
if it existed, is left as it was. Standard library only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Union

from longvita.common import LongVITAError

__all__ = ["OutputError", "default_file_mode", "diagnose_folder", "write_atomic"]


class OutputError(LongVITAError, OSError):
    """An output that cannot be written (read-only, full, not a folder): the message names it."""


def default_file_mode() -> int:
    """0666 minus the process umask: the mode ``open(path, "w")`` would create."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def diagnose_folder(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` cannot take a file, for writers that fail without an OSError (torch's
    zip writer reports a full disk as ``RuntimeError: unexpected pos``); None if it can."""
    folder = Path(folder)
    if not folder.is_dir():
        return os.strerror(20)  # Not a directory
    if not os.access(folder, os.W_OK):
        return os.strerror(13)  # Permission denied
    try:
        import shutil

        if shutil.disk_usage(folder).free < (1 << 20):
            return os.strerror(28)  # No space left on device
    except OSError as exc:
        return exc.strerror
    return None


def write_atomic(path: str | os.PathLike, data: Union[bytes, str, Callable[[Path], None]], *, what: str | None = None) -> None:
    """Write ``path`` atomically. ``data``: the bytes (or UTF-8 text), or a function that
    writes a given temporary path (e.g. ``safetensors.torch.save_file``). ``what`` names
    the output in an error (default: the path)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except Exception as exc:  # noqa: BLE001 - an I/O failure becomes one line; anything else re-raises
        try:
            tmp.unlink()
        except OSError:
            pass
        reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else diagnose_folder(path.parent)
        if reason is None:
            raise
        raise OutputError(f"{what or path}: cannot write {path.name} in {path.parent} ({reason})") from None
