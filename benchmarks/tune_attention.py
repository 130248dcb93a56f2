"""Sweep the varlen attention kernels' variants x launch configs on this GPU; write the winners
into a launch table.

    python benchmarks/tune_attention.py [--shapes qwen,vit] [--variants default,tma,...]
        [--quick] [--out ROWS.jsonl] [--write-table TABLE.json] [--budget-s SECONDS]

Shapes (bf16), the two the model runs: ``qwen``: Qwen2.5-14B's heads (40 q / 8 kv, D 128),
causal, 32K tokens packed from documents of 512-8192 tokens (bench_attention's packed case);
``vit``: InternViT-300M's (16 / 16, D 64), bidirectional, 8 tiles of 1025 tokens.

For each shape, each forward variant is timed with its launch-table configs and (unless
``--quick``, which also sweeps fewer variants) with the candidates of ``CANDIDATES`` for each
of its kernels in turn (dK/dV and dQ separately, or the fused kernel). Every candidate's output is compared with the
default variant's (a candidate that computes something else is reported, never chosen).
The default is timed first and last: the larger of that spread and 2 % is the noise, and
a variant becomes a shape's choice only when it beats the default by more than the noise
(``docs``: "a variant becomes the default for a shape only when the chip says it is
faster"). ``--write-table`` writes the current table (``kernels/attention/launch_table.json``)
updated with the choices and each (variant, kernel)'s fastest config, marked measured; copy
it over the package's file to adopt it. Rows are written after every candidate (``--out``,
JSON lines), so a run cut off keeps what it measured; ``--budget-s`` stops starting new
candidates after that many seconds. TFLOP/s use flash-attn's counting; medians of
``triton.testing.do_bench``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_attention import _random_docs  # noqa: E402

from longvita.kernels.attention import launch_table as lt  # noqa: E402

SHAPES = {
    # name: (documents, hq, hkv, d, causal)
    "qwen": (_random_docs(32768, 512, 8192, seed=0), 40, 8, 128, True),
    "vit": ((1025,) * 8, 16, 16, 64, False),
}
# no 'ws': refused on GPUs since the H100 of 2026-12-05 measured it non-finite (triton.py)
FWD_VARIANTS = ["default", "tma", "sorted", "persistent", "tma+sorted", "tma+persistent", "budget"]
BWD_VARIANTS = ["default", "tma", "sorted", "fused_bwd", "tma+fused_bwd", "tma+sorted+fused_bwd", "budget",
                "tma+budget"]
# --quick (the device script): one row per variant at its table configs, about 3 s each with
# its compile; 5 + 6 variants and the default twice per pass, both shapes: about 28 rows
QUICK_FWD = ["default", "tma", "sorted", "tma+sorted", "budget"]
QUICK_BWD = ["default", "tma", "sorted", "fused_bwd", "tma+fused_bwd", "tma+budget"]

# Extra (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head dim, beside each
# variant's table config; shared-memory overflows and compile failures are reported rows.
CANDIDATES = {
    ("fwd", 128): [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4)],
    ("fwd", 64): [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
    ("ws", 128): [(128, 128, 4, 2), (128, 64, 4, 3), (128, 64, 4, 2)],
    ("ws", 64): [(128, 64, 4, 3), (128, 64, 4, 2), (128, 128, 4, 2)],
    ("dkdv", 128): [(64, 128, 8, 1), (32, 128, 8, 1), (32, 128, 8, 2), (64, 64, 4, 2)],
    ("dkdv", 64): [(32, 64, 4, 3), (32, 64, 4, 2), (64, 64, 4, 3), (32, 128, 4, 2)],
    ("dq", 128): [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2)],
    ("dq", 64): [(128, 64, 8, 3), (64, 64, 4, 2), (128, 32, 4, 2)],
    ("bwd_fused", 128): [(16, 128, 8, 2), (32, 128, 8, 2), (64, 128, 8, 1), (32, 128, 8, 1)],
    ("bwd_fused", 64): [(32, 128, 8, 2), (32, 64, 4, 3), (16, 64, 4, 2), (64, 64, 4, 2)],
}
NOISE_FLOOR = 0.02


def flops(lens, hq, d, causal, backward):
    f = sum(4 * n * n * hq * d for n in lens) * (0.5 if causal else 1.0)
    return f * 2.5 if backward else f


DEVICE, DTYPE = "cuda", torch.bfloat16  # tests/test_gpu_session.py runs the sweep in the interpreter


def make_inputs(lens, hq, hkv, d):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    total = sum(lens)
    q = torch.randn(total, hq, d, device=DEVICE, dtype=DTYPE, generator=gen)
    k = torch.randn(total, hkv, d, device=DEVICE, dtype=DTYPE, generator=gen)
    v = torch.randn(total, hkv, d, device=DEVICE, dtype=DTYPE, generator=gen)
    dout = torch.randn_like(q)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    return q, k, v, dout, cu, max(lens)


def _cfg(t):
    return dict(BLOCK_M=t[0], BLOCK_N=t[1], num_warps=t[2], num_stages=t[3])


def _name(cfg) -> str:
    return f"M{cfg['BLOCK_M']} N{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']}"


def _with_config(base: dict, variant: str, kernel: str, block_d: int, cfg: dict | None) -> dict:
    """The table with ``cfg`` as the most specific config of (variant, kernel, block_d)."""
    table = copy.deepcopy(base)
    if cfg is not None:
        table["configs"].setdefault(lt.parse_variant(variant).name, {}).setdefault(kernel, {})[str(block_d)] = dict(cfg)
    return table


def _kernels(passname: str, variant: str) -> list[str]:
    """The kernels (launch-table names) one pass of a variant launches."""
    var = lt.parse_variant(variant)
    if passname == "fwd":
        return ["fwd"]
    return ["bwd_fused"] if var.fused_bwd else ["dkdv", "dq"]


class Sweep:
    def __init__(self, args):
        self.args = args
        self.rows: list[dict] = []
        self.t0 = time.monotonic()
        self.base = lt.load_table()

    def out_of_time(self) -> bool:
        return self.args.budget_s is not None and time.monotonic() - self.t0 > self.args.budget_s

    def record(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        if self.args.out:
            tmp = self.args.out + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.rows)
            os.replace(tmp, self.args.out)

    def time_one(self, shape, passname, variant, fn, want, kernel=None, cfg=None) -> dict:
        """One candidate: the variant with its table configs, or with ``cfg`` for ``kernel``.
        The row names every kernel's config ('configs'), so the table can be written from it."""
        import triton.testing

        from longvita.kernels.attention import triton as vat

        lens, hq, _, d, causal = SHAPES[shape]
        block_d = max(16, 1 << (d - 1).bit_length())
        table = _with_config(self.base, variant, kernel, block_d, cfg)
        lt.set_table(table)
        var = lt.parse_variant(variant)
        configs = {k: vat._fixed_config(k, block_d, True, False, var) for k in _kernels(passname, variant)}
        row = {"shape": shape, "pass": passname, "variant": variant, "kernel": kernel or "table",
               "config": " | ".join(f"{k} {_name(c)}" for k, c in configs.items()), "configs": configs}
        try:
            got = [t.float() for t in fn()]
            err = max(((a - b).norm() / b.norm().clamp(min=1e-30)).item() for a, b in zip(got, want))
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            row.update(ms=ms, tflops=flops(lens, hq, d, causal, passname == "bwd") / ms / 1e9, rel_diff=err)
        except Exception as exc:  # noqa: BLE001 - out of shared memory / registers, a failed compile: reported
            row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
        finally:
            lt.set_table(self.base)
        self.record(row)
        return row

    def run_shape(self, shape: str) -> None:
        from longvita.kernels.attention import triton as vat

        lens, hq, hkv, d, causal = SHAPES[shape]
        block_d = max(16, 1 << (d - 1).bit_length())
        q, k, v, dout, cu, mx = make_inputs(lens, hq, hkv, d)
        scale, window = d ** -0.5, ((-1, 0) if causal else (-1, -1))

        def fwd(variant):
            return lambda: vat.varlen_attention_fwd_triton(q, k, v, cu, cu, mx, mx, scale, causal, window, variant=variant)

        out, lse = fwd("default")()
        want_fwd = [out.float(), lse]

        def bwd(variant):
            return lambda: vat.varlen_attention_bwd_triton(dout, q, k, v, out, lse, cu, cu, mx, mx, scale, causal,
                                                           window, variant=variant)

        want_bwd = [g.float() for g in bwd("default")()]
        for passname, variants, make, want in (("fwd", self.args.fwd_variants, fwd, want_fwd),
                                               ("bwd", self.args.bwd_variants, bwd, want_bwd)):
            # the default first and last: its spread is the run's noise
            for variant in ["default"] + [v_ for v_ in variants if v_ != "default"] + ["default"]:
                if self.out_of_time():
                    return
                self.time_one(shape, passname, variant, make(variant), want)
                if self.args.quick or variant == "default":
                    continue
                ws = lt.parse_variant(variant).warp_specialize and passname == "fwd"
                for kernel in _kernels(passname, variant):
                    for cand in CANDIDATES.get(("ws" if ws else kernel, block_d), []):
                        if self.out_of_time():
                            return
                        self.time_one(shape, passname, variant, make(variant), want, kernel, _cfg(cand))

    def choose(self) -> dict:
        """Per (shape, pass): the default's spread, the fastest variant, and whether it wins."""
        out = {}
        for shape in self.args.shapes:
            for passname in ("fwd", "bwd"):
                ok = [r for r in self.rows if r["shape"] == shape and r["pass"] == passname and "ms" in r
                      and r["rel_diff"] < 1e-2]
                base = [r["ms"] for r in ok if r["variant"] == "default" and r["kernel"] == "table"]
                if not ok or not base:
                    continue
                noise = max(NOISE_FLOOR, (max(base) - min(base)) / min(base))
                best_by_variant = {}
                for variant in {r["variant"] for r in ok}:
                    best_by_variant[variant] = min((r for r in ok if r["variant"] == variant), key=lambda r: r["ms"])
                winner = min(best_by_variant.values(), key=lambda r: r["ms"])
                wins = winner["variant"] != "default" and winner["ms"] < min(base) * (1 - noise)
                out[shape, passname] = dict(default_ms=min(base), noise=noise, best=winner, adopt=wins,
                                            best_by_variant=best_by_variant)
        return out

    def write_table(self, path: str, choices: dict) -> None:
        """The current table with each measured variant's fastest configs and the choices."""
        table = copy.deepcopy(self.base)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        env = f"{device} {datetime.date.today().isoformat()}"
        table["measured"] = {"device": device, "date": datetime.date.today().isoformat(),
                             "dtype": "bfloat16", "by": "benchmarks/tune_attention.py"}
        for (shape, passname), c in choices.items():
            lens, hq, hkv, d, causal = SHAPES[shape]
            block_d = max(16, 1 << (d - 1).bit_length())
            for variant, r in c["best_by_variant"].items():
                name = lt.parse_variant(variant).name
                for kernel, cfg in r["configs"].items():
                    table["configs"].setdefault(name, {}).setdefault(kernel, {})[str(block_d)] = dict(
                        cfg, measured=f"{env}: {r['ms']:.3f} ms ({passname}), {shape}")
            entry = next((e for e in table["choice"] if e["block_d"] == block_d and bool(e["causal"]) == causal), None)
            if entry is None:
                entry = {"block_d": block_d, "causal": causal, "fwd": "default", "bwd": "default"}
                table["choice"].append(entry)
            entry[passname] = lt.parse_variant(c["best"]["variant"]).name if c["adopt"] else "default"
            entry.setdefault("measured", {})[passname] = (
                f"{env}, {shape}: default {c['default_ms']:.3f} ms, {c['best']['variant']} {c['best']['ms']:.3f} ms, "
                f"noise {100 * c['noise']:.1f} %: {'adopted' if c['adopt'] else 'kept default'}")
            entry.pop("why", None)
        lt._check_table(table, path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(table, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
        print(f"wrote {path} (copy it to longvita/kernels/attention/launch_table.json to adopt it)", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="qwen,vit")
    parser.add_argument("--fwd-variants", default=None, help=f"default {','.join(FWD_VARIANTS)} (--quick: fewer)")
    parser.add_argument("--bwd-variants", default=None, help=f"default {','.join(BWD_VARIANTS)} (--quick: fewer)")
    parser.add_argument("--quick", action="store_true", help="each variant with its table config only")
    parser.add_argument("--out", default=None, help="JSON lines of every candidate, rewritten after each")
    parser.add_argument("--write-table", default=None, help="write the updated launch table here")
    parser.add_argument("--budget-s", type=float, default=None, help="start no candidate after this many seconds")
    args = parser.parse_args(argv)
    args.shapes = args.shapes.split(",")
    args.fwd_variants = (args.fwd_variants.split(",") if args.fwd_variants is not None
                         else QUICK_FWD if args.quick else FWD_VARIANTS)
    args.bwd_variants = (args.bwd_variants.split(",") if args.bwd_variants is not None
                         else QUICK_BWD if args.quick else BWD_VARIANTS)
    args.fwd_variants = [v for v in args.fwd_variants if v]
    args.bwd_variants = [v for v in args.bwd_variants if v]
    for v in args.fwd_variants + args.bwd_variants:
        lt.parse_variant(v, "--fwd-variants/--bwd-variants")
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; known: {sorted(SHAPES)}")
    if not torch.cuda.is_available():
        print("tune_attention: needs a CUDA device; nothing to do", file=sys.stderr)
        return 0
    os.environ.pop(lt.ENV, None)  # the sweep names every variant itself
    sweep = Sweep(args)
    for shape in args.shapes:
        sweep.run_shape(shape)
    choices = sweep.choose()
    print("\nper shape and pass: the default (first and last run), the fastest variant, the decision")
    for (shape, passname), c in choices.items():
        b = c["best"]
        print(f"  {shape:5s} {passname:4s} default {c['default_ms']:.3f} ms | best {b['variant']:22s} {b['config']:48s} "
              f"{b['ms']:.3f} ms {b['tflops']:.0f} TFLOP/s | noise {100 * c['noise']:.1f} % | "
              f"{'ADOPT' if c['adopt'] else 'keep default'}")
    if args.write_table:
        sweep.write_table(args.write_table, choices)
    return 0


if __name__ == "__main__":
    sys.exit(main())
