"""Triton kernels for varlen packed flash attention (FlashAttention-2 style), in variants.

Layout: THD. q (total_q, Hq, D), k/v (total_k, Hkv, D), int32 cu_seqlens (B+1,).
GQA maps q head h to kv head h // (Hq // Hkv) inside the kernels; K/V are never repeated.

Masks (flash-attn semantics, per document with ``off = len_k - len_q``): query i sees key j
when ``j <= i + off + right`` (if ``right >= 0``) and ``j >= i + off - left`` (if
``left >= 0``). Causal is ``right = 0`` (bottom-right aligned), whatever right was
given. The launcher folds causal into the window, so the kernels only know
``HAS_LEFT`` / ``HAS_RIGHT``.

Kernels (each a thin schedule around a ``*_tile`` function that does one block):
- ``_fwd_kernel``: one (document, q block, head) tile per program. The K loop runs in three
  phases: masked blocks at the left window edge, unmasked full blocks, masked blocks at the
  diagonal / right window edge / end of the document. Fully masked blocks are never
  visited. Online softmax in base 2 (``qk_scale = softmax_scale * log2(e)``); the stored
  lse is natural-log.
- ``_bwd_preprocess_kernel``: delta = rowsum(dO * O) - dlse (0 for rows with lse = -inf).
- ``_bwd_dkdv_kernel``: one (document, kv block, kv head) tile per program; loops over the
  group's q heads and their q blocks, so dK/dV of a kv head accumulate in registers,
  without atomics.
- ``_bwd_dq_kernel``: one (document, q block, head) tile per program; loops over kv blocks.
  With these two the backward is deterministic.
- ``_bwd_fused_kernel`` (variant ``fused_bwd``): the dK/dV tiles also add their dQ
  contributions (``sm_scale * dS K``) into an fp32 dQ buffer with relaxed fp32 atomics;
  one kernel instead of two, K/V read once, not bit-wise deterministic. The buffer costs
  4 bytes per q element (rounded to q's dtype at the end).

Variants (``launch_table.py`` names them and says how one is chosen:
``LONGVITA_ATTENTION_VARIANT=tma+sorted``, or the launch table per shape; the default is
the kernels measured on an H100): ``tma`` loads K/V and Q (and stores O) through
device-side tensor descriptors made per document (``USE_TMA``); ``sorted`` and
``persistent`` run the tiles in the order of a work list sorted by cost instead of the
grid (``SCHEDULE`` 1 / 2, ``_work_list``); ``ws`` runs the forward's key blocks as one
masked, warp-specialised loop of TMA loads (``WARP_SPEC``, see ``_fwd_phases``);
``fused_bwd`` runs ``_bwd_fused_kernel``; ``budget`` takes the spill-free configs. In Triton's interpreter every variant runs (the interpreter executes
descriptors and ignores warp specialisation), so the tests check each one exactly.

Schedules. ``grid`` (SCHEDULE 0): grid (blocks of the longest document, batch, heads),
last q block first (it has the most causal work); blocks past a document's end exit at
once. ``sorted`` (1): a device-built list of the real (document, block) items sorted by
visible work, heaviest first, times the heads, one program each (heads innermost, so the
q heads of a GQA group run together and share their K/V in L2). ``persistent`` (2): the
same list walked round-robin by a few programs per SM. The list is ``cdiv(tokens, block)
+ batch`` items long (an upper bound known without reading cu_seqlens on the host; the
rest are -1 and skipped) and cached per cu_seqlens, so every layer reuses it.

Rows past ``cu_seqlens[-1]`` belong to no program: the launchers allocate out/dq/dk/dv
as zeros and lse as -inf, so those rows read 0 / -inf. Row offsets are int64 (at 1M
tokens x 40 heads x 128 a token offset passes 2^31).

Block sizes are fixed per kernel, head dim and variant: the launch table's (measured on an
H100 for bf16/fp16 at head dims 64 and 128, ``benchmarks/tune_attention.py``), chosen by
reasoning otherwise; ``LONGVITA_AUTOTUNE=1`` autotunes them instead (grid schedule only).
In Triton's interpreter blocks are 16.
"""

from __future__ import annotations

import collections
import functools
import math
import os

import torch
import triton
import triton.language as tl

