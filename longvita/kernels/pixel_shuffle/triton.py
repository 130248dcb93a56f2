"""Triton kernels and launchers of the fused pixel-shuffle + LayerNorm (``pixel_shuffle/api.py``).

Imported only when the Triton backend runs, so ``import longvita`` works without triton.
The index map and the forward/backward scheme are described in ``pixel_shuffle/api.py``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from longvita.kernels.pixel_shuffle.api import PixelShuffleParams

# Backward programs per streaming multiprocessor: each program loops over many rows and
# keeps one (inv^2, C) partial sum of dweight/dbias, so a few resident programs per SM
# hide memory latency while the partial-sum buffer (programs x inv^2*C fp32) stays small
# (the CUDA kernel's kPsBwdBlocksPerSm, csrc/pixel_shuffle_ln.h, for the same reason).
_BWD_PROGRAMS_PER_SM = 4
# The interpreter has no SMs: a few programs still exercise the strided row loop and the
# final sum over partial rows, at little cost in the numpy emulation.
_BWD_PROGRAMS_INTERPRET = 4


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


def _blocks(c: int, inv: int) -> tuple[int, int]:
    return triton.next_power_of_2(inv * inv), triton.next_power_of_2(c)


def _bwd_programs(x: torch.Tensor, n_rows: int) -> int:
    if x.device.type == "cuda":
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        return max(1, min(n_rows, _BWD_PROGRAMS_PER_SM * sms))
    return max(1, min(n_rows, _BWD_PROGRAMS_INTERPRET))


def triton_ln_fwd(x, weight, bias, p: PixelShuffleParams):
    """Fused shuffle + LayerNorm forward: ``(y, mean, rstd)`` (see ``pixel_shuffle_ln_fwd``)."""
    assert x.is_contiguous() and weight.is_contiguous() and (bias is None or bias.is_contiguous())
    tiles, n_tok, c = x.shape
    h = math.isqrt(n_tok)
    n_out = n_tok // (p.inv * p.inv)
    n = p.inv * p.inv * c
    y = torch.empty(tiles, n_out, n, dtype=x.dtype, device=x.device)
    mean = torch.empty(tiles * n_out, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if y.numel() == 0:
        return y, mean, rstd
    block_s, block_c = _blocks(c, p.inv)
    _ps_ln_fwd_kernel[(tiles * n_out,)](
        x, weight, bias if bias is not None else weight, y, mean, rstd,
        n_tok, h, h // p.inv, n_out, c, p.eps,
        INV=p.inv, HAS_BIAS=bias is not None, BLOCK_S=block_s, BLOCK_C=block_c,
        num_warps=4 if n <= 4096 else 8,
    )
    return y, mean, rstd


def triton_ln_bwd(dy, x, weight, mean, rstd, has_bias: bool, p: PixelShuffleParams):
    """Fused backward: ``(dx, dweight, dbias or None)`` (see ``pixel_shuffle_ln_bwd``)."""
    assert dy.is_contiguous() and x.is_contiguous() and weight.is_contiguous()
    tiles, n_tok, c = x.shape
    h = math.isqrt(n_tok)
    n_out = n_tok // (p.inv * p.inv)
    n = p.inv * p.inv * c
    n_rows = tiles * n_out
    dx = torch.empty_like(x)
    if n_rows == 0:
        zero = torch.zeros_like(weight)
        return dx, zero, (zero.clone() if has_bias else None)
    programs = _bwd_programs(x, n_rows)
    dw_part = torch.empty(programs, n, dtype=torch.float32, device=x.device)
    db_part = torch.empty_like(dw_part) if has_bias else dw_part
    block_s, block_c = _blocks(c, p.inv)
    _ps_ln_bwd_kernel[(programs,)](
        dy, x, weight, mean, rstd, dx, dw_part, db_part,
        n_rows, n_tok, h, h // p.inv, n_out, c,
        INV=p.inv, HAS_BIAS=has_bias, BLOCK_S=block_s, BLOCK_C=block_c,
        num_warps=4 if n <= 4096 else 8,
    )
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0).to(weight.dtype) if has_bias else None
    return dx, dw, db
