"""Varlen packed attention on the CPU, the blocked path: flash-attention's online softmax
written with torch ops, for what torch's fused CPU kernel does not compute (windows,
float64) and for a torch whose fused kernel fails its one-time probe. ``attention/torch.py``
(the 'torch' backend) dispatches between this and the fused path; both follow the
semantics stated there, and ``reference.py`` is the definition both are tested against.

Memory: linear in the sequence; one block pair's scores (below) and the outputs.
"""

from __future__ import annotations

import math

import torch

__all__ = ["varlen_attention_bwd_blocked", "varlen_attention_fwd_blocked"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _window(causal: bool, window_size: tuple[int, int]) -> tuple[int, int]:
    """(left, right) with -1 = unlimited; causal limits right to 0, as in flash-attn."""
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    return left, right


# Per document, query blocks against key blocks with an online softmax, so no
# (heads x L x L) score matrix ever exists (a 100K-token prompt would need 150 GB for it).
# Accumulation in fp32 (float64 for float64 inputs). GQA without repeating K/V: a query
# block of Hq heads is laid out as (Hkv, groups * rows, D), so the query heads of one group
# share their K/V head in one batched matmul, and dK / dV of a K/V head sum over its group
# inside that matmul. Key blocks that no row of a query block can see (causal, window) are
# never visited, and the mask is built only for blocks cut by the diagonal or a window edge.
#
# Score elements (heads x query rows x keys) of one block pair: 2^22 fp32 = 16 MiB, with a
# few temporaries of that size per step. Query blocks are at most _BLOCK_M rows (fewer
# with many heads) so that causal skipping pays; key blocks are at least _BLOCK_N keys so
# the Python loop stays short (a 64K-token document is 64 x 64 / 2 block pairs), and grow
# when the query block is small: a decode step (one query row against a long cache) takes
# the whole cache in one or a few blocks.
_SCORE_ELEMS = 1 << 22
_BLOCK_M = 1024
_BLOCK_N = 1024


def _doc_ranges(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor):
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        yield cq[b], cq[b + 1], ck[b], ck[b + 1]


def _block_sizes(len_q: int, heads: int) -> tuple[int, int]:
    heads = max(heads, 1)  # zero query heads is legal (empty output)
    block_m = max(1, min(len_q, _BLOCK_M, _SCORE_ELEMS // (heads * _BLOCK_N)))
    block_n = max(_BLOCK_N, _SCORE_ELEMS // (heads * block_m))
    return block_m, block_n


def _key_blocks(m0: int, m1: int, len_q: int, len_k: int, left: int, right: int, block_n: int, device):
    """Key blocks [n0, n1) that rows [m0, m1) of a document can see, each with the
    (m1-m0, n1-n0) bool mask of hidden keys, or None where every key is visible."""
    off = len_k - len_q  # bottom-right alignment: row i's diagonal is key i + off
    lo, hi = 0, len_k
    if right >= 0:
        hi = min(hi, m1 - 1 + off + right + 1)
    if left >= 0:
        lo = max(lo, m0 + off - left)
    for n0 in range(lo, hi, block_n):
        n1 = min(n0 + block_n, hi)
        # fully visible when the first row sees the last key and the last row the first key
        full = (right < 0 or n1 - 1 <= m0 + off + right) and (left < 0 or n0 >= m1 - 1 + off - left)
        hidden = None
        if not full:
            diag = torch.arange(m0 + off, m1 + off, device=device)[:, None]
            j = torch.arange(n0, n1, device=device)[None, :]
            if right >= 0:
                hidden = j > diag + right
            if left >= 0:
                hidden = j < diag - left if hidden is None else hidden | (j < diag - left)
        yield n0, n1, hidden


def _heads_first(x: torch.Tensor, hkv: int, acc: torch.dtype) -> torch.Tensor:
    """(rows, Hq, D) -> (Hkv, groups * rows, D) in ``acc``: a group's query heads stacked."""
    rows, hq, d = x.shape
    return x.to(acc).view(rows, hkv, hq // hkv, d).permute(1, 2, 0, 3).reshape(hkv, -1, d)


def _rows_first(x: torch.Tensor, rows: int) -> torch.Tensor:
    """(Hkv, groups * rows, D) -> (rows, Hq, D)."""
    hkv, _, d = x.shape
    return x.view(hkv, -1, rows, d).permute(2, 0, 1, 3).reshape(rows, -1, d)


def varlen_attention_fwd_blocked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    softmax_scale: float, causal: bool, window_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: out (total_q, Hq, D) in q's dtype, lse (Hq, total_q) fp32 (float64 for
    float64 inputs), natural log."""
    hq = q.shape[1]
    hkv = k.shape[1]
    acc = _acc_dtype(q.dtype)
    left, right = _window(causal, window_size)
    out = torch.zeros_like(q)
    lse = torch.full((hq, q.shape[0]), -math.inf, dtype=acc, device=q.device)
    for q0, q1, k0, k1 in _doc_ranges(cu_seqlens_q, cu_seqlens_k):
        len_q, len_k = q1 - q0, k1 - k0
        if len_q == 0 or len_k == 0:
            continue  # no keys: out stays 0, lse stays -inf
        kd = k[k0:k1].to(acc).permute(1, 0, 2).contiguous()  # (Hkv, Lk, D)
        vd = v[k0:k1].to(acc).permute(1, 0, 2).contiguous()
        block_m, block_n = _block_sizes(len_q, hq)
        for m0 in range(0, len_q, block_m):
            m1 = min(m0 + block_m, len_q)
            rows = m1 - m0
            qb = _heads_first(q[q0 + m0:q0 + m1], hkv, acc) * softmax_scale  # (Hkv, G*rows, D)
            m_i = torch.full(qb.shape[:2], -math.inf, dtype=acc, device=q.device)
            l_i = torch.zeros_like(m_i)
            o_i = torch.zeros_like(qb)
            for n0, n1, hidden in _key_blocks(m0, m1, len_q, len_k, left, right, block_n, q.device):
                s = torch.matmul(qb, kd[:, n0:n1].transpose(1, 2))  # (Hkv, G*rows, keys)
                if hidden is not None:
                    s.view(hkv, -1, rows, n1 - n0).masked_fill_(hidden, -math.inf)
                m_new = torch.maximum(m_i, s.amax(-1))
                # a row with no visible key so far keeps m = -inf: shift by 0, not inf - inf
                shift = torch.where(torch.isinf(m_new), 0.0, m_new)
                alpha = torch.exp(m_i - shift)
                p = s.sub_(shift[..., None]).exp_()
                l_i = l_i * alpha + p.sum(-1)
                o_i = torch.baddbmm(o_i * alpha[..., None], p, vd[:, n0:n1])
                m_i = m_new
            empty = l_i == 0  # no visible key: out 0, lse -inf
            l_safe = torch.where(empty, 1.0, l_i)
            out[q0 + m0:q0 + m1] = _rows_first(o_i / l_safe[..., None], rows).to(q.dtype)
            lse[:, q0 + m0:q0 + m1] = torch.where(empty, -math.inf, m_i + torch.log(l_safe)).view(hq, rows)
    return out, lse


def varlen_attention_bwd_blocked(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    softmax_scale: float, causal: bool, window_size: tuple[int, int],
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward from the saved (out, lse): dq, dk, dv in the inputs' dtypes.

    Per block pair: P = exp(S - lse), dV += P^T dO, dS = P * (dO V^T - Delta),
    dQ += dS K, dK += dS^T Q (both times the scale), Delta = rowsum(dO * O) - dlse.
    dK / dV of a document accumulate in (Hkv, Lk, D) buffers, in a fixed order.
    """
    hq = q.shape[1]
    hkv = k.shape[1]
    acc = _acc_dtype(q.dtype)
    left, right = _window(causal, window_size)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for q0, q1, k0, k1 in _doc_ranges(cu_seqlens_q, cu_seqlens_k):
        len_q, len_k = q1 - q0, k1 - k0
        if len_q == 0 or len_k == 0:
            continue
        kd = k[k0:k1].to(acc).permute(1, 0, 2).contiguous()  # (Hkv, Lk, D)
        vd = v[k0:k1].to(acc).permute(1, 0, 2).contiguous()
        dkd = torch.zeros_like(kd)
        dvd = torch.zeros_like(vd)
        block_m, block_n = _block_sizes(len_q, hq)
        for m0 in range(0, len_q, block_m):
            m1 = min(m0 + block_m, len_q)
            rows = m1 - m0
            qb = _heads_first(q[q0 + m0:q0 + m1], hkv, acc) * softmax_scale  # (Hkv, G*rows, D)
            dob = _heads_first(dout[q0 + m0:q0 + m1], hkv, acc)
            ob = _heads_first(out[q0 + m0:q0 + m1], hkv, acc)
            lse_b = lse[:, q0 + m0:q0 + m1].to(acc).reshape(hkv, -1)  # (Hkv, G*rows)
            finite = torch.isfinite(lse_b)
            delta = (dob * ob).sum(-1)
            if dlse is not None:
                delta = delta - dlse[:, q0 + m0:q0 + m1].to(acc).reshape(hkv, -1)
            # rows that see no key (lse = -inf) get P = 0: subtract +inf, and a finite Delta
            delta = torch.where(finite, delta, 0.0)
            lse_b = torch.where(finite, lse_b, math.inf)
            dq_b = torch.zeros_like(qb)
            for n0, n1, hidden in _key_blocks(m0, m1, len_q, len_k, left, right, block_n, q.device):
                kb, vb = kd[:, n0:n1], vd[:, n0:n1]
                s = torch.matmul(qb, kb.transpose(1, 2))  # (Hkv, G*rows, keys)
                if hidden is not None:
                    s.view(hkv, -1, rows, n1 - n0).masked_fill_(hidden, -math.inf)
                p = s.sub_(lse_b[..., None]).exp_()
                dvd[:, n0:n1].baddbmm_(p.transpose(1, 2), dob)
                ds = torch.matmul(dob, vb.transpose(1, 2)).sub_(delta[..., None]).mul_(p)
                dq_b.baddbmm_(ds, kb)
                dkd[:, n0:n1].baddbmm_(ds.transpose(1, 2), qb)  # qb carries the scale
            dq[q0 + m0:q0 + m1] = _rows_first(dq_b * softmax_scale, rows).to(dq.dtype)
        dk[k0:k1] = dkd.permute(1, 0, 2).to(dk.dtype)
        dv[k0:k1] = dvd.permute(1, 0, 2).to(dv.dtype)
    return dq, dk, dv