from longvita.kernels._backend import triton_interpret
from longvita.kernels.attention import launch_table
from longvita.kernels.attention.launch_table import AttentionVariant

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
def _fwd_step(
    acc, l_i, m_i, q,
    k_src, v_src, stride_kt, stride_vt,
    start_n, len_k, diag, left, right, qk_scale,
    offs_n, offs_d,
    HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """One key block of the online softmax. ``k_src`` / ``v_src``: the document's K/V base
    pointers, or (``USE_TMA``) its tensor descriptors, whose rows past the document read 0."""
    cols = start_n + offs_n
    if USE_TMA:
        k = tl.trans(k_src.load([start_n, 0]))  # (BLOCK_D, BLOCK_N)
    else:
        kv_rows = cols.to(tl.int64)
        k_ptrs = k_src + kv_rows[None, :] * stride_kt + offs_d[:, None]
        v_ptrs = v_src + kv_rows[:, None] * stride_vt + offs_d[None, :]
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
    if USE_TMA:
        v = v_src.load([start_n, 0])
    else:
        if MASKED:
            v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q,
    k_src, v_src, stride_kt, stride_vt,
    start, end, len_k, diag, left, right, qk_scale,
    offs_n, offs_d,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    """Online softmax over key blocks [start, end). ``diag`` = offs_m + len_k - len_q.
    ``WARP_SPEC``: the loop is warp-specialised (a producer warp group issues the copies,
    two consumer groups compute: Triton's Hopper pass, with ``num_warps=4`` per consumer)."""
    if WARP_SPEC:
        for start_n in tl.range(start, end, BLOCK_N, warp_specialize=True):
            acc, l_i, m_i = _fwd_step(
                acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt, start_n, len_k, diag, left, right,
                qk_scale, offs_n, offs_d, HEAD_DIM, EVEN_D, MASKED, HAS_LEFT, HAS_RIGHT, DOT_PREC, USE_TMA,
            )
    else:
        for start_n in range(start, end, BLOCK_N):
            acc, l_i, m_i = _fwd_step(
                acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt, start_n, len_k, diag, left, right,
                qk_scale, offs_n, offs_d, HEAD_DIM, EVEN_D, MASKED, HAS_LEFT, HAS_RIGHT, DOT_PREC, USE_TMA,
            )
    return acc, l_i, m_i


@triton.jit
def _fwd_phases(
    acc, l_i, m_i, q,
    k_src, v_src, stride_kt, stride_vt,
    lo, full_lo, full_hi, hi, len_k, diag, left, right, qk_scale,
    offs_n, offs_d,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    """The three phases of ``_kv_block_range``: masked, unmasked, masked. Warp-specialised
    (``WARP_SPEC``): one loop over [lo, hi), masked throughout. Triton 3.6's Hopper
    warp-specialisation pass fails on the three-phase form ("operation destroyed but still
    has uses" when the specialised loop's results feed the next loop) and on pointer loads;
    one loop of descriptor loads compiles (compile report: 12 warps, setmaxnreg, no spills)."""
    if WARP_SPEC:
        return _fwd_inner(
            acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt,
            lo, hi, len_k, diag, left, right, qk_scale, offs_n, offs_d,
            BLOCK_N, HEAD_DIM, EVEN_D, True, HAS_LEFT, HAS_RIGHT, DOT_PREC, USE_TMA, True,
        )
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt,
        lo, full_lo, len_k, diag, left, right, qk_scale, offs_n, offs_d,
        BLOCK_N, HEAD_DIM, EVEN_D, True, HAS_LEFT, HAS_RIGHT, DOT_PREC, USE_TMA, False,
    )
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt,
        full_lo, full_hi, len_k, diag, left, right, qk_scale, offs_n, offs_d,
        BLOCK_N, HEAD_DIM, EVEN_D, False, HAS_LEFT, HAS_RIGHT, DOT_PREC, USE_TMA, WARP_SPEC,
    )
    return _fwd_inner(
        acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt,
        full_hi, hi, len_k, diag, left, right, qk_scale, offs_n, offs_d,
        BLOCK_N, HEAD_DIM, EVEN_D, True, HAS_LEFT, HAS_RIGHT, DOT_PREC, USE_TMA, False,
    )


