"""Zigzag ring attention: compute per ring step, per-rank balance, K/V traffic, predicted efficiency.

    python benchmarks/bench_ring.py [--quick] [--out FILE]    # one GPU: ranks simulated in turn
    python benchmarks/bench_ring.py --dry-run [--out FILE]     # any machine: the byte/balance model only
    torchrun --nproc-per-node P benchmarks/bench_ring.py       # P GPUs: the real ring, measured vs predicted
    python benchmarks/bench_ring.py --hybrid [--quick]         # one GPU: ring vs Ulysses vs hybrid at 8-64 GPUs
    python benchmarks/bench_ring.py --hybrid --dry-run         # any machine: the same from FLOPs (no timings)
    pytest benchmarks/bench_ring.py --benchmark-only           # pytest-benchmark (GPU; skips without one)

Shapes: Qwen2.5-14B attention (40 q heads, 8 kv heads, head_dim 128), bf16, causal, one
document of 128K to 1M tokens (stages 3-4 pack without resetting the mask), P = 2..8.

One GPU, simulated ranks: at ring step i rank r computes its queries against the K/V
block of rank (r - i) mod P, and the block's shape depends only on whether that source
is r itself (causal diagonal), an earlier rank (all local queries x the source's first
chunk) or a later one (the local second chunk x both source chunks). So the three block
kinds are timed once each (forward: block + LSE merge; backward: block), and the P x P
table of (rank, step) times is filled from them: per-step time = the slowest rank of
that step (a step ends when the slowest rank is done), per-rank balance = max/mean of
the ranks' totals.

Traffic per ring step, every rank sending one block to its successor while receiving
one: forward 2 * tokens/P * Hkv * D * 2 bytes (K and V, bf16); backward that plus the
fp32 dK/dV accumulators travelling with their block (twice as many bytes again).

Predicted ring time = sum over steps of max(slowest rank's compute, transfer time at
``--link-gbps`` each way; the default 450 is H100 NVLink's 900 GB/s total bandwidth
split per direction), the last step having no transfer. Predicted efficiency = (total
compute / P) / predicted ring time: 1 means the ring is as fast as a perfect split of
the attention work with free communication.

Under torchrun it runs ``ring_attention`` for real over NCCL and prints the measured
time next to the prediction from this GPU's block timings.

``--hybrid``: per decoder layer at 8, 16, 32 and 64 GPUs in nodes of 8 (NVLink
``--link-gbps`` inside, InfiniBand ``--inter-gbps`` per GPU between nodes), the plain
ring, pure Ulysses where the 40 query heads allow it (8 at most here) and Ulysses inside
each node with the ring across nodes: the bytes each rank sends (ring K/V blocks,
all-to-alls) and the predicted forward + backward attention time
(``longvita.parallel.costs.predict_cp_layer``), from this GPU's timings of each ring
block shape (or, with ``--dry-run``, from FLOPs at ``--tflops``). Only predictions: no
machine with more than one GPU has been available to measure a real hybrid run.
"""

from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Row, gpu_only, print_table, pytest_benchmark_median, setup_block, time_cuda, write_json  # noqa: E402

from longvita.parallel import visible_pairs_per_rank, zigzag_layout  # noqa: E402
from longvita.parallel.costs import KINDS, Links, RingCase, estimate_block_ms, predict_cp_layer  # noqa: E402
from longvita.parallel.costs import predict_ring as predict  # noqa: E402

NAME = "ring"
TITLE = "Zigzag ring attention (bf16, causal): per-step compute, balance, traffic, predicted efficiency"
METRICS = ["local_tokens", "kv_mib_step", "comm_ms_step", "fwd_step_ms", "fwd_balance", "fwd_pred_eff",
           "bwd_step_ms", "bwd_balance", "bwd_pred_eff", "measured_ms", "predicted_ms"]


def cases(quick: bool = False) -> list[RingCase]:
    tokens = [131072] if quick else [131072, 262144, 524288, 1048576]
    worlds = [2, 4] if quick else list(range(2, 9))
    return [RingCase(t, p) for t in tokens for p in worlds]


# --------------------------------------------------------------------------------------
# One setup per block kind, shared by the script and pytest-benchmark
# --------------------------------------------------------------------------------------


