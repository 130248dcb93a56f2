"""longvita's kernels: seven families with one anatomy (docs/architecture.md, "One kernel
family's anatomy"). ``<family>/api.py`` holds the public function, its checks, the
autograd.Function and the torch.library custom ops; ``<family>/triton.py`` the Triton
kernels and launchers, imported only when the Triton backend runs (so this package
imports without triton); ``<family>/torch.py`` the torch path that CPU tensors run.
``reference.py`` holds the plain-torch references, the definition of correct.
``_backend.resolve`` picks the backend of every family. This package never imports
``model`` or ``parallel``.

The family packages (``attention``, ``lm_head``, ``pixel_shuffle``, ``lse_merge``, and the
decoder's ``norm`` (``rms_norm``), ``rope`` (``apply_rope_qk``), ``glu`` (``swiglu``)) are
named apart from the functions re-exported here, so ``longvita.kernels.varlen_attention``
is the function and ``longvita.kernels.attention`` its module (a package named as its
function would be shadowed by it: ``import longvita.kernels.rms_norm`` would give the
function). The dispatch keys of ``_backend`` stay the functions' names.
"""

from longvita.kernels.attention import varlen_attention, varlen_attention_bwd, varlen_attention_fwd  # noqa: F401
from longvita.kernels.lm_head import LCEParams, gather_logits, last_token_index, linear_cross_entropy  # noqa: F401
from longvita.kernels.lse_merge import lse_merge_  # noqa: F401
from longvita.kernels.pixel_shuffle import pixel_shuffle_layernorm, pixel_shuffle_project  # noqa: F401
from longvita.kernels.norm import rms_norm  # noqa: F401
from longvita.kernels.rope import apply_rope_qk  # noqa: F401
from longvita.kernels.glu import swiglu  # noqa: F401

__all__ = [
    "varlen_attention", "varlen_attention_fwd", "varlen_attention_bwd",
    "last_token_index", "gather_logits", "linear_cross_entropy", "LCEParams",
    "pixel_shuffle_project", "pixel_shuffle_layernorm",
    "lse_merge_",
    "rms_norm", "apply_rope_qk", "swiglu",
]
