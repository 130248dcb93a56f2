"""The decoder's fused memory-bound kernels, RMSNorm (+ residual add), RoPE on q and k, and
SwiGLU: Triton (the interpreter on CPU) and torch paths against the float64 references in
``kernels/reference.py``, forward and every gradient, the 2x rule in fp16, odd shapes,
NaN-poisoned output buffers, clear errors, the custom ops, and equality with the model's
own eager modules they replace (``longvita/model/text.py``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longvita.kernels import apply_rope_qk, rms_norm, swiglu
from longvita.kernels import reference as ref
from longvita.kernels._backend import triton_runs_on

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not triton_runs_on(DEVICE), reason="Triton cannot run here")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# the interpreter runs fp32 and fp16 (its bf16 is wrong); a GPU runs bf16 too
LOWP = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30)).item() if b.numel() else 0.0


def _max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if b.numel() else 0.0


def _grads(fn, inputs, douts):
    """Outputs and input gradients of ``fn`` on fresh leaves made from ``inputs``."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = torch.autograd.grad(outs, [t for t in leaves if t.requires_grad], douts)
    return [o.detach() for o in outs], list(grads)


def _two_x(name, got, plain, ref64, slack=1e-5):
    """The 2x rule: the kernel's error against float64 is at most twice plain torch's in the
    same dtype, plus a small slack relative to the values' size."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err, base = _max_err(got, ref64), _max_err(plain, ref64)
    bound = 2 * base + slack * max(1.0, ref64.abs().max().item() if ref64.numel() else 1.0)
    assert err <= bound, f"{name}: error {err:.3g} > 2 x torch's {base:.3g} + slack"


def _poison_allocations(monkeypatch):
    """Every buffer the launchers allocate with empty/empty_like starts as NaN, so an element
    the kernel never writes fails the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(real_empty_like(*a, **k)))


# --------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------

RMS_SHAPES = [(1, 3), (7, 37), (3, 5, 100), (2, 64), (0, 16), (13, 128)]  # rows x H: 1, primes, H not a power of 2


def _rms_inputs(shape, dtype, residual, wdtype=None):
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.3).to(DEVICE, dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], dtype=torch.float64)).to(DEVICE, wdtype or dtype)
    r = torch.randn(shape, dtype=torch.float64).to(DEVICE, dtype) if residual else None
    return x, w, r


def _rms_call(backend, eps=1e-6):
    def fn(x, w, r=None):
        return rms_norm(x, w, eps, residual=r, backend=backend)
    return fn


def _rms_ref(eps=1e-6):
    def fn(x, w, r=None):
        return ref.rms_norm_reference(x, w, eps, r)
    return fn


def _douts(outs_like):
    return tuple(torch.randn_like(o) for o in outs_like)


@needs_triton
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", RMS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_fp32_matches_float64(shape, residual):
    x, w, r = _rms_inputs(shape, torch.float32, residual)
    inputs = [x, w] + ([r] if residual else [])
    outs64 = _rms_ref()(*(t.double() for t in inputs))
    outs64 = outs64 if isinstance(outs64, tuple) else (outs64,)
    douts = _douts(outs64)
    got, g = _grads(_rms_call("triton"), inputs, tuple(d.float() for d in douts))
    want, g64 = _grads(_rms_ref(), [t.double() for t in inputs], douts)
    assert [o.dtype for o in got] == [torch.float32] * len(got)
    for name, a, b in zip(("y", "h"), got, want):
        assert _rel_err(a, b) < 1e-5, name
    for name, a, b in zip(("dx", "dweight", "dresidual"), g, g64):
        assert _rel_err(a, b) < 1e-5, name


@needs_triton
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_low_precision_2x_rule(dtype, residual):
    x, w, r = _rms_inputs((29, 77), dtype, residual)
    inputs = [x, w] + ([r] if residual else [])
    outs64 = _rms_ref()(*(t.double() for t in inputs))
    douts = _douts(outs64 if isinstance(outs64, tuple) else (outs64,))
    got, g = _grads(_rms_call("triton"), inputs, tuple(d.to(dtype) for d in douts))
    plain, gp = _grads(_rms_ref(), inputs, tuple(d.to(dtype) for d in douts))
    want, g64 = _grads(_rms_ref(), [t.double() for t in inputs], douts)
    for name, a, p, b in zip(("y", "h", "dx", "dweight", "dresidual"), got + g, plain + gp, want + g64):
        assert a.dtype == p.dtype, name
        _two_x(name, a, p, b)


