"""The torch path of the pixel-shuffle family (any device and dtype; the C++ CPU path of
``longvita._C`` is faster on CPU where built): the index map of the shuffle, and the
shuffle + LayerNorm as a gather through it, differentiated by autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pixel_shuffle_source_index(h: int, scale_factor: float = 0.5, device=None) -> torch.Tensor:
    """The index map as a tensor: (h*h*s^2, 1/s^2) source token of every (output row, slot).

    ``x[:, idx].flatten(2)`` equals ``pixel_shuffle_reference(x, scale_factor)``; the kernels
    compute the same map on the fly.
    """
    inv = round(1.0 / scale_factor)
    if inv < 1 or abs(inv * scale_factor - 1.0) > 1e-6:
        raise ValueError(f"scale_factor must be 1/k for an integer k >= 1 (e.g. 0.5), got {scale_factor!r}")
    w_out = h // inv
    r = torch.arange(w_out * w_out, device=device)[:, None]
    s = torch.arange(inv * inv, device=device)[None, :]
    return (inv * (r // w_out) + s // inv) * h + inv * (r % w_out) + s % inv


def torch_shuffle_layernorm(x, ln_weight, ln_bias, eps: float, inv: int) -> torch.Tensor:
    """The 'torch' backend: the shuffle as a gather through the index map (the reference
    reshapes and permutes instead), then ``F.layer_norm``; autograd gives the backward."""
    tiles, n_tok, c = x.shape
    idx = pixel_shuffle_source_index(math.isqrt(n_tok), 1.0 / inv, device=x.device)  # (rows, inv^2)
    y = x[:, idx].reshape(tiles, idx.shape[0], inv * inv * c)  # (tiles, rows, inv^2*C)
    return F.layer_norm(y, (y.shape[-1],), ln_weight, ln_bias, eps)
