"""The capacity planner (``runtime/capacity.py``, ``longvita plan``) and the CP cost model
(``parallel/costs.py``): the saved-tensor counts against autograd itself, every peak
measured on the H100 (read from ``benchmarks/RESULTS.md``) within 10 %, the parallel
layouts' arithmetic, and the command's output and errors."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longvita.cli import main
from longvita.model import LongVITA, preset
from longvita.parallel.costs import (
    KINDS, Links, RingCase, cp_layer_bytes, estimate_block_ms, predict_cp_layer, predict_ring,
)
from longvita.runtime.capacity import (
    GIB, decoder_saved_bytes, generate_memory, kv_bytes_per_token, longest_fitting, param_counts, train_memory,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
H100_SECTION = "## GPU measurements: NVIDIA H100 80GB HBM3, 2026-11-25"


# --------------------------------------------------------------------------------------
# What autograd saves, counted by autograd
# --------------------------------------------------------------------------------------


def _saved_by_one_layer(cfg, n: int, trainable: bool) -> int:
    """Bytes of the distinct storages one decoder layer's forward saves for its backward
    (its weights and the shared RoPE tables excluded; its input counted once)."""
    from longvita.model.attention import PackedAttention
    from longvita.model.text import DecoderLayer, rope_cos_sin

    layer = DecoderLayer(cfg.text).requires_grad_(trainable)
    x = torch.randn(n, cfg.text.hidden_size, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(n), cfg.text.head_dim, cfg.text.rope_theta, torch.float32)
    skip = {t.untyped_storage().data_ptr() for t in (*layer.parameters(), cos, sin)}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip and t.dtype.is_floating_point:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x, cos, sin, PackedAttention(torch.tensor([0, n], dtype=torch.int32)), 0)
    assert out.requires_grad
    assert x.untyped_storage().data_ptr() in seen  # the first norm keeps the layer's input
    return sum(seen.values())


@pytest.mark.parametrize("trainable", [True, False], ids=["trainable", "frozen"])
@pytest.mark.parametrize("kernels", ["fused", "eager"])
def test_saved_bytes_per_layer_are_what_autograd_saves(monkeypatch, kernels, trainable):
    """fp32, GQA 8:2, an odd token count: the planner's per-token count times n is the
    bytes autograd holds for one layer, for the fused kernels (the Triton paths, in the
    interpreter) and the eager formulas (their torch paths; attention stays Triton, as on
    the GPU the H100 numbers came from), with trainable and frozen weights."""
    import longvita.model.text as text

    monkeypatch.setenv("LONGVITA_BACKEND", "triton")
    if kernels == "eager":
        monkeypatch.setattr(text, "rms_norm", functools.partial(text.rms_norm, backend="torch"))
        monkeypatch.setattr(text, "swiglu", functools.partial(text.swiglu, backend="torch"))
        monkeypatch.setattr(text, "apply_rope_qk", functools.partial(text.apply_rope_qk, backend="torch"))
    cfg = preset("tiny")
    t = cfg.text
    t.hidden_size, t.intermediate_size, t.num_heads, t.num_kv_heads, t.head_dim = 256, 688, 8, 2, 32
    n = int(torch.randint(61, 131, ()).item())
    got = _saved_by_one_layer(cfg, n, trainable)
    per_token = decoder_saved_bytes(cfg, precision="fp32", trainable=trainable, kernels=kernels)
    assert got == pytest.approx(sum(per_token.values()) * n, rel=1e-3), (got, per_token, n)


# --------------------------------------------------------------------------------------
# Every peak measured on the H100
# --------------------------------------------------------------------------------------


def _h100_tables() -> dict[str, list[dict]]:
    """The tables of RESULTS.md's H100 section: title -> rows as {column: cell}."""
    text = RESULTS.read_text(encoding="utf-8")
    start = text.index(H100_SECTION)
    end = text.index("\n## ", start + len(H100_SECTION))
    tables, title, header = {}, None, None
    for line in text[start:end].splitlines():
        if line.startswith("#### "):
            title, header = line[5:].strip(), None
        elif line.startswith("|") and title:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(cells[0]) <= {"-"}:
                tables.setdefault(title, []).append(dict(zip(header, cells)))
    return tables


def _table(prefix: str) -> tuple[str, list[dict]]:
    found = [(k, v) for k, v in _h100_tables().items() if k.startswith(prefix)]
    assert len(found) == 1, [k for k, _ in found]
    return found[0]


def _row(rows, case, impl) -> dict:
    match = [r for r in rows if r["case"] == case and r["impl"] == impl]
    assert len(match) == 1, (case, impl)
    return match[0]


