"""One training step of a transformers Qwen2 model: unpatched against ``apply_longvita``.

    python benchmarks/bench_transformers.py [--quick] [--layers N] [--out FILE]   # GPU: ms, tokens/s, peak GiB
    python benchmarks/bench_transformers.py --cpu [--tokens T] [--rounds R]       # CPU rows: s, peak RSS (minutes)
    pytest benchmarks/bench_transformers.py --benchmark-only                      # pytest-benchmark (GPU)

A step is forward + backward of ``model(**batch).loss`` (no optimizer) on one packed batch
from ``DataCollatorWithFlattening`` (documents of 1/8, 1/4, 1/8 and 1/2 of the tokens,
``position_ids`` restarting, labels = the ids), random weights, ``use_cache=False`` (with a
cache, transformers' SDPA would attend across the documents). Rows:

- ``sdpa``: transformers' SDPA attention (documents from the packed position_ids) and its
  own loss: the (T, V) logits are made and cast to fp32;
- ``flash_attention_2``: the same with flash-attn, when importable (GPU);
- ``longvita attention``: ``apply_longvita(model, fused_loss=False)``: longvita's varlen
  attention, transformers' loss;
- ``longvita``: ``apply_longvita(model)``: the attention and the fused linear cross-entropy
  (no logits).

GPU: Qwen2.5-7B layer shapes (H=3584, 28 query / 4 K/V heads of 128, I=18944, V=152064),
``--layers`` of them (default 2), bf16 weights; ``ms`` is the median step (CUDA events),
``gib`` the peak memory allocated during a step above the weights. CPU (``--cpu``): H=256,
4 / 2 heads, I=512, 2 layers, V=152064 (the vocabulary is what makes the logits large), fp32;
every row runs in a fresh process per round, rounds interleaved (row order rotates), and
``s`` is the median over rounds of each process's median step, ``rss_gib`` the peak resident
memory during its steps above the memory before them (Linux ``VmHWM`` after resetting it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Row, gpu_only, peak_memory_gib, pytest_benchmark_median, print_table, time_cuda, write_json  # noqa: E402

NAME = "transformers"
V = 152064
GPU_SHAPES = dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, head_dim=128, intermediate_size=18944)
CPU_SHAPES = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512)
ROWS = ("sdpa", "flash_attention_2", "longvita attention", "longvita")


def _model(row: str, shapes: dict, layers: int, dtype, device):
    import transformers

    from longvita.integrations.transformers import apply_longvita

    config = transformers.Qwen2Config(**shapes, num_hidden_layers=layers, vocab_size=V, use_cache=False,
                                      max_position_embeddings=1 << 20, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs (a 1B-parameter init on the host takes long)
        model = transformers.Qwen2ForCausalLM(config)
    model = model.to(dtype=dtype).train()
    if row in ("sdpa", "flash_attention_2"):
        model.set_attn_implementation(row)
    else:
        apply_longvita(model, fused_loss=row == "longvita")
    return model


def _batch(tokens: int, device):
    import transformers

    g = torch.Generator().manual_seed(1)
    lengths = [tokens // 8, tokens // 4, tokens // 8, tokens - tokens // 2]
    feats = [{"input_ids": torch.randint(0, V, (n,), generator=g).tolist()} for n in lengths]
    batch = transformers.DataCollatorWithFlattening()(feats)
    return {k: v.to(device) for k, v in batch.items()}


def setup(row: str, shapes: dict, layers: int, tokens: int, dtype, device):
    """fn() running one step of ``row``, or None when it cannot run here."""
    if row == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return None
        if device == "cpu":
            return None
    model = _model(row, shapes, layers, dtype, device)
    batch = _batch(tokens, device)

    def step():
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    return step


# --------------------------------------------------------------------------------------
# CPU: one process per row and round
# --------------------------------------------------------------------------------------


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _child(row: str, tokens: int, steps: int) -> dict:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    step = setup(row, CPU_SHAPES, 2, tokens, torch.float32, "cpu")
    step()  # warm-up (first-call costs, the optimizer-free gradients' allocation)
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM, the peak resident set, to the current one
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"s": statistics.median(times), "rss_gib": (_status("VmHWM") - before) / 2**30}


def run_cpu(tokens: int, rounds: int, steps: int, out: str | None) -> list[Row]:
    rows = [r for r in ROWS if r != "flash_attention_2"]
    results: dict[str, list[dict]] = {r: [] for r in rows}
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the CPU path users run
    for k in range(rounds):
        for row in rows[k % len(rows):] + rows[: k % len(rows)]:  # rotate the order: interleaved rounds
            r = subprocess.run([sys.executable, __file__, "--child", row, "--tokens", str(tokens), "--steps", str(steps)],
                               capture_output=True, text=True, env=env, check=True)
            results[row].append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(f"  round {k} {row}: {results[row][-1]}", file=sys.stderr)
    base = statistics.median(m["s"] for m in results["sdpa"])
    table = []
    for row in rows:
        s = statistics.median(m["s"] for m in results[row])
        rss = statistics.median(m["rss_gib"] for m in results[row])
        table.append(Row(f"cpu T={tokens}", row, {"s": s, "x_sdpa": s / base, "rss_gib": rss}))
    title = f"transformers Qwen2 step on CPU (H=256, 2 layers, V={V}, fp32, T={tokens})"
    print_table(title, table, ["s", "x_sdpa", "rss_gib"])
    write_json(NAME + "_cpu", title, table, ["s", "x_sdpa", "rss_gib"], out)
    return table


# --------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------


def run_gpu(layers: int, quick: bool, out: str | None) -> list[Row]:
    title = f"transformers Qwen2.5-7B shapes, {layers} layers, V={V}, bf16: one training step"
    metrics = ["ms", "tok_s", "gib", "x_sdpa"]
    table = []
    for tokens in ([8192] if quick else [8192, 32768]):
        base = None
        for row in ROWS:
            try:
                step = setup(row, GPU_SHAPES, layers, tokens, torch.bfloat16, "cuda")
                if step is None:
                    continue
                ms = time_cuda(step, warmup=1 if quick else 3, iters=3 if quick else 10)
                gib = peak_memory_gib(step)
            except torch.OutOfMemoryError:
                print(f"  {row} T={tokens}: out of memory", file=sys.stderr)
                continue
            finally:
                step = None
                torch.cuda.empty_cache()
            base = ms if row == "sdpa" else base
            table.append(Row(f"T={tokens}", row, {"ms": ms, "tok_s": tokens / ms * 1e3, "gib": gib,
                                                   "x_sdpa": ms / base if base else None}))
            write_json(NAME, title, table, metrics, out, quiet=True)
    print_table(title, table, metrics)
    write_json(NAME, title, table, metrics, out)
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU rows instead of the GPU ones")
    parser.add_argument("--quick", action="store_true", help="GPU: one length, fewer iterations")
    parser.add_argument("--layers", type=int, default=2, help="GPU: decoder layers of the 7B shapes")
    parser.add_argument("--tokens", type=int, default=2048, help="CPU: tokens of the packed batch")
    parser.add_argument("--rounds", type=int, default=3, help="CPU: interleaved rounds (one process per row each)")
    parser.add_argument("--steps", type=int, default=3, help="CPU: timed steps per process")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/transformers[_cpu].json)")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.tokens, args.steps)))
        return 0
    if args.cpu:
        run_cpu(args.tokens, args.rounds, args.steps, args.out)
    elif not torch.cuda.is_available():
        print("bench_transformers: no CUDA device; the GPU rows need one (--cpu runs the CPU rows). Nothing to do.",
              file=sys.stderr)
    else:
        run_gpu(args.layers, args.quick, args.out)
    return 0


@gpu_only
@pytest.mark.parametrize("row", ROWS)
def test_transformers_step(benchmark, row):
    step = setup(row, GPU_SHAPES, 2, 8192, torch.bfloat16, "cuda")
    if step is None:
        pytest.skip(f"{row} is not available here")
    pytest_benchmark_median(benchmark, step, f"{row} T=8192", rounds=5, warmup_rounds=2)


if __name__ == "__main__":
    sys.exit(main())
