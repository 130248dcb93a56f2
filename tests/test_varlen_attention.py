"""Varlen packed attention: the Triton kernels against a float64 reference.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), in fp32 and fp16 only, with small shapes. The error rule
(docs/architecture.md, "Numerics"): fp32 within ~1e-5 of float64 relative to the largest value;
fp16/bf16 at most 2x (+ a small eps) the error of plain PyTorch computing the same
thing in the same dtype.
"""

from __future__ import annotations

import math

import pytest
import torch

from longvita.kernels import reference as ref
from longvita.kernels._backend import triton_runs_on
from longvita.kernels.attention import varlen_attention, varlen_attention_bwd, varlen_attention_fwd

from _dense_attention import dense_masked_attention  # tests/ is on sys.path (pytest's rootdir insertion)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not triton_runs_on(DEVICE), reason="Triton cannot run here")
pytestmark = needs_triton

LENS = [0, 1, 17, 5, 0, 37]  # zero-length docs, a single token, primes, not multiples of 16


def _cu(lens, device=DEVICE):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def _inputs(lens_q, lens_k, hq, hkv, d, dtype, extra_q=0, extra_k=0):
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    tq, tk = sum(lens_q) + extra_q, sum(lens_k) + extra_k
    q = torch.randn(tq, hq, d, device=DEVICE, dtype=dtype)
    k = torch.randn(tk, hkv, d, device=DEVICE, dtype=dtype)
    v = torch.randn(tk, hkv, d, device=DEVICE, dtype=dtype)
    return q, k, v, cu_q, cu_k, max(lens_q), max(lens_k)


def _lowp_reference(q, k, v, cu_q, cu_k, scale, causal, window):
    """Plain PyTorch in the inputs' dtype (matmuls and softmax in fp16/bf16): the baseline
    whose error the kernel may double. Differentiable; rows without keys give 0 / -inf."""
    hq, d = q.shape[1], q.shape[2]
    groups = hq // k.shape[1]
    outs = [torch.zeros(q.shape[0], hq, d, dtype=q.dtype, device=q.device)]
    lses = [torch.full((hq, q.shape[0]), -math.inf, dtype=q.dtype, device=q.device)]
    out, lse = outs[0], lses[0]
    for q0, q1, k0, k1 in ref._doc_ranges(cu_q, cu_k):
        if q1 == q0 or k1 == k0:
            continue
        kr = k[k0:k1].repeat_interleave(groups, dim=1)
        vr = v[k0:k1].repeat_interleave(groups, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[q0:q1], kr) * scale
        mask = ref._visible_mask(q1 - q0, k1 - k0, causal, window, q.device)
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf)  # its backward zeroes fully masked rows' NaNs
        lse_doc = torch.logsumexp(s, dim=-1)
        p = torch.softmax(s, dim=-1)
        if mask is not None:
            p = torch.where(mask.any(-1)[None, :, None], p, 0)
        o = torch.einsum("hqk,khd->qhd", p, vr)
        out = torch.cat([out[:q0], o, out[q1:]], 0)
        lse = torch.cat([lse[:, :q0], lse_doc, lse[:, q1:]], 1)
    return out, lse


def _run_triton(q, k, v, cu_q, cu_k, mq, mk, causal, window, dout, dlse):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = varlen_attention(
        *leaves, cu_q, cu_k, mq, mk, causal=causal, window_size=window, return_lse=True, backend="triton"
    )
    grads = torch.autograd.grad((out, lse), leaves, (dout, dlse))
    return out, lse, grads


def _run_float64(q, k, v, cu_q, cu_k, causal, window, dout, dlse, scale):
    q64, k64, v64 = q.double(), k.double(), v.double()
    out, lse = ref.varlen_attention_fwd_reference(q64, k64, v64, cu_q, cu_k, scale, causal, window)
    grads = ref.varlen_attention_bwd_reference(
        dout.double(), q64, k64, v64, out, lse, cu_q, cu_k, scale, causal, window, dlse.double()
    )
    return out, lse, grads


