"""Every Triton kernel compiles for Hopper (sm_90a) with its GPU launch configuration, in
bf16 and fp16, fits an H100's shared memory, and does not spill registers in the main
configurations; every attention variant compiles to what it is for (TMA copies, Hopper's
wgmma, warp specialisation, atomics, no spills in 'budget'). No GPU needed:
benchmarks/compile_report.py compiles without launching."""

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
    "_bwd_fused_kernel",  # its one-kernel backward (variant fused_bwd)
    "_lce_rows_kernel", "_scale_grad_kernel",  # LM head
    "_ps_ln_fwd_kernel", "_ps_ln_fwd_rows_kernel", "_ps_ln_bwd_kernel",  # pixel shuffle projector
    "_lse_merge_kernel",  # ring attention's merge
    "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_rope_qk_kernel",  # the decoder's pieces
    "_swiglu_fwd_kernel", "_swiglu_bwd_kernel",
}
ATTENTION = {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_bwd_fused_kernel"}


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LONGVITA_ATTENTION_VARIANT")}
    r = subprocess.run([sys.executable, str(SCRIPT), "--json"], capture_output=True, text=True, env=env,
                       timeout=1200, cwd=SCRIPT.parent)
    assert r.stdout, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_for_sm90(report):
    assert report["failures"] == {}
    assert {c["kernel"] for c in report["compiled"]} >= EXPECTED


def test_shared_memory_fits_h100(report):
    too_big = [(c["case"], c["kernel"], c["shared"]) for c in report["compiled"] if c["shared"] > H100_MAX_SHARED]
    assert not too_big


_KIND = {"_fwd_kernel": "fwd", "_bwd_dkdv_kernel": "dkdv", "_bwd_dq_kernel": "dq"}
# The attention configs measured fastest on an H100 (tune_attention.py, RESULTS.md) spill a
# little (ptxas, sm_90: forward D128 44-60 bytes, dK/dV D128 12-180, dK/dV D64 causal 72)
# and still beat every non-spilling candidate there, so they may; within this bound, which
# a codegen regression would pass. The selectable variants (unmeasured; the chip decides)
# may too, within the same bound, except 'budget', whose point is to spill nothing.
_MEASURED_SPILL_BOUND = 256


def _variant(c) -> str | None:
    case = c["case"]
    return case[case.index("[") + 1:case.index("]")] if case.startswith("attention[") else None


def _measured(c) -> bool:
    from longvita.kernels.attention.launch_table import measured_configs

    d = next((int(w[1:]) for w in c["case"].split() if w[:1] == "d" and w[1:].isdigit()), None)
    return (_KIND.get(c["kernel"]), d) in measured_configs() and "window" not in c["case"]


def test_no_register_spills_in_main_configs(report):
    # bf16/fp16 are the speed paths; fp32 (exact "ieee" dots, for tests) may spill
    main = [c for c in report["compiled"] if "float32" not in c["case"] and _variant(c) is None]
    spills = [c for c in main if c["spill_stores"] and not _measured(c)]
    assert not spills, spills
    over = [c for c in main if _measured(c) and c["spill_stores"] > _MEASURED_SPILL_BOUND]
    assert not over, over
    assert any(_measured(c) for c in main)  # the exemption names configs that exist
    assert all(c["registers"] is not None for c in report["compiled"])


def test_variants_spill_within_the_bound_and_budget_not_at_all(report):
    variants = [c for c in report["compiled"] if _variant(c) is not None]
    assert {_variant(c) for c in variants} >= {"tma", "sorted", "persistent", "ws", "fused_bwd", "budget"}
    over = [(c["case"], c["kernel"], c["spill_stores"]) for c in variants if c["spill_stores"] > _MEASURED_SPILL_BOUND]
    assert not over
    budget = [(c["case"], c["kernel"], c["spill_stores"]) for c in variants
              if _variant(c) == "budget" and c["spill_stores"]]
    assert not budget, "the register-budget configs must not spill"


def test_variants_compile_to_what_they_are_for(report):
    """Read from the PTX: 16-bit attention runs on wgmma (sm_90a); 'tma' loads through the
    copy engine and not through cp.async; 'ws' splits into warp groups that trade registers
    (setmaxnreg); the fused backward adds dQ with atomics; the default uses no TMA."""
    att = [c for c in report["compiled"] if c["kernel"] in ATTENTION and "float32" not in c["case"]]
    assert att and all(c["wgmma"] > 0 for c in att), [(c["case"], c["kernel"]) for c in att if not c["wgmma"]]
    by = lambda v, k: [c for c in att if _variant(c) == v and c["kernel"] == k]  # noqa: E731
    for v in ("tma", "tma+ws", "tma+persistent+fused_bwd"):
        fwd = by(v, "_fwd_kernel")
        assert fwd and all(c["tma"] > 0 and c["cp_async"] == 0 for c in fwd), (v, fwd)
    assert all(c["tma"] > 0 for c in by("tma", "_bwd_dq_kernel") + by("tma", "_bwd_dkdv_kernel"))
    ws = by("ws", "_fwd_kernel")
    assert ws and all(c["setmaxnreg"] > 0 and c["num_warps"] > 8 for c in ws), ws
    fused = by("fused_bwd", "_bwd_fused_kernel")
    assert fused and all(c["atomics"] > 0 for c in fused), fused
    default = [c for c in att if _variant(c) is None]
    assert default and all(c["tma"] == 0 and c["atomics"] == 0 and c["setmaxnreg"] == 0 for c in default)


def test_memory_bound_kernels_use_16_byte_accesses(report):
    """The shuffle + LayerNorm (at InternViT's C = 1024) and the decoder's kernels at
    Qwen2.5-14B's widths move their rows in 16-byte vectors."""
    kernels = {"_ps_ln_fwd_kernel", "_ps_ln_fwd_rows_kernel", "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel",
               "_rope_qk_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel"}
    rows = [c for c in report["compiled"] if c["kernel"] in kernels
            and ("vit" in c["case"] or c["case"].startswith("decoder")) and "float32" not in c["case"]]
    assert {c["kernel"] for c in rows} == kernels
    narrow = [(c["case"], c["kernel"]) for c in rows if not c["vec16"]]
    assert not narrow
