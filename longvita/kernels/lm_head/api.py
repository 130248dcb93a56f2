"""Gather-then-project LM head: logits only where they are needed.

- Inference: ``last_token_index(cu_seqlens)`` picks the last row of every packed
  sequence and ``gather_logits(hidden, weight, index)`` projects only those rows.
- Training: ``linear_cross_entropy(hidden, weight, labels)`` equals
  ``F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100)`` (fp32 loss),
  with label smoothing, a z-loss, logit soft-capping and a bias as options, without ever
  holding more than one bounded chunk of logits. Rows whose label is ignored are dropped
  before any projection, so the work scales with the labelled rows.

The chunk loop both backends run, its memory (the bytes it allocates at Qwen2.5-14B's
shapes), its speed and its precision are described in ``chunks.py``.

Layers: public functions -> ``_FusedLinearCrossEntropy`` (reductions 'mean' / 'sum' with
gradients: the gradients are computed with the loss, Liger-style) or
``_LinearCrossEntropyRows`` (per-row loss and lse; 'none', ``return_lse``, or no
gradients: the backward recomputes the logits, four GEMMs in all) -> torch.library custom
ops ``longvita::lce_fused``, ``lce_rows``, ``lce_rows_bwd`` (with fake implementations,
so torch.compile traces through them; eager calls skip the op wrappers) -> the chunk
loop ``_lce_chunks`` -> the row kernel of ``lm_head/triton.py`` (imported only when
that backend runs) or ``lm_head/torch.py``'s torch ops. Non-tensor options travel in one
``LCEParams`` dataclass (as its fields through the ops).

Torch path (CPU, float64, or ``backend='torch'``): the same loop and GEMMs, the row
maths in torch ops on a chunk of at most ``chunks.TORCH_CHUNK_BYTES`` of fp32 (fp64) logits.
Input checks and preparation (DTensors, autocast) are in ``inputs.py``.
"""

from __future__ import annotations

import dataclasses

import torch

from longvita.kernels._backend import resolve
from longvita.kernels.lm_head import chunks
from longvita.kernels.lm_head.chunks import _lce_chunks, _loss_scale, _scale_grad
from longvita.kernels.lm_head.inputs import (
    _autocast_inputs,
    _check_bias,
    _check_hidden_weight,
    _check_labels,
    _check_options,
    _no_autocast,
    _plain_tensors,
)
from longvita.kernels.lm_head.torch import MODE_FUSED, MODE_GRAD, MODE_LOSS
from longvita.kernels.lm_head.torch import acc_dtype as _acc_dtype

