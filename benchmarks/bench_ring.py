"""Zigzag ring attention: compute per ring step, per-rank balance, K/V traffic, predicted efficiency.

    python benchmarks/bench_ring.py [--quick] [--out FILE]    # one GPU: ranks simulated in turn
    python benchmarks/bench_ring.py --dry-run [--out FILE]     # any machine: the byte/balance model only
    torchrun --nproc-per-node P benchmarks/bench_ring.py       # P GPUs: the real ring, measured vs predicted
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
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Row, pytest_benchmark_median, gpu_only, print_table, time_cuda, write_json  # noqa: E402

from longvita.parallel import visible_pairs_per_rank, zigzag_layout  # noqa: E402

NAME = "ring"
TITLE = "Zigzag ring attention (bf16, causal): per-step compute, balance, traffic, predicted efficiency"
METRICS = ["local_tokens", "kv_mib_step", "comm_ms_step", "fwd_step_ms", "fwd_balance", "fwd_pred_eff",
           "bwd_step_ms", "bwd_balance", "bwd_pred_eff", "measured_ms", "predicted_ms"]
KINDS = ("diag", "before", "after")


@dataclass(frozen=True)
class Case:
    tokens: int
    world: int
    hq: int = 40
    hkv: int = 8
    d: int = 128
    elem_bytes: int = 2  # bf16

    @property
    def name(self) -> str:
        return f"{self.tokens // 1024}K P={self.world}"

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return torch.tensor([0, self.tokens], dtype=torch.int32)

    def local_tokens(self) -> int:
        return zigzag_layout(self.cu_seqlens, self.world).total_local

    def kv_bytes_fwd(self) -> int:
        return 2 * self.local_tokens() * self.hkv * self.d * self.elem_bytes

    def kv_bytes_bwd(self) -> int:
        return self.kv_bytes_fwd() + 2 * self.local_tokens() * self.hkv * self.d * 4  # + fp32 dK/dV

    def pairs(self, kind: str) -> int:
        """Query-key pairs one block of ``kind`` computes (padding included)."""
        c = zigzag_layout(self.cu_seqlens, self.world).chunk
        if kind == "diag":
            return int((2 * c * (2 * c + 1) // 2).sum())
        return int((2 * c * c).sum())

    def flops(self, kind: str, backward: bool = False) -> float:
        return 4.0 * self.pairs(kind) * self.hq * self.d * (2.5 if backward else 1.0)


def cases(quick: bool = False) -> list[Case]:
    tokens = [131072] if quick else [131072, 262144, 524288, 1048576]
    worlds = [2, 4] if quick else list(range(2, 9))
    return [Case(t, p) for t in tokens for p in worlds]


def kind_of(rank: int, step: int, world: int) -> str:
    src = (rank - step) % world
    return "diag" if src == rank else ("before" if src < rank else "after")


def predict(case: Case, block_ms: dict[str, float], comm_ms: float) -> dict:
    """Ring schedule from per-kind block times: per-step time, balance, predicted time and efficiency."""
    p = case.world
    table = [[block_ms[kind_of(r, i, p)] for i in range(p)] for r in range(p)]  # (rank, step) ms
    per_step = [max(table[r][i] for r in range(p)) for i in range(p)]
    ring_ms = sum(max(t, comm_ms if i + 1 < p else 0.0) for i, t in enumerate(per_step))
    rank_totals = [sum(row) for row in table]
    mean = sum(rank_totals) / p
    return {
        "step_ms": max(per_step),
        "balance": max(rank_totals) / mean,
        "ring_ms": ring_ms,
        "efficiency": mean / ring_ms,
    }


# --------------------------------------------------------------------------------------
# One setup per block kind, shared by the script and pytest-benchmark
# --------------------------------------------------------------------------------------


def setup_block(case: Case, kind: str, backward: bool, device="cuda"):
    """fn() computing rank 1's block of ``kind`` (forward + merge, or backward) on ``device``."""
    from longvita.parallel.ring import ring_block
    from longvita.kernels import lse_merge_, varlen_attention_bwd, varlen_attention_fwd

    layout = zigzag_layout(case.cu_seqlens, case.world, device)
    n, dt = layout.total_local, torch.bfloat16
    q = torch.randn(n, case.hq, case.d, device=device, dtype=dt)
    k = torch.randn(n, case.hkv, case.d, device=device, dtype=dt)
    v = torch.randn(n, case.hkv, case.d, device=device, dtype=dt)
    rank = 1 if kind != "after" else 0  # a rank for which this kind exists (P >= 2)
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


def measure_blocks(case: Case, quick: bool) -> dict[str, dict[str, float]]:
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
        case = Case(tokens, world)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases and iterations")
    parser.add_argument("--dry-run", action="store_true", help="print the traffic/balance model only (no device)")
    parser.add_argument("--link-gbps", type=float, default=450.0, help="link bandwidth per direction, GB/s")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/ring.json)")
    args = parser.parse_args(argv)
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
    case = Case(131072, 4)
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
