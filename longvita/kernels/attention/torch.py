"""Varlen packed attention on the CPU ('torch' backend), in memory linear in the sequence.

The CPU backend of ``varlen_attention_fwd`` / ``varlen_attention_bwd``, in two paths:

- **fused**: torch's own CPU flash-attention kernel (the op behind
  ``F.scaled_dot_product_attention`` on CPU tensors: ``aten._scaled_dot_product_flash_attention_for_cpu``
  and its backward), called on strided (batch, heads, rows, D) views of the THD tensors, so
  nothing is transposed or copied going in, and its outputs come back in THD order. It
  returns the natural-log LSE and takes GQA without repeated K/V. It serves every call
  without a window in fp32, bf16 and fp16 (the latter two computed in fp32, as the loop
  does); ``fused_eligible`` says when.
- **blocked**: flash-attention's algorithm written with torch ops (per document, query
  blocks against key blocks with an online softmax): windows, float64, and any torch whose
  fused kernel fails ``fused_kernel_available``'s one-time probe.

``reference.py`` stays the plain definition that tests compare both against.

Semantics (both paths, as ``attention/triton.py``): THD, bottom-right causal, flash-attn
windows, rows with no visible key give out 0 / lse -inf, rows past ``cu_seqlens[-1]`` give
0 / -inf and zero gradients, lse fp32 (float64 for float64 inputs), the LSE differentiable
(Delta = rowsum(dO * O) - dlse).

How the fused path maps a document of len_q queries and len_k keys onto the kernel, whose
causal mask is top-left aligned (query i sees keys <= i) where ours is bottom-right
(query i sees keys <= i + len_k - len_q); the two agree on a square:

- not causal, or len_q == len_k: one call.
- causal, len_q < len_k (chunked prefill, a ring block, a decode row against its cache):
  the prefix of len_k - len_q keys that every row sees (one non-causal call) and the causal
  square of the last len_q keys (one causal call), merged through their LSEs
  (``lse_merge_torch_``); the backward runs both parts against the merged (out, lse). A
  single row (decode) sees its whole cache: one non-causal call, in which the query heads
  of each K/V head are that head's rows (each K/V head read once: ``_fwd_call``).
- causal, len_q > len_k: the first len_q - len_k rows see no key (0 / -inf); the last
  len_k rows are a causal square.
- Consecutive documents with the same (len_q, len_k) go in one call as a batch (ViT tiles,
  equal-length packs); other documents one call each.

The kernel's backward computes Delta = rowsum(dO * O) itself and takes no dlse, so a
nonzero LSE gradient is folded into the ``out`` it is given: per row, the element of O at
the column where |dO| is largest moves by -dlse / dO there, which changes rowsum(dO * O) by
exactly -dlse (to rounding of the size of dlse's own). Rows whose dO is zero (the output
unused, only the LSE) cannot carry it that way; when there are any, every head gets one
more dimension instead: q, k and out a 0, v a 1 and dO the dlse, which adds dlse to each
dP = dO V^T of the row (the kernel then runs at D + 1: measured 1.3x slower at D = 32).

Memory (fused), all linear in the tokens: the outputs and the kernel's own per-thread
blocks; with bf16/fp16 inputs fp32 copies of q, k, v (and out, dout in the backward); a
causal call against a longer cache one more (len_q, Hq, D) partial result for the merge;
an LSE gradient a copy of out (or, the wider head, copies of q, k, v, out, dout). A
64K-token prompt through the tiny model adds well under 2 GiB of peak RSS
(tests/test_varlen_attention_torch.py). Blocked path: ``attention/blocked.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from longvita.kernels.attention.blocked import (
    _acc_dtype,
    _window,
    varlen_attention_bwd_blocked,
    varlen_attention_fwd_blocked,
)
from longvita.kernels.lse_merge.torch import lse_merge_torch_


# ---------------------------------------------------------------------------------------
# The torch backend: the fused path where it computes the call, else the blocked loop
# ---------------------------------------------------------------------------------------


def varlen_attention_fwd_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    softmax_scale: float, causal: bool, window_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: out (total_q, Hq, D) in q's dtype, lse (Hq, total_q) fp32 (float64 for
    float64 inputs), natural log."""
    if fused_eligible(q, causal, window_size):
        return varlen_attention_fwd_fused(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
    return varlen_attention_fwd_blocked(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_size)


def varlen_attention_bwd_torch(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    softmax_scale: float, causal: bool, window_size: tuple[int, int],
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward from the saved (out, lse): dq, dk, dv in the inputs' dtypes."""
    if fused_eligible(q, causal, window_size):
        return varlen_attention_bwd_fused(
            dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, dlse
        )
    return varlen_attention_bwd_blocked(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_size, dlse
    )


# ---------------------------------------------------------------------------------------
# The fused path: torch's CPU flash-attention kernel
# ---------------------------------------------------------------------------------------

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_fused_ok: bool | None = None  # fused_kernel_available()'s answer, probed once per process


def _aten_fused():
    """(forward, backward) of torch's fused CPU flash attention (the ops SDPA calls). The
    forward through its ``torch.`` binding: a decode step is ~0.3 ms in all, and calling it
    as ``torch.ops.aten...`` added ~5-10 us."""
    return (torch._scaled_dot_product_flash_attention_for_cpu,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default)


def fused_kernel_available() -> bool:
    """Whether this torch's fused CPU kernel does what the fused path relies on, probed once
    on a 5-token problem (no RNG drawn): the op pair exists with this signature, the forward
    returns the natural-log LSE, its causal mask is top-left aligned, and 2 query heads run
    on 1 K/V head (GQA without repeated K/V) forward and backward. torch 2.13 passes; a
    torch that fails any of it runs the blocked loop."""
    global _fused_ok
    if _fused_ok is None:
        try:
            _fused_ok = _probe_fused_kernel()
        except Exception:  # no such op, another signature, no GQA: the blocked loop serves
            _fused_ok = False
    return _fused_ok


def _probe_fused_kernel() -> bool:
    fwd, bwd = _aten_fused()
    x = torch.linspace(-1.0, 1.0, 40).view(1, 2, 5, 4)  # (batch, heads, rows, D)
    q, k, v = x, x[:, :1].flip(2), x[:, 1:] * 0.5  # 2 query heads, 1 K/V head
    scale = 0.7
    out, lse = fwd(q, k, v, 0.0, True, scale=scale)
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), -math.inf)
    dq, dk, dv = bwd(out, q, k, v, out, lse, 0.0, True, scale=scale)
    return (dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
            and torch.allclose(out, s.softmax(-1) @ v, atol=1e-5) and torch.allclose(lse, s.logsumexp(-1), atol=1e-5))


