"""Sweep the varlen attention kernels' launch configs on this GPU and print the fastest.

    python benchmarks/tune_attention.py [--kinds fwd,dkdv,dq] [--shapes qwen,vit] [--out FILE]

The kernels run with fixed block sizes per head dim (``_fixed_config`` in
``longvita/kernels/attention/triton.py``); this script measures candidates for one
kernel at a time while the others keep their fixed config, at the two shapes that matter
(Qwen2.5-14B: 40 q / 8 kv heads, D 128, causal, one 8K document; InternViT-300M: 16 heads,
D 64, bidirectional, 8 tiles of 1025 tokens), bf16. Forward configs are timed on the
forward, dK/dV and dQ configs on the whole backward. Every candidate's output is compared
with the fixed config's (a config that computes something else is reported, not chosen).
TFLOP/s use flash-attn's counting (bench_attention.py). Medians of triton's do_bench.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from longvita.kernels.attention import triton as vat  # noqa: E402

SHAPES = {
    # name: (documents, hq, hkv, d, causal)
    "qwen": ([8192], 40, 8, 128, True),
    "vit": ([1025] * 8, 16, 16, 64, False),
}

# (BLOCK_M, BLOCK_N, num_warps, num_stages)
CANDIDATES = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3),
            (128, 32, 4, 4), (128, 64, 8, 4), (64, 128, 4, 3), (128, 128, 16, 3)],
    "dkdv": [(16, 128, 8, 2), (32, 128, 8, 2), (32, 128, 4, 2), (64, 128, 8, 2), (64, 64, 4, 2),
             (32, 64, 4, 3), (64, 128, 8, 1), (32, 128, 8, 3), (64, 64, 8, 3), (32, 64, 8, 2),
             (16, 64, 4, 2), (64, 64, 4, 3)],
    "dq": [(64, 32, 4, 2), (128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 4, 2), (128, 64, 8, 3),
           (64, 64, 8, 3), (128, 128, 8, 2), (64, 32, 4, 3), (128, 32, 8, 3)],
}


def flops(lens, hq, d, causal, backward):
    f = sum(4 * n * n * hq * d for n in lens) * (0.5 if causal else 1.0)
    return f * 2.5 if backward else f


def make_inputs(lens, hq, hkv, d):
    gen = torch.Generator(device="cuda").manual_seed(0)
    total = sum(lens)
    q = torch.randn(total, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(total, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(total, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    dout = torch.randn_like(q)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    return q, k, v, dout, cu, max(lens)


def run_case(shape: str, kinds: list[str]) -> list[dict]:
    import triton.testing

    lens, hq, hkv, d, causal = SHAPES[shape]
    q, k, v, dout, cu, mx = make_inputs(lens, hq, hkv, d)
    scale = d ** -0.5
    window = (-1, 0) if causal else (-1, -1)
    fixed = vat._fixed_config
    out, lse = vat.varlen_attention_fwd_triton(q, k, v, cu, cu, mx, mx, scale, causal, window)
    ref_fwd = out.float()
    ref_bwd = [g.float() for g in vat.varlen_attention_bwd_triton(dout, q, k, v, out, lse, cu, cu, mx, mx, scale, causal, window)]
    rows = []
    for kind in kinds:
        for bm, bn, w, s in CANDIDATES[kind]:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
            vat._fixed_config = lambda k_, *rest, _c=cfg, _kind=kind: dict(_c) if k_ == _kind else fixed(k_, *rest)
            row = {"shape": shape, "kernel": kind, "config": f"M{bm} N{bn} w{w} s{s}",
                   "current": cfg == fixed(kind, max(16, 1 << (d - 1).bit_length()), True)}
            try:
                if kind == "fwd":
                    fn = lambda: vat.varlen_attention_fwd_triton(q, k, v, cu, cu, mx, mx, scale, causal, window)  # noqa: E731
                    got = [fn()[0].float()]
                    want = [ref_fwd]
                else:
                    fn = lambda: vat.varlen_attention_bwd_triton(  # noqa: E731
                        dout, q, k, v, out, lse, cu, cu, mx, mx, scale, causal, window)
                    got = [g.float() for g in fn()]
                    want = ref_bwd
                err = max(((a - b).norm() / b.norm().clamp(min=1e-30)).item() for a, b in zip(got, want))
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                row.update(ms=ms, tflops=flops(lens, hq, d, causal, kind != "fwd") / ms / 1e9, rel_diff=err)
            except Exception as exc:  # noqa: BLE001 - out of shared memory / registers: reported
                row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            finally:
                vat._fixed_config = fixed
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="fwd,dkdv,dq")
    parser.add_argument("--shapes", default="qwen,vit")
    parser.add_argument("--out", default=None, help="JSON lines of every candidate")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_attention: needs a CUDA device", file=sys.stderr)
        return 0
    rows = []
    for shape in args.shapes.split(","):
        rows += run_case(shape, args.kinds.split(","))
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print("\nfastest per kernel and shape (rel_diff: against the fixed config's output)")
    for shape in args.shapes.split(","):
        for kind in args.kinds.split(","):
            ok = [r for r in rows if r["shape"] == shape and r["kernel"] == kind and "ms" in r and r["rel_diff"] < 1e-2]
            cur = [r for r in ok if r["current"]]
            if not ok:
                continue
            best = min(ok, key=lambda r: r["ms"])
            base = f"current {cur[0]['config']} {cur[0]['ms']:.3f} ms" if cur else "current config not measured"
            print(f"  {shape:5s} {kind:5s} best {best['config']:18s} {best['ms']:.3f} ms "
                  f"{best['tflops']:.0f} TFLOP/s ({base})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
