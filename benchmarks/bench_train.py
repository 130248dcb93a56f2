"""One training step of the full model: tokens/s, MFU and peak memory per GPU.

    python benchmarks/bench_train.py [--quick] [--layers N] [--tokens T] [--out FILE]   # one GPU
    python benchmarks/bench_train.py --cpu-smoke --out X.json   # no GPU (also the default there): seconds
    pytest benchmarks/bench_train.py --benchmark-only           # pytest-benchmark (GPU; skips without one)

A step is forward + backward + optimizer step (AdamW) of ``longvita.runtime.train.loss.packed_loss``
on one synthetic pack, in one process (no groups): ``--tokens`` tokens (default 128K) that
are one document (``cu_seqlens = [0, T]``, positions do not reset), random ids with
``--tiles`` image tiles' worth of context slots (``tokens_per_tile`` slot tokens per tile,
random pixels), labels the ids shifted by one with -100 on the slots and the last row.

Model: Long-VITA-14B shapes (InternViT-300M + projector + Qwen2.5-14B, V=152064), random
weights, fp32 master weights with the step under ``torch.autocast('cuda', torch.bfloat16)``
(what ``longvita.runtime.train.trainer`` does with ``--precision bf16`` and no sharding). One GPU
holds 14B parameters' fp32 weights, gradients and Adam state for only a few decoder layers,
so ``--layers N`` keeps N of the 48 (default 4) and the title states the count. Four rows:

- stage 3 (all modules trainable), without and with activation checkpointing
  (``apply_activation_checkpointing``: every decoder layer and ViT block recomputed);
- stage 1 (only the projector trainable, the rest ``requires_grad_(False)``), the same two.

``--policies all`` (or a comma list of ``runtime.train.parallelize.AC_POLICIES``) instead
runs stage 3 once per activation-checkpointing policy: ``none``, ``full``, ``every-other``
(every second layer recomputed) and ``mlp`` (attention outputs kept, the MLPs recomputed),
so their MFU and peak memory sit side by side.

Columns: ``tokens``, ``ms`` (median wall time of a step), ``tok_s`` (tokens / step time),
``tflops`` (model FLOPs / step time), ``mfu``, ``gib`` (peak memory allocated on the GPU
during the timed steps: weights, gradients, optimizer state and activations), ``trainable``
(parameters updated, in millions) and, on H100/H200 rows at 128K tokens, ``mfu_target``
(0.45: MFU >= 45% at 128K on an H100).

MFU, PaLM-style (model FLOPs, recomputation not counted, so activation checkpointing
lowers MFU), divided by (step time x peak dense bf16 FLOP/s):

    model FLOPs = 6 * P_text * T                                   (decoder linears + LM head)
                + layers * 3 * (1/2) * 4 * T^2 * H * D             (causal attention, fwd+bwd)
                + 6 * P_vit * tiles * patches                      (ViT linears, patch embedding)
                + vit_layers * 3 * 4 * patches^2 * H_v * D_v * tiles  (ViT attention, full)
                + 6 * P_proj * tiles * tokens_per_tile             (projector)

where P_* counts the weights of the matmuls (``nn.Linear``, the patch ``nn.Conv2d``; not the
embedding table), trainable and frozen alike, and ``4 T^2 H D`` is QK^T and PV of one
layer's forward (x 3 for forward + backward). Stage 1 is charged the same FLOPs, so its
MFU compares throughput with stage 3's, not the hardware's efficiency on the smaller
backward that frozen weights need. Peak: 989e12 FLOP/s for an H100 SXM or an H200 (read
from ``torch.cuda.get_device_name``); other devices (and the CPU) report MFU as None.

Without CUDA (or with ``--cpu-smoke``) the same code runs on the ``tiny`` preset in fp32
with a few hundred tokens on one thread, in seconds, so CI exercises it; CPU numbers say
nothing about GPU performance and there is no peak memory or MFU.

``pred_gib`` is ``longvita plan``'s prediction of the row's peak (``runtime.capacity``),
for the decoder kernels as they run now (the fused ones).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    Row, fmt_tokens, free_memory, gpu_only, is_cuda_oom, print_table, pytest_benchmark_median, sync, write_json,
)

from longvita.runtime.train.loss import packed_loss  # noqa: E402
from longvita.runtime.train.parallelize import AC_POLICIES, apply_activation_checkpointing  # noqa: E402
from longvita.model import LongVITA, preset  # noqa: E402

NAME = "train"
METRICS = ["tokens", "ms", "tok_s", "tflops", "mfu", "mfu_target", "gib", "pred_gib", "trainable"]
# peak dense bf16 FLOP/s by device-name substring (SXM parts; the H200 shares the H100's)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}
MFU_TARGET = 0.45  # at 128K tokens on an H100
TARGET_TOKENS = 131072
GIB = 2**30
# (stage, activation-checkpointing policy) of the four default rows
CONFIGS = (("stage 3", "none"), ("stage 3", "full"), ("stage 1", "none"), ("stage 1", "full"))


@dataclass
class Settings:
    device: str
    preset: str
    layers: int
    tokens: int
    tiles: int
    iters: int
    autocast: bool  # bf16 autocast over fp32 weights (GPU); the CPU runs plain fp32

    @property
    def cpu(self) -> bool:
        return self.device == "cpu"


def settings_from_args(args) -> Settings:
    if args.cpu_smoke or not torch.cuda.is_available():
        return Settings(device="cpu", preset="tiny", layers=args.layers or 2, tokens=args.tokens or 384,
                        tiles=args.tiles or 4, iters=2, autocast=False)
    return Settings(device="cuda", preset="long-vita-14b", layers=args.layers or 4,
                    tokens=args.tokens or (32768 if args.quick else TARGET_TOKENS),
                    tiles=args.tiles or 16, iters=2 if args.quick else 3, autocast=True)


def peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


# --------------------------------------------------------------------------------------
# FLOPs (see the module docstring)
# --------------------------------------------------------------------------------------


def matmul_params(module: torch.nn.Module) -> int:
    """Weights of the matmuls in ``module`` (linears and convolutions; no embeddings)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))


