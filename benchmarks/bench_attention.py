"""Varlen packed attention: longvita's Triton kernel against the baselines of the same run.

    python benchmarks/bench_attention.py [--quick] [--out FILE]    # table + JSON
    pytest benchmarks/bench_attention.py --benchmark-only           # pytest-benchmark

Cases (bf16):
- Qwen2.5-14B attention (40 q heads, 8 kv heads, head_dim 128), causal: one dense
  document of 8K / 32K / 128K tokens, and 32K tokens packed from random documents of
  512-8192 tokens.
- InternViT tiles (16 heads, head_dim 64), bidirectional: packed 1025-token tiles.

Implementations: longvita (Triton; with ``--variants tma,sorted,...`` also one row per
kernel variant, ``longvita triton [variant]``, see ``kernels/attention/launch_table.py``;
``benchmarks/tune_attention.py`` is the sweep that chooses), torch SDPA with the cuDNN and the flash backends
(dense or equal-length tiles only: SDPA has no varlen input), FlexAttention with a
document mask, ``torch.nn.attention.varlen.varlen_attn`` when the installed torch has
it, and flash-attn's ``flash_attn_varlen_func`` when installed. A baseline that cannot
run a case (unsupported, out of memory) shows "-".

TFLOP/s use flash-attn's counting: 4 * S^2 * H * D per forward (S^2 summed over the
packed documents, so only within-document work counts), halved for causal; the
backward counts 2.5x the forward, so forward+backward is 3.5x.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from dataclasses import dataclass

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Row, pytest_benchmark_median, flash_attn_available, gpu_only, peak_memory_gib, print_table, time_cuda, with_backward, write_json  # noqa: E402

NAME = "attention"
TITLE = "Varlen packed attention (bf16), forward and forward+backward"
METRICS = ["ms", "tflops", "gib"]


@dataclass(frozen=True)
class Case:
    name: str
    hq: int
    hkv: int
    d: int
    causal: bool
    lens: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.lens)

    def flops(self, mode: str) -> float:
        fwd = sum(4.0 * n * n * self.hq * self.d for n in self.lens)
        if self.causal:
            fwd /= 2
        return fwd * (3.5 if mode == "fwd+bwd" else 1.0)


def _random_docs(total: int, lo: int, hi: int, seed: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    lens = []
    while sum(lens) < total:
        lens.append(min(rng.randint(lo, hi), total - sum(lens)))
    return tuple(lens)


def cases(quick: bool = False) -> list[Case]:
    qwen = dict(hq=40, hkv=8, d=128, causal=True)
    vit = dict(hq=16, hkv=16, d=64, causal=False)
    out = [Case("qwen dense 8K", lens=(8192,), **qwen)]
    if not quick:
        out += [Case("qwen dense 32K", lens=(32768,), **qwen), Case("qwen dense 128K", lens=(131072,), **qwen)]
    out.append(Case("qwen packed 32K docs 512-8192", lens=_random_docs(32768, 512, 8192, seed=0), **qwen))
    tiles = 8 if quick else 32
    out.append(Case(f"internvit {tiles} tiles x 1025", lens=(1025,) * tiles, **vit))
    return out


MODES = ["fwd", "fwd+bwd"]


# --------------------------------------------------------------------------------------
# One setup per (case, impl): returns fn(), or None when the impl cannot run the case
# --------------------------------------------------------------------------------------


def _inputs(case: Case, requires_grad: bool):
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(case.total, case.hq, case.d, device=dev, dtype=dt, requires_grad=requires_grad)
    k = torch.randn(case.total, case.hkv, case.d, device=dev, dtype=dt, requires_grad=requires_grad)
    v = torch.randn(case.total, case.hkv, case.d, device=dev, dtype=dt, requires_grad=requires_grad)
    cu = torch.tensor([0] + list(_cumsum(case.lens)), dtype=torch.int32, device=dev)
    return q, k, v, cu, max(case.lens)


def _cumsum(xs):
    s = 0
    for x in xs:
        s += x
        yield s


def _setup_longvita(case, mode):
    from longvita.kernels.attention import varlen_attention

    q, k, v, cu, mx = _inputs(case, mode != "fwd")
    return with_backward(lambda: varlen_attention(q, k, v, cu, cu, mx, mx, causal=case.causal, backend="triton"), mode, (q, k, v))


def _setup_longvita_variant(case, mode, variant: str):
    """longvita with one kernel variant: LONGVITA_ATTENTION_VARIANT set around every call."""
    from longvita.kernels.attention.launch_table import ENV, parse_variant

    parse_variant(variant, "--variants")
    run = _setup_longvita(case, mode)

    def fn():
        saved = os.environ.get(ENV)
        os.environ[ENV] = variant
        try:
            run()
        finally:
            if saved is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = saved
    return fn


def _setup_flash_attn(case, mode):
    if not flash_attn_available():
        return None
    from flash_attn import flash_attn_varlen_func

    q, k, v, cu, mx = _inputs(case, mode != "fwd")
    return with_backward(lambda: flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, causal=case.causal), mode, (q, k, v))


def _setup_torch_varlen(case, mode):
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    import inspect

    q, k, v, cu, mx = _inputs(case, mode != "fwd")
    window = (-1, 0) if case.causal else (-1, -1)
    params = inspect.signature(varlen_attn).parameters
    kw = {"window_size": window} if "window_size" in params else {}
    if not kw and case.causal:
        kw = {"is_causal": True} if "is_causal" in params else None
        if kw is None:
            return None
    if case.hq != case.hkv:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:  # torch 2.11's varlen_attn has no GQA: k/v heads repeated before the timing
            group = case.hq // case.hkv
            k = k.detach().repeat_interleave(group, dim=1).requires_grad_(k.requires_grad)
            v = v.detach().repeat_interleave(group, dim=1).requires_grad_(v.requires_grad)
    return with_backward(lambda: varlen_attn(q, k, v, cu, cu, mx, mx, **kw), mode, (q, k, v))


def _setup_sdpa(case, mode, backend_name: str):
    """SDPA needs equal-length documents: (B, H, S, D) with B documents."""
    if len(set(case.lens)) != 1:
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend_name]
    b, s = len(case.lens), case.lens[0]
    dev, dt, g = "cuda", torch.bfloat16, mode != "fwd"
    q = torch.randn(b, case.hq, s, case.d, device=dev, dtype=dt, requires_grad=g)
    k = torch.randn(b, case.hkv, s, case.d, device=dev, dtype=dt, requires_grad=g)
    v = torch.randn(b, case.hkv, s, case.d, device=dev, dtype=dt, requires_grad=g)
    gqa = case.hq != case.hkv

    def fwd():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=case.causal, enable_gqa=gqa)
    return with_backward(fwd, mode, (q, k, v))


_FLEX = None


def _setup_flex(case, mode):
    global _FLEX
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    q, k, v, cu, _ = _inputs(case, mode != "fwd")
    # flex wants (1, H, S, D); document ids mask cross-document pairs
    doc = torch.repeat_interleave(
        torch.arange(len(case.lens), device="cuda"), torch.tensor(case.lens, device="cuda")
    )
    causal = case.causal

    def mask_mod(b, h, qi, ki):
        same = doc[qi] == doc[ki]
        return same & (ki <= qi) if causal else same

    block_mask = create_block_mask(mask_mod, 1, None, case.total, case.total, device="cuda")
    gqa = case.hq != case.hkv

    def fwd():
        o = _FLEX(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            block_mask=block_mask, enable_gqa=gqa,
        )
        return o[0].transpose(0, 1)
    return with_backward(fwd, mode, (q, k, v))


IMPLS = {
    "longvita triton": _setup_longvita,
    "flash-attn varlen": _setup_flash_attn,
    "torch varlen_attn": _setup_torch_varlen,
    "sdpa cudnn": lambda c, m: _setup_sdpa(c, m, "cudnn"),
    "sdpa flash": lambda c, m: _setup_sdpa(c, m, "flash"),
    "flex document mask": _setup_flex,
}


def measure(case: Case, impl: str, mode: str, quick: bool) -> dict:
    """ms, TFLOP/s and peak GiB of one (case, impl, mode); {} when it cannot run."""
    try:
        fn = IMPLS[impl](case, mode)
        if fn is None:
            return {}
        ms = time_cuda(fn, warmup=2 if quick else 3, iters=5 if quick else 10)
        gib = peak_memory_gib(fn)
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:  # unsupported / OOM
        print(f"  {impl} on {case.name} ({mode}): skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})", file=sys.stderr)
        torch.cuda.empty_cache()
        return {}
    return {"ms": ms, "tflops": case.flops(mode) / (ms * 1e-3) / 1e12, "gib": gib}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller cases and iterations")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/attention.json)")
    parser.add_argument("--variants", default="", help="kernel variants to time beside the default, comma-separated")
    args = parser.parse_args(argv)
    from longvita.kernels.attention.launch_table import parse_variant

    for variant in filter(None, args.variants.split(",")):
        parse_variant(variant, "--variants")  # a typo fails before any GPU time is spent
        IMPLS[f"longvita triton [{variant}]"] = lambda c, m, v=variant: _setup_longvita_variant(c, m, v)
    if not torch.cuda.is_available():
        print("bench_attention: no CUDA device; this benchmark measures GPU kernels only. Nothing to do.", file=sys.stderr)
        return 0
    rows = []
    for case in cases(args.quick):
        for mode in MODES:
            for impl in IMPLS:
                metrics = measure(case, impl, mode, args.quick)
                if metrics:
                    rows.append(Row(f"{case.name} {mode}", impl, metrics))
                    write_json(NAME, TITLE, rows, METRICS, args.out, quiet=True)
                    print(f"  {case.name} {mode} {impl}: {metrics['tflops']:.1f} TFLOP/s", file=sys.stderr)
    print_table(TITLE, rows, METRICS)
    write_json(NAME, TITLE, rows, METRICS, args.out)
    return 0


# --------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------



@gpu_only
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", cases(quick=False), ids=lambda c: c.name.replace(" ", "_"))
def test_attention(benchmark, case, impl, mode):
    try:
        fn = IMPLS[impl](case, mode)
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
        pytest.skip(f"{impl} cannot run {case.name}: {e}")
    if fn is None:
        pytest.skip(f"{impl} not available for {case.name}")

    median_s = pytest_benchmark_median(benchmark, fn, f"{impl} {case.name} {mode}")
    benchmark.extra_info["tflops"] = case.flops(mode) / median_s / 1e12
    benchmark.extra_info["case"] = case.name


if __name__ == "__main__":
    sys.exit(main())
