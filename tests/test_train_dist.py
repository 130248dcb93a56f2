"""Training under context and data parallelism: one step's loss and gradients equal a
single process's, in fp32 (relative error < 1e-5), with images and a trainable ViT.

Each rank returns its loss share and its gradients (summed over the ranks as the
runtime does); the parent adds the shares and compares with one process."""

from __future__ import annotations

import pytest
import torch
from _dist import run_on_ranks

from longvita.model import LongVITA, preset
from longvita.parallel import zigzag_layout
from longvita.runtime.train.loss import all_reduce_gradients, packed_loss

SLOT = 500


def _model(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = preset("tiny")
    cfg.image_token_ids = (SLOT,)
    model = LongVITA(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5 / max(p.shape[-1], 1) ** 0.5) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model.to(dtype)


def _batch(seed, reset: bool, n_docs: int = 3):
    """A pack of samples with media slots and shifted labels (ignored outside 'answers')."""
    g = torch.Generator().manual_seed(seed)
    cfg = preset("tiny")
    n = cfg.tokens_per_tile
    ids, labels, lengths, tiles = [], [], [], 0
    for d in range(n_docs):
        k = d % 2 + 1  # tiles in this sample
        doc = torch.cat([torch.randint(0, 400, (3 + d,), generator=g), torch.full((k * n,), SLOT),
                         torch.randint(0, 400, (9 + 2 * d,), generator=g)])
        lab = torch.full_like(doc, -100)
        lab[-7:-1] = doc[-6:]  # predict the last 6 tokens (shifted within the sample)
        ids.append(doc), labels.append(lab), lengths.append(doc.numel())
        tiles += k
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    if not reset:
        cu = torch.tensor([0, int(cu[-1])], dtype=torch.int32)
    s = cfg.vision.image_size
    pixels = torch.randn(tiles, 3, s, s, generator=g)
    return torch.cat(ids), torch.cat(labels), pixels, cu


def _grads(model):
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out[name] = None if g is None else g.detach().clone()
    return out


def _single(seed, batches, dtype=torch.float32):
    model = _model(seed, dtype)
    total = torch.zeros((), dtype=torch.float64)
    # the global mean over every batch = sum of per-batch sums / global count
    count = sum(int((b[1] != -100).sum()) for b in batches)
    for ids, labels, pixels, cu in batches:
        share = packed_loss(model, ids, labels, pixels.to(dtype), cu_seqlens=cu) * (labels != -100).sum() / count
        share.backward()
        total += share.detach()
    return float(total), _grads(model)


def _cp_step(rank, world, seed, reset):
    out = {}
    for dtype in (torch.float64, torch.float32):
        model = _model(seed, dtype)
        ids, labels, pixels, cu = _batch(seed, reset)
        seen = []
        real = model.image_embeddings
        model.image_embeddings = lambda p, real=real: (seen.append(p.shape[0]), real(p))[1]
        loss = packed_loss(model, ids, labels, pixels.to(dtype), cu_seqlens=cu)
        loss.backward()
        all_reduce_gradients(model)
        out[dtype] = dict(loss=loss.item(), grads=_grads(model), tiles=sum(seen))
    return out


def _errors(grads, want):
    """Per tensor ||got - want|| / ||want||. A gradient that is zero in exact arithmetic
    (the attention's key bias: softmax ignores a shift shared by every key) is rounding
    noise whose fp32 size varies with the seed, so each tensor's norm is floored at 1e-2
    of the largest gradient norm (the float64 checks, at 1e-10, are the exact ones)."""
    assert grads.keys() == want.keys()
    floor = 1e-2 * max(g.norm().item() for g in want.values() if g is not None)
    errs = {}
    for name, g in want.items():
        assert (grads[name] is None) == (g is None), name
        if g is not None:
            errs[name] = (grads[name].double() - g).norm().item() / max(g.norm().item(), floor)
    return errs


@pytest.mark.parametrize("world,reset", [(2, True), (2, False), (3, True)])
def test_cp_step_equals_single_process(world, reset, tmp_path):
    """float64: the CP step is exact (< 1e-10), which is what catches a wrong shard, mask or
    merge. fp32: relative error < 1e-5 against float64 per tensor (or within 2x of one fp32
    process where that is larger: the ring and the gradient sum add in another order)."""
    seed = int(torch.randint(0, 2**30, ()).item())
    results = run_on_ranks(_cp_step, world, tmp_path, seed, reset)
    batch = _batch(seed, reset)
    loss64, grads64 = _single(seed, [batch], torch.float64)
    _, grads32 = _single(seed, [batch], torch.float32)
    single32 = _errors(grads32, grads64)
    for rank, r in enumerate(results):
        exact, fp32 = r[torch.float64], r[torch.float32]
        assert abs(sum(x[torch.float64]["loss"] for x in results) - loss64) <= 1e-10 * abs(loss64)
        for name, err in _errors(exact["grads"], grads64).items():  # every rank holds the summed gradients
            assert err < 1e-10, (rank, name, err)
        for name, err in _errors(fp32["grads"], grads64).items():
            assert err < max(1e-5, 2 * single32[name]), (rank, name, err, single32[name])
    # the ViT is trained, and each rank encoded exactly the tiles whose tokens it holds
    assert grads64["vision.layers.0.attn.q_proj.weight"].abs().max() > 0
    ids, _, _, cu = batch
    layout = zigzag_layout(cu, world)
    slot = torch.cumsum(ids == SLOT, 0) - 1
    for rank, r in enumerate(results):
        index, valid = layout.local_to_global(rank)
        mine = {int(slot[i]) // 4 for i, ok in zip(index.tolist(), valid.tolist()) if ok and int(ids[i]) == SLOT}
        assert r[torch.float64]["tiles"] == max(len(mine), 1), (rank, mine)  # >= 1: see embed_rows(touch_vision)


def _fsdp_step(rank, world, seed, cp: int):
    """FSDP2 over every rank; CP groups of `cp` consecutive ranks, each group its own batch."""
    import torch.distributed as dist

    from longvita.parallel import ParallelDims
    from longvita.runtime.train.parallelize import parallelize, sum_gradients_loss

    mesh = ParallelDims.of(world, cp).build("cpu")
    module = parallelize(_model(seed), mesh.fsdp)  # the PackedLoss around the model, FSDP2 over every rank
    ids, labels, pixels, cu = _batch(seed + 1 + mesh.dp_index, reset=True)  # one batch per CP group
    loss = packed_loss(module, ids, labels, pixels, cu_seqlens=cu, cp_group=mesh.cp_group, dp_group=mesh.dp_group)
    sum_gradients_loss(loss, mesh.fsdp).backward()
    grads = _grads(module.model)
    # the sharded module computes a plain (one-process) loss too: the whole forward is one
    # FSDP2-hooked call; every rank creates every 1-rank group, in order (torch.distributed's rule)
    alone = [dist.new_group([r]) for r in range(world)][rank]
    with torch.no_grad():
        again = packed_loss(module, ids, labels, pixels, cu_seqlens=cu, cp_group=alone, touch_vision=True)
    return dict(loss=loss.item(), grads=grads, loss_api=again.item())


@pytest.mark.parametrize("world,cp", [(2, 1), (4, 2)])
def test_fsdp_and_cp_step_equals_single_process(world, cp, tmp_path):
    """FSDP=2 (pure data parallel) and CP=2 x FSDP=2 on 4 ranks equal one process that
    sees every batch, in fp32."""
    seed = int(torch.randint(0, 2**30, ()).item())
    results = run_on_ranks(_fsdp_step, world, tmp_path, seed, cp, deadline_s=240)
    batches = [_batch(seed + 1 + g, reset=True) for g in range(world // cp)]
    loss64, grads64 = _single(seed, batches, torch.float64)
    _, grads32 = _single(seed, batches, torch.float32)
    single32 = _errors(grads32, grads64)
    assert abs(sum(r["loss"] for r in results) - loss64) <= 1e-5 * abs(loss64)
    for rank, r in enumerate(results):
        for name, err in _errors(r["grads"], grads64).items():
            assert err < max(1e-5, 2 * single32[name]), (rank, name, err, single32[name])
        assert r["loss_api"] > 0


@pytest.mark.parametrize("policy", ["every-other", "mlp"])
def test_activation_checkpointing_policies_recompute_what_they_name(policy):
    """every-other recomputes blocks 0, 2, ... and no other; mlp recomputes every block's MLP
    and never its attention. Gradients equal the plain model's in float64 either way."""
    from longvita.runtime.train.parallelize import apply_activation_checkpointing

    seed = int(torch.randint(0, 2**30, ()).item())
    ids, labels, pixels, cu = _batch(seed, reset=True)
    plain = _model(seed, torch.float64)
    packed_loss(plain, ids, labels, pixels.double(), cu_seqlens=cu).backward()
    model = _model(seed, torch.float64)
    assert len(model.text.layers) >= 2 and len(model.vision.layers) >= 2
    counted = {}
    for stack, blocks in (("text", model.text.layers), ("vision", model.vision.layers)):
        for i in (0, 1):
            for part, mod in (("block", blocks[i]), ("mlp", blocks[i].mlp)):
                key = f"{stack}{i}.{part}"
                counted[key] = 0
                inner = mod.forward
                def counting(*a, inner=inner, key=key, **k):
                    counted[key] += 1
                    return inner(*a, **k)
                mod.forward = counting
    apply_activation_checkpointing(model, policy)
    packed_loss(model, ids, labels, pixels.double(), cu_seqlens=cu).backward()
    for key, n in counted.items():
        stack_i, part = key.split(".")
        i = int(stack_i[-1])
        if policy == "every-other":
            expected = 2 if i == 0 else 1  # the checkpointed block runs its MLP again too
        else:
            expected = 2 if part == "mlp" else 1
        assert n == expected, (policy, key, n, counted)
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-14), name
    with pytest.raises(ValueError, match="activation checkpointing policy"):
        apply_activation_checkpointing(_model(seed), "selective")


def test_activation_checkpointing_recomputes_and_keeps_gradients():
    """Every decoder layer and ViT block runs again in the backward; gradients are the same."""
    from longvita.runtime.train.parallelize import apply_activation_checkpointing

    seed = int(torch.randint(0, 2**30, ()).item())
    ids, labels, pixels, cu = _batch(seed, reset=True)
    plain = _model(seed, torch.float64)
    packed_loss(plain, ids, labels, pixels.double(), cu_seqlens=cu).backward()
    model = _model(seed, torch.float64)
    calls = []
    for name, layer in [("text0", model.text.layers[0]), ("vision0", model.vision.layers[0])]:
        inner = layer.forward  # counts every run of the layer's computation, recomputes included
        layer.forward = lambda *a, inner=inner, name=name, **k: (calls.append(name), inner(*a, **k))[1]
    apply_activation_checkpointing(model)
    loss = packed_loss(model, ids, labels, pixels.double(), cu_seqlens=cu)
    assert calls == ["vision0", "text0"]
    loss.backward()
    assert sorted(calls) == ["text0", "text0", "vision0", "vision0"]  # recomputed once each
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-14), name
    with torch.no_grad():  # no recompute, no checkpoint in inference
        calls.clear()
        packed_loss(model, ids, labels, pixels.double(), cu_seqlens=cu)
        assert calls == ["vision0", "text0"]