def model_flops(model: LongVITA, tokens: int, tiles: int) -> float:
    """PaLM-style model FLOPs of one training step on a one-document pack of ``tokens``
    tokens holding ``tiles`` image tiles (the module docstring's formula)."""
    cfg = model.config
    t, v = cfg.text, cfg.vision
    p_text = matmul_params(model.text) + matmul_params(model.lm_head)
    text = 6 * p_text * tokens + t.num_layers * 3 * 0.5 * 4 * tokens**2 * t.num_heads * t.head_dim
    patches = v.num_patches
    vit = 6 * matmul_params(model.vision) * tiles * patches
    vit += v.num_layers * 3 * 4 * patches**2 * v.num_heads * v.head_dim * tiles
    proj = 6 * matmul_params(model.projector) * tiles * cfg.tokens_per_tile
    return float(text + vit + proj)


# --------------------------------------------------------------------------------------
# The model, the pack and one step
# --------------------------------------------------------------------------------------


def slot_id(model: LongVITA) -> int:
    return model.config.text.vocab_size - 1


def build_model(s: Settings, stage: str, policy: str) -> LongVITA:
    """fp32 random weights made on the device; stage 1 leaves only the projector trainable."""
    cfg = preset(s.preset)
    cfg.text.num_layers = s.layers
    torch.manual_seed(0)
    with torch.device(s.device):
        model = LongVITA(cfg)
    model.config.image_token_ids = (slot_id(model),)
    model.train()
    if stage == "stage 1":
        model.requires_grad_(False)
        model.projector.requires_grad_(True)
    elif stage != "stage 3":
        raise ValueError(f"unknown stage {stage!r}")
    if policy != "none":
        apply_activation_checkpointing(model, policy)
    return model


def make_pack(model: LongVITA, tokens: int, tiles: int, device: str):
    """(input_ids, labels, pixel_values, cu_seqlens) of one synthetic one-document pack:
    random ids, ``tiles`` runs of slot tokens spread through it, labels shifted by one."""
    cfg = model.config
    tpt = cfg.tokens_per_tile
    slot = slot_id(model)
    if tiles * tpt >= tokens:
        raise ValueError(f"{tiles} tiles of {tpt} slots do not fit in {tokens} tokens")
    g = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, slot, (tokens,), generator=g)
    stride = tokens // max(tiles, 1)
    for i in range(tiles):  # one tile's slots at the start of each stretch, after a token of text
        start = i * stride + 1
        ids[start:start + tpt] = slot
    labels = torch.full_like(ids, -100)
    labels[:-1] = ids[1:]
    labels[ids == slot] = -100  # a slot predicts nothing
    labels[labels == slot] = -100  # nor is a slot predicted
    size = cfg.vision.image_size
    pixel_values = torch.randn(tiles, cfg.vision.num_channels, size, size, generator=g)
    cu_seqlens = torch.tensor([0, tokens], dtype=torch.int32)
    return ids.to(device), labels.to(device), pixel_values.to(device), cu_seqlens.to(device)


def setup_step(model: LongVITA, s: Settings):
    """fn() runs one training step (forward + backward + AdamW step) and returns the loss."""
    ids, labels, pixels, cu = make_pack(model, s.tokens, s.tiles, s.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)

    def step():
        with torch.autocast(s.device, dtype=torch.bfloat16, enabled=s.autocast):
            loss = packed_loss(model, ids, labels, pixels, cu_seqlens=cu)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def predicted_gib(model: LongVITA, s: Settings, stage: str, policy: str) -> float:
    """``longvita plan``'s peak for this row (``runtime.capacity.train_memory``): this
    step's optimizer runs torch's default foreach AdamW; fp32 without autocast on the CPU."""
    from longvita.runtime.capacity import GIB, train_memory

    plan = train_memory(model.config, s.tokens, stage=int(stage.split()[-1]), activation_checkpointing=policy,
                        precision="bf16" if s.autocast else "fp32", tiles=s.tiles, optimizer_foreach=True)
    return plan.peak_bytes / GIB


