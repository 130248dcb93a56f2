"""Backend selection shared by every kernel (DESIGN.md, "Dispatch").

- CUDA tensors run the Triton (or CUDA C++) kernels.
- CPU tensors run the plain-torch reference, except under ``TRITON_INTERPRET=1``
  (set before triton is imported), where they run the Triton kernels in Triton's
  interpreter: that is how CI tests the Triton code on machines without a GPU.
- ``LONGVITA_BACKEND=torch|triton|cuda|cpp`` (or a kernel's ``backend=`` argument) forces one.
  Kernels with a CUDA C++ / C++ CPU path (pixel shuffle) handle 'cuda' and 'cpp'
  themselves; for the others 'cuda' means their GPU kernel (Triton) and 'cpp' their
  CPU path (the torch reference), so one environment setting serves every kernel.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton", "cuda", "cpp", "flash_attn")


_TRITON_OK: bool | None = None  # cached by hand: torch.compile warns on tracing lru_cache


def triton_available() -> bool:
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON_OK = True
        except Exception:  # triton missing or broken: the torch reference serves
            _TRITON_OK = False
    return _TRITON_OK


def triton_interpret() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels can run on tensors living on ``device``."""
    if not triton_available():
        return False
    if device.type == "cuda":
        return not triton_interpret()
    return device.type == "cpu" and triton_interpret()


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """Choose 'triton' or 'torch' (kernels with a CUDA C++ path handle 'cuda' themselves).

    ``backend=None`` reads ``LONGVITA_BACKEND`` (default ``auto``).
    """
    backend = backend or os.environ.get("LONGVITA_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if triton_runs_on(device) else "torch"
    if backend == "cpp":
        return "torch"
    if backend == "cuda":
        backend = "triton"
    if backend == "triton" and not triton_runs_on(device):
        raise RuntimeError(
            f"backend='triton' cannot run on {device.type} tensors here "
            "(needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is imported)"
        )
    return backend