def fused_eligible(q: torch.Tensor, causal: bool, window_size: tuple[int, int]) -> bool:
    """Whether the fused path computes this call: CPU tensors in fp32/bf16/fp16 (float64
    keeps the blocked loop), no window (under causal the right edge is the causal mask
    itself, whatever was given), at least one head and a head dim, and a torch whose
    kernel passed the probe."""
    left, right = _window(causal, window_size)
    return (q.device.type == "cpu" and q.dtype in _FUSED_DTYPES and left < 0 and (causal or right < 0)
            and q.shape[1] > 0 and q.shape[2] > 0 and fused_kernel_available())


def _segments(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor):
    """Runs of consecutive documents with the same (len_q, len_k), each one batch:
    (first query row, first key row, batch, len_q, len_k); documents without queries or
    without keys are left out (their rows stay 0 / -inf)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    n, i = len(cq) - 1, 0
    while i < n:
        len_q, len_k = cq[i + 1] - cq[i], ck[i + 1] - ck[i]
        j = i + 1
        while j < n and cq[j + 1] - cq[j] == len_q and ck[j + 1] - ck[j] == len_k:
            j += 1
        if len_q > 0 and len_k > 0:
            yield cq[i], ck[i], j - i, len_q, len_k
        i = j


def _parts(len_q: int, len_k: int, causal: bool) -> list[tuple[int, int, int, int, bool]]:
    """The kernel calls of one document (module docstring): (first row, rows, first key,
    keys, causal) each; two parts share their rows and merge through their LSEs."""
    if not causal or len_q == len_k:
        return [(0, len_q, 0, len_k, causal)]
    prefix = len_k - len_q
    if prefix > 0:
        if len_q == 1:  # a decode row sees its whole cache
            return [(0, 1, 0, len_k, False)]
        return [(0, len_q, 0, prefix, False), (0, len_q, prefix, len_q, True)]
    return [(-prefix, len_k, 0, len_k, True)]  # rows before -prefix see no key


def _bhld(x: torch.Tensor, start: int, batch: int, length: int, sub0: int, sub_len: int) -> torch.Tensor:
    """Rows [sub0, sub0 + sub_len) of each of ``batch`` documents of ``length`` rows from
    ``start`` of THD ``x``, as the kernel's (batch, heads, rows, D): a strided view, no copy
    (one ``as_strided`` instead of four view ops: a decode step counts microseconds)."""
    s_row, s_head, s_dim = x.stride()
    return x.as_strided((batch, x.shape[1], sub_len, x.shape[2]), (length * s_row, s_head, s_row, s_dim),
                        x.storage_offset() + (start + sub0) * s_row)


def _plan(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, causal: bool):
    """The kernel calls of one varlen call: (first query row, first key row, batch, len_q,
    len_k, parts) per run of equal documents."""
    return [(q0, k0, batch, len_q, len_k, _parts(len_q, len_k, causal))
            for q0, k0, batch, len_q, len_k in _segments(cu_seqlens_q, cu_seqlens_k)]


def _single_call(plan, total_q: int, total_k: int) -> bool:
    """Whether one kernel call computes every query row against every key (one document, or
    a batch of equal ones, filling q and k): its outputs are the results, with nothing to
    assemble."""
    if len(plan) != 1 or len(plan[0][5]) != 1:
        return False
    q0, k0, batch, len_q, len_k, ((row0, rows, key0, keys, _),) = plan[0]
    return (q0 == k0 == row0 == key0 == 0 and rows == len_q and keys == len_k
            and batch * len_q == total_q and batch * len_k == total_k)


def _fwd_call(fwd, qa, ka, va, q0: int, k0: int, batch: int, len_q: int, len_k: int, part, scale: float):
    """One forward kernel call of a plan: out (batch * rows, Hq, D), lse (Hq, batch * rows).

    A single query row against its keys (decode) runs with the query heads of each K/V head
    as that head's rows: the same attention (no mask), but each K/V head is read once
    instead of once per query head, and a decode step is memory-bound (one thread, 8 query
    on 4 K/V heads, D 32: 2.3x faster at 4K keys, 1.75x at 16K)."""
    row0, rows, key0, keys, part_causal = part
    hq, hkv, d = qa.shape[1], ka.shape[1], qa.shape[2]
    k_part, v_part = _bhld(ka, k0, batch, len_k, key0, keys), _bhld(va, k0, batch, len_k, key0, keys)
    if rows == 1 and not part_causal and hq > hkv:
        s_row, s_head, s_dim = qa.stride()
        groups = hq // hkv
        q_part = qa.as_strided((batch, hkv, groups, d), (len_q * s_row, groups * s_head, s_head, s_dim),
                               qa.storage_offset() + (q0 + row0) * s_row)  # (batch, Hkv, groups, D)
        o, lse = fwd(q_part, k_part, v_part, 0.0, False, scale=scale)
        return o.reshape(batch, hq, d), lse.reshape(batch, hq).t()
    o, lse = fwd(_bhld(qa, q0, batch, len_q, row0, rows), k_part, v_part, 0.0, part_causal, scale=scale)
    # o (batch, Hq, rows, D) is laid out as THD already; lse (batch, Hq, rows) is not
    return o.transpose(1, 2).reshape(batch * rows, hq, d), lse.transpose(0, 1).reshape(hq, batch * rows)


def varlen_attention_fwd_fused(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    softmax_scale: float, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward on torch's fused kernel (no window): out (total_q, Hq, D) in q's dtype,
    lse (Hq, total_q) in the accumulation dtype (fp32; float64 for float64 inputs)."""
    fwd, _ = _aten_fused()
    total_q, hq, d = q.shape
    acc = _acc_dtype(q.dtype)
    qa = q if q.dtype == acc else q.to(acc)
    ka = k if k.dtype == acc else k.to(acc)
    va = v if v.dtype == acc else v.to(acc)
    plan = _plan(cu_seqlens_q, cu_seqlens_k, causal)
    if _single_call(plan, total_q, k.shape[0]):  # the kernel's outputs are the results
        _, _, batch, len_q, len_k, (part,) = plan[0]
        o, lse = _fwd_call(fwd, qa, ka, va, 0, 0, batch, len_q, len_k, part, softmax_scale)
        return o.contiguous().to(q.dtype), lse.contiguous()  # no copies where they already are
    # The results in row order, concatenated once: one copy of the output (a zero fill and a
    # copy per document took 3% longer on a 4K-token pack of 7 documents, one thread)
    outs, lses, row = [], [], 0

    def no_keys(n: int):  # rows that see no key: out 0, lse -inf
        outs.append(torch.zeros((n, hq, d), dtype=acc, device=q.device))
        lses.append(torch.full((hq, n), -math.inf, dtype=acc, device=q.device))

    for q0, k0, batch, len_q, len_k, parts in plan:
        if q0 > row:
            no_keys(q0 - row)
        results = [_fwd_call(fwd, qa, ka, va, q0, k0, batch, len_q, len_k, part, softmax_scale) for part in parts]
        o, l_part = results[0]
        if len(results) == 2:  # the prefix and the causal square: one softmax over both
            lse_merge_torch_(o, l_part, *results[1])
        row0, rows = parts[0][:2]  # the parts share their rows
        if row0 > 0:  # the first rows of each document see no key
            o = torch.cat([o.new_zeros(batch, row0, hq, d), o.view(batch, rows, hq, d)], 1).view(-1, hq, d)
            l_part = torch.cat([l_part.new_full((hq, batch, row0), -math.inf), l_part.view(hq, batch, rows)], 2)
        outs.append(o)
        lses.append(l_part.reshape(hq, batch * len_q))
        row = q0 + batch * len_q
    if row < total_q or not outs:
        no_keys(total_q - row)
    return torch.cat(outs).to(q.dtype), torch.cat(lses, 1)