def measure_blocks(case: RingCase, quick: bool) -> dict[str, dict[str, float]]:
    times = {}
    for backward in (False, True):
        for kind in KINDS:
            fn = setup_block(case, kind, backward)
            times.setdefault("bwd" if backward else "fwd", {})[kind] = time_cuda(fn, warmup=2, iters=3 if quick else 10)
            del fn
            torch.cuda.empty_cache()
    return times


# --------------------------------------------------------------------------------------
# Script modes
# --------------------------------------------------------------------------------------


def dry_run(args) -> int:
    """The traffic and balance model, no device needed."""
    rows = []
    for case in cases(args.quick):
        zig = visible_pairs_per_rank(case.cu_seqlens, case.world, "zigzag")
        cont = visible_pairs_per_rank(case.cu_seqlens, case.world, "contiguous")
        comm_fwd = case.kv_bytes_fwd() / (args.link_gbps * 1e9) * 1e3
        comm_bwd = case.kv_bytes_bwd() / (args.link_gbps * 1e9) * 1e3
        rows.append(Row(case.name, "model", {
            "local_tokens": case.local_tokens(),
            "kv_mib_fwd": case.kv_bytes_fwd() / 2**20,
            "kv_mib_bwd": case.kv_bytes_bwd() / 2**20,
            "comm_ms_fwd": comm_fwd,
            "comm_ms_bwd": comm_bwd,
            "gflop_step": case.flops("before") / 1e9,
            # compute hides the transfer while a rank computes a block slower than this
            "hide_tflops_fwd": case.flops("before") / (comm_fwd * 1e-3) / 1e12,
            "zigzag_max/mean": max(zig) / (sum(zig) / case.world),
            "contig_max/mean": max(cont) / (sum(cont) / case.world),
        }))
    metrics = ["local_tokens", "kv_mib_fwd", "kv_mib_bwd", "comm_ms_fwd", "comm_ms_bwd", "gflop_step",
               "hide_tflops_fwd", "zigzag_max/mean", "contig_max/mean"]
    title = f"Ring model at {args.link_gbps:g} GB/s per direction (no timings)"
    print_table(title, rows, metrics)
    if getattr(args, "out", None):  # JSON only when asked: the model is no measurement
        write_json(f"{NAME}_model", title, rows, metrics, args.out)
    return 0


def simulate(args) -> int:
    rows = []
    for case in cases(args.quick):
        try:
            times = measure_blocks(case, args.quick)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            print(f"  {case.name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})", file=sys.stderr)
            torch.cuda.empty_cache()
            continue
        fwd = predict(case, times["fwd"], case.kv_bytes_fwd() / (args.link_gbps * 1e9) * 1e3)
        bwd = predict(case, times["bwd"], case.kv_bytes_bwd() / (args.link_gbps * 1e9) * 1e3)
        rows.append(Row(case.name, "simulated", {
            "local_tokens": case.local_tokens(),
            "kv_mib_step": case.kv_bytes_fwd() / 2**20,
            "comm_ms_step": case.kv_bytes_fwd() / (args.link_gbps * 1e9) * 1e3,
            "fwd_step_ms": fwd["step_ms"], "fwd_balance": fwd["balance"], "fwd_pred_eff": fwd["efficiency"],
            "bwd_step_ms": bwd["step_ms"], "bwd_balance": bwd["balance"], "bwd_pred_eff": bwd["efficiency"],
            "predicted_ms": fwd["ring_ms"],
        }))
        write_json(NAME, TITLE, rows, METRICS, args.out, quiet=True)
        print(f"  {case.name}: fwd step {fwd['step_ms']:.2f} ms, predicted efficiency {fwd['efficiency']:.2f}", file=sys.stderr)
    print_table(TITLE, rows, METRICS)
    write_json(NAME, TITLE, rows, METRICS, args.out)
    return 0


