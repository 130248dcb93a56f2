"""Gather-then-project LM head: logits only where they are needed.

- Inference: ``last_token_index(cu_seqlens)`` picks the last row of every packed
  sequence and ``gather_logits(hidden, weight, index)`` projects only those rows.
- Training: ``linear_cross_entropy(hidden, weight, labels)`` equals
  ``F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)`` (fp32 loss) without
  ever holding more than a bounded block of logits. Rows whose label is ignored are
  dropped before any projection.

Layers: public functions -> ``_LinearCrossEntropyFunction`` (per-row loss
and lse, gradients recomputed in backward) or ``_LinearCrossEntropySumFunction`` (summed
loss, gradients computed in forward) -> torch.library custom ops ``longvita::lce_fwd``,
``lce_bwd``, ``lce_fused_sum`` (with fake implementations, so torch.compile traces
through them; eager calls skip the op wrappers) -> launchers (check shapes, then run
the chunked torch path here or the Triton kernels of ``lm_head/triton.py``, imported
only when that backend runs).
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

from longvita.kernels._backend import resolve
from longvita.kernels.lm_head.torch import acc_dtype as _acc_dtype
from longvita.kernels.lm_head.torch import torch_backward, torch_forward

__all__ = ["last_token_index", "gather_logits", "linear_cross_entropy", "LCEParams"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")
# Logits one chunk of the torch path may hold (fp32): bounded whatever N is.
_TORCH_CHUNK_BYTES = 128 * 2**20
# fp32 d(hidden) buffer one Triton backward launch may hold.
_BWD_CHUNK_BYTES = 1 * 2**30
# Logits (input dtype) one chunk of the Triton fused scalar-loss path may hold.
_FUSED_CHUNK_BYTES = 2 * 2**30


def _autocast_inputs(hidden: torch.Tensor, weight: torch.Tensor):
    """What ``F.linear`` would see under ``torch.autocast``: floating inputs (not fp64) cast
    to the autocast dtype. The kernels below then run with autocast off, so every GEMM in
    them sees one dtype (under autocast a cuBLAS call inside would come back in bf16
    while its ``out=`` buffer is fp32). Outside autocast the inputs pass unchanged."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type) or hidden.dtype == torch.float64:
        return hidden, weight
    dtype = torch.get_autocast_dtype(device_type)
    return hidden.to(dtype), weight.to(dtype)


