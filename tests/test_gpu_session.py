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
