"""Gather-then-project LM head: logits only where they are needed.

- Inference: ``last_token_index(cu_seqlens)`` picks the last row of every packed
  sequence and ``gather_logits(hidden, weight, index)`` projects only those rows.
- Training: ``linear_cross_entropy(hidden, weight, labels)`` equals
  ``F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)`` (fp32 loss) without
  ever holding more than a bounded block of logits. Rows whose label is ignored are
  dropped before any projection.

Layers (STYLE.md): public functions -> ``_LinearCrossEntropyFunction`` (per-row loss
and lse, gradients recomputed in backward) or ``_LinearCrossEntropySumFunction`` (summed
loss, gradients computed in forward) -> torch.library custom ops ``longvita::lce_fwd``,
``lce_bwd``, ``lce_fused_sum`` (with fake implementations, so torch.compile traces
through them) -> launchers (check shapes, launch Triton, or run the chunked torch path).
Non-tensor options travel in one ``LCEParams`` dataclass (as its fields through the ops).

Triton recompute scheme (cut-cross-entropy-like):
- forward: one program per block of rows walks the vocabulary in blocks, computing the
  logits tile with ``tl.dot`` (fp32 accumulate) and keeping an online log-sum-exp and
  the target logit. Outputs are two fp32 vectors; no logits are stored.
- backward: one program per (row block, vocab block) tile recomputes the logits tile,
  forms ``d = softmax * (g_loss + g_lse) - onehot * g_loss`` and adds ``d @ W`` into
  d(hidden) and ``d.T @ h`` into d(weight) with fp32 atomics. d(weight) accumulates in
  one fp32 (V, H) buffer; d(hidden) in an fp32 buffer of at most ``_BWD_CHUNK_BYTES``
  per launch (rows are processed in chunks), so temporaries are bounded.
  The atomics make the backward not bit-wise deterministic on GPU.

Triton fused scheme (reduction 'mean'/'sum' without ``return_lse``, gradients wanted --
the training case): the gradients are computed together with the loss, Liger-style. Per
chunk of rows (at most ``_FUSED_CHUNK_BYTES`` of logits in the input dtype): a cuBLAS
GEMM gives the logits, a Triton kernel turns them in place into softmax - onehot and
the per-row loss, then two GEMMs give d(hidden) and d(weight) (fp32 accumulator). Three
GEMMs in all; the backward only scales the stored gradients by the incoming scalar.
For fp16/bf16 the logits and each chunk's d(weight) are rounded to the input dtype
before the fp32 softmax / accumulation, as a plain head rounds its logits.
The two kernels above serve the other cases ('none', ``return_lse``, no gradients).

Torch scheme (CPU, float64, or ``backend='torch'``): the same maths over chunks of
rows, each chunk materialising at most ``_TORCH_CHUNK_BYTES`` of logits.
"""

from __future__ import annotations

import dataclasses

import torch

from longvita.kernels._backend import resolve_backend, triton_available, triton_interpret

