"""Compile report for Hopper without a GPU: every Triton kernel of longvita, compiled for
sm_90 with the exact launch configurations its launchers use on a GPU (bf16 and fp16).

A stand-in Triton driver reports an sm_90 target; the launchers run on CPU tensors and
every launch becomes a compile-only warm-up, so nothing executes. For each kernel it
reports warps, stages, shared memory, and the registers and spill stores that Triton's
own ptxas gives. ``tests/test_compile_report.py`` runs it in CI: a kernel that fails to
compile for Hopper, needs more shared memory than an H100 has, or spills registers in
bf16/fp16 fails the suite (fp32, whose exact dots are for tests, may spill).

    python benchmarks/compile_report.py            # table
    python benchmarks/compile_report.py --json     # one JSON object
    python benchmarks/compile_report.py attention  # only cases whose name contains this
"""
import json
import os
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
    """Registers and spills of the kernel as ptxas (Triton's own) compiles it."""
    import re
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
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spills = re.search(r"(\d+) bytes spill stores", r.stderr)
    return {"registers": int(regs.group(1)) if regs else None, "spill_stores": int(spills.group(1)) if spills else None}


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _orig_run(self, *args, grid=grid, warmup=True, **kwargs)
    md = kernel.metadata
    key = f"{_current_case[0]}/{self.fn.__name__}/{md.hash}"
    if key not in compiled:
        compiled[key] = dict(case=_current_case[0], kernel=self.fn.__name__, num_warps=md.num_warps,
                             num_stages=md.num_stages, shared=md.shared, **_ptxas_report(kernel.asm["ptx"]))
    return kernel


jit.JITFunction.run = _compile_only
torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(multi_processor_count=132, name="fake-sm90")

from longvita.kernels import _backend  # noqa: E402

_backend.triton_runs_on = lambda device: True  # the one resolver reads it from _backend

from longvita.kernels import linear_cross_entropy, pixel_shuffle_layernorm, varlen_attention  # noqa: E402
from longvita.kernels import lse_merge_  # noqa: E402


def attention(dtype, d, causal, window=(-1, -1), hq=4, hkv=2):
    cu = torch.tensor([0, 70, 200], dtype=torch.int32)
    q = torch.randn(200, hq, d, dtype=dtype, requires_grad=True)
    k = torch.randn(200, hkv, d, dtype=dtype, requires_grad=True)
    v = torch.randn(200, hkv, d, dtype=dtype, requires_grad=True)
    out, lse = varlen_attention(q, k, v, cu, cu, 130, 130, causal=causal, window_size=window,
                                return_lse=True, backend="triton")
    (out.float().sum() + lse.sum()).backward()


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
cases.append(("lse_merge fp32", merge))
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


def main(argv):
    as_json = "--json" in argv
    report = run([a for a in argv if a != "--json"])
    if as_json:
        print(json.dumps(report))
    else:
        cols = ["case", "kernel", "num_warps", "num_stages", "shared", "registers", "spill_stores"]
        rows = [[str(c[k]) for k in cols] for c in report["compiled"]]
        widths = [max(len(x) for x in col) for col in zip(cols, *rows)]
        for line in [cols, ["-" * w for w in widths]] + rows:
            print("  ".join(x.ljust(w) for x, w in zip(line, widths)))
        for name, err in report["failures"].items():
            print(f"FAILED {name}: {err}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
