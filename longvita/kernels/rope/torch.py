"""The torch path of the rotary embedding (CPU tensors, float64, or ``backend='torch'``): the
rotate-half formula in torch ops, differentiated by autograd."""

from __future__ import annotations

import torch


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


def apply_rope_qk_torch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """``(rope(q), rope(k))`` in q's and k's dtypes."""
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
