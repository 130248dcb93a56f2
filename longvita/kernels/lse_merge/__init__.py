"""Merge of partial attention results through their LSE: ``api.py`` (public function, checks,
custom op), ``triton.py`` (GPU kernel), ``torch.py`` (the CPU path)."""

from longvita.kernels.lse_merge.api import lse_merge_  # noqa: F401

__all__ = ["lse_merge_"]
