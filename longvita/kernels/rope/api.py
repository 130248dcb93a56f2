"""Fused rotary embedding of q and k: public function -> autograd.Function -> launcher.

``apply_rope_qk(q, k, cos, sin)`` applies the rotate-half RoPE of Qwen2
(``longvita.model.text.apply_rope``; ``reference.rope_reference`` is the definition) to q
and k in one launch: ``x * cos + cat(-x2, x1) * sin`` per head, with the (tokens, D) tables
the decoder builds once per forward (``rope_cos_sin``). Outputs are new tensors in q's and
k's dtypes (the decoder casts the rotated q and k back to the projections' dtype anyway);
the arithmetic is fp32 and rounds once, where eager rounds the rotated copy, both products
and their sum in the promoted dtype.

The backward is the same kernel with the rotation transposed; the tables get no gradient
(they come from position ids), so a table that requires one is refused rather than
silently left without it. ``rope/triton.py`` states the scheme and its memory.

Backends (``backend=`` or ``LONGVITA_BACKEND``, resolved by ``_backend.resolve``):
'triton' (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``), 'torch' (``torch.py``,
autograd; CPU, float64). Under torch.compile the launcher runs as the custom op
``longvita::rope_qk``.
"""

from __future__ import annotations

import torch

from longvita.kernels._backend import resolve
from longvita.kernels.rope.torch import apply_rope_qk_torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(q, k, cos, sin) -> None:
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (tokens, heads, head_dim), got shape {tuple(t.shape)}")
    tokens, _, dim = q.shape
    if k.shape[0] != tokens or k.shape[2] != dim:
        raise ValueError(f"k must be (tokens={tokens}, heads, head_dim={dim}) like q, got {tuple(k.shape)}")
    if dim % 2:
        raise ValueError(f"q's head_dim must be even (rotate-half pairs its halves), got {dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (tokens, dim):
            raise ValueError(f"{name} must be (tokens, head_dim) = {(tokens, dim)}, got {tuple(t.shape)}")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} requires grad: the fused RoPE does not differentiate its tables "
                             "(build them from position ids, or detach them)")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rope_qk(q, k, cos, sin, backward: bool = False):
    """Launcher: the Triton kernel on (tokens, heads, D) views with contiguous last dims."""
    from longvita.kernels.rope.triton import rope_qk_triton

    return rope_qk_triton(*(_last_dim_contiguous(t) for t in (q, k, cos, sin)), backward=backward)


@torch.library.custom_op("longvita::rope_qk", mutates_args=())
def _rope_qk_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_qk(q, k, cos, sin, backward)


@_rope_qk_op.register_fake
def _(q, k, cos, sin, backward):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k, memory_format=torch.contiguous_format)


class _RopeQK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        run = _rope_qk_op if torch.compiler.is_compiling() else rope_qk
        qo, ko = run(q, k, cos, sin, False)
        ctx.save_for_backward(cos, sin)
        return qo, ko

    @staticmethod
    def backward(ctx, dqo, dko):
        cos, sin = ctx.saved_tensors  # an unused output's gradient arrives as zeros (materialised)
        run = _rope_qk_op if torch.compiler.is_compiling() else rope_qk
        dq, dk = run(dqo, dko, cos, sin, True)
        return dq, dk, None, None


def apply_rope_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding (rotate-half) of q and k in one pass.

    Args:
        q: (tokens, Hq, D); k: (tokens, Hkv, D); D even.
        cos, sin: (tokens, D) tables (``model.text.rope_cos_sin``), any floating dtype;
            they get no gradient.
        backend: None/'auto', 'torch' or 'triton' (``longvita.kernels._backend``).

    Returns:
        (q_rot, k_rot) with q's and k's shapes and dtypes. Differentiable in q and k.
    """
    _check(q, k, cos, sin)
    dtype = torch.float64 if torch.float64 in (q.dtype, k.dtype, cos.dtype, sin.dtype) else q.dtype
    name = resolve("rope", q.device, dtype, backend)
    if name != "triton" or dtype == torch.float64:
        return apply_rope_qk_torch(q, k, cos, sin)
    return _RopeQK.apply(q, k, cos, sin)
