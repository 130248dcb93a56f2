"""Zigzag sharding and ring attention, checked against single-process attention.

The distributed checks spawn one gloo group per world size (2, 3, 4 CPU processes) and
run every case inside it, because starting processes costs seconds. Each rank builds
the same full inputs from a shared seed, runs ring attention on its zigzag shard,
unshards outputs and gradients, and rank 0 writes the errors against the
single-process result to a file; the assertions are made here, in the parent.

The per-block attention runs the torch reference backend (``backend="torch"``): the
ring's own logic (blocks, masks, merge, gradient travel) is what these tests check,
and Triton's CPU interpreter (TRITON_INTERPRET=1 in CI) would make them minutes long.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from _dist import run_on_ranks

from longvita.parallel import (
    ring_attention,
    visible_pairs_per_rank,
    zigzag_layout,
    zigzag_shard,
    zigzag_unshard,
)
from longvita.kernels import varlen_attention
from longvita.kernels import lse_merge_
from longvita.kernels.lse_merge.torch import lse_merge_torch_

PACKED = [1, 5, 0, 37, 90]  # not multiples of 2P; a zero-length document too
SINGLE = [131]  # stages 3-4: the whole packed sequence is one document
D = 16


def _cu(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _full_inputs(seed, lengths, hq, hkv, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, hq, D, generator=g, dtype=torch.float64)
    k = torch.randn(total, hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(total, hkv, D, generator=g, dtype=torch.float64)
    dout = torch.randn(total, hq, D, generator=g, dtype=torch.float64)
    dlse = torch.randn(hq, total, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, dout, dlse)]


def _reference(q, k, v, dout, dlse, cu, causal):
    """Single-process attention on the full sequence: out, lse and the q/k/v gradients."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    n = int((cu[1:] - cu[:-1]).max())
    out, lse = varlen_attention(q, k, v, cu, cu, n, n, causal=causal, return_lse=True, backend="torch")
    ((out * dout).sum() + (lse * dlse).sum()).backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def _ring(q, k, v, dout, dlse, cu, causal, rank, world, layout=None, backend="torch"):
    """Ring attention on this rank's shard; returns the unsharded out, lse and gradients."""
    cu_or_layout = layout if layout is not None else cu
    shard = lambda x: zigzag_shard(x, cu_or_layout, rank, world)[0]  # noqa: E731
    ql, kl, vl = (shard(t).detach().requires_grad_(True) for t in (q, k, v))
    out, lse = ring_attention(ql, kl, vl, cu_or_layout, causal=causal, return_lse=True, backend=backend)
    # padding rows give out 0 and lse -inf, and a cotangent there (noise) changes nothing
    real = zigzag_layout(cu, world).real_tokens[rank]
    assert bool((out[~real] == 0).all()) and bool((lse[:, ~real] == -math.inf).all()), "padding rows"
    dout_l = torch.where(real[:, None, None], shard(dout), torch.randn_like(out))
    ((out * dout_l).sum() + (torch.where(real[None], lse, 0) * shard(dlse.t()).t()).sum()).backward()
    unshard = lambda x: zigzag_unshard(x.detach().contiguous(), cu, rank, world)  # noqa: E731
    return unshard(out), unshard(lse.t()).t(), unshard(ql.grad), unshard(kl.grad), unshard(vl.grad)


