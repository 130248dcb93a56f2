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
backward is autograd's; ``gemm='triton'`` instead runs the first GEMM in Triton with the
GELU in its epilogue (untuned fixed tiles; its backward is torch's). The fused piece's
launchers are registered as torch custom ops with fake kernels, so torch.compile traces
through them.

Backends for the fused piece (``backend=`` or ``LONGVITA_BACKEND``):
  'cuda'   the CUDA kernel of ``longvita._C`` (CUDA tensors; float32/float16/bfloat16)
  'cpp'    the plain C++ path of ``longvita._C`` (CPU tensors; float32/float64)
  'triton' the Triton kernels below (CUDA tensors, or CPU under TRITON_INTERPRET=1)
  'torch'  the reference (``pixel_shuffle_reference`` + ``F.layer_norm``)
Automatic choice: CUDA extension > Triton > C++ (CPU) > torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longvita._ext import native, native_has_cuda
from longvita.kernels import reference as ref
from longvita.kernels._backend import resolve_backend, triton_available, triton_runs_on

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BACKENDS = ("auto", "cuda", "cpp", "triton", "torch")

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _ps_ln_fwd_kernel(
        X,  # (tiles, n_tok, C) contiguous
        W,  # (INV*INV*C,)
        B,  # (INV*INV*C,) or dummy
        Y,  # (rows, INV*INV*C)
        Mean,  # (rows,) fp32
        Rstd,  # (rows,) fp32
        n_tok,
        h,
        w_out,
        n_out,
        C,
        eps,
        INV: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        tile = row // n_out
        r = row % n_out
        i = r // w_out
        j = r % w_out
        s = tl.arange(0, BLOCK_S)
        c = tl.arange(0, BLOCK_C)
        tok = tile * n_tok + (INV * i + s // INV) * h + INV * j + s % INV  # (BLOCK_S,) source tokens
        mask = (s < INV * INV)[:, None] & (c < C)[None, :]
        n = INV * INV * C
        x = tl.load(X + tok[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(tl.sum(x, axis=1), axis=0) / n
        xc = tl.where(mask, x - mean, 0.0)
        var = tl.sum(tl.sum(xc * xc, axis=1), axis=0) / n
        rstd = 1.0 / tl.sqrt(var + eps)
        col = s[:, None] * C + c[None, :]
        y = xc * rstd * tl.load(W + col, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(B + col, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * n + col, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(Mean + row, mean)
        tl.store(Rstd + row, rstd)

    @triton.jit
    def _ps_ln_bwd_kernel(
        DY,  # (rows, INV*INV*C)
        X,  # (tiles, n_tok, C)
        W,
        Mean,
        Rstd,
        DX,  # (tiles, n_tok, C): every element written exactly once
        DWp,  # (programs, INV*INV*C) fp32 partial sums
        DBp,  # (programs, INV*INV*C) fp32 partial sums, or dummy
        n_rows,
        n_tok,
        h,
        w_out,
        n_out,
        C,
        INV: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n_prog = tl.num_programs(0)
        s = tl.arange(0, BLOCK_S)
        c = tl.arange(0, BLOCK_C)
        mask = (s < INV * INV)[:, None] & (c < C)[None, :]
        col = s[:, None] * C + c[None, :]
        n = INV * INV * C
        w = tl.load(W + col, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
        db_acc = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
        pid64 = pid.to(tl.int64)
        for it in range(0, tl.cdiv(n_rows - pid, n_prog)):
            row = pid64 + it * n_prog  # rows pid, pid + n_prog, ... (int64 offsets)
            tile = row // n_out
            r = row % n_out
            i = r // w_out
            j = r % w_out
            tok = tile * n_tok + (INV * i + s // INV) * h + INV * j + s % INV
            src = tok[:, None] * C + c[None, :]
            x = tl.load(X + src, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * n + col, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            g = dy * w
            c1 = tl.sum(tl.sum(g * xhat, axis=1), axis=0) / n
            c2 = tl.sum(tl.sum(g, axis=1), axis=0) / n
            dx = (g - (xhat * c1 + c2)) * rstd
            tl.store(DX + src, dx.to(DX.dtype.element_ty), mask=mask)
            dw_acc += dy * xhat
            if HAS_BIAS:
                db_acc += dy
        tl.store(DWp + pid.to(tl.int64) * n + col, dw_acc, mask=mask)
        if HAS_BIAS:
            tl.store(DBp + pid.to(tl.int64) * n + col, db_acc, mask=mask)

    @triton.jit
    def _linear_gelu_kernel(
        A,  # (rows, K)
        W,  # (N, K), nn.Linear layout
        Bias,  # (N,) or dummy
        Pre,  # (rows, N) pre-activation (saved for the backward) or dummy
        Out,  # (rows, N) gelu(A @ W^T + Bias)
        n_rows,
        N,
        K,
        HAS_BIAS: tl.constexpr,
        SAVE_PRE: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(A + rm[:, None] * K + kk[None, :], mask=(rm < n_rows)[:, None] & (kk < K)[None, :], other=0.0)
            w = tl.load(W + rn[None, :] * K + kk[:, None], mask=(rn < N)[None, :] & (kk < K)[:, None], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(Bias + rn, mask=rn < N, other=0.0).to(tl.float32)
        mask = (rm < n_rows)[:, None] & (rn < N)[None, :]
        offs = rm[:, None] * N + rn[None, :]
        if SAVE_PRE:
            tl.store(Pre + offs, acc.to(Pre.dtype.element_ty), mask=mask)
        out = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))  # exact (erf) GELU epilogue
        tl.store(Out + offs, out.to(Out.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class PixelShuffleParams:
    """The non-tensor options of the fused shuffle + LayerNorm."""

    inv: int  # 1 / scale_factor
    eps: float
    backend: str  # resolved: 'cuda' | 'cpp' | 'triton' | 'torch'


def pixel_shuffle_source_index(h: int, scale_factor: float = 0.5, device=None) -> torch.Tensor:
    """The index map as a tensor: (h*h*s^2, 1/s^2) source token of every (output row, slot).

    ``x[:, idx].flatten(2)`` equals ``pixel_shuffle_reference(x, scale_factor)``; the kernels
    compute the same map on the fly.
    """
    inv = _inv_of(scale_factor)
    w_out = h // inv
    r = torch.arange(w_out * w_out, device=device)[:, None]
    s = torch.arange(inv * inv, device=device)[None, :]
    return (inv * (r // w_out) + s // inv) * h + inv * (r % w_out) + s % inv


# --------------------------------------------------------------------------------------
# Validation and backend choice
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


def _choose_backend(x: torch.Tensor, backend: str | None) -> str:
    backend = backend or os.environ.get("LONGVITA_BACKEND", "auto")
    if backend not in _BACKENDS:
        backend = "auto" if backend == "flash_attn" else backend  # an attention-only choice
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    ext = native()
    if backend == "cuda":
        if x.device.type != "cuda" or not native_has_cuda():
            raise RuntimeError("backend='cuda' needs CUDA tensors and longvita._C built with CUDA")
        if x.dtype == torch.float64:
            raise ValueError("backend='cuda' supports float32/float16/bfloat16, got float64")
        return backend
    if backend == "cpp":
        if ext is None or x.device.type != "cpu":
            raise RuntimeError("backend='cpp' needs CPU tensors and the longvita._C extension")
        if x.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"backend='cpp' supports float32/float64, got {x.dtype}")
        return backend
    if backend == "auto":
        if x.device.type == "cuda" and native_has_cuda() and x.dtype != torch.float64:
            return "cuda"
        if triton_runs_on(x.device) and x.dtype != torch.float64:
            return "triton"
        if x.device.type == "cpu" and ext is not None and x.dtype in (torch.float32, torch.float64):
            return "cpp"
        return "torch"
    return resolve_backend(x.device, backend)  # 'triton' (checked) or 'torch'


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _triton_blocks(c: int, inv: int) -> tuple[int, int]:
    return triton.next_power_of_2(inv * inv), triton.next_power_of_2(c)


def _bwd_programs(x: torch.Tensor, n_rows: int) -> int:
    if x.device.type == "cuda":
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        return max(1, min(n_rows, 4 * sms))
    return max(1, min(n_rows, 4))  # interpreter: few programs, few partial rows


def pixel_shuffle_ln_fwd(x, weight, bias, p: PixelShuffleParams):
    """Fused shuffle + LayerNorm forward. Returns ``(y, mean, rstd)``.

    x (tiles, h*h, C) contiguous -> y (tiles, h*h/inv^2, inv^2*C) in x's dtype;
    mean, rstd (tiles*h*h/inv^2,) row statistics (fp32, or float64 for 'cpp' float64).
    """
    tiles, n_tok, c = x.shape
    h = math.isqrt(n_tok)
    n_out = n_tok // (p.inv * p.inv)
    n = p.inv * p.inv * c
    if p.backend in ("cuda", "cpp"):
        y, mean, rstd = native().pixel_shuffle_ln_fwd(x, weight, bias, p.inv, p.eps)
        return y, mean, rstd
    assert p.backend == "triton" and x.is_contiguous() and weight.is_contiguous()
    y = torch.empty(tiles, n_out, n, dtype=x.dtype, device=x.device)
    mean = torch.empty(tiles * n_out, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if y.numel() == 0:
        return y, mean, rstd
    block_s, block_c = _triton_blocks(c, p.inv)
    _ps_ln_fwd_kernel[(tiles * n_out,)](
        x, weight, bias if bias is not None else weight, y, mean, rstd,
        n_tok, h, h // p.inv, n_out, c, p.eps,
        INV=p.inv, HAS_BIAS=bias is not None, BLOCK_S=block_s, BLOCK_C=block_c,
        num_warps=4 if n <= 4096 else 8,
    )
    return y, mean, rstd


def pixel_shuffle_ln_bwd(dy, x, weight, mean, rstd, has_bias: bool, p: PixelShuffleParams):
    """Fused backward: ``(dx, dweight, dbias or None)`` from dy (tiles, h*h/inv^2, inv^2*C)."""
    tiles, n_tok, c = x.shape
    h = math.isqrt(n_tok)
    n_out = n_tok // (p.inv * p.inv)
    n = p.inv * p.inv * c
    dy = dy.contiguous()
    if p.backend in ("cuda", "cpp"):
        dx, dw, db = native().pixel_shuffle_ln_bwd(dy, x, weight, mean, rstd, p.inv, has_bias)
        return dx, dw, (db if has_bias else None)
    n_rows = tiles * n_out
    dx = torch.empty_like(x)
    if n_rows == 0:
        zero = torch.zeros_like(weight)
        return dx, zero, (zero.clone() if has_bias else None)
    programs = _bwd_programs(x, n_rows)
    dw_part = torch.empty(programs, n, dtype=torch.float32, device=x.device)
    db_part = torch.empty_like(dw_part) if has_bias else dw_part
    block_s, block_c = _triton_blocks(c, p.inv)
    _ps_ln_bwd_kernel[(programs,)](
        dy, x, weight, mean, rstd, dx, dw_part, db_part,
        n_rows, n_tok, h, h // p.inv, n_out, c,
        INV=p.inv, HAS_BIAS=has_bias, BLOCK_S=block_s, BLOCK_C=block_c,
        num_warps=4 if n <= 4096 else 8,
    )
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0).to(weight.dtype) if has_bias else None
    return dx, dw, db


# The launchers as torch custom ops (with fake implementations), so torch.compile traces
# through the fused piece instead of breaking the graph at it.


@torch.library.custom_op("longvita::pixel_shuffle_ln_fwd", mutates_args=())
def _ps_ln_fwd_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, inv: int, eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return pixel_shuffle_ln_fwd(x, weight, bias, PixelShuffleParams(inv, eps, backend))


@_ps_ln_fwd_op.register_fake
def _(x, weight, bias, inv, eps, backend):
    tiles, n_tok, c = x.shape
    n_out = n_tok // (inv * inv)
    stat = x.dtype if backend == "cpp" else torch.float32
    y = x.new_empty(tiles, n_out, inv * inv * c)
    return y, x.new_empty(tiles * n_out, dtype=stat), x.new_empty(tiles * n_out, dtype=stat)


@torch.library.custom_op("longvita::pixel_shuffle_ln_bwd", mutates_args=())
def _ps_ln_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    has_bias: bool,
    inv: int,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = pixel_shuffle_ln_bwd(dy, x, weight, mean, rstd, has_bias, PixelShuffleParams(inv, eps, backend))
    return dx, dw, (db if db is not None else weight.new_empty(0))  # a custom op returns tensors only


@_ps_ln_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, has_bias, inv, eps, backend):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0] if has_bias else 0)


class _PixelShuffleLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, p: PixelShuffleParams):
        y, mean, rstd = _ps_ln_fwd_op(x, weight, bias, p.inv, p.eps, p.backend)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.p = p
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        p = ctx.p
        dx, dw, db = _ps_ln_bwd_op(dy.contiguous(), x, weight, mean, rstd, ctx.has_bias, p.inv, p.eps, p.backend)
        return dx, dw, (db if ctx.has_bias else None), None


def linear_gelu_fwd(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, save_pre: bool):
    """``gelu(a @ w.T + b)`` by the Triton GEMM with the GELU in its epilogue.

    a (..., K), w (N, K), b (N,) or None -> (out, pre or None), both (..., N) in a's dtype.
    """
    a2 = a.reshape(-1, a.shape[-1]).contiguous()
    w = w.contiguous()
    n_rows, k = a2.shape
    n = w.shape[0]
    out = torch.empty(n_rows, n, dtype=a.dtype, device=a.device)
    pre = torch.empty_like(out) if save_pre else None
    if n_rows and n:
        block_m, block_n, block_k = 64, 64, 32
        grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n, block_n))
        _linear_gelu_kernel[grid](
            a2, w, b if b is not None else w, pre if save_pre else out, out, n_rows, n, k,
            HAS_BIAS=b is not None, SAVE_PRE=save_pre,
            PRECISION="ieee" if a.dtype == torch.float32 else None,  # fp32: no TF32
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=3,
        )
    shape = (*a.shape[:-1], n)
    return out.view(shape), (pre.view(shape) if save_pre else None)


class _LinearGelu(torch.autograd.Function):
    """Forward: the Triton GEMM + GELU epilogue. Backward: torch (cuBLAS) from the saved pre-activation."""

    @staticmethod
    def forward(ctx, a, w, b):
        out, pre = linear_gelu_fwd(a, w, b, save_pre=any(ctx.needs_input_grad))
        ctx.save_for_backward(a, w, pre)
        ctx.has_bias = b is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        a, w, pre = ctx.saved_tensors
        h = pre.float()
        dgelu = 0.5 * (1.0 + torch.erf(h * 0.7071067811865476)) + h * torch.exp(-0.5 * h * h) * 0.3989422804014327
        dh = (dout.float() * dgelu).to(a.dtype)  # (..., N)
        dh2 = dh.reshape(-1, dh.shape[-1])
        da = dh @ w
        dw = dh2.t() @ a.reshape(-1, a.shape[-1])
        db = dh2.float().sum(0).to(w.dtype) if ctx.has_bias else None
        return da, dw, db


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
    Statistics in fp32. Differentiable in x, ln_weight and ln_bias.
    """
    inv = _inv_of(scale_factor)
    _check_shuffle_ln(x, ln_weight, ln_bias, inv)
    chosen = _choose_backend(x, backend)
    if chosen == "torch":
        y = ref.pixel_shuffle_reference(x, scale_factor)
        return F.layer_norm(y, (y.shape[-1],), ln_weight, ln_bias, eps)
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
    gemm: str = "cublas",
) -> torch.Tensor:
    """InternVL / Long-VITA projector: pixel shuffle -> LayerNorm -> Linear -> GELU -> Linear.

    x: (tiles, h*h, C); ln_weight, ln_bias: (4C,); w1: (M, 4C), b1: (M,); w2: (D, M),
    b2: (D,) (nn.Linear layout). Biases may be None. Returns (tiles, h*h/4, D) in x's
    dtype (shown for scale_factor=0.5). GELU is the exact (erf) one. Differentiable in
    every tensor argument. ``backend`` picks the fused shuffle+LayerNorm's backend.
    ``gemm='cublas'`` (default) runs the GEMMs as ``F.linear`` + ``F.gelu``;
    ``gemm='triton'`` runs the first one as a Triton GEMM with the GELU in its epilogue
    (its backward is torch's, from the saved pre-activation).
    """
    inv = _inv_of(scale_factor)
    _check_shuffle_ln(x, ln_weight, ln_bias, inv)
    _check_mlp(x, w1, b1, w2, b2, ln_weight.shape[0])
    if gemm not in ("cublas", "triton"):
        raise ValueError(f"gemm must be 'cublas' or 'triton', got {gemm!r}")
    if gemm == "triton" and not triton_runs_on(x.device):
        raise RuntimeError("gemm='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1")
    y = pixel_shuffle_layernorm(x, ln_weight, ln_bias, eps=eps, scale_factor=scale_factor, backend=backend)
    if gemm == "triton":
        hidden = _LinearGelu.apply(y, w1, b1.contiguous() if b1 is not None else None)
    else:
        hidden = F.gelu(F.linear(y, w1, b1))
    return F.linear(hidden, w2, b2)