def _no_autocast(t: torch.Tensor):
    """Autocast off on t's device type: the cores below cast nothing themselves."""
    return torch.autocast(t.device.type, enabled=False)


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
        (R, V) logits. Differentiable with respect to hidden and weight. Under
        ``torch.autocast`` the matmul runs in the autocast dtype, as ``F.linear`` would.
    """
    _check_hidden_weight(hidden, weight)
    hidden, weight = _autocast_inputs(hidden, weight)
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
        backend: 'triton', 'torch' or None (``LONGVITA_BACKEND``, default auto: Triton on
            CUDA / in the interpreter), resolved by ``longvita.kernels._backend.resolve``.
            fp64 inputs always take the torch path, and so do bf16 inputs in the
            interpreter ('auto' warns once; 'triton' raises).

    Returns:
        loss: fp32 (fp64 for fp64 inputs) scalar, or (N,) / (N - 1,) for 'none'.
        With ``return_lse``: ``(loss, lse)`` with lse of shape (N,) / (N - 1,).
        All labels ignored gives loss 0 and zero gradients.

    Under ``torch.autocast`` hidden and weight are cast to the autocast dtype first, as
    ``F.linear`` would cast them (gradients flow back through the cast in the inputs'
    dtypes), and the loss core runs with autocast off.
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

    hidden, weight = _autocast_inputs(hidden, weight)
    be = resolve("lm_head", hidden.device, hidden.dtype, backend)  # 'triton' or 'torch'
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
        fwd = _lce_fwd_op if torch.compiler.is_compiling() else _lce_fwd
        with _no_autocast(hidden):
            loss, lse_raw = fwd(hidden, weight, labels, p.ignore_index, p.backend, p.torch_chunk_bytes)
        ctx.save_for_backward(hidden, weight, labels, lse_raw)
        ctx.params = params
        lse = torch.where(labels != params.ignore_index, lse_raw, torch.zeros((), dtype=lse_raw.dtype))
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        hidden, weight, labels, lse_raw = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        p = ctx.params
        bwd = _lce_bwd_op if torch.compiler.is_compiling() else _lce_bwd
        with _no_autocast(hidden):  # backward() may be called inside an autocast region
            dh, dw = bwd(
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
        fused = _lce_fused_sum_op if torch.compiler.is_compiling() else _lce_fused_sum
        with _no_autocast(hidden):
            loss, dh, dw = fused(hidden, weight, labels, params.ignore_index, params.fused_chunk_bytes, need_h, need_w)
        ctx.grads = (dh if need_h else None, dw if need_w else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy's fused path frees its gradients in backward: retain_graph is unsupported")
        dh, dw = ctx.grads
        ctx.grads = None
        if dh is not None:
            dh = _scale_(dh, grad_loss)
        if dw is not None:
            dw = _scale_(dw, grad_loss)
        return dh, dw, None, None


def _scale_(grad: torch.Tensor, scale: torch.Tensor, chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """``grad *= scale`` computed in fp32, in place, a bounded row chunk at a time. The
    scale is a mean's 1/N: rounded to fp16 first it would shift every gradient by up to
    2^-11 relative, a systematic error past one ulp of the largest values (seen: d(weight)
    at 2.3x plain torch's error); no host sync (the scale stays a tensor)."""
    if grad.dtype == torch.float32 or grad.numel() == 0:
        return grad.mul_(scale.to(torch.float32))
    scale = scale.to(device=grad.device, dtype=torch.float32)
    if not grad.is_contiguous() or grad.dim() == 0:
        return grad.copy_(grad.float().mul_(scale))
    rows = grad.view(grad.shape[0], -1)
    step = max(1, chunk_bytes // (4 * rows.shape[1]))
    for s in range(0, rows.shape[0], step):
        rows[s:s + step] = rows[s:s + step].float().mul_(scale)
    return grad


# --------------------------------------------------------------------------------------
# torch.library ops, so torch.compile traces through the launchers (as in
# attention/api.py / pixel_shuffle/api.py): under torch.compile the
# autograd.Functions above call these ops, whose fake implementations give the output
# shapes without running them. In eager mode they call the plain functions instead: a
# custom op's first eager call imports torch._dynamo (seconds on CPU), which the
# generate loop and the first training step should not pay.
# LCEParams travels as its fields (a custom op takes tensors and scalars only); a
# gradient that is not wanted comes back as an empty placeholder (a custom op returns
# tensors only) and the Functions turn it into None.
# --------------------------------------------------------------------------------------


def _lce_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
    ignore_index: int, backend: str, torch_chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    params = LCEParams(ignore_index=ignore_index, backend=backend, torch_chunk_bytes=torch_chunk_bytes)
    return _lce_forward(hidden, weight, labels, params)


_lce_fwd_op = torch.library.custom_op("longvita::lce_fwd", mutates_args=())(_lce_fwd)


@_lce_fwd_op.register_fake
def _(hidden, weight, labels, ignore_index, backend, torch_chunk_bytes):
    acc = _acc_dtype(hidden.dtype)
    m = hidden.shape[0]
    return hidden.new_empty(m, dtype=acc), hidden.new_empty(m, dtype=acc)


def _lce_bwd(
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


_lce_bwd_op = torch.library.custom_op("longvita::lce_bwd", mutates_args=())(_lce_bwd)


@_lce_bwd_op.register_fake
def _(hidden, weight, labels, lse, grad_loss, grad_lse, ignore_index, backend, torch_chunk_bytes,
      bwd_chunk_bytes, need_h, need_w):
    return (torch.empty_like(hidden) if need_h else hidden.new_empty(0)), (
        torch.empty_like(weight) if need_w else weight.new_empty(0)
    )


def _lce_fused_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
    ignore_index: int, fused_chunk_bytes: int, need_h: bool, need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    params = LCEParams(ignore_index=ignore_index, backend="triton", fused_chunk_bytes=fused_chunk_bytes)
    from longvita.kernels.lm_head.triton import triton_fused_sum

    loss, dh, dw = triton_fused_sum(hidden, weight, labels, params, need_h, need_w)
    return loss, (dh if need_h else hidden.new_empty(0)), (dw if need_w else weight.new_empty(0))


_lce_fused_sum_op = torch.library.custom_op("longvita::lce_fused_sum", mutates_args=())(_lce_fused_sum)


@_lce_fused_sum_op.register_fake
def _(hidden, weight, labels, ignore_index, fused_chunk_bytes, need_h, need_w):
    loss = hidden.new_empty((), dtype=torch.float32)
    return loss, (torch.empty_like(hidden) if need_h else hidden.new_empty(0)), (
        torch.empty_like(weight) if need_w else weight.new_empty(0)
    )


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _lce_forward(hidden, weight, labels, params: LCEParams):
    """(loss, lse) per row, both in the accumulation dtype; lse is computed for every row."""
    m = hidden.shape[0]
    acc = _acc_dtype(hidden.dtype)
    if m == 0:
        empty = torch.zeros(0, dtype=acc, device=hidden.device)
        return empty, empty.clone()
    if params.backend == "triton":
        from longvita.kernels.lm_head.triton import triton_forward

        return triton_forward(hidden, weight, labels, params)
    return torch_forward(hidden, weight, labels, params)


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
        from longvita.kernels.lm_head.triton import triton_backward

        return triton_backward(hidden, weight, labels, lse, g_loss, g_lse, params, need_h, need_w)
    return torch_backward(hidden, weight, labels, lse, g_loss, g_lse, params, need_h, need_w)


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
