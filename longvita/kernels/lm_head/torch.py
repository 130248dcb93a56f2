"""The torch path of the LM head (CPU, float64, or ``backend='torch'``): the fused linear
cross-entropy's maths over chunks of rows, each chunk materialising at most
``params.torch_chunk_bytes`` of logits (see ``api.py`` for the scheme and the options).
"""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of a head computed in ``dtype``: float64 stays float64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(vocab: int, params) -> int:
    return max(1, params.torch_chunk_bytes // (4 * vocab))


def torch_forward(hidden, weight, labels, params):
    m, vocab = hidden.shape[0], weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    loss = torch.empty(m, dtype=acc, device=hidden.device)
    lse = torch.empty(m, dtype=acc, device=hidden.device)
    step = _chunk_rows(vocab, params)
    for s in range(0, m, step):
        e = min(s + step, m)
        logits = (hidden[s:e] @ weight.t()).to(acc)  # (chunk, V): the only logits held
        y = labels[s:e]
        valid = y != params.ignore_index
        lse_c = torch.logsumexp(logits, dim=1)
        target = logits.gather(1, torch.where(valid, y, 0).unsqueeze(1)).squeeze(1)
        lse[s:e] = lse_c
        loss[s:e] = torch.where(valid, lse_c - target, torch.zeros((), dtype=acc, device=hidden.device))
        del logits
    return loss, lse


def torch_backward(hidden, weight, labels, lse, g_loss, g_lse, params, need_h, need_w):
    m, vocab = hidden.shape[0], weight.shape[0]
    acc = lse.dtype
    dh = torch.empty_like(hidden) if need_h else None
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None  # fp32 accumulator
    step = _chunk_rows(vocab, params)
    for s in range(0, m, step):
        e = min(s + step, m)
        h = hidden[s:e]
        y = labels[s:e]
        d = (h @ weight.t()).to(acc)  # (chunk, V) logits, recomputed
        d.sub_(lse[s:e, None]).exp_().mul_((g_loss[s:e] + g_lse[s:e])[:, None])  # softmax * (gl + gz)
        d.scatter_add_(1, torch.where(y != params.ignore_index, y, 0).unsqueeze(1), -g_loss[s:e, None])
        d = d.to(hidden.dtype)
        if need_h:
            dh[s:e] = d @ weight
        if need_w:
            dw += (d.t() @ h).to(acc)
        del d
    if need_w and dw.dtype != weight.dtype:
        dw = dw.to(weight.dtype)
    return dh, dw
