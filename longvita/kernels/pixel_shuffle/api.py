"""Fused pixel-shuffle projector: public functions -> autograd.Function -> launchers.

InternVL's projector is ``pixel_shuffle -> LayerNorm(4C) -> Linear -> GELU -> Linear``.
The pixel shuffle with ``scale_factor = 1/inv`` is a pure index map. With
``x`` of shape (tiles, h*h, C) seen as a (tiles, h, h, C) grid, output row
``r = i * (h/inv) + j`` of a tile concatenates ``inv*inv`` source tokens; slot
``s = m * inv + k`` (m, k in [0, inv)) holds channels ``[s*C, (s+1)*C)`` and comes from

    source token = (inv*i + m) * h + (inv*j + k)

(for inv = 2: top-left, top-right, bottom-left, bottom-right of the 2x2 block). This is
transformers' ``InternVLModel.pixel_shuffle`` (v2 order), checked in the tests.

The fused kernel reads each output row's source tokens straight from ``x`` (no shuffled
copy), computes the LayerNorm in fp32 and writes the normalised row in ``x``'s dtype (the
GEMMs' input dtype). Its backward applies the inverse map: every source token has exactly
one destination row, so ``dx`` is written by plain stores, no atomics. ``dweight`` /
``dbias`` are per-program partial sums in fp32 followed by one sum.

The two GEMMs and the GELU run as ``F.linear`` + ``F.gelu`` (cuBLAS on GPU), so their
backward is autograd's. Under torch.compile the fused piece's launchers run as torch
custom ops with fake kernels, which torch.compile traces through; in eager mode they
are called directly (a custom op's first eager call imports torch._dynamo, seconds on CPU).

Backends for the fused piece (``backend=`` or ``LONGVITA_BACKEND``):
  'cuda'   the CUDA kernel of ``longvita._C`` (CUDA tensors; float32/float16/bfloat16)
  'cpp'    the plain C++ path of ``longvita._C`` (CPU tensors; float32/float64)
  'triton' the Triton kernels of ``pixel_shuffle/triton.py`` (CUDA tensors, or CPU under
           TRITON_INTERPRET=1; imported only when this backend runs)
  'torch'  (``torch.py``) a gather through ``pixel_shuffle_source_index`` + ``F.layer_norm`` (any device
           and dtype; autograd's backward)
Automatic choice (``longvita.kernels._backend.resolve``): on a GPU Triton, then the CUDA
extension (Triton measured 3.5-5.6x faster on an H100); on the CPU the C++ path, then
torch; bfloat16 skips Triton in the interpreter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longvita._ext import native
from longvita.kernels._backend import resolve
from longvita.kernels.pixel_shuffle.torch import torch_shuffle_layernorm

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class PixelShuffleParams:
    """The non-tensor options of the fused shuffle + LayerNorm."""

    inv: int  # 1 / scale_factor
    eps: float
    backend: str  # resolved: 'cuda' | 'cpp' | 'triton' | 'torch'


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _inv_of(scale_factor: float) -> int:
    inv = round(1.0 / scale_factor) if scale_factor > 0 else 0
    if inv < 1 or abs(inv * scale_factor - 1.0) > 1e-6:
        raise ValueError(f"scale_factor must be 1/k for an integer k >= 1 (e.g. 0.5), got {scale_factor!r}")
    return inv


def _check_tensor(name: str, t, dim: int, x: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise ValueError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def _check_shuffle_ln(x, ln_weight, ln_bias, inv: int) -> int:
    """Validates the fused piece's inputs; returns h (tokens per tile = h*h)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D (tiles, h*w, C), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float16/bfloat16/float32/float64, got {x.dtype}")
    tiles, n_tok, c = x.shape
    h = math.isqrt(n_tok)
    if h * h != n_tok:
        raise ValueError(f"x's token count per tile (dim 1) must be a perfect square h*h, got {n_tok}")
    if h % inv != 0:
        raise ValueError(f"x's grid side h = {h} must be divisible by 1/scale_factor = {inv}")
    _check_tensor("ln_weight", ln_weight, 1, x)
    if ln_weight.shape[0] != inv * inv * c:
        raise ValueError(
            f"ln_weight must have {inv * inv}*C = {inv * inv * c} elements (C = {c}), got {ln_weight.shape[0]}"
        )
    if ln_bias is not None:
        _check_tensor("ln_bias", ln_bias, 1, x)
        if ln_bias.shape != ln_weight.shape:
            raise ValueError(f"ln_bias must have shape {tuple(ln_weight.shape)}, got {tuple(ln_bias.shape)}")
    return h


