"""The CPU path against torch's own fused kernel, and the CPU end to end (issue 30).

    python benchmarks/bench_cpu.py [--lengths 4096,16384,65536] [--out FILE]    # (a) attention
    python benchmarks/bench_cpu.py --lengths 4096 --cases decode,chunk --threads 1  # some of (a)
    python benchmarks/bench_cpu.py --e2e [--checkout PATH ...] [--out FILE]     # (a) and (b)
    python benchmarks/bench_cpu.py --e2e --parts b --checkout /tmp/before      # (b) only, before/after
    python benchmarks/bench_cpu.py --cpu-smoke [--e2e] --out X.json             # what CI runs: seconds

(a) Attention, longvita's ``varlen_attention`` on CPU tensors beside torch's
    ``F.scaled_dot_product_attention`` (SDPA) for the same shapes, in one process, timed
    interleaved (the order alternates per repeat), warm-up excluded: ``ms`` is each one's
    median, ``ratio`` the median over repeats of longvita's time / SDPA's time in the same
    repeat (paired, so load that drifts during a run cancels). The demo model's attention:
    8 query / 4 K/V heads, head_dim 32, fp32, at each of ``--lengths`` tokens:
    - ``fwd``: one causal document, no gradient; ``fwd+lse``: the same returning the LSE
      (SDPA computes one inside and does not return it: its ``fwd`` is the baseline);
    - ``fwd+bwd``: forward and backward through the output; ``fwd+bwd (lse)``: the loss
      also through the LSE (ring attention's case; SDPA cannot, its fwd+bwd is the baseline);
    - ``decode``: one query row against the whole cache (SDPA: one row, no mask);
    - ``chunk``: 1,024 queries against the cache that ends with them (chunked prefill,
      bottom-right causal; SDPA: the same with an additive (1024 x L) mask, built untimed);
    - ``packed fwd`` / ``packed fwd+bwd``: seven causal documents of mixed lengths in one
      pack (SDPA: one call per document on views of the same tensors).
    Repeats: at least ``--min-repeats``, then more while a case has run under
    ``--case-seconds``, at most ``--repeats``.

(b) End to end (``--e2e``), each command a fresh process run against every checkout
    (``--checkout PATH``, repeatable, run through ``PYTHONPATH=PATH`` with no bytecode
    written there; this checkout always), interleaved per repeat:
    - ``generate``: the whole ``python -m longvita generate`` process with no arguments (the
      embedded demo model, its picture, 16 tokens): wall seconds;
    - ``prompt``: a ``--prompt-tokens``-token text prompt through the embedded demo model
      (``generate --prompt ... --max-new-tokens 1 --json``): its ``prefill_s``;
    - ``train``: the demo recipe (``train --recipe demo --steps N --json``) on its task mix
      (``write_demo_dataset(..., warmup=0)``, written once for all checkouts and given as
      ``--data``: the recipe's first 8,000 samples are a text-only copy warm-up, not what
      most of its 28 minutes run): mean ``tokens_per_s`` over the steps after the first
      ``--train-skip``.
    A checkout is a source tree of longvita, e.g. ``git archive <commit> | tar -x -C PATH``
    with the built ``longvita/_C*.so`` copied in (without it the pixel shuffle runs its
    torch path, and the comparison is not like for like: the script warns).

CPU times on a shared machine are noisy: compare ratios from one run, never numbers from
two. ``--cpu-smoke`` runs every case at 256 and 512 tokens with two repeats (and with
``--e2e`` a 500-token prompt and 2 training steps on 16 samples), so CI exercises every
path in seconds; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common import Row, fmt_tokens, print_table, with_backward, write_json

NAME = "cpu"
METRICS = ["tokens", "ms", "ratio", "repeats", "s", "prompt_tokens", "prefill_s", "tok_s", "steps"]
HEADS_Q, HEADS_KV, HEAD_DIM = 8, 4, 32  # the demo model's attention (preset "demo")
CHUNK = 1024
PACK_FRACTIONS = (0.3, 0.2, 0.15, 0.1, 0.1, 0.08)  # and the rest: seven documents
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------
# (a) attention
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    what: str  # fwd, fwd+lse, fwd+bwd, fwd+bwd (lse), decode, chunk, packed fwd, packed fwd+bwd
    tokens: int

    @property
    def label(self) -> str:
        return f"(a) {self.what}"


CASES = ("fwd", "fwd+lse", "fwd+bwd", "fwd+bwd (lse)", "decode", "chunk", "packed fwd", "packed fwd+bwd")


def _pack_lengths(n: int) -> list[int]:
    lens = [max(1, int(n * f)) for f in PACK_FRACTIONS]
    return lens + [n - sum(lens)]


def _thd(n: int, heads: int, grad: bool) -> torch.Tensor:
    return torch.randn(n, heads, HEAD_DIM).requires_grad_(grad)


def _bhld(x: torch.Tensor) -> torch.Tensor:
    """(tokens, heads, D) -> SDPA's (1, heads, tokens, D), the same memory: what a model
    that transposes its projections hands SDPA."""
    return x.unsqueeze(0).transpose(1, 2)


@dataclass
class Pair:
    """One case set up: ``ours()`` / ``theirs()`` compute it (longvita / SDPA) and return
    their outputs as lists (longvita: out (tokens, heads, D) and the LSE where asked; SDPA:
    (1, heads, len, D) per document, see ``sdpa_as_thd``); ``grad``: the timed call also
    runs the backward; ``leaves`` hold those gradients."""

    ours: object
    theirs: object
    sdpa: str
    grad: bool
    leaves: tuple = ()


def setup(case: Case) -> Pair:
    """The two implementations of one case, on the same data and shapes."""
    from longvita.kernels import varlen_attention

    n = case.tokens
    if case.what in ("decode", "chunk"):
        rows = 1 if case.what == "decode" else min(CHUNK, n)
        q, k, v = _thd(rows, HEADS_Q, False), _thd(n, HEADS_KV, False), _thd(n, HEADS_KV, False)
        cu_q = torch.tensor([0, rows], dtype=torch.int32)
        cu_k = torch.tensor([0, n], dtype=torch.int32)
        mask = None
        if rows > 1:  # bottom-right causal: row i sees keys <= i + n - rows
            visible = torch.arange(n)[None, :] <= torch.arange(rows)[:, None] + (n - rows)
            mask = torch.zeros(rows, n).masked_fill_(~visible, float("-inf"))
        return Pair(
            ours=lambda: [varlen_attention(q, k, v, cu_q, cu_k, rows, n, causal=True)],
            theirs=lambda: [F.scaled_dot_product_attention(_bhld(q), _bhld(k), _bhld(v), attn_mask=mask,
                                                           enable_gqa=True)],
            sdpa="torch sdpa" if mask is None else "torch sdpa + mask", grad=False,
        )
    grad = "bwd" in case.what
    lens = _pack_lengths(n) if case.what.startswith("packed") else [n]
    cu = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    q, k, v = _thd(n, HEADS_Q, grad), _thd(n, HEADS_KV, grad), _thd(n, HEADS_KV, grad)
    tq, tk, tv = (t.detach().clone().requires_grad_(grad) for t in (q, k, v))
    bounds = cu.tolist()
    lse = case.what in ("fwd+lse", "fwd+bwd (lse)")

    def ours():
        res = varlen_attention(q, k, v, cu, cu, max(lens), max(lens), causal=True, return_lse=lse)
        return list(res) if lse else [res]

    def theirs():  # one call per document
        return [F.scaled_dot_product_attention(_bhld(tq[a:b]), _bhld(tk[a:b]), _bhld(tv[a:b]), is_causal=True,
                                               enable_gqa=True) for a, b in zip(bounds, bounds[1:])]

    sdpa = "torch sdpa (no lse grad)" if case.what == "fwd+bwd (lse)" else "torch sdpa"
    return Pair(ours, theirs, sdpa, grad, (q, k, v, tq, tk, tv))


def sdpa_as_thd(outs: list[torch.Tensor]) -> torch.Tensor:
    """SDPA's per-document (1, heads, len, D) outputs as one (tokens, heads, D) tensor."""
    return torch.cat([o[0].transpose(0, 1) for o in outs])


