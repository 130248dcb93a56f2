"""Varlen packed attention (flash-attn's varlen API): ``api.py`` (public functions, checks,
autograd.Function, custom ops), ``triton.py`` (GPU kernels), ``torch.py`` (the CPU path)."""

from longvita.kernels.attention.api import (  # noqa: F401
    check_qkv,
    varlen_attention,
    varlen_attention_bwd,
    varlen_attention_fwd,
)

__all__ = ["check_qkv", "varlen_attention", "varlen_attention_bwd", "varlen_attention_fwd"]
