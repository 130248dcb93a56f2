"""The one backend resolver (``longvita.kernels._backend``): for every kernel family, the
implementation that actually runs is the one ``kernel_backends`` names; unknown names
raise; ``LONGVITA_BACKEND`` is honoured; bfloat16 never runs in Triton's interpreter;
the first eager calls keep ``torch._dynamo`` unimported."""

import importlib
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import longvita.kernels._backend as backend_mod
from longvita._ext import native
from longvita.kernels import (
    apply_rope_qk,
    linear_cross_entropy,
    lse_merge_,
    pixel_shuffle_layernorm,
    rms_norm,
    swiglu,
    varlen_attention,
)
from longvita.kernels import reference as ref
from longvita.kernels._backend import FAMILIES, kernel_backends, resolve, triton_available, triton_runs_on

CPU = torch.device("cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERPRETER = triton_runs_on(CPU)  # TRITON_INTERPRET=1 and triton importable
needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="needs TRITON_INTERPRET=1 and triton")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _attention(dtype, backend=None):
    cu = torch.tensor([0, 5, 5, 13], dtype=torch.int32)
    q, k, v = (torch.randn(13, 2, 16, dtype=torch.float64).to(dtype) for _ in range(3))
    return varlen_attention(q, k, v, cu, cu, 8, 8, causal=True, backend=backend)


def _lm_head(dtype, backend=None):
    h = torch.randn(9, 16, dtype=torch.float64).to(dtype)
    w = (torch.randn(31, 16, dtype=torch.float64) * 0.25).to(dtype)
    y = torch.randint(0, 31, (9,))
    with torch.no_grad():  # the per-row forward: one implementation call
        return linear_cross_entropy(h, w, y, backend=backend)


def _pixel_shuffle(dtype, backend=None):
    x = torch.randn(2, 16, 3, dtype=torch.float64).to(dtype)
    w, b = (torch.randn(12, dtype=torch.float64).to(dtype) for _ in range(2))
    return pixel_shuffle_layernorm(x, w, b, backend=backend)


def _lse_merge(dtype, backend=None):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.zeros(7, 2, 8, dtype=acc)
    lse = torch.full((2, 7), -math.inf, dtype=acc)
    return lse_merge_(out, lse, torch.randn(7, 2, 8).to(dtype), torch.randn(2, 7, dtype=acc), backend=backend)


def _rms_norm(dtype, backend=None):
    x = torch.randn(5, 24, dtype=torch.float64).to(dtype)
    return rms_norm(x, torch.ones(24, dtype=dtype), 1e-6, backend=backend)


def _rope(dtype, backend=None):
    q, k = torch.randn(6, 2, 8, dtype=torch.float64).to(dtype), torch.randn(6, 1, 8, dtype=torch.float64).to(dtype)
    cos, sin = torch.randn(6, 8, dtype=torch.float64).to(dtype), torch.randn(6, 8, dtype=torch.float64).to(dtype)
    return apply_rope_qk(q, k, cos, sin, backend=backend)


def _swiglu(dtype, backend=None):
    g, u = (torch.randn(4, 20, dtype=torch.float64).to(dtype) for _ in range(2))
    return swiglu(g, u, backend=backend)


CALLS = {"varlen_attention": _attention, "lm_head": _lm_head, "pixel_shuffle": _pixel_shuffle, "lse_merge": _lse_merge,
         "rms_norm": _rms_norm, "rope": _rope, "swiglu": _swiglu}


