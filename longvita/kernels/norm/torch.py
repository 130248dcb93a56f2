"""The torch path of RMSNorm (CPU tensors, float64, or ``backend='torch'``): Qwen2's formula
in plain torch ops, differentiated by autograd."""

from __future__ import annotations

import torch


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None):
    """``weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype)`` after ``x = x + residual``
    when a residual is given; returns y, or (y, x + residual)."""
    h = x + residual if residual is not None else x
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    hf = h.to(acc)
    y = weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return (y, h) if residual is not None else y