@triton.jit
def _fwd_tile(
    Q, K, V, Out, Lse, cu_seqlens_q, cu_seqlens_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_lh,
    qk_scale, left, right, b, pid_m, h,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    """Query block ``pid_m`` of document ``b``, head ``h``: out rows and their lse."""
    q_start = tl.load(cu_seqlens_q + b)
    len_q = tl.load(cu_seqlens_q + b + 1) - q_start
    start_m = pid_m * BLOCK_M
    if start_m < len_q:
        k_start = tl.load(cu_seqlens_k + b)
        len_k = tl.load(cu_seqlens_k + b + 1) - k_start
        kvh = h // GROUPS
        EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        rows = q_start.to(tl.int64) + offs_m.to(tl.int64)
        row_ok = offs_m < len_q
        if USE_TMA:
            # one descriptor per document: its rows [0, len) are the whole tensor the copy
            # engine sees, so blocks reaching past the document read zeros
            q_base = Q + q_start.to(tl.int64) * stride_qt + h.to(tl.int64) * stride_qh
            q = tl.make_tensor_descriptor(q_base, shape=[len_q, HEAD_DIM], strides=[stride_qt, 1],
                                          block_shape=[BLOCK_M, BLOCK_D]).load([start_m, 0])
        else:
            q_ptrs = Q + rows[:, None] * stride_qt + h.to(tl.int64) * stride_qh + offs_d[None, :]
            if EVEN_D:
                q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
            else:
                q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        k_base = K + k_start.to(tl.int64) * stride_kt + kvh.to(tl.int64) * stride_kh
        v_base = V + k_start.to(tl.int64) * stride_vt + kvh.to(tl.int64) * stride_vh
        if USE_TMA:  # (a document without keys visits no key block: its descriptor is never read,
            # but a tensor map may not have an empty dimension)
            k_src = tl.make_tensor_descriptor(k_base, shape=[tl.maximum(len_k, 1), HEAD_DIM], strides=[stride_kt, 1],
                                              block_shape=[BLOCK_N, BLOCK_D])
            v_src = tl.make_tensor_descriptor(v_base, shape=[tl.maximum(len_k, 1), HEAD_DIM], strides=[stride_vt, 1],
                                              block_shape=[BLOCK_N, BLOCK_D])
        else:
            k_src = k_base
            v_src = v_base

        diag = offs_m + (len_k - len_q)
        lo, full_lo, full_hi, hi = _kv_block_range(
            start_m, len_q, len_k, left, right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
        )

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        acc, l_i, m_i = _fwd_phases(
            acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt,
            lo, full_lo, full_hi, hi, len_k, diag, left, right, qk_scale, offs_n, offs_d,
            BLOCK_N, HEAD_DIM, EVEN_D, HAS_LEFT, HAS_RIGHT, DOT_PREC, USE_TMA, WARP_SPEC,
        )

        empty = l_i == 0.0  # no visible key: out = 0, lse = -inf
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
        if USE_TMA:  # rows past the document are clipped by the copy engine
            o_base = Out + q_start.to(tl.int64) * stride_ot + h.to(tl.int64) * stride_oh
            tl.make_tensor_descriptor(o_base, shape=[len_q, HEAD_DIM], strides=[stride_ot, 1],
                                      block_shape=[BLOCK_M, BLOCK_D]).store([start_m, 0], out.to(Out.dtype.element_ty))
        else:
            o_ptrs = Out + rows[:, None] * stride_ot + h.to(tl.int64) * stride_oh + offs_d[None, :]
            if EVEN_D:
                tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
            else:
                tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
        tl.store(Lse + h.to(tl.int64) * stride_lh + rows, lse, mask=row_ok)


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, cu_seqlens_q, cu_seqlens_k, Work, n_work, n_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_lh,
    qk_scale, left, right,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SCHEDULE: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    if SCHEDULE == 0:  # grid (q blocks of the longest document, batch, Hq)
        # heaviest blocks first: under a causal mask the last q blocks see the most keys
        _fwd_tile(
            Q, K, V, Out, Lse, cu_seqlens_q, cu_seqlens_k,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
            qk_scale, left, right, tl.program_id(1), tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(2),
            GROUPS, HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT, DOT_PREC, BLOCK_M, BLOCK_N, USE_TMA, WARP_SPEC,
        )
    elif SCHEDULE == 1:  # one program per (item of the sorted work list, head), heaviest item first
        w = tl.program_id(0)
        item = w // n_heads
        b = tl.load(Work + 2 * item)
        if b >= 0:
            _fwd_tile(
                Q, K, V, Out, Lse, cu_seqlens_q, cu_seqlens_k,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
                qk_scale, left, right, b, tl.load(Work + 2 * item + 1), w % n_heads,
                GROUPS, HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT, DOT_PREC, BLOCK_M, BLOCK_N, USE_TMA, WARP_SPEC,
            )
    else:  # persistent: program p takes work p, p + programs, ... of the sorted list
        for w in range(tl.program_id(0), n_work, tl.num_programs(0)):
            item = w // n_heads
            b = tl.load(Work + 2 * item)
            if b >= 0:
                _fwd_tile(
                    Q, K, V, Out, Lse, cu_seqlens_q, cu_seqlens_k,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
                    qk_scale, left, right, b, tl.load(Work + 2 * item + 1), w % n_heads,
                    GROUPS, HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT, DOT_PREC, BLOCK_M, BLOCK_N, USE_TMA, WARP_SPEC,
                )


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
    dk, dv, k, v, q_src, do_src, lse_base, delta_base, dq_base, stride_qt, stride_dot, stride_dqt,
    start, end, len_q, cols, off, left, right, qk_scale, sm_scale,
    offs_m, offs_d,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    USE_TMA: tl.constexpr, FUSED_DQ: tl.constexpr,
):
    """Accumulate dK^T-style tiles over q blocks [start, end); k, v are (BLOCK_N, D).
    ``q_src`` / ``do_src``: base pointers of the q head's document, or (``USE_TMA``) its
    descriptors. ``FUSED_DQ``: also add ``sm_scale * dS K`` of each q block into the fp32
    dQ buffer at ``dq_base`` with atomics."""
    for start_m in range(start, end, BLOCK_M):
        qi = start_m + offs_m
        q_rows = qi.to(tl.int64)
        row_ok = qi < len_q
        if EVEN_D:
            ld_mask = row_ok[:, None]
        else:
            ld_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        if USE_TMA:  # rows past the document read 0, as the masked loads below
            q = q_src.load([start_m, 0])
            do = do_src.load([start_m, 0])
        else:
            q = tl.load(q_src + q_rows[:, None] * stride_qt + offs_d[None, :], mask=ld_mask, other=0.0)
            do = tl.load(do_src + q_rows[:, None] * stride_dot + offs_d[None, :], mask=ld_mask, other=0.0)
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
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk, input_precision=DOT_PREC)
        if FUSED_DQ:
            # keys past the document loaded as 0, so they add nothing; rows past it are masked
            dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PREC) * sm_scale  # (BLOCK_M, BLOCK_D)
            tl.atomic_add(dq_base + q_rows[:, None] * stride_dqt + offs_d[None, :], dq, mask=ld_mask, sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_dkdv_phases(
    dk, dv, k, v, q_src, do_src, lse_base, delta_base, dq_base, stride_qt, stride_dot, stride_dqt,
    lo, full_lo, full_hi, hi, len_q, cols, off, left, right, qk_scale, sm_scale,
    offs_m, offs_d,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    USE_TMA: tl.constexpr, FUSED_DQ: tl.constexpr,
):
    """Three phases over q blocks: [lo, full_lo) masked (diagonal / right window edge),
    [full_lo, full_hi) unmasked, [full_hi, hi) masked (left window edge)."""
    dk, dv = _bwd_dkdv_inner(
        dk, dv, k, v, q_src, do_src, lse_base, delta_base, dq_base, stride_qt, stride_dot, stride_dqt,
        lo, full_lo, len_q, cols, off, left, right, qk_scale, sm_scale, offs_m, offs_d,
        BLOCK_M, HEAD_DIM, EVEN_D, True, HAS_LEFT, HAS_RIGHT, DOT_PREC, USE_TMA, FUSED_DQ,
    )
    dk, dv = _bwd_dkdv_inner(
        dk, dv, k, v, q_src, do_src, lse_base, delta_base, dq_base, stride_qt, stride_dot, stride_dqt,
        full_lo, full_hi, len_q, cols, off, left, right, qk_scale, sm_scale, offs_m, offs_d,
        BLOCK_M, HEAD_DIM, EVEN_D, False, HAS_LEFT, HAS_RIGHT, DOT_PREC, USE_TMA, FUSED_DQ,
    )
    return _bwd_dkdv_inner(
        dk, dv, k, v, q_src, do_src, lse_base, delta_base, dq_base, stride_qt, stride_dot, stride_dqt,
        full_hi, hi, len_q, cols, off, left, right, qk_scale, sm_scale, offs_m, offs_d,
        BLOCK_M, HEAD_DIM, EVEN_D, True, HAS_LEFT, HAS_RIGHT, DOT_PREC, USE_TMA, FUSED_DQ,
    )


@triton.jit
def _bwd_dkdv_tile(
    Q, K, V, DOut, Lse, Delta, DK, DV, DQ, cu_seqlens_q, cu_seqlens_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt, stride_dqh, stride_lh,
    sm_scale, qk_scale, left, right, b, pid_n, kvh,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr, FUSED_DQ: tl.constexpr,
):
    """Key block ``pid_n`` of document ``b``, kv head ``kvh``: its dK/dV over every q head
    of the group (and, ``FUSED_DQ``, their dQ contributions)."""
    k_start = tl.load(cu_seqlens_k + b)
    len_k = tl.load(cu_seqlens_k + b + 1) - k_start
    start_n = pid_n * BLOCK_N
    if start_n < len_k:
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
        if USE_TMA:
            k_base = K + k_start.to(tl.int64) * stride_kt + kvh64 * stride_kh
            v_base = V + k_start.to(tl.int64) * stride_vt + kvh64 * stride_vh
            k = tl.make_tensor_descriptor(k_base, shape=[len_k, HEAD_DIM], strides=[stride_kt, 1],
                                          block_shape=[BLOCK_N, BLOCK_D]).load([start_n, 0])
            v = tl.make_tensor_descriptor(v_base, shape=[len_k, HEAD_DIM], strides=[stride_vt, 1],
                                          block_shape=[BLOCK_N, BLOCK_D]).load([start_n, 0])
        else:
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
            dq_base = DQ + q_start.to(tl.int64) * stride_dqt + h * stride_dqh
            if USE_TMA:
                q_src = tl.make_tensor_descriptor(q_base, shape=[tl.maximum(len_q, 1), HEAD_DIM], strides=[stride_qt, 1],
                                                  block_shape=[BLOCK_M, BLOCK_D])
                do_src = tl.make_tensor_descriptor(do_base, shape=[tl.maximum(len_q, 1), HEAD_DIM], strides=[stride_dot, 1],
                                                   block_shape=[BLOCK_M, BLOCK_D])
            else:
                q_src = q_base
                do_src = do_base
            dk, dv = _bwd_dkdv_phases(
                dk, dv, k, v, q_src, do_src, lse_base, delta_base, dq_base, stride_qt, stride_dot, stride_dqt,
                lo, full_lo, full_hi, hi, len_q, cols, off, left, right, qk_scale, sm_scale, offs_m, offs_d,
                BLOCK_M, HEAD_DIM, EVEN_D, HAS_LEFT, HAS_RIGHT, DOT_PREC, USE_TMA, FUSED_DQ,
            )
        dk = dk * sm_scale
        tl.store(DK + k_rows[:, None] * stride_dkt + kvh64 * stride_dkh + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + k_rows[:, None] * stride_dvt + kvh64 * stride_dvh + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _work_item(Work, w, n_heads):
    """(document, block, head) of work ``w``: item ``w // n_heads`` of the sorted list, whose
    document is -1 past the list's real items."""
    item = w // n_heads
    return tl.load(Work + 2 * item), tl.load(Work + 2 * item + 1), w % n_heads


@triton.jit
def _bwd_dkdv_scheduled(
    Q, K, V, DOut, Lse, Delta, DK, DV, DQ, cu_seqlens_q, cu_seqlens_k, Work, n_work, n_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt, stride_dqh, stride_lh,
    sm_scale, qk_scale, left, right,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SCHEDULE: tl.constexpr, USE_TMA: tl.constexpr,
    FUSED_DQ: tl.constexpr,
):
    """The dK/dV tiles of one program under ``SCHEDULE`` (grid, sorted work list, or a
    persistent loop over it, as ``_fwd_kernel``); with ``FUSED_DQ`` each tile also adds its
    dQ contributions into the fp32 buffer ``DQ`` with atomics. Shared by the two entry
    kernels below, which differ only in that flag (and so in their names, which the
    launch table and the compile report key on)."""
    if SCHEDULE == 0:
        _bwd_dkdv_tile(
            Q, K, V, DOut, Lse, Delta, DK, DV, DQ, cu_seqlens_q, cu_seqlens_k,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
            stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt, stride_dqh, stride_lh,
            sm_scale, qk_scale, left, right, tl.program_id(1), tl.program_id(0), tl.program_id(2),
            GROUPS, HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT, DOT_PREC, BLOCK_M, BLOCK_N, USE_TMA, FUSED_DQ,
        )
    elif SCHEDULE == 1:  # one item of the sorted work list per program
        b, pid_n, kvh = _work_item(Work, tl.program_id(0), n_heads)
        if b >= 0:
            _bwd_dkdv_tile(
                Q, K, V, DOut, Lse, Delta, DK, DV, DQ, cu_seqlens_q, cu_seqlens_k,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt, stride_dqh, stride_lh,
                sm_scale, qk_scale, left, right, b, pid_n, kvh,
                GROUPS, HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT, DOT_PREC, BLOCK_M, BLOCK_N, USE_TMA, FUSED_DQ,
            )
    else:  # persistent: each program loops over the sorted work list
        for w in range(tl.program_id(0), n_work, tl.num_programs(0)):
            b, pid_n, kvh = _work_item(Work, w, n_heads)
            if b >= 0:
                _bwd_dkdv_tile(
                    Q, K, V, DOut, Lse, Delta, DK, DV, DQ, cu_seqlens_q, cu_seqlens_k,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt, stride_dqh, stride_lh,
                    sm_scale, qk_scale, left, right, b, pid_n, kvh,
                    GROUPS, HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT, DOT_PREC, BLOCK_M, BLOCK_N, USE_TMA, FUSED_DQ,
                )


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, DQ, cu_seqlens_q, cu_seqlens_k, Work, n_work, n_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt, stride_dqh, stride_lh,
    sm_scale, qk_scale, left, right,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SCHEDULE: tl.constexpr, USE_TMA: tl.constexpr,
):
    """dK/dV; grid (kv blocks, batch, Hkv) or a sorted work list (see ``_fwd_kernel``)."""
    _bwd_dkdv_scheduled(
        Q, K, V, DOut, Lse, Delta, DK, DV, DQ, cu_seqlens_q, cu_seqlens_k, Work, n_work, n_heads,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt, stride_dqh, stride_lh,
        sm_scale, qk_scale, left, right, GROUPS, HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT, DOT_PREC, BLOCK_M, BLOCK_N,
        SCHEDULE, USE_TMA, False,
    )


@triton.jit
def _bwd_fused_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, DQ, cu_seqlens_q, cu_seqlens_k, Work, n_work, n_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt, stride_dqh, stride_lh,
    sm_scale, qk_scale, left, right,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SCHEDULE: tl.constexpr, USE_TMA: tl.constexpr,
):
    """The whole backward in one kernel: ``_bwd_dkdv_kernel``'s tiles, each also adding its
    dQ contributions into the fp32 buffer ``DQ`` with atomics."""
    _bwd_dkdv_scheduled(
        Q, K, V, DOut, Lse, Delta, DK, DV, DQ, cu_seqlens_q, cu_seqlens_k, Work, n_work, n_heads,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt, stride_dqh, stride_lh,
        sm_scale, qk_scale, left, right, GROUPS, HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT, DOT_PREC, BLOCK_M, BLOCK_N,
        SCHEDULE, USE_TMA, True,
    )


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse, delta, k_src, v_src, stride_kt, stride_vt,
    start, end, len_k, diag, left, right, qk_scale,
    offs_n, offs_d,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        if USE_TMA:
            k_t = tl.trans(k_src.load([start_n, 0]))  # (BLOCK_D, BLOCK_N); rows past the document read 0
            v_t = tl.trans(v_src.load([start_n, 0]))
        else:
            kv_rows = cols.to(tl.int64)
            kt_ptrs = k_src + kv_rows[None, :] * stride_kt + offs_d[:, None]
            vt_ptrs = v_src + kv_rows[None, :] * stride_vt + offs_d[:, None]
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
    dq, q, do, lse, delta, k_src, v_src, stride_kt, stride_vt,
    lo, full_lo, full_hi, hi, len_k, diag, left, right, qk_scale,
    offs_n, offs_d,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
):
    """The three phases of ``_kv_block_range``: masked, unmasked, masked."""
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_src, v_src, stride_kt, stride_vt,
        lo, full_lo, len_k, diag, left, right, qk_scale, offs_n, offs_d,
        BLOCK_N, HEAD_DIM, EVEN_D, True, HAS_LEFT, HAS_RIGHT, DOT_PREC, USE_TMA,
    )
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_src, v_src, stride_kt, stride_vt,
        full_lo, full_hi, len_k, diag, left, right, qk_scale, offs_n, offs_d,
        BLOCK_N, HEAD_DIM, EVEN_D, False, HAS_LEFT, HAS_RIGHT, DOT_PREC, USE_TMA,
    )
    return _bwd_dq_inner(
        dq, q, do, lse, delta, k_src, v_src, stride_kt, stride_vt,
        full_hi, hi, len_k, diag, left, right, qk_scale, offs_n, offs_d,
        BLOCK_N, HEAD_DIM, EVEN_D, True, HAS_LEFT, HAS_RIGHT, DOT_PREC, USE_TMA,
    )


