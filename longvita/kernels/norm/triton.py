"""Triton kernels and launchers of the fused RMSNorm (+ residual add) (``norm/api.py``).

Imported only when the Triton backend runs. Rows are the flattened leading dimensions of
x (rows, H); every row is one contiguous run of H elements.

- ``_rms_norm_fwd_kernel``: ``ROWS`` whole rows per program (one (ROWS, BLOCK_H) tile):
  reads x (and the residual) once, writes y (and ``h = x + residual``, rounded to its
  dtype as torch's add rounds it) once, and one fp32 ``rstd`` per row. The statistics are
  fp32; the normalised row is rounded to the input's dtype before the weight multiplies it
  (Qwen2's order), so in a model's dtype the result equals eager's up to the sum's order.
- ``_rms_norm_bwd_kernel``: a persistent grid (``_BWD_PROGRAMS_PER_SM`` programs per SM)
  walks the rows: ``g = dy * w``, ``dx = rstd * (g - xhat * mean(g * xhat))`` (+ the
  gradient of h when the residual sum is an output), and keeps one fp32 partial sum of
  ``dweight`` per program; one ``sum(0)`` finishes it.
Memory: the forward allocates y, h (with a residual) and rstd (4 bytes per row); the
backward dx and a (programs, H) fp32 partial-sum buffer (528 x 5120 x 4 = 11 MB on an H100
at Qwen2.5-14B's width).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Backward programs per SM: each loops over rows keeping a (BLOCK_H,) fp32 dweight partial
# sum, so a few resident programs per SM hide memory latency while the partial-sum buffer
# stays small (as the pixel shuffle's backward).
_BWD_PROGRAMS_PER_SM = 4
_BWD_PROGRAMS_INTERPRET = 3  # the interpreter: a few programs still exercise the row loop
# Elements of one forward program's tile: 4096 fp32 values are 16 per thread at 8 warps.
_FWD_TILE_ELEMS = 4096


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, Hout, Rstd,
    n_rows, n_cols, stride_x, stride_r, stride_y, stride_h, eps,
    HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        hv = (x.to(tl.float32) + r.to(tl.float32)).to(Hout.dtype.element_ty)  # rounded as torch's add
        tl.store(Hout + rows[:, None] * stride_h + cols[None, :], hv, mask=mask)
        xf = hv.to(tl.float32)
        norm_ty = Hout.dtype.element_ty
    else:
        xf = x.to(tl.float32)
        norm_ty = X.dtype.element_ty
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)
    normed = (xf * rstd[:, None]).to(norm_ty).to(tl.float32)  # Qwen2 rounds before the weight
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], (normed * w[None, :]).to(Y.dtype.element_ty), mask=mask)
    tl.store(Rstd + rows, rstd, mask=rows < n_rows)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, Rstd, DH, DX, DWp,
    n_rows, n_cols, stride_dy, stride_x, stride_dh, stride_dx,
    HAS_DH: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < n_cols
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    pid64 = pid.to(tl.int64)
    for it in range(0, tl.cdiv(n_rows - pid, n_prog)):
        row64 = pid64 + it * n_prog  # rows pid, pid + programs, ... (int64 offsets)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=cmask, other=0.0).to(tl.float32)
        x = tl.load(X + row64 * stride_x + cols, mask=cmask, other=0.0)
        rstd = tl.load(Rstd + row64)
        xhat = x.to(tl.float32) * rstd
        dw_acc += dy * xhat.to(X.dtype.element_ty).to(tl.float32)  # the rounded row the weight saw
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
        if HAS_DH:
            dx += tl.load(DH + row64 * stride_dh + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=cmask)
    tl.store(DWp + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=cmask)


def _fwd_launch(n_cols: int, n_rows: int) -> tuple[int, int, int]:
    block_h = triton.next_power_of_2(n_cols)
    rows = max(1, min(16, _FWD_TILE_ELEMS // block_h, triton.next_power_of_2(max(n_rows, 1))))
    warps = min(16, max(4, rows * block_h // 1024))
    return block_h, rows, warps


def rms_norm_fwd_triton(x2: torch.Tensor, weight: torch.Tensor, residual2: torch.Tensor | None, eps: float,
                        out_dtype: torch.dtype, h_dtype: torch.dtype):
    """x2, residual2: (rows, H), last dim contiguous. Returns (y, h or None, rstd)."""
    assert x2.dim() == 2 and x2.stride(-1) == 1 and weight.is_contiguous()
    n_rows, n_cols = x2.shape
    y = torch.empty(n_rows, n_cols, dtype=out_dtype, device=x2.device)
    h = torch.empty(n_rows, n_cols, dtype=h_dtype, device=x2.device) if residual2 is not None else None
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    if n_rows == 0:
        return y, h, rstd
    block_h, rows, warps = _fwd_launch(n_cols, n_rows)
    r = residual2 if residual2 is not None else x2
    hh = h if h is not None else y
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, rows),)](
        x2, r, weight, y, hh, rstd, n_rows, n_cols, x2.stride(0), r.stride(0), y.stride(0), hh.stride(0), eps,
        HAS_RES=residual2 is not None, ROWS=rows, BLOCK_H=block_h, num_warps=warps,
    )
    return y, h, rstd


def _bwd_programs(t: torch.Tensor, n_rows: int) -> int:
    if t.device.type == "cuda":
        sms = torch.cuda.get_device_properties(t.device).multi_processor_count
        return max(1, min(n_rows, _BWD_PROGRAMS_PER_SM * sms))
    return max(1, min(n_rows, _BWD_PROGRAMS_INTERPRET))


def rms_norm_bwd_triton(dy2: torch.Tensor, xn2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                        dh2: torch.Tensor | None):
    """dy2 (rows, H) the gradient of y; xn2 the normalised input (x, or h); dh2 the gradient of
    h or None. Returns (dx in xn2's dtype, dweight in weight's dtype)."""
    n_rows, n_cols = xn2.shape
    dx = torch.empty(n_rows, n_cols, dtype=xn2.dtype, device=xn2.device)
    if n_rows == 0:
        return dx, torch.zeros_like(weight)
    programs = _bwd_programs(xn2, n_rows)
    dw_part = torch.empty(programs, n_cols, dtype=torch.float32, device=xn2.device)
    block_h = triton.next_power_of_2(n_cols)
    dh = dh2 if dh2 is not None else dy2
    _rms_norm_bwd_kernel[(programs,)](
        dy2, xn2, weight, rstd, dh, dx, dw_part,
        n_rows, n_cols, dy2.stride(0), xn2.stride(0), dh.stride(0), dx.stride(0),
        HAS_DH=dh2 is not None, BLOCK_H=block_h, num_warps=min(16, max(4, block_h // 1024)),
    )
    return dx, dw_part.sum(0).to(weight.dtype)
