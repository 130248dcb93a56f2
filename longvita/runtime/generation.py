"""Generation: ONE decode loop (gpt-fast's shape: prefill, then decode one token, sample,
stop), run by a plan that says where the prompt and the KV cache live.

- ``LocalPlan``: one process and one ``KVCache``; ``prefill_chunk=N`` runs the prompt
  through the cache N tokens at a time (media included), so activation memory is bounded
  by N, not by the prompt.
- ``ContextParallelPlan``: the prompt is sharded over the ranks of a context-parallel group
  (``parallel.CPShard``: zigzag over a ring, optionally Ulysses inside it); every decoder
  layer runs ring attention, each rank encodes only the tiles whose context tokens it
  holds and keeps the K/V of its real tokens; only the last prompt position reaches the LM
  head, on the rank that holds it, and its logits are broadcast. ``prefill_chunk`` prefills
  through the sharded cache a chunk at a time. Decoding runs the new token on every rank
  against the sharded cache (``parallel.ShardedDecodeAttention``). Every rank yields the
  same tokens.

Both plans give every rank the logits of every step, so every rank draws from its own
generator in step with the others (and with a single-process run); rank 0's choice is
broadcast all the same, so no rank can drift. Only the last position ever reaches the LM
head, and the prefix is never recomputed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from longvita.common import LongVITAError
from longvita.model import CachedAttention, ContextLengthWarning, KVCache, LongVITA
from longvita.parallel import (
    ChunkPrefillAttention,
    CPGroups,
    CPShard,
    PrefillCacheAttention,
    ShardedDecodeAttention,
    ShardedKVCache,
    check_ulysses_heads,
    rank_world,
)
from longvita.parallel.groups import broadcast_from
from longvita.runtime.sampling import Sampling

__all__ = ["ContextParallelPlan", "GenerationStats", "LocalPlan", "NonFiniteLogits", "check_prompt", "generate"]


class NonFiniteLogits(LongVITAError, RuntimeError):
    """The model produced NaN or infinite logits: its weights or config hold non-finite values."""


@dataclass
class GenerationStats:
    """What one generation did on this rank (for reports and tests)."""

    prompt_tokens: int = 0
    tiles_encoded: int = 0  # vision-tower tiles this rank encoded in the prefill
    kv_tokens: list[int] = field(default_factory=list)  # cached tokens per rank


def check_prompt(model: LongVITA, input_ids: torch.Tensor, max_new_tokens: int) -> None:
    """ValueError, before any work, for a prompt that is not a non-empty 1-D tensor, a
    negative ``max_new_tokens``, or a sequence past the model's ``max_position_embeddings``;
    a ``ContextLengthWarning`` for one past its trained length."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1 or input_ids.numel() == 0:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a non-empty 1-D prompt, got {got}")
    tokens, limit = input_ids.shape[0] + max_new_tokens, model.config.text.max_position_embeddings
    if tokens > limit:
        raise ValueError(f"the sequence needs {tokens} positions but the model's max_position_embeddings is {limit}")
    if model.config.past_trained_length(tokens):
        warnings.warn(f"the prompt ({input_ids.shape[0]} tokens with its media) and up to {max_new_tokens} new tokens "
                      f"reach past the {model.config.trained_length} tokens the model was trained on (its config's "
                      f"longvita_trained_length): positions there are untrained and answers may be wrong",
                      ContextLengthWarning, stacklevel=3)


