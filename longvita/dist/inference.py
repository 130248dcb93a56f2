"""Context-parallel inference: zigzag-sharded prefill with ring attention, then decoding
against a KV cache that stays sharded over the ranks.

Prefill. The whole prompt (ids, positions, media slots) is known on every rank; one
``ZigzagLayout`` cuts it (rank r keeps chunks r and 2P-1-r), and every decoder layer runs
``ring_attention`` on the rank's shard. Each rank embeds only its own tokens and encodes
only the tiles whose context tokens it holds (``LongVITA.embed_rows``; a tile cut by a
chunk edge is encoded by both ranks), and keeps the K/V of its real tokens as its cache
shard. Only the last prompt position reaches the LM head, on the rank that holds it;
the chosen token is broadcast.

Decode. Every rank runs the new token through the layers (one token: cheap, and it keeps
the ranks in step). In each layer the token's K/V are appended to the shard of the rank
with the fewest cached tokens (so shards stay balanced), every rank attends to its own
shard (no mask: all cached keys precede the token), and the partial (out, lse) of all
ranks are all-gathered and merged through the LSE in fp32: one small collective per
layer. The prefix is never recomputed.

The model knows nothing of this: the two attention objects below implement the model's
``DecoderAttention`` interface and are passed in from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from longvita.dist.ring_attention import ring_attention
from longvita.dist.zigzag import ZigzagLayout, zigzag_layout
from longvita.kernels import gather_logits
from longvita.kernels.attention import varlen_attention_fwd
from longvita.model import DecoderAttention, LongVITA, Sampling

__all__ = ["ContextParallelGenerator", "ShardedKVCache"]


def _rank_world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class ShardedKVCache:
    """This rank's share of one sequence's keys/values, every layer.

    k[layer], v[layer]: (capacity, kv_heads, head_dim). Rows [0, length) hold the K/V of
    the prompt tokens this rank owned in the prefill, then the decoded tokens assigned
    to it. Their order does not matter: a decoded token attends to every cached key.
    ``lengths`` is every rank's count (kept in step on all ranks without communication:
    the assignment rule is deterministic).
    """

    def __init__(self, cfg, capacity: int, lengths: list[int], rank: int, device, dtype):
        shape = (capacity, cfg.num_kv_heads, cfg.head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.lengths, self.rank = list(lengths), rank

    @property
    def length(self) -> int:
        return self.lengths[self.rank]

    def next_owner(self) -> int:
        """The rank that takes the next token's K/V: the fewest cached tokens, lowest rank on a tie."""
        return min(range(len(self.lengths)), key=lambda r: (self.lengths[r], r))


class RingPrefillAttention(DecoderAttention):
    """Prefill: ring attention over the zigzag shard; the K/V of real tokens go to the cache.
    ``progress(fraction)`` is called after each layer's attention (a progress bar)."""

    def __init__(self, layout: ZigzagLayout, cache: ShardedKVCache, group, progress=None, num_layers: int = 1):
        self.layout, self.cache, self.group = layout, cache, group
        self.progress, self.num_layers = progress, num_layers
        self.real_rows = layout.real_tokens[cache.rank].nonzero().squeeze(1)  # local rows that are not padding

    def attend(self, layer_idx, q, k, v):
        n = self.real_rows.numel()
        self.cache.k[layer_idx][:n] = k.index_select(0, self.real_rows)
        self.cache.v[layer_idx][:n] = v.index_select(0, self.real_rows)
        out = ring_attention(q, k, v, self.layout, group=self.group, causal=True)
        if self.progress is not None:
            self.progress((layer_idx + 1) / self.num_layers)
        return out


