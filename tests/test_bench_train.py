"""benchmarks/bench_train.py runs on the CPU (tiny preset, one training step per row) and
writes JSON that make_results.py reads, with every row and sane numbers."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_train as bt  # noqa: E402
from make_results import to_markdown  # noqa: E402

from _bench import cpu_smoke_payload  # noqa: E402

IMPLS = [
    "stage 3, activation checkpointing: none",
    "stage 3, activation checkpointing: full",
    "stage 1, activation checkpointing: none",
    "stage 1, activation checkpointing: full",
]


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    return cpu_smoke_payload("bench_train.py", tmp_path_factory.mktemp("bench") / "train.json")


def _finite_positive(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def check_payload(p):
    """Every check the CPU run must pass; raises AssertionError naming what is wrong."""
    assert p["name"] == "train" and set(p["metrics"]) >= {"tokens", "ms", "tok_s", "tflops", "mfu", "gib"}
    assert p["environment"]["device"]
    assert [r["impl"] for r in p["rows"]] == IMPLS, [r["impl"] for r in p["rows"]]
    trainable = {}
    for r in p["rows"]:
        m = r["metrics"]
        for key in ("tokens", "ms", "tok_s", "tflops", "trainable"):
            assert _finite_positive(m.get(key)), f"{r['impl']}: {key} = {m.get(key)!r}"
        assert r["case"].startswith(r["impl"][:7]), r
        # tokens/s is the pack's tokens over the step time
        assert m["tok_s"] == pytest.approx(m["tokens"] / (m["ms"] / 1e3), rel=1e-6), f"{r['impl']}: {m}"
        # the CPU has no peak FLOP/s and no allocator statistics
        assert m.get("mfu") is None and m.get("gib") is None and m.get("mfu_target") is None, f"{r['impl']}: {m}"
        trainable[r["impl"]] = m["trainable"]
    # stage 1 trains the projector only: far fewer parameters, whatever the checkpointing
    for ac in ("none", "full"):
        s3 = trainable[f"stage 3, activation checkpointing: {ac}"]
        s1 = trainable[f"stage 1, activation checkpointing: {ac}"]
        assert s1 < s3 / 5, f"stage 1 {ac} AC trains {s1}M parameters, stage 3 {s3}M"


def test_cpu_run_writes_every_row(payload):
    check_payload(payload)
    table = to_markdown(payload)
    for r in payload["rows"]:
        assert f"| {r['case']} | {r['impl']} |" in table
    header = next(line for line in table.splitlines() if line.startswith("| case |"))
    assert all(f" {m} |" in header for m in ("tokens", "ms", "tok_s", "tflops", "trainable")), header


def test_checks_catch_a_broken_result(payload):
    broken = json.loads(json.dumps(payload))
    broken["rows"][1]["metrics"]["tok_s"] = -1.0  # corrupted: a negative rate
    with pytest.raises(AssertionError, match="stage 3, activation checkpointing: full"):
        check_payload(broken)
    broken = json.loads(json.dumps(payload))
    broken["rows"][0]["metrics"]["ms"] = float("nan")
    with pytest.raises(AssertionError, match="stage 3, activation checkpointing: none"):
        check_payload(broken)
    broken = json.loads(json.dumps(payload))
    broken["rows"] = [r for r in broken["rows"] if not r["impl"].startswith("stage 1")]
    with pytest.raises(AssertionError):
        check_payload(broken)
    broken = json.loads(json.dumps(payload))
    broken["rows"][2]["metrics"]["trainable"] = broken["rows"][0]["metrics"]["trainable"]  # stage 1 training all
    with pytest.raises(AssertionError, match="stage 1"):
        check_payload(broken)


def test_flops_formula_on_the_14b_shapes():
    """The PaLM-style count at 128K on Long-VITA-14B shapes: 6 x matmul weights x tokens
    dominates, causal attention adds layers x 6 T^2 H D, the ViT its tiles' share."""
    cfg = bt.preset("long-vita-14b")
    cfg.text.num_layers = 4
    with torch.device("meta"):
        model = bt.LongVITA(cfg)
    t, n, tiles = cfg.text, 131072, 16
    p_layer = (t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim
               + t.num_heads * t.head_dim * t.hidden_size
               + 3 * t.hidden_size * t.intermediate_size)
    dense = 6 * (4 * p_layer + t.vocab_size * t.hidden_size) * n
    attention = 4 * 3 * 0.5 * 4 * n**2 * t.num_heads * t.head_dim
    total = bt.model_flops(model, n, tiles)
    vit = total - dense - attention
    assert 0 < vit < 0.05 * total
    # ~300M ViT weights on 16 tiles of 1024 patches: about 6 x 0.3e9 x 16K
    assert vit == pytest.approx(6 * 0.3e9 * tiles * 1024, rel=0.3)
    assert bt.model_flops(model, 2 * n, tiles) > 2 * bt.model_flops(model, n, tiles)  # the T^2 term


def test_pack_has_tile_slots_and_shifted_labels():
    s = bt.settings_from_args(bt.argparse.Namespace(cpu_smoke=True, quick=False, layers=None, tokens=None, tiles=None))
    model = bt.build_model(s, "stage 1", "none")
    ids, labels, pixels, cu = bt.make_pack(model, 200, 3, "cpu")
    slots = ids == bt.slot_id(model)
    assert slots.sum() == 3 * model.config.tokens_per_tile and pixels.shape[0] == 3
    assert cu.tolist() == [0, 200]
    keep = labels != -100
    assert (labels[:-1][keep[:-1]] == ids[1:][keep[:-1]]).all() and labels[-1] == -100
    assert not keep[slots].any() and 0 < keep.sum() < 200
    assert [n for n, p in model.named_parameters() if p.requires_grad] and all(
        n.startswith("projector.") for n, p in model.named_parameters() if p.requires_grad)