def _layers(title: str) -> int:
    return int(re.search(r"with (\d+) of 48 decoder layers", title).group(1))


def test_prefill_peaks_measured_on_the_h100_are_predicted_within_10_percent():
    """The plain prefill with the last-token head (what generate runs), its chunked form
    through the KV cache, and the benchmark's other two heads (its own ``prefill_peak``
    on the library's layer model)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from prefill_setup import prefill_peak

    title, rows = _table("Prefill/decode, Long-VITA-14B shapes")
    cfg = preset("long-vita-14b")
    cfg.text.num_layers = _layers(title)
    counts = param_counts(cfg)
    head_chunk = int(re.search(r"LM-head chunk (\d+)", title).group(1))
    prefill_chunk = int(re.search(r"prefill chunk (\d+)", title).group(1))
    checked = 0
    for r in rows:
        m = re.fullmatch(r"\(a\) prefill N=(\d+)K", r["case"])
        if m and r["gib"] != "-":
            n = int(m.group(1)) * 1024
            if r["impl"] == "last-token head":  # no KV cache in a plain prefill
                plan = generate_memory(cfg, n, new_tokens=0, counts=counts)
                pred = plan.phase_bytes("prefill") - plan.items["KV cache"]
            else:
                pred = counts.total * 2 + prefill_peak(cfg, n, r["impl"], 2, head_chunk)
            assert pred / GIB == pytest.approx(float(r["gib"]), rel=0.10), (r, pred / GIB)
            checked += 1
    b = next(r for r in rows if r["case"].startswith("(b) chunked prefill") and r["gib"] != "-")
    plan = generate_memory(cfg, int(b["tokens"]), prefill_chunk=prefill_chunk, new_tokens=16, counts=counts)
    assert plan.peak_bytes / GIB == pytest.approx(float(b["gib"]), rel=0.10), (b, plan.to_dict())
    assert checked == 6


def test_training_peaks_measured_on_the_h100_are_predicted_within_10_percent():
    """The stage-3 step with activation checkpointing (55.5 GiB: the optimizer step's
    foreach buffers), stage 1 with and without it, and stage 3 without it, which ran out
    of memory on the 80 GB card. Those runs used the eager RMSNorm/SwiGLU and torch's
    foreach AdamW (``bench_train.py``)."""
    title, rows = _table("Training step, Long-VITA-14B shapes")
    cfg = preset("long-vita-14b")
    cfg.text.num_layers = _layers(title)
    counts = param_counts(cfg)
    tokens = int(re.search(r"one (\d+)K-token pack", title).group(1)) * 1024
    tiles = int(re.search(r"with (\d+) tiles", title).group(1))
    checked = 0
    for r in rows:
        stage = int(r["impl"].split()[1])
        policy = "none" if "without" in r["impl"] or r["impl"].endswith(": none") else "full"
        plan = train_memory(cfg, tokens, stage=stage, activation_checkpointing=policy, tiles=tiles,
                            decoder_kernels="eager", optimizer_foreach=True, gpu_gib=80e9 / GIB, counts=counts)
        assert float(r["trainable"]) == pytest.approx(plan.settings["trainable"] / 1e6, rel=1e-3)
        if r["gib"] == "-":  # out of memory on the card
            assert not plan.fits, (r, plan.to_dict())
        else:
            assert plan.peak_bytes / GIB == pytest.approx(float(r["gib"]), rel=0.10), (r, plan.to_dict())
        checked += 1
    assert checked == 4


# --------------------------------------------------------------------------------------
# The model's arithmetic
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big():
    cfg = preset("long-vita-14b")
    return cfg, param_counts(cfg)


def test_param_counts_equal_the_models(big):
    cfg, counts = big
    small = preset("tiny")
    model = LongVITA(small)
    assert param_counts(small).total == sum(p.numel() for p in model.parameters())
    assert counts.total == 15_083_491_328  # Long-VITA-14B: InternViT-300M + projector + Qwen2.5-14B
    assert counts.trainable(False, True, False) == counts.projector


def test_generate_memory_splits_over_context_parallel_ranks(big):
    cfg, counts = big
    one = generate_memory(cfg, 1 << 20, prefill_chunk=8192, counts=counts)
    eight = generate_memory(cfg, 1 << 20, gpus=8, prefill_chunk=8192, counts=counts)
    assert eight.items["weights"] == one.items["weights"]  # inference keeps the weights whole
    kv = kv_bytes_per_token(cfg)
    assert kv == 48 * 2 * 8 * 128 * 2  # 192 KiB per token
    assert eight.items["KV cache"] == pytest.approx(one.items["KV cache"] / 8, rel=1e-3)
    assert not one.fits and eight.fits
    assert eight.items["communication"] > 0 == one.items["communication"]
    # a chunk bounds the activations; without one they grow with the shard
    whole = generate_memory(cfg, 1 << 20, gpus=8, counts=counts)
    assert whole.items["activations"] > 10 * eight.items["activations"]


def test_train_memory_shards_and_checkpointing(big):
    cfg, counts = big
    single = train_memory(cfg, 32768, counts=counts)
    fsdp = train_memory(cfg, 32768, gpus=16, cp=8, counts=counts)  # dp = 2: FSDP2 over all 16
    assert fsdp.items["weights"] == pytest.approx(single.items["weights"] / 16)
    assert fsdp.items["optimizer states"] == pytest.approx(single.items["optimizer states"] / 16)
    only_cp = train_memory(cfg, 32768, gpus=8, cp=8, counts=counts)  # dp = 1: sharded over the CP ranks too
    assert only_cp.items["weights"] == pytest.approx(single.items["weights"] / 8)
    assert only_cp.items["activations"] < single.items["activations"] / 7
    peaks = {p: train_memory(cfg, 131072, gpus=8, activation_checkpointing=p, counts=counts).phase_bytes("backward start")
             for p in ("none", "mlp", "every-other", "full")}
    assert peaks["none"] > peaks["every-other"] > peaks["full"] and peaks["none"] > peaks["mlp"] > peaks["full"]
    stage1 = train_memory(cfg, 32768, stage=1, counts=counts)
    assert stage1.items["optimizer states"] == counts.projector * 8
    assert stage1.items["gradients"] < single.items["gradients"] / 100


def test_ulysses_beyond_the_kv_heads_replicates_them(big):
    cfg, counts = big
    assert decoder_saved_bytes(cfg, ulysses=8) == decoder_saved_bytes(cfg)
    wide = decoder_saved_bytes(cfg, ulysses=16)  # 16 > 8 KV heads: each attended twice
    assert wide["attention"] - decoder_saved_bytes(cfg)["attention"] == 2 * 2 * 8 * 128  # k and v, bf16


def test_longest_fitting_is_the_boundary(big):
    cfg, counts = big

    def plan_at(n):
        return generate_memory(cfg, n, prefill_chunk=8192, counts=counts)

    longest = longest_fitting(plan_at)
    assert plan_at(longest).fits and not plan_at(longest + 1024).fits
    # the H100 run's own model of 48 layers on 80 GB: about 247K tokens (RESULTS.md, (b))
    assert 200_000 < longest < 280_000
    assert longest_fitting(lambda n: generate_memory(cfg, n, gpu_gib=20, counts=counts)) == 0  # weights alone: 28 GiB


def test_bad_arguments_name_themselves(big):
    cfg, counts = big
    for kwargs, match in (({"gpus": 6, "cp": 4}, "cp 4 must divide"), ({"gpus": 8, "ulysses": 3}, "ulysses 3"),
                          ({"tokens": 0}, "tokens must be"), ({"gpu_gib": float("nan")}, "gpu_gib")):
        args = {"tokens": 1024, **kwargs}
        with pytest.raises(ValueError, match=match):
            generate_memory(cfg, args.pop("tokens"), counts=counts, **args)
    with pytest.raises(ValueError, match="activation_checkpointing"):
        train_memory(cfg, 1024, activation_checkpointing="selective", counts=counts)
    with pytest.raises(ValueError, match="precision"):
        train_memory(cfg, 1024, precision="fp8", counts=counts)


# --------------------------------------------------------------------------------------
# The CP cost model
# --------------------------------------------------------------------------------------


def test_ring_bytes_and_balance():
    tokens = 131072 + 2 * int(torch.randint(0, 500, ()).item()) + 1  # odd: zigzag pads
    for p in (2, 3, 8):
        case = RingCase(tokens, p)
        b = cp_layer_bytes(tokens, p, 1)
        assert b["ring"] == (p - 1) * case.kv_bytes_fwd() and b["all_to_all"] == 0
        bwd = cp_layer_bytes(tokens, p, 1, backward=True)
        assert bwd["ring"] == (p - 1) * case.kv_bytes_bwd()
        blocks = {kind: float(case.pairs(kind)) for kind in KINDS}  # cost proportional to work
        assert predict_ring(case, blocks, 0.0)["balance"] == pytest.approx(1.0, abs=0.02)


def test_ulysses_and_hybrid_bytes():
    n, local = 1 << 20, (1 << 20) // 64
    pure = cp_layer_bytes(n, 8, 8)
    assert pure["ring"] == 0
    # q, k, v in and the output back: 7/8 of (2 x 40 + 2 x 8) heads of this rank's rows
    assert pure["all_to_all"] == pytest.approx(7 / 8 * (n // 8) * (2 * 40 + 2 * 8) * 128 * 2)
    hybrid = cp_layer_bytes(n, 64, 8)
    assert hybrid["ring"] == pytest.approx(7 * 2 * local * 8 * 128 * 2)  # ring of 8 over the groups
    ring = cp_layer_bytes(n, 64, 1)
    assert hybrid["total"] < ring["total"] / 2
    # U = 16 > 8 KV heads (heads of 48): each KV head is replicated twice
    rep = cp_layer_bytes(n, 16, 16, hq=48)
    assert rep["all_to_all"] == pytest.approx(15 / 16 * (n // 16) * (2 * 48 + 2 * 16) * 128 * 2)


def test_predicted_layer_time_exposes_slow_links():
    est = functools.partial(estimate_block_ms, tflops=400.0)
    n = 131072
    # with free links every layout is as fast as a perfect split
    free = Links(1e9, 1e9)
    for cp, u in ((8, 1), (8, 8), (64, 8), (64, 1)):
        r = predict_cp_layer(n, cp, u, est, free)
        assert r["efficiency"] == pytest.approx(1.0, abs=0.02), (cp, u, r)
    # across nodes at 50 GB/s a 64-rank ring waits on its transfers; Ulysses inside the
    # node and a ring of 8 across nodes hides them
    ring = predict_cp_layer(n, 64, 1, est)
    hybrid = predict_cp_layer(n, 64, 8, est)
    assert ring["efficiency"] < 0.8 < hybrid["efficiency"]
    assert hybrid["total_ms"] < ring["total_ms"]
    with pytest.raises(ValueError, match="ulysses 3"):
        predict_cp_layer(n, 8, 3, est)


def test_bench_ring_hybrid_dry_run(tmp_path):
    out = tmp_path / "hybrid.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ring.py"), "--hybrid", "--dry-run", "--quick",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    payload = json.loads(out.read_text())
    gpus = sorted({row["metrics"]["gpus"] for row in payload["rows"]})
    assert gpus == [8, 16, 32, 64]
    impls = {row["impl"] for row in payload["rows"]}
    assert {"ring", "ulysses 8", "hybrid: ulysses 8 x ring 8"} <= impls
    for row in payload["rows"]:
        m = row["metrics"]
        assert m["ring"] * m["ulysses"] == m["gpus"] and math.isfinite(m["step_ms"]) and 0 < m["step_eff"] <= 1.0001


# --------------------------------------------------------------------------------------
# longvita plan
# --------------------------------------------------------------------------------------


def test_plan_command_text_and_json(capsys):
    assert main(["plan", "generate", "--tokens", "128K", "--prefill-chunk", "8192"]) == 0
    text = capsys.readouterr().out
    assert "KV cache" in text and "fits" in text and "longest length that fits:" in text
    assert main(["plan", "train", "--tokens", "1M", "--gpus", "64", "--cp", "64", "--ulysses", "8", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    d = json.loads(out)
    assert d["mode"] == "train" and d["settings"]["ulysses"] == 8 and d["settings"]["cp"] == 64
    assert d["fits"] == (d["peak_gib"] <= d["gpu_gib"]) and d["longest_tokens"] > 0
    assert set(d["phases_gib"]) == {"forward end", "backward start", "backward end", "optimizer step"}


def test_plan_reads_a_checkpoint_folders_config(tmp_path, capsys):
    LongVITA(preset("tiny")).save_pretrained(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")  # only config.json is read
    assert main(["plan", "generate", "--model", str(tmp_path), "--tokens", "4096", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] and d["items_gib"]["weights"] < 0.01


@pytest.mark.parametrize("args,message", [
    (["generate", "--tokens", "12Q"], "--tokens must be a token count"),
    (["generate", "--tokens", "0"], "--tokens must be >= 1"),
    (["generate", "--gpus", "6", "--cp", "4"], "--cp 4 must divide --gpus (6)"),
    (["generate", "--gpus", "16", "--ulysses", "16"], "must divide the model's 40 attention heads"),
    (["generate", "--gpu-gib", "0"], "--gpu-gib must be > 0"),
    (["train", "--prefill-chunk", "8192"], "--prefill-chunk is for generate"),
    (["train", "--stage", "5"], "--stage must be <= 4"),
    (["generate", "--model", "/nonexistent/folder"], "checkpoint folder does not exist"),
])
def test_plan_bad_input_is_one_line(args, message):
    r = subprocess.run([sys.executable, "-m", "longvita", "plan", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
