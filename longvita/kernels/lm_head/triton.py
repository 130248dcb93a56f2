"""Triton kernels and launchers of the fused linear cross-entropy (``lm_head/api.py``).

Imported only when the Triton backend runs, so ``import longvita`` works without triton.
The scheme (row chunks, cuBLAS GEMMs, the bytes each buffer takes) is in ``api.py``'s
docstring. Two kernels live here:

- ``_lce_rows_kernel``: one program per row of a chunk of logits (input dtype, as the
  cuBLAS GEMM wrote it). Pass 1 reads the row once and keeps a running max and sum of
  exponentials (one ``exp`` per element: the max is per block, not per lane), the sum of
  the logits (label smoothing) and the target logit; pass 2 reads it again and writes
  the gradient of the loss with respect to the logits in place, in fp32 arithmetic
  rounded once to the input dtype. The backward of the per-row path skips pass 1 (the
  forward's log-sum-exp is saved). Bytes moved per row: 2 reads + 1 write of V input-dtype
  values (fused), 1 read + 1 write (backward), 1 read (forward only).
- ``_scale_grad_kernel``: multiplies a gradient in place by the incoming scalar
  gradient, in fp32 with one rounding, and returns at once when that scalar is 1 -- the
  usual ``loss.backward()`` -- without a host sync (the scalar is read on the device).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from longvita.kernels._backend import triton_interpret

if TYPE_CHECKING:
    from longvita.kernels.lm_head.api import LCEParams

# Vocabulary columns one program of ``_lce_rows_kernel`` handles per step on GPU: a
# 152K-wide row is 37 steps per pass, and 4096 fp32 values over 8 warps (256 threads) are
# 16 registers per thread. In the interpreter a row is about 4 blocks whatever V is: a
# ragged multi-block row in every test, and few (slow, emulated) steps at V = 32000.
_ROWS_BLOCK_V = 4096


def _interpret_block_v(vocab: int) -> int:
    return min(8192, max(64, triton.next_power_of_2(triton.cdiv(vocab, 4))))

# Elements one program of ``_scale_grad_kernel`` handles per step, and programs per SM
# (a grid-stride loop: the early return when the scale is 1 costs one small wave).
_SCALE_BLOCK = 4096
_SCALE_PROGRAMS_PER_SM = 4

# Modes of ``_lce_rows_kernel`` (constexpr): per-row loss and lse only; loss and the
# logits' gradient (scale known in the forward); the gradient from a saved lse and
# per-row upstream gradients.
MODE_LOSS, MODE_FUSED, MODE_GRAD = 0, 1, 2


@triton.jit
def _tanh(x):
    """tanh in fp32 from ``exp`` alone (the interpreter has no libdevice): the series
    below 0.3, where ``1 - exp(-2|x|)`` would cancel (series error < 1e-7 relative there:
    the next term is 1382/155925 x^11), the exponential form above."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    large = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(ax < 0.3, small, large)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _lce_rows_kernel(
    Logits, stride_row, Labels, LseIn, GLoss, GLse, Scale, LossOut, LseOut,
    V, ignore_index, smoothing, z_loss, softcap,
    MODE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One row of logits (raw: ``h @ W.T + b``, input dtype). With ``l = softcap *
    tanh(raw / softcap)`` (or raw), ``lse = logsumexp(l)``:
    loss = lse - (1 - eps) l[y] - eps/V sum(l) + z lse^2 (0 for an ignored row);
    d loss / d raw = (p (gl (1 + 2 z lse) + glse) - gl ((1 - eps) [v = y] + eps / V)) (1 - tanh^2),
    with gl the row's upstream loss gradient (the mean's 1/count when fused) and glse the
    lse's. Ignored rows get 0 everywhere (``tl.where`` also drops an inf * 0)."""
    row = tl.program_id(0).to(tl.int64)
    ptr = Logits + row * stride_row
    y = tl.load(Labels + row)
    valid = y != ignore_index
    y_safe = tl.where(valid, y, 0)
    offs = tl.arange(0, BLOCK_V)

    if MODE == 2:
        lse = tl.load(LseIn + row)
        g_loss = tl.load(GLoss + row)
        g_lse = tl.load(GLse + row)
    else:
        m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
        s = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
        total = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            col_ok = cols < V
            x = tl.load(ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                x = softcap * _tanh(x / softcap)
            if HAS_SMOOTHING:
                total += tl.sum(tl.where(col_ok, x, 0.0), axis=0)
            x = tl.where(col_ok, x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))  # finite: every block has a column
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        target = tl.load(ptr + y_safe).to(tl.float32)
        if HAS_SOFTCAP:
            target = softcap * _tanh(target / softcap)
        loss = lse - (1.0 - smoothing) * target
        if HAS_SMOOTHING:
            loss -= smoothing / V * total
        if HAS_Z:
            loss += z_loss * lse * lse
        tl.store(LossOut + row, tl.where(valid, loss, 0.0))
        if MODE == 0:
            tl.store(LseOut + row, tl.where(valid, lse, 0.0))
        if MODE == 1:
            g_loss = tl.load(Scale)
            g_lse = 0.0

    if MODE != 0:
        coef_p = g_loss + g_lse
        if HAS_Z:
            coef_p += 2.0 * z_loss * lse * g_loss
        coef_t = (1.0 - smoothing) * g_loss
        coef_u = smoothing / V * g_loss
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            col_ok = cols < V
            x = tl.load(ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(x / softcap)
                x = softcap * t
            d = tl.exp(x - lse) * coef_p - tl.where(cols == y_safe, coef_t, 0.0)
            if HAS_SMOOTHING:
                d -= coef_u
            if HAS_SOFTCAP:
                d *= 1.0 - t * t
            d = tl.where(valid, d, 0.0)
            tl.store(ptr + cols, d.to(Logits.dtype.element_ty), mask=col_ok)


@triton.jit
def _scale_grad_kernel(X, numel, G, BLOCK: tl.constexpr):
    """``X *= G[0]`` in fp32, one rounding; nothing at all when G[0] == 1."""
    g = tl.load(G).to(tl.float32)
    if g != 1.0:
        start = tl.program_id(0).to(tl.int64) * BLOCK
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        offs = tl.arange(0, BLOCK)
        for s in range(start, numel, step):
            idx = s + offs
            ok = idx < numel
            x = tl.load(X + idx, mask=ok, other=0.0).to(tl.float32)
            tl.store(X + idx, (x * g).to(X.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def triton_rows(logits, labels, mode, params: LCEParams, *, loss_out=None, lse_out=None, lse_in=None,
                g_loss=None, g_lse=None, scale=None):
    """Run ``_lce_rows_kernel`` over every row of ``logits`` (C, V) (in place for the
    gradient modes). loss_out/lse_out/lse_in/g_loss/g_lse: (C,) fp32; scale: 0-d fp32."""
    c, vocab = logits.shape
    assert logits.dtype in (torch.float16, torch.bfloat16, torch.float32), logits.dtype
    assert logits.stride(1) == 1 and labels.dtype == torch.int64 and labels.shape == (c,)
    for name, t in (("loss_out", loss_out), ("lse_out", lse_out), ("lse_in", lse_in), ("g_loss", g_loss),
                    ("g_lse", g_lse), ("scale", scale)):
        assert t is None or (t.dtype == torch.float32 and t.is_contiguous()), name
    if c == 0:
        return
    need = {MODE_LOSS: (loss_out, lse_out), MODE_FUSED: (loss_out, scale), MODE_GRAD: (lse_in, g_loss, g_lse)}[mode]
    assert all(t is not None for t in need), mode
    dummy = next(t for t in (loss_out, lse_in, lse_out, g_loss) if t is not None)
    softcap = params.softcap
    interpret = triton_interpret()
    _lce_rows_kernel[(c,)](
        logits, logits.stride(0), labels,
        lse_in if lse_in is not None else dummy, g_loss if g_loss is not None else dummy,
        g_lse if g_lse is not None else dummy, scale if scale is not None else dummy,
        loss_out if loss_out is not None else dummy, lse_out if lse_out is not None else dummy,
        vocab, params.ignore_index, float(params.label_smoothing), float(params.z_loss),
        float(softcap) if softcap is not None else 1.0,
        MODE=mode, HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=params.label_smoothing != 0.0,
        HAS_Z=params.z_loss != 0.0,
        BLOCK_V=_interpret_block_v(vocab) if interpret else _ROWS_BLOCK_V,
        num_warps=1 if interpret else 8,
    )


_SM_COUNT: dict = {}


def _programs(device: torch.device, numel: int) -> int:
    if device.type == "cuda":
        if device not in _SM_COUNT:
            _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
        sms = _SM_COUNT[device]
    else:
        sms = 2
    return max(1, min(triton.cdiv(numel, _SCALE_BLOCK), sms * _SCALE_PROGRAMS_PER_SM))


def triton_scale_(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``grad *= scale`` in place (fp32 arithmetic, one rounding), a no-op launch when the
    0-d ``scale`` holds 1; never reads ``scale`` on the host."""
    assert grad.is_contiguous() and grad.dtype in (torch.float16, torch.bfloat16, torch.float32)
    scale = scale.reshape(()).to(device=grad.device, dtype=torch.float32)
    numel = grad.numel()
    if numel:
        _scale_grad_kernel[(_programs(grad.device, numel),)](
            grad, numel, scale, BLOCK=_SCALE_BLOCK, num_warps=1 if triton_interpret() else 4,
        )
    return grad