@triton.jit
def _bwd_dq_tile(
    Q, K, V, DOut, Lse, Delta, DQ, cu_seqlens_q, cu_seqlens_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lh,
    sm_scale, qk_scale, left, right, b, pid_m, h,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
):
    """dQ of query block ``pid_m`` of document ``b``, head ``h``."""
    q_start = tl.load(cu_seqlens_q + b)
    len_q = tl.load(cu_seqlens_q + b + 1) - q_start
    start_m = pid_m * BLOCK_M
    if start_m < len_q:
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
        if USE_TMA:  # (a document without keys visits no key block: its descriptor is never read,
            # but a tensor map may not have an empty dimension)
            k_src = tl.make_tensor_descriptor(k_base, shape=[tl.maximum(len_k, 1), HEAD_DIM], strides=[stride_kt, 1],
                                              block_shape=[BLOCK_N, BLOCK_D])
            v_src = tl.make_tensor_descriptor(v_base, shape=[tl.maximum(len_k, 1), HEAD_DIM], strides=[stride_vt, 1],
                                              block_shape=[BLOCK_N, BLOCK_D])
        else:
            k_src = k_base
            v_src = v_base

        diag = offs_m + (len_k - len_q)
        lo, full_lo, full_hi, hi = _kv_block_range(
            start_m, len_q, len_k, left, right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
        )

        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dq = _bwd_dq_phases(
            dq, q, do, lse, delta, k_src, v_src, stride_kt, stride_vt,
            lo, full_lo, full_hi, hi, len_k, diag, left, right, qk_scale, offs_n, offs_d,
            BLOCK_N, HEAD_DIM, EVEN_D, HAS_LEFT, HAS_RIGHT, DOT_PREC, USE_TMA,
        )
        dq = dq * sm_scale
        tl.store(DQ + rows[:, None] * stride_dqt + h64 * stride_dqh + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=ld_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, cu_seqlens_q, cu_seqlens_k, Work, n_work, n_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lh,
    sm_scale, qk_scale, left, right,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SCHEDULE: tl.constexpr, USE_TMA: tl.constexpr,
):
    """dQ; grid (q blocks, batch, Hq) with the heaviest block first, or a sorted work list."""
    if SCHEDULE == 0:
        _bwd_dq_tile(
            Q, K, V, DOut, Lse, Delta, DQ, cu_seqlens_q, cu_seqlens_k,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
            stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lh,
            sm_scale, qk_scale, left, right, tl.program_id(1), tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(2),
            GROUPS, HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT, DOT_PREC, BLOCK_M, BLOCK_N, USE_TMA,
        )
    elif SCHEDULE == 1:
        b, pid_m, h = _work_item(Work, tl.program_id(0), n_heads)
        if b >= 0:
            _bwd_dq_tile(
                Q, K, V, DOut, Lse, Delta, DQ, cu_seqlens_q, cu_seqlens_k,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lh,
                sm_scale, qk_scale, left, right, b, pid_m, h,
                GROUPS, HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT, DOT_PREC, BLOCK_M, BLOCK_N, USE_TMA,
            )
    else:
        for w in range(tl.program_id(0), n_work, tl.num_programs(0)):
            b, pid_m, h = _work_item(Work, w, n_heads)
            if b >= 0:
                _bwd_dq_tile(
                    Q, K, V, DOut, Lse, Delta, DQ, cu_seqlens_q, cu_seqlens_k,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lh,
                    sm_scale, qk_scale, left, right, b, pid_m, h,
                    GROUPS, HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT, DOT_PREC, BLOCK_M, BLOCK_N, USE_TMA,
                )


