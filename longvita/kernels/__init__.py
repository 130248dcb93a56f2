"""longvita's kernels. One layout per family: ``X.py`` holds the public function ->
autograd.Function -> custom ops (for torch.compile) and the torch / C++ paths;
``X_triton.py`` holds the Triton kernels and their launchers, imported only when the
Triton backend runs (so this package imports without triton); ``reference.py`` holds
the plain-torch references, the definition of correct. ``_backend.resolve`` picks the
backend of every family. This package never imports ``model`` or ``dist``.
"""

from longvita.kernels.varlen_attention import (  # noqa: F401
    varlen_attention,
    varlen_attention_bwd,
    varlen_attention_fwd,
)

__all__ = ["varlen_attention", "varlen_attention_fwd", "varlen_attention_bwd"]

from longvita.kernels.lm_head import (  # noqa: F401,E402
    LCEParams,
    gather_logits,
    last_token_index,
    linear_cross_entropy,
)

__all__ += ["last_token_index", "gather_logits", "linear_cross_entropy", "LCEParams"]

from longvita.kernels.pixel_shuffle import (  # noqa: E402,F401
    pixel_shuffle_layernorm,
    pixel_shuffle_project,
)

__all__ += ["pixel_shuffle_project", "pixel_shuffle_layernorm"]

from longvita.kernels.lse_merge import lse_merge_  # noqa: E402,F401

__all__ += ["lse_merge_"]