def distributed(args) -> int:
    """Under torchrun: the real ring over NCCL, measured against the prediction."""
    import torch.distributed as dist

    from longvita.parallel import ring_attention

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    rows = []
    for tokens in ([131072] if args.quick else [131072, 262144, 524288, 1048576]):
        case = RingCase(tokens, world)
        layout = zigzag_layout(case.cu_seqlens, world, "cuda")
        n = layout.total_local
        q = torch.randn(n, case.hq, case.d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(n, case.hkv, case.d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(n, case.hkv, case.d, device="cuda", dtype=torch.bfloat16, requires_grad=True)

        def fwd():
            with torch.no_grad():
                ring_attention(q, k, v, layout)

        def fwd_bwd():
            ring_attention(q, k, v, layout).backward(dout)

        dout = torch.randn(n, case.hq, case.d, device="cuda", dtype=torch.bfloat16)
        measured = {}
        for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            dist.barrier()
            ms = torch.tensor(time_cuda(fn, warmup=2, iters=3 if args.quick else 10), device="cuda")
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)
            measured[mode] = ms.item()
        times = measure_blocks(case, args.quick)  # this GPU's blocks, no communication
        fwd_p = predict(case, times["fwd"], case.kv_bytes_fwd() / (args.link_gbps * 1e9) * 1e3)
        bwd_p = predict(case, times["bwd"], case.kv_bytes_bwd() / (args.link_gbps * 1e9) * 1e3)
        rows.append(Row(case.name, "ring fwd", {"measured_ms": measured["fwd"], "predicted_ms": fwd_p["ring_ms"],
                                                "fwd_pred_eff": fwd_p["efficiency"]}))
        rows.append(Row(case.name, "ring fwd+bwd", {"measured_ms": measured["fwd+bwd"],
                                                    "predicted_ms": fwd_p["ring_ms"] + bwd_p["ring_ms"]}))
    if rank == 0:
        print_table(f"{TITLE} — {world} GPUs, measured", rows, METRICS)
        write_json(f"{NAME}_p{world}", TITLE, rows, METRICS, args.out)
    dist.destroy_process_group()
    return 0


HYBRID_NAME = "ring_hybrid"
HYBRID_METRICS = ["gpus", "ulysses", "ring", "ring_mib", "a2a_mib", "fwd_ms", "bwd_ms", "step_ms", "step_eff"]


def hybrid_layouts(gpus: int, hq: int = 40, hkv: int = 8, node: int = 8) -> list[tuple[str, int]]:
    """(name, Ulysses degree) of the layouts compared at ``gpus`` ranks: the plain ring,
    pure Ulysses where the heads allow it, and Ulysses inside each node with the ring
    across nodes (or, on one node, half the node)."""
    def valid(u):
        return gpus % u == 0 and hq % u == 0 and (hkv % u == 0 or u % hkv == 0)

    out = [("ring", 1)]
    if valid(gpus):
        out.append((f"ulysses {gpus}", gpus))
    u = node if gpus > node else node // 2
    if u < gpus and valid(u):
        out.append((f"hybrid: ulysses {u} x ring {gpus // u}", u))
    return out


def hybrid(args, measured: bool) -> int:
    """Ring, Ulysses and hybrid per decoder layer at 8-64 GPUs in nodes of 8: bytes each
    rank sends and the predicted attention forward + backward, from this GPU's block
    timings (``measured``) or from FLOPs at ``--tflops``."""
    links = Links(args.link_gbps, args.inter_gbps, 8)
    cache: dict[tuple, dict] = {}

    def blocks(case: RingCase, backward: bool) -> dict[str, float]:
        key = (case.tokens, case.world, case.hq, case.hkv, backward)
        if key not in cache:
            if measured:
                cache[key] = {}
                for kind in (KINDS if case.world > 1 else ("diag",)):
                    fn = setup_block(case, kind, backward)
                    cache[key][kind] = time_cuda(fn, warmup=1, iters=2 if args.quick else 5)
                    del fn
                    torch.cuda.empty_cache()
            else:
                cache[key] = estimate_block_ms(case, args.tflops, backward)
        return cache[key]

    rows = []
    tokens_list = [131072] if args.quick else args.hybrid_tokens
    for tokens in tokens_list:
        for gpus in (8, 16, 32, 64):
            for name, u in hybrid_layouts(gpus):
                fwd = predict_cp_layer(tokens, gpus, u, lambda c: blocks(c, False), links)
                bwd = predict_cp_layer(tokens, gpus, u, lambda c: blocks(c, True), links, backward=True)
                step = fwd["total_ms"] + bwd["total_ms"]
                ideal = fwd["efficiency"] * fwd["total_ms"] + bwd["efficiency"] * bwd["total_ms"]
                rows.append(Row(f"{tokens // 1024}K on {gpus} GPUs", name, {
                    "gpus": gpus, "ulysses": u, "ring": gpus // u,
                    "ring_mib": (fwd["ring_bytes"] + bwd["ring_bytes"]) / 2**20,
                    "a2a_mib": (fwd["all_to_all_bytes"] + bwd["all_to_all_bytes"]) / 2**20,
                    "fwd_ms": fwd["total_ms"], "bwd_ms": bwd["total_ms"], "step_ms": step, "step_eff": ideal / step,
                }))
    source = "this GPU's block timings" if measured else f"FLOPs at {args.tflops:g} TFLOP/s (no GPU timings)"
    title = (f"Context parallelism per decoder layer, Qwen2.5-14B attention (40/8 heads, bf16, causal), nodes of 8 "
             f"GPUs: NVLink {args.link_gbps:g} GB/s, InfiniBand {args.inter_gbps:g} GB/s per GPU; blocks from {source}")
    print_table(title, rows, HYBRID_METRICS)
    if measured or getattr(args, "out", None):  # a FLOP model is no measurement: JSON only when asked
        write_json(HYBRID_NAME, title, rows, HYBRID_METRICS, args.out)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases and iterations")
    parser.add_argument("--dry-run", action="store_true", help="print the traffic/balance model only (no device)")
    parser.add_argument("--link-gbps", type=float, default=450.0, help="link bandwidth per direction, GB/s (NVLink)")
    parser.add_argument("--hybrid", action="store_true",
                        help="ring vs Ulysses vs hybrid at 8-64 GPUs per layer (with --dry-run: from FLOPs)")
    parser.add_argument("--inter-gbps", type=float, default=50.0, help="--hybrid: InfiniBand bandwidth per GPU, GB/s")
    parser.add_argument("--tflops", type=float, default=400.0,
                        help="--hybrid --dry-run: attention TFLOP/s standing in for block timings "
                             "(400: the H100's measured packed bf16 forward)")
    parser.add_argument("--hybrid-tokens", type=lambda v: [int(x) for x in v.split(",")], default=[131072, 524288],
                        help="--hybrid: sequence lengths, comma-separated")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/ring.json)")
    args = parser.parse_args(argv)
    if args.hybrid and (args.dry_run or not torch.cuda.is_available()):
        return hybrid(args, measured=False)
    if args.hybrid and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return hybrid(args, measured=True)
    if args.dry_run:
        return dry_run(args)
    if not torch.cuda.is_available():
        print("bench_ring: no CUDA device; this benchmark times GPU kernels. "
              "Use --dry-run for the traffic and balance model.", file=sys.stderr)
        return 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return distributed(args)
    return simulate(args)


# --------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------



@gpu_only
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("kind", KINDS)
def test_ring_block(benchmark, kind, backward):
    case = RingCase(131072, 4)
    fn = setup_block(case, kind, backward)

    median_s = pytest_benchmark_median(benchmark, fn, f"{case.name} {kind}")
    benchmark.extra_info["tflops"] = case.flops(kind, backward) / median_s / 1e12
    benchmark.extra_info["kv_bytes_per_step"] = case.kv_bytes_bwd() if backward else case.kv_bytes_fwd()
    benchmark.extra_info["case"] = f"{case.name} {kind}"


def test_ring_model():
    """The CPU part: the traffic/balance model runs and zigzag balances the causal work."""
    assert dry_run(argparse.Namespace(quick=True, link_gbps=450.0)) == 0
    for case in cases(quick=True):
        zig = visible_pairs_per_rank(case.cu_seqlens, case.world, "zigzag")
        assert max(zig) / (sum(zig) / case.world) <= 1.05
        block_ms = {kind: float(case.pairs(kind)) for kind in KINDS}  # cost proportional to pairs
        assert predict(case, block_ms, 0.0)["balance"] == pytest.approx(1.0, abs=1e-3)


if __name__ == "__main__":
    sys.exit(main())
