"""Compile report for Hopper without a GPU: every Triton kernel of longvita, compiled for
sm_90a with the exact launch configurations its launchers use on a GPU (bf16 and fp16), and
every variant of the attention kernels (``attention[<variant>] ...`` cases, bf16).

A stand-in Triton driver reports an sm_90 target; the launchers run on CPU tensors and
every launch becomes a compile-only warm-up, so nothing executes. For each kernel it
reports warps, stages, shared memory, the registers, spill stores / loads and stack
frame that Triton's own ptxas gives, and instruction counts read from the PTX: ``wgmma``
(``wgmma.mma_async``, Hopper's asynchronous tensor-core MMA), ``tma``
(``cp.async.bulk.tensor``, the copy engine's tile loads/stores), ``cp_async`` (the
pre-Hopper asynchronous copies, ``cp.async.ca/cg``), ``atomics`` (``atom.`` / ``red.``)
and ``setmaxnreg`` (register reallocation between warp-specialised warp groups).
``tests/test_compile_report.py`` runs it in CI: a kernel that fails to compile for
Hopper, needs more shared memory than an H100 has, or spills registers in bf16/fp16 fails
the suite (fp32, whose exact dots are for tests, may spill; the configs measured fastest
on an H100 may spill within a bound); the variants must show what they are for (TMA
copies, wgmma, atomics in the fused backward, no spills in ``budget``).

    python benchmarks/compile_report.py            # table
    python benchmarks/compile_report.py --json     # one JSON object
    python benchmarks/compile_report.py --markdown # the table as markdown (RESULTS.md)
    python benchmarks/compile_report.py attention  # only cases whose name contains this
"""
import json
import os
import re
import sys
import types

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import jit

ARCH = int(os.environ.get("LONGVITA_AOT_ARCH", "90"))


class _FakeDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", ARCH, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


triton.runtime.driver.set_active(_FakeDriver())
compiled = {}
_current_case = [""]
_orig_run = jit.JITFunction.run


