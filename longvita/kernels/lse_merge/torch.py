"""The torch path of the LSE merge (CPU tensors, float64, or ``backend='torch'``): the
stable formula of ``api.py``, in place, in the accumulators' dtype."""

from __future__ import annotations

import math

import torch


def lse_merge_torch_(out_acc, lse_acc, out_b, lse_b):
    """``(out_acc, lse_acc)`` merged with ``(out_b, lse_b)`` in place; returns them."""
    hi = torch.maximum(lse_acc, lse_b)
    lo = torch.minimum(lse_acc, lse_b)
    empty = hi == -math.inf
    # shift by 0 instead of -inf in empty rows, so no -inf - -inf is ever formed
    w_b = torch.sigmoid(lse_b - torch.where(empty, 0.0, lse_acc)).t().unsqueeze(-1)  # (T, H, 1)
    out_acc.add_(w_b * (out_b.to(out_acc.dtype) - out_acc))
    lse_acc.copy_(hi + torch.log1p(torch.exp(lo - torch.where(empty, 0.0, hi))))
    return out_acc, lse_acc
