"""A float64 attention oracle whose mask is written element by element from flash-attn's
rule, independent of ``reference._visible_mask`` (tests of windows use it)."""

from __future__ import annotations

import math

import torch

from longvita.kernels import reference as ref


def dense_masked_attention(q, k, v, cu_q, cu_k, scale, left, right, causal):
    """float64 attention with the mask built element by element from flash-attn's rule:
    query i of a document sees key j when i + Lk - Lq - left <= j <= i + Lk - Lq + right
    (a bound of -1 is unlimited) and, when causal, j <= i + Lk - Lq."""
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), -math.inf, dtype=torch.float64, device=q.device)
    groups = q.shape[1] // k.shape[1]
    for q0, q1, k0, k1 in ref._doc_ranges(cu_q, cu_k):
        lq, lk = q1 - q0, k1 - k0
        mask = torch.zeros(lq, lk, dtype=torch.bool)
        for i in range(lq):
            for j in range(lk):
                d = i + lk - lq
                mask[i, j] = (left < 0 or j >= d - left) and (right < 0 or j <= d + right) and (not causal or j <= d)
        if lq == 0 or lk == 0:
            continue
        mask = mask.to(q.device)
        kr = k[k0:k1].double().repeat_interleave(groups, 1)
        vr = v[k0:k1].double().repeat_interleave(groups, 1)
        s = torch.einsum("qhd,khd->hqk", q[q0:q1].double(), kr) * scale
        s = s.masked_fill(~mask, -math.inf)
        lse_d = torch.logsumexp(s, -1)
        p = torch.exp(s - torch.where(torch.isinf(lse_d), 0, lse_d)[..., None])
        out[q0:q1] = torch.einsum("hqk,khd->qhd", p, vr)
        lse[:, q0:q1] = lse_d
    return out, lse
