"""Fused RMSNorm with an optional residual add: ``api.py`` (public function, checks,
autograd.Function, custom ops), ``triton.py`` (GPU kernels), ``torch.py`` (the CPU path)."""

from longvita.kernels.norm.api import rms_norm  # noqa: F401

__all__ = ["rms_norm"]
