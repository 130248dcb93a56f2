"""Fused pixel-shuffle projector: ``api.py`` (public functions, checks, autograd.Function,
custom ops, launchers of the C++/CUDA kernels of ``longvita._C``), ``triton.py`` (GPU
kernels), ``torch.py`` (the torch path and the shuffle's index map)."""

from longvita.kernels.pixel_shuffle.api import pixel_shuffle_layernorm, pixel_shuffle_project  # noqa: F401
from longvita.kernels.pixel_shuffle.torch import pixel_shuffle_source_index  # noqa: F401

__all__ = ["pixel_shuffle_layernorm", "pixel_shuffle_project", "pixel_shuffle_source_index"]
