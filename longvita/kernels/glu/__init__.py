"""Fused SwiGLU, ``silu(gate) * up``: ``api.py`` (public function, checks, autograd.Function,
custom ops), ``triton.py`` (GPU kernels), ``torch.py`` (the CPU path)."""

from longvita.kernels.glu.api import swiglu  # noqa: F401

__all__ = ["swiglu"]