# --------------------------------------------------------------------------------------
# Block sizes and (optional) autotuning
# --------------------------------------------------------------------------------------


def _autotune_enabled() -> bool:
    return os.environ.get("LONGVITA_AUTOTUNE", "0") == "1" and not triton_interpret()


def _fixed_config(kind: str, block_d: int, even_d: bool, fp32: bool = False,
                  variant: AttentionVariant = launch_table.DEFAULT) -> dict:
    """Fixed launch parameters: tiny in the interpreter; on a GPU the launch table's config
    for 16-bit inputs with an even head dim, else chosen by reasoning. ``even_d``: the head
    dim equals ``block_d`` (no padded columns); ``fp32``: fp32 inputs (twice the shared
    memory per tile). ``kind``: 'fwd', 'dkdv', 'dq' or 'bwd_fused'."""
    if triton_interpret():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    if even_d and not fp32:
        cfg = launch_table.table_config(kind, block_d, variant)
        if cfg is not None:
            return cfg
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
    if kind in ("dkdv", "bwd_fused"):
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
    elif kind in ("dkdv", "bwd_fused"):
        shapes = [(32, 128), (32, 64), (64, 64), (64, 128), (16, 64)]
        warps, stages = (4, 8), (1, 2, 3)
    else:
        shapes = [(128, 32), (64, 32), (64, 64), (128, 64), (64, 16)]
        warps, stages = (4, 8), (1, 2, 3)
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n in shapes for w in warps for s in stages
    ]


