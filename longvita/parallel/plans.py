"""The model's ``DecoderAttention`` for context parallelism: what each decoder layer does
when the sequence is split over the ranks of a group. The model knows nothing of this;
the runtime builds one of these per forward and passes it in.

- ``RingCausalAttention``: causal ring attention over the zigzag shard, differentiable
  (training's packed loss, NIAH's teacher-forced scoring).
- ``RingPrefillAttention``: the same for a prompt, keeping the K/V of the rank's real
  tokens as its shard of the KV cache.
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

__all__ = ["RingCausalAttention", "RingPrefillAttention", "ShardedDecodeAttention", "ShardedKVCache"]


class RingCausalAttention(DecoderAttention):
    """Causal ring attention of the local zigzag rows against every rank's (differentiable)."""

    def __init__(self, layout: ZigzagLayout, group: dist.ProcessGroup | None = None):
        self.layout, self.group = layout, group

    def attend(self, layer_idx, q, k, v):
        return ring_attention(q, k, v, self.layout, group=self.group, causal=True)


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


class RingPrefillAttention(RingCausalAttention):
    """Prefill: ring attention over the zigzag shard; the K/V of real tokens go to the cache.
    ``progress(fraction)`` is called after each layer's attention (a progress bar)."""

    def __init__(self, layout: ZigzagLayout, real_rows: torch.Tensor, cache: ShardedKVCache, group,
                 progress=None, num_layers: int = 1):
        super().__init__(layout, group)
        self.real_rows, self.cache = real_rows, cache  # local rows that are not padding
        self.progress, self.num_layers = progress, num_layers

    def attend(self, layer_idx, q, k, v):
        n = self.real_rows.numel()
        self.cache.k[layer_idx][:n] = k.index_select(0, self.real_rows)
        self.cache.v[layer_idx][:n] = v.index_select(0, self.real_rows)
        out = super().attend(layer_idx, q, k, v)
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
        merged_out = parts[0][: heads * dim].view(1, heads, dim).clone()  # fp32 accumulators
        merged_lse = parts[0][heads * dim :].view(heads, 1).clone()
        for part in parts[1:]:  # the token sees itself, so at least one lse is finite
            lse_merge_(merged_out, merged_lse, part[: heads * dim].view(1, heads, dim), part[heads * dim :].view(heads, 1))
        return merged_out.to(q.dtype)

    def finish(self):
        self.cache.lengths[self.owner] += 1
