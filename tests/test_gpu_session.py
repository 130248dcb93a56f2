"""The GPU session's own tooling, checked on CPU: the preflight catches what would break a
session on the lent machine (a missing module, a module importing PyAV at import time, a
requirement the machine cannot meet), and make_results turns the benchmarks' JSON into
tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
PREFLIGHT = BENCH / "gpu_preflight.py"


def _preflight(*args, timeout=300):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, str(PREFLIGHT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=tempfile.gettempdir())


@pytest.fixture(scope="module")
def make_results():
    sys.path.insert(0, str(BENCH))
    try:
        import make_results

        yield make_results
    finally:
        sys.path.remove(str(BENCH))


def test_preflight_installed_passes():
    r = _preflight("installed")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "longvita modules import without PyAV" in r.stdout
    assert "benchmark scripts import" in r.stdout


def test_preflight_fails_on_a_missing_module():
    r = _preflight("installed", "--require", "longvita_no_such_module")
    assert r.returncode == 1
    assert "longvita_no_such_module" in r.stderr


def test_preflight_fails_on_a_script_importing_pyav(tmp_path):
    """PyAV is blocked during the check, so this fails even where PyAV is installed."""
    (tmp_path / "common.py").write_text("X = 1\n")
    (tmp_path / "bench_video.py").write_text("from common import X\nimport av\n")
    r = _preflight("installed", "--bench-dir", str(tmp_path))
    assert r.returncode == 1
    assert "bench_video.py" in r.stderr and "av" in r.stderr and "PyAV is optional" in r.stderr
    assert "common.py" not in r.stderr


def test_preflight_strict_fails_on_an_unmet_requirement(tmp_path):
    """The rehearsal's environment is shaped like the lent machine's (numpy >= 2.4, no PyAV):
    a requirement such as the old `numpy<2.4` fails there before any device time is spent."""
    import numpy

    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["numpy<1.0", "no-such-dist-longvita>=1"]\n')
    r = _preflight("deps", "--strict", "--pyproject", str(pyproject))
    assert r.returncode == 1
    assert f"'numpy<1.0' (pyproject.toml) is not met: numpy {numpy.__version__}" in r.stderr
    assert "no-such-dist-longvita is not installed" in r.stderr
    # without --strict (the GPU machine, installing with --no-deps) a version mismatch only warns
    r = _preflight("deps", "--pyproject", str(pyproject))
    assert "warning  requirement 'numpy<1.0'" in r.stdout
    assert "'numpy<1.0'" not in r.stderr


def _payload(rows, metrics=("ms", "tflops")):
    return {
        "name": "synthetic",
        "title": "Synthetic benchmark",
        "environment": {"date": "2026-01-02", "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130",
                        "cuda": "13.0", "triton": "3.6.0"},
        "metrics": list(metrics),
        "rows": rows,
    }


def test_make_results_table(make_results):
    md = make_results.to_markdown(_payload([
        {"case": "128K fwd", "impl": "longvita", "metrics": {"ms": 12.345, "tflops": 512.0}},
        {"case": "128K fwd", "impl": "flash_attn", "metrics": {"ms": 0.5}},  # a missing metric prints '-'
        {"case": "1M fwd", "impl": "longvita", "metrics": {"ms": 800.0, "tflops": 480.5, "gib": 3}},  # undeclared
    ]))
    lines = md.splitlines()
    assert lines[0] == "### Synthetic benchmark"
    assert "2026-01-02 · NVIDIA H100 80GB HBM3 · torch 2.11.0+cu130 (CUDA 13.0) · triton 3.6.0" in md
    assert "| case | impl | ms | tflops | gib |" in lines
    assert "| 128K fwd | longvita | 12.3 | 512 | - |" in lines
    assert "| 128K fwd | flash_attn | 0.5 | - | - |" in lines
    assert "| 1M fwd | longvita | 800 | 480 | 3 |" in lines


def test_make_results_drops_unfilled_columns_and_empty_runs(make_results):
    md = make_results.to_markdown(_payload([{"case": "c", "impl": "i", "metrics": {"ms": 1.0}}]))
    assert "| case | impl | ms |" in md
    assert "nothing was measured" in make_results.to_markdown(_payload([]))


def test_make_results_main_skips_bad_files(make_results, tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_payload([{"case": "c", "impl": "i", "metrics": {"ms": 2.0}}])))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert make_results.main([str(bad), str(good), str(tmp_path / "missing.json")]) == 1
    out, err = capsys.readouterr()
    assert "| c | i | 2 |" in out
    assert "bad.json" in err and "missing.json" in err
    assert make_results.main([str(good)]) == 0


def test_make_results_reads_what_the_benchmarks_write(tmp_path):
    """JSON written by the benchmarks' own writer (bench_ring's model mode needs no GPU;
    the GPU scripts write through the same common.write_json)."""
    out = tmp_path / "ring_model.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, str(BENCH / "bench_ring.py"), "--dry-run", "--quick", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tempfile.gettempdir())
    assert r.returncode == 0, r.stderr
    payload = json.loads(out.read_text())
    assert payload["rows"] and {"environment", "metrics", "title"} <= set(payload)
    r = subprocess.run([sys.executable, str(BENCH / "make_results.py"), str(out)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| 128K P=2 | model |" in r.stdout and "zigzag_max/mean" in r.stdout


def test_write_json_is_incremental(tmp_path, make_results):
    """Every row rewrites the file atomically: a run cut off keeps what it measured."""
    sys.path.insert(0, str(BENCH))
    try:
        import common
    finally:
        sys.path.remove(str(BENCH))
    path = tmp_path / "sub" / "x.json"
    rows = [common.Row("c1", "i", {"ms": 1.0})]
    common.write_json("x", "X", rows, ["ms"], str(path), quiet=True)
    rows.append(common.Row("c2", "i", {"ms": 2.0}))
    common.write_json("x", "X", rows, ["ms"], str(path), quiet=True)
    payload = json.loads(path.read_text())
    assert [r["case"] for r in payload["rows"]] == ["c1", "c2"]
    assert not list(path.parent.glob("*.tmp"))
    assert "| c2 | i | 2 |" in make_results.to_markdown(payload)


# ---------------------------------------------------------------------------------------
# The v2 device script (issue 29) and the attention sweep's decisions
# ---------------------------------------------------------------------------------------

V2 = BENCH / "gpu_session_v2.sh"


def _plan():
    env = dict(os.environ, OUT=tempfile.mkdtemp())
    r = subprocess.run(["bash", str(V2), "--plan"], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    steps = {}
    for line in r.stdout.splitlines():
        if line.startswith("step "):
            _, name, cap, cmd = line.split(" ", 3)
            steps[name] = (int(cap), cmd)
        elif line.startswith("budget "):
            budget, reserve = int(line.split()[1]), int(line.split()[3])
    return steps, budget, reserve, env["OUT"]


def test_v2_plan_covers_the_issue_within_eight_minutes():
    steps, budget, reserve, out = _plan()
    assert budget <= 480, "one call of at most 8 minutes"
    for name in ("preflight-deps", "install", "preflight-installed", "generate", "attention", "shuffle", "prefill", "train"):
        assert name in steps, name
    assert all(cap >= 5 for cap, _ in steps.values())
    assert "--layers 48" in steps["prefill"][1] and "--b-tokens 196608" in steps["prefill"][1]  # all 48 layers, 192K
    assert "--parts db" in steps["prefill"][1]  # (d) after its warm-up fix, then (b)
    assert "--quick" in steps["attention"][1] and "--write-table" in steps["attention"][1]
    assert "--budget-s" in steps["attention"][1]
    assert int(steps["attention"][1].split("--budget-s ")[1].split()[0]) < steps["attention"][0]
    assert "--policies all" in steps["train"][1] and "--out" in steps["train"][1]
    assert "--device cuda" in steps["generate"][1]
    # at most 8 files come back: every path a step writes under $OUT, plus the log and summary
    written = {w for _, cmd in steps.values() for w in cmd.replace("'", " ").split() if w.startswith(out + "/")}
    assert len(written) + 2 <= 8, written


def test_v2_script_parses_and_its_steps_exist():
    r = subprocess.run(["bash", "-n", str(V2)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    steps, *_ = _plan()
    for _, cmd in steps.values():
        for word in cmd.split():
            if word.startswith("benchmarks/") or word.startswith("tests/"):
                assert (ROOT / word).exists(), word


def _sweep(tmp_path, rows):
    sys.path.insert(0, str(BENCH))
    try:
        import tune_attention
    finally:
        sys.path.remove(str(BENCH))
    import argparse

    args = argparse.Namespace(shapes=["qwen", "vit"], budget_s=None, out=None, quick=True,
                              fwd_variants=[], bwd_variants=[])
    sweep = tune_attention.Sweep(args)
    sweep.rows = rows
    return tune_attention, sweep


def _cfg(m, n, w, st):
    return {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": st}


def _row(shape, passname, variant, ms, configs, kernel="table", rel=0.0):
    return {"shape": shape, "pass": passname, "variant": variant, "kernel": kernel, "configs": configs,
            "config": str(configs), "ms": ms, "tflops": 1.0, "rel_diff": rel}


def test_tune_attention_adopts_a_variant_only_past_the_noise(tmp_path):
    from longvita.kernels.attention import launch_table as lt

    fwd128, fwd64 = {"fwd": _cfg(128, 128, 8, 3)}, {"fwd": _cfg(128, 64, 8, 3)}
    split = {"dkdv": _cfg(64, 128, 8, 1), "dq": _cfg(128, 64, 8, 3)}
    rows = [
        _row("qwen", "fwd", "default", 5.00, fwd128),
        _row("qwen", "fwd", "tma", 4.20, fwd128),  # 16 % faster than the default: adopted
        _row("qwen", "fwd", "tma", 4.00, fwd64, kernel="fwd"),  # and faster still with N64
        _row("qwen", "fwd", "sorted", 3.00, fwd128, rel=0.5),  # computes something else: never chosen
        _row("qwen", "fwd", "default", 5.10, fwd128),
        _row("qwen", "bwd", "default", 20.0, split),
        _row("qwen", "bwd", "fused_bwd", 19.9, {"bwd_fused": _cfg(16, 128, 8, 2)}),  # within the noise: kept
        _row("qwen", "bwd", "default", 20.2, split),
        {"shape": "vit", "pass": "fwd", "variant": "ws", "kernel": "fwd", "config": "x", "configs": {},
         "error": "OutOfResources: shared memory"},
    ]
    tune, sweep = _sweep(tmp_path, rows)
    choices = sweep.choose()
    assert choices["qwen", "fwd"]["adopt"] and choices["qwen", "fwd"]["best"]["variant"] == "tma"
    assert choices["qwen", "fwd"]["best"]["configs"] == fwd64
    assert not choices["qwen", "bwd"]["adopt"]
    assert ("vit", "fwd") not in choices  # nothing measured right there
    path = tmp_path / "sub" / "table.json"
    sweep.write_table(str(path), choices)
    table = lt.load_table(path)  # valid by the package's own checks
    entry = next(e for e in table["choice"] if e["block_d"] == 128 and e["causal"])
    assert (entry["fwd"], entry["bwd"]) == ("tma", "default")
    assert "adopted" in entry["measured"]["fwd"] and "kept default" in entry["measured"]["bwd"]
    tma_fwd = table["configs"]["tma"]["fwd"]["128"]
    assert (tma_fwd["BLOCK_N"], tma_fwd["num_stages"]) == (64, 3) and "measured" in tma_fwd
    assert table["configs"]["default"]["fwd"]["128"]["BLOCK_N"] == 128  # the default's own best stays
    assert table["configs"]["fused_bwd"]["bwd_fused"]["128"]["BLOCK_M"] == 16
    # a wrong result leaves no config behind: 'sorted' keeps whatever the shipped table had
    assert table["configs"].get("sorted") == lt.load_table(lt.TABLE_PATH)["configs"].get("sorted")
    # the launchers read the written table: variant and configs as chosen
    lt.set_table(table)
    try:
        assert lt.variant_for("fwd", 128, True).name == "tma"
        assert lt.table_config("fwd", 128, lt.parse_variant("tma"))["BLOCK_N"] == 64
    finally:
        lt.set_table(None)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the sweep's GPU code in Triton's interpreter")
def test_tune_attention_sweep_runs_end_to_end_in_the_interpreter(tmp_path, monkeypatch):
    """The sweep's own code (inputs, candidates through the table, comparison with the
    default, rows, decisions, the written table) on a tiny shape, CPU fp32, with a stand-in
    timer: what a GPU session runs, less the timing."""
    import triton.testing

    tune, sweep = _sweep(tmp_path, [])
    monkeypatch.setattr(tune, "DEVICE", "cpu")
    monkeypatch.setattr(tune, "DTYPE", torch.float32)
    monkeypatch.setitem(tune.SHAPES, "tiny", ((5, 19), 4, 2, 16, True))
    monkeypatch.setitem(tune.CANDIDATES, ("fwd", 16), [(16, 16, 1, 1)])
    monkeypatch.setitem(tune.CANDIDATES, ("bwd_fused", 16), [(16, 16, 1, 1)])
    clock = iter([100.0, 50.0, 60.0, 101.0, 100.0, 50.0, 60.0, 101.0])  # the default twice per pass, slower
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), float(next(clock)))[1])
    sweep.args.shapes, sweep.args.quick = ["tiny"], False
    sweep.args.fwd_variants, sweep.args.bwd_variants = ["tma"], ["fused_bwd"]
    sweep.args.out = str(tmp_path / "rows.jsonl")
    sweep.run_shape("tiny")
    rows = [json.loads(line) for line in open(sweep.args.out)]
    assert [(r["pass"], r["variant"], r["kernel"]) for r in rows] == [
        ("fwd", "default", "table"), ("fwd", "tma", "table"), ("fwd", "tma", "fwd"), ("fwd", "default", "table"),
        ("bwd", "default", "table"), ("bwd", "fused_bwd", "table"), ("bwd", "fused_bwd", "bwd_fused"),
        ("bwd", "default", "table")]
    assert all(r["rel_diff"] < 1e-5 for r in rows), rows  # every variant computed the default's result
    assert set(rows[6]["configs"]) == {"bwd_fused"} and set(rows[5]["configs"]) == {"bwd_fused"}
    choices = sweep.choose()
    assert choices["tiny", "fwd"]["best"]["variant"] == "tma" and choices["tiny", "fwd"]["adopt"]
    sweep.write_table(str(tmp_path / "table.json"), choices)
    entry = next(e for e in json.loads((tmp_path / "table.json").read_text())["choice"] if e["block_d"] == 16)
    assert (entry["fwd"], entry["bwd"]) == ("tma", "fused_bwd")


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("bench_*.py")))
def test_every_benchmark_takes_the_session_loops_flags(script):
    """benchmarks/gpu_session.sh runs every bench_*.py with --quick (bare with --full) and --out: a
    benchmark that rejects either fails the session's loop (CI's rehearsal caught bench_cpu.py
    without --quick)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True,
                       env=env, timeout=120, cwd=tempfile.gettempdir())
    assert r.returncode == 0, r.stderr[-2000:]
    for flag in ("--quick", "--out"):
        assert flag in r.stdout, f"{script} --help lists no {flag}"
