"""Run a benchmark script's CPU smoke mode in a user's shell and read the JSON it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def cpu_smoke_payload(script: str, out: Path, *extra: str) -> dict:
    """``python benchmarks/<script> --cpu-smoke --out OUT [extra...]`` without Triton's
    interpreter (a user's shell); asserts it succeeded and returns the JSON payload."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(BENCH.parent) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, str(BENCH / script), "--cpu-smoke", "--out", str(out), *extra],
                       capture_output=True, text=True, env=env, timeout=600, cwd=BENCH.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out) as f:
        return json.load(f)
