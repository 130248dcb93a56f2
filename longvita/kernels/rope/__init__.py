"""Fused rotary embedding of q and k: ``api.py`` (public function, checks, autograd.Function,
custom ops), ``triton.py`` (GPU kernel), ``torch.py`` (the CPU path)."""

from longvita.kernels.rope.api import apply_rope_qk  # noqa: F401

__all__ = ["apply_rope_qk"]
