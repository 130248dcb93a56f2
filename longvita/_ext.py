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
