"""Triton kernels for varlen packed flash attention (FlashAttention-2 style).

Layout: THD. q (total_q, Hq, D), k/v (total_k, Hkv, D), int32 cu_seqlens (B+1,).
GQA maps q head h to kv head h // (Hq // Hkv) inside the kernels; K/V are never repeated.

Masks (flash-attn semantics, per document with ``off = len_k - len_q``): query i sees key j
when ``j <= i + off + right`` (if ``right >= 0``) and ``j >= i + off - left`` (if
``left >= 0``). Causal is ``right = 0`` (bottom-right aligned), whatever right was
given. The launcher folds causal into the window, so the kernels only know
``HAS_LEFT`` / ``HAS_RIGHT``.

Kernels:
- ``_fwd_kernel``: grid (q blocks of the longest document, batch, Hq), early exit for
  blocks past a document's end, last q block first (it has the most causal work). The K loop runs in three phases: masked blocks at the
  left window edge, unmasked full blocks, masked blocks at the diagonal / right edge /
  end of the document. Fully masked blocks are never visited. Online softmax in base 2
  (``qk_scale = softmax_scale * log2(e)``); the stored lse is natural-log.
- ``_bwd_preprocess_kernel``: delta = rowsum(dO * O) - dlse (0 for rows with lse = -inf).
- ``_bwd_dkdv_kernel``: grid (kv blocks, batch, Hkv); loops over the group's q heads and
  their q blocks, so dK/dV of a kv head accumulate in registers, without atomics.
- ``_bwd_dq_kernel``: grid (q blocks, batch, Hq); loops over kv blocks.
Both backward kernels are deterministic.

Rows past ``cu_seqlens[-1]`` belong to no program: the launchers allocate out/dq/dk/dv
as zeros and lse as -inf, so those rows read 0 / -inf. Row offsets are int64 (at 1M
tokens x 40 heads x 128 a token offset passes 2^31).

Block sizes are fixed per head dim: measured on an H100 for bf16/fp16 at head dims 64 and
128 (``benchmarks/tune_attention.py``), chosen by reasoning otherwise;
``LONGVITA_AUTOTUNE=1`` autotunes them instead. In Triton's interpreter blocks are 16.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from longvita.kernels._backend import triton_interpret

# The kernels' softmax runs in base 2 (exp2 / log2 are the fast instructions):
# exp(x) = exp2(x * LOG2E) and ln(x) = log2(x) * LN2. Globals a @triton.jit function
# reads must be constexpr; the launchers read ``.value``.
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2)


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------


@triton.jit
def _kv_block_range(
    start_m, len_q, len_k, left, right,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
):
    """Key blocks of the q block [start_m, start_m + BLOCK_M) of a document, in three
    phases: [lo, full_lo) masked (left window edge), [full_lo, full_hi) whole blocks that
    every row of the block sees inside the document (no mask), [full_hi, hi) masked
    (diagonal, right window edge, end of the document). Keys outside [lo, hi) are hidden
    from every row, so they are never visited."""
    first_diag = start_m + (len_k - len_q)  # diag of the block's first row
    lo = 0
    hi = len_k
    if HAS_RIGHT:
        hi = tl.minimum(hi, first_diag + BLOCK_M + right)
    if HAS_LEFT:
        lo = tl.maximum(0, first_diag - left)
        lo = (lo // BLOCK_N) * BLOCK_N
    full_lo = lo
    if HAS_LEFT:
        full_lo = tl.cdiv(tl.maximum(lo, first_diag + BLOCK_M - 1 - left), BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(full_lo, hi)
    full_end = len_k
    if HAS_RIGHT:
        full_end = tl.minimum(full_end, first_diag + right + 1)
    full_hi = full_lo + tl.maximum(full_end - full_lo, 0) // BLOCK_N * BLOCK_N
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q,
    k_base, v_base, stride_kt, stride_vt,
    start, end, len_k, diag, left, right, qk_scale,
    offs_m, offs_n, offs_d,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Online softmax over key blocks [start, end). ``diag`` = offs_m + len_k - len_q."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        kv_rows = cols.to(tl.int64)
        k_ptrs = k_base + kv_rows[None, :] * stride_kt + offs_d[:, None]
        v_ptrs = v_base + kv_rows[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            k_mask = cols[None, :] < len_k
            v_mask = cols[:, None] < len_k
            if not EVEN_D:
                k_mask = k_mask & (offs_d[:, None] < HEAD_DIM)
                v_mask = v_mask & (offs_d[None, :] < HEAD_DIM)
            k = tl.load(k_ptrs, mask=k_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            visible = cols[None, :] < len_k
            if HAS_RIGHT:
                visible = visible & (cols[None, :] <= diag[:, None] + right)
            if HAS_LEFT:
                visible = visible & (cols[None, :] >= diag[:, None] - left)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = m_new
        if MASKED:
            # a row with no visible key so far keeps m = -inf: shift by 0 to avoid inf - inf
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_shift)
        p = tl.math.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_phases(
    acc, l_i, m_i, q,
    k_base, v_base, stride_kt, stride_vt,
    lo, full_lo, full_hi, hi, len_k, diag, left, right, qk_scale,
    offs_m, offs_n, offs_d,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """The three phases of ``_kv_block_range``: masked, unmasked, masked."""
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
        lo, full_lo, len_k, diag, left, right, qk_scale, offs_m, offs_n, offs_d,
        BLOCK_N, HEAD_DIM, EVEN_D, True, HAS_LEFT, HAS_RIGHT, DOT_PREC,
    )
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
        full_lo, full_hi, len_k, diag, left, right, qk_scale, offs_m, offs_n, offs_d,
        BLOCK_N, HEAD_DIM, EVEN_D, False, HAS_LEFT, HAS_RIGHT, DOT_PREC,
    )
    return _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
        full_hi, hi, len_k, diag, left, right, qk_scale, offs_m, offs_n, offs_d,
        BLOCK_N, HEAD_DIM, EVEN_D, True, HAS_LEFT, HAS_RIGHT, DOT_PREC,
    )


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, cu_seqlens_q, cu_seqlens_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_lh,
    qk_scale, left, right,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # heaviest blocks first: under a causal mask the last q blocks see the most keys
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q + b)
    len_q = tl.load(cu_seqlens_q + b + 1) - q_start
    start_m = pid_m * BLOCK_M
    if start_m >= len_q:
        return
    k_start = tl.load(cu_seqlens_k + b)
    len_k = tl.load(cu_seqlens_k + b + 1) - k_start
    kvh = h // GROUPS
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = q_start.to(tl.int64) + offs_m.to(tl.int64)
    row_ok = offs_m < len_q
    q_ptrs = Q + rows[:, None] * stride_qt + h.to(tl.int64) * stride_qh + offs_d[None, :]
    if EVEN_D:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_base = K + k_start.to(tl.int64) * stride_kt + kvh.to(tl.int64) * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kvh.to(tl.int64) * stride_vh

    diag = offs_m + (len_k - len_q)
    lo, full_lo, full_hi, hi = _kv_block_range(
        start_m, len_q, len_k, left, right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
    )

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _fwd_phases(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
        lo, full_lo, full_hi, hi, len_k, diag, left, right, qk_scale, offs_m, offs_n, offs_d,
        BLOCK_N, HEAD_DIM, EVEN_D, HAS_LEFT, HAS_RIGHT, DOT_PREC,
    )

    empty = l_i == 0.0  # no visible key: out = 0, lse = -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    o_ptrs = Out + rows[:, None] * stride_ot + h.to(tl.int64) * stride_oh + offs_d[None, :]
    if EVEN_D:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(Lse + h.to(tl.int64) * stride_lh + rows, lse, mask=row_ok)


# --------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess_kernel(
    Out, DOut, Lse, DLse, Delta, total_q,
    stride_ot, stride_oh, stride_dot, stride_doh, stride_lh, stride_dlh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < total_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DOut + rows[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row_ok = rows < total_q
    if HAS_DLSE:
        delta -= tl.load(DLse + h * stride_dlh + rows, mask=row_ok, other=0.0).to(tl.float32)
    lse = tl.load(Lse + h * stride_lh + rows, mask=row_ok, other=0.0)
    delta = tl.where(lse == float("-inf"), 0.0, delta)
    tl.store(Delta + h * stride_lh + rows, delta, mask=row_ok)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
    start, end, len_q, cols, off, left, right, qk_scale,
    offs_m, offs_d,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Accumulate dK^T-style tiles over q blocks [start, end); k, v are (BLOCK_N, D)."""
    for start_m in range(start, end, BLOCK_M):
        qi = start_m + offs_m
        q_rows = qi.to(tl.int64)
        row_ok = qi < len_q
        if EVEN_D:
            ld_mask = row_ok[:, None]
        else:
            ld_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(q_base + q_rows[:, None] * stride_qt + offs_d[None, :], mask=ld_mask, other=0.0)
        do = tl.load(do_base + q_rows[:, None] * stride_dot + offs_d[None, :], mask=ld_mask, other=0.0)
        lse = tl.load(lse_base + q_rows, mask=row_ok, other=0.0) * LOG2E
        # rows that see no key have lse = -inf: make their P exactly 0
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        delta = tl.load(delta_base + q_rows, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            diag = qi + off
            visible = row_ok[None, :]
            if HAS_RIGHT:
                visible = visible & (cols[:, None] <= diag[None, :] + right)
            if HAS_LEFT:
                visible = visible & (cols[:, None] >= diag[None, :] - left)
            p_t = tl.where(visible, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_phases(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
    lo, full_lo, full_hi, hi, len_q, cols, off, left, right, qk_scale,
    offs_m, offs_d,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Three phases over q blocks: [lo, full_lo) masked (diagonal / right window edge),
    [full_lo, full_hi) unmasked, [full_hi, hi) masked (left window edge)."""
    dk, dv = _bwd_dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
        lo, full_lo, len_q, cols, off, left, right, qk_scale, offs_m, offs_d,
        BLOCK_M, HEAD_DIM, EVEN_D, True, HAS_LEFT, HAS_RIGHT, DOT_PREC,
    )
    dk, dv = _bwd_dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
        full_lo, full_hi, len_q, cols, off, left, right, qk_scale, offs_m, offs_d,
        BLOCK_M, HEAD_DIM, EVEN_D, False, HAS_LEFT, HAS_RIGHT, DOT_PREC,
    )
    return _bwd_dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
        full_hi, hi, len_q, cols, off, left, right, qk_scale, offs_m, offs_d,
        BLOCK_M, HEAD_DIM, EVEN_D, True, HAS_LEFT, HAS_RIGHT, DOT_PREC,
    )


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, cu_seqlens_q, cu_seqlens_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
    sm_scale, qk_scale, left, right,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    kvh = tl.program_id(2)
    k_start = tl.load(cu_seqlens_k + b)
    len_k = tl.load(cu_seqlens_k + b + 1) - k_start
    start_n = pid_n * BLOCK_N
    if start_n >= len_k:
        return
    q_start = tl.load(cu_seqlens_q + b)
    len_q = tl.load(cu_seqlens_q + b + 1) - q_start
    off = len_k - len_q
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = start_n + offs_n
    col_ok = cols < len_k
    k_rows = k_start.to(tl.int64) + cols.to(tl.int64)
    if EVEN_D:
        kv_mask = col_ok[:, None]
    else:
        kv_mask = col_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    kvh64 = kvh.to(tl.int64)
    k = tl.load(K + k_rows[:, None] * stride_kt + kvh64 * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + k_rows[:, None] * stride_vt + kvh64 * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)

    # q rows that can see any key of the block
    lo = 0
    hi = len_q
    if HAS_RIGHT:
        lo = tl.maximum(0, start_n - off - right)
        lo = (lo // BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        hi = tl.minimum(hi, start_n + BLOCK_N - off + left)
    # q blocks that see every key of the block: no mask (keys past len_k only touch
    # dk/dv rows that are never stored, rows past len_q load q = dO = 0)
    full_lo = lo
    if HAS_RIGHT:
        full_lo = tl.cdiv(tl.maximum(lo, start_n + BLOCK_N - 1 - off - right), BLOCK_M) * BLOCK_M
    full_lo = tl.minimum(full_lo, hi)
    full_hi = hi
    if HAS_LEFT:
        full_end = start_n - off + left + 1
        full_hi = full_lo + tl.maximum(full_end - full_lo, 0) // BLOCK_M * BLOCK_M
        full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUPS):
        h = (kvh * GROUPS + g).to(tl.int64)
        q_base = Q + q_start.to(tl.int64) * stride_qt + h * stride_qh
        do_base = DOut + q_start.to(tl.int64) * stride_dot + h * stride_doh
        lse_base = Lse + h * stride_lh + q_start.to(tl.int64)
        delta_base = Delta + h * stride_lh + q_start.to(tl.int64)
        dk, dv = _bwd_dkdv_phases(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
            lo, full_lo, full_hi, hi, len_q, cols, off, left, right, qk_scale, offs_m, offs_d,
            BLOCK_M, HEAD_DIM, EVEN_D, HAS_LEFT, HAS_RIGHT, DOT_PREC,
        )
    dk = dk * sm_scale
    tl.store(DK + k_rows[:, None] * stride_dkt + kvh64 * stride_dkh + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + k_rows[:, None] * stride_dvt + kvh64 * stride_dvh + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
    start, end, len_k, diag, left, right, qk_scale,
    offs_n, offs_d,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        kv_rows = cols.to(tl.int64)
        kt_ptrs = k_base + kv_rows[None, :] * stride_kt + offs_d[:, None]
        vt_ptrs = v_base + kv_rows[None, :] * stride_vt + offs_d[:, None]
        if MASKED:
            kt_mask = cols[None, :] < len_k
            if not EVEN_D:
                kt_mask = kt_mask & (offs_d[:, None] < HEAD_DIM)
            k_t = tl.load(kt_ptrs, mask=kt_mask, other=0.0)
            v_t = tl.load(vt_ptrs, mask=kt_mask, other=0.0)
        elif EVEN_D:
            k_t = tl.load(kt_ptrs)
            v_t = tl.load(vt_ptrs)
        else:
            k_t = tl.load(kt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            v_t = tl.load(vt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        s = tl.dot(q, k_t, input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            visible = cols[None, :] < len_k
            if HAS_RIGHT:
                visible = visible & (cols[None, :] <= diag[:, None] + right)
            if HAS_LEFT:
                visible = visible & (cols[None, :] >= diag[:, None] - left)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, v_t, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_phases(
    dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
    lo, full_lo, full_hi, hi, len_k, diag, left, right, qk_scale,
    offs_n, offs_d,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """The three phases of ``_kv_block_range``: masked, unmasked, masked."""
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
        lo, full_lo, len_k, diag, left, right, qk_scale, offs_n, offs_d,
        BLOCK_N, HEAD_DIM, EVEN_D, True, HAS_LEFT, HAS_RIGHT, DOT_PREC,
    )
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
        full_lo, full_hi, len_k, diag, left, right, qk_scale, offs_n, offs_d,
        BLOCK_N, HEAD_DIM, EVEN_D, False, HAS_LEFT, HAS_RIGHT, DOT_PREC,
    )
    return _bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
        full_hi, hi, len_k, diag, left, right, qk_scale, offs_n, offs_d,
        BLOCK_N, HEAD_DIM, EVEN_D, True, HAS_LEFT, HAS_RIGHT, DOT_PREC,
    )


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, cu_seqlens_q, cu_seqlens_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lh,
    sm_scale, qk_scale, left, right,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # heaviest blocks first: under a causal mask the last q blocks see the most keys
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q + b)
    len_q = tl.load(cu_seqlens_q + b + 1) - q_start
    start_m = pid_m * BLOCK_M
    if start_m >= len_q:
        return
    k_start = tl.load(cu_seqlens_k + b)
    len_k = tl.load(cu_seqlens_k + b + 1) - k_start
    kvh = h // GROUPS
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = q_start.to(tl.int64) + offs_m.to(tl.int64)
    row_ok = offs_m < len_q
    if EVEN_D:
        ld_mask = row_ok[:, None]
    else:
        ld_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    h64 = h.to(tl.int64)
    q = tl.load(Q + rows[:, None] * stride_qt + h64 * stride_qh + offs_d[None, :], mask=ld_mask, other=0.0)
    do = tl.load(DOut + rows[:, None] * stride_dot + h64 * stride_doh + offs_d[None, :], mask=ld_mask, other=0.0)
    lse = tl.load(Lse + h64 * stride_lh + rows, mask=row_ok, other=0.0) * LOG2E
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(Delta + h64 * stride_lh + rows, mask=row_ok, other=0.0)
    k_base = K + k_start.to(tl.int64) * stride_kt + kvh.to(tl.int64) * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kvh.to(tl.int64) * stride_vh

    diag = offs_m + (len_k - len_q)
    lo, full_lo, full_hi, hi = _kv_block_range(
        start_m, len_q, len_k, left, right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
    )

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_dq_phases(
        dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
        lo, full_lo, full_hi, hi, len_k, diag, left, right, qk_scale, offs_n, offs_d,
        BLOCK_N, HEAD_DIM, EVEN_D, HAS_LEFT, HAS_RIGHT, DOT_PREC,
    )
    dq = dq * sm_scale
    tl.store(DQ + rows[:, None] * stride_dqt + h64 * stride_dqh + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=ld_mask)


# --------------------------------------------------------------------------------------
# Block sizes and (optional) autotuning
# --------------------------------------------------------------------------------------


def _autotune_enabled() -> bool:
    return os.environ.get("LONGVITA_AUTOTUNE", "0") == "1" and not triton_interpret()


# Measured on an H100 (bf16, benchmarks/tune_attention.py, 2026-11-25; RESULTS.md): the
# fastest config of each kernel at Qwen2.5-14B's heads (40/8, D 128, causal 8K) and
# InternViT-300M's (16/16, D 64, 8 tiles of 1025). Versus the configs chosen by reasoning
# before (kept below for fp32 and padded head dims, which were not measured): forward 427 ->
# 451 TFLOP/s at D 128; whole backward 8.37 -> 6.38 ms from dK/dV alone (its 16-row q
# blocks were the bottleneck), dQ 8.38 -> 7.71 ms.
_MEASURED_16BIT = {
    ("fwd", 128): dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    ("fwd", 64): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    ("dkdv", 128): dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=1),
    ("dkdv", 64): dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3),
    ("dq", 128): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    ("dq", 64): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
}


def _fixed_config(kind: str, block_d: int, even_d: bool, fp32: bool = False) -> dict:
    """Fixed launch parameters: tiny in the interpreter, H100-oriented on GPU.
    ``even_d``: the head dim equals ``block_d`` (no padded columns); ``fp32``: fp32 inputs
    (twice the shared memory per tile)."""
    if triton_interpret():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    if even_d and not fp32 and (kind, block_d) in _MEASURED_16BIT:
        return dict(_MEASURED_16BIT[kind, block_d])
    # A head dim that is not a power of two (80, 96) is padded to BLOCK_D and its loads are
    # masked, which costs registers: with the even-D configs its windowed variants spilled
    # (40 B forward, 12 B dK/dV at D = 80). Half as many keys per block fit without spills.
    uneven_128 = not even_d and 64 < block_d <= 128
    if kind == "fwd":
        if block_d <= 64:
            return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
        if uneven_128:
            return dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3)
        if block_d <= 128:
            return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if kind == "dkdv":
        # chosen so that ptxas reports no register spills for sm_90 in bf16/fp16
        # (benchmarks/compile_report.py); 4-warp variants spilled 100-500 bytes
        if block_d <= 64:
            return dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2)
        if uneven_128:
            return dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=2)
        if block_d <= 128:
            return dict(BLOCK_M=16, BLOCK_N=128, num_warps=8, num_stages=2)
        return dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=1)
    # dq
    if block_d <= 64:
        return dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3)
    if block_d <= 128:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=1)


def _tune_configs(kind: str) -> list:
    if kind == "fwd":
        shapes = [(128, 64), (128, 128), (64, 64), (128, 32)]
        warps, stages = (4, 8), (2, 3, 4)
    elif kind == "dkdv":
        shapes = [(32, 128), (32, 64), (64, 64), (64, 128), (16, 64)]
        warps, stages = (4, 8), (1, 2, 3)
    else:
        shapes = [(128, 32), (64, 32), (64, 64), (128, 64), (64, 16)]
        warps, stages = (4, 8), (1, 2, 3)
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n in shapes for w in warps for s in stages
    ]


_TUNE_KEY = ["GROUPS", "HEAD_DIM", "BLOCK_D", "HAS_LEFT", "HAS_RIGHT", "DOT_PREC"]


@functools.lru_cache(maxsize=None)
def _tuned(kind: str):
    kernel = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}[kind]
    return triton.autotune(configs=_tune_configs(kind), key=_TUNE_KEY)(kernel)


def _launch(kind: str, kernel, grid_len: int, batch: int, heads: int, args: list, consts: dict, block_d: int):
    """Launch with the fixed config, or through the autotuner when LONGVITA_AUTOTUNE=1."""
    grid_axis = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
    if _autotune_enabled():
        grid = lambda meta: (triton.cdiv(grid_len, meta[grid_axis]), batch, heads)  # noqa: E731
        _tuned(kind)[grid](*args, **consts)
        return
    cfg = _fixed_config(kind, block_d, consts["HEAD_DIM"] == block_d, consts["DOT_PREC"] == "ieee")
    grid = (triton.cdiv(grid_len, cfg[grid_axis]), batch, heads)
    kernel[grid](*args, **consts, **cfg)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _window_flags(causal: bool, window_size: tuple[int, int]) -> tuple[int, int, bool, bool]:
    """Fold causal into the window: causal sets right = 0 whatever right was given, as
    flash-attn's ``flash_api.cpp`` does; a positive right only widens a non-causal window."""
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    return max(left, 0), max(right, 0), left >= 0, right >= 0


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def varlen_attention_fwd_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int,
    softmax_scale: float, causal: bool, window_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. Returns out (total_q, Hq, D) in q's dtype and lse (Hq, total_q) fp32."""
    assert q.dim() == 3 and k.dim() == 3 and v.dim() == 3, "q, k, v must be (tokens, heads, head_dim)"
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {q.dtype}"
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    assert d <= 256, f"head_dim {d} > 256 is not supported by the Triton kernel"
    assert hq % hkv == 0
    batch = cu_seqlens_q.numel() - 1
    block_d = max(16, triton.next_power_of_2(d))
    left, right, has_left, has_right = _window_flags(causal, window_size)
    out = torch.zeros_like(q)
    lse = torch.full((hq, total_q), -math.inf, dtype=torch.float32, device=q.device)
    if total_q == 0 or batch == 0 or max_seqlen_q == 0 or hq == 0:
        return out, lse
    args = [
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        softmax_scale * LOG2E.value, left, right,
    ]
    consts = dict(
        GROUPS=hq // hkv, HEAD_DIM=d, BLOCK_D=block_d, HAS_LEFT=has_left, HAS_RIGHT=has_right,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 inputs: no TF32 rounding
    )
    _launch("fwd", _fwd_kernel, max_seqlen_q, batch, hq, args, consts, block_d)
    return out, lse


def varlen_attention_bwd_triton(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int,
    softmax_scale: float, causal: bool, window_size: tuple[int, int],
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward (preprocess, dK/dV, dQ). Returns dq, dk, dv in the inputs' dtypes."""
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {q.dtype}"
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    dout, out = _last_dim_contiguous(dout), _last_dim_contiguous(out)
    lse = lse.float().contiguous()
    total_q, hq, d = q.shape
    total_k, hkv = k.shape[0], k.shape[1]
    assert dout.shape == q.shape and out.shape == q.shape, "dout and out must have q's shape"
    assert lse.shape == (hq, total_q), f"lse must be (Hq, total_q) = {(hq, total_q)}, got {tuple(lse.shape)}"
    batch = cu_seqlens_q.numel() - 1
    block_d = max(16, triton.next_power_of_2(d))
    left, right, has_left, has_right = _window_flags(causal, window_size)
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    if total_q == 0 or total_k == 0 or batch == 0 or hq == 0:
        return dq, dk, dv

    delta = torch.empty((hq, total_q), dtype=torch.float32, device=q.device)
    if dlse is not None:
        dlse = dlse.contiguous()
        assert dlse.shape == lse.shape, f"dlse must be {tuple(lse.shape)}, got {tuple(dlse.shape)}"
    block_t = 16 if triton_interpret() else 64
    _bwd_preprocess_kernel[(triton.cdiv(total_q, block_t), hq)](
        out, dout, lse, dlse if dlse is not None else lse, delta, total_q,
        out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), lse.stride(0),
        dlse.stride(0) if dlse is not None else 0,
        HEAD_DIM=d, BLOCK_D=block_d, HAS_DLSE=dlse is not None, BLOCK_T=block_t,
    )
    if max_seqlen_q == 0 or max_seqlen_k == 0:
        return dq, dk, dv
    consts = dict(
        GROUPS=hq // hkv, HEAD_DIM=d, BLOCK_D=block_d, HAS_LEFT=has_left, HAS_RIGHT=has_right,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 inputs: no TF32 rounding
    )
    qk_scale = softmax_scale * LOG2E.value
    common = [
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1),
    ]
    dkdv_args = [
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k,
        *common, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
        softmax_scale, qk_scale, left, right,
    ]
    _launch("dkdv", _bwd_dkdv_kernel, max_seqlen_k, batch, hkv, dkdv_args, consts, block_d)
    dq_args = [
        q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k,
        *common, dq.stride(0), dq.stride(1), lse.stride(0),
        softmax_scale, qk_scale, left, right,
    ]
    _launch("dq", _bwd_dq_kernel, max_seqlen_q, batch, hq, dq_args, consts, block_d)
    return dq, dk, dv
