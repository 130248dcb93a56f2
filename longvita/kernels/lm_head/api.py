"""Gather-then-project LM head: logits only where they are needed.

- Inference: ``last_token_index(cu_seqlens)`` picks the last row of every packed
  sequence and ``gather_logits(hidden, weight, index)`` projects only those rows.
- Training: ``linear_cross_entropy(hidden, weight, labels)`` equals
  ``F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100)`` (fp32 loss),
  with label smoothing, a z-loss, logit soft-capping and a bias as options, without ever
  holding more than one bounded chunk of logits. Rows whose label is ignored are dropped
  before any projection, so the work scales with the labelled rows.

Scheme (both backends; the Triton path's row kernel and the torch path's row maths are
the only difference). The M rows that carry a label are cut into K = ceil(M / C_max)
balanced chunks of C rows. For each chunk:
  1. logits = h_c @ W.T (+ b): one cuBLAS GEMM into a workspace of C x V in the input
     dtype (fp32 accumulation inside the GEMM, rounded once, as a plain head rounds it);
  2. one row kernel (``triton.py``) reads each row twice and writes it once: log-sum-exp,
     target logit, per-row loss, and in place the gradient of the loss with respect to the
     logits (softmax, smoothing, z-loss, soft-cap chain rule, times the mean's 1/count),
     in fp32 arithmetic rounded once to the input dtype;
  3. d(hidden)_c = d @ W: one GEMM written straight into the gradient (every vocabulary
     column in one GEMM: fp32 accumulation, one rounding);
  4. d(weight) (+)= d.T @ h_c: one GEMM, the first chunk writing the gradient (beta = 0),
     the next ones adding into it (beta = 1: the previous sum enters the GEMM's fp32
     epilogue, the result is rounded once per chunk); d(bias) += column sums in fp32.
Three GEMMs in all, as the bare matmuls; the loss's scalar gradient (1 for
``loss.backward()``) is applied in backward by a kernel that returns at once when it is 1,
so nothing touches V x H memory beyond the GEMMs themselves.

Memory at N = 64K rows, V = 152064, H = 5120, bf16 (inputs 640 MiB + 1.45 GiB, gradients
the same), extra buffers of the Triton path (``_TRITON_CHUNK_BYTES`` = 896 MiB of logits):
- 100 % labelled: C_max = 3088, K = 22 chunks of C = 2984 rows: logits workspace
  2984 x 152064 x 2 B = 865.5 MiB; chunk rows of hidden are views, d(hidden) is written
  in place; labels, masks and per-row losses about 1 MiB. Extra peak 0.85 GiB.
- 10 % labelled (M = 6554): K = 3 chunks of 2192 rows: workspace 635.8 MiB, the gathered
  chunk of hidden and its d(hidden) before the scatter 2 x 21.4 MiB, row indices and the
  rest about 1 MiB. Extra peak 0.66 GiB.
No fp32 buffer of V x H (3.1 GB here) and none of N x V exists; d(bias) adds V fp32 values.
Counted by ``test_lce_fused_extra_memory_at_qwen_shapes_on_meta`` (every allocation of the
forward and backward at these shapes on the meta device): 865.7 and 678.7 MiB.

Speed (estimates from bytes and FLOPs, not measured: no GPU in the session that wrote
this). The three GEMMs, 6 M V H FLOPs (3.06e14 at 64K rows), are the bench's "matmuls
only" floor (438 ms at 64K rows, 100 %, H100, 2026-11-25). Beyond them: the row kernel moves 3 x M x V x 2 B (59.8 GB at 64K,
about 20 ms at 3 TB/s) and the K - 1 accumulating d(weight) GEMMs read d(weight) again
(21 x 1.56 GB), about 1.07x the floor at 100 %. At 10 % the GEMMs run over the 6554
labelled rows only and the extras are the row kernel (6.0 GB), two re-reads of d(weight)
and the gather / scatter of hidden (0.7 GB): about 1.08x. What made the previous design
1.9x at 16K rows, 10 % labelled -- zeroing, adding and converting an fp32 V x H
accumulator and scaling both gradients in backward, all proportional to V x H and not to
the labelled rows -- is gone. (Under torch.compile the backward's scaling is one fused
out-of-place kernel: a V x H temporary there.)

Precision: every logit, d(hidden) and d(bias) value is rounded once, as in a plain head;
d(weight) is rounded once per chunk (K times). Simulated on CPU with bf16 rounding
(16K rows of random data, V = 1024, H = 64; d(weight)'s max error against float64 over
plain torch's): 1.29x
at K = 2, 1.50x at K = 3, 2.1x at K = 6, 4.5x at K = 22 (the fp16 tests: 1.5x at 3
chunks, 1.8-4.6x at 22). Liger-Kernel's fused linear cross-entropy accumulates
d(weight) in the parameters' dtype per chunk too (its ``accum_dtype`` opts into fp32);
cut-cross-entropy's default accumulates in bf16 per row block. ``accum_dtype=
torch.float32`` trades 4 bytes per weight element of peak (an fp32 V x H accumulator;
each chunk's V x H partial in the input dtype takes the room the gradient takes at the
end): 2.9 GiB more at the shapes above, 3.75 GiB extra in all (counted on the meta
device: ``test_lce_fused_extra_memory_at_qwen_shapes_on_meta``'s set-up), for d(weight)
within plain torch's error at any K (1.0-1.55x at K = 22 in the fp16 tests). fp32 inputs
accumulate in fp32.

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
maths in torch ops on a chunk of at most ``_TORCH_CHUNK_BYTES`` of fp32 (fp64) logits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys

import torch

from longvita.kernels._backend import resolve
from longvita.kernels.lm_head.torch import MODE_FUSED, MODE_GRAD, MODE_LOSS, torch_rows
from longvita.kernels.lm_head.torch import acc_dtype as _acc_dtype

__all__ = ["last_token_index", "gather_logits", "linear_cross_entropy", "LCEParams"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")
# Logits one chunk of the torch path may hold, in fp32 (it also makes a few fp32 copies).
_TORCH_CHUNK_BYTES = 128 * 2**20
# Logits one chunk of the Triton path may hold, in the input dtype: the workspace that
# sets the extra peak (0.85 GiB at the shapes of the module docstring) and the number
# of chunks d(weight) is rounded over.
_TRITON_CHUNK_BYTES = 896 * 2**20
# Chunk rows are a multiple of this on GPU (whole 16-byte rows of a GEMM's tiles).
_CHUNK_ROW_ALIGN = 8


def _autocast_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """What ``F.linear`` would see under ``torch.autocast``: floating inputs (not fp64) cast
    to the autocast dtype. The kernels below then run with autocast off, so every GEMM in
    them sees one dtype (under autocast a cuBLAS call inside would come back in bf16
    while its ``out=`` buffer is fp32). Outside autocast the inputs pass unchanged."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type) or hidden.dtype == torch.float64:
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _no_autocast(t: torch.Tensor):
    """Autocast off on t's device type: the cores below cast nothing themselves (a device
    type without autocast, such as meta, has nothing to turn off)."""
    if not torch.amp.is_autocast_available(t.device.type):
        return contextlib.nullcontext()
    return torch.autocast(t.device.type, enabled=False)


