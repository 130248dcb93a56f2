"""Fused pixel-shuffle projector: index map, forward and all seven gradients against a
float64 reference, for the Triton (interpreter on CPU), C++ CPU and CUDA paths."""

import glob
import os
import shutil
import subprocess

import pytest
import torch

from longvita._ext import native, native_has_cuda
from longvita.kernels import pixel_shuffle_layernorm, pixel_shuffle_project
from longvita.kernels._backend import triton_runs_on
from longvita.kernels.pixel_shuffle import pixel_shuffle_source_index
from longvita.kernels.reference import pixel_shuffle_project_reference, pixel_shuffle_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("x", "ln_weight", "ln_bias", "w1", "b1", "w2", "b2")
# small absolute slack (times the reference's magnitude) on top of the 2x rule
SLACK = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}

needs_triton = pytest.mark.skipif(not triton_runs_on(torch.device("cpu")), reason="needs TRITON_INTERPRET=1 and triton")
needs_cpp = pytest.mark.skipif(native() is None, reason="longvita._C is not built")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _transformers_pixel_shuffle():
    try:
        from transformers.models.internvl.modeling_internvl import InternVLModel
    except Exception:
        return None
    return lambda x4, scale: InternVLModel.pixel_shuffle(None, x4, scale)


def _inputs(tiles, h, c, m, d, bias, dtype, device="cpu"):
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    x = rnd(tiles, h * h, c) * 2 + 0.5  # non-zero mean, so the LayerNorm's centring matters
    ln_w = 1 + rnd(4 * c, scale=0.3)
    ln_b = rnd(4 * c, scale=0.3) if bias else None
    w1 = rnd(m, 4 * c, scale=(4 * c) ** -0.5)
    b1 = rnd(m, scale=0.1) if bias else None
    w2 = rnd(d, m, scale=m**-0.5)
    b2 = rnd(d, scale=0.1) if bias else None
    return [x, ln_w, ln_b, w1, b1, w2, b2]