@needs_triton
def test_rms_norm_mixed_dtypes_follow_eager_promotion():
    """Under autocast a decoder runs fp16/bf16 activations against fp32 weights and an fp32
    residual stream: y takes result_type(weight, h), h result_type(x, residual), and each
    gradient its input's dtype, as eager does."""
    x, w, _ = _rms_inputs((11, 48), torch.float16, False, wdtype=torch.float32)
    r = torch.randn(11, 48, device=DEVICE)  # fp32 residual stream
    for backend in ("triton", "torch"):
        (y, h), g = _grads(_rms_call(backend), [x, w, r], (torch.randn(11, 48, device=DEVICE),) * 2)
        assert y.dtype == torch.float32 and h.dtype == torch.float32, backend
        assert [t.dtype for t in g] == [torch.float16, torch.float32, torch.float32], backend
    y = rms_norm(x, w, 1e-6, backend="triton")
    assert y.dtype == torch.float32
    want = ref.rms_norm_reference(x.double(), w.double(), 1e-6)
    plain = ref.rms_norm_reference(x, w, 1e-6)
    _two_x("y", y, plain, want)


@needs_triton
def test_rms_norm_writes_every_element(monkeypatch):
    x, w, r = _rms_inputs((9, 33), torch.float32, True)
    dy, dh = torch.randn(9, 33, device=DEVICE), torch.randn(9, 33, device=DEVICE)
    want, g64 = _grads(_rms_ref(), [x.double(), w.double(), r.double()], (dy.double(), dh.double()))
    _poison_allocations(monkeypatch)
    got, g = _grads(_rms_call("triton"), [x, w, r], (dy, dh))
    for name, a, b in zip(("y", "h", "dx", "dweight", "dresidual"), got + g, want + g64):
        assert not torch.isnan(a).any(), f"{name}: an element was never written"
        assert _rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_rms_norm_equals_the_models_module(backend):
    """Drop-in for Qwen2's eager RMSNorm (transformers' ``Qwen2RMSNorm``, what
    ``model.text.RMSNorm`` computed before it called this kernel): same values and gradients."""
    qwen2 = pytest.importorskip("transformers.models.qwen2.modeling_qwen2")

    mod = qwen2.Qwen2RMSNorm(40, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        mod.weight.copy_(1 + 0.2 * torch.randn(40))
    x = torch.randn(2, 9, 40, device=DEVICE)
    dy = torch.randn(2, 9, 40, device=DEVICE)
    (y_mod,), (gx_mod, gw_mod) = _grads(lambda x_, w_: torch.func.functional_call(mod, {"weight": w_}, (x_,)),
                                        [x, mod.weight], (dy,))
    (y,), (gx, gw) = _grads(_rms_call(backend), [x, mod.weight], (dy,))
    torch.testing.assert_close(y, y_mod, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_mod, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, gw_mod, rtol=1e-5, atol=1e-5)


def test_rms_norm_float64_is_exact():
    x, w, r = _rms_inputs((5, 19), torch.float64, True)
    y, h = rms_norm(x, w, 1e-5, residual=r)
    y_ref, h_ref = ref.rms_norm_reference(x, w, 1e-5, r)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)


def test_rms_norm_bad_inputs_raise():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight must be 1-D with x's last dimension"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="residual must have x's shape"):
        rms_norm(x, torch.ones(8), residual=torch.randn(4, 9))
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        rms_norm(x, torch.ones(8), eps=-1.0)
    with pytest.raises(ValueError, match="x must be float16"):
        rms_norm(x.int(), torch.ones(8))
    with pytest.raises(ValueError, match="non-empty last dimension"):
        rms_norm(torch.randn(4, 0), torch.ones(0))


# --------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------

ROPE_CASES = [  # tokens, Hq, Hkv, D: GQA 5:1 (40:8 scaled down), 4:4 (16:16 scaled down), 1 token, 0 tokens, odd D/2
    (13, 5, 1, 16), (9, 4, 4, 32), (1, 3, 1, 8), (0, 2, 1, 8), (17, 2, 2, 20),
]