__all__ = ["last_token_index", "gather_logits", "linear_cross_entropy", "LCEParams"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")
# Logits one chunk of the torch path may hold (fp32): bounded whatever N is.
_TORCH_CHUNK_BYTES = 128 * 2**20
# fp32 d(hidden) buffer one Triton backward launch may hold.
_BWD_CHUNK_BYTES = 1 * 2**30
# Logits (input dtype) one chunk of the Triton fused scalar-loss path may hold.
_FUSED_CHUNK_BYTES = 2 * 2**30


# --------------------------------------------------------------------------------------
# Inference: last token, gathered logits
# --------------------------------------------------------------------------------------


def last_token_index(cu_seqlens: torch.Tensor, drop_empty: bool = False) -> torch.Tensor:
    """Row of the last token of each packed sequence, as int64.

    Args:
        cu_seqlens: (batch + 1,) int32/int64 offsets, non-decreasing, starting at 0.
        drop_empty: False (default) keeps one index per sequence, shape (batch,), and
            never syncs with the host. An empty sequence has no last token: its entry
            is a placeholder, ``max(cu_seqlens[i+1] - 1, 0)`` (a valid row to gather,
            whose logits mean nothing); mask those rows with
            ``cu_seqlens[1:] > cu_seqlens[:-1]``. True drops empty sequences, shape
            (non-empty batch,), which needs the count and so syncs on GPU.
    """
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must be a 1-D tensor of batch + 1 offsets")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    ends = cu_seqlens[1:].long()
    if drop_empty:
        return ends[ends > cu_seqlens[:-1].long()] - 1
    return (ends - 1).clamp_(min=0)


def gather_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Logits of the selected rows only: ``hidden[index] @ weight.T``.

    Args:
        hidden: (N, H) float.
        weight: (V, H), same dtype and device.
        index: (R,) int32/int64 rows of ``hidden`` (e.g. from ``last_token_index``).
        out_dtype: dtype of the result; default ``hidden.dtype``. The matmul runs in
            hidden's dtype (fp32 accumulate on GPU) and is cast afterwards.

    Returns:
        (R, V) logits. Differentiable with respect to hidden and weight.
    """
    _check_hidden_weight(hidden, weight)
    if not isinstance(index, torch.Tensor) or index.dim() != 1:
        raise ValueError("index must be a 1-D tensor of row indices")
    if index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index must be int32 or int64, got {index.dtype}")
    if index.device != hidden.device:
        raise ValueError(f"index must be on {hidden.device}, got {index.device}")
    if index.device.type == "cpu" and index.numel() and (
        int(index.min()) < 0 or int(index.max()) >= hidden.shape[0]
    ):
        raise ValueError(f"index must lie in [0, {hidden.shape[0]}), got values outside it")
    if out_dtype is not None and out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be a float dtype, got {out_dtype}")
    logits = hidden.index_select(0, index.long()) @ weight.t()  # (R, V)
    return logits if out_dtype is None else logits.to(out_dtype)


# --------------------------------------------------------------------------------------
# Training: fused linear cross-entropy
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LCEParams:
    """Non-tensor options of the fused linear cross-entropy core."""

    ignore_index: int = -100
    backend: str = "torch"  # 'triton' or 'torch'
    torch_chunk_bytes: int = _TORCH_CHUNK_BYTES
    bwd_chunk_bytes: int = _BWD_CHUNK_BYTES
    fused_chunk_bytes: int = _FUSED_CHUNK_BYTES


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    shift: bool = False,
    return_lse: bool = False,
    num_valid: torch.Tensor | int | None = None,
    group=None,
    drop_ignored: bool = True,
    backend: str | None = None,
):
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` without the logits.

    Equals ``F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=...)``.

    Args:
        hidden: (N, H) fp16/bf16/fp32/fp64 final hidden states.
        weight: (V, H) LM head weight, same dtype and device.
        labels: (N,) int64/int32 targets in [0, V), or ``ignore_index``.
        ignore_index: label value that contributes neither loss nor gradient.
        reduction: 'mean' (over valid labels), 'sum', or 'none'.
        shift: predict ``labels[i + 1]`` from ``hidden[i]`` (causal LM); the last row
            then has no target and per-row outputs have N - 1 entries.
        return_lse: also return the per-row log-sum-exp (fp32, differentiable, e.g. for
            a z-loss); 0 for ignored rows.
        num_valid: for 'mean', divide by this count (tensor or int) instead of the local
            number of valid labels -- e.g. the global count under context/data
            parallelism. A tensor is never read on the host.
        group: for 'mean', all-reduce the local count of valid labels over this process
            group and divide by the sum (no host sync). Not together with num_valid.
        drop_ignored: True (default) gathers the valid rows before projecting, which
            costs one host sync per call on GPU (``torch.nonzero``). False projects
            every row and masks the ignored ones: no host sync at all, but work for
            every row. Under torch.compile, True breaks the graph at the nonzero;
            False traces as one graph (``fullgraph=True``).
        backend: 'triton', 'torch' or None (auto: Triton on CUDA / in the interpreter).
            fp64 inputs always take the torch path.

    Returns:
        loss: fp32 (fp64 for fp64 inputs) scalar, or (N,) / (N - 1,) for 'none'.
        With ``return_lse``: ``(loss, lse)`` with lse of shape (N,) / (N - 1,).
        All labels ignored gives loss 0 and zero gradients.
    """
    _check_hidden_weight(hidden, weight)
    n, vocab = hidden.shape[0], weight.shape[0]
    _check_labels(labels, n, vocab, hidden.device, ignore_index)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if num_valid is not None and group is not None:
        raise ValueError("pass num_valid or group, not both")
    if (num_valid is not None or group is not None) and reduction != "mean":
        raise ValueError(f"num_valid and group apply to reduction='mean' only, got reduction={reduction!r}")
    if isinstance(num_valid, torch.Tensor) and num_valid.numel() != 1:
        raise ValueError(f"num_valid must hold one value, got shape {tuple(num_valid.shape)}")
    if num_valid is not None and not isinstance(num_valid, (int, torch.Tensor)):
        raise ValueError(f"num_valid must be an int or a tensor, got {type(num_valid).__name__}")

    be = resolve_backend(hidden.device, backend)
    if be not in ("triton", "torch"):
        raise ValueError(f"linear_cross_entropy has no {be!r} backend (use 'triton' or 'torch')")
    if hidden.dtype == torch.float64:
        be = "torch"
    params = LCEParams(
        ignore_index=int(ignore_index), backend=be,
        torch_chunk_bytes=_TORCH_CHUNK_BYTES, bwd_chunk_bytes=_BWD_CHUNK_BYTES,
        fused_chunk_bytes=_FUSED_CHUNK_BYTES,
    )

    labels = labels.long()
    if shift:  # row i predicts labels[i + 1]; the last row predicts nothing
        labels = torch.cat([labels[1:], labels.new_full((min(n, 1),), params.ignore_index)])
    valid = labels != params.ignore_index  # (N,)

    if drop_ignored:
        # The one host sync (GPU) of this call. Under torch.compile this data-dependent
        # row count breaks the graph here (Dynamo does not capture nonzero by default);
        # the loss core after it still compiles through the custom ops below. A caller
        # that wants one full graph (fullgraph=True) passes drop_ignored=False.
        rows = valid.nonzero().squeeze(1)
        if rows.numel() == n:  # every row labelled: no copy
            rows = None
    else:
        rows = None
    if rows is None:
        h, y = hidden, labels
    else:
        h, y = hidden.index_select(0, rows), labels.index_select(0, rows)
    fused = (
        be == "triton" and reduction != "none" and not return_lse
        and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    )
    if fused:  # gradients computed with the loss: three GEMMs in all, no recompute
        loss_rows = _LinearCrossEntropySumFunction.apply(h, weight, y, params).reshape(1)
    else:
        loss_rows, lse_rows = _LinearCrossEntropyFunction.apply(h, weight, y, params)  # (M,), (M,)

    def per_row(x):
        if rows is not None:
            x = x.new_zeros(n).index_copy(0, rows, x)
        return x[: n - 1] if shift and n > 0 else x

    if reduction == "none":
        loss = per_row(loss_rows)
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:
        if num_valid is None:
            count = valid.sum()
            if group is not None:
                import torch.distributed as dist

                dist.all_reduce(count, group=group)
        elif isinstance(num_valid, torch.Tensor):
            count = num_valid.reshape(()).to(loss_rows.device)
        else:
            count = torch.tensor(num_valid, device=loss_rows.device)
        loss = loss_rows.sum() / count.to(loss_rows.dtype).clamp(min=1)
    if return_lse:
        return loss, per_row(lse_rows)
    return loss


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Per-row (loss, lse) of ``hidden @ weight.T``; ignored rows give (0, 0)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, params: LCEParams):
        p = params
        loss, lse_raw = _lce_fwd_op(hidden, weight, labels, p.ignore_index, p.backend, p.torch_chunk_bytes)
        ctx.save_for_backward(hidden, weight, labels, lse_raw)
        ctx.params = params
        lse = torch.where(labels != params.ignore_index, lse_raw, torch.zeros((), dtype=lse_raw.dtype))
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        hidden, weight, labels, lse_raw = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        p = ctx.params
        dh, dw = _lce_bwd_op(
            hidden, weight, labels, lse_raw, grad_loss, grad_lse,
            p.ignore_index, p.backend, p.torch_chunk_bytes, p.bwd_chunk_bytes, need_h, need_w,
        )
        return (dh if need_h else None), (dw if need_w else None), None, None


