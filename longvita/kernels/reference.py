"""Plain-PyTorch references for every longvita kernel: the definition of correct.

Tests compare the Triton / CUDA kernels and the torch paths against these in float64;
no backend runs them (every family has a torch path of its own, ``<family>/torch.py``).
They favour clarity over speed, but stay exact. The attention reference loops over
documents and builds each document's (heads x L x L) scores, so it is for tests only:
the CPU backend of varlen attention is ``attention/torch.py``, in linear memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------
# Varlen attention (THD layout, cu_seqlens), flash-attn semantics
# --------------------------------------------------------------------------------------


def _visible_mask(
    len_q: int,
    len_k: int,
    causal: bool,
    window_size: tuple[int, int],
    device: torch.device,
) -> torch.Tensor | None:
    """(len_q, len_k) bool mask of visible keys, or None when every key is visible.

    ``window_size=(left, right)`` limits j to [i + len_k - len_q - left,
    i + len_k - len_q + right]; -1 means unlimited. Causal is bottom-right aligned and
    sets right = 0 whatever was given, as flash-attn's ``flash_api.cpp`` does: query i
    sees key j when j <= i + len_k - len_q.
    """
    left, right = window_size
    if causal:
        right = 0
    if left < 0 and right < 0:
        return None
    i = torch.arange(len_q, device=device)[:, None]
    j = torch.arange(len_k, device=device)[None, :]
    diag = i + (len_k - len_q)
    mask = torch.ones(len_q, len_k, dtype=torch.bool, device=device)
    if right >= 0:
        mask &= j <= diag + right
    if left >= 0:
        mask &= j >= diag - left
    return mask


def _doc_ranges(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor):
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        yield cq[b], cq[b + 1], ck[b], ck[b + 1]


def _scores(q_doc, k_doc, scale, groups):
    # q_doc (Lq, Hq, D), k_doc (Lk, Hkv, D) -> (Hq, Lq, Lk); GQA: q head h uses kv head h // groups
    k_rep = k_doc.repeat_interleave(groups, dim=1)
    return torch.einsum("qhd,khd->hqk", q_doc, k_rep) * scale


def varlen_attention_fwd_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of varlen attention. Returns ``(out, lse)``.

    q: (total_q, Hq, D); k, v: (total_k, Hkv, D); cu_seqlens_*: (B+1,) int32.
    out: (total_q, Hq, D) in q's dtype (zero past cu_seqlens_q[-1] and for rows that
    see no key); lse: (Hq, total_q) fp32 natural-log log-sum-exp (-inf for such rows).
    Computes in fp32 (float64 for float64 inputs). Differentiable through autograd.
    """
    hq, d = q.shape[1], q.shape[2]
    groups = hq // k.shape[1]
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs = q.new_zeros(q.shape, dtype=acc)
    lse = torch.full((hq, q.shape[0]), -math.inf, dtype=acc, device=q.device)
    out_parts, lse_parts, row_slices = [], [], []
    for q0, q1, k0, k1 in _doc_ranges(cu_seqlens_q, cu_seqlens_k):
        if q1 == q0:
            continue
        if k1 == k0:
            continue  # no keys: out stays 0, lse stays -inf
        s = _scores(q[q0:q1].to(acc), k[k0:k1].to(acc), scale, groups)  # (Hq, Lq, Lk)
        mask = _visible_mask(q1 - q0, k1 - k0, causal, window_size, q.device)
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf)
        lse_doc = torch.logsumexp(s, dim=-1)  # (Hq, Lq)
        # rows with no visible key: exp(-inf - -inf) would be NaN, so use a finite shift
        shift = torch.where(torch.isinf(lse_doc), torch.zeros_like(lse_doc), lse_doc)
        p = torch.exp(s - shift[..., None])
        v_rep = v[k0:k1].to(acc).repeat_interleave(groups, dim=1)
        out_parts.append(torch.einsum("hqk,khd->qhd", p, v_rep))
        lse_parts.append(lse_doc)
        row_slices.append((q0, q1))
    # assemble without in-place writes so autograd (used by tests) flows through
    if out_parts:
        idx = torch.cat([torch.arange(a, b, device=q.device) for a, b in row_slices])
        outs = outs.index_copy(0, idx, torch.cat(out_parts, 0))
        lse = lse.index_copy(1, idx, torch.cat(lse_parts, 1))
    return outs.to(q.dtype), lse.to(torch.float32) if acc == torch.float32 else lse


