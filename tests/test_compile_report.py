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
    "_lce_rows_kernel", "_scale_grad_kernel",  # LM head
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


_KIND = {"_fwd_kernel": "fwd", "_bwd_dkdv_kernel": "dkdv", "_bwd_dq_kernel": "dq"}
# The attention configs measured fastest on an H100 (tune_attention.py, RESULTS.md) spill a
# little (ptxas, sm_90: forward D128 44-60 bytes, dK/dV D128 12-180, dK/dV D64 causal 72)
# and still beat every non-spilling candidate there, so they may; within this bound, which
# a codegen regression would pass.
_MEASURED_SPILL_BOUND = 256


def _measured(c) -> bool:
    from longvita.kernels.attention.triton import _MEASURED_16BIT

    d = next((int(w[1:]) for w in c["case"].split() if w[:1] == "d" and w[1:].isdigit()), None)
    return (_KIND.get(c["kernel"]), d) in _MEASURED_16BIT and "window" not in c["case"]


def test_no_register_spills_in_main_configs(report):
    # bf16/fp16 are the speed paths; fp32 (exact "ieee" dots, for tests) may spill
    main = [c for c in report["compiled"] if "float32" not in c["case"]]
    spills = [c for c in main if c["spill_stores"] and not _measured(c)]
    assert not spills, spills
    over = [c for c in main if _measured(c) and c["spill_stores"] > _MEASURED_SPILL_BOUND]
    assert not over, over
    assert any(_measured(c) for c in main)  # the exemption names configs that exist
    assert all(c["registers"] is not None for c in report["compiled"])