def _fold_dlse(qa, ka, va, oa, da, lse, dlse):
    """(q, k, v, out, dout) for the kernel's backward, with the LSE gradient folded in
    (module docstring): ``out`` moved at each row's largest |dO|, or every head one
    dimension wider where some row with a gradient has dO = 0."""
    rows = (dlse != 0) & torch.isfinite(lse)  # (Hq, T): rows that reach the kernel with a dlse
    if not bool(rows.any()):
        return qa, ka, va, oa, da
    dl = torch.where(rows, dlse.to(lse.dtype), 0.0).t().unsqueeze(-1)  # (T, Hq, 1)
    col = da.abs().argmax(-1, keepdim=True)  # (T, Hq, 1)
    shift = torch.where(dl == 0, 0.0, dl / da.gather(-1, col))
    if bool(torch.isfinite(shift).all()):
        return qa, ka, va, oa.scatter_add(-1, col, -shift), da
    return F.pad(qa, (0, 1)), F.pad(ka, (0, 1)), F.pad(va, (0, 1), value=1.0), F.pad(oa, (0, 1)), torch.cat([da, dl], -1)


def varlen_attention_bwd_fused(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    softmax_scale: float, causal: bool, dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward on torch's fused kernel (no window), from the saved (out, lse):
    dq, dk, dv in the inputs' dtypes. Each kernel call gets the whole document's (out, lse),
    so the two parts of a causal call against a longer cache each give their share."""
    _, bwd = _aten_fused()
    d = q.shape[2]
    acc = _acc_dtype(q.dtype)
    lse = lse.to(acc)
    qa, ka, va, oa, da = (t.to(acc) for t in (q, k, v, out, dout))
    if dlse is not None:
        qa, ka, va, oa, da = _fold_dlse(qa, ka, va, oa, da, lse, dlse)
    hq, hkv, width = qa.shape[1], ka.shape[1], qa.shape[2]  # width: D, or D + 1 carrying dlse
    plan = _plan(cu_seqlens_q, cu_seqlens_k, causal)
    if _single_call(plan, q.shape[0], k.shape[0]):
        _, _, batch, len_q, len_k, ((_, _, _, _, part_causal),) = plan[0]
        grads = bwd(_bhld(da, 0, batch, len_q, 0, len_q), _bhld(qa, 0, batch, len_q, 0, len_q),
                    _bhld(ka, 0, batch, len_k, 0, len_k), _bhld(va, 0, batch, len_k, 0, len_k),
                    _bhld(oa, 0, batch, len_q, 0, len_q), lse.reshape(hq, batch, len_q).transpose(0, 1),
                    0.0, part_causal, scale=softmax_scale)
        # (batch, heads, rows, width) laid out as THD, like the inputs
        dq, dk, dv = (g.transpose(1, 2).reshape(t.shape[0], t.shape[1], width) for g, t in zip(grads, (q, k, v)))
    else:
        dq, dk, dv = torch.zeros_like(qa), torch.zeros_like(ka), torch.zeros_like(va)
        for q0, k0, batch, len_q, len_k, parts in plan:
            lse_doc = lse[:, q0:q0 + batch * len_q].reshape(hq, batch, len_q)
            for row0, rows, key0, keys, part_causal in parts:
                gq, gk, gv = bwd(
                    _bhld(da, q0, batch, len_q, row0, rows), _bhld(qa, q0, batch, len_q, row0, rows),
                    _bhld(ka, k0, batch, len_k, key0, keys), _bhld(va, k0, batch, len_k, key0, keys),
                    _bhld(oa, q0, batch, len_q, row0, rows), lse_doc[:, :, row0:row0 + rows].transpose(0, 1),
                    0.0, part_causal, scale=softmax_scale,
                )
                dq[q0:q0 + batch * len_q].view(batch, len_q, hq, width)[:, row0:row0 + rows] += gq.transpose(1, 2)
                dk[k0:k0 + batch * len_k].view(batch, len_k, hkv, width)[:, key0:key0 + keys] += gk.transpose(1, 2)
                dv[k0:k0 + batch * len_k].view(batch, len_k, hkv, width)[:, key0:key0 + keys] += gv.transpose(1, 2)
    if width != d:  # drop the column that carried dlse
        dq, dk, dv = (g[..., :d].contiguous() for g in (dq, dk, dv))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