def _rope_inputs(tokens, hq, hkv, d, dtype, table_dtype=torch.float32):
    from longvita.model.text import rope_cos_sin

    pos = torch.randint(0, 100_000, (tokens,), device=DEVICE)
    cos, sin = rope_cos_sin(pos, d, 1e6, table_dtype)
    q = torch.randn(tokens, hq, d, device=DEVICE, dtype=torch.float64).to(dtype)
    k = torch.randn(tokens, hkv, d, device=DEVICE, dtype=torch.float64).to(dtype)
    return q, k, cos, sin


def _rope_ref(q, k, cos, sin):
    return ref.rope_reference(q, cos.to(q.dtype), sin.to(q.dtype)), ref.rope_reference(k, cos.to(k.dtype), sin.to(k.dtype))


@needs_triton
@pytest.mark.parametrize("case", ROPE_CASES, ids=lambda c: "x".join(map(str, c)))
def test_rope_fp32_matches_float64(case):
    q, k, cos, sin = _rope_inputs(*case, torch.float32)
    douts = (torch.randn_like(q), torch.randn_like(k))
    got, g = _grads(lambda q_, k_: apply_rope_qk(q_, k_, cos, sin, backend="triton"), [q, k], douts)
    want, g64 = _grads(lambda q_, k_: _rope_ref(q_, k_, cos.double(), sin.double()), [q.double(), k.double()],
                       tuple(d.double() for d in douts))
    for name, a, b in zip(("q", "k", "dq", "dk"), got + g, want + g64):
        assert a.shape == b.shape and a.dtype == torch.float32, name
        assert _rel_err(a, b) < 1e-5, name


@needs_triton
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("table_dtype", ["same", torch.float32], ids=["tables-same", "tables-fp32"])
def test_rope_low_precision_2x_rule(dtype, table_dtype):
    """The decoder's two cases: tables in the activations' dtype (a bf16 model), or fp32
    tables against fp16/bf16 q and k (autocast over fp32 weights)."""
    q, k, cos, sin = _rope_inputs(23, 5, 1, 64, dtype, dtype if table_dtype == "same" else table_dtype)
    douts = (torch.randn_like(q), torch.randn_like(k))
    got, g = _grads(lambda q_, k_: apply_rope_qk(q_, k_, cos, sin, backend="triton"), [q, k], douts)
    plain, gp = _grads(lambda q_, k_: (ref.rope_reference(q_, cos, sin), ref.rope_reference(k_, cos, sin)), [q, k], douts)
    want, g64 = _grads(lambda q_, k_: _rope_ref(q_, k_, cos.double(), sin.double()), [q.double(), k.double()],
                       tuple(d.double() for d in douts))
    for name, a, p, b in zip(("q", "k", "dq", "dk"), got + g, plain + gp, want + g64):
        assert a.dtype == dtype, name
        _two_x(name, a, p, b)


@needs_triton
def test_rope_strided_inputs_and_every_element_written(monkeypatch):
    """q and k as views of one fused projection (token stride larger than heads x D)."""
    q, k, cos, sin = _rope_inputs(11, 3, 1, 16, torch.float32)
    qkv = torch.randn(11, 3 + 1 + 1, 16, device=DEVICE)
    qkv[:, :3], qkv[:, 3:4] = q, k
    qv, kv = qkv[:, :3], qkv[:, 3:4]
    want = _rope_ref(q.double(), k.double(), cos.double(), sin.double())
    _poison_allocations(monkeypatch)
    got = apply_rope_qk(qv, kv, cos, sin, backend="triton")
    for name, a, b in zip(("q", "k"), got, want):
        assert not torch.isnan(a).any(), f"{name}: an element was never written"
        assert _rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_rope_equals_the_models_apply_rope(backend):
    """Drop-in for ``model.text``'s ``apply_rope(q, cos, sin).to(v.dtype)`` on q and k."""
    from longvita.model.text import apply_rope

    q, k, cos, sin = _rope_inputs(15, 4, 2, 32, torch.float32)
    qo, ko = apply_rope_qk(q, k, cos, sin, backend=backend)
    torch.testing.assert_close(qo, apply_rope(q, cos, sin), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ko, apply_rope(k, cos, sin), rtol=1e-5, atol=1e-6)


