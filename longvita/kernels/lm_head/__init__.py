"""Gather-then-project LM head and fused linear cross-entropy: ``api.py`` (public functions,
checks, autograd.Functions, custom ops), ``triton.py`` (GPU kernels), ``torch.py`` (the CPU path)."""

from longvita.kernels.lm_head.api import (  # noqa: F401
    LCEParams,
    gather_logits,
    last_token_index,
    linear_cross_entropy,
)

__all__ = ["LCEParams", "gather_logits", "last_token_index", "linear_cross_entropy"]