def _checks(rank, world, seed):
    results = {}
    # shard / unshard round trip, exact
    cu = _cu(PACKED)
    x = torch.randn(sum(PACKED), 3, 5, generator=torch.Generator().manual_seed(seed))
    xl, cu_local = zigzag_shard(x, cu, rank, world)
    results["roundtrip_exact"] = bool(torch.equal(zigzag_unshard(xl, cu, rank, world), x))
    results["cu_local_equal"] = cu_local.tolist()
    # exactness in fp32 (GQA 4 query heads on 2 K/V heads), causal / bidirectional / one document
    cases = {
        "packed_causal_gqa": (PACKED, True, 4, 2),
        "packed_noncausal_gqa": (PACKED, False, 4, 2),
        "single_causal": (SINGLE, True, 2, 1),
        "single_noncausal_mha": (SINGLE, False, 2, 2),
    }
    for i, (name, (lengths, causal, hq, hkv)) in enumerate(cases.items()):
        cu = _cu(lengths)
        inputs = _full_inputs(seed + i, lengths, hq, hkv)
        layout = zigzag_layout(cu, world) if i % 2 else None  # both call forms
        got = _ring(*inputs, cu, causal, rank, world, layout)
        want = _reference(*inputs, cu, causal)
        results[name] = {k: _rel(a, b) for k, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want)}
        results[name]["finite"] = all(bool(torch.isfinite(t).all()) for t in got)
    # the Triton per-block kernel (Triton's CPU interpreter here; slow, so one case at P = 2)
    from longvita.kernels._backend import triton_runs_on

    if world == 2 and triton_runs_on(torch.device("cpu")):
        cu = _cu(PACKED)
        inputs = _full_inputs(seed + 50, PACKED, 4, 2)
        got = _ring(*inputs, cu, True, rank, world, backend="triton")
        want = _reference(*inputs, cu, True)
        results["triton_packed_causal_gqa"] = {k: _rel(a, b) for k, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want)}
        results["triton_packed_causal_gqa"]["finite"] = all(bool(torch.isfinite(t).all()) for t in got)
    # degenerate batches: one token (other ranks hold only padding), nothing at all
    for name, lengths in (("one_token", [1]), ("empty", [0, 0])):
        cu = _cu(lengths)
        inputs = _full_inputs(seed, lengths, 2, 1)
        got = _ring(*inputs, cu, True, rank, world)
        if sum(lengths):
            want = _reference(*inputs, cu, True)
        else:  # no tokens: every result is empty, with the shape and dtype of a real one
            q, k, v = inputs[:3]
            want = (torch.zeros_like(q), torch.full((q.shape[1], 0), -math.inf), torch.zeros_like(q),
                    torch.zeros_like(k), torch.zeros_like(v))
        results[name] = {
            n: _rel(a, b) if b.numel() else float(a.shape != b.shape or a.dtype != b.dtype)
            for n, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want)
        }
        results[name]["finite"] = all(bool(torch.isfinite(t).all()) for t in got)
    # error growth in fp16 against float64 (forward and gradients)
    cu = _cu(PACKED)
    q, k, v, dout, dlse = _full_inputs(seed + 100, PACKED, 4, 2, torch.float64)
    half = [t.to(torch.float16) for t in (q, k, v, dout)] + [dlse.float()]
    want = _reference(*[t.double() for t in half], cu, True)  # float64 on the very same (rounded) inputs
    ring16 = _ring(*half, cu, True, rank, world)
    single16 = _reference(*half, cu, True)
    err = lambda a, b: (a.double() - b).abs().mean().item()  # noqa: E731
    names = ("out", "lse", "dq", "dk", "dv")
    results["fp16"] = {n: (err(r, w), err(s, w)) for n, r, s, w in zip(names, ring16, single16, want)}
    return results


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ring_attention_matches_single_process(world, tmp_path):
    seed = int(torch.randint(0, 2**30, ()).item())
    results = run_on_ranks(_checks, world, tmp_path, seed, deadline_s=150)
    for rank, res in enumerate(results):
        assert res["roundtrip_exact"], f"rank {rank}: zigzag_unshard(zigzag_shard(x)) != x"
        assert res["cu_local_equal"] == results[0]["cu_local_equal"], "cu_seqlens_local differs across ranks"
        cases = ["packed_causal_gqa", "packed_noncausal_gqa", "single_causal", "single_noncausal_mha", "one_token", "empty"]
        if world == 2 and os.environ.get("TRITON_INTERPRET") == "1":
            cases.append("triton_packed_causal_gqa")
        for case in cases:
            errs = res[case]
            assert errs["finite"], f"rank {rank} {case}: NaN/inf in outputs or gradients"
            for what in ("out", "lse", "dq", "dk", "dv"):
                assert errs[what] < 1e-5, f"rank {rank} {case}: {what} relative error {errs[what]:.2e}"
    if world == 4:
        # Error growth round the ring, in fp16, both sides against float64 on the same
        # fp16-rounded inputs (mean absolute error). The single-process torch backend
        # computes in fp32 and rounds once, the strictest baseline there is. The ring gets
        # each block's output from the building block rounded to fp16, merges in fp32 and
        # rounds once more (expected ~sqrt(2)x): the forward must stay within 1.5x. The
        # building block also returns each block's dQ/dK/dV rounded to fp16, and P of
        # them add up in fp32, so the gradients get the project's 2x rule (docs/architecture.md, "Numerics").
        for what, (ring_err, single_err) in results[0]["fp16"].items():
            bound = 1.5 if what in ("out", "lse") else 2.0
            assert ring_err <= bound * single_err + 1e-7, (
                f"fp16 {what}: ring error {ring_err:.3e} > {bound}x single-process {single_err:.3e}"
            )


