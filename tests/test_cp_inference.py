"""Context-parallel generation (zigzag prefill with ring attention, sharded KV-cache
decode) against a plain single-process reference that recomputes the whole sequence
at every step.

One gloo group per world size (1 to 4 CPU processes) runs every case; ranks write what
they saw to files and the assertions are made here, in the parent. The model runs in
float64 so that greedy tokens cannot flip on a rounding difference between the two
computation orders (a real bug changes them; rounding does not)."""

from __future__ import annotations

import pytest
import torch
from _dist import run_on_ranks, write_mp4

from longvita.model import LongVITA, preset
from longvita.parallel import zigzag_layout
from longvita.runtime import ContextParallelPlan, Sampling, generate

SLOT = 500  # the image-context placeholder id of these tests
NEW_TOKENS = 6


def _model(seed: int) -> LongVITA:
    torch.manual_seed(seed)
    cfg = preset("tiny")
    cfg.image_token_ids = (SLOT,)
    model = LongVITA(cfg).double().eval()
    with torch.no_grad():  # random weights with structure, as the CLI's demo model
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5)
    return model


def _prompts(seed: int, cfg):
    """name -> (input_ids, pixel_values): media in the middle; media only at the start."""
    g = torch.Generator().manual_seed(seed)
    n = cfg.tokens_per_tile
    s = cfg.vision.image_size

    def text(k):
        return torch.randint(0, 400, (k,), generator=g)

    mid = torch.cat([text(7), torch.full((n,), SLOT), text(3), torch.full((2 * n,), SLOT), text(11)])
    start = torch.cat([torch.full((n,), SLOT), text(60)])  # P=2: the tile lies in rank 0's first chunk
    return {
        "media_mid": (mid, torch.randn(3, 3, s, s, generator=g, dtype=torch.float64)),
        "media_start": (start, torch.randn(1, 3, s, s, generator=g, dtype=torch.float64)),
        "text_only": (text(23), None),
    }


def _reference(model, ids, pixels, steps):
    """Greedy tokens and every step's logits, recomputing the whole sequence each step.
    Generated tokens are text (embedded as such even when a random model picks the
    placeholder id), so the sequence grows by their token embeddings."""
    tokens, logits = [], []
    with torch.no_grad():
        embeds = model.embed(ids, pixels)
        for _ in range(steps):
            row = model.logits(model(embeds))[-1]
            tokens.append(int(row.argmax()))
            logits.append(row)
            embeds = torch.cat([embeds, model.text.embed_tokens(torch.tensor([tokens[-1]]))])
    return tokens, logits


def _all_prompts(seed, cfg, video_path):
    prompts = _prompts(seed, cfg)
    if video_path is not None:  # the frames stay uint8, as the CLI passes them
        from longvita.data.video import read_video

        frames = read_video(video_path, image_size=cfg.vision.image_size, raw=True).pixel_values
        g = torch.Generator().manual_seed(seed + 2)
        slots = torch.full((frames.shape[0] * cfg.tokens_per_tile,), SLOT)
        prompts["mp4"] = (torch.cat([torch.randint(0, 400, (5,), generator=g), slots,
                                     torch.randint(0, 400, (9,), generator=g)]), frames)
    return prompts


def _run(rank, world, seed, video_path=None):
    model = _model(seed)
    results = {}
    for name, (ids, pixels) in _all_prompts(seed, model.config, video_path).items():
        seen = []
        real = model.image_embeddings
        model.image_embeddings = lambda p, real=real: (seen.append(p.shape[0]), real(p))[1]
        plan = ContextParallelPlan(tiles_per_chunk=2)
        fractions, logits = [], {}
        tokens = list(generate(model, ids, pixels, plan=plan, max_new_tokens=NEW_TOKENS,
                               prefill_progress=fractions.append,
                               on_logits=lambda step, row: logits.__setitem__(step, row.detach().cpu())))
        assert fractions == [(i + 1) / model.config.text.num_layers for i in range(model.config.text.num_layers)]
        model.image_embeddings = real
        results[name] = dict(tokens=tokens, kv_tokens=plan.stats.kv_tokens, tiles=plan.stats.tiles_encoded,
                             vision_calls=seen, logits=logits)
    # sampled, with a prompt of 2P+1 tokens: its last token lies on the last rank, which
    # computes the first logits; every rank's generator must stay in step
    gen = torch.Generator().manual_seed(seed)
    results["sampled"] = list(generate(model, _short(seed, world), plan=ContextParallelPlan(), sampling=SAMPLING,
                                       generator=gen, max_new_tokens=NEW_TOKENS))
    return results