def varlen_attention_bwd_reference(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of varlen attention from the saved ``(out, lse)``: ``(dq, dk, dv)``.

    The flash-attention backward written out: P = exp(S*scale - lse),
    dV = P^T dO, dP = dO V^T, dS = P * (dP - Delta), dQ = scale * dS K, dK = scale * dS^T Q,
    with Delta = rowsum(dO * O) - dlse (the LSE's own gradient folds in here, which is
    what ring attention's merge needs). GQA: dK/dV sum over the query heads of a group.
    """
    hq, d = q.shape[1], q.shape[2]
    hkv = k.shape[1]
    groups = hq // hkv
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    for q0, q1, k0, k1 in _doc_ranges(cu_seqlens_q, cu_seqlens_k):
        if q1 == q0 or k1 == k0:
            continue
        qd, kd, vd = q[q0:q1].to(acc), k[k0:k1].to(acc), v[k0:k1].to(acc)
        do, o = dout[q0:q1].to(acc), out[q0:q1].to(acc)
        lse_d = lse[:, q0:q1].to(acc)  # (Hq, Lq)
        s = _scores(qd, kd, scale, groups)
        mask = _visible_mask(q1 - q0, k1 - k0, causal, window_size, q.device)
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf)
        finite = torch.isfinite(lse_d)
        p = torch.where(finite[..., None], torch.exp(s - torch.where(finite, lse_d, 0)[..., None]), 0)
        delta = torch.einsum("qhd,qhd->hq", do, o)
        if dlse is not None:
            delta = delta - torch.where(finite, dlse[:, q0:q1].to(acc), 0)
        v_rep = vd.repeat_interleave(groups, dim=1)
        k_rep = kd.repeat_interleave(groups, dim=1)
        dp = torch.einsum("qhd,khd->hqk", do, v_rep)
        ds = p * (dp - delta[..., None])
        dq[q0:q1] = torch.einsum("hqk,khd->qhd", ds, k_rep) * scale
        dk_rep = torch.einsum("hqk,qhd->khd", ds, qd) * scale
        dv_rep = torch.einsum("hqk,qhd->khd", p, do)
        dk[k0:k1] = dk_rep.view(k1 - k0, hkv, groups, d).sum(2)
        dv[k0:k1] = dv_rep.view(k1 - k0, hkv, groups, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# --------------------------------------------------------------------------------------
# Pixel shuffle + projector
# --------------------------------------------------------------------------------------


def pixel_shuffle_reference(x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    """InternVL's pixel shuffle (transformers' ``InternVLModel.pixel_shuffle``, v2 order).

    x: (tiles, h*w, C) ViT tokens without CLS, h = w -> (tiles, h*w*s^2, C/s^2).
    """
    tiles, n, c = x.shape
    h = math.isqrt(n)
    inv = round(1 / scale_factor)
    x = x.reshape(tiles, h, h, c)
    # transformers names these (batch, width, height, channels); the order is what matters
    x = x.reshape(tiles, h, h // inv, c * inv)
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(tiles, h // inv, h // inv, c * inv * inv)
    x = x.permute(0, 2, 1, 3).contiguous()
    return x.reshape(tiles, (h // inv) ** 2, c * inv * inv)  # sizes spelled out: tiles may be 0


def pixel_shuffle_project_reference(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor | None,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    scale_factor: float = 0.5,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Pixel shuffle -> LayerNorm(4C) -> Linear -> GELU (exact, erf) -> Linear.

    x (tiles, h*w, C) -> (tiles, h*w/4, D). w1: (M, 4C), w2: (D, M) as nn.Linear stores them.
    """
    y = pixel_shuffle_reference(x, scale_factor)
    y = F.layer_norm(y, (y.shape[-1],), ln_weight, ln_bias, eps)
    y = F.gelu(F.linear(y, w1, b1))
    return F.linear(y, w2, b2)


# --------------------------------------------------------------------------------------
# LM head
# --------------------------------------------------------------------------------------


def last_token_index_reference(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Row of the last token of every non-empty sequence in a packed batch (int64)."""
    ends = cu_seqlens[1:].long() - 1
    return ends[cu_seqlens[1:] > cu_seqlens[:-1]]


def gather_logits_reference(hidden: torch.Tensor, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden[index] @ weight.T: (len(index), V)."""
    return hidden.index_select(0, index.long()) @ weight.t()


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    shift: bool = False,
    *,
    bias: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """F.cross_entropy(F.linear(hidden, weight, bias), labels) with fp32 (or fp64) logits,
    fully materialised: the plain head every option of ``linear_cross_entropy`` is defined by.

    hidden (..., H), labels (...): any leading dims. ``shift=True`` predicts
    labels[..., t+1] from hidden[..., t, :] within each row (causal LM convention): the
    per-row loss has shape (..., T - 1). The logits are computed in hidden's dtype and
    cast to the accumulation dtype; ``softcap`` maps them to ``softcap * tanh(logits /
    softcap)``; ``label_smoothing`` is F.cross_entropy's; ``z_loss`` adds
    ``z_loss * logsumexp(logits)**2`` per labelled row. All labels ignored with
    reduction='mean' gives 0, not NaN.
    """
    if shift:
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = F.linear(hidden, weight, bias).to(acc).reshape(-1, weight.shape[0])  # (N, V)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    y = labels.reshape(-1)
    loss = F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    valid = y != ignore_index
    if z_loss:
        loss = loss + z_loss * torch.where(valid, torch.logsumexp(logits, -1) ** 2, 0.0)
    if reduction == "none":
        return loss.reshape(labels.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


# --------------------------------------------------------------------------------------
# LSE merge (ring attention's merge of partial results)
# --------------------------------------------------------------------------------------


def lse_merge_reference(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from the two partial results.

    out_a, out_b: (T, H, D); lse_a, lse_b: (H, T). The naive formula, out of place:
    ``lse = log(exp(lse_a) + exp(lse_b))``, ``out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b``,
    computed in the accumulators' dtype. A row where both see no key (lse -inf) stays
    lse = -inf, out = 0 (its weights 0/0 are taken as 0)."""
    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse).nan_to_num(0.0).t().unsqueeze(-1)  # (T, H, 1)
    w_b = torch.exp(lse_b - lse).nan_to_num(0.0).t().unsqueeze(-1)
    acc = lse.dtype
    return w_a * out_a.to(acc) + w_b * out_b.to(acc), lse


# --------------------------------------------------------------------------------------
# Decoder pieces: RMSNorm (+ residual add), RoPE on q and k, SwiGLU
# --------------------------------------------------------------------------------------


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
):
    """Qwen2's RMSNorm (``longvita.model.text.RMSNorm``, transformers' ``Qwen2RMSNorm``):
    ``weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype)``, the statistics in fp32
    (float64 for float64 inputs), the normalised row rounded to x's dtype before the weight
    multiplies it; the result has ``torch.result_type(weight, x)``.

    With ``residual``: ``h = x + residual`` first (in their promoted dtype), returns
    ``(rms_norm(h), h)`` (a decoder layer's ``x = x + attn; normed = norm(x)``).
    x, residual: (..., H); weight: (H,)."""
    if residual is not None:
        x = x + residual
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    y = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (y, x) if residual is not None else y


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half convention (Qwen2, ``model.text.apply_rope``):
    ``x * cos + cat(-x2, x1) * sin`` with x = (x1, x2) split in halves of the head dim.
    x (tokens, heads, D); cos, sin (tokens, D). Computed in the promoted dtype of x and the
    tables, returned in x's dtype (as the decoder casts q and k back)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (Qwen2's MLP before its down projection)."""
    return F.silu(gate) * up
