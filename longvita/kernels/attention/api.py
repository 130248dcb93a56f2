"""Varlen packed attention: public function -> autograd.Function -> launchers.

THD layout like flash-attn's ``flash_attn_varlen_func``: q (total_q, Hq, D),
k/v (total_k, Hkv, D), int32 ``cu_seqlens``. Causal is bottom-right aligned.

The building blocks ``varlen_attention_fwd`` / ``varlen_attention_bwd`` take and
return ``(out, lse)`` / ``(dq, dk, dv)`` without autograd, so ring attention can call
them per block.

Backends (``backend=`` or ``LONGVITA_BACKEND``, chosen by ``_backend.resolve``):
'triton' (the kernels in ``attention/triton.py``; CUDA tensors, or CPU tensors
under ``TRITON_INTERPRET=1``), 'torch' (``attention/torch.py``, the CPU path: torch's
fused CPU flash-attention kernel for every call without a window, flash-attention's
blocked online softmax in plain torch (``attention/blocked.py``) for windows and
float64; memory linear in the sequence length either way), and
'flash_attn' (the flash-attn package, when importable, for comparison).
float64 inputs always run 'torch', which then computes in float64; so do bfloat16
inputs in Triton's interpreter. There is no CUDA C++ attention: 'cuda' runs Triton.
``reference.py`` holds the plain definition (the whole score matrix per document) that
tests compare every backend against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longvita.kernels._backend import resolve
from longvita.kernels.attention.torch import varlen_attention_bwd_torch, varlen_attention_fwd_torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q, k, v) -> None:
    """Shape/dtype/device checks of THD q, k, v (shared with ring attention)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (tokens, heads, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[2]} and {k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]}) for GQA"
        )


def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_size):
    check_qkv(q, k, v)
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be a 1-D tensor of batch+1 offsets")
        if cu.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {cu.dtype}")
        if cu.device != q.device:
            raise ValueError(f"{name} must be on {q.device}, got {cu.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length, got {cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}"
        )
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(m, int) or isinstance(m, bool) or m < 0:
            raise ValueError(f"{name} must be a non-negative Python int, got {m!r}")
    if len(window_size) != 2:
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}")


def _check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q, max_seqlen_k):
    """Value checks that read cu_seqlens. Only on CPU tensors: on GPU they would sync."""
    for name, cu, total, mx in (
        ("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q),
        ("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k),
    ):
        if cu.device.type != "cpu":
            continue
        # in Python: a decode step's whole attention takes ~0.3 ms on the CPU; these checks
        # as tensor ops took ~50 us of it, on one list they take ~3 us
        offsets = cu.tolist()
        lens = [b - a for a, b in zip(offsets, offsets[1:])]
        if offsets[0] != 0:
            raise ValueError(f"{name} must start at 0, got {offsets[0]}")
        if min(lens) < 0:
            raise ValueError(f"{name} must be non-decreasing, got {offsets}")
        if offsets[-1] > total:
            raise ValueError(f"{name}[-1] = {offsets[-1]} exceeds the {total} packed tokens")
        if max(lens) > mx:
            raise ValueError(f"{name.replace('cu_seqlens', 'max_seqlen')} = {mx} is less than the longest document ({max(lens)})")


def _pick_backend(q: torch.Tensor, backend: str | None) -> str:
    name = resolve("varlen_attention", q.device, q.dtype, backend)
    if name == "triton" and q.shape[-1] > 256:
        raise ValueError(f"head_dim must be at most 256 for the triton backend, got {q.shape[-1]}")
    return name


def varlen_attention_fwd(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    softmax_scale=None, causal=False, window_size=(-1, -1), backend=None,
):
    """Forward building block: ``(out, lse)``, no autograd.

    out (total_q, Hq, D) in q's dtype; lse (Hq, total_q) fp32 natural log (float64 for
    float64 inputs). Rows that see no key: out 0, lse -inf; rows past cu_seqlens_q[-1]
    likewise.
    """
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_size)
    return _varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 softmax_scale, causal, window_size, backend)