def time_pair(ours, theirs, min_repeats: int, max_repeats: int, budget_s: float, repeat_ms: float = 50.0):
    """Interleaved timing (the order alternates per repeat) after one warm-up call each:
    (our median ms, their median ms, median of the paired ratios, repeats). A repeat runs
    each callable enough times to last about ``repeat_ms`` (a decode step is ~0.3 ms)."""
    ours()
    t0 = time.perf_counter()
    theirs()
    calls = max(1, int(repeat_ms / max((time.perf_counter() - t0) * 1e3, 1e-3)))
    ms_ours, ms_theirs, ratios = [], [], []
    start = time.perf_counter()
    while len(ratios) < max_repeats and (len(ratios) < min_repeats or time.perf_counter() - start < budget_s):
        pair = {}
        for name in (("ours", "theirs") if len(ratios) % 2 == 0 else ("theirs", "ours")):
            fn = ours if name == "ours" else theirs
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            pair[name] = (time.perf_counter() - t0) * 1e3 / calls
        ms_ours.append(pair["ours"])
        ms_theirs.append(pair["theirs"])
        ratios.append(pair["ours"] / pair["theirs"])
    return statistics.median(ms_ours), statistics.median(ms_theirs), statistics.median(ratios), len(ratios)


def run_attention(args, rows: list[Row], title: str) -> None:
    for n in args.lengths:
        for what in [c for c in CASES if c in args.cases]:
            case = Case(what, n)
            torch.manual_seed(0)
            pair = setup(case)
            mode = "fwd+bwd" if pair.grad else "fwd"
            ms_ours, ms_theirs, ratio, reps = time_pair(
                with_backward(pair.ours, mode, pair.leaves), with_backward(pair.theirs, mode, pair.leaves),
                args.min_repeats, args.repeats, args.case_seconds,
            )
            sdpa = pair.sdpa
            label = f"{case.label} {fmt_tokens(n)}"
            rows.append(Row(label, "longvita", {"tokens": n, "ms": ms_ours, "ratio": ratio, "repeats": reps}))
            rows.append(Row(label, sdpa, {"tokens": n, "ms": ms_theirs, "repeats": reps}))
            print(f"{label:28s} longvita {ms_ours:10.2f} ms   {sdpa:24s} {ms_theirs:10.2f} ms   ratio {ratio:.3f}"
                  f"   ({reps} repeats)", file=sys.stderr, flush=True)
            write_json(NAME, title, rows, METRICS, args.out, quiet=True)
            del pair


