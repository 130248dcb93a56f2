"""End-to-end prefill and decode of the full model: LM-head strategies, longest prompt, decode speed, CP scaling.

    python benchmarks/bench_prefill.py [--quick] [--layers N] [--parts abcd] [--out FILE]   # one GPU
    python benchmarks/bench_prefill.py --parts ad --layers 8 --out a_d.json   # Table 4 + CP model, 8 layers
    python benchmarks/bench_prefill.py --parts bc --out b_c.json              # full 48 layers: (b), (c)
    python benchmarks/bench_prefill.py --parts b --b-tokens 196608            # (b): does 192K fit? one try
    torchrun --nproc-per-node P benchmarks/bench_prefill.py [--layers N] [--cp-lengths 131072,...]
                                                       # P GPUs: (d) measured beside its prediction
    python benchmarks/bench_prefill.py --cpu-smoke --out X.json   # no GPU (also the default there): seconds
    pytest benchmarks/bench_prefill.py --benchmark-only           # pytest-benchmark (GPU; skips without one)

Model: Long-VITA-14B shapes (InternViT-300M + projector + Qwen2.5-14B, V=152064) with
random weights in bf16, one text-only sequence. ``--layers N`` keeps N of the 48 decoder
layers (default all 48; ``--quick``: 4 layers, searches capped at 256K tokens) so that a
run fits the time one has; the title of the table states the count. Every try of a
search near 300K tokens prefills the whole prompt, minutes with 48 layers: run the parts
separately (``--parts``) where a command's time is limited. The activation memory of a
prefill does not depend on the layer count, the weights and the KV cache do; every
prediction below is made for the configuration actually run (and, for (b), also for the
full 48 layers on an 80 GB H100).

(a) Long-VITA's Table 4 on this hardware: a plain (non-cached) prefill through
    ``model(model.embed(ids))`` and one of three LM heads, keeping the last position's logits:
    - all-logits head: ``model(input_ids)``, logits of every position (N x V), then the last;
    - chunked head: the final hidden states projected ``--head-chunk`` rows at a time,
      only the last chunk's last row kept;
    - last-token head: ``model.logits(hidden, [N-1])`` (gather, then project).
    For each head: prefill time and peak memory at a few lengths, and the largest prompt
    before out-of-memory, found by doubling from ``--search-start`` and then bisecting to
    ``--resolution`` tokens (each ``torch.cuda.OutOfMemoryError`` is caught and the memory
    freed before the next try). ``pred_*`` columns are an analytic model of the peak
    (weights + the largest layer's activations or the head's logits, see ``prefill_peak``).
(b) The longest prompt that prefills through the KV cache ``--prefill-chunk`` tokens at a
    time (``generate(model, ids, plan=LocalPlan(prefill_chunk=...))``) and then decodes 16 tokens, searched the
    same way (from half the prediction, so that few tries prefill a whole long prompt),
    beside the prediction (free memory after loading - one chunk's activations) / KV bytes
    per token. For Long-VITA-14B the KV cache is 48 layers x 2 x 8 heads x 128 x 2 B =
    192 KiB per token and the weights 30.2 GB (29.5 of them the LM), so 80 GB should hold
    about 247K tokens with 8K-token chunks (the target: >= 192K).
(c) Decode speed at 32K and 128K of context: tokens/s of KV-cached decoding after a chunked
    prefill (time from the first of 64 generated tokens to the last, over the 63 in
    between); ``ms`` is that chunked prefill's time.
(d) Context-parallel prefill scaling for P = 1, 2, 4, 8 predicted with the ring-attention
    time model of ``longvita.parallel.costs`` (``bench_ring.py`` measures its blocks): per layer, the dense part (projections, MLP) splits
    evenly over P, the attention takes the ring's predicted time from this GPU's block
    timings and ``--link-gbps``. The dense part is linear in N: measured once at 32K (the
    prefill minus its layers' causal attention, timed alone) and scaled; the P = 1 row is
    that plus the attention timed at N, so it exists where a whole prefill would not fit
    one GPU (1M tokens). Under torchrun the context-parallel prefill
    (``generate`` with a ``ContextParallelPlan``) is also run for real and its time printed beside the
    prediction for this world size.

Without CUDA (or with ``--cpu-smoke``) the same code runs on the ``tiny`` preset in fp32
with small lengths so CI exercises every path; the CPU has no allocator statistics, so
there "out of memory" is a simulated byte budget (``--cpu-budget-mib``) applied to the
analytic model, and the searches end where that model crosses it. CPU numbers say nothing
about GPU performance.
"""

