"""Triton kernel and launcher of the fused rotary embedding of q and k (``rope/api.py``).

Imported only when the Triton backend runs. One kernel does q and k, forward and backward:
a program owns ``BLOCK_T`` tokens, loads their cos/sin rows once (both halves, so any
(tokens, D) table works, not only ``cat(freqs, freqs)``), and walks the heads of q, then of
k, ``HEADS`` at a time as (BLOCK_T, HEADS, D/2) tiles of the two halves:

    forward:   o1 = x1 c1 - x2 s1,   o2 = x2 c2 + x1 s2      (x = (x1, x2), rotate-half)
    backward:  d1 = g1 c1 + g2 s2,   d2 = g2 c2 - g1 s1      (the transpose of that rotation)

in fp32, rounded once to the output's dtype. Memory traffic: q and k read and written once,
the tables read once per token (eager reads them once per head, through a broadcast, and
materialises the rotated copy, two products and the sum). Allocates only the outputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longvita.kernels._backend import triton_interpret

# Elements of one (BLOCK_T, HEADS, D/2) half-tile: 2048 values are 8 per thread at 8 warps
# for each of the four operand tiles.
_TILE_ELEMS = 2048


@triton.jit
def _rope_heads(
    X, O, stride_xt, stride_xh, stride_ot, stride_oh, n_heads,
    tok, tok_ok, c1, s1, c2, s2, d,
    HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr,
):
    """Rotate every head of one tensor for the program's tokens; c1..s2: (BLOCK_T, 1, BLOCK_HALF)."""
    dmask = d < HALF
    for h0 in range(0, n_heads, HEADS):
        h = h0 + tl.arange(0, HEADS)
        mask = tok_ok[:, None, None] & (h < n_heads)[None, :, None] & dmask[None, None, :]
        x_off = tok[:, None, None] * stride_xt + h.to(tl.int64)[None, :, None] * stride_xh + d[None, None, :]
        o_off = tok[:, None, None] * stride_ot + h.to(tl.int64)[None, :, None] * stride_oh + d[None, None, :]
        x1 = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + x_off + HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        tl.store(O + o_off, o1.to(O.dtype.element_ty), mask=mask)
        tl.store(O + o_off + HALF, o2.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _rope_qk_kernel(
    Q, K, QO, KO, Cos, Sin,
    n_tokens, n_q_heads, n_k_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_ct, stride_st,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr,
    HEADS_Q: tl.constexpr, HEADS_K: tl.constexpr, BACKWARD: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    tok_ok = tok < n_tokens
    d = tl.arange(0, BLOCK_HALF)
    tmask = tok_ok[:, None] & (d < HALF)[None, :]
    c_ptr = Cos + tok[:, None] * stride_ct + d[None, :]
    s_ptr = Sin + tok[:, None] * stride_st + d[None, :]
    c1 = tl.load(c_ptr, mask=tmask, other=0.0).to(tl.float32)[:, None, :]
    c2 = tl.load(c_ptr + HALF, mask=tmask, other=0.0).to(tl.float32)[:, None, :]
    s1 = tl.load(s_ptr, mask=tmask, other=0.0).to(tl.float32)[:, None, :]
    s2 = tl.load(s_ptr + HALF, mask=tmask, other=0.0).to(tl.float32)[:, None, :]
    _rope_heads(Q, QO, stride_qt, stride_qh, stride_qot, stride_qoh, n_q_heads, tok, tok_ok, c1, s1, c2, s2, d,
                HEADS_Q, HALF, BLOCK_HALF, BACKWARD)
    _rope_heads(K, KO, stride_kt, stride_kh, stride_kot, stride_koh, n_k_heads, tok, tok_ok, c1, s1, c2, s2, d,
                HEADS_K, HALF, BLOCK_HALF, BACKWARD)


def _launch(q, k, qo, ko, cos, sin, backward: bool) -> None:
    n_tokens, hq, dim = q.shape
    hk = k.shape[1]
    half = dim // 2
    block_half = triton.next_power_of_2(half)
    heads_q = min(triton.next_power_of_2(hq), max(1, _TILE_ELEMS // block_half))
    heads_k = min(triton.next_power_of_2(hk), max(1, _TILE_ELEMS // block_half))
    block_t = max(1, min(16, _TILE_ELEMS // (block_half * max(heads_q, heads_k))))
    if triton_interpret():
        block_t = min(block_t, 4)  # the interpreter: small tiles, several programs
    _rope_qk_kernel[(triton.cdiv(n_tokens, block_t),)](
        q, k, qo, ko, cos, sin, n_tokens, hq, hk,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1), cos.stride(0), sin.stride(0),
        HALF=half, BLOCK_HALF=block_half, BLOCK_T=block_t, HEADS_Q=heads_q, HEADS_K=heads_k,
        BACKWARD=backward, num_warps=4 if block_t * block_half * max(heads_q, heads_k) <= 1024 else 8,
    )


def rope_qk_triton(q, k, cos, sin, backward: bool = False):
    """``(rope(q), rope(k))`` (or, ``backward``, the gradients from the outputs' gradients
    passed as q and k), in q's and k's dtypes. Last dims contiguous; checked by the caller."""
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q.shape[0] == 0:
        return qo, ko
    _launch(q, k, qo, ko, cos, sin, backward)
    return qo, ko
