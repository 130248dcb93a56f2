"""The model's ``DecoderAttention`` for context parallelism: what each decoder layer does
when the sequence is split over the ranks of a group. The model knows nothing of this;
the runtime builds one of these per forward and passes it in.

- ``RingCausalAttention``: causal ring attention over the zigzag shard, differentiable
  (training's packed loss, NIAH's teacher-forced scoring); ``ulysses.UlyssesRingAttention``
  is the same over a (ring x Ulysses) group.
- ``PrefillCacheAttention``: any of those for a prompt, keeping the K/V of the rank's real
  rows as its shard of the KV cache (``ShardedKVCache``).
- ``ChunkPrefillAttention``: one chunk of a prompt prefilled a chunk at a time: the chunk's
  rows attend causally to each other (the inner ring attention, with its LSE) and fully to
  every earlier chunk, whose K/V lie in the ranks' cache shards: the chunk's queries are
  all-gathered, every rank attends them to its own shard, an all-to-all brings each rank
  the partial results of its own rows, and all parts merge through the LSE.
- ``ShardedDecodeAttention``: one decoded token (the same on every rank) against every
  rank's cache shard. Its K/V are appended to the shard of the rank with the fewest cached
  tokens (so shards stay balanced); every rank attends to its own shard (no mask: all
  cached keys precede the token), and the ranks' partial (out, lse) are all-gathered in
  one buffer and merged through the LSE (``lse_merge_``, fp32): one small collective per
  layer. The prefix is never recomputed.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from longvita.kernels import lse_merge_, varlen_attention_fwd
from longvita.model import DecoderAttention
from longvita.parallel.ring import ring_attention
from longvita.parallel.zigzag import ZigzagLayout

# torch 2.13 renamed all_gather_into_tensor (and warns on the old name); torch 2.11 has only it
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

__all__ = ["ChunkPrefillAttention", "PrefillCacheAttention", "RingCausalAttention", "ShardedDecodeAttention",
           "ShardedKVCache"]


class RingCausalAttention(DecoderAttention):
    """Causal ring attention of the local zigzag rows against every rank's (differentiable)."""

    def __init__(self, layout: ZigzagLayout, group: dist.ProcessGroup | None = None):
        self.layout, self.group = layout, group

    def attend(self, layer_idx, q, k, v):
        return ring_attention(q, k, v, self.layout, group=self.group, causal=True)

    def attend_with_lse(self, layer_idx, q, k, v):
        return ring_attention(q, k, v, self.layout, group=self.group, causal=True, return_lse=True)