def _varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          softmax_scale, causal, window_size, backend):
    """``varlen_attention_fwd`` once its inputs are checked (``varlen_attention`` checks them
    itself: a decode step's attention is ~0.3 ms on the CPU, the checks ~5 us each time)."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    window = (int(window_size[0]), int(window_size[1]))
    name = _pick_backend(q, backend)
    if name == "triton":
        from longvita.kernels.attention import triton as vat

        if torch.compiler.is_compiling():  # the custom op: torch.compile traces through it
            return varlen_attention_fwd_op(
                q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, bool(causal), *window
            )
        # eager: the launcher itself (a custom op's first eager call imports torch._dynamo,
        # 0.8 s here and 4-5 s on a GPU machine without cached bytecode)
        return vat.varlen_attention_fwd_triton(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, bool(causal), window
        )
    if name == "flash_attn":
        return _flash_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, window)
    return varlen_attention_fwd_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, bool(causal), window)


def varlen_attention_bwd(
    dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    softmax_scale=None, causal=False, window_size=(-1, -1), dlse=None, backend=None,
):
    """Backward building block: ``(dq, dk, dv)`` from the saved ``(out, lse)``.

    dout, out: (total_q, Hq, D); lse, dlse: (Hq, total_q) (dlse may be None). The LSE's
    gradient enters as Delta = rowsum(dout * out) - dlse. Rows past cu_seqlens[-1] get
    zero gradients. Deterministic (no atomics) on the Triton backend, except its
    ``fused_bwd`` variant (``attention/launch_table.py``), which adds dQ with atomics.
    """
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_size)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    window = (int(window_size[0]), int(window_size[1]))
    name = _pick_backend(q, backend)
    if name == "triton":
        from longvita.kernels.attention import triton as vat

        if torch.compiler.is_compiling():
            return varlen_attention_bwd_op(
                dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                scale, bool(causal), *window, dlse,
            )
        return vat.varlen_attention_bwd_triton(
            dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            scale, bool(causal), window, dlse,
        )
    if name == "flash_attn":
        return _flash_attn_bwd(
            dout, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, window, dlse
        )
    return varlen_attention_bwd_torch(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, scale, bool(causal), window, dlse
    )


def _flash_attn_call(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window):
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise RuntimeError("backend='flash_attn' needs the flash-attn package") from e
    # public API only; return_attn_probs=True also returns the (Hq, total_q) fp32 lse
    out, lse, _ = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal,
        window_size=window, return_attn_probs=True,
    )
    return out, lse


def _flash_attn_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window):
    with torch.no_grad():
        return _flash_attn_call(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window)


def _flash_attn_bwd(dout, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window, dlse):
    """Comparison backend: recomputes the forward under autograd (public API only)."""
    if dlse is not None:
        raise NotImplementedError("backend='flash_attn' cannot take an lse gradient (dlse); use 'triton'")
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with torch.enable_grad():
        out, _ = _flash_attn_call(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window)
    return torch.autograd.grad(out, (q, k, v), dout)


# --------------------------------------------------------------------------------------
# torch.library ops of the Triton launchers, so torch.compile traces through the kernels
# (eager calls go straight to the launchers: a custom op's first eager call imports torch._dynamo)
# --------------------------------------------------------------------------------------


@torch.library.custom_op("longvita::varlen_attention_fwd", mutates_args=())
def varlen_attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int,
    softmax_scale: float, causal: bool, window_left: int, window_right: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    from longvita.kernels.attention.triton import varlen_attention_fwd_triton

    return varlen_attention_fwd_triton(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        softmax_scale, causal, (window_left, window_right),
    )


@varlen_attention_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("longvita::varlen_attention_bwd", mutates_args=())
def varlen_attention_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int,
    softmax_scale: float, causal: bool, window_left: int, window_right: int,
    dlse: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from longvita.kernels.attention.triton import varlen_attention_bwd_triton

    return varlen_attention_bwd_triton(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        softmax_scale, causal, (window_left, window_right), dlse,
    )


@varlen_attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      softmax_scale, causal, window_left, window_right, dlse):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@dataclass(frozen=True)
class VarlenParams:
    """Options of one varlen attention call that are not tensors."""

    max_seqlen_q: int
    max_seqlen_k: int
    softmax_scale: float | None
    causal: bool
    window_size: tuple[int, int]
    backend: str | None


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, p: VarlenParams):
        out, lse = varlen_attention_fwd(
            q, k, v, cu_seqlens_q, cu_seqlens_k, p.max_seqlen_q, p.max_seqlen_k,
            softmax_scale=p.softmax_scale, causal=p.causal, window_size=p.window_size, backend=p.backend,
        )
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.params = p
        ctx.mark_non_differentiable(cu_seqlens_q, cu_seqlens_k)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        p: VarlenParams = ctx.params
        dq, dk, dv = varlen_attention_bwd(
            dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, p.max_seqlen_q, p.max_seqlen_k,
            softmax_scale=p.softmax_scale, causal=p.causal, window_size=p.window_size, dlse=dlse, backend=p.backend,
        )
        return dq, dk, dv, None, None, None


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    return_lse: bool = False,
    backend: str | None = None,
):
    """Flash attention over packed documents.

    Args:
        q: (total_q, Hq, D). k, v: (total_k, Hkv, D), Hq % Hkv == 0 (GQA, K/V never repeated).
        cu_seqlens_q, cu_seqlens_k: (B+1,) int32 document offsets; zero-length documents allowed.
        max_seqlen_q, max_seqlen_k: Python ints (no host sync), >= the longest document.
        softmax_scale: default D ** -0.5.
        causal: bottom-right aligned causal mask.
        window_size: (left, right) local attention as in flash-attn: query i of a document sees
            keys [i + Lk - Lq - left, i + Lk - Lq + right]; -1 = unlimited; causal sets right = 0.
        return_lse: also return lse (Hq, total_q) fp32, natural log, differentiable.
        backend: None/'auto', 'torch' or 'triton' (default from LONGVITA_BACKEND).

    Returns:
        out (total_q, Hq, D) in q's dtype, or (out, lse). Rows that see no key give
        out = 0 and lse = -inf; rows past cu_seqlens_q[-1] give 0 and get zero gradients.
    """
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_size)
    _check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    window = (int(window_size[0]), int(window_size[1]))
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        params = VarlenParams(max_seqlen_q, max_seqlen_k, softmax_scale, bool(causal), window, backend)
        out, lse = _VarlenAttention.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, params)
    else:  # nothing to differentiate (inference, a decode step): autograd.Function adds 10-15 us a call
        out, lse = _varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         softmax_scale, causal, window, backend)
    return (out, lse) if return_lse else out
