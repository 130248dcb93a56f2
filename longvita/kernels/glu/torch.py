"""The torch path of SwiGLU (CPU tensors, float64, or ``backend='torch'``): ``F.silu(gate) *
up``, differentiated by autograd."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