def _plain_tensors(hidden, weight, bias=None):
    """DTensor arguments (FSDP2 parameters used outside their module's forward, tensor
    parallelism): a weight or bias is gathered (``full_tensor``) when no gradient flows
    to it -- evaluation, a frozen head -- and refused with what to do when one does: the
    reduction of its gradient over ranks (sum? FSDP's average?) is FSDP's business, so
    the call belongs where FSDP has unsharded the parameter. Looked up in sys.modules:
    no import (a DTensor cannot exist unless its module is loaded)."""
    dtensor_mod = sys.modules.get("torch.distributed.tensor")
    if dtensor_mod is None:
        return hidden, weight, bias
    dtensor = dtensor_mod.DTensor
    if isinstance(hidden, dtensor):
        raise ValueError(
            f"hidden is a DTensor (placements {tuple(hidden.placements)}): pass this rank's rows as a plain "
            "tensor (hidden.to_local()), or hidden.full_tensor() for the whole batch"
        )
    out = []
    for name, t in (("weight", weight), ("bias", bias)):
        if isinstance(t, dtensor):
            if t.requires_grad and torch.is_grad_enabled():
                raise ValueError(
                    f"{name} is a DTensor (placements {tuple(t.placements)}) that needs a gradient, e.g. an FSDP2 "
                    "parameter used outside its module's forward: call linear_cross_entropy inside that module's "
                    "forward, or in a method registered with torch.distributed.fsdp.register_fsdp_forward_method("
                    "module, name), so that FSDP gathers it and reduces its gradient (under torch.no_grad() it is "
                    "gathered here)"
                )
            t = t.full_tensor()
        out.append(t)
    return hidden, out[0], out[1]


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
    chunk_bytes: int = _TORCH_CHUNK_BYTES
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
        chunk_bytes=_TRITON_CHUNK_BYTES if be == "triton" else _TORCH_CHUNK_BYTES,
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