SAMPLING_ARGS = dict(temperature=1.5, top_k=100)


def _short(seed, world):
    return torch.randint(0, 400, (2 * world + 1,), generator=torch.Generator().manual_seed(seed + 1))


SAMPLING = Sampling(**SAMPLING_ARGS)


def _expected_tiles(ids, world, rank, tpt):
    """Tiles whose context tokens fall in `rank`'s zigzag shard (counted independently)."""
    layout = zigzag_layout(torch.tensor([0, ids.numel()]), world)
    index, valid = layout.local_to_global(rank)
    slot_rank = torch.cumsum(ids == SLOT, 0) - 1
    mine = {int(slot_rank[i]) // tpt for i, ok in zip(index.tolist(), valid.tolist()) if ok and int(ids[i]) == SLOT}
    return len(mine)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_cp_generation_equals_single_process_recompute(world, tmp_path):
    seed = int(torch.randint(0, 2**30, ()).item())
    video_path = None
    try:
        import av  # noqa: F401  (only to know whether a real mp4 can be made)

        video_path = str(tmp_path / "clip.mp4")
        write_mp4(video_path, n_frames=9, fps=3, seed=seed)  # 3 s at 3 fps
    except ImportError:  # without PyAV the image and text cases still run
        pass
    if world == 1:  # no process group at all: the same code on one rank
        results = [_run(0, 1, seed, video_path)]
    else:
        results = run_on_ranks(_run, world, tmp_path, seed, video_path)
    model = _model(seed)
    tpt = model.config.tokens_per_tile
    for name, (ids, pixels) in _all_prompts(seed, model.config, video_path).items():
        want, want_logits = _reference(model, ids, pixels, NEW_TOKENS)
        steps_seen = set()
        for rank, res in enumerate(results):
            got = res[name]
            assert got["tokens"] == want, f"{name}, rank {rank}/{world}: {got['tokens']} != {want}"
            # tokens alone can hide a wrong attention (a tiny random model may repeat
            # itself): every logit row this rank computed matches too, in float64
            for step, row in got["logits"].items():
                err = ((row - want_logits[step]).abs().max() / want_logits[step].abs().max()).item()
                assert err < 1e-10, f"{name}, rank {rank}/{world}, step {step}: logits relative error {err:.2e}"
                steps_seen.add(step)
            kv = got["kv_tokens"]
            # every prompt token and every decoded token but the last is cached exactly once
            assert sum(kv) == ids.numel() + NEW_TOKENS - 1, (name, kv)
            assert max(kv) - min(kv) <= 2 + 1, (name, kv)  # one document: 2 padding + 1 after decode
            # the vision tower ran only on the tiles this rank owns, in chunks of <= 2
            assert got["tiles"] == _expected_tiles(ids, world, rank, tpt), (name, rank, got["tiles"])
            assert sum(got["vision_calls"]) == got["tiles"] and all(c <= 2 for c in got["vision_calls"])
        assert steps_seen == set(range(NEW_TOKENS)), (name, steps_seen)  # the prefill's and every decode's
    # sampled generation draws exactly what one process draws
    gen = torch.Generator().manual_seed(seed)
    want = list(generate(model, _short(seed, world), max_new_tokens=NEW_TOKENS, generator=gen, sampling=SAMPLING))
    for rank, res in enumerate(results):
        assert res["sampled"] == want, f"sampled, rank {rank}/{world}: {res['sampled']} != {want}"
    if world == 2:  # the media of "media_start" sit entirely on rank 0
        assert results[0]["media_start"]["tiles"] == 1 and results[1]["media_start"]["tiles"] == 0


def test_too_many_ranks_for_the_prompt_is_a_clear_error():
    plan = ContextParallelPlan()
    plan.world = 4  # as if 4 ranks: the check comes before any communication
    with pytest.raises(ValueError, match="needs at least 8"):
        next(generate(_model(0), torch.arange(5), plan=plan))