class LocalPlan:
    """One process: the prompt through one KV cache, whole or ``prefill_chunk`` tokens at a time."""

    def __init__(self, prefill_chunk: int | None = None, tiles_per_chunk: int = 64):
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be an int >= 1, got {prefill_chunk!r}")
        self.prefill_chunk, self.tiles_per_chunk = prefill_chunk, tiles_per_chunk
        self.stats = GenerationStats()
        self.cache: KVCache | None = None

    def check(self, model, input_ids) -> None:
        pass

    def prefill(self, model, input_ids, pixel_values, capacity: int, progress) -> torch.Tensor:
        device = model.lm_head.weight.device
        total, input_ids = input_ids.shape[0], input_ids.to(device)
        self.cache = cache = KVCache.empty(model.config.text, capacity, device, model.text.embed_tokens.weight.dtype)
        chunk = self.prefill_chunk or total
        tiles = 0
        for start in range(0, total, chunk):
            rows = torch.arange(start, min(start + chunk, total), device=device)
            embeds, n = model.embed_rows(input_ids, pixel_values, rows, tiles_per_chunk=self.tiles_per_chunk)
            hidden = model(embeds, attention=CachedAttention(cache, rows.numel(), device))
            tiles += n
            if progress is not None and self.prefill_chunk is not None:
                progress(int(rows[-1]) / (total - 1) if total > 1 else 1.0)
        self.stats = GenerationStats(prompt_tokens=total, tiles_encoded=tiles)
        return model.logits(hidden, torch.tensor([hidden.shape[0] - 1], device=device))[0]

    def decode(self, model, token: int, position: int) -> torch.Tensor:
        device = model.text.embed_tokens.weight.device
        embeds = model.text.embed_tokens(torch.tensor([token], device=device))
        hidden = model(embeds, attention=CachedAttention(self.cache, 1, device))
        return model.logits(hidden, torch.zeros(1, dtype=torch.long, device=device))[0]

    def agree(self, token: int) -> int:
        return token

    def finish(self) -> None:
        self.stats.kv_tokens = [self.cache.length] if self.cache is not None else [0]


class ContextParallelPlan:
    """The prompt and the KV cache split over the ranks of a context-parallel group: ``cp`` is
    a ``parallel.CPGroups`` (a ring of Ulysses groups), a process group (a plain ring over
    it), or None (the default group when torch.distributed is initialised, else one process
    through the same code). Every rank calls ``generate`` with the same arguments and yields
    the same tokens.

    ``prefill_chunk=N``: the prompt goes through the sharded cache N tokens per rank at a
    time (N x P per step): each chunk is zigzag-sharded, its rows attend causally to each
    other over the ring and fully to the earlier chunks in every rank's cache shard
    (``parallel.ChunkPrefillAttention``), so a rank's activation memory is bounded by N."""

    def __init__(self, cp=None, tiles_per_chunk: int = 64, prefill_chunk: int | None = None):
        if tiles_per_chunk < 1:
            raise ValueError(f"tiles_per_chunk must be >= 1, got {tiles_per_chunk}")
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be an int >= 1, got {prefill_chunk!r}")
        self.groups = CPGroups.of(cp)
        self.tiles_per_chunk, self.prefill_chunk = tiles_per_chunk, prefill_chunk
        self.rank, self.world = rank_world(self.groups.group)
        self.stats = GenerationStats()
        self.cache: ShardedKVCache | None = None

    def check(self, model, input_ids) -> None:
        if input_ids.shape[0] < 2 * self.world:
            raise ValueError(f"the prompt has {input_ids.shape[0]} tokens: context parallelism over {self.world} "
                             f"ranks needs at least {2 * self.world}")
        t = model.config.text
        check_ulysses_heads(self.groups.ulysses_degree, t.num_heads, t.num_kv_heads)

    def prefill(self, model, input_ids, pixel_values, capacity: int, progress) -> torch.Tensor:
        total = input_ids.shape[0]
        device = model.lm_head.weight.device
        input_ids = input_ids.to(device)
        step = self.prefill_chunk * self.world if self.prefill_chunk else total
        shards = [CPShard.of_sequence(min(step, total - s), self.groups, device, offset=s) for s in range(0, total, step)]
        # every rank's real rows of every chunk (the layouts are shared: the same on every rank)
        added = [[shard.real_rows_of(c) for c in range(self.world)] for shard in shards]
        mine = sum(a[self.rank] for a in added)
        # at most every decoded token lands on this rank
        self.cache = cache = ShardedKVCache(model.config.text, mine + capacity - total, [0] * self.world, self.rank,
                                            device, model.text.embed_tokens.weight.dtype)
        layers, tiles = model.config.text.num_layers, 0
        for j, shard in enumerate(shards):
            embeds, n = shard.embed(model, input_ids, pixel_values, tiles_per_chunk=self.tiles_per_chunk)
            tiles += n
            report = None if progress is None else (lambda f, j=j: progress((j + f) / len(shards)))
            real_rows = shard.valid.nonzero().squeeze(1)
            if len(shards) == 1:
                attention = PrefillCacheAttention(shard.attention(), real_rows, cache, added[j], report, layers)
            else:
                attention = ChunkPrefillAttention(shard.attention(with_lse=True), real_rows, cache, added[j],
                                                  self.groups.group, self.world, report, layers)
            hidden = model(embeds, shard.positions(), attention)
        self.stats = GenerationStats(prompt_tokens=total, tiles_encoded=tiles)
        # the rank holding the last prompt token computes its logits (one row) and sends them to all
        owner = shard.owner_of(total - 1)
        logits = torch.empty(model.config.text.vocab_size, dtype=hidden.dtype, device=device)
        if self.rank == owner:
            last, _ = shard.local_rows(torch.tensor([total - 1]))
            logits = model.logits(hidden, last)[0]
        return broadcast_from(logits, owner, self.groups.group)

    def decode(self, model, token: int, position: int) -> torch.Tensor:
        device = model.lm_head.weight.device
        attention = ShardedDecodeAttention(self.cache, self.groups.group, self.world, device)
        embeds = model.text.embed_tokens(torch.tensor([token], device=device))
        hidden = model(embeds, torch.tensor([position], device=device), attention)
        return model.logits(hidden, torch.zeros(1, dtype=torch.long, device=device))[0]  # merged: the same on every rank

    def agree(self, token: int) -> int:
        t = torch.tensor([token], device=self.cache.k[0].device)  # NCCL wants it on the GPU
        return int(broadcast_from(t, 0, self.groups.group)[0])  # a guard: rank 0's choice is everyone's

    def finish(self) -> None:
        self.stats.kv_tokens = list(self.cache.lengths) if self.cache is not None else []