class ShardedKVCache:
    """This rank's share of one sequence's keys/values, every layer.

    k[layer], v[layer]: (capacity, kv_heads, head_dim). Rows [0, length) hold the K/V of
    the prompt tokens this rank owned in the prefill, then the decoded tokens assigned
    to it. Their order does not matter: a later token attends to every cached key.
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


class PrefillCacheAttention(DecoderAttention):
    """A prompt's attention (``inner``), with the K/V of this rank's real rows (``real_rows``,
    local indices) appended to its cache shard; ``added`` is the number of real rows every
    rank adds (the same list on every rank: the layout is shared), counted into the cache's
    lengths when the forward ends. ``progress(fraction)`` is called after each layer."""

    def __init__(self, inner: DecoderAttention, real_rows: torch.Tensor, cache: ShardedKVCache, added: list[int],
                 progress=None, num_layers: int = 1):
        self.inner, self.real_rows, self.cache, self.added = inner, real_rows, cache, list(added)
        self.progress, self.num_layers = progress, num_layers

    def _store(self, layer_idx, k, v):
        start, n = self.cache.length, self.real_rows.numel()
        self.cache.k[layer_idx][start:start + n] = k.index_select(0, self.real_rows)
        self.cache.v[layer_idx][start:start + n] = v.index_select(0, self.real_rows)

    def _report(self, layer_idx):
        if self.progress is not None:
            self.progress((layer_idx + 1) / self.num_layers)

    def attend(self, layer_idx, q, k, v):
        self._store(layer_idx, k, v)
        out = self.inner.attend(layer_idx, q, k, v)
        self._report(layer_idx)
        return out

    def finish(self):
        for r, a in enumerate(self.added):
            self.cache.lengths[r] += a


class ChunkPrefillAttention(PrefillCacheAttention):
    """One chunk of a chunked context-parallel prefill (see the module docstring).
    ``inner`` must offer ``attend_with_lse``; ``group`` is the whole CP group, whose ranks
    all hold the same number of chunk rows."""

    def __init__(self, inner, real_rows, cache: ShardedKVCache, added: list[int], group, world: int,
                 progress=None, num_layers: int = 1):
        super().__init__(inner, real_rows, cache, added, progress, num_layers)
        self.group, self.world = group, world

    def attend(self, layer_idx, q, k, v):
        out, lse = self.inner.attend_with_lse(layer_idx, q, k, v)  # the chunk's own causal part
        if sum(self.cache.lengths):  # earlier chunks, wherever their K/V lie
            acc = torch.float64 if q.dtype == torch.float64 else torch.float32
            out_acc, lse_acc = out.to(acc).contiguous(), lse.to(acc).contiguous()  # fresh fp32 accumulators
            o_c, l_c = self._against_cache(layer_idx, q, acc)
            lse_merge_(out_acc, lse_acc, o_c.contiguous(), l_c.contiguous())
            out = out_acc.to(q.dtype)
        self._store(layer_idx, k, v)
        self._report(layer_idx)
        return out

    def _against_cache(self, layer_idx, q, acc):
        """This rank's rows of the chunk against every rank's cached keys: (out, lse) in ``acc``."""
        n, heads, dim = q.shape
        c = self.cache
        if self.world > 1:  # every rank's rows of the chunk, in rank order
            queries = torch.empty((self.world * n, heads, dim), dtype=q.dtype, device=q.device)
            _all_gather(queries, q.contiguous(), group=self.group)
        else:
            queries = q
        m, keys = queries.shape[0], c.length
        if keys:
            cu = torch.tensor([0, m, 0, keys], dtype=torch.int32, device=q.device)
            out, lse = varlen_attention_fwd(queries, c.k[layer_idx][:keys], c.v[layer_idx][:keys], cu[:2], cu[2:],
                                            m, keys, causal=False)
        else:  # nothing cached here: adds exp(-inf) = 0 to the merge
            out = queries.new_zeros(queries.shape)
            lse = torch.full((heads, m), -math.inf, dtype=acc, device=q.device)
        if self.world == 1:
            return out.to(acc), lse.to(acc)
        # every rank's partial result for my rows: rows of rank j go back to rank j
        mine = torch.cat([out.to(acc).reshape(self.world, n * heads * dim),
                          lse.to(acc).reshape(heads, self.world, n).transpose(0, 1).reshape(self.world, heads * n)], 1)
        parts = torch.empty_like(mine)
        dist.all_to_all_single(parts, mine.contiguous(), group=self.group)
        out_acc = parts[0, : n * heads * dim].reshape(n, heads, dim).clone()
        lse_acc = parts[0, n * heads * dim:].reshape(heads, n).clone()
        for r in range(1, self.world):
            lse_merge_(out_acc, lse_acc, parts[r, : n * heads * dim].reshape(n, heads, dim),
                       parts[r, n * heads * dim:].reshape(heads, n))
        return out_acc, lse_acc


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
        merged_out = parts[0][: heads * dim].view(1, heads, dim).clone()  # fp32 accumulators
        merged_lse = parts[0][heads * dim :].view(heads, 1).clone()
        for part in parts[1:]:  # the token sees itself, so at least one lse is finite
            lse_merge_(merged_out, merged_lse, part[: heads * dim].view(1, heads, dim), part[heads * dim :].view(heads, 1))
        return merged_out.to(q.dtype)

    def finish(self):
        self.cache.lengths[self.owner] += 1
