"""Hybrid context parallelism (Ulysses all-to-all inside the zigzag ring) and chunked
prefill under CP, on gloo ranks against one process in float64: attention outputs, LSE
and every gradient; a training step with images; generation tokens and logits."""

from __future__ import annotations

import pytest
import torch
from _dist import run_on_ranks

from longvita.kernels import reference as ref
from longvita.parallel import CPShard, ParallelConfigError, ParallelDims, check_ulysses_heads, hybrid_attention

DOCS = [1, 13, 29, 2, 37]  # odd lengths, a 1-token document, none a multiple of 2P


def _qkv(seed, hq, hkv, d=8, lengths=DOCS):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q, k, v = (torch.randn(n, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    dout = torch.randn(n, hq, d, generator=g, dtype=torch.float64)
    dlse = torch.randn(hq, n, generator=g, dtype=torch.float64)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, dout, dlse, cu


def _reference(seed, hq, hkv, causal):
    q, k, v, dout, dlse, cu = _qkv(seed, hq, hkv)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = ref.varlen_attention_fwd_reference(q, k, v, cu, cu, causal=causal)
    ((out * dout).sum() + (lse * dlse).sum()).backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def _attention_on_ranks(rank, world, seed, configs):
    results = {}
    for ulysses, hq, hkv, causal in configs:
        cp = ParallelDims.of(world, world, ulysses).build("cpu").cp
        q, k, v, dout, dlse, cu = _qkv(seed, hq, hkv)
        shard = CPShard.build(cu, cp, "cpu")
        local = [shard.take(t).clone().requires_grad_() for t in (q, k, v)]
        out, lse = hybrid_attention(*local, shard.layout, groups=cp, causal=causal, return_lse=True)
        g_out = shard.take(dout)
        g_lse = shard.take(dlse.t()).t()
        ((out * g_out).sum() + (torch.where(torch.isfinite(lse), lse, 0) * g_lse).sum()).backward()
        results[(ulysses, hq, hkv, causal)] = dict(
            index=shard.index, valid=shard.valid, out=out.detach(), lse=lse.detach(),
            grads=[t.grad for t in local])
    return results


def _check(results, seed, configs):
    for cfg in configs:
        _, hq, hkv, causal = cfg
        want_out, want_lse, *want_grads = _reference(seed, hq, hkv, causal)
        seen = torch.zeros(sum(DOCS), dtype=torch.bool)
        for rank, res in enumerate(results):
            r = res[cfg]
            rows, valid = r["index"][r["valid"]], r["valid"]
            assert not seen[rows].any(), (cfg, rank)  # every real row on exactly one rank
            seen[rows] = True
            assert (r["out"][~valid] == 0).all() and (r["lse"][:, ~valid] == float("-inf")).all(), (cfg, rank)
            torch.testing.assert_close(r["out"][valid], want_out[rows], rtol=1e-10, atol=1e-12, msg=str((cfg, rank)))
            torch.testing.assert_close(r["lse"][:, valid], want_lse[:, rows], rtol=1e-10, atol=1e-12)
            for name, got, want in zip("qkv", r["grads"], want_grads):
                torch.testing.assert_close(got[valid], want[rows], rtol=1e-9, atol=1e-11, msg=f"d{name} {cfg} {rank}")
                assert (got[~valid] == 0).all(), (name, cfg, rank)
        assert seen.all(), cfg


# (ulysses, q heads, kv heads, causal): U dividing the KV heads, U a multiple of them
# (replicated: GQA 8:2 with U = 4), pure Ulysses (U = C), bidirectional
CONFIGS_4 = [(2, 8, 2, True), (4, 8, 2, True), (4, 8, 4, False), (1, 8, 2, True)]
CONFIGS_2 = [(2, 4, 2, True), (2, 4, 4, False)]


def test_hybrid_attention_equals_one_process_on_4_ranks(tmp_path):
    seed = int(torch.randint(0, 2**30, ()).item())
    results = run_on_ranks(_attention_on_ranks, 4, tmp_path, seed, CONFIGS_4, deadline_s=300)
    _check(results, seed, CONFIGS_4)


def test_hybrid_attention_equals_one_process_on_2_ranks(tmp_path):
    seed = int(torch.randint(0, 2**30, ()).item())
    results = run_on_ranks(_attention_on_ranks, 2, tmp_path, seed, CONFIGS_2)
    _check(results, seed, CONFIGS_2)


def test_bad_combinations_are_one_line_errors():
    with pytest.raises(ParallelConfigError, match="--ulysses 3 must divide --cp 4"):
        ParallelDims.of(4, 4, 3)
    with pytest.raises(ParallelConfigError, match="--ulysses 16 must divide the model's 8 attention heads"):
        check_ulysses_heads(16, 8, 2)
    with pytest.raises(ParallelConfigError, match="key/value heads"):
        check_ulysses_heads(4, 8 * 3, 6)
    check_ulysses_heads(8, 40, 8)  # Qwen2.5-14B: U = 8 splits its 8 KV heads
    check_ulysses_heads(4, 40, 2)  # replicated


def test_cli_refuses_bad_ulysses_in_one_line(capsys):
    from longvita.cli import main

    assert main(["generate", "--ulysses", "3"]) == 1  # one process: U must divide 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ulysses 3" in err[0]


# ----------------------------------------------------------------------------------
# Training: one step with images, (C, U) = (4, 2), equals one process
# ----------------------------------------------------------------------------------


def _train_step(rank, world, seed, ulysses):
    from test_train_dist import _batch, _grads, _model

    from longvita.runtime.train.loss import all_reduce_gradients, packed_loss

    cp = ParallelDims.of(world, world, ulysses).build("cpu").cp
    model = _model(seed, torch.float64)
    ids, labels, pixels, cu = _batch(seed, reset=True)
    loss = packed_loss(model, ids, labels, pixels.double(), cu_seqlens=cu, cp_group=cp)
    loss.backward()
    all_reduce_gradients(model, cp.group)
    return dict(loss=loss.item(), grads=_grads(model))


def test_hybrid_training_step_equals_one_process(tmp_path):
    from test_train_dist import _batch, _errors, _single

    seed = int(torch.randint(0, 2**30, ()).item())
    results = run_on_ranks(_train_step, 4, tmp_path, seed, 2, deadline_s=300)
    loss64, grads64 = _single(seed, [_batch(seed, reset=True)], torch.float64)
    assert abs(sum(r["loss"] for r in results) - loss64) <= 1e-10 * abs(loss64)
    for rank, r in enumerate(results):
        for name, err in _errors(r["grads"], grads64).items():
            assert err < 1e-10, (rank, name, err)


# ----------------------------------------------------------------------------------
# Generation: (C, U) = (4, 2) and a plain ring, with and without chunked prefill
# ----------------------------------------------------------------------------------


def _generate_on_ranks(rank, world, seed, cases):
    from test_cp_inference import NEW_TOKENS, _all_prompts, _model

    from longvita.runtime import ContextParallelPlan, generate

    model = _model(seed)
    out = {}
    for ulysses, chunk in cases:
        cp = ParallelDims.of(world, world, ulysses).build("cpu").cp
        for name, (ids, pixels) in _all_prompts(seed, model.config, None).items():
            plan = ContextParallelPlan(cp, tiles_per_chunk=2, prefill_chunk=chunk)
            logits, fractions = {}, []
            tokens = list(generate(model, ids, pixels, plan=plan, max_new_tokens=NEW_TOKENS,
                                   prefill_progress=fractions.append,
                                   on_logits=lambda s, row: logits.__setitem__(s, row.detach().cpu())))
            out[(ulysses, chunk, name)] = dict(tokens=tokens, logits=logits, kv=plan.stats.kv_tokens,
                                               fractions=fractions)
    return out


@pytest.mark.parametrize("world,cases", [(4, [(2, None), (2, 3), (4, 5)]), (2, [(1, 3), (1, 1)])])
def test_hybrid_and_chunked_generation_equal_one_process(tmp_path, world, cases):
    """Chunks of 3 tokens a rank cut through the tiny model's 4-token tiles."""
    from test_cp_inference import NEW_TOKENS, _all_prompts, _model, _reference

    seed = int(torch.randint(0, 2**30, ()).item())
    results = run_on_ranks(_generate_on_ranks, world, tmp_path, seed, cases, deadline_s=400)
    model = _model(seed)
    for name, (ids, pixels) in _all_prompts(seed, model.config, None).items():
        want, want_logits = _reference(model, ids, pixels, NEW_TOKENS)
        for case in cases:
            for rank, res in enumerate(results):
                got = res[(*case, name)]
                assert got["tokens"] == want, (case, name, rank)
                for step, row in got["logits"].items():
                    err = ((row - want_logits[step]).abs().max() / want_logits[step].abs().max()).item()
                    assert err < 1e-10, (case, name, rank, step, err)
                assert sum(got["kv"]) == ids.numel() + NEW_TOKENS - 1, (case, name, got["kv"])
                f = got["fractions"]
                assert f == sorted(f) and f[-1] == pytest.approx(1.0), (case, name, f)


def test_cli_generate_hybrid_and_chunked_under_torchrun():
    """torchrun, 2 ranks: --ulysses 2 --prefill-chunk 7 (chunks cut through tiles) gives the
    tokens of one process; the cache stays split over the ranks."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    e = dict(os.environ)
    e.pop("TRITON_INTERPRET", None)
    args = ["generate", "--model", "tiny", "--json", "--max-new-tokens", "4", "--seed", "4"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "longvita", *args, "--ulysses", "2", "--prefill-chunk", "7"],
                       capture_output=True, text=True, env=e, timeout=300, cwd=tempfile.gettempdir())
    assert r.returncode == 0, r.stderr[-3000:]
    cp = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][0])
    one = subprocess.run([sys.executable, "-m", "longvita", *args], capture_output=True, text=True, env=e, timeout=300,
                         cwd=tempfile.gettempdir())
    one = json.loads(one.stdout)
    assert cp["tokens"] == one["tokens"] and len(cp["kv_tokens"]) == 2
    assert sum(cp["kv_tokens"]) == one["kv_tokens"][0]