class ShardedDecodeAttention(DecoderAttention):
    """Decode: one token (the same on every rank) against every rank's cache shard."""

    def __init__(self, cache: ShardedKVCache, group, world: int, device):
        self.cache, self.group, self.world = cache, group, world
        self.owner = cache.next_owner()
        self.n_keys = cache.length + (1 if self.owner == cache.rank else 0)
        cu = torch.tensor([0, 1, 0, self.n_keys], dtype=torch.int32, device=device)  # once for all layers
        self.cu_q, self.cu_k = cu[:2], cu[2:]

    def attend(self, layer_idx, q, k, v):
        c, n = self.cache, self.n_keys
        if self.owner == c.rank:
            c.k[layer_idx][n - 1 : n] = k
            c.v[layer_idx][n - 1 : n] = v
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        heads, dim = q.shape[1], q.shape[2]
        if n > 0:
            out, lse = varlen_attention_fwd(
                q, c.k[layer_idx][:n], c.v[layer_idx][:n], self.cu_q, self.cu_k, 1, n, causal=False
            )  # (1, Hq, D), (Hq, 1)
        else:  # an empty shard sees nothing: it adds exp(-inf) = 0 to the merge
            out = q.new_zeros(q.shape)
            lse = torch.full((heads, 1), -math.inf, dtype=acc, device=q.device)
        if self.world == 1:
            return out
        # one collective per layer: every rank's (out, lse) in one buffer
        mine = torch.cat([out.to(acc).flatten(), lse.to(acc).flatten()])
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine, group=self.group)
        both = torch.stack(parts)  # (P, Hq*D + Hq)
        outs = both[:, : heads * dim].view(self.world, heads, dim)
        lses = both[:, heads * dim :]  # (P, Hq)
        # stable merge: weights exp(lse_r - logsumexp_r lse_r); the token sees itself, so
        # at least one lse is finite
        weights = torch.softmax(lses, dim=0)  # (P, Hq)
        merged = (weights[..., None] * outs).sum(0)  # (Hq, D)
        return merged.to(q.dtype).unsqueeze(0)

    def finish(self):
        self.cache.lengths[self.owner] += 1


@dataclass
class GenerationStats:
    """What one ``generate`` call did on this rank (for reports and tests)."""

    prompt_tokens: int = 0
    tiles_encoded: int = 0  # vision-tower tiles this rank encoded in the prefill
    kv_tokens: list[int] = field(default_factory=list)  # cached tokens per rank


