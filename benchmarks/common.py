"""Shared helpers for longvita's microbenchmarks.

Each ``bench_*.py`` runs two ways:
- under pytest-benchmark: ``pytest benchmarks --benchmark-only`` (GPU cases skip
  without CUDA; the timed callable synchronises; TFLOP/s or GB/s go in ``extra_info``);
- as a script: ``python benchmarks/bench_X.py [--quick] [--out FILE]`` prints a table of
  our kernel against the baselines measured in the same run and writes JSON, which
  ``python benchmarks/make_results.py`` turns into tables for ``benchmarks/RESULTS.md``.

One setup function per op serves the speed and the memory runs; warm-up is excluded.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field

import pytest
import torch
from make_results import fmt_number

# pytest-benchmark cases run only where there is a GPU to measure
gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA device")

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")


def cuda_sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_cuda(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def with_backward(fwd, mode: str, leaves):
    """The timed callable of ``mode``: 'fwd' runs fwd() without grad; 'fwd+bwd' also runs
    backward with fixed random cotangents (one per output when fwd() returns a tuple, e.g.
    out and lse) and clears the leaves' grads."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fwd()
        return run
    douts = None

    def run():
        nonlocal douts
        outs = fwd()
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        if douts is None:
            douts = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, douts)
        for t in leaves:
            t.grad = None
    return run


_SKIPPABLE = (RuntimeError, NotImplementedError, ValueError, TypeError)


def pytest_benchmark_median(benchmark, fn, label: str, rounds: int = 10, warmup_rounds: int = 3) -> float:
    """Time ``fn`` under pytest-benchmark, synchronising CUDA inside the timed call.

    A baseline that cannot run this case (unsupported shape, out of memory) skips the
    case rather than failing the run. Returns the median in seconds."""

    def timed():
        fn()
        torch.cuda.synchronize()

    try:
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup_rounds)
    except _SKIPPABLE as e:
        pytest.skip(f"failed on {label}: {e}")
    benchmark.extra_info["case"] = label
    return benchmark.stats.stats.median


def peak_memory_gib(fn) -> float:
    """Peak CUDA memory allocated by ``fn()`` above what was allocated before, in GiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def environment() -> dict:
    import importlib

    env = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    for mod in ("triton", "flash_attn", "liger_kernel", "cut_cross_entropy"):
        try:
            env[mod] = importlib.import_module(mod).__version__
        except Exception:
            env[mod] = None
    return env


@dataclass
class Row:
    """One measured case: ``impl`` on ``case``, with any metrics (ms, tflops, gbps, gib...)."""

    case: str
    impl: str
    metrics: dict = field(default_factory=dict)


def print_table(title: str, rows: list[Row], metrics: list[str]) -> None:
    print(f"\n## {title}")
    header = ["case", "impl"] + metrics
    lines = [header] + [
        [r.case, r.impl] + [fmt_number(r.metrics.get(m)) for m in metrics] for r in rows
    ]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for n, line in enumerate(lines):
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def write_json(name: str, title: str, rows: list[Row], metrics: list[str], out: str | None = None,
               quiet: bool = False) -> str:
    """Write the rows so far (the scripts call it after every row, ``quiet``, so a run cut
    off at a time limit keeps what it measured; then once more at the end)."""
    path = out or os.path.join(RESULTS_DIR, f"{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {
        "name": name,
        "title": title,
        "environment": environment(),
        "metrics": metrics,
        "rows": [asdict(r) for r in rows],
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)  # never leave a half-written result over a good one
    if not quiet:
        print(f"\nwrote {path}", file=sys.stderr)
    return path


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


def sync(device: str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    """Drop what the last case left: Python's garbage, then the CUDA allocator's cache."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def is_cuda_oom(e: BaseException) -> bool:
    """Out of GPU memory: torch's allocator, or cuBLAS failing to allocate its workspace."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and ("out of memory" in str(e) or "ALLOC_FAILED" in str(e))


def fmt_tokens(n: int) -> str:
    """1024-multiples as K (131072 -> 128K)."""
    return f"{n // 1024}K" if n % 1024 == 0 and n >= 1024 else str(n)


def setup_block(case, kind: str, backward: bool, device="cuda"):
    """fn() computing one ring block of ``kind`` (``longvita.parallel.costs.KINDS``) of
    ``case`` (a ``RingCase``) on ``device`` as rank 1 of its ring would (rank 0 for
    ``after``): forward + LSE merge into an accumulator, or backward. Shared by
    ``bench_ring.py`` (per-step compute) and ``bench_prefill.py`` (the CP model)."""
    from longvita.kernels import lse_merge_, varlen_attention_bwd, varlen_attention_fwd
    from longvita.parallel import zigzag_layout
    from longvita.parallel.ring import ring_block

    layout = zigzag_layout(case.cu_seqlens, case.world, device)
    n, dt = layout.total_local, torch.bfloat16
    q = torch.randn(n, case.hq, case.d, device=device, dtype=dt)
    k = torch.randn(n, case.hkv, case.d, device=device, dtype=dt)
    v = torch.randn(n, case.hkv, case.d, device=device, dtype=dt)
    rank = 0 if kind == "after" or case.world == 1 else 1  # a rank for which this kind exists
    src = {"diag": rank, "before": 0, "after": 1}[kind]
    cu_q, cu_k, max_q, max_k, causal = ring_block(layout, rank, src, True)
    out, lse = varlen_attention_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal)
    if backward:
        dout = torch.randn_like(out)
        return lambda: varlen_attention_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal=causal)
    acc_out, acc_lse = out.float(), lse.clone()

    def fwd():
        o, s = varlen_attention_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal)
        lse_merge_(acc_out, acc_lse, o, s)
    return fwd