def test_rope_bad_inputs_raise():
    q, k, cos, sin = _rope_inputs(4, 2, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="k must be"):
        apply_rope_qk(q, k[:3], cos, sin)
    with pytest.raises(ValueError, match="head_dim must be even"):
        apply_rope_qk(q[..., :7], k[..., :7], cos[:, :7], sin[:, :7])
    with pytest.raises(ValueError, match=r"cos must be \(tokens, head_dim\)"):
        apply_rope_qk(q, k, cos[:, :4], sin)
    with pytest.raises(ValueError, match="q must be 3-D"):
        apply_rope_qk(q[0], k, cos, sin)
    with pytest.raises(ValueError, match="sin requires grad"):
        apply_rope_qk(q, k, cos, sin.clone().requires_grad_())


# --------------------------------------------------------------------------------------
# SwiGLU
# --------------------------------------------------------------------------------------

SWIGLU_SHAPES = [(1,), (7, 37), (3, 5, 100), (0, 16), (4, 131)]


@needs_triton
@pytest.mark.parametrize("shape", SWIGLU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_swiglu_fp32_matches_float64(shape):
    g, u = (torch.randn(shape, device=DEVICE) * 3 for _ in range(2))
    dy = torch.randn(shape, device=DEVICE)
    got, gr = _grads(lambda a, b: swiglu(a, b, backend="triton"), [g, u], (dy,))
    want, g64 = _grads(ref.swiglu_reference, [g.double(), u.double()], (dy.double(),))
    for name, a, b in zip(("y", "dgate", "dup"), got + gr, want + g64):
        assert a.shape == b.shape and a.dtype == torch.float32, name
        assert _rel_err(a, b) < 1e-5, name


@needs_triton
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_swiglu_low_precision_2x_rule(dtype):
    g, u = (torch.randn(33, 70, device=DEVICE, dtype=torch.float64).mul(3).to(dtype) for _ in range(2))
    dy = torch.randn(33, 70, device=DEVICE, dtype=torch.float64)
    got, gr = _grads(lambda a, b: swiglu(a, b, backend="triton"), [g, u], (dy.to(dtype),))
    plain, gp = _grads(ref.swiglu_reference, [g, u], (dy.to(dtype),))
    want, g64 = _grads(ref.swiglu_reference, [g.double(), u.double()], (dy,))
    for name, a, p, b in zip(("y", "dgate", "dup"), got + gr, plain + gp, want + g64):
        assert a.dtype == dtype, name
        _two_x(name, a, p, b)


@needs_triton
def test_swiglu_merged_projection_views_and_every_element_written(monkeypatch):
    """gate and up as the halves of one (tokens, 2I) projection output; poisoned buffers."""
    gu = torch.randn(9, 2 * 45, device=DEVICE) * 2
    dy = torch.randn(9, 45, device=DEVICE)
    want, g64 = _grads(lambda t: ref.swiglu_reference(t[:, :45], t[:, 45:]), [gu.double()], (dy.double(),))
    _poison_allocations(monkeypatch)
    got, g = _grads(lambda t: swiglu(t[:, :45], t[:, 45:], backend="triton"), [gu], (dy,))
    for name, a, b in zip(("y", "dgate_up"), got + g, want + g64):
        assert not torch.isnan(a).any(), f"{name}: an element was never written"
        assert _rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_swiglu_equals_the_models_mlp_core(backend):
    g, u = torch.randn(6, 50, device=DEVICE), torch.randn(6, 50, device=DEVICE)
    torch.testing.assert_close(swiglu(g, u, backend=backend), F.silu(g) * u, rtol=1e-5, atol=1e-6)


@needs_triton
def test_swiglu_saves_only_its_inputs():
    """The memory point of the fusion: autograd keeps gate and up (which exist anyway), not
    silu(gate) as eager does."""
    g, u = (torch.randn(8, 64, device=DEVICE, requires_grad=True) for _ in range(2))
    y = swiglu(g, u, backend="triton")
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 2
    assert all(s.untyped_storage().data_ptr() in (g.untyped_storage().data_ptr(), u.untyped_storage().data_ptr())
               for s in saved)
    eager = F.silu(g) * u  # control: eager's graph holds a third tensor, silu(gate)
    ptrs = {g.untyped_storage().data_ptr(), u.untyped_storage().data_ptr()}
    held = {t.untyped_storage().data_ptr() for t in (eager.grad_fn._saved_self, eager.grad_fn._saved_other)}
    assert held - ptrs, "the control should see eager keep silu(gate)"


def test_swiglu_bad_inputs_raise():
    with pytest.raises(ValueError, match="gate and up must have one shape"):
        swiglu(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="share a dtype"):
        swiglu(torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="gate must be float16"):
        swiglu(torch.ones(3, 4, dtype=torch.int32), torch.ones(3, 4, dtype=torch.int32))


# --------------------------------------------------------------------------------------
# All three: custom ops, torch.compile
# --------------------------------------------------------------------------------------


@needs_triton
def test_custom_ops_pass_opcheck():
    from longvita.kernels.norm.api import _rms_norm_bwd_op, _rms_norm_fwd_op
    from longvita.kernels.rope.api import _rope_qk_op
    from longvita.kernels.glu.api import _swiglu_bwd_op, _swiglu_fwd_op

    x, w, r = _rms_inputs((5, 24), torch.float32, True)
    torch.library.opcheck(_rms_norm_fwd_op, (x, w, r, 1e-6, torch.float32, torch.float32))
    torch.library.opcheck(_rms_norm_fwd_op, (x, w, None, 1e-6, torch.float32, torch.float32))
    y, h, rstd = _rms_norm_fwd_op(x, w, r, 1e-6, torch.float32, torch.float32)
    torch.library.opcheck(_rms_norm_bwd_op, (torch.randn_like(y), h, w, rstd, torch.randn_like(h)))
    q, k, cos, sin = _rope_inputs(6, 2, 1, 16, torch.float32)
    torch.library.opcheck(_rope_qk_op, (q, k, cos, sin, False))
    g, u = torch.randn(4, 40, device=DEVICE), torch.randn(4, 40, device=DEVICE)
    torch.library.opcheck(_swiglu_fwd_op, (g, u))
    torch.library.opcheck(_swiglu_bwd_op, (torch.randn_like(g), g, u))


@needs_triton
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_torch_compile_traces_through_a_decoder_block():
    """norm -> rope -> swiglu -> residual norm, forward and backward, under torch.compile
    (aot_eager: no codegen, so the test stays fast) with fullgraph=True."""
    torch._dynamo.reset()
    x, w, _ = _rms_inputs((6, 32), torch.float32, False)
    q, k, cos, sin = _rope_inputs(6, 2, 1, 16, torch.float32)

    def block(x_, w_, q_, k_):
        h = rms_norm(x_, w_, 1e-6, backend="triton")
        qo, ko = apply_rope_qk(q_, k_, cos, sin, backend="triton")
        m = swiglu(h, h * 0.5, backend="triton")
        y, s = rms_norm(m, w_, 1e-6, residual=x_, backend="triton")
        return y.sum() + s.sum() + qo.sum() + ko.sum()

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    (out,), grads = _grads(compiled, [x, w, q, k], (torch.tensor(1.0, device=DEVICE),))
    (want,), want_grads = _grads(block, [x, w, q, k], (torch.tensor(1.0, device=DEVICE),))
    torch.testing.assert_close(out, want)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_model_shapes_2x_rule(dtype):
    """Qwen2.5-14B's widths on the chip: H 5120, 40:8 heads of 128, I 13824 (a few rows)."""
    x, w, r = _rms_inputs((37, 5120), dtype, True)
    dy = torch.randn(37, 5120, device=DEVICE, dtype=torch.float64)
    outs = [_grads(fn, inp, (dy.to(t), dy.to(t)))[0] for fn, inp, t in (
        (_rms_call("triton"), [x, w, r], dtype), (_rms_ref(), [x, w, r], dtype),
        (_rms_ref(), [x.double(), w.double(), r.double()], torch.float64))]
    for name, a, p, b in zip(("y", "h"), *outs):
        _two_x(name, a, p, b)
    q, k, cos, sin = _rope_inputs(37, 40, 8, 128, dtype)
    got = apply_rope_qk(q, k, cos, sin)
    plain = (ref.rope_reference(q, cos, sin), ref.rope_reference(k, cos, sin))
    want = _rope_ref(q.double(), k.double(), cos.double(), sin.double())
    for name, a, p, b in zip(("q", "k"), got, plain, want):
        _two_x(name, a, p, b)
    g, u = (torch.randn(37, 13824, device=DEVICE, dtype=dtype) for _ in range(2))
    _two_x("swiglu", swiglu(g, u), ref.swiglu_reference(g, u), ref.swiglu_reference(g.double(), u.double()))