class _LinearCrossEntropySumFunction(torch.autograd.Function):
    """Sum over rows of the loss, with d(hidden) and d(weight) of that sum computed in
    the forward (Liger-style: per row chunk, logits GEMM -> in-place softmax - onehot
    -> two GEMMs). The backward only scales them by the incoming scalar gradient.
    Triton backend, scalar reductions, gradients wanted."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, params: LCEParams):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, dh, dw = _lce_fused_sum_op(hidden, weight, labels, params.ignore_index, params.fused_chunk_bytes, need_h, need_w)
        ctx.grads = (dh if need_h else None, dw if need_w else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy's fused path frees its gradients in backward: retain_graph is unsupported")
        dh, dw = ctx.grads
        ctx.grads = None
        if dh is not None:
            dh = dh.mul_(grad_loss.to(dh.dtype))
        if dw is not None:
            dw = dw.mul_(grad_loss.to(dw.dtype))
        return dh, dw, None, None


# --------------------------------------------------------------------------------------
# torch.library ops, so torch.compile traces through the launchers (as in
# varlen_attention_triton.py / pixel_shuffle.py): the autograd.Functions above call
# these ops, whose fake implementations give the output shapes without running them.
# LCEParams travels as its fields (a custom op takes tensors and scalars only); a
# gradient that is not wanted comes back as an empty placeholder (a custom op returns
# tensors only) and the Functions turn it into None.
# --------------------------------------------------------------------------------------


@torch.library.custom_op("longvita::lce_fwd", mutates_args=())
def _lce_fwd_op(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
    ignore_index: int, backend: str, torch_chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    params = LCEParams(ignore_index=ignore_index, backend=backend, torch_chunk_bytes=torch_chunk_bytes)
    return _lce_forward(hidden, weight, labels, params)


@_lce_fwd_op.register_fake
def _(hidden, weight, labels, ignore_index, backend, torch_chunk_bytes):
    acc = _acc_dtype(hidden.dtype)
    m = hidden.shape[0]
    return hidden.new_empty(m, dtype=acc), hidden.new_empty(m, dtype=acc)


@torch.library.custom_op("longvita::lce_bwd", mutates_args=())
def _lce_bwd_op(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
    grad_loss: torch.Tensor, grad_lse: torch.Tensor,
    ignore_index: int, backend: str, torch_chunk_bytes: int, bwd_chunk_bytes: int,
    need_h: bool, need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    params = LCEParams(
        ignore_index=ignore_index, backend=backend,
        torch_chunk_bytes=torch_chunk_bytes, bwd_chunk_bytes=bwd_chunk_bytes,
    )
    dh, dw = _lce_backward(hidden, weight, labels, lse, grad_loss, grad_lse, params, need_h, need_w)
    return (dh if need_h else hidden.new_empty(0)), (dw if need_w else weight.new_empty(0))


@_lce_bwd_op.register_fake
def _(hidden, weight, labels, lse, grad_loss, grad_lse, ignore_index, backend, torch_chunk_bytes,
      bwd_chunk_bytes, need_h, need_w):
    return (torch.empty_like(hidden) if need_h else hidden.new_empty(0)), (
        torch.empty_like(weight) if need_w else weight.new_empty(0)
    )


@torch.library.custom_op("longvita::lce_fused_sum", mutates_args=())
def _lce_fused_sum_op(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
    ignore_index: int, fused_chunk_bytes: int, need_h: bool, need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    params = LCEParams(ignore_index=ignore_index, backend="triton", fused_chunk_bytes=fused_chunk_bytes)
    loss, dh, dw = _triton_fused_sum(hidden, weight, labels, params, need_h, need_w)
    return loss, (dh if need_h else hidden.new_empty(0)), (dw if need_w else weight.new_empty(0))


@_lce_fused_sum_op.register_fake
def _(hidden, weight, labels, ignore_index, fused_chunk_bytes, need_h, need_w):
    loss = hidden.new_empty((), dtype=torch.float32)
    return loss, (torch.empty_like(hidden) if need_h else hidden.new_empty(0)), (
        torch.empty_like(weight) if need_w else weight.new_empty(0)
    )


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lce_forward(hidden, weight, labels, params: LCEParams):
    """(loss, lse) per row, both in the accumulation dtype; lse is computed for every row."""
    m = hidden.shape[0]
    acc = _acc_dtype(hidden.dtype)
    if m == 0:
        empty = torch.zeros(0, dtype=acc, device=hidden.device)
        return empty, empty.clone()
    if params.backend == "triton":
        return _triton_forward(hidden, weight, labels, params)
    return _torch_forward(hidden, weight, labels, params)


def _lce_backward(hidden, weight, labels, lse, grad_loss, grad_lse, params: LCEParams, need_h, need_w):
    m = hidden.shape[0]
    if m == 0:
        dh = torch.zeros_like(hidden) if need_h else None
        dw = torch.zeros_like(weight) if need_w else None
        return dh, dw
    valid = labels != params.ignore_index
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    g_loss = torch.where(valid, grad_loss.to(lse.dtype), zero)  # (M,)
    g_lse = torch.where(valid, grad_lse.to(lse.dtype), zero)  # (M,)
    if params.backend == "triton":
        return _triton_backward(hidden, weight, labels, lse, g_loss, g_lse, params, need_h, need_w)
    return _torch_backward(hidden, weight, labels, lse, g_loss, g_lse, params, need_h, need_w)


def _torch_chunk_rows(vocab: int, params: LCEParams) -> int:
    return max(1, params.torch_chunk_bytes // (4 * vocab))


def _torch_forward(hidden, weight, labels, params: LCEParams):
    m, vocab = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    loss = torch.empty(m, dtype=acc, device=hidden.device)
    lse = torch.empty(m, dtype=acc, device=hidden.device)
    step = _torch_chunk_rows(vocab, params)
    for s in range(0, m, step):
        e = min(s + step, m)
        logits = (hidden[s:e] @ weight.t()).to(acc)  # (chunk, V): the only logits held
        y = labels[s:e]
        valid = y != params.ignore_index
        lse_c = torch.logsumexp(logits, dim=1)
        target = logits.gather(1, torch.where(valid, y, 0).unsqueeze(1)).squeeze(1)
        lse[s:e] = lse_c
        loss[s:e] = torch.where(valid, lse_c - target, torch.zeros((), dtype=acc, device=hidden.device))
        del logits
    return loss, lse


def _torch_backward(hidden, weight, labels, lse, g_loss, g_lse, params: LCEParams, need_h, need_w):
    m, vocab = hidden.shape[0], weight.shape[0]
    acc = lse.dtype
    dh = torch.empty_like(hidden) if need_h else None
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None  # fp32 accumulator
    step = _torch_chunk_rows(vocab, params)
    for s in range(0, m, step):
        e = min(s + step, m)
        h = hidden[s:e]
        y = labels[s:e]
        d = (h @ weight.t()).to(acc)  # (chunk, V) logits, recomputed
        d.sub_(lse[s:e, None]).exp_().mul_((g_loss[s:e] + g_lse[s:e])[:, None])  # softmax * (gl + gz)
        d.scatter_add_(1, torch.where(y != params.ignore_index, y, 0).unsqueeze(1), -g_loss[s:e, None])
        d = d.to(hidden.dtype)
        if need_h:
            dh[s:e] = d @ weight
        if need_w:
            dw += (d.t() @ h).to(acc)
        del d
    if need_w and dw.dtype != weight.dtype:
        dw = dw.to(weight.dtype)
    return dh, dw


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _lce_fwd_kernel(
        H, W, Y, Loss, Lse,
        M, V, K,
        stride_hm, stride_hk, stride_wv, stride_wk,
        ignore_index,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        y = tl.load(Y + rows64, mask=row_ok, other=ignore_index)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        s_i = tl.zeros((BLOCK_M,), tl.float32)
        target = tl.zeros((BLOCK_M,), tl.float32)
        for n0 in range(0, V, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < V
            cols64 = cols.to(tl.int64)
            logits = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                ks64 = ks.to(tl.int64)
                h = tl.load(H + rows64[:, None] * stride_hm + ks64[None, :] * stride_hk,
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
                w = tl.load(W + cols64[None, :] * stride_wv + ks64[:, None] * stride_wk,
                            mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # (BK, BN)
                logits = tl.dot(h, w, logits, input_precision=PRECISION)
            logits = tl.where(col_ok[None, :], logits, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(logits, axis=1))
            s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
            m_i = m_new
            target += tl.sum(tl.where(cols[None, :] == y[:, None], logits, 0.0), axis=1)
        lse = m_i + tl.log(s_i)
        valid = row_ok & (y != ignore_index)
        tl.store(Lse + rows64, lse, mask=row_ok)
        tl.store(Loss + rows64, tl.where(valid, lse - target, 0.0), mask=row_ok)

    @triton.jit
    def _lce_bwd_kernel(
        H, W, Y, Lse, GLoss, GLse, DH, DW,
        M, V, K,
        stride_hm, stride_hk, stride_wv, stride_wk,
        stride_dhm, stride_dhk, stride_dwv, stride_dwk,
        ignore_index,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr, NEED_H: tl.constexpr, NEED_W: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < V
        rows64 = rows.to(tl.int64)
        cols64 = cols.to(tl.int64)
        y = tl.load(Y + rows64, mask=row_ok, other=ignore_index)
        valid = row_ok & (y != ignore_index)
        lse = tl.load(Lse + rows64, mask=row_ok, other=0.0)
        g_loss = tl.load(GLoss + rows64, mask=row_ok, other=0.0)
        g_lse = tl.load(GLse + rows64, mask=row_ok, other=0.0)

        logits = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            ks64 = ks.to(tl.int64)
            h = tl.load(H + rows64[:, None] * stride_hm + ks64[None, :] * stride_hk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(W + cols64[None, :] * stride_wv + ks64[:, None] * stride_wk,
                        mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            logits = tl.dot(h, w, logits, input_precision=PRECISION)
        # softmax * (g_loss + g_lse) - onehot * g_loss; zero outside valid rows/cols.
        p = tl.exp(logits - lse[:, None])
        d = p * (g_loss + g_lse)[:, None] - tl.where(cols[None, :] == y[:, None], g_loss[:, None], 0.0)
        d = tl.where(valid[:, None] & col_ok[None, :], d, 0.0)
        d = d.to(H.dtype.element_ty)

        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            ks64 = ks.to(tl.int64)
            if NEED_H:
                w = tl.load(W + cols64[:, None] * stride_wv + ks64[None, :] * stride_wk,
                            mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # (BN, BK)
                dh = tl.dot(d, w, input_precision=PRECISION)  # (BM, BK)
                tl.atomic_add(DH + rows64[:, None] * stride_dhm + ks64[None, :] * stride_dhk, dh,
                              mask=row_ok[:, None] & k_ok[None, :])
            if NEED_W:
                h = tl.load(H + rows64[:, None] * stride_hm + ks64[None, :] * stride_hk,
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
                dw = tl.dot(tl.trans(d), h, input_precision=PRECISION)  # (BN, BK)
                tl.atomic_add(DW + cols64[:, None] * stride_dwv + ks64[None, :] * stride_dwk, dw,
                              mask=col_ok[:, None] & k_ok[None, :])


    @triton.jit
    def _ce_grad_inplace_kernel(
        Logits, Y, Loss, V, stride_row, ignore_index,
        BLOCK_V: tl.constexpr,
    ):
        """One row of logits: loss = lse - logit[y]; logits <- softmax - onehot (0 if ignored)."""
        row = tl.program_id(0).to(tl.int64)
        ptr = Logits + row * stride_row
        y = tl.load(Y + row)
        valid = y != ignore_index
        offs = tl.arange(0, BLOCK_V)
        m_vec = tl.full((BLOCK_V,), float("-inf"), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_vec = tl.maximum(m_vec, x)
        m = tl.max(m_vec, axis=0)
        s_vec = tl.zeros((BLOCK_V,), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            s_vec += tl.exp(x - m)
        lse = m + tl.log(tl.sum(s_vec, axis=0))
        target = tl.load(ptr + tl.where(valid, y, 0)).to(tl.float32)
        tl.store(Loss + row, tl.where(valid, lse - target, 0.0))
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            col_ok = cols < V
            x = tl.load(ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            d = tl.exp(x - lse) - tl.where(cols == y, 1.0, 0.0)
            d = tl.where(valid, d, 0.0)
            tl.store(ptr + cols, d.to(Logits.dtype.element_ty), mask=col_ok)


def _triton_fused_sum(hidden, weight, labels, params: LCEParams, need_h, need_w):
    """Sum of per-row losses and its gradients, chunk by chunk of rows: cuBLAS logits in
    the input dtype (at most ``fused_chunk_bytes`` of them), the Triton kernel turns
    them in place into softmax - onehot, then d(hidden) = d @ W and d(weight) += d.T @ h
    (fp32 accumulator)."""
    _check_triton_inputs(hidden, weight, labels)
    m, k = hidden.shape
    vocab = weight.shape[0]
    fp32 = hidden.dtype == torch.float32
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    dh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
    dw32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    if m == 0:
        return loss, dh, (dw32 if fp32 or dw32 is None else dw32.to(weight.dtype))
    step = max(1, params.fused_chunk_bytes // (vocab * hidden.element_size()))
    block_v = 256 if triton_interpret() else 4096
    for s in range(0, m, step):
        e = min(s + step, m)
        h = hidden[s:e]
        logits = h @ weight.t()  # (chunk, V), input dtype, fp32 accumulate
        loss_rows = torch.empty(e - s, dtype=torch.float32, device=hidden.device)
        _ce_grad_inplace_kernel[(e - s,)](
            logits, labels[s:e], loss_rows, vocab, logits.stride(0), params.ignore_index,
            BLOCK_V=block_v, num_warps=1 if triton_interpret() else 8,
        )
        loss += loss_rows.sum()
        if need_h:
            torch.mm(logits, weight, out=dh[s:e])
        if need_w:
            if fp32:
                dw32.addmm_(logits.t(), h)
            else:
                dw32.add_(logits.t() @ h)
        del logits
    dw = None
    if need_w:
        dw = dw32 if fp32 else dw32.to(weight.dtype)
    return loss, dh, dw


def _triton_config(dtype: torch.dtype) -> dict:
    """Tile sizes. The interpreter gets small tiles (speed of the numpy emulation)."""
    precision = "ieee" if dtype == torch.float32 else "tf32"
    if triton_interpret():
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, PRECISION=precision, num_warps=4, num_stages=1)
    big = dtype != torch.float32
    return dict(
        BLOCK_M=128 if big else 64, BLOCK_N=128 if big else 64, BLOCK_K=64 if big else 32,
        PRECISION=precision, num_warps=8, num_stages=3 if big else 2,
    )


def _check_triton_inputs(hidden, weight, labels):
    assert hidden.dtype in (torch.float16, torch.bfloat16, torch.float32), hidden.dtype
    assert weight.dtype == hidden.dtype and weight.device == hidden.device
    assert labels.dtype == torch.int64 and labels.shape == (hidden.shape[0],)
    assert hidden.shape[1] == weight.shape[1]


def _triton_forward(hidden, weight, labels, params: LCEParams):
    _check_triton_inputs(hidden, weight, labels)
    m, k = hidden.shape
    vocab = weight.shape[0]
    loss = torch.empty(m, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(m, dtype=torch.float32, device=hidden.device)
    cfg = _triton_config(hidden.dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]),)
    _lce_fwd_kernel[grid](
        hidden, weight, labels, loss, lse,
        m, vocab, k,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        params.ignore_index,
        **cfg,
    )
    return loss, lse


def _triton_backward(hidden, weight, labels, lse, g_loss, g_lse, params: LCEParams, need_h, need_w):
    _check_triton_inputs(hidden, weight, labels)
    m, k = hidden.shape
    vocab = weight.shape[0]
    cfg = _triton_config(hidden.dtype)
    fp32 = hidden.dtype == torch.float32
    dh = torch.empty_like(hidden) if need_h else None
    dw32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    g_loss, g_lse, lse = g_loss.contiguous(), g_lse.contiguous(), lse.contiguous()
    step = m
    if need_h:  # bound the fp32 d(hidden) accumulator
        step = max(cfg["BLOCK_M"], params.bwd_chunk_bytes // (4 * k) // cfg["BLOCK_M"] * cfg["BLOCK_M"])
    dummy = torch.empty(1, dtype=torch.float32, device=hidden.device)
    for s in range(0, m, step):
        e = min(s + step, m)
        if need_h:
            dh_acc = torch.zeros(e - s, k, dtype=torch.float32, device=hidden.device)
        else:
            dh_acc = dummy
        dw_acc = dw32 if need_w else dummy
        grid = (triton.cdiv(e - s, cfg["BLOCK_M"]), triton.cdiv(vocab, cfg["BLOCK_N"]))
        h = hidden[s:e]
        _lce_bwd_kernel[grid](
            h, weight, labels[s:e], lse[s:e], g_loss[s:e], g_lse[s:e], dh_acc, dw_acc,
            e - s, vocab, k,
            h.stride(0), h.stride(1), weight.stride(0), weight.stride(1),
            dh_acc.stride(0) if need_h else 0, dh_acc.stride(1) if need_h else 0,
            dw_acc.stride(0) if need_w else 0, dw_acc.stride(1) if need_w else 0,
            params.ignore_index,
            NEED_H=need_h, NEED_W=need_w,
            **cfg,
        )
        if need_h:
            dh[s:e] = dh_acc if fp32 else dh_acc.to(hidden.dtype)
    dw = None
    if need_w:
        dw = dw32 if fp32 else dw32.to(weight.dtype)
    return dh, dw


# --------------------------------------------------------------------------------------
# Input checks (before any launch)
# --------------------------------------------------------------------------------------


def _check_hidden_weight(hidden, weight):
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight must be on hidden's device {hidden.device}, got {weight.device}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be (V, H) with H = hidden.shape[1] = {hidden.shape[1]}, got shape {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must have V >= 1 and H >= 1, got shape {tuple(weight.shape)}")


def _check_labels(labels, n, vocab, device, ignore_index):
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must be 1-D of length N = {n}, got shape {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32, got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"labels must be on hidden's device {device}, got {labels.device}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    # Value check only where it costs no device sync, and not under torch.compile (a
    # host read of tensor data would break the graph).
    if device.type == "cpu" and n and not torch.compiler.is_compiling():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}")
