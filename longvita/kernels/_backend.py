"""The one backend resolver every kernel family uses (see ``docs/architecture.md``, "Dispatch").

``resolve(family, device, dtype, backend)`` returns the backend that will actually run
for one call; ``kernel_backends(device, dtype)`` gives the automatic choice of every
family (what ``python -m longvita info`` prints).

Names (a kernel's ``backend=`` argument, else ``LONGVITA_BACKEND``, else ``auto``):
  'auto'        the fastest path that runs on the tensors' device and dtype
  'torch'       the family's torch path (``<family>/torch.py``: chunked or blocked torch code)
  'triton'      the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``,
                set before triton is imported: how CI tests the Triton code without a GPU)
  'cuda'        pixel shuffle: the CUDA kernel of ``longvita._C``; the other families
                have no CUDA C++ path, so for them it means their GPU kernel (Triton)
  'cpp'         pixel shuffle: the C++ CPU path of ``longvita._C``; the others: 'torch'
  'flash_attn'  attention: the flash-attn package; the other families: 'auto'
One environment setting thus serves every family. float64 never runs Triton (the
torch path is exact there). bfloat16 never runs in Triton's interpreter, whose
``tl.dot`` returns wrong numbers for it: 'auto' takes the torch / C++ path with a
one-time warning, an explicit 'triton' raises.
"""

from __future__ import annotations

import os
import warnings

import torch

from longvita._ext import native, native_has_cuda

BACKENDS = ("auto", "torch", "triton", "cuda", "cpp", "flash_attn")
FAMILIES = ("varlen_attention", "lm_head", "pixel_shuffle", "lse_merge", "rms_norm", "rope", "swiglu")

_TRITON_OK: bool | None = None  # cached by hand: torch.compile warns on tracing lru_cache
_warned_bf16_interpret = False


def triton_available() -> bool:
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON_OK = True
        except Exception:  # triton missing or broken: the torch paths serve
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


def _requested(backend: str | None) -> str:
    if backend is None:
        backend = os.environ.get("LONGVITA_BACKEND") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"LONGVITA_BACKEND must be one of {BACKENDS}, got {backend!r}")
    elif backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _cpp_ok(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and native() is not None and dtype in (torch.float32, torch.float64)


def _warn_bf16_interpret(family: str) -> None:
    global _warned_bf16_interpret
    if not _warned_bf16_interpret:
        _warned_bf16_interpret = True
        warnings.warn(
            f"{family}: bfloat16 does not run in Triton's interpreter (TRITON_INTERPRET=1, its tl.dot "
            "is wrong for bf16); the torch/C++ path runs instead (warned once)",
            RuntimeWarning,
            stacklevel=4,
        )


def _check_triton(device: torch.device, dtype: torch.dtype, name: str) -> None:
    if not triton_runs_on(device):
        raise RuntimeError(
            f"backend={name!r} cannot run Triton on {device.type} tensors here "
            "(needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is imported)"
        )
    if dtype == torch.bfloat16 and triton_interpret():
        raise RuntimeError(
            f"backend={name!r} cannot run bfloat16 in Triton's interpreter (TRITON_INTERPRET=1): its "
            "tl.dot returns wrong numbers for bf16; use float32/float16 or backend='torch'"
        )


def resolve(family: str, device: torch.device, dtype: torch.dtype, backend: str | None = None) -> str:
    """The backend that runs ``family`` on tensors of ``device`` and ``dtype``.

    Returns 'triton' or 'torch'; also 'flash_attn' for varlen_attention and 'cuda' /
    'cpp' for pixel_shuffle. Raises ValueError for an unknown name (``backend`` or
    ``LONGVITA_BACKEND``) and RuntimeError for an explicit backend that cannot run here.
    Warns once when 'auto' passes over Triton because of bfloat16 in the interpreter.
    """
    name, skipped_bf16 = _resolve(family, torch.device(device), dtype, backend)
    if skipped_bf16:
        _warn_bf16_interpret(family)
    return name


def kernel_backends(device: torch.device, dtype: torch.dtype, backend: str | None = None) -> dict[str, str]:
    """``{family: backend that runs}`` for every kernel family on ``device`` / ``dtype``."""
    return {family: _resolve(family, torch.device(device), dtype, backend)[0] for family in FAMILIES}


def _resolve(family: str, device: torch.device, dtype: torch.dtype, backend: str | None) -> tuple[str, bool]:
    """``resolve`` without the warning: (backend, whether 'auto' skipped Triton for bf16)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    name = _requested(backend)
    if name == "flash_attn" and family != "varlen_attention":
        name = "auto"  # an attention-only choice: the other families take their default
    skip_bf16 = triton_runs_on(device) and dtype == torch.bfloat16 and triton_interpret()
    if family == "pixel_shuffle":
        if name == "cuda":
            if device.type != "cuda" or not native_has_cuda():
                raise RuntimeError("backend='cuda' needs CUDA tensors and longvita._C built with CUDA")
            if dtype == torch.float64:
                raise ValueError("backend='cuda' supports float32/float16/bfloat16, got float64")
            return "cuda", False
        if name == "cpp":
            if native() is None or device.type != "cpu":
                raise RuntimeError("backend='cpp' needs CPU tensors and the longvita._C extension")
            if dtype not in (torch.float32, torch.float64):
                raise ValueError(f"backend='cpp' supports float32/float64, got {dtype}")
            return "cpp", False
        if name == "auto":
            # On a GPU, Triton before the CUDA kernel: measured on an H100 (bf16, 64 and 256
            # tiles of InternViT-300M, benchmarks/RESULTS.md 2026-11-25) Triton ran the
            # shuffle + LayerNorm in 0.21 / 0.49 ms, the CUDA kernel in 0.72 / 2.72 ms.
            if device.type == "cuda" and triton_runs_on(device) and dtype != torch.float64:
                return "triton", False
            if device.type == "cuda" and native_has_cuda() and dtype != torch.float64:
                return "cuda", False
            if dtype != torch.float64 and triton_runs_on(device) and not skip_bf16:
                return "triton", False
            return ("cpp" if _cpp_ok(device, dtype) else "torch"), skip_bf16
        if name == "triton":  # float64 loads and stores work; the statistics stay fp32
            _check_triton(device, dtype, name)
        return name, False
    # varlen_attention, lm_head, lse_merge, rms_norm, rope, swiglu: Triton or torch (or
    # flash-attn for attention)
    if name in ("torch", "cpp", "flash_attn"):
        return ("torch" if name == "cpp" else name), False
    if name == "auto":
        if dtype == torch.float64 or not triton_runs_on(device) or skip_bf16:
            return "torch", skip_bf16
        return "triton", False
    _check_triton(device, dtype, name)  # 'triton', or 'cuda' = the GPU kernel, which is Triton
    return ("torch" if dtype == torch.float64 else "triton"), False