def _run(fn, inputs, dout):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def _check(name, got, ref64, base):
    """Error rule: |got - ref64| <= 2 |torch_same_dtype - ref64| + slack (docs/architecture.md, "Numerics")."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - ref64).abs().max().item()
    base_err = (base.double() - ref64).abs().max().item()
    bound = 2 * base_err + SLACK[got.dtype] * max(1.0, ref64.abs().max().item())
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (torch in {got.dtype}: {base_err:.3g})"


def _compare(backend, dtype, tiles, h, c, m, d, bias, device="cpu"):
    inputs = _inputs(tiles, h, c, m, d, bias, dtype, device)
    dout = torch.randn(tiles, h * h // 4, d, dtype=torch.float64, device=device)
    out, grads = _run(lambda *a: pixel_shuffle_project(*a, backend=backend), inputs, dout.to(dtype))
    ref_out, ref_grads = _run(pixel_shuffle_project_reference, [t.double() if t is not None else None for t in inputs], dout)
    base_out, base_grads = _run(pixel_shuffle_project_reference, inputs, dout.to(dtype))
    assert out.dtype == dtype
    _check("out", out, ref_out, base_out)
    for name, g, r, b in zip(NAMES, grads, ref_grads, base_grads):
        if r is None:
            assert g is None, f"{name} is None but got a gradient"
            continue
        _check(f"d{name}", g, r, b)


SHAPES = [  # tiles, h, C, M, D: C/M/D not powers of two; h = 32 keeps C tiny
    (1, 2, 12, 20, 24),
    (3, 8, 12, 20, 24),
    (2, 32, 3, 10, 6),
    (5, 4, 7, 9, 11),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference(shape, bias, dtype):
    _compare("triton", dtype, *shape, bias)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_rows_kernel_matches_reference(shape, bias, dtype, monkeypatch):
    """The one-pass forward (whole rows per program, shifted one-pass statistics) under the
    same rule; its backward is the shared one."""
    monkeypatch.setenv("LONGVITA_SHUFFLE_LN_FWD", "rows")
    _compare("triton", dtype, *shape, bias)


@needs_triton
@pytest.mark.parametrize("offset", [0.0, 300.0], ids=["centred", "mean-300"])
def test_triton_rows_kernel_statistics_against_float64(offset):
    """The shifted one-pass variance stays exact when the rows' mean is far from 0 (the
    textbook sum-of-squares formula loses every digit at mean 300, std 1 in fp32)."""
    from longvita.kernels.pixel_shuffle.api import PixelShuffleParams
    from longvita.kernels.pixel_shuffle.triton import triton_ln_fwd

    x = torch.randn(3, 64, 24, dtype=torch.float64) + offset
    w, b = 1 + 0.2 * torch.randn(96, dtype=torch.float64), torch.randn(96, dtype=torch.float64)
    ref = torch.nn.functional.layer_norm(pixel_shuffle_reference(x), (96,), w, b, 1e-5)
    shuffled = pixel_shuffle_reference(x).reshape(-1, 96)
    p = PixelShuffleParams(inv=2, eps=1e-5, backend="triton")
    y, mean, rstd = triton_ln_fwd(x.float(), w.float(), b.float(), p, kernel="rows")
    torch.testing.assert_close(mean.double(), shuffled.mean(-1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(rstd.double(), (shuffled.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-4, atol=0)
    assert (y.double() - ref).abs().max() < 2e-3 * (1 + offset / 100)  # fp32 input rounding at |x| = 300
    with pytest.raises(ValueError, match="kernel must be one of"):
        triton_ln_fwd(x.float(), w.float(), b.float(), p, kernel="rowz")


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpp_matches_reference(shape, bias, dtype):
    _compare("cpp", dtype, *shape, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=["fp32", "fp16", "fp64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_torch_backend_matches_reference(shape, bias, dtype):
    """The torch backend gathers through the index map; the reference reshapes and permutes."""
    _compare("torch", dtype, *shape, bias)


def _cpu_backends():
    return [
        "torch", None,
        pytest.param("cpp", marks=needs_cpp),
        pytest.param("triton", marks=needs_triton),
    ]


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_zero_tiles_every_backend(backend, bias):
    """0 tiles: every backend returns (0, h*h/4, D) and gives zero (not missing) gradients."""
    c, m, d = 5, 6, 7
    inputs = _inputs(0, 4, c, m, d, bias, torch.float32)
    out, grads = _run(lambda *a: pixel_shuffle_project(*a, backend=backend), inputs, torch.randn(0, 4, d))
    assert out.shape == (0, 4, d) and out.dtype == torch.float32
    for name, t, g in zip(NAMES, inputs, grads):
        if t is None:
            assert g is None, name
        else:
            assert g is not None and g.shape == t.shape and not g.any(), name
    assert pixel_shuffle_layernorm(inputs[0], inputs[1], inputs[2], backend=backend).shape == (0, 4, 4 * c)


@pytest.mark.parametrize("h", [2, 4, 8])
def test_index_map_is_internvl_pixel_shuffle(h):
    tiles, c = 3, 5
    x = torch.randn(tiles, h * h, c, dtype=torch.float64)
    idx = pixel_shuffle_source_index(h)
    via_map = x[:, idx].flatten(2)  # (tiles, h*h/4, 4C)
    assert torch.equal(via_map, pixel_shuffle_reference(x))
    ps = _transformers_pixel_shuffle()
    if ps is not None:
        theirs = ps(x.view(tiles, h, h, c), 0.5).reshape(tiles, -1, 4 * c)
        assert torch.equal(via_map, theirs)
    # the map is a permutation of the tokens: each source token has exactly one destination
    assert torch.equal(idx.flatten().sort().values, torch.arange(h * h))
    # slot order for 0.5: top-left, top-right, bottom-left, bottom-right of each 2x2 block
    assert idx[0].tolist() == [0, 1, h, h + 1]


@pytest.mark.parametrize(
    "backend", [pytest.param("triton", marks=needs_triton), pytest.param("cpp", marks=needs_cpp)]
)
def test_fused_layernorm_exact_map(backend):
    """The fused LayerNorm equals F.layer_norm of transformers' (or the reference's) shuffle."""
    tiles, h, c = 2, 6, 5
    x = torch.randn(tiles, h * h, c)
    w, b = torch.randn(4 * c), torch.randn(4 * c)
    ps = _transformers_pixel_shuffle()
    shuffled = ps(x.view(tiles, h, h, c), 0.5).reshape(tiles, -1, 4 * c) if ps else pixel_shuffle_reference(x)
    expect = torch.nn.functional.layer_norm(shuffled.double(), (4 * c,), w.double(), b.double(), 1e-5)
    got = pixel_shuffle_layernorm(x, w, b, eps=1e-5, backend=backend)
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-5)


def test_bad_shapes_raise():
    c, m, d = 4, 6, 5
    ok = _inputs(1, 4, c, m, d, True, torch.float32)

    def call(**over):
        args = dict(zip(NAMES, ok))
        args.update(over)
        return pixel_shuffle_project(*[args[n] for n in NAMES])

    with pytest.raises(ValueError, match="perfect square"):
        call(x=torch.randn(1, 12, c))
    with pytest.raises(ValueError, match="h = 3"):
        call(x=torch.randn(1, 9, c))
    with pytest.raises(ValueError, match="x must be 3-D"):
        call(x=torch.randn(16, c))
    with pytest.raises(ValueError, match="ln_weight"):
        call(x=torch.randn(1, 16, c + 1))
    with pytest.raises(ValueError, match="ln_bias"):
        call(ln_bias=torch.randn(4 * c + 1))
    with pytest.raises(ValueError, match="w1"):
        call(w1=torch.randn(m, 4 * c + 1))
    with pytest.raises(ValueError, match="w2"):
        call(w2=torch.randn(d, m + 1))
    with pytest.raises(ValueError, match="b1"):
        call(b1=torch.randn(m + 1))
    with pytest.raises(ValueError, match="b2"):
        call(b2=torch.randn(d + 1))
    with pytest.raises(ValueError, match="w2 must have x's dtype"):
        call(w2=ok[5].double())
    with pytest.raises(ValueError, match="scale_factor"):
        pixel_shuffle_layernorm(ok[0], ok[1], ok[2], scale_factor=0.3)
    with pytest.raises(ValueError, match="backend"):
        pixel_shuffle_layernorm(ok[0], ok[1], ok[2], backend="nope")


@needs_cpp
def test_extension_links_shared_libstdcxx():
    """The GPU image's g++ linked libstdc++ statically into _C.so by default, and then the
    first failing TORCH_CHECK below crashed the process (SIGSEGV while formatting its
    message). setup.py links the libstdc++ torch loaded instead."""
    from longvita._ext import native_links_shared_libstdcxx

    linked = native_links_shared_libstdcxx()
    if linked is None:
        pytest.skip("no ldd here")
    assert linked, "longvita._C has no shared libstdc++ dependency"


@needs_cpp
def test_binding_checks_arguments():
    ext = native()
    x = torch.randn(1, 16, 3)
    # the numbers in the message too: a statically linked libstdc++ formatted none of them
    with pytest.raises(RuntimeError, match=r"weight must be 1-D with inv\*inv\*C = 12"):
        ext.pixel_shuffle_ln_fwd(x, torch.randn(11), None, 2, 1e-5)
    with pytest.raises(RuntimeError, match="perfect square"):
        ext.pixel_shuffle_ln_fwd(torch.randn(1, 15, 3), torch.randn(12), None, 2, 1e-5)
    with pytest.raises(RuntimeError, match="bias"):
        ext.pixel_shuffle_ln_fwd(x, torch.randn(12), torch.randn(12, dtype=torch.float64), 2, 1e-5)
    y, mean, rstd = ext.pixel_shuffle_ln_fwd(x, torch.randn(12), None, 2, 1e-5)
    with pytest.raises(RuntimeError, match="dy"):
        ext.pixel_shuffle_ln_bwd(torch.randn(1, 4, 11), x, torch.randn(12), mean, rstd, 2, False)
    with pytest.raises(RuntimeError, match="rstd"):
        ext.pixel_shuffle_ln_bwd(y, x, torch.randn(12), mean, rstd[:2], 2, False)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_sources_compile(tmp_path):
    """csrc/pixel_shuffle_ln.cu compiles for sm_90a with CUDA headers alone (about 20 s)."""
    src = os.path.join(ROOT, "csrc", "pixel_shuffle_ln.cu")
    assert src in glob.glob(os.path.join(ROOT, "csrc", "*.cu"))
    cmd = ["nvcc", "-arch=sm_90a", "-std=c++17", "-O3", "-I", os.path.join(ROOT, "csrc"), "-c", src, "-o", str(tmp_path / "ps.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]


# --------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------


def _gpu_backends():
    return [pytest.param("triton"), pytest.param("cuda", marks=pytest.mark.skipif(not native_has_cuda(), reason="longvita._C built without CUDA"))]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 32, 1024, 256, 128), (3, 8, 12, 20, 24)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_rows_kernel_matches_reference(dtype, shape, monkeypatch):
    monkeypatch.setenv("LONGVITA_SHUFFLE_LN_FWD", "rows")
    _compare("triton", dtype, *shape, False, device="cuda")


@requires_cuda
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(3, 8, 12, 20, 24), (2, 32, 64, 96, 80), (4, 32, 1024, 256, 128)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gpu_matches_reference(backend, dtype, shape, bias):
    _compare(backend, dtype, *shape, bias, device="cuda")


@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("g++") is None, reason="nvcc or g++ not found")
def test_binding_cuda_branch_compiles(tmp_path):
    """Syntax-checks csrc/binding.cpp with LONGVITA_WITH_CUDA defined against the CPU torch's
    headers (c10/cuda needs a generated cuda_cmake_macros.h: an empty stub stands in)."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    binding = os.path.join(ROOT, "csrc", "binding.cpp")
    if "ATen/cuda/" in open(binding).read():
        pytest.skip("binding.cpp includes ATen/cuda headers, which need cuBLAS/cuSPARSE headers")
    cuda_inc = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc")))), "include")
    nvcc_script = open(shutil.which("nvcc"), errors="ignore").read(4096)  # a wrapper script may point elsewhere
    for tok in nvcc_script.split():
        if tok.endswith("/bin/nvcc"):
            cuda_inc = os.path.join(os.path.dirname(os.path.dirname(tok)), "include")
    if not os.path.exists(os.path.join(cuda_inc, "cuda_runtime.h")):
        pytest.skip(f"cuda_runtime.h not found under {cuda_inc}")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-DLONGVITA_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", f"-I{tmp_path}"]
    cmd += [f"-I{p}" for p in include_paths()] + [f"-I{cuda_inc}", f"-I{os.path.join(ROOT, 'csrc')}"]
    cmd += [f"-I{sysconfig.get_paths()['include']}", binding]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]