@pytest.fixture
def ran(monkeypatch):
    """Spies on every implementation a family can run on CPU; yields the (family, backend)
    pairs that ran, in order."""
    # where each family's torch path is called from (the LM head's chunk loop is its own module)
    lh, lm, ps, va, rn, rp, sg = (
        importlib.import_module(f"longvita.kernels.{m}")
        for m in ("lm_head.chunks", "lse_merge.api", "pixel_shuffle.api", "attention.api", "norm.api", "rope.api",
                  "glu.api")
    )
    calls = []

    def spy(obj, name, label):
        real = getattr(obj, name)

        def wrapper(*args, **kwargs):
            calls.append(label)
            return real(*args, **kwargs)

        monkeypatch.setattr(obj, name, wrapper)

    spy(va, "varlen_attention_fwd_torch", ("varlen_attention", "torch"))
    spy(va, "_flash_attn_fwd", ("varlen_attention", "flash_attn"))
    spy(lh, "torch_rows", ("lm_head", "torch"))
    spy(ps, "torch_shuffle_layernorm", ("pixel_shuffle", "torch"))
    spy(lm, "lse_merge_torch_", ("lse_merge", "torch"))
    spy(rn, "rms_norm_torch", ("rms_norm", "torch"))
    spy(rp, "apply_rope_qk_torch", ("rope", "torch"))
    spy(sg, "swiglu_torch", ("swiglu", "torch"))
    ext = native()
    if ext is not None:

        class _SpiedExt:
            def __getattr__(self, name):
                return getattr(ext, name)

            def pixel_shuffle_ln_fwd(self, x, *args):
                calls.append(("pixel_shuffle", "cpp" if x.device.type == "cpu" else "cuda"))
                return ext.pixel_shuffle_ln_fwd(x, *args)

        monkeypatch.setattr(ps, "native", lambda: _SpiedExt())
    if triton_available():
        lht, lmt, pst, vat = (
            importlib.import_module(f"longvita.kernels.{m}.triton")
            for m in ("lm_head", "lse_merge", "pixel_shuffle", "attention")
        )
        spy(vat, "varlen_attention_fwd_triton", ("varlen_attention", "triton"))
        spy(lht, "triton_rows", ("lm_head", "triton"))
        spy(pst, "triton_ln_fwd", ("pixel_shuffle", "triton"))
        spy(lmt, "triton_lse_merge_", ("lse_merge", "triton"))
        spy(rn, "rms_norm_fwd", ("rms_norm", "triton"))
        spy(rp, "rope_qk", ("rope", "triton"))
        spy(sg, "swiglu_fwd", ("swiglu", "triton"))
    monkeypatch.delenv("LONGVITA_BACKEND", raising=False)
    monkeypatch.setattr(backend_mod, "_warned_bf16_interpret", True)  # warnings: tested below
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("family", FAMILIES)
def test_auto_runs_what_kernel_backends_names(family, dtype, ran):
    named = kernel_backends(CPU, dtype)[family]
    CALLS[family](dtype)
    assert ran == [(family, named)]


def test_kernel_backends_on_cpu_names_the_expected_paths():
    fp32 = kernel_backends(CPU, torch.float32)
    if INTERPRETER:
        assert fp32 == dict.fromkeys(FAMILIES, "triton")
    else:
        assert fp32["pixel_shuffle"] == ("cpp" if native() is not None else "torch")
    assert kernel_backends(CPU, torch.float64)["lm_head"] == "torch"
    assert set(kernel_backends(CPU, torch.bfloat16).values()) == {"torch"}  # interpreter or not


@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_backend_raises(family, monkeypatch):
    monkeypatch.delenv("LONGVITA_BACKEND", raising=False)
    with pytest.raises(ValueError, match=r"backend must be one of .*'torch'.*got 'tirton'"):
        CALLS[family](torch.float32, backend="tirton")
    monkeypatch.setenv("LONGVITA_BACKEND", "tirton")
    with pytest.raises(ValueError, match=r"LONGVITA_BACKEND must be one of .*got 'tirton'"):
        CALLS[family](torch.float32)
    with pytest.raises(ValueError, match="LONGVITA_BACKEND"):
        kernel_backends(CPU, torch.float32)