def _ptxas_report(ptx: str) -> dict:
    """Registers, spills and stack frame of the kernel as ptxas (Triton's own) compiles it."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(ARCH).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        arch = f"sm_{ARCH}a" if ARCH >= 90 else f"sm_{ARCH}"
        r = subprocess.run([ptxas, "-v", f"-arch={arch}", src, "-o", os.path.join(tmp, "k.o")],
                           capture_output=True, text=True)

    def grab(pattern):
        m = re.search(pattern, r.stderr)
        return int(m.group(1)) if m else None

    return {"registers": grab(r"Used (\d+) registers"), "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads"), "stack": grab(r"(\d+) bytes stack frame")}


# PTX instruction counts (static: instructions in the code, not executed ones)
_PRED = r"^\s*(?:@!?%p\w*\s+)?"  # an optional predicate, as in "@%p3 cp.async.bulk.tensor..."
_PTX_COUNTS = {
    "wgmma": _PRED + r"wgmma\.mma_async",
    "tma": _PRED + r"cp\.async\.bulk\.tensor",
    "cp_async": _PRED + r"cp\.async\.c[ag]\.",
    "atomics": _PRED + r"(?:atom|red)\.",
    "setmaxnreg": _PRED + r"setmaxnreg",
    # 16-byte global loads/stores: a memory-bound kernel's vector width
    "vec16": _PRED + r"(?:ld|st)\.global(?:\.\w+)*\.v4\.(?:b32|f32|u32|s32)",
}


def _ptx_counts(ptx: str) -> dict:
    return {name: len(re.findall(pat, ptx, flags=re.M)) for name, pat in _PTX_COUNTS.items()}


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _orig_run(self, *args, grid=grid, warmup=True, **kwargs)
    md = kernel.metadata
    key = f"{_current_case[0]}/{self.fn.__name__}/{md.hash}"
    if key not in compiled:
        compiled[key] = dict(case=_current_case[0], kernel=self.fn.__name__, num_warps=md.num_warps,
                             num_stages=md.num_stages, shared=md.shared, **_ptxas_report(kernel.asm["ptx"]),
                             **_ptx_counts(kernel.asm["ptx"]))
    return kernel


jit.JITFunction.run = _compile_only
torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(multi_processor_count=132, name="fake-sm90")

from longvita.kernels import _backend  # noqa: E402

_backend.triton_runs_on = lambda device: True  # the one resolver reads it from _backend

from longvita.kernels import linear_cross_entropy, pixel_shuffle_layernorm, varlen_attention  # noqa: E402
from longvita.kernels import apply_rope_qk, lse_merge_, rms_norm, swiglu  # noqa: E402
import longvita.kernels.attention.triton as _attention_triton  # noqa: E402

# compile only, nothing runs: the report still shows what 'ws' compiles to, though the
# launchers refuse it on GPUs (it ran non-finite on an H100, 2026-12-05)
_attention_triton._refuse_broken_on_gpu = lambda variant: None


def attention(dtype, d, causal, window=(-1, -1), hq=4, hkv=2, variant=None):
    from longvita.kernels.attention.launch_table import ENV

    cu = torch.tensor([0, 70, 200], dtype=torch.int32)
    q = torch.randn(200, hq, d, dtype=dtype, requires_grad=True)
    k = torch.randn(200, hkv, d, dtype=dtype, requires_grad=True)
    v = torch.randn(200, hkv, d, dtype=dtype, requires_grad=True)
    saved = os.environ.pop(ENV, None)
    if variant is not None:
        os.environ[ENV] = variant
    try:
        out, lse = varlen_attention(q, k, v, cu, cu, 130, 130, causal=causal, window_size=window,
                                    return_lse=True, backend="triton")
        (out.float().sum() + lse.sum()).backward()
    finally:
        os.environ.pop(ENV, None)
        if saved is not None:
            os.environ[ENV] = saved


def lm_head(dtype, reduction, options=False):
    h = torch.randn(300, 128, dtype=dtype, requires_grad=True)
    w = torch.randn(1000, 128, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 1000, (300,))
    opts = dict(bias=torch.randn(1000, dtype=dtype, requires_grad=True), label_smoothing=0.1, z_loss=1e-4,
                softcap=30.0) if options else {}
    # 'mean': the fused row kernel and the gradient scaling; 'none': the loss-only and
    # the gradient-only row kernels (forward, recompute backward)
    loss = linear_cross_entropy(h, w, labels, reduction=reduction, backend="triton", **opts)
    (loss.float().sum() * 2).backward()


def pixel_shuffle(dtype):
    x = torch.randn(2, 64, 96, dtype=dtype, requires_grad=True)
    ln_w = torch.randn(384, dtype=dtype, requires_grad=True)
    ln_b = torch.randn(384, dtype=dtype, requires_grad=True)
    pixel_shuffle_layernorm(x, ln_w, ln_b, eps=1e-5, backend="triton").float().sum().backward()


def pixel_shuffle_vit(dtype, kernel):
    """InternViT-300M's tiles (32 x 32 tokens of C = 1024): the shapes the bandwidth target is
    for, so the vector width of the loads and stores shows."""
    os.environ["LONGVITA_SHUFFLE_LN_FWD"] = kernel
    try:
        x = torch.randn(2, 1024, 1024, dtype=dtype)
        pixel_shuffle_layernorm(x, torch.randn(4096, dtype=dtype), torch.randn(4096, dtype=dtype), backend="triton")
    finally:
        os.environ.pop("LONGVITA_SHUFFLE_LN_FWD", None)


def decoder(dtype, piece):
    """RMSNorm (+ residual), RoPE and SwiGLU at Qwen2.5-14B's widths (H 5120, 40:8 heads of
    128, I 13824), forward and backward, on a few rows."""
    if piece.startswith("rms_norm"):
        x = torch.randn(8, 5120, dtype=dtype, requires_grad=True)
        w = torch.randn(5120, dtype=torch.float32, requires_grad=True)
        if piece == "rms_norm+residual":
            y, h = rms_norm(x, w, 1e-6, residual=torch.randn(8, 5120, dtype=dtype, requires_grad=True), backend="triton")
            (y.sum() + h.float().sum()).backward()
        else:
            rms_norm(x, w, 1e-6, backend="triton").sum().backward()
    elif piece == "rope":
        q = torch.randn(8, 40, 128, dtype=dtype, requires_grad=True)
        k = torch.randn(8, 8, 128, dtype=dtype, requires_grad=True)
        qo, ko = apply_rope_qk(q, k, torch.randn(8, 128), torch.randn(8, 128), backend="triton")
        (qo.float().sum() + ko.float().sum()).backward()
    else:
        g = torch.randn(8, 13824, dtype=dtype, requires_grad=True)
        u = torch.randn(8, 13824, dtype=dtype, requires_grad=True)
        swiglu(g, u, backend="triton").float().sum().backward()


def merge():
    out = torch.zeros(50, 4, 128)
    lse = torch.full((4, 50), float("-inf"))
    lse_merge_(out, lse, torch.randn(50, 4, 128, dtype=torch.bfloat16), torch.randn(4, 50), backend="triton")


# (name, fn): each runs one public entry point forward and backward on small CPU tensors
cases = []
for dtype in (torch.bfloat16, torch.float16):
    dt = str(dtype).replace("torch.", "")
    for d in (64, 128):
        for causal in (True, False):
            cases.append((f"attention {dt} d{d} causal={causal}", lambda dtype=dtype, d=d, c=causal: attention(dtype, d, c)))
    cases.append((f"attention {dt} d80 window", lambda dtype=dtype: attention(dtype, 80, True, (32, 0), hq=5, hkv=1)))
    for reduction in ("mean", "none"):
        cases.append((f"lm_head {dt} {reduction}", lambda dtype=dtype, r=reduction: lm_head(dtype, r)))
        cases.append((f"lm_head {dt} {reduction} options", lambda dtype=dtype, r=reduction: lm_head(dtype, r, True)))
    cases.append((f"pixel_shuffle {dt}", lambda dtype=dtype: pixel_shuffle(dtype)))
    for kernel in ("row", "rows"):
        cases.append((f"pixel_shuffle[{kernel}] {dt} vit", lambda dtype=dtype, k=kernel: pixel_shuffle_vit(dtype, k)))
    for piece in ("rms_norm", "rms_norm+residual", "rope", "swiglu"):
        cases.append((f"decoder {piece} {dt}", lambda dtype=dtype, p=piece: decoder(dtype, p)))
cases.append(("lse_merge fp32", merge))
# The attention variants (kernels/attention/launch_table.py), bf16, at the two model shapes'
# head dims; 'ws' (warp specialisation) is meant for the non-causal forward.
ATTENTION_VARIANTS = ("tma", "sorted", "persistent", "ws", "tma+ws", "fused_bwd", "tma+persistent+fused_bwd", "budget")
for variant in ATTENTION_VARIANTS:
    for d, causal in ((128, True), (128, False), (64, False)):
        cases.append((f"attention[{variant}] bfloat16 d{d} causal={causal}",
                      lambda d=d, c=causal, v=variant: attention(torch.bfloat16, d, c, variant=v)))
# fp32 inputs take exact ("ieee") dots: compile them once too
cases.append(("attention float32 d64 causal=True", lambda: attention(torch.float32, 64, True)))
cases.append(("lm_head float32 none", lambda: lm_head(torch.float32, "none")))
cases.append(("pixel_shuffle float32", lambda: pixel_shuffle(torch.float32)))

def run(only):
    failures = {}
    for name, fn in cases:
        if only and not any(o in name for o in only):
            continue
        _current_case[0] = name
        try:
            fn()
        except Exception as exc:  # report every failing case, not just the first
            failures[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
    return {"arch": ARCH, "compiled": list(compiled.values()), "failures": failures}


COLUMNS = ["case", "kernel", "num_warps", "num_stages", "shared", "registers", "spill_stores", "spill_loads",
           "wgmma", "tma", "cp_async", "atomics", "setmaxnreg", "vec16"]


def to_markdown(report) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(c[k]) for k in COLUMNS) + " |" for c in report["compiled"]]
    lines += [f"FAILED {name}: {err}" for name, err in report["failures"].items()]
    return "\n".join(lines)


def main(argv):
    as_json = "--json" in argv
    as_md = "--markdown" in argv
    report = run([a for a in argv if a not in ("--json", "--markdown")])
    if as_json:
        print(json.dumps(report))
    elif as_md:
        print(to_markdown(report))
    else:
        cols = COLUMNS
        rows = [[str(c[k]) for k in cols] for c in report["compiled"]]
        widths = [max(len(x) for x in col) for col in zip(cols, *rows)]
        for line in [cols, ["-" * w for w in widths]] + rows:
            print("  ".join(x.ljust(w) for x, w in zip(line, widths)))
        for name, err in report["failures"].items():
            print(f"FAILED {name}: {err}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
