"""Merge of partial attention results through their log-sum-exp (ring attention's merge).

Two attention results over disjoint key sets, ``(out_a, lse_a)`` and ``(out_b, lse_b)``,
combine into the attention over the union of the keys:

    naive:  lse = log(exp(lse_a) + exp(lse_b))
            out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b
    stable: lse = max + log(1 + exp(min - max))           (max/min of lse_a, lse_b)
            out = out_a + sigmoid(lse_b - lse_a) * (out_b - out_a)

A row with no visible key has lse = -inf and out = 0; two such rows merge to -inf and 0,
never NaN. ``lse_merge_`` updates an fp32 accumulator in place: the Triton kernel
(``lse_merge/triton.py``, imported only when that backend runs) reads each operand once
and writes the accumulator once; the torch path (``torch.py``, the same stable formula)
serves CPU tensors. ``reference.lse_merge_reference`` is the naive formula, the definition
tests compare against. Under torch.compile the merge runs as the custom op
``longvita::lse_merge_`` (it mutates its accumulators), which the compiler traces through.

Shapes: out_acc (T, H, D) fp32, lse_acc (H, T) fp32, out_b (T, H, D) any float dtype,
lse_b (H, T) fp32 (float64 accumulators and lse for float64 inputs: torch path).
"""

from __future__ import annotations

import torch

from longvita.kernels._backend import resolve
from longvita.kernels.lse_merge.torch import lse_merge_torch_


def _check(out_acc, lse_acc, out_b, lse_b):
    acc = out_acc.dtype
    if acc not in (torch.float32, torch.float64) or lse_acc.dtype != acc or lse_b.dtype not in (torch.float32, acc):
        raise ValueError(
            "out_acc, lse_acc and lse_b must be float32 (float64 accumulators for float64 inputs), "
            f"got {out_acc.dtype}, {lse_acc.dtype}, {lse_b.dtype}"
        )
    if out_acc.dim() != 3 or out_b.shape != out_acc.shape:
        raise ValueError(f"out_acc and out_b must share one (T, H, D) shape, got {tuple(out_acc.shape)} and {tuple(out_b.shape)}")
    t, h, _ = out_acc.shape
    if lse_acc.shape != (h, t) or lse_b.shape != (h, t):
        raise ValueError(f"lse_acc and lse_b must be (H, T) = {(h, t)}, got {tuple(lse_acc.shape)} and {tuple(lse_b.shape)}")
    # a last dimension of size 1 has no meaningful stride (torch calls such a tensor contiguous
    # whatever it says: a transposed (H, 1) lse has stride 4 there)
    if any(x.stride(-1) != 1 and x.shape[-1] > 1 for x in (out_acc, out_b, lse_acc, lse_b)):
        raise ValueError("out_acc, out_b, lse_acc and lse_b must be contiguous in their last dimension")


def lse_merge_(out_acc, lse_acc, out_b, lse_b, backend: str | None = None):
    """Merge ``(out_b, lse_b)`` into the fp32 accumulators ``(out_acc, lse_acc)`` in place.

    Args:
        out_acc: (T, H, D) float32, updated in place. lse_acc: (H, T) float32, in place.
        out_b: (T, H, D) in any float dtype. lse_b: (H, T) float32.
        backend: None/'auto', 'torch' or 'triton' (see ``longvita.kernels._backend``);
            the other names resolve there too ('flash_attn' means 'auto').

    Returns ``(out_acc, lse_acc)``.
    """
    _check(out_acc, lse_acc, out_b, lse_b)
    # The inputs' dtype decides (float64 accumulators belong to float64 inputs, which
    # take the torch path; bf16 blocks do not run in Triton's interpreter).
    dtype = torch.float64 if out_acc.dtype == torch.float64 else out_b.dtype
    name = resolve("lse_merge", out_acc.device, dtype, backend)
    if torch.compiler.is_compiling():
        _lse_merge_op(out_acc, lse_acc, out_b, lse_b, name)
        return out_acc, lse_acc
    return _lse_merge(out_acc, lse_acc, out_b, lse_b, name)


def _lse_merge(out_acc, lse_acc, out_b, lse_b, backend: str):
    """The launcher: the resolved backend's implementation, in place."""
    if backend != "triton" or out_acc.numel() == 0:
        return lse_merge_torch_(out_acc, lse_acc, out_b, lse_b)
    from longvita.kernels.lse_merge.triton import triton_lse_merge_

    return triton_lse_merge_(out_acc, lse_acc, out_b, lse_b)


# The launcher as a torch custom op that mutates its accumulators, so torch.compile traces
# through the merge (eager calls skip it: a custom op's first eager call imports torch._dynamo).
@torch.library.custom_op("longvita::lse_merge_", mutates_args=("out_acc", "lse_acc"))
def _lse_merge_op(
    out_acc: torch.Tensor, lse_acc: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor, backend: str
) -> None:
    _lse_merge(out_acc, lse_acc, out_b, lse_b, backend)


@_lse_merge_op.register_fake
def _(out_acc, lse_acc, out_b, lse_b, backend):
    return None
