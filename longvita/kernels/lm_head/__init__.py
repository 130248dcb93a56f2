"""Gather-then-project LM head and fused linear cross-entropy: ``api.py`` (public functions,
autograd.Functions, custom ops), ``inputs.py`` (their argument checks), ``chunks.py`` (the
chunk loop of GEMMs around the row kernel that both backends run: its memory, speed and
precision), ``triton.py`` (the GPU row kernel), ``torch.py`` (the CPU row maths)."""

from longvita.kernels.lm_head.api import (  # noqa: F401
    LCEParams,
    gather_logits,
    last_token_index,
    linear_cross_entropy,
)

__all__ = ["LCEParams", "gather_logits", "last_token_index", "linear_cross_entropy"]