def measure(s: Settings, stage: str, policy: str) -> dict:
    """The metrics of one row; ``{"tokens": T}`` alone when the step ran out of memory."""
    model = build_model(s, stage, policy)
    step = setup_step(model, s)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = model_flops(model, s.tokens, s.tiles)
    metrics = {"tokens": s.tokens, "trainable": trainable / 1e6, "pred_gib": predicted_gib(model, s, stage, policy)}
    try:
        loss = step()  # warm-up: kernels compiled, the optimizer's state allocated
        sync(s.device)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{stage}: non-finite loss {loss.item()}")
        if s.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(s.iters):
            t0 = time.perf_counter()
            step()
            sync(s.device)
            times.append(time.perf_counter() - t0)
        times.sort()
        sec = times[len(times) // 2]
        metrics.update(ms=sec * 1e3, tok_s=s.tokens / sec, tflops=flops / sec / 1e12)
        peak = peak_flops(s.device)
        if peak is not None:
            metrics["mfu"] = flops / sec / peak
            if s.tokens == TARGET_TOKENS:
                metrics["mfu_target"] = MFU_TARGET
        if s.device == "cuda":
            metrics["gib"] = torch.cuda.max_memory_allocated() / GIB
    except Exception as e:
        if not is_cuda_oom(e):
            raise
        print(f"  {stage}: out of memory at {s.tokens} tokens", file=sys.stderr)
    del model, step
    free_memory(s.device)
    return metrics


def row_impl(stage: str, policy: str) -> str:
    return f"{stage}, activation checkpointing: {policy}"


def title(s: Settings) -> str:
    if s.cpu:
        return (f"Training step, CPU smoke run (tiny preset, {s.layers} layers, fp32, "
                f"{s.tokens} tokens, {s.tiles} tiles)")
    return (f"Training step, Long-VITA-14B shapes with {s.layers} of 48 decoder layers, random weights, "
            f"bf16 autocast over fp32 weights, AdamW, one {fmt_tokens(s.tokens)}-token pack with {s.tiles} tiles "
            f"(target: MFU >= {MFU_TARGET:.0%} at 128K on an H100)")


def run(args) -> int:
    s = settings_from_args(args)
    if s.cpu and not args.cpu_smoke:
        print("bench_train: no CUDA device; running the CPU smoke configuration (tiny preset).", file=sys.stderr)
    if s.cpu:
        torch.set_num_threads(1)  # tiny ops on a shared CI machine: one thread is fastest
    rows: list[Row] = []
    configs = CONFIGS
    if args.policies:
        policies = AC_POLICIES if args.policies == "all" else tuple(p.strip() for p in args.policies.split(","))
        bad = [p for p in policies if p not in AC_POLICIES]
        if bad:
            raise SystemExit(f"bench_train: --policies: unknown {bad}; choose from all or {', '.join(AC_POLICIES)}")
        configs = tuple(("stage 3", p) for p in policies)
    for stage, ac in configs:
        rows.append(Row(f"{stage} N={fmt_tokens(s.tokens)}", row_impl(stage, ac), measure(s, stage, ac)))
        write_json(NAME, title(s), rows, METRICS, args.out, quiet=True)
    print_table(title(s), rows, METRICS)
    write_json(NAME, title(s), rows, METRICS, args.out)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32K tokens, fewer timed steps")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny preset on the CPU (what CI runs)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers kept (default 4; CPU: 2)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens in the pack (default 131072; CPU: 384)")
    parser.add_argument("--tiles", type=int, default=None, help="image tiles in the pack (default 16; CPU: 4)")
    parser.add_argument("--policies", default=None, metavar="all|P,P",
                        help=f"stage 3 once per activation-checkpointing policy ({', '.join(AC_POLICIES)})")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train.json)")
    return run(parser.parse_args(argv))


# --------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------


@gpu_only
@pytest.mark.parametrize("stage,policy", CONFIGS)
def test_train_step(benchmark, stage, policy):
    s = settings_from_args(argparse.Namespace(cpu_smoke=False, quick=True, layers=4, tokens=32768, tiles=16))
    model = build_model(s, stage, policy)
    step = setup_step(model, s)
    median_s = pytest_benchmark_median(benchmark, step, f"train N=32K {row_impl(stage, policy)}",
                                       rounds=3, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = s.tokens / median_s
    peak = peak_flops(s.device)
    if peak is not None:
        benchmark.extra_info["mfu"] = model_flops(model, s.tokens, s.tiles) / median_s / peak


if __name__ == "__main__":
    sys.exit(main())