def _max_err(a, b):
    """Max |a - b| where b is finite; -inf in b must be matched exactly."""
    a, b = a.double(), b.double()
    inf = torch.isinf(b)
    assert torch.equal(torch.isinf(a) & (a < 0), inf), "-inf pattern (rows without keys) differs"
    return (a[~inf] - b[~inf]).abs().max().item() if (~inf).any() else 0.0


def _max_abs(b):
    b = b.double()
    b = b[torch.isfinite(b)]
    return b.abs().max().item() if b.numel() else 1.0


def _check_fp32(lens_q, lens_k, hq, hkv, d, causal, window=(-1, -1), tol=1e-5):
    q, k, v, cu_q, cu_k, mq, mk = _inputs(lens_q, lens_k, hq, hkv, d, torch.float32)
    dout = torch.randn_like(q)
    dlse = torch.randn(hq, q.shape[0], device=DEVICE)
    scale = d**-0.5
    out, lse, grads = _run_triton(q, k, v, cu_q, cu_k, mq, mk, causal, window, dout, dlse)
    r_out, r_lse, r_grads = _run_float64(q, k, v, cu_q, cu_k, causal, window, dout, dlse, scale)
    for name, a, b in [("out", out, r_out), ("lse", lse, r_lse)] + list(zip(("dq", "dk", "dv"), grads, r_grads)):
        assert not torch.isnan(a).any(), f"{name} has NaN"
        err = _max_err(a, b) / _max_abs(b)
        assert err < tol, f"{name}: relative error {err:.3g} >= {tol}"


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hkv", [(5, 1), (2, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_fp32_matches_float64(causal, hq, hkv, d):
    _check_fp32(LENS, LENS, hq, hkv, d, causal)


@pytest.mark.parametrize("causal", [False, True])
def test_fp32_unequal_q_k_lengths(causal):
    # doc 1 has queries but no keys; causal doc 5 has 4 queries that see no key (bottom-right)
    _check_fp32([3, 1, 17, 0, 37, 7], [2, 0, 23, 6, 33, 19], 4, 2, 64, causal)


@pytest.mark.parametrize("causal,window", [(False, (7, 3)), (True, (11, -1)), (False, (0, 0))])
def test_fp32_sliding_window(causal, window):
    _check_fp32(LENS, LENS, 3, 1, 32, causal, window)


@pytest.mark.parametrize("causal,window", [(False, (-1, 6)), (False, (4, 9)), (False, (0, 23)), (True, (5, 9))])
def test_fp32_positive_right_window(causal, window):
    """Keys right of the diagonal (non-causal), against a mask written out element by
    element; under causal, right is 0 whatever was given (flash-attn's rule)."""
    lens_q, lens_k = [0, 1, 17, 40, 9], [0, 1, 17, 31, 30]
    q, k, v, cu_q, cu_k, mq, mk = _inputs(lens_q, lens_k, 3, 1, 16, torch.float32)
    out, lse = varlen_attention_fwd(q, k, v, cu_q, cu_k, mq, mk, 0.3, causal, window, backend="triton")
    r_out, r_lse = dense_masked_attention(q, k, v, cu_q, cu_k, 0.3, *window, causal)
    assert _max_err(out, r_out) / _max_abs(r_out) < 1e-5
    assert _max_err(lse, r_lse) / _max_abs(r_lse) < 1e-5
    _check_fp32(lens_q, lens_k, 3, 1, 16, causal, window)  # gradients, against the reference


def test_fp32_head_dim_not_power_of_two():
    _check_fp32(LENS, LENS, 2, 1, 80, True)