@needs_triton
def test_triton_writes_every_element(monkeypatch):
    """Buffers the launchers allocate start as NaN: an unwritten y or dx element fails."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(real_empty_like(*a, **k)))
    tiles, h, c = 3, 6, 5
    x = torch.randn(tiles, h * h, c, dtype=torch.float64)
    w, b = 1 + 0.2 * torch.randn(4 * c, dtype=torch.float64), torch.randn(4 * c, dtype=torch.float64)
    dy = torch.randn(tiles, h * h // 4, 4 * c, dtype=torch.float64)
    out, grads = _run(lambda *a: pixel_shuffle_layernorm(*a, backend="triton"), [x.float(), w.float(), b.float()], dy.float())
    ref = lambda x_, w_, b_: torch.nn.functional.layer_norm(pixel_shuffle_reference(x_), (4 * c,), w_, b_, 1e-5)  # noqa: E731
    ref_out, ref_grads = _run(ref, [x, w, b], dy)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4)


@needs_triton
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_torch_compile_traces_through():
    """The launchers are custom ops with fake kernels: torch.compile (aot_eager: no codegen,
    so the test stays fast) traces the whole projector, forward and backward."""
    torch._dynamo.reset()
    inputs = _inputs(2, 4, 5, 6, 7, True, torch.float32)
    dout = torch.randn(2, 4, 7)
    fn = torch.compile(lambda *a: pixel_shuffle_project(*a, backend="triton"), backend="aot_eager", fullgraph=True)
    out, grads = _run(fn, inputs, dout)
    ref_out, ref_grads = _run(lambda *a: pixel_shuffle_project(*a, backend="triton"), inputs, dout)
    torch.testing.assert_close(out, ref_out)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