# --------------------------------------------------------------------------------------
# (b) end to end, through subprocesses, against other checkouts
# --------------------------------------------------------------------------------------


def _checkout_env(path: str) -> dict:
    """A user's shell (no Triton interpreter) importing longvita from ``path``, writing no
    bytecode there."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run(cmd: list[str], path: str, cwd: str, timeout: float) -> tuple[float, str]:
    start = time.perf_counter()
    r = subprocess.run(cmd, env=_checkout_env(path), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... against {path} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return wall, r.stdout


def _prompt_text(tokens: int) -> str:
    """Plain English text of about ``tokens`` characters (the demo tokenizer is near one
    token per character; the table reports the count the model saw)."""
    words = ("the quick brown fox jumps over the lazy dog while seven wizards quietly judge "
             "a boxing match between two sleepy lions near the old river bank").split()
    out, size, i = [], 0, 0
    while size < tokens:
        w = words[(i * 7 + i // len(words)) % len(words)]
        out.append(w)
        size += len(w) + 1
        i += 1
    return " ".join(out)[:tokens]


def run_e2e(args, rows: list[Row], title: str) -> None:
    checkouts = [("this checkout", ROOT)] + [(p, os.path.abspath(p)) for p in args.checkout]
    for label, path in checkouts:
        if not os.path.isfile(os.path.join(path, "longvita", "__init__.py")):
            raise SystemExit(f"--checkout {path}: no longvita package there")
        if not glob.glob(os.path.join(path, "longvita", "_C*.so")):
            print(f"warning: {label} has no built longvita/_C*.so: its pixel shuffle runs the torch path",
                  file=sys.stderr)
    py = [sys.executable, "-m", "longvita"]
    prompt = _prompt_text(args.prompt_tokens)
    with tempfile.TemporaryDirectory(prefix="bench_cpu_") as tmp:
        from longvita.data.demo import write_demo_dataset

        manifest = str(write_demo_dataset(os.path.join(tmp, "data"), args.train_samples, seed=0, warmup=0))
        results = {label: {"generate": [], "prefill": [], "prompt_tokens": None, "train": []} for label, _ in checkouts}
        for rep in range(args.e2e_repeats):
            for label, path in checkouts:
                got = results[label]
                wall, _ = _run(py + ["generate"], path, tmp, 600)
                got["generate"].append(wall)
                _, out = _run(py + ["generate", "--prompt", prompt, "--max-new-tokens", "1", "--json"], path, tmp, 1800)
                res = json.loads(out.strip().splitlines()[-1])
                got["prefill"].append(res["prefill_s"])
                got["prompt_tokens"] = res["prompt_tokens"]
                run_dir = os.path.join(tmp, f"train-{rep}-{checkouts.index((label, path))}")
                _, out = _run(py + ["train", "--recipe", "demo", "--steps", str(args.train_steps), "--json",
                                    "--data", manifest, "--out", run_dir], path, tmp, 3600)
                steps = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
                timed = [s["tokens_per_s"] for s in steps if s["step"] > args.train_skip]
                got["train"].append(statistics.mean(timed))
                print(f"(b) repeat {rep + 1}: {label}: generate {wall:.2f} s, prefill {res['prefill_s']:.2f} s "
                      f"({res['prompt_tokens']} tokens), train {got['train'][-1]:.0f} tokens/s",
                      file=sys.stderr, flush=True)
        for label, _ in checkouts:
            got = results[label]
            rows.append(Row("(b) generate, whole process", label, {"s": statistics.median(got["generate"]),
                                                                   "repeats": len(got["generate"])}))
            rows.append(Row("(b) text prompt, prefill", label, {"prompt_tokens": got["prompt_tokens"],
                                                                "prefill_s": statistics.median(got["prefill"]),
                                                                "repeats": len(got["prefill"])}))
            rows.append(Row("(b) demo recipe training", label, {"tok_s": statistics.median(got["train"]),
                                                                "steps": args.train_steps,
                                                                "repeats": len(got["train"])}))
        write_json(NAME, title, rows, METRICS, args.out, quiet=True)


# --------------------------------------------------------------------------------------


def title_of(args) -> str:
    return (f"CPU path vs torch SDPA ({HEADS_Q} query / {HEADS_KV} K/V heads, head_dim {HEAD_DIM}, fp32, "
            f"{torch.get_num_threads()} threads)" + (" — CPU smoke run, numbers mean nothing" if args.cpu_smoke else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 16384, 65536],
                        help="(a) tokens per case, comma-separated")
    parser.add_argument("--parts", default="a", help="'a' attention, 'b' end to end (--e2e adds b)")
    parser.add_argument("--cases", type=lambda s: s.split(","), default=list(CASES),
                        help=f"(a) which cases, comma-separated (default all: {','.join(CASES)})")
    parser.add_argument("--e2e", action="store_true", help="also part (b), end to end")
    parser.add_argument("--repeats", type=int, default=7, help="(a) most repeats per case")
    parser.add_argument("--min-repeats", type=int, default=3, help="(a) fewest repeats per case")
    parser.add_argument("--case-seconds", type=float, default=30.0, help="(a) more repeats while a case took less")
    parser.add_argument("--checkout", action="append", default=[], metavar="PATH",
                        help="(b) another longvita source tree to run beside this one (repeatable)")
    parser.add_argument("--e2e-repeats", type=int, default=3, help="(b) repeats of every command")
    parser.add_argument("--prompt-tokens", type=int, default=40000, help="(b) length of the text prompt")
    parser.add_argument("--train-steps", type=int, default=40, help="(b) training steps per run")
    parser.add_argument("--train-skip", type=int, default=5, help="(b) first steps left out of the mean")
    parser.add_argument("--train-samples", type=int, default=600, help="(b) generated training samples")
    parser.add_argument("--threads", type=int, default=None, help="(a) torch threads (default: torch's)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, two repeats: CI")
    parser.add_argument("--quick", action="store_true",
                        help="(a) at 1024 and 4096 tokens, 2-3 repeats (gpu_session.sh's every-benchmark loop)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/cpu.json)")
    args = parser.parse_args(argv)
    parts = set(args.parts) | ({"b"} if args.e2e else set())
    if parts - set("ab"):
        parser.error(f"--parts takes letters of 'ab', got {args.parts!r}")
    if set(args.cases) - set(CASES):
        parser.error(f"--cases takes names from {','.join(CASES)}, got {','.join(args.cases)}")
    if args.quick:
        args.lengths, args.repeats, args.min_repeats, args.case_seconds = [1024, 4096], 3, 2, 1.0
    if args.cpu_smoke:
        args.lengths, args.repeats, args.min_repeats, args.case_seconds = [256, 512], 2, 2, 0.0
        args.e2e_repeats, args.prompt_tokens = 1, 500
        args.train_steps, args.train_skip, args.train_samples = 2, 1, 16
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows: list[Row] = []
    title = title_of(args)
    if "a" in parts:
        run_attention(args, rows, title)
    if "b" in parts:
        run_e2e(args, rows, title)
    print_table(title, rows, [m for m in METRICS if any(m in r.metrics for r in rows)])
    write_json(NAME, title, rows, METRICS, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
