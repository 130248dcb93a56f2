"""The chunk loop of the fused linear cross-entropy, which both backends run (the Triton
row kernel of ``triton.py`` or the torch ops of ``torch.py`` between the GEMMs), and the
scaling of its results. ``api.py`` holds the public functions around it.

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
the same), extra buffers of the Triton path (``TRITON_CHUNK_BYTES`` = 896 MiB of logits):
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
"""

from __future__ import annotations

import math

import torch

from longvita.kernels.lm_head.torch import MODE_GRAD, MODE_LOSS, torch_rows
from longvita.kernels.lm_head.torch import acc_dtype as _acc_dtype

# Logits one chunk of the torch path may hold, in fp32 (it also makes a few fp32 copies).
TORCH_CHUNK_BYTES = 128 * 2**20
# Logits one chunk of the Triton path may hold, in the input dtype: the workspace that
# sets the extra peak (0.85 GiB at the shapes of the module docstring) and the number
# of chunks d(weight) is rounded over.
TRITON_CHUNK_BYTES = 896 * 2**20
# Chunk rows are a multiple of this on GPU (whole 16-byte rows of a GEMM's tiles).
CHUNK_ROW_ALIGN = 8


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


def _rows_per_chunk(m: int, vocab: int, value_bytes: int, budget: int, align: int) -> int:
    """Rows per chunk: at most ``budget`` bytes of logits (at least one aligned block of
    rows), the M rows cut into as few chunks as that allows, of balanced size (a small
    last chunk would run its d(weight) GEMM -- V x H output, few rows -- memory-bound)."""
    cmax = max(align, budget // (vocab * value_bytes) // align * align)
    if m <= cmax:
        return m
    k = math.ceil(m / cmax)
    return min(cmax, math.ceil(math.ceil(m / k) / align) * align)


def _lce_chunks(hidden, weight, bias, labels, rows, params, mode, *, scale=None, lse=None,
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
            1 if dev.type == "cpu" else CHUNK_ROW_ALIGN,
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
