"""Merge of partial attention results through their log-sum-exp (ring attention's merge).

Two attention results over disjoint key sets, ``(out_a, lse_a)`` and ``(out_b, lse_b)``,
combine into the attention over the union of the keys:

    naive:  lse = log(exp(lse_a) + exp(lse_b))
            out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b
    stable: lse = max + log(1 + exp(min - max))           (max/min of lse_a, lse_b)
            out = out_a + sigmoid(lse_b - lse_a) * (out_b - out_a)

A row with no visible key has lse = -inf and out = 0; two such rows merge to -inf and 0,
never NaN. ``lse_merge_`` updates an fp32 accumulator in place: the Triton kernel reads
each operand once and writes the accumulator once; the torch path is the fallback (and
the reference) for CPU tensors.

Shapes: out_acc (T, H, D) fp32, lse_acc (H, T) fp32, out_b (T, H, D) any float dtype,
lse_b (H, T) fp32 (float64 accumulators and lse for float64 inputs: torch path).
"""

from __future__ import annotations

import math

import torch

from longvita.kernels._backend import resolve, triton_available

# Elements of one (BLOCK_M, BLOCK_D) tile. With the default 4 warps (128 threads) each
# thread holds 64 values of each of the two operand tiles: they stay in registers.
_TILE_ELEMS = 8192

if triton_available():
    import triton
    import triton.language as tl

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


def _check(out_acc, lse_acc, out_b, lse_b):
    acc = out_acc.dtype
    if acc not in (torch.float32, torch.float64) or lse_acc.dtype != acc or lse_b.dtype not in (torch.float32, acc):
        raise ValueError(
            "out_acc, lse_acc and lse_b must be float32 (float64 accumulators for float64 inputs), "
            f"got {out_acc.dtype}, {lse_acc.dtype}, {lse_b.dtype}"
        )
    if out_acc.dim() != 3 or out_b.shape != out_acc.shape:
        raise ValueError(f"out_acc and out_b must share one (T, H, D) shape, got {tuple(out_acc.shape)} and {tuple(out_b.shape)}")
    t, h, _ = out_acc.shape
    if lse_acc.shape != (h, t) or lse_b.shape != (h, t):
        raise ValueError(f"lse_acc and lse_b must be (H, T) = {(h, t)}, got {tuple(lse_acc.shape)} and {tuple(lse_b.shape)}")
    if out_acc.stride(-1) != 1 or out_b.stride(-1) != 1 or lse_acc.stride(-1) != 1 or lse_b.stride(-1) != 1:
        raise ValueError("out_acc, out_b, lse_acc and lse_b must be contiguous in their last dimension")


def lse_merge_reference_(out_acc, lse_acc, out_b, lse_b):
    """Torch path of ``lse_merge_`` (same stable formula, in place)."""
    hi = torch.maximum(lse_acc, lse_b)
    lo = torch.minimum(lse_acc, lse_b)
    empty = hi == -math.inf
    # shift by 0 instead of -inf in empty rows, so no -inf - -inf is ever formed
    w_b = torch.sigmoid(lse_b - torch.where(empty, 0.0, lse_acc)).t().unsqueeze(-1)  # (T, H, 1)
    out_acc.add_(w_b * (out_b.to(out_acc.dtype) - out_acc))
    lse_acc.copy_(hi + torch.log1p(torch.exp(lo - torch.where(empty, 0.0, hi))))
    return out_acc, lse_acc


def lse_merge_(out_acc, lse_acc, out_b, lse_b, backend: str | None = None):
    """Merge ``(out_b, lse_b)`` into the fp32 accumulators ``(out_acc, lse_acc)`` in place.

    Args:
        out_acc: (T, H, D) float32, updated in place. lse_acc: (H, T) float32, in place.
        out_b: (T, H, D) in any float dtype. lse_b: (H, T) float32.
        backend: None/'auto', 'torch' or 'triton' (see ``longvita.kernels._backend``);
            the other names resolve there too ('flash_attn' means 'auto').

    Returns ``(out_acc, lse_acc)``.
    """
    _check(out_acc, lse_acc, out_b, lse_b)
    # The inputs' dtype decides (float64 accumulators belong to float64 inputs, which
    # take the torch path; bf16 blocks do not run in Triton's interpreter).
    dtype = torch.float64 if out_acc.dtype == torch.float64 else out_b.dtype
    if resolve("lse_merge", out_acc.device, dtype, backend) != "triton" or out_acc.numel() == 0:
        return lse_merge_reference_(out_acc, lse_acc, out_b, lse_b)
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