@pytest.mark.parametrize("causal", [False, True])
def test_fp16_error_at_most_twice_torch(causal):
    lens, hq, hkv, d = [0, 1, 29, 0, 46], 4, 2, 64
    q, k, v, cu_q, cu_k, mq, mk = _inputs(lens, lens, hq, hkv, d, torch.float16)
    dout = torch.randn_like(q)
    dlse = torch.randn(hq, q.shape[0], device=DEVICE)
    scale = d**-0.5
    window = (-1, -1)
    out, lse, grads = _run_triton(q, k, v, cu_q, cu_k, mq, mk, causal, window, dout, dlse)
    r_out, r_lse, r_grads = _run_float64(q, k, v, cu_q, cu_k, causal, window, dout, dlse, scale)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    p_out, p_lse = _lowp_reference(*leaves, cu_q, cu_k, scale, causal, window)
    p_grads = torch.autograd.grad((p_out, p_lse), leaves, (dout, dlse.half()))
    named = [("out", out, p_out, r_out), ("lse", lse, p_lse, r_lse)]
    named += list(zip(("dq", "dk", "dv"), grads, p_grads, r_grads))
    for name, a, p, b in named:
        assert a.dtype == (torch.float32 if name == "lse" else torch.float16), name
        err, base = _max_err(a, b), _max_err(p, b)
        eps = 1e-5 * _max_abs(b)
        assert err <= 2 * base + eps, f"{name}: error {err:.3g} > 2 x torch fp16 error {base:.3g} + {eps:.2g}"


def test_rows_past_end_and_poisoned_buffers(monkeypatch):
    """Rows past cu_seqlens[-1] hold NaN inputs and must give out 0, lse -inf, zero grads;
    every row a kernel owns must be written (its output buffer starts as NaN)."""
    lens_q, lens_k = [0, 1, 17, 5, 0, 37], [0, 1, 0, 5, 3, 30]  # doc 2: queries, no keys
    hq, hkv, d, causal, window = 4, 2, 64, True, (-1, -1)
    q, k, v, cu_q, cu_k, mq, mk = _inputs(lens_q, lens_k, hq, hkv, d, torch.float32, extra_q=5, extra_k=3)
    nq, nk = sum(lens_q), sum(lens_k)
    for t, n in ((q, nq), (k, nk), (v, nk)):
        t[n:] = math.nan
    dout = torch.randn_like(q)
    dout[nq:] = math.nan
    dlse = torch.randn(hq, q.shape[0], device=DEVICE)
    dlse[:, nq:] = math.nan
    scale = d**-0.5

    out, lse = varlen_attention_fwd(q, k, v, cu_q, cu_k, mq, mk, causal=causal, backend="triton")
    dq, dk, dv = varlen_attention_bwd(dout, q, k, v, out, lse, cu_q, cu_k, mq, mk, causal=causal, dlse=dlse, backend="triton")
    assert torch.equal(out[nq:], torch.zeros_like(out[nq:]))
    assert torch.isneginf(lse[:, nq:]).all()
    for name, g, n in (("dq", dq, nq), ("dk", dk, nk), ("dv", dv, nk)):
        assert torch.equal(g[n:], torch.zeros_like(g[n:])), f"{name} not zero past cu_seqlens[-1]"
        assert not torch.isnan(g).any(), f"{name} has NaN"

    r_out, r_lse, r_grads = _run_float64(
        q[:nq], k[:nk], v[:nk], cu_q, cu_k, causal, window, dout[:nq], dlse[:, :nq], scale
    )
    # now allocate every output buffer as NaN: rows inside documents must all be written
    real_zeros_like, real_full = torch.zeros_like, torch.full
    monkeypatch.setattr(torch, "zeros_like", lambda t, **kw: real_full(t.shape, math.nan, dtype=t.dtype, device=t.device))
    monkeypatch.setattr(torch, "full", lambda shape, value, **kw: real_full(shape, math.nan, **kw))
    out, lse = varlen_attention_fwd(q, k, v, cu_q, cu_k, mq, mk, causal=causal, backend="triton")
    dq, dk, dv = varlen_attention_bwd(dout, q, k, v, out, lse, cu_q, cu_k, mq, mk, causal=causal, dlse=dlse, backend="triton")
    monkeypatch.setattr(torch, "zeros_like", real_zeros_like)
    monkeypatch.setattr(torch, "full", real_full)
    for name, a, b in (("out", out[:nq], r_out), ("lse", lse[:, :nq], r_lse), ("dq", dq[:nq], r_grads[0]),
                       ("dk", dk[:nk], r_grads[1]), ("dv", dv[:nk], r_grads[2])):
        assert not torch.isnan(a).any(), f"{name}: a row inside a document was never written"
        assert _max_err(a, b) / _max_abs(b) < 1e-5, name


