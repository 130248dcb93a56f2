"""Fused RMSNorm with an optional residual add: public function -> autograd.Function -> launchers.

``rms_norm(x, weight, eps)`` is Qwen2's RMSNorm (``longvita.model.text.RMSNorm``,
transformers' ``Qwen2RMSNorm``; ``reference.rms_norm_reference`` is the definition):
``weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype)``, returned in
``torch.result_type(weight, x)`` (fp32 under autocast with fp32 weights, the model's
dtype otherwise), as eager computes it. ``rms_norm(x, weight, eps, residual=r)`` first
forms ``h = x + r`` (in their promoted dtype) and returns ``(rms_norm(h), h)``: a decoder
layer's ``x = x + attn_out; normed = norm(x)`` in one pass (vLLM's fused_add_rms_norm,
out of place).

Why fused: eager runs 6-8 kernels per norm (cast, square, mean, rsqrt, two multiplies,
casts) and autograd keeps fp32 copies of the row; the fused forward reads x (and r) once
and writes y (and h) once, and saves only its input and one fp32 rstd per row; the
backward reads dy, the input and the weight once (``norm/triton.py`` states the
scheme and its memory).

Backends (``backend=`` or ``LONGVITA_BACKEND``, resolved by ``_backend.resolve``):
'triton' (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``), 'torch' (``torch.py``, the
formula in torch ops with autograd; CPU, float64). Under torch.compile the launchers run
as the custom ops ``longvita::rms_norm_fwd`` / ``rms_norm_bwd``; eager calls go straight
to the launchers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longvita.kernels._backend import resolve
from longvita.kernels.norm.torch import rms_norm_torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class RMSNormParams:
    """The non-tensor options of one fused RMSNorm call."""

    eps: float
    out_dtype: torch.dtype  # result_type(weight, h)
    h_dtype: torch.dtype  # dtype of the normalised input: x's, or result_type(x, residual)


def _check(x, weight, eps, residual) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension (..., H), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float16/bfloat16/float32/float64, got {x.dtype}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be 1-D with x's last dimension ({x.shape[-1]}) elements, got {shape}")
    if weight.dtype not in _FLOAT_DTYPES or weight.device != x.device:
        raise ValueError(f"weight must be a floating tensor on x's device {x.device}, got {weight.dtype} on {weight.device}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.shape != x.shape:
            shape = tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {shape}")
        if residual.dtype not in _FLOAT_DTYPES or residual.device != x.device:
            raise ValueError(f"residual must be a floating tensor on x's device {x.device}, got {residual.dtype} on {residual.device}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., H) -> (rows, H) with a contiguous last dimension (a view when possible)."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.reshape(-1, t.shape[-1])


def rms_norm_fwd(x2, weight, residual2, p: RMSNormParams):
    """Launcher: ``(y, h or None, rstd)`` for (rows, H) inputs."""
    from longvita.kernels.norm.triton import rms_norm_fwd_triton

    return rms_norm_fwd_triton(x2, weight, residual2, p.eps, p.out_dtype, p.h_dtype)


def rms_norm_bwd(dy2, xn2, weight, rstd, dh2):
    """Launcher: ``(d(normalised input), dweight)``."""
    from longvita.kernels.norm.triton import rms_norm_bwd_triton

    return rms_norm_bwd_triton(dy2, xn2, weight, rstd, dh2)


# The launchers as custom ops with fake kernels, so torch.compile traces through them
# (eager calls skip them: a custom op's first eager call imports torch._dynamo).
@torch.library.custom_op("longvita::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(
    x2: torch.Tensor, weight: torch.Tensor, residual2: torch.Tensor | None, eps: float,
    out_dtype: torch.dtype, h_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, h, rstd = rms_norm_fwd(x2, weight, residual2, RMSNormParams(eps, out_dtype, h_dtype))
    return y, (h if h is not None else x2.new_empty(0, dtype=h_dtype)), rstd


@_rms_norm_fwd_op.register_fake
def _(x2, weight, residual2, eps, out_dtype, h_dtype):
    n, c = x2.shape
    h = x2.new_empty(n, c, dtype=h_dtype) if residual2 is not None else x2.new_empty(0, dtype=h_dtype)
    return x2.new_empty(n, c, dtype=out_dtype), h, x2.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("longvita::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(
    dy2: torch.Tensor, xn2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dh2: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_bwd(dy2, xn2, weight, rstd, dh2)


@_rms_norm_bwd_op.register_fake
def _(dy2, xn2, weight, rstd, dh2):
    return torch.empty_like(xn2), torch.empty_like(weight)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, p: RMSNormParams):
        shape = x.shape
        x2, r2 = _rows(x), (_rows(residual) if residual is not None else None)
        if torch.compiler.is_compiling():
            y, h, rstd = _rms_norm_fwd_op(x2, weight, r2, p.eps, p.out_dtype, p.h_dtype)
            h = h if residual is not None else None
        else:
            y, h, rstd = rms_norm_fwd(x2, weight, r2, p)
        ctx.save_for_backward(h if h is not None else x2, weight, rstd)
        ctx.shape = shape
        ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None)
        if residual is None:
            return y.view(shape)
        return y.view(shape), h.view(shape)

    @staticmethod
    def backward(ctx, dy, dh=None):
        xn2, weight, rstd = ctx.saved_tensors
        x_dtype, r_dtype = ctx.dtypes
        dy2 = _rows(dy)
        dh2 = _rows(dh) if (r_dtype is not None and dh is not None) else None
        bwd = _rms_norm_bwd_op if torch.compiler.is_compiling() else rms_norm_bwd
        dxn, dw = bwd(dy2, xn2, weight, rstd, dh2)
        dxn = dxn.view(ctx.shape)
        if r_dtype is None:
            return dxn.to(x_dtype), dw, None, None
        # h = x + residual: both receive h's gradient, each in its own dtype (as autograd's add)
        return dxn.to(x_dtype), dw, dxn.to(r_dtype), None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
):
    """Qwen2's RMSNorm over the last dimension, optionally after a residual add.

    Args:
        x: (..., H) float16/bfloat16/float32/float64.
        weight: (H,) (any floating dtype; fp32 master weights under autocast are fine).
        eps: added to the mean square (Qwen2.5: 1e-6).
        residual: None, or a tensor of x's shape: then ``h = x + residual`` is normalised.
        backend: None/'auto', 'torch' or 'triton' (``longvita.kernels._backend``).

    Returns:
        y (..., H) in ``torch.result_type(weight, h)``; with ``residual``, ``(y, h)`` with
        h in ``torch.result_type(x, residual)``. Differentiable in x, weight and residual
        (and through h).
    """
    _check(x, weight, eps, residual)
    h_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    name = resolve("rms_norm", x.device, h_dtype, backend)
    if name != "triton" or h_dtype == torch.float64 or weight.dtype == torch.float64:
        return rms_norm_torch(x, weight, float(eps), residual)
    out_dtype = torch.promote_types(weight.dtype, h_dtype)
    p = RMSNormParams(float(eps), out_dtype, h_dtype)
    return _RMSNorm.apply(x, weight.contiguous(), residual, p)
