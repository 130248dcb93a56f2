"""LM head: fused linear cross-entropy (training) and gathered last-token logits (inference).

    python benchmarks/bench_lm_head.py [--quick] [--out FILE]    # tables + JSON
    pytest benchmarks/bench_lm_head.py --benchmark-only           # pytest-benchmark

Shapes: Qwen2.5-14B head, H=5120, V=152064, bf16.

Training (forward+backward of the loss, gradients for hidden and weight), N rows of
which 100% or 10% carry a label (the rest are -100, as with prompts and image tokens):
- plain head: ``F.cross_entropy((h @ W.T).float(), y)`` -- skipped where its logits
  would not fit in free GPU memory;
- chunked head: the same per 32,768-row chunk, each chunk's backward run at once;
- longvita: ``linear_cross_entropy`` (Triton);
- longvita with a bias, label smoothing, z-loss and soft-capping (the row kernel's
  heaviest variant: a tanh per logit and pass);
- longvita with ``accum_dtype=torch.float32`` (fp32 d(weight) accumulator; full runs only);
- Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss``, cut-cross-entropy's
  ``linear_cross_entropy`` and torch's ``F.linear_cross_entropy`` (chunked options),
  each when importable;
- matmuls only: the three GEMMs a head cannot avoid (logits, d(hidden), d(weight)) on
  the labelled rows, in 32,768-row chunks, bf16 -- the floor. The target for longvita
  is at most 1.1x this time.
TFLOP/s count the useful work, 6 * labelled rows * H * V.

Inference: one sequence of N tokens; plain head (all N rows' logits, then the last)
against ``gather_logits`` of ``last_token_index``.
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
from common import Row, pytest_benchmark_median, gpu_only, peak_memory_gib, print_table, time_cuda, write_json  # noqa: E402

NAME = "lm_head"
TITLE = "LM head (Qwen2.5-14B: H=5120, V=152064, bf16)"
METRICS = ["ms", "tflops", "gib", "extra_gib", "x_matmuls"]
H, V = 5120, 152064
CHUNK = 32768


@dataclass(frozen=True)
class Case:
    mode: str  # 'train' or 'infer'
    n: int
    labelled: float = 1.0  # training: fraction of rows with a label

    @property
    def name(self) -> str:
        size = f"{self.n // 1024}K" if self.n < 2**20 else f"{self.n // 2**20}M"
        return f"{self.mode} N={size}" + (f" {int(self.labelled * 100)}% labelled" if self.mode == "train" else "")

    @property
    def rows(self) -> int:
        return int(round(self.n * self.labelled)) if self.mode == "train" else 1

    def flops(self) -> float:
        return (6.0 if self.mode == "train" else 2.0) * self.rows * H * V


def cases(quick: bool = False) -> list[Case]:
    train_n = [16384, 65536] if quick else [16384, 65536, 262144, 1048576]
    infer_n = [8192, 65536] if quick else [8192, 65536, 262144, 1048576]
    out = [Case("train", n, f) for n in train_n for f in (1.0, 0.1)]
    out += [Case("infer", n) for n in infer_n]
    return out


# --------------------------------------------------------------------------------------
# One setup per (case, impl): returns fn(), or None when the impl cannot run the case
# --------------------------------------------------------------------------------------


def _inputs(case: Case, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev, dt = "cuda", torch.bfloat16
    hidden = torch.randn(case.n, H, device=dev, dtype=dt, generator=g)
    weight = (torch.randn(V, H, device=dev, dtype=dt, generator=g) * 0.02)
    labels = torch.randint(0, V, (case.n,), device=dev, generator=g)
    if case.labelled < 1.0:
        keep = torch.randperm(case.n, device=dev, generator=g)[: case.rows]
        masked = torch.full_like(labels, -100)
        masked[keep] = labels[keep]
        labels = masked
    return hidden, weight, labels


def _fits(nbytes: float) -> bool:
    free, _ = torch.cuda.mem_get_info()
    return nbytes < 0.85 * free


def _train(loss_fn, hidden, weight, labels):
    """fn() running forward + backward of ``loss_fn(h, w, y)`` and dropping the grads."""
    h = hidden.requires_grad_()
    w = weight.requires_grad_()

    def run():
        loss_fn(h, w, labels).backward()
        h.grad = None
        w.grad = None
    return run


def _setup_plain(case):
    if case.mode == "train":
        # bf16 logits + fp32 copy + fp32 and bf16 gradients of the logits
        if not _fits(case.n * V * (2 + 4 + 4 + 2) + 2 * case.n * H * 2):
            return None
        return _train(lambda h, w, y: F.cross_entropy((h @ w.t()).float(), y), *_inputs(case))
    if not _fits(case.n * V * 2 * 1.1):
        return None
    hidden, weight, _ = _inputs(case)

    def run():
        with torch.no_grad():
            return (hidden @ weight.t())[-1:].float()
    return run


def _setup_chunked(case):
    if case.mode != "train":
        return None
    hidden, weight, labels = _inputs(case)
    w = weight.requires_grad_()

    def run():
        count = (labels != -100).sum().clamp(min=1)
        dh = torch.empty_like(hidden)  # d(hidden), written chunk by chunk
        for s in range(0, case.n, CHUNK):
            hc = hidden[s : s + CHUNK].detach().requires_grad_()
            loss = F.cross_entropy((hc @ w.t()).float(), labels[s : s + CHUNK], reduction="sum") / count
            loss.backward()  # d(weight) accumulates in w.grad
            dh[s : s + CHUNK] = hc.grad
        w.grad = None
        return dh
    return run


def _setup_longvita(case):
    from longvita.kernels.lm_head import gather_logits, last_token_index, linear_cross_entropy

    if case.mode == "train":
        return _train(lambda h, w, y: linear_cross_entropy(h, w, y, backend="triton"), *_inputs(case))
    hidden, weight, _ = _inputs(case)
    cu = torch.tensor([0, case.n], dtype=torch.int32, device="cuda")

    def run():
        with torch.no_grad():
            return gather_logits(hidden, weight, last_token_index(cu), out_dtype=torch.float32)
    return run


def _setup_longvita_options(case):
    from longvita.kernels.lm_head import linear_cross_entropy

    if case.mode != "train":
        return None
    hidden, weight, labels = _inputs(case)
    bias = torch.zeros(V, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def loss_fn(h, w, y):
        return linear_cross_entropy(h, w, y, bias=bias, label_smoothing=0.1, z_loss=1e-4, softcap=30.0,
                                    backend="triton")

    run = _train(loss_fn, hidden, weight, labels)

    def run_and_drop_bias_grad():
        run()
        bias.grad = None
    return run_and_drop_bias_grad


def _setup_longvita_accum_fp32(case):
    from longvita.kernels.lm_head import linear_cross_entropy

    if case.mode != "train":
        return None
    return _train(lambda h, w, y: linear_cross_entropy(h, w, y, backend="triton", accum_dtype=torch.float32),
                  *_inputs(case))


def _setup_liger(case):
    if case.mode != "train":
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:
        return None
    loss_mod = LigerFusedLinearCrossEntropyLoss()
    return _train(lambda h, w, y: loss_mod(w, h, y), *_inputs(case))


def _setup_cce(case):
    if case.mode != "train":
        return None
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except Exception:
        return None
    return _train(lambda h, w, y: cce(h, w, y), *_inputs(case))


def _setup_torch_lce(case):
    if case.mode != "train" or not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return None
    opts = torch.nn.LinearCrossEntropyOptions()
    return _train(lambda h, w, y: F.linear_cross_entropy(h, w, y, ignore_index=-100, options=opts), *_inputs(case))


def _setup_matmuls(case):
    """The three GEMMs of a head on the rows that need logits, 32K-row chunks (bf16)."""
    if case.mode != "train":
        return None
    hidden, weight, labels = _inputs(case)
    rows = hidden[labels != -100].contiguous()
    buf = torch.empty(min(CHUNK, rows.shape[0]), V, device="cuda", dtype=torch.bfloat16)
    dh = torch.empty_like(rows)
    dw = torch.empty_like(weight)

    def run():
        for s in range(0, rows.shape[0], CHUNK):
            r = rows[s : s + CHUNK]
            lg = buf[: r.shape[0]]
            torch.mm(r, weight.t(), out=lg)
            torch.mm(lg, weight, out=dh[s : s + CHUNK])
            if s == 0:
                torch.mm(lg.t(), r, out=dw)
            else:
                dw.addmm_(lg.t(), r)
    return run


IMPLS = {
    "plain head": _setup_plain,
    "chunked head (32K rows)": _setup_chunked,
    "longvita": _setup_longvita,
    "longvita (bias, smoothing, z-loss, softcap)": _setup_longvita_options,
    "longvita (accum_dtype=fp32)": _setup_longvita_accum_fp32,
    "liger fused linear CE": _setup_liger,
    "cut-cross-entropy": _setup_cce,
    "torch F.linear_cross_entropy": _setup_torch_lce,
    "matmuls only (floor)": _setup_matmuls,
}
# left out of --quick runs (gpu_session.sh gives the quick run a 50 s cap)
FULL_ONLY = {"longvita (accum_dtype=fp32)"}


def measure(case: Case, impl: str, quick: bool) -> dict:
    """ms, TFLOP/s and peak GiB of one (case, impl); {} when it cannot run."""
    try:
        fn = IMPLS[impl](case)
        if fn is None:
            return {}
        ms = time_cuda(fn, warmup=1 if quick else 3, iters=3 if quick else 10)
        gib = peak_memory_gib(fn)
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:  # unsupported / OOM
        print(f"  {impl} on {case.name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})", file=sys.stderr)
        return {}
    finally:
        fn = None
        torch.cuda.empty_cache()
    out = {"ms": ms, "tflops": case.flops() / (ms * 1e-3) / 1e12, "gib": gib}
    if case.mode == "train" and impl != "matmuls only (floor)":
        out["extra_gib"] = gib - (case.n * H + V * H) * 2 / 2**30  # less d(hidden), d(weight) (bf16)
    return out


def add_matmul_ratios(rows: list[Row]) -> None:
    """x_matmuls: each training row's time over the matmuls-only row of its case."""
    floor = {r.case: r.metrics["ms"] for r in rows if r.impl == "matmuls only (floor)"}
    for r in rows:
        if r.case in floor and r.impl != "matmuls only (floor)":
            r.metrics["x_matmuls"] = r.metrics["ms"] / floor[r.case]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller cases and iterations")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/lm_head.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_lm_head: no CUDA device; this benchmark measures GPU kernels only. Nothing to do.", file=sys.stderr)
        return 0
    rows = []
    for case in cases(args.quick):
        for impl in IMPLS:
            if args.quick and impl in FULL_ONLY:
                continue
            metrics = measure(case, impl, args.quick)
            if metrics:
                rows.append(Row(case.name, impl, metrics))
                write_json(NAME, TITLE, rows, METRICS, args.out, quiet=True)
                print(f"  {case.name} {impl}: {metrics['ms']:.2f} ms, {metrics['gib']:.2f} GiB", file=sys.stderr)
        add_matmul_ratios(rows)
    print_table(TITLE, rows, METRICS)
    write_json(NAME, TITLE, rows, METRICS, args.out)
    return 0


# --------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------



@gpu_only
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", cases(quick=True), ids=lambda c: c.name.replace(" ", "_"))
def test_lm_head(benchmark, case, impl):
    try:
        fn = IMPLS[impl](case)
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
        pytest.skip(f"{impl} cannot run {case.name}: {e}")
    if fn is None:
        pytest.skip(f"{impl} not available for {case.name}")

    median_s = pytest_benchmark_median(benchmark, fn, case.name, rounds=5, warmup_rounds=2)
    benchmark.extra_info["tflops"] = case.flops() / median_s / 1e12


if __name__ == "__main__":
    sys.exit(main())