_TUNE_KEY = ["GROUPS", "HEAD_DIM", "BLOCK_D", "HAS_LEFT", "HAS_RIGHT", "DOT_PREC", "SCHEDULE", "USE_TMA"]
_KERNELS = {"fwd": "_fwd_kernel", "dkdv": "_bwd_dkdv_kernel", "dq": "_bwd_dq_kernel", "bwd_fused": "_bwd_fused_kernel"}


@functools.lru_cache(maxsize=None)
def _tuned(kind: str):
    kernel = globals()[_KERNELS[kind]]
    # the fused backward adds into its dQ buffer: every autotuning trial would add again
    reset = ["DQ"] if kind == "bwd_fused" else None
    return triton.autotune(configs=_tune_configs(kind), key=_TUNE_KEY, reset_to_zero=reset)(kernel)


# --------------------------------------------------------------------------------------
# Schedules: the sorted work list of (document, block) items
# --------------------------------------------------------------------------------------

# Programs per SM of the persistent schedule: the D-128 forward tile takes most of an
# SM's shared memory (229 KB at M128 N128 s3), so one resident program; smaller tiles two.
_PERSISTENT_PER_SM = {128: 1}
_PERSISTENT_PER_SM_OTHER = 2
# The interpreter has no SMs: a few programs still exercise the persistent loop.
_PERSISTENT_PROGRAMS_INTERPRET = 3
_WORK_CACHE: collections.OrderedDict = collections.OrderedDict()
_WORK_CACHE_SIZE = 32