def _loss_scale(reduction, valid, num_valid, group, dtype) -> torch.Tensor:
    """The loss's factor as a 0-d tensor: 1 for 'sum', 1 / count for 'mean' (the local
    valid count, ``num_valid``, or the count all-reduced over ``group``); no host sync."""
    if reduction == "sum":
        return torch.ones((), dtype=dtype, device=valid.device)
    if num_valid is None:
        count = valid.sum()
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(count, group=group)
    elif isinstance(num_valid, torch.Tensor):
        count = num_valid.reshape(()).to(valid.device)
    else:
        count = torch.tensor(num_valid, device=valid.device)
    return 1.0 / count.to(dtype).clamp(min=1)


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


def _scale_grad(grad: torch.Tensor, scale: torch.Tensor, backend: str) -> torch.Tensor:
    """``grad * scale`` with fp32 (fp64) arithmetic: in place in eager mode, by the Triton
    kernel that skips the work when the scale is 1 on the Triton path; out of place under
    torch.compile (one fused elementwise kernel there)."""
    if torch.compiler.is_compiling():
        acc = _acc_dtype(grad.dtype)
        return (grad.to(acc) * scale.to(acc)).to(grad.dtype)
    if backend == "triton" and grad.dtype != torch.float64:
        from longvita.kernels.lm_head.triton import triton_scale_

        return triton_scale_(grad, scale)
    if grad.device.type == "cpu" and float(scale) == 1.0:  # no device sync on CPU
        return grad
    return _scale_(grad, scale)