def generate(
    model: LongVITA,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    *,
    plan: LocalPlan | ContextParallelPlan | None = None,
    max_new_tokens: int = 32,
    eos_token_id: int | None = None,
    sampling: Sampling = Sampling(),
    generator: torch.Generator | None = None,
    prefill_progress: Callable[[float], None] | None = None,
    on_logits: Callable[[int, torch.Tensor], None] | None = None,
) -> Iterator[int]:
    """Yield the new token ids of one sequence: prefill once, then KV-cached decode.

    input_ids: (L,) the whole prompt (on every rank under CP); pixel_values: (tiles, C, S, S)
    its tiles in slot order, normalised float or uint8 (may stay on the CPU: tiles move to
    the model's device a bounded chunk at a time). plan: ``LocalPlan()`` (default) or
    ``ContextParallelPlan(group)``; ``plan.stats`` says what was done. sampling: greedy by
    default (``Sampling(temperature, top_k, top_p)`` draws from ``generator``).
    ``prefill_progress(fraction)`` reports the prefill (per chunk, or per layer under CP);
    ``on_logits(step, logits)`` sees the (V,) logits each token is drawn from.
    Raises ``NonFiniteLogits`` when the model's logits hold NaN or inf (broken weights or
    config): nothing is yielded from them."""
    plan = plan if plan is not None else LocalPlan()
    check_prompt(model, input_ids, max_new_tokens)
    plan.check(model, input_ids)
    if max_new_tokens == 0:
        return  # nothing to generate: no prefill either
    total = input_ids.shape[0]
    with torch.inference_mode():
        logits = plan.prefill(model, input_ids, pixel_values, total + max_new_tokens, prefill_progress)
    try:
        for step in range(max_new_tokens):
            if not bool(torch.isfinite(logits).all()):
                raise NonFiniteLogits(f"the model's logits are not finite at generated token {step + 1}: its weights "
                                      f"or config hold NaN/inf values")
            if on_logits is not None:
                on_logits(step, logits)
            token = plan.agree(sampling(logits, generator))
            yield token
            # the last token needs no forward of its own: stop before computing its logits
            if step == max_new_tokens - 1 or (eos_token_id is not None and token == eos_token_id):
                break
            with torch.inference_mode():
                logits = plan.decode(model, token, total + step)
    finally:
        plan.finish()
