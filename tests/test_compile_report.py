"""Every Triton kernel compiles for Hopper (sm_90) with its GPU launch configuration, in
bf16 and fp16, fits an H100's shared memory, and does not spill registers in the main
configurations. No GPU needed: benchmarks/compile_report.py compiles without launching."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compile_report.py"
H100_MAX_SHARED = 227 * 1024  # bytes of shared memory one block can have on sm_90
EXPECTED = {
    "_fwd_kernel", "_bwd_preprocess_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel",  # varlen attention
    "_lce_fwd_kernel", "_lce_bwd_kernel", "_ce_grad_inplace_kernel",  # LM head
    "_ps_ln_fwd_kernel", "_ps_ln_bwd_kernel",  # pixel shuffle projector
    "_lse_merge_kernel",  # ring attention's merge
}


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--json"], capture_output=True, text=True, env=env,
                       timeout=600, cwd=SCRIPT.parent)
    assert r.stdout, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_for_sm90(report):
    assert report["failures"] == {}
    assert {c["kernel"] for c in report["compiled"]} >= EXPECTED


def test_shared_memory_fits_h100(report):
    too_big = [c for c in report["compiled"] if c["shared"] > H100_MAX_SHARED]
    assert not too_big


def test_no_register_spills_in_main_configs(report):
    # bf16/fp16 are the speed paths; fp32 (exact "ieee" dots, for tests) may spill
    spills = [c for c in report["compiled"] if c["spill_stores"] and "float32" not in c["case"]]
    assert not spills, spills
    assert all(c["registers"] is not None for c in report["compiled"])