def _scale_(grad: torch.Tensor, scale: torch.Tensor, chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """``grad *= scale`` computed in fp32 (fp64 for fp64), in place, a bounded row chunk at
    a time. The scale may be a mean's 1/N: rounded to fp16 first it would shift every
    gradient by up to 2^-11 relative, a systematic error past one ulp of the largest
    values (seen: d(weight) at 2.3x plain torch's error); no host sync (the scale stays a
    tensor)."""
    if grad.dtype in (torch.float32, torch.float64) or grad.numel() == 0:
        return grad.mul_(scale.to(device=grad.device, dtype=grad.dtype))
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


# --------------------------------------------------------------------------------------
# The chunk loop (both backends)
# --------------------------------------------------------------------------------------


def _rows_per_chunk(m: int, vocab: int, value_bytes: int, budget: int, align: int) -> int:
    """Rows per chunk: at most ``budget`` bytes of logits (at least one aligned block of
    rows), the M rows cut into as few chunks as that allows, of balanced size (a small
    last chunk would run its d(weight) GEMM -- V x H output, few rows -- memory-bound)."""
    cmax = max(align, budget // (vocab * value_bytes) // align * align)
    if m <= cmax:
        return m
    k = math.ceil(m / cmax)
    return min(cmax, math.ceil(math.ceil(m / k) / align) * align)


def _lce_chunks(hidden, weight, bias, labels, rows, params: LCEParams, mode, *, scale=None, lse=None,
                g_loss=None, g_lse=None, need_h=False, need_w=False, need_b=False):
    """The scheme of the module docstring over the rows ``rows`` of hidden (all when None).

    hidden (N, H), weight (V, H), bias (V,) or None, labels (N,) int64, rows (M,) int64 or
    None; lse / g_loss / g_lse (M,) in the accumulation dtype (MODE_GRAD); scale 0-d
    (MODE_FUSED). Returns (loss_rows (M,) | None, lse_rows (M,) | None, d(hidden) (N, H) |
    None, d(weight) (V, H) | None, d(bias) (V,) | None); gradients in the inputs' dtypes."""
    n, k = hidden.shape
    vocab = weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    acc = _acc_dtype(dtype)
    y = labels if rows is None else labels.index_select(0, rows)  # (M,)
    m = y.shape[0]
    grads = mode != MODE_LOSS
    loss_rows = torch.empty(m, dtype=acc, device=dev) if mode != MODE_GRAD else None
    lse_rows = torch.empty(m, dtype=acc, device=dev) if mode == MODE_LOSS else None
    dh = dw = db = None
    if grads and need_h:  # rows not selected keep a zero gradient
        dh = torch.empty((n, k), dtype=dtype, device=dev) if rows is None else torch.zeros((n, k), dtype=dtype, device=dev)
    w_acc = torch.float32 if params.accum_fp32 and dtype in (torch.float16, torch.bfloat16) else weight.dtype
    if grads and need_w:  # the first chunk's GEMM writes every element (beta = 0)
        dw = (torch.empty if m else torch.zeros)(weight.shape, dtype=w_acc, device=dev)
    if grads and need_b:  # d(bias): V column sums, accumulated in fp32
        db = torch.zeros(vocab, dtype=acc, device=dev)
    if m:
        triton_path = params.backend == "triton"
        if triton_path:
            from longvita.kernels.lm_head.triton import triton_rows as row_op
        else:
            row_op = torch_rows
        step = _rows_per_chunk(
            m, vocab, hidden.element_size() if triton_path else torch.finfo(acc).bits // 8, params.chunk_bytes,
            1 if dev.type == "cpu" else _CHUNK_ROW_ALIGN,
        )
        buf = torch.empty(min(step, m), vocab, dtype=dtype, device=dev)  # the one logits workspace
        # with rows: one chunk of gathered hidden rows and one of their d(hidden), reused
        h_chunk = torch.empty(min(step, m), k, dtype=dtype, device=dev) if rows is not None else None
        dh_chunk = torch.empty(min(step, m), k, dtype=dtype, device=dev) if dh is not None and rows is not None else None
        wt = weight.t()
        for s in range(0, m, step):
            e = min(s + step, m)
            logits = buf[: e - s]  # (C, V)
            if rows is None:
                h = hidden[s:e]
            else:
                idx = rows[s:e]
                h = torch.index_select(hidden, 0, idx, out=h_chunk[: e - s])  # (C, H)
            if bias is None:
                torch.mm(h, wt, out=logits)
            else:
                torch.addmm(bias, h, wt, out=logits)
            row_op(
                logits, y[s:e], mode, params,
                loss_out=None if loss_rows is None else loss_rows[s:e],
                lse_out=None if lse_rows is None else lse_rows[s:e],
                lse_in=None if lse is None else lse[s:e],
                g_loss=None if g_loss is None else g_loss[s:e],
                g_lse=None if g_lse is None else g_lse[s:e],
                scale=scale,
            )  # logits now hold d(loss)/d(logits) in the gradient modes
            if not grads:
                continue
            if dh is not None:
                if rows is None:
                    torch.mm(logits, weight, out=dh[s:e])
                else:
                    torch.mm(logits, weight, out=dh_chunk[: e - s])
                    dh.index_copy_(0, idx, dh_chunk[: e - s])
            if dw is None:
                pass
            elif dw.dtype != dtype:  # accum_dtype=fp32: the chunk's sum, rounded once, added in fp32
                part = logits.t() @ h  # (V, H) in the input dtype
                dw.copy_(part) if s == 0 else dw.add_(part)
                del part
            elif s == 0:
                torch.mm(logits.t(), h, out=dw)
            else:
                dw.addmm_(logits.t(), h)
            if db is not None:
                db += logits.sum(0, dtype=acc)
    if db is not None:
        db = db.to(bias.dtype)
    if dw is not None and dw.dtype != weight.dtype:
        dw = dw.to(weight.dtype)
    return loss_rows, lse_rows, dh, dw, db


# --------------------------------------------------------------------------------------
# Input checks (before any launch)
# --------------------------------------------------------------------------------------


def _check_hidden_weight(hidden, weight, two_d: bool):
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if two_d and hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D (N, H), got shape {tuple(hidden.shape)}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be (..., H) with at least one leading dim, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, H), got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight must be on hidden's device {hidden.device}, got {weight.device}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, got shape {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must have V >= 1 and H >= 1, got shape {tuple(weight.shape)}")


def _check_bias(bias, weight):
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise ValueError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if bias.dtype != weight.dtype or bias.device != weight.device:
        raise ValueError(f"bias must have weight's dtype {weight.dtype} and device {weight.device}, "
                         f"got {bias.dtype} on {bias.device}")


def _check_options(label_smoothing, z_loss, softcap):
    def real(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not real(label_smoothing) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if not real(z_loss) or z_loss < 0.0:
        raise ValueError(f"z_loss must be a float >= 0, got {z_loss!r}")
    if softcap is not None and (not real(softcap) or softcap <= 0.0):
        raise ValueError(f"softcap must be None or a float > 0, got {softcap!r}")


def _check_labels(labels, lead, vocab, device, ignore_index):
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if tuple(labels.shape) != lead:
        raise ValueError(f"labels must have hidden's leading shape hidden.shape[:-1] = {lead}, got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32, got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"labels must be on hidden's device {device}, got {labels.device}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    # Value check only where it costs no device sync, and not under torch.compile (a
    # host read of tensor data would break the graph).
    if device.type == "cpu" and labels.numel() and not torch.compiler.is_compiling():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}")