@pytest.mark.parametrize("env", ["torch", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("family", FAMILIES)
def test_env_is_honoured(family, env, ran, monkeypatch):
    monkeypatch.setenv("LONGVITA_BACKEND", env)
    assert kernel_backends(CPU, torch.float32)[family] == env
    CALLS[family](torch.float32)
    assert ran == [(family, env)]
    ran.clear()
    CALLS[family](torch.float32, backend="auto")  # the argument wins over the environment
    assert ran == [(family, resolve(family, CPU, torch.float32, "auto"))]


@pytest.mark.parametrize("family", FAMILIES)
def test_flash_attn_name_is_attention_only(family, monkeypatch):
    """LONGVITA_BACKEND=flash_attn picks flash-attn for attention; the others keep auto."""
    monkeypatch.setenv("LONGVITA_BACKEND", "flash_attn")
    expect = "flash_attn" if family == "varlen_attention" else resolve(family, CPU, torch.float32, "auto")
    assert resolve(family, CPU, torch.float32) == expect


@needs_interpreter
@pytest.mark.parametrize("family", FAMILIES)
def test_explicit_triton_bf16_in_interpreter_raises(family):
    with pytest.raises(RuntimeError, match="bfloat16 in Triton's interpreter"):
        CALLS[family](torch.bfloat16, backend="triton")


@needs_interpreter
def test_auto_bf16_in_interpreter_warns_once(monkeypatch):
    monkeypatch.setattr(backend_mod, "_warned_bf16_interpret", False)
    with pytest.warns(RuntimeWarning, match="bfloat16 does not run in Triton's interpreter"):
        _attention(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _lm_head(torch.bfloat16)
        kernel_backends(CPU, torch.bfloat16)  # a query never warns


def test_bf16_auto_gives_right_numbers(monkeypatch):
    """bf16 with 'auto' (on CPU: the torch path, also under the interpreter, whose bf16
    tl.dot is wrong) is within 2x of plain torch bf16's error against float64."""
    monkeypatch.setattr(backend_mod, "_warned_bf16_interpret", True)
    cu = torch.tensor([0, 6, 23], dtype=torch.int32)
    q, k, v = (torch.randn(23, 2, 16, dtype=torch.float64) for _ in range(3))
    out = varlen_attention(*(t.bfloat16() for t in (q, k, v)), cu, cu, 17, 17, causal=True)
    ref64, _ = ref.varlen_attention_fwd_reference(q, k, v, cu, cu, 16**-0.5, True, (-1, -1))
    plain, _ = ref.varlen_attention_fwd_reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, cu, 16**-0.5, True, (-1, -1))
    bound = 2 * (plain.double() - ref64).abs().max() + 1e-5 * ref64.abs().max()
    assert (out.double() - ref64).abs().max() <= bound

    h = torch.randn(40, 32, dtype=torch.float64)
    w = torch.randn(101, 32, dtype=torch.float64) * 0.3
    y = torch.randint(0, 101, (40,))
    loss = linear_cross_entropy(h.bfloat16(), w.bfloat16(), y)
    loss64 = ref.linear_cross_entropy_reference(h, w, y)
    plain = ref.linear_cross_entropy_reference(h.bfloat16(), w.bfloat16(), y)
    assert (loss.double() - loss64).abs() <= 2 * (plain.double() - loss64).abs() + 1e-5 * loss64.abs()


@pytest.mark.parametrize("interpret", [False, pytest.param(True, marks=pytest.mark.skipif(
    not triton_available(), reason="needs triton"))], ids=["torch-paths", "triton-interpreter"])
def test_first_eager_calls_do_not_import_dynamo(interpret):
    """The custom ops are for torch.compile only: a custom op's first eager call imports
    torch._dynamo (about 6 s on CPU; 4-5 s of generate's prefill on an H100 machine),
    which the first projector call, attention and every generate step's gather_logits
    must not pay. With the interpreter the Triton launchers run (GPU's eager path)."""
    code = (
        "import sys, torch\n"
        "from longvita.kernels import gather_logits, linear_cross_entropy, pixel_shuffle_project, varlen_attention\n"
        "q = torch.randn(7, 2, 16, requires_grad=True)\n"
        "cu = torch.tensor([0, 3, 7], dtype=torch.int32)\n"
        "varlen_attention(q, q, q, cu, cu, 4, 4, causal=True).sum().backward()\n"
        "x = torch.randn(2, 16, 3, requires_grad=True)\n"
        "out = pixel_shuffle_project(x, torch.randn(12), torch.randn(12), torch.randn(5, 12), None, torch.randn(4, 5), None)\n"
        "out.sum().backward()\n"
        "h = torch.randn(6, 8, requires_grad=True)\n"
        "gather_logits(h, torch.randn(11, 8), torch.tensor([1, 5]))\n"
        "linear_cross_entropy(h, torch.randn(11, 8), torch.randint(0, 11, (6,))).backward()\n"
        "from longvita.kernels import apply_rope_qk, rms_norm, swiglu\n"
        "y, s = rms_norm(h, torch.ones(8), 1e-6, residual=h)\n"
        "qr, kr = apply_rope_qk(q, q[:, :1], torch.randn(7, 16), torch.randn(7, 16))\n"
        "(y.sum() + s.sum() + swiglu(h, h).sum() + qr.sum() + kr.sum()).backward()\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LONGVITA_BACKEND")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
        code = code.replace("print(", "from longvita.kernels._backend import kernel_backends\n"
                            "assert set(kernel_backends(torch.device('cpu'), torch.float32).values()) == {'triton'}\n"
                            "print(", 1)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout


def test_info_prints_kernel_backends():
    from longvita.cli.info import info_text

    text = info_text()
    for dtype in (torch.float32, torch.bfloat16):
        line = ", ".join(f"{k}={v}" for k, v in kernel_backends(CPU, dtype).items())
        assert f"cpu {str(dtype).replace('torch.', '')}: {line}" in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_auto_picks_triton_for_every_family():
    """On a GPU 'auto' runs Triton everywhere: the pixel shuffle's CUDA C++ kernel measured
    3.5-5.6x slower than its Triton kernel on an H100 (benchmarks/RESULTS.md)."""
    cuda = torch.device("cuda")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert set(kernel_backends(cuda, dtype).values()) == {"triton"}, dtype