from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    Row, fmt_tokens, free_memory, gpu_only, print_table, pytest_benchmark_median, setup_block, write_json,
)
from prefill_setup import (  # noqa: E402,F401  (the tests reach the helpers through this module)
    DECODE_TOKENS, DECODE_TOKENS_C, GIB, HEADS, Settings, SimulatedOOM, attempt, build_model, generate_peak,
    is_oom, largest_under, prefill_peak, prompt, search_largest, settings_from_args, setup_attention,
    setup_generate, setup_prefill, time_and_peak, time_ms, warm_up, weight_bytes,
)

from longvita.model import LongVITA, preset  # noqa: E402
from longvita.parallel.costs import KINDS, RingCase, predict_ring  # noqa: E402
from longvita.runtime import ContextParallelPlan, generate  # noqa: E402
from longvita.runtime.capacity import kv_bytes_per_token  # noqa: E402

NAME = "prefill"
METRICS = ["tokens", "ms", "gib", "pred_gib", "max_tokens", "pred_max_tokens", "decode_tok_s",
           "pred_ms", "speedup", "efficiency", "measured_ms"]


# --------------------------------------------------------------------------------------
# The four parts
# --------------------------------------------------------------------------------------


def part_a(model, s: Settings, rows: list[Row]) -> None:
    cfg, elem = model.config, torch.finfo(s.dtype).bits // 8
    capacity = s.budget_bytes if s.cpu else torch.cuda.mem_get_info()[0]
    for head in HEADS:
        for n in s.lengths:
            peak = prefill_peak(cfg, n, head, elem, s.head_chunk)
            metrics = {"tokens": n, "pred_gib": (weight_bytes(model) + peak) / GIB}
            try:
                if s.cpu and peak > s.budget_bytes:
                    raise SimulatedOOM
                fn = setup_prefill(model, n, head, s.head_chunk)
                metrics["ms"], gib = time_and_peak(fn, s, n)
                if gib is not None:
                    metrics["gib"] = gib + weight_bytes(model) / GIB
            except Exception as e:
                if not is_oom(e):
                    raise
                print(f"  (a) {head} N={fmt_tokens(n)}: out of memory", file=sys.stderr)
            finally:
                fn = None
                free_memory(s.device)
            rows.append(Row(f"(a) prefill N={fmt_tokens(n)}", head, metrics))
            if "ms" in metrics:
                print(f"  (a) {head} N={fmt_tokens(n)}: {metrics['ms']:.1f} ms", file=sys.stderr)

        def fits(n, head=head):
            fn = setup_prefill(model, n, head, s.head_chunk)
            return attempt(fn, s, prefill_peak(cfg, n, head, elem, s.head_chunk))

        largest = search_largest(fits, s.search_start, s.search_limit, s.resolution)
        pred = largest_under(lambda n: prefill_peak(cfg, n, head, elem, s.head_chunk), capacity, s.search_limit)
        rows.append(Row("(a) largest prompt", head, {"max_tokens": largest, "pred_max_tokens": pred}))
        print(f"  (a) {head}: largest prompt {largest} tokens (model: {pred})", file=sys.stderr)


