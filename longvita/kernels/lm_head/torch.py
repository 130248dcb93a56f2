"""The torch path of the fused linear cross-entropy (CPU, float64, or ``backend='torch'``):
the per-row maths of ``lm_head/triton.py``'s ``_lce_rows_kernel`` in torch ops, on one
chunk of logits at a time (the chunk loop, its GEMMs and the byte budgets are shared
with the Triton path: ``api.py``). It holds a few accumulation-dtype copies of the chunk
(fp32, fp64 for fp64 inputs), which the torch path's chunk budget accounts for.
"""

from __future__ import annotations

import torch

# The modes of the per-row operation, as in lm_head/triton.py.
MODE_LOSS, MODE_FUSED, MODE_GRAD = 0, 1, 2


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of a head computed in ``dtype``: float64 stays float64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def torch_rows(logits, labels, mode, params, *, loss_out=None, lse_out=None, lse_in=None,
               g_loss=None, g_lse=None, scale=None):
    """Per-row loss / lse of a chunk of raw logits (C, V), and for the gradient modes the
    gradient of the loss with respect to them, written into ``logits`` in place (rounded
    once to its dtype). The formulas are ``_lce_rows_kernel``'s (lm_head/triton.py)."""
    acc = acc_dtype(logits.dtype)
    vocab = logits.shape[1]
    eps, z, cap = float(params.label_smoothing), float(params.z_loss), params.softcap
    valid = labels != params.ignore_index  # (C,)
    y = torch.where(valid, labels, 0).unsqueeze(1)  # (C, 1)
    zero = torch.zeros((), dtype=acc, device=logits.device)

    x = logits.to(acc)  # (C, V): the chunk in the accumulation dtype (the same tensor if already so)
    t = None
    if cap is not None:
        t = torch.tanh(x / cap)
        x = t * cap
    if mode == MODE_GRAD:
        lse = lse_in
        gl, gz = g_loss, g_lse
    else:
        lse = torch.logsumexp(x, dim=1)  # (C,)
        loss = lse - (1.0 - eps) * x.gather(1, y).squeeze(1)
        if eps:
            loss = loss - eps / vocab * x.sum(1)
        if z:
            loss = loss + z * lse * lse
        loss_out.copy_(torch.where(valid, loss, zero))
        if mode == MODE_LOSS:
            lse_out.copy_(torch.where(valid, lse, zero))
            return
        gl = scale.to(acc).expand(lse.shape)
        gz = zero.expand(lse.shape)
    coef_p = gl + gz
    if z:
        coef_p = coef_p + 2.0 * z * lse * gl
    d = (x - lse.unsqueeze(1)).exp_().mul_(coef_p.unsqueeze(1))  # softmax * coefficient
    d.scatter_add_(1, y, -(1.0 - eps) * gl.unsqueeze(1))
    if eps:
        d.sub_((eps / vocab) * gl.unsqueeze(1))
    if t is not None:
        d.mul_(1.0 - t * t)
    d = torch.where(valid.unsqueeze(1), d, zero)  # also drops an inf * 0 of an ignored row
    logits.copy_(d)
