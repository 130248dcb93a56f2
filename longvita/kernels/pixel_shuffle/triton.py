"""Triton kernels and launchers of the fused pixel-shuffle + LayerNorm (``pixel_shuffle/api.py``).

Imported only when the Triton backend runs, so ``import longvita`` works without triton.
The index map and the forward/backward scheme are described in ``pixel_shuffle/api.py``.

Two forward kernels (``LONGVITA_SHUFFLE_LN_FWD`` or ``triton_ln_fwd(kernel=...)`` picks):
- ``row`` (the default, measured on an H100 on 2026-11-25 at 57-67 % of copy bandwidth):
  ``_ps_ln_fwd_kernel``, one program per output row; two dependent reductions (the mean,
  then the centred variance) and the LayerNorm weight/bias loaded again for every row.
- ``rows``: ``_ps_ln_fwd_rows_kernel``, one program per ``ROWS`` whole output rows, as one
  (ROWS, inv^2, C) tile whose channel runs are contiguous (16-byte vector loads and stores
  at C a multiple of 8 in 16-bit, the compile report shows them), the weight and bias
  loaded once per program, and the statistics in one pass: the sum and the sum of squares
  of ``x - K`` reduced side by side, with ``K`` the row's first element (the shifted-data
  variance, exact in fp32 while K is within a few standard deviations of the mean, which
  a row's own element is for LayerNorm inputs). Meant to reach the copy bandwidth; the
  default until a chip measures it faster (``benchmarks/bench_pixel_shuffle.py``).
Memory: y (rows, inv^2*C) in x's dtype and two fp32 statistics per row, nothing else.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from longvita.kernels._backend import triton_interpret

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
def _ps_ln_fwd_rows_kernel(
    X,  # (tiles, n_tok, C) contiguous
    W,  # (INV*INV*C,)
    B,  # (INV*INV*C,) or dummy
    Y,  # (rows, INV*INV*C)
    Mean,  # (rows,) fp32
    Rstd,  # (rows,) fp32
    n_rows,
    n_tok,
    h,
    w_out,
    n_out,
    C,
    eps,
    INV: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """ROWS whole output rows per program: (ROWS, BLOCK_S, BLOCK_C) tile, one-pass statistics."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)  # (ROWS,)
    row_ok = rows < n_rows
    tile = rows // n_out
    r = rows % n_out
    i = r // w_out
    j = r % w_out
    s = tl.arange(0, BLOCK_S)
    c = tl.arange(0, BLOCK_C)
    # source token of (row, slot): (ROWS, BLOCK_S)
    tok = (tile * n_tok + INV * j)[:, None] + ((INV * i)[:, None] + (s // INV)[None, :]) * h + (s % INV)[None, :]
    slot_ok = (s < INV * INV)[:, None] & (c < C)[None, :]  # (BLOCK_S, BLOCK_C)
    mask = row_ok[:, None, None] & slot_ok[None, :, :]
    x = tl.load(X + tok[:, :, None] * C + c[None, None, :], mask=mask, other=0.0).to(tl.float32)
    n = INV * INV * C
    # shifted one-pass statistics: K = the row's first element (slot 0, channel 0)
    shift = tl.sum(tl.sum(tl.where((s[:, None] == 0) & (c[None, :] == 0), x, 0.0), axis=2), axis=1)  # (ROWS,)
    xs = tl.where(mask, x - shift[:, None, None], 0.0)
    s1 = tl.sum(tl.sum(xs, axis=2), axis=1)
    s2 = tl.sum(tl.sum(xs * xs, axis=2), axis=1)
    mean_s = s1 / n
    var = tl.maximum(s2 / n - mean_s * mean_s, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    mean = shift + mean_s
    col = s[:, None] * C + c[None, :]  # (BLOCK_S, BLOCK_C)
    w = tl.load(W + col, mask=slot_ok, other=0.0).to(tl.float32)
    y = (xs - mean_s[:, None, None]) * rstd[:, None, None] * w[None, :, :]
    if HAS_BIAS:
        y += tl.load(B + col, mask=slot_ok, other=0.0).to(tl.float32)[None, :, :]
    tl.store(Y + rows[:, None, None] * n + col[None, :, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


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


FWD_KERNELS = ("row", "rows")
# Elements of one program's (ROWS, inv^2, C) tile in the 'rows' kernel: 8192 values are 32
# per thread at 8 warps, and at InternViT-300M's C = 1024 (inv 2) two whole rows.
_ROWS_TILE_ELEMS = 8192


def _fwd_kernel_name(kernel: str | None) -> str:
    name = kernel or os.environ.get("LONGVITA_SHUFFLE_LN_FWD") or "row"
    if name not in FWD_KERNELS:
        what = "kernel" if kernel else "LONGVITA_SHUFFLE_LN_FWD"
        raise ValueError(f"{what} must be one of {FWD_KERNELS}, got {name!r}")
    return name


def triton_ln_fwd(x, weight, bias, p: PixelShuffleParams, kernel: str | None = None):
    """Fused shuffle + LayerNorm forward: ``(y, mean, rstd)`` (see ``pixel_shuffle_ln_fwd``).
    ``kernel``: 'row' or 'rows' (module docstring); None reads LONGVITA_SHUFFLE_LN_FWD."""
    assert x.is_contiguous() and weight.is_contiguous() and (bias is None or bias.is_contiguous())
    name = _fwd_kernel_name(kernel)
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
    if name == "rows":
        n_rows = tiles * n_out
        rows = max(1, min(16, _ROWS_TILE_ELEMS // (block_s * block_c)))
        rows = min(rows, triton.next_power_of_2(n_rows))
        if triton_interpret():
            rows = min(rows, 2)  # the interpreter: still more than one row per program
        _ps_ln_fwd_rows_kernel[(triton.cdiv(n_rows, rows),)](
            x, weight, bias if bias is not None else weight, y, mean, rstd,
            n_rows, n_tok, h, h // p.inv, n_out, c, p.eps,
            INV=p.inv, HAS_BIAS=bias is not None, ROWS=rows, BLOCK_S=block_s, BLOCK_C=block_c,
            num_warps=8 if rows * block_s * block_c >= 4096 else 4,
        )
        return y, mean, rstd
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