def _check_mlp(x, w1, b1, w2, b2, n_in: int) -> None:
    _check_tensor("w1", w1, 2, x)
    if w1.shape[1] != n_in:
        raise ValueError(f"w1 must have shape (M, {n_in}) (input = the normalised row), got {tuple(w1.shape)}")
    _check_tensor("w2", w2, 2, x)
    if w2.shape[1] != w1.shape[0]:
        raise ValueError(f"w2 must have shape (D, {w1.shape[0]}) (M = w1.shape[0]), got {tuple(w2.shape)}")
    for name, b, w in (("b1", b1, w1), ("b2", b2, w2)):
        if b is not None:
            _check_tensor(name, b, 1, x)
            if b.shape[0] != w.shape[0]:
                raise ValueError(f"{name} must have shape ({w.shape[0]},), got {tuple(b.shape)}")


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def pixel_shuffle_ln_fwd(x, weight, bias, p: PixelShuffleParams):
    """Fused shuffle + LayerNorm forward. Returns ``(y, mean, rstd)``.

    x (tiles, h*h, C) contiguous -> y (tiles, h*h/inv^2, inv^2*C) in x's dtype;
    mean, rstd (tiles*h*h/inv^2,) row statistics (fp32, or float64 for 'cpp' float64).
    """
    if p.backend in ("cuda", "cpp"):
        return native().pixel_shuffle_ln_fwd(x, weight, bias, p.inv, p.eps)
    from longvita.kernels.pixel_shuffle.triton import triton_ln_fwd

    return triton_ln_fwd(x, weight, bias, p)


def pixel_shuffle_ln_bwd(dy, x, weight, mean, rstd, has_bias: bool, p: PixelShuffleParams):
    """Fused backward: ``(dx, dweight, dbias or None)`` from dy (tiles, h*h/inv^2, inv^2*C)."""
    dy = dy.contiguous()
    if p.backend in ("cuda", "cpp"):
        dx, dw, db = native().pixel_shuffle_ln_bwd(dy, x, weight, mean, rstd, p.inv, has_bias)
        return dx, dw, (db if has_bias else None)
    from longvita.kernels.pixel_shuffle.triton import triton_ln_bwd

    return triton_ln_bwd(dy, x, weight, mean, rstd, has_bias, p)


# The launchers as torch custom ops (with fake implementations), so torch.compile traces
# through the fused piece instead of breaking the graph at it. Eager calls use the plain
# functions (see the module docstring).


def _ps_ln_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, inv: int, eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return pixel_shuffle_ln_fwd(x, weight, bias, PixelShuffleParams(inv, eps, backend))


_ps_ln_fwd_op = torch.library.custom_op("longvita::pixel_shuffle_ln_fwd", mutates_args=())(_ps_ln_fwd)


@_ps_ln_fwd_op.register_fake
def _(x, weight, bias, inv, eps, backend):
    tiles, n_tok, c = x.shape
    n_out = n_tok // (inv * inv)
    stat = x.dtype if backend == "cpp" else torch.float32
    y = x.new_empty(tiles, n_out, inv * inv * c)
    return y, x.new_empty(tiles * n_out, dtype=stat), x.new_empty(tiles * n_out, dtype=stat)