def test_backward_is_deterministic():
    q, k, v, cu_q, cu_k, mq, mk = _inputs(LENS, LENS, 4, 1, 32, torch.float32)
    dout = torch.randn_like(q)
    out, lse = varlen_attention_fwd(q, k, v, cu_q, cu_k, mq, mk, causal=True, backend="triton")
    g1 = varlen_attention_bwd(dout, q, k, v, out, lse, cu_q, cu_k, mq, mk, causal=True, backend="triton")
    g2 = varlen_attention_bwd(dout, q, k, v, out, lse, cu_q, cu_k, mq, mk, causal=True, backend="triton")
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_reference_backward_matches_autograd():
    """The float64 reference backward (used above, with dlse) against autograd of the
    reference forward, on a case where every row sees a key."""
    lens = [1, 13, 6]
    q, k, v, cu_q, cu_k, _, _ = _inputs(lens, lens, 4, 2, 16, torch.float64)
    dout, dlse = torch.randn_like(q), torch.randn(4, q.shape[0], dtype=torch.float64, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = ref.varlen_attention_fwd_reference(*leaves, cu_q, cu_k, 0.3, True, (4, -1))
    auto = torch.autograd.grad((out, lse), leaves, (dout, dlse))
    manual = ref.varlen_attention_bwd_reference(dout, q, k, v, out.detach(), lse.detach(), cu_q, cu_k, 0.3, True, (4, -1), dlse)
    for a, b in zip(auto, manual):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_softmax_scale_is_used():
    q, k, v, cu_q, cu_k, mq, mk = _inputs([9, 20], [9, 20], 2, 1, 16, torch.float32)
    out, lse = varlen_attention_fwd(q, k, v, cu_q, cu_k, mq, mk, softmax_scale=0.7, backend="triton")
    r_out, r_lse = ref.varlen_attention_fwd_reference(q.double(), k.double(), v.double(), cu_q, cu_k, 0.7)
    assert _max_err(out, r_out) / _max_abs(r_out) < 1e-5
    assert _max_err(lse, r_lse) / _max_abs(r_lse) < 1e-5


# ---------------------------------------------------------------------------------------
# Validation: clear ValueErrors naming the argument, before any launch
# ---------------------------------------------------------------------------------------


def _valid():
    lens = [3, 5]
    q, k, v, cu_q, cu_k, mq, mk = _inputs(lens, lens, 4, 2, 16, torch.float32)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=mq, max_seqlen_k=mk)


def _on_cpu(args):
    for name, value in args.items():
        if isinstance(value, torch.Tensor):
            args[name] = value.cpu()
    return args


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.update(q=a["q"].to(torch.int32)), "q must be float16"),
        (lambda a: a.update(k=a["k"].half()), "share a dtype"),
        (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].long()), "cu_seqlens_q must be int32"),
        (lambda a: a.update(k=a["k"][:, :1].expand(-1, 3, -1), v=a["v"][:, :1].expand(-1, 3, -1)), "multiple of k/v heads"),
        # value checks read cu_seqlens: only for CPU tensors (on a GPU they would sync)
        (lambda a: _on_cpu(a).update(cu_seqlens_k=torch.tensor([0, 5, 3], dtype=torch.int32)), "cu_seqlens_k must be non-decreasing"),
        (lambda a: _on_cpu(a).update(max_seqlen_q=2), "max_seqlen_q"),
        (lambda a: a.update(max_seqlen_k=torch.tensor(5)), "max_seqlen_k must be a non-negative Python int"),
        (lambda a: a.update(q=a["q"][:, :, :8]), "same head_dim"),
    ],
)
def test_validation_errors(change, match):
    args = _valid()
    change(args)
    with pytest.raises(ValueError, match=match):
        varlen_attention(**args)