def _work_list(cu_rows: torch.Tensor, cu_cols: torch.Tensor, total_rows: int, block: int,
               query_blocks: bool, left: int, right: int, has_left: bool, has_right: bool) -> torch.Tensor:
    """(items, 2) int32 ``[document, block]`` sorted by cost, heaviest first; -1 documents
    fill the list to its static length ``cdiv(total_rows, block) + batch`` (an upper bound
    on the real items, known without reading ``cu_seqlens`` on the host).

    ``query_blocks``: blocks of queries (forward, dQ; cost = keys the block can see), else
    blocks of keys (dK/dV; cost = queries that can see the block). Built with a few device
    ops, no host sync; cached per (cu_seqlens tensors and their versions, block, window),
    holding the tensors so that their identities stay unique: every layer of a forward
    shares one list."""
    key = (id(cu_rows), cu_rows._version, id(cu_cols), cu_cols._version, total_rows, block, query_blocks,
           left, right, has_left, has_right)
    hit = _WORK_CACHE.get(key)
    if hit is not None:
        _WORK_CACHE.move_to_end(key)
        return hit[2]
    batch = cu_rows.numel() - 1
    n_items = triton.cdiv(total_rows, block) + batch
    lens_r = (cu_rows[1:] - cu_rows[:-1]).long()
    lens_c = (cu_cols[1:] - cu_cols[:-1]).long()
    blocks = (lens_r + block - 1) // block
    ends = torch.cumsum(blocks, 0)
    i = torch.arange(n_items, device=cu_rows.device)
    doc = torch.searchsorted(ends, i, right=True)
    valid = doc < batch
    d = doc.clamp(max=batch - 1)
    blk = i - (ends[d] - blocks[d])
    start = blk * block
    if query_blocks:  # keys visible to rows [start, start + block) (as _kv_block_range)
        len_q, len_k = lens_r[d], lens_c[d]
        first_diag = start + len_k - len_q
        hi = torch.minimum(len_k, first_diag + block + right) if has_right else len_k
        lo = (first_diag - left).clamp(min=0) if has_left else torch.zeros_like(hi)
    else:  # queries that see keys [start, start + block) (as _bwd_dkdv_tile)
        len_k, len_q = lens_r[d], lens_c[d]
        off = len_k - len_q
        lo = (start - off - right).clamp(min=0) if has_right else torch.zeros_like(start)
        hi = torch.minimum(len_q, start + block - off + left) if has_left else len_q
    # + block: loading the block and storing its result costs something even without work
    cost = torch.where(valid, (hi - lo).clamp(min=0) + block, -1)
    order = torch.argsort(cost, descending=True, stable=True)
    items = torch.stack([torch.where(valid, doc, -1), blk], 1)[order].to(torch.int32).contiguous()
    _WORK_CACHE[key] = (cu_rows, cu_cols, items)
    while len(_WORK_CACHE) > _WORK_CACHE_SIZE:
        _WORK_CACHE.popitem(last=False)
    return items


def _persistent_programs(device: torch.device, block_d: int, n_work: int) -> int:
    if device.type != "cuda":
        return max(1, min(n_work, _PERSISTENT_PROGRAMS_INTERPRET))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_work, sms * _PERSISTENT_PER_SM.get(block_d, _PERSISTENT_PER_SM_OTHER)))


# --------------------------------------------------------------------------------------
# TMA descriptors
# --------------------------------------------------------------------------------------


def _descriptor_scratch(size: int, alignment: int, stream):
    """Global memory for device-side tensor descriptors (128 bytes per descriptor and
    program): Triton asks its allocator at launch."""
    return torch.empty(size, dtype=torch.int8, device=_scratch_device[0])


