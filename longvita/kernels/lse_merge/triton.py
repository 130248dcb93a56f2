"""Triton kernel and launcher of the LSE merge (``lse_merge/api.py``, which states the formula).

Imported only when the Triton backend runs, so ``import longvita`` works without triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements of one (BLOCK_M, BLOCK_D) tile. With the default 4 warps (128 threads) each
# thread holds 64 values of each of the two operand tiles: they stay in registers.
_TILE_ELEMS = 8192


@triton.jit
def _lse_merge_kernel(
    out_ptr, lse_ptr, blk_out_ptr, blk_lse_ptr,
    n_rows, head_dim,
    stride_ot, stride_oh, stride_bt, stride_bh, stride_lh, stride_blh,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: T*H*D can pass 2^31
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    a = tl.load(lse_ptr + head * stride_lh + rows, mask=row_ok, other=-float("inf"))
    b = tl.load(blk_lse_ptr + head * stride_blh + rows, mask=row_ok, other=-float("inf"))
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    empty = hi == -float("inf")  # neither side sees a key
    # shift by 0 instead of -inf in empty rows, so no -inf - -inf is ever formed
    lse = hi + tl.log(1.0 + tl.exp(lo - tl.where(empty, 0.0, hi)))
    diff = b - tl.where(empty, 0.0, a)
    w_b = 1.0 / (1.0 + tl.exp(-diff))  # sigmoid(lse_b - lse_a): 1 when a = -inf, 0 when b = -inf
    mask = row_ok[:, None] & (cols[None, :] < head_dim)
    o_ptrs = out_ptr + rows[:, None] * stride_ot + head * stride_oh + cols[None, :]
    b_ptrs = blk_out_ptr + rows[:, None] * stride_bt + head * stride_bh + cols[None, :]
    o = tl.load(o_ptrs, mask=mask, other=0.0)
    ob = tl.load(b_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, o + w_b[:, None] * (ob - o), mask=mask)
    tl.store(lse_ptr + head * stride_lh + rows, lse, mask=row_ok)


def triton_lse_merge_(out_acc, lse_acc, out_b, lse_b):
    """``lse_merge_`` on the Triton kernel: fp32 accumulators, inputs checked by the caller."""
    assert out_acc.dtype == lse_acc.dtype == lse_b.dtype == torch.float32 and out_acc.numel()
    t, h, d = out_acc.shape
    block_d = triton.next_power_of_2(d)
    block_m = max(1, min(64, _TILE_ELEMS // block_d))
    grid = (triton.cdiv(t, block_m), h)
    _lse_merge_kernel[grid](
        out_acc, lse_acc, out_b, lse_b, t, d,
        out_acc.stride(0), out_acc.stride(1), out_b.stride(0), out_b.stride(1),
        lse_acc.stride(0), lse_b.stride(0),
        BLOCK_M=block_m, BLOCK_D=block_d,
    )
    return out_acc, lse_acc
