"""Loads the native extension `longvita._C` if it was built, and says so.

The package works without it: every kernel then runs on Triton (CUDA tensors, or the
interpreter) or on the plain-torch reference (CPU).
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libc10/libtorch, which the extension links against)

_C = None
_ERROR: str | None = None
try:  # the extension is optional: LONGVITA_SKIP_EXT=1 builds, or a failed compile
    from longvita import _C  # type: ignore[attr-defined,no-redef]
except ImportError as exc:  # pragma: no cover - depends on the build
    _ERROR = str(exc)


def native() -> object | None:
    """The `longvita._C` module, or None when it is not built."""
    return _C


def native_has_cuda() -> bool:
    """True when `longvita._C` carries the CUDA kernels (built against CUDA torch with nvcc)."""
    return _C is not None and bool(_C.build_info()["cuda"])


def native_status() -> str:
    if _C is None:
        return f"not built ({_ERROR})"
    info = _C.build_info()
    return f"built (cuda={'yes' if info['cuda'] else 'no'}, torch {info['built_with_torch']})"


def native_links_shared_libstdcxx() -> bool | None:
    """Whether longvita._C loads libstdc++ as a shared library, as torch does. None when
    unknown (not built, not Linux, no ``ldd``). A copy linked in statically crashed the
    process at the first error message that formatted a number (see setup.py)."""
    import shutil
    import subprocess

    ext = native()
    path = getattr(ext, "__file__", None)
    if path is None or shutil.which("ldd") is None:
        return None
    try:
        out = subprocess.run(["ldd", path], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return "libstdc++" in out
