"""Fused pixel-shuffle projector: longvita's kernels against the baselines of the same run.

    python benchmarks/bench_pixel_shuffle.py [--quick] [--out FILE]    # table + JSON
    pytest benchmarks/bench_pixel_shuffle.py --benchmark-only           # pytest-benchmark

Shapes: InternViT-300M -> Qwen2.5-14B, bf16, no biases. Each tile has 1024 ViT tokens
of C = 1024 channels; the pixel shuffle gives 256 rows of 4C = 4096; LayerNorm(4096);
Linear 4096 -> 1024; GELU; Linear 1024 -> 5120 (Long-VITA's projector, no biases;
``--hidden 5120`` gives InternVL's 4096 -> 5120 -> 5120 width). 64 to 4096 tiles.

Two tables:
- ``shuffle+layernorm`` (forward): GB/s counting bytes read (x, weight, bias) and
  written (the normalised rows), for the CUDA kernel (when ``longvita._C`` has CUDA),
  the Triton kernel through the public function (``triton``: the default forward kernel)
  and both Triton forward kernels through their launcher (``triton row``: one program
  per output row, the default; ``triton rows``: whole rows per program at 16-byte width,
  one-pass statistics; ``pixel_shuffle/triton.py``), eager PyTorch (reference shuffle +
  F.layer_norm) and torch.compile of it; ``copy`` is a plain ``dst.copy_(src)`` moving
  the same number of bytes (read + written), the bandwidth to compare against.
  ``--ln-only`` skips the projector table (the device script's time is short).
- ``projector`` forward and forward+backward, ms: longvita (auto backend: fused
  LayerNorm + cuBLAS GEMMs) vs eager ``pixel_shuffle_project_reference`` and
  torch.compile of it. A case that runs out of memory shows "-".
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Row, pytest_benchmark_median, gpu_only, print_table, time_cuda, with_backward, write_json  # noqa: E402

NAME = "pixel_shuffle"
TITLE = "Pixel-shuffle projector (bf16, InternViT-300M -> Qwen2.5-14B)"
LN_METRICS = ["ms", "gbps"]
PROJ_METRICS = ["ms"]
METRICS = LN_METRICS + [m for m in PROJ_METRICS if m not in LN_METRICS]  # the JSON's columns
MODES = ["fwd", "fwd+bwd"]


@dataclass(frozen=True)
class Case:
    tiles: int
    c: int = 1024
    tokens: int = 1024  # per tile, h = w = 32
    hidden: int = 1024  # Long-VITA's projector middle width
    out: int = 5120  # Qwen2.5-14B hidden size

    @property
    def name(self) -> str:
        return f"{self.tiles} tiles"

    def ln_bytes(self) -> int:
        """Bytes read (x, weight) and written (normalised rows) by shuffle+LayerNorm in bf16."""
        elems = self.tiles * self.tokens * self.c
        return 2 * (2 * elems + 4 * self.c)

    def copy_bytes(self) -> int:
        """Bytes read and written by a bf16 copy of x (the bandwidth yardstick)."""
        return 2 * 2 * self.tiles * self.tokens * self.c

    def bytes_moved(self, impl: str) -> int:
        return self.copy_bytes() if impl == "copy" else self.ln_bytes()


def cases(quick: bool = False, hidden: int = 1024, out: int = 5120) -> list[Case]:
    tiles = (64, 256) if quick else (64, 256, 1024, 4096)
    return [Case(t, hidden=hidden, out=out) for t in tiles]


# --------------------------------------------------------------------------------------
# One setup per (case, impl): returns fn(), or None when the impl cannot run here
# --------------------------------------------------------------------------------------


def _inputs(case: Case, requires_grad: bool = False):
    dev, dt = "cuda", torch.bfloat16
    g = requires_grad
    x = torch.randn(case.tiles, case.tokens, case.c, device=dev, dtype=dt, requires_grad=g)
    ln_w = (1 + 0.1 * torch.randn(4 * case.c, device=dev, dtype=dt)).requires_grad_(g)
    w1 = (torch.randn(case.hidden, 4 * case.c, device=dev, dtype=dt) * (4 * case.c) ** -0.5).requires_grad_(g)
    w2 = (torch.randn(case.out, case.hidden, device=dev, dtype=dt) * case.hidden**-0.5).requires_grad_(g)
    return x, ln_w, w1, w2


def _ln_reference(x, w):
    from longvita.kernels.reference import pixel_shuffle_reference

    y = pixel_shuffle_reference(x)
    return F.layer_norm(y, (y.shape[-1],), w, None, 1e-5)


def _setup_ln(case: Case, impl: str):
    from longvita._ext import native_has_cuda
    from longvita.kernels import pixel_shuffle_layernorm

    if impl == "cuda" and not native_has_cuda():
        return None
    x, w, _, _ = _inputs(case)
    if impl == "copy":
        dst = torch.empty_like(x)
        return lambda: dst.copy_(x)
    if impl in ("cuda", "triton"):
        return lambda: pixel_shuffle_layernorm(x, w, None, eps=1e-5, backend=impl)
    if impl in ("triton row", "triton rows"):
        from longvita.kernels.pixel_shuffle.api import PixelShuffleParams
        from longvita.kernels.pixel_shuffle.triton import triton_ln_fwd

        p = PixelShuffleParams(inv=2, eps=1e-5, backend="triton")
        kernel = impl.split()[1]
        return lambda: triton_ln_fwd(x, w, None, p, kernel=kernel)
    if impl == "eager":
        return lambda: _ln_reference(x, w)
    if impl == "compile":
        compiled = torch.compile(_ln_reference, dynamic=False)
        return lambda: compiled(x, w)
    raise ValueError(impl)


def _setup_projector(case: Case, impl: str, mode: str):
    from longvita.kernels import pixel_shuffle_project
    from longvita.kernels.reference import pixel_shuffle_project_reference

    x, ln_w, w1, w2 = _inputs(case, requires_grad=mode != "fwd")
    leaves = (x, ln_w, w1, w2)
    if impl == "longvita":
        fwd = lambda: pixel_shuffle_project(x, ln_w, None, w1, None, w2, None)  # noqa: E731
    elif impl == "eager":
        fwd = lambda: pixel_shuffle_project_reference(x, ln_w, None, w1, None, w2, None)  # noqa: E731
    elif impl == "compile":
        compiled = torch.compile(pixel_shuffle_project_reference, dynamic=False)
        fwd = lambda: compiled(x, ln_w, None, w1, None, w2, None)  # noqa: E731
    else:
        raise ValueError(impl)
    return with_backward(fwd, mode, leaves)


LN_IMPLS = ["copy", "cuda", "triton", "triton row", "triton rows", "eager", "compile"]
PROJ_IMPLS = ["longvita", "eager", "compile"]
_SKIPPABLE = (RuntimeError, NotImplementedError, ValueError, TypeError)  # unsupported / OOM


def _time(fn, quick: bool) -> float:
    return time_cuda(fn, warmup=2 if quick else 3, iters=5 if quick else 10)


def measure_ln(case: Case, impl: str, quick: bool) -> dict:
    try:
        fn = _setup_ln(case, impl)
        if fn is None:
            return {}
        ms = _time(fn, quick)
    except _SKIPPABLE as e:
        print(f"  ln {impl} on {case.name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})", file=sys.stderr)
        torch.cuda.empty_cache()
        return {}
    return {"ms": ms, "gbps": case.bytes_moved(impl) / (ms * 1e-3) / 1e9}


def measure_projector(case: Case, impl: str, mode: str, quick: bool) -> dict:
    try:
        ms = _time(_setup_projector(case, impl, mode), quick)
    except _SKIPPABLE as e:
        print(f"  projector {impl} on {case.name} ({mode}): skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})", file=sys.stderr)
        torch.cuda.empty_cache()
        return {}
    return {"ms": ms}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tiles and iterations")
    parser.add_argument("--hidden", type=int, default=1024, help="projector middle width (Long-VITA 1024; InternVL 5120)")
    parser.add_argument("--out-width", type=int, default=5120, help="projector output width (the LLM hidden size)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/pixel_shuffle.json)")
    parser.add_argument("--ln-only", action="store_true", help="the shuffle+LayerNorm table only (no projector)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_pixel_shuffle: no CUDA device; this benchmark measures GPU kernels only. Nothing to do.", file=sys.stderr)
        return 0
    rows = []
    for case in cases(args.quick, args.hidden, args.out_width):
        for impl in LN_IMPLS:
            metrics = measure_ln(case, impl, args.quick)
            if metrics:
                rows.append(Row(f"shuffle+layernorm {case.name}", impl, metrics))
                write_json(NAME, TITLE, rows, METRICS, args.out, quiet=True)
        torch.cuda.empty_cache()
        for mode in ([] if args.ln_only else MODES):
            for impl in PROJ_IMPLS:
                metrics = measure_projector(case, impl, mode, args.quick)
                if metrics:
                    rows.append(Row(f"projector {case.name} {mode}", impl, metrics))
                    write_json(NAME, TITLE, rows, METRICS, args.out, quiet=True)
                torch.cuda.empty_cache()
    print_table(TITLE + ": shuffle+LayerNorm forward", [r for r in rows if r.case.startswith("shuffle")], LN_METRICS)
    print_table(TITLE + ": projector", [r for r in rows if r.case.startswith("projector")], PROJ_METRICS)
    write_json(NAME, TITLE, rows, METRICS, args.out)
    return 0


# --------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------



def _bench(benchmark, fn, case: Case):
    return pytest_benchmark_median(benchmark, fn, case.name)


@gpu_only
@pytest.mark.parametrize("impl", LN_IMPLS)
@pytest.mark.parametrize("case", cases(quick=False), ids=lambda c: c.name.replace(" ", "_"))
def test_shuffle_layernorm(benchmark, case, impl):
    try:
        fn = _setup_ln(case, impl)
    except _SKIPPABLE as e:
        pytest.skip(f"{impl} cannot run {case.name}: {e}")
    if fn is None:
        pytest.skip(f"{impl} not available")
    median_s = _bench(benchmark, fn, case)
    benchmark.extra_info["gbps"] = case.bytes_moved(impl) / median_s / 1e9


@gpu_only
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", PROJ_IMPLS)
@pytest.mark.parametrize("case", cases(quick=False), ids=lambda c: c.name.replace(" ", "_"))
def test_projector(benchmark, case, impl, mode):
    try:
        fn = _setup_projector(case, impl, mode)
    except _SKIPPABLE as e:
        pytest.skip(f"{impl} cannot run {case.name}: {e}")
    _bench(benchmark, fn, case)


if __name__ == "__main__":
    sys.exit(main())