def part_b(model, s: Settings, rows: list[Row]) -> None:
    cfg, elem = model.config, torch.finfo(s.dtype).bits // 8
    capacity = s.budget_bytes if s.cpu else torch.cuda.mem_get_info()[0]

    def peak(n):
        return generate_peak(cfg, n, elem, s.prefill_chunk)

    results = {}  # n -> (prefill s, decode tokens/s, peak GiB or None) of the tries that fit

    def fits(n):
        run = setup_generate(model, n, s.prefill_chunk)

        def measured():
            if not s.cpu:
                torch.cuda.reset_peak_memory_stats()
            base = 0 if s.cpu else torch.cuda.memory_allocated()
            prefill_s, tok_s = run()
            gib = None if s.cpu else (torch.cuda.max_memory_allocated() - base) / GIB
            results[n] = (prefill_s, tok_s, gib)
        return attempt(measured, s, peak(n))

    pred = largest_under(peak, capacity, s.search_limit)
    # every try near the limit prefills the whole prompt (minutes for the full model on a
    # GPU): start from half the prediction, so the doubling reaches the limit in two tries
    res = s.resolution_b
    case = f"(b) chunked prefill ({fmt_tokens(s.prefill_chunk)}) + {DECODE_TOKENS} decoded"
    if s.b_tokens:  # one try at that length (a 48-layer try near 200K tokens takes about a minute)
        largest = s.b_tokens if fits(s.b_tokens) else 0
        case += f", one try at {fmt_tokens(s.b_tokens)}"
    else:
        start = s.search_start if s.cpu else max(res, pred // 2 // res * res)
        largest = search_largest(fits, start, s.search_limit, res)
    metrics = {"tokens": largest, "max_tokens": largest, "pred_max_tokens": pred,
               "pred_gib": (weight_bytes(model) + peak(largest)) / GIB}
    if largest in results:  # the longest prompt's own run: prefill time, decode speed, peak memory
        prefill_s, tok_s, gib = results[largest]
        metrics.update(ms=prefill_s * 1e3, decode_tok_s=tok_s)
        if gib is not None:
            metrics["gib"] = gib + weight_bytes(model) / GIB
    rows.append(Row(case, f"{cfg.text.num_layers} layers (run)", metrics))
    print(f"  (b) largest prompt {largest} tokens (model: {pred}; KV {kv_bytes_per_token(cfg, elem)} "
          f"bytes/token, weights {weight_bytes(model) / 1e9:.2f} GB)", file=sys.stderr)
    if not s.cpu:  # the same model for the full 14B on an 80 GB H100
        full = preset("long-vita-14b")
        with torch.device("meta"):
            full_weights = sum(p.numel() for p in LongVITA(full).parameters()) * 2  # bf16
        full_pred = largest_under(lambda n: generate_peak(full, n, 2, s.prefill_chunk), 80e9 - full_weights, 1 << 21)
        rows.append(Row(case, "48 layers, 80 GB (model)", {"pred_max_tokens": full_pred}))


def part_c(model, s: Settings, rows: list[Row]) -> None:
    for n in s.decode_lengths:
        metrics = {"tokens": n}
        try:
            fn = setup_generate(model, n, s.prefill_chunk, DECODE_TOKENS_C)
            prefill_s, tok_s = fn()
            metrics.update(ms=prefill_s * 1e3, decode_tok_s=tok_s)
        except Exception as e:
            if not is_oom(e):
                raise
            print(f"  (c) N={fmt_tokens(n)}: out of memory", file=sys.stderr)
        finally:
            fn = None
            free_memory(s.device)
        rows.append(Row(f"(c) decode after N={fmt_tokens(n)}", "KV-cached, chunked prefill", metrics))
        if "decode_tok_s" in metrics:
            print(f"  (c) N={fmt_tokens(n)}: {metrics['decode_tok_s']:.1f} tokens/s", file=sys.stderr)


def ring_case(cfg, n: int, world: int) -> RingCase:
    t = cfg.text
    return RingCase(n, world, hq=t.num_heads, hkv=t.num_kv_heads, d=t.head_dim)


def cp_predicted_ms(dense_ms: float, layers: int, case: RingCase, block_ms: dict, comm_ms: float) -> float:
    """Context-parallel prefill over ``case.world`` ranks: the dense part split evenly, plus
    every layer's ring attention as ``parallel.costs.predict_ring`` schedules it."""
    return dense_ms / case.world + layers * predict_ring(case, block_ms, comm_ms)["ring_ms"]


def part_d(model, s: Settings, rows: list[Row], link_gbps: float, worlds=(1, 2, 4, 8)) -> dict:
    """Predicted CP prefill time for each P; returns {(n, P): predicted ms}.

    Single-GPU time T1(n) = dense(n) + layers * attention(n): the dense part (everything
    but attention) is linear in n, measured once at a length that fits (the prefill minus
    its layers' measured attention); attention(n) is timed at every n (it fits where the
    whole prefill may not). With P ranks: dense(n) / P + layers * the ring's predicted
    time (``parallel.costs.predict_ring`` from this GPU's block timings and the link bandwidth)."""
    cfg, layers = model.config, model.config.text.num_layers
    n0 = min(s.cp_lengths[0], s.decode_lengths[0])
    try:
        single0 = time_ms(setup_prefill(model, n0, "last-token head", s.head_chunk), s, n0)
        attn0 = time_ms(setup_attention(cfg, n0, s.device, s.dtype), s, n0)  # the prefill's own dtype
    finally:
        free_memory(s.device)
    dense_per_token = max(single0 - layers * attn0, 0.0) / n0
    predicted = {}
    for n in s.cp_lengths:
        attn1 = None
        try:  # in bf16, as bench_ring's blocks
            attn1 = time_ms(setup_attention(cfg, n, s.device, torch.bfloat16), s, n)
        except Exception as e:
            if not is_oom(e):
                raise
        free_memory(s.device)
        if attn1 is None:
            print(f"  (d) N={fmt_tokens(n)}: one layer's attention does not fit one device; skipped", file=sys.stderr)
            continue
        dense = dense_per_token * n
        single = dense + layers * attn1
        for p in worlds:
            if p == 1:
                pred = single
            else:
                case = ring_case(cfg, n, p)
                block = {}
                for kind in KINDS:
                    # warm-up run included (tokens=0): a ring block is one attention call,
                    # affordable at any length, and its kernel variants are compiled by no
                    # earlier part. Timed once without it, the first P (2) carried a Triton
                    # compile: an H100 run predicted P=2 slower than P=1 (RESULTS.md).
                    block[kind] = time_ms(setup_block(case, kind, False, device=s.device), s, 0)
                    free_memory(s.device)
                comm = case.kv_bytes_fwd() / (link_gbps * 1e9) * 1e3
                pred = cp_predicted_ms(dense, layers, case, block, comm)
            predicted[(n, p)] = pred
            rows.append(Row(f"(d) CP prefill N={fmt_tokens(n)}", f"P={p} (ring model)",
                            {"tokens": n, "pred_ms": pred, "speedup": single / pred, "efficiency": single / pred / p}))
            print(f"  (d) N={fmt_tokens(n)} P={p}: predicted {pred:.1f} ms ({single / pred:.2f}x)", file=sys.stderr)
    return predicted


def title(s: Settings) -> str:
    if s.cpu:
        return (f"Prefill/decode, CPU smoke run (tiny preset, vocabulary {s.vocab_size}, {s.layers} layers, fp32; "
                f"simulated {s.budget_bytes / 2**20:g} MiB memory budget)")
    return (f"Prefill/decode, Long-VITA-14B shapes with {s.layers} of 48 decoder layers, random weights, bf16, "
            f"LM-head chunk {s.head_chunk}, prefill chunk {s.prefill_chunk}")


def run_single(args) -> int:
    s = settings_from_args(args)
    if s.cpu and not args.cpu_smoke:
        print("bench_prefill: no CUDA device; running the CPU smoke configuration (tiny preset).", file=sys.stderr)
    if s.cpu:
        # tiny ops: one thread is as fast, and on a shared CI machine intra-op threads
        # spinning against other jobs made the run 7x slower
        torch.set_num_threads(1)
    model = build_model(s)
    print(f"  model: {s.preset}, {s.layers} layers, weights {weight_bytes(model) / 1e9:.2f} GB, {s.dtype}",
          file=sys.stderr)
    warm_up(model, s)
    rows: list[Row] = []
    parts = {"a": part_a, "b": part_b, "c": part_c}
    name = NAME if sorted(args.parts) == list("abcd") else f"{NAME}_{args.parts}"
    for key in args.parts:
        if key == "d":
            part_d(model, s, rows, args.link_gbps)
        else:
            parts[key](model, s, rows)
        write_json(name, title(s), rows, METRICS, args.out, quiet=True)  # a run cut off keeps the parts done
    print_table(title(s), rows, METRICS)
    write_json(name, title(s), rows, METRICS, args.out)
    return 0


def run_distributed(args) -> int:
    """Under torchrun: the context-parallel prefill measured against (d)'s prediction."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    s = settings_from_args(args)
    model = build_model(s)
    warm_up(model, s)
    for _ in generate(model, prompt(model, 1024), plan=ContextParallelPlan(), max_new_tokens=2):
        pass  # the ring's kernels compiled before anything is timed
    rows: list[Row] = []
    for n in s.cp_lengths:
        ids = prompt(model, n)

        def prefill():  # max_new_tokens=1: the prefill and the first token only
            for _ in generate(model, ids, plan=ContextParallelPlan(), max_new_tokens=1):
                pass

        dist.barrier()
        ms = torch.tensor(time_ms(prefill, s, n), device=s.device)
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)
        rows.append(Row(f"(d) CP prefill N={fmt_tokens(n)}", f"P={world} (measured)",
                        {"tokens": n, "measured_ms": ms.item()}))
        free_memory(s.device)
    if rank == 0:  # this device's prediction for the same P (the other ranks are done)
        part_d(model, s, rows, args.link_gbps, worlds=(1, world))
        print_table(f"{title(s)} — {world} ranks", rows, METRICS)
        write_json(f"{NAME}_p{world}", title(s), rows, METRICS, args.out)
    dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 layers, fewer lengths, a coarser search")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny preset on the CPU (what CI runs)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers kept (default 48; CPU: 2)")
    parser.add_argument("--parts", default="abcd", help="which parts to run, e.g. 'ac' (default abcd)")
    parser.add_argument("--head-chunk", type=int, default=8192, help="(a) rows per chunk of the chunked head")
    parser.add_argument("--prefill-chunk", type=int, default=8192, help="(b, c) tokens per prefill chunk")
    parser.add_argument("--b-tokens", type=int, default=None,
                        help="(b): one try at this prompt length instead of the search (max_tokens is it, or 0)")
    parser.add_argument("--search-start", type=int, default=16384, help="first prompt length of a search")
    parser.add_argument("--search-limit", type=int, default=1 << 21, help="longest prompt a search tries")
    parser.add_argument("--resolution", type=int, default=4096, help="a search stops when within this many tokens")
    parser.add_argument("--cp-lengths", type=lambda v: [int(x) for x in v.split(",")], default=None,
                        help="(d) prompt lengths, comma-separated (default 131072,262144,1048576)")
    parser.add_argument("--link-gbps", type=float, default=450.0, help="(d) ring link bandwidth per direction, GB/s")
    parser.add_argument("--cpu-budget-mib", type=float, default=2.0, help="CPU: the simulated memory budget")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/prefill.json)")
    args = parser.parse_args(argv)
    if set(args.parts) - set("abcd"):
        parser.error(f"--parts takes letters of 'abcd', got {args.parts!r}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return run_distributed(args)
    return run_single(args)


# --------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_model():
    s = settings_from_args(argparse.Namespace(
        cpu_smoke=False, quick=True, layers=4, cp_lengths=None, search_start=16384, search_limit=1 << 21,
        resolution=4096, head_chunk=8192, prefill_chunk=8192, cpu_budget_mib=2.0))
    return build_model(s)


@gpu_only
@pytest.mark.parametrize("head", HEADS)
def test_prefill(benchmark, gpu_model, head):
    n = 32768
    fn = setup_prefill(gpu_model, n, head, 8192)
    median_s = pytest_benchmark_median(benchmark, fn, f"prefill N=32K {head}", rounds=3, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = n / median_s


@gpu_only
def test_decode(benchmark, gpu_model):
    run = setup_generate(gpu_model, 32768, 8192)
    results = []
    benchmark.pedantic(lambda: results.append(run()), rounds=2, warmup_rounds=1)
    benchmark.extra_info["decode_tok_s"] = results[-1][1]


if __name__ == "__main__":
    sys.exit(main())