def test_single_rank_without_process_group():
    cu = _cu(PACKED)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):  # float64 accumulates in float64
        q, k, v, dout, dlse = _full_inputs(1, PACKED, 4, 2, dtype)
        for causal in (True, False):
            got = _ring(q, k, v, dout, dlse, cu, causal, 0, 1)
            want = _reference(q, k, v, dout, dlse, cu, causal)
            for a, b in zip(got, want):
                assert a.dtype == b.dtype and _rel(a, b) < tol


def test_zigzag_layout_rule():
    # P = 2: 2P = 4 chunks; a 37-token document pads to 40, chunks of 10
    cu = _cu([37])
    x = torch.arange(37.0)
    x0, cu0 = zigzag_shard(x, cu, 0, 2)
    x1, _ = zigzag_shard(x, cu, 1, 2)
    assert cu0.dtype == torch.int32 and cu0.tolist() == [0, 20]
    assert x0.tolist() == list(range(0, 10)) + [30.0 + i for i in range(7)] + [0.0] * 3
    assert x1.tolist() == list(range(10, 30))


def test_zigzag_balance():
    for lengths in ([131072], [8191, 30011, 65537, 1, 17]):
        cu = _cu(lengths)
        for p in (2, 4, 8):
            zig = visible_pairs_per_rank(cu, p, "zigzag")
            cont = visible_pairs_per_rank(cu, p, "contiguous")
            total_pairs = sum(n * (n + 1) // 2 for n in lengths)
            assert sum(zig) == total_pairs == sum(cont)
            mean = total_pairs / p
            assert max(zig) / mean <= 1.05, (lengths, p, zig)
            if len(lengths) == 1:
                assert max(cont) / mean == pytest.approx((2 * p - 1) / p, rel=1e-3)


def test_lse_merge_triton_matches_torch():
    from longvita.kernels._backend import triton_runs_on

    if not triton_runs_on(torch.device("cpu")) and not torch.cuda.is_available():
        pytest.skip("Triton cannot run here (no CUDA, TRITON_INTERPRET unset)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t, h, d = 37, 3, 24  # head_dim not a power of two
    lse_a = torch.randn(h, t, device=device) * 3
    lse_b = torch.randn(h, t, device=device) * 3
    lse_a[:, :5] = -math.inf  # a sees no key
    lse_b[:, 3:8] = -math.inf  # b sees no key (rows 3, 4: neither)
    out_a = torch.randn(t, h, d, device=device)
    out_a[:5] = 0
    out_b = torch.randn(t, h, d, device=device).half()
    out_b[3:8] = 0
    want_o, want_l = lse_merge_torch_(out_a.clone(), lse_a.clone(), out_b, lse_b)
    got_o, got_l = lse_merge_(out_a.clone(), lse_a.clone(), out_b, lse_b, backend="triton")
    assert torch.isfinite(got_o).all() and not torch.isnan(got_l).any()
    assert torch.equal(got_l.isinf(), want_l.isinf()) and (got_l[:, 3:5] == -math.inf).all()
    torch.testing.assert_close(got_o, want_o, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_l, want_l, rtol=1e-6, atol=1e-6)
    # against the naive formula in float64
    lse64 = torch.logaddexp(lse_a.double(), lse_b.double())
    wa = torch.exp(lse_a.double() - lse64).nan_to_num(0).t()[..., None]
    wb = torch.exp(lse_b.double() - lse64).nan_to_num(0).t()[..., None]
    torch.testing.assert_close(got_o.double(), wa * out_a.double() + wb * out_b.double(), rtol=1e-5, atol=1e-6)


def test_validation_errors():
    cu = _cu(PACKED)
    x = torch.randn(sum(PACKED), 2)
    with pytest.raises(ValueError, match="non-decreasing"):
        zigzag_shard(x, torch.tensor([0, 5, 3], dtype=torch.int32), 0, 2)
    with pytest.raises(ValueError, match="start at 0"):
        zigzag_layout(torch.tensor([1, 5], dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="rows"):
        zigzag_shard(x[:-1], cu, 0, 2)
    with pytest.raises(ValueError, match="rank"):
        zigzag_shard(x, cu, 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        zigzag_layout(cu, 0)
    q = torch.randn(zigzag_layout(cu, 2).total_local, 4, D)
    with pytest.raises(ValueError, match="built for world_size 2, but world_size is 1"):
        ring_attention(q, q[:, :2], q[:, :2], zigzag_layout(cu, 2))  # no process group: one rank
    with pytest.raises(ValueError, match="zigzag-local tokens"):
        ring_attention(q, q[:, :2], q[:, :2], cu)
    q1 = torch.randn(zigzag_layout(cu, 1).total_local, 4, D)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        ring_attention(q1, q1[:, :3], q1[:, :3], cu)