class ContextParallelGenerator:
    """Generation of one sequence with its prompt and KV cache split over the ranks of
    ``group`` (every rank calls ``generate`` with the same arguments; every rank yields
    the same tokens). With one rank (or no process group) it is plain single-process
    generation through the same code.

    Example (under ``torchrun --nproc-per-node P``; see the README)::

        pipe = load_pipeline(folder, device=f"cuda:{local_rank}")
        cp = ContextParallelGenerator(pipe.model)
        for token in cp.generate(input_ids, pixel_values, max_new_tokens=64):
            ...
    """

    def __init__(
        self, model: LongVITA, group: dist.ProcessGroup | None = None, *, tiles_per_chunk: int = 64,
        keep_logits: bool = False,
    ):
        if tiles_per_chunk < 1:
            raise ValueError(f"tiles_per_chunk must be >= 1, got {tiles_per_chunk}")
        self.model, self.group, self.tiles_per_chunk = model, group, tiles_per_chunk
        # keep_logits: record {step: logits (V,)} of the steps this rank computed (checks)
        self.keep_logits, self.logits = keep_logits, {}
        self.rank, self.world = _rank_world(group)
        self.stats = GenerationStats()
        self.cache: ShardedKVCache | None = None

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        eos_token_id: int | None = None,
        sampling: Sampling = Sampling(),
        generator: torch.Generator | None = None,
        prefill_progress: Callable[[float], None] | None = None,
    ) -> Iterator[int]:
        """Yield the new token ids. input_ids (L,) the whole prompt, on every rank;
        pixel_values (tiles, 3, S, S) its tiles in slot order, normalised float or uint8
        (may stay on the CPU: each rank moves only the tiles it encodes).
        ``prefill_progress(fraction)`` is called after every layer of the prefill."""
        model, rank, world = self.model, self.rank, self.world
        model.check_generation(input_ids, max_new_tokens)
        total = input_ids.shape[0]
        if total < 2 * world:
            raise ValueError(
                f"the prompt has {total} tokens: context parallelism over {world} ranks needs at least {2 * world}"
            )
        if max_new_tokens == 0:
            return  # nothing to generate: no prefill either
        device = model.lm_head.weight.device
        input_ids = input_ids.to(device)

        # prefill: this rank's zigzag shard of the prompt
        layout = zigzag_layout(torch.tensor([0, total], dtype=torch.int32), world, device)
        index, valid = layout.local_to_global(rank)  # (total_local,) global position of each local row
        index, valid = index.to(device), valid.to(device)
        embeds, tiles = model.embed_rows(input_ids, pixel_values, index, tiles_per_chunk=self.tiles_per_chunk)
        embeds = embeds * valid[:, None].to(embeds.dtype)  # padding rows: zeros, as zigzag_shard pads
        lengths = [int(layout.real_tokens[r].sum()) for r in range(world)]
        capacity = lengths[rank] + max_new_tokens  # at most every decoded token lands here
        self.cache = cache = ShardedKVCache(model.config.text, capacity, lengths, rank, device, embeds.dtype)
        self.stats = GenerationStats(prompt_tokens=total, tiles_encoded=tiles)
        self.logits = {}
        attention = RingPrefillAttention(layout, cache, self.group, prefill_progress, model.config.text.num_layers)
        hidden = model.hidden_states(inputs_embeds=embeds, position_ids=index, attention=attention)

        # the last prompt token: the rank that holds it computes its logits (one row) and
        # sends them to all, so that every rank draws from its own generator and the
        # generators stay in step with each other (and with a single-process run)
        last_local = ((index == total - 1) & valid).nonzero().squeeze(1)
        owner = self._owner_of_last(layout, total)
        logits = torch.empty(1, model.config.text.vocab_size, dtype=hidden.dtype, device=device)
        if rank == owner:
            logits = gather_logits(hidden, model.lm_head.weight, last_local)
            self._keep(0, logits)
        self._broadcast(logits, owner)
        token = torch.tensor([sampling(logits[0], generator)], device=device)
        self._broadcast(token, 0)  # a guard: rank 0's choice is everyone's

        for step in range(max_new_tokens):
            tok = int(token[0])
            yield tok
            if step == max_new_tokens - 1 or (eos_token_id is not None and tok == eos_token_id):
                break
            attention = ShardedDecodeAttention(cache, self.group, world, device)
            position = torch.tensor([total + step], device=device)
            hidden = model.hidden_states(token, position_ids=position, attention=attention)
            logits = gather_logits(hidden, model.lm_head.weight, torch.zeros(1, dtype=torch.long, device=device))
            self._keep(step + 1, logits)
            # every rank holds the same merged logits and draws alike; rank 0's choice is
            # broadcast all the same, so no rank can drift
            token[0] = sampling(logits[0], generator)
            self._broadcast(token, 0)
        self.stats.kv_tokens = list(cache.lengths)

    def _keep(self, step: int, logits: torch.Tensor) -> None:
        if self.keep_logits:
            self.logits[step] = logits[0].detach().cpu()

    @staticmethod
    def _owner_of_last(layout: ZigzagLayout, total: int) -> int:
        for r in range(layout.world_size):
            index, valid = layout.local_to_global(r)
            if bool(((index == total - 1) & valid).any()):
                return r
        raise AssertionError("no rank holds the last prompt token")  # the layout covers every token

    def _broadcast(self, tensor: torch.Tensor, src: int) -> None:
        if self.world > 1:
            dist.broadcast(tensor, src=dist.get_global_rank(self.group, src) if self.group is not None else src,
                           group=self.group)