def _ps_ln_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    has_bias: bool,
    inv: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # the backward needs no eps: the saved rstd carries it
    dx, dw, db = pixel_shuffle_ln_bwd(dy, x, weight, mean, rstd, has_bias, PixelShuffleParams(inv, 0.0, backend))
    return dx, dw, (db if db is not None else weight.new_empty(0))  # a custom op returns tensors only


_ps_ln_bwd_op = torch.library.custom_op("longvita::pixel_shuffle_ln_bwd", mutates_args=())(_ps_ln_bwd)


@_ps_ln_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, has_bias, inv, backend):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0] if has_bias else 0)


class _PixelShuffleLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, p: PixelShuffleParams):
        fwd = _ps_ln_fwd_op if torch.compiler.is_compiling() else _ps_ln_fwd
        y, mean, rstd = fwd(x, weight, bias, p.inv, p.eps, p.backend)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.p = p
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        p = ctx.p
        bwd = _ps_ln_bwd_op if torch.compiler.is_compiling() else _ps_ln_bwd
        dx, dw, db = bwd(dy.contiguous(), x, weight, mean, rstd, ctx.has_bias, p.inv, p.backend)
        return dx, dw, (db if ctx.has_bias else None), None


# --------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------


def pixel_shuffle_layernorm(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor | None,
    *,
    eps: float = 1e-5,
    scale_factor: float = 0.5,
    backend: str | None = None,
) -> torch.Tensor:
    """``LayerNorm(pixel_shuffle(x))`` without materialising the shuffled tensor.

    x: (tiles, h*h, C) ViT tokens without CLS; ln_weight, ln_bias: (C/scale^2,) (4C for
    0.5), ln_bias may be None. Returns (tiles, h*h*scale^2, C/scale^2) in x's dtype.
    Statistics in fp32. Differentiable in x, ln_weight and ln_bias. ``backend``: see
    the module docstring (None reads ``LONGVITA_BACKEND``, default 'auto').
    """
    inv = _inv_of(scale_factor)
    _check_shuffle_ln(x, ln_weight, ln_bias, inv)
    chosen = resolve("pixel_shuffle", x.device, x.dtype, backend)
    if chosen == "torch":
        return torch_shuffle_layernorm(x, ln_weight, ln_bias, float(eps), inv)
    p = PixelShuffleParams(inv=inv, eps=float(eps), backend=chosen)
    bias = ln_bias.contiguous() if ln_bias is not None else None
    return _PixelShuffleLayerNorm.apply(x.contiguous(), ln_weight.contiguous(), bias, p)


def pixel_shuffle_project(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor | None,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    *,
    scale_factor: float = 0.5,
    eps: float = 1e-5,
    backend: str | None = None,
) -> torch.Tensor:
    """InternVL / Long-VITA projector: pixel shuffle -> LayerNorm -> Linear -> GELU -> Linear.

    x: (tiles, h*h, C); ln_weight, ln_bias: (4C,); w1: (M, 4C), b1: (M,); w2: (D, M),
    b2: (D,) (nn.Linear layout). Biases may be None. Returns (tiles, h*h/4, D) in x's
    dtype (shown for scale_factor=0.5); 0 tiles give (0, h*h/4, D). GELU is the exact
    (erf) one. Differentiable in every tensor argument. ``backend`` picks the fused
    shuffle+LayerNorm's backend; the GEMMs run as ``F.linear`` + ``F.gelu``.
    """
    inv = _inv_of(scale_factor)
    _check_shuffle_ln(x, ln_weight, ln_bias, inv)
    _check_mlp(x, w1, b1, w2, b2, ln_weight.shape[0])
    y = pixel_shuffle_layernorm(x, ln_weight, ln_bias, eps=eps, scale_factor=scale_factor, backend=backend)
    return F.linear(F.gelu(F.linear(y, w1, b1)), w2, b2)
