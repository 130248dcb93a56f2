"""Fused SwiGLU: public function -> autograd.Function -> launchers.

``swiglu(gate, up)`` is ``F.silu(gate) * up``, Qwen2's MLP between its projections
(``longvita.model.text.MLP``; ``reference.swiglu_reference`` is the definition), in one
read of gate and up and one write, fp32 inside and rounded once (eager rounds silu(gate),
then the product). The backward recomputes the sigmoid instead of saving silu(gate)
(Liger-Kernel's ``LigerSiLUMulFunction`` does the same): autograd keeps gate and up, which
the projections produced anyway, and nothing else. ``glu/triton.py`` states the scheme
and its memory.

gate and up may be strided views (the two halves of one merged gate/up projection), as
long as their last dimension is contiguous and the leading ones flatten to rows.

Backends (``backend=`` or ``LONGVITA_BACKEND``, resolved by ``_backend.resolve``):
'triton' (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``), 'torch' (``torch.py``;
CPU, float64). Under torch.compile the launchers run as the custom ops
``longvita::swiglu_fwd`` / ``swiglu_bwd``.
"""

from __future__ import annotations

import torch

from longvita.kernels._backend import resolve
from longvita.kernels.glu.torch import swiglu_torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(gate, up) -> None:
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
        if t.dim() < 1:
            raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise ValueError(f"gate and up must share a dtype, got {gate.dtype} and {up.dtype}")
    if gate.device != up.device:
        raise ValueError(f"gate and up must be on one device, got {gate.device} and {up.device}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., I) -> (rows, I) with a contiguous last dimension (a view when the strides allow)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 1:
        return t.view(1, -1)
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:  # leading dimensions that do not flatten into one row stride
        return t.reshape(-1, t.shape[-1])


def swiglu_fwd(g2, u2):
    from longvita.kernels.glu.triton import swiglu_fwd_triton

    return swiglu_fwd_triton(g2, u2)


def swiglu_bwd(dy2, g2, u2):
    from longvita.kernels.glu.triton import swiglu_bwd_triton

    return swiglu_bwd_triton(dy2, g2, u2)


@torch.library.custom_op("longvita::swiglu_fwd", mutates_args=())
def _swiglu_fwd_op(g2: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    return swiglu_fwd(g2, u2)


@_swiglu_fwd_op.register_fake
def _(g2, u2):
    return g2.new_empty(g2.shape)


@torch.library.custom_op("longvita::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(dy2: torch.Tensor, g2: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return swiglu_bwd(dy2, g2, u2)


@_swiglu_bwd_op.register_fake
def _(dy2, g2, u2):
    return g2.new_empty(g2.shape), u2.new_empty(u2.shape)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g2, u2 = _rows(gate), _rows(up)
        y = (_swiglu_fwd_op if torch.compiler.is_compiling() else swiglu_fwd)(g2, u2)
        ctx.save_for_backward(g2, u2)
        ctx.shape = gate.shape
        return y.view(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        dg, du = (_swiglu_bwd_op if torch.compiler.is_compiling() else swiglu_bwd)(_rows(dy), g2, u2)
        return dg.view(ctx.shape), du.view(ctx.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``silu(gate) * up`` in one pass.

    Args:
        gate, up: (..., I), one shape, dtype and device; last dimension contiguous or not
            (a non-contiguous one is copied).
        backend: None/'auto', 'torch' or 'triton' (``longvita.kernels._backend``).

    Returns:
        (..., I) in gate's dtype, contiguous. Differentiable in gate and up.
    """
    _check(gate, up)
    name = resolve("swiglu", gate.device, gate.dtype, backend)
    if name != "triton" or gate.dtype == torch.float64:
        return swiglu_torch(gate, up)
    return _SwiGLU.apply(gate, up)