# ---------------------------------------------------------------------------------------
# GPU: bf16/fp16 at larger shapes
# ---------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 96])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_low_precision_error_at_most_twice_torch(dtype, d, causal):
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    lens = [0, 1, 127, 1023] + torch.randint(1, 700, (6,), generator=gen).tolist()
    hq, hkv = 8, 2
    q, k, v, cu_q, cu_k, mq, mk = _inputs(lens, lens, hq, hkv, d, dtype)
    dout = torch.randn_like(q)
    dlse = torch.randn(hq, q.shape[0], device=DEVICE)
    scale, window = d**-0.5, (-1, -1)
    out, lse, grads = _run_triton(q, k, v, cu_q, cu_k, mq, mk, causal, window, dout, dlse)
    r_out, r_lse, r_grads = _run_float64(q, k, v, cu_q, cu_k, causal, window, dout, dlse, scale)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    p_out, p_lse = _lowp_reference(*leaves, cu_q, cu_k, scale, causal, window)
    p_grads = torch.autograd.grad((p_out, p_lse), leaves, (dout, dlse.to(dtype)))
    named = [("out", out, p_out, r_out), ("lse", lse, p_lse, r_lse)]
    named += list(zip(("dq", "dk", "dv"), grads, p_grads, r_grads))
    for name, a, p, b in named:
        err, base = _max_err(a, b), _max_err(p, b)
        eps = 1e-5 * _max_abs(b)
        assert err <= 2 * base + eps, f"{name}: error {err:.3g} > 2 x torch {dtype} error {base:.3g} + {eps:.2g}"


@requires_cuda
def test_gpu_fp32_uses_full_precision_dots():
    _check_fp32([0, 1, 300, 77], [0, 1, 300, 77], 4, 2, 128, True, tol=2e-5)


def test_custom_ops_pass_opcheck():
    """The torch.library registrations (schema, fake tensors, AOT dispatch) that let
    torch.compile trace through the kernels."""
    from longvita.kernels.attention.api import varlen_attention_bwd_op, varlen_attention_fwd_op

    lens = [0, 3, 9]
    q, k, v, cu_q, cu_k, mq, mk = _inputs(lens, lens, 2, 1, 16, torch.float32)
    fwd_args = (q, k, v, cu_q, cu_k, mq, mk, 0.25, True, -1, -1)
    torch.library.opcheck(varlen_attention_fwd_op, fwd_args)
    out, lse = varlen_attention_fwd_op(*fwd_args)
    dlse = torch.randn_like(lse)
    torch.library.opcheck(
        varlen_attention_bwd_op, (torch.randn_like(q), q, k, v, out, lse, cu_q, cu_k, mq, mk, 0.25, True, -1, -1, dlse)
    )


def _flash_attn_importable() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


@requires_cuda
@pytest.mark.skipif(not _flash_attn_importable(), reason="flash-attn not installed")
def test_gpu_flash_attn_backend_agrees():
    lens = [0, 1, 300, 77, 513]
    q, k, v, cu_q, cu_k, mq, mk = _inputs(lens, lens, 8, 2, 128, torch.bfloat16)
    out_t, lse_t = varlen_attention_fwd(q, k, v, cu_q, cu_k, mq, mk, causal=True, backend="triton")
    out_f, lse_f = varlen_attention_fwd(q, k, v, cu_q, cu_k, mq, mk, causal=True, backend="flash_attn")
    r_out, r_lse = ref.varlen_attention_fwd_reference(q.double(), k.double(), v.double(), cu_q, cu_k, None, True)
    assert _max_err(out_t, r_out) <= 2 * _max_err(out_f, r_out) + 1e-5 * _max_abs(r_out)
    assert _max_err(lse_t, r_lse) <= 2 * _max_err(lse_f, r_lse) + 1e-5 * _max_abs(r_lse)


@pytest.mark.parametrize("bm,bn", [(32, 16), (16, 32), (16, 64), (64, 32)])
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (9, 4))])
def test_fp32_unequal_block_sizes(monkeypatch, bm, bn, causal, window):
    """The interpreter runs 16x16 blocks; GPU configs have BLOCK_M != BLOCK_N, so check the
    block-range arithmetic (causal skipping, full/masked split) with unequal blocks too."""
    from longvita.kernels.attention import triton as vat

    if not vat.triton_interpret():
        pytest.skip("block override is for the interpreter")
    monkeypatch.setattr(vat, "_fixed_config", lambda kind, *rest: dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=1, num_stages=1))
    _check_fp32([0, 1, 37, 70, 5], [0, 3, 37, 53, 21], 2, 1, 16, causal, window)