__all__ = ["last_token_index", "gather_logits", "linear_cross_entropy", "LCEParams"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")


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
        weight: (V, H), same dtype and device. A DTensor weight is gathered when no
            gradient flows to it (see ``linear_cross_entropy``).
        index: (R,) int32/int64 rows of ``hidden`` (e.g. from ``last_token_index``).
        out_dtype: dtype of the result; default ``hidden.dtype``. The matmul runs in
            hidden's dtype (fp32 accumulate on GPU) and is cast afterwards.

    Returns:
        (R, V) logits. Differentiable with respect to hidden and weight. Under
        ``torch.autocast`` the matmul runs in the autocast dtype, as ``F.linear`` would.
    """
    hidden, weight, _ = _plain_tensors(hidden, weight)
    _check_hidden_weight(hidden, weight, two_d=True)
    hidden, weight, _ = _autocast_inputs(hidden, weight)
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
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    backend: str = "torch"  # 'triton' or 'torch'
    # logits one chunk may hold: bytes in the input dtype (Triton) or in fp32 (torch)
    chunk_bytes: int = chunks.TORCH_CHUNK_BYTES
    # fp16/bf16: accumulate d(weight) over the chunks in an fp32 V x H buffer
    accum_fp32: bool = False

    def fields(self) -> tuple:
        """The fields in the custom ops' argument order."""
        return (self.ignore_index, self.label_smoothing, self.z_loss, self.softcap, self.backend, self.chunk_bytes,
                self.accum_fp32)


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
    bias: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    accum_dtype: torch.dtype | None = None,
):
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` without the logits.

    Equals ``F.cross_entropy(logits.float(), labels, ignore_index=..., label_smoothing=...)``
    with ``logits = F.linear(hidden, weight, bias)`` (soft-capped first when ``softcap``
    is set), plus ``z_loss * lse**2`` per labelled row.

    Args:
        hidden: (..., H) fp16/bf16/fp32/fp64 final hidden states, any leading dims
            (e.g. (B, T, H) or packed (N, H)).
        weight: (V, H) LM head weight, same dtype and device. A DTensor weight (FSDP2
            outside its module's forward) is gathered when no gradient flows to it, and
            refused with what to do when one does.
        labels: (...) int64/int32 targets in [0, V), or ``ignore_index``: hidden's
            leading shape.
        ignore_index: label value that contributes neither loss nor gradient.
        reduction: 'mean' (over valid labels), 'sum', or 'none' (per row, labels' shape).
        shift: predict ``labels[..., t + 1]`` from ``hidden[..., t, :]`` (causal LM),
            along the last dim of labels, within each row of a (B, T) batch and never
            across rows; the last position of every row has no target, and per-row
            outputs have shape (..., T - 1). A 2-D ``hidden`` (N, H) is one sequence: a
            flattened batch of several sequences with ``shift=True`` would predict the
            first token of each from the last of the one before -- pass it as (B, T, H).
        return_lse: also return the per-row log-sum-exp of the (soft-capped) logits
            (fp32, differentiable); 0 for ignored rows.
        num_valid: for 'mean', divide by this count (tensor or int) instead of the local
            number of valid labels -- e.g. the global count under context/data
            parallelism. A tensor is never read on the host.
        group: for 'mean', all-reduce the local count of valid labels over this process
            group and divide by the sum (no host sync). Not together with num_valid.
        drop_ignored: True (default) gathers the valid rows before projecting, which
            costs one host sync per call on GPU (``torch.nonzero``). False projects
            every row and masks the ignored ones: no host sync at all, but work for
            every row. Under torch.compile, True breaks the graph at the nonzero (and
            ``fullgraph=True`` raises, naming drop_ignored=False); False traces as one
            graph.
        backend: 'triton', 'torch' or None (``LONGVITA_BACKEND``, default auto: Triton on
            CUDA / in the interpreter), resolved by ``longvita.kernels._backend.resolve``.
            fp64 inputs always take the torch path, and so do bf16 inputs in the
            interpreter ('auto' warns once; 'triton' raises).
        bias: optional (V,) LM-head bias, weight's dtype and device (differentiable).
        label_smoothing: in [0, 1], as ``F.cross_entropy`` defines it: the target
            distribution puts 1 - eps on the label and eps / V on every class;
            ignored rows contribute nothing and 'mean' divides by the valid count.
        z_loss: >= 0; adds ``z_loss * lse**2`` to the loss of every labelled row
            (PaLM's auxiliary loss), reduced like the loss.
        softcap: None or > 0; the logits become ``softcap * tanh(logits / softcap)``
            before the softmax (Gemma 2).
        accum_dtype: None (default) or torch.float32: the dtype d(weight) accumulates
            in over the row chunks. None: the weight's dtype, each chunk's GEMM adding
            into the gradient (no V x H workspace; fp16/bf16 d(weight) is rounded once
            per chunk -- see the module docstring for the error that adds). float32: an
            fp32 V x H accumulator (4 bytes per weight element more at peak, 2.9 GiB at
            V = 152064, H = 5120), each chunk's sum rounded once: about plain torch's
            error however many chunks.

    Returns:
        loss: fp32 (fp64 for fp64 inputs) scalar, or per row for 'none'.
        With ``return_lse``: ``(loss, lse)``, lse per row.
        All labels ignored gives loss 0 and zero gradients.

    Under ``torch.autocast`` hidden, weight and bias are cast to the autocast dtype first,
    as ``F.linear`` would cast them (gradients flow back through the cast in the inputs'
    dtypes), and the loss core runs with autocast off.

    Memory and speed: see this module's docstring (at most one chunk of logits; at
    N = 64K, V = 152064, H = 5120, bf16 about 0.85 GiB beyond inputs and gradients).
    """
    hidden, weight, bias = _plain_tensors(hidden, weight, bias)
    _check_hidden_weight(hidden, weight, two_d=False)
    lead, vocab = tuple(hidden.shape[:-1]), weight.shape[0]
    _check_bias(bias, weight)
    _check_labels(labels, lead, vocab, hidden.device, ignore_index)
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
    _check_options(label_smoothing, z_loss, softcap)
    if accum_dtype not in (None, torch.float32):
        raise ValueError(f"accum_dtype must be None or torch.float32, got {accum_dtype!r}")

    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    be = resolve("lm_head", hidden.device, hidden.dtype, backend)  # 'triton' or 'torch'
    params = LCEParams(
        ignore_index=int(ignore_index), label_smoothing=float(label_smoothing), z_loss=float(z_loss),
        softcap=None if softcap is None else float(softcap), backend=be,
        chunk_bytes=chunks.TRITON_CHUNK_BYTES if be == "triton" else chunks.TORCH_CHUNK_BYTES,  # read per call
        accum_fp32=accum_dtype == torch.float32,
    )

    h2 = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    n = h2.shape[0]
    labels = labels.long()
    if shift:  # position t predicts labels[..., t + 1], within each row; the last predicts nothing
        labels = torch.cat([labels[..., 1:], labels.new_full((*lead[:-1], min(lead[-1], 1)), params.ignore_index)], -1)
    y = labels.reshape(-1)  # (N,)
    valid = y != params.ignore_index  # (N,)

    rows = None
    if drop_ignored:
        if torch.compiler.is_compiling():
            _refuse_fullgraph()
        # The one host sync (GPU) of this call. Under torch.compile this data-dependent
        # row count breaks the graph here (Dynamo does not capture nonzero by default);
        # the loss core after it still compiles through the custom ops below.
        rows = valid.nonzero().squeeze(1)
        if rows.numel() == n:  # every row labelled: no gather
            rows = None

    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h2, weight, bias))
    if reduction != "none" and not return_lse and needs_grad:
        # gradients computed with the loss: three GEMMs in all, no recompute
        scale = _loss_scale(reduction, valid, num_valid, group, _acc_dtype(h2.dtype))
        return _FusedLinearCrossEntropy.apply(h2, weight, bias, y, rows, scale, params)

    loss_rows, lse_rows = _LinearCrossEntropyRows.apply(h2, weight, bias, y, rows, params)  # (M,), (M,)

    def per_row(x):  # (M,) -> labels' shape, less the last position under shift
        if rows is not None:
            x = x.new_zeros(n).index_copy(0, rows, x)
        x = x.reshape(lead)
        return x[..., :-1] if shift else x

    if reduction == "none":
        loss = per_row(loss_rows)
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:
        loss = loss_rows.sum() * _loss_scale("mean", valid, num_valid, group, loss_rows.dtype)
    if return_lse:
        return loss, per_row(lse_rows)
    return loss


_FULLGRAPH_ERROR: type | None = None


def _refuse_fullgraph() -> None:
    """Under ``torch.compile(fullgraph=True)`` (or ``error_on_graph_break``), raise our own
    error before Dynamo meets the data-dependent ``nonzero`` and raises its own. Dynamo's
    ``comptime`` runs ``_raise_if_fullgraph`` while tracing; elsewhere this is never called."""
    from torch._dynamo.comptime import comptime

    comptime(_raise_if_fullgraph)


def _raise_if_fullgraph(ctx) -> None:
    global _FULLGRAPH_ERROR
    try:
        tx = ctx._i_will_not_complain_if_bc_breaks_InstructionTranslator()
        strict = bool(tx.one_graph or tx.error_on_graph_break)
    except AttributeError:  # another torch: its own graph-break error stands
        return
    if not strict:
        return
    if _FULLGRAPH_ERROR is None:
        # a ValueError that Dynamo passes through as it is (it re-raises its UserError
        # unwrapped; any other exception it wraps in InternalTorchDynamoError)
        from torch._dynamo.exc import UserError, UserErrorType

        class LinearCrossEntropyFullgraphError(UserError, ValueError):
            def __init__(self, msg):
                UserError.__init__(self, UserErrorType.DYNAMIC_CONTROL_FLOW, msg)

        _FULLGRAPH_ERROR = LinearCrossEntropyFullgraphError
    raise _FULLGRAPH_ERROR(
        "linear_cross_entropy: drop_ignored=True (the default) gathers the labelled rows with a data-dependent "
        "torch.nonzero, which cannot be one graph; under torch.compile(fullgraph=True) pass drop_ignored=False "
        "(every row projected, ignored rows masked, no host sync)"
    )


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """The reduced loss ('mean' / 'sum', already multiplied by its scale), with d(hidden),
    d(weight), d(bias) of it computed in the forward (Liger-style: per row chunk, logits
    GEMM -> in-place gradient of the logits -> two GEMMs). The backward only multiplies
    them by the incoming scalar, skipping the work when it is 1."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows, scale, params: LCEParams):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        fused = _lce_fused_op if torch.compiler.is_compiling() else _lce_fused
        with _no_autocast(hidden):
            loss, dh, dw, db = fused(hidden, weight, bias, labels, rows, scale, *params.fields(), need_h, need_w, need_b)
        ctx.grads = (dh if need_h else None, dw if need_w else None, db if need_b else None)
        ctx.backend = params.backend
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy's fused path frees its gradients in backward: retain_graph is unsupported")
        grads, ctx.grads = ctx.grads, None
        out = tuple(None if g is None else _scale_grad(g, grad_loss, ctx.backend) for g in grads)
        return (*out, None, None, None, None)


class _LinearCrossEntropyRows(torch.autograd.Function):
    """Per-row (loss, lse) of the selected rows; ignored rows give (0, 0). The backward
    recomputes the logits chunk by chunk from the saved lse."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows, params: LCEParams):
        fwd = _lce_rows_op if torch.compiler.is_compiling() else _lce_rows
        with _no_autocast(hidden):
            loss, lse = fwd(hidden, weight, bias, labels, rows, *params.fields())
        ctx.save_for_backward(hidden, weight, bias, labels, rows, lse)
        ctx.params = params
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        hidden, weight, bias, labels, rows, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        bwd = _lce_rows_bwd_op if torch.compiler.is_compiling() else _lce_rows_bwd
        acc = lse.dtype
        with _no_autocast(hidden):  # backward() may be called inside an autocast region
            dh, dw, db = bwd(
                hidden, weight, bias, labels, rows, lse, grad_loss.to(acc).contiguous(), grad_lse.to(acc).contiguous(),
                *ctx.params.fields(), need_h, need_w, need_b,
            )
        return (dh if need_h else None), (dw if need_w else None), (db if need_b else None), None, None, None


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


def _params(ignore_index, label_smoothing, z_loss, softcap, backend, chunk_bytes, accum_fp32) -> LCEParams:
    return LCEParams(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                     softcap=softcap, backend=backend, chunk_bytes=chunk_bytes, accum_fp32=accum_fp32)


def _placeholder(t: torch.Tensor | None, like: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    return t if t is not None else (like if like is not None else fallback).new_empty(0)


def _lce_fused(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    rows: torch.Tensor | None, scale: torch.Tensor,
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float | None, backend: str, chunk_bytes: int,
    accum_fp32: bool,
    need_h: bool, need_w: bool, need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    params = _params(ignore_index, label_smoothing, z_loss, softcap, backend, chunk_bytes, accum_fp32)
    loss_rows, _, dh, dw, db = _lce_chunks(
        hidden, weight, bias, labels, rows, params, MODE_FUSED, scale=scale,
        need_h=need_h, need_w=need_w, need_b=need_b and bias is not None,
    )
    loss = loss_rows.sum() * scale
    return loss, _placeholder(dh, hidden, hidden), _placeholder(dw, weight, weight), _placeholder(db, bias, weight)


_lce_fused_op = torch.library.custom_op("longvita::lce_fused", mutates_args=())(_lce_fused)


@_lce_fused_op.register_fake
def _(hidden, weight, bias, labels, rows, scale, ignore_index, label_smoothing, z_loss, softcap, backend,
      chunk_bytes, accum_fp32, need_h, need_w, need_b):
    loss = hidden.new_empty((), dtype=_acc_dtype(hidden.dtype))
    dh = torch.empty_like(hidden) if need_h else hidden.new_empty(0)
    dw = torch.empty_like(weight) if need_w else weight.new_empty(0)
    db = torch.empty_like(bias) if need_b and bias is not None else weight.new_empty(0)
    return loss, dh, dw, db


def _lce_rows(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    rows: torch.Tensor | None,
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float | None, backend: str, chunk_bytes: int,
    accum_fp32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    params = _params(ignore_index, label_smoothing, z_loss, softcap, backend, chunk_bytes, accum_fp32)
    loss_rows, lse_rows, _, _, _ = _lce_chunks(hidden, weight, bias, labels, rows, params, MODE_LOSS)
    return loss_rows, lse_rows


_lce_rows_op = torch.library.custom_op("longvita::lce_rows", mutates_args=())(_lce_rows)


@_lce_rows_op.register_fake
def _(hidden, weight, bias, labels, rows, ignore_index, label_smoothing, z_loss, softcap, backend, chunk_bytes,
      accum_fp32):
    m = hidden.shape[0] if rows is None else rows.shape[0]
    acc = _acc_dtype(hidden.dtype)
    return hidden.new_empty(m, dtype=acc), hidden.new_empty(m, dtype=acc)


def _lce_rows_bwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    rows: torch.Tensor | None, lse: torch.Tensor, grad_loss: torch.Tensor, grad_lse: torch.Tensor,
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float | None, backend: str, chunk_bytes: int,
    accum_fp32: bool,
    need_h: bool, need_w: bool, need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    params = _params(ignore_index, label_smoothing, z_loss, softcap, backend, chunk_bytes, accum_fp32)
    _, _, dh, dw, db = _lce_chunks(
        hidden, weight, bias, labels, rows, params, MODE_GRAD, lse=lse, g_loss=grad_loss, g_lse=grad_lse,
        need_h=need_h, need_w=need_w, need_b=need_b and bias is not None,
    )
    return _placeholder(dh, hidden, hidden), _placeholder(dw, weight, weight), _placeholder(db, bias, weight)


_lce_rows_bwd_op = torch.library.custom_op("longvita::lce_rows_bwd", mutates_args=())(_lce_rows_bwd)


@_lce_rows_bwd_op.register_fake
def _(hidden, weight, bias, labels, rows, lse, grad_loss, grad_lse, ignore_index, label_smoothing, z_loss, softcap,
      backend, chunk_bytes, accum_fp32, need_h, need_w, need_b):
    dh = torch.empty_like(hidden) if need_h else hidden.new_empty(0)
    dw = torch.empty_like(weight) if need_w else weight.new_empty(0)
    db = torch.empty_like(bias) if need_b and bias is not None else weight.new_empty(0)
    return dh, dw, db