_scratch_device = [torch.device("cpu")]


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether the copy engine can read these THD tensors: 16-byte aligned base and
    16-byte multiples for the token and head strides (a descriptor's base moves by both)."""
    for t in tensors:
        es = t.element_size()
        if t.data_ptr() % 16 or (t.stride(0) * es) % 16 or (t.stride(1) * es) % 16 or t.stride(-1) != 1:
            return False
    return True


def _use_tma(variant: AttentionVariant, *tensors: torch.Tensor) -> bool:
    if not variant.tma or not _tma_ok(*tensors):
        return False
    # Triton asks an allocator for the descriptors' memory at every launch. The allocator is
    # a context variable, so it is set here each time: the backward runs in autograd's thread.
    _scratch_device[0] = tensors[0].device
    triton.set_allocator(_descriptor_scratch)
    return True


def _refuse_broken_on_gpu(variant: AttentionVariant) -> None:
    """'ws' (the warp-specialised forward) compiles, and is exact in the interpreter, which
    ignores the specialisation; on an H100 (Triton 3.6, 2026-12-05, benchmarks/RESULTS.md)
    its output was not finite (relative difference inf on the packed 32K causal shape, NaN
    on InternViT's bidirectional tiles) and it was the slowest forward. Refused on a GPU
    until a chip shows it right, before anything is launched."""
    if variant.warp_specialize and not triton_interpret():
        raise ValueError(
            f"attention variant {variant.name!r}: 'ws' is disabled on GPUs (on an H100 with Triton 3.6 it "
            "returned non-finite outputs, benchmarks/RESULTS.md 2026-12-05); use 'tma' or 'default'")


def _schedule_code(variant: AttentionVariant) -> int:
    return {"grid": 0, "sorted": 1, "persistent": 2}[variant.schedule]


def _launch(kind: str, tensors: list, scalars: list, grid_len: int, batch: int, heads: int, consts: dict,
            block_d: int, variant: AttentionVariant, work_args: tuple):
    """Launch one kernel with its fixed config (or through the autotuner when
    LONGVITA_AUTOTUNE=1) on the variant's schedule: ``kernel[grid](*tensors, work list,
    n_work, heads, *scalars, **consts)``. ``work_args``: (cu_rows, cu_cols, total_rows,
    query_blocks, left, right, has_left, has_right) for the work list."""
    kernel = globals()[_KERNELS[kind]]
    schedule = _schedule_code(variant)
    consts = dict(consts, SCHEDULE=schedule)
    grid_axis = "BLOCK_N" if kind in ("dkdv", "bwd_fused") else "BLOCK_M"
    device = tensors[0].device

    def work(block: int):
        """(work list, n_work, grid) for a block size; the plain grid needs no list."""
        if schedule == 0:
            return tensors[0], 0, (triton.cdiv(grid_len, block), batch, heads)
        items = _work_list(work_args[0], work_args[1], work_args[2], block, *work_args[3:])
        n_work = items.shape[0] * heads
        progs = n_work if schedule == 1 else _persistent_programs(device, block_d, n_work)
        return items, n_work, (progs,)

    if _autotune_enabled():
        # the work list depends on the block size, which the autotuner picks per trial
        if schedule != 0:
            raise RuntimeError(f"LONGVITA_AUTOTUNE=1 runs the 'grid' schedule only; unset {launch_table.ENV} "
                               "or LONGVITA_AUTOTUNE")
        _tuned(kind)[lambda meta: work(meta[grid_axis])[2]](*tensors, tensors[0], 0, heads, *scalars, **consts)
        return
    cfg = _fixed_config(kind, block_d, consts["HEAD_DIM"] == block_d, consts["DOT_PREC"] == "ieee", variant)
    items, n_work, grid = work(cfg[grid_axis])
    kernel[grid](*tensors, items, n_work, heads, *scalars, **consts, **cfg)


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
    variant: str | AttentionVariant | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. Returns out (total_q, Hq, D) in q's dtype and lse (Hq, total_q) fp32.
    ``variant``: a name as in ``launch_table`` (None: environment, then the launch table)."""
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
    var = launch_table.variant_for("fwd", block_d, causal, variant)
    _refuse_broken_on_gpu(var)
    out = torch.zeros_like(q)
    lse = torch.full((hq, total_q), -math.inf, dtype=torch.float32, device=q.device)
    if total_q == 0 or batch == 0 or max_seqlen_q == 0 or hq == 0:
        return out, lse
    tensors = [q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k]
    scalars = [
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        softmax_scale * LOG2E.value, left, right,
    ]
    use_tma = _use_tma(var, q, k, v, out)
    consts = dict(
        GROUPS=hq // hkv, HEAD_DIM=d, BLOCK_D=block_d, HAS_LEFT=has_left, HAS_RIGHT=has_right,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 inputs: no TF32 rounding
        USE_TMA=use_tma, WARP_SPEC=var.warp_specialize and use_tma,  # specialisation needs TMA loads
    )
    work = (cu_seqlens_q, cu_seqlens_k, total_q, True, left, right, has_left, has_right)
    _launch("fwd", tensors, scalars, max_seqlen_q, batch, hq, consts, block_d, var, work)
    return out, lse


def varlen_attention_bwd_triton(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int,
    softmax_scale: float, causal: bool, window_size: tuple[int, int],
    dlse: torch.Tensor | None = None,
    variant: str | AttentionVariant | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward (preprocess, then dK/dV and dQ, or the fused kernel). Returns
    dq, dk, dv in the inputs' dtypes. ``variant``: as in the forward."""
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
    var = launch_table.variant_for("bwd", block_d, causal, variant)
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
        USE_TMA=_use_tma(var, q, k, v, dout),
    )
    qk_scale = softmax_scale * LOG2E.value
    common = [
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1),
    ]
    kv_work = (cu_seqlens_k, cu_seqlens_q, total_k, False, left, right, has_left, has_right)
    if var.fused_bwd:
        # dQ gathers contributions from every key block: an fp32 buffer the kernel adds
        # into (zeroed here, so rows past cu_seqlens_q[-1] stay 0), rounded once at the end
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        tensors = [q, k, v, dout, lse, delta, dk, dv, dq_acc, cu_seqlens_q, cu_seqlens_k]
        scalars = [*common, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), dq_acc.stride(0),
                   dq_acc.stride(1), lse.stride(0), softmax_scale, qk_scale, left, right]
        _launch("bwd_fused", tensors, scalars, max_seqlen_k, batch, hkv, consts, block_d, var, kv_work)
        return (dq_acc if q.dtype == torch.float32 else dq_acc.to(q.dtype)), dk, dv
    tensors = [q, k, v, dout, lse, delta, dk, dv, dq, cu_seqlens_q, cu_seqlens_k]
    scalars = [*common, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), 0, 0, lse.stride(0),
               softmax_scale, qk_scale, left, right]
    _launch("dkdv", tensors, scalars, max_seqlen_k, batch, hkv, consts, block_d, var, kv_work)
    tensors = [q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k]
    scalars = [*common, dq.stride(0), dq.stride(1), lse.stride(0), softmax_scale, qk_scale, left, right]
    q_work = (cu_seqlens_q, cu_seqlens_k, total_q, True, left, right, has_left, has_right)
    _launch("dq", tensors, scalars, max_seqlen_q, batch, hq, consts, block_d, var, q_work)
    return dq, dk, dv
