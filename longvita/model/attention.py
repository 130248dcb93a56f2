"""The decoder's attention interface, and the model's own single-process implementations.

A decoder layer computes its rotated q, k, v and asks one ``DecoderAttention`` object for
the attention output; that object owns everything the layers need to know about the
batch (document offsets, a KV cache, a process group). The model implements the
single-process cases here; ``longvita.dist`` implements context-parallel ones (ring
attention for the prefill, a sharded KV cache for decoding) and passes them in from
outside, so the model never imports torch.distributed.

One object serves one forward: build it once per forward (once per decoded token), not
per layer, so its tensors (offsets) are made once.
"""

from __future__ import annotations

import torch

from longvita.kernels import varlen_attention
from longvita.model.config import TextConfig

__all__ = ["CachedAttention", "DecoderAttention", "KVCache", "PackedAttention"]


class KVCache:
    """Keys/values of one sequence for every layer, preallocated to ``capacity`` tokens.

    k[layer], v[layer]: (capacity, kv_heads, head_dim). Decoding appends; the prefix is
    never recomputed. ``length`` counts the tokens written so far.
    """

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], length: int = 0):
        self.k, self.v, self.length = k, v, length

    @classmethod
    def empty(cls, cfg: TextConfig, capacity: int, device, dtype) -> "KVCache":
        shape = (capacity, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            k=[torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)],
            v=[torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)],
        )

    @property
    def capacity(self) -> int:
        return self.k[0].shape[0]


class DecoderAttention:
    """What a decoder layer calls for attention during one forward.

    ``attend(layer_idx, q, k, v)``: q (n, Hq, D), k and v (n, Hkv, D) of this forward's n
    tokens (RoPE applied) -> (n, Hq, D). ``finish()`` runs once after the last layer.
    """

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finish(self) -> None:
        pass


class PackedAttention(DecoderAttention):
    """Causal attention within each packed document (no cache): training and plain forwards."""

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int):
        self.cu_seqlens, self.max_seqlen = cu_seqlens, max_seqlen

    def attend(self, layer_idx, q, k, v):
        return varlen_attention(q, k, v, self.cu_seqlens, self.cu_seqlens, self.max_seqlen, self.max_seqlen, causal=True)


class CachedAttention(DecoderAttention):
    """One sequence through a KV cache: append this forward's K/V, attend to all of it
    (bottom-right causal, so a chunk of n new tokens sees the prefix and itself)."""

    def __init__(self, cache: KVCache, new_tokens: int, device):
        if cache.length + new_tokens > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} tokens; {cache.length} + {new_tokens} do not fit")
        self.cache, self.start, self.end = cache, cache.length, cache.length + new_tokens
        # the offsets of this forward, one host-to-device copy for all layers
        cu = torch.tensor([0, new_tokens, 0, self.end], dtype=torch.int32, device=device)
        self.cu_q, self.cu_k = cu[:2], cu[2:]

    def attend(self, layer_idx, q, k, v):
        c = self.cache
        c.k[layer_idx][self.start : self.end] = k
        c.v[layer_idx][self.start : self.end] = v
        n = self.end - self.start
        return varlen_attention(
            q, c.k[layer_idx][: self.end], c.v[layer_idx][: self.end], self.cu_q, self.cu_k, n, self.end, causal=True
        )

    def finish(self):
        self.cache.length = self.end
