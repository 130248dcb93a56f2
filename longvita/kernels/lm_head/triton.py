"""Triton kernels and launchers of the gather-then-project LM head (``lm_head/api.py``).

Imported only when the Triton backend runs, so ``import longvita`` works without triton.
The schemes (recompute forward/backward, fused scalar-loss path) are described in
``lm_head/api.py``'s docstring.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from longvita.kernels._backend import triton_interpret

if TYPE_CHECKING:
    from longvita.kernels.lm_head.api import LCEParams

# Vocabulary columns one program of ``_ce_grad_inplace_kernel`` handles per step on GPU:
# a large block means few passes over a 152K-wide row (3 passes, each V / BLOCK_V steps),
# while 4096 fp32 values over 8 warps (256 threads) stay at 16 registers per thread.
# The interpreter gets a small block (speed of the numpy emulation).
_CE_BLOCK_V = 4096
_CE_BLOCK_V_INTERPRET = 256


@triton.jit
def _lce_fwd_kernel(
    H, W, Y, Loss, Lse,
    M, V, K,
    stride_hm, stride_hk, stride_wv, stride_wk,
    ignore_index,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    y = tl.load(Y + rows64, mask=row_ok, other=ignore_index)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s_i = tl.zeros((BLOCK_M,), tl.float32)
    target = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, V, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < V
        cols64 = cols.to(tl.int64)
        logits = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            ks64 = ks.to(tl.int64)
            h = tl.load(H + rows64[:, None] * stride_hm + ks64[None, :] * stride_hk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
            w = tl.load(W + cols64[None, :] * stride_wv + ks64[:, None] * stride_wk,
                        mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # (BK, BN)
            logits = tl.dot(h, w, logits, input_precision=PRECISION)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m_i = m_new
        target += tl.sum(tl.where(cols[None, :] == y[:, None], logits, 0.0), axis=1)
    lse = m_i + tl.log(s_i)
    valid = row_ok & (y != ignore_index)
    tl.store(Lse + rows64, lse, mask=row_ok)
    tl.store(Loss + rows64, tl.where(valid, lse - target, 0.0), mask=row_ok)

@triton.jit
def _lce_bwd_kernel(
    H, W, Y, Lse, GLoss, GLse, DH, DW,
    M, V, K,
    stride_hm, stride_hk, stride_wv, stride_wk,
    stride_dhm, stride_dhk, stride_dwv, stride_dwk,
    ignore_index,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, NEED_H: tl.constexpr, NEED_W: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < V
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    y = tl.load(Y + rows64, mask=row_ok, other=ignore_index)
    valid = row_ok & (y != ignore_index)
    lse = tl.load(Lse + rows64, mask=row_ok, other=0.0)
    g_loss = tl.load(GLoss + rows64, mask=row_ok, other=0.0)
    g_lse = tl.load(GLse + rows64, mask=row_ok, other=0.0)

    logits = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        ks64 = ks.to(tl.int64)
        h = tl.load(H + rows64[:, None] * stride_hm + ks64[None, :] * stride_hk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + cols64[None, :] * stride_wv + ks64[:, None] * stride_wk,
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        logits = tl.dot(h, w, logits, input_precision=PRECISION)
    # softmax * (g_loss + g_lse) - onehot * g_loss; zero outside valid rows/cols.
    p = tl.exp(logits - lse[:, None])
    d = p * (g_loss + g_lse)[:, None] - tl.where(cols[None, :] == y[:, None], g_loss[:, None], 0.0)
    d = tl.where(valid[:, None] & col_ok[None, :], d, 0.0)
    d = d.to(H.dtype.element_ty)

    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        ks64 = ks.to(tl.int64)
        if NEED_H:
            w = tl.load(W + cols64[:, None] * stride_wv + ks64[None, :] * stride_wk,
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # (BN, BK)
            dh = tl.dot(d, w, input_precision=PRECISION)  # (BM, BK)
            tl.atomic_add(DH + rows64[:, None] * stride_dhm + ks64[None, :] * stride_dhk, dh,
                          mask=row_ok[:, None] & k_ok[None, :])
        if NEED_W:
            h = tl.load(H + rows64[:, None] * stride_hm + ks64[None, :] * stride_hk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
            dw = tl.dot(tl.trans(d), h, input_precision=PRECISION)  # (BN, BK)
            tl.atomic_add(DW + cols64[:, None] * stride_dwv + ks64[None, :] * stride_dwk, dw,
                          mask=col_ok[:, None] & k_ok[None, :])


@triton.jit
def _ce_grad_inplace_kernel(
    Logits, Y, Loss, V, stride_row, ignore_index,
    BLOCK_V: tl.constexpr,
):
    """One row of logits: loss = lse - logit[y]; logits <- softmax - onehot (0 if ignored)."""
    row = tl.program_id(0).to(tl.int64)
    ptr = Logits + row * stride_row
    y = tl.load(Y + row)
    valid = y != ignore_index
    offs = tl.arange(0, BLOCK_V)
    m_vec = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_vec = tl.maximum(m_vec, x)
    m = tl.max(m_vec, axis=0)
    s_vec = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        s_vec += tl.exp(x - m)
    lse = m + tl.log(tl.sum(s_vec, axis=0))
    target = tl.load(ptr + tl.where(valid, y, 0)).to(tl.float32)
    tl.store(Loss + row, tl.where(valid, lse - target, 0.0))
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        col_ok = cols < V
        x = tl.load(ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        d = tl.exp(x - lse) - tl.where(cols == y, 1.0, 0.0)
        d = tl.where(valid, d, 0.0)
        tl.store(ptr + cols, d.to(Logits.dtype.element_ty), mask=col_ok)


def triton_fused_sum(hidden, weight, labels, params: LCEParams, need_h, need_w):
    """Sum of per-row losses and its gradients, chunk by chunk of rows: cuBLAS logits in
    the input dtype (at most ``fused_chunk_bytes`` of them), the Triton kernel turns
    them in place into softmax - onehot, then d(hidden) = d @ W and d(weight) += d.T @ h
    (fp32 accumulator)."""
    _check_triton_inputs(hidden, weight, labels)
    m, k = hidden.shape
    vocab = weight.shape[0]
    fp32 = hidden.dtype == torch.float32
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    dh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
    dw32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    if m == 0:
        return loss, dh, (dw32 if fp32 or dw32 is None else dw32.to(weight.dtype))
    step = max(1, params.fused_chunk_bytes // (vocab * hidden.element_size()))
    block_v = _CE_BLOCK_V_INTERPRET if triton_interpret() else _CE_BLOCK_V
    for s in range(0, m, step):
        e = min(s + step, m)
        h = hidden[s:e]
        logits = h @ weight.t()  # (chunk, V), input dtype, fp32 accumulate
        loss_rows = torch.empty(e - s, dtype=torch.float32, device=hidden.device)
        _ce_grad_inplace_kernel[(e - s,)](
            logits, labels[s:e], loss_rows, vocab, logits.stride(0), params.ignore_index,
            BLOCK_V=block_v, num_warps=1 if triton_interpret() else 8,
        )
        loss += loss_rows.sum()
        if need_h:
            torch.mm(logits, weight, out=dh[s:e])
        if need_w:
            if fp32:
                dw32.addmm_(logits.t(), h)
            else:
                dw32.add_(logits.t() @ h)
        del logits
    dw = None
    if need_w:
        dw = dw32 if fp32 else dw32.to(weight.dtype)
    return loss, dh, dw


def _triton_config(dtype: torch.dtype) -> dict:
    """Tile sizes. The interpreter gets small tiles (speed of the numpy emulation)."""
    precision = "ieee" if dtype == torch.float32 else "tf32"
    if triton_interpret():
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, PRECISION=precision, num_warps=4, num_stages=1)
    big = dtype != torch.float32
    return dict(
        BLOCK_M=128 if big else 64, BLOCK_N=128 if big else 64, BLOCK_K=64 if big else 32,
        PRECISION=precision, num_warps=8, num_stages=3 if big else 2,
    )


def _check_triton_inputs(hidden, weight, labels):
    assert hidden.dtype in (torch.float16, torch.bfloat16, torch.float32), hidden.dtype
    assert weight.dtype == hidden.dtype and weight.device == hidden.device
    assert labels.dtype == torch.int64 and labels.shape == (hidden.shape[0],)
    assert hidden.shape[1] == weight.shape[1]


def triton_forward(hidden, weight, labels, params: LCEParams):
    _check_triton_inputs(hidden, weight, labels)
    m, k = hidden.shape
    vocab = weight.shape[0]
    loss = torch.empty(m, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(m, dtype=torch.float32, device=hidden.device)
    cfg = _triton_config(hidden.dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]),)
    _lce_fwd_kernel[grid](
        hidden, weight, labels, loss, lse,
        m, vocab, k,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        params.ignore_index,
        **cfg,
    )
    return loss, lse


def triton_backward(hidden, weight, labels, lse, g_loss, g_lse, params: LCEParams, need_h, need_w):
    _check_triton_inputs(hidden, weight, labels)
    m, k = hidden.shape
    vocab = weight.shape[0]
    cfg = _triton_config(hidden.dtype)
    fp32 = hidden.dtype == torch.float32
    dh = torch.empty_like(hidden) if need_h else None
    dw32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    g_loss, g_lse, lse = g_loss.contiguous(), g_lse.contiguous(), lse.contiguous()
    step = m
    if need_h:  # bound the fp32 d(hidden) accumulator
        step = max(cfg["BLOCK_M"], params.bwd_chunk_bytes // (4 * k) // cfg["BLOCK_M"] * cfg["BLOCK_M"])
    dummy = torch.empty(1, dtype=torch.float32, device=hidden.device)
    for s in range(0, m, step):
        e = min(s + step, m)
        if need_h:
            dh_acc = torch.zeros(e - s, k, dtype=torch.float32, device=hidden.device)
        else:
            dh_acc = dummy
        dw_acc = dw32 if need_w else dummy
        grid = (triton.cdiv(e - s, cfg["BLOCK_M"]), triton.cdiv(vocab, cfg["BLOCK_N"]))
        h = hidden[s:e]
        _lce_bwd_kernel[grid](
            h, weight, labels[s:e], lse[s:e], g_loss[s:e], g_lse[s:e], dh_acc, dw_acc,
            e - s, vocab, k,
            h.stride(0), h.stride(1), weight.stride(0), weight.stride(1),
            dh_acc.stride(0) if need_h else 0, dh_acc.stride(1) if need_h else 0,
            dw_acc.stride(0) if need_w else 0, dw_acc.stride(1) if need_w else 0,
            params.ignore_index,
            NEED_H=need_h, NEED_W=need_w,
            **cfg,
        )
        if need_h:
            dh[s:e] = dh_acc if fp32 else dh_acc.to(hidden.dtype)
    dw = None
    if need_w:
        dw = dw32 if fp32 else dw32.to(weight.dtype)
    return dh, dw
